//! Sluice's ext_authz Check over real gRPC, with Envoy's own message types.

mod common;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use sluice_testkit::http;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

const POLICY: &str = r#"
name: shop
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user: {from: request.http.headers.user-id}
      tier: {json: {pointer: /tier}}
samplers:
  - name: beta
    selectors:
      - control_point: ingress
        label_matcher: {match_labels: {http.path: /beta}}
    accept_percentage: 0
# Observes every flow's access log: every answer carries `sluice.flow`.
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress, service: shop}]
    bucket_capacity: 2
    fill_amount: 1
    interval: 10s
    limit_by_label_key: user
"#;

fn with_service(
    mut req: envoy_types::pb::envoy::service::auth::v3::CheckRequest,
    service: &str,
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    if let Some(attrs) = req.attributes.as_mut() {
        attrs
            .context_extensions
            .insert("service".into(), service.into());
    }
    req
}

#[tokio::test]
async fn accepts_limits_and_samples_over_grpc() {
    let policy = PolicyFile::new(POLICY);
    let sidecar = sidecar(&policy).await;
    let mut client = client(&sidecar).await;

    let alice = || {
        with_service(
            check_request("GET", "/items?page=2", &[("user-id", "alice")]),
            "shop",
        )
    };
    for _ in 0..2 {
        let resp = client.check(alice()).await.expect("check").into_inner();
        assert_eq!(http_status(&resp), 200);
        assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0));
        assert_eq!(
            response_header(&resp, "baggage").as_deref(),
            Some("user=alice")
        );
        let flow = flow_metadata(&resp).expect("sluice.flow metadata");
        assert!(
            flow.starts_with("v=1;id=") && flow.contains(";d=accepted;fm=shop/latency;t="),
            "{flow}"
        );
    }
    let resp = client.check(alice()).await.expect("check").into_inner();
    assert_eq!(http_status(&resp), 429);
    // At most the time for one token (10 s), in whole seconds rounded up.
    let retry_after: u64 = response_header(&resp, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after in seconds");
    assert!((1..=10).contains(&retry_after), "retry-after {retry_after}");
    assert_eq!(
        response_header(&resp, "x-sluice-rejected-by").as_deref(),
        Some("shop/per-user")
    );
    let Some(HttpResponse::DeniedResponse(denied)) = &resp.http_response else {
        panic!("denied response expected");
    };
    assert_eq!(denied.body, "rejected by shop/per-user: rate limited\n");
    let flow = flow_metadata(&resp).expect("metadata on rejections too");
    assert!(
        flow.contains(";d=rejected;by=shop/per-user;fm=shop/latency;t="),
        "{flow}"
    );

    // The limiter selects service `shop` only.
    let other = with_service(
        check_request("GET", "/items", &[("user-id", "alice")]),
        "cart",
    );
    assert_eq!(
        http_status(&client.check(other).await.expect("check").into_inner()),
        200
    );

    // The sampler at 0% rejects /beta with 403 and no retry-after.
    let resp = client
        .check(check_request("GET", "/beta?x=1", &[("user-id", "bob")]))
        .await
        .expect("check")
        .into_inner();
    assert_eq!(http_status(&resp), 403);
    assert_eq!(response_header(&resp, "retry-after"), None);
    assert_eq!(
        response_header(&resp, "x-sluice-rejected-by").as_deref(),
        Some("shop/beta")
    );

    // Existing baggage is kept; ours is merged in, values percent-encoded.
    let mut req = check_request(
        "POST",
        "/items",
        &[("user-id", "carol lee"), ("baggage", "trace=1,user=old")],
    );
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.body = r#"{"tier": "gold"}"#.into();
    }
    let resp = client.check(req).await.expect("check").into_inner();
    assert_eq!(
        response_header(&resp, "baggage").as_deref(),
        Some("trace=1,tier=gold,user=carol%20lee")
    );

    // The admin server reports what happened.
    let metrics = http::get(sidecar.admin_addr, "/metrics", &[])
        .await
        .expect("metrics")
        .text();
    assert_eq!(metric(&metrics, "flowcontrol_requests_total"), 6.0);
    assert_eq!(
        metric(
            &metrics,
            r#"flowcontrol_decisions_total{decision_type="rejected"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"rate_limiter_counter_total{component="per-user",decision_type="rejected",policy_name="shop"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"flowcontrol_reject_reasons_total{component="beta",policy_name="shop",reason="not_sampled"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"classifier_counter_total{component="classifiers[0]",policy_name="shop"}"#
        ),
        6.0
    );
    let cps = http::get(sidecar.admin_addr, "/control-points", &[])
        .await
        .expect("cps");
    let json: serde_json::Value = serde_json::from_slice(&cps.body).expect("json");
    let rows = json["control_points"].as_array().expect("rows");
    assert!(
        rows.iter()
            .any(|r| r["control_point"] == "ingress" && r["service"] == "shop" && r["checks"] == 3),
        "{json}"
    );
    assert_eq!(
        http::get(sidecar.admin_addr, "/readyz", &[])
            .await
            .expect("readyz")
            .status,
        200
    );
    assert_eq!(
        http::get(sidecar.admin_addr, "/healthz", &[])
            .await
            .expect("healthz")
            .status,
        200
    );
    assert_eq!(
        http::get(sidecar.admin_addr, "/nope", &[])
            .await
            .expect("404")
            .status,
        404
    );
    sidecar.stop(std::time::Duration::from_secs(2)).await;
}

#[tokio::test]
async fn control_point_comes_from_metadata_then_extension_then_default() {
    let policy = PolicyFile::new(
        r#"
name: cp
samplers:
  - name: deny-egress
    selectors: [{control_point: egress}]
    accept_percentage: 0
"#,
    );
    let sidecar = sidecar(&policy).await;
    let mut client = client(&sidecar).await;
    // Default control point (ingress): passes.
    let resp = client
        .check(check_request("GET", "/", &[]))
        .await
        .expect("check")
        .into_inner();
    assert_eq!(http_status(&resp), 200);
    // gRPC metadata, as Envoy's initial_metadata sends it.
    let mut req = tonic::Request::new(check_request("GET", "/", &[]));
    req.metadata_mut()
        .insert("control-point", "egress".parse().expect("ascii"));
    assert_eq!(
        http_status(&client.check(req).await.expect("check").into_inner()),
        403
    );
    // Context extension.
    let mut req = check_request("GET", "/", &[]);
    if let Some(a) = req.attributes.as_mut() {
        a.context_extensions
            .insert("control-point".into(), "egress".into());
    }
    assert_eq!(
        http_status(&client.check(req).await.expect("check").into_inner()),
        403
    );
    // Metadata wins over the extension.
    let mut inner = check_request("GET", "/", &[]);
    if let Some(a) = inner.attributes.as_mut() {
        a.context_extensions
            .insert("control-point".into(), "egress".into());
    }
    let mut req = tonic::Request::new(inner);
    req.metadata_mut()
        .insert("control-point", "ingress".parse().expect("ascii"));
    assert_eq!(
        http_status(&client.check(req).await.expect("check").into_inner()),
        200
    );
    sidecar.stop(std::time::Duration::from_secs(2)).await;
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    let policy = PolicyFile::new("name: empty\n");
    let sidecar = sidecar(&policy).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", sidecar.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    sidecar.stop(std::time::Duration::from_secs(2)).await;
}
