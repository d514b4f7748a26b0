//! The machinery every scheduler shares: when a service is saturated,
//! requests wait a short time and are admitted in weighted-fair order, so
//! that what matters most goes first and the rest degrade gracefully.
//!
//! Three components share it and differ only in their [`Pool`] of
//! capacity: the load scheduler (a share of the incoming token rate,
//! [`super::load`]), the quota scheduler (token buckets, [`super::quota`])
//! and the concurrency scheduler (slots returned by the access log,
//! [`super::concurrency`]).
//!
//! A request is classified into a workload (first matching label matcher,
//! or the `workload_label_key` label), gets its tokens, priority and
//! fairness value, and is offered to the [`wfq::Queue`] of its capacity key.
//! Admitted at once, it goes on; queued, its Check is a parked future
//! (a oneshot receiver) that costs no thread, woken when the queue's pump
//! task admits it in fair order or rejects it at its deadline:
//! min(`queue_timeout`, Envoy's gRPC deadline − `decision_deadline_margin`).
//! A waiter that goes away (Envoy gave up) leaves the queue without taking
//! capacity. What an admission takes travels as a
//! [`Claim`], through the waiter's channel when
//! the pump admits it: if the waiter is gone by then, the claim is dropped
//! and the capacity comes back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{Counter, Histogram, IntCounter};
use tokio::sync::{Notify, oneshot};

use sluice_policy::SchedulerSpec;
use sluice_time::{Clock, Nanos, nanos};

use super::wfq::{self, Offer, Outcome, Queue, Ticket};
use crate::admission::{Claim, Lender};
use crate::components::selector::{Matcher, Selector};
use crate::decision::RejectReason;
use crate::label_table::Digest;
use crate::labels::{FlowLabels, LabelRef};
use crate::metrics::{ACCEPTED, Metrics, REJECTED, Series};

/// How a workload's requests are scheduled, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// Weight.
    pub priority: f64,
    /// Cost of one request.
    pub tokens: f64,
    /// Longest wait.
    pub queue_timeout: Nanos,
}

/// One workload, compiled.
#[derive(Debug)]
pub struct Workload {
    /// Its name, if it has one.
    pub name: Option<Arc<str>>,
    /// Which requests belong to it; `None` matches all.
    matcher: Option<Matcher>,
    /// Its parameters.
    pub params: Params,
    /// Its series (`workload_index` label).
    metrics: WorkloadMetrics,
}

/// The series of one workload.
#[derive(Clone, Debug)]
struct WorkloadMetrics {
    accepted: IntCounter,
    rejected: IntCounter,
    incoming_tokens: Counter,
    accepted_tokens: Counter,
    rejected_tokens: Counter,
    in_queue_ms: Histogram,
    latency_ms: Histogram,
}

impl WorkloadMetrics {
    fn new(
        metrics: &Metrics,
        series: &mut Series,
        policy: &str,
        component: &str,
        index: &str,
    ) -> Self {
        let labels = [policy, component, index];
        let with = |d| [policy, component, index, d];
        WorkloadMetrics {
            accepted: metrics.workload_requests.series(series, &with(ACCEPTED)),
            rejected: metrics.workload_requests.series(series, &with(REJECTED)),
            incoming_tokens: metrics.incoming_tokens.series(series, &labels),
            accepted_tokens: metrics.accepted_tokens.series(series, &labels),
            rejected_tokens: metrics.rejected_tokens.series(series, &labels),
            in_queue_ms: metrics.request_in_queue_duration.series(series, &labels),
            latency_ms: metrics.workload_latency.series(series, &labels),
        }
    }

    fn decided(&self, tokens: f64, accepted: bool, waited: Nanos) {
        if accepted {
            self.accepted.inc();
            self.accepted_tokens.inc_by(tokens);
        } else {
            self.rejected.inc();
            self.rejected_tokens.inc_by(tokens);
        }
        self.in_queue_ms.observe(waited as f64 / 1e6);
    }
}

/// A scheduler's configuration, compiled from `scheduler:`.
#[derive(Debug)]
pub struct Config {
    /// The workloads, the default one last.
    pub workloads: Vec<Workload>,
    priority_key: Option<LabelRef>,
    tokens_key: Option<LabelRef>,
    workload_key: Option<LabelRef>,
    fairness_key: Option<LabelRef>,
    /// Kept back from Envoy's deadline.
    pub margin: Nanos,
    /// Status of a rejected request.
    pub denied_status: u16,
    /// Most requests waiting (per capacity key).
    pub max_queued: usize,
    /// Its rejections in `flowcontrol_reject_reasons_total`: queue timeout,
    /// queue full, too large.
    rejections: [IntCounter; 3],
    /// Every series it writes.
    pub series: Series,
}

