//! Concurrency schedulers: at most `max_concurrency` flows in flight; the
//! excess waits in weighted-fair order instead of being rejected at once.
//!
//! A slot is taken at admission and returned when the flow's access log
//! arrives (or after `max_inflight_duration`), exactly as for concurrency
//! limiters ([`crate::flow_end::inflight`]); a returned slot wakes the
//! queue, which admits the next request in fair order.
//!
//! With `scope: global` the count is in the store, shared by every sidecar
//! running the policy, and the queue stays local. When the queue needs a
//! slot, the scheduler takes one in the store in the background (one
//! round trip, one at a time) and admits its next request in fair order
//! when it arrives; a flow's access log gives its slot back to the store.
//! While the store's count is full, the queue asks again every
//! [`FULL_RETRY`] (slots freed by other sidecars are not announced). A
//! slot taken for a queue that emptied meanwhile goes straight back.
//!
//! The controller can drive `max_concurrency` (a `concurrency_scheduler`
//! actuator) until its decision's `valid_until`, as it drives a concurrency
//! limiter's; then the policy's limit is back. Lowered below the flows in
//! flight, it admits nobody until enough of them end; raised, it wakes the
//! queue. With `scope: global` the limit in force is what this sidecar
//! takes its slots in the store against: the store's count is shared and
//! each take carries the limit, so every sidecar running the policy (all
//! of them get the same decisions) admits against the controller's.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use sluice_policy::{ConcurrencySchedulerSpec, Scope, StoreFallback};
use sluice_time::{Clock, Nanos, nanos};
use tokio::sync::Notify;

use super::adaptive::AdaptiveLimit;
use super::scheduler::{Config, Pool, Scheduler};
use super::wfq;
use crate::components::lease::Lease;
use crate::components::selector::Selector;
use crate::label_table::Digest;
use crate::metrics::{Metrics, Series};
use crate::status::{ComponentStatus, Driven};
use crate::store::{SharedStore, StateId};

/// How often a queue asks a full global count again.
pub const FULL_RETRY: Nanos = 50_000_000;
/// How soon a queue asks again after the store failed to answer.
const ERROR_RETRY: Nanos = 10_000_000;
/// A slot taken for the queue but not given to a flow goes back after this.
const UNUSED_SLOT: Nanos = 1_000_000_000;

/// Slots in use out of the limit in force.
#[derive(Debug)]
pub struct SlotPool {
    /// Most in flight: the policy's, or the controller's while its
    /// decision holds; the ceiling of an adaptive limit.
    pub max: u64,
    /// The limit the sidecar adapts below `max` (`adaptive:`), if any.
    pub adaptive: Option<AdaptiveLimit>,
    /// In flight now (with `scope: global`, those admitted by the
    /// fallback).
    pub used: u64,
    /// With `scope: global`: the store's count.
    pub global: Option<GlobalCount>,
}

impl SlotPool {
    /// Most in flight now: the adaptive limit under `max`, or `max`.
    pub fn limit(&self) -> u64 {
        self.adaptive
            .as_ref()
            .map_or(self.max, |a| a.limit(self.max))
    }

    /// In flight now, admitted here.
    fn in_flight(&self) -> u64 {
        self.used + self.global.as_ref().map_or(0, |g| g.holders.len() as u64)
    }
}

/// A global scheduler's slots in the store.
pub struct GlobalCount {
    store: SharedStore,
    policy: Arc<str>,
    component: Arc<str>,
    /// Slot lifetime in the store: `max_inflight_duration`.
    ttl: Duration,
    /// What it decides while the store cannot be asked.
    pub fallback: StoreFallback,
    /// `store_fallback_total` of the component.
    fallbacks: IntCounter,
    /// Holders of the slots of flows admitted here, oldest first.
    holders: VecDeque<u64>,
    /// Slots being taken for the queue, shared with the task taking them.
    taking: Arc<Mutex<Taking>>,
    /// The scheduler's wake-up.
    wake: Arc<Notify>,
    /// When slots arrive.
    clock: Clock,
}

