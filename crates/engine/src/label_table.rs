//! Bounded per-label state: one value (a token bucket, an in-flight count)
//! per value of a label, for components with `limit_by_label_key`.
//!
//! Label values come from requests, so both their number and their size are
//! the client's choice. Values are therefore stored as a 128-bit digest
//! (xxh3 with a per-process random seed, so collisions cannot be aimed at):
//! an entry costs the same for a 3-byte user id and a 60 KiB header, and a
//! new value allocates nothing. The number of entries is bounded: when a
//! new value arrives and its shard is full, the least recently used of a
//! few entries sampled at random positions is evicted (as Redis does),
//! which is O(1) and needs no global LRU list on the request path. Entries
//! the component marks as not evictable (a concurrency count that still
//! holds slots) are never evicted: if a whole sample is busy, the table
//! grows past its bound, by at most the flows in flight, which their own
//! table bounds. Entries unused for the component's idle time are swept out
//! by a background task. Evictions and expiries are counted.
//!
//! Why not a cache crate (moka, quick_cache)? Their clocks cannot be driven
//! by the engine's [`Clock`](sluice_time::Clock), so expiry could not be
//! tested on simulated time, they cannot be told that an entry is in use,
//! and their per-access bookkeeping costs more than the token-bucket
//! arithmetic this table guards.

use indexmap::IndexMap;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};

use sluice_time::Nanos;

use crate::metrics::{Metrics, Series};

/// Shards: enough that two to four worker threads rarely meet on one lock.
const SHARDS: usize = 16;
/// Entries examined to pick a victim when a shard is full.
const EVICTION_SAMPLE: usize = 8;

/// A label value as tables and queues key it.
pub type Digest = u128;

/// The digest of a label value: xxh3-128 with a seed drawn once per
/// process, so that values colliding on purpose cannot be computed from
/// outside.
#[inline]
pub fn digest(value: &str) -> Digest {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| fastrand::u64(..));
    xxhash_rust::xxh3::xxh3_128_with_seed(value.as_bytes(), seed)
}

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
    /// The `label_state_*` series of component `component` of `policy`,
    /// recorded in its `series`.
    pub fn of_component(
        metrics: &Metrics,
        series: &mut Series,
        policy: &str,
        component: &str,
    ) -> Self {
        let labels = &[policy, component];
        TableMetrics {
            evicted: metrics.label_state_evicted.series(series, labels),
            expired: metrics.label_state_expired.series(series, labels),
            entries: metrics.label_state_entries.series(series, labels),
        }
    }
}

struct Slot<V> {
    value: V,
    last_used: Nanos,
}

type Shard<V> = IndexMap<Digest, Slot<V>, ahash::RandomState>;

/// A bounded, sharded map from label value to `V`.
pub struct LabelTable<V> {
    /// The entries, spread over shards by digest.
    shards: Box<[Mutex<Shard<V>>]>,
    /// Most entries one shard holds (unless all sampled are busy).
    shard_capacity: usize,
    /// Whether an entry may be evicted to make room.
    evictable: fn(&V) -> bool,
    /// Where evictions and expiries are counted.
    metrics: TableMetrics,
}

impl<V> LabelTable<V> {
    /// A table holding at most about `capacity` entries; `evictable` says
    /// which may make room for new ones.
    pub fn new(capacity: usize, metrics: TableMetrics, evictable: fn(&V) -> bool) -> Self {
        LabelTable {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(IndexMap::default()))
                .collect(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
            evictable,
            metrics,
        }
    }

    /// The digest of a label value (see [`digest`]).
    #[inline]
    pub fn digest(&self, value: &str) -> Digest {
        digest(value)
    }

    fn shard(&self, key: Digest) -> &Mutex<Shard<V>> {
        // The high bits: the low ones pick the slot inside the shard's map.
        &self.shards[((key >> 64) as usize) % SHARDS]
    }

