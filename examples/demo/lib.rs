//! The demo behind `make demo`, as a function: [`run`] starts an upstream,
//! Prometheus, Sluice, sluice-controller and Envoy on loopback, has k6
//! send traffic through Envoy in three phases, shows every second what the
//! loop is doing, and returns a [`Summary`] after writing it to
//! `<out>/demo.json` and a picture of the run to `<out>/demo.svg`.
//!
//! `main.rs` (the example) calls it with the command line and Ctrl-C;
//! `tests/demo.rs` calls it with a short duration (it includes this file
//! with `#[path]`, so the demo stays out of the product library).
//!
//! Layout: this file (phases, the per-second loop, the summary), `k6.rs`
//! (k6 and its CSV output), `plot.rs` (the SVG), `traffic.js` (the k6
//! script).

pub mod k6;
pub mod plot;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use serde::Serialize;
use sluice::server::{Config, Sidecar};
use sluice::telemetry::remote_write::RemoteWriteConfig;
use sluice_controller::{Controller, ControllerConfig};
use sluice_store::RedisConfig;
use sluice_testkit::overload::{self, Figures};
use sluice_testkit::redis::Redis;
use sluice_testkit::{
    Capacity, Envoy, EnvoyPorts, Latency, Prometheus, Upstream, http, repo_root, scrape,
};
use tokio::sync::watch;

/// Checks the demo previews as the run begins.
const PREVIEW_SAMPLES: usize = 4;

/// A source of traffic: who, where, how often. `traffic.js` makes one k6
/// scenario of each.
#[derive(Serialize)]
pub struct Source {
    /// The k6 scenario's name, shown in the output.
    pub name: &'static str,
    /// The path requested.
    pub path: &'static str,
    /// Requests per second.
    pub per_second: u32,
    /// `user-type` header, if any.
    pub user_type: Option<&'static str>,
    /// Distinct `user-id`s it rotates through (1: its own name).
    pub ids: u32,
    /// Sends only while the crowd is there.
    pub crowd: bool,
    /// The `user-id` of all its requests, instead of its name.
    pub user: Option<&'static str>,
    /// Which Envoy it sends to: `a`, or `b` (the second Envoy and Sluice
    /// pair, sharing the first one's Redis).
    pub via: &'static str,
    /// What it shows.
    #[serde(skip)]
    pub note: &'static str,
}

/// The demo's traffic.
pub const SOURCES: [Source; 8] = [
    Source {
        name: "alice",
        path: "/api/items",
        per_second: 8,
        user_type: Some("subscriber"),
        ids: 1,
        crowd: false,
        user: None,
        via: "a",
        note: "bursts above her per-user limit (429)",
    },
    Source {
        name: "bob",
        path: "/api/orders",
        per_second: 1,
        user_type: Some("subscriber"),
        ids: 1,
        crowd: false,
        user: None,
        via: "a",
        note: "stays within his limit",
    },
    Source {
        name: "carol",
        path: "/api/items/42",
        per_second: 2,
        user_type: Some("guest"),
        ids: 1,
        crowd: false,
        user: None,
        via: "a",
        note: "twice her refill rate",
    },
    Source {
        name: "dave",
        path: "/beta/search",
        per_second: 1,
        user_type: Some("guest"),
        ids: 1,
        crowd: false,
        user: None,
        via: "a",
        note: "tries the closed beta (403)",
    },
    Source {
        name: "erin-a",
        path: "/api/orders",
        per_second: 2,
        user_type: Some("subscriber"),
        ids: 1,
        crowd: false,
        user: Some("erin"),
        via: "a",
        note: "erin through Envoy A ...",
    },
    Source {
        name: "erin-b",
        path: "/api/orders",
        per_second: 2,
        user_type: Some("subscriber"),
        ids: 1,
        crowd: false,
        user: Some("erin"),
        via: "b",
        note: "... and through Envoy B: one limit",
    },
    Source {
        name: "subscribers",
        path: "/api/items",
        per_second: 60,
        user_type: Some("subscriber"),
        ids: 100,
        crowd: true,
        user: None,
        via: "a",
        note: "the crowd: 100 subscribers",
    },
    Source {
        name: "guests",
        path: "/api/items",
        per_second: 60,
        user_type: Some("guest"),
        ids: 100,
        crowd: true,
        user: None,
        via: "a",
        note: "the crowd: 100 guests",
    },
];

/// The demo's upstream: 15 ms per request, 10 ms more per other request
/// in flight: fine for the calm phase, overloaded by the crowd.
pub const UPSTREAM: Latency = Latency {
    base: Duration::from_millis(15),
    per_inflight: Duration::from_millis(10),
};

/// The component the controller's loop drives, as `x-sluice-rejected-by`
/// names it.
const LOOP_COMPONENT: &str = "demo/service";

