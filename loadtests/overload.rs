//! The overload bench: how well a control loop keeps a service busy and
//! fast when more traffic comes than it can serve.
//!
//! One run: an upstream of known capacity ([`Profile`]), Prometheus,
//! sluice-controller running one loop ([`Loop`]), Sluice and Envoy on
//! loopback, and an open-loop generator sending two workloads through Envoy
//! (half high priority, half low) in three phases: calm (40 % of the
//! capacity, while the loop learns what normal looks like), overload (twice
//! the capacity), calm again. Every request's outcome and the multiplier
//! in force each second make the record that
//! [`sluice_testkit::overload::Figures`] scores.
//!
//! The loadtest driver runs it for every loop on every profile
//! (`loadtests/run overload`); `tests/overload.rs` runs the short form in
//! CI and asserts the floor. Both include this file by `#[path]`, so it
//! uses nothing else of the driver.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde::Serialize;
use sluice::server::{Config, Sidecar};
use sluice::telemetry::remote_write::RemoteWriteConfig;
use sluice_controller::{Controller, ControllerConfig};
use sluice_testkit::overload::{Figures, Overload, Second};
use sluice_testkit::{Capacity, Envoy, EnvoyPorts, Latency, Prometheus, Upstream, scrape};
use tokio::time::Instant;

/// An upstream whose capacity within its objective is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// The demo's kind: latency grows with requests in flight (20 ms, and
    /// 2 ms more per other request in flight).
    Growing,
    /// A fixed number of workers with a fixed service time; requests beyond
    /// wait in line.
    Workers,
    /// The same, losing half of its workers half-way through the overload.
    Halving,
}

impl Profile {
    /// Every profile, in the order the bench runs them.
    pub const ALL: [Profile; 3] = [Profile::Growing, Profile::Workers, Profile::Halving];

    /// Its name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Growing => "growing",
            Profile::Workers => "workers",
            Profile::Halving => "halving",
        }
    }

    /// How it serves, `halved_after` (for [`Profile::Halving`]) from the
    /// upstream's start. `scale` divides the capacity (the CI's short form
    /// runs a smaller service on a debug build).
    fn capacity(self, scale: u32, halved_after: Duration) -> Capacity {
        let workers = (8 / scale.max(1)).max(2) as usize;
        match self {
            Profile::Growing => Capacity::Growing(Latency {
                base: Duration::from_millis(20),
                per_inflight: Duration::from_millis(2) * scale.max(1),
            }),
            Profile::Workers => Capacity::Workers {
                workers,
                service: Duration::from_millis(20),
                halved_after: None,
            },
            Profile::Halving => Capacity::Workers {
                workers,
                service: Duration::from_millis(20),
                halved_after: Some(halved_after),
            },
        }
    }
}

/// The latency objective of every profile: 1.5 × the idle latency (20 ms),
/// which is also the setpoint of the loops given one.
pub const OBJECTIVE: Duration = Duration::from_millis(30);

/// A control loop, as the circuit of the bench's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loop {
    /// `load_scheduling.average_latency` as the demo has it (tolerance 1.5
    /// over a learned baseline, 5 s signal window, recovery 0.1 per tick).
    AverageLatency,
    /// Aperture's loop, `load_scheduling.aimd`, with its own time constants
    /// (a 30 s latency window read every 10 s, a 0.025 step every 10 s,
    /// the long-term average over 30 m), its long-term query read every
    /// 10 s instead of 30 s (the run is a minute).
    Aimd,
    /// `load_scheduling.capacity` with the objective as its setpoint and a
    /// 2 s signal window (the sidecar remote-writes every second).
    Capacity,
    /// No controller loop: a concurrency scheduler whose limit the sidecar
    /// adapts itself from the access logs (`adaptive:`, the objective as
    /// its setpoint), under a ceiling far above what the upstream takes.
    Adaptive,
}

impl Loop {
    /// Every loop, in the order the bench runs them.
    pub const ALL: [Loop; 4] = [
        Loop::AverageLatency,
        Loop::Aimd,
        Loop::Capacity,
        Loop::Adaptive,
    ];

