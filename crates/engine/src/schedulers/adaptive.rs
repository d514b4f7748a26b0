//! An adaptive concurrency limit: the sidecar's own fast loop under a
//! concurrency scheduler (`adaptive:` in its policy).
//!
//! The controller's loops see the service through Prometheus: a
//! remote-write interval, a query window and a tick pass before they act,
//! and a queueing service builds seconds of backlog meanwhile. The sidecar
//! sees every flow end (its access log) within Envoy's flush interval, so
//! it can hold the service at its knee itself. By Little's law, flows in
//! flight = throughput × latency: at a fixed latency, a limit on flows in
//! flight is a limit on throughput that needs no rate estimate, and the
//! service's own queue cannot grow past it.
//!
//! The rule, revised every `interval` from the flows that ended in it:
//!
//! - more than `late_percentage` of them took longer than the setpoint: the
//!   limit is cut below the most flows in flight in the interval (not below
//!   the limit, which may be far above what is used), by the share that
//!   was late beyond the tolerance, at most by half. Flows admitted before the cut, which end
//!   late after it, are not evidence against the new limit: until flows
//!   admitted since the cut have ended, nothing more is cut (one cut per
//!   round trip, as in TCP's congestion control);
//! - otherwise, if some flow had to wait for a slot since the last
//!   revision, it rises by one (additive increase: near the knee, a
//!   queueing service gives no warning before its latency climbs);
//! - otherwise it stays: a limit nobody reaches is not raised without
//!   bound while idle.
//!
//! It stays within [`min_concurrency`, the ceiling], the ceiling being the
//! policy's `max_concurrency` or the controller's limit while it holds.
//! A flow's start is taken as its log's arrival minus its latency, so it
//! is late by the access log's way back (Envoy's flush interval): with a
//! long interval, flows admitted just before a cut still count against it.
//! The shipped Envoy configs flush every 10 ms.
//! No lock or clock of its own: the scheduler's pool holds it under its
//! lock and passes the engine's time, so it is tested on simulated time.

use sluice_policy::AdaptiveConcurrency;
use sluice_time::{Nanos, nanos};

/// Fewer ended flows than this are not enough to judge an interval by.
const MIN_SAMPLES: u32 = 4;
/// The deepest cut in one revision.
const MAX_CUT: f64 = 0.5;

/// The adaptive limit and what it has seen since its last revision.
#[derive(Debug)]
pub struct AdaptiveLimit {
    setpoint_ms: f64,
    /// Late share tolerated, 0 to 1.
    tolerance: f64,
    interval: Nanos,
    min: u64,
    /// The limit (before the ceiling), fractional so that a cut by 10 %
    /// of 5 is not lost to rounding.
    limit: f64,
    /// When the current interval began.
    since: Nanos,
    /// Flows ended in it, and of them those above the setpoint.
    ended: u32,
    late: u32,
    /// A flow waited for a slot in it.
    wanted_more: bool,
    /// The most flows in flight in it.
    peak: u64,
    /// The last cut: flows that started before it are no evidence.
    cut_at: Nanos,
}

impl AdaptiveLimit {
    /// A limit starting at `ceiling`, at `now`.
    pub fn new(spec: &AdaptiveConcurrency, ceiling: u64, now: Nanos) -> Self {
        AdaptiveLimit {
            setpoint_ms: spec.latency_setpoint_ms.0,
            tolerance: spec.late_percentage.0 / 100.0,
            interval: nanos(spec.interval.0),
            min: spec.min_concurrency,
            limit: ceiling as f64,
            since: now,
            ended: 0,
            late: 0,
            wanted_more: false,
            peak: 0,
            cut_at: 0,
        }
    }

    /// The limit in force under `ceiling`.
    pub fn limit(&self, ceiling: u64) -> u64 {
        (self.limit as u64).max(self.min).min(ceiling)
    }

    /// A flow found no free slot.
    pub fn wanted(&mut self) {
        self.wanted_more = true;
    }

    /// A flow took a slot, leaving `in_flight` in flight.
    pub fn took(&mut self, in_flight: u64) {
        self.peak = self.peak.max(in_flight);
    }

