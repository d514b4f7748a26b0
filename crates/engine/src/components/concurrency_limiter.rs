//! Concurrency limiters: at most `max_concurrency` flows in flight, for all
//! matching flows or per value of `limit_by_label_key`.
//!
//! A flow takes a slot at Check and gives it back when its access log
//! arrives (see [`crate::flow_end::inflight`]), or after `max_inflight_duration` if the
//! log never comes (Envoy restarted, the log was dropped). A flow without
//! the `limit_by_label_key` label passes. Rejections have no `retry-after`:
//! when a slot frees depends on other flows' latency, which is not known.
//!
//! With `scope: global` the count is in the store, shared by every sidecar
//! running the policy: each flow takes its slot there (one round trip, the
//! flow waiting in a [`ConcurrencyStep`]) and gives it back when its access
//! log arrives, in the background; a slot whose log never comes lapses in
//! the store at `max_inflight_duration`. While the store cannot be asked,
//! the component decides by `on_store_unavailable`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::IntCounter;
use sluice_policy::{ConcurrencyLimiterSpec, Scope, StoreFallback};
use sluice_time::{Clock, Nanos, nanos};

use super::lease::Lease;
use super::selector::Selector;
use crate::admission::{Claim, Lender};
use crate::decision::RejectReason;
use crate::label_table::{Digest, LabelTable, TableMetrics};
use crate::labels::{FlowLabels, LabelRef};
use crate::leases::{hex, label_id};
use crate::metrics::{DecisionCounters, Metrics, Series};
use crate::status::{ComponentStatus, Driven};
use crate::store::{SharedStore, StateId, StoreError};

/// Counts of flows in flight, kept across reloads that keep the limiter.
pub struct ConcurrencyState {
    /// Without `limit_by_label_key`.
    one: AtomicU64,
    /// With `limit_by_label_key`.
    per_label: LabelTable<u64>,
}

impl Lender for ConcurrencyState {
    /// Takes back one slot (a slot is one flow, whatever it costs).
    fn give_back(&self, key: Option<Digest>, _amount: f64) {
        match key {
            None => {
                let _ = self
                    .one
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            }
            Some(key) => {
                // Entries holding slots are never evicted, so it is there.
                self.per_label
                    .with_existing(key, |n| *n = n.saturating_sub(1));
            }
        }
    }
}

/// No slot was free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

/// A global limiter's store, and what it does without it.
pub struct GlobalSlots {
    /// The store.
    pub store: SharedStore,
    /// What it decides while the store cannot be asked.
    pub fallback: StoreFallback,
    /// `store_fallback_total` of the component.
    fallbacks: IntCounter,
}

/// One compiled concurrency limiter.
pub struct ConcurrencyLimiter {
    /// The policy it belongs to.
    pub policy: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
    /// Which flows it limits.
    pub selectors: Box<[Selector]>,
    /// Most flows in flight; atomic so the controller can move it.
    max: AtomicU64,
    /// The policy's limit (the default).
    default_max: u64,
    /// Until when the controller's limit holds.
    pub lease: Lease,
    /// One count per value of this label, if set.
    pub limit_by: Option<LabelRef>,
    /// When a flow's slot is given back if its log never arrives.
    pub max_inflight: Nanos,
    /// Status of a rejected flow.
    pub denied_status: u16,
    /// The local counts (all of them with `scope: sidecar`; the fallback's
    /// with `scope: global`).
    pub state: Arc<ConcurrencyState>,
    /// With `scope: global`: the store.
    pub global: Option<GlobalSlots>,
    /// Decision counters.
    counters: DecisionCounters,
    /// Every series it writes.
    pub series: Series,
}

impl std::fmt::Debug for ConcurrencyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyLimiter")
            .field("policy", &self.policy)
            .field("name", &self.name)
            .field("max", &self.max)
            .field("global", &self.global.is_some())
            .finish_non_exhaustive()
    }
}

