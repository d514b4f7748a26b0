//! A controller's value in force until a deadline, lock-free.
//!
//! Components the controller can drive (rate limiters, samplers,
//! concurrency limiters) keep their policy's value as the default; a
//! [`Lease`] records until when the controller's value holds. The engine's
//! sweep (every second) returns lapsed components to their default.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::Nanos;

/// No lease.
const NONE: u64 = u64::MAX;

/// Until when a controller's value holds (engine clock).
#[derive(Debug)]
pub struct Lease(AtomicU64);

impl Default for Lease {
    fn default() -> Self {
        Lease(AtomicU64::new(NONE))
    }
}

impl Lease {
    /// The controller's value holds until `until`.
    pub fn grant(&self, until: Nanos) {
        self.0.store(until.min(NONE - 1), Ordering::Release);
    }

    /// True while a controller's value holds at `now`.
    pub fn active(&self, now: Nanos) -> bool {
        let until = self.0.load(Ordering::Acquire);
        until != NONE && now < until
    }

    /// Ends a lapsed lease at `now`; true when it just lapsed (the caller
    /// restores the default).
    pub fn lapse(&self, now: Nanos) -> bool {
        let until = self.0.load(Ordering::Acquire);
        until != NONE
            && now >= until
            && self
                .0
                .compare_exchange(until, NONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lapses_once() {
        let l = Lease::default();
        assert!(!l.active(0));
        assert!(!l.lapse(10));
        l.grant(100);
        assert!(l.active(99));
        assert!(!l.lapse(99));
        assert!(!l.active(100));
        assert!(l.lapse(100));
        assert!(!l.lapse(200), "once");
    }
}
