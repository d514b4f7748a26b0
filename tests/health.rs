//! `sluice health`, the container image's HEALTHCHECK: the real binary
//! against a running sidecar's admin listener, a dead port, a server that
//! never answers, and a route that is not there.

use std::process::Output;
use std::time::Duration;

use tokio::time::Instant;

use clap::Parser as _;
use sluice::cli::{Cli, Command};
use sluice::server::{Config, Sidecar};
use sluice_testkit::free_port;

/// Runs `sluice health ARGS` off the async runtime (it blocks).
async fn health(args: &[String]) -> (Output, Duration) {
    let args = args.to_vec();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("health")
            .args(&args)
            .output()
            .expect("run sluice health");
        (out, started.elapsed())
    })
    .await
    .expect("join")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn url(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_running_sidecar_is_healthy_and_ready() {
    let sidecar = Sidecar::start(&Config::ephemeral())
        .await
        .expect("sidecar starts");
    let base = format!("http://{}", sidecar.admin_addr);

    for path in ["/healthz", "/readyz"] {
        let (out, _) = health(&url(&["--url", &format!("{base}{path}")])).await;
        assert!(out.status.success(), "{path}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("healthy: GET {base}{path}: 200 OK")
        );
    }

    // A route the admin listener does not have is not health.
    let (out, _) = health(&url(&["--url", &format!("{base}/nope")])).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("unhealthy: GET {base}/nope: 404 Not Found: not found")
    );
    sidecar.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_dead_port_is_unhealthy_at_once() {
    let port = free_port().expect("port");
    let target = format!("http://127.0.0.1:{port}/healthz");
    let (out, took) = health(&url(&["--url", &target])).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("unhealthy: GET {target}: ")) && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    // Accepts connections (the kernel does) but never reads or answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = format!("http://{}/healthz", silent.local_addr().expect("addr"));
    let (out, took) = health(&url(&["--url", &target, "--timeout", "300ms"])).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("unhealthy: GET {target}: no answer within 300ms")
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    drop(silent);
}

#[test]
fn the_default_url_is_the_default_admin_listeners_liveness_route() {
    let cli = Cli::try_parse_from(["sluice", "health"]).expect("parses");
    let Some(Command::Health { url, timeout }) = cli.command else {
        panic!("not the health command: {cli:?}");
    };
    let run = Cli::try_parse_from(["sluice"]).expect("parses").run;
    assert_eq!(url.scheme_str(), Some("http"));
    assert_eq!(url.host(), Some(run.admin_listen.ip().to_string().as_str()));
    assert_eq!(url.port_u16(), Some(run.admin_listen.port()));
    assert_eq!(url.path(), "/healthz");
    assert_eq!(timeout, Duration::from_secs(2));

    // A URL that could only fail when the check runs is refused at once.
    for bad in ["/healthz", "127.0.0.1:8081/healthz", "ftp://127.0.0.1/"] {
        let err = Cli::try_parse_from(["sluice", "health", "--url", bad])
            .expect_err(bad)
            .to_string();
        assert!(err.contains("expected an http:// or https:// URL"), "{err}");
    }
}
