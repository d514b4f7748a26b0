//! Quota schedulers: a token bucket with a rate limiter's parameters whose
//! excess requests wait in weighted-fair order instead of being rejected at
//! once. With `limit_by_label_key`, each label value has its own bucket and
//! queue; a flow without the label passes.

use std::sync::Arc;

use super::label_table::{Digest, LabelTable, TableMetrics, always};
use super::labels::LabelRef;
use super::rate_limiter::{BucketParams, TokenBucket};
use super::scheduler::{Config, Scheduler, Source, wfq};
use super::selector::Selector;
use crate::clock::{Clock, Nanos, nanos};
use crate::policy::QuotaSchedulerSpec;
use crate::telemetry::Metrics;

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

impl Source for Buckets {
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
        let config = Config::compile(&spec.scheduler, metrics, policy, &name);
        let buckets = Buckets {
            params,
            global: TokenBucket::full(&params, clock.now()),
            per_label: LabelTable::new(
                max_label_values,
                TableMetrics::of_component(metrics, policy, &name),
                always,
            ),
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
            limit_by: spec
                .limit_by_label_key
                .as_ref()
                .map(|k| LabelRef::new(&k.0)),
            idle: (refill as Nanos).saturating_add(1_000_000_000),
            spec: spec.clone(),
        }
    }

    /// Forgets per-label buckets idle long enough to be full again, and
    /// updates the bucket gauges.
    pub fn sweep(&self, now: Nanos, metrics: &Metrics) {
        let labels = [&*self.scheduler.policy, &*self.scheduler.name];
        self.scheduler.with_source(|b| {
            b.per_label.sweep(now, self.idle);
            let rate = b.params.fill_amount / (b.params.interval as f64 / 1e9);
            metrics.fill_rate.with_label_values(&labels).set(rate);
            if self.limit_by.is_none() {
                // Taking nothing refills a copy to now.
                let mut probe = b.global;
                let _ = probe.take(&b.params, now, 0.0);
                metrics
                    .available_tokens
                    .with_label_values(&labels)
                    .set(probe.tokens());
            }
        });
    }
}
