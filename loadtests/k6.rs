//! The same gRPC Check load from k6 (`loadtests/k6/check.js`), as a
//! cross-check of the Rust generator with a standard tool.
//!
//! k6 runs JavaScript per request and spends several times more CPU per
//! Check than the server it loads (loadtests/README.md), so on a small
//! machine it measures latency at moderate fixed rates well and the
//! server's maximum not at all: its "max" runs are bounded by k6.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sluice_testkit::repo_root;

use crate::generate::{Load, Stats};

/// The k6 binary: `$SLUICE_K6`, else the venv's.
fn binary() -> anyhow::Result<PathBuf> {
    sluice_testkit::venv_binary("SLUICE_K6", "k6")
}

/// Runs `check.js` against `target`; `Load::Max(n)` is `n` VUs back to
/// back.
pub async fn checks(
    target: SocketAddr,
    load: Load,
    duration: Duration,
    users: u64,
) -> anyhow::Result<Stats> {
    let dir = tempfile::tempdir()?;
    let summary = dir.path().join("summary.json");
    let (rate, vus) = match load {
        Load::Rate(r) => (r, (r / 100).clamp(8, 256)),
        Load::Max(n) => (0, n as u64),
    };
    let output = tokio::process::Command::new(binary()?)
        .args(["run", "--quiet", "--no-color", "check.js"])
        .current_dir(repo_root().join("loadtests/k6"))
        .env("TARGET", target.to_string())
        .env("RATE", rate.to_string())
        .env("VUS", vus.to_string())
        .env("DURATION", format!("{}ms", duration.as_millis()))
        .env("USERS", users.to_string())
        .env("SUMMARY", &summary)
        .env("K6_NO_USAGE_REPORT", "true")
        .kill_on_drop(true)
        .output()
        .await
        .context("run k6")?;
    if !output.status.success() {
        bail!(
            "k6 failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = std::fs::read_to_string(&summary).context("k6 wrote no summary")?;
    parse_summary(&text)
}

/// Reads k6's end-of-test summary: iterations, the `gRPC OK` / `allowed`
/// checks, and the `grpc_req_duration` trend (milliseconds).
fn parse_summary(text: &str) -> anyhow::Result<Stats> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    let metrics = &v["metrics"];
    let number = |path: &[&str]| -> f64 {
        let mut at = metrics;
        for p in path {
            at = &at[*p];
        }
        at.as_f64().unwrap_or(0.0)
    };
    let iterations = number(&["iterations", "values", "count"]);
    let rate = number(&["iterations", "values", "rate"]);
    let ms = |q: &str| Duration::from_secs_f64(number(&["grpc_req_duration", "values", q]) / 1e3);
    // Per named check of check.js: `gRPC OK` fails on errors, `allowed`
    // fails on errors and denials.
    let fails = |name: &str| -> u64 {
        v["root_group"]["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .and_then(|c| c["fails"].as_u64())
            .unwrap_or(0)
    };
    let errors = fails("gRPC OK").min(iterations as u64);
    let denied = fails("allowed").saturating_sub(errors);
    Ok(Stats {
        ok: (iterations as u64).saturating_sub(errors + denied),
        denied,
        errors,
        elapsed: Duration::from_secs_f64(if rate > 0.0 { iterations / rate } else { 0.0 }),
        mean: ms("avg"),
        p50: ms("p(50)"),
        p90: ms("p(90)"),
        p99: ms("p(99)"),
        p999: ms("p(99.9)"),
    })
}
