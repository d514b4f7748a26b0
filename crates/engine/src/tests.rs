//! The engine end to end, on simulated time, without a network.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use sluice_policy::PolicySet;
use sluice_policy::load::parse_sources;
use sluice_time::{Clock, MockTime, Nanos};

use super::*;
use crate::flow_end::metadata::FlowKey;
use crate::labels::LabelSource;

fn policies(docs: &[&str]) -> PolicySet {
    let sources: Vec<(PathBuf, String)> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| (PathBuf::from(format!("p{i}.yaml")), d.to_string()))
        .collect();
    parse_sources(&sources).expect("valid policies")
}

fn engine(docs: &[&str]) -> (Engine, MockTime) {
    let (clock, time) = Clock::mock();
    let engine = Engine::new(clock, Metrics::new(), EngineOptions::default());
    engine.install(&policies(docs)).expect("installs");
    (engine, time)
}

/// (policy/component, status, retry-after) of a rejection.
type Rejected = (String, u16, Option<Duration>);

/// A flow at `ingress` of service `shop`.
fn ingress(labels: &dyn LabelSource) -> FlowRequest<'_> {
    FlowRequest {
        control_point: "ingress",
        service: "shop",
        labels,
    }
}

/// Decides a flow at `ingress` of service `shop`; returns the rejection as
/// (component, status, retry-after) and the baggage.
fn check(engine: &Engine, labels: &[(&str, &str)]) -> (Option<Rejected>, Vec<(String, String)>) {
    let source = MapLabels::from_pairs(labels.iter().copied());
    engine.decide(ingress(&source), |d| {
        let rejection = d.rejection.as_ref().map(|r| {
            (
                format!("{}/{}", r.policy, r.component),
                r.status,
                r.retry_after,
            )
        });
        let baggage = d
            .baggage()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        (rejection, baggage)
    })
}

const USER_LIMIT: &str = r#"
name: users
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user: {from: request.http.headers.user-id}
      secret: {from: request.http.headers.x-secret, telemetry: false}
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 2
    fill_amount: 2
    interval: 1s
    limit_by_label_key: user
"#;

#[test]
fn an_unknown_control_point_passes_and_is_recorded() {
    let (engine, _) = engine(&[USER_LIMIT]);
    let source = MapLabels::default();
    let plan = engine.plan();
    for _ in 0..3 {
        let d = engine.check(
            &plan,
            FlowRequest {
                control_point: "nowhere",
                service: "any",
                labels: &source,
            },
        );
        assert!(d.accepted());
    }
    let seen = engine.control_points();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].control_point.as_str(), seen[0].checks),
        ("nowhere", 3)
    );
}

#[test]
fn classifier_labels_drive_per_user_limits_and_go_out_as_baggage() {
    let (engine, time) = engine(&[USER_LIMIT]);
    let alice = [
        ("http.request.header.user_id", "alice"),
        ("http.request.header.x_secret", "s"),
    ];
    for _ in 0..2 {
        let (rejection, baggage) = check(&engine, &alice);
        assert_eq!(rejection, None);
        assert_eq!(baggage, vec![("user".to_owned(), "alice".to_owned())]);
    }
    let (rejection, _) = check(&engine, &alice);
    assert_eq!(
        rejection,
        Some((
            "users/per-user".to_owned(),
            429,
            Some(Duration::from_millis(500))
        ))
    );
    assert_eq!(
        check(&engine, &[("http.request.header.user_id", "bob")]).0,
        None
    );
    time.advance(Duration::from_millis(500));
    assert_eq!(
        check(&engine, &alice).0,
        None,
        "one token back after 500 ms"
    );
    assert_eq!(engine.metrics().rejected.get(), 1);
    assert_eq!(engine.metrics().accepted.get(), 4);
}

#[test]
fn samplers_run_before_limiters_and_rejected_flows_cost_no_tokens() {
    let first = r#"
name: a
rate_limiters:
  - name: wide
    selectors: [{control_point: ingress}]
    bucket_capacity: 3
    fill_amount: 0.000001
    interval: 1h
"#;
    let second = r#"
name: b
samplers:
  - name: nobody
    selectors: [{control_point: ingress, label_matcher: {match_labels: {sample: "no"}}}]
    accept_percentage: 0
rate_limiters:
  - name: narrow
    selectors: [{control_point: ingress}]
    bucket_capacity: 1
    fill_amount: 0
    interval: 1s
"#;
    let (engine, _) = engine(&[first, second]);
    // The sampler rejects with 403 before any bucket is charged.
    for _ in 0..5 {
        let (rejection, _) = check(&engine, &[("sample", "no")]);
        assert_eq!(
            rejection.map(|r| (r.0, r.1)),
            Some(("b/nobody".to_owned(), 403))
        );
    }
    // `wide` (policy a) runs before `narrow` (policy b): the first flow takes
    // a token from each; later flows are refused by `narrow`, and the token
    // `wide` had taken is given back each time.
    assert_eq!(check(&engine, &[]).0, None);
    for _ in 0..5 {
        let (rejection, _) = check(&engine, &[]);
        assert_eq!(rejection, Some(("b/narrow".to_owned(), 429, None)));
    }
    // Drop `narrow`; `wide` is unchanged and keeps its bucket: 2 tokens left.
    engine.install(&policies(&[first])).expect("installs");
    assert_eq!(check(&engine, &[]).0, None);
    assert_eq!(check(&engine, &[]).0, None);
    assert_eq!(
        check(&engine, &[]).0.map(|r| r.0),
        Some("a/wide".to_owned())
    );
}

