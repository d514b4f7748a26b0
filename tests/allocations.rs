//! The accept path of the engine allocates nothing: label lookups borrow
//! from the request, classifier outputs borrow when they copy a header,
//! per-label state is keyed by a fixed-size digest, and a load scheduler
//! that is not saturated passes flows without queueing. This test counts heap allocations made by this thread during
//! decisions, so a change that adds one per flow fails here.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

use sluice::envoy::request::CheckView;
use sluice::envoy::wire;
use sluice_engine::Metrics;
use sluice_engine::{Engine, EngineOptions, FlowRequest};
use sluice_policy::load::parse_sources;
use sluice_time::Clock;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const POLICY: &str = r#"
name: bench
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user: {from: request.http.headers.user-id}
      route: {path_template: ["/api/{what}"]}
samplers:
  - name: most
    selectors: [{control_point: ingress, label_matcher: {match_labels: {http.method: GET}}}]
    accept_percentage: 100
    session_label_key: user
    pass_through_label_values: [user-3, user-42, qa, user-7]
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 1000000
    fill_amount: 1000
    interval: 1s
    limit_by_label_key: user
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
load_schedulers:
  - name: protect
    selectors: [{control_point: ingress}]
    scheduler:
      workloads:
        - label_matcher: {match_labels: {route: "/api/{what}"}}
          parameters: {priority: 10}
"#;

fn request(user: usize) -> wire::CheckRequest {
    let user = format!("user-{user}");
    sluice_testkit::check::http(
        "GET",
        "/api/items?page=2",
        &[("accept", "*/*"), ("user-id", &user)],
    )
}

#[test]
fn the_accept_path_does_not_allocate() {
    let engine = Engine::new(Clock::new(), Metrics::new(), EngineOptions::default());
    let sources = vec![(PathBuf::from("p.yaml"), POLICY.to_owned())];
    engine
        .install(&parse_sources(&sources).expect("valid"))
        .expect("installs");
    let requests: Vec<wire::CheckRequest> = (0..100).map(request).collect();
    let decide = |req: &wire::CheckRequest| {
        let view = CheckView::new(req);
        let flow = FlowRequest {
            control_point: "ingress",
            service: "any",
            labels: &view,
        };
        engine.decide(flow, |d| {
            assert!(d.accepted());
            assert_eq!(d.baggage().count(), 2);
        });
    };
    // First sight of each user creates its bucket (one key allocation) and
    // the control point's counter; that is allowed.
    requests.iter().for_each(decide);
    let before = allocations();
    for _ in 0..10 {
        requests.iter().for_each(decide);
    }
    assert_eq!(
        allocations() - before,
        0,
        "allocations in 1,000 accepted decisions"
    );
}

/// The whole accept answer: the decision plus Envoy's CheckResponse. The
/// response allocates what its protobuf types own and nothing else: the
/// `sluice.flow` string, the metadata map and its key, and for the
/// `baggage` header the header list, its name and its value.
/// Allocations per accepted Check under `policy`, decision and response
/// together (`check` looks at each response), over 1,000 Checks after a
/// warm-up.
fn allocations_per_check(
    policy: &str,
    check: impl Fn(&envoy_types::pb::envoy::service::auth::v3::CheckResponse),
) -> f64 {
    let engine = Engine::new(Clock::new(), Metrics::new(), EngineOptions::default());
    let sources = vec![(PathBuf::from("p.yaml"), policy.to_owned())];
    engine
        .install(&parse_sources(&sources).expect("valid"))
        .expect("installs");
    let requests: Vec<wire::CheckRequest> = (0..100).map(request).collect();
    let answer = |req: &wire::CheckRequest| {
        let view = CheckView::new(req);
        let flow = FlowRequest {
            control_point: "ingress",
            service: "any",
            labels: &view,
        };
        let response = engine.decide(flow, |d| sluice::envoy::response::build(&d, &view));
        check(&response);
        drop(response);
    };
    requests.iter().for_each(&answer);
    let before = allocations();
    for _ in 0..10 {
        requests.iter().for_each(&answer);
    }
    (allocations() - before) as f64 / 1000.0
}

#[test]
fn an_accepted_check_allocates_only_what_its_response_owns() {
    const RESPONSE_OWNS: f64 = 6.0;
    assert_eq!(
        allocations_per_check(POLICY, |r| assert!(r.dynamic_metadata.is_some())),
        RESPONSE_OWNS,
        "allocations per accepted Check, decision and response"
    );
}

/// A per-user rate limit alone, as one would put in limitador: its access
/// log is read by nothing, so the answer carries no `sluice.flow` (nor
/// baggage: no classifier).
const RATE_LIMIT_ONLY: &str = r#"
name: peer
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 1000000
    fill_amount: 1000
    interval: 1s
    limit_by_label_key: http.request.header.user_id
"#;

#[test]
fn an_accepted_check_of_a_rate_limit_alone_allocates_nothing() {
    assert_eq!(
        allocations_per_check(RATE_LIMIT_ONLY, |r| assert!(r.dynamic_metadata.is_none())),
        0.0,
        "allocations per accepted Check, decision and response"
    );
}
