//! A controller's value in force until a deadline, lock-free.
//!
//! Components the controller can drive (rate limiters, samplers,
//! concurrency limiters, quota and concurrency schedulers) keep their
//! policy's value as the default; a [`Lease`] records until when the
//! controller's value holds, and shows it in `controller_decision_active`.
//! The engine's sweep (every second) returns lapsed components to their
//! default.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::IntGauge;
use sluice_time::Nanos;

use crate::metrics::{Metrics, Series};

/// No lease.
const NONE: u64 = u64::MAX;

/// Until when a controller's value holds (engine clock).
#[derive(Debug)]
pub struct Lease {
    /// The deadline, or [`NONE`].
    until: AtomicU64,
    /// `controller_decision_active` of the component.
    active: IntGauge,
}

impl Lease {
    /// No lease yet, for component `component` of `policy`.
    pub fn new(metrics: &Metrics, series: &mut Series, policy: &str, component: &str) -> Self {
        Lease {
            until: AtomicU64::new(NONE),
            active: metrics
                .controller_decision_active
                .series(series, &[policy, component]),
        }
    }

    /// The controller's value holds until `until`.
    pub fn grant(&self, until: Nanos) {
        self.until.store(until.min(NONE - 1), Ordering::Release);
        self.active.set(1);
    }

    /// True while a controller's value holds at `now`.
    pub fn active(&self, now: Nanos) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until != NONE && now < until
    }

    /// How long the controller's value still holds at `now`; `None` when
    /// none does.
    pub fn remaining(&self, now: Nanos) -> Option<Nanos> {
        let until = self.until.load(Ordering::Acquire);
        (until != NONE && now < until).then(|| until - now)
    }

    /// Ends a lapsed lease at `now` and updates the gauge; true when it
    /// just lapsed (the caller restores the default).
    pub fn lapse(&self, now: Nanos) -> bool {
        let until = self.until.load(Ordering::Acquire);
        let lapsed = until != NONE
            && now >= until
            && self
                .until
                .compare_exchange(until, NONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        self.active.set(i64::from(self.active(now)));
        lapsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lapses_once() {
        let l = Lease::new(&Metrics::new(), &mut Series::default(), "p", "c");
        assert!(!l.active(0));
        assert!(!l.lapse(10));
        l.grant(100);
        assert_eq!(l.active.get(), 1);
        assert!(l.active(99));
        assert!(!l.lapse(99));
        assert!(!l.active(100));
        assert!(l.lapse(100));
        assert_eq!(l.active.get(), 0);
        assert!(!l.lapse(200), "once");
    }
}
