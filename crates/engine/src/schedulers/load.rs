//! Load schedulers: admit a share of the incoming token rate, so that a
//! service in trouble gets less load, with what matters most admitted first.
//!
//! The fill rate is the load multiplier × the incoming token rate observed
//! over `rate_window` (Aperture's semantics: at a multiplier of 0.5, half
//! of the offered tokens are admitted). A multiplier of 1 or more passes
//! everything without touching the queue; that is the policy's default, so
//! a load scheduler costs almost nothing until the controller lowers the
//! multiplier. The controller's multiplier holds until its `valid_until`:
//! then the scheduler passes everything again and says so
//! (`load_multiplier_expired`), so a dead controller never leaves a
//! service throttled.
//!
//! Admission paces tokens with GCRA (a virtual schedule that may run up to
//! [`BURST`] ahead of real time), so any request size is admitted at the
//! fill rate without a bucket capacity to tune.
//!
//! The incoming rate is counted without a lock (requests pass through on
//! the Check path in the common case), in a ring of per-interval atomics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus::{Gauge, IntGauge};
use sluice_policy::LoadSchedulerSpec;
use sluice_time::{Clock, Nanos, nanos};

use super::scheduler::{Config, Pool, Scheduler};
use super::wfq;
use crate::components::selector::Selector;
use crate::label_table::Digest;
use crate::metrics::{Metrics, Series};
use crate::status::{ComponentStatus, Driven};

/// How far ahead of real time admission may run.
pub const BURST: Nanos = 50_000_000;
/// Slots of the incoming-rate ring.
const RING: usize = 10;
/// Fixed-point scale of counted tokens.
const MILLI: f64 = 1000.0;

/// Tokens seen per slot of a sliding window, lock-free.
#[derive(Debug)]
pub struct RateWindow {
    slot_len: Nanos,
    /// Milli-tokens per slot.
    counts: [AtomicU64; RING],
    /// Which interval (time / slot_len) each slot counts.
    epochs: [AtomicU64; RING],
    /// When the first tokens were seen (`u64::MAX`: never).
    first: AtomicU64,
}

impl RateWindow {
    /// A window of `window` nanoseconds.
    pub fn new(window: Nanos) -> Self {
        RateWindow {
            slot_len: (window / RING as u64).max(1),
            counts: Default::default(),
            epochs: Default::default(),
            first: AtomicU64::new(u64::MAX),
        }
    }

    /// Counts `tokens` arriving at `now`.
    pub fn add(&self, now: Nanos, tokens: f64) {
        let epoch = now / self.slot_len;
        let i = (epoch % RING as u64) as usize;
        let seen = self.epochs[i].load(Ordering::Acquire);
        if seen != epoch
            && self.epochs[i]
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This slot now counts a new interval. A concurrent add to the
            // old interval may be lost: an estimate, not an account.
            self.counts[i].store(0, Ordering::Release);
        }
        self.counts[i].fetch_add((tokens * MILLI) as u64, Ordering::AcqRel);
        // Read first: a compare-exchange would take the cache line on every call.
        if self.first.load(Ordering::Relaxed) == u64::MAX {
            let _ = self
                .first
                .compare_exchange(u64::MAX, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Tokens per second over the window, or `None` before one slot of
    /// observation.
    pub fn rate(&self, now: Nanos) -> Option<f64> {
        let first = self.first.load(Ordering::Acquire);
        if first == u64::MAX || now.saturating_sub(first) < self.slot_len {
            return None;
        }
        let epoch = now / self.slot_len;
        let oldest = epoch.saturating_sub(RING as u64 - 1);
        let sum: u64 = (0..RING)
            .filter(|&i| {
                let e = self.epochs[i].load(Ordering::Acquire);
                e >= oldest && e <= epoch
            })
            .map(|i| self.counts[i].load(Ordering::Acquire))
            .sum();
        // The current slot is partly elapsed; the window covers what has
        // been observed, at most RING slots.
        let covered = ((epoch - oldest) * self.slot_len + now % self.slot_len)
            .min(now.saturating_sub(first))
            .max(1);
        Some(sum as f64 / MILLI / (covered as f64 / 1e9))
    }
}

/// The load multiplier in force, lock-free.
#[derive(Debug)]
pub struct Multiplier {
    /// From the policy.
    policy: f64,
    /// The controller's value (f64 bits).
    set: AtomicU64,
    /// Until when (engine clock); `u64::MAX` when never set.
    until: AtomicU64,
    /// Whether the controller's value has lapsed (and was reported so).
    expired: AtomicBool,
}

impl Multiplier {
    fn new(policy: f64) -> Self {
        Multiplier {
            policy,
            set: AtomicU64::new(policy.to_bits()),
            until: AtomicU64::new(u64::MAX),
            expired: AtomicBool::new(false),
        }
    }

    /// True while a controller's multiplier holds at `now`.
    pub fn leased(&self, now: Nanos) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until != u64::MAX && now < until
    }

    /// The multiplier at `now`, and whether a controller value lapsed.
    pub fn at(&self, now: Nanos) -> (f64, bool) {
        let until = self.until.load(Ordering::Acquire);
        if until == u64::MAX {
            return (self.policy, false);
        }
        if now >= until {
            return (1.0, true);
        }
        (f64::from_bits(self.set.load(Ordering::Acquire)), false)
    }
}

/// The capacity of a load scheduler's queue.
#[derive(Debug)]
pub struct Pacer {
    rate: Arc<RateWindow>,
    multiplier: Arc<Multiplier>,
    /// GCRA's theoretical arrival time.
    tat: Nanos,
    /// Farthest ahead of now one admission may push `tat`: the rate
    /// window. A request's tokens may come from a label (a header), so one
    /// absurd value must not stop admissions for longer than that.
    max_debt: Nanos,
    dry_run: bool,
}

impl Pacer {
    fn fill_rate(&self, now: Nanos) -> Option<f64> {
        let (lm, _) = self.multiplier.at(now);
        self.rate.rate(now).map(|r| r * lm)
    }
}

impl wfq::Capacity for Pacer {
    fn try_take(&mut self, now: Nanos, tokens: f64) -> bool {
        let Some(fill) = self.fill_rate(now).filter(|f| *f > 0.0) else {
            return false;
        };
        if self.tat > now.saturating_add(BURST) {
            return false;
        }
        // `as` saturates: a huge request is a huge interval, capped below.
        let interval = (tokens / fill * 1e9) as Nanos;
        self.tat = self
            .tat
            .max(now)
            .saturating_add(interval)
            .min(now.saturating_add(self.max_debt));
        true
    }

