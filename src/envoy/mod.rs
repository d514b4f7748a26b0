//! The Envoy edge: External Authorization v3 over gRPC.
//!
//! [`request`] reads a CheckRequest as flow labels, [`response`] writes the
//! engine's decision as a CheckResponse, and [`authz`] is the tonic service
//! between them; [`config`] writes an Envoy bootstrap that sends no more
//! than the policies read (`sluice envoy-config`). Requests are decoded with Sluice's own wire-compatible
//! message ([`wire`], `sluice_proto::ext_authz`): all strings as
//! bytes, so no request is refused for bytes that are not UTF-8, and header
//! values are slices of the request buffer rather than fresh Strings.
//! Responses use Envoy's own types from `envoy-types`.

pub mod authz;
pub mod config;
pub mod request;
pub mod response;

pub use sluice_proto::ext_authz as wire;

pub use authz::AuthzService;
