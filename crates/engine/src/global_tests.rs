//! Global components (`scope: global`) on an in-memory store and simulated
//! time: several engines sharing one store behave as one sidecar would,
//! leases keep a hot key off the store, and a store that fails leaves each
//! component to its `on_store_unavailable`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_policy::load::parse_sources;
use sluice_time::{Clock, MockTime};

use crate::store::SharedStore;
use crate::store::memory::MemoryStore;
use crate::{Engine, EngineOptions, FlowEnd, FlowRequest, MapLabels, Metrics};

/// A global per-user limiter: `capacity` tokens, refilled `fill` per second.
fn per_user(capacity: u32, fill: u32, fallback: &str) -> String {
    format!(
        r#"
name: shared
classifiers:
  - selectors: [{{control_point: ingress}}]
    rules:
      user: {{from: request.http.headers.user}}
rate_limiters:
  - name: per-user
    selectors: [{{control_point: ingress}}]
    bucket_capacity: {capacity}
    fill_amount: {fill}
    interval: 1s
    limit_by_label_key: user
    scope: global
    on_store_unavailable: {fallback}
"#
    )
}

const TWO_IN_FLIGHT: &str = r#"
name: shared
concurrency_limiters:
  - name: two
    selectors: [{control_point: ingress}]
    max_concurrency: 2
    max_inflight_duration: 60s
    scope: global
"#;

fn install(engine: &Engine, doc: &str) -> Result<(), crate::InstallError> {
    let sources = [(PathBuf::from("shared.yaml"), doc.to_owned())];
    engine.install(&parse_sources(&sources).expect("valid policy"))
}

/// `n` engines ("sidecars") on one store and one simulated clock.
fn sidecars(n: usize, doc: &str) -> (Vec<Engine>, Arc<MemoryStore>, MockTime) {
    let (clock, time) = Clock::mock();
    let store = MemoryStore::new(clock.clone());
    let engines = (0..n)
        .map(|_| {
            let shared: SharedStore = store.clone();
            let options = EngineOptions {
                store: Some(shared),
                ..EngineOptions::default()
            };
            let engine = Engine::new(clock.clone(), Metrics::new(), options);
            install(&engine, doc).expect("installs");
            engine
        })
        .collect();
    (engines, store, time)
}

/// How a Check ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Accepted, with its `sluice.flow` metadata.
    Accepted(String),
    /// Refused with this status and retry-after.
    Refused(u16, Option<Duration>),
}

/// Decides one flow of `user`, waiting for the store if it must.
async fn check(engine: &Engine, user: &str) -> Outcome {
    let source = MapLabels::from_pairs([("http.request.header.user", user)]);
    let flow = FlowRequest {
        control_point: "ingress",
        service: "shop",
        labels: &source,
    };
    let (decided, waiting) = engine.decide(flow, |mut d| {
        let waiting = d.waiting.take();
        let decided = match &d.rejection {
            Some(r) => Outcome::Refused(r.status, r.retry_after),
            None => Outcome::Accepted(d.metadata().unwrap_or_default()),
        };
        (decided, waiting)
    });
    match waiting {
        None => decided,
        Some(waiting) => match waiting.run(engine, None).await {
            Ok(()) => decided,
            Err(refused) => Outcome::Refused(refused.status, refused.retry_after),
        },
    }
}

fn accepted(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Accepted(_))
}

