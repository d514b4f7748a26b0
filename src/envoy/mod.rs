//! The Envoy edge: External Authorization v3 over gRPC.
//!
//! [`request`] reads a CheckRequest as flow labels, [`response`] writes the
//! engine's decision as a CheckResponse, and [`authz`] is the tonic service
//! between them. Requests are decoded with Sluice's own wire-compatible
//! message ([`wire`], from `proto/sluice/ext_authz.proto`): all strings as
//! bytes, so no request is refused for bytes that are not UTF-8, and header
//! values are slices of the request buffer rather than fresh Strings.
//! Responses use Envoy's own types from `envoy-types`.

pub mod authz;
pub mod request;
pub mod response;

/// Sluice's decoding of Envoy's ext_authz messages (generated).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod wire {
    tonic::include_proto!("envoy.service.auth.v3");
}

pub use authz::AuthzService;

impl wire::CheckRequest {
    /// A CheckRequest as Envoy builds one for `method target` with
    /// `headers`: for tests, benchmarks and load generators.
    pub fn http(method: &str, target: &str, headers: &[(&str, &str)]) -> Self {
        let bytes = |s: &str| bytes::Bytes::copy_from_slice(s.as_bytes());
        wire::CheckRequest {
            attributes: Some(wire::AttributeContext {
                request: Some(wire::Request {
                    http: Some(wire::HttpRequest {
                        method: bytes(method),
                        path: bytes(target),
                        protocol: bytes("HTTP/1.1"),
                        scheme: bytes("http"),
                        headers: headers
                            .iter()
                            .map(|(k, v)| wire::StringEntry {
                                key: bytes(k),
                                value: bytes(v),
                            })
                            .collect(),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }
}
