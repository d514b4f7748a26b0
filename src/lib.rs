//! Sluice: a flow-control sidecar for Envoy and Istio.
//!
//! Envoy asks Sluice, on every request, whether the request may pass now
//! (External Authorization v3, gRPC); Sluice decides locally from its
//! policies and answers in microseconds. Envoy's OpenTelemetry access
//! logger then reports how the request went; Sluice observes it in flux
//! meters, returns its concurrency slots, and remote-writes the histograms
//! to Prometheus.
//!
//! This crate is the sidecar's edges around the decision engine
//! (`sluice-engine`), which never sees a protobuf: each edge translates its
//! protocol to the engine's types and back (`docs/architecture.md` has the
//! map of the whole workspace). Layout, following a flow from the edge
//! inwards:
//!
//! - [`envoy`]: the ext_authz Check service: a CheckRequest read as the
//!   engine's flow labels, the engine's decision written as a
//!   CheckResponse.
//! - [`otlp`]: the access-log edge (OTLP logs over gRPC and HTTP), turning
//!   log records into the engine's flow ends.
//! - [`control`]: the subscription to `sluice-controller`, turning its
//!   decisions into the engine's.
//! - [`admin`]: the admin routes (`/metrics`, `/healthz`, `/readyz`,
//!   `/control-points`, `GET /v1/preview`, `POST /v1/logs`).
//! - [`telemetry`]: the sidecar's own metrics and Prometheus remote-write.
//! - [`server`]: wires the above into a running sidecar; [`cli`] is the
//!   command line on top, [`inspect`] the commands that ask a running
//!   sidecar (`sluice preview`, `sluice status`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod cli;
pub mod control;
pub mod envoy;
pub mod inspect;
pub mod otlp;
pub mod server;
pub mod telemetry;
