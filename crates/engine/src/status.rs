//! What is in force now, component by component: for `GET /v1/status` and
//! `sluice status`, which an operator reads in an incident ("is the
//! controller driving this limiter? how full is the bucket? how many
//! wait?").
//!
//! Reading status takes each component's lock as its own sweep does, once;
//! it never runs on the Check path.

use serde::Serialize;
use sluice_time::Nanos;

use crate::components::lease::Lease;
use crate::token_bucket::BucketParams;

/// Every policy in force, with its components.
#[derive(Clone, Debug, Serialize)]
pub struct EngineStatus {
    /// The policies, by name.
    pub policies: Vec<PolicyStatus>,
    /// Accepted flows holding concurrency slots until their access log.
    pub inflight_flows: usize,
}

/// One policy in force.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyStatus {
    /// Its name.
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// The hash of its text, as the controller's decisions name it.
    pub hash: String,
    /// Its components, in stage order.
    pub components: Vec<ComponentStatus>,
}

/// One component's live state. Only the fields its kind has are present.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ComponentStatus {
    /// `classifier`, `flux_meter`, `sampler`, `rate_limiter`,
    /// `concurrency_limiter`, `concurrency_scheduler`, `quota_scheduler`
    /// or `load_scheduler`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// `global` when it keeps its state in the store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<&'static str>,
    /// The label it keeps state per value of, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_key: Option<String>,
    /// Label values it keeps state for now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_values: Option<usize>,
    /// Bucket capacity in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket_capacity: Option<f64>,
    /// Tokens added per interval, in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fill_amount: Option<f64>,
    /// The refill interval, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<f64>,
    /// Tokens in the bucket now (one bucket kept in this sidecar: not per
    /// label value, and not for a global component, whose bucket is in the
    /// store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket_level: Option<f64>,
    /// Share of flows accepted, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_percentage: Option<f64>,
    /// The concurrency limit in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u64>,
    /// Whether the limit adapts to latency (`adaptive:`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<bool>,
    /// Flows holding a slot now (without a label key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    /// Requests waiting in its queues now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued: Option<usize>,
    /// The load multiplier in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_multiplier: Option<f64>,
    /// Tokens per second arriving, over its window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incoming_rate: Option<f64>,
    /// Whether it only counts what it would refuse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    /// Set while a controller's decision drives it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<Driven>,
}

/// A controller's decision in force.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Driven {
    /// Seconds until it lapses and the policy's value returns.
    pub valid_for_seconds: f64,
    /// When that is, in Unix milliseconds (this sidecar's clock).
    pub valid_until_unix_ms: i64,
}

impl Driven {
    /// The decision holding `remaining` more nanoseconds, if any, read at
    /// `wall_ms`.
    pub fn from_remaining(remaining: Option<Nanos>, wall_ms: i64) -> Option<Driven> {
        remaining.map(|r| Driven {
            valid_for_seconds: r as f64 / 1e9,
            valid_until_unix_ms: wall_ms.saturating_add((r / 1_000_000) as i64),
        })
    }

    /// What `lease` says at `now` (engine clock), read at `wall_ms`.
    pub fn of(lease: &Lease, now: Nanos, wall_ms: i64) -> Option<Driven> {
        Driven::from_remaining(lease.remaining(now), wall_ms)
    }
}

impl ComponentStatus {
    /// A component of `kind` called `name`, with nothing else known yet.
    pub fn new(kind: &'static str, name: &str) -> Self {
        ComponentStatus {
            kind,
            name: name.to_owned(),
            ..ComponentStatus::default()
        }
    }

    /// With a token bucket's parameters.
    pub fn bucket(mut self, p: &BucketParams) -> Self {
        self.bucket_capacity = Some(p.capacity);
        self.fill_amount = Some(p.fill_amount);
        self.interval_seconds = Some(p.interval as f64 / 1e9);
        self
    }
}
