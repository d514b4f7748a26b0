//! `sluice-controller`: reads signals from Prometheus, runs each policy's
//! circuit every tick, and pushes the outputs to every sidecar.
//!
//! A program of its own: it shares the policy language (`sluice-policy`),
//! the control API's wire types (`sluice-proto`) and the runtime helpers
//! (`sluice-runtime`) with the sidecar, and nothing else.
//!
//! - [`circuit`]: a policy's circuit, compiled and run tick by tick, with
//!   no I/O (tested on synthetic series).
//! - [`promql`]: the PromQL client.
//! - this file: the running controller: the tick loop, the control API
//!   that sidecars subscribe to (a `watch` channel fans the latest
//!   decisions out to every open stream, so the controller never needs to
//!   know where sidecars are), policy reload, and its own `/metrics`.
//! - [`cli`]: the `sluice-controller` command line.
//! - `alerts`: the alerts of the circuits' alerters, as `controller_alert`
//!   series and `GET /v1/alerts` on the admin listener.
//! - `status`: `GET /v1/status` on the admin listener (every circuit's
//!   signals with their ages, the decisions sent, the sidecars subscribed)
//!   and the table `sluice-controller status` prints from it.
//!
//! When Prometheus cannot be asked, the controller holds the outputs it
//! computed last (re-sent with a fresh `valid_until`) for at most
//! `hold_outputs_for`, and says so (`controller_prometheus_up` 0,
//! `controller_outputs_held` 1, a log line); after that it sends nothing
//! and the sidecars' decisions lapse to their policies' values.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod alerts;
pub mod circuit;
pub mod cli;
pub mod promql;
mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::Mutex;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt as _};

use circuit::{Circuit, Output, Target};
use sluice_policy::{self as policy, PolicySet};
use sluice_proto::control as wire;
use sluice_runtime::admin::{self, Handler};
use sluice_runtime::secret::TokenFile;
use sluice_runtime::shutdown::{self, Shutdown, Trigger};
use sluice_runtime::tls::{ServerTls, ServerTlsFiles};
use sluice_time::{Clock, unix_ms};

/// Everything a controller needs to start.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Policy file or directory (the sidecars' files, with `circuit:`).
    pub policy: PathBuf,
    /// How often the policy path is re-read.
    pub policy_poll_interval: Duration,
    /// Prometheus's base URL.
    pub prometheus_url: String,
    /// PEM CAs to trust for an https Prometheus.
    pub prometheus_ca_file: Option<PathBuf>,
    /// Where sidecars subscribe (gRPC).
    pub listen: SocketAddr,
    /// Where `/metrics`, `/healthz`, `/readyz`, `/v1/alerts` and
    /// `/v1/status` are served.
    pub admin_listen: SocketAddr,
    /// How often circuits run.
    pub tick: Duration,
    /// How long a decision holds (`valid_until` = now + this).
    pub decision_validity: Duration,
    /// How long last outputs are held while Prometheus cannot be asked.
    pub hold_outputs_for: Duration,
    /// Connections the control listener keeps open: one per subscribed
    /// sidecar, since a subscription never ends. A sidecar beyond it is
    /// closed and retries, so keep it above the sidecar count.
    pub max_connections: usize,
    /// TLS of the control listener (mTLS when it names a client CA).
    pub tls: Option<ServerTlsFiles>,
    /// TLS of the admin listener.
    pub admin_tls: Option<ServerTlsFiles>,
    /// The bearer token a sidecar must present to subscribe, if any.
    pub token: Option<TokenFile>,
}

impl ControllerConfig {
    /// Defaults around `policy`, on the given listeners.
    pub fn new(
        policy: PathBuf,
        prometheus_url: &str,
        listen: SocketAddr,
        admin_listen: SocketAddr,
    ) -> Self {
        ControllerConfig {
            policy,
            policy_poll_interval: Duration::from_secs(1),
            prometheus_url: prometheus_url.to_owned(),
            prometheus_ca_file: None,
            listen,
            admin_listen,
            tick: Duration::from_secs(10),
            decision_validity: Duration::from_secs(30),
            hold_outputs_for: Duration::from_secs(120),
            max_connections: 4096,
            tls: None,
            admin_tls: None,
            token: None,
        }
    }
}

