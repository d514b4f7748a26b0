//! Stage 6: the schedulers, in DESIGN.md's order: concurrency schedulers,
//! then quota schedulers, then load schedulers.
//!
//! Most flows are decided on the spot ([`Scheduler::try_now`]: admitted
//! when nobody waits and there is room, refused when they can never fit),
//! without leaving the synchronous Check path. A flow that must wait
//! leaves the engine with a [`Scheduling`]: everything it holds (rate
//! limiter tokens, concurrency slots, what earlier schedulers admitted),
//! owned, and the schedulers still to pass. [`Scheduling::run`] waits in
//! them in order. Whatever the outcome — admitted, refused, or the Check
//! abandoned by Envoy while waiting (the future dropped) — what the flow
//! held is returned or handed to the in-flight table exactly once.

use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use super::concurrency_scheduler::ConcurrencyScheduler;
use super::inflight::Slots;
use super::label_table::Digest;
use super::labels::FlowLabels;
use super::load_scheduler::LoadScheduler;
use super::quota_scheduler::QuotaScheduler;
use super::rate_limiter::OwnedHold;
use super::scheduler::{Config, Now, Prepared, Refusal, Why};
use super::{Engine, RejectReason};
use crate::clock::{Nanos, nanos};

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

    /// Learns a workload's latency from an access log.
    pub fn observe_latency(&self, workload: usize, ms: f64) {
        match self {
            AnyScheduler::Load(l) => l.observe_latency(workload, ms),
            other => other.config().observe_latency(workload, ms),
        }
    }

    fn try_now(&self, p: &Prepared, key: Option<Digest>) -> Now {
        match self {
            AnyScheduler::Concurrency(c) => c.scheduler.try_now(p, key),
            AnyScheduler::Quota(q) => q.scheduler.try_now(p, key),
            AnyScheduler::Load(l) => l.scheduler.try_now(p, key),
        }
    }

    fn decide_now(&self, p: &Prepared, key: Option<Digest>) -> Now {
        match self {
            AnyScheduler::Concurrency(c) => c.scheduler.decide_now(p, key),
            AnyScheduler::Quota(q) => q.scheduler.decide_now(p, key),
            AnyScheduler::Load(l) => l.scheduler.decide_now(p, key),
        }
    }

    async fn wait(
        &self,
        p: &Prepared,
        key: Option<Digest>,
        deadline: Option<Nanos>,
    ) -> Result<(), Refusal> {
        match self {
            AnyScheduler::Concurrency(c) => c.scheduler.wait(p, key, deadline).await,
            AnyScheduler::Quota(q) => q.scheduler.wait(p, key, deadline).await,
            AnyScheduler::Load(l) => l.scheduler.wait(p, key, deadline).await,
        }
    }
}

/// A scheduler a flow still has to pass.
#[derive(Debug)]
struct Step {
    scheduler: AnyScheduler,
    prepared: Prepared,
    key: Option<Digest>,
    /// The scheduler has only counted the flow's arrival: an earlier one
    /// made it wait, so it must still be asked [`AnyScheduler::decide_now`]
    /// before queueing. False for the scheduler that said [`Now::Wait`].
    undecided: bool,
}

/// What an admission took, to give back if a later scheduler refuses.
#[derive(Debug)]
struct Taken {
    scheduler: AnyScheduler,
    key: Option<Digest>,
    tokens: f64,
}

/// Keeps what an admission took: a concurrency slot (until the access log)
/// or tokens (to give back if a later scheduler refuses).
fn record_admission(step: &Step, now: Nanos, slots: &mut Slots, taken: &mut SmallVec<[Taken; 2]>) {
    match &step.scheduler {
        AnyScheduler::Concurrency(c) => {
            slots.push((c.slot(), now.saturating_add(c.max_inflight)));
        }
        other => taken.push(Taken {
            scheduler: other.clone(),
            key: step.key,
            tokens: step.prepared.tokens,
        }),
    }
}

fn give_back(taken: impl IntoIterator<Item = Taken>) {
    for t in taken {
        match &t.scheduler {
            AnyScheduler::Concurrency(_) => {}
            AnyScheduler::Quota(q) => q.scheduler.give_back(t.key, t.tokens),
            AnyScheduler::Load(l) => l.scheduler.give_back(t.key, t.tokens),
        }
    }
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

/// The reject reason of a refusal.
pub fn reason(why: Why) -> RejectReason {
    match why {
        Why::Timeout => RejectReason::QueueTimeout,
        Why::QueueFull => RejectReason::QueueFull,
        Why::TooLarge => RejectReason::NoTokens,
    }
}

/// What a flow holds while it waits in schedulers, and the schedulers left.
#[derive(Default)]
pub struct Scheduling {
    flow_id: u64,
    /// The flow's flux meters, for its metadata if it is refused.
    pub(super) flux_meters: String,
    steps: SmallVec<[Step; 1]>,
    holds: SmallVec<[OwnedHold; 2]>,
    slots: Slots,
    taken: SmallVec<[Taken; 2]>,
    /// Set once what the flow holds has been given back or handed over.
    settled: bool,
    /// Counts the flow as rejected if it is abandoned while waiting.
    on_abandon: Option<prometheus::IntCounter>,
}

impl std::fmt::Debug for Scheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduling")
            .field("flow_id", &self.flow_id)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Scheduling {
    fn give_everything_back(&mut self) {
        self.settled = true;
        self.holds.drain(..).for_each(OwnedHold::release);
        self.slots.drain(..).for_each(|(slot, _)| slot.release());
        give_back(self.taken.drain(..));
    }

    /// Waits in the remaining schedulers, in order. On admission the flow's
    /// concurrency slots go to the in-flight table; on refusal everything
    /// it holds is given back. `grpc_timeout` is Envoy's deadline for the
    /// answer (the `grpc-timeout` of the Check), counted from now.
    pub async fn run(
        mut self: Box<Self>,
        engine: &Engine,
        grpc_timeout: Option<Duration>,
    ) -> Result<(), SchedulerRejection> {
        self.on_abandon = Some(engine.metrics().rejected.clone());
        let start = engine.clock().now();
        let deadline = grpc_timeout.map(|t| start.saturating_add(nanos(t)));
        let steps = std::mem::take(&mut self.steps);
        for step in steps {
            let now = if step.undecided {
                step.scheduler.decide_now(&step.prepared, step.key)
            } else {
                Now::Wait
            };
            let outcome = match now {
                Now::Admitted => Ok(()),
                Now::Refused(refusal) => Err(refusal),
                Now::Wait => {
                    step.scheduler
                        .wait(&step.prepared, step.key, deadline)
                        .await
                }
            };
            match outcome {
                Ok(()) => {
                    let now = engine.clock().now();
                    record_admission(&step, now, &mut self.slots, &mut self.taken);
                }
                Err(refusal) => {
                    self.give_everything_back();
                    engine.metrics().rejected.inc();
                    let (policy, component) = step.scheduler.names();
                    let reason = reason(refusal.why);
                    engine.count_rejection(policy, component, reason);
                    let by = format!("{policy}/{component}");
                    let mut metadata = String::new();
                    super::metadata::FlowMeta {
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
                        status: step.scheduler.config().denied_status,
                        retry_after: refusal.retry_after,
                        metadata,
                    });
                }
            }
        }
        self.settled = true;
        engine.metrics().accepted.inc();
        engine.hold_slots(self.flow_id, std::mem::take(&mut self.slots));
        Ok(())
    }
}

