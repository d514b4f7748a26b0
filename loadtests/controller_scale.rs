//! `controller-scale`: sluice-controller with many sidecars subscribed.
//!
//! The real `sluice-controller` binary runs as its own process (on the
//! servers' core, its runtime as shipped) with
//! [`controller-scale.yaml`](controller-scale.yaml), a circuit of 20
//! components, against a real Prometheus on loopback that scrapes itself
//! (on the generator's core: the driver's children inherit its affinity).
//! This process then holds `--sidecars` `Control.Subscribe` streams, each
//! the stream a sidecar holds, and timestamps every `DecisionSet` as it
//! arrives. By default each stream has its own HTTP/2 connection, as each
//! sidecar dials its own (`--sidecars-per-connection N` puts N streams on
//! one connection instead; the controller allows 1,024 streams per
//! connection and 1,024 connections).
//!
//! A tick is identified by the `sent_unix_ms` the controller stamps on its
//! set once the tick's queries and circuit are done, just before every
//! stream is handed it. Per tick: the spread from the first to the last of
//! the arrivals, and from `sent_unix_ms` to the last arrival (1 ms
//! resolution: the stamp is in whole ms). What comes before the stamp (the
//! queries and the circuit) is the controller's
//! `controller_tick_duration_seconds`. CPU per tick is the controller's
//! CPU time from `/proc` ÷ the ticks it ran (`controller_ticks_total`),
//! first with one sidecar subscribed, then with all of them; memory is its
//! resident set.
//!
//! Arrivals are timestamped by this one process on one core: the spread
//! includes the time it takes the client to read every stream, so it is
//! an upper bound of the controller's own (the generator's CPU per tick is
//! reported beside it).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use parking_lot::Mutex;
use sluice_proto::control as wire;
use sluice_testkit::{Prometheus, free_port, http, repo_root};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::target::{self, Server};
use crate::{Plan, Report, median};

/// The sizes of a run.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Streams held, one per simulated sidecar.
    pub sidecars: usize,
    /// Streams per HTTP/2 connection (1: a connection per sidecar, as
    /// sidecars dial).
    pub per_connection: usize,
    /// Ticks measured with every sidecar subscribed.
    pub ticks: usize,
    /// Ticks measured with one sidecar subscribed, before the others.
    pub idle_ticks: usize,
    /// The controller's `--tick`.
    pub tick: Duration,
}

impl Scale {
    /// 1,000 sidecars, 20 ticks of 1 s; for `--smoke`, 50 sidecars and 3
    /// ticks of 250 ms.
    pub fn new(smoke: bool) -> Scale {
        if smoke {
            Scale {
                sidecars: 50,
                per_connection: 1,
                ticks: 3,
                idle_ticks: 2,
                tick: Duration::from_millis(250),
            }
        } else {
            Scale {
                sidecars: 1000,
                per_connection: 1,
                ticks: 20,
                // /proc counts CPU in 10 ms: 10 ticks resolve 1 ms a tick.
                idle_ticks: 10,
                tick: Duration::from_secs(1),
            }
        }
    }
}

/// One DecisionSet as one stream received it.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    sent_ms: i64,
    at_us: i64,
    decisions: usize,
}

/// What the streams' tasks report.
#[derive(Default)]
struct Streams {
    arrivals: Mutex<Vec<Arrival>>,
    /// Streams that received their first set.
    subscribed: AtomicUsize,
    /// Sets sent after this (ms since the epoch) are measured...
    measure_after_ms: AtomicI64,
    /// ... and counted here as they arrive.
    measured: AtomicUsize,
    /// Streams that ended (with an error or not): none should.
    ended: AtomicUsize,
    errors: Mutex<Vec<String>>,
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Holds sidecar `i`'s subscription on `channel`, recording each arrival.
async fn sidecar(channel: Channel, i: usize, streams: Arc<Streams>) {
    let mut client = wire::control_client::ControlClient::new(channel);
    let request = wire::SubscribeRequest {
        agent_group: "loadtest".to_owned(),
        service: "controller-scale".to_owned(),
        instance: format!("sidecar-{i}"),
    };
    let result = async {
        let mut stream = client.subscribe(request).await?.into_inner();
        let mut first = true;
        while let Some(set) = stream.message().await? {
            let at_us = unix_us();
            streams.arrivals.lock().push(Arrival {
                sent_ms: set.sent_unix_ms,
                at_us,
                decisions: set.decisions.len(),
            });
            if set.sent_unix_ms > streams.measure_after_ms.load(Ordering::Relaxed) {
                streams.measured.fetch_add(1, Ordering::Relaxed);
            }
            if first {
                streams.subscribed.fetch_add(1, Ordering::Relaxed);
                first = false;
            }
        }
        Ok::<_, tonic::Status>(())
    }
    .await;
    streams.ended.fetch_add(1, Ordering::Relaxed);
    let why = match result {
        Ok(()) => "the controller ended the stream".to_owned(),
        Err(e) => e.to_string(),
    };
    streams.errors.lock().push(format!("sidecar-{i}: {why}"));
}

/// A connection to the controller, as a sidecar opens it
/// (`sluice_runtime::grpc::connect`, without TLS).
async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect()
        .await?)
}

