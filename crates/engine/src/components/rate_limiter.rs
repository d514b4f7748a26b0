//! Rate limiters: token buckets, one for all matching flows or one per value
//! of `limit_by_label_key`.
//!
//! A bucket starts full and refills `fill_amount` tokens per `interval`
//! (see [`crate::token_bucket`]). A flow costs one token, or the number in
//! its `tokens_label_key` label. When the bucket cannot pay, the flow is
//! rejected with the time until it could have paid (the `retry-after`). A
//! flow that asks for more than the capacity can never pass; it is rejected
//! without a `retry-after`.
//!
//! With `scope: global` the bucket is in the store, shared by every sidecar
//! running the policy; this sidecar spends tokens it leased from it
//! ([`crate::leases`]), and a flow that finds its lease empty waits for one
//! round trip (a [`RateStep`]). While the store cannot be asked, the
//! component decides by `on_store_unavailable`: with its own local buckets
//! (`local`, as `scope: sidecar`), or accepting, or rejecting every flow.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use sluice_policy::{RateLimiterSpec, Scope, StoreFallback};
use sluice_time::{Clock, Nanos, nanos};

use super::lease::Lease;
use super::selector::Selector;
use crate::admission::{Claim, Lender};
use crate::decision::RejectReason;
use crate::label_table::{Digest, LabelTable, TableMetrics, always};
use crate::labels::{FlowLabels, LabelRef};
use crate::leases::{LeaseMetrics, Leases, Spend};
use crate::metrics::{DecisionCounters, Metrics, Series};
use crate::status::{ComponentStatus, Driven};
use crate::store::SharedStore;
use crate::token_bucket::{BucketParams, TokenBucket};

/// The local buckets of a limiter, kept across policy reloads that leave
/// the limiter unchanged.
pub struct LimiterState {
    /// The bucket, without `limit_by_label_key`.
    one: Mutex<TokenBucket>,
    /// The buckets, with `limit_by_label_key`.
    per_label: LabelTable<TokenBucket>,
}

