//! The demo behind `make demo`: an upstream, Prometheus, Sluice,
//! sluice-controller and Envoy on loopback, simulated users sending traffic
//! through Envoy, and what Sluice and the controller decided, live and
//! summed up.
//!
//! ```text
//! cargo run --release --example demo -- [--duration 60s] [--policy examples/demo.yaml]
//! ```
//!
//! Three phases: a quarter, a half, a quarter of the run. *Calm*: four users show the per-user rate
//! limit and the closed beta while the controller learns the normal
//! latency. *Crowd*: subscribers and guests arrive, more than the upstream
//! can serve; its latency climbs and the controller lowers the load
//! scheduler's multiplier until latency is back near its setpoint, and
//! subscribers (priority 200) keep most of what is admitted while guests
//! (priority 20) get 503s. *Recovery*: the crowd leaves and the controller
//! raises the multiplier back to pass-through. Every second shows the
//! controller's latency, setpoint and multiplier, read from its `/metrics`.
//!
//! Needs Envoy and Prometheus (`scripts/bootstrap.sh`, which `make demo`
//! runs first). Ctrl-C stops everything it started.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice::controller::{Controller, ControllerConfig};
use sluice::harness::{Envoy, EnvoyPorts, Latency, Prometheus, Upstream, http, repo_root, scrape};
use sluice::server::{Config, Sidecar};
use sluice::telemetry::remote_write::RemoteWriteConfig;

/// A source of traffic: who, where, how often.
struct Source {
    /// Shown in the output.
    name: &'static str,
    /// The path requested.
    path: &'static str,
    /// Requests per second.
    per_second: u32,
    /// `user-type` header, if any.
    user_type: Option<&'static str>,
    /// Distinct `user-id`s it rotates through (1: its own name).
    ids: u32,
    /// Sends only once the crowd arrives.
    crowd: bool,
    /// What it shows.
    note: &'static str,
}

const SOURCES: [Source; 6] = [
    Source {
        name: "alice",
        path: "/api/items",
        per_second: 8,
        user_type: Some("subscriber"),
        ids: 1,
        crowd: false,
        note: "bursts above her per-user limit",
    },
    Source {
        name: "bob",
        path: "/api/orders",
        per_second: 1,
        user_type: Some("subscriber"),
        ids: 1,
        crowd: false,
        note: "stays within his limit",
    },
    Source {
        name: "carol",
        path: "/api/items/42",
        per_second: 2,
        user_type: Some("guest"),
        ids: 1,
        crowd: false,
        note: "twice her refill rate",
    },
    Source {
        name: "dave",
        path: "/beta/search",
        per_second: 1,
        user_type: Some("guest"),
        ids: 1,
        crowd: false,
        note: "tries the closed beta",
    },
    Source {
        name: "subscribers",
        path: "/api/items",
        per_second: 60,
        user_type: Some("subscriber"),
        ids: 100,
        crowd: true,
        note: "the crowd: 100 subscribers",
    },
    Source {
        name: "guests",
        path: "/api/items",
        per_second: 60,
        user_type: Some("guest"),
        ids: 100,
        crowd: true,
        note: "the crowd: 100 guests",
    },
];

/// Answers per source per status, for one second and in total.
type Tally = BTreeMap<&'static str, BTreeMap<u16, u64>>;