/// The controller's metrics: the loop, plottable.
#[derive(Clone)]
struct Metrics {
    registry: Registry,
    signal: GaugeVec,
    output: GaugeVec,
    ticks: IntCounter,
    tick_seconds: Histogram,
    prometheus_up: IntGauge,
    prometheus_errors: IntCounter,
    held: IntGaugeVec,
    subscribers: IntGauge,
    refused: IntCounter,
}

impl Metrics {
    fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| -> anyhow::Result<GaugeVec> {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let signal = gauge_vec(
            "controller_signal",
            "Each circuit signal after the last tick (NaN: missing).",
            &["policy_name", "signal"],
        )?;
        let output = gauge_vec(
            "controller_output",
            "Each actuator's output after the last tick.",
            &["policy_name", "component", "field"],
        )?;
        let ticks = IntCounter::new("controller_ticks_total", "Ticks run.")?;
        registry.register(Box::new(ticks.clone()))?;
        let tick_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "controller_tick_duration_seconds",
                "How long each tick took to compute its decisions (the queries to Prometheus and every circuit), up to the moment they are sent.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        registry.register(Box::new(tick_seconds.clone()))?;
        let prometheus_up = IntGauge::new(
            "controller_prometheus_up",
            "1 when the last tick's queries all got an answer from Prometheus.",
        )?;
        registry.register(Box::new(prometheus_up.clone()))?;
        let prometheus_errors = IntCounter::new(
            "controller_prometheus_errors_total",
            "Queries Prometheus could not answer.",
        )?;
        registry.register(Box::new(prometheus_errors.clone()))?;
        let held = IntGaugeVec::new(
            Opts::new(
                "controller_outputs_held",
                "1 while a policy's last outputs are held because Prometheus cannot be asked.",
            ),
            &["policy_name"],
        )?;
        registry.register(Box::new(held.clone()))?;
        let subscribers = IntGauge::new("controller_subscribers", "Sidecars subscribed now.")?;
        registry.register(Box::new(subscribers.clone()))?;
        let refused = IntCounter::new(
            "controller_subscriptions_refused_total",
            "Subscriptions refused for a missing or wrong bearer token.",
        )?;
        registry.register(Box::new(refused.clone()))?;
        #[cfg(target_os = "linux")]
        let _ = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        Ok(Metrics {
            registry,
            signal,
            output,
            ticks,
            tick_seconds,
            prometheus_up,
            prometheus_errors,
            held,
            subscribers,
            refused,
        })
    }
}

/// One policy's circuit, running.
struct Running {
    name: String,
    hash: u64,
    circuit: Circuit,
    /// What the circuit last computed from fresh data.
    last: Vec<Output>,
    /// When that was (engine clock); `None` before the first fresh tick.
    last_fresh: Option<u64>,
    /// When each of the circuit's alerts fired and resolved.
    alert_times: Vec<alerts::Times>,
    /// When the circuit last ran (on answered queries), unix ms, for
    /// `/v1/status`.
    ran_unix_ms: Option<i64>,
    /// When each signal (in [`Circuit::signals`] order) was last computed
    /// anew, unix ms: its age in `/v1/status`.
    signal_at: Vec<Option<i64>>,
    /// How its last round of queries went.
    queried: Option<status::Queried>,
    /// Whether its last outputs are being re-sent because Prometheus
    /// cannot be asked (`controller_outputs_held`).
    held: bool,
}

impl Running {
    /// A circuit that has not run yet.
    fn new(name: String, hash: u64, circuit: Circuit, alert_times: Vec<alerts::Times>) -> Self {
        Running {
            name,
            hash,
            circuit,
            last: Vec::new(),
            last_fresh: None,
            alert_times,
            ran_unix_ms: None,
            signal_at: Vec::new(),
            queried: None,
            held: false,
        }
    }
}

/// What the tick loop, the reloader and the admin listener share.
struct State {
    running: Mutex<Vec<Running>>,
    tick: Duration,
    /// The last tick's end, for `/v1/status`; `None` before the first.
    last_tick: Mutex<Option<status::LastTick>>,
}

