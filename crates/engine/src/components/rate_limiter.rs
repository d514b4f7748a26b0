//! Rate limiters: token buckets, one for all matching flows or one per value
//! of `limit_by_label_key`.
//!
//! A bucket starts full and refills `fill_amount` tokens per `interval`,
//! either smoothly (`continuous_fill`, the default) or all at once at each
//! interval boundary, never beyond `bucket_capacity`. A flow costs one token,
//! or the number in its `tokens_label_key` label. When the bucket cannot pay,
//! the flow is rejected with the time until it could have paid (the
//! `retry-after`). A flow that asks for more than the capacity can never
//! pass; it is rejected without a `retry-after`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use sluice_policy::RateLimiterSpec;
use sluice_time::{Nanos, nanos};

use super::lease::Lease;
use super::selector::Selector;
use crate::admission::{Claim, Lender};
use crate::decision::RejectReason;
use crate::label_table::{Digest, LabelTable, TableMetrics, always};
use crate::labels::{FlowLabels, LabelRef};
use crate::metrics::{DecisionCounters, Metrics, Series};
use crate::token_bucket::{BucketParams, TokenBucket};

/// The buckets of a limiter, kept across policy reloads that leave the
/// limiter unchanged.
pub struct LimiterState {
    /// The bucket, without `limit_by_label_key`.
    global: Mutex<TokenBucket>,
    /// The buckets, with `limit_by_label_key`.
    per_label: LabelTable<TokenBucket>,
}

/// One compiled rate limiter.
pub struct RateLimiter {
    /// The policy it belongs to.
    pub policy: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
    /// Which flows it limits.
    pub selectors: Box<[Selector]>,
    /// Bucket parameters of the policy (the default).
    pub default_params: BucketParams,
    /// Capacity in force (f64 bits): the policy's, or the controller's.
    capacity: AtomicU64,
    /// Fill amount in force (f64 bits): the policy's, or the controller's.
    fill_amount: AtomicU64,
    /// Until when the controller's values hold.
    pub lease: Lease,
    /// One bucket per value of this label, if set.
    pub limit_by: Option<LabelRef>,
    /// Where a flow's cost is read from, if set.
    tokens_label: Option<LabelRef>,
    /// Buckets unused this long are forgotten.
    pub max_idle: Nanos,
    /// Status of a rejected flow.
    pub denied_status: u16,
    /// The buckets.
    pub state: Arc<LimiterState>,
    /// Decision counters.
    counters: DecisionCounters,
    /// Every series it writes.
    pub series: Series,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("policy", &self.policy)
            .field("name", &self.name)
            .field("params", &self.params())
            .field("limit_by", &self.limit_by)
            .finish_non_exhaustive()
    }
}

/// Why a limiter said no.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limited {
    /// How long until the flow could pass, if it ever can.
    pub retry_after: Option<Nanos>,
}

impl RateLimiter {
    /// Compiles a limiter of `policy`, keeping `previous`'s buckets when
    /// the limiter is unchanged.
    pub fn compile(
        policy: &Arc<str>,
        spec: &RateLimiterSpec,
        metrics: &Metrics,
        max_label_values: usize,
        previous: Option<&RateLimiter>,
    ) -> Self {
        let name: Arc<str> = spec.name.value.0.as_str().into();
        let mut series = Series::default();
        let params = BucketParams {
            capacity: spec.bucket_capacity.0,
            fill_amount: spec.fill_amount.0,
            interval: nanos(spec.interval.0).max(1),
            continuous: spec.continuous_fill,
        };
        let limit_by = spec
            .limit_by_label_key
            .as_ref()
            .map(|k| LabelRef::new(&k.0));
        // Resolved whether or not the buckets are kept: the series are the
        // same ones, and this limiter must record them as its own.
        let table_metrics = TableMetrics::of_component(metrics, &mut series, policy, &name);
        let state = match previous {
            Some(old) if old.default_params == params && old.limit_by == limit_by => {
                old.state.clone()
            }
            _ => Arc::new(LimiterState {
                global: Mutex::new(TokenBucket::full(&params, 0)),
                per_label: LabelTable::new(max_label_values, table_metrics, always),
            }),
        };
        RateLimiter {
            counters: DecisionCounters::new(
                metrics,
                &metrics.rate_limiter,
                &mut series,
                [policy, &name],
                RejectReason::RateLimited.as_str(),
            ),
            lease: Lease::new(metrics, &mut series, policy, &name),
            policy: policy.clone(),
            name,
            selectors: spec.selectors.iter().map(Selector::compile).collect(),
            default_params: params,
            capacity: AtomicU64::new(params.capacity.to_bits()),
            fill_amount: AtomicU64::new(params.fill_amount.to_bits()),
            limit_by,
            tokens_label: spec.tokens_label_key.as_ref().map(|k| LabelRef::new(&k.0)),
            max_idle: nanos(spec.max_idle_time.0),
            denied_status: spec.denied_status_code.0,
            state,
            series,
        }
    }

