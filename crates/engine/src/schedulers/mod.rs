//! Stage 6: the schedulers, in stage order: concurrency schedulers, then
//! quota schedulers, then load schedulers.
//!
//! - [`wfq`]: the weighted-fair queue at the heart of every scheduler (no
//!   async, no locks, no clock of its own);
//! - [`scheduler`]: the machinery the three kinds share: workloads, the
//!   queues per capacity key, the pump task that admits in fair order;
//! - [`concurrency`], [`quota`], [`load`]: the three kinds, each a
//!   [`Pool`](scheduler::Pool) of capacity: slots, token buckets, a share
//!   of the incoming rate;
//! - this file: [`schedule`], which takes a flow through the schedulers
//!   matching it, and [`Waiting`], a flow that must wait in one.
//!
//! Most flows are decided on the spot ([`Scheduler::try_now`](scheduler::Scheduler::try_now): admitted
//! when nobody waits and there is room, refused when they can never fit),
//! without leaving the synchronous Check path. A flow that must wait
//! leaves the engine as a [`Waiting`]: its [`Admission`] (everything it
//! took so far, owned) and the schedulers still to pass.
//! [`Waiting::run`] waits in them in order. Whatever the outcome (admitted,
//! refused, or the Check abandoned by Envoy while waiting, which drops the
//! future), the admission is committed or dropped, and dropping it gives
//! everything back.

pub mod concurrency;
pub mod load;
pub mod quota;
pub mod scheduler;
pub mod wfq;

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use sluice_time::{Nanos, nanos};
use smallvec::SmallVec;

use crate::admission::{Admission, Claim};
use crate::decision::RejectReason;
use crate::engine::Engine;
use crate::label_table::Digest;
use crate::labels::FlowLabels;
use concurrency::ConcurrencyScheduler;
use load::LoadScheduler;
use quota::QuotaScheduler;
use scheduler::{Classified, Config, Refusal, Verdict};

/// Any of the three schedulers.
#[derive(Clone, Debug)]
pub enum AnyScheduler {
    /// A concurrency scheduler.
    Concurrency(Arc<ConcurrencyScheduler>),
    /// A quota scheduler.
    Quota(Arc<QuotaScheduler>),
    /// A load scheduler.
    Load(Arc<LoadScheduler>),
}

impl AnyScheduler {
    /// Its workloads and limits.
    pub fn config(&self) -> &Config {
        match self {
            AnyScheduler::Concurrency(c) => &c.scheduler.config,
            AnyScheduler::Quota(q) => &q.scheduler.config,
            AnyScheduler::Load(l) => &l.scheduler.config,
        }
    }

    /// Its policy and name.
    pub fn names(&self) -> (&Arc<str>, &Arc<str>) {
        let (p, n) = match self {
            AnyScheduler::Concurrency(c) => (&c.scheduler.policy, &c.scheduler.name),
            AnyScheduler::Quota(q) => (&q.scheduler.policy, &q.scheduler.name),
            AnyScheduler::Load(l) => (&l.scheduler.policy, &l.scheduler.name),
        };
        (p, n)
    }

    /// `policy/name`.
    pub fn key(&self) -> &str {
        match self {
            AnyScheduler::Concurrency(c) => &c.key,
            AnyScheduler::Quota(q) => &q.key,
            AnyScheduler::Load(l) => &l.key,
        }
    }

    /// Requests waiting in its queues now.
    pub fn queued(&self) -> usize {
        match self {
            AnyScheduler::Concurrency(c) => c.scheduler.queued(),
            AnyScheduler::Quota(q) => q.scheduler.queued(),
            AnyScheduler::Load(l) => l.scheduler.queued(),
        }
    }

    /// Learns a workload's latency from an access log.
    pub fn observe_latency(&self, workload: usize, ms: f64) {
        match self {
            AnyScheduler::Load(l) => l.observe_latency(workload, ms),
            other => other.config().observe_latency(workload, ms),
        }
    }

    fn try_now(&self, c: &Classified, key: Option<Digest>) -> Verdict {
        match self {
            AnyScheduler::Concurrency(s) => s.scheduler.try_now(c, key),
            AnyScheduler::Quota(s) => s.scheduler.try_now(c, key),
            AnyScheduler::Load(s) => s.scheduler.try_now(c, key),
        }
    }

