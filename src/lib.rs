//! Sluice: a flow-control sidecar for Envoy and Istio.
//!
//! Envoy asks Sluice, on every request, whether the request may pass now
//! (External Authorization v3, gRPC); Sluice decides locally from its
//! policies and answers in microseconds. Envoy's OpenTelemetry access
//! logger then reports how the request went; Sluice observes it in flux
//! meters, returns its concurrency slots, and remote-writes the histograms
//! to Prometheus.
//!
//! Layout, following a flow from the edge inwards:
//!
//! - [`envoy`]: the ext_authz Check service. Translates Envoy's protobufs to
//!   the engine's [`flow::FlowRequest`] and the engine's [`flow::Decision`]
//!   back; nothing else in the crate sees a protobuf.
//! - [`otlp`]: the access-log edge (OTLP logs over gRPC and HTTP), turning
//!   log records into [`flow::flow_end::FlowEnd`]s.
//! - [`flow`]: the decision engine, one file per component kind
//!   (selectors, classifiers, flux meters, samplers, rate limiters,
//!   concurrency limiters), run in the stage order of DESIGN.md over a
//!   compiled [`flow::Plan`], and the flow's end.
//! - [`policy`]: the policy language (YAML), its validation with
//!   file/line/field errors, and hot reload.
//! - [`telemetry`]: the sidecar's own metrics (Aperture's names) and
//!   Prometheus remote-write.
//! - [`admin`]: the HTTP admin server (`/metrics`, `/healthz`, `/readyz`,
//!   `/control-points`).
//! - [`server`]: wires the above into a running sidecar; [`cli`] is the
//!   command line on top.
//! - [`clock`]: the one injectable clock.
//! - [`harness`]: starts real Envoy, an upstream and Sluice on loopback for
//!   the tests and the demo.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod control;
pub mod controller;
pub mod envoy;
pub mod flow;
pub mod harness;
pub mod http_client;
pub mod otlp;
pub mod policy;
pub mod server;
pub mod shutdown;
pub mod telemetry;
