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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, UdsConnectInfo};
use tonic::transport::{Channel, Endpoint};

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
    /// Connections open at once; beyond, a new one is closed at once, so
    /// that descriptors remain for the admin listener and for Redis.
    pub max_connections: usize,
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

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
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
    /// (only a socket: any other file there is an error).
    pub async fn bind(listen: &Listen) -> std::io::Result<Bound> {
        match listen {
            Listen::Tcp(addr) => Ok(Bound::Tcp(TcpListener::bind(addr).await?)),
            Listen::Unix(path) => {
                use std::os::unix::fs::FileTypeExt as _;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)?;
                }
                Ok(Bound::Unix(UnixListener::bind(path)?))
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

/// What a listener accepts.
trait Acceptor: Send + 'static {
    type Io: Send + 'static;
    fn next(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Acceptor for TcpListener {
    type Io = TcpStream;
    async fn next(&self) -> std::io::Result<TcpStream> {
        let (tcp, _) = self.accept().await?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

impl Acceptor for UnixListener {
    type Io = UnixStream;
    async fn next(&self) -> std::io::Result<UnixStream> {
        Ok(self.accept().await?.0)
    }
}

/// Serves `router` on `listener`, over TLS when `tls` is given (TCP only),
/// with at most `max_connections` open, until `shutdown` fires; calls in
/// progress then finish. An error of the server itself is logged: the
/// process's other listeners go on.
pub async fn serve(
    router: Router,
    listener: Bound,
    tls: Option<Arc<ServerTls>>,
    max_connections: usize,
    shutdown: Shutdown,
) {
    let mut stop = shutdown.clone();
    let stopped = async move { stop.wait().await };
    let served = match (listener, tls) {
        (Bound::Tcp(listener), None) => {
            let plain = accepted(listener, max_connections, shutdown, |tcp| async { Ok(tcp) });
            router.serve_with_incoming_shutdown(plain, stopped).await
        }
        (Bound::Tcp(listener), Some(tls)) => {
            let secured = accepted(listener, max_connections, shutdown, move |tcp| {
                let tls = tls.clone();
                async move { tls.accept(tcp).await }
            });
            router.serve_with_incoming_shutdown(secured, stopped).await
        }
        (Bound::Unix(listener), tls) => {
            if tls.is_some() {
                tracing::warn!(
                    "TLS is not served on a Unix socket: the socket's permissions guard it"
                );
            }
            let local = accepted(listener, max_connections, shutdown, |uds| async { Ok(uds) });
            router.serve_with_incoming_shutdown(local, stopped).await
        }
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Connections accepted on `listener` once `handshake` (TLS, or nothing)
/// is done, at most `max_connections` at once. Each handshake runs in its
/// own task, so a client that stalls in it holds up nobody else (TLS cuts
/// it off after [`HANDSHAKE_TIMEOUT`](crate::tls::HANDSHAKE_TIMEOUT)). A
/// failed handshake (no client certificate, an untrusted one, plain text)
/// is logged at debug level: anyone can cause one.
fn accepted<L, I, F, Fut>(
    listener: L,
    max_connections: usize,
    mut shutdown: Shutdown,
    handshake: F,
) -> ReceiverStream<Result<Conn<I>, std::io::Error>>
where
    L: Acceptor,
    I: Send + 'static,
    F: Fn(L::Io) -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<I>> + Send + 'static,
{
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        let mut said_full = false;
        loop {
            let io = tokio::select! {
                accepted = listener.next() => match accepted {
                    Ok(io) => io,
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
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if !std::mem::replace(&mut said_full, true) {
                    tracing::warn!(
                        max_connections,
                        "gRPC connections at their limit: new ones are closed"
                    );
                }
                drop(io);
                continue;
            };
            said_full = false;
            let handshake = handshake(io);
            let ready = ready.clone();
            tokio::spawn(async move {
                match handshake.await {
                    Ok(io) => {
                        let _ = ready.send(Ok(Conn { io, _slot: slot })).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "gRPC handshake failed"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// An accepted connection, holding its place among `max_connections`
/// until it closes.
pub struct Conn<I> {
    io: I,
    _slot: OwnedSemaphorePermit,
}

impl<I: AsyncRead + Unpin> AsyncRead for Conn<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Conn<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Conn<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl Connected for Conn<UnixStream> {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.io.connect_info()
    }
}

impl Connected for Conn<TlsStream<TcpStream>> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.get_ref().0.connect_info()
    }
}