    fn decide_now(&self, c: &Classified, key: Option<Digest>) -> Verdict {
        match self {
            AnyScheduler::Concurrency(s) => s.scheduler.decide_now(c, key),
            AnyScheduler::Quota(s) => s.scheduler.decide_now(c, key),
            AnyScheduler::Load(s) => s.scheduler.decide_now(c, key),
        }
    }

    async fn wait(
        &self,
        c: &Classified,
        key: Option<Digest>,
        deadline: Option<Nanos>,
    ) -> Result<Option<Claim<'static>>, Refusal> {
        match self {
            AnyScheduler::Concurrency(s) => s.scheduler.wait(c, key, deadline).await,
            AnyScheduler::Quota(s) => s.scheduler.wait(c, key, deadline).await,
            AnyScheduler::Load(s) => s.scheduler.wait(c, key, deadline).await,
        }
    }

    /// Adds what this scheduler admitted the flow with to its admission: a
    /// slot (until the access log) or tokens (spent on admission, given
    /// back if a later scheduler refuses).
    fn record(&self, admission: &mut Admission<'_>, claim: Option<Claim<'static>>, now: Nanos) {
        let Some(claim) = claim else { return };
        match self {
            AnyScheduler::Concurrency(c) => {
                admission.hold(claim, now.saturating_add(c.max_inflight))
            }
            AnyScheduler::Quota(_) | AnyScheduler::Load(_) => admission.pay(claim),
        }
    }

    /// Its rejection, counted.
    fn refused(&self, refusal: Refusal) -> (RejectReason, u16, Option<Duration>) {
        let config = self.config();
        config.count_rejection(refusal.reason);
        (refusal.reason, config.denied_status, refusal.retry_after)
    }
}

/// A scheduler a flow still has to pass.
#[derive(Debug)]
struct Step {
    scheduler: AnyScheduler,
    classified: Classified,
    key: Option<Digest>,
    /// The scheduler has only counted the flow's arrival: an earlier one
    /// made it wait, so it must still be asked [`Scheduler::decide_now`](scheduler::Scheduler::decide_now)
    /// before queueing. False for the scheduler that said
    /// [`Verdict::MustWait`].
    undecided: bool,
}

/// A refusal by a scheduler, owned (the flow may have waited).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerRejection {
    /// The scheduler's policy.
    pub policy: Arc<str>,
    /// The scheduler.
    pub component: Arc<str>,
    /// Why.
    pub reason: RejectReason,
    /// The HTTP status to answer with.
    pub status: u16,
    /// When trying again could work.
    pub retry_after: Option<Duration>,
    /// The flow's `sluice.flow` metadata, as rejected.
    pub metadata: String,
}

