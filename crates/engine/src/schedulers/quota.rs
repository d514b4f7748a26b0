//! Quota schedulers: a token bucket with a rate limiter's parameters whose
//! excess requests wait in weighted-fair order instead of being rejected at
//! once. With `limit_by_label_key`, each label value has its own bucket and
//! queue; a flow without the label passes.
//!
//! With `scope: global` the bucket is in the store, shared by every sidecar
//! running the policy, and the queue stays local: the scheduler spends
//! tokens leased from the shared bucket ([`crate::leases`]); when its lease
//! cannot pay the request at the head of a queue, it asks the store for
//! the next one in the background and the queue waits for it (or for the
//! store's retry time), so priorities and fairness order admission within
//! each sidecar exactly as with a local bucket. While the store cannot be
//! asked, `on_store_unavailable` decides: the local bucket (`local`),
//! admit everything (`accept`) or refuse at once (`reject`).
//!
//! The controller can drive the bucket's capacity and fill amount (a
//! `quota_scheduler` actuator) until its decision's `valid_until`, as it
//! drives a rate limiter's; then the policy's values are back. The values
//! in force are what every bucket of the scheduler refills by, and, with
//! `scope: global`, what this sidecar sends with each lease it asks for:
//! the store's bucket refills by the parameters of the call (a sidecar
//! whose decision lapsed sends the policy's again) and leases are sized
//! from the capacity in force. Every sidecar running the policy gets the
//! same decisions, so the shared bucket follows the controller.

use std::sync::Arc;

use prometheus::Gauge;
use sluice_policy::{QuotaSchedulerSpec, Scope, StoreFallback};
use sluice_time::{Clock, Nanos, nanos};
use tokio::sync::Notify;

use super::scheduler::{Config, Pool, Scheduler};
use super::wfq;
use crate::components::lease::Lease;
use crate::components::selector::Selector;
use crate::label_table::{Digest, LabelTable, TableMetrics, always};
use crate::labels::LabelRef;
use crate::leases::{LeaseMetrics, Leases, Spend};
use crate::metrics::{Metrics, Series};
use crate::status::{ComponentStatus, Driven};
use crate::store::SharedStore;
use crate::token_bucket::{BucketParams, TokenBucket};

/// The buckets of a quota scheduler.
pub struct Buckets {
    /// Bucket parameters in force: the policy's, or the controller's while
    /// its decision holds. Under the scheduler's lock like the buckets, so
    /// a queue never sees half of a change.
    pub params: BucketParams,
    /// The bucket, without `limit_by_label_key` (with `scope: global`, the
    /// fallback's).
    pub one: TokenBucket,
    /// The buckets, with `limit_by_label_key`.
    per_label: LabelTable<TokenBucket>,
    /// With `scope: global`: the leases of the shared buckets.
    pub global: Option<GlobalQuota>,
}

/// A global quota scheduler's leases, and what it does without the store.
pub struct GlobalQuota {
    /// Tokens leased from the store's buckets.
    pub leases: Arc<Leases>,
    /// What it decides while the store cannot be asked.
    pub fallback: StoreFallback,
    /// The scheduler's wake-up, for leases that arrive.
    wake: Arc<Notify>,
}

impl GlobalQuota {
    /// True while the store can be asked.
    fn usable(&self) -> bool {
        self.leases.store.available()
    }
}

/// The lease of one key, as a queue's capacity.
struct Leased<'a> {
    global: &'a GlobalQuota,
    key: Option<Digest>,
    params: &'a BucketParams,
}

impl Leased<'_> {
    /// Asks the store for `ask` in the background, and wakes the queue
    /// when the answer is in (granted or not: a denial sets its retry
    /// time, a failure lets the queue try again).
    fn fetch(&self, ask: crate::leases::Ask) {
        let leases = self.global.leases.clone();
        let wake = self.global.wake.clone();
        let params = *self.params;
        tokio::spawn(async move {
            let _ = leases.fetch(ask, params).await;
            wake.notify_one();
        });
    }
}

