//! A small upstream service. What it does is chosen by the request path:
//!
//! - `/status/<code>`: answers `<code>`;
//! - `/delay/<ms>`: answers 200 after `<ms>` milliseconds;
//! - anything else: answers 200 `ok` as the upstream's [`Capacity`] allows:
//!   after a base latency plus a cost per request in flight (the demo's
//!   service, which slows down under load), or from a fixed number of
//!   workers with a fixed service time, requests beyond waiting in line
//!   (a service with a known capacity, for measuring overload control),
//!   optionally losing half of them part-way.
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

/// How the upstream serves ordinary requests.
#[derive(Clone, Copy, Debug)]
pub enum Capacity {
    /// Any number at once, each slower the more are in flight.
    Growing(Latency),
    /// `workers` requests at once, each taking `service`; the rest wait
    /// in line, first come first served. From `halved_after` since the
    /// start (if given), half of the workers are gone.
    Workers {
        /// Requests served at once.
        workers: usize,
        /// Time a worker takes for one.
        service: Duration,
        /// When half of the workers go.
        halved_after: Option<Duration>,
    },
}

impl From<Latency> for Capacity {
    fn from(latency: Latency) -> Self {
        Capacity::Growing(latency)
    }
}

impl Capacity {
    /// Requests per second it can answer within `objective`, `elapsed`
    /// after its start: what goodput is measured against. For
    /// [`Capacity::Growing`], by Little's law: at most `n` in flight keep
    /// each within the objective, `n / latency` of them a second.
    pub fn rate_within(&self, objective: Duration, elapsed: Duration) -> f64 {
        match *self {
            Capacity::Growing(Latency { base, per_inflight }) => {
                if objective < base {
                    return 0.0;
                }
                if per_inflight.is_zero() {
                    return f64::INFINITY;
                }
                // base + per_inflight * (n - 1) <= objective
                let others =
                    ((objective - base).as_secs_f64() / per_inflight.as_secs_f64()).floor();
                let n = others + 1.0;
                let latency = base.as_secs_f64() + per_inflight.as_secs_f64() * others;
                if latency == 0.0 {
                    f64::INFINITY
                } else {
                    n / latency
                }
            }
            Capacity::Workers {
                workers,
                service,
                halved_after,
            } => {
                if objective < service || service.is_zero() {
                    return 0.0;
                }
                let workers = match halved_after {
                    Some(at) if elapsed >= at => workers - workers / 2,
                    _ => workers,
                };
                workers as f64 / service.as_secs_f64()
            }
        }
    }
}

/// The workers of a [`Capacity::Workers`] upstream.
#[derive(Clone, Debug)]
struct Workers {
    free: Arc<tokio::sync::Semaphore>,
    service: Duration,
}

impl Workers {
    /// `workers` of them; half leave `halved_after` from now.
    fn hire(workers: usize, service: Duration, halved_after: Option<Duration>) -> Workers {
        let free = Arc::new(tokio::sync::Semaphore::new(workers));
        if let Some(after) = halved_after {
            let leaving = u32::try_from(workers / 2).unwrap_or(u32::MAX);
            let free = free.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                // Each leaves once done with the request in hand; the line
                // is first come first served, so requests already waiting
                // go first.
                if let Ok(gone) = free.acquire_many(leaving).await {
                    gone.forget();
                }
            });
        }
        Workers { free, service }
    }

    /// Serves one request: waits for a worker, then for the service time.
    async fn serve(&self) {
        let Ok(_worker) = self.free.acquire().await else {
            return;
        };
        tokio::time::sleep(self.service).await;
    }
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

    /// Starts on `port`, serving ordinary requests with `capacity` (a
    /// [`Latency`] for the growing kind).
    pub async fn start_with(port: u16, capacity: impl Into<Capacity>) -> std::io::Result<Upstream> {
        let capacity = capacity.into();
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = shutdown::channel();
        let counters = Counters {
            requests: Arc::new(AtomicU64::new(0)),
            inflight: Arc::new(AtomicU64::new(0)),
            max_inflight: Arc::new(AtomicU64::new(0)),
        };
        let server = match capacity {
            Capacity::Growing(latency) => Server::Growing(latency),
            Capacity::Workers {
                workers,
                service,
                halved_after,
            } => Server::Workers(Workers::hire(workers, service, halved_after)),
        };
        tokio::spawn(serve(listener, counters.clone(), server, shutdown));
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

/// What serves ordinary requests.
#[derive(Clone, Debug)]
enum Server {
    Growing(Latency),
    Workers(Workers),
}

async fn serve(listener: TcpListener, counters: Counters, server: Server, mut shutdown: Shutdown) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = shutdown.wait() => return,
        };
        let counters = counters.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let counters = counters.clone();
                let server = server.clone();
                async move {
                    let (others, _inflight) = InFlight::enter(&counters.inflight);
                    counters
                        .max_inflight
                        .fetch_max(others + 1, Ordering::Relaxed);
                    let (status, delay) = answer(req.uri().path());
                    match (delay, status, &server) {
                        (Some(wait), ..) => tokio::time::sleep(wait).await,
                        (None, 200, Server::Growing(latency)) => {
                            let own = latency.base + latency.per_inflight * others as u32;
                            if !own.is_zero() {
                                tokio::time::sleep(own).await;
                            }
                        }
                        (None, 200, Server::Workers(workers)) => workers.serve().await,
                        _ => {}
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

    /// Completion times of `n` requests sent at once to `workers`.
    async fn finished(workers: &Workers, n: usize) -> Vec<Duration> {
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let workers = workers.clone();
            tasks.push(tokio::spawn(async move {
                workers.serve().await;
                start.elapsed()
            }));
            tokio::task::yield_now().await;
        }
        let mut done = Vec::new();
        for task in tasks {
            done.push(task.await.expect("served"));
        }
        done
    }

    #[tokio::test(start_paused = true)]
    async fn workers_serve_so_many_at_once_and_the_rest_wait_in_line() {
        let ms = Duration::from_millis;
        let workers = Workers::hire(2, ms(100), None);
        assert_eq!(
            finished(&workers, 5).await,
            [ms(100), ms(100), ms(200), ms(200), ms(300)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_of_the_workers_leave_when_told() {
        let ms = Duration::from_millis;
        let workers = Workers::hire(4, ms(100), Some(ms(250)));
        // Before: four at once.
        assert_eq!(finished(&workers, 4).await, [ms(100); 4]);
        tokio::time::sleep(ms(200)).await; // past 250 ms since hiring
        // After: two at once.
        assert_eq!(
            finished(&workers, 4).await,
            [ms(100), ms(100), ms(200), ms(200)]
        );
    }

    #[test]
    fn capacity_within_an_objective() {
        let ms = Duration::from_millis;
        let workers = Capacity::Workers {
            workers: 8,
            service: ms(20),
            halved_after: Some(Duration::from_secs(30)),
        };
        assert_eq!(workers.rate_within(ms(100), Duration::ZERO), 400.0);
        assert_eq!(workers.rate_within(ms(100), Duration::from_secs(31)), 200.0);
        assert_eq!(workers.rate_within(ms(10), Duration::ZERO), 0.0);
        // The demo's: 10 ms, and 1 ms per other request in flight. Within
        // 50 ms, 41 in flight at 50 ms each: 820 a second.
        let growing = Capacity::Growing(Latency {
            base: ms(10),
            per_inflight: ms(1),
        });
        assert!((growing.rate_within(ms(50), Duration::ZERO) - 820.0).abs() < 1e-6);
        assert_eq!(growing.rate_within(ms(5), Duration::ZERO), 0.0);
    }
}
