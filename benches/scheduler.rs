//! The scheduler saturated: admissions per second out of a queue holding
//! 10,000 requests, in the bare weighted-fair queue and through the whole
//! async path (parked Check futures woken by the pump), and the memory a
//! queued request costs the scheduler.
//!
//! `cargo bench --bench scheduler`. The cost of a scheduler that is not
//! saturated is `decision/bench_policy` vs `decision/bench_policy_without_scheduler`
//! in the engine benchmark.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_engine::Metrics;
use sluice_engine::labels::MapLabels;
use sluice_engine::schedulers::wfq::{Capacity, Offer, Queue, Request};
use sluice_engine::{Engine, EngineOptions, FlowRequest};
use sluice_policy::load::parse_sources;
use sluice_time::{Clock, Nanos};

/// Counts bytes currently allocated, to measure what queued requests hold.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const QUEUED: usize = 10_000;

/// Admits exactly one request per grant.
struct Grants(usize);
impl Capacity for Grants {
    fn try_take(&mut self, _: Nanos, _: f64) -> bool {
        if self.0 > 0 {
            self.0 -= 1;
            true
        } else {
            false
        }
    }
    fn ready_at(&self, _: Nanos, _: f64) -> Option<Nanos> {
        None
    }
}

fn request(i: usize) -> Request {
    Request {
        workload: i % 4,
        tokens: 1.0 + (i % 3) as f64,
        priority: [200.0, 100.0, 20.0, 1.0][i % 4],
        fairness: Some(format!("user-{}", i % 500).into()),
        arrived: i as Nanos,
        deadline: Nanos::MAX,
    }
}

fn bare_queue(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler_saturated");
    group.throughput(Throughput::Elements(1));
    let mut queue = Queue::new(4, QUEUED + 1);
    let mut none = Grants(0);
    for i in 0..QUEUED {
        assert!(matches!(
            queue.offer(request(i), 0, &mut none),
            Offer::Queued(_)
        ));
    }
    let mut i = QUEUED;
    group.bench_function("wfq_admit_one_of_10000", |b| {
        b.iter(|| {
            i += 1;
            let _ = queue.offer(request(i), 0, &mut none);
            let mut admitted = 0;
            queue.dispatch(i as Nanos, &mut Grants(1), &mut |_| true, &mut |_, _, _| {
                admitted += 1
            });
            black_box(admitted)
        })
    });
    group.finish();
}

const POLICY: &str = r#"
name: sat
concurrency_schedulers:
  - name: gate
    selectors: [{control_point: ingress}]
    max_concurrency: 0
    scheduler:
      fairness_label_key: user
      max_queued_requests: 20000
      workloads:
        - label_matcher: {match_labels: {tier: gold}}
          parameters: {priority: 200, queue_timeout: 1h}
      default_workload_parameters: {priority: 20, queue_timeout: 1h}
"#;

/// Queues `QUEUED` Checks as parked futures on a saturated concurrency
/// scheduler, then returns them slots one at a time; each return wakes the
/// pump, which admits one request in fair order and wakes its future.
fn parked_futures(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("scheduler_saturated");
    group.sample_size(10);
    group.throughput(Throughput::Elements(QUEUED as u64));
    // Queueing costs the same whether 10 or 10,000 wait: filling the queue
    // from empty is linear, not quadratic.
    group.bench_function("async_queue_10000_checks", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                total += runtime.block_on(async {
                    let engine = new_engine();
                    let started = tokio::time::Instant::now();
                    let waiting = queue_up(&engine).await;
                    let took = started.elapsed();
                    waiting.iter().for_each(|w| w.abort());
                    took
                });
            }
            total
        })
    });
    group.bench_function("async_drain_10000_parked_checks", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                total += runtime.block_on(drain_once());
            }
            total
        })
    });
    group.finish();
    runtime.block_on(report_memory());
}

async fn queue_up(engine: &Arc<Engine>) -> Vec<tokio::task::JoinHandle<bool>> {
    let mut waiting = Vec::with_capacity(QUEUED);
    for i in 0..QUEUED {
        let tier = if i % 4 == 0 { "gold" } else { "free" };
        let user = format!("user-{}", i % 500);
        let source = MapLabels::from_pairs([("tier", tier), ("user", user.as_str())]);
        let flow = FlowRequest {
            control_point: "ingress",
            service: "any",
            labels: &source,
        };
        let pending = engine
            .decide(flow, |mut d| d.waiting.take())
            .expect("waits");
        let engine = engine.clone();
        waiting.push(tokio::spawn(async move {
            pending.run(&engine, None).await.is_ok()
        }));
    }
    // Let every future park in the queue.
    while engine_queued(engine) < QUEUED {
        tokio::task::yield_now().await;
    }
    waiting
}

fn engine_queued(engine: &Engine) -> usize {
    let plan = engine.plan();
    plan.policies[0].concurrency_schedulers[0]
        .scheduler
        .queued()
}

fn new_engine() -> Arc<Engine> {
    let engine = Engine::new(Clock::new(), Metrics::new(), EngineOptions::default());
    let sources = vec![(PathBuf::from("sat.yaml"), POLICY.to_owned())];
    engine
        .install(&parse_sources(&sources).expect("valid policy"))
        .expect("installs");
    Arc::new(engine)
}

async fn drain_once() -> Duration {
    let engine = new_engine();
    let waiting = queue_up(&engine).await;
    let gate = {
        let plan = engine.plan();
        plan.policies[0].concurrency_schedulers[0].scheduler.clone()
    };
    let started = tokio::time::Instant::now();
    // Raise the limit one slot at a time: each admission is one trip
    // through the pump and one woken future.
    for _ in 0..QUEUED {
        gate.with_pool(|s| s.max += 1);
        gate.poke();
    }
    for w in waiting {
        assert!(w.await.expect("task"));
    }
    started.elapsed()
}

async fn report_memory() {
    let engine = new_engine();
    let before = LIVE.load(Ordering::Relaxed);
    let waiting = queue_up(&engine).await;
    let after = LIVE.load(Ordering::Relaxed);
    eprintln!(
        "memory: {} bytes per queued Check (scheduler entry, waiter, parked task and its future), {QUEUED} queued",
        (after.saturating_sub(before)) / QUEUED
    );
    for w in waiting {
        w.abort();
    }
}

criterion_group!(benches, bare_queue, parked_futures);
criterion_main!(benches);
