//! The decision engine: what happens to a flow between Envoy's Check and the
//! answer, and when its access log arrives.
//!
//! Stages run in the order of DESIGN.md; a stage with no component for the
//! flow is skipped, and the first rejection ends the flow's journey:
//!
//! 1. selectors pick the components ([`selector`], indexed by control point
//!    in [`plan`]);
//! 2. [`classifier`]s add labels;
//! 3. [`flux_meter`]s are attached; they observe the flow at its end;
//! 4. [`sampler`]s accept a share;
//! 5. [`rate_limiter`]s charge token buckets, then
//!    [`concurrency_limiter`]s take slots. What a flow took is given back
//!    when a later component rejects it, so a rejected flow costs nothing.
//!
//! [`Engine::end_flow`] is the other half: the access log names the flow
//! ([`metadata`]), its flux meters observe it, and its slots are returned
//! ([`inflight`]).
//!
//! The engine never sees protobufs: adapters (`crate::envoy`,
//! `crate::otlp`) hand it a [`FlowRequest`] over a [`LabelSource`], or a
//! [`flow_end::FlowEnd`], and translate the [`Decision`].

pub mod classifier;
pub mod concurrency_limiter;
pub mod concurrency_scheduler;
pub mod control;
pub mod control_points;
pub mod flow_end;
pub mod flux_meter;
pub mod inflight;
pub mod label_table;
pub mod labels;
pub mod lease;
pub mod load_scheduler;
pub mod metadata;
pub mod plan;
pub mod quota_scheduler;
pub mod rate_limiter;
pub mod sampler;
pub mod scheduler;
pub mod scheduling;
pub mod selector;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use smallvec::SmallVec;

use crate::clock::{self, Clock};
use crate::policy::PolicySet;
use crate::telemetry::{Metrics, forget_component};
use control_points::ControlPoints;
use flow_end::{ExtraAttributes, FlowEnd};
use flux_meter::FluxMeter;
use inflight::{InFlight, InFlightMetrics};
pub use labels::{FlowLabels, LabelRef, LabelSource, MapLabels};
use metadata::FlowMeta;
pub use plan::Plan;
use scheduling::{Scheduling, Stage6};

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
    /// A concurrency limiter had no free slot.
    ConcurrencyLimited,
    /// A scheduler could not admit it before its deadline.
    QueueTimeout,
    /// A scheduler's queue was full.
    QueueFull,
    /// It costs more tokens than a scheduler's bucket can ever hold.
    NoTokens,
}

