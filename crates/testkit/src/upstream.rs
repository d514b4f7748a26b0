//! A small upstream service. What it does is chosen by the request path:
//!
//! - `/status/<code>`: answers `<code>`;
//! - `/delay/<ms>`: answers 200 after `<ms>` milliseconds;
//! - anything else: answers 200 `ok`, after the upstream's own latency
//!   ([`Latency`]): a base plus a cost per request in flight, so that it
//!   slows down under load as a real service does.
//!
//! Every answer echoes the `baggage` header it received in `x-seen-baggage`,
//! so tests can see what Sluice added upstream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use sluice_runtime::shutdown::{self, Shutdown, Trigger};

/// How long the upstream takes for an ordinary request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    /// Time taken when idle.
    pub base: Duration,
    /// Time added per other request in flight.
    pub per_inflight: Duration,
}

/// A running upstream; stops when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests it has answered.
    pub requests: Arc<AtomicU64>,
    /// Requests in flight now.
    pub inflight: Arc<AtomicU64>,
    /// The most requests that were ever in flight at once.
    pub max_inflight: Arc<AtomicU64>,
    _stop: Trigger,
}

fn answer(path: &str) -> (u16, Option<Duration>) {
    if let Some(code) = path.strip_prefix("/status/") {
        let code = code.split(['/', '?']).next().and_then(|c| c.parse().ok());
        return (code.filter(|c| (100..600).contains(c)).unwrap_or(400), None);
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        let ms = ms.split(['/', '?']).next().and_then(|m| m.parse().ok());
        return (200, Some(Duration::from_millis(ms.unwrap_or(0))));
    }
    (200, None)
}

impl Upstream {
    /// Starts on `port` of 127.0.0.1 (0 for any), answering at once.
    pub async fn start(port: u16) -> std::io::Result<Upstream> {
        Upstream::start_with(port, Latency::default()).await
    }

    /// Starts on `port` with the given latency for ordinary requests.
    pub async fn start_with(port: u16, latency: Latency) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = shutdown::channel();
        let counters = Counters {
            requests: Arc::new(AtomicU64::new(0)),
            inflight: Arc::new(AtomicU64::new(0)),
            max_inflight: Arc::new(AtomicU64::new(0)),
        };
        tokio::spawn(serve(listener, counters.clone(), latency, shutdown));
        Ok(Upstream {
            addr,
            requests: counters.requests,
            inflight: counters.inflight,
            max_inflight: counters.max_inflight,
            _stop: stop,
        })
    }
}

#[derive(Clone)]
struct Counters {
    requests: Arc<AtomicU64>,
    inflight: Arc<AtomicU64>,
    max_inflight: Arc<AtomicU64>,
}

async fn serve(
    listener: TcpListener,
    counters: Counters,
    latency: Latency,
    mut shutdown: Shutdown,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = shutdown.wait() => return,
        };
        let counters = counters.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let counters = counters.clone();
                async move {
                    let (others, _inflight) = InFlight::enter(&counters.inflight);
                    counters
                        .max_inflight
                        .fetch_max(others + 1, Ordering::Relaxed);
                    let (status, delay) = answer(req.uri().path());
                    let own = latency.base + latency.per_inflight * others as u32;
                    let wait = delay.unwrap_or(if status == 200 { own } else { Duration::ZERO });
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    let mut response = http::Response::builder().status(status);
                    if let Some(b) = req.headers().get("baggage") {
                        response = response.header("x-seen-baggage", b);
                    }
                    let response = response
                        .body(Full::new(Bytes::from_static(b"ok\n")))
                        .unwrap_or_default();
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request counted in flight until dropped: however the request ends,
/// also when Envoy resets it and hyper drops the handler mid-sleep.
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    /// Counts a request in; returns how many others were in flight.
    fn enter(count: &Arc<AtomicU64>) -> (u64, InFlight) {
        (
            count.fetch_add(1, Ordering::Relaxed),
            InFlight(count.clone()),
        )
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_choose_the_answer() {
        assert_eq!(answer("/status/503"), (503, None));
        assert_eq!(answer("/status/abc"), (400, None));
        assert_eq!(
            answer("/delay/250"),
            (200, Some(Duration::from_millis(250)))
        );
        assert_eq!(answer("/anything"), (200, None));
    }
}
