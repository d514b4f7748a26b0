//! `sluice envoy-config` with the real Envoy 1.40 and the real `sluice`:
//! the bootstrap it writes validates, keeps the access-log contract when
//! it has an access log, and makes Envoy send Sluice the headers the
//! policies read and no others (seen through `sluice preview`), with the
//! limit still enforced.

mod common;

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::Value;
use sluice_testkit::envoy::EnvoyPorts;
use sluice_testkit::{http, repo_root};

const RATE_LIMIT: &str = r#"
name: peer
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 3
    fill_amount: 1
    interval: 1h
    limit_by_label_key: http.request.header.user_id
"#;

const OTEL_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig";
const EXT_AUTHZ: &str = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";

/// `sluice envoy-config ARGS` for `policy`.
fn envoy_config(policy: &std::path::Path, args: &[String]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("envoy-config")
        .arg("--policy")
        .arg(policy)
        .args(args)
        .output()
        .expect("run sluice envoy-config")
}

fn generated(policy: &std::path::Path, args: &[String]) -> String {
    let out = envoy_config(policy, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn one_typed<'a>(value: &'a Value, type_url: &str) -> Option<&'a Value> {
    let mut out = sluice_testkit::envoy::typed(value, type_url);
    assert!(out.len() <= 1, "{type_url}: {}", out.len());
    out.pop()
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).expect("YAML")
}

#[tokio::test]
async fn the_bootstrap_asks_envoy_for_what_the_policies_read_and_no_more() {
    let policy = PolicyFile::new(RATE_LIMIT);
    let upstream = sluice_testkit::Upstream::start(0).await.expect("upstream");
    let sidecar = sluice(&policy.path, &[]).await;
    let ports = EnvoyPorts::free(upstream.addr.port(), sidecar.grpc.port()).expect("ports");
    let config = generated(
        &policy.path,
        &[
            "--listen".into(),
            format!("127.0.0.1:{}", ports.listener),
            "--envoy-admin".into(),
            format!("127.0.0.1:{}", ports.admin),
            "--upstream".into(),
            upstream.addr.to_string(),
            "--sluice".into(),
            sidecar.grpc.to_string(),
            "--service".into(),
            "shop".into(),
        ],
    );
    let parsed = yaml(&config);
    assert!(
        one_typed(&parsed, OTEL_LOG).is_none(),
        "a rate limit reads no access log:\n{config}"
    );
    let authz = one_typed(&parsed, EXT_AUTHZ).expect("ext_authz");
    assert_eq!(
        authz["allowed_headers"]["patterns"],
        serde_json::json!([{"safe_regex": {"regex": "^user[-_]id$"}}])
    );
    assert!(authz["with_request_body"].is_null(), "no body read");
    let envoy = sluice_testkit::Envoy::start_with(&config, ports)
        .await
        .expect("Envoy runs the generated bootstrap");
    let front = envoy.listener();

    // What Envoy sends, as Sluice sees it: preview one Check while
    // requests carry headers nobody reads.
    let admin = sidecar.admin;
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let preview = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "preview",
                "--admin",
                &format!("http://{admin}"),
                "--control-point",
                "ingress",
                "--samples",
                "1",
                "--timeout",
                "20s",
                "--json",
            ])
            .output()
            .expect("preview");
        finished.store(true, Ordering::Release);
        out
    });
    let headers = [
        ("user-id", "probe"),
        ("x-unread", "secret-ish"),
        ("cookie", "a=b"),
        ("baggage", "tier=gold"),
    ];
    for _ in 0..500 {
        if done.load(Ordering::Acquire) {
            break;
        }
        let _ = http::get(front, "/items", &headers).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = preview.await.expect("preview task");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let sample = &answer["samples"][0];
    assert_eq!(sample["service"], "shop");
    let names: Vec<&str> = sample["request"]
        .as_array()
        .expect("labels")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .filter(|n| n.starts_with("http.request.header."))
        .collect();
    assert!(names.contains(&"http.request.header.user_id"), "{names:?}");
    for unread in ["x_unread", "cookie", "baggage", "user_agent"] {
        assert!(
            !names.contains(&format!("http.request.header.{unread}").as_str()),
            "{unread} was sent: {names:?}"
        );
    }
    // Attributes still come: the path a selector could match on.
    assert!(
        sample["request"]
            .as_array()
            .expect("labels")
            .iter()
            .any(|l| l["name"] == "http.path" && l["value"] == "/items"),
        "{sample:#}"
    );

    // The limit holds per user: three for a new user, then 429.
    let as_carol = || http::get(front, "/items", &[("user-id", "carol")]);
    for i in 0..3 {
        assert_eq!(
            as_carol().await.expect("request").status,
            200,
            "request {i}"
        );
    }
    let fourth = as_carol().await.expect("request");
    assert_eq!(fourth.status, 429);
    assert_eq!(fourth.header("x-sluice-rejected-by"), Some("peer/per-user"));
    let dave = http::get(front, "/items", &[("user_id", "dave")])
        .await
        .expect("request");
    assert_eq!(dave.status, 200, "user_id, spelt with _, is sent too");
}

/// With components that observe flows' ends, the access log is there, as
/// the quickstart has it; a body classifier gets the body buffered; a
/// classifier sending labels upstream gets `baggage` sent.
#[tokio::test]
async fn what_needs_logs_bodies_or_baggage_gets_them() {
    let policy = PolicyFile::new(
        r#"
name: full
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      tier: {json: {pointer: /tier}}
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
"#,
    );
    let config = generated(&policy.path, &["--max-request-bytes".into(), "4096".into()]);
    let parsed = yaml(&config);
    let quickstart: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo_root().join("envoy-configs/quickstart.yaml")).expect("read"),
    )
    .expect("YAML");
    let log = one_typed(&parsed, OTEL_LOG).expect("an access log");
    let reference = one_typed(&quickstart, OTEL_LOG).expect("quickstart's");
    assert_eq!(log, reference, "the quickstart's access log, unchanged");
    let authz = one_typed(&parsed, EXT_AUTHZ).expect("ext_authz");
    assert_eq!(authz["with_request_body"]["max_request_bytes"], 4096);
    assert_eq!(
        authz["allowed_headers"]["patterns"],
        serde_json::json!([{"exact": "baggage"}])
    );
    // The real Envoy accepts it.
    let path = policy.path.with_extension("envoy.yaml");
    std::fs::write(&path, &config).expect("write");
    sluice_testkit::envoy::validate(&path)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{config}"));

    // A policy that does not load is an error, and no config is printed.
    let broken = PolicyFile::new("name: [oops\n");
    let out = envoy_config(&broken.path, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
}
