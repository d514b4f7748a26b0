//! One decision through the engine, and one whole Check without the network
//! (decode the request, decide, build the response), for an empty policy and
//! for the benchmark policy (examples/bench.yaml: a classifier, a flux
//! meter, a sampler and a per-user rate limiter) over 10,000 users.
//!
//! `cargo bench --bench engine`; the figures go to BENCHMARKS.md.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use sluice::envoy::AuthzService;
use sluice::envoy::request::CheckView;
use sluice::envoy::wire;
use sluice_engine::Metrics;
use sluice_engine::{Engine, EngineOptions, FlowRequest};
use sluice_policy::load::parse_sources;
use sluice_time::Clock;

const USERS: usize = 10_000;

/// The benchmark policy: a classifier, a flux meter, a sampler and a
/// per-user rate limiter (examples/bench.yaml).
fn bench_policy() -> String {
    std::fs::read_to_string(sluice_testkit::repo_root().join("examples/bench.yaml"))
        .expect("examples/bench.yaml")
}

fn engine(policy: Option<&str>) -> Arc<Engine> {
    let engine = Engine::new(Clock::new(), Metrics::new(), EngineOptions::default());
    let sources: Vec<(PathBuf, String)> = policy
        .map(|p| vec![(PathBuf::from("bench.yaml"), p.to_owned())])
        .unwrap_or_default();
    engine
        .install(&parse_sources(&sources).expect("valid policy"))
        .expect("installs");
    Arc::new(engine)
}

/// A CheckRequest as Envoy sends one for a browser-ish GET: 14 headers.
fn request(user: usize) -> wire::CheckRequest {
    let user = format!("user-{user}");
    let mut req = sluice_testkit::check::http(
        "GET",
        "/api/items?page=2",
        &[
            (":authority", "shop.example"),
            (":method", "GET"),
            (":path", "/api/items?page=2"),
            (":scheme", "http"),
            ("accept", "application/json"),
            ("accept-encoding", "gzip, deflate"),
            ("accept-language", "en-GB,en;q=0.9"),
            ("cookie", "session=0123456789abcdef0123456789abcdef"),
            ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) bench"),
            ("user-id", &user),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "a8a2684d-9acc-4d28-920d-21f2a86c0447"),
            ("x-envoy-expected-rq-timeout-ms", "15000"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
    );
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.host = Bytes::from_static(b"shop.example");
    }
    req
}

fn decisions(c: &mut Criterion) {
    let requests: Vec<wire::CheckRequest> = (0..USERS).map(request).collect();
    let bench_policy = bench_policy();
    let without_scheduler = bench_policy
        .split("\nload_schedulers:")
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut group = c.benchmark_group("decision");
    for (name, policy) in [
        ("empty_policy", None),
        (
            "bench_policy_without_scheduler",
            Some(without_scheduler.as_str()),
        ),
        ("bench_policy", Some(bench_policy.as_str())),
    ] {
        let engine = engine(policy);
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % USERS;
                let view = CheckView::new(&requests[i]);
                let flow = FlowRequest {
                    control_point: "ingress",
                    service: "any",
                    labels: &view,
                };
                black_box(engine.decide(flow, |d| d.accepted()))
            })
        });
    }
    group.finish();

    let encoded: Vec<Bytes> = requests
        .iter()
        .map(|r| Bytes::from(r.encode_to_vec()))
        .collect();
    let mut group = c.benchmark_group("check_without_network");
    for (name, policy) in [
        ("empty_policy", None),
        ("bench_policy", Some(bench_policy.as_str())),
    ] {
        let service = AuthzService::new(engine(policy), "ingress", "any");
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % USERS;
                // As the server's codec does: entries counted, then decoded.
                let req = sluice_proto::bounded::decode::<wire::CheckRequest>(encoded[i].clone())
                    .expect("decodes");
                let resp = ready(service.decide(Some("ingress"), &req, None)).expect("answered");
                black_box(resp.encode_to_vec())
            })
        });
    }
    group.finish();
}

/// The output of a future that needs no waiting (no scheduler queues the
/// flow): polled once, without a runtime.
fn ready<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("the benchmark policy never makes a flow wait"),
    }
}

criterion_group!(benches, decisions);
criterion_main!(benches);
