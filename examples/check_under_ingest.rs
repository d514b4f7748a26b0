//! What concurrent access-log ingest costs the Check path.
//!
//! Starts Sluice in-process (its own 2-thread runtime, as the binary runs)
//! with the benchmark policy, then drives gRPC Checks at a fixed arrival
//! rate from a separate client runtime, twice: alone, and while another
//! client pushes OTLP Exports back to back as fast as Sluice takes them.
//! The load is open-loop (each Check is its own task, started on schedule
//! whatever the others are doing), and a Check's latency is measured from
//! the moment it is sent: tokio's timer has a 1 ms grain, so measuring from
//! the scheduled instant would charge the client's timer to the server.
//!
//! ```text
//! cargo run --release --example check_under_ingest -- [--rate 2000] [--duration 10s] [--batch 100] [--ingest-rate 0]
//! ```
//!
//! `--ingest-rate` is in records per second; 0 (the default) pushes as fast
//! as Sluice takes them.
//!
//! ```text
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use parking_lot::Mutex;
use sluice::server::{Config, Sidecar};
use sluice_testkit::access_log;
use sluice_testkit::repo_root;
use tokio::time::Instant;

struct Args {
    rate: u64,
    duration: Duration,
    batch: usize,
    ingest_rate: u64,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        rate: 2000,
        duration: Duration::from_secs(10),
        batch: 100,
        ingest_rate: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--rate" => a.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--duration" => a.duration = sluice_policy::types::DurationSpec::parse(&value()?)?,
            "--batch" => a.batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--ingest-rate" => {
                a.ingest_rate = value()?
                    .parse()
                    .map_err(|e| format!("--ingest-rate: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn check(user: u64) -> CheckRequest {
    let headers = [
        (":authority", "shop.example".to_owned()),
        (":method", "GET".to_owned()),
        (":path", "/api/items".to_owned()),
        ("accept", "application/json".to_owned()),
        ("user-agent", "bench".to_owned()),
        ("user-id", format!("user-{}", user % 10_000)),
    ];
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/api/items".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: headers
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Runs Checks at `rate` for `duration`; returns their latencies.
async fn drive_checks(
    client: AuthorizationClient<tonic::transport::Channel>,
    rate: u64,
    duration: Duration,
) -> Vec<Duration> {
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(
        (rate * duration.as_secs()) as usize,
    )));
    let period = Duration::from_secs(1) / rate as u32;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for n in 0.. {
        let scheduled = start + period * n;
        if scheduled - start >= duration {
            break;
        }
        tokio::time::sleep_until(scheduled).await;
        let mut client = client.clone();
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            let request = check(u64::from(n));
            let sent = Instant::now();
            if client.check(request).await.is_ok() {
                latencies.lock().push(sent.elapsed());
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut v = std::mem::take(&mut *latencies.lock());
    v.sort();
    v
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = args().map_err(anyhow::Error::msg)?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sluice")
        .enable_all()
        .build()?;
    let sidecar = server_rt.block_on(Sidecar::start(&Config {
        policy: Some(repo_root().join("examples/bench.yaml")),
        ..Config::ephemeral()
    }))?;
    let addr = format!("http://{}", sidecar.grpc_addr);
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client")
        .enable_all()
        .build()?;
    client_rt.block_on(async {
        let checks = AuthorizationClient::connect(addr.clone()).await?;
        // Warm up: connections, buckets for the 10,000 users.
        drive_checks(checks.clone(), args.rate, Duration::from_secs(2)).await;

        let alone = drive_checks(checks.clone(), args.rate, args.duration).await;

        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(AtomicU64::new(0));
        let mut logs = LogsServiceClient::connect(addr.clone()).await?;
        let ring = access_log::ring(sidecar.engine.flow_key(), "bench/latency", args.batch);
        let pace = (args.ingest_rate > 0)
            .then(|| Duration::from_secs_f64(args.batch as f64 / args.ingest_rate as f64));
        let ingest = {
            let (stop, records) = (stop.clone(), records.clone());
            tokio::spawn(async move {
                let mut tick = pace.map(tokio::time::interval);
                for request in ring.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(t) = tick.as_mut() {
                        t.tick().await;
                    }
                    if logs.export(request.clone()).await.is_ok() {
                        records.fetch_add(request.resource_logs[0].scope_logs[0].log_records.len() as u64, Ordering::Relaxed);
                    }
                }
            })
        };
        let started = Instant::now();
        let loaded = drive_checks(checks, args.rate, args.duration).await;
        stop.store(true, Ordering::Relaxed);
        let _ = ingest.await;
        let ingest_rate = records.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

        println!("Checks at {}/s for {:?} (benchmark policy), client-side latency:", args.rate, args.duration);
        println!("| run | checks | p50 | p99 | p99.9 |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (name, v) in [("alone", &alone), ("with ingest", &loaded)] {
            println!("| {name} | {} | {:?} | {:?} | {:?} |", v.len(), pct(v, 0.5), pct(v, 0.99), pct(v, 0.999));
        }
        println!(
            "ratio with/alone: p50 {:.2}, p99 {:.2}; concurrent ingest {:.0} records/s ({}-record Exports)",
            pct(&loaded, 0.5).as_secs_f64() / pct(&alone, 0.5).as_secs_f64(),
            pct(&loaded, 0.99).as_secs_f64() / pct(&alone, 0.99).as_secs_f64(),
            ingest_rate,
            args.batch
        );
        anyhow::Ok(())
    })?;
    server_rt.block_on(sidecar.stop(Duration::from_secs(2)));
    Ok(())
}
