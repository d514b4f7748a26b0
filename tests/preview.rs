//! `GET /v1/preview` and `sluice preview` on the real binaries behind the
//! real Envoy: samples of live Checks with their labels (secrets redacted),
//! what classifiers added, the components that matched and the decision;
//! bad questions get a 400 with the reason, a preview too many a 429.

mod common;

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use sluice_testkit::http;

const POLICY: &str = r#"
name: preview
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user: {from: request.http.headers.user-id}
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 2
    fill_amount: 1
    interval: 1h
    limit_by_label_key: user
"#;

/// Runs `sluice preview ARGS` (it blocks) while requests go through
/// `front` as `user`, one every 20 ms, until the command ends (at most
/// 1,000 requests).
async fn preview_during_traffic(
    admin: std::net::SocketAddr,
    front: std::net::SocketAddr,
    user: &'static str,
    args: &[&str],
) -> Output {
    let mut all = vec![
        "preview".to_owned(),
        "--admin".to_owned(),
        format!("http://{admin}"),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let command = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(&all)
            .output()
            .expect("run sluice preview");
        finished.store(true, Ordering::Release);
        out
    });
    for _ in 0..1000 {
        if done.load(Ordering::Acquire) {
            break;
        }
        let _ = http::get(
            front,
            "/items?page=2",
            &[
                ("user-id", user),
                ("authorization", "Bearer s3cr3t"),
                ("x-api-key", "k-123"),
                ("cookie", "session=abc"),
            ],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    command.await.expect("preview command")
}

fn text(out: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn label<'a>(list: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    list.as_array()?
        .iter()
        .find(|l| l["name"] == name)
        .and_then(|l| l["value"].as_str())
}

#[tokio::test]
async fn preview_shows_what_the_engine_saw_and_decided() {
    let policy = PolicyFile::new(POLICY);
    let sidecar = sluice(&policy.path, &["--preview-redact", "X-Api-Key"]).await;
    let upstream = sluice_testkit::Upstream::start(0).await.expect("upstream");
    let envoy = envoy(&upstream, &sidecar).await;
    let front = envoy.listener();

    let out = preview_during_traffic(
        sidecar.admin,
        front,
        "alice",
        &[
            "--control-point",
            "ingress",
            "--samples",
            "4",
            "--timeout",
            "30s",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["complete"], true, "{answer:#}");
    let samples = answer["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 4);
    for s in samples {
        assert_eq!(s["control_point"], "ingress");
        assert_eq!(
            s["service"], "demo-app",
            "the quickstart's context extension"
        );
        let request = &s["request"];
        assert_eq!(label(request, "http.method"), Some("GET"));
        assert_eq!(label(request, "http.path"), Some("/items"));
        assert_eq!(label(request, "http.target"), Some("/items?page=2"));
        assert_eq!(label(request, "http.request.header.user_id"), Some("alice"));
        for secret in ["authorization", "x_api_key", "cookie"] {
            assert_eq!(
                label(request, &format!("http.request.header.{secret}")),
                Some("[redacted]"),
                "{secret}: {s:#}"
            );
        }
        assert!(!s.to_string().contains("s3cr3t"), "{s:#}");
        assert_eq!(label(&s["classified"], "user"), Some("alice"));
        let matched: Vec<String> = s["matched"]
            .as_array()
            .expect("matched")
            .iter()
            .map(|m| {
                format!(
                    "{} {}/{}",
                    m["kind"].as_str().unwrap_or(""),
                    m["policy"].as_str().unwrap_or(""),
                    m["component"].as_str().unwrap_or("")
                )
            })
            .collect();
        assert_eq!(
            matched,
            [
                "classifier preview/classifiers[0]",
                "rate_limiter preview/per-user"
            ]
        );
    }
    // Alice has two tokens for the hour: at least two of four samples are
    // rejected, by the limiter, with its status.
    let rejected: Vec<&serde_json::Value> = samples
        .iter()
        .map(|s| &s["outcome"])
        .filter(|o| o["decision"] == "rejected")
        .collect();
    assert!(rejected.len() >= 2, "{answer:#}");
    for o in rejected {
        assert_eq!(o["component"], "per-user");
        assert_eq!(o["reason"], "rate_limited");
        assert_eq!(o["status"], 429);
    }

    // The table, for a person; a service filter.
    let out = preview_during_traffic(
        sidecar.admin,
        front,
        "bob",
        &[
            "--control-point",
            "ingress",
            "--service",
            "demo-app",
            "--samples",
            "3",
            "--timeout",
            "30s",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("3 of 3 Checks at control point ingress, service demo-app\n"),
        "{table}"
    );
    assert!(table.contains("#  SERVICE   DECISION"), "{table}");
    assert!(
        table.contains("rejected by preview/per-user: rate_limited (429)"),
        "{table}"
    );
    assert!(
        table.contains("http.request.header.authorization=[redacted]"),
        "{table}"
    );
    assert!(table.contains("classified: user=bob"), "{table}");
}

/// `GET /v1/preview?QUERY` on `admin`.
async fn ask(admin: std::net::SocketAddr, query: &str) -> http::Reply {
    http::request(
        admin,
        "GET",
        &format!("/v1/preview?{query}"),
        &[],
        b"",
        Duration::from_secs(20),
    )
    .await
    .expect("answer")
}

#[tokio::test]
async fn bad_questions_get_a_400_with_the_reason_and_previews_are_capped() {
    let policy = PolicyFile::new(POLICY);
    let sidecar = sluice(&policy.path, &[]).await;
    for (query, why) in [
        ("", "control_point is required (known: ingress)"),
        ("control_point=ingres", "unknown control point \"ingres\""),
        (
            "control_point=ingress&samples=0",
            "samples must be between 1 and 100",
        ),
        (
            "control_point=ingress&samples=1000000000000",
            "samples must be between 1 and 100",
        ),
        (
            "control_point=ingress&samples=ten",
            "samples must be between 1 and 100",
        ),
        (
            "control_point=ingress&timeout=2m",
            "timeout must be a duration above 0 and up to 60s",
        ),
        (
            "control_point=ingress&timeout=soon",
            "timeout must be a duration",
        ),
        (
            "control_point=ingress&controlpoint=x",
            "unknown parameter \"controlpoint\"",
        ),
        ("control_point=ingress&control_point=egress", "given twice"),
    ] {
        let reply = ask(sidecar.admin, query).await;
        assert_eq!(reply.status, 400, "{query}: {}", reply.text());
        assert!(reply.text().contains(why), "{query}: {}", reply.text());
    }
    // The command says the same, and fails.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "preview",
            "--admin",
            &format!("http://{}", sidecar.admin),
            "--control-point",
            "nowhere",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("400 Bad Request: unknown control point \"nowhere\""),
        "{stderr}"
    );

    // Nothing arrives at a control point without traffic: the answer says
    // so when the timeout passes.
    let reply = ask(
        sidecar.admin,
        "control_point=ingress&samples=2&timeout=200ms",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
    assert_eq!(answer["complete"], false);
    assert_eq!(answer["samples"], serde_json::json!([]));

    // Four at once at most: of five asked for together, each open for
    // seconds, one is refused.
    let admin = sidecar.admin;
    let five: Vec<_> = (0..5)
        .map(|_| tokio::spawn(ask(admin, "control_point=ingress&timeout=3s")))
        .collect();
    let mut statuses = Vec::new();
    for asked in five {
        let reply = asked.await.expect("task");
        if reply.status == 429 {
            assert!(
                reply.text().contains("4 previews are open already"),
                "{}",
                reply.text()
            );
        }
        statuses.push(reply.status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 200, 429]);
    // Closed ones make room again.
    assert_eq!(
        ask(admin, "control_point=ingress&timeout=20ms")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn preview_can_be_turned_off() {
    let policy = PolicyFile::new(POLICY);
    let sidecar = sluice(&policy.path, &["--preview=false"]).await;
    let reply = ask(sidecar.admin, "control_point=ingress").await;
    assert_eq!(reply.status, 404);
    assert!(reply.text().contains("--preview=false"), "{}", reply.text());
}
