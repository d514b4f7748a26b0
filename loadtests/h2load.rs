//! The gRPC Check load from h2load (nghttp2), as a cross-check of the Rust
//! generator at the maximum: h2load is C and spends less CPU per request
//! than any generator built on tonic, so if it pushes a server further,
//! the Rust generator was the limit.
//!
//! h2load sends one fixed body, so every Check is from the same user (the
//! benchmark policy's per-user limit is far above these rates, so all are
//! allowed); the Rust generator and k6 spread Checks over 10,000 users.
//! h2load judges success by HTTP status only: a gRPC error would pass, so
//! the report's `denied`/`errors` come from the HTTP status alone.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use prost::Message as _;

use crate::generate::{Load, Stats};
use crate::shots::check_request;

/// Runs h2load against `target` over `connections` connections.
pub async fn checks(
    target: SocketAddr,
    load: Load,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<Stats> {
    let dir = tempfile::tempdir()?;
    let body = dir.path().join("check.grpc");
    let message = check_request(1).encode_to_vec();
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    std::fs::write(&body, framed)?;
    let log = dir.path().join("requests.tsv");
    let clients = connections.max(1);
    let mut args: Vec<String> = vec![
        "--clients".into(),
        clients.to_string(),
        "--threads".into(),
        "1".into(),
        "--duration".into(),
        format!("{}", duration.as_secs_f64().max(1.0).round() as u64),
        "--data".into(),
        body.display().to_string(),
        "--header".into(),
        "content-type: application/grpc".into(),
        "--header".into(),
        "te: trailers".into(),
        "--log-file".into(),
        log.display().to_string(),
    ];
    match load {
        Load::Max(workers) => {
            args.push("--max-concurrent-streams".into());
            args.push((workers / clients).max(1).to_string());
        }
        Load::Rate(rate) => {
            args.push("--max-concurrent-streams".into());
            args.push("64".into());
            args.push("--rps".into());
            args.push((rate as usize / clients).max(1).to_string());
        }
    }
    args.push(format!(
        "http://{target}/envoy.service.auth.v3.Authorization/Check"
    ));
    let output = tokio::process::Command::new("h2load")
        .args(&args)
        .kill_on_drop(true)
        .output()
        .await
        .context("run h2load (scripts/bootstrap.sh installs nghttp2-client)")?;
    if !output.status.success() {
        bail!(
            "h2load failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = std::fs::read_to_string(&log).context("h2load wrote no log")?;
    Ok(parse_log(&text))
}

/// h2load's per-request log: start (µs since the epoch), HTTP status, and
/// microseconds to the end of the response, tab-separated.
fn parse_log(text: &str) -> Stats {
    let mut latencies = Vec::new();
    let (mut ok, mut denied, mut errors) = (0, 0, 0);
    let (mut first, mut last) = (u64::MAX, 0u64);
    for line in text.lines() {
        let mut fields = line.split('\t');
        let (Some(start), Some(status), Some(took)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(start), Ok(status), Ok(took)) = (
            start.parse::<u64>(),
            status.parse::<i32>(),
            took.parse::<u64>(),
        ) else {
            continue;
        };
        match status {
            200..=299 => ok += 1,
            403 | 429 | 503 => denied += 1,
            _ => {
                errors += 1;
                continue;
            }
        }
        latencies.push(took);
        first = first.min(start);
        last = last.max(start + took);
    }
    latencies.sort_unstable();
    let q = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        Duration::from_micros(latencies.get(i).copied().unwrap_or(0))
    };
    Stats {
        ok,
        denied,
        errors,
        elapsed: Duration::from_micros(last.saturating_sub(first)),
        mean: Duration::from_micros(
            latencies.iter().sum::<u64>() / (latencies.len() as u64).max(1),
        ),
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
    }
}