fn params(p: &sluice_policy::WorkloadParameters) -> Params {
    Params {
        priority: p.priority.0,
        tokens: p.tokens.0,
        queue_timeout: nanos(p.queue_timeout.0),
    }
}

impl Config {
    /// Compiles `spec` for component `component` of `policy`; the
    /// component's own series (beyond its workloads') go in `series` first.
    pub fn compile(
        spec: &SchedulerSpec,
        metrics: &Metrics,
        mut series: Series,
        policy: &str,
        component: &str,
    ) -> Self {
        let mut workloads: Vec<Workload> = spec
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| Workload {
                name: w.name.as_ref().map(|n| n.0.as_str().into()),
                matcher: w.label_matcher.as_ref().map(Matcher::compile),
                params: params(&w.parameters),
                metrics: WorkloadMetrics::new(
                    metrics,
                    &mut series,
                    policy,
                    component,
                    &i.to_string(),
                ),
            })
            .collect();
        workloads.push(Workload {
            name: None,
            matcher: None,
            params: params(&spec.default_workload_parameters),
            metrics: WorkloadMetrics::new(metrics, &mut series, policy, component, "default"),
        });
        let rejections = [
            RejectReason::QueueTimeout,
            RejectReason::QueueFull,
            RejectReason::NoTokens,
        ]
        .map(|r| {
            metrics
                .reject_reasons
                .series(&mut series, &[policy, component, r.as_str()])
        });
        let key =
            |k: &Option<sluice_policy::types::LabelName>| k.as_ref().map(|k| LabelRef::new(&k.0));
        Config {
            workloads,
            priority_key: key(&spec.priority_label_key),
            tokens_key: key(&spec.tokens_label_key),
            workload_key: key(&spec.workload_label_key),
            fairness_key: key(&spec.fairness_label_key),
            margin: nanos(spec.decision_deadline_margin.0),
            denied_status: spec.denied_status_code.0,
            max_queued: spec.max_queued_requests,
            rejections,
            series,
        }
    }

    /// Counts a rejection in `flowcontrol_reject_reasons_total`.
    pub fn count_rejection(&self, reason: RejectReason) {
        let i = match reason {
            RejectReason::QueueFull => 1,
            RejectReason::NoTokens => 2,
            _ => 0,
        };
        self.rejections[i].inc();
    }

    /// Counts a flow admitted without queueing or locking (a load
    /// scheduler passing everything).
    pub fn count_pass(&self, workload: usize, tokens: f64) {
        if let Some(w) = self.workloads.get(workload) {
            w.metrics.incoming_tokens.inc_by(tokens);
            w.metrics.decided(tokens, true, 0);
        }
    }

    /// Counts a flow's tokens as incoming: on its arrival, which for a flow
    /// an earlier component made wait is when that component admits it.
    pub fn count_incoming(&self, workload: usize, tokens: f64) {
        if let Some(w) = self.workloads.get(workload) {
            w.metrics.incoming_tokens.inc_by(tokens);
        }
    }

    /// Records the upstream latency of an admitted flow of `workload`, from
    /// its access log (`workload_latency_ms`).
    pub fn observe_latency(&self, workload: usize, ms: f64) {
        if let Some(w) = self.workloads.get(workload) {
            w.metrics.latency_ms.observe(ms);
        }
    }

    /// Classifies a flow: its workload, cost, weight, fairness value and
    /// queue timeout. `estimated_tokens(workload)` replaces the workloads'
    /// `tokens` when it has an estimate (latency-based tokens); a
    /// `tokens_label_key` label wins over both.
    pub fn classify(
        &self,
        labels: &FlowLabels<'_>,
        estimated_tokens: &dyn Fn(usize) -> Option<f64>,
    ) -> Classified {
        let by_name = self
            .workload_key
            .as_ref()
            .and_then(|k| labels.get(k))
            .and_then(|name| {
                self.workloads
                    .iter()
                    .position(|w| w.name.as_deref() == Some(&*name))
            });
        let workload = by_name.unwrap_or_else(|| {
            self.workloads
                .iter()
                .position(|w| w.matcher.as_ref().is_none_or(|m| m.matches(labels)))
                .unwrap_or(self.workloads.len() - 1)
        });
        let p = &self.workloads[workload].params;
        let number = |key: &Option<LabelRef>| {
            key.as_ref()
                .and_then(|k| labels.get(k))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|n| n.is_finite())
        };
        let tokens = number(&self.tokens_key)
            .filter(|t| *t >= 0.0)
            .or_else(|| estimated_tokens(workload).filter(|t| *t > 0.0))
            .unwrap_or(p.tokens);
        let priority = number(&self.priority_key)
            .filter(|p| *p > 0.0)
            .unwrap_or(p.priority);
        let fairness = self
            .fairness_key
            .as_ref()
            .and_then(|k| labels.get(k))
            .map(|v| Box::from(&*v));
        Classified {
            workload,
            tokens,
            priority,
            fairness,
            queue_timeout: p.queue_timeout,
        }
    }
}

