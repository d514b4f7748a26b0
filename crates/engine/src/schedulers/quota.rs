//! Quota schedulers: a token bucket with a rate limiter's parameters whose
//! excess requests wait in weighted-fair order instead of being rejected at
//! once. With `limit_by_label_key`, each label value has its own bucket and
//! queue; a flow without the label passes.

use std::sync::Arc;

use prometheus::Gauge;
use sluice_policy::QuotaSchedulerSpec;
use sluice_time::{Clock, Nanos, nanos};

use super::scheduler::{Config, Pool, Scheduler};
use super::wfq;
use crate::components::selector::Selector;
use crate::label_table::{Digest, LabelTable, TableMetrics, always};
use crate::labels::LabelRef;
use crate::metrics::{Metrics, Series};
use crate::token_bucket::{BucketParams, TokenBucket};

/// The buckets of a quota scheduler.
pub struct Buckets {
    /// Bucket parameters.
    pub params: BucketParams,
    /// The bucket, without `limit_by_label_key`.
    pub global: TokenBucket,
    /// The buckets, with `limit_by_label_key`.
    per_label: LabelTable<TokenBucket>,
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
        match key {
            None => f(&mut Bucket {
                bucket: &mut self.global,
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

    fn give_back(&mut self, key: Option<Digest>, tokens: f64) {
        match key {
            None => self.global.give_back(&self.params, tokens),
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

    fn fits(&self, tokens: f64) -> bool {
        tokens <= self.params.capacity
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
    /// A bucket idle this long is full again, so forgetting it loses nothing.
    idle: Nanos,
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
        previous: Option<&QuotaScheduler>,
    ) -> Self {
        if let Some(old) = previous.filter(|old| same(&old.spec, spec)) {
            return QuotaScheduler {
                scheduler: old.scheduler.clone(),
                key: old.key.clone(),
                limit_by: old.limit_by.clone(),
                idle: old.idle,
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
        let refill = if params.fill_amount > 0.0 {
            (params.capacity / params.fill_amount).ceil() * params.interval as f64
        } else {
            f64::MAX
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
        let config = Config::compile(&spec.scheduler, metrics, series, policy, &name);
        let buckets = Buckets {
            params,
            global: TokenBucket::full(&params, clock.now()),
            per_label: LabelTable::new(max_label_values, table_metrics, always),
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
            idle: (refill as Nanos).saturating_add(1_000_000_000),
            fill_rate,
            available_tokens,
            spec: spec.clone(),
        }
    }

    /// Forgets per-label buckets idle long enough to be full again, and
    /// updates the bucket gauges.
    pub fn sweep(&self, now: Nanos) {
        self.scheduler.with_pool(|b| {
            b.per_label.sweep(now, self.idle);
            let rate = b.params.fill_amount / (b.params.interval as f64 / 1e9);
            self.fill_rate.set(rate);
            if let Some(available) = &self.available_tokens {
                // Taking nothing refills a copy to now.
                let mut probe = b.global;
                let _ = probe.take(&b.params, now, 0.0);
                available.set(probe.tokens());
            }
        });
    }
}