impl State {
    /// Compiles the circuits of `set`, keeping running ones whose policy
    /// is unchanged (their state: EMAs, deciders, integrators); a changed
    /// policy's new circuit takes over its load ramps' places and its
    /// alerts' states ([`Circuit::carry_over`]).
    fn install(&self, set: &PolicySet) {
        let mut running = self.running.lock();
        let mut next = Vec::new();
        for loaded in &set.policies {
            let Some(circuit) = &loaded.policy.circuit else {
                continue;
            };
            let name = loaded.policy.name.value.0.clone();
            if let Some(i) = running
                .iter()
                .position(|r| r.name == name && r.hash == loaded.hash)
            {
                next.push(running.swap_remove(i));
                continue;
            }
            // Validated when the policy loaded.
            let Ok(components) = circuit.value.expand(&name) else {
                continue;
            };
            tracing::info!(policy = %name, components = components.len(), "circuit loaded");
            let mut circuit = Circuit::compile(&components, self.tick);
            let mut alert_times = Vec::new();
            if let Some(old) = running.iter().find(|r| r.name == name) {
                circuit.carry_over(&old.circuit);
                alert_times =
                    alerts::carry_over(circuit.alerts(), old.circuit.alerts(), &old.alert_times);
            }
            next.push(Running::new(name, loaded.hash, circuit, alert_times));
        }
        *running = next;
    }
}

/// An actuator output as decisions on the wire.
fn decision(policy: &Running, output: &Output, valid_until: i64) -> Option<wire::Decision> {
    use wire::decision::Action;
    let action = match &output.target {
        // Sidecars refuse a multiplier above 1; at 1 they pass everything.
        Target::LoadMultiplier(c) => Action::LoadMultiplier(wire::LoadMultiplier {
            load_scheduler: c.clone(),
            multiplier: output.value?.clamp(0.0, 1.0),
        }),
        Target::AcceptPercentage(c) => Action::AcceptPercentage(wire::AcceptPercentage {
            sampler: c.clone(),
            percentage: output.value?.clamp(0.0, 100.0),
        }),
        Target::MaxConcurrency(c) => Action::MaxConcurrency(wire::MaxConcurrency {
            concurrency_limiter: c.clone(),
            max_concurrency: output.value?.max(0.0).round() as u64,
        }),
        Target::RateLimit(c) => Action::RateLimit(wire::RateLimit {
            rate_limiter: c.clone(),
            bucket_capacity: output.value.map(|v| v.max(0.0)),
            fill_amount: output.fill_amount.map(|v| v.max(0.0)),
        }),
        Target::QuotaBucket(c) => Action::QuotaBucket(wire::QuotaBucket {
            quota_scheduler: c.clone(),
            bucket_capacity: output.value.map(|v| v.max(0.0)),
            fill_amount: output.fill_amount.map(|v| v.max(0.0)),
        }),
        Target::SchedulerConcurrency(c) => {
            Action::SchedulerConcurrency(wire::SchedulerConcurrency {
                concurrency_scheduler: c.clone(),
                max_concurrency: output.value?.max(0.0).round() as u64,
            })
        }
    };
    Some(wire::Decision {
        policy_name: policy.name.clone(),
        policy_hash: format!("{:016x}", policy.hash),
        valid_until_unix_ms: valid_until,
        action: Some(action),
    })
}

/// The component an output drives and the `field` label of its value in
/// `controller_output` (a bucket's fill amount is `fill_amount`).
fn describe(target: &Target) -> (&str, &'static str) {
    match target {
        Target::LoadMultiplier(c) => (c, "load_multiplier"),
        Target::AcceptPercentage(c) => (c, "accept_percentage"),
        Target::MaxConcurrency(c) | Target::SchedulerConcurrency(c) => (c, "max_concurrency"),
        Target::RateLimit(c) | Target::QuotaBucket(c) => (c, "bucket"),
    }
}