/// A flow classified into a workload, with what scheduling it needs:
/// owned, so that it can wait.
#[derive(Clone, Debug, PartialEq)]
pub struct Classified {
    /// Its workload.
    pub workload: usize,
    /// Its cost.
    pub tokens: f64,
    /// Its weight.
    pub priority: f64,
    /// Its fairness value.
    pub fairness: Option<Box<str>>,
    /// Longest wait of its workload.
    pub queue_timeout: Nanos,
}

/// What a scheduler's queues draw from, per capacity key: slots, token
/// buckets, or a share of the incoming rate.
pub trait Pool: Send + 'static {
    /// Runs `f` on the capacity of `key` (`None` for schedulers without
    /// `limit_by_label_key`).
    fn with<R>(
        &mut self,
        key: Option<Digest>,
        now: Nanos,
        f: impl FnOnce(&mut dyn wfq::Capacity) -> R,
    ) -> R;
    /// Admit without queueing (a load multiplier of 1 or more, or expired).
    fn bypass(&mut self, _now: Nanos) -> bool {
        false
    }
    /// Gives back what an admitted request took, when a later scheduler
    /// rejected its flow.
    fn give_back(&mut self, _key: Option<Digest>, _tokens: f64) {}
    /// How long a backlog of `tokens` takes to drain, if known.
    fn drain_time(&self, _key: Option<Digest>, _tokens: f64) -> Option<Nanos> {
        None
    }
    /// False when a request of `tokens` can never be admitted (more than a
    /// bucket holds): it is refused at once instead of blocking the queue.
    fn fits(&self, _tokens: f64) -> bool {
        true
    }
    /// Decide and count, but admit everything.
    fn dry_run(&self) -> bool {
        false
    }
    /// Receives the scheduler's wake-up: a pool whose capacity arrives from
    /// outside (a lease from the store) notifies it when it does.
    fn attach(&mut self, _wake: &Arc<Notify>) {}
    /// Nobody waits any more: capacity fetched for the queue may go back.
    fn idle(&mut self, _now: Nanos) {}
}

/// What the pump tells a waiter: how its request left the queue and, when
/// admitted, what it took.
type Delivery = (Outcome, Option<Claim<'static>>);

struct KeyQueue {
    queue: Queue,
    waiters: HashMap<Ticket, oneshot::Sender<Delivery>>,
}

struct Inner<P> {
    pool: P,
    /// A queue per capacity key, while requests of that key wait.
    queues: HashMap<Option<Digest>, KeyQueue>,
    /// Requests waiting, all keys together (bounded by `max_queued`).
    queued: usize,
    pump_running: bool,
    /// When the pump will look at the queues next unless woken: a request
    /// queued with an earlier deadline (or turn) must wake it, or it would
    /// wait past its deadline.
    pump_at: Nanos,
}

/// Why a scheduler refused a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// When trying again could work, if it ever can.
    pub retry_after: Option<Duration>,
    /// What went wrong: [`RejectReason::QueueTimeout`] (its deadline came
    /// before its turn), [`RejectReason::QueueFull`], or
    /// [`RejectReason::NoTokens`] (it costs more than the capacity can ever
    /// hold).
    pub reason: RejectReason,
}