/// What a concurrency limiter decided for a flow without waiting.
pub enum Acquired {
    /// A slot (nothing when the flow lacks the `limit_by_label_key` label,
    /// or the store's fallback accepts it), given back when the claim is
    /// dropped.
    Taken(Option<Claim<'static>>),
    /// No slot was free.
    Busy,
    /// A global limiter: the flow must take its slot in the store.
    Ask(ConcurrencyStep),
}

/// A limiter's decision for one flow, owned so that it can wait.
pub struct ConcurrencyStep {
    limiter: Arc<ConcurrencyLimiter>,
    key: Option<Digest>,
    /// The label value's name in the store (global limiters only).
    id: Option<[u8; 16]>,
}

impl std::fmt::Debug for ConcurrencyStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyStep")
            .field("limiter", &self.limiter.name)
            .finish_non_exhaustive()
    }
}

/// A slot held in the store; dropping its claim gives it back there.
struct GlobalSlot {
    store: SharedStore,
    policy: Arc<str>,
    component: Arc<str>,
    label: Option<String>,
    holder: u64,
}

impl Lender for GlobalSlot {
    fn give_back(&self, _key: Option<Digest>, _amount: f64) {
        self.store.give_back_slot(
            StateId {
                policy: &self.policy,
                component: &self.component,
                label: self.label.as_deref(),
            },
            self.holder,
        );
    }
}

impl ConcurrencyLimiter {
    /// Compiles a limiter of `policy`, keeping `previous`'s counts when it
    /// counts by the same label (flows in flight stay counted when only the
    /// limit changes). `store` is the shared store, for `scope: global`.
    pub fn compile(
        policy: &Arc<str>,
        spec: &ConcurrencyLimiterSpec,
        metrics: &Metrics,
        max_label_values: usize,
        store: Option<&SharedStore>,
        previous: Option<&ConcurrencyLimiter>,
    ) -> Self {
        let name: Arc<str> = spec.name.value.0.as_str().into();
        let mut series = Series::default();
        let limit_by = spec
            .limit_by_label_key
            .as_ref()
            .map(|k| LabelRef::new(&k.0));
        let table_metrics = TableMetrics::of_component(metrics, &mut series, policy, &name);
        let state = match previous {
            Some(old) if old.limit_by == limit_by => old.state.clone(),
            _ => Arc::new(ConcurrencyState {
                one: AtomicU64::new(0),
                per_label: LabelTable::new(
                    max_label_values,
                    table_metrics,
                    // A count holding slots must stay, or the flows in
                    // flight would be forgotten and the limit exceeded.
                    |n| *n == 0,
                ),
            }),
        };
        let global = match (spec.scope, store) {
            (Scope::Global, Some(store)) => Some(GlobalSlots {
                store: store.clone(),
                fallback: spec.on_store_unavailable,
                fallbacks: metrics
                    .store_fallbacks
                    .series(&mut series, &[policy, &name]),
            }),
            _ => None,
        };
        ConcurrencyLimiter {
            counters: DecisionCounters::new(
                metrics,
                &metrics.concurrency_limiter,
                &mut series,
                [policy, &name],
                RejectReason::ConcurrencyLimited.as_str(),
            ),
            lease: Lease::new(metrics, &mut series, policy, &name),
            policy: policy.clone(),
            name,
            selectors: spec.selectors.iter().map(Selector::compile).collect(),
            max: AtomicU64::new(spec.max_concurrency),
            default_max: spec.max_concurrency,
            limit_by,
            max_inflight: nanos(spec.max_inflight_duration.0),
            denied_status: spec.denied_status_code.0,
            state,
            global,
            series,
        }
    }

    /// The flow's key (and, for a global limiter, its name in the store);
    /// `None` when it lacks the `limit_by_label_key` label (then it is not
    /// limited: counted as accepted).
    fn key(&self, labels: &FlowLabels<'_>) -> Option<(Option<Digest>, Option<[u8; 16]>)> {
        match &self.limit_by {
            None => Some((None, None)),
            Some(label) => match labels.get(label) {
                Some(value) => Some((
                    Some(self.state.per_label.digest(&value)),
                    self.global.as_ref().map(|_| label_id(&value)),
                )),
                None => {
                    self.counters.count(true);
                    None
                }
            },
        }
    }

