//! Bad input gets a well-formed answer, never a panic, and the sidecar goes
//! on serving.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use sluice::envoy::wire;
use sluice::server::{Config, Sidecar};

const POLICY: &str = r#"
name: p
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user: {from: request.http.headers.user-id}
      tier: {json: {pointer: /tier}}
      route: {path_template: ["/a/{b}"]}
      sub: {jwt: {claim: sub}}
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 1000
    fill_amount: 1
    interval: 1s
    limit_by_label_key: user
"#;

async fn raw_check(
    addr: std::net::SocketAddr,
    body: Bytes,
) -> Result<CheckResponse, tonic::Status> {
    raw_unary(addr, "/envoy.service.auth.v3.Authorization/Check", body).await
}

fn encode(msg: &impl prost::Message) -> Bytes {
    Bytes::from(msg.encode_to_vec())
}

async fn start(max_bytes: usize) -> (Sidecar, PolicyFile) {
    let policy = PolicyFile::new(POLICY);
    let config = Config {
        policy: Some(policy.path.clone()),
        max_check_request_bytes: max_bytes,
        ..Config::ephemeral()
    };
    (Sidecar::start(&config).await.expect("start"), policy)
}

async fn still_serving(sidecar: &Sidecar) {
    let mut client = client(sidecar).await;
    let resp = client
        .check(check_request("GET", "/a/b", &[("user-id", "z")]))
        .await
        .expect("still answering")
        .into_inner();
    assert_eq!(http_status(&resp), 200);
}

#[tokio::test]
async fn a_request_without_attributes_passes() {
    let (sidecar, _p) = start(16 << 20).await;
    let mut client = client(&sidecar).await;
    let resp = client
        .check(CheckRequest::default())
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(http_status(&resp), 200);
    // Nothing in the policy reads its access log: no `sluice.flow`.
    assert!(flow_metadata(&resp).is_none());
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn thousands_of_headers_and_huge_values_are_answered_and_ten_thousand_refused() {
    let (sidecar, _p) = start(64 << 20).await;
    let mut client = client(&sidecar).await;
    let names: Vec<(String, String)> = (0..10_000)
        .map(|i| (format!("x-h-{i}"), format!("v{i}")))
        .collect();
    let headers = |n: usize| -> Vec<(&str, &str)> {
        names[..n]
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain([("user-id", "many")])
            .collect()
    };
    // Within the bound on header entries (4,096): decided.
    let resp = client
        .check(check_request("GET", "/a/b", &headers(4_000)))
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(http_status(&resp), 200);
    assert_eq!(
        response_header(&resp, "baggage").as_deref(),
        Some("route=/a/{b},user=many")
    );
    // Beyond it: refused before decoding, which Envoy answers by its
    // failure_mode_allow, as it does a Check over the byte limit.
    let refused = client
        .check(check_request("GET", "/a/b", &headers(10_000)))
        .await
        .expect_err("over 4,096 header entries");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);

    let huge = "u".repeat(1 << 20);
    let bearer = format!("Bearer {}", "e".repeat(1 << 20));
    let resp = client
        .check(check_request(
            "GET",
            &format!("/{huge}"),
            &[
                ("user-id", &huge),
                ("authorization", &bearer),
                ("x-big", &huge),
            ],
        ))
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(http_status(&resp), 200);
    let baggage = response_header(&resp, "baggage").expect("user label");
    assert_eq!(baggage.len(), "user=".len() + (1 << 20));
    still_serving(&sidecar).await;
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn invalid_utf8_everywhere_is_read_lossily() {
    let (sidecar, _p) = start(16 << 20).await;
    let bad = Bytes::from_static(b"\xff\xfe\xc3(");
    let req = wire::CheckRequest {
        attributes: Some(wire::AttributeContext {
            request: Some(wire::Request {
                http: Some(wire::HttpRequest {
                    method: bad.clone(),
                    path: Bytes::from_static(b"/a/\xff"),
                    headers: vec![
                        wire::StringEntry {
                            key: "user-id".into(),
                            value: bad.clone(),
                        },
                        wire::StringEntry {
                            key: bad.clone(),
                            value: bad.clone(),
                        },
                        wire::StringEntry {
                            key: "authorization".into(),
                            value: Bytes::from_static(b"Bearer \xff.\xff.\xff"),
                        },
                    ],
                    body: Bytes::from_static(b"{\"tier\": \"\xff\"}"),
                    ..Default::default()
                }),
            }),
            context_extensions: vec![wire::StringEntry {
                key: "service".into(),
                value: bad.clone(),
            }],
            ..Default::default()
        }),
    };
    let resp = raw_check(sidecar.grpc_addr, encode(&req))
        .await
        .expect("well-formed answer");
    assert_eq!(http_status(&resp), 200);
    let baggage = response_header(&resp, "baggage").expect("labels");
    assert!(baggage.contains("user=%EF%BF%BD%EF%BF%BD"), "{baggage}");
    still_serving(&sidecar).await;
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn malformed_and_oversized_messages_get_grpc_errors() {
    let (sidecar, _p) = start(1 << 20).await;
    // Not protobuf at all.
    let err = raw_check(
        sidecar.grpc_addr,
        Bytes::from_static(b"\xff\xff\xff\xff\x0f garbage"),
    )
    .await
    .expect_err("malformed");
    assert_ne!(err.code(), tonic::Code::Ok);
    // Truncated: a length prefix promising more than follows.
    let err = raw_check(sidecar.grpc_addr, Bytes::from_static(b"\x0a\xff\x01\x0a"))
        .await
        .expect_err("truncated");
    assert_ne!(err.code(), tonic::Code::Ok);
    // Over --max-check-request-bytes.
    let huge = "x".repeat(2 << 20);
    let req = check_request("GET", "/", &[("x-big", &huge)]);
    let err = raw_check(sidecar.grpc_addr, encode(&req))
        .await
        .expect_err("too big");
    // tonic answers a message over the limit with OUT_OF_RANGE.
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    still_serving(&sidecar).await;
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn an_unknown_control_point_passes() {
    let (sidecar, _p) = start(16 << 20).await;
    let mut client = client(&sidecar).await;
    let mut req = tonic::Request::new(check_request("GET", "/", &[]));
    req.metadata_mut()
        .insert("control-point", "never-configured".parse().expect("ascii"));
    let resp = client.check(req).await.expect("answer").into_inner();
    assert_eq!(http_status(&resp), 200);
    sidecar.stop(Duration::from_secs(2)).await;
}