    /// Charges the flow, or says why not; counts the decision. The tokens
    /// come back if the returned claim is dropped (a later stage rejects
    /// the flow) and are spent when it is spent. `Ok(None)`: the flow lacks
    /// the `limit_by_label_key` label and is not limited.
    pub fn acquire<'a>(
        self: &'a Arc<Self>,
        labels: &FlowLabels<'_>,
        now: Nanos,
    ) -> Result<Option<Claim<'a>>, Limited> {
        let tokens = self
            .tokens_label
            .as_ref()
            .and_then(|k| labels.get(k))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n >= 0.0)
            .unwrap_or(1.0);
        let p = &self.params();
        let (result, key) = match &self.limit_by {
            None => (self.state.global.lock().take(p, now, tokens), None),
            Some(label) => {
                // A flow without the label is not limited by this limiter.
                let Some(value) = labels.get(label) else {
                    self.counters.count(true);
                    return Ok(None);
                };
                let key = self.state.per_label.digest(&value);
                let r = self.state.per_label.with_digest(
                    key,
                    now,
                    || TokenBucket::full(p, now),
                    |b| b.take(p, now, tokens),
                );
                (r, Some(key))
            }
        };
        self.counters.count(result.is_ok());
        match result {
            Ok(()) => Ok(Some(Claim::borrowed(self, key, tokens))),
            Err(retry_after) => Err(Limited { retry_after }),
        }
    }

    /// The bucket parameters in force.
    #[inline]
    pub fn params(&self) -> BucketParams {
        BucketParams {
            capacity: f64::from_bits(self.capacity.load(Ordering::Relaxed)),
            fill_amount: f64::from_bits(self.fill_amount.load(Ordering::Relaxed)),
            ..self.default_params
        }
    }

    /// Sets the controller's capacity and/or fill amount until `until`.
    pub fn set_bucket(&self, capacity: Option<f64>, fill_amount: Option<f64>, until: Nanos) {
        if let Some(c) = capacity.filter(|c| c.is_finite() && *c >= 0.0) {
            self.capacity.store(c.to_bits(), Ordering::Relaxed);
        }
        if let Some(f) = fill_amount.filter(|f| f.is_finite() && *f >= 0.0) {
            self.fill_amount.store(f.to_bits(), Ordering::Relaxed);
        }
        self.lease.grant(until);
    }

    /// Returns to the policy's bucket when the controller's lease lapsed.
    pub fn revert_if_lapsed(&self, now: Nanos) -> bool {
        let lapsed = self.lease.lapse(now);
        if lapsed {
            let d = self.default_params;
            self.capacity.store(d.capacity.to_bits(), Ordering::Relaxed);
            self.fill_amount
                .store(d.fill_amount.to_bits(), Ordering::Relaxed);
        }
        lapsed
    }

    /// Forgets buckets unused for `max_idle_time`.
    pub fn sweep(&self, now: Nanos) {
        self.state.per_label.sweep(now, self.max_idle);
    }

    /// Buckets held per label value.
    pub fn label_values(&self) -> usize {
        self.state.per_label.len()
    }
}