/// The load scheduler's workloads in `examples/demo.yaml`, by
/// `workload_index`.
pub const WORKLOADS: [(&str, &str); 2] = [("0", "subscribers"), ("1", "guests")];

/// How `demo` is called.
pub const USAGE: &str =
    "usage: demo [--duration 60s] [--policy examples/demo.yaml] [--out target/demo]";

/// What to run.
#[derive(Clone, Debug)]
pub struct Args {
    /// How long the traffic lasts (whole seconds, at least 4).
    pub duration: Duration,
    /// The policy, for Sluice and the controller.
    pub policy: PathBuf,
    /// Where `demo.svg` and `demo.json` go.
    pub out: PathBuf,
}

impl Args {
    /// Parses the arguments after the program's name; `None` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
        let mut parsed = Args {
            duration: Duration::from_secs(60),
            policy: repo_root().join("examples/demo.yaml"),
            out: repo_root().join("target/demo"),
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().ok_or(format!("{arg} needs a value\n{USAGE}"));
            match arg.as_str() {
                "--duration" => {
                    let v = value()?;
                    parsed.duration = humantime::parse_duration(&v)
                        .map_err(|e| format!("--duration {v}: {e}"))?;
                }
                "--policy" => parsed.policy = PathBuf::from(value()?),
                "--out" => parsed.out = PathBuf::from(value()?),
                "-h" | "--help" => return Ok(None),
                other => return Err(format!("unknown argument {other}\n{USAGE}")),
            }
        }
        if parsed.duration < Duration::from_secs(4) {
            return Err(format!("--duration must be at least 4s\n{USAGE}"));
        }
        Ok(Some(parsed))
    }
}

/// The three phases of the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Four users; the controller learns the normal latency.
    Calm,
    /// The crowd is there, more than the upstream can serve.
    Crowd,
    /// The crowd has left.
    Recovery,
}

/// When the phases begin and end, in whole seconds from the start of the
/// traffic: a quarter calm, a half crowd, a quarter recovery.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Phases {
    /// Seconds of traffic in all.
    pub duration: u64,
    /// When the crowd arrives.
    pub crowd_start: u64,
    /// When it leaves.
    pub crowd_end: u64,
}

impl Phases {
    /// The phases of a run of `duration` (rounded down to whole seconds).
    pub fn of(duration: Duration) -> Phases {
        let duration = duration.as_secs();
        let quarter = (duration + 2) / 4;
        Phases {
            duration,
            crowd_start: quarter,
            crowd_end: duration - quarter,
        }
    }

    /// The phase at second `t`.
    pub fn at(&self, t: u64) -> Phase {
        if t < self.crowd_start {
            Phase::Calm
        } else if t < self.crowd_end {
            Phase::Crowd
        } else {
            Phase::Recovery
        }
    }
}

/// Accepted and rejected requests.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Decisions {
    /// Let through.
    pub accepted: u64,
    /// Turned away.
    pub rejected: u64,
}

impl Decisions {
    /// The share accepted, when there were any.
    pub fn share(&self) -> Option<f64> {
        let all = self.accepted + self.rejected;
        (all > 0).then(|| self.accepted as f64 / all as f64)
    }
}

/// One second of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Second {
    /// Seconds since the traffic started (this one is `[t, t+1)`).
    pub t: u64,
    /// Its phase.
    pub phase: Phase,
    /// The controller's latency signal (ms, average upstream latency over
    /// its signal window), read at the end of the second.
    pub latency_ms: Option<f64>,
    /// The controller's setpoint (ms).
    pub setpoint_ms: Option<f64>,
    /// The load multiplier in force in Sluice.
    pub lm: Option<f64>,
    /// What each source got back in this second (by k6): HTTP status
    /// (0: no answer) → count.
    pub answers: BTreeMap<String, BTreeMap<u16, u64>>,
    /// The load scheduler's decisions per workload in this second (Sluice's
    /// `workload_requests_total`).
    pub workloads: BTreeMap<String, Decisions>,
}

/// All the answers a source got with one status from one rejecter.
#[derive(Clone, Debug, Serialize)]
pub struct Answers {
    /// The source.
    pub source: String,
    /// HTTP status (0: no answer).
    pub code: u16,
    /// Sluice's `x-sluice-rejected-by` (`policy/component`), "" when none.
    pub by: String,
    /// How many.
    pub count: u64,
    /// How many of them carried `retry-after`.
    pub with_retry_after: u64,
}

/// One series of a Prometheus query at the end of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Received {
    /// What was asked.
    pub what: String,
    /// The series' labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// Where the parts ran (all gone when [`run`] returns).
