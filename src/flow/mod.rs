//! The decision engine: what happens to a flow between Envoy's Check and the
//! answer.
//!
//! Stages run in the order of DESIGN.md; a stage with no component for the
//! flow is skipped, and the first rejection ends the flow's journey:
//!
//! 1. selectors pick the components ([`selector`], indexed by control point
//!    in [`plan`]);
//! 2. [`classifier`]s add labels;
//! 3. (flux meters: attached when the flow-end work lands);
//! 4. [`sampler`]s accept a share;
//! 5. [`rate_limiter`]s charge token buckets. Tokens taken by a limiter are
//!    given back when a later stage rejects the flow, so a rejected flow
//!    costs nothing.
//!
//! The engine never sees protobufs: adapters (`crate::envoy`) hand it a
//! [`FlowRequest`] over a [`LabelSource`] and translate the [`Decision`].

pub mod classifier;
pub mod control_points;
pub mod label_table;
pub mod labels;
pub mod metadata;
pub mod plan;
pub mod rate_limiter;
pub mod sampler;
pub mod selector;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use smallvec::SmallVec;

use crate::clock::Clock;
use crate::policy::PolicySet;
use crate::telemetry::{Metrics, forget_component};
use control_points::ControlPoints;
pub use labels::{FlowLabels, LabelRef, LabelSource, MapLabels};
pub use plan::Plan;

/// A flow as an adapter presents it.
#[derive(Clone, Copy)]
pub struct FlowRequest<'a> {
    /// Where in the traffic the flow is (`ingress`, `egress`, ...).
    pub control_point: &'a str,
    /// The service it is for; `any` when unknown.
    pub service: &'a str,
    /// Its labels.
    pub labels: &'a dyn LabelSource,
}

/// Why a flow was rejected; the values of the `reason` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// A sampler did not pick it.
    NotSampled,
    /// A rate limiter's bucket was empty.
    RateLimited,
}

impl RejectReason {
    /// Every reason, for metric clean-up.
    pub const ALL: [RejectReason; 2] = [RejectReason::NotSampled, RejectReason::RateLimited];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotSampled => "not_sampled",
            RejectReason::RateLimited => "rate_limited",
        }
    }

    /// Words for the body of a rejected response.
    pub fn describe(self) -> &'static str {
        match self {
            RejectReason::NotSampled => "not sampled",
            RejectReason::RateLimited => "rate limited",
        }
    }
}

/// What rejected a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection<'a> {
    /// The policy of the rejecting component.
    pub policy: &'a str,
    /// The rejecting component.
    pub component: &'a str,
    /// Why.
    pub reason: RejectReason,
    /// The HTTP status to answer with.
    pub status: u16,
    /// When trying again could succeed, if known.
    pub retry_after: Option<Duration>,
}

/// The engine's answer for one flow.
pub struct Decision<'a> {
    /// Identifies the flow to its access log.
    pub flow_id: u64,
    /// `None` when the flow is accepted.
    pub rejection: Option<Rejection<'a>>,
    /// The flow's labels, including what classifiers added.
    pub labels: FlowLabels<'a>,
    /// Which classifier labels go upstream in `baggage` (indices into
    /// `labels.classified()`).
    telemetry: SmallVec<[u16; 4]>,
}

impl<'a> Decision<'a> {
    /// True when the flow may pass.
    pub fn accepted(&self) -> bool {
        self.rejection.is_none()
    }

    /// The classifier labels to send upstream in `baggage`; when a label was
    /// set twice, the later value.
    pub fn baggage(&self) -> impl Iterator<Item = (&str, &str)> {
        let classified = self.labels.classified();
        self.telemetry.iter().filter_map(move |&i| {
            let (name, value) = &classified[usize::from(i)];
            let overridden = classified[usize::from(i) + 1..]
                .iter()
                .any(|(later, _)| later == name);
            (!overridden).then_some((&**name, &**value))
        })
    }
}

/// Sizes and limits of the engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Most label values a component keeps state for.
    pub max_label_values: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_label_values: 100_000,
        }
    }
}

/// The decision engine of one sidecar.
pub struct Engine {
    /// What is in force; swapped whole on reload, read without locks.
    plan: ArcSwap<Plan>,
    /// The one clock.
    clock: Clock,
    /// Where decisions are counted.
    metrics: Metrics,
    /// Control points and services seen.
    control_points: ControlPoints,
    /// Sizes and limits.
    options: EngineOptions,
}

