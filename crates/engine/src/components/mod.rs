//! The components of a policy, one file per kind, in the order a flow
//! meets them (the schedulers, which can make a flow wait, are in
//! `crate::schedulers`).
//!
//! - [`selector`]: which flows a component applies to (control point,
//!   service, label matcher); every component has selectors;
//! - [`classifier`]: adds labels from headers, the path, a JSON body, a JWT;
//! - [`flux_meter`]: a histogram of what the flow's access log reports;
//! - [`sampler`]: accepts a share of flows;
//! - [`rate_limiter`]: token buckets;
//! - [`concurrency_limiter`]: flows in flight;
//! - [`lease`]: how long a controller's value holds in a component it
//!   drives.

pub mod classifier;
pub mod concurrency_limiter;
pub mod flux_meter;
pub mod lease;
pub mod rate_limiter;
pub mod sampler;
pub mod selector;
