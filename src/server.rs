//! A running sidecar: the engine, the Check listener, the admin listener,
//! and the background tasks (policy reload, label-state sweeping), started
//! together and stopped together.
//!
//! [`Sidecar::start`] binds its listeners before returning, so the caller
//! (the CLI, or a test on port 0) knows the real addresses at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use sluice_engine::flow_end::metadata::FlowKey;
use sluice_engine::store::SharedStore;
use sluice_engine::{Engine, EngineOptions, Metrics};
use sluice_policy::{self as policy, watch::Reload};
use sluice_runtime::grpc::ClientTls;
use sluice_runtime::secret::TokenFile;
use sluice_runtime::shutdown::{self, Trigger};
use sluice_runtime::tls::{self, ServerTls, ServerTlsFiles};
use sluice_runtime::{admin as admin_server, grpc, hostname};
use sluice_store::{RedisConfig, RedisStore};
use sluice_time::Clock;

use crate::admin::AdminState;
use crate::envoy::AuthzService;
use crate::otlp::AccessLogs;
use crate::telemetry::SidecarMetrics;
use crate::telemetry::remote_write::{self, RemoteWriteConfig, RemoteWriteMetrics};

/// Everything a sidecar needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where Envoy's Checks arrive (gRPC): TCP or a Unix socket.
    pub grpc_listen: grpc::Listen,
    /// Where `/metrics` and the probes are served (HTTP).
    pub admin_listen: SocketAddr,
    /// Policy file or directory; none means every flow passes.
    pub policy: Option<PathBuf>,
    /// How often the policy path is re-read.
    pub policy_poll_interval: Duration,
    /// Control point of Checks that name none.
    pub default_control_point: String,
    /// Service of Checks that name none.
    pub service: String,
    /// Most label values a component keeps state for.
    pub max_label_values: usize,
    /// Most accepted flows holding concurrency slots at once.
    pub max_inflight_flows: usize,
    /// Largest CheckRequest accepted (bigger ones get gRPC OUT_OF_RANGE).
    pub max_check_request_bytes: usize,
    /// Largest OTLP logs Export accepted (gRPC or HTTP).
    pub max_log_request_bytes: usize,
    /// Serve `POST /v1/logs` on the admin listener. Anyone who can reach
    /// that listener can then feed flux meters (and through them the
    /// controller); turn it off where the admin port is exposed beyond the
    /// pod and Envoy sends logs over gRPC anyway.
    pub otlp_http: bool,
    /// Serve `GET /v1/preview` on the admin listener: samples of live
    /// Checks, their labels (secrets redacted) and decisions.
    pub preview: bool,
    /// Headers whose values previews never show, besides
    /// `authorization`, `proxy-authorization`, `cookie` and `set-cookie`.
    pub preview_redact: Vec<String>,
    /// Where to remote-write metrics, if anywhere. An `instance` label
    /// (`<hostname>:<admin port>`) is added unless one is given.
    pub remote_write: Option<RemoteWriteConfig>,
    /// The key `sluice.flow` values are signed with; a random one when
    /// unset.
    pub flow_key: Option<FlowKey>,
    /// `sluice-controller` to subscribe to, if any.
    pub controller: Option<http::Uri>,
    /// How the link to the controller is secured, and what of its
    /// decisions is believed.
    pub controller_link: ControllerLink,
    /// TLS of the Check and OTLP listener.
    pub grpc_tls: Option<ServerTlsFiles>,
    /// Bounds of the Check and OTLP listener.
    pub grpc_limits: grpc::Limits,
    /// TLS of the admin listener.
    pub admin_tls: Option<ServerTlsFiles>,
    /// The store of `scope: global` components (Redis), if any.
    pub store: Option<RedisConfig>,
    /// Agent group reported to the controller.
    pub agent_group: String,
    /// Instance name reported to the controller (`<hostname>:<admin port>`
    /// when empty).
    pub instance: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_listen: grpc::Listen::Tcp(([127, 0, 0, 1], 8080).into()),
            admin_listen: ([127, 0, 0, 1], 8081).into(),
            policy: None,
            policy_poll_interval: Duration::from_secs(1),
            default_control_point: "ingress".to_owned(),
            service: "any".to_owned(),
            max_label_values: 100_000,
            max_inflight_flows: 100_000,
            max_check_request_bytes: 1 << 20,
            max_log_request_bytes: 16 << 20,
            otlp_http: true,
            preview: true,
            preview_redact: Vec::new(),
            remote_write: None,
            flow_key: None,
            controller: None,
            controller_link: ControllerLink::default(),
            grpc_tls: None,
            grpc_limits: grpc::Limits::default(),
            admin_tls: None,
            store: None,
            agent_group: "default".to_owned(),
            instance: String::new(),
        }
    }
}