    fn ready_at(&self, now: Nanos, _tokens: f64) -> Option<Nanos> {
        self.fill_rate(now)
            .filter(|f| *f > 0.0)
            .map(|_| self.tat.saturating_sub(BURST).max(now))
    }
}

impl Pool for Pacer {
    fn with<R>(
        &mut self,
        _key: Option<Digest>,
        _now: Nanos,
        f: impl FnOnce(&mut dyn wfq::Capacity) -> R,
    ) -> R {
        f(self)
    }

    fn bypass(&mut self, now: Nanos) -> bool {
        let (lm, _) = self.multiplier.at(now);
        // Before the rate is known there is nothing to take a share of.
        (lm >= 1.0 && !self.dry_run) || self.rate.rate(now).is_none()
    }

    fn give_back(&mut self, _key: Option<Digest>, tokens: f64) {
        if let Some(fill) = self.fill_rate(self.tat).filter(|f| *f > 0.0) {
            self.tat = self.tat.saturating_sub((tokens / fill * 1e9) as Nanos);
        }
    }

    fn drain_time(&self, _key: Option<Digest>, tokens: f64) -> Option<Nanos> {
        let fill = self.fill_rate(self.tat).filter(|f| *f > 0.0)?;
        Some((tokens / fill * 1e9) as Nanos)
    }

    fn dry_run(&self) -> bool {
        self.dry_run
    }
}

/// One compiled load scheduler.
#[derive(Debug)]
pub struct LoadScheduler {
    /// The queue and its pacer.
    pub scheduler: Arc<Scheduler<Pacer>>,
    /// `policy/name`: how `sluice.flow` refers to it.
    pub key: Box<str>,
    /// The incoming token rate.
    pub rate: Arc<RateWindow>,
    /// The multiplier in force.
    pub multiplier: Arc<Multiplier>,
    /// Decide and count, but admit everything.
    pub dry_run: bool,
    /// Estimate tokens per workload from latency.
    pub latency_based_tokens: bool,
    /// Per workload: latency estimate in ms (f64 bits; 0 = none yet).
    latency_ms: Box<[AtomicU64]>,
    /// Its gauges, updated by [`LoadScheduler::sweep`].
    gauges: LoadGauges,
    spec: LoadSchedulerSpec,
}

/// The gauges of a load scheduler.
#[derive(Clone, Debug)]
struct LoadGauges {
    /// `token_bucket_lm_ratio`.
    lm_ratio: Gauge,
    /// `token_bucket_fill_rate`.
    fill_rate: Gauge,
    /// `load_multiplier_expired`.
    lm_expired: IntGauge,
    /// `controller_decision_active`.
    controller_active: IntGauge,
}

fn same(a: &LoadSchedulerSpec, b: &LoadSchedulerSpec) -> bool {
    a.name.value == b.name.value
        && a.selectors == b.selectors
        && a.load_multiplier == b.load_multiplier
        && a.rate_window == b.rate_window
        && a.workload_latency_based_tokens == b.workload_latency_based_tokens
        && a.dry_run == b.dry_run
        && a.scheduler == b.scheduler
}

/// Weight of a new latency observation in the estimate.
const LATENCY_EMA: f64 = 0.05;

impl LoadScheduler {
    /// Compiles a load scheduler of `policy`; an unchanged one keeps
    /// `previous`'s queue, rate and the controller's multiplier.
    pub fn compile(
        policy: &Arc<str>,
        spec: &LoadSchedulerSpec,
        metrics: &Metrics,
        clock: &Clock,
        previous: Option<&LoadScheduler>,
    ) -> Self {
        if let Some(old) = previous.filter(|old| same(&old.spec, spec)) {
            return LoadScheduler {
                scheduler: old.scheduler.clone(),
                key: old.key.clone(),
                rate: old.rate.clone(),
                multiplier: old.multiplier.clone(),
                dry_run: old.dry_run,
                latency_based_tokens: old.latency_based_tokens,
                latency_ms: old
                    .latency_ms
                    .iter()
                    .map(|v| AtomicU64::new(v.load(Ordering::Relaxed)))
                    .collect(),
                gauges: old.gauges.clone(),
                spec: spec.clone(),
            };
        }
        let name: Arc<str> = spec.name.value.0.as_str().into();
        let mut series = Series::default();
        let labels = &[&**policy, &*name];
        let gauges = LoadGauges {
            lm_ratio: metrics.lm_ratio.series(&mut series, labels),
            fill_rate: metrics.fill_rate.series(&mut series, labels),
            lm_expired: metrics.lm_expired.series(&mut series, labels),
            controller_active: metrics
                .controller_decision_active
                .series(&mut series, labels),
        };
        let config = Config::compile(&spec.scheduler, metrics, series, policy, &name);
        let rate = Arc::new(RateWindow::new(nanos(spec.rate_window.0)));
        let multiplier = Arc::new(Multiplier::new(spec.load_multiplier.0));
        let latency_ms = (0..config.workloads.len())
            .map(|_| AtomicU64::new(0))
            .collect();
        let pacer = Pacer {
            rate: rate.clone(),
            multiplier: multiplier.clone(),
            tat: 0,
            max_debt: nanos(spec.rate_window.0).max(BURST),
            dry_run: spec.dry_run,
        };
        LoadScheduler {
            key: format!("{policy}/{name}").into(),
            scheduler: Arc::new(Scheduler::new(
                policy,
                name,
                spec.selectors.iter().map(Selector::compile).collect(),
                config,
                clock.clone(),
                pacer,
            )),
            rate,
            multiplier,
            dry_run: spec.dry_run,
            latency_based_tokens: spec.workload_latency_based_tokens,
            latency_ms,
            gauges,
            spec: spec.clone(),
        }
    }

