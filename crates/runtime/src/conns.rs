//! The connections of a listener: at most so many open, each watched for
//! requests, idle ones closed, and the longest-idle one closed first when a
//! new one arrives at the limit.
//!
//! A client that opens connections and sends nothing (or stops sending)
//! would otherwise hold them, and their descriptors, for good: HTTP/2
//! keep-alive pings are answered by any live peer, so they prove nothing
//! about use. Here a connection is busy while a request on it is in flight
//! (a streaming answer counts until its last message), and idle for each
//! whole [`TICK`] in which it neither had one in flight nor began one. The
//! accept loop alone keeps the table and closes connections, so there is no
//! lock: the request path does one atomic add when a request begins and
//! one when it ends.
//!
//! Closing is abrupt (the connection reads end-of-file and hyper drops
//! it): only a connection that has begun no request since it was last
//! seen idle is closed, and a gRPC client opens a new one for its next
//! call. A request that is on its way as the connection closes (sent, not
//! yet read) is lost: Envoy answers it by its `failure_mode_allow`. (tonic
//! does not hand out the connection, so there is no GOAWAY to send.)

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::shutdown::Shutdown;

/// How often connections are looked at; idleness is counted in it.
pub const TICK: Duration = Duration::from_secs(1);

/// Longest a new connection waits for the place of the idle one closed for
/// it. Closing takes a wake-up of the victim's task; if that is not done by
/// then, the new connection is closed instead.
const EVICTION_WAIT: Duration = Duration::from_millis(250);

/// The bounds on a listener's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once. At the limit, the one idle longest (a
    /// [`TICK`] at least) is closed for a new one; with none idle, the new
    /// one is closed.
    pub max_connections: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
}

/// What the request path tells the accept loop about one connection.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests begun (high 32 bits, wrapping) and in flight (low 32 bits),
    /// in one word so that beginning a request is one atomic add.
    requests: AtomicU64,
    /// Set when the accept loop closes the connection.
    closing: AtomicBool,
    /// The connection's reader, woken to see `closing`.
    reader: AtomicWaker,
}

const BEGUN: u64 = 1 << 32;
const IN_FLIGHT: u64 = BEGUN - 1;

impl Activity {
    /// A request begins on this connection; it is in flight until the
    /// returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(BEGUN | 1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.reader.wake();
    }
}

/// A request in flight ([`Activity::begin`]).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open connection: its I/O, what is known of its use, and its place
/// among [`ConnLimits::max_connections`], given back when it drops.
#[derive(Debug)]
pub struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
}