/// A global limiter's leases and what it does without the store.
pub struct Global {
    /// Tokens leased from the store's buckets.
    pub leases: Arc<Leases>,
    /// What it decides while the store cannot be asked.
    pub fallback: StoreFallback,
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
    /// The local buckets (all of them with `scope: sidecar`; the fallback's
    /// with `scope: global`).
    pub state: Arc<LimiterState>,
    /// With `scope: global`: the leases.
    pub global: Option<Global>,
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
            .field("global", &self.global.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a limiter said no.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limited {
    /// How long until the flow could pass, if it ever can.
    pub retry_after: Option<Nanos>,
}

/// What a limiter decided for a flow without waiting.
pub enum Acquired<'a> {
    /// Taken (nothing when the flow lacks the `limit_by_label_key` label or
    /// the store's fallback accepts it): the claim gives the tokens back if
    /// dropped before it is spent.
    Taken(Option<Claim<'a>>),
    /// Refused.
    Limited(Limited),
    /// A global limiter whose lease for the flow's key is empty: the flow
    /// must wait for the store (run the step).
    Ask(RateStep),
}

/// A limiter's decision for one flow, owned so that it can wait: for a
/// global limiter that must ask the store, and for any limiter that comes
/// after a component that made the flow wait.
pub struct RateStep {
    limiter: Arc<RateLimiter>,
    key: Option<Digest>,
    /// The label value, for a global limiter's lease of a new key.
    label: Option<Box<str>>,
    tokens: f64,
}

impl std::fmt::Debug for RateStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateStep")
            .field("limiter", &self.limiter.name)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// A flow's input to a limiter.
struct Input<'l> {
    key: Option<Digest>,
    value: Option<Cow<'l, str>>,
    tokens: f64,
}

impl RateLimiter {
    /// Compiles a limiter of `policy`, keeping `previous`'s buckets when
    /// the limiter is unchanged. `store` is the shared store, for
    /// `scope: global` (the plan refuses a global limiter without one).
    pub fn compile(
        policy: &Arc<str>,
        spec: &RateLimiterSpec,
        metrics: &Metrics,
        max_label_values: usize,
        store: Option<(&SharedStore, &Clock)>,
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
        let global = match (spec.scope, store) {
            (Scope::Global, Some((store, clock))) => {
                let lease_metrics = LeaseMetrics::new(metrics, &mut series, policy, &name);
                let keep = previous
                    .and_then(|old| old.global.as_ref())
                    .filter(|_| previous.is_some_and(|old| old.limit_by == limit_by));
                Some(Global {
                    leases: match keep {
                        Some(old) => old.leases.clone(),
                        None => Arc::new(Leases::new(
                            store.clone(),
                            clock.clone(),
                            policy,
                            &name,
                            max_label_values,
                            table_metrics.clone(),
                            lease_metrics,
                        )),
                    },
                    fallback: spec.on_store_unavailable,
                })
            }
            _ => None,
        };
        let state = match previous {
            Some(old) if old.default_params == params && old.limit_by == limit_by => {
                old.state.clone()
            }
            _ => Arc::new(LimiterState {
                one: Mutex::new(TokenBucket::full(&params, 0)),
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
            global,
            series,
        }
    }

    /// The flow's key and cost; `None` when it lacks the
    /// `limit_by_label_key` label (then it is not limited: counted as
    /// accepted).
    fn input<'l>(&self, labels: &'l FlowLabels<'_>) -> Option<Input<'l>> {
        let tokens = self
            .tokens_label
            .as_ref()
            .and_then(|k| labels.get(k))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n >= 0.0)
            .unwrap_or(1.0);
        let (key, value) = match &self.limit_by {
            None => (None, None),
            Some(label) => {
                let Some(value) = labels.get(label) else {
                    self.counters.count(true);
                    return None;
                };
                (Some(self.state.per_label.digest(&value)), Some(value))
            }
        };
        Some(Input { key, value, tokens })
    }

    /// Charges the flow, or says why not, or (a global limiter without
    /// leased tokens for the flow's key) says the flow must ask the store.
    /// Counts what it decides. The tokens come back if the returned claim
    /// is dropped (a later stage rejects the flow) and are spent when it is
    /// spent.
    pub fn acquire<'a>(self: &'a Arc<Self>, labels: &FlowLabels<'_>, now: Nanos) -> Acquired<'a> {
        let Some(input) = self.input(labels) else {
            return Acquired::Taken(None);
        };
        let Some(global) = &self.global else {
            return match self.take_local(input.key, input.tokens, now) {
                Ok(()) => Acquired::Taken(Some(Claim::borrowed(self, input.key, input.tokens))),
                Err(limited) => Acquired::Limited(limited),
            };
        };
        if !global.leases.store.available() {
            return match self.fall_back(global, input.key, input.tokens, now) {
                Ok(claim) => Acquired::Taken(claim),
                Err(limited) => Acquired::Limited(limited),
            };
        }
        let params = self.params();
        let (spent, refill) = global.leases.spend(
            input.key,
            input.value.as_deref(),
            &params,
            input.tokens,
            now,
        );
        if let Some(ask) = refill {
            let leases = global.leases.clone();
            tokio::spawn(async move {
                // A refill's answer only fills the lease; a failure leaves
                // it to the next flow that finds it empty.
                let _ = leases.fetch(ask, params).await;
            });
        }
        match spent {
            Spend::Spent => {
                self.counters.count(true);
                Acquired::Taken(Some(Claim::borrowed(
                    &global.leases,
                    input.key,
                    input.tokens,
                )))
            }
            Spend::Denied(wait) => {
                self.counters.count(false);
                Acquired::Limited(Limited {
                    retry_after: Some(wait),
                })
            }
            Spend::Empty => Acquired::Ask(RateStep {
                limiter: self.clone(),
                key: input.key,
                label: input.value.map(|v| Box::from(&*v)),
                tokens: input.tokens,
            }),
        }
    }

    /// The flow's decision as a step, to run after an earlier component
    /// made it wait. `None`: the flow lacks the `limit_by_label_key` label.
    pub fn step(self: &Arc<Self>, labels: &FlowLabels<'_>) -> Option<RateStep> {
        let input = self.input(labels)?;
        Some(RateStep {
            limiter: self.clone(),
            key: input.key,
            label: input
                .value
                .filter(|_| self.global.is_some())
                .map(|v| Box::from(&*v)),
            tokens: input.tokens,
        })
    }

    /// Takes from the local bucket; counts the decision.
    fn take_local(&self, key: Option<Digest>, tokens: f64, now: Nanos) -> Result<(), Limited> {
        let p = &self.params();
        let result = match key {
            None => self.state.one.lock().take(p, now, tokens),
            Some(key) => self.state.per_label.with_digest(
                key,
                now,
                || TokenBucket::full(p, now),
                |b| b.take(p, now, tokens),
            ),
        };
        self.counters.count(result.is_ok());
        result.map_err(|retry_after| Limited { retry_after })
    }

    /// Decides without the store, as `on_store_unavailable` says.
    fn fall_back<'a>(
        self: &'a Arc<Self>,
        global: &Global,
        key: Option<Digest>,
        tokens: f64,
        now: Nanos,
    ) -> Result<Option<Claim<'a>>, Limited> {
        global.leases.metrics.fallbacks.inc();
        match global.fallback {
            StoreFallback::Local => self
                .take_local(key, tokens, now)
                .map(|()| Some(Claim::borrowed(self, key, tokens))),
            StoreFallback::Accept => {
                self.counters.count(true);
                Ok(None)
            }
            StoreFallback::Reject => {
                self.counters.count(false);
                Err(Limited { retry_after: None })
            }
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

    /// Forgets buckets and leases unused for `max_idle_time`.
    pub fn sweep(&self, now: Nanos) {
        self.state.per_label.sweep(now, self.max_idle);
        if let Some(global) = &self.global {
            global.leases.sweep(now, self.max_idle);
        }
    }

    /// Buckets held per label value.
    pub fn label_values(&self) -> usize {
        self.state.per_label.len()
    }

    /// What is in force now (`now` on the engine's clock, `wall_ms` the
    /// wall clock's).
    pub fn status(&self, now: Nanos, wall_ms: i64) -> ComponentStatus {
        let params = self.params();
        let mut s = ComponentStatus::new("rate_limiter", &self.name).bucket(&params);
        s.scope = self.global.as_ref().map(|_| "global");
        match &self.limit_by {
            Some(key) => {
                s.label_key = Some(key.name.to_string());
                s.label_values = Some(self.label_values());
            }
            None if self.global.is_none() => {
                s.bucket_level = Some(self.state.one.lock().level(&params, now));
            }
            None => {}
        }
        s.controller = Driven::of(&self.lease, now, wall_ms);
        s
    }
}

impl RateStep {
    /// Decides the flow, asking the store when a global limiter's lease is
    /// empty (within the store's deadline) and falling back as
    /// `on_store_unavailable` says when it cannot.
    pub async fn run(self, clock: &Clock) -> Result<Option<Claim<'static>>, Limited> {
        let now = || clock.now();
        let limiter = &self.limiter;
        let owned = |claim: Option<Claim<'_>>| claim.map(Claim::into_owned);
        let Some(global) = &limiter.global else {
            return limiter
                .take_local(self.key, self.tokens, now())
                .map(|()| Some(Claim::owned(limiter.clone(), self.key, self.tokens)));
        };
        if !global.leases.store.available() {
            return limiter
                .fall_back(global, self.key, self.tokens, now())
                .map(owned);
        }
        let params = limiter.params();
        let t = now();
        let (spent, _) =
            global
                .leases
                .spend(self.key, self.label.as_deref(), &params, self.tokens, t);
        let lender = || Claim::owned(global.leases.clone(), self.key, self.tokens);
        match spent {
            Spend::Spent => {
                limiter.counters.count(true);
                return Ok(Some(lender()));
            }
            Spend::Denied(wait) => {
                limiter.counters.count(false);
                return Err(Limited {
                    retry_after: Some(wait),
                });
            }
            Spend::Empty => {}
        }
        let ask = global
            .leases
            .ask(self.key, self.label.as_deref(), &params, self.tokens, t);
        match global.leases.fetch(ask, params).await {
            Ok(grant) if grant.granted >= self.tokens => {
                limiter.counters.count(true);
                Ok(Some(lender()))
            }
            Ok(grant) => {
                limiter.counters.count(false);
                Err(Limited {
                    retry_after: grant.retry_after.map(nanos),
                })
            }
            Err(_) => limiter
                .fall_back(global, self.key, self.tokens, now())
                .map(owned),
        }
    }

