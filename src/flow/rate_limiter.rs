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

use super::RejectReason;
use super::label_table::{Digest, LabelTable, TableMetrics, always};
use super::labels::{FlowLabels, LabelRef};
use super::lease::Lease;
use super::selector::Selector;
use crate::clock::{Nanos, nanos};
use crate::policy::RateLimiterSpec;
use crate::telemetry::{DecisionCounters, Metrics};

/// What a bucket is: fixed per compiled limiter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketParams {
    /// Most tokens held.
    pub capacity: f64,
    /// Tokens added per interval.
    pub fill_amount: f64,
    /// The refill period, in nanoseconds (> 0).
    pub interval: Nanos,
    /// Smooth refill, or whole `fill_amount`s at interval boundaries.
    pub continuous: bool,
}

/// A token bucket's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    /// Tokens available now (after the last refill).
    tokens: f64,
    /// When the bucket was last refilled; in discrete mode, the last
    /// interval boundary passed.
    last: Nanos,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(params: &BucketParams, now: Nanos) -> Self {
        TokenBucket {
            tokens: params.capacity,
            last: now,
        }
    }

    fn refill(&mut self, p: &BucketParams, now: Nanos) {
        if now <= self.last {
            return;
        }
        let elapsed = now - self.last;
        if p.continuous {
            self.tokens =
                (self.tokens + p.fill_amount * elapsed as f64 / p.interval as f64).min(p.capacity);
            self.last = now;
        } else {
            let intervals = elapsed / p.interval;
            if intervals > 0 {
                self.tokens = (self.tokens + p.fill_amount * intervals as f64).min(p.capacity);
                self.last += intervals * p.interval;
            }
        }
    }

    /// Takes `n` tokens, or says how long until they will be there
    /// (`Err(None)`: never).
    pub fn take(&mut self, p: &BucketParams, now: Nanos, n: f64) -> Result<(), Option<Nanos>> {
        self.refill(p, now);
        if n <= self.tokens {
            self.tokens -= n;
            return Ok(());
        }
        if n > p.capacity || p.fill_amount <= 0.0 {
            return Err(None);
        }
        let missing = n - self.tokens;
        let wait = if p.continuous {
            (missing * p.interval as f64 / p.fill_amount).ceil() as Nanos
        } else {
            // Saturating: a tiny fill_amount must not overflow into nonsense.
            let intervals = (missing / p.fill_amount).ceil() as Nanos;
            self.last
                .saturating_add(intervals.saturating_mul(p.interval))
                .saturating_sub(now)
        };
        Err(Some(wait.max(1)))
    }

    /// How long until `n` tokens are there (0: now; `None`: never),
    /// without taking them.
    pub fn wait(&self, p: &BucketParams, now: Nanos, n: f64) -> Option<Nanos> {
        let mut copy = *self;
        match copy.take(p, now, n) {
            Ok(()) => Some(0),
            Err(wait) => wait,
        }
    }

    /// Returns tokens taken by a flow that a later stage rejected.
    pub fn give_back(&mut self, p: &BucketParams, n: f64) {
        self.tokens = (self.tokens + n).min(p.capacity);
    }

    /// Tokens available (as of the last refill).
    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

/// The state of a limiter, kept across policy reloads that leave the
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

/// Tokens a flow holds from one limiter until the flow's fate is known.
pub struct Hold<'a> {
    limiter: &'a RateLimiter,
    key: Option<Digest>,
    tokens: f64,
}

impl Hold<'_> {
    /// Gives the tokens back (a later stage rejected the flow).
    pub fn release(self) {
        self.limiter.give_back(self.key, self.tokens);
    }

    /// The same hold, independent of the plan's lifetime, for a flow that
    /// waits in a scheduler.
    pub fn into_owned(self) -> OwnedHold {
        OwnedHold {
            state: self.limiter.state.clone(),
            params: self.limiter.params(),
            key: self.key,
            tokens: self.tokens,
        }
    }
}

/// A [`Hold`] that owns what it needs.
pub struct OwnedHold {
    state: Arc<LimiterState>,
    params: BucketParams,
    key: Option<Digest>,
    tokens: f64,
}

impl OwnedHold {
    /// Gives the tokens back.
    pub fn release(self) {
        self.state.give_back(&self.params, self.key, self.tokens);
    }
}

impl LimiterState {
    fn give_back(&self, p: &BucketParams, key: Option<Digest>, tokens: f64) {
        match key {
            None => self.global.lock().give_back(p, tokens),
            Some(key) => {
                self.per_label
                    .with_existing(key, |b| b.give_back(p, tokens));
            }
        }
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
        let state = match previous {
            Some(old) if old.default_params == params && old.limit_by == limit_by => {
                old.state.clone()
            }
            _ => Arc::new(LimiterState {
                global: Mutex::new(TokenBucket::full(&params, 0)),
                per_label: LabelTable::new(
                    max_label_values,
                    TableMetrics::of_component(metrics, policy, &name),
                    always,
                ),
            }),
        };
        RateLimiter {
            counters: DecisionCounters::new(
                &metrics.rate_limiter,
                &metrics.reject_reasons,
                policy,
                &name,
                RejectReason::RateLimited.as_str(),
            ),
            policy: policy.clone(),
            name,
            selectors: spec.selectors.iter().map(Selector::compile).collect(),
            default_params: params,
            capacity: AtomicU64::new(params.capacity.to_bits()),
            fill_amount: AtomicU64::new(params.fill_amount.to_bits()),
            lease: Lease::default(),
            limit_by,
            tokens_label: spec.tokens_label_key.as_ref().map(|k| LabelRef::new(&k.0)),
            max_idle: nanos(spec.max_idle_time.0),
            denied_status: spec.denied_status_code.0,
            state,
        }
    }

