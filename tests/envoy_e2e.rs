//! End to end through the real Envoy 1.40: client → Envoy (ext_authz) →
//! Sluice → Envoy → upstream.

mod common;

use std::time::Duration;

use common::*;
use sluice_testkit::http;

const POLICY: &str = r#"
name: e2e
classifiers:
  - selectors: [{control_point: ingress, service: demo-app}]
    rules:
      tier: {from: request.http.headers.x-tier}
samplers:
  - name: beta
    selectors:
      - control_point: ingress
        label_matcher:
          expression:
            label_matches: {label: http.path, regex: "^/beta(/|$)"}
    accept_percentage: 0
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 5
    fill_amount: 5
    interval: 60s
    limit_by_label_key: http.request.header.user_id
"#;

#[tokio::test]
async fn envoy_enforces_per_user_limits_and_sampling() {
    let policy = PolicyFile::new(POLICY);
    let (sidecar, upstream, envoy) = stack(&policy, None).await;
    let front = envoy.listener();

    let as_user = |user: &'static str| async move {
        http::get(front, "/items", &[("user-id", user), ("x-tier", "gold")])
            .await
            .expect("request")
    };
    for i in 0..5 {
        let reply = as_user("alice").await;
        assert_eq!(reply.status, 200, "request {i} of alice: {}", reply.text());
        // The classifier label reached the upstream in `baggage`.
        assert_eq!(reply.header("x-seen-baggage"), Some("tier=gold"));
    }
    let sixth = as_user("alice").await;
    assert_eq!(sixth.status, 429, "{}", sixth.text());
    // A token comes every 12 s: the wait is at most that, in whole seconds
    // rounded up (how much less depends on how long the requests took).
    let retry_after: u64 = sixth
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after in seconds");
    assert!((1..=12).contains(&retry_after), "retry-after {retry_after}");
    assert_eq!(sixth.header("x-sluice-rejected-by"), Some("e2e/per-user"));
    assert_eq!(sixth.text(), "rejected by e2e/per-user: rate limited\n");
    assert_eq!(as_user("bob").await.status, 200, "bob has his own bucket");
    assert_eq!(
        upstream.requests.load(std::sync::atomic::Ordering::Relaxed),
        6
    );

    let beta = http::get(front, "/beta/feature", &[("user-id", "carol")])
        .await
        .expect("request");
    assert_eq!(beta.status, 403, "{}", beta.text());
    assert_eq!(beta.header("x-sluice-rejected-by"), Some("e2e/beta"));
    assert_eq!(beta.header("retry-after"), None);

    // Envoy counted Sluice's answers as ext_authz decisions.
    assert_eq!(
        envoy.stat("http.ingress.ext_authz.ok").await.expect("stat"),
        6
    );
    assert_eq!(
        envoy
            .stat("http.ingress.ext_authz.denied")
            .await
            .expect("stat"),
        2
    );

    // The service came from the route's context extension.
    let cps = http::get(sidecar.admin_addr, "/control-points", &[])
        .await
        .expect("control points");
    assert!(
        cps.text().contains("\"service\": \"demo-app\""),
        "{}",
        cps.text()
    );

    // With Sluice gone, this fail-closed config answers 503.
    sidecar.stop(Duration::from_secs(2)).await;
    let reply = as_user("dave").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
}