#[derive(Clone, Debug, Serialize)]
pub struct Started {
    /// The upstream.
    pub upstream: SocketAddr,
    /// Envoy's listener, where k6 sends its requests.
    pub envoy: SocketAddr,
    /// The second Envoy's listener, in front of the second Sluice.
    pub envoy_b: SocketAddr,
    /// The second Sluice's gRPC listener.
    pub sluice_b: SocketAddr,
    /// Redis, where both Sluices keep the global per-user limit.
    pub redis: SocketAddr,
    /// Envoy's admin.
    pub envoy_admin: SocketAddr,
    /// Sluice's gRPC listener.
    pub sluice: SocketAddr,
    /// Sluice's admin (`/metrics`).
    pub sluice_admin: SocketAddr,
    /// sluice-controller's gRPC listener.
    pub controller: SocketAddr,
    /// sluice-controller's admin (`/metrics`).
    pub controller_admin: SocketAddr,
    /// Prometheus.
    pub prometheus: SocketAddr,
    /// k6's process id.
    pub k6_pid: Option<u32>,
}

/// What [`run`] returns and writes to `demo.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Stopped early (Ctrl-C, SIGTERM).
    pub interrupted: bool,
    /// The phases as planned.
    pub phases: Phases,
    /// Each second, as far as the run went.
    pub seconds: Vec<Second>,
    /// The totals per source, status and rejecter.
    pub answers: Vec<Answers>,
    /// Requests k6 could not send for lack of a free virtual user, per
    /// source.
    pub dropped: BTreeMap<String, u64>,
    /// The lowest load multiplier seen.
    pub lowest_lm: Option<f64>,
    /// The latency objective the figures are judged against: the
    /// setpoint the controller held during the crowd (ms).
    pub objective_ms: Option<f64>,
    /// The overload bench's figures of the crowd (`loadtests/overload.rs`):
    /// goodput, time to protect, stability, recovery, priority.
    pub figures: Figures,
    /// Erin's requests admitted through each Envoy (`a`, `b`): one user
    /// sending through both pairs, held to one global limit.
    pub erin_admitted: BTreeMap<String, u64>,
    /// What Prometheus received from Sluice by remote-write.
    pub prometheus: Vec<Received>,
    /// Sluice's `GET /v1/preview` answer for the first Checks of the run
    /// (what `sluice preview` prints), if it came.
    pub preview: Option<serde_json::Value>,
    /// Where the parts ran.
    pub started: Started,
    /// The picture.
    pub svg: PathBuf,
    /// This summary.
    pub json: PathBuf,
}

/// The parts of the loop, running: one Envoy and Sluice pair with the
/// controller, and a second pair sharing the first one's Redis.
struct Parts {
    upstream: Upstream,
    prometheus: Prometheus,
    redis: Redis,
    controller: Controller,
    sidecar: Sidecar,
    envoy: Envoy,
    sidecar_b: Sidecar,
    envoy_b: Envoy,
}

impl Parts {
    async fn start(policy: &Path) -> anyhow::Result<Parts> {
        let upstream = Upstream::start_with(0, UPSTREAM).await?;
        let prometheus = Prometheus::start(&[], Duration::from_secs(1)).await?;
        let redis = Redis::start(&[]).await?;
        let loopback = "127.0.0.1:0".parse()?;
        let controller = Controller::start(ControllerConfig {
            tick: Duration::from_secs(1),
            decision_validity: Duration::from_secs(3),
            ..ControllerConfig::new(
                policy.to_owned(),
                &format!("http://{}", prometheus.addr),
                loopback,
                loopback,
            )
        })
        .await?;
        // Both Sluices: the same policy, the same controller and Redis;
        // each remote-writes its own series (`instance`).
        let sluice = |instance: &str| -> anyhow::Result<Config> {
            Ok(Config {
                policy: Some(policy.to_owned()),
                controller: Some(format!("http://{}", controller.grpc_addr).parse()?),
                remote_write: Some(RemoteWriteConfig {
                    url: prometheus.remote_write_url().parse()?,
                    interval: Duration::from_secs(1),
                    external_labels: vec![
                        ("job".to_owned(), "sluice-demo".to_owned()),
                        ("instance".to_owned(), instance.to_owned()),
                    ],
                    bearer_token: None,
                    ca_file: None,
                    max_queued_batches: 30,
                    timeout: Duration::from_secs(5),
                }),
                store: Some(RedisConfig {
                    urls: vec![redis.url()],
                    cluster: false,
                    password: None,
                    ca_file: None,
                    timeout: Duration::from_millis(25),
                }),
                ..Config::ephemeral()
            })
        };
        let sidecar = Sidecar::start(&sluice("sluice-a")?).await?;
        let envoy = Envoy::start(
            "envoy-configs/quickstart.yaml",
            EnvoyPorts::free(upstream.addr.port(), sidecar.grpc_addr.port())?,
        )
        .await?;
        let sidecar_b = Sidecar::start(&sluice("sluice-b")?).await?;
        let envoy_b = Envoy::start(
            "envoy-configs/quickstart.yaml",
            EnvoyPorts::free(upstream.addr.port(), sidecar_b.grpc_addr.port())?,
        )
        .await?;
        Ok(Parts {
            upstream,
            prometheus,
            redis,
            controller,
            sidecar,
            envoy,
            sidecar_b,
            envoy_b,
        })
    }