    /// The limiter.
    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }
}

impl Lender for RateLimiter {
    /// Takes back tokens of a flow a later stage rejected, into the local
    /// bucket they came from.
    fn give_back(&self, key: Option<Digest>, tokens: f64) {
        let p = &self.params();
        match key {
            None => self.state.one.lock().give_back(p, tokens),
            Some(key) => {
                self.state
                    .per_label
                    .with_existing(key, |b| b.give_back(p, tokens));
            }
        }
    }
}

impl Lender for Leases {
    /// Takes back leased tokens of a flow a later stage rejected: they stay
    /// this sidecar's to spend.
    fn give_back(&self, key: Option<Digest>, tokens: f64) {
        Leases::give_back(self, key, tokens);
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
            None,
        ))
    }

    fn try_flow(rl: &Arc<RateLimiter>, labels: &[(&str, &str)], now: Nanos) -> Result<(), Limited> {
        let source = MapLabels::from_pairs(labels.iter().copied());
        let flow = FlowLabels::new(&source);
        match rl.acquire(&flow, now) {
            Acquired::Taken(claim) => {
                claim.into_iter().for_each(Claim::spend);
                Ok(())
            }
            Acquired::Limited(limited) => Err(limited),
            Acquired::Ask(_) => panic!("a local limiter never asks the store"),
        }
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
            let Acquired::Taken(Some(claim)) = rl.acquire(&flow, 0) else {
                panic!("tokens left");
            };
            drop(claim);
        }
        for _ in 0..5 {
            assert!(try_flow(&rl, &[("user", "a")], 0).is_ok());
        }
        assert!(try_flow(&rl, &[("user", "a")], 0).is_err());
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