/// Runs every policy's circuit once and returns the decisions to send, and
/// whether Prometheus answered every query.
async fn tick(
    state: &State,
    prometheus: &promql::Prometheus,
    metrics: &Metrics,
    config: &ControllerConfig,
    clock: &Clock,
) -> (wire::DecisionSet, bool) {
    metrics.ticks.inc();
    // Ask Prometheus first, without holding the state lock across awaits.
    let queries: Vec<(String, Vec<(usize, String)>)> = state
        .running
        .lock()
        .iter()
        .map(|r| {
            let due = r
                .circuit
                .due_queries()
                .into_iter()
                .map(|(i, q)| (i, q.to_owned()))
                .collect();
            (r.name.clone(), due)
        })
        .collect();
    let mut answers: HashMap<String, Result<HashMap<usize, Option<f64>>, String>> = HashMap::new();
    let mut all_up = true;
    for (policy, due) in queries {
        let mut results = HashMap::new();
        let mut failure = None;
        for (i, q) in due {
            match prometheus.query(&q).await {
                Ok(v) => {
                    results.insert(i, v);
                }
                Err(e) => {
                    metrics.prometheus_errors.inc();
                    failure = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        all_up &= failure.is_none();
        answers.insert(policy, failure.map_or(Ok(results), Err));
    }
    metrics.prometheus_up.set(i64::from(all_up));

    let now = clock.now();
    let now_ms = unix_ms();
    let valid_until = now_ms + config.decision_validity.as_millis() as i64;
    let hold = sluice_time::nanos(config.hold_outputs_for);
    let mut decisions = Vec::new();
    let mut running = state.running.lock();
    for r in running.iter_mut() {
        let answered = answers.remove(&r.name);
        if let Some(a) = &answered {
            r.queried = Some(status::Queried {
                unix_ms: now_ms,
                error: a.as_ref().err().cloned(),
            });
        }
        let outputs = match answered {
            Some(Ok(results)) => {
                let firing: Vec<bool> = r.circuit.alerts().iter().map(|a| a.firing).collect();
                let outputs = r.circuit.tick(&results);
                for (a, was) in r.circuit.alerts().iter().zip(&firing) {
                    let (policy, alert, severity) = (&r.name, &a.name, a.severity.name());
                    match (was, a.firing) {
                        (false, true) => tracing::warn!(
                            %policy, %alert, severity, labels = ?a.labels, "alert firing"
                        ),
                        (true, false) => tracing::info!(
                            %policy, %alert, severity, labels = ?a.labels, "alert resolved"
                        ),
                        _ => {}
                    }
                }
                alerts::update(r.circuit.alerts(), &mut r.alert_times, unix_ms());
                for o in &outputs {
                    let before = r.last.iter().find(|l| l.target == o.target);
                    if before.map(|b| (b.value, b.fill_amount)) != Some((o.value, o.fill_amount)) {
                        let (component, field) = describe(&o.target);
                        tracing::info!(
                            policy = %r.name, component, field,
                            value = ?o.value, fill_amount = ?o.fill_amount,
                            "output changed"
                        );
                    }
                }
                for (signal, value) in r.circuit.signals() {
                    metrics
                        .signal
                        .with_label_values(&[&r.name, signal])
                        .set(value.unwrap_or(f64::NAN));
                }
                r.signal_at.resize(r.circuit.signals().count(), None);
                for (at, renewed) in r.signal_at.iter_mut().zip(r.circuit.renewed()) {
                    if renewed {
                        *at = Some(now_ms);
                    }
                }
                r.ran_unix_ms = Some(now_ms);
                r.last.clone_from(&outputs);
                r.last_fresh = Some(now);
                r.held = false;
                metrics.held.with_label_values(&[&r.name]).set(0);
                outputs
            }
            failed => {
                let fresh = r.last_fresh.is_some_and(|t| now.saturating_sub(t) <= hold);
                let was_held = metrics.held.with_label_values(&[&r.name]).get() == 1;
                metrics
                    .held
                    .with_label_values(&[&r.name])
                    .set(i64::from(fresh));
                r.held = fresh;
                if let Some(Err(e)) = failed
                    && !was_held
                {
                    tracing::warn!(
                        policy = %r.name, error = %e,
                        "cannot query Prometheus; holding the last outputs for at most {:?}",
                        config.hold_outputs_for
                    );
                }
                if fresh {
                    r.last.clone()
                } else {
                    if !r.last.is_empty() {
                        // Held long enough: stop sending, and stop showing
                        // outputs nobody receives any more.
                        tracing::warn!(
                            policy = %r.name,
                            "no fresh signals for {:?}: no longer sending outputs; sidecars return to their policy's values when the last ones lapse",
                            config.hold_outputs_for
                        );
                        for o in r.last.drain(..) {
                            let (component, field) = describe(&o.target);
                            for field in [field, "fill_amount"] {
                                let _ = metrics
                                    .output
                                    .remove_label_values(&[&r.name, component, field]);
                            }
                        }
                    }
                    Vec::new()
                }
            }
        };
        for o in &outputs {
            let (component, field) = describe(&o.target);
            if let Some(v) = o.value {
                metrics
                    .output
                    .with_label_values(&[&r.name, component, field])
                    .set(v);
            }
            if let Some(v) = o.fill_amount {
                metrics
                    .output
                    .with_label_values(&[&r.name, component, "fill_amount"])
                    .set(v);
            }
            decisions.extend(decision(r, o, valid_until));
        }
    }
    (
        wire::DecisionSet {
            decisions,
            sent_unix_ms: unix_ms(),
        },
        all_up,
    )
}

/// The control API: every subscriber gets the latest decision set at once,
/// then each new one. With a token file, only a sidecar presenting its
/// token gets anything: decisions tell whoever reads them how each service
/// is throttled.
struct ControlService {
    decisions: watch::Receiver<Arc<wire::DecisionSet>>,
    /// Who is subscribed (and `controller_subscribers`).
    subscribers: Arc<status::Subscribers>,
    token: Option<TokenFile>,
    refused: IntCounter,
}

impl ControlService {
    /// Whether `request` may subscribe: it presents the token in the file
    /// now (read on every Subscribe, so a rotated token takes effect).
    async fn admit<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        let Some(file) = &self.token else {
            return Ok(());
        };
        let token = file.read().await.map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "cannot read the token file; refusing subscriptions");
            tonic::Status::unavailable("the controller cannot read its token")
        })?;
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        if TokenFile::admits(&token, presented) {
            return Ok(());
        }
        if self.refused.get() == 0 {
            tracing::warn!(peer = ?sluice_runtime::grpc::remote_addr(request), "refused a subscription without the right token (counted in controller_subscriptions_refused_total from now on)");
        }
        self.refused.inc();
        Err(tonic::Status::unauthenticated(
            "a bearer token is required to subscribe",
        ))
    }
}

