//! The gRPC server settings Sluice serves with: the sidecar's Check and
//! access-log listener, the controller's control API, and the load tests'
//! no-op Check server, which must measure the same stack.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint};

use crate::conns::{self, Acceptor, Activity, ConnLimits, Watched};
use crate::grpc_guard::{Budget, GuardLayer};
use crate::shutdown::Shutdown;
use crate::tls::{self, CertKey, ServerTls, TlsStream};

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

/// The bounds of a gRPC listener, each a flag of the binary that serves it
/// (docs/security.md lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once. At the limit, the connection idle longest
    /// is closed for a new one; with none idle, the new one is closed, so
    /// that descriptors remain for the admin listener and for Redis.
    pub max_connections: usize,
    /// A connection without a request for this long is closed. Longer than
    /// Envoy's own idle timeout for upstream connections (1 h), so that in
    /// normal operation Envoy is the one to close them.
    pub idle_timeout: Duration,
    /// Requests in flight on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Longest a request may take, from its first byte to its answer: a
    /// client that stalls mid-message is cut off. It must exceed the
    /// longest `queue_timeout` of the policies (Envoy's own Check timeout
    /// is far shorter).
    pub request_timeout: Duration,
    /// Bytes of request bodies received but not yet whole, over all
    /// connections ([`grpc_guard`](crate::grpc_guard)).
    pub max_buffered_request_bytes: usize,
}

impl Limits {
    /// The bounds on the listener's connections.
    pub fn connections(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(2 * 3600),
            max_concurrent_streams: 1024,
            request_timeout: Duration::from_secs(30),
            max_buffered_request_bytes: 64 << 20,
        }
    }
}

/// The layers every request passes.
pub type Layers = tower::layer::util::Stack<GuardLayer, tower::layer::util::Identity>;
/// The tonic server with Sluice's settings.
pub type Server = tonic::transport::Server<Layers>;
/// Its router.
pub type Router = tonic::transport::server::Router<Layers>;

/// The tonic server within `limits`, with HTTP/2 keep-alive pings so that
/// a peer that vanished is noticed, and [`Guard`](crate::grpc_guard::Guard)
/// in front of every service.
pub fn server(limits: &Limits) -> Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .timeout(limits.request_timeout)
        .layer(GuardLayer::new(Budget::new(
            limits.max_buffered_request_bytes,
        )))
}

/// Where a gRPC listener listens: a TCP address, or a Unix domain socket
/// (`unix:/path`), which in a pod only containers sharing its volume reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// `host:port`.
    Tcp(SocketAddr),
    /// `unix:/path/to/socket`.
    Unix(PathBuf),
}

impl Listen {
    /// The TCP address, if it is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Listen::Tcp(addr) => Some(*addr),
            Listen::Unix(_) => None,
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path".to_owned()),
            Some(path) => Ok(Listen::Unix(PathBuf::from(path))),
            None => s
                .parse()
                .map(Listen::Tcp)
                .map_err(|_| format!("expected host:port or unix:/path, got {s:?}")),
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The permissions of a gRPC listener's Unix socket: owner and group.
pub const SOCKET_MODE: u32 = 0o660;

/// A bound gRPC listener.
#[derive(Debug)]
pub enum Bound {
    /// On TCP.
    Tcp(TcpListener),
    /// On a Unix domain socket.
    Unix(UnixListener),
}

impl Bound {
    /// Binds `listen`. A socket file left by an earlier run is replaced
    /// (only a socket: any other file there is an error). A socket is made
    /// `0660`: connecting takes write permission on it, and in a pod the
    /// proxy runs as another user than Sluice, so the two share a group
    /// (the pod's `fsGroup`, which owns the shared volume); others may not
    /// connect.
    pub async fn bind(listen: &Listen) -> std::io::Result<Bound> {
        match listen {
            Listen::Tcp(addr) => Ok(Bound::Tcp(TcpListener::bind(addr).await?)),
            Listen::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)?;
                }
                let listener = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
                Ok(Bound::Unix(listener))
            }
        }
    }

    /// The TCP address it is bound to (the real port when asked for 0);
    /// `None` on a Unix socket.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok(),
            Bound::Unix(_) => None,
        }
    }
}