    /// A flow admitted here ended after `latency_ms` of upstream time, at
    /// `now`, with `in_flight` flows holding slots. Returns true when the
    /// limit rose (the queue may admit more now).
    pub fn ended(&mut self, now: Nanos, latency_ms: f64, in_flight: u64, ceiling: u64) -> bool {
        let started = now.saturating_sub((latency_ms.max(0.0) * 1e6) as Nanos);
        if started >= self.cut_at {
            self.ended += 1;
            if latency_ms > self.setpoint_ms {
                self.late += 1;
            }
        }
        if now.saturating_sub(self.since) < self.interval || self.ended < MIN_SAMPLES {
            return false;
        }
        let late = f64::from(self.late) / f64::from(self.ended);
        let before = self.limit(ceiling);
        if late > self.tolerance {
            let cut = (1.0 - (late - self.tolerance)).max(MAX_CUT);
            // What the service was given in the interval: access logs come
            // in batches, so the flows in flight right now (half a batch
            // returned) can be far below it.
            let base = self.limit.min(self.peak.max(in_flight) as f64);
            self.limit = (base * cut).max(self.min as f64);
            self.cut_at = now;
        } else if self.wanted_more && self.limit < ceiling as f64 {
            // Its own limit, not the ceiling's: a controller's lower
            // ceiling, once it lapses, must not leave the limit down there.
            self.limit = (self.limit + 1.0).min(ceiling as f64);
        }
        self.since = now;
        self.ended = 0;
        self.late = 0;
        self.wanted_more = false;
        self.peak = in_flight;
        self.limit(ceiling) > before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::types::{Percentage, Positive, PositiveDuration};
    use std::time::Duration;

    const MS: Nanos = 1_000_000;

    fn limit(ceiling: u64) -> AdaptiveLimit {
        let spec = AdaptiveConcurrency {
            latency_setpoint_ms: Positive(30.0),
            late_percentage: Percentage(10.0),
            interval: PositiveDuration(Duration::from_millis(100)),
            min_concurrency: 2,
        };
        AdaptiveLimit::new(&spec, ceiling, 0)
    }

    /// `n` flows ending over the 100 ms after `at`, the last `late` of
    /// them above the setpoint, with `in_flight` in flight; whether the
    /// limit rose.
    fn interval(a: &mut AdaptiveLimit, at: Nanos, n: u32, late: u32, in_flight: u64) -> bool {
        let mut rose = false;
        for i in 0..n {
            let now = at + (i as u64 + 1) * 100 * MS / n as u64;
            let ms = if i >= n - late { 60.0 } else { 20.0 };
            rose |= a.ended(now, ms, in_flight, 100);
        }
        rose
    }

    #[test]
    fn it_starts_at_the_ceiling_and_stays_while_nobody_waits() {
        let mut a = limit(100);
        assert_eq!(a.limit(100), 100);
        assert!(!interval(&mut a, 0, 20, 0, 10));
        assert_eq!(a.limit(100), 100, "not raised, not cut");
        // The controller's lower ceiling is the limit.
        assert_eq!(a.limit(40), 40);
    }

    #[test]
    fn late_flows_cut_below_the_flows_in_flight_once_per_round_trip() {
        let mut a = limit(100);
        // Half of 20 ended late with 30 in flight: cut by 40 % of them.
        interval(&mut a, 0, 20, 10, 30);
        assert_eq!(a.limit(100), 18);
        // Late flows that started before the cut (at 100 ms) are no
        // evidence against it: no second cut.
        for i in 0..12 {
            a.ended(150 * MS + i * 5 * MS, 120.0, 18, 100);
        }
        assert_eq!(a.limit(100), 18);
        // All late, started after the cut: cut by half at most.
        interval(&mut a, 300 * MS, 20, 20, 18);
        assert_eq!(a.limit(100), 9);
        // Never below min_concurrency.
        for k in 0..10 {
            interval(&mut a, (500 + 200 * k) * MS, 20, 20, 9);
        }
        assert_eq!(a.limit(100), 2);
    }

    #[test]
    fn it_rises_by_one_an_interval_while_flows_wait_and_latency_holds() {
        let mut a = limit(100);
        interval(&mut a, 0, 20, 20, 20);
        assert_eq!(a.limit(100), 10);
        // One late flow in 20 is within the tolerance.
        for k in 1..=5 {
            a.wanted();
            assert!(interval(&mut a, k * 100 * MS, 20, 1, 10), "rose");
        }
        assert_eq!(a.limit(100), 15);
        // Up to the ceiling and no further.
        for k in 6..200 {
            a.wanted();
            interval(&mut a, k * 100 * MS, 20, 0, 10);
        }
        assert_eq!(a.limit(100), 100);
    }

    #[test]
    fn a_lapsed_controller_ceiling_does_not_keep_the_limit_down() {
        let mut a = limit(100);
        // The controller holds the ceiling at 20 for a while, and flows
        // wait at it, on time.
        for k in 0..10 {
            a.wanted();
            for i in 0..20 {
                a.ended(k * 100 * MS + (i + 1) * 5 * MS, 20.0, 20, 20);
            }
        }
        assert_eq!(a.limit(20), 20);
        // Its decision lapses: the policy's 100 is back at once.
        assert_eq!(a.limit(100), 100);
    }

    #[test]
    fn too_few_flows_are_not_judged() {
        let mut a = limit(100);
        // Three late flows over a second: no revision.
        for i in 0..3 {
            a.ended((i + 1) * 300 * MS, 60.0, 5, 100);
        }
        assert_eq!(a.limit(100), 100);
        // The fourth completes the sample: all late, cut to half of the 5
        // in flight (2.5, which limits at 2).
        a.ended(1_300 * MS, 60.0, 5, 100);
        assert_eq!(a.limit(100), 2);
    }
}
