//! Concurrency schedulers: at most `max_concurrency` flows in flight; the
//! excess waits in weighted-fair order instead of being rejected at once.
//!
//! A slot is taken at admission and returned when the flow's access log
//! arrives (or after `max_inflight_duration`), exactly as for concurrency
//! limiters ([`crate::flow_end::inflight`]); a returned slot wakes the
//! queue, which admits the next request in fair order.

use std::sync::Arc;

use sluice_policy::ConcurrencySchedulerSpec;
use sluice_time::{Clock, Nanos, nanos};

use super::scheduler::{Config, Pool, Scheduler};
use super::wfq;
use crate::components::selector::Selector;
use crate::label_table::Digest;
use crate::metrics::{Metrics, Series};

/// Slots in use out of `max`.
#[derive(Debug)]
pub struct SlotPool {
    /// Most in flight.
    pub max: u64,
    /// In flight now.
    pub used: u64,
}

impl wfq::Capacity for SlotPool {
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

impl Pool for SlotPool {
    fn with<R>(
        &mut self,
        _key: Option<Digest>,
        _now: Nanos,
        f: impl FnOnce(&mut dyn wfq::Capacity) -> R,
    ) -> R {
        f(self)
    }

    /// One slot, whatever the flow's tokens.
    fn give_back(&mut self, _key: Option<Digest>, _tokens: f64) {
        self.used = self.used.saturating_sub(1);
    }
}

/// One compiled concurrency scheduler.
#[derive(Debug)]
pub struct ConcurrencyScheduler {
    /// The queue and its slots.
    pub scheduler: Arc<Scheduler<SlotPool>>,
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
        let config = Config::compile(&spec.scheduler, metrics, Series::default(), policy, &name);
        ConcurrencyScheduler {
            key: format!("{policy}/{name}").into(),
            scheduler: Arc::new(Scheduler::new(
                policy,
                name,
                spec.selectors.iter().map(Selector::compile).collect(),
                config,
                clock.clone(),
                SlotPool {
                    max: spec.max_concurrency,
                    used: 0,
                },
            )),
            max_inflight: nanos(spec.max_inflight_duration.0),
            spec: spec.clone(),
        }
    }

    /// Flows in flight now.
    pub fn in_flight(&self) -> u64 {
        self.scheduler.with_pool(|s| s.used)
    }
}