/// What a scheduler can say without waiting.
#[derive(Debug)]
pub enum Verdict {
    /// Admitted, with what it took (nothing when the scheduler passes
    /// everything or only counts, in a dry run).
    Admitted(Option<Claim<'static>>),
    /// Refused.
    Refused(Refusal),
    /// Others wait, or the capacity has no room: the flow must queue.
    MustWait,
}

/// A scheduler: the shared machinery, with its capacity `P`.
pub struct Scheduler<P> {
    /// The policy it belongs to.
    pub policy: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
    /// Which flows it schedules.
    pub selectors: Box<[Selector]>,
    /// Workloads and limits.
    pub config: Config,
    clock: Clock,
    inner: Mutex<Inner<P>>,
    /// Wakes the pump: a slot came back, a new request queued, or the
    /// pool's capacity arrived.
    wake: Arc<Notify>,
}

impl<P> std::fmt::Debug for Scheduler<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("policy", &self.policy)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<P: Pool> Scheduler<P> {
    /// A scheduler over `pool`.
    pub fn new(
        policy: &Arc<str>,
        name: Arc<str>,
        selectors: Box<[Selector]>,
        config: Config,
        clock: Clock,
        mut pool: P,
    ) -> Self {
        let wake = Arc::new(Notify::new());
        pool.attach(&wake);
        Scheduler {
            policy: policy.clone(),
            name,
            selectors,
            config,
            clock,
            inner: Mutex::new(Inner {
                pool,
                queues: HashMap::new(),
                queued: 0,
                pump_running: false,
                pump_at: Nanos::MAX,
            }),
            wake,
        }
    }

    /// Reads or changes the pool of capacity.
    pub fn with_pool<R>(&self, f: impl FnOnce(&mut P) -> R) -> R {
        f(&mut self.inner.lock().pool)
    }

    /// Requests waiting now, all keys together.
    pub fn queued(&self) -> usize {
        self.inner
            .lock()
            .queues
            .values()
            .map(|q| q.queue.len())
            .sum()
    }

    /// The engine's clock, as this scheduler reads it.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn retry_after(
        &self,
        inner: &Inner<P>,
        key: Option<Digest>,
        p: &Classified,
    ) -> Option<Duration> {
        if !inner.pool.fits(p.tokens) {
            return None;
        }
        let backlog = inner
            .queues
            .get(&key)
            .map_or(0.0, |q| q.queue.backlog_tokens());
        let wait = inner
            .pool
            .drain_time(key, backlog + p.tokens)
            .unwrap_or(p.queue_timeout);
        Some(Duration::from_nanos(wait))
    }