    /// Counts a flow's tokens into the incoming rate and says whether the
    /// scheduler passes everything now (then the flow is admitted without
    /// queueing or locking).
    pub fn passes(&self, now: Nanos, tokens: f64) -> bool {
        self.rate.add(now, tokens);
        let (lm, _) = self.multiplier.at(now);
        lm >= 1.0 && !self.dry_run
    }

    /// Sets the controller's multiplier until `until` (engine time).
    pub fn set_multiplier(&self, lm: f64, until: Nanos) {
        self.multiplier
            .set
            .store(lm.max(0.0).to_bits(), Ordering::Release);
        self.multiplier
            .until
            .store(until.min(u64::MAX - 1), Ordering::Release);
        self.multiplier.expired.store(false, Ordering::Release);
        self.gauges.controller_active.set(1);
    }

    /// What is in force now.
    pub fn status(&self, now: Nanos, wall_ms: i64) -> ComponentStatus {
        let mut s = ComponentStatus::new("load_scheduler", &self.scheduler.name);
        let (lm, _) = self.multiplier.at(now);
        s.load_multiplier = Some(lm);
        s.incoming_rate = self.rate.rate(now);
        s.dry_run = Some(self.dry_run);
        s.queued = Some(self.scheduler.queued());
        let until = self.multiplier.until.load(Ordering::Acquire);
        let remaining = (until != u64::MAX && now < until).then(|| until - now);
        s.controller = Driven::from_remaining(remaining, wall_ms);
        s
    }

    /// The latency-based token estimate of `workload`, if there is one.
    pub fn estimated_tokens(&self, workload: usize) -> Option<f64> {
        if !self.latency_based_tokens {
            return None;
        }
        let v = f64::from_bits(self.latency_ms.get(workload)?.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    /// Learns a workload's latency from an access log.
    pub fn observe_latency(&self, workload: usize, ms: f64) {
        self.scheduler.config.observe_latency(workload, ms);
        if let Some(slot) = self.latency_ms.get(workload) {
            let old = f64::from_bits(slot.load(Ordering::Relaxed));
            let new = if old > 0.0 {
                old + LATENCY_EMA * (ms - old)
            } else {
                ms
            };
            slot.store(new.to_bits(), Ordering::Relaxed);
        }
    }

    /// Updates the gauges; logs once when a controller multiplier lapses.
    pub fn sweep(&self, now: Nanos) {
        let (lm, expired) = self.multiplier.at(now);
        let g = &self.gauges;
        g.lm_ratio.set(lm);
        let rate = self.rate.rate(now).unwrap_or(0.0);
        g.fill_rate.set(rate * lm);
        g.lm_expired.set(i64::from(expired));
        g.controller_active
            .set(i64::from(self.multiplier.leased(now)));
        if expired && !self.multiplier.expired.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                policy = %self.scheduler.policy,
                scheduler = %self.scheduler.name,
                "load multiplier expired (no fresh decision from the controller); passing everything"
            );
        }
    }
}

#[cfg(test)]
mod tests;
