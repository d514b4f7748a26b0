//! [`Engine`]: the decision engine of one sidecar, and everything it does:
//! put a policy set in force, decide a flow, end a flow from its access
//! log, apply a controller's decision, and sweep state in the background.
//!
//! A Check goes through the stages of the plan's control point in order; a
//! stage with no component for the flow is skipped, and the first
//! rejection ends the flow's journey:
//!
//! 1. selectors pick the components (each component's
//!    [`Selector`](crate::components::selector::Selector)s, indexed by
//!    control point in the [`Plan`]);
//! 2. classifiers add labels;
//! 3. flux meters are attached; they observe the flow at its end;
//! 4. samplers accept a share;
//! 5. rate limiters charge token buckets, then concurrency limiters take
//!    slots;
//! 6. schedulers (concurrency, then quota, then load) admit the flow, or
//!    refuse it, or make it wait ([`crate::schedulers`]).
//!
//! What the flow takes in stages 5 and 6 is its
//! [`Admission`]: a rejection drops it, which
//! gives everything back, so a rejected flow costs nothing; an admission is
//! committed, which hands its slots to the in-flight table until the
//! access log arrives ([`Engine::end_flow`]).

use std::sync::Arc;
use std::time::Duration;

use ahash::AHashSet;
use arc_swap::ArcSwap;
use sluice_policy::PolicySet;
use sluice_time::{Clock, nanos};
use smallvec::SmallVec;

use crate::admission::Admission;
use crate::components::{classifier, concurrency_limiter, rate_limiter, selector};
use crate::control::{Action, Applied, ControlDecision};
use crate::control_points::{ControlPointStat, ControlPoints};
use crate::decision::{Decision, FlowRequest, RejectReason, Rejection};
use crate::flow_end::ended::RecentlyEnded;
use crate::flow_end::inflight::{InFlight, InFlightMetrics};
use crate::flow_end::metadata::{FlowKey, FlowMeta, MetaError};
use crate::flow_end::{ExtraAttributes, FlowEnd};
use crate::labels::FlowLabels;
use crate::metrics::Metrics;
use crate::plan::{Plan, Stages};
use crate::preview::Previews;
use crate::schedulers::{self, AnyScheduler, Scheduled};
use crate::status::{ComponentStatus, Driven, EngineStatus, PolicyStatus};
use crate::store::SharedStore;
use crate::waiting::{Step, Steps, Waiting};

/// Sizes and limits of the engine, and its store.
#[derive(Clone)]
pub struct EngineOptions {
    /// Most label values a component keeps state for.
    pub max_label_values: usize,
    /// Most accepted flows holding concurrency slots at once.
    pub max_inflight_flows: usize,
    /// Where `scope: global` components keep their state; without one, a
    /// policy with such a component is refused.
    pub store: Option<SharedStore>,
    /// The key `sluice.flow` values are signed with; random when `None`.
    pub flow_key: Option<FlowKey>,
    /// Longest a controller's decision may hold from its arrival: one that
    /// asks for more holds this long, so that a controller that is gone (or
    /// was never the real one) cannot leave a component throttled for long.
    pub max_decision_validity: Duration,
    /// Headers whose values previews never show, besides
    /// [`crate::preview::ALWAYS_REDACTED`].
    pub preview_redact: Vec<String>,
    /// Most previews open at once.
    pub max_previews: usize,
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("max_label_values", &self.max_label_values)
            .field("max_inflight_flows", &self.max_inflight_flows)
            .field("store", &self.store.is_some())
            .field("flow_key", &self.flow_key.is_some())
            .field("max_decision_validity", &self.max_decision_validity)
            .field("preview_redact", &self.preview_redact)
            .field("max_previews", &self.max_previews)
            .finish()
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_label_values: 100_000,
            max_inflight_flows: 100_000,
            store: None,
            flow_key: None,
            max_decision_validity: Duration::from_secs(60),
            preview_redact: Vec::new(),
            max_previews: crate::preview::DEFAULT_MAX_OPEN,
        }
    }
}

/// Why a policy set was not put in force.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InstallError(pub String);