impl<I> Watched<I> {
    /// The I/O.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// What requests on it report to.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.activity.reader.register(cx.waker());
        if self.activity.closing.load(Ordering::Acquire) {
            return Poll::Ready(Ok(())); // end of file
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
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

/// What a listener accepts.
pub trait Acceptor: Send + 'static {
    /// A connection.
    type Io: Send + 'static;
    /// The next connection.
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

/// One open connection, as the accept loop sees it.
struct Entry {
    activity: Weak<Activity>,
    /// `requests` when last looked at; none before its first tick, so
    /// that idleness counts whole ticks only.
    seen: Option<u64>,
    /// Whole ticks it has been idle.
    idle_ticks: u32,
}

/// The accept loop's table of open connections.
struct Table {
    slots: Arc<Semaphore>,
    open: Vec<Entry>,
    idle_ticks_to_close: u32,
}

impl Table {
    fn new(limits: &ConnLimits) -> Table {
        let ticks = limits.idle_timeout.as_secs_f64() / TICK.as_secs_f64();
        Table {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            open: Vec::new(),
            idle_ticks_to_close: (ticks.ceil() as u32).max(1),
        }
    }

    /// Counts a tick: forgets closed connections, and closes those idle
    /// past the timeout.
    fn tick(&mut self) {
        let to_close = self.idle_ticks_to_close;
        self.open.retain_mut(|entry| {
            let Some(activity) = entry.activity.upgrade() else {
                return false;
            };
            let now = activity.requests.load(Ordering::Relaxed);
            if entry.seen == Some(now) && now & IN_FLIGHT == 0 {
                entry.idle_ticks = entry.idle_ticks.saturating_add(1);
            } else {
                entry.idle_ticks = 0;
            }
            entry.seen = Some(now);
            if entry.idle_ticks >= to_close {
                activity.close();
            }
            true
        });
    }

    /// Closes the connection idle longest, if one still open has been idle
    /// a tick and has not begun a request since.
    fn close_longest_idle(&mut self) -> bool {
        let victim = self
            .open
            .iter_mut()
            .filter(|e| e.idle_ticks > 0)
            .filter_map(|e| Some((e.activity.upgrade()?, e)))
            .filter(|(activity, e)| e.seen == Some(activity.requests.load(Ordering::Relaxed)))
            .max_by_key(|(_, e)| e.idle_ticks);
        let Some((activity, entry)) = victim else {
            return false;
        };
        entry.idle_ticks = 0; // not chosen twice
        activity.close();
        true
    }

    /// A place for a new connection, closing the longest-idle one for it
    /// at the limit.
    async fn place(&mut self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        if !self.close_longest_idle() {
            return None;
        }
        tokio::time::timeout(EVICTION_WAIT, self.slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    fn watch<I>(&mut self, io: I, slot: OwnedSemaphorePermit) -> Watched<I> {
        let activity = Arc::new(Activity::default());
        self.open.push(Entry {
            activity: Arc::downgrade(&activity),
            seen: None,
            idle_ticks: 0,
        });
        Watched {
            io,
            activity,
            _slot: slot,
        }
    }
}

/// Accepts connections on `listener` within `limits` until `shutdown`
/// fires, handing each to `serve` (which spawns what serves it). `what`
/// names the listener in logs.
pub async fn accept<L: Acceptor>(
    listener: L,
    limits: ConnLimits,
    what: &'static str,
    mut shutdown: Shutdown,
    mut serve: impl FnMut(Watched<L::Io>) + Send,
) {
    let mut table = Table::new(&limits);
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said_full = false;
    loop {
        let io = tokio::select! {
            accepted = listener.next() => match accepted {
                Ok(io) => io,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ticks.tick() => {
                table.tick();
                continue;
            }
            _ = shutdown.wait() => return,
        };
        let Some(slot) = table.place().await else {
            if !std::mem::replace(&mut said_full, true) {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    listener = what,
                    "connections at their limit and none idle: new ones are closed"
                );
            }
            continue;
        };
        said_full = false;
        serve(table.watch(io, slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: usize, idle: Duration) -> Table {
        Table::new(&ConnLimits {
            max_connections: max,
            idle_timeout: idle,
        })
    }

    fn closing(w: &Watched<()>) -> bool {
        w.activity.closing.load(Ordering::Acquire)
    }

    #[tokio::test]
    async fn at_the_limit_the_longest_idle_connection_makes_room() {
        let mut table = table(2, Duration::from_secs(3600));
        let old = table.place().await.map(|s| table.watch((), s)).unwrap();
        let busy = table.place().await.map(|s| table.watch((), s)).unwrap();
        // No one idle yet: a third is refused.
        assert!(table.place().await.is_none());
        table.tick();
        let request = busy.activity.begin();
        table.tick();
        assert!(!closing(&old) && !closing(&busy));
        // `old` has been idle two ticks, `busy` has a request in flight.
        let waiting = tokio::spawn(async move {
            let slot = table.place().await;
            (table, slot)
        });
        tokio::task::yield_now().await;
        assert!(closing(&old), "the idle one is closed");
        assert!(!closing(&busy));
        drop(old); // hyper drops the connection once it reads end-of-file
        let (_table, slot) = waiting.await.unwrap();
        assert!(slot.is_some(), "its place goes to the new connection");
        drop(request);
    }

    #[tokio::test]
    async fn a_connection_that_began_a_request_since_the_tick_is_not_closed() {
        let mut table = table(1, Duration::from_secs(3600));
        let conn = table.place().await.map(|s| table.watch((), s)).unwrap();
        table.tick(); // first seen
        table.tick(); // idle a whole tick
        let _request = conn.activity.begin();
        assert!(table.place().await.is_none(), "busy now: the new one waits");
        assert!(!closing(&conn));
    }

    #[test]
    fn a_connection_idle_past_the_timeout_is_closed_and_a_used_one_is_not() {
        let mut table = table(8, Duration::from_secs(3));
        let slot = || table.slots.clone().try_acquire_owned().unwrap();
        let (a, b) = (slot(), slot());
        let idle = table.watch((), a);
        let used = table.watch((), b);
        for _ in 0..5 {
            drop(used.activity.begin()); // one request a tick
            table.tick();
        }
        assert!(closing(&idle), "idle three ticks");
        assert!(!closing(&used));
        // A streaming answer in flight for minutes is use, not idleness.
        let stream = used.activity.begin();
        for _ in 0..10 {
            table.tick();
        }
        assert!(!closing(&used));
        drop(stream);
        // The tick in which it ended was a tick of use.
        for _ in 0..3 {
            table.tick();
        }
        assert!(!closing(&used));
        table.tick();
        assert!(closing(&used));
        // Closed connections leave the table.
        drop((idle, used));
        table.tick();
        assert!(table.open.is_empty());
    }
}