    /// Its name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Loop::AverageLatency => "average_latency",
            Loop::Aimd => "aimd",
            Loop::Capacity => "capacity",
            Loop::Adaptive => "adaptive",
        }
    }

    /// The `circuit:` of the bench's policy.
    fn circuit(self) -> String {
        match self {
            Loop::AverageLatency => "circuit:
  blueprint: load_scheduling.average_latency
  parameters:
    flux_meter: latency
    load_scheduler: service
    latency_tolerance_multiplier: 1.5
    signal_window: 5s
    baseline_window: 30s
    recovery_step: 0.1
"
            .to_owned(),
            Loop::Aimd => "circuit:
  blueprint: load_scheduling.aimd
  parameters:
    flux_meter: latency
    load_scheduler: service
    long_term_query_periodic_interval: 10s
"
            .to_owned(),
            Loop::Capacity => format!(
                "circuit:
  blueprint: load_scheduling.capacity
  parameters:
    flux_meter: latency
    load_scheduler: service
    latency_setpoint_ms: {}
    signal_window: 2s
",
                OBJECTIVE.as_millis()
            ),
            Loop::Adaptive => String::new(),
        }
    }

    /// The scheduler protecting the upstream: a load scheduler for the
    /// controller's loops, an adaptive concurrency scheduler otherwise.
    fn scheduler(self) -> String {
        match self {
            Loop::Adaptive => format!(
                "concurrency_schedulers:
  - name: service
    selectors: [{{control_point: ingress}}]
    max_concurrency: 1000
    adaptive: {{latency_setpoint_ms: {}}}
",
                OBJECTIVE.as_millis()
            ),
            _ => "load_schedulers:
  - name: service
    selectors: [{control_point: ingress}]
    rate_window: 3s
"
            .to_owned(),
        }
    }
}

/// The bench's policy: a flux meter on the upstream's latency and a
/// scheduler favouring `user-type: high` (priority 200) over `low` (20).
fn policy(lp: Loop) -> String {
    format!(
        "name: overload
classifiers:
  - selectors: [{{control_point: ingress}}]
    rules:
      user_type: {{from: request.http.headers.user-type}}
flux_meters:
  - name: latency
    selectors: [{{control_point: ingress}}]
    static_buckets: [5, 10, 15, 20, 25, 30, 40, 50, 75, 100, 250, 1000]
{}    scheduler:
      workloads:
        - name: high
          label_matcher: {{match_labels: {{user_type: high}}}}
          parameters: {{priority: 200, queue_timeout: 250ms}}
        - name: low
          label_matcher: {{match_labels: {{user_type: low}}}}
          parameters: {{priority: 20, queue_timeout: 250ms}}
{}",
        lp.scheduler(),
        lp.circuit()
    )
}

/// How long each phase lasts and how the capacity is scaled.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Plan {
    /// Calm before the overload.
    pub calm: Duration,
    /// The overload.
    pub overload: Duration,
    /// Calm after it.
    pub after: Duration,
    /// Capacity divisor (1: the full bench; 2: CI's short form).
    pub scale: u32,
}

impl Plan {
    /// The bench's: 15 s calm, 30 s overload, 15 s calm.
    pub fn full() -> Plan {
        Plan {
            calm: Duration::from_secs(15),
            overload: Duration::from_secs(30),
            after: Duration::from_secs(15),
            scale: 1,
        }
    }

    /// CI's: 8 s calm, 15 s overload, 12 s calm, half the capacity.
    pub fn short() -> Plan {
        Plan {
            calm: Duration::from_secs(8),
            overload: Duration::from_secs(15),
            after: Duration::from_secs(12),
            scale: 2,
        }
    }
}

/// One run's record and figures.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The upstream.
    pub profile: Profile,
    /// The loop.
    pub control: Loop,
    /// The upstream's capacity within the objective before and after it
    /// lost workers, requests/s.
    pub capacity: (f64, f64),
    /// The overloaded seconds.
    pub overload: Overload,
    /// Every second.
    pub seconds: Vec<Second>,
    /// Their figures.
    pub figures: Figures,
}

