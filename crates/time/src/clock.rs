//! The one clock of the decision engine.
//!
//! Every component that measures time (token buckets, label-state expiry,
//! the schedulers' queues, controller leases) reads it from a [`Clock`]
//! that is handed to the engine at construction. Production uses quanta's TSC-backed clock
//! (a few nanoseconds per read, monotonic); tests use [`Clock::mock`] and move
//! time forward by hand, so refill and expiry are tested exactly, without
//! sleeping.

use std::sync::Arc;
use std::time::Duration;

/// Nanoseconds since the clock was created. A plain integer so that it can
/// live in atomics and be compared and subtracted without ceremony.
pub type Nanos = u64;

/// A monotonic clock, cheap to clone and to read.
#[derive(Clone, Debug)]
pub struct Clock {
    /// The time source: real (TSC or OS) or a mock driven by a test.
    inner: quanta::Clock,
    /// Reading of `inner` when this clock was made; [`Clock::now`] counts from it.
    origin: quanta::Instant,
}

/// The handle a test uses to move a mock [`Clock`] forward.
#[derive(Clone, Debug)]
pub struct MockTime(Arc<quanta::Mock>);

impl MockTime {
    /// Moves the mock clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.increment(by);
    }
}

impl Clock {
    /// The real clock.
    pub fn new() -> Self {
        let inner = quanta::Clock::new();
        let origin = inner.now();
        Clock { inner, origin }
    }

    /// A clock that stands still until the returned handle moves it.
    pub fn mock() -> (Self, MockTime) {
        let (inner, mock) = quanta::Clock::mock();
        let origin = inner.now();
        (Clock { inner, origin }, MockTime(mock))
    }

    /// Nanoseconds since this clock was created.
    #[inline]
    pub fn now(&self) -> Nanos {
        let elapsed = self.inner.now().saturating_duration_since(self.origin);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Converts a duration to [`Nanos`], saturating at about 584 years.
pub fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_clock_moves_only_when_told() {
        let (clock, time) = Clock::mock();
        assert_eq!(clock.now(), 0);
        time.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), 1_500_000_000);
        let copy = clock.clone();
        time.advance(Duration::from_nanos(7));
        assert_eq!(copy.now(), 1_500_000_007);
    }

    #[test]
    fn real_clock_is_monotonic() {
        let clock = Clock::new();
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
    }
}
