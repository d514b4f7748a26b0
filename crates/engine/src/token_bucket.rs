//! Token buckets, as rate limiters and quota schedulers keep them.
//!
//! A bucket starts full and refills `fill_amount` tokens per `interval`,
//! either smoothly (`continuous_fill`, the default) or all at once at each
//! interval boundary, never beyond `bucket_capacity`. Time is passed in
//! (engine nanoseconds), so every behaviour is tested on simulated time.

use sluice_time::Nanos;

/// What a bucket is: fixed per compiled limiter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketParams {
    /// Most tokens held.
    pub capacity: f64,
    /// Tokens added per interval.
    pub fill_amount: f64,
    /// The refill period, in nanoseconds (> 0).
    pub interval: Nanos,
    /// Smooth refill, or whole `fill_amount`s at interval boundaries.
    pub continuous: bool,
}

/// A token bucket's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    /// Tokens available now (after the last refill).
    tokens: f64,
    /// When the bucket was last refilled; in discrete mode, the last
    /// interval boundary passed.
    last: Nanos,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(params: &BucketParams, now: Nanos) -> Self {
        TokenBucket {
            tokens: params.capacity,
            last: now,
        }
    }

    fn refill(&mut self, p: &BucketParams, now: Nanos) {
        if now <= self.last {
            return;
        }
        let elapsed = now - self.last;
        if p.continuous {
            self.tokens =
                (self.tokens + p.fill_amount * elapsed as f64 / p.interval as f64).min(p.capacity);
            self.last = now;
        } else {
            let intervals = elapsed / p.interval;
            if intervals > 0 {
                self.tokens = (self.tokens + p.fill_amount * intervals as f64).min(p.capacity);
                self.last += intervals * p.interval;
            }
        }
    }

    /// Takes `n` tokens, or says how long until they will be there
    /// (`Err(None)`: never).
    pub fn take(&mut self, p: &BucketParams, now: Nanos, n: f64) -> Result<(), Option<Nanos>> {
        self.refill(p, now);
        if n <= self.tokens {
            self.tokens -= n;
            return Ok(());
        }
        if n > p.capacity || p.fill_amount <= 0.0 {
            return Err(None);
        }
        let missing = n - self.tokens;
        let wait = if p.continuous {
            (missing * p.interval as f64 / p.fill_amount).ceil() as Nanos
        } else {
            // Saturating: a tiny fill_amount must not overflow into nonsense.
            let intervals = (missing / p.fill_amount).ceil() as Nanos;
            self.last
                .saturating_add(intervals.saturating_mul(p.interval))
                .saturating_sub(now)
        };
        Err(Some(wait.max(1)))
    }

    /// How long until `n` tokens are there (0: now; `None`: never),
    /// without taking them.
    pub fn wait(&self, p: &BucketParams, now: Nanos, n: f64) -> Option<Nanos> {
        let mut copy = *self;
        match copy.take(p, now, n) {
            Ok(()) => Some(0),
            Err(wait) => wait,
        }
    }

    /// Returns tokens taken by a flow that a later stage rejected.
    pub fn give_back(&mut self, p: &BucketParams, n: f64) {
        self.tokens = (self.tokens + n).min(p.capacity);
    }

    /// Tokens available at `now`, without changing the bucket.
    pub fn level(&self, p: &BucketParams, now: Nanos) -> f64 {
        let mut copy = *self;
        copy.refill(p, now);
        copy.tokens
    }

    /// Tokens available (as of the last refill).
    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = 1_000_000_000;

    fn params(capacity: f64, fill: f64, interval: Nanos, continuous: bool) -> BucketParams {
        BucketParams {
            capacity,
            fill_amount: fill,
            interval,
            continuous,
        }
    }

    #[test]
    fn a_new_bucket_is_full_and_holds_no_more_than_capacity() {
        let p = params(5.0, 1.0, SEC, true);
        let mut b = TokenBucket::full(&p, 0);
        for _ in 0..5 {
            assert_eq!(b.take(&p, 0, 1.0), Ok(()));
        }
        assert_eq!(b.take(&p, 0, 1.0), Err(Some(SEC)));
        // A long idle time refills to capacity, not beyond.
        assert!(b.take(&p, 1000 * SEC, 6.0).is_err());
        assert_eq!(b.take(&p, 1000 * SEC, 5.0), Ok(()));
    }

    #[test]
    fn continuous_fill_is_proportional_to_elapsed_time() {
        let p = params(10.0, 10.0, SEC, true); // 10 tokens per second
        let mut b = TokenBucket::full(&p, 0);
        assert_eq!(b.take(&p, 0, 10.0), Ok(()));
        // After 250 ms, 2.5 tokens are there.
        assert_eq!(b.take(&p, SEC / 4, 3.0), Err(Some(SEC / 20)));
        assert_eq!(b.take(&p, SEC / 4, 2.0), Ok(()));
        assert!((b.tokens() - 0.5).abs() < 1e-9);
        assert_eq!(b.take(&p, SEC / 4 + SEC / 20, 1.0), Ok(()));
    }

    #[test]
    fn interval_fill_comes_in_whole_steps_at_boundaries() {
        let p = params(10.0, 4.0, SEC, false);
        let mut b = TokenBucket::full(&p, 0);
        assert_eq!(b.take(&p, 0, 10.0), Ok(()));
        // Nothing arrives until the boundary, however close.
        assert_eq!(b.take(&p, SEC - 1, 1.0), Err(Some(1)));
        assert_eq!(b.take(&p, SEC, 4.0), Ok(()));
        assert_eq!(b.take(&p, SEC, 1.0), Err(Some(SEC)));
        // 2.5 intervals later: two steps (8 tokens), boundary kept in phase;
        // 9 tokens are one more step away, at 4 s.
        assert_eq!(b.take(&p, SEC * 7 / 2, 9.0), Err(Some(SEC / 2)));
        assert_eq!(b.take(&p, SEC * 7 / 2, 8.0), Ok(()));
    }

    #[test]
    fn a_tiny_interval_fill_saturates_instead_of_overflowing() {
        let p = params(5.0, 1e-7, 3_600 * SEC, false);
        let mut b = TokenBucket::full(&p, 0);
        assert_eq!(b.take(&p, 0, 5.0), Ok(()));
        assert_eq!(b.take(&p, 0, 1.0), Err(Some(u64::MAX)));
    }

    #[test]
    fn a_flow_larger_than_the_bucket_never_passes() {
        let p = params(5.0, 5.0, SEC, true);
        let mut b = TokenBucket::full(&p, 0);
        assert_eq!(b.take(&p, 0, 6.0), Err(None));
        let dry = params(5.0, 0.0, SEC, true);
        let mut b = TokenBucket::full(&dry, 0);
        assert_eq!(b.take(&dry, 0, 5.0), Ok(()));
        assert_eq!(b.take(&dry, 100 * SEC, 1.0), Err(None));
    }
}