/// Flux meters one access-log record may name; more are ignored.
const MAX_METERS_PER_FLOW: usize = 64;

/// What became of one access-log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndOutcome {
    /// It named a flow, which was observed and ended.
    Matched,
    /// It named no flow: one Sluice never saw, or one Envoy let through
    /// while Sluice was down.
    WithoutFlow,
    /// Its `sluice.flow` could not be read, or an attribute was out of
    /// bounds (a negative, huge or non-finite duration, say): the flow's
    /// concurrency slots are given back, nothing is observed.
    Invalid,
    /// Its `sluice.flow` is not signed by this sidecar: forged, or of a
    /// flow decided before a restart (without `--flow-key-file`). Ignored.
    Unsigned,
    /// Its flow had already ended: a replayed record. Ignored.
    Duplicate,
}

impl EndOutcome {
    /// The `result` label of `flowcontrol_access_logs_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndOutcome::Matched => "matched",
            EndOutcome::WithoutFlow => "without_flow",
            EndOutcome::Invalid => "invalid",
            EndOutcome::Unsigned => "unsigned",
            EndOutcome::Duplicate => "duplicate",
        }
    }

    /// Every outcome, for registering each series up front.
    pub const ALL: [EndOutcome; 5] = [
        EndOutcome::Matched,
        EndOutcome::WithoutFlow,
        EndOutcome::Invalid,
        EndOutcome::Unsigned,
        EndOutcome::Duplicate,
    ];
}

