//! The admin HTTP server both binaries serve `/metrics`, `/healthz` and
//! `/readyz` on: HTTP/1.1 only, on its own listener, so that scraping and
//! probing never share a connection or a queue with the gRPC traffic. What
//! each path answers is the binary's [`Handler`].

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::conns::{self, Activity, ConnLimits};
use crate::shutdown::Shutdown;
use crate::tls::ServerTls;

/// The body of every admin answer: small and complete.
pub type Body = Full<Bytes>;

/// `Content-Type` of plain-text answers.
pub const TEXT: &str = "text/plain; charset=utf-8";
/// `Content-Type` of the Prometheus text exposition format.
pub const METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answers admin requests; the sidecar's routes and the controller's are
/// two.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send + '_>>;
}

/// An answer with `status`, `content_type` and `body`.
pub fn answer(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Longest a client may take to send a request's headers: one that
/// dribbles them holds a connection, so it is cut off.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The admin listener's connections: Prometheus keeps one per scrape
/// target and the kubelet opens one per probe, so a few hundred is plenty,
/// and one idle for longer than any scrape interval is a leftover.
pub const CONNECTIONS: ConnLimits = ConnLimits {
    max_connections: 256,
    idle_timeout: std::time::Duration::from_secs(300),
};

/// Serves `handler` on `listener` (HTTP/1.1, keep-alive), over TLS when
/// `tls` is given, within [`CONNECTIONS`], until `shutdown` fires;
/// connections open then finish their request and close.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    tls: Option<Arc<ServerTls>>,
    shutdown: Shutdown,
) {
    let stop = shutdown.clone();
    conns::accept(listener, CONNECTIONS, "admin", stop, move |io| {
        let (handler, tls, shutdown) = (handler.clone(), tls.clone(), shutdown.clone());
        let activity = io.activity().clone();
        tokio::spawn(async move {
            match tls {
                None => connection(io, activity, handler, shutdown).await,
                Some(tls) => match tls.accept(io).await {
                    Ok(conn) => connection(conn, activity, handler, shutdown).await,
                    Err(e) => tracing::debug!(error = %e, "admin TLS handshake failed"),
                },
            }
        });
    })
    .await;
}

/// One connection, until it closes or `shutdown` fires.
async fn connection<I>(
    io: I,
    activity: Arc<Activity>,
    handler: Arc<dyn Handler>,
    mut shutdown: Shutdown,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let handler = handler.clone();
        let in_flight = activity.begin();
        async move {
            let answer = handler.handle(req).await;
            drop(in_flight);
            Ok::<_, Infallible>(answer)
        }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
