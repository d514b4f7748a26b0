//! Sluice's wire types, generated from the repository's `proto/` at build
//! time: the only crate that holds protobuf messages Sluice defines. The
//! sidecar's and the controller's edges translate them to the engine's
//! types; the engine and the policy language never see them.
//!
//! Layout (one module per protocol):
//! - [`ext_authz`]: Envoy's External Authorization v3 `Check`, decoded
//!   leanly: every string as bytes (a request is never refused for bytes
//!   that are not UTF-8) and slices of the request buffer rather than fresh
//!   Strings; the response is Envoy's own `CheckResponse` from `envoy-types`.
//! - [`otlp_logs`]: OTLP `LogsService/Export`, decoded the same way; the
//!   response is `opentelemetry-proto`'s.
//! - [`control`]: the control API between `sluice-controller` and the
//!   sidecars (`proto/sluice/control.proto`).
//! - [`remote_write`]: Prometheus remote-write 1.0's `WriteRequest`.
//!
//! Requests of the ext_authz and OTLP services are decoded through
//! [`bounded`], which counts their repeated fields first.
//!
//! Field numbers of the lean messages match Envoy's and OTLP's, which the
//! tests of the sidecar check against the upstream types.
#![forbid(unsafe_code)]

pub mod bounded;

/// Envoy's ext_authz v3 service and its request, decoded leanly.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod ext_authz {
    tonic::include_proto!("envoy.service.auth.v3");
}

/// OTLP logs' collector service and its request, decoded leanly.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod otlp_logs {
    tonic::include_proto!("opentelemetry.proto.collector.logs.v1");
}

/// The control API's messages and services.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod control {
    tonic::include_proto!("sluice.control.v1");
}

/// Prometheus remote-write 1.0's messages.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod remote_write {
    tonic::include_proto!("prometheus");
}
