//! A circuit breaker for the store: after [`FAILURES`] failed calls in a
//! row it opens and the store is not called at all (components fall back
//! at once, costing Checks nothing); after a backoff (doubling from
//! [`MIN_OPEN`] to [`MAX_OPEN`], with jitter, so that many sidecars do not
//! come back at the same instant) it lets one call through as a probe,
//! whose success closes it and whose failure opens it again for longer.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use prometheus::IntGauge;
use sluice_time::{Clock, Nanos};

/// Failed calls in a row that open the breaker.
pub const FAILURES: u32 = 5;
/// The first time it stays open.
pub const MIN_OPEN: Nanos = 500_000_000;
/// The longest time it stays open.
pub const MAX_OPEN: Nanos = 10_000_000_000;

/// The breaker.
#[derive(Debug)]
pub struct Breaker {
    clock: Clock,
    /// Failed calls in a row.
    failures: AtomicU32,
    /// While open: until when (engine clock); 0 when closed.
    open_until: AtomicU64,
    /// How long it opens next time.
    next_open: AtomicU64,
    /// A probe is under way.
    probing: AtomicBool,
    /// `store_breaker_state`.
    state: IntGauge,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(clock: Clock, state: IntGauge) -> Self {
        state.set(0);
        Breaker {
            clock,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            next_open: AtomicU64::new(MIN_OPEN),
            probing: AtomicBool::new(false),
            state,
        }
    }

    /// Whether calling is worth trying: closed, or open long enough that a
    /// call could be the probe. Changes nothing.
    pub fn may_call(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until == 0 || (self.clock.now() >= until && !self.probing.load(Ordering::Acquire))
    }

    /// Whether this call may go to the store: closed, or open long enough
    /// that this call becomes the one probe.
    pub fn allows(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if self.clock.now() < until {
            return false;
        }
        let probe = !self.probing.swap(true, Ordering::AcqRel);
        if probe {
            self.state.set(2);
        }
        probe
    }

    /// A call succeeded; true when that closed an open breaker.
    pub fn success(&self) -> bool {
        self.failures.store(0, Ordering::Release);
        self.next_open.store(MIN_OPEN, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        let was_open = self.open_until.swap(0, Ordering::AcqRel) != 0;
        if was_open {
            self.state.set(0);
        }
        was_open
    }

    /// A call failed; true when that opened the breaker (not re-opened it
    /// after a failed probe: that was said already).
    pub fn failure(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let probing = self.probing.swap(false, Ordering::AcqRel);
        if failures < FAILURES && !probing {
            return false;
        }
        let open_for = self.next_open.load(Ordering::Acquire);
        self.next_open
            .store((open_for * 2).min(MAX_OPEN), Ordering::Release);
        let jitter = fastrand::u64(0..=open_for / 4);
        let was_open = self.open_until.swap(
            self.clock.now().saturating_add(open_for + jitter),
            Ordering::AcqRel,
        ) != 0;
        self.state.set(1);
        !was_open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn opens_after_failures_probes_once_and_closes_on_success() {
        let (clock, time) = Clock::mock();
        let b = Breaker::new(clock, IntGauge::new("b", "b").expect("gauge"));
        for _ in 0..FAILURES - 1 {
            assert!(!b.failure());
            assert!(b.allows());
        }
        assert!(b.failure(), "the fifth failure opens it, and says so");
        assert!(!b.allows());
        time.advance(Duration::from_nanos(MIN_OPEN + MIN_OPEN / 4 + 1));
        assert!(b.allows(), "one probe");
        assert!(!b.allows(), "only one");
        assert!(!b.failure(), "a failed probe re-opens, quietly");
        assert!(!b.allows());
        time.advance(Duration::from_nanos(2 * MIN_OPEN + MIN_OPEN / 2 + 1));
        assert!(b.allows());
        assert!(b.success(), "a good probe closes it, and says so");
        assert!(b.allows() && b.allows());
    }
}