impl Engine {
    /// An engine with no policy.
    pub fn new(clock: Clock, metrics: Metrics, options: EngineOptions) -> Self {
        Engine {
            plan: ArcSwap::from_pointee(Plan::default()),
            control_points: ControlPoints::new(metrics.control_points_overflow.clone()),
            clock,
            metrics,
            options,
        }
    }

    /// Puts `set` in force. Unchanged components keep their state (token
    /// buckets are not refilled by an unrelated edit); removed components'
    /// metrics are dropped.
    pub fn install(&self, set: &PolicySet) {
        let previous = self.plan.load_full();
        let next = Plan::compile(set, &previous, &self.metrics, self.options.max_label_values);
        for old in &previous.policies {
            let kept = next.policies.iter().find(|p| p.name == old.name);
            for component in old.component_names() {
                if !kept.is_some_and(|p| p.component_names().any(|c| c == component)) {
                    forget_component(&self.metrics, &old.name, component);
                }
            }
        }
        self.plan.store(Arc::new(next));
        self.metrics.policy_loaded.set(1);
    }

    /// The plan in force. Hold it while a flow is decided: the [`Decision`]
    /// borrows from it. Cheap (no reference-count traffic); do not hold it
    /// across an `.await`.
    #[inline]
    pub fn plan(&self) -> arc_swap::Guard<Arc<Plan>> {
        self.plan.load()
    }

    /// Decides one flow.
    pub fn check<'a>(&self, plan: &'a Plan, flow: FlowRequest<'a>) -> Decision<'a> {
        self.metrics.requests.inc();
        self.control_points.record(flow.control_point, flow.service);
        let mut decision = Decision {
            flow_id: fastrand::u64(..),
            rejection: None,
            labels: FlowLabels::new(flow.labels),
            telemetry: SmallVec::new(),
        };
        if let Some(stages) = plan.control_points.get(flow.control_point) {
            decision.rejection = self.run_stages(stages, flow.service, &mut decision);
        }
        if decision.rejection.is_some() {
            self.metrics.rejected.inc();
        } else {
            self.metrics.accepted.inc();
        }
        decision
    }

    fn run_stages<'a>(
        &self,
        stages: &'a plan::Stages,
        service: &str,
        decision: &mut Decision<'a>,
    ) -> Option<Rejection<'a>> {
        let labels = &mut decision.labels;
        let admits = |selectors: &[selector::Selector], labels: &FlowLabels<'_>| {
            selectors.iter().any(|s| s.admits(service, labels))
        };

        let mut found = SmallVec::<[classifier::Output<'a>; 4]>::new();
        for c in &stages.classifiers {
            if admits(&c.selectors, labels) {
                c.classify(labels, &mut found);
                for (name, value, telemetry) in found.drain(..) {
                    if telemetry {
                        decision.telemetry.push(labels.classified().len() as u16);
                    }
                    labels.set(name, value);
                }
            }
        }

        for s in &stages.samplers {
            if admits(&s.selectors, labels) && !s.accepts(labels) {
                return Some(Rejection {
                    policy: &s.policy,
                    component: &s.name,
                    reason: RejectReason::NotSampled,
                    status: s.denied_status,
                    retry_after: None,
                });
            }
        }

        if !stages.rate_limiters.is_empty() {
            let now = self.clock.now();
            let mut holds = SmallVec::<[rate_limiter::Hold<'a>; 2]>::new();
            for r in &stages.rate_limiters {
                if !admits(&r.selectors, labels) {
                    continue;
                }
                match r.acquire(labels, now) {
                    Ok(hold) => holds.extend(hold),
                    Err(limited) => {
                        holds.into_iter().for_each(rate_limiter::Hold::release);
                        return Some(Rejection {
                            policy: &r.policy,
                            component: &r.name,
                            reason: RejectReason::RateLimited,
                            status: r.denied_status,
                            retry_after: limited.retry_after.map(Duration::from_nanos),
                        });
                    }
                }
            }
        }
        None
    }

    /// Forgets per-label state idle past each component's `max_idle_time`.
    /// The server calls it every second.
    pub fn sweep(&self) {
        let now = self.clock.now();
        let plan = self.plan.load();
        for policy in &plan.policies {
            for r in &policy.rate_limiters {
                r.sweep(now);
            }
        }
    }

    /// Control points and services seen, with counts.
    pub fn control_points(&self) -> Vec<control_points::ControlPointStat> {
        self.control_points.snapshot()
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The engine's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }
}

#[cfg(test)]
mod tests;
