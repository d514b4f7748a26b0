//! The load scheduler's pacing on simulated time.

use super::*;
use crate::schedulers::wfq::{Offer, Outcome, Queue, Request};

const MS: Nanos = 1_000_000;
const SEC: Nanos = 1_000 * MS;

/// Offers `per_second` one-token requests for `seconds` to a queue paced at
/// `lm` × the incoming rate; returns the tokens admitted after `after`.
fn admitted_share(lm: f64, per_second: u64, seconds: u64, after: Nanos) -> f64 {
    let rate = Arc::new(RateWindow::new(10 * SEC));
    let multiplier = Arc::new(Multiplier::new(lm));
    let mut pacer = Pacer {
        rate: rate.clone(),
        multiplier,
        tat: 0,
        max_debt: 10 * SEC,
        dry_run: false,
    };
    let mut queue = Queue::new(1, 10_000);
    let (mut offered, mut admitted) = (0.0, 0.0);
    let every = SEC / per_second;
    let mut now = 0;
    while now < seconds * SEC {
        now += MS;
        if now % every == 0 {
            rate.add(now, 1.0);
            if now > after {
                offered += 1.0;
            }
            let request = Request {
                workload: 0,
                tokens: 1.0,
                priority: 1.0,
                fairness: None,
                arrived: now,
                deadline: now + 100 * MS,
            };
            if pacer.bypass(now) {
                if now > after {
                    admitted += 1.0;
                }
            } else if queue.offer(request, now, &mut pacer) == Offer::Admitted && now > after {
                admitted += 1.0;
            }
        }
        queue.dispatch(now, &mut pacer, &mut |_| true, &mut |_, r, o| {
            if matches!(o, Outcome::Admitted { .. }) && r.arrived > after {
                admitted += r.tokens;
            }
        });
    }
    admitted / offered
}

#[test]
fn half_the_tokens_at_a_multiplier_of_one_half() {
    let share = admitted_share(0.5, 100, 60, 10 * SEC);
    assert!((share - 0.5).abs() < 0.05, "admitted share {share}");
}

#[test]
fn a_multiplier_of_one_passes_everything() {
    let share = admitted_share(1.0, 100, 20, 0);
    assert_eq!(share, 1.0);
}

#[test]
fn an_expired_multiplier_passes_everything_and_says_so() {
    let (clock, time) = Clock::mock();
    let metrics = Metrics::new();
    let spec: LoadSchedulerSpec = serde_saphyr::from_str(
        "name: protect\nselectors: [{control_point: ingress}]\nrate_window: 1s\n",
    )
    .expect("valid");
    let load = LoadScheduler::compile(&"p".into(), &spec, &metrics, &clock, None);
    for _ in 0..100 {
        time.advance(Duration::from_millis(10));
        assert!(
            load.passes(clock.now(), 1.0),
            "the policy's multiplier is 1"
        );
    }
    load.set_multiplier(0.2, clock.now() + 5 * SEC);
    time.advance(Duration::from_secs(1));
    assert!(!load.passes(clock.now(), 1.0), "the controller's 0.2 holds");
    assert_eq!(load.multiplier.at(clock.now()), (0.2, false));
    time.advance(Duration::from_secs(4));
    assert!(load.passes(clock.now(), 1.0), "lapsed: pass everything");
    assert_eq!(load.multiplier.at(clock.now()), (1.0, true));
    load.sweep(clock.now());
    let text = metrics.encode_text();
    assert!(
        text.contains(r#"load_multiplier_expired{component="protect",policy_name="p"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"token_bucket_lm_ratio{component="protect",policy_name="p"} 1"#),
        "{text}"
    );
    // A fresh decision takes over again.
    load.set_multiplier(0.5, clock.now() + 5 * SEC);
    assert!(!load.passes(clock.now(), 1.0));
    load.sweep(clock.now());
    assert!(
        metrics
            .encode_text()
            .contains(r#"load_multiplier_expired{component="protect",policy_name="p"} 0"#)
    );
}

#[test]
fn the_rate_window_measures_tokens_per_second() {
    let w = RateWindow::new(10 * SEC);
    assert_eq!(w.rate(0), None);
    let mut now = 0;
    for _ in 0..3000 {
        now += 10 * MS;
        w.add(now, 2.0);
    }
    // 200 tokens/s for 30 s: the window sees the last 10 s.
    let r = w.rate(now).expect("known");
    assert!((r - 200.0).abs() < 10.0, "{r}");
    // Silence: the rate falls as the window empties.
    assert!(w.rate(now + 5 * SEC).expect("known") < 120.0);
    assert_eq!(w.rate(now + 11 * SEC), Some(0.0));
}

#[test]
fn an_absurd_request_holds_up_admission_for_one_window_at_most() {
    use crate::schedulers::wfq::Capacity;
    let rate = Arc::new(RateWindow::new(SEC));
    let mut pacer = Pacer {
        rate: rate.clone(),
        multiplier: Arc::new(Multiplier::new(0.5)),
        tat: 0,
        max_debt: SEC,
        dry_run: false,
    };
    let mut now = 0;
    for _ in 0..200 {
        now += 10 * MS;
        rate.add(now, 1.0);
    }
    // A `tokens` label of 1e18 (a header anyone can send).
    assert!(pacer.try_take(now, 1e18));
    assert!(!pacer.try_take(now + 10 * MS, 1.0), "it costs a window");
    let ready = pacer.ready_at(now, 1.0).expect("the rate is known");
    assert!(ready <= now + SEC, "{ready} vs {now}");
    // Keep the incoming rate up; admissions resume after a window.
    let mut t = now;
    while t <= now + SEC + BURST {
        t += 10 * MS;
        rate.add(t, 1.0);
    }
    assert!(pacer.try_take(t, 1.0), "admitting again");
}

use std::time::Duration;
