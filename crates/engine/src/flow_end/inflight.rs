//! Flows in flight: the concurrency slots an admitted flow holds until its
//! access log arrives.
//!
//! Keyed by flow id (random 64-bit, carried in `sluice.flow`). Each slot
//! has its own deadline (its limiter's `max_inflight_duration`), past which
//! [`InFlight::sweep`] drops it and counts the flow as expired. Bounded:
//! when a shard is full, the entry closest to its deadline among a few
//! sampled at random is dropped early and counted as evicted. A slot is a
//! [`Claim`](crate::admission::Claim): dropping it gives it back, which
//! this table always does outside its shard lock, because giving a slot
//! back takes its owner's lock (and may wake a scheduler's queue).

use indexmap::IndexMap;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use sluice_time::Nanos;
use smallvec::SmallVec;

use crate::admission::Slots;

const SHARDS: usize = 16;
const EVICTION_SAMPLE: usize = 8;

struct Entry {
    /// The earliest deadline of its slots.
    deadline: Nanos,
    slots: Slots,
}

fn earliest(slots: &Slots) -> Nanos {
    slots.iter().map(|(_, d)| *d).min().unwrap_or(0)
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

type Shard = IndexMap<u64, Entry, ahash::RandomState>;

/// The table.
pub struct InFlight {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    metrics: InFlightMetrics,
}

impl InFlight {
    /// A table of at most about `capacity` flows.
    pub fn new(capacity: usize, metrics: InFlightMetrics) -> Self {
        InFlight {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(IndexMap::default()))
                .collect(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
            metrics,
        }
    }

    fn shard(&self, id: u64) -> &Mutex<Shard> {
        // Flow ids are uniformly random: their low bits pick the shard.
        &self.shards[(id as usize) % SHARDS]
    }

    /// Records that flow `id` holds `slots` (nothing when it holds none).
    pub fn insert(&self, id: u64, slots: Slots) {
        if slots.is_empty() {
            return;
        }
        let deadline = earliest(&slots);
        let dropped: SmallVec<[Entry; 2]> = {
            let mut shard = self.shard(id).lock();
            let victim = if shard.len() >= self.shard_capacity {
                let len = shard.len();
                (0..EVICTION_SAMPLE.min(len))
                    .map(|_| fastrand::usize(..len))
                    .min_by_key(|&i| shard.get_index(i).map_or(Nanos::MAX, |(_, e)| e.deadline))
                    .and_then(|i| shard.swap_remove_index(i))
                    .map(|(_, e)| e)
            } else {
                None
            };
            // A colliding id (one in 2^64) would strand the older entry's
            // slots: drop them (given back) rather than lose them.
            let replaced = shard.insert(id, Entry { deadline, slots });
            victim.into_iter().chain(replaced).collect()
        };
        self.metrics.evicted.inc_by(dropped.len() as u64);
        drop(dropped);
    }

    /// Flow `id` ended: gives its slots back. False if it held none (or
    /// had expired or been evicted already).
    pub fn finish(&self, id: u64) -> bool {
        let entry = self.shard(id).lock().swap_remove(&id);
        entry.is_some()
    }

    /// Gives back every slot past its deadline; a flow all of whose slots
    /// are back leaves the table and counts as expired. Returns how many
    /// flows left.
    pub fn sweep(&self, now: Nanos) -> usize {
        let mut due: Vec<(crate::admission::Claim<'static>, Nanos)> = Vec::new();
        let mut expired = 0;
        let mut held = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.retain(|_, e| {
                if e.deadline > now {
                    return true;
                }
                let (late, kept): (Slots, Slots) = e.slots.drain(..).partition(|(_, d)| *d <= now);
                due.extend(late);
                e.slots = kept;
                e.deadline = earliest(&e.slots);
                if e.slots.is_empty() {
                    expired += 1;
                    false
                } else {
                    true
                }
            });
            held += shard.len();
        }
        self.metrics.expired.inc_by(expired as u64);
        self.metrics.flows.set(held as i64);
        drop(due);
        expired
    }

    /// The id of some flow held now (for tests).
    #[cfg(test)]
    pub fn any_id(&self) -> Option<u64> {
        self.shards
            .iter()
            .find_map(|s| s.lock().keys().next().copied())
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
    use crate::components::concurrency_limiter::{Acquired, ConcurrencyLimiter};
    use crate::labels::{FlowLabels, MapLabels};
    use crate::metrics::Metrics;
    use sluice_policy::ConcurrencyLimiterSpec;

    fn metrics() -> InFlightMetrics {
        InFlightMetrics {
            flows: IntGauge::new("f", "f").unwrap(),
            expired: IntCounter::new("x", "x").unwrap(),
            evicted: IntCounter::new("e", "e").unwrap(),
        }
    }

    fn limiter(max: u64) -> std::sync::Arc<ConcurrencyLimiter> {
        let yaml =
            format!("name: cl\nselectors: [{{control_point: ingress}}]\nmax_concurrency: {max}\n");
        let spec: ConcurrencyLimiterSpec = serde_saphyr::from_str(&yaml).expect("valid");
        std::sync::Arc::new(ConcurrencyLimiter::compile(
            &"p".into(),
            &spec,
            &Metrics::new(),
            10,
            None,
            None,
        ))
    }

    fn slot(l: &std::sync::Arc<ConcurrencyLimiter>, deadline: Nanos) -> Slots {
        let source = MapLabels::default();
        let Acquired::Taken(Some(s)) = l.acquire(&FlowLabels::new(&source), 0) else {
            panic!("a free slot");
        };
        SmallVec::from_iter([(s, deadline)])
    }

    #[test]
    fn finishing_a_flow_gives_its_slots_back_once() {
        let l = limiter(1);
        let t = InFlight::new(100, metrics());
        t.insert(7, slot(&l, 1_000));
        assert_eq!(l.in_flight(), 1);
        assert!(t.finish(7));
        assert!(!t.finish(7), "a second log for the flow changes nothing");
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn expiry_on_simulated_time() {
        let l = limiter(3);
        let t = InFlight::new(100, metrics());
        t.insert(1, slot(&l, 1_000));
        t.insert(2, slot(&l, 5_000));
        assert_eq!(t.sweep(999), 0);
        assert_eq!(t.sweep(1_000), 1);
        assert_eq!(l.in_flight(), 1);
        assert_eq!(t.metrics.expired.get(), 1);
        assert_eq!(t.metrics.flows.get(), 1);
        assert_eq!(t.sweep(10_000), 1);
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn each_slot_keeps_its_own_deadline() {
        let short = limiter(1);
        let long = limiter(1);
        let t = InFlight::new(100, metrics());
        let mut both = slot(&short, 5_000);
        both.extend(slot(&long, 60_000));
        t.insert(9, both);
        assert_eq!(
            t.sweep(5_000),
            0,
            "the flow is still in flight for the long limiter"
        );
        assert_eq!(short.in_flight(), 0);
        assert_eq!(long.in_flight(), 1);
        assert_eq!(t.sweep(60_000), 1);
        assert_eq!(long.in_flight(), 0);
        assert_eq!(t.metrics.expired.get(), 1);
    }

    #[test]
    fn a_full_table_evicts_and_gives_back() {
        let l = limiter(1000);
        let t = InFlight::new(16, metrics());
        for id in 0..200u64 {
            t.insert(id, slot(&l, id));
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