/// The parts on loopback, stopped by [`Stack::stop`].
struct Stack {
    upstream: Upstream,
    /// When the upstream's clock started.
    upstream_started: Instant,
    prometheus: Prometheus,
    controller: Controller,
    sidecar: Sidecar,
    envoy: Envoy,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// Starts everything, the upstream last (on a port reserved for it):
    /// its clock, which decides when a [`Profile::Halving`] upstream loses
    /// workers, starts right before the traffic.
    async fn start(capacity: Capacity, lp: Loop) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-overload")
            .tempdir()?;
        let policy = dir.path().join("overload.yaml");
        std::fs::write(&policy, self::policy(lp))?;
        let upstream_port = sluice_testkit::free_port()?;
        let prometheus = Prometheus::start(&[], Duration::from_secs(1)).await?;
        let loopback = "127.0.0.1:0".parse()?;
        let controller = Controller::start(ControllerConfig {
            tick: Duration::from_secs(1),
            decision_validity: Duration::from_secs(3),
            ..ControllerConfig::new(
                policy.clone(),
                &format!("http://{}", prometheus.addr),
                loopback,
                loopback,
            )
        })
        .await?;
        let sidecar = Sidecar::start(&Config {
            policy: Some(policy.clone()),
            controller: Some(format!("http://{}", controller.grpc_addr).parse()?),
            remote_write: Some(RemoteWriteConfig {
                url: prometheus.remote_write_url().parse()?,
                interval: Duration::from_secs(1),
                external_labels: vec![("job".to_owned(), "sluice-overload".to_owned())],
                bearer_token: None,
                ca_file: None,
                max_queued_batches: 30,
                timeout: Duration::from_secs(5),
            }),
            ..Config::ephemeral()
        })
        .await?;
        let envoy = Envoy::start(
            "envoy-configs/quickstart.yaml",
            EnvoyPorts::free(upstream_port, sidecar.grpc_addr.port())?,
        )
        .await?;
        let upstream_started = Instant::now();
        let upstream = Upstream::start_with(upstream_port, capacity).await?;
        Ok(Stack {
            upstream,
            upstream_started,
            prometheus,
            controller,
            sidecar,
            envoy,
            _dir: dir,
        })
    }

    async fn stop(self) {
        drop(self.envoy);
        self.sidecar.stop(Duration::from_secs(2)).await;
        self.controller.stop(Duration::from_secs(2)).await;
        drop(self.prometheus);
        drop(self.upstream);
    }

    /// The load multiplier and the concurrency limit in force in Sluice
    /// now (whichever the loop has).
    fn control(&self) -> (Option<f64>, Option<u64>) {
        let text = self.sidecar.engine.metrics().encode_text();
        let series = |name: &str| {
            scrape(
                &text,
                &format!(r#"{name}{{component="service",policy_name="overload"}}"#),
            )
        };
        (
            series("token_bucket_lm_ratio"),
            series("concurrency_limit").map(|l| l as u64),
        )
    }
}

/// One request's outcome.
#[derive(Clone, Copy, Debug)]
struct Shot {
    /// When it was sent and answered, ms since the traffic started.
    sent_ms: u64,
    done_ms: u64,
    /// 0: high priority, 1: low.
    workload: usize,
    /// HTTP status; 0 without an answer.
    status: u16,
    /// Whether Sluice turned it away (`x-sluice-rejected-by`): a 503 from
    /// Envoy itself (its upstream's queue overflowing) is a failure, not a
    /// decision.
    by_sluice: bool,
    /// The upstream's time for it, as Envoy's router measured it
    /// (`x-envoy-upstream-service-time`): the latency the objective is
    /// about. The rest of `done_ms - sent_ms` is the way there and back,
    /// and the time it waited in Sluice's queue.
    upstream_ms: Option<u64>,
}

