//! The admin HTTP server: `/metrics` (Prometheus text format), `/healthz`
//! (the process is up), `/readyz` (a policy is in force and the Check
//! listener is serving) and `/control-points` (JSON: control points and
//! services seen, with counts).
//!
//! HTTP/1.1 only, on its own listener, so that scraping and probing never
//! share a connection or a queue with Envoy's Checks.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::flow::Engine;
use crate::shutdown::Shutdown;

/// What the admin endpoints read.
pub struct AdminState {
    /// The engine, for metrics and control points.
    pub engine: Arc<Engine>,
    /// Set once the sidecar serves Checks with its policy in force.
    pub ready: AtomicBool,
}

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[derive(Serialize)]
struct ControlPoints {
    control_points: Vec<crate::flow::control_points::ControlPointStat>,
}

/// Answers one admin request.
pub async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
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
        (&Method::GET, "/control-points") => {
            let body = ControlPoints {
                control_points: state.engine.control_points(),
            };
            match serde_json::to_vec_pretty(&body) {
                Ok(json) => respond(StatusCode::OK, "application/json", json),
                Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, e.to_string()),
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/control-points") => {
            respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n")
        }
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let state = state.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.wait() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
