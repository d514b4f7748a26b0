//! The whole loop, for real: Envoy → Sluice (load scheduler, flux meter,
//! remote-write) → Prometheus → sluice-controller (average-latency
//! blueprint) → Sluice, in front of an upstream whose latency grows with
//! its concurrency. Under a load step the controller lowers the load
//! multiplier, latency comes back near the setpoint with subscribers
//! favoured over guests; when the load drops the multiplier returns to
//! pass-through. Short ticks and windows keep it to about a minute; the
//! phases follow the loop's state and their bounds count controller ticks.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use std::time::Duration;

use common::*;
use parking_lot::Mutex;
use sluice_testkit::{Envoy, EnvoyPorts, Latency, Prometheus, Upstream, http};
use tokio::time::Instant;

/// Finished requests by (phase, class, HTTP status; 0 for a transport error).
type Tally = BTreeMap<(u8, &'static str, u16), u64>;

/// What the watcher saw at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Seconds since the start.
    t: f64,
    phase: u8,
    /// Load multiplier in force in the sidecar.
    lm: f64,
    /// Whether it is the controller's (not a lapsed decision's fallback).
    leased: bool,
    /// The controller's ticks so far.
    ticks: u64,
    /// The controller's latency and setpoint signals, once it has them.
    latency: Option<f64>,
    setpoint: Option<f64>,
}

const POLICY: &str = r#"
name: svc
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user_type: {from: request.http.headers.user-type}
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
    static_buckets: [10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000]
load_schedulers:
  - name: protect
    selectors: [{control_point: ingress}]
    rate_window: 3s
    scheduler:
      workloads:
        - name: subscribers
          label_matcher: {match_labels: {user_type: subscriber}}
          parameters: {priority: 200, queue_timeout: 200ms}
        - name: guests
          label_matcher: {match_labels: {user_type: guest}}
          parameters: {priority: 20, queue_timeout: 200ms}
circuit:
  blueprint: load_scheduling.average_latency
  parameters:
    flux_meter: latency
    load_scheduler: protect
    signal_window: 5s
    baseline_window: 30s
    latency_tolerance_multiplier: 1.5
    recovery_step: 0.1
"#;

const WARM: u8 = 0;
const LOAD: u8 = 1;
const CALM: u8 = 2;