impl wfq::Capacity for Leased<'_> {
    fn try_take(&mut self, now: Nanos, tokens: f64) -> bool {
        let leases = &self.global.leases;
        let (spent, refill) = leases.spend(self.key, None, self.params, tokens, now);
        if let Some(ask) = refill {
            self.fetch(ask);
        }
        match spent {
            Spend::Spent => true,
            Spend::Denied(_) => false,
            Spend::Empty => {
                if let Some(ask) = leases.ask_for_queue(self.key, self.params, tokens, now) {
                    self.fetch(ask);
                }
                false
            }
        }
    }

    fn ready_at(&self, now: Nanos, _tokens: f64) -> Option<Nanos> {
        // Otherwise a lease on its way wakes the queue when it arrives.
        self.global.leases.denied_until(self.key, now)
    }
}

/// One bucket, as a queue's capacity.
struct Bucket<'a> {
    bucket: &'a mut TokenBucket,
    params: &'a BucketParams,
}

impl wfq::Capacity for Bucket<'_> {
    fn try_take(&mut self, now: Nanos, tokens: f64) -> bool {
        self.bucket.take(self.params, now, tokens).is_ok()
    }

    fn ready_at(&self, now: Nanos, tokens: f64) -> Option<Nanos> {
        self.bucket
            .wait(self.params, now, tokens)
            .map(|w| now.saturating_add(w))
    }
}

impl Pool for Buckets {
    fn with<R>(
        &mut self,
        key: Option<Digest>,
        now: Nanos,
        f: impl FnOnce(&mut dyn wfq::Capacity) -> R,
    ) -> R {
        let params = &self.params;
        if let Some(global) = self.global.as_ref().filter(|g| g.usable()) {
            return f(&mut Leased {
                global,
                key,
                params,
            });
        }
        match key {
            None => f(&mut Bucket {
                bucket: &mut self.one,
                params,
            }),
            Some(key) => self.per_label.with_digest(
                key,
                now,
                || TokenBucket::full(params, now),
                |bucket| f(&mut Bucket { bucket, params }),
            ),
        }
    }

    /// Global, the queue is the store's: a flow decided meanwhile by
    /// the fallback is counted, and `accept` lets it through.
    fn bypass(&mut self, _now: Nanos) -> bool {
        match &self.global {
            Some(global) if !global.usable() => {
                global.leases.metrics.fallbacks.inc();
                global.fallback == StoreFallback::Accept
            }
            _ => false,
        }
    }

    /// Tokens of a flow a later scheduler refused go back where they came
    /// from: the lease while the store is there, else the local bucket.
    fn give_back(&mut self, key: Option<Digest>, tokens: f64) {
        if let Some(global) = self.global.as_ref().filter(|g| g.usable()) {
            global.leases.give_back(key, tokens);
            return;
        }
        match key {
            None => self.one.give_back(&self.params, tokens),
            Some(key) => {
                let params = &self.params;
                self.per_label
                    .with_existing(key, |b| b.give_back(params, tokens));
            }
        }
    }

    fn drain_time(&self, _key: Option<Digest>, tokens: f64) -> Option<Nanos> {
        let per_nano = self.params.fill_amount / self.params.interval as f64;
        (per_nano > 0.0).then(|| (tokens / per_nano).ceil() as Nanos)
    }

    /// Also false for every flow while the store cannot be asked and the
    /// fallback is `reject`: refused at once.
    fn fits(&self, tokens: f64) -> bool {
        let rejecting = self
            .global
            .as_ref()
            .is_some_and(|g| !g.usable() && g.fallback == StoreFallback::Reject);
        tokens <= self.params.capacity && !rejecting
    }

