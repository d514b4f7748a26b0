//! Decisions from `sluice-controller`, as the engine takes them
//! ([`Engine::apply`](crate::Engine::apply); the sidecar's control edge
//! translates the protobufs).
//!
//! A decision names a policy, the version of it the controller computed for
//! (the hash of the policy file's text), a component and a value, and how
//! long it holds. A sidecar running another version of the policy ignores
//! it: the controller's circuit was computed for components that may not be
//! these. When it lapses, the component returns to its policy's value (a
//! load scheduler to passing everything): a controller that goes away never
//! leaves a sidecar throttled.
//!
//! The stream is untrusted input like any other (docs/security.md): a
//! decision whose numbers are not finite or outside the component's range
//! is refused whole ([`Applied::Invalid`]), and none holds further ahead
//! than the sidecar allows
//! ([`EngineOptions::max_decision_validity`](crate::EngineOptions)), so
//! that neither a broken nor a hostile controller can set a NaN multiplier
//! or leave its damage in force long after it is gone.

use std::time::Duration;

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
    /// A quota scheduler's bucket, as [`Action::RateLimit`] is a rate
    /// limiter's.
    QuotaBucket {
        /// The quota scheduler.
        component: &'a str,
        /// Its capacity, if set.
        bucket_capacity: Option<f64>,
        /// Its fill amount, if set.
        fill_amount: Option<f64>,
    },
    /// A concurrency scheduler's limit. Not [`Action::MaxConcurrency`]:
    /// every action names the kind of component it drives, and a limiter
    /// rejects its excess where a scheduler queues it.
    SchedulerConcurrency {
        /// The concurrency scheduler.
        component: &'a str,
        /// The limit.
        value: u64,
    },
}

impl Action<'_> {
    /// Why its value cannot be applied, if it cannot: numbers must be
    /// finite and within what the component takes.
    pub fn invalid(&self) -> Option<&'static str> {
        let not_count = |v: &Option<f64>| v.is_some_and(|v| !(v.is_finite() && v >= 0.0));
        match self {
            Action::LoadMultiplier { value, .. } if !(0.0..=1.0).contains(value) => {
                Some("a load multiplier outside [0, 1]")
            }
            Action::RateLimit {
                bucket_capacity,
                fill_amount,
                ..
            }
            | Action::QuotaBucket {
                bucket_capacity,
                fill_amount,
                ..
            } if not_count(bucket_capacity) || not_count(fill_amount) => {
                Some("a bucket that is negative or not a finite number")
            }
            Action::AcceptPercentage { value, .. } if !(0.0..=100.0).contains(value) => {
                Some("an accept percentage outside [0, 100]")
            }
            _ => None,
        }
    }

    /// The component it drives.
    pub fn component(&self) -> &str {
        match self {
            Action::LoadMultiplier { component, .. }
            | Action::RateLimit { component, .. }
            | Action::AcceptPercentage { component, .. }
            | Action::MaxConcurrency { component, .. }
            | Action::QuotaBucket { component, .. }
            | Action::SchedulerConcurrency { component, .. } => component,
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
    /// Refused for its value or its validity, and why.
    Invalid(&'static str),
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
            Applied::Invalid(_) => "invalid",
            Applied::Applied => "applied",
            Applied::UnknownPolicy => "unknown_policy",
            Applied::OtherVersion => "other_version",
            Applied::UnknownComponent => "unknown_component",
            Applied::Lapsed => "lapsed",
        }
    }

    /// One of each outcome, for reading every series back.
    pub const ALL: [Applied; 6] = [
        Applied::Applied,
        Applied::Invalid(""),
        Applied::UnknownPolicy,
        Applied::OtherVersion,
        Applied::UnknownComponent,
        Applied::Lapsed,
    ];
}
