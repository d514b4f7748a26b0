//! The gRPC server settings Sluice serves with: the sidecar's Check and
//! access-log listener, the controller's control API, and the load tests'
//! no-op Check server, which must measure the same stack.

use std::time::Duration;

use tokio::net::TcpListener;

/// The tonic server, with HTTP/2 keep-alive pings so that a peer that
/// vanished is noticed.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder().http2_keepalive_interval(Some(Duration::from_secs(30)))
}

/// Connections accepted on `listener`, with Nagle off: answers are small and
/// the peer waits for each.
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves `router` on `listener` until `shutdown` fires; calls in progress
/// then finish. An error of the server itself is logged: the process's
/// other listeners go on.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    mut shutdown: crate::shutdown::Shutdown,
) {
    let stopped = async move { shutdown.wait().await };
    if let Err(e) = router
        .serve_with_incoming_shutdown(incoming(listener), stopped)
        .await
    {
        tracing::error!(error = %e, "gRPC server failed");
    }
}
