//! The ext_authz v3 Check service.

use std::borrow::Cow;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use tonic::{Request, Response, Status};

use super::request::{CheckView, text};
use super::response;
use super::wire::CheckRequest;
use super::wire::authorization_server::{Authorization, AuthorizationServer};
use crate::flow::{Engine, FlowRequest};

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

    /// Decides one request. Synchronous: nothing here waits.
    pub fn decide(&self, control_point: Option<&str>, request: &CheckRequest) -> CheckResponse {
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
        self.engine
            .decide(flow, |decision| response::build(decision, &view))
    }
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let control_point = request
            .metadata()
            .get(CONTROL_POINT_KEY)
            .and_then(|v| v.to_str().ok());
        Ok(Response::new(self.decide(control_point, request.get_ref())))
    }
}