/// What the controller's `/metrics` says now.
struct Scrape {
    ticks: f64,
    tick_seconds_sum: f64,
    tick_seconds_count: f64,
    subscribers: f64,
}

async fn scrape(controller: &Server) -> anyhow::Result<Scrape> {
    let admin = controller.admin.context("the controller's admin address")?;
    let text = http::get(admin, "/metrics", &[]).await?.text();
    let metric = |name: &str| sluice_testkit::metric(&text, name);
    Ok(Scrape {
        ticks: metric("controller_ticks_total")?,
        tick_seconds_sum: metric("controller_tick_duration_seconds_sum")?,
        tick_seconds_count: metric("controller_tick_duration_seconds_count")?,
        subscribers: metric("controller_subscribers")?,
    })
}

/// Waits until `done` holds, checking every 10 ms, failing after `within`
/// or as soon as a stream ends.
async fn until(
    streams: &Streams,
    within: Duration,
    what: &str,
    controller: &Server,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return Ok(());
        }
        if streams.ended.load(Ordering::Relaxed) > 0 {
            let errors = streams.errors.lock();
            bail!(
                "{} streams ended while waiting for {what}, first: {}\n{}",
                errors.len(),
                errors.first().map_or("", String::as_str),
                controller.log_tail()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "no {what} within {within:?}\ncontroller log:\n{}",
                controller.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One tick as every sidecar received it, in µs.
#[derive(Clone, Copy, Debug)]
struct Tick {
    sent_ms: i64,
    /// `sent_unix_ms` to the first and to the last arrival.
    sent_to_first_us: i64,
    sent_to_last_us: i64,
    /// First to last arrival.
    spread_us: i64,
}

/// Ticks sent after `after_ms` that all `sidecars` received, in order, and
/// the `sent_unix_ms` of those some did not (yet).
fn ticks(arrivals: &[Arrival], after_ms: i64, sidecars: usize) -> (Vec<Tick>, Vec<i64>) {
    let mut by_tick: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for a in arrivals.iter().filter(|a| a.sent_ms > after_ms) {
        by_tick.entry(a.sent_ms).or_default().push(a.at_us);
    }
    let mut complete = Vec::new();
    let mut partial = Vec::new();
    for (sent_ms, at) in by_tick {
        if at.len() < sidecars {
            partial.push(sent_ms);
            continue;
        }
        let (first, last) = (at.iter().min().copied(), at.iter().max().copied());
        let (Some(first), Some(last)) = (first, last) else {
            continue;
        };
        let sent_us = sent_ms * 1000;
        complete.push(Tick {
            sent_ms,
            sent_to_first_us: first - sent_us,
            sent_to_last_us: last - sent_us,
            spread_us: last - first,
        });
    }
    (complete, partial)
}

/// The `q` quantile of `values` (nearest rank); 0 for none.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The scenario: see the module's documentation and loadtests/README.md.
pub async fn scenario(
    place: &target::Placement,
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    let scale = plan.scale;
    let policy = repo_root().join("loadtests/controller-scale.yaml");
    let expected = std::fs::read_to_string(&policy)?
        .lines()
        .filter(|l| l.trim_start().starts_with("- actuator:"))
        .count();
    let per_connection = scale.per_connection.max(1);
    let connections = scale.sidecars.div_ceil(per_connection);
    println!(
        "controller-scale: sluice-controller ({expected} decisions a tick from a circuit of 20 components, --tick {:?}) with {} sidecars subscribed on {connections} HTTP/2 connections",
        scale.tick, scale.sidecars
    );

    // Prometheus scrapes itself: the policy's queries read real series.
    let port = free_port()?;
    let prometheus = Prometheus::start_on(
        port,
        &[([127, 0, 0, 1], port).into()],
        Duration::from_millis(500),
    )
    .await?;
    let controller = Server::controller(
        place,
        &policy,
        &format!("http://{}", prometheus.addr),
        scale.tick,
    )
    .await?;
    let streams = Arc::new(Streams {
        measure_after_ms: AtomicI64::new(i64::MAX),
        ..Streams::default()
    });
    let mut tasks = JoinSet::new();
    let mut channels: Vec<Channel> = Vec::with_capacity(connections);

    // One sidecar first, until the circuit sends every decision (its
    // queries have data): the controller's cost without sidecars.
    channels.push(connect(controller.addr).await?);
    tasks.spawn(sidecar(channels[0].clone(), 0, streams.clone()));
    until(
        &streams,
        Duration::from_secs(30),
        "complete decision set",
        &controller,
        || {
            streams
                .arrivals
                .lock()
                .last()
                .is_some_and(|a| a.decisions == expected)
        },
    )
    .await?;
    let (idle0, idle_cpu0) = (scrape(&controller).await?, controller.cpu());
    tokio::time::sleep(scale.tick * scale.idle_ticks as u32).await;
    let (idle1, idle_cpu1) = (scrape(&controller).await?, controller.cpu());
    let idle_rss = controller.rss();
    let idle_ticks = (idle1.ticks - idle0.ticks).max(1.0);
    let idle_cpu_ms = idle_cpu1.saturating_sub(idle_cpu0).as_secs_f64() * 1e3 / idle_ticks;

    // Every other sidecar.
    let started = Instant::now();
    let subscribe_cpu0 = controller.cpu();
    for i in 1..scale.sidecars {
        let c = i / per_connection;
        if c == channels.len() {
            channels.push(connect(controller.addr).await?);
        }
        tasks.spawn(sidecar(channels[c].clone(), i, streams.clone()));
    }
    until(
        &streams,
        Duration::from_secs(30) + scale.tick * 2,
        "first set on every stream",
        &controller,
        || streams.subscribed.load(Ordering::Relaxed) == scale.sidecars,
    )
    .await?;
    let subscribe_s = started.elapsed().as_secs_f64();
    let subscribe_cpu_ms = controller
        .cpu()
        .saturating_sub(subscribe_cpu0)
        .as_secs_f64()
        * 1e3;
    println!(
        "  {} sidecars subscribed in {subscribe_s:.2} s (controller CPU {subscribe_cpu_ms:.0} ms); {:.2} ms of controller CPU per tick with one sidecar",
        scale.sidecars, idle_cpu_ms
    );

    // Ticks sent from now on reach every stream; measure `ticks` of them.
    let after_ms = streams
        .arrivals
        .lock()
        .iter()
        .map(|a| a.sent_ms)
        .max()
        .unwrap_or(0);
    streams.measure_after_ms.store(after_ms, Ordering::Relaxed);
    let (s0, cpu0, gen0) = (
        scrape(&controller).await?,
        controller.cpu(),
        target::own_cpu(),
    );
    until(
        &streams,
        scale.tick * (scale.ticks as u32 + 3) + Duration::from_secs(10),
        "measured ticks",
        &controller,
        // Cheap while the sets arrive; whole ticks counted only then.
        || {
            streams.measured.load(Ordering::Relaxed) >= scale.ticks * scale.sidecars
                && ticks(&streams.arrivals.lock(), after_ms, scale.sidecars)
                    .0
                    .len()
                    >= scale.ticks
        },
    )
    .await?;
    let (s1, cpu1, gen1) = (
        scrape(&controller).await?,
        controller.cpu(),
        target::own_cpu(),
    );
    let (peak_rss, rss) = (controller.peak_rss(), controller.rss());
    let arrivals = streams.arrivals.lock().clone();
    let (measured, partial) = ticks(&arrivals, after_ms, scale.sidecars);
    let measured = &measured[..scale.ticks];
    let last_ms = measured.last().map_or(after_ms, |t| t.sent_ms);
    // A stream reads only the latest set: one that missed a tick was a
    // whole tick late.
    let missed = partial.iter().filter(|&&t| t < last_ms).count();
    anyhow::ensure!(
        missed == 0,
        "{missed} of the ticks measured did not reach every sidecar"
    );
    let short: Vec<&Arrival> = arrivals
        .iter()
        .filter(|a| a.sent_ms > after_ms && a.sent_ms <= last_ms && a.decisions != expected)
        .collect();
    anyhow::ensure!(
        short.is_empty(),
        "{} arrivals carried fewer than {expected} decisions, first: {:?}",
        short.len(),
        short.first()
    );
    anyhow::ensure!(
        s1.subscribers as usize == scale.sidecars,
        "the controller counts {} subscribers, not {}",
        s1.subscribers,
        scale.sidecars
    );

    let ms = |us: i64| us as f64 / 1e3;
    for (n, t) in measured.iter().enumerate() {
        println!(
            "  tick {:>2}: sent → first {:>6.1} ms, sent → last {:>6.1} ms, first → last {:>6.1} ms",
            n + 1,
            ms(t.sent_to_first_us),
            ms(t.sent_to_last_us),
            ms(t.spread_us)
        );
    }
    let sent_to_last: Vec<f64> = measured.iter().map(|t| ms(t.sent_to_last_us)).collect();
    let spread: Vec<f64> = measured.iter().map(|t| ms(t.spread_us)).collect();
    let every: Vec<f64> = arrivals
        .iter()
        .filter(|a| a.sent_ms > after_ms && a.sent_ms <= last_ms)
        .map(|a| ms(a.at_us - a.sent_ms * 1000))
        .collect();
    let ran = (s1.ticks - s0.ticks).max(1.0);
    let cpu_ms = cpu1.saturating_sub(cpu0).as_secs_f64() * 1e3 / ran;
    let generator_ms = gen1.saturating_sub(gen0).as_secs_f64() * 1e3 / ran;
    let tick_ms = (s1.tick_seconds_sum - s0.tick_seconds_sum) * 1e3
        / (s1.tick_seconds_count - s0.tick_seconds_count).max(1.0);
    let judged = !plan.smoke;
    let max_ms = quantile(&sent_to_last, 1.0);
    let peak_mb = peak_rss as f64 / 1e6;
    report.figure(
        "controller-scale: sidecars subscribed",
        scale.sidecars as f64,
        None,
    );
    report.figure(
        "controller-scale: HTTP/2 connections",
        connections as f64,
        None,
    );
    report.figure(
        "controller-scale: sent → last sidecar, p50 over ticks (ms)",
        quantile(&sent_to_last, 0.5),
        None,
    );
    report.figure(
        "controller-scale: sent → last sidecar, p99 over ticks (ms)",
        quantile(&sent_to_last, 0.99),
        None,
    );
    report.figure(
        "controller-scale: sent → last sidecar, max over ticks (ms)",
        max_ms,
        judged.then_some(("<= 100", max_ms <= 100.0)),
    );
    report.figure(
        "controller-scale: first → last sidecar, p50 over ticks (ms)",
        quantile(&spread, 0.5),
        None,
    );
    report.figure(
        "controller-scale: first → last sidecar, p99 over ticks (ms)",
        quantile(&spread, 0.99),
        None,
    );
    report.figure(
        "controller-scale: first → last sidecar, max over ticks (ms)",
        quantile(&spread, 1.0),
        None,
    );
    report.figure(
        "controller-scale: sent → arrival, p50 of every arrival (ms)",
        quantile(&every, 0.5),
        None,
    );
    report.figure(
        "controller-scale: tick duration (queries + circuit), mean (ms)",
        tick_ms,
        None,
    );
    report.figure(
        "controller-scale: controller CPU per tick, one sidecar (ms)",
        idle_cpu_ms,
        None,
    );
    report.figure(
        "controller-scale: controller CPU per tick, every sidecar (ms)",
        cpu_ms,
        None,
    );
    report.figure(
        "controller-scale: controller CPU to subscribe every sidecar (ms)",
        subscribe_cpu_ms,
        None,
    );
    report.figure(
        "controller-scale: generator CPU per tick, every sidecar (ms)",
        generator_ms,
        None,
    );
    report.figure(
        "controller-scale: controller RSS with one sidecar (MB)",
        idle_rss as f64 / 1e6,
        None,
    );
    report.figure(
        "controller-scale: controller RSS with every sidecar (MB)",
        rss as f64 / 1e6,
        None,
    );
    report.figure(
        "controller-scale: controller peak RSS (MB)",
        peak_mb,
        judged.then_some(("<= 50", peak_mb <= 50.0)),
    );
    println!(
        "  median sent → last {:.1} ms over {} ticks; {cpu_ms:.2} ms of controller CPU per tick; peak RSS {peak_mb:.1} MB",
        median(sent_to_last.iter().copied()),
        measured.len()
    );
    tasks.abort_all();
    drop(channels);
    drop(controller);
    drop(prometheus);
    Ok(())
}
