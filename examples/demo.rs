//! The demo behind `make demo`: Envoy, an upstream, Sluice and Prometheus on
//! loopback, four simulated users sending traffic through Envoy, and what
//! Sluice decided, live and summed up.
//!
//! ```text
//! cargo run --release --example demo -- [--duration 30s] [--policy examples/demo.yaml]
//! ```
//!
//! Needs Envoy and Prometheus (`scripts/bootstrap.sh`, which `make demo`
//! runs first). Ctrl-C stops everything it started.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice::harness::{Envoy, EnvoyPorts, Latency, Prometheus, Upstream, http, repo_root};
use sluice::server::{Config, Sidecar};
use sluice::telemetry::remote_write::RemoteWriteConfig;

/// A simulated user: who, what path, how many requests per second.
struct User {
    name: &'static str,
    path: &'static str,
    per_second: u32,
    note: &'static str,
}

const USERS: [User; 4] = [
    User {
        name: "alice",
        path: "/api/items",
        per_second: 8,
        note: "bursts above her limit",
    },
    User {
        name: "bob",
        path: "/api/orders",
        per_second: 1,
        note: "stays within his limit",
    },
    User {
        name: "carol",
        path: "/api/items/42",
        per_second: 2,
        note: "twice her refill rate",
    },
    User {
        name: "dave",
        path: "/beta/search",
        per_second: 1,
        note: "tries the closed beta",
    },
];

/// Answers per user per status, for one second and in total.
type Tally = BTreeMap<&'static str, BTreeMap<u16, u64>>;