impl RejectReason {
    /// Every reason, for metric clean-up.
    pub const ALL: [RejectReason; 6] = [
        RejectReason::NotSampled,
        RejectReason::RateLimited,
        RejectReason::ConcurrencyLimited,
        RejectReason::QueueTimeout,
        RejectReason::QueueFull,
        RejectReason::NoTokens,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotSampled => "not_sampled",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::ConcurrencyLimited => "concurrency_limited",
            RejectReason::QueueTimeout => "queue_timeout",
            RejectReason::QueueFull => "queue_full",
            RejectReason::NoTokens => "no_tokens",
        }
    }

    /// Words for the body of a rejected response.
    pub fn describe(self) -> &'static str {
        match self {
            RejectReason::NotSampled => "not sampled",
            RejectReason::RateLimited => "rate limited",
            RejectReason::ConcurrencyLimited => "concurrency limited",
            RejectReason::QueueTimeout => "no capacity in time (overloaded)",
            RejectReason::QueueFull => "queue full (overloaded)",
            RejectReason::NoTokens => "request larger than the quota",
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
    /// The flux meters that observe the flow when its access log arrives.
    pub flux_meters: SmallVec<[&'a FluxMeter; 2]>,
    /// The schedulers (`policy/name`) and workloads the flow was scheduled
    /// in, for their latency estimates.
    pub workloads: SmallVec<[(&'a str, usize); 1]>,
    /// When the flow must still wait in schedulers: what it holds and where
    /// it waits. Take it and [`Scheduling::run`] it.
    pub scheduling: Option<Box<Scheduling>>,
    /// Which classifier labels go upstream in `baggage` (indices into
    /// `labels.classified()`).
    telemetry: SmallVec<[u16; 4]>,
}

impl<'a> Decision<'a> {
    /// True when the flow may pass.
    pub fn accepted(&self) -> bool {
        self.rejection.is_none()
    }

    /// The `sluice.flow` metadata that lets the access log find this flow
    /// again (see [`metadata`]).
    pub fn metadata(&self) -> String {
        let by = self
            .rejection
            .as_ref()
            .map(|r| format!("{}/{}", r.policy, r.component));
        self.encode_metadata(self.accepted(), by.as_deref())
    }

    fn encode_metadata(&self, accepted: bool, rejected_by: Option<&str>) -> String {
        let mut out =
            String::with_capacity(64 + 32 * (self.flux_meters.len() + self.workloads.len()));
        metadata::encode(
            &mut out,
            self.flow_id,
            accepted,
            rejected_by,
            self.flux_meters.iter().map(|m| &*m.key),
            // Only admitted flows teach schedulers their workloads' latency.
            self.workloads.iter().copied().filter(|_| accepted),
        );
        out
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
    /// Most accepted flows holding concurrency slots at once.
    pub max_inflight_flows: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_label_values: 100_000,
            max_inflight_flows: 100_000,
        }
    }
}

/// Flux meters one access-log record may name; more are ignored.
const MAX_METERS_PER_FLOW: usize = 64;

/// What became of one access-log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndOutcome {
    /// It named a flow, which was observed and released.
    Matched,
    /// It named no flow: one Sluice never saw, or one Envoy let through
    /// while Sluice was down.
    WithoutFlow,
    /// Its `sluice.flow` could not be read.
    Invalid,
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
    /// Accepted flows holding concurrency slots.
    inflight: InFlight,
    /// Sizes and limits.
    options: EngineOptions,
}

impl Engine {
    /// An engine with no policy.
    pub fn new(clock: Clock, metrics: Metrics, options: EngineOptions) -> Self {
        Engine {
            plan: ArcSwap::from_pointee(Plan::default()),
            control_points: ControlPoints::new(metrics.control_points_overflow.clone()),
            inflight: InFlight::new(
                options.max_inflight_flows,
                InFlightMetrics {
                    flows: metrics.inflight_flows.clone(),
                    expired: metrics.inflight_expired.clone(),
                    evicted: metrics.inflight_evicted.clone(),
                },
            ),
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
        let next = Plan::compile(
            set,
            &previous,
            &self.metrics,
            &self.clock,
            self.options.max_label_values,
        );
        for (key, old) in &previous.schedulers {
            let kept = next.schedulers.get(key);
            crate::telemetry::forget_scheduler(&self.metrics, old, kept);
        }
        for (key, meter) in &previous.flux_meters {
            if !next.flux_meters.contains_key(key) {
                meter.unregister(&self.metrics.registry);
            }
        }
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

    /// Decides one flow under the plan in force and hands the decision to
    /// `f` (the decision borrows from the plan, which is held meanwhile).
    pub fn decide<R>(&self, flow: FlowRequest<'_>, f: impl FnOnce(Decision<'_>) -> R) -> R {
        let plan = self.plan();
        f(self.check(&plan, flow))
    }

    /// Decides one flow under `plan` (from [`Engine::plan`]).
    pub fn check<'a>(&self, plan: &'a Plan, flow: FlowRequest<'a>) -> Decision<'a> {
        self.metrics.requests.inc();
        self.control_points.record(flow.control_point, flow.service);
        let mut decision = Decision {
            flow_id: fastrand::u64(..),
            rejection: None,
            labels: FlowLabels::new(flow.labels),
            flux_meters: SmallVec::new(),
            workloads: SmallVec::new(),
            scheduling: None,
            telemetry: SmallVec::new(),
        };
        if let Some(stages) = plan.control_points.get(flow.control_point) {
            decision.rejection = self.run_stages(stages, flow.service, &mut decision);
        }
        // A flow that waits in a scheduler is counted when its wait ends.
        if decision.rejection.is_some() {
            self.metrics.rejected.inc();
        } else if decision.scheduling.is_none() {
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

        for f in &stages.flux_meters {
            if admits(&f.selectors, labels) {
                decision.flux_meters.push(&f.component);
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

        let limits = !stages.rate_limiters.is_empty() || !stages.concurrency_limiters.is_empty();
        if !limits && stages.schedulers.is_empty() {
            return None;
        }
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
        let mut slots = inflight::Slots::new();
        for c in &stages.concurrency_limiters {
            if !admits(&c.selectors, labels) {
                continue;
            }
            match c.acquire(labels, now) {
                Ok(slot) => {
                    if let Some(slot) = slot {
                        slots.push((slot, now.saturating_add(c.max_inflight)));
                    }
                }
                Err(concurrency_limiter::Busy) => {
                    holds.into_iter().for_each(rate_limiter::Hold::release);
                    slots.into_iter().for_each(|(slot, _)| slot.release());
                    return Some(Rejection {
                        policy: &c.policy,
                        component: &c.name,
                        reason: RejectReason::ConcurrencyLimited,
                        status: c.denied_status,
                        retry_after: None,
                    });
                }
            }
        }

        if !stages.schedulers.is_empty() {
            let matching: SmallVec<[&'a scheduling::AnyScheduler; 2]> = stages
                .schedulers
                .iter()
                .filter(|s| admits(&s.selectors, labels))
                .map(|s| &*s.component)
                .collect();
            let outcome = scheduling::schedule(
                &matching,
                labels,
                now,
                decision.flow_id,
                &mut holds,
                &mut slots,
                &mut decision.workloads,
            );
            match outcome {
                Stage6::Passed => {}
                Stage6::Refused(scheduler, refusal) => {
                    holds.into_iter().for_each(rate_limiter::Hold::release);
                    slots.into_iter().for_each(|(slot, _)| slot.release());
                    let (policy, component) = scheduler.names();
                    let reason = scheduling::reason(refusal.why);
                    self.count_rejection(policy, component, reason);
                    return Some(Rejection {
                        policy,
                        component,
                        reason,
                        status: scheduler.config().denied_status,
                        retry_after: refusal.retry_after,
                    });
                }
                Stage6::Waits(mut waiting) => {
                    let keys: Vec<&str> = decision.flux_meters.iter().map(|m| &*m.key).collect();
                    waiting.flux_meters = keys.join(",");
                    decision.scheduling = Some(waiting);
                    return None;
                }
            }
        }
        self.hold_slots(decision.flow_id, slots);
        None
    }

    /// Counts a scheduler's rejection in `flowcontrol_reject_reasons_total`
    /// (limiters and samplers count their own).
    pub fn count_rejection(&self, policy: &str, component: &str, reason: RejectReason) {
        self.metrics
            .reject_reasons
            .with_label_values(&[policy, component, reason.as_str()])
            .inc();
    }

    /// Keeps an admitted flow's concurrency slots until its access log.
    pub fn hold_slots(&self, flow_id: u64, slots: inflight::Slots) {
        if !slots.is_empty() {
            self.inflight.insert(flow_id, slots);
        }
    }

    /// Sets the load multiplier of load scheduler `component` of `policy`
    /// for `valid_for`; after that it passes everything again. False when
    /// there is no such load scheduler.
    pub fn set_load_multiplier(
        &self,
        policy: &str,
        component: &str,
        lm: f64,
        valid_for: Duration,
    ) -> bool {
        let plan = self.plan.load();
        let key = format!("{policy}/{component}");
        match plan.schedulers.get(key.as_str()) {
            Some(scheduling::AnyScheduler::Load(l)) => {
                l.set_multiplier(lm, clock::nanos(valid_for));
                true
            }
            _ => false,
        }
    }

    /// Ends a flow from its access log: its flux meters observe it and its
    /// concurrency slots are returned. `extras` answers for attributes
    /// outside the access-log contract.
    pub fn end_flow(&self, end: &FlowEnd<'_>, extras: &dyn ExtraAttributes) -> EndOutcome {
        let Some(raw) = end.flow.as_deref() else {
            return EndOutcome::WithoutFlow;
        };
        let Ok(meta) = FlowMeta::decode(raw) else {
            return EndOutcome::Invalid;
        };
        if meta.accepted {
            self.inflight.finish(meta.id);
        }
        let mut workloads = meta.workloads().peekable();
        if workloads.peek().is_some()
            && let Some(latency) = end.workload_duration_ms(meta.accepted)
        {
            let plan = self.plan.load();
            for (key, workload) in workloads.take(MAX_METERS_PER_FLOW) {
                if let Some(s) = plan.schedulers.get(key) {
                    s.observe_latency(workload, latency);
                }
            }
        }
        let mut meters = meta.flux_meters().peekable();
        if meters.peek().is_some() {
            let plan = self.plan.load();
            // Each meter observes a flow once, however often a (forged or
            // garbled) record names it, and a record names a bounded number.
            let mut seen: SmallVec<[&str; 4]> = SmallVec::new();
            for key in meters.take(MAX_METERS_PER_FLOW) {
                if seen.contains(&key) {
                    continue;
                }
                seen.push(key);
                if let Some(meter) = plan.flux_meters.get(key) {
                    meter.observe(end, meta.accepted, extras);
                }
            }
        }
        EndOutcome::Matched
    }

    /// Flows holding concurrency slots now.
    pub fn inflight_flows(&self) -> usize {
        self.inflight.len()
    }

    /// Returns the slots of flows past `max_inflight_duration` and forgets
    /// per-label state idle past each component's `max_idle_time`. The
    /// server calls it every second.
    pub fn sweep(&self) {
        let now = self.clock.now();
        self.inflight.sweep(now);
        let plan = self.plan.load();
        self.sweep_decisions(&plan, now);
        for policy in &plan.policies {
            for r in &policy.rate_limiters {
                r.sweep(now);
            }
            for c in &policy.concurrency_limiters {
                c.sweep(now);
            }
            for q in &policy.quota_schedulers {
                q.sweep(now, &self.metrics);
            }
            for l in &policy.load_schedulers {
                l.sweep(now, &self.metrics);
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