    /// What an admission of `p` for `key` took, to give back when dropped.
    fn claim(self: &Arc<Self>, key: Option<Digest>, tokens: f64) -> Claim<'static> {
        Claim::owned(self.clone(), key, tokens)
    }

    /// Decides at once when it can: counts the flow's arrival, then admits
    /// it if nobody waits and the capacity has room, refuses it if it can
    /// never fit, and says [`Verdict::MustWait`] otherwise (then call
    /// [`Scheduler::wait`]). Never queues.
    pub fn try_now(self: &Arc<Self>, p: &Classified, key: Option<Digest>) -> Verdict {
        self.config.count_incoming(p.workload, p.tokens);
        self.decide_now(p, key)
    }

    /// [`Scheduler::try_now`] for a flow whose arrival was already counted:
    /// one that waited in an earlier scheduler and reaches this one only
    /// now. It gets the same chances as any other (pass-through, dry run,
    /// admission when nobody waits) and the same refusal when it can never
    /// fit, instead of going straight to the queue.
    pub fn decide_now(self: &Arc<Self>, p: &Classified, key: Option<Digest>) -> Verdict {
        let now = self.clock.now();
        let workload = &self.config.workloads[p.workload].metrics;
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        if inner.pool.bypass(now) {
            workload.decided(p.tokens, true, 0);
            return Verdict::Admitted(None);
        }
        if !inner.pool.fits(p.tokens) {
            workload.decided(p.tokens, false, 0);
            return Verdict::Refused(Refusal {
                retry_after: None,
                reason: RejectReason::NoTokens,
            });
        }
        if inner.pool.dry_run() {
            // Decide and count as if for real, then let the flow through.
            let would = inner.pool.with(key, now, |c| c.try_take(now, p.tokens));
            workload.decided(p.tokens, would, 0);
            return Verdict::Admitted(None);
        }
        let nobody_waits = inner.queues.get(&key).is_none_or(|q| q.queue.is_empty());
        if nobody_waits && inner.pool.with(key, now, |c| c.try_take(now, p.tokens)) {
            workload.decided(p.tokens, true, 0);
            return Verdict::Admitted(Some(self.claim(key, p.tokens)));
        }
        Verdict::MustWait
    }

    /// Queues a flow that [`Scheduler::try_now`] could not admit, and waits
    /// (a parked future) until the pump admits it in fair order or its
    /// deadline passes. `grpc_deadline` is when Envoy stops waiting. On
    /// admission, returns what the flow took.
    pub async fn wait(
        self: &Arc<Self>,
        p: &Classified,
        key: Option<Digest>,
        grpc_deadline: Option<Nanos>,
    ) -> Result<Option<Claim<'static>>, Refusal> {
        let now = self.clock.now();
        let workload = &self.config.workloads[p.workload].metrics;
        let mut deadline = now.saturating_add(p.queue_timeout);
        if let Some(g) = grpc_deadline {
            deadline = deadline.min(g.saturating_sub(self.config.margin));
        }
        let mut undelivered = Vec::new();
        let waiting = {
            let mut inner = self.inner.lock();
            let inner = &mut *inner;
            if inner.queued >= self.config.max_queued {
                workload.decided(p.tokens, false, 0);
                return Err(Refusal {
                    retry_after: self.retry_after(inner, key, p),
                    reason: RejectReason::QueueFull,
                });
            }
            let max_queued = self.config.max_queued;
            let workloads = self.config.workloads.len();
            let kq = inner.queues.entry(key).or_insert_with(|| KeyQueue {
                queue: Queue::new(workloads, max_queued),
                waiters: HashMap::new(),
            });
            let request = wfq::Request {
                workload: p.workload,
                tokens: p.tokens,
                priority: p.priority,
                fairness: p.fairness.clone(),
                arrived: now,
                deadline,
            };
            let offer = inner
                .pool
                .with(key, now, |capacity| kq.queue.offer(request, now, capacity));
            let waiting = match offer {
                Offer::Admitted => {
                    workload.decided(p.tokens, true, 0);
                    Ok(None)
                }
                Offer::Full | Offer::NoTime => {
                    workload.decided(p.tokens, false, 0);
                    let reason = if offer == Offer::Full {
                        RejectReason::QueueFull
                    } else {
                        RejectReason::QueueTimeout
                    };
                    Err((self.retry_after(inner, key, p), reason))
                }
                Offer::Queued(ticket) => {
                    let (tx, rx) = oneshot::channel();
                    kq.waiters.insert(ticket, tx);
                    inner.queued += 1;
                    // Only this key's queue changed: dispatch it alone, so
                    // that queueing costs the same with 10 or 10,000
                    // waiting.
                    let event = self.dispatch_key(inner, key, now, &mut undelivered);
                    if !inner.pump_running {
                        inner.pump_running = true;
                        inner.pump_at = Nanos::MAX;
                        tokio::spawn(pump(self.clone()));
                    } else if event.is_some_and(|e| e < inner.pump_at) {
                        // The pump sleeps past this request's deadline or
                        // turn: wake it to plan again.
                        inner.pump_at = now;
                        self.wake.notify_one();
                    }
                    Ok(Some(rx))
                }
            };
            if inner.queues.get(&key).is_some_and(|q| q.queue.is_empty()) {
                inner.queues.remove(&key);
            }
            if inner.queues.is_empty() {
                inner.pool.idle(now);
            }
            waiting
        };
        // Given back outside the lock, which giving back takes.
        drop(undelivered);
        let waiting = match waiting {
            Ok(None) => return Ok(Some(self.claim(key, p.tokens))),
            Ok(Some(rx)) => rx,
            Err((retry_after, reason)) => {
                return Err(Refusal {
                    retry_after,
                    reason,
                });
            }
        };
        match waiting.await {
            Ok((Outcome::Admitted { .. }, claim)) => Ok(claim),
            Ok((Outcome::TimedOut { .. }, _)) | Err(_) => {
                let inner = self.inner.lock();
                Err(Refusal {
                    retry_after: self.retry_after(&inner, key, p),
                    reason: RejectReason::QueueTimeout,
                })
            }
        }
    }

    /// Runs every queue once: rejects what is past its deadline and admits
    /// what the capacity allows. Returns when to run again; what could not
    /// be delivered goes to `undelivered`, for the caller to drop once the
    /// lock is released.
    fn dispatch_locked(
        self: &Arc<Self>,
        inner: &mut Inner<P>,
        now: Nanos,
        undelivered: &mut Vec<Claim<'static>>,
    ) -> Option<Nanos> {
        let mut next: Option<Nanos> = None;
        let keys: smallvec::SmallVec<[Option<Digest>; 4]> = inner.queues.keys().copied().collect();
        for key in keys {
            if let Some(e) = self.dispatch_key(inner, key, now, undelivered) {
                next = Some(next.map_or(e, |n: Nanos| n.min(e)));
            }
        }
        next
    }

    /// Runs the queue of `key` once (see [`Scheduler::dispatch_locked`]),
    /// dropping it when it is empty. Returns when to run it again.
    fn dispatch_key(
        self: &Arc<Self>,
        inner: &mut Inner<P>,
        key: Option<Digest>,
        now: Nanos,
        undelivered: &mut Vec<Claim<'static>>,
    ) -> Option<Nanos> {
        let KeyQueue { queue, waiters } = inner.queues.get_mut(&key)?;
        let before = queue.len();
        let config = &self.config;
        let event = inner.pool.with(key, now, |capacity| {
            // A waiter that went away (Envoy gave up) is forgotten when
            // its request comes up; the request leaves without capacity.
            let mut alive = |t: Ticket| match waiters.get(&t) {
                Some(tx) if !tx.is_closed() => true,
                _ => {
                    waiters.remove(&t);
                    false
                }
            };
            let mut left: smallvec::SmallVec<[(Ticket, Outcome, f64); 8]> =
                smallvec::SmallVec::new();
            queue.dispatch(
                now,
                capacity,
                &mut alive,
                &mut |ticket, request, outcome| {
                    let (accepted, waited) = match &outcome {
                        Outcome::Admitted { waited } => (true, *waited),
                        Outcome::TimedOut { waited } => (false, *waited),
                    };
                    config.workloads[request.workload].metrics.decided(
                        request.tokens,
                        accepted,
                        waited,
                    );
                    left.push((ticket, outcome, request.tokens));
                },
            );
            for (ticket, outcome, tokens) in left {
                let claim =
                    matches!(outcome, Outcome::Admitted { .. }).then(|| self.claim(key, tokens));
                let delivered = match waiters.remove(&ticket) {
                    Some(tx) => tx.send((outcome, claim)),
                    None => Err((outcome, claim)),
                };
                // The waiter went away meanwhile: what it was admitted
                // with comes back, once the lock is released.
                if let Err((_, Some(claim))) = delivered {
                    undelivered.push(claim);
                }
            }
            queue.next_event(now, capacity)
        });
        inner.queued -= before - queue.len();
        if queue.is_empty() {
            inner.queues.remove(&key);
        }
        event
    }
}

