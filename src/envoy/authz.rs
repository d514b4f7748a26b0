//! The ext_authz v3 Check service.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use tonic::{Request, Response, Status};

use super::request::{CheckView, text};
use super::response;
use super::wire::CheckRequest;
use super::wire::authorization_server::{Authorization, AuthorizationServer};
use sluice_engine::{Engine, FlowRequest};

/// gRPC metadata (from Envoy's `grpc_service.initial_metadata`) and context
/// extension naming the control point.
pub const CONTROL_POINT_KEY: &str = "control-point";
/// Context extension naming the service.
pub const SERVICE_KEY: &str = "service";

/// Answers Envoy's Checks with the engine's decisions.
#[derive(Clone)]
pub struct AuthzService {
    /// The engine.
    engine: Arc<Engine>,
    /// Control point when the request names none (`--default-control-point`).
    default_control_point: Arc<str>,
    /// Service when the request names none (`--service`, else `any`).
    default_service: Arc<str>,
}

impl AuthzService {
    /// A service deciding with `engine`.
    pub fn new(engine: Arc<Engine>, default_control_point: &str, default_service: &str) -> Self {
        AuthzService {
            engine,
            default_control_point: default_control_point.into(),
            default_service: default_service.into(),
        }
    }

    /// The tonic server for this service, accepting requests up to
    /// `max_request_bytes`.
    pub fn into_server(self, max_request_bytes: usize) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self).max_decoding_message_size(max_request_bytes)
    }

    /// Decides one request. Most are decided without waiting; a flow a
    /// scheduler queues waits here (a parked future) at most until
    /// `grpc_timeout`, Envoy's deadline for the answer.
    pub async fn decide(
        &self,
        control_point: Option<&str>,
        request: &CheckRequest,
        grpc_timeout: Option<Duration>,
    ) -> CheckResponse {
        let extension = |key: &str| -> Option<Cow<'_, str>> {
            let attrs = request.attributes.as_ref()?;
            attrs
                .context_extensions
                .iter()
                .find(|e| &e.key[..] == key.as_bytes())
                .map(|e| text(&e.value))
        };
        let cp_extension;
        let control_point = match control_point {
            Some(cp) if !cp.is_empty() => cp,
            _ => {
                cp_extension = extension(CONTROL_POINT_KEY);
                cp_extension
                    .as_deref()
                    .unwrap_or(&self.default_control_point)
            }
        };
        let service_extension = extension(SERVICE_KEY);
        let service = service_extension
            .as_deref()
            .unwrap_or(&self.default_service);

        let view = CheckView::new(request);
        let flow = FlowRequest {
            control_point,
            service,
            labels: &view,
        };
        let (response, waiting) = self.engine.decide(flow, |mut decision| {
            let waiting = decision.waiting.take();
            (response::build(&decision, &view), waiting)
        });
        match waiting {
            None => response,
            Some(waiting) => match waiting.run(&self.engine, grpc_timeout).await {
                Ok(()) => response,
                Err(refusal) => response::refused_after_waiting(&refusal),
            },
        }
    }
}

/// Envoy's deadline for the answer, from the `grpc-timeout` header
/// (gRPC over HTTP/2: up to 8 digits and a unit, `H`, `M`, `S`, `m`, `u`,
/// `n`). `None` when absent or malformed.
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let metadata = request.metadata();
        let control_point = metadata
            .get(CONTROL_POINT_KEY)
            .and_then(|v| v.to_str().ok());
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        Ok(Response::new(
            self.decide(control_point, request.get_ref(), timeout).await,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("250000u"), Some(Duration::from_millis(250)));
        assert_eq!(
            grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "5", "5x", "-5m", "123456789m", "1.5S", "5 m"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
