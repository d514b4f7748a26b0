//! The ext_authz v3 Check service.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_runtime::shutdown::Shutdown;

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
    /// Fires when the sidecar stops: Checks waiting in a scheduler queue
    /// are then answered at once rather than cut when the grace period
    /// ends.
    draining: Option<Shutdown>,
    /// Checks answered that way.
    drained: Arc<AtomicU64>,
}

impl AuthzService {
    /// A service deciding with `engine`.
    pub fn new(engine: Arc<Engine>, default_control_point: &str, default_service: &str) -> Self {
        AuthzService {
            engine,
            default_control_point: default_control_point.into(),
            default_service: default_service.into(),
            draining: None,
            drained: Arc::default(),
        }
    }

    /// This service, answering Checks that wait in a queue with gRPC
    /// `UNAVAILABLE` as soon as `draining` fires, so that Envoy applies its
    /// `failure_mode_allow` to them before the process ends, instead of
    /// seeing the connection cut.
    pub fn draining_on(mut self, draining: Shutdown) -> Self {
        self.draining = Some(draining);
        self
    }

    /// How many waiting Checks were answered because the sidecar stopped.
    pub fn drained(&self) -> Arc<AtomicU64> {
        self.drained.clone()
    }

    /// The tonic server for this service, accepting requests up to
    /// `max_request_bytes`.
    pub fn into_server(self, max_request_bytes: usize) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self).max_decoding_message_size(max_request_bytes)
    }

    /// Decides one request. Most are decided without waiting; a flow a
    /// scheduler queues waits here (a parked future) at most until
    /// `grpc_timeout`, Envoy's deadline for the answer, or until the
    /// sidecar stops (then `UNAVAILABLE`).
    pub async fn decide(
        &self,
        control_point: Option<&str>,
        request: &CheckRequest,
        grpc_timeout: Option<Duration>,
    ) -> Result<CheckResponse, Status> {
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
        let Some(waiting) = waiting else {
            return Ok(response);
        };
        let mut draining = self.draining.clone();
        let stopping = async {
            match draining.as_mut() {
                Some(d) => d.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            waited = waiting.run(&self.engine, grpc_timeout) => Ok(match waited {
                Ok(()) => response,
                Err(refusal) => response::refused_after_waiting(&refusal),
            }),
            () = stopping => {
                // The queued flow is dropped: its place and any capacity it
                // held are given back.
                self.drained.fetch_add(1, Ordering::Relaxed);
                Err(Status::unavailable("sluice is stopping"))
            }
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
        self.decide(control_point, request.get_ref(), timeout)
            .await
            .map(Response::new)
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