impl Drop for Scheduling {
    /// The Check was abandoned (Envoy gave up) before the flow's fate was
    /// known: give back what it held. It is counted as rejected (it never
    /// got through) once [`Scheduling::run`] had started on it.
    fn drop(&mut self) {
        if !self.settled {
            self.give_everything_back();
            if let Some(rejected) = self.on_abandon.take() {
                rejected.inc();
            }
        }
    }
}

/// What stage 6 decided.
pub enum Stage6<'a> {
    /// Passed every scheduler.
    Passed,
    /// Refused at once by this scheduler.
    Refused(&'a AnyScheduler, Refusal),
    /// Must wait: everything the flow held moved into the [`Scheduling`].
    Waits(Box<Scheduling>),
}

/// Runs stage 6 for a flow that passed stages 1–5, holding `holds` and
/// `slots`. `matching` are the schedulers whose selectors admit the flow,
/// in stage order; `workloads` receives each scheduler's workload for the
/// flow's metadata. Admissions add to `slots` (concurrency schedulers);
/// a refusal gives back what earlier schedulers admitted (the caller gives
/// back `holds` and `slots`); a wait moves `holds` and `slots` into the
/// returned [`Scheduling`].
pub fn schedule<'a>(
    matching: &[&'a AnyScheduler],
    labels: &FlowLabels<'_>,
    now: Nanos,
    flow_id: u64,
    holds: &mut SmallVec<[super::rate_limiter::Hold<'_>; 2]>,
    slots: &mut Slots,
    workloads: &mut SmallVec<[(&'a str, usize); 1]>,
) -> Stage6<'a> {
    let mut taken: SmallVec<[Taken; 2]> = SmallVec::new();
    let mut steps: SmallVec<[Step; 1]> = SmallVec::new();
    for scheduler in matching {
        let (prepared, key) = match scheduler {
            AnyScheduler::Load(l) => {
                let p = l
                    .scheduler
                    .config
                    .classify(labels, &|w| l.estimated_tokens(w));
                (p, None)
            }
            AnyScheduler::Quota(q) => {
                let key = match &q.limit_by {
                    None => None,
                    Some(label) => match labels.get(label) {
                        Some(v) => Some(super::label_table::digest(&v)),
                        // A flow without the label is not limited by it.
                        None => continue,
                    },
                };
                (q.scheduler.config.classify(labels, &|_| None), key)
            }
            AnyScheduler::Concurrency(c) => (c.scheduler.config.classify(labels, &|_| None), None),
        };
        workloads.push((scheduler.key(), prepared.workload));
        let mut step = Step {
            scheduler: (*scheduler).clone(),
            prepared,
            key,
            undecided: false,
        };
        if !steps.is_empty() {
            step.undecided = true;
            // It waits after the earlier ones; count its arrival now.
            if let AnyScheduler::Load(l) = scheduler {
                l.rate.add(now, step.prepared.tokens);
            }
            scheduler
                .config()
                .count_incoming(step.prepared.workload, step.prepared.tokens);
            steps.push(step);
            continue;
        }
        if let AnyScheduler::Load(l) = scheduler
            && l.passes(now, step.prepared.tokens)
        {
            l.scheduler
                .config
                .count_pass(step.prepared.workload, step.prepared.tokens);
            continue;
        }
        match scheduler.try_now(&step.prepared, key) {
            Now::Admitted => record_admission(&step, now, slots, &mut taken),
            Now::Refused(refusal) => {
                give_back(taken);
                return Stage6::Refused(scheduler, refusal);
            }
            Now::Wait => steps.push(step),
        }
    }
    if steps.is_empty() {
        return Stage6::Passed;
    }
    Stage6::Waits(Box::new(Scheduling {
        flow_id,
        flux_meters: String::new(),
        steps,
        holds: holds
            .drain(..)
            .map(super::rate_limiter::Hold::into_owned)
            .collect(),
        slots: std::mem::take(slots),
        taken,
        settled: false,
        on_abandon: None,
    }))
}