    /// Charges the flow, or says why not. Counts the decision.
    pub fn acquire<'a>(
        &'a self,
        labels: &FlowLabels<'_>,
        now: Nanos,
    ) -> Result<Option<Hold<'a>>, Limited> {
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
            Ok(()) => Ok(Some(Hold {
                limiter: self,
                key,
                tokens,
            })),
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

    /// Gives back tokens a flow took (a later stage rejected it).
    pub fn give_back(&self, key: Option<Digest>, tokens: f64) {
        self.state.give_back(&self.params(), key, tokens);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::flow::labels::MapLabels;
    use std::time::Duration;

    const SEC: Nanos = 1_000_000_000;

    fn params(capacity: f64, fill: f64, interval: Nanos, continuous: bool) -> BucketParams {
        BucketParams {
            capacity,
            fill_amount: fill,
            interval,
            continuous,
        }
    }

    #[test]
    fn a_new_bucket_is_full_and_holds_no_more_than_capacity() {
        let p = params(5.0, 1.0, SEC, true);
        let mut b = TokenBucket::full(&p, 0);
        for _ in 0..5 {
            assert_eq!(b.take(&p, 0, 1.0), Ok(()));
        }
        assert_eq!(b.take(&p, 0, 1.0), Err(Some(SEC)));
        // A long idle time refills to capacity, not beyond.
        assert!(b.take(&p, 1000 * SEC, 6.0).is_err());
        assert_eq!(b.take(&p, 1000 * SEC, 5.0), Ok(()));
    }

    #[test]
    fn continuous_fill_is_proportional_to_elapsed_time() {
        let p = params(10.0, 10.0, SEC, true); // 10 tokens per second
        let mut b = TokenBucket::full(&p, 0);
        assert_eq!(b.take(&p, 0, 10.0), Ok(()));
        // After 250 ms, 2.5 tokens are there.
        assert_eq!(b.take(&p, SEC / 4, 3.0), Err(Some(SEC / 20)));
        assert_eq!(b.take(&p, SEC / 4, 2.0), Ok(()));
        assert!((b.tokens() - 0.5).abs() < 1e-9);
        assert_eq!(b.take(&p, SEC / 4 + SEC / 20, 1.0), Ok(()));
    }

    #[test]
    fn interval_fill_comes_in_whole_steps_at_boundaries() {
        let p = params(10.0, 4.0, SEC, false);
        let mut b = TokenBucket::full(&p, 0);
        assert_eq!(b.take(&p, 0, 10.0), Ok(()));
        // Nothing arrives until the boundary, however close.
        assert_eq!(b.take(&p, SEC - 1, 1.0), Err(Some(1)));
        assert_eq!(b.take(&p, SEC, 4.0), Ok(()));
        assert_eq!(b.take(&p, SEC, 1.0), Err(Some(SEC)));
        // 2.5 intervals later: two steps (8 tokens), boundary kept in phase;
        // 9 tokens are one more step away, at 4 s.
        assert_eq!(b.take(&p, SEC * 7 / 2, 9.0), Err(Some(SEC / 2)));
        assert_eq!(b.take(&p, SEC * 7 / 2, 8.0), Ok(()));
    }

    #[test]
    fn a_tiny_interval_fill_saturates_instead_of_overflowing() {
        let p = params(5.0, 1e-7, 3_600 * SEC, false);
        let mut b = TokenBucket::full(&p, 0);
        assert_eq!(b.take(&p, 0, 5.0), Ok(()));
        assert_eq!(b.take(&p, 0, 1.0), Err(Some(u64::MAX)));
    }

    #[test]
    fn a_flow_larger_than_the_bucket_never_passes() {
        let p = params(5.0, 5.0, SEC, true);
        let mut b = TokenBucket::full(&p, 0);
        assert_eq!(b.take(&p, 0, 6.0), Err(None));
        let dry = params(5.0, 0.0, SEC, true);
        let mut b = TokenBucket::full(&dry, 0);
        assert_eq!(b.take(&dry, 0, 5.0), Ok(()));
        assert_eq!(b.take(&dry, 100 * SEC, 1.0), Err(None));
    }

    fn limiter(extra: &str) -> RateLimiter {
        let yaml = format!(
            "name: rl\nselectors: [{{control_point: ingress}}]\nbucket_capacity: 5\nfill_amount: 5\ninterval: 1s\n{extra}"
        );
        let spec: RateLimiterSpec = serde_saphyr::from_str(&yaml).expect("valid limiter");
        RateLimiter::compile(&"p".into(), &spec, &Metrics::new(), 1000, None)
    }

    fn try_flow(rl: &RateLimiter, labels: &[(&str, &str)], now: Nanos) -> Result<(), Limited> {
        let source = MapLabels::from_pairs(labels.iter().copied());
        let flow = FlowLabels::new(&source);
        rl.acquire(&flow, now).map(|_| ())
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
    fn released_holds_return_their_tokens() {
        let rl = limiter("limit_by_label_key: user\n");
        let source = MapLabels::from_pairs([("user", "a")]);
        let flow = FlowLabels::new(&source);
        for _ in 0..5 {
            let hold = rl
                .acquire(&flow, 0)
                .expect("tokens left")
                .expect("labelled");
            hold.release();
        }
        for _ in 0..5 {
            assert!(rl.acquire(&flow, 0).is_ok());
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
