//! The gRPC server settings Sluice serves with: the sidecar's Check and
//! access-log listener, the controller's control API, and the load tests'
//! no-op Check server, which must measure the same stack.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::shutdown::Shutdown;
use crate::tls::{self, CertKey, ServerTls, TlsConn};

/// Longest a gRPC client waits for a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a gRPC client talks TLS to an `https://` server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CAs to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// The client certificate to present (mTLS).
    pub identity: Option<CertKey>,
}

/// A channel to `url`: plain text for `http://`, TLS for `https://` (never
/// plain text: a server that does not speak TLS there is an error). The
/// files are read on every call, so a reconnect picks up rotated ones.
pub async fn connect(url: &http::Uri, tls: &ClientTls) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from(url.clone())
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    match url.scheme_str() {
        Some("http") => Ok(endpoint.connect().await?),
        Some("https") => {
            let config = tls::client_config(tls.ca_file.as_deref(), tls.identity.as_ref(), &[])?;
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .enable_http2()
                .wrap_connector(crate::http_client::tcp_connector(CONNECT_TIMEOUT));
            Ok(endpoint.connect_with_connector(connector).await?)
        }
        _ => anyhow::bail!("{url}: expected an http:// or https:// URL"),
    }
}

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

/// Serves `router` on `listener`, over TLS when `tls` is given, until
/// `shutdown` fires; calls in progress then finish. An error of the server
/// itself is logged: the process's other listeners go on.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    shutdown: Shutdown,
) {
    let mut stop = shutdown.clone();
    let stopped = async move { stop.wait().await };
    let served = match tls {
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener), stopped)
                .await
        }
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls_incoming(listener, tls, shutdown), stopped)
                .await
        }
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Connections accepted on `listener` once their TLS handshake is done.
/// Each handshake runs in its own task, so a client that stalls in it
/// holds up nobody else, and is cut off after
/// [`HANDSHAKE_TIMEOUT`](crate::tls::HANDSHAKE_TIMEOUT). A failed handshake
/// (no client certificate, an untrusted one, plain text) is logged at debug
/// level: anyone can cause one.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    mut shutdown: Shutdown,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors and the like: back off.
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.wait() => return,
                _ = ready.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (tls, ready) = (tls.clone(), ready.clone());
            tokio::spawn(async move {
                match tls.accept(tcp).await {
                    Ok(conn) => {
                        let _ = ready.send(Ok(conn)).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}
