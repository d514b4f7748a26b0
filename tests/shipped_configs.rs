//! The shipped sidecar and gateway bootstraps, run by the real Envoy 1.40
//! against a real Sluice and upstreams on loopback: each listener sends its
//! control point, each route its service, the access logs come back, and
//! the failure modes are the ones the files choose (sidecar open, gateway
//! closed, the gateway's health route unchecked).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use sluice::server::{Config, Sidecar};
use sluice_testkit::envoy::{Envoy, EnvoyPorts, render_ports};
use sluice_testkit::{Upstream, free_port, http, repo_root};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `config_file` rendered onto `ports` plus `extra`, its one listener on
/// 0.0.0.0 moved to loopback (tests bind nothing else).
fn rendered(config_file: &str, ports: &EnvoyPorts, extra: &[(u16, u16)]) -> String {
    let text = std::fs::read_to_string(repo_root().join(config_file)).expect("read");
    let mut all = ports.substitutions().to_vec();
    all.extend(extra.iter().map(|&(default, port)| (default, Some(port))));
    let text = render_ports(&text, &all).unwrap_or_else(|e| panic!("{config_file}: {e:#}"));
    assert_eq!(
        text.matches("address: 0.0.0.0").count(),
        1,
        "{config_file}: one public listener"
    );
    text.replace("address: 0.0.0.0", "address: 127.0.0.1")
}

async fn sidecar(policy: &PolicyFile) -> Sidecar {
    Sidecar::start(&Config {
        policy: Some(policy.path.clone()),
        ..Config::ephemeral()
    })
    .await
    .expect("sidecar starts")
}

/// Checks seen per (control point, service).
fn control_points(sidecar: &Sidecar) -> BTreeMap<(String, String), u64> {
    sidecar
        .engine
        .control_points()
        .into_iter()
        .map(|c| ((c.control_point, c.service), c.checks))
        .collect()
}

fn key(control_point: &str, service: &str) -> (String, String) {
    (control_point.to_owned(), service.to_owned())
}

/// Waits until Sluice has matched `n` access logs to their flows.
async fn logs_matched(sidecar: &Sidecar, n: f64) -> f64 {
    let series = r#"flowcontrol_access_logs_total{result="matched"}"#;
    let admin = sidecar.admin_addr;
    eventually(Duration::from_secs(5), || async move {
        let text = http::get(admin, "/metrics", &[])
            .await
            .expect("metrics")
            .text();
        metric(&text, series) >= n
    })
    .await;
    let text = http::get(admin, "/metrics", &[])
        .await
        .expect("metrics")
        .text();
    metric(&text, series)
}

/// `GET path` with `Host: host`: the test kit's client always sends the
/// address as Host, and the gateway routes by host.
async fn get_host(addr: std::net::SocketAddr, host: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
        .await
        .expect("answer within 5 s")
        .expect("read");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"));
    (status, reply)
}

const SIDECAR_POLICY: &str = r#"
name: shipped
samplers:
  # Only the shop's own calls to /blocked are refused: proves the egress
  # listener says `egress` and the ingress listener does not.
  - name: no-blocked-calls
    selectors:
      - control_point: egress
        service: shop
        label_matcher: {match_labels: {http.path: /blocked}}
    accept_percentage: 0
# A flux meter observes every flow, so each access log is matched to its
# flow (Sluice sends `sluice.flow` only when something reads the log).
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}, {control_point: egress}]
"#;