/// A flow that must wait in schedulers: what it took so far, and the
/// schedulers left. Dropping it (Envoy gave up on the Check) gives
/// everything back.
pub struct Waiting {
    flow_id: u64,
    /// The flow's flux meters, for its metadata if it is refused.
    pub(crate) flux_meters: String,
    steps: SmallVec<[Step; 1]>,
    admission: Admission<'static>,
    /// Set while [`Waiting::run`] has not answered: a flow abandoned then
    /// counts as rejected (it never got through).
    unanswered: Option<IntCounter>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("flow_id", &self.flow_id)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Waiting {
    /// Waits in the remaining schedulers, in order. On admission the flow's
    /// slots go to the in-flight table; on refusal everything it took is
    /// given back. `grpc_timeout` is Envoy's deadline for the answer (the
    /// `grpc-timeout` of the Check), counted from now.
    pub async fn run(
        mut self: Box<Self>,
        engine: &Engine,
        grpc_timeout: Option<Duration>,
    ) -> Result<(), SchedulerRejection> {
        self.unanswered = Some(engine.metrics().rejected.clone());
        let start = engine.clock().now();
        let deadline = grpc_timeout.map(|t| start.saturating_add(nanos(t)));
        let steps = std::mem::take(&mut self.steps);
        for step in steps {
            let verdict = if step.undecided {
                step.scheduler.decide_now(&step.classified, step.key)
            } else {
                Verdict::MustWait
            };
            let outcome = match verdict {
                Verdict::Admitted(claim) => Ok(claim),
                Verdict::Refused(refusal) => Err(refusal),
                Verdict::MustWait => {
                    step.scheduler
                        .wait(&step.classified, step.key, deadline)
                        .await
                }
            };
            match outcome {
                Ok(claim) => {
                    let now = engine.clock().now();
                    step.scheduler.record(&mut self.admission, claim, now);
                }
                Err(refusal) => {
                    self.unanswered = None;
                    drop(std::mem::take(&mut self.admission));
                    engine.metrics().rejected.inc();
                    let (policy, component) = step.scheduler.names();
                    let (reason, status, retry_after) = step.scheduler.refused(refusal);
                    let by = format!("{policy}/{component}");
                    let mut metadata = String::new();
                    crate::flow_end::metadata::FlowMeta {
                        id: self.flow_id,
                        accepted: false,
                        rejected_by: Some(&by),
                        flux_meters: &self.flux_meters,
                        workloads: "",
                    }
                    .encode_into(&mut metadata);
                    return Err(SchedulerRejection {
                        policy: policy.clone(),
                        component: component.clone(),
                        reason,
                        status,
                        retry_after,
                        metadata,
                    });
                }
            }
        }
        self.unanswered = None;
        engine.metrics().accepted.inc();
        engine.admit(self.flow_id, &mut self.admission);
        Ok(())
    }
}

impl Drop for Waiting {
    /// The Check was abandoned (Envoy gave up) before the flow's fate was
    /// known; its admission gives itself back as it drops.
    fn drop(&mut self) {
        if let Some(rejected) = self.unanswered.take() {
            rejected.inc();
        }
    }
}

/// What stage 6 decided.
pub enum Scheduled<'a> {
    /// Passed every scheduler; what they admitted it with is in its
    /// admission.
    Passed,
    /// Refused at once by a scheduler: its reason, status and retry-after.
    /// What the flow took was given back.
    Refused(&'a AnyScheduler, (RejectReason, u16, Option<Duration>)),
    /// Must wait: its admission moved into the [`Waiting`].
    Waits(Box<Waiting>),
}

/// Runs stage 6 for a flow that passed stages 1–5 with `admission`,
/// adding what the schedulers admit it with.
/// `matching` are the schedulers whose selectors admit the flow, in stage
/// order; `workloads` receives each scheduler's workload for the flow's
/// metadata.
pub fn schedule<'a>(
    matching: &[&'a AnyScheduler],
    labels: &FlowLabels<'_>,
    now: Nanos,
    flow_id: u64,
    admission: &mut Admission<'a>,
    workloads: &mut SmallVec<[(&'a str, usize); 1]>,
) -> Scheduled<'a> {
    let mut steps: SmallVec<[Step; 1]> = SmallVec::new();
    for scheduler in matching {
        let (classified, key) = match scheduler {
            AnyScheduler::Load(l) => {
                let c = l
                    .scheduler
                    .config
                    .classify(labels, &|w| l.estimated_tokens(w));
                (c, None)
            }
            AnyScheduler::Quota(q) => {
                let key = match &q.limit_by {
                    None => None,
                    Some(label) => match labels.get(label) {
                        Some(v) => Some(crate::label_table::digest(&v)),
                        // A flow without the label is not limited by it.
                        None => continue,
                    },
                };
                (q.scheduler.config.classify(labels, &|_| None), key)
            }
            AnyScheduler::Concurrency(c) => (c.scheduler.config.classify(labels, &|_| None), None),
        };
        workloads.push((scheduler.key(), classified.workload));
        let mut step = Step {
            scheduler: (*scheduler).clone(),
            classified,
            key,
            undecided: false,
        };
        if !steps.is_empty() {
            step.undecided = true;
            // It waits after the earlier ones; count its arrival now.
            if let AnyScheduler::Load(l) = scheduler {
                l.rate.add(now, step.classified.tokens);
            }
            scheduler
                .config()
                .count_incoming(step.classified.workload, step.classified.tokens);
            steps.push(step);
            continue;
        }
        if let AnyScheduler::Load(l) = scheduler
            && l.passes(now, step.classified.tokens)
        {
            l.scheduler
                .config
                .count_pass(step.classified.workload, step.classified.tokens);
            continue;
        }
        match scheduler.try_now(&step.classified, key) {
            Verdict::Admitted(claim) => scheduler.record(admission, claim, now),
            Verdict::Refused(refusal) => {
                return Scheduled::Refused(scheduler, scheduler.refused(refusal));
            }
            Verdict::MustWait => steps.push(step),
        }
    }
    if steps.is_empty() {
        return Scheduled::Passed;
    }
    Scheduled::Waits(Box::new(Waiting {
        flow_id,
        flux_meters: String::new(),
        steps,
        admission: std::mem::take(admission).into_owned(),
        unanswered: None,
    }))
}