fn signal(text: &str, name: &str) -> Option<f64> {
    let series = format!(r#"controller_signal{{policy_name="svc",signal="{name}"}}"#);
    sluice_testkit::scrape(text, &series).filter(|v| v.is_finite())
}

/// What the loop looks like now, half a second after the last look: the
/// multiplier in force in the sidecar, the controller's signals and ticks.
async fn watch(
    engine: &sluice_engine::Engine,
    admin: std::net::SocketAddr,
    started: Instant,
    phase: u8,
) -> Sample {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (lm, leased) = {
        let plan = engine.plan();
        let m = &plan.policies[0].load_schedulers[0].multiplier;
        let now = engine.clock().now();
        (m.at(now).0, m.leased(now))
    };
    let text = http::get(admin, "/metrics", &[])
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    Sample {
        t: started.elapsed().as_secs_f64(),
        phase,
        lm,
        leased,
        ticks: sluice_testkit::scrape(&text, "controller_ticks_total").unwrap_or(0.0) as u64,
        latency: signal(&text, "latency"),
        setpoint: signal(&text, "setpoint"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_protects_the_service_and_lets_go_after() {
    let prometheus = Prometheus::start(&[], Duration::from_secs(60))
        .await
        .expect("prometheus");
    let policy = PolicyFile::new(POLICY);
    let (controller, sidecar) = controlled_sidecar(
        &policy,
        &prometheus,
        "127.0.0.1:0".parse().expect("addr"),
        vec![],
    )
    .await;
    // 20 ms alone, 10 ms more per other request in flight: past ~80
    // requests/s its latency runs away.
    let upstream = Upstream::start_with(
        0,
        Latency {
            base: Duration::from_millis(20),
            per_inflight: Duration::from_millis(10),
        },
    )
    .await
    .expect("upstream");
    let ports = EnvoyPorts::free(upstream.addr.port(), sidecar.grpc_addr.port()).expect("ports");
    let envoy = Envoy::start("envoy-configs/quickstart.yaml", ports)
        .await
        .expect("envoy");
    let front = envoy.listener();

    // Open-loop load: `rate` requests/s per class; the phase decides it.
    let phase = Arc::new(AtomicU8::new(WARM));
    let tally: Arc<Mutex<Tally>> = Default::default();
    let driver = {
        let (phase, tally) = (phase.clone(), tally.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                n += 1;
                let p = phase.load(Ordering::Relaxed);
                // 50/s per class under load (every 20 ms), 5/s otherwise.
                let every = if p == LOAD { 2 } else { 20 };
                if !n.is_multiple_of(every) {
                    continue;
                }
                for class in ["subscriber", "guest"] {
                    let tally = tally.clone();
                    tokio::spawn(async move {
                        let status = http::request(
                            front,
                            "GET",
                            "/",
                            &[("user-type", class)],
                            b"",
                            Duration::from_secs(5),
                        )
                        .await
                        .map_or(0, |r| r.status);
                        *tally.lock().entry((p, class, status)).or_default() += 1;
                    });
                }
            }
        })
    };

    // Watch the loop twice a second; the phases change on what it sees,
    // and every bound is counted in the controller's ticks, so a slow
    // machine makes the test longer, not red.
    let started = Instant::now();
    let mut trace: Vec<Sample> = Vec::new();
    let engine = sidecar.engine.clone();
    let admin = controller.admin_addr;
    let sample = async |phase: u8, trace: &mut Vec<Sample>| {
        let s = watch(&engine, admin, started, phase).await;
        trace.push(s);
        s
    };
    let show = |trace: &[Sample]| {
        trace
            .iter()
            .map(|s| {
                format!(
                    "{:5.1}s tick {:3} phase {} lm {:.2}{} latency {:?} setpoint {:?}",
                    s.t,
                    s.ticks,
                    s.phase,
                    s.lm,
                    if s.leased { "" } else { " (lapsed)" },
                    s.latency,
                    s.setpoint
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Warm: until the controller has learnt the normal latency (a bound in
    // seconds only here: before Prometheus has data there are no ticks
    // worth counting).
    let warm_until = Instant::now() + Duration::from_secs(90);
    loop {
        let s = sample(WARM, &mut trace).await;
        if s.ticks >= 5 && s.latency.is_some() && s.setpoint.is_some() {
            break;
        }
        assert!(Instant::now() < warm_until, "no signals:\n{}", show(&trace));
    }

    // The load step: the controller must throttle within 15 ticks...
    phase.store(LOAD, Ordering::Relaxed);
    let step = trace.last().map_or(0, |s| s.ticks);
    loop {
        let s = sample(LOAD, &mut trace).await;
        if s.lm < 1.0 && s.leased {
            break;
        }
        assert!(
            s.ticks <= step + 15,
            "not throttled 15 ticks after the step:\n{}",
            show(&trace)
        );
    }
    // ...and bring latency back under twice its setpoint while the load
    // lasts, three samples on distinct ticks in a row, within 40 ticks.
    let mut held: Vec<u64> = Vec::new();
    loop {
        let s = sample(LOAD, &mut trace).await;
        match (s.latency, s.setpoint) {
            (Some(l), Some(p)) if l < 2.0 * p => {
                if held.last() != Some(&s.ticks) {
                    held.push(s.ticks);
                }
            }
            _ => held.clear(),
        }
        if held.len() >= 3 {
            break;
        }
        assert!(
            s.ticks <= step + 40,
            "latency not back near the setpoint 40 ticks into the load:\n{}",
            show(&trace)
        );
    }

    // Calm: the controller brings the multiplier back to pass-through (its
    // own decision, not a lapse of the last one), 0.1 per tick.
    phase.store(CALM, Ordering::Relaxed);
    let calm = trace.last().map_or(0, |s| s.ticks);
    loop {
        let s = sample(CALM, &mut trace).await;
        if s.lm >= 1.0 && s.leased && s.ticks > calm {
            break;
        }
        assert!(
            s.ticks <= calm + 30,
            "not back to pass-through 30 ticks after the load dropped:\n{}",
            show(&trace)
        );
    }
    driver.abort();
    println!("{}", show(&trace));
    let tally = tally.lock().clone();
    println!("{tally:?}");

    // Subscribers kept a higher acceptance than guests under the load.
    let share = |class: &str| {
        let ok = tally.get(&(LOAD, class, 200)).copied().unwrap_or(0) as f64;
        let all: u64 = tally
            .iter()
            .filter(|((p, c, _), _)| *p == LOAD && *c == class)
            .map(|(_, n)| n)
            .sum();
        ok / all.max(1) as f64
    };
    let (subscribers, guests) = (share("subscriber"), share("guest"));
    assert!(
        subscribers > guests + 0.1,
        "subscribers {subscribers:.2} vs guests {guests:.2}"
    );

    controller.stop(Duration::from_secs(2)).await;
    sidecar.stop(Duration::from_secs(2)).await;
}
