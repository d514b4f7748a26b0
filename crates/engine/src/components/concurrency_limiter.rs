//! Concurrency limiters: at most `max_concurrency` flows in flight, for all
//! matching flows or per value of `limit_by_label_key`.
//!
//! A flow takes a slot at Check and gives it back when its access log
//! arrives (see [`crate::flow_end::inflight`]), or after `max_inflight_duration` if the
//! log never comes (Envoy restarted, the log was dropped). A flow without
//! the `limit_by_label_key` label passes. Rejections have no `retry-after`:
//! when a slot frees depends on other flows' latency, which is not known.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_policy::ConcurrencyLimiterSpec;
use sluice_time::{Nanos, nanos};

use super::lease::Lease;
use super::selector::Selector;
use crate::admission::{Claim, Lender};
use crate::decision::RejectReason;
use crate::label_table::{Digest, LabelTable, TableMetrics};
use crate::labels::{FlowLabels, LabelRef};
use crate::metrics::{DecisionCounters, Metrics, Series};

/// Counts of flows in flight, kept across reloads that keep the limiter.
pub struct ConcurrencyState {
    /// Without `limit_by_label_key`.
    global: AtomicU64,
    /// With `limit_by_label_key`.
    per_label: LabelTable<u64>,
}

impl Lender for ConcurrencyState {
    /// Takes back one slot (a slot is one flow, whatever it costs).
    fn give_back(&self, key: Option<Digest>, _amount: f64) {
        match key {
            None => {
                let _ = self
                    .global
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
    /// The counts.
    pub state: Arc<ConcurrencyState>,
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
            .finish_non_exhaustive()
    }
}

impl ConcurrencyLimiter {
    /// Compiles a limiter of `policy`, keeping `previous`'s counts when it
    /// counts by the same label (flows in flight stay counted when only the
    /// limit changes).
    pub fn compile(
        policy: &Arc<str>,
        spec: &ConcurrencyLimiterSpec,
        metrics: &Metrics,
        max_label_values: usize,
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
                global: AtomicU64::new(0),
                per_label: LabelTable::new(
                    max_label_values,
                    table_metrics,
                    // A count holding slots must stay, or the flows in
                    // flight would be forgotten and the limit exceeded.
                    |n| *n == 0,
                ),
            }),
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
            series,
        }
    }

    /// Takes a slot for the flow, given back when the returned claim is
    /// dropped (`Ok(None)`: the flow lacks the `limit_by_label_key` label
    /// and is not limited), or refuses. Counts the decision.
    pub fn acquire(
        &self,
        labels: &FlowLabels<'_>,
        now: Nanos,
    ) -> Result<Option<Claim<'static>>, Busy> {
        let max = self.max.load(Ordering::Relaxed);
        let key = match &self.limit_by {
            None => None,
            Some(label) => match labels.get(label) {
                Some(value) => Some(self.state.per_label.digest(&value)),
                None => {
                    self.counters.count(true);
                    return Ok(None);
                }
            },
        };
        let taken = match key {
            None => self
                .state
                .global
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

    /// Flows in flight (without `limit_by_label_key`).
    pub fn in_flight(&self) -> u64 {
        self.state.global.load(Ordering::Acquire)
    }

    /// Drops per-label counts that reached zero.
    pub fn sweep(&self, now: Nanos) {
        self.state.per_label.sweep(now, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::MapLabels;

    fn limiter(extra: &str) -> ConcurrencyLimiter {
        let yaml = format!(
            "name: cl\nselectors: [{{control_point: ingress}}]\nmax_concurrency: 2\n{extra}"
        );
        let spec: ConcurrencyLimiterSpec = serde_saphyr::from_str(&yaml).expect("valid limiter");
        ConcurrencyLimiter::compile(&"p".into(), &spec, &Metrics::new(), 100, None)
    }

    fn take(
        l: &ConcurrencyLimiter,
        labels: &[(&str, &str)],
    ) -> Result<Option<Claim<'static>>, Busy> {
        let source = MapLabels::from_pairs(labels.iter().copied());
        l.acquire(&FlowLabels::new(&source), 0)
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
