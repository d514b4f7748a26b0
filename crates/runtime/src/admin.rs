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

/// Serves `handler` on `listener` (HTTP/1.1, keep-alive), over TLS when
/// `tls` is given, until `shutdown` fires; connections open then finish
/// their request and close.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    tls: Option<Arc<ServerTls>>,
    mut shutdown: Shutdown,
) {
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
        let (handler, tls, shutdown) = (handler.clone(), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            match tls {
                None => connection(stream, handler, shutdown).await,
                Some(tls) => match tls.accept(stream).await {
                    Ok(conn) => connection(conn, handler, shutdown).await,
                    Err(e) => tracing::debug!(error = %e, "admin TLS handshake failed"),
                },
            }
        });
    }
}

/// One connection, until it closes or `shutdown` fires.
async fn connection<I>(io: I, handler: Arc<dyn Handler>, mut shutdown: Shutdown)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler.handle(req).await) }
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