impl<P: Pool> Scheduler<P> {
    /// Wakes the pump: the pool changed from outside (a limit was raised
    /// through [`Scheduler::with_pool`]), so waiting requests may fit now.
    pub fn poke(&self) {
        self.wake.notify_one();
    }
}

impl<P: Pool> Lender for Scheduler<P> {
    /// Takes back what an admitted flow took (a later scheduler refused
    /// it, Envoy gave up, or its access log returned a slot), and wakes the
    /// queue, which may now admit the next request.
    fn give_back(&self, key: Option<Digest>, tokens: f64) {
        self.inner.lock().pool.give_back(key, tokens);
        self.wake.notify_one();
    }
}

/// Longest the pump sleeps without looking at the queues.
const PUMP_IDLE: Nanos = 100_000_000;

/// Runs while requests wait: dispatches at each deadline, each time tokens
/// become available, and whenever poked; ends when the queues are empty.
async fn pump<P: Pool>(scheduler: Arc<Scheduler<P>>) {
    let mut undelivered = Vec::new();
    loop {
        let now = scheduler.clock.now();
        let wait = {
            let mut inner = scheduler.inner.lock();
            let next = scheduler.dispatch_locked(&mut inner, now, &mut undelivered);
            if inner.queues.is_empty() {
                inner.pool.idle(now);
                inner.pump_running = false;
                inner.pump_at = Nanos::MAX;
                drop(inner);
                undelivered.clear();
                return;
            }
            // With nothing timed, wait to be poked; check again now and
            // then regardless, as a safety net against a missed wake-up.
            let wait = next.map_or(PUMP_IDLE, |at| at.saturating_sub(now).min(PUMP_IDLE));
            inner.pump_at = now.saturating_add(wait);
            Duration::from_nanos(wait)
        };
        // Given back outside the lock, which giving back takes.
        undelivered.clear();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = scheduler.wake.notified() => {}
        }
    }
}