    fn attach(&mut self, wake: &Arc<Notify>) {
        if let Some(global) = &mut self.global {
            global.wake = wake.clone();
        }
    }
}

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buckets")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// One compiled quota scheduler.
#[derive(Debug)]
pub struct QuotaScheduler {
    /// The queues and their buckets.
    pub scheduler: Arc<Scheduler<Buckets>>,
    /// `policy/name`: how `sluice.flow` refers to it.
    pub key: Box<str>,
    /// One bucket per value of this label, if set.
    pub limit_by: Option<LabelRef>,
    /// The policy's bucket parameters, which a lapsed controller decision
    /// returns to.
    default_params: BucketParams,
    /// Until when the controller's parameters hold; shared with the
    /// scheduler it was granted for, which a reload may keep.
    lease: Arc<Lease>,
    /// With `scope: global`: the pool's leases, reached without its lock.
    leases: Option<Arc<Leases>>,
    /// `token_bucket_fill_rate`.
    fill_rate: Gauge,
    /// `token_bucket_available_tokens_total`, of the one bucket (none per
    /// label value: there may be 100,000).
    available_tokens: Option<Gauge>,
    spec: QuotaSchedulerSpec,
}

fn same(a: &QuotaSchedulerSpec, b: &QuotaSchedulerSpec) -> bool {
    a.name.value == b.name.value
        && a.selectors == b.selectors
        && a.bucket_capacity == b.bucket_capacity
        && a.fill_amount == b.fill_amount
        && a.interval == b.interval
        && a.continuous_fill == b.continuous_fill
        && a.limit_by_label_key == b.limit_by_label_key
        && a.scheduler == b.scheduler
        && a.scope == b.scope
        && a.on_store_unavailable == b.on_store_unavailable
}

impl QuotaScheduler {
    /// Compiles a quota scheduler of `policy`; an unchanged one keeps
    /// `previous`'s buckets and queues.
    pub fn compile(
        policy: &Arc<str>,
        spec: &QuotaSchedulerSpec,
        metrics: &Metrics,
        clock: &Clock,
        max_label_values: usize,
        store: Option<&SharedStore>,
        previous: Option<&QuotaScheduler>,
    ) -> Self {
        if let Some(old) = previous.filter(|old| same(&old.spec, spec)) {
            return QuotaScheduler {
                scheduler: old.scheduler.clone(),
                key: old.key.clone(),
                limit_by: old.limit_by.clone(),
                default_params: old.default_params,
                lease: old.lease.clone(),
                leases: old.leases.clone(),
                fill_rate: old.fill_rate.clone(),
                available_tokens: old.available_tokens.clone(),
                spec: spec.clone(),
            };
        }
        let name: Arc<str> = spec.name.value.0.as_str().into();
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
        let mut series = Series::default();
        let fill_rate = metrics.fill_rate.series(&mut series, &[policy, &name]);
        let available_tokens = limit_by.is_none().then(|| {
            metrics
                .available_tokens
                .series(&mut series, &[policy, &name])
        });
        let table_metrics = TableMetrics::of_component(metrics, &mut series, policy, &name);
        let lease = Arc::new(Lease::new(metrics, &mut series, policy, &name));
        let global = match (spec.scope, store) {
            (Scope::Global, Some(store)) => Some(GlobalQuota {
                leases: Arc::new(Leases::new(
                    store.clone(),
                    clock.clone(),
                    policy,
                    &name,
                    max_label_values,
                    table_metrics.clone(),
                    LeaseMetrics::new(metrics, &mut series, policy, &name),
                )),
                fallback: spec.on_store_unavailable,
                // Replaced by the scheduler's own when it takes the pool.
                wake: Arc::new(Notify::new()),
            }),
            _ => None,
        };
        let config = Config::compile(&spec.scheduler, metrics, series, policy, &name);
        let leases = global.as_ref().map(|g| g.leases.clone());
        let buckets = Buckets {
            params,
            one: TokenBucket::full(&params, clock.now()),
            per_label: LabelTable::new(max_label_values, table_metrics, always),
            global,
        };
        QuotaScheduler {
            key: format!("{policy}/{name}").into(),
            scheduler: Arc::new(Scheduler::new(
                policy,
                name,
                spec.selectors.iter().map(Selector::compile).collect(),
                config,
                clock.clone(),
                buckets,
            )),
            limit_by,
            default_params: params,
            lease,
            leases,
            fill_rate,
            available_tokens,
            spec: spec.clone(),
        }
    }