/// Runs `lp` against `profile` for `plan` and scores it.
pub async fn run(profile: Profile, lp: Loop, plan: Plan) -> anyhow::Result<Outcome> {
    let halved_after = plan.calm + plan.overload / 2;
    let stack = Stack::start(profile.capacity(plan.scale, halved_after), lp)
        .await
        .context("start the overload stack")?;
    let outcome = drive(&stack, profile, lp, plan, halved_after).await;
    stack.stop().await;
    outcome
}

async fn drive(
    stack: &Stack,
    profile: Profile,
    lp: Loop,
    plan: Plan,
    halved_after: Duration,
) -> anyhow::Result<Outcome> {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    let target = stack.envoy.listener();
    // Envoy, Sluice and the controller up, the first decisions flowing.
    let probe = http::Request::get(format!("http://{target}/api/items"))
        .header("user-type", "high")
        .body(Empty::new())?;
    tokio::time::timeout(Duration::from_secs(10), client.request(probe))
        .await
        .context("Envoy did not answer within 10 s")?
        .context("Envoy")?;

    let start = Instant::now();
    // The capacity as the figures see it: its clock from the traffic's start.
    let offset = start.duration_since(stack.upstream_started);
    let capacity = profile.capacity(plan.scale, halved_after.saturating_sub(offset));
    let full = capacity.rate_within(OBJECTIVE, Duration::ZERO);
    let shots: Arc<Mutex<Vec<Shot>>> = Arc::new(Mutex::new(Vec::new()));
    let controls: Arc<Mutex<Controls>> = Arc::default();
    let total = plan.calm + plan.overload + plan.after;

    // The multiplier (or limit) at the end of each second.
    let sampler = {
        let controls = controls.clone();
        let seconds = total.as_secs();
        async move {
            for t in 0..seconds {
                tokio::time::sleep_until(start + Duration::from_secs(t + 1)).await;
                controls.lock().insert(t, stack.control());
            }
        }
    };

    // Open loop: request n of a phase at `phase start + n / rate`, each on
    // its own task, whatever the others are doing.
    // Calm is 40 % of the capacity at the time (a halved upstream's after
    // the overload), overload twice the capacity it started with.
    let last = capacity.rate_within(OBJECTIVE, total);
    let phases = [
        (plan.calm, full * 0.4),
        (plan.overload, full * 2.0),
        (plan.after, last * 0.4),
    ];
    let sender = async {
        let mut tasks = tokio::task::JoinSet::new();
        let mut phase_start = start;
        let mut n = 0u64;
        for (length, rate) in phases {
            let count = (length.as_secs_f64() * rate) as u64;
            for i in 0..count {
                let at = phase_start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at).await;
                let workload = (n % 2) as usize;
                n += 1;
                let (client, shots) = (client.clone(), shots.clone());
                tasks.spawn(async move {
                    let sent_ms = start.elapsed().as_millis() as u64;
                    let request = http::Request::get(format!("http://{target}/api/items"))
                        .header("user-type", ["high", "low"][workload])
                        .body(Empty::new());
                    let answer = match request {
                        Ok(r) => tokio::time::timeout(Duration::from_secs(5), client.request(r))
                            .await
                            .ok()
                            .and_then(Result::ok),
                        Err(_) => None,
                    };
                    let by_sluice = answer
                        .as_ref()
                        .is_some_and(|a| a.headers().contains_key("x-sluice-rejected-by"));
                    let upstream_ms = answer.as_ref().and_then(|a| {
                        a.headers()
                            .get("x-envoy-upstream-service-time")?
                            .to_str()
                            .ok()?
                            .parse()
                            .ok()
                    });
                    shots.lock().push(Shot {
                        sent_ms,
                        done_ms: start.elapsed().as_millis() as u64,
                        workload,
                        status: answer.map_or(0, |a| a.status().as_u16()),
                        by_sluice,
                        upstream_ms,
                    });
                });
                // Finished tasks are reaped as we go.
                while tasks.try_join_next().is_some() {}
            }
            phase_start += length;
        }
        while tasks.join_next().await.is_some() {}
    };
    tokio::join!(sampler, sender);

    let overload = Overload {
        start: plan.calm.as_secs(),
        end: (plan.calm + plan.overload).as_secs(),
    };
    let seconds = record(
        &shots.lock(),
        &controls.lock(),
        total.as_secs(),
        OBJECTIVE.as_millis() as u64,
    );
    let figures = Figures::of(&seconds, overload, &capacity, OBJECTIVE);
    Ok(Outcome {
        profile,
        control: lp,
        capacity: (full, last),
        overload,
        seconds,
        figures,
    })
}

