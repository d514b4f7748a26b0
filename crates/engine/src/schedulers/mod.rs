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
//!   matching it, and [`SchedulerStep`], a scheduler a flow must wait in
//!   (one step of a [`Waiting`](crate::waiting::Waiting) flow).
//!
//! Most flows are decided on the spot ([`Scheduler::try_now`](scheduler::Scheduler::try_now): admitted
//! when nobody waits and there is room, refused when they can never fit),
//! without leaving the synchronous Check path. A flow that must wait
//! leaves the engine as a `Waiting` flow (`crate::waiting`).

pub mod adaptive;
pub mod concurrency;
pub mod load;
pub mod quota;
pub mod scheduler;
pub mod wfq;

use std::sync::Arc;
use std::time::Duration;

use sluice_time::Nanos;
use smallvec::SmallVec;

use crate::admission::{Admission, Claim};
use crate::decision::RejectReason;
use crate::label_table::Digest;
use crate::labels::FlowLabels;
use crate::waiting::{Step, Steps};
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

    /// Its kind, as preview and status name it.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyScheduler::Concurrency(_) => "concurrency_scheduler",
            AnyScheduler::Quota(_) => "quota_scheduler",
            AnyScheduler::Load(_) => "load_scheduler",
        }
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
            AnyScheduler::Concurrency(c) => c.observe_latency(workload, ms),
            AnyScheduler::Quota(q) => q.scheduler.config.observe_latency(workload, ms),
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

/// A scheduler a flow still has to pass, decided after an earlier
/// component made it wait.
#[derive(Debug)]
pub struct SchedulerStep {
    scheduler: AnyScheduler,
    classified: Classified,
    key: Option<Digest>,
    /// An earlier component made the flow wait, so this scheduler has not
    /// seen it yet: the flow's arrival is counted when it gets here (a flow
    /// an earlier component refuses never arrives, and must not swell the
    /// incoming rate a load scheduler takes its share of, nor the
    /// `incoming_tokens` a controller compares with what was accepted),
    /// and the scheduler is asked
    /// [`Scheduler::decide_now`](scheduler::Scheduler::decide_now) before
    /// queueing. False for the scheduler that said [`Verdict::MustWait`].
    undecided: bool,
}

impl SchedulerStep {
    /// Waits in the scheduler (after asking it first, if it has not said
    /// yet), until `deadline` (engine clock) at the latest; on admission,
    /// adds what the flow was admitted with to `admission`.
    pub async fn run(
        &self,
        admission: &mut Admission<'static>,
        deadline: Option<Nanos>,
        clock: &sluice_time::Clock,
    ) -> Result<(), (RejectReason, u16, Option<Duration>)> {
        let verdict = if self.undecided {
            let c = &self.classified;
            if let AnyScheduler::Load(l) = &self.scheduler {
                l.rate.add(clock.now(), c.tokens);
            }
            self.scheduler.config().count_incoming(c.workload, c.tokens);
            self.scheduler.decide_now(c, self.key)
        } else {
            Verdict::MustWait
        };
        let outcome = match verdict {
            Verdict::Admitted(claim) => Ok(claim),
            Verdict::Refused(refusal) => Err(refusal),
            Verdict::MustWait => {
                self.scheduler
                    .wait(&self.classified, self.key, deadline)
                    .await
            }
        };
        match outcome {
            Ok(claim) => {
                self.scheduler.record(admission, claim, clock.now());
                Ok(())
            }
            Err(refusal) => Err(self.scheduler.refused(refusal)),
        }
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &AnyScheduler {
        &self.scheduler
    }
}

/// What stage 6 decided without waiting.
pub enum Scheduled<'a> {
    /// Passed every scheduler that could decide at once; what they admitted
    /// the flow with is in its admission, and those that could not are in
    /// its steps.
    Passed,
    /// Refused at once by a scheduler: its reason, status and retry-after.
    Refused(&'a AnyScheduler, (RejectReason, u16, Option<Duration>)),
}

/// Runs stage 6 for a flow that passed stages 1–5 with `admission`,
/// adding what the schedulers admit it with. `matching` are the schedulers
/// whose selectors admit the flow, in stage order; `workloads` receives
/// each scheduler's workload for the flow's metadata. A scheduler that
/// makes the flow wait, and every one after it, goes to `steps`; so does
/// every scheduler when `steps` already holds a component the flow waits
/// for.
pub fn schedule<'a>(
    matching: &[&'a AnyScheduler],
    labels: &FlowLabels<'_>,
    now: Nanos,
    admission: &mut Admission<'a>,
    workloads: &mut SmallVec<[(&'a str, usize); 1]>,
    steps: &mut Steps,
) -> Scheduled<'a> {
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
                        Some(v) => {
                            let key = crate::label_table::digest(&v);
                            q.prepare(key, &v, now);
                            Some(key)
                        }
                        // A flow without the label is not limited by it.
                        None => continue,
                    },
                };
                (q.scheduler.config.classify(labels, &|_| None), key)
            }
            AnyScheduler::Concurrency(c) => (c.scheduler.config.classify(labels, &|_| None), None),
        };
        workloads.push((scheduler.key(), classified.workload));
        let mut step = SchedulerStep {
            scheduler: (*scheduler).clone(),
            classified,
            key,
            undecided: false,
        };
        if !steps.is_empty() {
            // It waits after the earlier ones: it arrives here (and is
            // counted as incoming) only if they admit it.
            step.undecided = true;
            steps.push(Step::Scheduler(step));
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
            Verdict::MustWait => steps.push(Step::Scheduler(step)),
        }
    }
    Scheduled::Passed
}
