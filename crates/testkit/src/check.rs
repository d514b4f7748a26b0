//! CheckRequests as Envoy builds them, in Sluice's lean decoding of the
//! message (`sluice_proto::ext_authz`), for tests, benchmarks and load
//! generators.

use bytes::Bytes;
use sluice_proto::ext_authz::{AttributeContext, CheckRequest, HttpRequest, Request, StringEntry};

/// A CheckRequest as Envoy builds one for `method target` with `headers`
/// over HTTP/1.1.
pub fn http(method: &str, target: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let bytes = |s: &str| Bytes::copy_from_slice(s.as_bytes());
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: bytes(method),
                    path: bytes(target),
                    protocol: bytes("HTTP/1.1"),
                    scheme: bytes("http"),
                    headers: headers
                        .iter()
                        .map(|(k, v)| StringEntry {
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