    /// Stops them all, the Envoys first.
    async fn stop(self) {
        drop(self.envoy);
        drop(self.envoy_b);
        self.sidecar.stop(Duration::from_secs(2)).await;
        self.sidecar_b.stop(Duration::from_secs(2)).await;
        self.controller.stop(Duration::from_secs(2)).await;
        drop(self.redis);
        drop(self.prometheus);
        drop(self.upstream);
    }
}

/// The loop at one moment, read from the controller's and Sluice's
/// `/metrics` as a user would.
struct Readings {
    latency: Option<f64>,
    setpoint: Option<f64>,
    lm: Option<f64>,
    /// `workload_requests_total` per workload name; empty when Sluice did
    /// not answer.
    workloads: BTreeMap<String, Decisions>,
}

impl Readings {
    async fn read(controller: SocketAddr, sidecar: SocketAddr) -> Readings {
        let text = |addr| async move {
            let get = http::request(
                addr,
                "GET",
                "/metrics",
                &[],
                b"",
                Duration::from_millis(500),
            );
            get.await.map(|r| r.text()).unwrap_or_default()
        };
        let (controller, sidecar) = tokio::join!(text(controller), text(sidecar));
        let signal = |name: &str| {
            let series = format!(r#"controller_signal{{policy_name="demo",signal="{name}"}}"#);
            scrape(&controller, &series).filter(|v| v.is_finite())
        };
        let workloads = WORKLOADS
            .iter()
            .map(|(index, name)| {
                let count = |decision: &str| {
                    let series = format!(
                        r#"workload_requests_total{{component="service",decision_type="{decision}",policy_name="demo",workload_index="{index}"}}"#
                    );
                    scrape(&sidecar, &series).map(|v| v as u64)
                };
                let counts = Decisions {
                    accepted: count("accepted")?,
                    rejected: count("rejected")?,
                };
                Some((name.to_string(), counts))
            })
            .collect::<Option<_>>()
            .unwrap_or_default();
        Readings {
            latency: signal("latency"),
            setpoint: signal("setpoint"),
            lm: scrape(
                &sidecar,
                r#"token_bucket_lm_ratio{component="service",policy_name="demo"}"#,
            ),
            workloads,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `200×3 429×5`.
fn describe(counts: Option<&BTreeMap<u16, u64>>) -> String {
    match counts {
        None => "-".to_owned(),
        Some(c) => c
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The run in progress: every second and the totals, from k6's rows and
/// the figures read each second.
struct Record {
    phases: Phases,
    seconds: Vec<Second>,
    /// The same seconds as the overload bench scores them: subscribers
    /// (workload 0, high priority) and guests (1), the upstream's time.
    scored: Vec<overload::Second>,
    /// Per second: the upstream's time of each admitted request, and the
    /// client's time of them summed (ms).
    times: Vec<(Vec<f64>, f64)>,
    /// (source, code, by) → (count, with retry-after).
    totals: BTreeMap<(String, u16, String), (u64, u64)>,
    dropped: BTreeMap<String, u64>,
}

impl Record {
    fn second(&mut self, t: u64) -> &mut Second {
        // Answers that come after the last second count in it.
        let t = t.min(self.phases.duration.saturating_sub(1));
        while self.seconds.len() as u64 <= t {
            let t = self.seconds.len() as u64;
            self.seconds.push(Second {
                t,
                phase: self.phases.at(t),
                latency_ms: None,
                setpoint_ms: None,
                lm: None,
                answers: BTreeMap::new(),
                workloads: BTreeMap::new(),
            });
        }
        &mut self.seconds[t as usize]
    }

    fn add(&mut self, rows: Vec<k6::Row>) {
        for row in rows {
            match row {
                k6::Row::Answer {
                    at_ms,
                    source,
                    code,
                    by,
                    retry_after,
                    duration_ms,
                    upstream_ms,
                } => {
                    self.score(at_ms / 1000, &source, code, &by, duration_ms, upstream_ms);
                    let second = self.second(at_ms / 1000);
                    *second
                        .answers
                        .entry(source.clone())
                        .or_default()
                        .entry(code)
                        .or_default() += 1;
                    let total = self.totals.entry((source, code, by)).or_default();
                    total.0 += 1;
                    total.1 += u64::from(retry_after);
                }
                k6::Row::Dropped { source, count, .. } => {
                    *self.dropped.entry(source).or_default() += count;
                }
            }
        }
    }

    /// Counts one answer in the scored second `t`, rejected by `by` (the
    /// `x-sluice-rejected-by` header; "" if none): turned away when the
    /// loop's load scheduler refused it; the per-user limiter's and the
    /// sampler's refusals are the policy at work whatever the load, not the
    /// loop's, and are not counted at all (not even as offered to it).
    fn score(
        &mut self,
        t: u64,
        source: &str,
        code: u16,
        by: &str,
        duration_ms: f64,
        upstream_ms: Option<f64>,
    ) {
        let t = t.min(self.phases.duration.saturating_sub(1)) as usize;
        while self.scored.len() <= t {
            self.scored.push(overload::Second {
                t: self.scored.len() as u64,
                ..overload::Second::default()
            });
            self.times.push((Vec::new(), 0.0));
        }
        let subscriber = SOURCES
            .iter()
            .any(|s| s.name == source && s.user_type == Some("subscriber"));
        let workload = usize::from(!subscriber);
        let second = &mut self.scored[t];
        if !by.is_empty() && by != LOOP_COMPONENT {
            // Refused before the loop's scheduler saw it: not offered to it.
            return;
        }
        second.offered[workload] += 1;
        match code {
            200 => {
                second.admitted[workload] += 1;
                let (upstream, e2e) = &mut self.times[t];
                upstream.push(upstream_ms.unwrap_or(duration_ms));
                *e2e += duration_ms;
                let n = upstream.len() as f64;
                second.latency_ms = Some(upstream.iter().sum::<f64>() / n);
                second.e2e_ms = Some(*e2e / n);
            }
            _ if by == LOOP_COMPONENT => second.rejected[workload] += 1,
            _ => second.failed += 1,
        }
    }

    /// The bench's figures of the run: the crowd is the overload, the
    /// objective the setpoint the controller held meanwhile.
    fn figures(&mut self) -> (Option<f64>, Figures) {
        let crowd: Vec<f64> = self
            .seconds
            .iter()
            .filter(|s| s.phase == Phase::Crowd)
            .filter_map(|s| s.setpoint_ms)
            .collect();
        let objective_ms = median(crowd);
        for (scored, second) in self.scored.iter_mut().zip(&self.seconds) {
            scored.lm = second.lm;
        }
        let Some(objective) = objective_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0)) else {
            return (None, Figures::default());
        };
        let limit = objective.as_secs_f64() * 1000.0;
        for (s, (upstream, _)) in self.scored.iter_mut().zip(&self.times) {
            s.within_objective = upstream.iter().filter(|&&ms| ms <= limit).count() as u64;
        }
        let overload = overload::Overload {
            start: self.phases.crowd_start,
            end: self.phases.crowd_end,
        };
        let figures = Figures::of(
            &self.scored,
            overload,
            &Capacity::Growing(UPSTREAM),
            objective,
        );
        (objective_ms, figures)
    }
}

/// The median of `values`, when there are any.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Runs the demo until its traffic ends or `stop` completes (then it stops
/// early, and still writes what it has). `seconds` hears how many seconds
/// of traffic are recorded so far (a test stops the demo on it). Everything
/// it started is stopped when it returns.
pub async fn run(
    args: Args,
    stop: impl Future<Output = ()> + Send + 'static,
    seconds: watch::Sender<u64>,
) -> anyhow::Result<Summary> {
    let k6_binary = k6::binary()?;
    let (stop_tx, mut stopped) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
    });
    let _watcher = AbortOnDrop(watcher);
    let phases = Phases::of(args.duration);

    println!(
        "Sluice demo: starting an upstream, Prometheus, Sluice, sluice-controller and Envoy on 127.0.0.1 ..."
    );
    let parts = tokio::select! {
        parts = Parts::start(&args.policy) => parts?,
        _ = stopped.wait_for(|&s| s) => bail!("interrupted while starting"),
    };
    let front = parts.envoy.listener();
    let (sidecar_admin, controller_admin) = (parts.sidecar.admin_addr, parts.controller.admin_addr);
    println!("  upstream    http://{}", parts.upstream.addr);
    println!(
        "  sluice      grpc {}  admin http://{sidecar_admin}/metrics",
        parts.sidecar.grpc_addr
    );
    println!(
        "  controller  grpc {}  admin http://{controller_admin}/metrics  (ticks every second)",
        parts.controller.grpc_addr
    );
    println!(
        "  envoy       http://{front}  (admin http://127.0.0.1:{})",
        parts.envoy.ports.admin
    );
    println!(
        "  sluice B    grpc {}  behind envoy B http://{}, sharing Redis {} with sluice",
        parts.sidecar_b.grpc_addr,
        parts.envoy_b.listener(),
        parts.redis.addr
    );
    println!(
        "  prometheus  http://{}  (Sluice remote-writes to it every second)",
        parts.prometheus.addr
    );
    println!("  policy      {}", args.policy.display());
    println!();
    println!(
        "k6 ({}) sends traffic through Envoy for {} s, one scenario per source;",
        k6_binary.display(),
        phases.duration
    );
    println!("each request carries user-id and user-type:");
    for s in &SOURCES {
        let when = if s.crowd {
            format!("{}-{}s", phases.crowd_start, phases.crowd_end)
        } else {
            "always".to_owned()
        };
        println!(
            "  {:<12} {:>2}/s {:<7} to {:<14} {}",
            s.name, s.per_second, when, s.path, s.note
        );
    }
    println!("The policy allows each user a burst of 5, then 1 request/s (429 beyond),");
    println!("held across both Sluices (scope: global, in Redis): erin's requests through");
    println!("Envoy A and Envoy B draw on one bucket;");
    println!("closes /beta/* to everyone (403 from a sampler at 0%), and has a load");
    println!("scheduler that favours subscribers (priority 200) over guests (20) when");
    println!("sluice-controller lowers its multiplier (lm) because latency rose above");
    println!("its setpoint (1.5 x the normal latency).");
    println!();

    let plan = k6::Plan {
        target: front,
        target_b: parts.envoy_b.listener(),
        sources_json: serde_json::to_string(&SOURCES)?,
        duration: phases.duration,
        crowd: (phases.crowd_start, phases.crowd_end),
        binary: &k6_binary,
    };
    let k6 = tokio::select! {
        k6 = k6::K6::start(&plan) => k6,
        _ = stopped.wait_for(|&s| s) => Err(anyhow::anyhow!("interrupted while starting k6")),
    };
    let mut k6 = match k6 {
        Ok(k6) => k6,
        Err(e) => {
            parts.stop().await;
            return Err(e);
        }
    };
    let started = Started {
        upstream: parts.upstream.addr,
        envoy: front,
        envoy_b: parts.envoy_b.listener(),
        sluice_b: parts.sidecar_b.grpc_addr,
        redis: parts.redis.addr,
        envoy_admin: ([127, 0, 0, 1], parts.envoy.ports.admin).into(),
        sluice: parts.sidecar.grpc_addr,
        sluice_admin: sidecar_admin,
        controller: parts.controller.grpc_addr,
        controller_admin,
        prometheus: parts.prometheus.addr,
        k6_pid: k6.id(),
    };

    let mut record = Record {
        phases,
        seconds: Vec::new(),
        scored: Vec::new(),
        times: Vec::new(),
        totals: BTreeMap::new(),
        dropped: BTreeMap::new(),
    };
    // What an operator would see with `sluice preview` three seconds into
    // the calm phase, once Alice's burst is spent (printed after the run,
    // so as not to break up the seconds).
    let preview_admin: ::http::Uri = format!("http://{sidecar_admin}").parse()?;
    let preview = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(3));
        sluice::inspect::ask(
            &preview_admin,
            "/v1/preview",
            &[
                ("control_point", "ingress".to_owned()),
                ("samples", PREVIEW_SAMPLES.to_string()),
                ("timeout", "10s".to_owned()),
            ],
            Duration::from_secs(15),
        )
    });
    let mut interrupted = false;
    let mut failure = None;
    let mut lowest: Option<f64> = None;
    let mut last_counts: BTreeMap<String, Decisions> = BTreeMap::new();
    println!("--- calm: the controller learns the normal latency.");
    for t in 0..phases.duration {
        // Second t is [start + t, start + t + 1); k6 flushes its rows every
        // 200 ms, so they are in by a third of a second later.
        let due = k6.started_ms + (t + 1) * 1000 + 350;
        let wait = Duration::from_millis(due.saturating_sub(unix_ms()));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopped.wait_for(|&s| s) => { interrupted = true; break; }
        }
        let readings = Readings::read(controller_admin, sidecar_admin).await;
        record.add(k6.poll());
        if let Some(lm) = readings.lm {
            lowest = Some(lowest.map_or(lm, |l: f64| l.min(lm)));
        }
        let second = record.second(t);
        second.latency_ms = readings.latency;
        second.setpoint_ms = readings.setpoint;
        second.lm = readings.lm;
        for (name, now) in &readings.workloads {
            let before = last_counts.get(name).copied().unwrap_or_default();
            let delta = Decisions {
                accepted: now.accepted.saturating_sub(before.accepted),
                rejected: now.rejected.saturating_sub(before.rejected),
            };
            second.workloads.insert(name.clone(), delta);
            last_counts.insert(name.clone(), *now);
        }
        if t == phases.crowd_start {
            println!("--- t={t}s: the crowd arrives, more than the upstream can serve.");
        } else if t == phases.crowd_end {
            println!(
                "--- t={t}s: the crowd leaves. Once fewer requests arrive than the upstream serves"
            );
            println!("--- (over the controller's signal window), the multiplier is back at 1.");
        }
        println!("{}", live_line(second));
        seconds.send_replace(t + 1);
        if let Ok(Some(status)) = k6.exited()
            && !status.success()
        {
            // After Ctrl-C in a terminal, k6 got it too.
            let signal = tokio::time::timeout(Duration::from_millis(500), stopped.wait_for(|&s| s));
            if signal.await.is_ok() {
                interrupted = true;
            } else {
                failure = Some(format!("k6 failed ({status}):\n{}", k6.log_tail()));
            }
            break;
        }
    }
    if !interrupted && failure.is_none() {
        // The last requests finish (k6's graceful stop).
        tokio::select! {
            _ = k6.wait(Duration::from_secs(10)) => {}
            _ = stopped.wait_for(|&s| s) => interrupted = true,
        }
    }
    if interrupted {
        println!(
            "\ninterrupted: stopping k6, Envoy, Sluice, the controller, Prometheus and the upstream"
        );
    }
    k6.kill().await;
    record.add(k6.poll());
    let mut previewed = None;
    if !interrupted {
        match preview.await {
            Ok(Ok((_, answer))) => {
                println!();
                println!(
                    "What `sluice preview --admin http://{sidecar_admin} --control-point ingress --samples {PREVIEW_SAMPLES}` showed three seconds in:"
                );
                print!("{}", sluice::inspect::render_preview(&answer));
                previewed = Some(answer);
            }
            Ok(Err(e)) => println!("\n(no preview: {e:#})"),
            Err(e) => println!("\n(no preview: {e})"),
        }
    }

    let answers: Vec<Answers> = record
        .totals
        .iter()
        .map(|((source, code, by), (count, with_retry_after))| Answers {
            source: source.clone(),
            code: *code,
            by: by.clone(),
            count: *count,
            with_retry_after: *with_retry_after,
        })
        .collect();
    print_answers(&answers, &record.dropped);
    let erin_admitted = erin(&answers, phases.duration);
    if let Some(lm) = lowest {
        println!("The controller lowered the load multiplier to {lm:.2} at the lowest.");
    }
    let (objective_ms, figures) = record.figures();
    if let Some(objective) = objective_ms {
        println!();
        println!(
            "How well the loop kept the upstream busy and fast during the crowd (the overload bench's figures, objective = the setpoint, {objective:.0} ms):"
        );
        println!("  {}", figures.line());
    }

    // Let the last access logs arrive and a remote-write carrying them go
    // out, then show what Prometheus received.
    if !interrupted {
        tokio::select! {
            () = settled(&parts) => {}
            _ = stopped.wait_for(|&s| s) => interrupted = true,
        }
    }
    let prometheus = received(&parts.prometheus).await;
    parts.stop().await;

    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let summary = Summary {
        interrupted,
        phases,
        seconds: record.seconds,
        answers,
        dropped: record.dropped,
        lowest_lm: lowest,
        objective_ms,
        figures,
        erin_admitted,
        prometheus,
        preview: previewed,
        started,
        svg: args.out.join("demo.svg"),
        json: args.out.join("demo.json"),
    };
    std::fs::write(&summary.json, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("write {}", summary.json.display()))?;
    plot::svg(&summary.svg, &summary).with_context(|| format!("draw {}", summary.svg.display()))?;
    println!();
    println!(
        "The picture of the run: {} (latency and setpoint, multiplier, share admitted per workload)",
        summary.svg.display()
    );
    println!("Every second of it:     {}", summary.json.display());
    if let Some(failure) = failure {
        bail!(failure);
    }
    Ok(summary)
}