impl std::fmt::Debug for GlobalCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalCount")
            .field("held", &self.holders.len())
            .finish_non_exhaustive()
    }
}

/// The queue's slots on their way from the store.
#[derive(Debug, Default)]
struct Taking {
    /// Taken, not yet given to a flow: holder, and when taken.
    ready: Vec<(u64, Nanos)>,
    /// A take is on its way.
    busy: bool,
    /// Someone waits for a slot (false once the queue emptied).
    wanted: bool,
    /// The store's count was full (or failed): ask again then.
    retry_at: Nanos,
}

impl GlobalCount {
    fn id(&self) -> StateId<'_> {
        StateId {
            policy: &self.policy,
            component: &self.component,
            label: None,
        }
    }

    fn usable(&self) -> bool {
        self.store.available()
    }

    /// A slot for the flow the queue admits, or `false` after starting to
    /// take one.
    fn try_take(&mut self, now: Nanos, max: u64) -> bool {
        let mut taking = self.taking.lock();
        if let Some((holder, _)) = taking.ready.pop() {
            self.holders.push_back(holder);
            return true;
        }
        taking.wanted = true;
        if taking.busy || now < taking.retry_at {
            return false;
        }
        taking.busy = true;
        drop(taking);
        let holder = fastrand::u64(..);
        let store = self.store.clone();
        let (policy, component) = (self.policy.clone(), self.component.clone());
        let (ttl, taking, wake, clock) = (
            self.ttl,
            self.taking.clone(),
            self.wake.clone(),
            self.clock.clone(),
        );
        tokio::spawn(async move {
            let id = StateId {
                policy: &policy,
                component: &component,
                label: None,
            };
            let answer = store.take_slot(id, max, holder, ttl).await;
            let now = clock.now();
            let mut t = taking.lock();
            t.busy = false;
            match answer {
                Ok(true) if t.wanted => t.ready.push((holder, now)),
                Ok(true) => store.give_back_slot(id, holder),
                Ok(false) => t.retry_at = now.saturating_add(FULL_RETRY),
                Err(_) => t.retry_at = now.saturating_add(ERROR_RETRY),
            }
            drop(t);
            wake.notify_one();
        });
        false
    }

    fn ready_at(&self, now: Nanos) -> Option<Nanos> {
        let retry_at = self.taking.lock().retry_at;
        (retry_at > now).then_some(retry_at)
    }

    /// Gives back slots taken for the queue that no flow took: all of them
    /// when nobody waits (`stale_after` 0), else those older than it.
    fn release_unused(&self, now: Nanos, stale_after: Nanos) {
        let mut taking = self.taking.lock();
        if stale_after == 0 {
            taking.wanted = false;
        }
        taking.ready.retain(|&(holder, at)| {
            let keep = stale_after > 0 && now.saturating_sub(at) < stale_after;
            if !keep {
                self.store.give_back_slot(self.id(), holder);
            }
            keep
        });
    }
}

/// A global count as a queue's capacity.
struct Counted<'a> {
    global: &'a mut GlobalCount,
    max: u64,
}

impl wfq::Capacity for Counted<'_> {
    fn try_take(&mut self, now: Nanos, _tokens: f64) -> bool {
        self.global.try_take(now, self.max)
    }

    fn ready_at(&self, now: Nanos, _tokens: f64) -> Option<Nanos> {
        // Otherwise the slot on its way wakes the queue.
        self.global.ready_at(now)
    }
}

