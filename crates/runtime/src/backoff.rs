//! Exponential backoff with jitter, for every loop that retries something
//! remote (the controller subscription, remote-write): one implementation,
//! so that no loop storms a peer that is coming back.

use std::time::Duration;

/// Delays that double from `min` to `max`, each with up to a quarter more
/// at random, so that many sidecars retrying at once spread out.
#[derive(Clone, Debug)]
pub struct Backoff {
    /// The first delay, and the one after [`Backoff::reset`].
    min: Duration,
    /// The longest delay.
    max: Duration,
    /// The next delay, before jitter.
    next: Duration,
}

impl Backoff {
    /// Delays from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay to wait now; the one after is twice as long (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.max);
        let quarter = u64::try_from(base.as_millis() / 4).unwrap_or(u64::MAX);
        base + Duration::from_millis(fastrand::u64(0..=quarter))
    }

    /// Sleeps for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts again from `min` (the remote end worked).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_limit_with_at_most_a_quarter_of_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        for base in [100, 200, 400, 500, 500] {
            let d = b.next_delay().as_millis();
            assert!((base..=base + base / 4).contains(&d), "{d} for {base}");
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(126));
    }
}
