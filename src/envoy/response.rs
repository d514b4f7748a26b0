//! The engine's decision as Envoy's CheckResponse.
//!
//! Accept: `OkHttpResponse`, adding the telemetry classifier labels to the
//! request's `baggage` header. Reject: `DeniedHttpResponse` with the
//! rejecting component's status, `retry-after` in whole seconds (rounded up)
//! when the wait is known, `x-sluice-rejected-by: <policy>/<component>` and a
//! one-line body. Both carry dynamic metadata `sluice.flow` when the flow's
//! access log will be read (it holds slots, names flux meters, or teaches
//! a scheduler its latency), and none otherwise: Envoy then stores and
//! logs nothing for it.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;

use super::request::CheckView;
use sluice_engine::labels::percent_encode_into;
use sluice_engine::waiting::Refused;
use sluice_engine::{Decision, RejectReason};

/// The dynamic metadata key (under the ext_authz filter's namespace).
pub const FLOW_METADATA_KEY: &str = "sluice.flow";
/// The header naming the component that rejected a request.
pub const REJECTED_BY_HEADER: &str = "x-sluice-rejected-by";

/// gRPC status codes (google.rpc.Code) used in the answer's `status`. Envoy
/// only checks for OK; the others make rejections readable in Envoy's logs.
const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNAVAILABLE: i32 = 14;

fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// `retry-after` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The request's `baggage` with the decision's telemetry labels merged in
/// (replacing members of the same name); `None` when there is nothing to add.
fn baggage(decision: &Decision<'_>, view: &CheckView<'_>) -> Option<String> {
    let mut added = decision.baggage().peekable();
    added.peek()?;
    let mut out = String::with_capacity(64);
    if let Some(existing) = view.header("baggage") {
        let existing = String::from_utf8_lossy(existing);
        for member in existing.split(',') {
            let key = member.split(['=', ';']).next().unwrap_or_default().trim();
            // Few labels: scanning them again beats collecting them.
            if key.is_empty() || decision.baggage().any(|(k, _)| k == key) {
                continue;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(member.trim());
        }
    }
    for (key, value) in decision.baggage() {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(key);
        out.push('=');
        percent_encode_into(&mut out, value);
    }
    Some(out)
}

/// Builds the CheckResponse for a decision.
pub fn build(decision: &Decision<'_>, view: &CheckView<'_>) -> CheckResponse {
    let metadata = decision.metadata();
    match &decision.rejection {
        None => {
            let headers = baggage(decision, view)
                .map(|b| vec![header("baggage", b)])
                .unwrap_or_default();
            respond(
                OK,
                HttpResponse::OkResponse(OkHttpResponse {
                    headers,
                    ..Default::default()
                }),
                metadata,
            )
        }
        Some(r) => denied(
            &format!("{}/{}", r.policy, r.component),
            r.reason,
            r.status,
            r.retry_after,
            metadata,
        ),
    }
}

/// The CheckResponse for a flow refused after it waited (for the store, or
/// in a scheduler's queue).
pub fn refused_after_waiting(refusal: &Refused) -> CheckResponse {
    denied(
        &format!("{}/{}", refusal.policy, refusal.component),
        refusal.reason,
        refusal.status,
        refusal.retry_after,
        refusal.metadata.clone(),
    )
}

/// A denial by component `by` (`policy/component`).
fn denied(
    by: &str,
    reason: RejectReason,
    status: u16,
    retry_after: Option<Duration>,
    metadata: Option<String>,
) -> CheckResponse {
    let mut headers = Vec::with_capacity(3);
    if let Some(wait) = retry_after {
        headers.push(header("retry-after", retry_after_secs(wait).to_string()));
    }
    headers.push(header("content-type", "text/plain".to_owned()));
    headers.push(header(REJECTED_BY_HEADER, by.to_owned()));
    let code = match status {
        429 => RESOURCE_EXHAUSTED,
        503 => UNAVAILABLE,
        _ => PERMISSION_DENIED,
    };
    respond(
        code,
        HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers,
            body: format!("rejected by {by}: {}\n", reason.describe()),
        }),
        metadata,
    )
}

/// The answer; with `sluice.flow` dynamic metadata only when the flow's
/// access log will be read (`Decision::metadata`).
fn respond(code: i32, http_response: HttpResponse, metadata: Option<String>) -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status {
            code,
            ..Default::default()
        }),
        http_response: Some(http_response),
        dynamic_metadata: metadata.map(|m| Struct {
            fields: HashMap::from([(
                FLOW_METADATA_KEY.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(m)),
                },
            )]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(200)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