/// Serves `router` on `listener`, over TLS when `tls` is given (TCP only),
/// within `limits`' connections, until `shutdown` fires; calls in progress
/// then finish. An error of the server itself is logged: the process's
/// other listeners go on.
pub async fn serve(
    router: Router,
    listener: Bound,
    tls: Option<Arc<ServerTls>>,
    limits: ConnLimits,
    shutdown: Shutdown,
) {
    let mut stop = shutdown.clone();
    let stopped = async move { stop.wait().await };
    let served = match (listener, tls) {
        (Bound::Tcp(listener), None) => {
            let plain = accepted(listener, limits, shutdown, |tcp| async { Ok(tcp) });
            router.serve_with_incoming_shutdown(plain, stopped).await
        }
        (Bound::Tcp(listener), Some(tls)) => {
            let secured = accepted(listener, limits, shutdown, move |tcp| {
                let tls = tls.clone();
                async move { tls.accept(tcp).await.map(Secured) }
            });
            router.serve_with_incoming_shutdown(secured, stopped).await
        }
        (Bound::Unix(listener), tls) => {
            if tls.is_some() {
                tracing::warn!(
                    "TLS is not served on a Unix socket: the socket's permissions guard it"
                );
            }
            let local = accepted(listener, limits, shutdown, |uds| async { Ok(uds) });
            router.serve_with_incoming_shutdown(local, stopped).await
        }
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Connections accepted on `listener` within `limits` once `handshake`
/// (TLS, or nothing) is done. Each handshake runs in its own task, so a
/// client that stalls in it holds up nobody else (TLS cuts it off after
/// [`HANDSHAKE_TIMEOUT`](crate::tls::HANDSHAKE_TIMEOUT)). A failed
/// handshake (no client certificate, an untrusted one, plain text) is
/// logged at debug level: anyone can cause one.
fn accepted<L, I, F, Fut>(
    listener: L,
    limits: ConnLimits,
    shutdown: Shutdown,
    handshake: F,
) -> ReceiverStream<Result<I, std::io::Error>>
where
    L: Acceptor,
    I: Send + 'static,
    F: Fn(Watched<L::Io>) -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<I>> + Send + 'static,
{
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    let closed = ready.clone();
    tokio::spawn(async move {
        let accepting = conns::accept(listener, limits, "gRPC", shutdown, move |io| {
            let handshake = handshake(io);
            let ready = ready.clone();
            tokio::spawn(async move {
                match handshake.await {
                    Ok(io) => {
                        let _ = ready.send(Ok(io)).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "gRPC handshake failed"),
                }
            });
        });
        tokio::select! {
            _ = accepting => {}
            _ = closed.closed() => {}
        }
    });
    ReceiverStream::new(incoming)
}

/// What a gRPC request knows of its connection (tonic puts it in the
/// request's extensions): the peer's address, and where the connection's
/// use is counted.
#[derive(Clone, Debug)]
pub struct Peer {
    tcp: Option<TcpConnectInfo>,
    activity: Arc<Activity>,
}

impl Peer {
    /// The peer's address (none on a Unix socket).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(TcpConnectInfo::remote_addr)
    }

    /// Where requests on the connection are counted.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

/// The peer's address of a request served by [`serve`].
pub fn remote_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request.extensions().get::<Peer>()?.remote_addr()
}

impl Connected for Watched<TcpStream> {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        Peer {
            tcp: Some(self.get_ref().connect_info()),
            activity: self.activity().clone(),
        }
    }
}

impl Connected for Watched<UnixStream> {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        Peer {
            tcp: None,
            activity: self.activity().clone(),
        }
    }
}

/// A TLS connection of a gRPC listener. (A type of this crate, so that it
/// can say what tonic is to know of it.)
pub struct Secured(TlsStream<Watched<TcpStream>>);

impl Connected for Secured {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for Secured {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Secured {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
