//! The shared store global components keep their state in (`scope:
//! global`), as the engine sees it: a trait, so that the engine knows no
//! Redis and is tested with an in-memory store; `sluice-store` implements
//! it on Redis.
//!
//! Every call returns a future the caller bounds: a component on the Check
//! path never waits on the store longer than the store's own deadline
//! (`--redis-timeout`), and a store that keeps failing says so through
//! [`Store::available`] (its circuit breaker is open) so that Checks fall
//! back at once instead of waiting at all.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::token_bucket::BucketParams;

/// A future of the store; boxed, because the trait is used as an object.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Why the store could not answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Its breaker is open: it failed too often lately and is not asked.
    #[error("store unavailable (circuit open)")]
    Unavailable,
    /// It did not answer within its deadline.
    #[error("store did not answer in time")]
    Timeout,
    /// It answered with an error, or something that is not an answer.
    #[error("store error: {0}")]
    Failed(String),
}

/// Which shared state: a component of a policy, and the value of its
/// `limit_by_label_key` label if it has one. Every sidecar running the
/// same policy names the same state; different policies never do.
#[derive(Clone, Copy, Debug)]
pub struct StateId<'a> {
    /// The policy.
    pub policy: &'a str,
    /// The component.
    pub component: &'a str,
    /// The label value, if the component keeps state per value.
    pub label: Option<&'a str>,
}

/// What a token take granted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenGrant {
    /// Tokens granted: between the minimum asked and the number wanted, or
    /// 0 when the bucket did not hold the minimum.
    pub granted: f64,
    /// With nothing granted: how long until the minimum will be there
    /// (`None`: never, it is more than the bucket holds).
    pub retry_after: Option<Duration>,
}

/// The shared store.
pub trait Store: Send + Sync + 'static {
    /// Takes from bucket `id` (with `params`, refilled on the store's own
    /// clock) up to `want` tokens, but only if at least `min` are there.
    fn take_tokens(
        &self,
        id: StateId<'_>,
        params: BucketParams,
        want: f64,
        min: f64,
    ) -> StoreFuture<TokenGrant>;

    /// Takes a slot of count `id` for `holder` if fewer than `max` are
    /// held; the slot lapses by itself after `ttl` if never given back.
    /// True when taken.
    fn take_slot(&self, id: StateId<'_>, max: u64, holder: u64, ttl: Duration)
    -> StoreFuture<bool>;

    /// Gives `holder`'s slot of `id` back, in the background: the caller
    /// never waits (a slot not given back lapses at its ttl).
    fn give_back_slot(&self, id: StateId<'_>, holder: u64);

    /// False while the store is known to be failing (its breaker open):
    /// components then fall back without asking it.
    fn available(&self) -> bool;
}

/// A shared store handle.
pub type SharedStore = Arc<dyn Store>;

/// A store in memory, on the engine's (simulated) clock, for the engine's
/// tests: what the Redis scripts do, without Redis.
#[cfg(test)]
pub(crate) mod memory {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use parking_lot::Mutex;
    use sluice_time::{Clock, Nanos, nanos};

    use super::*;
    use crate::token_bucket::TokenBucket;

    /// The store.
    pub struct MemoryStore {
        clock: Clock,
        buckets: Mutex<HashMap<String, TokenBucket>>,
        /// Per count: holder → when its slot lapses.
        slots: Mutex<HashMap<String, HashMap<u64, Nanos>>>,
        /// Calls that reached the store.
        pub calls: AtomicU64,
        /// False: every call fails, and [`Store::available`] says so.
        pub up: AtomicBool,
        /// True: every call fails, but [`Store::available`] does not know
        /// yet (as before a breaker opens).
        pub failing: AtomicBool,
    }

    fn name(id: StateId<'_>) -> String {
        format!("{}/{}/{}", id.policy, id.component, id.label.unwrap_or(""))
    }

    impl MemoryStore {
        /// An empty store on `clock`.
        pub fn new(clock: Clock) -> Arc<Self> {
            Arc::new(MemoryStore {
                clock,
                buckets: Mutex::default(),
                slots: Mutex::default(),
                calls: AtomicU64::new(0),
                up: AtomicBool::new(true),
                failing: AtomicBool::new(false),
            })
        }

        /// Calls so far.
        pub fn calls(&self) -> u64 {
            self.calls.load(Ordering::Relaxed)
        }

        /// Slots held now in the count of component `component`.
        pub fn held(&self, component: &str) -> usize {
            let now = self.clock.now();
            self.slots
                .lock()
                .iter()
                .filter(|(k, _)| k.split('/').nth(1) == Some(component))
                .map(|(_, holders)| holders.values().filter(|&&until| until > now).count())
                .sum()
        }

        fn call(&self) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.up.load(Ordering::Relaxed) && !self.failing.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err(StoreError::Failed("down".into()))
            }
        }
    }

    impl Store for MemoryStore {
        fn take_tokens(
            &self,
            id: StateId<'_>,
            params: BucketParams,
            want: f64,
            min: f64,
        ) -> StoreFuture<TokenGrant> {
            let answer = self.call().map(|()| {
                let now = self.clock.now();
                let mut buckets = self.buckets.lock();
                let bucket = buckets
                    .entry(name(id))
                    .or_insert_with(|| TokenBucket::full(&params, now));
                // Taking nothing refills it to now.
                let _ = bucket.take(&params, now, 0.0);
                let have = bucket.tokens();
                if have >= min && have > 0.0 {
                    let granted = want.min(have);
                    let _ = bucket.take(&params, now, granted);
                    TokenGrant {
                        granted,
                        retry_after: None,
                    }
                } else {
                    let wait = bucket.wait(&params, now, min);
                    TokenGrant {
                        granted: 0.0,
                        retry_after: wait.map(Duration::from_nanos),
                    }
                }
            });
            Box::pin(std::future::ready(answer))
        }

        fn take_slot(
            &self,
            id: StateId<'_>,
            max: u64,
            holder: u64,
            ttl: Duration,
        ) -> StoreFuture<bool> {
            let answer = self.call().map(|()| {
                let now = self.clock.now();
                let mut slots = self.slots.lock();
                let holders = slots.entry(name(id)).or_default();
                holders.retain(|_, until| *until > now);
                let free = (holders.len() as u64) < max;
                if free {
                    holders.insert(holder, now.saturating_add(nanos(ttl)));
                }
                free
            });
            Box::pin(std::future::ready(answer))
        }

        fn give_back_slot(&self, id: StateId<'_>, holder: u64) {
            if self.call().is_ok()
                && let Some(holders) = self.slots.lock().get_mut(&name(id))
            {
                holders.remove(&holder);
            }
        }

        fn available(&self) -> bool {
            self.up.load(Ordering::Relaxed)
        }
    }
}