    /// Runs `f` on the entry for `key`, creating it with `init` if needed.
    #[inline]
    pub fn with<R>(
        &self,
        key: &str,
        now: Nanos,
        init: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> R {
        self.with_digest(self.digest(key), now, init, f)
    }

    /// As [`LabelTable::with`], for a digest from [`LabelTable::digest`].
    pub fn with_digest<R>(
        &self,
        key: Digest,
        now: Nanos,
        init: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> R {
        let mut shard = self.shard(key).lock();
        if let Some(slot) = shard.get_mut(&key) {
            slot.last_used = now;
            return f(&mut slot.value);
        }
        if shard.len() >= self.shard_capacity && self.evict_one(&mut shard) {
            self.metrics.evicted.inc();
        }
        let slot = shard.entry(key).or_insert(Slot {
            value: init(),
            last_used: now,
        });
        f(&mut slot.value)
    }

    /// Runs `f` on the entry for a digest if there is one.
    pub fn with_existing<R>(&self, key: Digest, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.shard(key)
            .lock()
            .get_mut(&key)
            .map(|slot| f(&mut slot.value))
    }

    /// Evicts the least recently used evictable entry of a random sample;
    /// false when every sampled entry is busy.
    fn evict_one(&self, shard: &mut Shard<V>) -> bool {
        let len = shard.len();
        let victim = (0..EVICTION_SAMPLE.min(len))
            .map(|_| fastrand::usize(..len))
            .filter(|&i| {
                shard
                    .get_index(i)
                    .is_some_and(|(_, s)| (self.evictable)(&s.value))
            })
            .min_by_key(|&i| shard.get_index(i).map_or(Nanos::MAX, |(_, s)| s.last_used));
        match victim {
            Some(i) => {
                shard.swap_remove_index(i);
                true
            }
            None => false,
        }
    }

    /// Drops evictable entries unused for longer than `max_idle`, then
    /// updates the entries gauge. Returns how many were dropped.
    pub fn sweep(&self, now: Nanos, max_idle: Nanos) -> usize {
        let mut dropped = 0;
        let mut total = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let before = shard.len();
            shard.retain(|_, slot| {
                now.saturating_sub(slot.last_used) <= max_idle || !(self.evictable)(&slot.value)
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

/// For tables whose every entry may be evicted.
pub fn always<V>(_: &V) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> TableMetrics {
        TableMetrics {
            evicted: IntCounter::new("e", "e").unwrap(),
            expired: IntCounter::new("x", "x").unwrap(),
            entries: IntGauge::new("n", "n").unwrap(),
        }
    }

    fn table(capacity: usize) -> LabelTable<u32> {
        LabelTable::new(capacity, metrics(), always)
    }

    fn get(t: &LabelTable<u32>, key: &str) -> Option<u32> {
        t.with_existing(t.digest(key), |v| *v)
    }

    #[test]
    fn values_are_kept_per_key() {
        let t = table(100);
        t.with("a", 0, || 0, |v| *v += 1);
        t.with("a", 0, || 0, |v| *v += 1);
        t.with("b", 0, || 0, |v| *v += 5);
        assert_eq!(get(&t, "a"), Some(2));
        assert_eq!(get(&t, "b"), Some(5));
        assert_eq!(get(&t, "c"), None);
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
    fn huge_values_cost_no_more_than_small_ones() {
        let t = table(10);
        let huge = "x".repeat(1 << 20);
        t.with(&huge, 0, || 7, |_| ());
        assert_eq!(get(&t, &huge), Some(7));
        assert_eq!(std::mem::size_of::<Digest>(), 16);
    }

    #[test]
    fn eviction_prefers_the_least_recently_used_at_random_positions() {
        // Fill, then keep touching the first half while new keys arrive:
        // the untouched half goes, the busy half stays. Seeded: the
        // touches, and the positions eviction samples (this thread's
        // generator), are the same on every run.
        fastrand::seed(0x5eed);
        let mut touches = fastrand::Rng::with_seed(11);
        let t = table(1600);
        let old: Vec<String> = (0..1600).map(|i| format!("old-{i}")).collect();
        for k in &old {
            t.with(k, 0, || 0, |_| ());
        }
        for i in 0..3200u64 {
            for k in old.iter().take(800) {
                if touches.u64(..100) == 0 {
                    t.with(k, i + 1, || 0, |_| ());
                }
            }
            t.with(&format!("new-{i}"), i + 1, || 0, |_| ());
        }
        let stale_left = old[800..].iter().filter(|k| get(&t, k).is_some()).count();
        assert!(
            stale_left < 40,
            "{stale_left} of 800 untouched old keys survived"
        );
    }

    #[test]
    fn busy_entries_are_never_evicted() {
        let t: LabelTable<u32> = LabelTable::new(16, metrics(), |n| *n == 0);
        for i in 0..16 {
            t.with(&format!("busy-{i}"), 0, || 1, |_| ());
        }
        for i in 0..100 {
            t.with(&format!("idle-{i}"), 1, || 0, |_| ());
        }
        for i in 0..16 {
            assert_eq!(get(&t, &format!("busy-{i}")), Some(1), "busy-{i}");
        }
        let idle = t.len() - 16;
        assert_eq!(t.sweep(1_000, 0), idle);
        assert_eq!(t.len(), 16);
    }

    #[test]
    fn idle_entries_expire_on_sweep() {
        let t = table(100);
        t.with("stale", 0, || 0, |_| ());
        t.with("fresh", 0, || 0, |_| ());
        t.with("fresh", 900, || 0, |_| ());
        assert_eq!(t.sweep(1_000, 500), 1);
        assert_eq!(get(&t, "stale"), None);
        assert_eq!(get(&t, "fresh"), Some(0));
        assert_eq!(t.metrics().expired.get(), 1);
        assert_eq!(t.metrics().entries.get(), 1);
    }
}
