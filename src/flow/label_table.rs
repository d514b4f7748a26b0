//! Bounded per-label state: one value (a token bucket, an in-flight count)
//! per value of a label, for components with `limit_by_label_key`.
//!
//! Label values come from requests, so their number is the client's choice.
//! The table therefore has a hard capacity: when a new value arrives and its
//! shard is full, the least recently used of a few sampled entries is evicted
//! (as Redis does), which is O(1) and needs no global LRU list on the request
//! path. Entries unused for the component's `max_idle_time` are swept out by
//! a background task. Both are counted.
//!
//! Why not a cache crate (moka, quick_cache)? Their clocks cannot be driven
//! by the engine's [`Clock`](crate::clock::Clock), so expiry could not be
//! tested on simulated time, and their per-access bookkeeping costs more than
//! the token-bucket arithmetic this table guards.

use std::collections::HashMap;

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};

use crate::clock::Nanos;

/// Shards: enough that two to four worker threads rarely meet on one lock.
const SHARDS: usize = 16;
/// Entries examined to pick a victim when a shard is full.
const EVICTION_SAMPLE: usize = 8;

/// Counters a table reports to.
#[derive(Clone, Debug)]
pub struct TableMetrics {
    /// Entries dropped because the table was full.
    pub evicted: IntCounter,
    /// Entries dropped after being idle too long.
    pub expired: IntCounter,
    /// Entries held now (updated by [`LabelTable::sweep`]).
    pub entries: IntGauge,
}

impl TableMetrics {
    /// The `label_state_*` series of one component.
    pub fn of_component(
        metrics: &crate::telemetry::Metrics,
        policy: &str,
        component: &str,
    ) -> Self {
        let labels = &[policy, component];
        TableMetrics {
            evicted: metrics.label_state_evicted.with_label_values(labels),
            expired: metrics.label_state_expired.with_label_values(labels),
            entries: metrics.label_state_entries.with_label_values(labels),
        }
    }
}

struct Slot<V> {
    value: V,
    last_used: Nanos,
}

type Shard<V> = HashMap<Box<str>, Slot<V>, ahash::RandomState>;

/// A bounded, sharded map from label value to `V`.
pub struct LabelTable<V> {
    /// The entries, spread over shards by hash of the label value.
    shards: Box<[Mutex<Shard<V>>]>,
    /// Picks the shard; seeded per table.
    hasher: ahash::RandomState,
    /// Most entries one shard holds.
    shard_capacity: usize,
    /// Where evictions and expiries are counted.
    metrics: TableMetrics,
}

impl<V> LabelTable<V> {
    /// A table holding at most about `capacity` entries.
    pub fn new(capacity: usize, metrics: TableMetrics) -> Self {
        LabelTable {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            hasher: ahash::RandomState::new(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
            metrics,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard<V>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    /// Runs `f` on the entry for `key`, creating it with `init` if needed.
    /// Allocates only when the key is new.
    #[inline]
    pub fn with<R>(
        &self,
        key: &str,
        now: Nanos,
        init: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> R {
        let mut shard = self.shard(key).lock();
        if let Some(slot) = shard.get_mut(key) {
            slot.last_used = now;
            return f(&mut slot.value);
        }
        if shard.len() >= self.shard_capacity {
            Self::evict_one(&mut shard);
            self.metrics.evicted.inc();
        }
        let slot = shard.entry(key.into()).or_insert(Slot {
            value: init(),
            last_used: now,
        });
        f(&mut slot.value)
    }

    /// Runs `f` on the entry for `key` if there is one.
    pub fn with_existing<R>(&self, key: &str, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.shard(key)
            .lock()
            .get_mut(key)
            .map(|slot| f(&mut slot.value))
    }

    fn evict_one(shard: &mut Shard<V>) {
        let victim = shard
            .iter()
            .take(EVICTION_SAMPLE)
            .min_by_key(|(_, slot)| slot.last_used)
            .map(|(key, _)| key.clone());
        if let Some(key) = victim {
            shard.remove(&key);
        }
    }

    /// Drops entries unused for longer than `max_idle` (and, when `keep` is
    /// given, only those for which it returns false), then updates the
    /// entries gauge. Returns how many were dropped.
    pub fn sweep(&self, now: Nanos, max_idle: Nanos, keep: impl Fn(&V) -> bool) -> usize {
        let mut dropped = 0;
        let mut total = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let before = shard.len();
            shard.retain(|_, slot| {
                now.saturating_sub(slot.last_used) <= max_idle || keep(&slot.value)
            });
            dropped += before - shard.len();
            total += shard.len();
        }
        self.metrics.expired.inc_by(dropped as u64);
        self.metrics.entries.set(total as i64);
        dropped
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters this table reports to.
    pub fn metrics(&self) -> &TableMetrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(capacity: usize) -> LabelTable<u32> {
        LabelTable::new(
            capacity,
            TableMetrics {
                evicted: IntCounter::new("e", "e").unwrap(),
                expired: IntCounter::new("x", "x").unwrap(),
                entries: IntGauge::new("n", "n").unwrap(),
            },
        )
    }

    #[test]
    fn values_are_kept_per_key() {
        let t = table(100);
        t.with("a", 0, || 0, |v| *v += 1);
        t.with("a", 0, || 0, |v| *v += 1);
        t.with("b", 0, || 0, |v| *v += 5);
        assert_eq!(t.with_existing("a", |v| *v), Some(2));
        assert_eq!(t.with_existing("b", |v| *v), Some(5));
        assert_eq!(t.with_existing("c", |v| *v), None);
    }

    #[test]
    fn capacity_is_a_hard_bound_and_evictions_are_counted() {
        let t = table(64);
        for i in 0..10_000u64 {
            t.with(&format!("user-{i}"), i, || 0, |_| ());
        }
        assert!(t.len() <= 64, "{}", t.len());
        assert_eq!(t.metrics().evicted.get(), 10_000 - t.len() as u64);
    }

    #[test]
    fn eviction_prefers_the_least_recently_used() {
        // One entry per shard at most: the newest key must survive.
        let t = table(1);
        t.with("old", 1, || 1, |_| ());
        t.with("new", 2, || 2, |_| ());
        assert_eq!(t.with_existing("new", |v| *v), Some(2));
    }

    #[test]
    fn idle_entries_expire_on_sweep() {
        let t = table(100);
        t.with("stale", 0, || 0, |_| ());
        t.with("fresh", 0, || 0, |_| ());
        t.with("fresh", 900, || 0, |_| ());
        assert_eq!(t.sweep(1_000, 500, |_| false), 1);
        assert_eq!(t.with_existing("stale", |v| *v), None);
        assert_eq!(t.with_existing("fresh", |v| *v), Some(0));
        assert_eq!(t.metrics().expired.get(), 1);
        assert_eq!(t.metrics().entries.get(), 1);
        // `keep` protects entries that still hold something.
        t.with("busy", 1_000, || 7, |_| ());
        assert_eq!(t.sweep(10_000, 500, |v| *v == 7), 1);
        assert_eq!(t.with_existing("busy", |v| *v), Some(7));
    }
}