// `ALL` is in declaration order, so `outcome as usize` indexes arrays built
// from it (the counters of the access-log edge).
const _: () = {
    let mut i = 0;
    while i < EndOutcome::ALL.len() {
        assert!(EndOutcome::ALL[i] as usize == i);
        i += 1;
    }
};

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
    /// Admitted flows holding concurrency slots.
    inflight: InFlight,
    /// Signs `sluice.flow` values and verifies them on access logs.
    flow_key: FlowKey,
    /// Flows whose access log arrived lately, so that a replay is not
    /// observed twice.
    ended: RecentlyEnded,
    /// Previews open now (`GET /v1/preview`).
    previews: Arc<Previews>,
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
            flow_key: options.flow_key.unwrap_or_else(FlowKey::random),
            ended: RecentlyEnded::default(),
            previews: Arc::new(Previews::new(&options.preview_redact, options.max_previews)),
            clock,
            metrics,
            options,
        }
    }

    /// The key this engine signs `sluice.flow` with: for tools and tests
    /// that build access logs of real flows in the same process.
    pub fn flow_key(&self) -> &FlowKey {
        &self.flow_key
    }

    /// Puts `set` in force. Unchanged components keep their state (token
    /// buckets are not refilled by an unrelated edit); the series of
    /// removed components leave `/metrics`. A set with a `scope: global`
    /// component is refused by an engine without a store, and the set in
    /// force stays.
    pub fn install(&self, set: &PolicySet) -> Result<(), InstallError> {
        if self.options.store.is_none() {
            for loaded in &set.policies {
                if let Some(component) = loaded.policy.global_components().next() {
                    return Err(InstallError(format!(
                        "{}: {}/{component} has scope: global, but this sidecar has no store: start it with --redis-url (the policy in force stays)",
                        loaded.file.display(),
                        loaded.policy.name.value.0
                    )));
                }
            }
        }
        let previous = self.plan.load_full();
        let next = Plan::compile(
            set,
            &previous,
            &self.metrics,
            &self.clock,
            self.options.max_label_values,
            self.options.store.as_ref(),
        );
        let kept: AHashSet<_> = next.series().flat_map(|s| s.keys()).collect();
        for series in previous.series() {
            series.retire_except(&kept);
        }
        self.plan.store(Arc::new(next));
        self.metrics.policy_loaded.set(1);
        Ok(())
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
            // Never 0: the empty slot of `RecentlyEnded`.
            flow_id: fastrand::u64(1..),
            flow_key: self.flow_key,
            rejection: None,
            labels: FlowLabels::new(flow.labels),
            flux_meters: SmallVec::new(),
            workloads: SmallVec::new(),
            waiting: None,
            telemetry: SmallVec::new(),
            observed_at_end: false,
        };
        let stages = plan.control_points.get(flow.control_point);
        if let Some(stages) = stages {
            decision.rejection = self.run_stages(stages, flow.service, &mut decision);
        }
        // Whether the access log will be read (`Decision::metadata`): a
        // waiting flow may yet take slots; a rejected one's workloads learn
        // nothing.
        decision.observed_at_end |= decision.waiting.is_some()
            || !decision.flux_meters.is_empty()
            || (decision.rejection.is_none() && !decision.workloads.is_empty());
        if self.previews.wanted() {
            self.previews
                .sample(stages, flow.control_point, flow.service, &mut decision);
        }
        // A flow that waits in a scheduler is counted when its wait ends.
        if decision.rejection.is_some() {
            self.metrics.rejected.inc();
        } else if decision.waiting.is_none() {
            self.metrics.accepted.inc();
        }
        decision
    }

    fn run_stages<'a>(
        &self,
        stages: &'a Stages,
        service: &str,
        decision: &mut Decision<'a>,
    ) -> Option<Rejection<'a>> {
        let labels = &mut decision.labels;
        let admits = |selectors: &[selector::Selector], labels: &FlowLabels<'_>| {
            selectors.iter().any(|s| s.admits(service, labels))
        };

        // Stage 2.
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

        // Stage 3.
        for f in &stages.flux_meters {
            if admits(&f.selectors, labels) {
                decision.flux_meters.push(&f.component);
            }
        }

        // Stage 4.
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

        // Stage 5. A rejection returns early and drops `admission`, which
        // gives back what earlier components took. The first component
        // that must wait (for the store) turns into a step, and so does
        // every one after it.
        let now = self.clock.now();
        let mut admission = Admission::default();
        let mut steps = Steps::new();
        for r in &stages.rate_limiters {
            if !admits(&r.selectors, labels) {
                continue;
            }
            if !steps.is_empty() {
                steps.extend(r.component.step(labels).map(Step::Rate));
                continue;
            }
            match r.component.acquire(labels, now) {
                rate_limiter::Acquired::Taken(tokens) => {
                    tokens.into_iter().for_each(|t| admission.pay(t));
                }
                rate_limiter::Acquired::Limited(limited) => {
                    return Some(Rejection {
                        policy: &r.policy,
                        component: &r.name,
                        reason: RejectReason::RateLimited,
                        status: r.denied_status,
                        retry_after: limited.retry_after.map(Duration::from_nanos),
                    });
                }
                rate_limiter::Acquired::Ask(step) => steps.push(Step::Rate(step)),
            }
        }
        for c in &stages.concurrency_limiters {
            if !admits(&c.selectors, labels) {
                continue;
            }
            if !steps.is_empty() {
                steps.extend(c.component.step(labels).map(Step::Concurrency));
                continue;
            }
            match c.component.acquire(labels, now) {
                concurrency_limiter::Acquired::Taken(slot) => {
                    if let Some(slot) = slot {
                        admission.hold(slot, now.saturating_add(c.max_inflight));
                    }
                }
                concurrency_limiter::Acquired::Busy => {
                    return Some(Rejection {
                        policy: &c.policy,
                        component: &c.name,
                        reason: RejectReason::ConcurrencyLimited,
                        status: c.denied_status,
                        retry_after: None,
                    });
                }
                concurrency_limiter::Acquired::Ask(step) => steps.push(Step::Concurrency(step)),
            }
        }

        // Stage 6.
        if !stages.schedulers.is_empty() {
            let matching: SmallVec<[&'a AnyScheduler; 2]> = stages
                .schedulers
                .iter()
                .filter(|s| admits(&s.selectors, labels))
                .map(|s| &*s.component)
                .collect();
            if let Scheduled::Refused(scheduler, (reason, status, retry_after)) =
                schedulers::schedule(
                    &matching,
                    labels,
                    now,
                    &mut admission,
                    &mut decision.workloads,
                    &mut steps,
                )
            {
                let (policy, component) = scheduler.names();
                return Some(Rejection {
                    policy,
                    component,
                    reason,
                    status,
                    retry_after,
                });
            }
        }
        if !steps.is_empty() {
            let mut waiting = Waiting::new(decision.flow_id, steps, admission);
            let keys: Vec<&str> = decision.flux_meters.iter().map(|m| &*m.key).collect();
            waiting.flux_meters = keys.join(",");
            decision.waiting = Some(waiting);
            return None;
        }
        decision.observed_at_end = self.admit(decision.flow_id, &mut admission);
        None
    }

    /// Commits an admitted flow's admission: its tokens are spent, its
    /// slots held until its access log. True when it holds slots.
    pub fn admit(&self, flow_id: u64, admission: &mut Admission<'_>) -> bool {
        match admission.commit() {
            Some(slots) => {
                self.inflight.insert(flow_id, slots);
                true
            }
            None => false,
        }
    }

    /// Puts a controller's decision in force.
    pub fn apply(&self, decision: &ControlDecision<'_>) -> Applied {
        if decision.valid_for.is_zero() {
            return Applied::Lapsed;
        }
        if let Some(why) = decision.action.invalid() {
            return Applied::Invalid(why);
        }
        let plan = self.plan();
        let Some(policy) = plan.policies.iter().find(|p| &*p.name == decision.policy) else {
            return Applied::UnknownPolicy;
        };
        if policy.hash != decision.policy_hash {
            return Applied::OtherVersion;
        }
        // Never further ahead than this sidecar allows, whatever was asked:
        // a controller re-sends every tick, so only a controller that is
        // gone (or was never the real one) notices.
        let valid_for = decision.valid_for.min(self.options.max_decision_validity);
        let until = self.clock.now().saturating_add(nanos(valid_for));
        let name = decision.action.component();
        let found = match &decision.action {
            Action::LoadMultiplier { value, .. } => policy
                .load_schedulers
                .iter()
                .find(|l| &*l.scheduler.name == name)
                .map(|l| l.set_multiplier(*value, until)),
            Action::RateLimit {
                bucket_capacity,
                fill_amount,
                ..
            } => policy
                .rate_limiters
                .iter()
                .find(|r| &*r.name == name)
                .map(|r| r.set_bucket(*bucket_capacity, *fill_amount, until)),
            Action::AcceptPercentage { value, .. } => policy
                .samplers
                .iter()
                .find(|s| &*s.name == name)
                .map(|s| s.set_accept_percentage_until(*value, until)),
            Action::MaxConcurrency { value, .. } => policy
                .concurrency_limiters
                .iter()
                .find(|c| &*c.name == name)
                .map(|c| c.set_max_concurrency(*value, until)),
            Action::QuotaBucket {
                bucket_capacity,
                fill_amount,
                ..
            } => policy
                .quota_schedulers
                .iter()
                .find(|q| &*q.scheduler.name == name)
                .map(|q| q.set_bucket(*bucket_capacity, *fill_amount, until)),
            Action::SchedulerConcurrency { value, .. } => policy
                .concurrency_schedulers
                .iter()
                .find(|c| &*c.scheduler.name == name)
                .map(|c| c.set_max_concurrency(*value, until)),
        };
        match found {
            Some(()) => Applied::Applied,
            None => Applied::UnknownComponent,
        }
    }

    /// Ends a flow from its access log: its flux meters observe it and its
    /// concurrency slots are given back. `extras` answers for attributes
    /// outside the access-log contract.
    pub fn end_flow(&self, end: &FlowEnd<'_>, extras: &dyn ExtraAttributes) -> EndOutcome {
        let Some(raw) = end.flow.as_deref() else {
            return EndOutcome::WithoutFlow;
        };
        let meta = match FlowMeta::decode(raw, &self.flow_key) {
            Ok(meta) => meta,
            Err(MetaError::Unsigned) => return EndOutcome::Unsigned,
            Err(_) => return EndOutcome::Invalid,
        };
        if !self.ended.first_end(meta.id) {
            return EndOutcome::Duplicate;
        }
        if meta.accepted {
            self.inflight.finish(meta.id);
        }
        if end.out_of_bounds {
            return EndOutcome::Invalid;
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

    /// The id of some flow holding slots now.
    #[cfg(test)]
    pub(crate) fn any_inflight_flow(&self) -> Option<u64> {
        self.inflight.any_id()
    }

    /// Gives back the slots of flows past `max_inflight_duration`, forgets
    /// per-label state idle past each component's `max_idle_time`, returns
    /// components whose controller decision lapsed to their policy's value,
    /// and updates the gauges. The sidecar calls it every second.
    pub fn sweep(&self) {
        let now = self.clock.now();
        self.inflight.sweep(now);
        let plan = self.plan.load();
        for policy in &plan.policies {
            for r in &policy.rate_limiters {
                r.sweep(now);
                if r.revert_if_lapsed(now) {
                    lapsed(&policy.name, &r.name, "bucket");
                }
            }
            for s in &policy.samplers {
                if s.revert_if_lapsed(now) {
                    lapsed(&policy.name, &s.name, "share");
                }
            }
            for c in &policy.concurrency_limiters {
                c.sweep(now);
                if c.revert_if_lapsed(now) {
                    lapsed(&policy.name, &c.name, "limit");
                }
            }
            // Lapsed first, so that the gauges the sweep updates show the
            // policy's values at once.
            for q in &policy.quota_schedulers {
                if q.revert_if_lapsed(now) {
                    lapsed(&policy.name, &q.scheduler.name, "bucket");
                }
                q.sweep(now);
            }
            for c in &policy.concurrency_schedulers {
                if c.revert_if_lapsed(now) {
                    lapsed(&policy.name, &c.scheduler.name, "limit");
                }
                c.sweep(now);
            }
            for l in &policy.load_schedulers {
                l.sweep(now);
            }
        }
    }

    /// Control points and services seen, with counts.
    pub fn control_points(&self) -> Vec<ControlPointStat> {
        self.control_points.snapshot()
    }

    /// Every policy in force and its components' live state (off the
    /// Check path: each component's lock is taken once).
    pub fn status(&self) -> EngineStatus {
        let now = self.clock.now();
        let wall = sluice_time::unix_ms();
        let plan = self.plan();
        let policies = plan
            .policies
            .iter()
            .map(|p| {
                let mut components: Vec<ComponentStatus> = Vec::new();
                components.extend(
                    p.classifiers
                        .iter()
                        .map(|c| ComponentStatus::new("classifier", &c.name)),
                );
                components.extend(
                    p.flux_meters
                        .iter()
                        .map(|f| ComponentStatus::new("flux_meter", &f.name)),
                );
                components.extend(p.samplers.iter().map(|s| {
                    let mut status = ComponentStatus::new("sampler", &s.name);
                    status.accept_percentage = Some(s.accept_percentage());
                    status.controller = Driven::of(&s.lease, now, wall);
                    status
                }));
                components.extend(p.rate_limiters.iter().map(|r| r.status(now, wall)));
                components.extend(p.concurrency_limiters.iter().map(|c| c.status(now, wall)));
                components.extend(p.concurrency_schedulers.iter().map(|c| c.status(now, wall)));
                components.extend(p.quota_schedulers.iter().map(|q| q.status(now, wall)));
                components.extend(p.load_schedulers.iter().map(|l| l.status(now, wall)));
                PolicyStatus {
                    name: p.name.to_string(),
                    file: p.file.display().to_string(),
                    hash: format!("{:016x}", p.hash),
                    components,
                }
            })
            .collect();
        EngineStatus {
            policies,
            inflight_flows: self.inflight.len(),
        }
    }

    /// Whether `control_point` is one a policy in force names or a Check
    /// has named: what a preview may ask for.
    pub fn knows_control_point(&self, control_point: &str) -> bool {
        self.plan().control_points.contains_key(control_point)
            || self
                .control_points
                .snapshot()
                .iter()
                .any(|c| c.control_point == control_point)
    }

    /// The previews open on this engine, to open another.
    pub fn previews(&self) -> &Arc<Previews> {
        &self.previews
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

/// Says once that a controller decision lapsed and what the component is
/// back to.
fn lapsed(policy: &str, component: &str, what: &str) {
    tracing::info!(
        policy,
        component,
        "controller decision lapsed; back to the policy's {what}"
    );
}