impl Lender for RateLimiter {
    /// Takes back tokens of a flow a later stage rejected.
    fn give_back(&self, key: Option<Digest>, tokens: f64) {
        let p = &self.params();
        match key {
            None => self.state.global.lock().give_back(p, tokens),
            Some(key) => {
                self.state
                    .per_label
                    .with_existing(key, |b| b.give_back(p, tokens));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::MapLabels;
    use sluice_time::Clock;
    use std::time::Duration;

    const SEC: Nanos = 1_000_000_000;

    fn limiter(extra: &str) -> Arc<RateLimiter> {
        let yaml = format!(
            "name: rl\nselectors: [{{control_point: ingress}}]\nbucket_capacity: 5\nfill_amount: 5\ninterval: 1s\n{extra}"
        );
        let spec: RateLimiterSpec = serde_saphyr::from_str(&yaml).expect("valid limiter");
        Arc::new(RateLimiter::compile(
            &"p".into(),
            &spec,
            &Metrics::new(),
            1000,
            None,
        ))
    }

    fn try_flow(rl: &Arc<RateLimiter>, labels: &[(&str, &str)], now: Nanos) -> Result<(), Limited> {
        let source = MapLabels::from_pairs(labels.iter().copied());
        let flow = FlowLabels::new(&source);
        rl.acquire(&flow, now)
            .map(|claim| claim.into_iter().for_each(Claim::spend))
    }

    #[test]
    fn buckets_are_per_label_value_and_unlabelled_flows_pass() {
        let rl = limiter("limit_by_label_key: user\n");
        for _ in 0..5 {
            assert!(try_flow(&rl, &[("user", "a")], 0).is_ok());
        }
        assert_eq!(
            try_flow(&rl, &[("user", "a")], 0),
            Err(Limited {
                retry_after: Some(SEC / 5)
            })
        );
        assert!(try_flow(&rl, &[("user", "b")], 0).is_ok());
        for _ in 0..100 {
            assert!(try_flow(&rl, &[], 0).is_ok());
        }
    }

    #[test]
    fn tokens_per_flow_come_from_a_label() {
        let rl = limiter("tokens_label_key: cost\n");
        assert!(try_flow(&rl, &[("cost", "3")], 0).is_ok());
        assert!(try_flow(&rl, &[("cost", "3")], 0).is_err());
        assert!(try_flow(&rl, &[("cost", "2")], 0).is_ok());
        // Garbage costs the default of one token.
        assert!(try_flow(&rl, &[("cost", "lots")], SEC / 5).is_ok());
        assert!(try_flow(&rl, &[("cost", "-4")], SEC / 5).is_err());
    }

    #[test]
    fn dropped_claims_return_their_tokens() {
        let rl = limiter("limit_by_label_key: user\n");
        let source = MapLabels::from_pairs([("user", "a")]);
        let flow = FlowLabels::new(&source);
        for _ in 0..5 {
            let claim = rl
                .acquire(&flow, 0)
                .expect("tokens left")
                .expect("labelled");
            drop(claim);
        }
        for _ in 0..5 {
            rl.acquire(&flow, 0)
                .expect("tokens left")
                .into_iter()
                .for_each(Claim::spend);
        }
        assert!(rl.acquire(&flow, 0).is_err());
    }

    #[test]
    fn idle_buckets_expire_on_simulated_time() {
        let (clock, time) = Clock::mock();
        let rl = limiter("limit_by_label_key: user\nmax_idle_time: 10s\n");
        assert!(try_flow(&rl, &[("user", "a")], clock.now()).is_ok());
        time.advance(Duration::from_secs(5));
        assert!(try_flow(&rl, &[("user", "b")], clock.now()).is_ok());
        time.advance(Duration::from_secs(6));
        rl.sweep(clock.now());
        assert_eq!(rl.label_values(), 1, "a expired, b is 6 s idle");
    }
}