/// The multiplier and the concurrency limit in force at the end of each
/// second.
type Controls = BTreeMap<u64, (Option<f64>, Option<u64>)>;

/// Per second: what was sent (by its start), answered and how fast (by
/// its answer), and the multiplier or limit.
fn record(shots: &[Shot], controls: &Controls, seconds: u64, objective_ms: u64) -> Vec<Second> {
    let mut out: Vec<Second> = (0..seconds)
        .map(|t| Second {
            t,
            lm: controls.get(&t).and_then(|c| c.0),
            limit: controls.get(&t).and_then(|c| c.1),
            ..Second::default()
        })
        .collect();
    let last = seconds.saturating_sub(1) as usize;
    // (upstream ms, end-to-end ms, count) of the admitted, per second.
    let mut sums = vec![(0u64, 0u64, 0u64); out.len()];
    for shot in shots {
        let sent = (shot.sent_ms / 1000) as usize;
        let done = ((shot.done_ms / 1000) as usize).min(last);
        out[sent.min(last)].offered[shot.workload] += 1;
        let second = &mut out[done];
        match shot.status {
            200..=299 => {
                second.admitted[shot.workload] += 1;
                let e2e = shot.done_ms - shot.sent_ms;
                // Without Envoy's header, the whole time is the upstream's.
                let took = shot.upstream_ms.unwrap_or(e2e);
                if took <= objective_ms {
                    second.within_objective += 1;
                }
                sums[done].0 += took;
                sums[done].1 += e2e;
                sums[done].2 += 1;
            }
            _ if shot.by_sluice => second.rejected[shot.workload] += 1,
            _ => second.failed += 1,
        }
    }
    for (second, (upstream, e2e, n)) in out.iter_mut().zip(sums) {
        second.latency_ms = (n > 0).then(|| upstream as f64 / n as f64);
        second.e2e_ms = (n > 0).then(|| e2e as f64 / n as f64);
    }
    out
}

/// A run's live line: `growing average_latency: goodput 0.71 | ...`.
pub fn summary(outcome: &Outcome) -> String {
    format!(
        "{:<8} {:<16} capacity {:.0}/s{}: {}",
        outcome.profile.name(),
        outcome.control.name(),
        outcome.capacity.0,
        if outcome.capacity.1 < outcome.capacity.0 {
            format!(" then {:.0}/s", outcome.capacity.1)
        } else {
            String::new()
        },
        outcome.figures.line()
    )
}

/// The run, second by second: `t  offered  admitted  rejected  latency  lm`.
pub fn trace(outcome: &Outcome) -> String {
    let mut out = String::from(
        "   t  offered hi/lo  admitted hi/lo  rejected hi/lo  failed  in-time  latency ms  lm / limit\n",
    );
    for s in &outcome.seconds {
        out.push_str(&format!(
            "{:>4}  {:>6}/{:<6}  {:>7}/{:<6}  {:>7}/{:<6}  {:>6}  {:>7}  {:>11}  {:>13}  {}\n",
            s.t,
            s.offered[0],
            s.offered[1],
            s.admitted[0],
            s.admitted[1],
            s.rejected[0],
            s.rejected[1],
            s.failed,
            s.within_objective,
            s.latency_ms.map_or("-".to_owned(), |l| format!("{l:.1}")),
            s.e2e_ms.map_or("-".to_owned(), |l| format!("{l:.1}")),
            match (s.lm, s.limit) {
                (Some(lm), _) => format!("{lm:.2}"),
                (None, Some(limit)) => format!("{limit}"),
                (None, None) => "-".to_owned(),
            },
        ));
    }
    out
}
