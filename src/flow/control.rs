//! Decisions from `sluice-controller`, as the engine takes them (the
//! control adapter in `crate::control` translates the protobufs).
//!
//! A decision names a policy, the version of it the controller computed for
//! (the hash of the policy file's text), a component and a value, and how
//! long it holds. A sidecar running another version of the policy ignores
//! it: the controller's circuit was computed for components that may not be
//! these. When it lapses, the component returns to its policy's value (a
//! load scheduler to passing everything): a controller that goes away never
//! leaves a sidecar throttled.

use std::time::Duration;

use super::Engine;
use super::scheduling::AnyScheduler;
use crate::clock::{Nanos, nanos};

/// What a decision does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action<'a> {
    /// A load scheduler's multiplier.
    LoadMultiplier {
        /// The load scheduler.
        component: &'a str,
        /// The multiplier.
        value: f64,
    },
    /// A rate limiter's bucket.
    RateLimit {
        /// The rate limiter.
        component: &'a str,
        /// Its capacity, if set.
        bucket_capacity: Option<f64>,
        /// Its fill amount, if set.
        fill_amount: Option<f64>,
    },
    /// A sampler's share.
    AcceptPercentage {
        /// The sampler.
        component: &'a str,
        /// The percentage.
        value: f64,
    },
    /// A concurrency limiter's limit.
    MaxConcurrency {
        /// The concurrency limiter.
        component: &'a str,
        /// The limit.
        value: u64,
    },
}

impl Action<'_> {
    /// The component it drives.
    pub fn component(&self) -> &str {
        match self {
            Action::LoadMultiplier { component, .. }
            | Action::RateLimit { component, .. }
            | Action::AcceptPercentage { component, .. }
            | Action::MaxConcurrency { component, .. } => component,
        }
    }
}

/// One decision.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlDecision<'a> {
    /// The policy.
    pub policy: &'a str,
    /// The policy version it was computed for (xxh3 of the file's text).
    pub policy_hash: u64,
    /// How long it holds from now.
    pub valid_for: Duration,
    /// What it does.
    pub action: Action<'a>,
}

/// What became of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// In force.
    Applied,
    /// This sidecar does not run that policy.
    UnknownPolicy,
    /// This sidecar runs another version of the policy.
    OtherVersion,
    /// The policy has no such component (of that kind).
    UnknownComponent,
    /// Already lapsed when it arrived.
    Lapsed,
}

impl Applied {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::Applied => "applied",
            Applied::UnknownPolicy => "unknown_policy",
            Applied::OtherVersion => "other_version",
            Applied::UnknownComponent => "unknown_component",
            Applied::Lapsed => "lapsed",
        }
    }
}

impl Engine {
    /// Puts a controller's decision in force.
    pub fn apply(&self, decision: &ControlDecision<'_>) -> Applied {
        if decision.valid_for.is_zero() {
            return Applied::Lapsed;
        }
        let plan = self.plan();
        let Some(policy) = plan.policies.iter().find(|p| &*p.name == decision.policy) else {
            return Applied::UnknownPolicy;
        };
        if policy.hash != decision.policy_hash {
            return Applied::OtherVersion;
        }
        let now = self.clock().now();
        let until = now.saturating_add(nanos(decision.valid_for));
        let name = decision.action.component();
        let found = match &decision.action {
            Action::LoadMultiplier { value, .. } => policy
                .load_schedulers
                .iter()
                .find(|l| &*l.scheduler.name == name)
                .map(|l| l.set_multiplier(*value, until - now)),
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
        };
        if found.is_none() {
            return Applied::UnknownComponent;
        }
        self.metrics()
            .controller_decision_active
            .with_label_values(&[decision.policy, name])
            .set(1);
        Applied::Applied
    }

    /// Returns components whose controller decision lapsed to their
    /// policy's value, and updates `controller_decision_active`.
    pub(super) fn sweep_decisions(&self, plan: &super::Plan, now: Nanos) {
        let gauge = |policy: &str, component: &str, active: bool| {
            self.metrics()
                .controller_decision_active
                .with_label_values(&[policy, component])
                .set(i64::from(active));
        };
        for policy in &plan.policies {
            for r in &policy.rate_limiters {
                if r.revert_if_lapsed(now) {
                    tracing::info!(policy = %policy.name, component = %r.name, "controller decision lapsed; back to the policy's bucket");
                }
                gauge(&policy.name, &r.name, r.lease.active(now));
            }
            for s in &policy.samplers {
                if s.revert_if_lapsed(now) {
                    tracing::info!(policy = %policy.name, component = %s.name, "controller decision lapsed; back to the policy's share");
                }
                gauge(&policy.name, &s.name, s.lease.active(now));
            }
            for c in &policy.concurrency_limiters {
                if c.revert_if_lapsed(now) {
                    tracing::info!(policy = %policy.name, component = %c.name, "controller decision lapsed; back to the policy's limit");
                }
                gauge(&policy.name, &c.name, c.lease.active(now));
            }
            for s in policy.schedulers() {
                if let AnyScheduler::Load(l) = &s {
                    gauge(&policy.name, &l.scheduler.name, l.multiplier.leased(now));
                }
            }
        }
    }
}