struct Args {
    duration: Duration,
    policy: PathBuf,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        duration: Duration::from_secs(30),
        policy: repo_root().join("examples/demo.yaml"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => args.duration = sluice::policy::types::DurationSpec::parse(&value()?)?,
            "--policy" => args.policy = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("usage: demo [--duration 30s] [--policy examples/demo.yaml]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

async fn drive(
    front: SocketAddr,
    user: &'static User,
    now: Arc<Mutex<Tally>>,
    total: Arc<Mutex<Tally>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / user.per_second);
    loop {
        tick.tick().await;
        let status = match http::get(front, user.path, &[("user-id", user.name)]).await {
            Ok(reply) => reply.status,
            Err(_) => 0,
        };
        for tally in [&now, &total] {
            *tally
                .lock()
                .entry(user.name)
                .or_default()
                .entry(status)
                .or_default() += 1;
        }
    }
}

fn describe(counts: Option<&BTreeMap<u16, u64>>) -> String {
    match counts {
        None => "-".to_owned(),
        Some(c) => c
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = args().map_err(anyhow::Error::msg)?;
    println!("Sluice demo: starting an upstream, Prometheus, Sluice and Envoy on 127.0.0.1 ...");
    // 15 ms per request, 2 ms more per other request in flight.
    let upstream = Upstream::start_with(
        0,
        Latency {
            base: Duration::from_millis(15),
            per_inflight: Duration::from_millis(2),
        },
    )
    .await?;
    let prometheus = Prometheus::start(&[], Duration::from_secs(1)).await?;
    let sidecar = Sidecar::start(&Config {
        policy: Some(args.policy.clone()),
        remote_write: Some(RemoteWriteConfig {
            url: prometheus.remote_write_url().parse()?,
            interval: Duration::from_secs(1),
            external_labels: vec![("job".to_owned(), "sluice-demo".to_owned())],
            bearer_token: None,
            ca_file: None,
            max_queued_batches: 30,
            timeout: Duration::from_secs(5),
        }),
        ..Config::ephemeral()
    })
    .await?;
    let envoy = Envoy::start(
        "envoy-configs/quickstart.yaml",
        EnvoyPorts::free(upstream.addr.port(), sidecar.grpc_addr.port())?,
    )
    .await?;
    let front = envoy.listener();
    println!("  upstream    http://{}", upstream.addr);
    println!(
        "  sluice      grpc {}  admin http://{}/metrics",
        sidecar.grpc_addr, sidecar.admin_addr
    );
    println!(
        "  envoy       http://{front}  (admin http://127.0.0.1:{})",
        envoy.ports.admin
    );
    println!(
        "  prometheus  http://{}  (Sluice remote-writes to it every second)",
        prometheus.addr
    );
    println!("  policy      {}", args.policy.display());
    println!();
    println!(
        "Traffic through Envoy for {:?}; each user sends the header user-id:",
        args.duration
    );
    for u in &USERS {
        println!(
            "  {:<6} {:>2}/s to {:<14} {}",
            u.name, u.per_second, u.path, u.note
        );
    }
    println!("The policy allows each user a burst of 5, then 1 request/s (429 beyond),");
    println!("and closes /beta/* to everyone (403 from the sampler at 0%).");
    println!();

    let now = Arc::new(Mutex::new(Tally::new()));
    let total = Arc::new(Mutex::new(Tally::new()));
    let drivers: Vec<_> = USERS
        .iter()
        .map(|u| tokio::spawn(drive(front, u, now.clone(), total.clone())))
        .collect();

    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.tick().await;
    let end = tokio::time::Instant::now() + args.duration;
    let mut elapsed = 0;
    loop {
        tokio::select! {
            _ = second.tick() => {}
            _ = tokio::signal::ctrl_c() => { println!("\ninterrupted"); break; }
        }
        elapsed += 1;
        let tally = std::mem::take(&mut *now.lock());
        let line: Vec<String> = USERS
            .iter()
            .map(|u| format!("{} {}", u.name, describe(tally.get(u.name))))
            .collect();
        println!("t={elapsed:>3}s  {}", line.join(" | "));
        if tokio::time::Instant::now() >= end {
            break;
        }
    }
    drivers.iter().for_each(|d| d.abort());

    println!();
    println!("Answers per user (HTTP status × count):");
    let total = total.lock().clone();
    for u in &USERS {
        println!("  {:<6} {}", u.name, describe(total.get(u.name)));
    }
    // Let the last access logs arrive and one more remote-write go out,
    // then show what Prometheus received.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    println!();
    println!("What Prometheus received from Sluice by remote-write:");
    const P50: &str = r#"histogram_quantile(0.5, sum by (le) (flux_meter_bucket{flux_meter_name="latency",http_status_code="200"}))"#;
    const P99: &str = r#"histogram_quantile(0.99, sum by (le) (flux_meter_bucket{flux_meter_name="latency",http_status_code="200"}))"#;
    const MEAN: &str = r#"sum(flux_meter_sum{flux_meter_name="latency",http_status_code="200"}) / sum(flux_meter_count{flux_meter_name="latency",http_status_code="200"})"#;
    for (title, query) in [
        (
            "decisions",
            "sum by (decision_type) (flowcontrol_decisions_total)",
        ),
        (
            "rate limiter",
            "sum by (component, decision_type) (rate_limiter_counter_total)",
        ),
        (
            "sampler",
            "sum by (component, decision_type) (sampler_counter_total)",
        ),
        (
            "flux meter",
            r#"sum by (http_status_code, decision_type) (flux_meter_count{flux_meter_name="latency"})"#,
        ),
        ("latency p50 ms", P50),
        ("latency p99 ms", P99),
        ("latency mean ms", MEAN),
    ] {
        match prometheus.query(query).await {
            Ok(samples) => {
                for s in samples {
                    let what: Vec<String> = s
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect();
                    println!("  {title:<15} {:<45} {:.1}", what.join(" "), s.value);
                }
            }
            Err(e) => println!("  {title}: query failed: {e}"),
        }
    }
    let cps = http::get(sidecar.admin_addr, "/control-points", &[]).await?;
    println!();
    println!("Control points seen (GET /control-points):\n{}", cps.text());
    sidecar.stop(Duration::from_secs(2)).await;
    drop(envoy);
    drop(prometheus);
    Ok(())
}