    /// Takes a slot for the flow, given back when the returned claim is
    /// dropped, or refuses, or (a global limiter) says the flow must take
    /// its slot in the store. Counts what it decides.
    pub fn acquire(self: &Arc<Self>, labels: &FlowLabels<'_>, now: Nanos) -> Acquired {
        let Some((key, id)) = self.key(labels) else {
            return Acquired::Taken(None);
        };
        let taken = match &self.global {
            None => self.take_local(key, now),
            Some(global) if !global.store.available() => self.fall_back(global, key, now),
            Some(_) => {
                return Acquired::Ask(ConcurrencyStep {
                    limiter: self.clone(),
                    key,
                    id,
                });
            }
        };
        match taken {
            Ok(slot) => Acquired::Taken(slot),
            Err(Busy) => Acquired::Busy,
        }
    }

    /// The flow's decision as a step, to run after an earlier component
    /// made it wait. `None`: the flow lacks the `limit_by_label_key` label.
    pub fn step(self: &Arc<Self>, labels: &FlowLabels<'_>) -> Option<ConcurrencyStep> {
        let (key, id) = self.key(labels)?;
        Some(ConcurrencyStep {
            limiter: self.clone(),
            key,
            id,
        })
    }

    /// Takes a local slot; counts the decision.
    fn take_local(&self, key: Option<Digest>, now: Nanos) -> Result<Option<Claim<'static>>, Busy> {
        let max = self.max.load(Ordering::Relaxed);
        let taken = match key {
            None => self
                .state
                .one
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok(),
            Some(key) => self.state.per_label.with_digest(
                key,
                now,
                || 0,
                |n| {
                    let free = *n < max;
                    if free {
                        *n += 1;
                    }
                    free
                },
            ),
        };
        self.counters.count(taken);
        if !taken {
            return Err(Busy);
        }
        // Owned: the slot outlives the Check, in the in-flight table.
        Ok(Some(Claim::owned(self.state.clone(), key, 1.0)))
    }

    /// Decides without the store, as `on_store_unavailable` says.
    fn fall_back(
        &self,
        global: &GlobalSlots,
        key: Option<Digest>,
        now: Nanos,
    ) -> Result<Option<Claim<'static>>, Busy> {
        global.fallbacks.inc();
        match global.fallback {
            StoreFallback::Local => self.take_local(key, now),
            StoreFallback::Accept => {
                self.counters.count(true);
                Ok(None)
            }
            StoreFallback::Reject => {
                self.counters.count(false);
                Err(Busy)
            }
        }
    }

    /// Sets the controller's limit until `until`.
    pub fn set_max_concurrency(&self, max: u64, until: Nanos) {
        self.max.store(max, Ordering::Relaxed);
        self.lease.grant(until);
    }

    /// Returns to the policy's limit when the controller's lease lapsed.
    pub fn revert_if_lapsed(&self, now: Nanos) -> bool {
        let lapsed = self.lease.lapse(now);
        if lapsed {
            self.max.store(self.default_max, Ordering::Relaxed);
        }
        lapsed
    }

    /// Flows in flight here (without `limit_by_label_key`).
    pub fn in_flight(&self) -> u64 {
        self.state.one.load(Ordering::Acquire)
    }

    /// What is in force now.
    pub fn status(&self, now: Nanos, wall_ms: i64) -> ComponentStatus {
        let mut s = ComponentStatus::new("concurrency_limiter", &self.name);
        s.scope = self.global.as_ref().map(|_| "global");
        s.max_concurrency = Some(self.max.load(Ordering::Relaxed));
        match &self.limit_by {
            Some(key) => {
                s.label_key = Some(key.name.to_string());
                s.label_values = Some(self.state.per_label.len());
            }
            None if self.global.is_none() => s.in_flight = Some(self.in_flight()),
            None => {}
        }
        s.controller = Driven::of(&self.lease, now, wall_ms);
        s
    }

    /// Drops per-label counts that reached zero.
    pub fn sweep(&self, now: Nanos) {
        self.state.per_label.sweep(now, 0);
    }
}

