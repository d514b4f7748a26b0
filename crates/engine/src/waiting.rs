//! A flow that must wait: for the store (a global limiter's lease or slot)
//! or in a scheduler's queue.
//!
//! Most flows are decided without waiting, on the synchronous Check path.
//! The first component that cannot decide at once (a global rate limiter
//! whose lease is empty, a global concurrency limiter, a scheduler with no
//! room) turns into a [`Step`], and so does every component after it, with
//! what it needs from the flow read now (keys, costs, workloads), so that
//! the flow's labels need not outlive the Check's borrow. The flow leaves
//! the engine as a [`Waiting`]: its [`Admission`] (everything it took so
//! far, owned) and the steps left, which [`Waiting::run`] runs in order.
//! Whatever the outcome (admitted, refused, or the Check abandoned by
//! Envoy while waiting, which drops the future), the admission is
//! committed or dropped, and dropping it gives everything back.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use sluice_time::nanos;
use smallvec::SmallVec;

use crate::admission::Admission;
use crate::components::concurrency_limiter::ConcurrencyStep;
use crate::components::rate_limiter::RateStep;
use crate::decision::RejectReason;
use crate::engine::Engine;
use crate::preview::{Outcome, Pending};
use crate::schedulers::SchedulerStep;

/// One component a waiting flow has still to pass.
#[derive(Debug)]
pub enum Step {
    /// A rate limiter.
    Rate(RateStep),
    /// A concurrency limiter.
    Concurrency(ConcurrencyStep),
    /// A scheduler.
    Scheduler(SchedulerStep),
}

/// The steps of a flow, in stage order.
pub type Steps = SmallVec<[Step; 1]>;

/// A refusal after waiting, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The refusing component's policy.
    pub policy: Arc<str>,
    /// The refusing component.
    pub component: Arc<str>,
    /// Why.
    pub reason: RejectReason,
    /// The HTTP status to answer with.
    pub status: u16,
    /// When trying again could work.
    pub retry_after: Option<Duration>,
    /// The flow's `sluice.flow` metadata, as rejected; `None` when no
    /// flux meter observes it (nothing else reads a refused flow's log).
    pub metadata: Option<String>,
}

/// A flow that must wait: what it took so far, and the steps left.
/// Dropping it (Envoy gave up on the Check) gives everything back.
pub struct Waiting {
    pub(crate) flow_id: u64,
    /// The flow's flux meters, for its metadata if it is refused.
    pub(crate) flux_meters: String,
    pub(crate) steps: Steps,
    pub(crate) admission: Admission<'static>,
    /// Set while [`Waiting::run`] has not answered: a flow abandoned then
    /// counts as rejected (it never got through).
    unanswered: Option<IntCounter>,
    /// Its sample, when a preview took one: delivered with the final
    /// decision, or as abandoned when this is dropped first.
    pub(crate) preview: Option<Pending>,
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
    /// A flow with `steps` left, holding `admission`.
    pub(crate) fn new(flow_id: u64, steps: Steps, admission: Admission<'_>) -> Box<Waiting> {
        Box::new(Waiting {
            flow_id,
            flux_meters: String::new(),
            steps,
            admission: admission.into_owned(),
            unanswered: None,
            preview: None,
        })
    }

    /// Runs the steps left, in order. On admission the flow's slots go to
    /// the in-flight table; on refusal everything it took is given back.
    /// `grpc_timeout` is Envoy's deadline for the answer (the
    /// `grpc-timeout` of the Check), counted from now: no scheduler keeps
    /// the flow past it.
    pub async fn run(
        mut self: Box<Self>,
        engine: &Engine,
        grpc_timeout: Option<Duration>,
    ) -> Result<(), Refused> {
        self.unanswered = Some(engine.metrics().rejected.clone());
        let clock = engine.clock();
        let deadline = grpc_timeout.map(|t| clock.now().saturating_add(nanos(t)));
        let steps = std::mem::take(&mut self.steps);
        for step in steps {
            let refused = match step {
                Step::Rate(step) => {
                    let limiter = step.limiter().clone();
                    match step.run(clock).await {
                        Ok(claim) => {
                            claim.into_iter().for_each(|c| self.admission.pay(c));
                            None
                        }
                        Err(limited) => Some((
                            (limiter.policy.clone(), limiter.name.clone()),
                            (
                                RejectReason::RateLimited,
                                limiter.denied_status,
                                limited.retry_after.map(Duration::from_nanos),
                            ),
                        )),
                    }
                }
                Step::Concurrency(step) => {
                    let limiter = step.limiter().clone();
                    match step.run(clock, self.flow_id).await {
                        Ok(slot) => {
                            if let Some(slot) = slot {
                                let until = clock.now().saturating_add(limiter.max_inflight);
                                self.admission.hold(slot, until);
                            }
                            None
                        }
                        Err(_) => Some((
                            (limiter.policy.clone(), limiter.name.clone()),
                            (
                                RejectReason::ConcurrencyLimited,
                                limiter.denied_status,
                                None,
                            ),
                        )),
                    }
                }
                Step::Scheduler(step) => match step.run(&mut self.admission, deadline, clock).await
                {
                    Ok(()) => None,
                    Err(refusal) => {
                        let (policy, component) = step.scheduler().names();
                        Some(((policy.clone(), component.clone()), refusal))
                    }
                },
            };
            if let Some(((policy, component), (reason, status, retry_after))) = refused {
                self.unanswered = None;
                drop(std::mem::take(&mut self.admission));
                engine.metrics().rejected.inc();
                let metadata = (!self.flux_meters.is_empty()).then(|| {
                    let by = format!("{policy}/{component}");
                    let mut metadata = String::new();
                    crate::flow_end::metadata::FlowMeta {
                        id: self.flow_id,
                        accepted: false,
                        rejected_by: Some(&by),
                        flux_meters: &self.flux_meters,
                        workloads: "",
                    }
                    .encode_into(&mut metadata, engine.flow_key());
                    metadata
                });
                if let Some(preview) = self.preview.take() {
                    preview.settle(Some(Outcome::Rejected {
                        policy: policy.to_string(),
                        component: component.to_string(),
                        reason: reason.as_str(),
                        status,
                    }));
                }
                return Err(Refused {
                    policy,
                    component,
                    reason,
                    status,
                    retry_after,
                    metadata,
                });
            }
        }
        self.unanswered = None;
        engine.metrics().accepted.inc();
        engine.admit(self.flow_id, &mut self.admission);
        if let Some(preview) = self.preview.take() {
            preview.settle(Some(Outcome::Accepted { waited: true }));
        }
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