type DecisionStream = Pin<Box<dyn Stream<Item = Result<wire::DecisionSet, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl wire::control_server::Control for ControlService {
    type SubscribeStream = DecisionStream;

    async fn subscribe(
        &self,
        request: tonic::Request<wire::SubscribeRequest>,
    ) -> Result<tonic::Response<DecisionStream>, tonic::Status> {
        self.admit(&request).await?;
        let peer = sluice_runtime::grpc::remote_addr(&request);
        let who = request.into_inner();
        tracing::info!(
            agent_group = %who.agent_group, service = %who.service, instance = %who.instance,
            "sidecar subscribed"
        );
        // Listed in /v1/status until the stream ends and drops it.
        let guard = self.subscribers.add(&who, peer, unix_ms());
        let stream =
            tokio_stream::wrappers::WatchStream::new(self.decisions.clone()).map(move |set| {
                let _ = &guard;
                Ok((*set).clone())
            });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// The controller's admin endpoints.
struct Admin {
    metrics: Metrics,
    state: Arc<State>,
    /// The decisions sent last, for `/v1/status`.
    decisions: watch::Receiver<Arc<wire::DecisionSet>>,
    /// Who is subscribed, for `/v1/status`.
    subscribers: Arc<status::Subscribers>,
    ready: std::sync::atomic::AtomicBool,
}

impl Admin {
    /// `GET /v1/status`: 200 with the body, or 400 for a parameter it does
    /// not take or a policy it does not run.
    fn status(&self, query: Option<&str>) -> http::Response<admin::Body> {
        use http::StatusCode;
        let answer = status::parse_query(query).and_then(|policy| {
            // Clone the Arc and let go of the channel at once: the tick
            // publishes on it.
            let sent = self.decisions.borrow().clone();
            status::json(
                &self.state,
                &sent,
                &self.subscribers,
                policy.as_deref(),
                unix_ms(),
            )
        });
        match answer {
            Ok(body) => admin::answer(StatusCode::OK, "application/json", body),
            Err(reason) => admin::answer(StatusCode::BAD_REQUEST, admin::TEXT, reason + "\n"),
        }
    }
}

impl Handler for Admin {
    fn handle(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> Pin<Box<dyn Future<Output = http::Response<admin::Body>> + Send + '_>> {
        Box::pin(async move {
            use admin::TEXT;
            use http::StatusCode;
            match (req.method(), req.uri().path()) {
                (&http::Method::GET, "/metrics") => {
                    use prometheus::Encoder;
                    let mut out = Vec::new();
                    let _ = prometheus::TextEncoder::new()
                        .encode(&self.metrics.registry.gather(), &mut out);
                    admin::answer(StatusCode::OK, admin::METRICS, out)
                }
                (&http::Method::GET, "/healthz") => admin::answer(StatusCode::OK, TEXT, "ok\n"),
                (&http::Method::GET, "/v1/alerts") => admin::answer(
                    StatusCode::OK,
                    "application/json",
                    alerts::json(&self.state),
                ),
                (&http::Method::GET, "/v1/status") => self.status(req.uri().query()),
                (&http::Method::GET, "/readyz") => {
                    if self.ready.load(std::sync::atomic::Ordering::Acquire) {
                        admin::answer(StatusCode::OK, TEXT, "ready\n")
                    } else {
                        admin::answer(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n")
                    }
                }
                (_, "/metrics" | "/healthz" | "/readyz" | "/v1/alerts" | "/v1/status") => {
                    admin::answer(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n")
                }
                _ => admin::answer(StatusCode::NOT_FOUND, TEXT, "not found\n"),
            }
        })
    }
}

/// A started controller.
pub struct Controller {
    /// Where sidecars subscribe.
    pub grpc_addr: SocketAddr,
    /// Where its admin endpoints are.
    pub admin_addr: SocketAddr,
    shutdown: Trigger,
    tasks: Vec<JoinHandle<()>>,
}

impl Controller {
    /// Loads the policies, binds both listeners and starts ticking.
    pub async fn start(config: ControllerConfig) -> anyhow::Result<Controller> {
        let sources = policy::load::read_sources(&config.policy)?;
        let set = policy::load::parse_sources(&sources)?;
        let fingerprint = policy::load::fingerprint(&sources);
        let metrics = Metrics::new()?;
        let state = Arc::new(State {
            running: Mutex::new(Vec::new()),
            tick: config.tick,
            last_tick: Mutex::new(None),
        });
        state.install(&set);
        metrics
            .registry
            .register(Box::new(alerts::AlertSeries::new(state.clone())?))?;
        let client = sluice_runtime::http_client::build(
            config.prometheus_ca_file.as_deref(),
            config.tick.min(Duration::from_secs(5)),
        )?;
        let prometheus = promql::Prometheus::new(
            client,
            &config.prometheus_url,
            (config.tick / 2).max(Duration::from_millis(200)),
        );

        let tls = ServerTls::load_if(config.tls.as_ref(), sluice_runtime::tls::GRPC_ALPN)?;
        let admin_tls =
            ServerTls::load_if(config.admin_tls.as_ref(), sluice_runtime::tls::ADMIN_ALPN)?;
        let grpc = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", config.listen))?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("cannot listen for admin on {}", config.admin_listen))?;
        let grpc_addr = grpc.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let (trigger, stop) = shutdown::channel();
        let (publish, decisions) = watch::channel(Arc::new(wire::DecisionSet::default()));
        let mut tasks = Vec::new();

        let subscribers = status::Subscribers::new(metrics.subscribers.clone());
        let service = ControlService {
            decisions: decisions.clone(),
            subscribers: subscribers.clone(),
            token: config.token.clone(),
            refused: metrics.refused.clone(),
        };
        let limits = sluice_runtime::grpc::Limits {
            max_connections: config.max_connections,
            ..sluice_runtime::grpc::Limits::default()
        };
        let router = sluice_runtime::grpc::server(&limits)
            .add_service(wire::control_server::ControlServer::new(service));
        tasks.push(tokio::spawn(sluice_runtime::grpc::serve(
            router,
            sluice_runtime::grpc::Bound::Tcp(grpc),
            tls.clone(),
            limits.connections(),
            stop.clone(),
        )));

        let admin = Arc::new(Admin {
            metrics: metrics.clone(),
            state: state.clone(),
            decisions,
            subscribers,
            ready: false.into(),
        });
        tasks.push(tokio::spawn(admin::serve(
            admin_listener,
            admin.clone(),
            admin_tls.clone(),
            stop.clone(),
        )));

        let reload_state = state.clone();
        let mut reload_stop = stop.clone();
        let reread = Arc::new(tokio::sync::Notify::new());
        tasks.push(sluice_runtime::signal::reread_on_hangup(
            stop.clone(),
            reread.clone(),
            tls.iter().chain(&admin_tls).cloned().collect(),
        )?);
        tasks.push(tokio::spawn(policy::watch::watch(
            config.policy.clone(),
            config.policy_poll_interval,
            fingerprint,
            reread,
            move |set| {
                reload_state.install(set);
                Ok(())
            },
            |_| {},
            async move { reload_stop.wait().await },
        )));

        let clock = Clock::new();
        let loop_config = config.clone();
        tasks.push(tokio::spawn(ticker(
            state,
            prometheus,
            metrics,
            loop_config,
            clock,
            publish,
            stop,
        )));
        admin
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(grpc = %grpc_addr, admin = %admin_addr, tick = ?config.tick, "sluice-controller serving");
        Ok(Controller {
            grpc_addr,
            admin_addr,
            shutdown: trigger,
            tasks,
        })
    }

    /// Stops everything it started.
    pub async fn stop(self, grace: Duration) {
        self.shutdown.fire();
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(grace, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

async fn ticker(
    state: Arc<State>,
    prometheus: promql::Prometheus,
    metrics: Metrics,
    config: ControllerConfig,
    clock: Clock,
    publish: watch::Sender<Arc<wire::DecisionSet>>,
    mut stop: Shutdown,
) {
    let mut interval = tokio::time::interval(config.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait() => return,
        }
        let started = clock.now();
        let (set, prometheus_up) = tick(&state, &prometheus, &metrics, &config, &clock).await;
        let took = clock.now().saturating_sub(started);
        metrics.tick_seconds.observe(took as f64 / 1e9);
        publish.send_replace(Arc::new(set));
        *state.last_tick.lock() = Some(status::LastTick {
            ended_unix_ms: unix_ms(),
            took: Duration::from_nanos(took),
            prometheus_up,
            count: metrics.ticks.get(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::decision::Action;

    fn running() -> Running {
        Running::new(
            "p".to_owned(),
            0xabc,
            Circuit::compile(&[], Duration::from_secs(1)),
            Vec::new(),
        )
    }

    fn output(target: Target, value: Option<f64>, fill_amount: Option<f64>) -> Output {
        Output {
            target,
            value,
            fill_amount,
        }
    }

    #[test]
    fn load_multipliers_go_out_within_zero_and_one() {
        // Sidecars refuse a multiplier outside [0, 1] (and keep the last
        // one); at 1 they pass everything.
        let r = running();
        for (value, sent) in [(1.7, 1.0), (0.4, 0.4), (-0.2, 0.0)] {
            let d = decision(
                &r,
                &output(Target::LoadMultiplier("ls".into()), Some(value), None),
                7,
            )
            .expect("a decision");
            assert_eq!(
                d.action,
                Some(Action::LoadMultiplier(wire::LoadMultiplier {
                    load_scheduler: "ls".to_owned(),
                    multiplier: sent,
                })),
                "{value}"
            );
        }
    }

    #[test]
    fn scheduler_outputs_go_out_as_their_own_actions() {
        let r = running();
        let quota = decision(
            &r,
            &output(Target::QuotaBucket("q".into()), None, Some(-2.0)),
            7,
        )
        .expect("a fill amount alone is a decision");
        assert_eq!(
            (quota.policy_hash.as_str(), quota.valid_until_unix_ms),
            ("0000000000000abc", 7)
        );
        assert_eq!(
            quota.action,
            Some(Action::QuotaBucket(wire::QuotaBucket {
                quota_scheduler: "q".to_owned(),
                bucket_capacity: None,
                // Sidecars refuse a negative bucket; the circuit's
                // arithmetic may well produce one.
                fill_amount: Some(0.0),
            }))
        );
        let slots = decision(
            &r,
            &output(Target::SchedulerConcurrency("c".into()), Some(2.6), None),
            7,
        )
        .expect("a decision");
        assert_eq!(
            slots.action,
            Some(Action::SchedulerConcurrency(wire::SchedulerConcurrency {
                concurrency_scheduler: "c".to_owned(),
                max_concurrency: 3,
            }))
        );
        assert!(
            decision(
                &r,
                &output(Target::SchedulerConcurrency("c".into()), None, None),
                7
            )
            .is_none(),
            "nothing to send"
        );
        assert_eq!(describe(&Target::QuotaBucket("q".into())), ("q", "bucket"));
        assert_eq!(
            describe(&Target::SchedulerConcurrency("c".into())),
            ("c", "max_concurrency")
        );
    }
}
