//! The `sluice` command line.
//!
//! `sluice [FLAGS]` runs the sidecar; `sluice validate PATH...` checks
//! policies and exits. Every flag can also be set by an environment
//! variable named `SLUICE_<FLAG>` (e.g. `SLUICE_GRPC_LISTEN`), which is how
//! Kubernetes manifests usually configure a sidecar.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::policy;
use crate::server::{Config, Sidecar};

/// Sluice: a flow-control sidecar for Envoy and Istio.
///
/// Answers Envoy's External Authorization (v3, gRPC) Checks with decisions
/// from local policies: classifiers, samplers and rate limiters, with
/// Aperture's names.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A command other than running the sidecar.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of the sidecar.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Commands besides running.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check policy files or directories and exit: 0 if all load, 1 with
    /// `file:line:column: field: problem` for the first error of each
    /// path otherwise.
    Validate {
        /// Policy files or directories (as for --policy).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// How logs are written.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Flags of the sidecar.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Address for Envoy's ext_authz Checks and the gRPC health service.
    #[arg(long, env = "SLUICE_GRPC_LISTEN", default_value = "127.0.0.1:8080")]
    pub grpc_listen: SocketAddr,
    /// Address for /metrics, /healthz, /readyz and /control-points.
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    pub admin_listen: SocketAddr,
    /// Policy file, or directory whose *.yaml files are loaded. Re-read on
    /// change; an invalid change is logged and the policy in force stays.
    /// Without it every request is accepted.
    #[arg(long, env = "SLUICE_POLICY")]
    pub policy: Option<PathBuf>,
    /// How often the policy path is checked for changes.
    #[arg(long, env = "SLUICE_POLICY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub policy_poll_interval: Duration,
    /// Control point of Checks that name none (in gRPC metadata
    /// `control-point` or context extension `control-point`).
    #[arg(long, env = "SLUICE_DEFAULT_CONTROL_POINT", default_value = "ingress")]
    pub default_control_point: String,
    /// Service of Checks that name none (context extension `service`).
    #[arg(long, env = "SLUICE_SERVICE", default_value = "any")]
    pub service: String,
    /// Most label values (users, API keys...) one component keeps state
    /// for; beyond it the least recently used are evicted and counted.
    #[arg(long, env = "SLUICE_MAX_LABEL_VALUES", default_value_t = 100_000)]
    pub max_label_values: usize,
    /// Largest CheckRequest accepted, in bytes (headers plus any body Envoy
    /// sends); larger ones are answered with gRPC status OUT_OF_RANGE.
    #[arg(long, env = "SLUICE_MAX_CHECK_REQUEST_BYTES", default_value_t = 16 << 20)]
    pub max_check_request_bytes: usize,
    /// Worker threads of the async runtime; 0 for one per core (at most 4).
    /// A sidecar shares its pod's cores, so the default is small.
    #[arg(long, env = "SLUICE_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing
    /// directives such as `info,sluice=debug`.
    #[arg(long, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log line format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    policy::types::DurationSpec::parse(s)
}

impl RunArgs {
    /// The sidecar configuration these flags describe.
    pub fn config(&self) -> Config {
        Config {
            grpc_listen: self.grpc_listen,
            admin_listen: self.admin_listen,
            policy: self.policy.clone(),
            policy_poll_interval: self.policy_poll_interval,
            default_control_point: self.default_control_point.clone(),
            service: self.service.clone(),
            max_label_values: self.max_label_values,
            max_check_request_bytes: self.max_check_request_bytes,
        }
    }
}

fn init_logging(args: &RunArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).unwrap_or_else(|e| {
        eprintln!("invalid --log-level {:?}: {e}; using info", args.log_level);
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `sluice validate`: prints one line per path; true when all load.
pub fn validate(paths: &[PathBuf]) -> bool {
    let mut ok = true;
    for path in paths {
        match policy::load_path(path) {
            Ok(set) => {
                let names: Vec<&str> = set
                    .policies
                    .iter()
                    .map(|p| p.policy.name.value.0.as_str())
                    .collect();
                println!("ok: {} (policies: {})", path.display(), names.join(", "));
            }
            Err(e) => {
                eprintln!("error: {e}");
                ok = false;
            }
        }
    }
    ok
}

/// Runs the command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Validate { paths }) = &cli.command {
        return if validate(paths) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    init_logging(&cli.run);
    let threads = match cli.run.worker_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        n => n,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("sluice-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let sidecar = match Sidecar::start(&cli.run.config()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot start: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down");
        sidecar.stop(Duration::from_secs(5)).await;
        ExitCode::SUCCESS
    })
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