#[tokio::test]
async fn the_sidecar_config_checks_ingress_and_egress_and_fails_open() {
    let policy = PolicyFile::new(SIDECAR_POLICY);
    let sluice = sidecar(&policy).await;
    let app = Upstream::start(0).await.expect("app");
    let dependency = Upstream::start(0).await.expect("dependency");
    let ports = EnvoyPorts::free(app.addr.port(), sluice.grpc_addr.port()).expect("ports");
    let egress_port = free_port().expect("port");
    let config = rendered(
        "envoy-configs/sidecar.yaml",
        &ports,
        &[(10001, egress_port), (9000, dependency.addr.port())],
    );
    let envoy = Envoy::start_with(&config, ports)
        .await
        .expect("envoy starts");
    let ingress = envoy.listener();
    let egress = ([127, 0, 0, 1], egress_port).into();

    for path in ["/items", "/blocked"] {
        let reply = http::get(ingress, path, &[]).await.expect("request");
        assert_eq!(reply.status, 200, "ingress {path}: {}", reply.text());
    }
    assert_eq!(app.requests.load(Ordering::Relaxed), 2);

    let reply = http::get(egress, "/items", &[]).await.expect("request");
    assert_eq!(reply.status, 200, "egress /items: {}", reply.text());
    let reply = http::get(egress, "/blocked", &[]).await.expect("request");
    assert_eq!(reply.status, 403, "egress /blocked: {}", reply.text());
    assert_eq!(
        reply.header("x-sluice-rejected-by"),
        Some("shipped/no-blocked-calls")
    );
    assert_eq!(dependency.requests.load(Ordering::Relaxed), 1);

    let seen = control_points(&sluice);
    assert_eq!(
        seen,
        BTreeMap::from([(key("egress", "shop"), 2), (key("ingress", "shop"), 2)]),
        "the virtual hosts' service and the listeners' control points"
    );
    // Both listeners' access logs reach Sluice and find their flows.
    assert_eq!(logs_matched(&sluice, 4.0).await, 4.0);

    // Fail open: with Sluice gone, both directions still pass.
    sluice.stop(Duration::from_secs(5)).await;
    let reply = http::get(ingress, "/items", &[]).await.expect("request");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = http::get(egress, "/blocked", &[]).await.expect("request");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(app.requests.load(Ordering::Relaxed), 3);
    assert_eq!(dependency.requests.load(Ordering::Relaxed), 2);
    drop(envoy);
}

const GATEWAY_POLICY: &str = r#"
name: gw
rate_limiters:
  # One request per hour for the api service only: proves the per-route
  # service reaches Sluice.
  - name: api-limit
    selectors: [{control_point: ingress, service: api}]
    bucket_capacity: 1
    fill_amount: 1
    interval: 1h
# Each access log matched to its flow, as above.
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
"#;

#[tokio::test]
async fn the_gateway_config_names_each_routes_service_and_fails_closed() {
    let policy = PolicyFile::new(GATEWAY_POLICY);
    let sluice = sidecar(&policy).await;
    let web = Upstream::start(0).await.expect("web");
    let api = Upstream::start(0).await.expect("api");
    let checkout = Upstream::start(0).await.expect("checkout");
    let ports = EnvoyPorts::free(web.addr.port(), sluice.grpc_addr.port()).expect("ports");
    let config = rendered(
        "envoy-configs/gateway.yaml",
        &ports,
        &[(8001, api.addr.port()), (8002, checkout.addr.port())],
    );
    let envoy = Envoy::start_with(&config, ports)
        .await
        .expect("envoy starts");
    let gateway = envoy.listener();

    assert_eq!(get_host(gateway, "shop.example.com", "/").await.0, 200);
    assert_eq!(
        get_host(gateway, "shop.example.com:443", "/checkout/pay")
            .await
            .0,
        200
    );
    assert_eq!(
        get_host(gateway, "api.example.com", "/v1/items").await.0,
        200
    );
    let (status, reply) = get_host(gateway, "api.example.com", "/v1/items").await;
    assert_eq!(status, 429, "{reply}");
    assert!(reply.contains("rejected by gw/api-limit"), "{reply}");
    // Other hosts: Envoy answers itself, without asking Sluice.
    let (status, reply) = get_host(gateway, "10.0.0.1", "/healthz").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(get_host(gateway, "10.0.0.1", "/admin").await.0, 404);

    assert_eq!(web.requests.load(Ordering::Relaxed), 1);
    assert_eq!(checkout.requests.load(Ordering::Relaxed), 1);
    assert_eq!(api.requests.load(Ordering::Relaxed), 1);
    assert_eq!(
        control_points(&sluice),
        BTreeMap::from([
            (key("ingress", "api"), 2),
            (key("ingress", "checkout"), 1),
            (key("ingress", "web"), 1),
        ]),
        "one service per route; the health and 404 routes are never checked"
    );
    assert_eq!(logs_matched(&sluice, 4.0).await, 4.0);

    // Fail closed: with Sluice gone, checked routes answer 503 and reach
    // no backend; the health route still answers.
    sluice.stop(Duration::from_secs(5)).await;
    let (status, reply) = get_host(gateway, "shop.example.com", "/").await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(web.requests.load(Ordering::Relaxed), 1);
    assert_eq!(get_host(gateway, "10.0.0.1", "/healthz").await.0, 200);
    drop(envoy);
}