#[test]
fn removed_components_take_their_metrics_with_them() {
    let (engine, _) = engine(&[USER_LIMIT]);
    check(&engine, &[("http.request.header.user_id", "alice")]);
    let text = engine.metrics().encode_text();
    assert!(text.contains(r#"rate_limiter_counter_total{component="per-user",decision_type="accepted",policy_name="users"} 1"#), "{text}");
    engine.install(&policies(&[])).expect("installs");
    let text = engine.metrics().encode_text();
    assert!(!text.contains("per-user"), "{text}");
}

#[test]
fn later_classifiers_override_earlier_ones_in_baggage() {
    let doc = r#"
name: p
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      tier: {from: http.method}
  - selectors: [{control_point: ingress}]
    rules:
      tier: {from: tier}
      copy: {from: tier}
"#;
    let (engine, _) = engine(&[doc]);
    let (_, baggage) = check(&engine, &[("http.method", "GET")]);
    // The second classifier reads the first one's `tier` and re-sets it;
    // rules run in label-name order. `tier` goes out once.
    assert_eq!(
        baggage,
        vec![
            ("copy".to_owned(), "GET".to_owned()),
            ("tier".to_owned(), "GET".to_owned())
        ]
    );
}

#[test]
fn label_state_is_bounded_and_swept() {
    let (clock, time) = Clock::mock();
    let engine = Engine::new(
        clock,
        Metrics::new(),
        EngineOptions {
            max_label_values: 160,
            ..EngineOptions::default()
        },
    );
    engine
        .install(&policies(&[&USER_LIMIT.replace(
            "    limit_by_label_key: user\n",
            "    limit_by_label_key: user\n    max_idle_time: 1m\n",
        )]))
        .expect("installs");
    for i in 0..10_000 {
        let user = format!("u{i}");
        check(&engine, &[("http.request.header.user_id", &user)]);
    }
    let plan = engine.plan();
    let limiter = &plan.policies[0].rate_limiters[0];
    assert!(limiter.label_values() <= 160);
    time.advance(Duration::from_secs(61));
    engine.sweep();
    assert_eq!(limiter.label_values(), 0);
    let evicted = engine
        .metrics()
        .label_state_evicted
        .vec()
        .with_label_values(&["users", "per-user"])
        .get();
    assert!(evicted >= 10_000 - 160, "{evicted}");
}

const METERED: &str = r#"
name: m
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
    static_buckets: [10, 100]
concurrency_limiters:
  - name: two
    selectors: [{control_point: ingress}]
    max_concurrency: 2
    max_inflight_duration: 5s
"#;

/// Checks a flow; returns its `sluice.flow` metadata and whether it passed.
fn check_meta(engine: &Engine) -> (String, bool) {
    let source = MapLabels::default();
    engine.decide(ingress(&source), |d| {
        (d.metadata().unwrap_or_default(), d.accepted())
    })
}

fn end_of(
    meta: &str,
    status: &'static str,
    response_ms: &'static str,
) -> flow_end::FlowEnd<'static> {
    use flow_end::AttrValue::Text;
    let mut end = flow_end::FlowEnd::default();
    end.set("sluice.flow", Text(meta.to_owned().into()));
    end.set("http.status_code", Text(status.into()));
    end.set("RESPONSE_DURATION", Text(response_ms.into()));
    end.set("authz_duration", Text("1".into()));
    end
}

#[test]
fn access_logs_return_concurrency_slots_and_feed_flux_meters() {
    let (engine, _) = engine(&[METERED]);
    let (a, ok_a) = check_meta(&engine);
    let (_b, ok_b) = check_meta(&engine);
    let (c, ok_c) = check_meta(&engine);
    assert!(ok_a && ok_b && !ok_c, "two slots");
    assert!(a.contains(";fm=m/latency"), "{a}");
    assert!(c.contains(";d=rejected;by=m/two"), "{c}");
    assert_eq!(engine.inflight_flows(), 2);

    let no_extras = flow_end::NoExtras;
    assert_eq!(
        engine.end_flow(&end_of(&a, "200", "31"), &no_extras),
        EndOutcome::Matched
    );
    assert_eq!(
        engine.end_flow(&end_of(&c, "429", "-"), &no_extras),
        EndOutcome::Matched
    );
    assert_eq!(engine.inflight_flows(), 1);
    assert!(check_meta(&engine).1, "a's slot is free again");
    assert!(!check_meta(&engine).1);

    assert_eq!(
        engine.end_flow(&flow_end::FlowEnd::default(), &no_extras),
        EndOutcome::WithoutFlow
    );
    assert_eq!(
        engine.end_flow(&end_of("garbage", "200", "1"), &no_extras),
        EndOutcome::Unsigned
    );
    let signed_garbage = engine.flow_key().sign("garbage");
    assert_eq!(
        engine.end_flow(&end_of(&signed_garbage, "200", "1"), &no_extras),
        EndOutcome::Invalid
    );

    let text = engine.metrics().encode_text();
    assert!(text.contains(r#"flux_meter_sum{decision_type="accepted",flow_status="OK",flux_meter_name="latency",http_status_code="200",policy_name="m"} 30"#), "{text}");
    assert!(text.contains(r#"flux_meter_count{decision_type="rejected",flow_status="Error",flux_meter_name="latency",http_status_code="429",policy_name="m"} 1"#), "{text}");
    assert!(text.contains(r#"flowcontrol_reject_reasons_total{component="two",policy_name="m",reason="concurrency_limited"} 2"#), "{text}");
}

#[test]
fn slots_of_flows_never_logged_expire_on_simulated_time() {
    let (engine, time) = engine(&[METERED]);
    assert!(check_meta(&engine).1);
    assert!(check_meta(&engine).1);
    assert!(!check_meta(&engine).1);
    time.advance(Duration::from_millis(4_999));
    engine.sweep();
    assert!(!check_meta(&engine).1, "not yet");
    time.advance(Duration::from_millis(1));
    engine.sweep();
    assert_eq!(engine.inflight_flows(), 0);
    assert_eq!(engine.metrics().inflight_expired.get(), 2);
    assert!(check_meta(&engine).1);
}

#[test]
fn a_rejection_after_a_slot_was_taken_gives_it_back() {
    let doc = r#"
name: order
concurrency_limiters:
  - name: wide
    selectors: [{control_point: ingress}]
    max_concurrency: 1
  - name: closed
    selectors: [{control_point: ingress, label_matcher: {match_labels: {closed: "yes"}}}]
    max_concurrency: 0
"#;
    let (engine, _) = engine(&[doc]);
    for _ in 0..3 {
        let (rejection, _) = check(&engine, &[("closed", "yes")]);
        assert_eq!(rejection.map(|r| r.0), Some("order/closed".to_owned()));
    }
    assert_eq!(
        check(&engine, &[]).0,
        None,
        "wide's slot was returned each time"
    );
    assert_eq!(
        check(&engine, &[]).0.map(|r| r.0),
        Some("order/wide".to_owned())
    );
}

#[test]
fn forged_and_replayed_logs_neither_observe_nor_free_slots() {
    let (engine, _) = engine(&[METERED]);
    let (a, _) = check_meta(&engine);
    let (b, _) = check_meta(&engine);
    assert_eq!(engine.inflight_flows(), 2);
    // b's value under another key, and with its tag's last digit changed.
    let foreign = FlowKey::random().sign(b.rsplit_once(";t=").expect("signed").0);
    let mut flipped = b.clone();
    let last = flipped.pop().expect("a tag");
    flipped.push(if last == '0' { '1' } else { '0' });
    for forged in [&foreign, &flipped] {
        assert_eq!(
            engine.end_flow(&end_of(forged, "200", "2000"), &flow_end::NoExtras),
            EndOutcome::Unsigned
        );
    }
    assert_eq!(engine.inflight_flows(), 2, "b still holds its slot");
    assert_eq!(
        engine.end_flow(&end_of(&a, "200", "5"), &flow_end::NoExtras),
        EndOutcome::Matched
    );
    assert_eq!(
        engine.end_flow(&end_of(&a, "200", "2000"), &flow_end::NoExtras),
        EndOutcome::Duplicate
    );
    let text = engine.metrics().encode_text();
    assert!(text.contains(r#"flux_meter_count{decision_type="accepted",flow_status="OK",flux_meter_name="latency",http_status_code="200",policy_name="m"} 1"#), "{text}");
    assert!(text.contains(r#"flux_meter_sum{decision_type="accepted",flow_status="OK",flux_meter_name="latency",http_status_code="200",policy_name="m"} 4"#), "{text}");
}

#[test]
fn out_of_bounds_records_free_the_slot_and_observe_nothing() {
    let (engine, _) = engine(&[METERED]);
    let (a, _) = check_meta(&engine);
    assert_eq!(engine.inflight_flows(), 1);
    let huge = {
        use flow_end::AttrValue::Text;
        let mut end = end_of(&a, "200", "1e308");
        end.set("authz_duration", Text("-1e308".into()));
        end
    };
    assert_eq!(
        engine.end_flow(&huge, &flow_end::NoExtras),
        EndOutcome::Invalid
    );
    assert_eq!(engine.inflight_flows(), 0, "its slot is back");
    let text = engine.metrics().encode_text();
    assert!(!text.contains("flux_meter_sum{"), "{text}");
}

#[test]
fn removed_flux_meters_leave_the_registry() {
    let (engine, _) = engine(&[METERED]);
    let (a, _) = check_meta(&engine);
    let (b, _) = check_meta(&engine);
    engine.end_flow(&end_of(&a, "200", "5"), &flow_end::NoExtras);
    assert!(engine.metrics().encode_text().contains("flux_meter_count{"));
    engine.install(&policies(&["name: m\n"])).expect("installs");
    let text = engine.metrics().encode_text();
    assert!(!text.contains("flux_meter_count{"), "{text}");
    // Logs of flows checked under the old policy are still read, and ignored.
    assert_eq!(
        engine.end_flow(&end_of(&b, "200", "5"), &flow_end::NoExtras),
        EndOutcome::Matched
    );
}

#[test]
fn a_selector_for_another_control_point_never_admits_this_ones_flows() {
    let doc = r#"
name: xcp
rate_limiters:
  - name: checkout
    selectors:
      - control_point: ingress
        label_matcher: {match_labels: {http.path: /checkout}}
      - control_point: egress
    bucket_capacity: 0
    fill_amount: 0
    interval: 1s
"#;
    let (engine, _) = engine(&[doc]);
    assert_eq!(check(&engine, &[("http.path", "/home")]).0, None);
    assert!(check(&engine, &[("http.path", "/checkout")]).0.is_some());
    let source = MapLabels::from_pairs([("http.path", "/home")]);
    let egress = FlowRequest {
        control_point: "egress",
        service: "shop",
        labels: &source,
    };
    assert!(
        !engine.decide(egress, |d| d.accepted()),
        "egress is limited whatever the path"
    );
}

#[test]
fn a_record_naming_a_meter_many_times_is_observed_once() {
    let (engine, _) = engine(&[METERED]);
    let (meta, _) = check_meta(&engine);
    let (unsigned, _) = meta.rsplit_once(";t=").expect("signed");
    let repeated = engine
        .flow_key()
        .sign(&format!("{unsigned},m/latency,m/latency,m/latency"));
    engine.end_flow(&end_of(&repeated, "200", "5"), &flow_end::NoExtras);
    let text = engine.metrics().encode_text();
    assert!(text.contains(r#"flux_meter_count{decision_type="accepted",flow_status="OK",flux_meter_name="latency",http_status_code="200",policy_name="m"} 1"#), "{text}");
}

const QUEUED: &str = r#"
name: q
concurrency_schedulers:
  - name: one-at-a-time
    selectors: [{control_point: ingress}]
    max_concurrency: 1
    scheduler:
      workloads:
        - name: vip
          label_matcher: {match_labels: {tier: vip}}
          parameters: {priority: 10, queue_timeout: 5s}
      default_workload_parameters: {priority: 1, queue_timeout: 300ms}
      max_queued_requests: 2
"#;

/// Decides a flow on the real clock; returns its metadata, whether it was
/// accepted at once, and what it must wait in.
fn decide_real(
    engine: &Engine,
    labels: &[(&str, &str)],
) -> (String, bool, Option<Box<waiting::Waiting>>) {
    let source = MapLabels::from_pairs(labels.iter().copied());
    engine.decide(ingress(&source), |mut d| {
        let waiting = d.waiting.take();
        (d.metadata().unwrap_or_default(), d.accepted(), waiting)
    })
}

/// Requests waiting in every scheduler now.
fn queued(engine: &Engine) -> usize {
    let plan = engine.plan();
    plan.policies
        .iter()
        .flat_map(|p| p.schedulers())
        .map(|s| s.queued())
        .sum()
}

/// Lets the spawned tasks run (tests run on one thread) until `done`
/// holds. Bounded in steps, not in time: on tokio's paused clock nothing
/// times out meanwhile.
async fn settle(done: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the tasks never reached the state the test waits for");
}

#[tokio::test(start_paused = true)]
async fn a_queued_flow_is_admitted_when_the_access_log_returns_a_slot() {
    let (engine, _time) = paused_engine(&[QUEUED]);
    let (first, accepted, waits) = decide_real(&engine, &[]);
    assert!(
        accepted && waits.is_none(),
        "the first takes the only slot at once"
    );
    let (_, _, waits) = decide_real(&engine, &[("tier", "vip")]);
    let waiting = waits.expect("the second must wait");
    let e = engine.clone();
    let admitted = tokio::spawn(async move { waiting.run(&e, None).await });
    settle(|| queued(&engine) == 1).await;
    assert!(!admitted.is_finished(), "still waiting for the slot");
    engine.end_flow(&end_of(&first, "200", "10"), &flow_end::NoExtras);
    settle(|| admitted.is_finished()).await;
    assert_eq!(admitted.await.expect("task"), Ok(()));
    assert_eq!(
        engine.inflight_flows(),
        1,
        "its slot is held until its own log"
    );
}

#[tokio::test(start_paused = true)]
async fn queued_flows_time_out_with_retry_after_and_a_full_queue_refuses_at_once() {
    let (engine, time) = paused_engine(&[QUEUED]);
    let (_holder, _, _) = decide_real(&engine, &[]);
    let (_, _, a) = decide_real(&engine, &[]);
    let (_, _, b) = decide_real(&engine, &[]);
    let (a, b) = (a.expect("queues"), b.expect("queues"));
    let (ea, eb) = (engine.clone(), engine.clone());
    let a = tokio::spawn(async move { a.run(&ea, None).await });
    let mut b = tokio::spawn(async move { b.run(&eb, None).await });
    settle(|| queued(&engine) == 2).await;
    // Two wait: the queue (max 2) is full, a third is refused at once.
    let (_, _, c) = decide_real(&engine, &[]);
    let refusal = c
        .expect("goes to wait")
        .run(&engine, None)
        .await
        .expect_err("queue full");
    assert_eq!(refusal.reason, RejectReason::QueueFull);
    assert_eq!(refusal.status, 503);
    assert_eq!(
        refusal.metadata, None,
        "no flux meter: nothing reads a refused flow's log"
    );
    let (at, b) = run_until_done(&engine, &time, &mut b).await;
    assert!(at >= 300 * 1_000_000, "refused at {at}, before its 300 ms");
    for refusal in [a.await.expect("task"), b] {
        let refusal = refusal.expect_err("times out after 300 ms");
        assert_eq!(refusal.reason, RejectReason::QueueTimeout);
        assert!(refusal.retry_after.is_some());
    }
}

/// An engine on the mock clock, for tests on tokio's paused time: the two
/// clocks move together in [`run_until_done`].
fn paused_engine(docs: &[&str]) -> (Arc<Engine>, MockTime) {
    let (engine, time) = engine(docs);
    (Arc::new(engine), time)
}

/// Moves tokio's paused time and the engine's mock clock forward together,
/// a millisecond at a time, until `task` ends; returns the engine time
/// then. The pump's timers fire at the engine instant they were set for,
/// or one tick later: tokio's timer rounds a sleep up to its next
/// millisecond. (The queue itself honours deadlines to the nanosecond:
/// `wfq`'s tests.)
const TIMER_TICK: Nanos = 1_000_000;

async fn run_until_done<T>(
    engine: &Engine,
    time: &MockTime,
    task: &mut tokio::task::JoinHandle<T>,
) -> (Nanos, T) {
    for _ in 0..60_000 {
        if task.is_finished() {
            break;
        }
        tokio::time::advance(Duration::from_millis(1)).await;
        time.advance(Duration::from_millis(1));
        // Let the pump and the waiter run at this instant.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    let at = engine.clock().now();
    (at, task.await.expect("task"))
}

/// When a flow of `tier` that waits behind [`QUEUED`]'s only slot is
/// refused, with `grpc_timeout` from Envoy.
async fn refused_at(tier: &str, grpc_timeout: Duration) -> Nanos {
    let (engine, time) = paused_engine(&[QUEUED]);
    let (_holder, _, _) = decide_real(&engine, &[]);
    let (_, _, waits) = decide_real(&engine, &[("tier", tier)]);
    let waiting = waits.expect("queues");
    let e = engine.clone();
    let mut task = tokio::spawn(async move { waiting.run(&e, Some(grpc_timeout)).await });
    let (at, outcome) = run_until_done(&engine, &time, &mut task).await;
    assert_eq!(
        outcome.expect_err("refused").reason,
        RejectReason::QueueTimeout
    );
    at
}

#[tokio::test(start_paused = true)]
async fn envoys_deadline_minus_the_margin_bounds_the_wait_exactly() {
    // vip's own queue_timeout is 5 s; Envoy gives 100 ms, minus the 10 ms
    // margin: the refusal comes at 90 ms.
    let at = refused_at("vip", Duration::from_millis(100)).await;
    let deadline = 90 * 1_000_000;
    assert!(
        (deadline..=deadline + TIMER_TICK).contains(&at),
        "refused at {at}, not at Envoy's deadline − margin"
    );
}

#[tokio::test(start_paused = true)]
async fn the_queue_timeout_bounds_the_wait_exactly_when_envoy_allows_longer() {
    let at = refused_at("free", Duration::from_secs(2)).await;
    let deadline = 300 * 1_000_000;
    assert!(
        (deadline..=deadline + TIMER_TICK).contains(&at),
        "refused at {at}, not at the workload's 300 ms queue_timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn a_later_request_with_an_earlier_deadline_is_refused_on_time() {
    let (engine, time) = paused_engine(&[QUEUED]);
    let (_holder, _, _) = decide_real(&engine, &[]);
    // The first waits up to 5 s: the pump sleeps as long as it may.
    let (_, _, vip) = decide_real(&engine, &[("tier", "vip")]);
    let vip = vip.expect("queues");
    let e = engine.clone();
    let _vip = tokio::spawn(async move { vip.run(&e, None).await });
    for _ in 0..10 {
        tokio::time::advance(Duration::from_millis(1)).await;
        time.advance(Duration::from_millis(1));
        tokio::task::yield_now().await;
    }
    // At 10 ms one arrives that Envoy gives 40 ms: it must go at 40 ms,
    // though the pump had planned to look again only later.
    let (_, _, hurried) = decide_real(&engine, &[("tier", "vip")]);
    let hurried = hurried.expect("queues");
    let e = engine.clone();
    let mut task =
        tokio::spawn(async move { hurried.run(&e, Some(Duration::from_millis(40))).await });
    let (at, outcome) = run_until_done(&engine, &time, &mut task).await;
    assert_eq!(
        outcome.expect_err("deadline").reason,
        RejectReason::QueueTimeout
    );
    // 10 ms + 40 ms − the 10 ms margin; without a wake-up the pump would
    // have looked only at 100 ms.
    let deadline = 40 * 1_000_000;
    assert!(
        (deadline..=deadline + TIMER_TICK).contains(&at),
        "refused at {at}"
    );
}

/// A concurrency scheduler in front of a load scheduler: flows that waited
/// for a slot reach the load scheduler late, and must get its verdict as
/// if they had not waited.
const CHAINED: &str = r#"
name: chain
concurrency_schedulers:
  - name: slots
    selectors: [{control_point: ingress}]
    max_concurrency: 1
    scheduler:
      default_workload_parameters: {queue_timeout: 5s}
load_schedulers:
  - name: load
    selectors: [{control_point: ingress}]
    rate_window: 1s
    dry_run: DRY
    scheduler:
      default_workload_parameters: {queue_timeout: 200ms}
"#;

/// Sends a flow through [`CHAINED`] while another holds the only slot,
/// returns the slot, and says how the waiting flow ended and when.
/// `warm`: traffic first, so that the load scheduler knows the incoming
/// rate.
async fn through_the_chain(
    warm: bool,
    dry_run: bool,
    multiplier: Option<f64>,
) -> (Nanos, Result<(), String>) {
    let doc = CHAINED.replace("DRY", if dry_run { "true" } else { "false" });
    let (engine, time) = paused_engine(&[&doc]);
    for _ in 0..if warm { 20 } else { 0 } {
        let (meta, accepted, _) = decide_real(&engine, &[]);
        assert!(accepted);
        engine.end_flow(&end_of(&meta, "200", "5"), &flow_end::NoExtras);
        tokio::time::advance(Duration::from_millis(100)).await;
        time.advance(Duration::from_millis(100));
    }
    if let Some(lm) = multiplier {
        let plan = engine.plan();
        let load = &plan.policies[0].load_schedulers[0];
        load.set_multiplier(lm, 60_000_000_000);
    }
    let (holder, accepted, _) = decide_real(&engine, &[]);
    assert!(accepted, "takes the slot");
    let (_, _, waits) = decide_real(&engine, &[]);
    let waiting = waits.expect("waits for the slot");
    let e = engine.clone();
    let mut task = tokio::spawn(async move {
        waiting
            .run(&e, None)
            .await
            .map_err(|r| format!("{:?}", r.reason))
    });
    for _ in 0..50 {
        tokio::time::advance(Duration::from_millis(1)).await;
        time.advance(Duration::from_millis(1));
        tokio::task::yield_now().await;
    }
    assert!(!task.is_finished(), "still waiting for the slot");
    engine.end_flow(&end_of(&holder, "200", "5"), &flow_end::NoExtras);
    run_until_done(&engine, &time, &mut task).await
}

#[tokio::test(start_paused = true)]
async fn a_flow_that_waited_for_a_slot_passes_a_load_scheduler_at_one() {
    for warm in [false, true] {
        let (at, outcome) = through_the_chain(warm, false, None).await;
        assert_eq!(outcome, Ok(()), "warm: {warm}");
        // (Warm-up and) 50 ms of waiting: admitted as soon as the slot
        // came back, not held to the load scheduler's timeout, even before
        // it knows the incoming rate.
        let waited = at - if warm { 2_000_000_000 } else { 0 };
        assert!(waited <= 52_000_000, "warm: {warm}, admitted at {at}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_flow_that_waited_for_a_slot_passes_a_dry_run_load_scheduler() {
    let (_, outcome) = through_the_chain(true, true, Some(0.0)).await;
    assert_eq!(outcome, Ok(()), "a dry run admits everything");
}

#[tokio::test(start_paused = true)]
async fn a_flow_that_waited_for_a_slot_is_paced_by_a_load_scheduler_at_zero() {
    let (_, outcome) = through_the_chain(true, false, Some(0.0)).await;
    assert_eq!(
        outcome,
        Err("QueueTimeout".to_owned()),
        "a multiplier of 0 admits nothing"
    );
}

#[test]
fn a_dry_run_load_scheduler_counts_what_it_would_reject_and_admits_it() {
    let doc = r#"
name: dry
load_schedulers:
  - name: load
    selectors: [{control_point: ingress}]
    rate_window: 1s
    dry_run: true
"#;
    let (engine, time) = engine(&[doc]);
    for _ in 0..50 {
        assert_eq!(check(&engine, &[]).0, None);
        time.advance(Duration::from_millis(20));
    }
    let plan = engine.plan();
    plan.policies[0].load_schedulers[0].set_multiplier(0.5, 60_000_000_000);
    let mut admitted = 0;
    for _ in 0..400 {
        let source = MapLabels::default();
        let (accepted, waits) = engine.decide(ingress(&source), |mut d| {
            (d.accepted(), d.waiting.take().is_some())
        });
        assert!(!waits, "a dry run never queues");
        admitted += usize::from(accepted);
        time.advance(Duration::from_millis(5));
    }
    assert_eq!(admitted, 400, "everything admitted");
    let text = engine.metrics().encode_text();
    let series = |decision: &str| -> f64 {
        let prefix = format!(
            r#"workload_requests_total{{component="load",decision_type="{decision}",policy_name="dry",workload_index="default"}} "#
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {decision} series in {text}"))
    };
    // At twice the rate of the window and a multiplier of 0.5, a real
    // scheduler would have refused most of them: the dry run says so.
    assert!(series("rejected") > 100.0, "{text}");
    assert!(series("accepted") > 50.0, "{text}");
}

#[test]
fn latency_based_tokens_make_slow_workloads_cost_more() {
    let doc = r#"
name: lat
load_schedulers:
  - name: load
    selectors: [{control_point: ingress}]
    workload_latency_based_tokens: true
    scheduler:
      workloads:
        - name: slow
          label_matcher: {match_labels: {kind: report}}
        - name: fast
          label_matcher: {match_labels: {kind: lookup}}
"#;
    let (engine, _time) = engine(&[doc]);
    let source = |kind: &'static str| MapLabels::from_pairs([("kind", kind)]);
    for (kind, ms) in [("report", "250"), ("lookup", "10")] {
        for _ in 0..30 {
            let labels = source(kind);
            let meta = engine.decide(ingress(&labels), |d| d.metadata().expect("scheduled"));
            let mut end = end_of(&meta, "200", ms);
            end.set("authz_duration", flow_end::AttrValue::Text("0".into()));
            engine.end_flow(&end, &flow_end::NoExtras);
        }
    }
    let plan = engine.plan();
    let load = &plan.policies[0].load_schedulers[0];
    let slow = load.estimated_tokens(0).expect("learnt");
    let fast = load.estimated_tokens(1).expect("learnt");
    assert!((slow - 250.0).abs() < 1.0, "{slow}");
    assert!((fast - 10.0).abs() < 1.0, "{fast}");
    assert_eq!(load.estimated_tokens(2), None, "the default saw nothing");
    // The next report flow counts 250 incoming tokens, a lookup 10.
    let before = engine.metrics().encode_text();
    let labels = source("report");
    engine.decide(ingress(&labels), |_| ());
    let after = engine.metrics().encode_text();
    let tokens = |text: &str| -> f64 {
        let prefix =
            r#"incoming_tokens_total{component="load",policy_name="lat",workload_index="0"} "#;
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        (tokens(&after) - tokens(&before) - slow).abs() < 1e-9,
        "{after}"
    );
}

#[tokio::test]
async fn an_abandoned_wait_gives_back_what_the_flow_held() {
    let doc = r#"
name: hold
rate_limiters:
  - name: budget
    selectors: [{control_point: ingress}]
    bucket_capacity: 2
    fill_amount: 0
    interval: 1s
concurrency_schedulers:
  - name: one
    selectors: [{control_point: ingress}]
    max_concurrency: 1
"#;
    let (engine, _time) = paused_engine(&[doc]);
    let (_holder, accepted, _) = decide_real(&engine, &[]);
    assert!(accepted);
    let (_, _, waits) = decide_real(&engine, &[]);
    // Envoy gives up: the Check's future, and the waiting flow, are dropped.
    let waiting = waits.expect("queues");
    let e = engine.clone();
    let task = tokio::spawn(async move { waiting.run(&e, None).await });
    settle(|| queued(&engine) == 1).await;
    task.abort();
    let _ = task.await;
    // Its rate-limiter token came back: the budget of 2 still has 1.
    let plan = engine.plan();
    let budget = &plan.policies[0].rate_limiters[0];
    let source = MapLabels::default();
    let labels = FlowLabels::new(&source);
    let now = engine.clock().now();
    use components::rate_limiter::Acquired;
    let Acquired::Taken(Some(token)) = budget.acquire(&labels, now) else {
        panic!("a token is left");
    };
    token.spend();
    assert!(matches!(budget.acquire(&labels, now), Acquired::Limited(_)));
    // Nor is its place in the queue kept: the holder's slot is the only
    // one taken.
    let plan = engine.plan();
    let schedulers::AnyScheduler::Concurrency(one) = &plan.schedulers["hold/one"] else {
        panic!("a concurrency scheduler");
    };
    assert_eq!(one.in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn priorities_order_admission_under_saturation() {
    let doc = r#"
name: prio
concurrency_schedulers:
  - name: one
    selectors: [{control_point: ingress}]
    max_concurrency: 1
    scheduler:
      workloads:
        - label_matcher: {match_labels: {tier: gold}}
          parameters: {priority: 100, queue_timeout: 10s}
      default_workload_parameters: {priority: 1, queue_timeout: 10s}
"#;
    let (engine, _time) = paused_engine(&[doc]);
    let (mut holder, _, _) = decide_real(&engine, &[]);
    // Two free-tier flows queue first, then a gold one.
    let mut waiters = Vec::new();
    for (n, tier) in ["free", "free", "gold"].into_iter().enumerate() {
        let (_, _, w) = decide_real(&engine, &[("tier", tier)]);
        let w = w.expect("queues");
        let e = engine.clone();
        waiters.push((
            tier,
            Some(tokio::spawn(async move { w.run(&e, None).await })),
        ));
        settle(|| queued(&engine) == n + 1).await;
    }
    // Release the slot: the gold flow goes next despite arriving last.
    let mut order = Vec::new();
    for round in 1..=3 {
        engine.end_flow(&end_of(&holder, "200", "1"), &flow_end::NoExtras);
        let finished = || {
            waiters
                .iter()
                .filter(|(_, t)| t.as_ref().is_none_or(|t| t.is_finished()))
                .count()
        };
        settle(|| finished() == round).await;
        let mut next = None;
        for (tier, task) in &mut waiters {
            if task.as_ref().is_some_and(|t| t.is_finished()) {
                let r = task.take().expect("finished").await.expect("task");
                assert_eq!(r, Ok(()));
                next = Some(*tier);
            }
        }
        let tier = next.expect("one admitted per returned slot");
        order.push(tier);
        // The admitted flow now holds the slot: end it with a fresh id so
        // the next one goes (its real id is internal to the run).
        holder = check_meta_of_holder(&engine);
    }
    assert_eq!(order, ["gold", "free", "free"]);
}

/// The metadata of whichever flow holds the slot now: the in-flight table
/// knows its id; end it through the engine.
fn check_meta_of_holder(engine: &Engine) -> String {
    let id = engine.any_inflight_flow().expect("a flow holds the slot");
    engine
        .flow_key()
        .sign(&format!("v=1;id={id:016x};d=accepted"))
}

#[tokio::test(start_paused = true)]
async fn quota_schedulers_queue_the_excess_per_label_value() {
    let doc = r#"
name: quota
quota_schedulers:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 1
    fill_amount: 20
    interval: 1s
    limit_by_label_key: user
    scheduler:
      default_workload_parameters: {queue_timeout: 2s}
"#;
    let (engine, time) = paused_engine(&[doc]);
    let (_, a1, _) = decide_real(&engine, &[("user", "a")]);
    let (_, b1, _) = decide_real(&engine, &[("user", "b")]);
    assert!(a1 && b1, "each user's bucket starts full");
    let (_, _, a2) = decide_real(&engine, &[("user", "a")]);
    let (_, _, a3) = decide_real(&engine, &[("user", "a")]);
    let (a2, a3) = (a2.expect("a waits"), a3.expect("a waits"));
    let e = engine.clone();
    let mut both = tokio::spawn(async move { tokio::join!(a2.run(&e, None), a3.run(&e, None)) });
    let (at, (r2, r3)) = run_until_done(&engine, &time, &mut both).await;
    assert_eq!(
        (r2, r3),
        (Ok(()), Ok(())),
        "admitted as tokens arrive, 20 per second"
    );
    // Both waited for a token of their own: the second arrives at 100 ms.
    assert!(at >= 100 * 1_000_000, "admitted at {at}");
    let (_, no_label, waits) = decide_real(&engine, &[]);
    assert!(
        no_label && waits.is_none(),
        "a flow without the label passes"
    );
    // A request larger than the bucket can never fit: refused at once.
    let big = r#"
name: big
quota_schedulers:
  - name: small
    selectors: [{control_point: ingress}]
    bucket_capacity: 2
    fill_amount: 1
    interval: 1s
    scheduler:
      tokens_label_key: cost
"#;
    let (big, _) = self::engine(&[big]);
    let source = MapLabels::from_pairs([("cost", "3")]);
    let rejection = big.decide(ingress(&source), |d| {
        d.rejection.map(|r| (r.reason, r.retry_after))
    });
    assert_eq!(rejection, Some((RejectReason::NoTokens, None)));
}

#[test]
fn controller_decisions_hold_until_they_lapse_then_the_policy_is_back() {
    use control::{Action, Applied, ControlDecision};
    let doc = r#"
name: ctl
samplers:
  - name: gate
    selectors: [{control_point: ingress}]
    accept_percentage: 0
rate_limiters:
  - name: bucket
    selectors: [{control_point: ingress, label_matcher: {match_labels: {rl: "yes"}}}]
    bucket_capacity: 1
    fill_amount: 0
    interval: 1s
"#;
    let (engine, time) = engine(&[doc]);
    let hash = engine.plan().policies[0].hash;
    let decision = |action, policy_hash| ControlDecision {
        policy: "ctl",
        policy_hash,
        valid_for: Duration::from_secs(5),
        action,
    };
    let open = Action::AcceptPercentage {
        component: "gate",
        value: 100.0,
    };
    assert_eq!(
        engine.apply(&decision(open.clone(), hash ^ 1)),
        Applied::OtherVersion
    );
    assert_eq!(
        engine.apply(&decision(
            Action::AcceptPercentage {
                component: "nope",
                value: 1.0
            },
            hash
        )),
        Applied::UnknownComponent
    );
    assert_eq!(
        engine.apply(&decision(open.clone(), hash)),
        Applied::Applied
    );
    assert_eq!(
        check(&engine, &[]).0,
        None,
        "the controller opened the gate"
    );
    let bigger = Action::RateLimit {
        component: "bucket",
        bucket_capacity: Some(3.0),
        fill_amount: None,
    };
    assert_eq!(engine.apply(&decision(bigger, hash)), Applied::Applied);
    time.advance(Duration::from_millis(4_999));
    engine.sweep();
    assert_eq!(check(&engine, &[]).0, None, "still open");
    let text = engine.metrics().encode_text();
    assert!(
        text.contains(r#"controller_decision_active{component="gate",policy_name="ctl"} 1"#),
        "{text}"
    );
    time.advance(Duration::from_millis(1));
    engine.sweep();
    assert_eq!(
        check(&engine, &[]).0.map(|r| r.1),
        Some(403),
        "back to the policy's 0%"
    );
    let plan = engine.plan();
    assert_eq!(plan.policies[0].rate_limiters[0].params().capacity, 1.0);
    let text = engine.metrics().encode_text();
    assert!(
        text.contains(r#"controller_decision_active{component="gate",policy_name="ctl"} 0"#),
        "{text}"
    );
    assert_eq!(
        engine.apply(&ControlDecision {
            valid_for: Duration::ZERO,
            ..decision(open, hash)
        }),
        Applied::Lapsed
    );
}

#[test]
fn pass_through_sessions_pass_a_sampler_the_controller_closed() {
    use control::{Action, Applied, ControlDecision};
    let doc = r#"
name: beta
samplers:
  - name: rollout
    selectors: [{control_point: ingress}]
    accept_percentage: 100
    session_label_key: user
    pass_through_label_values: [qa-1, "42"]
"#;
    let (engine, time) = engine(&[doc]);
    let hash = engine.plan().policies[0].hash;
    let rejected = |user: Option<&str>| {
        let labels: Vec<(&str, &str)> = user.map(|u| ("user", u)).into_iter().collect();
        check(&engine, &labels).0.map(|r| (r.0, r.1))
    };
    let closed = Some(("beta/rollout".to_owned(), 403));
    assert_eq!(rejected(Some("bob")), None, "the policy's 100%");
    assert_eq!(
        engine.apply(&ControlDecision {
            policy: "beta",
            policy_hash: hash,
            valid_for: Duration::from_secs(5),
            action: Action::AcceptPercentage {
                component: "rollout",
                value: 0.0,
            },
        }),
        Applied::Applied
    );
    for _ in 0..100 {
        assert_eq!(rejected(Some("qa-1")), None, "listed");
        assert_eq!(rejected(Some("42")), None, "a number, read as its text");
        assert_eq!(rejected(Some("bob")), closed, "not listed");
        assert_eq!(rejected(None), closed, "no session label");
    }
    time.advance(Duration::from_secs(5));
    engine.sweep();
    assert_eq!(
        rejected(Some("bob")),
        None,
        "lapsed: the policy's 100% again"
    );
}

#[test]
fn out_of_range_controller_decisions_are_refused_and_never_applied() {
    use control::{Action, Applied, ControlDecision};
    let doc = r#"
name: ctl
samplers:
  - name: gate
    selectors: [{control_point: ingress}]
    accept_percentage: 100
rate_limiters:
  - name: bucket
    selectors: [{control_point: ingress}]
    bucket_capacity: 10
    fill_amount: 10
    interval: 1s
load_schedulers:
  - name: protect
    selectors: [{control_point: ingress}]
"#;
    let (engine, time) = engine(&[doc]);
    let hash = engine.plan().policies[0].hash;
    let decision = |action| ControlDecision {
        policy: "ctl",
        policy_hash: hash,
        valid_for: Duration::from_secs(5),
        action,
    };
    let multiplier = |value| Action::LoadMultiplier {
        component: "protect",
        value,
    };
    let bucket = |capacity, fill| Action::RateLimit {
        component: "bucket",
        bucket_capacity: capacity,
        fill_amount: fill,
    };
    let share = |value| Action::AcceptPercentage {
        component: "gate",
        value,
    };
    for action in [
        multiplier(f64::NAN),
        multiplier(-0.1),
        multiplier(1.5),
        bucket(Some(-1.0), None),
        bucket(None, Some(f64::INFINITY)),
        bucket(Some(f64::NAN), Some(1.0)),
        share(101.0),
        share(f64::NAN),
        share(-1.0),
    ] {
        assert!(
            matches!(engine.apply(&decision(action.clone())), Applied::Invalid(_)),
            "{action:?}"
        );
    }
    let text = engine.metrics().encode_text();
    assert!(
        !text.contains("controller_decision_active{component=\"protect\",policy_name=\"ctl\"} 1"),
        "{text}"
    );
    for _ in 0..5 {
        assert_eq!(check(&engine, &[]).0, None, "nothing was applied");
    }
    // In range, the same kinds apply. One asking to hold for ever (what
    // i64::MAX as valid_until arrives as) holds for the sidecar's bound.
    assert_eq!(engine.apply(&decision(multiplier(0.5))), Applied::Applied);
    let forever = ControlDecision {
        valid_for: Duration::from_secs(u64::MAX / 4),
        ..decision(share(0.0))
    };
    assert_eq!(engine.apply(&forever), Applied::Applied);
    assert_eq!(check(&engine, &[]).0.map(|r| r.1), Some(403));
    time.advance(EngineOptions::default().max_decision_validity);
    engine.sweep();
    assert_eq!(check(&engine, &[]).0, None, "lapsed at the bound");
}

/// A quota scheduler and a concurrency scheduler for the controller to
/// drive; nothing else in the policy, so a flow meets both.
const DRIVEN_SCHEDULERS: &str = r#"
name: drive
quota_schedulers:
  - name: quota
    selectors: [{control_point: ingress, label_matcher: {match_labels: {kind: quota}}}]
    bucket_capacity: 2
    fill_amount: 10
    interval: 1s
concurrency_schedulers:
  - name: slots
    selectors: [{control_point: ingress, label_matcher: {match_labels: {kind: slots}}}]
    max_concurrency: 3
    scheduler:
      default_workload_parameters: {queue_timeout: 10s}
      max_queued_requests: 1
"#;

/// The value of `series` (`name{labels}`, labels as the encoder orders
/// them) in `text`; a missing series fails the test.
fn series_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Whether a flow of `kind` is admitted without waiting.
fn admitted_at_once(engine: &Engine, kind: &str) -> bool {
    let (_, accepted, waits) = decide_real(engine, &[("kind", kind)]);
    accepted && waits.is_none()
}

/// A decision for policy `drive` as `engine` runs it, valid for 5 s.
fn drive(engine: &Engine, action: control::Action<'_>) -> control::Applied {
    engine.apply(&control::ControlDecision {
        policy: "drive",
        policy_hash: engine.plan().policies[0].hash,
        valid_for: Duration::from_secs(5),
        action,
    })
}

#[test]
fn a_driven_quota_scheduler_fills_at_the_controllers_rate_until_it_lapses() {
    let (engine, time) = engine(&[DRIVEN_SCHEDULERS]);
    let slower = control::Action::QuotaBucket {
        component: "quota",
        bucket_capacity: None,
        fill_amount: Some(1.0),
    };
    assert_eq!(drive(&engine, slower), control::Applied::Applied);
    let gauges = |engine: &Engine| {
        let text = engine.metrics().encode_text();
        let series = |name: &str| {
            series_value(
                &text,
                &format!(r#"{name}{{component="quota",policy_name="drive"}}"#),
            )
        };
        (
            series("token_bucket_fill_rate"),
            series("controller_decision_active"),
        )
    };
    assert!(admitted_at_once(&engine, "quota") && admitted_at_once(&engine, "quota"));
    assert!(!admitted_at_once(&engine, "quota"), "the bucket is empty");
    time.advance(Duration::from_millis(200));
    assert!(
        !admitted_at_once(&engine, "quota"),
        "the policy's 10 a second would have put 2 tokens back; the controller's 1 puts 0.2"
    );
    time.advance(Duration::from_millis(800));
    assert!(admitted_at_once(&engine, "quota"), "one token a second");
    assert!(!admitted_at_once(&engine, "quota"));
    engine.sweep();
    assert_eq!(
        gauges(&engine),
        (1.0, 1.0),
        "the gauges show the driven rate"
    );

    // A reload that leaves the scheduler unchanged keeps it, driven, and
    // the decision still lapses when it was due to.
    engine
        .install(&policies(&[&format!("{DRIVEN_SCHEDULERS}# edited\n")]))
        .expect("reloads");
    assert_eq!(
        engine.plan().policies[0].quota_schedulers[0]
            .params()
            .fill_amount,
        1.0
    );
    time.advance(Duration::from_millis(3_999));
    engine.sweep();
    assert_eq!(gauges(&engine), (1.0, 1.0), "still driven at 4.999 s");
    time.advance(Duration::from_millis(1));
    engine.sweep();
    assert_eq!(gauges(&engine), (10.0, 0.0), "back to the policy's");
    let params = engine.plan().policies[0].quota_schedulers[0].params();
    assert_eq!((params.capacity, params.fill_amount), (2.0, 10.0));
    // Refilled meanwhile; emptied, it has a token back in 100 ms at the
    // policy's rate.
    assert!(admitted_at_once(&engine, "quota") && admitted_at_once(&engine, "quota"));
    assert!(!admitted_at_once(&engine, "quota"));
    time.advance(Duration::from_millis(100));
    assert!(admitted_at_once(&engine, "quota"), "10 a second again");

    // A capacity alone keeps the fill amount, and a larger bucket holds
    // more: five flows at once after a second of refilling.
    let bigger = control::Action::QuotaBucket {
        component: "quota",
        bucket_capacity: Some(5.0),
        fill_amount: None,
    };
    assert_eq!(drive(&engine, bigger), control::Applied::Applied);
    time.advance(Duration::from_secs(1));
    for i in 0..5 {
        assert!(admitted_at_once(&engine, "quota"), "flow {i}");
    }
    assert!(!admitted_at_once(&engine, "quota"));
    let params = engine.plan().policies[0].quota_schedulers[0].params();
    assert_eq!((params.capacity, params.fill_amount), (5.0, 10.0));
}

#[tokio::test(start_paused = true)]
async fn a_driven_concurrency_scheduler_queues_at_the_controllers_limit_until_it_lapses() {
    let (engine, time) = paused_engine(&[DRIVEN_SCHEDULERS]);
    let lower = control::Action::SchedulerConcurrency {
        component: "slots",
        value: 1,
    };
    assert_eq!(drive(&engine, lower), control::Applied::Applied);
    assert_eq!(
        engine.plan().policies[0].concurrency_schedulers[0].max_concurrency(),
        1
    );
    assert!(admitted_at_once(&engine, "slots"), "the one slot");
    // The policy's 3 would admit the second at once; it waits.
    let (_, _, second) = decide_real(&engine, &[("kind", "slots")]);
    let second = second.expect("waits for a slot");
    let e = engine.clone();
    let second = tokio::spawn(async move { second.run(&e, None).await });
    settle(|| queued(&engine) == 1).await;
    // The queue (of one) is full: a third is refused at once.
    let (_, _, third) = decide_real(&engine, &[("kind", "slots")]);
    let refusal = third
        .expect("goes to wait")
        .run(&engine, None)
        .await
        .expect_err("queue full");
    assert_eq!(refusal.reason, RejectReason::QueueFull);
    assert!(!second.is_finished(), "still waiting");

    // At valid_until the policy's limit is back, and the waiting flow is
    // admitted with it: no slot came back, the limit went up.
    time.advance(Duration::from_millis(4_999));
    engine.sweep();
    tokio::task::yield_now().await;
    assert!(!second.is_finished(), "still driven at 4.999 s");
    time.advance(Duration::from_millis(1));
    engine.sweep();
    settle(|| second.is_finished()).await;
    assert_eq!(second.await.expect("task"), Ok(()));
    assert_eq!(engine.inflight_flows(), 2);
    assert_eq!(
        engine.plan().policies[0].concurrency_schedulers[0].max_concurrency(),
        3
    );
    let text = engine.metrics().encode_text();
    assert!(
        text.contains(r#"controller_decision_active{component="slots",policy_name="drive"} 0"#),
        "{text}"
    );

    // Raised by the controller, a limit admits the queue at once too.
    assert!(admitted_at_once(&engine, "slots"), "the third slot");
    let (_, _, fourth) = decide_real(&engine, &[("kind", "slots")]);
    let fourth = fourth.expect("waits: three in flight");
    let e = engine.clone();
    let fourth = tokio::spawn(async move { fourth.run(&e, None).await });
    settle(|| queued(&engine) == 1).await;
    let raise = control::Action::SchedulerConcurrency {
        component: "slots",
        value: 4,
    };
    assert_eq!(drive(&engine, raise), control::Applied::Applied);
    settle(|| fourth.is_finished()).await;
    assert_eq!(fourth.await.expect("task"), Ok(()));
}

#[test]
fn scheduler_decisions_out_of_range_or_for_another_kind_are_refused() {
    use control::{Action, Applied};
    let (engine, _time) = engine(&[DRIVEN_SCHEDULERS]);
    let bucket = |bucket_capacity, fill_amount| Action::QuotaBucket {
        component: "quota",
        bucket_capacity,
        fill_amount,
    };
    for action in [
        bucket(Some(-1.0), None),
        bucket(None, Some(-0.5)),
        bucket(Some(f64::NAN), Some(1.0)),
        bucket(Some(1.0), Some(f64::INFINITY)),
    ] {
        assert!(
            matches!(drive(&engine, action.clone()), Applied::Invalid(_)),
            "{action:?}"
        );
    }
    let params = engine.plan().policies[0].quota_schedulers[0].params();
    assert_eq!(
        (params.capacity, params.fill_amount),
        (2.0, 10.0),
        "untouched"
    );
    // Each action drives its own kind only: a limiter's action never
    // reaches a scheduler of that name, nor a quota bucket a concurrency
    // scheduler.
    for action in [
        Action::QuotaBucket {
            component: "slots",
            bucket_capacity: Some(1.0),
            fill_amount: None,
        },
        Action::SchedulerConcurrency {
            component: "quota",
            value: 1,
        },
        Action::MaxConcurrency {
            component: "slots",
            value: 1,
        },
        Action::RateLimit {
            component: "quota",
            bucket_capacity: Some(1.0),
            fill_amount: None,
        },
        Action::SchedulerConcurrency {
            component: "nope",
            value: 1,
        },
    ] {
        assert_eq!(
            drive(&engine, action.clone()),
            Applied::UnknownComponent,
            "{action:?}"
        );
    }
    let plan = engine.plan();
    assert_eq!(
        plan.policies[0].concurrency_schedulers[0].max_concurrency(),
        3
    );
    let text = engine.metrics().encode_text();
    for component in ["quota", "slots"] {
        assert!(
            text.contains(&format!(
                r#"controller_decision_active{{component="{component}",policy_name="drive"}} 0"#
            )),
            "{text}"
        );
    }
}

const ADAPTIVE: &str = r#"
name: adapt
concurrency_schedulers:
  - name: slots
    selectors: [{control_point: ingress}]
    max_concurrency: 8
    adaptive: {latency_setpoint_ms: 30, interval: 100ms}
"#;

#[test]
fn an_adaptive_concurrency_limit_is_cut_by_late_access_logs_and_rises_while_flows_wait() {
    let (engine, time) = engine(&[ADAPTIVE]);
    let slots = || engine.plan().policies[0].concurrency_schedulers[0].max_concurrency();
    let admit = || {
        let (meta, accepted, waits) = decide_real(&engine, &[]);
        (accepted && waits.is_none()).then_some(meta)
    };
    // Up to the policy's 8 at once.
    let first: Vec<String> = (0..8)
        .map(|i| admit().unwrap_or_else(|| panic!("flow {i}")))
        .collect();
    assert!(admit().is_none(), "the ninth waits");
    // 100 ms later four end, all above the 30 ms setpoint (60 ms of
    // upstream time): cut to half of the eight it had in flight (not of
    // the four left: the logs came in a batch).
    time.advance(Duration::from_millis(100));
    for meta in &first[..4] {
        engine.end_flow(&end_of(meta, "200", "61"), &flow_end::NoExtras);
    }
    assert_eq!(slots(), 4);
    let text = engine.metrics().encode_text();
    assert_eq!(
        series_value(
            &text,
            r#"concurrency_limit{component="slots",policy_name="adapt"}"#
        ),
        4.0
    );
    // The other four, fast, started before the cut: no evidence for it.
    for meta in &first[4..] {
        engine.end_flow(&end_of(meta, "200", "21"), &flow_end::NoExtras);
    }
    assert_eq!(slots(), 4);
    // Four at a time while a fifth waits, each on time: after 100 ms, one
    // more slot.
    for _ in 0..2 {
        time.advance(Duration::from_millis(60));
        let four: Vec<String> = (0..4).map(|_| admit().expect("a slot")).collect();
        assert!(admit().is_none(), "the fifth waits");
        time.advance(Duration::from_millis(30));
        for meta in &four {
            engine.end_flow(&end_of(meta, "200", "21"), &flow_end::NoExtras);
        }
    }
    assert_eq!(slots(), 5);
    assert!((0..5).all(|_| admit().is_some()), "five at once");
}

// Preview.

/// An engine on the mock clock whose previews also redact `x-api-key`.
fn previewing(docs: &[&str]) -> Arc<Engine> {
    let (clock, _time) = Clock::mock();
    let options = EngineOptions {
        preview_redact: vec!["X-Api-Key".into(), "http.request.header.x_token".into()],
        max_previews: 2,
        ..EngineOptions::default()
    };
    let engine = Engine::new(clock, Metrics::new(), options);
    engine.install(&policies(docs)).expect("installs");
    Arc::new(engine)
}

/// The samples a preview has received so far (it never waits).
fn received(preview: &mut preview::Preview) -> Vec<Arc<preview::Sample>> {
    let mut out = Vec::new();
    while let Some(Some(s)) = preview.next().now_or_never() {
        out.push(s);
    }
    out
}

trait NowOrNever: Future + Sized {
    /// The output if the future is ready at its first poll.
    fn now_or_never(self) -> Option<Self::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::pin!(self).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
impl<F: Future> NowOrNever for F {}

fn value<'a>(labels: &'a [preview::Label], name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.value.as_str())
}

#[test]
fn nobody_previewing_costs_one_load_and_samples_nothing() {
    let engine = previewing(&[USER_LIMIT]);
    assert!(!engine.previews().wanted());
    check(&engine, &[("http.request.header.user_id", "ann")]);
    let mut p = engine.previews().open("ingress", None, 1).expect("opens");
    assert!(engine.previews().wanted());
    assert!(
        received(&mut p).is_empty(),
        "flows before it are not sampled"
    );
    drop(p);
    assert!(
        !engine.previews().wanted(),
        "a closed preview wants nothing"
    );
}

#[test]
fn a_preview_shows_labels_matches_and_the_rejecting_component() {
    let engine = previewing(&[USER_LIMIT]);
    let mut p = engine
        .previews()
        .open("ingress", Some("shop"), 3)
        .expect("opens");
    let ann = [
        ("http.request.header.user_id", "ann"),
        ("http.request.header.authorization", "Bearer secret"),
        ("http.request.header.x_api_key", "k-123"),
        ("http.request.header.x_token", "t-456"),
        ("http.method", "GET"),
    ];
    for _ in 0..3 {
        check(&engine, &ann);
    }
    assert!(!engine.previews().wanted(), "three claimed, no more wanted");
    check(&engine, &ann);
    let samples = received(&mut p);
    assert_eq!(samples.len(), 3, "exactly the samples asked for");
    let first = &samples[0];
    assert_eq!(
        (&*first.control_point, &*first.service),
        ("ingress", "shop")
    );
    assert_eq!(value(&first.request, "http.method"), Some("GET"));
    assert_eq!(
        value(&first.request, "http.request.header.user_id"),
        Some("ann")
    );
    for secret in ["authorization", "x_api_key", "x_token"] {
        assert_eq!(
            value(&first.request, &format!("http.request.header.{secret}")),
            Some(preview::REDACTED),
            "{secret} never shows"
        );
    }
    assert_eq!(value(&first.classified, "user"), Some("ann"));
    let matched: Vec<(&str, &str)> = first
        .matched
        .iter()
        .map(|m| (m.kind, &*m.component))
        .collect();
    assert_eq!(
        matched,
        [
            ("classifier", "classifiers[0]"),
            ("rate_limiter", "per-user")
        ]
    );
    assert_eq!(first.outcome, preview::Outcome::Accepted { waited: false });
    // The bucket holds two: the third is rejected, and says by whom.
    assert_eq!(
        samples[2].outcome,
        preview::Outcome::Rejected {
            policy: "users".into(),
            component: "per-user".into(),
            reason: "rate_limited",
            status: 429,
        }
    );
    assert_eq!(p.next().now_or_never(), Some(None), "complete");
}

#[test]
fn a_preview_sees_only_its_control_point_and_service() {
    let engine = previewing(&[USER_LIMIT]);
    let mut p = engine
        .previews()
        .open("ingress", Some("cart"), 1)
        .expect("opens");
    check(&engine, &[]); // service shop
    let egress = MapLabels::default();
    engine.decide(
        FlowRequest {
            control_point: "egress",
            service: "cart",
            labels: &egress,
        },
        |_| (),
    );
    assert!(received(&mut p).is_empty());
    engine.decide(
        FlowRequest {
            control_point: "ingress",
            service: "cart",
            labels: &egress,
        },
        |_| (),
    );
    assert_eq!(received(&mut p).len(), 1);
}

#[test]
fn previews_are_capped_and_bounded() {
    let engine = previewing(&[USER_LIMIT]);
    let previews = engine.previews();
    let a = previews.open("ingress", None, 1).expect("first");
    let _b = previews.open("ingress", None, 1).expect("second");
    assert_eq!(
        previews.open("ingress", None, 1).err(),
        Some(preview::OpenError::TooMany(2))
    );
    drop(a);
    assert!(previews.open("ingress", None, 1).is_ok(), "room again");
    for bad in [0, preview::MAX_SAMPLES + 1] {
        assert_eq!(
            previews.open("ingress", None, bad).err(),
            Some(preview::OpenError::Samples)
        );
    }
}

#[test]
fn long_values_are_cut_on_a_character_boundary() {
    let engine = previewing(&[]);
    let mut p = engine.previews().open("ingress", None, 1).expect("opens");
    let long = "é".repeat(400); // 800 bytes
    check(&engine, &[("http.request.header.x_long", &long)]);
    let sample = received(&mut p).pop().expect("sampled");
    let shown = value(&sample.request, "http.request.header.x_long").expect("shown");
    assert!(
        shown.len() < 600 && shown.ends_with("… (800 bytes)"),
        "{shown}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiting_flow_is_delivered_when_its_wait_ends() {
    let engine = previewing(&[QUEUED]);
    let (holder, accepted, _) = decide_real(&engine, &[]);
    assert!(accepted);
    let mut p = engine.previews().open("ingress", None, 2).expect("opens");
    let (_, _, waits) = decide_real(&engine, &[("tier", "vip")]);
    let waiting = waits.expect("waits for the slot");
    assert!(received(&mut p).is_empty(), "not before its fate is known");
    let e = engine.clone();
    let task = tokio::spawn(async move { waiting.run(&e, None).await });
    settle(|| queued(&engine) == 1).await;
    engine.end_flow(&end_of(&holder, "200", "10"), &flow_end::NoExtras);
    settle(|| task.is_finished()).await;
    let samples = received(&mut p);
    assert_eq!(
        samples[0].outcome,
        preview::Outcome::Accepted { waited: true }
    );
    assert!(
        samples[0]
            .matched
            .iter()
            .any(|m| m.kind == "concurrency_scheduler" && m.component == "one-at-a-time")
    );
    // The next waits behind the admitted one, and Envoy gives up on it.
    let (_, _, waits) = decide_real(&engine, &[]);
    let waiting = waits.expect("waits");
    let e = engine.clone();
    let task = tokio::spawn(async move { waiting.run(&e, None).await });
    settle(|| queued(&engine) == 1).await;
    task.abort();
    let _ = task.await;
    assert_eq!(received(&mut p)[0].outcome, preview::Outcome::Abandoned);
}

// Status.

#[test]
fn status_shows_every_component_with_what_is_in_force() {
    let doc = r#"
name: st
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user: {from: request.http.headers.user-id}
samplers:
  - name: gate
    selectors: [{control_point: ingress}]
    accept_percentage: 100
rate_limiters:
  - name: all
    selectors: [{control_point: ingress}]
    bucket_capacity: 10
    fill_amount: 1
    interval: 1s
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 2
    fill_amount: 2
    interval: 1s
    limit_by_label_key: user
concurrency_schedulers:
  - name: slots
    selectors: [{control_point: ingress}]
    max_concurrency: 5
load_schedulers:
  - name: load
    selectors: [{control_point: ingress}]
"#;
    let (engine, time) = engine(&[doc]);
    for user in ["ann", "bob", "ann"] {
        check(&engine, &[("http.request.header.user_id", user)]);
    }
    let find = |status: &status::EngineStatus, name: &str| {
        status.policies[0]
            .components
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {status:?}"))
    };
    let s = engine.status();
    assert_eq!(s.policies.len(), 1);
    assert_eq!(s.policies[0].name, "st");
    assert_eq!(
        s.policies[0].hash,
        format!("{:016x}", engine.plan().policies[0].hash)
    );
    let kinds: Vec<&str> = s.policies[0].components.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [
            "classifier",
            "sampler",
            "rate_limiter",
            "rate_limiter",
            "concurrency_scheduler",
            "load_scheduler"
        ]
    );
    let all = find(&s, "all");
    assert_eq!(all.bucket_capacity, Some(10.0));
    assert_eq!(all.fill_amount, Some(1.0));
    assert_eq!(all.interval_seconds, Some(1.0));
    assert_eq!(all.bucket_level, Some(7.0), "three flows took three");
    assert_eq!(all.controller, None);
    let per_user = find(&s, "per-user");
    assert_eq!(per_user.label_key.as_deref(), Some("user"));
    assert_eq!(per_user.label_values, Some(2));
    assert_eq!(per_user.bucket_level, None, "one per user, not shown");
    let slots = find(&s, "slots");
    assert_eq!(
        (slots.max_concurrency, slots.in_flight, slots.queued),
        (Some(5), Some(3), Some(0))
    );
    assert_eq!(s.inflight_flows, 3);
    assert_eq!(find(&s, "load").load_multiplier, Some(1.0));
    assert_eq!(find(&s, "gate").accept_percentage, Some(100.0));

    // Half a second refills half a token; a controller drives two for 5 s.
    use crate::control::{Action, Applied, ControlDecision};
    time.advance(Duration::from_millis(500));
    let hash = engine.plan().policies[0].hash;
    for action in [
        Action::LoadMultiplier {
            component: "load",
            value: 0.5,
        },
        Action::RateLimit {
            component: "all",
            bucket_capacity: Some(20.0),
            fill_amount: None,
        },
    ] {
        let applied = engine.apply(&ControlDecision {
            policy: "st",
            policy_hash: hash,
            valid_for: Duration::from_secs(5),
            action,
        });
        assert_eq!(applied, Applied::Applied);
    }
    let s = engine.status();
    let all = find(&s, "all");
    assert_eq!(all.bucket_capacity, Some(20.0));
    assert_eq!(all.bucket_level, Some(7.5));
    let driven = all.controller.expect("driven");
    assert_eq!(driven.valid_for_seconds, 5.0);
    let load = find(&s, "load");
    assert_eq!(load.load_multiplier, Some(0.5));
    assert_eq!(load.controller.map(|d| d.valid_for_seconds), Some(5.0));
    // When the decisions lapse, the policy's values are back.
    time.advance(Duration::from_secs(5));
    engine.sweep();
    let s = engine.status();
    assert_eq!(find(&s, "all").controller, None);
    assert_eq!(find(&s, "all").bucket_capacity, Some(10.0));
    assert_eq!(find(&s, "load").controller, None);
}

#[test]
fn sluice_flow_goes_to_envoy_only_when_the_access_log_will_be_read() {
    let meta = |doc: &str, labels: &[(&str, &str)]| {
        let (engine, _time) = engine(&[doc]);
        let source = MapLabels::from_pairs(labels.iter().copied());
        engine.decide(ingress(&source), |d| (d.accepted(), d.metadata()))
    };
    // A rate limiter alone: nothing reads the log, accepted or not.
    let limited = r#"
name: rl
rate_limiters:
  - name: one
    selectors: [{control_point: ingress}]
    bucket_capacity: 1
    fill_amount: 0
    interval: 1s
"#;
    let (engine, _time) = engine(&[limited]);
    let source = MapLabels::default();
    for accepted in [true, false] {
        let (a, m) = engine.decide(ingress(&source), |d| (d.accepted(), d.metadata()));
        assert_eq!((a, m), (accepted, None));
    }
    // A flux meter observes accepted and rejected flows alike.
    let metered = r#"
name: fm
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
samplers:
  - name: none
    selectors: [{control_point: ingress, label_matcher: {match_labels: {beta: "1"}}}]
    accept_percentage: 0
"#;
    let (accepted, m) = meta(metered, &[]);
    assert!(accepted && m.is_some_and(|m| m.contains("fm/latency")));
    let (accepted, m) = meta(metered, &[("beta", "1")]);
    assert!(!accepted && m.is_some_and(|m| m.contains(";d=rejected;by=fm/none")));
    // A concurrency limiter's slot is held until the log.
    let slots = r#"
name: cl
concurrency_limiters:
  - name: ten
    selectors: [{control_point: ingress}]
    max_concurrency: 10
"#;
    assert!(meta(slots, &[]).1.is_some());
    // A scheduler learns its workloads' latency from admitted flows.
    let scheduled = r#"
name: ls
load_schedulers:
  - name: load
    selectors: [{control_point: ingress}]
"#;
    assert!(meta(scheduled, &[]).1.is_some());
}

#[test]
fn a_sample_keeps_a_bounded_number_of_labels() {
    let engine = previewing(&[]);
    let mut p = engine.previews().open("ingress", None, 1).expect("opens");
    let many: Vec<(String, String)> = (0..5_000)
        .map(|i| (format!("m{i}"), "v".repeat(100)))
        .collect();
    check(
        &engine,
        &many
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
    );
    let sample = received(&mut p).pop().expect("sampled");
    assert_eq!(sample.request.len(), preview::MAX_LABELS);
    assert_eq!(sample.labels_left_out, 5_000 - preview::MAX_LABELS);
}

#[test]
fn checks_of_control_points_nobody_previews_are_not_sampled_nor_claimed() {
    let engine = previewing(&[USER_LIMIT]);
    let mut p = engine.previews().open("egress", None, 1).expect("opens");
    for _ in 0..3 {
        check(&engine, &[]); // ingress
    }
    assert!(engine.previews().wanted(), "still wanting its one sample");
    assert!(received(&mut p).is_empty());
    let source = MapLabels::default();
    engine.decide(
        FlowRequest {
            control_point: "egress",
            service: "shop",
            labels: &source,
        },
        |_| (),
    );
    assert_eq!(received(&mut p).len(), 1);
    assert!(!engine.previews().wanted());
}
