//! The sidecar's admin routes: `/metrics` (Prometheus text format),
//! `/healthz` (the process is up), `/readyz` (a policy is in force and the
//! Check listener is serving), `/control-points` (JSON: control points and
//! services seen, with counts), `GET /v1/preview` (samples of live Checks,
//! `preview.rs`), `GET /v1/status` (every component's live state and the
//! controller subscription), and `POST /v1/logs` (OTLP/HTTP access logs, protobuf
//! encoding). The server they run on is `sluice_runtime::admin`, shared
//! with the controller.

mod preview;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Serialize;
use sluice_engine::Engine;
use sluice_engine::control_points::ControlPointStat;
use sluice_proto::bounded;
use sluice_runtime::admin::{Body, Handler, METRICS, TEXT, answer as respond};

use crate::otlp::{AccessLogs, wire};

/// What the admin endpoints read.
pub struct AdminState {
    /// The engine, for metrics and control points.
    pub engine: Arc<Engine>,
    /// Set once the sidecar serves Checks with its policy in force.
    pub ready: AtomicBool,
    /// Where `POST /v1/logs` records go.
    pub access_logs: AccessLogs,
    /// Largest `POST /v1/logs` body accepted.
    pub max_log_request_bytes: usize,
    /// Whether `POST /v1/logs` is served (`--otlp-http`).
    pub otlp_http: bool,
    /// Whether `GET /v1/preview` is served (`--preview`).
    pub preview: bool,
    /// The subscription to the controller, if there is one.
    pub controller: Option<Arc<crate::control::Link>>,
}

/// `GET /v1/status`: every policy in force with its components' live
/// state, and the controller subscription.
#[derive(Serialize)]
struct Status {
    #[serde(flatten)]
    engine: sluice_engine::status::EngineStatus,
    /// `null` without `--controller`.
    controller: Option<crate::control::LinkStatus>,
}

#[derive(Serialize)]
struct ControlPoints {
    control_points: Vec<ControlPointStat>,
}

/// Answers one admin request.
pub async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            METRICS,
            state.engine.metrics().encode_text(),
        ),
        (&Method::GET, "/healthz") => respond(StatusCode::OK, TEXT, "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.ready.load(Ordering::Acquire) {
                respond(StatusCode::OK, TEXT, "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n")
            }
        }
        (&Method::GET, "/control-points") => json(&ControlPoints {
            control_points: state.engine.control_points(),
        }),
        (&Method::GET, "/v1/preview") => preview::preview(state, req.uri().query()).await,
        (&Method::GET, "/v1/status") => match Query::parse(req.uri().query(), &[]) {
            Ok(_) => json(&Status {
                engine: state.engine.status(),
                controller: state.controller.as_ref().map(|c| c.status()),
            }),
            Err(why) => respond(StatusCode::BAD_REQUEST, TEXT, format!("{why}\n")),
        },
        (&Method::POST, "/v1/logs") if state.otlp_http => otlp_http(state, req).await,
        (&Method::POST, "/v1/logs") => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "OTLP/HTTP logs are off on this sidecar (--otlp-http=false)\n",
        ),
        (
            _,
            "/metrics" | "/healthz" | "/readyz" | "/control-points" | "/v1/logs" | "/v1/preview"
            | "/v1/status",
        ) => respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n"),
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

/// `value` as pretty JSON, 200.
fn json(value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(json) => respond(StatusCode::OK, "application/json", json),
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, e.to_string()),
    }
}

/// The parameters of a query string, each named at most once, none but
/// those allowed: a typo (`controlpoint=`) is an error, not a silent
/// default.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Query, String> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if !allowed.contains(&&*k) {
                let known = if allowed.is_empty() {
                    "this route takes none".to_owned()
                } else {
                    format!("known: {}", allowed.join(", "))
                };
                return Err(format!("unknown parameter {k:?} ({known})"));
            }
            if pairs.iter().any(|(seen, _)| *seen == k) {
                return Err(format!("parameter {k:?} given twice"));
            }
            pairs.push((k.into_owned(), v.into_owned()));
        }
        Ok(Query(pairs))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// OTLP/HTTP logs: a protobuf `ExportLogsServiceRequest` in, a protobuf
/// `ExportLogsServiceResponse` out. JSON and compressed bodies are refused
/// with 415 rather than misread.
async fn otlp_http(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    use http_body_util::{BodyExt, Limited};
    use prost::Message;
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    if !header(header::CONTENT_TYPE).starts_with("application/x-protobuf") {
        return respond(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            TEXT,
            "only Content-Type: application/x-protobuf is accepted (not OTLP JSON)\n",
        );
    }
    if !matches!(header(header::CONTENT_ENCODING).as_str(), "" | "identity") {
        return respond(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            TEXT,
            "compressed bodies are not accepted; send Content-Encoding: identity\n",
        );
    }
    let body = match Limited::new(req.into_body(), state.max_log_request_bytes)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                TEXT,
                format!(
                    "cannot read the body (limit {} bytes): {e}\n",
                    state.max_log_request_bytes
                ),
            );
        }
    };
    let request = match bounded::decode::<wire::ExportLogsServiceRequest>(body) {
        Ok(r) => r,
        Err(e @ bounded::Refused::TooMany { .. }) => {
            return respond(StatusCode::PAYLOAD_TOO_LARGE, TEXT, format!("{e}\n"));
        }
        Err(e) => {
            return respond(
                StatusCode::BAD_REQUEST,
                TEXT,
                format!("not an OTLP ExportLogsServiceRequest: {e}\n"),
            );
        }
    };
    state.access_logs.export(&request).await;
    let response = opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse {
        partial_success: None,
    };
    respond(
        StatusCode::OK,
        "application/x-protobuf",
        response.encode_to_vec(),
    )
}

impl Handler for AdminState {
    fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send + '_>> {
        Box::pin(route(self, req))
    }
}