impl ConcurrencyStep {
    /// Takes the flow's slot (in the store for a global limiter, within its
    /// deadline), for `holder` (the flow's id), or refuses; falls back as
    /// `on_store_unavailable` says when the store cannot be asked.
    pub async fn run(self, clock: &Clock, holder: u64) -> Result<Option<Claim<'static>>, Busy> {
        let limiter = &self.limiter;
        let Some(global) = &limiter.global else {
            return limiter.take_local(self.key, clock.now());
        };
        if !global.store.available() {
            return limiter.fall_back(global, self.key, clock.now());
        }
        let label = self.id.as_ref().map(|id| hex(id));
        let state = StateId {
            policy: &limiter.policy,
            component: &limiter.name,
            label: label.as_deref(),
        };
        let max = limiter.max.load(Ordering::Relaxed);
        let ttl = std::time::Duration::from_nanos(limiter.max_inflight);
        match global.store.take_slot(state, max, holder, ttl).await {
            Ok(true) => {
                limiter.counters.count(true);
                let slot = GlobalSlot {
                    store: global.store.clone(),
                    policy: limiter.policy.clone(),
                    component: limiter.name.clone(),
                    label,
                    holder,
                };
                Ok(Some(Claim::owned(Arc::new(slot), self.key, 1.0)))
            }
            Ok(false) => {
                limiter.counters.count(false);
                Err(Busy)
            }
            Err(StoreError::Unavailable | StoreError::Timeout | StoreError::Failed(_)) => {
                limiter.fall_back(global, self.key, clock.now())
            }
        }
    }

    /// The limiter.
    pub fn limiter(&self) -> &Arc<ConcurrencyLimiter> {
        &self.limiter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::MapLabels;

    fn limiter(extra: &str) -> Arc<ConcurrencyLimiter> {
        let yaml = format!(
            "name: cl\nselectors: [{{control_point: ingress}}]\nmax_concurrency: 2\n{extra}"
        );
        let spec: ConcurrencyLimiterSpec = serde_saphyr::from_str(&yaml).expect("valid limiter");
        Arc::new(ConcurrencyLimiter::compile(
            &"p".into(),
            &spec,
            &Metrics::new(),
            100,
            None,
            None,
        ))
    }

    fn take(
        l: &Arc<ConcurrencyLimiter>,
        labels: &[(&str, &str)],
    ) -> Result<Option<Claim<'static>>, Busy> {
        let source = MapLabels::from_pairs(labels.iter().copied());
        match l.acquire(&FlowLabels::new(&source), 0) {
            Acquired::Taken(slot) => Ok(slot),
            Acquired::Busy => Err(Busy),
            Acquired::Ask(_) => panic!("a local limiter never asks the store"),
        }
    }

    #[test]
    fn at_most_max_in_flight_and_dropped_slots_are_reused() {
        let l = limiter("");
        let a = take(&l, &[]).expect("free").expect("slot");
        let b = take(&l, &[]).expect("free").expect("slot");
        assert!(take(&l, &[]).is_err());
        assert_eq!(l.in_flight(), 2);
        drop(a);
        let c = take(&l, &[]).expect("free again").expect("slot");
        assert!(take(&l, &[]).is_err());
        drop((b, c));
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn per_label_counts_and_unlabelled_flows() {
        let l = limiter("limit_by_label_key: user\n");
        let _a1 = take(&l, &[("user", "a")]).expect("free");
        let _a2 = take(&l, &[("user", "a")]).expect("free");
        assert!(take(&l, &[("user", "a")]).is_err());
        assert!(take(&l, &[("user", "b")]).is_ok());
        for _ in 0..10 {
            assert!(matches!(take(&l, &[]), Ok(None)), "no label, no limit");
        }
    }

    #[test]
    fn zero_counts_are_swept_held_ones_kept() {
        let l = limiter("limit_by_label_key: user\n");
        let held = take(&l, &[("user", "a")]).expect("free").expect("slot");
        drop(take(&l, &[("user", "b")]).expect("free").expect("slot"));
        l.sweep(1_000);
        assert_eq!(l.state.per_label.len(), 1);
        drop(held);
        l.sweep(2_000);
        assert_eq!(l.state.per_label.len(), 0);
    }
}