/// The value of a series in `engine`'s `/metrics` text.
fn metric(engine: &Engine, series: &str) -> f64 {
    let text = engine.metrics().encode_text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn three_sidecars_together_never_admit_more_than_the_bucket() {
    // Capacity 20, one token a minute: over the test, 20 and no more.
    let (engines, _store, time) = sidecars(3, &per_user(20, 0, "local"));
    let mut admitted = 0;
    for i in 0..90 {
        time.advance(Duration::from_millis(7));
        if accepted(&check(&engines[i % 3], "alice").await) {
            admitted += 1;
        }
    }
    // Never more than the bucket; leases of 5 % of it (one token) per
    // sidecar are all that can be stranded.
    assert!((18..=20).contains(&admitted), "admitted {admitted}");
}

#[tokio::test]
async fn a_hot_key_spends_leases_and_rarely_asks_the_store() {
    let (engines, store, time) = sidecars(1, &per_user(100_000, 10_000, "local"));
    let engine = &engines[0];
    let mut admitted = 0;
    for _ in 0..10_000 {
        // 5,000 Checks a second, half of what the bucket refills.
        time.advance(Duration::from_micros(200));
        if accepted(&check(engine, "hot").await) {
            admitted += 1;
        }
        // Background refills run when the Check path yields.
        tokio::task::yield_now().await;
    }
    assert_eq!(admitted, 10_000);
    let calls = store.calls();
    assert!(
        calls < 200,
        "{calls} store calls for 10,000 Checks of one key"
    );
    assert_eq!(
        metric(
            engine,
            r#"store_leases_total{component="per-user",policy_name="shared"}"#
        ),
        calls as f64
    );
}

#[tokio::test]
async fn each_cold_key_is_decided_right_on_its_first_check() {
    let (engines, _store, _time) = sidecars(2, &per_user(1, 0, "local"));
    for user in 0..100 {
        let user = format!("user-{user}");
        assert!(accepted(&check(&engines[0], &user).await), "{user} first");
        assert_eq!(
            check(&engines[1], &user).await,
            Outcome::Refused(429, None),
            "{user} second, on the other sidecar: the bucket never refills"
        );
    }
}

#[tokio::test]
async fn a_load_scheduler_counts_as_incoming_only_what_the_limiter_before_it_admits() {
    // The limiter waits for the store on each cold key; on the second
    // sidecar it then refuses. Those flows never reach the load scheduler:
    // counted as its incoming, they would make served ÷ incoming look like
    // an overload to a controller (and widen the scheduler's share).
    let doc = per_user(1, 0, "local")
        + r#"
load_schedulers:
  - name: load
    selectors: [{control_point: ingress}]
"#;
    let (engines, _store, _time) = sidecars(2, &doc);
    for user in 0..50 {
        let user = format!("user-{user}");
        assert!(accepted(&check(&engines[0], &user).await), "{user} first");
        assert!(!accepted(&check(&engines[1], &user).await), "{user} again");
    }
    let incoming =
        r#"incoming_tokens_total{component="load",policy_name="shared",workload_index="default"}"#;
    assert_eq!(
        metric(&engines[0], incoming),
        50.0,
        "admitted, then arrived"
    );
    assert_eq!(metric(&engines[1], incoming), 0.0, "refused before it");
    let plan = engines[1].plan();
    let load = &plan.policies[0].load_schedulers[0];
    assert_eq!(load.rate.rate(10_000_000_000), None, "nothing arrived");
}

#[tokio::test]
async fn a_denial_is_remembered_until_its_retry_time() {
    let (engines, store, time) = sidecars(1, &per_user(1, 1, "local"));
    let engine = &engines[0];
    assert!(accepted(&check(engine, "alice").await));
    let Outcome::Refused(429, Some(retry)) = check(engine, "alice").await else {
        panic!("the bucket is empty for a second");
    };
    assert!(retry <= Duration::from_secs(1) && retry > Duration::ZERO);
    let calls = store.calls();
    for _ in 0..1_000 {
        time.advance(Duration::from_micros(500));
        assert!(!accepted(&check(engine, "alice").await));
    }
    assert_eq!(store.calls(), calls, "hammering cost the store nothing");
    time.advance(Duration::from_millis(501));
    assert!(accepted(&check(engine, "alice").await), "paid again");
}

#[tokio::test]
async fn without_the_store_each_fallback_decides() {
    for (fallback, admitted) in [("local", 3), ("accept", 10), ("reject", 0)] {
        let (engines, store, _time) = sidecars(1, &per_user(3, 0, fallback));
        store.up.store(false, Ordering::Relaxed);
        let mut n = 0;
        for _ in 0..10 {
            if accepted(&check(&engines[0], "alice").await) {
                n += 1;
            }
        }
        assert_eq!(n, admitted, "{fallback}");
        assert_eq!(
            metric(
                &engines[0],
                r#"store_fallback_total{component="per-user",policy_name="shared"}"#
            ),
            10.0,
            "{fallback}: every Check counted"
        );
    }
}

#[tokio::test]
async fn a_store_that_fails_mid_call_falls_back_and_comes_back_global() {
    let (engines, store, _time) = sidecars(2, &per_user(2, 0, "local"));
    assert!(accepted(&check(&engines[0], "alice").await));
    // The store still says it is there, but fails when asked: the Check
    // that asked falls back to the local bucket.
    store.failing.store(true, Ordering::Relaxed);
    assert!(accepted(&check(&engines[1], "alice").await), "local");
    assert_eq!(
        metric(
            &engines[1],
            r#"store_fallback_total{component="per-user",policy_name="shared"}"#
        ),
        1.0
    );
    store.failing.store(false, Ordering::Relaxed);
    // Global again: one token left of the shared two.
    assert!(accepted(&check(&engines[1], "alice").await));
    assert!(!accepted(&check(&engines[0], "alice").await));
}

#[tokio::test]
async fn a_global_concurrency_limit_holds_across_sidecars_until_the_logs_arrive() {
    let (engines, store, _time) = sidecars(2, TWO_IN_FLIGHT);
    let mut flows = Vec::new();
    for i in 0..5 {
        match check(&engines[i % 2], "any").await {
            Outcome::Accepted(meta) => flows.push((i % 2, meta)),
            Outcome::Refused(status, retry) => {
                assert_eq!((status, retry), (429, None));
            }
        }
    }
    assert_eq!(flows.len(), 2, "two in flight across both sidecars");
    assert_eq!(store.held("two"), 2);
    for (sidecar, meta) in &flows {
        let mut end = FlowEnd::default();
        end.set(
            "sluice.flow",
            crate::flow_end::AttrValue::Text(meta.clone().into()),
        );
        engines[*sidecar].end_flow(&end, &crate::flow_end::NoExtras);
    }
    assert_eq!(store.held("two"), 0, "the logs gave the slots back");
    assert!(accepted(&check(&engines[1], "any").await));
}

#[tokio::test]
async fn a_global_slot_lapses_in_the_store_when_its_log_never_comes() {
    let (engines, store, time) = sidecars(1, TWO_IN_FLIGHT);
    assert!(accepted(&check(&engines[0], "a").await));
    assert!(accepted(&check(&engines[0], "b").await));
    assert!(!accepted(&check(&engines[0], "c").await));
    time.advance(Duration::from_secs(61));
    engines[0].sweep();
    assert_eq!(store.held("two"), 0);
    assert!(accepted(&check(&engines[0], "d").await));
}

#[test]
fn a_sidecar_without_a_store_refuses_a_global_policy_and_keeps_its_own() {
    let (clock, _time) = Clock::mock();
    let engine = Engine::new(clock, Metrics::new(), EngineOptions::default());
    let local = per_user(5, 1, "local").replace("scope: global", "scope: sidecar");
    install(&engine, &local).expect("a sidecar policy needs no store");
    let refused = install(&engine, &per_user(5, 1, "local")).expect_err("refused");
    assert!(
        refused.0.contains("shared/per-user has scope: global")
            && refused.0.contains("--redis-url"),
        "{refused}"
    );
    let plan = engine.plan();
    assert!(
        plan.policies[0].rate_limiters[0].global.is_none(),
        "the sidecar policy stays in force"
    );
}

/// A flow decided on `engine`, waiting (as a task) if it must: its
/// `sluice.flow` metadata once admitted.
fn spawn_flow(
    engine: &Arc<Engine>,
    labels: &[(&str, &str)],
) -> tokio::task::JoinHandle<Result<String, u16>> {
    let source = MapLabels::from_pairs(labels.iter().copied());
    let flow = FlowRequest {
        control_point: "ingress",
        service: "shop",
        labels: &source,
    };
    let (meta, refused, waiting) = engine.decide(flow, |mut d| {
        let waiting = d.waiting.take();
        (
            d.metadata().unwrap_or_default(),
            d.rejection.as_ref().map(|r| r.status),
            waiting,
        )
    });
    let engine = engine.clone();
    tokio::spawn(async move {
        if let Some(status) = refused {
            return Err(status);
        }
        match waiting {
            None => Ok(meta),
            Some(w) => w
                .run(&engine, None)
                .await
                .map(|()| meta)
                .map_err(|r| r.status),
        }
    })
}

/// Moves tokio's paused clock and the engines' mock clock forward together
/// by `ms` milliseconds, a millisecond at a time, letting tasks run.
async fn run_for(time: &MockTime, ms: u64) {
    for _ in 0..ms {
        tokio::time::advance(Duration::from_millis(1)).await;
        time.advance(Duration::from_millis(1));
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
}

const SHARED_QUOTA: &str = r#"
name: shared
quota_schedulers:
  - name: quota
    selectors: [{control_point: ingress}]
    bucket_capacity: 4
    fill_amount: 4
    interval: 1s
    scope: global
    scheduler:
      workloads:
        - label_matcher: {match_labels: {tier: vip}}
          parameters: {priority: 100, queue_timeout: 30s}
      default_workload_parameters: {priority: 1, queue_timeout: 30s}
"#;

#[tokio::test(start_paused = true)]
async fn two_sidecars_share_a_global_quota_and_each_keeps_its_priorities() {
    let (engines, _store, time) = sidecars(2, SHARED_QUOTA);
    let engines: Vec<Arc<Engine>> = engines.into_iter().map(Arc::new).collect();
    let mut flows = Vec::new();
    for engine in &engines {
        for i in 0..20 {
            let tier = if i % 2 == 0 { "free" } else { "vip" };
            flows.push((tier, spawn_flow(engine, &[("tier", tier)])));
        }
    }
    // Four tokens at once, then four a second: twelve in two seconds.
    run_for(&time, 2_000).await;
    let (mut vip, mut free) = (0, 0);
    for (tier, flow) in flows {
        if flow.is_finished() {
            flow.await.expect("task").expect("admitted, never refused");
            *if tier == "vip" { &mut vip } else { &mut free } += 1;
        } else {
            flow.abort();
        }
    }
    // Leases of one token (5 % of 4, rounded down, but at least the
    // flow's): at most one stranded per sidecar.
    assert!((10..=12).contains(&(vip + free)), "admitted {vip} + {free}");
    // Each sidecar's first flow (free) found its lease filled and nobody
    // waiting; from then on vip flows went first while any waited (in
    // arrival order, half the admitted would be free).
    assert!(
        free <= 2,
        "{free} free flows admitted while vip flows waited"
    );
}

const SHARED_SLOTS: &str = r#"
name: shared
concurrency_schedulers:
  - name: slots
    selectors: [{control_point: ingress}]
    max_concurrency: 2
    max_inflight_duration: 60s
    scope: global
    scheduler:
      default_workload_parameters: {queue_timeout: 30s}
"#;

#[tokio::test(start_paused = true)]
async fn a_global_concurrency_scheduler_admits_across_sidecars_as_slots_return() {
    let (engines, store, time) = sidecars(2, SHARED_SLOTS);
    let engines: Vec<Arc<Engine>> = engines.into_iter().map(Arc::new).collect();
    let mut flows: Vec<_> = (0..5)
        .map(|i| (i % 2, spawn_flow(&engines[i % 2], &[])))
        .collect();
    run_for(&time, 200).await;
    let admitted = |flows: &Vec<(usize, tokio::task::JoinHandle<_>)>| {
        flows.iter().filter(|(_, f)| f.is_finished()).count()
    };
    assert_eq!(admitted(&flows), 2, "two slots across both sidecars");
    assert_eq!(store.held("slots"), 2);
    // The first admitted flow's log arrives: its slot goes back to the
    // store, and a waiting flow (on either sidecar) takes it.
    let first = flows
        .iter()
        .position(|(_, f)| f.is_finished())
        .expect("one admitted");
    let (sidecar, flow) = flows.remove(first);
    let meta = flow.await.expect("task").expect("admitted");
    let mut end = FlowEnd::default();
    end.set("sluice.flow", crate::flow_end::AttrValue::Text(meta.into()));
    engines[sidecar].end_flow(&end, &crate::flow_end::NoExtras);
    run_for(&time, 200).await;
    assert_eq!(admitted(&flows), 2, "one more in, still two in flight");
    assert_eq!(store.held("slots"), 2);
    for (_, flow) in flows {
        flow.abort();
    }
    // Nobody waits any more: slots taken for the queues go back, and only
    // the two admitted flows hold theirs.
    run_for(&time, 1_100).await;
    for engine in &engines {
        engine.sweep();
    }
    assert_eq!(store.held("slots"), 2);
}

/// Puts `action` in force on every engine for 5 s.
fn drive_all(engines: &[Arc<Engine>], action: crate::control::Action<'_>) {
    for engine in engines {
        let applied = engine.apply(&crate::control::ControlDecision {
            policy: "shared",
            policy_hash: engine.plan().policies[0].hash,
            valid_for: Duration::from_secs(5),
            action: action.clone(),
        });
        assert_eq!(applied, crate::control::Applied::Applied);
    }
}

/// How many of `flows` were admitted (the rest are aborted).
async fn admitted(flows: Vec<tokio::task::JoinHandle<Result<String, u16>>>) -> usize {
    let mut n = 0;
    for flow in flows {
        if flow.is_finished() {
            flow.await.expect("task").expect("admitted, never refused");
            n += 1;
        } else {
            flow.abort();
        }
    }
    n
}

#[tokio::test(start_paused = true)]
async fn a_driven_global_quota_sends_the_controllers_bucket_to_the_store() {
    // The policy's bucket (4, then 4 a second) would admit 12 in two
    // seconds; the controller's (2, never refilled) admits 2, across both
    // sidecars: each lease asks the store with the parameters in force.
    let (engines, _store, time) = sidecars(2, SHARED_QUOTA);
    let engines: Vec<Arc<Engine>> = engines.into_iter().map(Arc::new).collect();
    let action = crate::control::Action::QuotaBucket {
        component: "quota",
        bucket_capacity: Some(2.0),
        fill_amount: Some(0.0),
    };
    drive_all(&engines, action);
    let flows = (0..20)
        .map(|i| spawn_flow(&engines[i % 2], &[]))
        .collect::<Vec<_>>();
    run_for(&time, 2_000).await;
    assert_eq!(admitted(flows).await, 2);

    // Lapsed on both: the store's bucket refills at the policy's 4 a
    // second again (and holds up to its 4).
    run_for(&time, 3_000).await;
    for engine in &engines {
        engine.sweep();
    }
    let flows = (0..20)
        .map(|i| spawn_flow(&engines[i % 2], &[]))
        .collect::<Vec<_>>();
    run_for(&time, 1_000).await;
    let n = admitted(flows).await;
    // 4 refilled by now, 4 more over the second; at most one lease of one
    // token stranded per sidecar.
    assert!((6..=8).contains(&n), "admitted {n}");
}

#[tokio::test(start_paused = true)]
async fn a_driven_global_concurrency_scheduler_takes_slots_against_the_controllers_limit() {
    let (engines, store, time) = sidecars(2, SHARED_SLOTS);
    let engines: Vec<Arc<Engine>> = engines.into_iter().map(Arc::new).collect();
    let action = crate::control::Action::SchedulerConcurrency {
        component: "slots",
        value: 1,
    };
    drive_all(&engines, action);
    let flows = (0..4)
        .map(|i| spawn_flow(&engines[i % 2], &[]))
        .collect::<Vec<_>>();
    run_for(&time, 200).await;
    assert_eq!(store.held("slots"), 1, "the policy's 2 would hold two");
    assert_eq!(admitted(flows).await, 1);
}