impl wfq::Capacity for SlotPool {
    fn try_take(&mut self, _now: Nanos, _tokens: f64) -> bool {
        let free = self.used < self.limit();
        if free {
            self.used += 1;
        }
        if let Some(a) = &mut self.adaptive {
            if free {
                a.took(self.used);
            } else {
                a.wanted();
            }
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
        let max = self.limit();
        match self.global.as_mut().filter(|g| g.usable()) {
            Some(global) => f(&mut Counted { global, max }),
            None => f(self),
        }
    }

    /// Global, a flow decided while the store cannot be asked is counted,
    /// and `accept` lets it through.
    fn bypass(&mut self, _now: Nanos) -> bool {
        match &self.global {
            Some(global) if !global.usable() => {
                global.fallbacks.inc();
                global.fallback == StoreFallback::Accept
            }
            _ => false,
        }
    }

    /// False for every flow while the store cannot be asked and the
    /// fallback is `reject`: refused at once.
    fn fits(&self, _tokens: f64) -> bool {
        !self
            .global
            .as_ref()
            .is_some_and(|g| !g.usable() && g.fallback == StoreFallback::Reject)
    }

    /// One slot, whatever the flow's tokens: the store's oldest held here
    /// if any, else a local one (a flow admitted by the fallback).
    fn give_back(&mut self, _key: Option<Digest>, _tokens: f64) {
        if let Some(global) = &mut self.global
            && let Some(holder) = global.holders.pop_front()
        {
            global.store.give_back_slot(global.id(), holder);
            return;
        }
        self.used = self.used.saturating_sub(1);
    }

    fn attach(&mut self, wake: &Arc<Notify>) {
        if let Some(global) = &mut self.global {
            global.wake = wake.clone();
        }
    }

    fn idle(&mut self, now: Nanos) {
        if let Some(global) = &self.global {
            global.release_unused(now, 0);
        }
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
    /// Until when the controller's limit holds; shared with the scheduler
    /// it was granted for, which a reload may keep.
    lease: Arc<Lease>,
    /// `concurrency_limit`, set whenever the limit may have moved.
    limit_gauge: IntGauge,
    /// What it was compiled from, to keep it across reloads that leave it
    /// unchanged; its `max_concurrency` is what a lapsed decision returns
    /// to.
    spec: ConcurrencySchedulerSpec,
}

fn same(a: &ConcurrencySchedulerSpec, b: &ConcurrencySchedulerSpec) -> bool {
    a.name.value == b.name.value
        && a.selectors == b.selectors
        && a.max_concurrency == b.max_concurrency
        && a.adaptive == b.adaptive
        && a.max_inflight_duration == b.max_inflight_duration
        && a.scheduler == b.scheduler
        && a.scope == b.scope
        && a.on_store_unavailable == b.on_store_unavailable
}

impl ConcurrencyScheduler {
    /// Compiles a concurrency scheduler of `policy`; an unchanged one keeps
    /// `previous`'s queue and count of flows in flight. `store` is the
    /// shared store, for `scope: global`.
    pub fn compile(
        policy: &Arc<str>,
        spec: &ConcurrencySchedulerSpec,
        metrics: &Metrics,
        clock: &Clock,
        store: Option<&SharedStore>,
        previous: Option<&ConcurrencyScheduler>,
    ) -> Self {
        if let Some(old) = previous.filter(|old| same(&old.spec, spec)) {
            return ConcurrencyScheduler {
                scheduler: old.scheduler.clone(),
                key: old.key.clone(),
                max_inflight: old.max_inflight,
                lease: old.lease.clone(),
                limit_gauge: old.limit_gauge.clone(),
                spec: spec.clone(),
            };
        }
        let name: Arc<str> = spec.name.value.0.as_str().into();
        let max_inflight = nanos(spec.max_inflight_duration.0);
        let mut series = Series::default();
        let lease = Arc::new(Lease::new(metrics, &mut series, policy, &name));
        let global = match (spec.scope, store) {
            (Scope::Global, Some(store)) => Some(GlobalCount {
                store: store.clone(),
                policy: policy.clone(),
                component: name.clone(),
                ttl: Duration::from_nanos(max_inflight),
                fallback: spec.on_store_unavailable,
                fallbacks: metrics
                    .store_fallbacks
                    .series(&mut series, &[policy, &name]),
                holders: VecDeque::new(),
                taking: Arc::default(),
                // Replaced by the scheduler's own when it takes the pool.
                wake: Arc::new(Notify::new()),
                clock: clock.clone(),
            }),
            _ => None,
        };
        let limit_gauge = metrics
            .concurrency_limit
            .series(&mut series, &[policy, &name]);
        limit_gauge.set(spec.max_concurrency.try_into().unwrap_or(i64::MAX));
        let config = Config::compile(&spec.scheduler, metrics, series, policy, &name);
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
                    adaptive: spec
                        .adaptive
                        .as_ref()
                        .map(|a| AdaptiveLimit::new(a, spec.max_concurrency, clock.now())),
                    used: 0,
                    global,
                },
            )),
            max_inflight,
            lease,
            limit_gauge,
            spec: spec.clone(),
        }
    }

    /// Changes the slot pool with `f` and shows the limit then in force in
    /// `concurrency_limit`, both under the pool's lock: two changes at once
    /// (a controller decision, access logs revising an adaptive limit)
    /// cannot leave the gauge showing the older limit.
    fn change_pool<R>(&self, f: impl FnOnce(&mut SlotPool) -> R) -> R {
        self.scheduler.with_pool(|s| {
            let out = f(s);
            self.limit_gauge
                .set(s.limit().try_into().unwrap_or(i64::MAX));
            out
        })
    }

    /// Sets the controller's limit until `until`, and wakes the queue: a
    /// raised limit admits waiting requests now, not when a slot comes
    /// back.
    pub fn set_max_concurrency(&self, max: u64, until: Nanos) {
        self.change_pool(|s| s.max = max);
        self.lease.grant(until);
        self.scheduler.poke();
    }

    /// Returns to the policy's limit when the controller's lease lapsed.
    pub fn revert_if_lapsed(&self, now: Nanos) -> bool {
        let lapsed = self.lease.lapse(now);
        if lapsed {
            self.change_pool(|s| s.max = self.spec.max_concurrency);
            self.scheduler.poke();
        }
        lapsed
    }

    /// The limit in force.
    pub fn max_concurrency(&self) -> u64 {
        self.scheduler.with_pool(|s| s.limit())
    }

    /// Flows in flight now, admitted here.
    pub fn in_flight(&self) -> u64 {
        self.scheduler.with_pool(|s| s.in_flight())
    }

    /// What is in force now.
    pub fn status(&self, now: Nanos, wall_ms: i64) -> ComponentStatus {
        let mut s = ComponentStatus::new("concurrency_scheduler", &self.scheduler.name);
        let (limit, in_flight, global) = self
            .scheduler
            .with_pool(|p| (p.limit(), p.in_flight(), p.global.is_some()));
        s.scope = global.then_some("global");
        s.max_concurrency = Some(limit);
        s.in_flight = Some(in_flight);
        s.adaptive = Some(self.spec.adaptive.is_some());
        s.queued = Some(self.scheduler.queued());
        s.controller = Driven::of(&self.lease, now, wall_ms);
        s
    }

    /// A flow admitted here ended after `latency_ms` of upstream time (its
    /// access log, after its slot was given back): the adaptive limit
    /// learns from it, and a raised limit wakes the queue.
    pub fn observe_latency(&self, workload: usize, latency_ms: f64) {
        self.scheduler.config.observe_latency(workload, latency_ms);
        if self.spec.adaptive.is_none() {
            return;
        }
        let now = self.scheduler.clock().now();
        let raised = self.change_pool(|s| {
            let (in_flight, max) = (s.in_flight(), s.max);
            s.adaptive
                .as_mut()
                .is_some_and(|a| a.ended(now, latency_ms, in_flight, max))
        });
        if raised {
            self.scheduler.poke();
        }
    }

    /// Gives back global slots taken for the queue that no flow took.
    pub fn sweep(&self, now: Nanos) {
        self.scheduler.with_pool(|s| {
            if let Some(global) = &s.global {
                global.release_unused(now, UNUSED_SLOT);
            }
        });
    }
}
