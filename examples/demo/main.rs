//! The demo behind `make demo`: an upstream, Prometheus, Sluice,
//! sluice-controller and Envoy on loopback, k6 sending traffic through
//! Envoy, and what Sluice and the controller decided, live, summed up and
//! drawn.
//!
//! ```text
//! cargo run --release --example demo -- [--duration 60s] [--policy examples/demo.yaml] [--out target/demo]
//! ```
//!
//! Three phases: a quarter, a half, a quarter of the run. *Calm*: four
//! users show the per-user rate limit (429 with `retry-after`) and the
//! closed beta (403) while the controller learns the normal latency.
//! *Crowd*: subscribers and guests arrive, more than the upstream can
//! serve; its latency climbs and the controller lowers the load
//! scheduler's multiplier until latency is back near its setpoint, and
//! subscribers (priority 200) keep most of what is admitted while guests
//! (priority 20) get 503s. *Recovery*: the crowd leaves and the controller
//! raises the multiplier back to pass-through.
//!
//! Every second shows the controller's latency signal and setpoint and the
//! multiplier in force (read from their `/metrics`) and what each source
//! got back (from k6's output). At the end: the totals, what Prometheus
//! received, and a picture, `target/demo/demo.svg`, with the per-second
//! series in `target/demo/demo.json`.
//!
//! Needs Envoy, Prometheus and k6 (`scripts/bootstrap.sh`, which `make demo`
//! runs first). Ctrl-C or SIGTERM stops everything it started, after
//! writing what it has.

#[path = "lib.rs"]
mod demo;

use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = match demo::Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{}", demo::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let stop = match stop_signal() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("demo: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (seconds, _) = tokio::sync::watch::channel(0);
    match demo::run(args, stop, seconds).await {
        Ok(summary) if summary.interrupted => ExitCode::from(130),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on the first SIGINT or SIGTERM. A second one ends the
/// process at once.
fn stop_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            eprintln!("demo: stopping at once");
            std::process::exit(130);
        });
    })
}