struct Args {
    duration: Duration,
    policy: PathBuf,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        duration: Duration::from_secs(60),
        policy: repo_root().join("examples/demo.yaml"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => args.duration = sluice::policy::types::DurationSpec::parse(&value()?)?,
            "--policy" => args.policy = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("usage: demo [--duration 60s] [--policy examples/demo.yaml]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// Sends `source`'s requests on schedule, each on its own task (a request
/// waiting in a scheduler does not hold back the next).
async fn drive(front: SocketAddr, source: &'static Source, tallies: [Arc<Mutex<Tally>>; 2]) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / source.per_second);
    for n in 0u32.. {
        tick.tick().await;
        let tallies = tallies.clone();
        tokio::spawn(async move {
            let id = if source.ids == 1 {
                source.name.to_owned()
            } else {
                format!("{}-{}", source.name, n % source.ids)
            };
            let mut headers = vec![("user-id", id.as_str())];
            if let Some(t) = source.user_type {
                headers.push(("user-type", t));
            }
            let status = match http::request(
                front,
                "GET",
                source.path,
                &headers,
                b"",
                Duration::from_secs(5),
            )
            .await
            {
                Ok(reply) => reply.status,
                Err(_) => 0,
            };
            for tally in &tallies {
                *tally
                    .lock()
                    .entry(source.name)
                    .or_default()
                    .entry(status)
                    .or_default() += 1;
            }
        });
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

fn acceptance(counts: Option<&BTreeMap<u16, u64>>) -> String {
    let Some(c) = counts else {
        return "-".to_owned();
    };
    let all: u64 = c.values().sum();
    let ok = c.get(&200).copied().unwrap_or(0);
    if all == 0 {
        return "-".to_owned();
    }
    format!("{:.0}% admitted", 100.0 * ok as f64 / all as f64)
}

/// The loop at one moment: what the controller sees, and the multiplier
/// in force in the sidecar. Read from their `/metrics`, as a user would.
struct Figures {
    latency: Option<f64>,
    setpoint: Option<f64>,
    lm: Option<f64>,
}

impl Figures {
    async fn read(controller: SocketAddr, sidecar: SocketAddr) -> Figures {
        let text = |addr| async move {
            http::get(addr, "/metrics", &[])
                .await
                .map(|r| r.text())
                .unwrap_or_default()
        };
        let (controller, sidecar) = (text(controller).await, text(sidecar).await);
        let signal = |name: &str| {
            let series = format!(r#"controller_signal{{policy_name="demo",signal="{name}"}}"#);
            scrape(&controller, &series).filter(|v| v.is_finite())
        };
        Figures {
            latency: signal("latency"),
            setpoint: signal("setpoint"),
            lm: scrape(
                &sidecar,
                r#"token_bucket_lm_ratio{component="service",policy_name="demo"}"#,
            ),
        }
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("  -".to_owned(), |v| format!("{v:3.0}"));
        let lm = self.lm.map_or("   -".to_owned(), |v| format!("{v:.2}"));
        write!(
            f,
            "latency {} ms setpoint {} ms lm {lm}",
            ms(self.latency),
            ms(self.setpoint)
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Calm,
    Crowd,
    Recovery,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = args().map_err(anyhow::Error::msg)?;
    println!(
        "Sluice demo: starting an upstream, Prometheus, Sluice, sluice-controller and Envoy on 127.0.0.1 ..."
    );
    // 15 ms per request, 10 ms more per other request in flight: fine for
    // the calm phase, overloaded by the crowd.
    let upstream = Upstream::start_with(
        0,
        Latency {
            base: Duration::from_millis(15),
            per_inflight: Duration::from_millis(10),
        },
    )
    .await?;
    let prometheus = Prometheus::start(&[], Duration::from_secs(1)).await?;
    let loopback = "127.0.0.1:0".parse()?;
    let controller = Controller::start(ControllerConfig {
        tick: Duration::from_secs(1),
        decision_validity: Duration::from_secs(3),
        ..ControllerConfig::new(
            args.policy.clone(),
            &format!("http://{}", prometheus.addr),
            loopback,
            loopback,
        )
    })
    .await?;
    let sidecar = Sidecar::start(&Config {
        policy: Some(args.policy.clone()),
        controller: Some(format!("http://{}", controller.grpc_addr).parse()?),
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
        "  controller  grpc {}  admin http://{}/metrics  (ticks every second)",
        controller.grpc_addr, controller.admin_addr
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
        "Traffic through Envoy for {:?}; each request carries user-id and user-type:",
        args.duration
    );
    for s in &SOURCES {
        let when = if s.crowd { "middle" } else { "always" };
        println!(
            "  {:<12} {:>2}/s {:<6} to {:<14} {}",
            s.name, s.per_second, when, s.path, s.note
        );
    }
    println!("The policy allows each user a burst of 5, then 1 request/s (429 beyond),");
    println!("closes /beta/* to everyone (403 from a sampler at 0%), and has a load");
    println!("scheduler that favours subscribers (priority 200) over guests (20) when");
    println!("sluice-controller lowers its multiplier (lm) because latency rose above");
    println!("its setpoint (1.5 x the normal latency).");
    println!();

    let second = Arc::new(Mutex::new(Tally::new()));
    let total = Arc::new(Mutex::new(Tally::new()));
    let crowd_total = Arc::new(Mutex::new(Tally::new()));
    let drivers: Vec<_> = SOURCES
        .iter()
        .filter(|s| !s.crowd)
        .map(|s| tokio::spawn(drive(front, s, [second.clone(), total.clone()])))
        .collect();
    let mut crowd = Vec::new();

    let quarter = (args.duration.as_secs() / 4).max(1);
    let mut phase = Phase::Calm;
    let mut lowest: Option<f64> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let end = tokio::time::Instant::now() + args.duration;
    let mut elapsed = 0;
    println!("--- calm: the controller learns the normal latency.");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => { println!("\ninterrupted"); break; }
        }
        elapsed += 1;
        if phase == Phase::Calm && elapsed >= quarter {
            phase = Phase::Crowd;
            println!("--- t={elapsed}s: the crowd arrives, more than the upstream can serve.");
            crowd.extend(
                SOURCES
                    .iter()
                    .filter(|s| s.crowd)
                    .map(|s| tokio::spawn(drive(front, s, [second.clone(), crowd_total.clone()]))),
            );
        } else if phase == Phase::Crowd && elapsed >= 3 * quarter {
            phase = Phase::Recovery;
            println!(
                "--- t={elapsed}s: the crowd leaves. The controller raises the multiplier step by step"
            );
            println!("--- once its latency window no longer holds the crowd's last requests.");
            crowd.iter().for_each(|d| d.abort());
        }
        let figures = Figures::read(controller.admin_addr, sidecar.admin_addr).await;
        if let Some(lm) = figures.lm {
            lowest = Some(lowest.map_or(lm, |l: f64| l.min(lm)));
        }
        let tally = std::mem::take(&mut *second.lock());
        let line: Vec<String> = SOURCES
            .iter()
            .filter(|s| !s.crowd || phase == Phase::Crowd)
            .map(|s| format!("{} {}", s.name, describe(tally.get(s.name))))
            .collect();
        println!("t={elapsed:>3}s  {figures} | {}", line.join(" | "));
        if tokio::time::Instant::now() >= end {
            break;
        }
    }
    drivers.iter().chain(&crowd).for_each(|d| d.abort());
    // Requests in flight finish (at most the scheduler's queue timeout).
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!();
    println!("Answers per source (HTTP status × count):");
    let total = total.lock().clone();
    let crowd_total = crowd_total.lock().clone();
    for s in &SOURCES {
        let t = if s.crowd { &crowd_total } else { &total };
        println!(
            "  {:<12} {:<28} {}",
            s.name,
            describe(t.get(s.name)),
            acceptance(t.get(s.name))
        );
    }
    if let Some(lm) = lowest {
        println!("The controller lowered the load multiplier to {lm:.2} at the lowest.");
    }
    // Let the last access logs arrive and one more remote-write go out,
    // then show what Prometheus received.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    println!();
    println!("What Prometheus received from Sluice by remote-write:");
    const P50: &str = r#"histogram_quantile(0.5, sum by (le) (flux_meter_bucket{flux_meter_name="latency",http_status_code="200"}))"#;
    const P99: &str = r#"histogram_quantile(0.99, sum by (le) (flux_meter_bucket{flux_meter_name="latency",http_status_code="200"}))"#;
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
            "scheduler",
            "sum by (workload_index, decision_type) (workload_requests_total)",
        ),
        (
            "flux meter",
            r#"sum by (http_status_code, decision_type) (flux_meter_count{flux_meter_name="latency"})"#,
        ),
        ("latency p50 ms", P50),
        ("latency p99 ms", P99),
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
    println!("  (scheduler workload_index 0 = subscribers, 1 = guests)");
    sidecar.stop(Duration::from_secs(2)).await;
    controller.stop(Duration::from_secs(2)).await;
    drop(envoy);
    drop(prometheus);
    Ok(())
}
