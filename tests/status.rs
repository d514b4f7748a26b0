//! `GET /v1/status` and `sluice status` on the real binaries: every
//! component's live state, whether the real sluice-controller drives it
//! and for how long, and the subscription (or why there is none).

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;
use sluice_testkit::process::workspace_binary;
use sluice_testkit::{free_port, http};

/// DRIVEN's door, with a limiter and a scheduler beside it.
const POLICY: &str = r#"
name: driven
samplers:
  - name: door
    selectors: [{control_point: ingress}]
    accept_percentage: 100
rate_limiters:
  - name: all
    selectors: [{control_point: ingress}]
    bucket_capacity: 10
    fill_amount: 1
    interval: 1h
concurrency_schedulers:
  - name: slots
    selectors: [{control_point: ingress}]
    max_concurrency: 5
circuit:
  components:
    - actuator: {sampler: door, input: 0}
"#;

fn status_command(admin: std::net::SocketAddr, json: bool) -> Output {
    let mut args = vec![
        "status".to_owned(),
        "--admin".to_owned(),
        format!("http://{admin}"),
    ];
    if json {
        args.push("--json".into());
    }
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(&args)
        .output()
        .expect("run sluice status")
}

fn text(out: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn component<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["policies"][0]["components"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("{name} in {status:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_live_state_and_the_controller_driving_it() {
    let policy = PolicyFile::new(POLICY);
    let (grpc, admin) = (free_port().expect("port"), free_port().expect("port"));
    let program = workspace_binary("sluice-controller").expect("sluice-controller");
    let _controller = Server::start_on(
        "sluice-controller",
        &program,
        &ticking_controller_args(&policy.path),
        grpc,
        admin,
    )
    .await;
    let url = format!("http://127.0.0.1:{grpc}");
    let sidecar = sluice(
        &policy.path,
        &[
            "--controller",
            &url,
            "--service",
            "shop",
            "--instance",
            "shop-1",
        ],
    )
    .await;
    // Three Checks: the door (closed by the controller) refuses them, so
    // they cost the limiter nothing; then it is driven.
    let driven = eventually(Duration::from_secs(20), || async {
        check_status(sidecar.grpc).await == Some(403)
    })
    .await;
    assert!(driven, "the controller's decision never arrived");

    let out = status_command(sidecar.admin, true);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let policy_status = &status["policies"][0];
    assert_eq!(policy_status["name"], "driven");
    assert_eq!(policy_status["hash"].as_str().map(str::len), Some(16));
    let door = component(&status, "door");
    assert_eq!(door["kind"], "sampler");
    assert_eq!(door["accept_percentage"], 0.0);
    let left = door["controller"]["valid_for_seconds"]
        .as_f64()
        .expect("driven by the controller");
    assert!(left > 0.0 && left <= 1.0, "valid 1 s at most: {left}");
    assert!(door["controller"]["valid_until_unix_ms"].as_i64().is_some());
    let all = component(&status, "all");
    assert_eq!(all["kind"], "rate_limiter");
    assert_eq!(all["bucket_capacity"], 10.0);
    assert_eq!(all["bucket_level"], 10.0, "refused flows took nothing");
    assert_eq!(all["controller"], serde_json::Value::Null);
    let slots = component(&status, "slots");
    assert_eq!(slots["max_concurrency"], 5);
    assert_eq!(slots["in_flight"], 0);
    assert_eq!(slots["queued"], 0);
    let link = &status["controller"];
    assert_eq!(link["url"], format!("{url}/"));
    assert_eq!(link["connected"], true);
    assert_eq!(
        (&link["service"], &link["instance"], &link["agent_group"]),
        (
            &serde_json::json!("shop"),
            &serde_json::json!("shop-1"),
            &serde_json::json!("default")
        )
    );
    assert!(link["connected_since_unix_ms"].as_i64().is_some());
    assert!(link["last_decisions_unix_ms"].as_i64().is_some());
    assert!(
        link["decisions"]["applied"].as_u64().unwrap_or(0) >= 1,
        "{link:#}"
    );

    // For a person.
    let out = status_command(sidecar.admin, false);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for line in [
        "Policy driven (",
        "KIND                   NAME   STATE",
        "sampler                door   0% accepted",
        "rate_limiter           all    10 of 10 tokens, +1 per 3600s",
        "concurrency_scheduler  slots  0 of 5 in flight, 0 queued",
        &format!("Controller {url}/: subscribed, as default / shop / shop-1; decisions: applied"),
    ] {
        assert!(table.contains(line), "{line:?} in\n{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.contains("door") && l.contains("driven, ") && l.ends_with("s left")),
        "{table}"
    );
}

#[tokio::test]
async fn status_says_why_there_is_no_subscription() {
    let policy = PolicyFile::new(POLICY);
    let dead = format!("http://127.0.0.1:{}", free_port().expect("port"));
    let sidecar = sluice(&policy.path, &["--controller", &dead]).await;
    let answered = eventually(Duration::from_secs(10), || async {
        let out = status_command(sidecar.admin, true);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["controller"]["connected"] == false && status["controller"]["last_error"].is_string()
    })
    .await;
    assert!(answered, "the failed subscription shows");
    let out = status_command(sidecar.admin, false);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(": NOT subscribed: "), "{table}");

    // A sidecar without a controller says so; a bad query is a 400.
    let alone = sluice(&policy.path, &[]).await;
    let out = status_command(alone.admin, false);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Controller: none (--controller not set)"),
        "{}",
        text(&out)
    );
    let reply = http::get(alone.admin, "/v1/status?verbose=1", &[])
        .await
        .expect("answer");
    assert_eq!(reply.status, 400);
    assert!(
        reply
            .text()
            .contains("unknown parameter \"verbose\" (this route takes none)")
    );

    // Nobody at the address: one line, exit 1.
    let nobody = std::net::SocketAddr::from(([127, 0, 0, 1], free_port().expect("port")));
    let out = status_command(nobody, false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: GET http://"), "{stderr}");
}
