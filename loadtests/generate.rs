//! The load generator: open-loop at a fixed arrival rate, or closed-loop at
//! a fixed concurrency ("the maximum"), over any kind of request.
//!
//! Open loop: request *n* is started at `start + n / rate` whatever the
//! others are doing, each on its own task, so a slow server meets a growing
//! queue instead of a politely waiting client. tokio's timer has a 1 ms
//! grain, so starts within the same millisecond go out together, and a
//! request's latency is measured from the moment it is actually sent (from
//! its scheduled instant would charge the client's timer to the server).
//!
//! Closed loop: `concurrency` workers each send, await the answer, and send
//! again; the throughput they reach is the server's maximum if the
//! generator itself has CPU to spare, which every report shows (its own
//! cores used).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answered and allowed (gRPC OK and an OK decision; HTTP 2xx).
    Ok,
    /// Answered with a denial (a Check with a non-OK status; HTTP 403,
    /// 429, 503): the server did its work, the policy said no.
    Denied,
    /// Transport error, gRPC error, or an unexpected HTTP status.
    Error,
}

/// Sends request number `n`.
pub trait Shot: Clone + Send + Sync + 'static {
    /// Sends it and waits for the answer.
    fn fire(&self, n: u64) -> impl Future<Output = Answer> + Send;
}

/// The load to apply.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// Requests per second, open loop.
    Rate(u64),
    /// Workers, each with one request outstanding: as fast as it goes.
    Max(usize),
}

/// What a run measured on the client side.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Answers of each kind.
    pub ok: u64,
    pub denied: u64,
    pub errors: u64,
    /// From the first send to the last answer.
    pub elapsed: Duration,
    /// Latency of answered requests (ok or denied): their mean and
    /// percentiles.
    pub mean: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub p999: Duration,
}

impl Stats {
    /// Answered requests (allowed or denied) per second.
    pub fn throughput(&self) -> f64 {
        (self.ok + self.denied) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What the tasks of one run share.
struct Tally {
    ok: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
    /// Nanoseconds, 3 significant digits.
    latency: Mutex<Histogram<u64>>,
}

impl Tally {
    fn new() -> Arc<Tally> {
        Arc::new(Tally {
            ok: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Mutex::new(
                Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid bounds"),
            ),
        })
    }

    fn record(&self, answer: Answer, took: Duration) {
        let counter = match answer {
            Answer::Ok => &self.ok,
            Answer::Denied => &self.denied,
            Answer::Error => &self.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if answer != Answer::Error {
            self.latency
                .lock()
                .saturating_record(took.as_nanos() as u64);
        }
    }

    fn stats(&self, elapsed: Duration) -> Stats {
        let h = self.latency.lock();
        let q = |q: f64| Duration::from_nanos(h.value_at_quantile(q));
        Stats {
            ok: self.ok.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            elapsed,
            mean: Duration::from_nanos(h.mean() as u64),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
        }
    }
}

/// How long requests still out at the end may take before they count as
/// errors.
const DRAIN: Duration = Duration::from_secs(5);

/// Applies `load` with `shot` for `duration`; request numbers start at
/// `first` (so that consecutive runs keep spreading over users).
pub async fn run<S: Shot>(shot: &S, load: Load, duration: Duration, first: u64) -> Stats {
    let tally = Tally::new();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    match load {
        Load::Rate(rate) => {
            let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            for n in 0u64.. {
                let scheduled = start + period.mul_f64(n as f64);
                if scheduled - start >= duration {
                    break;
                }
                tokio::time::sleep_until(scheduled).await;
                let (shot, tally) = (shot.clone(), tally.clone());
                tasks.spawn(async move {
                    let sent = Instant::now();
                    let answer = shot.fire(first + n).await;
                    tally.record(answer, sent.elapsed());
                });
                // Reap what has finished, so that a long run holds only
                // the requests still out.
                while tasks.try_join_next().is_some() {}
            }
        }
        Load::Max(workers) => {
            let next = Arc::new(AtomicU64::new(first));
            for _ in 0..workers {
                let (shot, tally, next) = (shot.clone(), tally.clone(), next.clone());
                tasks.spawn(async move {
                    while start.elapsed() < duration {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let sent = Instant::now();
                        let answer = shot.fire(n).await;
                        tally.record(answer, sent.elapsed());
                    }
                });
            }
        }
    }
    // Open loop: the schedule is over, only answers are awaited. Closed
    // loop: the workers run until `duration` from `start`.
    let deadline = match load {
        Load::Rate(_) => Instant::now() + DRAIN,
        Load::Max(_) => start + duration + DRAIN,
    };
    let drained = tokio::time::timeout_at(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let elapsed = start.elapsed();
    if drained.is_err() {
        let stuck = tasks.len() as u64;
        tasks.abort_all();
        tally.errors.fetch_add(stuck, Ordering::Relaxed);
    }
    tally.stats(elapsed.min(duration + DRAIN))
}

/// Spreads request numbers over `users` ids in a fixed pseudo-random
/// order, so that consecutive requests rarely share a user.
pub fn user_of(n: u64, users: u64) -> u64 {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) % users.max(1)
}
