//! Flows in flight: the concurrency slots an accepted flow holds until its
//! access log arrives.
//!
//! Keyed by flow id (random 64-bit, carried in `sluice.flow`). Bounded:
//! when a shard is full, the entry closest to its deadline among a few
//! sampled is finished early (its slots returned) and counted as evicted.
//! Entries past their deadline (`max_inflight_duration`) are finished by
//! [`InFlight::sweep`] and counted as expired. Slots are always released
//! outside the shard lock.

use std::collections::HashMap;

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use smallvec::SmallVec;

use super::concurrency_limiter::Slot;
use crate::clock::Nanos;

const SHARDS: usize = 16;
const EVICTION_SAMPLE: usize = 8;

/// The slots of one flow.
pub type Slots = SmallVec<[Slot; 1]>;

struct Entry {
    deadline: Nanos,
    slots: Slots,
}

/// Counters of the table.
#[derive(Clone, Debug)]
pub struct InFlightMetrics {
    /// Flows held now (updated on sweep).
    pub flows: IntGauge,
    /// Flows finished by their deadline, their log never seen.
    pub expired: IntCounter,
    /// Flows finished early because the table was full.
    pub evicted: IntCounter,
}

/// The table.
pub struct InFlight {
    shards: Box<[Mutex<HashMap<u64, Entry, ahash::RandomState>>]>,
    shard_capacity: usize,
    metrics: InFlightMetrics,
}

impl InFlight {
    /// A table of at most about `capacity` flows.
    pub fn new(capacity: usize, metrics: InFlightMetrics) -> Self {
        InFlight {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
            metrics,
        }
    }

    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Entry, ahash::RandomState>> {
        // Flow ids are uniformly random: their low bits pick the shard.
        &self.shards[(id as usize) % SHARDS]
    }

    /// Records that flow `id` holds `slots` until `deadline`.
    pub fn insert(&self, id: u64, deadline: Nanos, slots: Slots) {
        let evicted = {
            let mut shard = self.shard(id).lock();
            let victim = if shard.len() >= self.shard_capacity {
                let key = shard
                    .iter()
                    .take(EVICTION_SAMPLE)
                    .min_by_key(|(_, e)| e.deadline)
                    .map(|(k, _)| *k);
                key.and_then(|k| shard.remove(&k))
            } else {
                None
            };
            // A colliding id (one in 2^64) would strand the older entry's
            // slots: release them rather than lose them.
            let replaced = shard.insert(id, Entry { deadline, slots });
            victim
                .into_iter()
                .chain(replaced)
                .collect::<SmallVec<[Entry; 2]>>()
        };
        for e in evicted {
            self.metrics.evicted.inc();
            e.slots.into_iter().for_each(Slot::release);
        }
    }

    /// Flow `id` ended: gives its slots back. False if it held none (or
    /// had expired or been evicted already).
    pub fn finish(&self, id: u64) -> bool {
        let entry = self.shard(id).lock().remove(&id);
        match entry {
            Some(e) => {
                e.slots.into_iter().for_each(Slot::release);
                true
            }
            None => false,
        }
    }

    /// Finishes every flow past its deadline; returns how many.
    pub fn sweep(&self, now: Nanos) -> usize {
        let mut expired = Vec::new();
        let mut held = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let stale: SmallVec<[u64; 16]> = shard
                .iter()
                .filter(|(_, e)| e.deadline <= now)
                .map(|(k, _)| *k)
                .collect();
            expired.extend(stale.iter().filter_map(|k| shard.remove(k)));
            held += shard.len();
        }
        let n = expired.len();
        self.metrics.expired.inc_by(n as u64);
        self.metrics.flows.set(held as i64);
        for e in expired {
            e.slots.into_iter().for_each(Slot::release);
        }
        n
    }

    /// Flows held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// True when no flow is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::concurrency_limiter::ConcurrencyLimiter;
    use crate::flow::labels::{FlowLabels, MapLabels};
    use crate::policy::ConcurrencyLimiterSpec;
    use crate::telemetry::Metrics;

    fn metrics() -> InFlightMetrics {
        InFlightMetrics {
            flows: IntGauge::new("f", "f").unwrap(),
            expired: IntCounter::new("x", "x").unwrap(),
            evicted: IntCounter::new("e", "e").unwrap(),
        }
    }

    fn limiter(max: u64) -> ConcurrencyLimiter {
        let yaml =
            format!("name: cl\nselectors: [{{control_point: ingress}}]\nmax_concurrency: {max}\n");
        let spec: ConcurrencyLimiterSpec = serde_saphyr::from_str(&yaml).expect("valid");
        ConcurrencyLimiter::compile(&"p".into(), &spec, &Metrics::new(), 10, None)
    }

    fn slot(l: &ConcurrencyLimiter) -> Slots {
        let source = MapLabels::default();
        let s = l
            .acquire(&FlowLabels::new(&source), 0)
            .expect("free")
            .expect("slot");
        SmallVec::from_iter([s])
    }

    #[test]
    fn finishing_a_flow_returns_its_slots_once() {
        let l = limiter(1);
        let t = InFlight::new(100, metrics());
        t.insert(7, 1_000, slot(&l));
        assert_eq!(l.in_flight(), 1);
        assert!(t.finish(7));
        assert!(!t.finish(7), "a second log for the flow changes nothing");
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn expiry_on_simulated_time() {
        let l = limiter(3);
        let t = InFlight::new(100, metrics());
        t.insert(1, 1_000, slot(&l));
        t.insert(2, 5_000, slot(&l));
        assert_eq!(t.sweep(999), 0);
        assert_eq!(t.sweep(1_000), 1);
        assert_eq!(l.in_flight(), 1);
        assert_eq!(t.metrics.expired.get(), 1);
        assert_eq!(t.metrics.flows.get(), 1);
        assert_eq!(t.sweep(10_000), 1);
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn a_full_table_evicts_and_releases() {
        let l = limiter(1000);
        let t = InFlight::new(16, metrics());
        for id in 0..200u64 {
            t.insert(id, id, slot(&l));
        }
        assert!(t.len() <= 16);
        assert_eq!(t.metrics.evicted.get() as usize, 200 - t.len());
        assert_eq!(
            l.in_flight() as usize,
            t.len(),
            "evicted flows gave their slots back"
        );
    }
}