/// The sidecar's side of its link to `sluice-controller`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerLink {
    /// TLS for an `https://` controller.
    pub tls: ClientTls,
    /// The bearer token to present, if the controller requires one.
    pub token: Option<TokenFile>,
    /// Longest a decision may hold, whatever it asks for.
    pub max_validity: Duration,
}

impl Default for ControllerLink {
    fn default() -> Self {
        ControllerLink {
            tls: ClientTls::default(),
            token: None,
            max_validity: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// The defaults, with both listeners on free loopback ports.
    pub fn ephemeral() -> Self {
        Config {
            grpc_listen: grpc::Listen::Tcp(([127, 0, 0, 1], 0).into()),
            admin_listen: ([127, 0, 0, 1], 0).into(),
            ..Config::default()
        }
    }
}

/// A started sidecar.
pub struct Sidecar {
    /// The Check listener's TCP address (`0.0.0.0:0` when it serves a Unix
    /// socket).
    pub grpc_addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    /// The engine, for tests and embedding.
    pub engine: Arc<Engine>,
    /// Tells every task to stop.
    shutdown: Trigger,
    /// The tasks, awaited on stop.
    tasks: Vec<JoinHandle<()>>,
    /// Queued Checks answered because the sidecar stopped.
    drained: Arc<std::sync::atomic::AtomicU64>,
}

impl Sidecar {
    /// Loads the policy, binds both listeners and starts serving. A policy
    /// that does not validate is an error here: there is none in force yet
    /// that could stay.
    pub async fn start(config: &Config) -> anyhow::Result<Sidecar> {
        let metrics = Metrics::new();
        let sidecar_metrics = SidecarMetrics::register(metrics.registry())?;
        let clock = Clock::new();
        let store = match &config.store {
            Some(redis) => Some(
                RedisStore::start(redis, metrics.registry(), clock.clone())
                    .context("cannot set up the store")? as SharedStore,
            ),
            None => None,
        };
        let engine = Arc::new(Engine::new(
            clock,
            metrics.clone(),
            EngineOptions {
                max_label_values: config.max_label_values,
                max_inflight_flows: config.max_inflight_flows,
                store,
                flow_key: config.flow_key,
                preview_redact: config.preview_redact.clone(),
                max_previews: sluice_engine::preview::DEFAULT_MAX_OPEN,
                max_decision_validity: config.controller_link.max_validity,
            },
        ));
        let mut fingerprint = 0;
        if let Some(path) = &config.policy {
            let sources = policy::load::read_sources(path)?;
            let set = policy::load::parse_sources(&sources)?;
            fingerprint = policy::load::fingerprint(&sources);
            engine.install(&set)?;
            sidecar_metrics
                .policy_reloads
                .with_label_values(&["ok"])
                .inc();
            tracing::info!(policies = set.policies.len(), path = %path.display(), "policy loaded");
        } else {
            metrics.policy_loaded.set(1);
        }

        let grpc_tls = ServerTls::load_if(config.grpc_tls.as_ref(), tls::GRPC_ALPN)?;
        let admin_tls = ServerTls::load_if(config.admin_tls.as_ref(), tls::ADMIN_ALPN)?;
        let grpc = grpc::Bound::bind(&config.grpc_listen)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("cannot listen for admin on {}", config.admin_listen))?;
        let grpc_addr = grpc
            .tcp_addr()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let admin_addr = admin.local_addr()?;
        let (shutdown, stop) = shutdown::channel();
        let mut tasks = Vec::new();

        let authz = AuthzService::new(
            engine.clone(),
            &config.default_control_point,
            &config.service,
        )
        .draining_on(stop.clone());
        let drained = authz.drained();
        let access_logs = AccessLogs::new(engine.clone())?;
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<crate::envoy::wire::authorization_server::AuthorizationServer<AuthzService>>(
            )
            .await;
        let router = grpc::server(&config.grpc_limits)
            .add_service(health)
            .add_service(authz.into_server(config.max_check_request_bytes))
            .add_service(
                access_logs
                    .clone()
                    .into_server(config.max_log_request_bytes),
            );
        tasks.push(tokio::spawn(grpc::serve(
            router,
            grpc,
            grpc_tls.clone(),
            config.grpc_limits.connections(),
            stop.clone(),
        )));

        let control_link = match &config.controller {
            Some(url) => {
                let instance = if config.instance.is_empty() {
                    format!("{}:{}", hostname(), admin_addr.port())
                } else {
                    config.instance.clone()
                };
                let identity = crate::control::Identity {
                    agent_group: config.agent_group.clone(),
                    service: config.service.clone(),
                    instance,
                };
                let metrics = crate::control::ControlMetrics::register(metrics.registry())?;
                Some(crate::control::Link::new(url, identity, metrics))
            }
            None => None,
        };
        let admin_state = Arc::new(AdminState {
            engine: engine.clone(),
            ready: false.into(),
            access_logs,
            max_log_request_bytes: config.max_log_request_bytes,
            otlp_http: config.otlp_http,
            preview: config.preview,
            controller: control_link.clone(),
        });
        tasks.push(tokio::spawn(admin_server::serve(
            admin,
            admin_state.clone() as Arc<dyn admin_server::Handler>,
            admin_tls.clone(),
            stop.clone(),
        )));

        let sweeper = engine.clone();
        let mut sweep_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => sweeper.sweep(),
                    _ = sweep_stop.wait() => return,
                }
            }
        }));

        let reread = Arc::new(tokio::sync::Notify::new());
        if let Some(path) = config.policy.clone() {
            let target = engine.clone();
            let reloads = sidecar_metrics.policy_reloads.clone();
            let mut reload_stop = stop.clone();
            tasks.push(tokio::spawn(policy::watch::watch(
                path,
                config.policy_poll_interval,
                fingerprint,
                reread.clone(),
                move |set| target.install(set).map_err(|e| e.to_string()),
                move |outcome| {
                    let result = if outcome == Reload::Applied {
                        "ok"
                    } else {
                        "error"
                    };
                    reloads.with_label_values(&[result]).inc();
                },
                async move { reload_stop.wait().await },
            )));
        }

        tasks.push(sluice_runtime::signal::reread_on_hangup(
            stop.clone(),
            reread.clone(),
            grpc_tls.iter().chain(&admin_tls).cloned().collect(),
        )?);

        if let Some(rw) = &config.remote_write {
            let mut rw = rw.clone();
            if !rw.external_labels.iter().any(|(k, _)| k == "instance") {
                rw.external_labels.push((
                    "instance".to_owned(),
                    format!("{}:{}", hostname(), admin_addr.port()),
                ));
            }
            let rw_metrics = RemoteWriteMetrics::register(metrics.registry())?;
            tracing::info!(url = %rw.url, interval = ?rw.interval, "remote-writing metrics");
            tasks.extend(remote_write::start(
                rw,
                metrics.registry.clone(),
                rw_metrics,
                stop.clone(),
            )?);
        }

        if let (Some(url), Some(link)) = (&config.controller, &control_link) {
            tracing::info!(controller = %url, "subscribing to the controller");
            tasks.push(tokio::spawn(crate::control::subscribe(
                engine.clone(),
                url.clone(),
                config.controller_link.clone(),
                link.clone(),
                stop.clone(),
            )));
        }

        admin_state.ready.store(true, Ordering::Release);
        tracing::info!(grpc = %config.grpc_listen, admin = %admin_addr, "sluice serving");
        Ok(Sidecar {
            grpc_addr,
            admin_addr,
            engine,
            shutdown,
            tasks,
            drained,
        })
    }

    /// Stops accepting, lets in-flight Checks finish (up to `grace`), and
    /// ends every task.
    pub async fn stop(self, grace: Duration) {
        self.shutdown.fire();
        let mut cut = 0;
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(grace, task).await.is_err() {
                abort.abort();
                cut += 1;
            }
        }
        let drained = self.drained.load(Ordering::Relaxed);
        if drained > 0 || cut > 0 {
            tracing::info!(
                queued_checks_answered_unavailable = drained,
                tasks_cut_at_grace = cut,
                "stopped: Checks waiting in scheduler queues were answered UNAVAILABLE (Envoy's failure_mode_allow decides them)"
            );
        }
    }
}
