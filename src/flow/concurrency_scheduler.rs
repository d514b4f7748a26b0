//! Concurrency schedulers: at most `max_concurrency` flows in flight; the
//! excess waits in weighted-fair order instead of being rejected at once.
//!
//! A slot is taken at admission and returned when the flow's access log
//! arrives (or after `max_inflight_duration`), exactly as for concurrency
//! limiters ([`super::inflight`]); a returned slot wakes the queue, which
//! admits the next request in fair order.

use std::sync::Arc;

use super::concurrency_limiter::{Slot, SlotOwner};
use super::label_table::Digest;
use super::scheduler::{Config, Scheduler, Source, wfq};
use super::selector::Selector;
use crate::clock::{Clock, Nanos, nanos};
use crate::policy::ConcurrencySchedulerSpec;
use crate::telemetry::Metrics;

/// Slots in use out of `max`.
#[derive(Debug)]
pub struct Slots {
    /// Most in flight.
    pub max: u64,
    /// In flight now.
    pub used: u64,
}

impl wfq::Capacity for Slots {
    fn try_take(&mut self, _now: Nanos, _tokens: f64) -> bool {
        let free = self.used < self.max;
        if free {
            self.used += 1;
        }
        free
    }

    fn ready_at(&self, _now: Nanos, _tokens: f64) -> Option<Nanos> {
        // Only a returned slot makes room; it wakes the queue itself.
        None
    }
}

impl Source for Slots {
    fn with<R>(
        &mut self,
        _key: Option<Digest>,
        _now: Nanos,
        f: impl FnOnce(&mut dyn wfq::Capacity) -> R,
    ) -> R {
        f(self)
    }

    fn give_back(&mut self, _key: Option<Digest>, _tokens: f64) {
        self.used = self.used.saturating_sub(1);
    }
}

impl SlotOwner for Scheduler<Slots> {
    fn release(&self, key: Option<Digest>) {
        self.give_back(key, 1.0);
    }
}

/// One compiled concurrency scheduler.
#[derive(Debug)]
pub struct ConcurrencyScheduler {
    /// The queue and its slots.
    pub scheduler: Arc<Scheduler<Slots>>,
    /// `policy/name`: how `sluice.flow` refers to it.
    pub key: Box<str>,
    /// When a flow's slot is given back if its log never arrives.
    pub max_inflight: Nanos,
    /// What it was compiled from, to keep it across reloads that leave it
    /// unchanged.
    spec: ConcurrencySchedulerSpec,
}

fn same(a: &ConcurrencySchedulerSpec, b: &ConcurrencySchedulerSpec) -> bool {
    a.name.value == b.name.value
        && a.selectors == b.selectors
        && a.max_concurrency == b.max_concurrency
        && a.max_inflight_duration == b.max_inflight_duration
        && a.scheduler == b.scheduler
}

impl ConcurrencyScheduler {
    /// Compiles a concurrency scheduler of `policy`; an unchanged one keeps
    /// `previous`'s queue and count of flows in flight.
    pub fn compile(
        policy: &Arc<str>,
        spec: &ConcurrencySchedulerSpec,
        metrics: &Metrics,
        clock: &Clock,
        previous: Option<&ConcurrencyScheduler>,
    ) -> Self {
        if let Some(old) = previous.filter(|old| same(&old.spec, spec)) {
            return ConcurrencyScheduler {
                scheduler: old.scheduler.clone(),
                key: old.key.clone(),
                max_inflight: old.max_inflight,
                spec: spec.clone(),
            };
        }
        let name: Arc<str> = spec.name.value.0.as_str().into();
        let config = Config::compile(&spec.scheduler, metrics, policy, &name);
        ConcurrencyScheduler {
            key: format!("{policy}/{name}").into(),
            scheduler: Arc::new(Scheduler::new(
                policy,
                name,
                spec.selectors.iter().map(Selector::compile).collect(),
                config,
                clock.clone(),
                Slots {
                    max: spec.max_concurrency,
                    used: 0,
                },
            )),
            max_inflight: nanos(spec.max_inflight_duration.0),
            spec: spec.clone(),
        }
    }

    /// The slot an admitted flow holds until its access log arrives.
    pub fn slot(&self) -> Slot {
        Slot::new(self.scheduler.clone(), None)
    }

    /// Flows in flight now.
    pub fn in_flight(&self) -> u64 {
        self.scheduler.with_source(|s| s.used)
    }
}