/// Erin's admitted requests through each Envoy, printed against what her
/// one global bucket allows in `duration` seconds.
fn erin(answers: &[Answers], duration: u64) -> BTreeMap<String, u64> {
    let through = |via: &str| {
        answers
            .iter()
            .filter(|a| a.source == format!("erin-{via}") && a.code == 200)
            .map(|a| a.count)
            .sum::<u64>()
    };
    let admitted: BTreeMap<String, u64> = ["a", "b"]
        .iter()
        .map(|via| (via.to_string(), through(via)))
        .collect();
    let (a, b) = (admitted["a"], admitted["b"]);
    println!();
    println!(
        "Erin sent 2 requests/s through each Envoy; her one bucket (5, then 1/s) admitted {a} through A + {b} through B = {} in {duration} s.",
        a + b
    );
    println!(
        "Her limit held across both Sluices: at most {} in {duration} s (per-sidecar buckets would have let up to {} through).",
        5 + duration,
        2 * (5 + duration)
    );
    admitted
}

/// Returns once every Check's access log has reached Sluice and
/// Prometheus holds the count of them (or after 15 s, saying so): what the
/// summary then shows from Prometheus is the whole run.
async fn settled(parts: &Parts) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let logs = r#"sum(flowcontrol_access_logs_total)"#;
    let mut ingested = 0.0;
    while tokio::time::Instant::now() < deadline {
        let (mut checks, mut logs_in) = (0.0, 0.0);
        for sidecar in [&parts.sidecar, &parts.sidecar_b] {
            let text = sidecar.engine.metrics().encode_text();
            let value = |series: &str| scrape(&text, series).unwrap_or(0.0);
            checks += value("flowcontrol_requests_total");
            logs_in += value(r#"flowcontrol_access_logs_total{result="matched"}"#)
                + value(r#"flowcontrol_access_logs_total{result="without_flow"}"#);
        }
        ingested = logs_in;
        let written = parts
            .prometheus
            .query_one(logs)
            .await
            .ok()
            .flatten()
            .unwrap_or(0.0);
        if ingested >= checks && written >= ingested {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("Prometheus had not received every access log within 15 s ({ingested} ingested)");
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `t= 19s  latency 319 ms setpoint  33 ms lm 0.17 | alice 429×5 | ...`
fn live_line(second: &Second) -> String {
    let ms = |v: Option<f64>| v.map_or("  -".to_owned(), |v| format!("{v:3.0}"));
    let lm = second.lm.map_or("   -".to_owned(), |v| format!("{v:.2}"));
    let sources: Vec<String> = SOURCES
        .iter()
        .filter(|s| !s.crowd || second.phase == Phase::Crowd || second.answers.contains_key(s.name))
        .map(|s| format!("{} {}", s.name, describe(second.answers.get(s.name))))
        .collect();
    format!(
        "t={:>3}s  latency {} ms setpoint {} ms lm {lm} | {}",
        second.t,
        ms(second.latency_ms),
        ms(second.setpoint_ms),
        sources.join(" | ")
    )
}

fn print_answers(answers: &[Answers], dropped: &BTreeMap<String, u64>) {
    println!();
    println!("Answers per source (HTTP status × count, and who rejected them):");
    for s in &SOURCES {
        let mine: Vec<&Answers> = answers.iter().filter(|a| a.source == s.name).collect();
        let all: u64 = mine.iter().map(|a| a.count).sum();
        if all == 0 {
            println!("  {:<12} -", s.name);
            continue;
        }
        let ok: u64 = mine.iter().filter(|a| a.code == 200).map(|a| a.count).sum();
        let parts: Vec<String> = mine
            .iter()
            .map(|a| {
                let mut part = format!("{}×{}", a.code, a.count);
                if !a.by.is_empty() {
                    part.push_str(&format!(" by {}", a.by));
                }
                if a.with_retry_after == a.count {
                    part.push_str(" with retry-after");
                } else if a.with_retry_after > 0 {
                    part.push_str(&format!(" ({} with retry-after)", a.with_retry_after));
                }
                part
            })
            .collect();
        println!(
            "  {:<12} {:>3.0}% admitted  {}",
            s.name,
            100.0 * ok as f64 / all as f64,
            parts.join(", ")
        );
    }
    if !dropped.is_empty() {
        let what: Vec<String> = dropped.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!(
            "  (k6 had no virtual user free for some requests and did not send them: {})",
            what.join(", ")
        );
    }
}

/// What Prometheus received from Sluice, printed and returned.
async fn received(prometheus: &Prometheus) -> Vec<Received> {
    println!();
    println!("What Prometheus received from Sluice by remote-write:");
    const P50: &str = r#"histogram_quantile(0.5, sum by (le) (flux_meter_bucket{flux_meter_name="latency",http_status_code="200"}))"#;
    const P99: &str = r#"histogram_quantile(0.99, sum by (le) (flux_meter_bucket{flux_meter_name="latency",http_status_code="200"}))"#;
    let mut out = Vec::new();
    for (what, query) in [
        (
            "decisions",
            "sum by (decision_type) (flowcontrol_decisions_total)",
        ),
        (
            "rate limiter",
            "sum by (component, decision_type) (rate_limiter_counter_total)",
        ),
        (
            "sampler",
            "sum by (component, decision_type) (sampler_counter_total)",
        ),
        (
            "scheduler",
            "sum by (workload_index, decision_type) (workload_requests_total)",
        ),
        (
            "flux meter",
            r#"sum by (http_status_code, decision_type) (flux_meter_count{flux_meter_name="latency"})"#,
        ),
        ("latency p50 ms", P50),
        ("latency p99 ms", P99),
    ] {
        match prometheus.query(query).await {
            Ok(samples) => {
                for s in samples {
                    let labels: BTreeMap<String, String> = s
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                        .collect();
                    let shown: Vec<String> =
                        labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("  {what:<15} {:<45} {:.1}", shown.join(" "), s.value);
                    out.push(Received {
                        what: what.to_owned(),
                        labels,
                        value: s.value,
                    });
                }
            }
            Err(e) => {
                // After Ctrl-C in a terminal, Prometheus got it too.
                println!("  Prometheus did not answer ({e:#}); nothing to show");
                return out;
            }
        }
    }
    println!("  (scheduler workload_index 0 = subscribers, 1 = guests)");
    out
}