    /// Forgets per-label buckets idle long enough to be full again, and
    /// updates the bucket gauges (with the parameters in force: the
    /// controller's, while driven).
    pub fn sweep(&self, now: Nanos) {
        self.scheduler.with_pool(|b| {
            let idle = full_again_after(&b.params);
            b.per_label.sweep(now, idle);
            if let Some(global) = &b.global {
                global.leases.sweep(now, idle);
            }
            let rate = b.params.fill_amount / (b.params.interval as f64 / 1e9);
            self.fill_rate.set(rate);
            if let Some(available) = &self.available_tokens {
                // Taking nothing refills a copy to now.
                let mut probe = b.one;
                let _ = probe.take(&b.params, now, 0.0);
                available.set(probe.tokens());
            }
        });
    }
}

/// How long an empty bucket takes to be full again, plus a second: a
/// bucket idle this long is full, so forgetting it loses nothing. From the
/// parameters in force, so that a bucket the controller refills slowly is
/// not forgotten (and found full) early.
fn full_again_after(p: &BucketParams) -> Nanos {
    let refill = if p.fill_amount > 0.0 {
        (p.capacity / p.fill_amount).ceil() * p.interval as f64
    } else {
        f64::MAX
    };
    (refill as Nanos).saturating_add(1_000_000_000)
}

impl QuotaScheduler {
    /// Sets the controller's capacity and/or fill amount until `until`; a
    /// value not given keeps the one in force. Wakes the queue, which plans
    /// again with the new bucket: the pump slept until the tokens the old
    /// one promised.
    pub fn set_bucket(&self, capacity: Option<f64>, fill_amount: Option<f64>, until: Nanos) {
        self.scheduler.with_pool(|b| {
            if let Some(c) = capacity.filter(|c| c.is_finite() && *c >= 0.0) {
                b.params.capacity = c;
            }
            if let Some(f) = fill_amount.filter(|f| f.is_finite() && *f >= 0.0) {
                b.params.fill_amount = f;
            }
        });
        self.lease.grant(until);
        self.scheduler.poke();
    }

    /// Returns to the policy's bucket when the controller's lease lapsed.
    pub fn revert_if_lapsed(&self, now: Nanos) -> bool {
        let lapsed = self.lease.lapse(now);
        if lapsed {
            self.scheduler.with_pool(|b| b.params = self.default_params);
            self.scheduler.poke();
        }
        lapsed
    }

    /// The bucket parameters in force.
    pub fn params(&self) -> BucketParams {
        self.scheduler.with_pool(|b| b.params)
    }

    /// What is in force now.
    pub fn status(&self, now: Nanos, wall_ms: i64) -> ComponentStatus {
        let (params, level, label_values, global) = self.scheduler.with_pool(|b| {
            (
                b.params,
                b.one.level(&b.params, now),
                b.per_label.len(),
                b.global.is_some(),
            )
        });
        let mut s = ComponentStatus::new("quota_scheduler", &self.scheduler.name).bucket(&params);
        s.scope = global.then_some("global");
        match &self.limit_by {
            Some(key) => {
                s.label_key = Some(key.name.to_string());
                s.label_values = Some(label_values);
            }
            None if !global => s.bucket_level = Some(level),
            None => {}
        }
        s.queued = Some(self.scheduler.queued());
        s.controller = Driven::of(&self.lease, now, wall_ms);
        s
    }

    /// Readies `key`'s lease for a flow whose label value is `value`: a
    /// global scheduler's queue knows keys, but the store names buckets by
    /// value.
    pub fn prepare(&self, key: Digest, value: &str, now: Nanos) {
        // The leases are fixed at compile time: no need for the pool's lock.
        if let Some(leases) = &self.leases {
            leases.touch(key, value, now);
        }
    }
}
