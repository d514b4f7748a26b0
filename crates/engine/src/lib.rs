//! Sluice's decision engine: what happens to a flow between Envoy's Check
//! and the answer, and when its access log arrives.
//!
//! The engine never sees a protobuf, a socket or a file: the sidecar's
//! edges hand it a [`FlowRequest`] over a [`LabelSource`] (a view of the
//! request they decoded), or a [`FlowEnd`] (an access-log record), and
//! translate the [`Decision`] back. It compiles the policy language
//! (`sluice-policy`) into a [`Plan`], keeps its state in memory (global
//! components: in a [`store`] it sees only as a trait), reads time from one
//! injectable [`Clock`](sluice_time::Clock), and uses tokio only for what a
//! waiting Check needs (a oneshot channel, a pump task that sleeps until
//! the next deadline, tasks that ask the store), so it is tested without a
//! network on simulated time.
//!
//! Layout, in the order a reader follows a flow:
//!
//! - [`engine`]: [`Engine`], the whole life of a flow (`install`, `decide`,
//!   `end_flow`, `apply`, `sweep`), with the stage order;
//! - [`decision`]: what goes in and out ([`FlowRequest`], [`Decision`],
//!   [`Rejection`], [`RejectReason`]);
//! - [`labels`]: a flow's labels, read lazily from the edge's request view,
//!   with what classifiers add;
//! - [`plan`]: the compiled policy set, indexed by control point;
//! - [`components`]: one file per component kind (selectors, classifiers,
//!   flux meters, samplers, rate limiters, concurrency limiters);
//! - [`schedulers`]: stage 6 (concurrency, quota and load schedulers over
//!   one weighted-fair queue);
//! - [`waiting`]: a flow that must wait (for the store, or in a scheduler's
//!   queue), as the steps it has left;
//! - [`store`]: the shared store `scope: global` components keep their
//!   state in, as a trait (`sluice-store` implements it on Redis), and
//!   [`leases`]: tokens leased from its buckets, spent locally;
//! - [`admission`]: what a flow took (tokens, slots) as values that give it
//!   back when dropped;
//! - [`flow_end`]: the access log's side: the record's attributes, the
//!   `sluice.flow` metadata that names the flow, and the in-flight table of
//!   slots held until the log arrives;
//! - [`control`]: a controller's decisions, as the engine applies them;
//! - [`reads`]: what a policy set reads of requests and access logs, for
//!   `sluice envoy-config`;
//! - [`status`]: what is in force now, component by component, for
//!   `GET /v1/status`;
//! - [`preview`]: live samples of what the engine saw and decided, for
//!   `GET /v1/preview`;
//! - building blocks: [`token_bucket`], [`label_table`] (bounded state per
//!   label value), [`control_points`] (what `/control-points` shows);
//! - [`metrics`]: the engine's metrics, each component owning its series.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod components;
pub mod control;
pub mod control_points;
pub mod decision;
pub mod engine;
pub mod flow_end;
pub mod label_table;
pub mod labels;
pub mod leases;
pub mod metrics;
pub mod plan;
pub mod preview;
pub mod reads;
pub mod schedulers;
pub mod status;
pub mod store;
pub mod token_bucket;
pub mod waiting;

pub use decision::{Decision, FlowRequest, RejectReason, Rejection};
pub use engine::{EndOutcome, Engine, EngineOptions, InstallError};
pub use flow_end::FlowEnd;
pub use labels::{FlowLabels, LabelRef, LabelSource, MapLabels};
pub use metrics::Metrics;
pub use plan::Plan;

#[cfg(test)]
mod global_tests;
#[cfg(test)]
mod tests;
