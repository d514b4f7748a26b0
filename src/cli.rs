//! The `sluice` command line.
//!
//! `sluice [FLAGS]` runs the sidecar; `sluice validate PATH...` checks
//! policies and exits; `sluice schema` prints the JSON Schema of a policy
//! file (for editors); `sluice health` asks a running sidecar's admin
//! listener whether it is up (a container health check for images without
//! a shell or curl); `sluice preview` and `sluice status` ask it what it
//! decides and has in force (`inspect.rs`); `sluice envoy-config` writes an
//! Envoy bootstrap asking for what the policies read; `sluice
//! import-aperture FILE...` writes Aperture's policies as Sluice's (the
//! translation is `sluice_policy::aperture`; this file only reads, writes
//! and sets the exit status). Every flag can also be set by an environment
//! variable named `SLUICE_<FLAG>` (e.g. `SLUICE_GRPC_LISTEN`), which is how
//! Kubernetes manifests usually configure a sidecar.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice_policy as policy;
use sluice_runtime::logging::{self, LogFormat};
use sluice_time::parse_duration;

use sluice_engine::flow_end::metadata::FlowKey;
use sluice_runtime::grpc::{ClientTls, Listen};
use sluice_runtime::secret::{TokenFile, read_secret};
use sluice_runtime::tls::{CertKey, ServerTlsFiles};
use sluice_store::RedisConfig;

use crate::inspect;
use crate::server::{Config, ControllerLink, Sidecar};
use crate::telemetry::remote_write::{self, RemoteWriteConfig};

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
    /// Print the JSON Schema of a policy file and exit, for editors
    /// (yaml-language-server: `# yaml-language-server: $schema=<file>`).
    /// It checks fields, types and ranges; `validate` checks everything.
    Schema,
    /// GET an admin URL and exit: 0 when it answers 2xx within the timeout,
    /// 1 otherwise, with one line saying what happened. The container
    /// image's HEALTHCHECK (distroless: no shell, no curl).
    Health {
        /// What to GET: by default the sidecar's liveness route on the
        /// default admin listener (/readyz asks for readiness).
        #[arg(long, default_value = "http://127.0.0.1:8081/healthz", value_parser = parse_http_url)]
        url: http::Uri,
        /// How long to wait for the whole answer, connecting included.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Wait for the next Checks of a control point on a running sidecar and
    /// print, for each, the labels the engine saw (secret headers
    /// redacted), what classifiers added, which components' selectors
    /// matched, and the decision. For writing selectors and classifiers,
    /// and for asking in an incident what Sluice decides now.
    Preview {
        /// The control point (as Envoy names it: `ingress`, `egress`...).
        #[arg(long)]
        control_point: String,
        /// Only Checks of this service.
        #[arg(long)]
        service: Option<String>,
        /// How many Checks (1 to 100).
        #[arg(long, default_value_t = 10)]
        samples: usize,
        /// How long to wait for them (up to 60s).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
        /// The sidecar's admin listener.
        #[arg(long, default_value = "http://127.0.0.1:8081", value_parser = parse_http_url)]
        admin: http::Uri,
        /// Print the sidecar's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print an Envoy bootstrap (YAML) for the policies at PATH that asks
    /// Envoy for no more than they read: `allowed_headers` of the ext_authz
    /// filter are the headers they name (and `baggage` when they need it),
    /// the body is buffered only when a classifier reads it, and the access
    /// log goes to Sluice only when something observes how requests end.
    /// Generate it again when the policies change what they read.
    EnvoyConfig {
        /// Policy file or directory (as for --policy).
        #[arg(long)]
        policy: PathBuf,
        /// Envoy's HTTP listener.
        #[arg(long, default_value = "127.0.0.1:10000")]
        listen: SocketAddr,
        /// Envoy's admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        envoy_admin: SocketAddr,
        /// The upstream Envoy routes to.
        #[arg(long, default_value = "127.0.0.1:8000")]
        upstream: SocketAddr,
        /// Sluice's gRPC listener (Checks and access logs).
        #[arg(long, default_value = "127.0.0.1:8080")]
        sluice: SocketAddr,
        /// The control point every Check names.
        #[arg(long, default_value = "ingress")]
        control_point: String,
        /// The service every Check names (a context extension); none by
        /// default (Sluice's --service then applies).
        #[arg(long)]
        service: Option<String>,
        /// Let requests through when Sluice cannot answer (fail open).
        #[arg(long)]
        failure_mode_allow: bool,
        /// Largest body buffered for classifiers that read it.
        #[arg(long, default_value_t = 8192)]
        max_request_bytes: u32,
    },
    /// Print what a running sidecar has in force: every policy's
    /// components with their live state (bucket levels, limits, queues,
    /// multipliers, whether the controller drives them and for how long),
    /// and its subscription to the controller.
    Status {
        /// The sidecar's admin listener.
        #[arg(long, default_value = "http://127.0.0.1:8081", value_parser = parse_http_url)]
        admin: http::Uri,
        /// Print the sidecar's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// How long to wait for the answer.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Convert Aperture policies (the Policy resource, or the plain policy
    /// `aperturectl blueprints generate` writes) into Sluice policies, and
    /// list on stderr what does not carry over, each with its path in the
    /// input and why. Exits 0 when everything carried over; 2 when something
    /// did not, writing nothing unless --allow-partial (then it writes the
    /// rest and exits 0); 1 when a file is not an Aperture policy or cannot
    /// be read or written, writing nothing.
    ImportAperture {
        /// Aperture policy files, or directories of them (their *.yaml and
        /// *.yml files). A plain policy is named after its file.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Where the Sluice policies go: `-` for stdout (several policies
        /// separated by `---`), a file (one policy), or an existing
        /// directory (each policy as `<name>.yaml`).
        #[arg(long, default_value = "-")]
        out: PathBuf,
        /// Write what carries over even when something does not.
        #[arg(long)]
        allow_partial: bool,
    },
}

/// Flags of the sidecar.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Address for Envoy's ext_authz Checks, its OpenTelemetry access logs
    /// (OTLP LogsService/Export) and the gRPC health service: host:port, or
    /// unix:/path for a Unix domain socket (in a pod, on a volume shared
    /// with Envoy alone).
    #[arg(long, env = "SLUICE_GRPC_LISTEN", default_value = "127.0.0.1:8080")]
    pub grpc_listen: Listen,
    /// Address for /metrics, /healthz, /readyz, /control-points and OTLP/HTTP
    /// access logs (POST /v1/logs).
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
    /// Most accepted flows holding concurrency-limiter slots at once, waiting
    /// for their access log; beyond it the flow nearest its deadline is
    /// finished early (its slots returned) and counted.
    #[arg(long, env = "SLUICE_MAX_INFLIGHT_FLOWS", default_value_t = 100_000)]
    pub max_inflight_flows: usize,
    /// Largest CheckRequest accepted, in bytes (headers plus any body Envoy
    /// sends); larger ones are answered with gRPC status OUT_OF_RANGE.
    /// Envoy sends at most its headers (60 KiB by default) and the body it
    /// buffers (with_request_body.max_request_bytes): raise this only with
    /// those. Decoding a Check can take many times its size in memory.
    #[arg(long, env = "SLUICE_MAX_CHECK_REQUEST_BYTES", default_value_t = 1 << 20)]
    pub max_check_request_bytes: usize,
    /// Connections the Check listener keeps open at once (Envoy holds a
    /// few per worker). At the limit, the one idle longest is closed for a
    /// new one; with none idle, the new one is closed.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// A connection of the Check listener without a request for this long
    /// is closed. Keep it above Envoy's idle timeout for the sluice
    /// cluster (1 h unless set), so that Envoy closes first.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT", default_value = "2h", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Requests in flight on one connection of the Check listener.
    #[arg(long, env = "SLUICE_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,
    /// Longest a Check or Export may take from its first byte to its
    /// answer; a client that stalls mid-message is cut off. Keep it above
    /// the policies' longest queue_timeout.
    #[arg(long, env = "SLUICE_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Bytes of requests received but not yet whole, over all connections
    /// of the Check listener; a request that would go over is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "SLUICE_MAX_BUFFERED_REQUEST_BYTES", default_value_t = 64 << 20)]
    pub max_buffered_request_bytes: usize,
    /// Largest OTLP logs Export accepted, in bytes, over gRPC or HTTP.
    #[arg(long, env = "SLUICE_MAX_LOG_REQUEST_BYTES", default_value_t = 16 << 20)]
    pub max_log_request_bytes: usize,
    /// Accept OTLP/HTTP access logs at POST /v1/logs on the admin
    /// listener. Anyone who can reach that listener can then feed flux
    /// meters: set false where the admin port is reachable from outside the
    /// pod (Envoy's logger uses the gRPC listener anyway).
    #[arg(long, env = "SLUICE_OTLP_HTTP", default_value_t = true, action = clap::ArgAction::Set)]
    pub otlp_http: bool,
    /// Serve GET /v1/preview on the admin listener (`sluice preview`):
    /// samples of live Checks with their labels and decisions. Values of
    /// authorization, proxy-authorization, cookie and set-cookie headers
    /// are never shown.
    #[arg(long, env = "SLUICE_PREVIEW", default_value_t = true, action = clap::ArgAction::Set)]
    pub preview: bool,
    /// More headers whose values previews never show (comma-separated
    /// names, any case, e.g. x-api-key).
    #[arg(long, env = "SLUICE_PREVIEW_REDACT", value_delimiter = ',')]
    pub preview_redact: Vec<String>,
    /// Prometheus remote-write receiver for flux meters and the sidecar's
    /// own metrics, e.g. http://prometheus:9090/api/v1/write (Prometheus
    /// needs --web.enable-remote-write-receiver). Off when unset.
    #[arg(long, env = "SLUICE_REMOTE_WRITE_URL")]
    pub remote_write_url: Option<http::Uri>,
    /// How often metrics are remote-written.
    #[arg(long, env = "SLUICE_REMOTE_WRITE_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub remote_write_interval: Duration,
    /// A label added to every remote-written series, as name=value;
    /// repeatable (comma-separated in the environment variable).
    /// `instance` defaults to <hostname>:<admin port>.
    #[arg(long = "remote-write-label", env = "SLUICE_REMOTE_WRITE_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub remote_write_labels: Vec<(String, String)>,
    /// File holding a bearer token sent with every remote-write request.
    #[arg(long, env = "SLUICE_REMOTE_WRITE_BEARER_TOKEN_FILE")]
    pub remote_write_bearer_token_file: Option<PathBuf>,
    /// PEM file of CA certificates to trust for an https:// receiver, in
    /// addition to the system's.
    #[arg(long, env = "SLUICE_REMOTE_WRITE_CA_FILE")]
    pub remote_write_ca_file: Option<PathBuf>,
    /// Batches kept while the receiver is unreachable; beyond it the oldest
    /// is dropped and its samples counted.
    #[arg(
        long,
        env = "SLUICE_REMOTE_WRITE_MAX_QUEUED_BATCHES",
        default_value_t = 30
    )]
    pub remote_write_max_queued_batches: usize,
    /// Time limit of one remote-write request.
    #[arg(long, env = "SLUICE_REMOTE_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub remote_write_timeout: Duration,
    /// A file of at least 16 secret bytes that signs the `sluice.flow`
    /// values this sidecar hands Envoy, so that an access log naming a flow
    /// it did not decide is ignored. Without it a random key is drawn at
    /// start: flows decided before a restart then end unobserved (counted
    /// `unsigned`). Give sidecars sharing a flow's logs the same file.
    #[arg(long, env = "SLUICE_FLOW_KEY_FILE")]
    pub flow_key_file: Option<PathBuf>,
    /// sluice-controller's control API, e.g. http://sluice-controller:8082,
    /// or https://… for TLS (never plain text). The sidecar subscribes and
    /// applies its decisions (load multipliers, limits, sampling); without
    /// it, policies' own values hold.
    #[arg(long, env = "SLUICE_CONTROLLER")]
    pub controller: Option<http::Uri>,
    /// PEM CAs to trust for an https:// controller, besides the system's.
    #[arg(long, env = "SLUICE_CONTROLLER_CA_FILE")]
    pub controller_ca_file: Option<PathBuf>,
    /// PEM client certificate presented to an https:// controller (mTLS).
    #[arg(long, env = "SLUICE_CONTROLLER_CERT")]
    pub controller_cert: Option<PathBuf>,
    /// PEM private key of --controller-cert.
    #[arg(long, env = "SLUICE_CONTROLLER_KEY")]
    pub controller_key: Option<PathBuf>,
    /// A file holding the bearer token the controller requires (its
    /// --token-file); re-read on every subscription.
    #[arg(long, env = "SLUICE_CONTROLLER_TOKEN_FILE")]
    pub controller_token_file: Option<PathBuf>,
    /// Longest a controller's decision may hold, whatever its valid_until
    /// says, so that no controller can leave a component throttled long
    /// after it is gone. Keep the controller's --decision-validity below it.
    #[arg(long, env = "SLUICE_CONTROLLER_MAX_VALIDITY", default_value = "60s", value_parser = parse_duration)]
    pub controller_max_validity: Duration,
    /// PEM certificate chain of the Check and OTLP listener (gRPC over
    /// TLS); re-read when the file changes.
    #[arg(long, env = "SLUICE_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of --grpc-tls-cert.
    #[arg(long, env = "SLUICE_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,
    /// PEM CAs whose client certificates the Check listener requires
    /// (mTLS with Envoy).
    #[arg(long, env = "SLUICE_GRPC_TLS_CLIENT_CA")]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// PEM certificate chain of the admin listener (HTTPS).
    #[arg(long, env = "SLUICE_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of --admin-tls-cert.
    #[arg(long, env = "SLUICE_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// PEM CAs whose client certificates the admin listener requires.
    #[arg(long, env = "SLUICE_ADMIN_TLS_CLIENT_CA")]
    pub admin_tls_client_ca: Option<PathBuf>,
    /// The store of global limits (`scope: global`): `redis://[user:password@]host:port[/db]`,
    /// or `rediss://` for TLS. Repeat it (or separate several with commas in
    /// the environment variable) with --redis-cluster for a Redis Cluster's
    /// seed nodes. Without it, a policy with a global component is refused.
    #[arg(long = "redis-url", env = "SLUICE_REDIS_URL", value_delimiter = ',')]
    pub redis_urls: Vec<String>,
    /// The --redis-url nodes are a Redis Cluster's.
    #[arg(long, env = "SLUICE_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// A file holding the Redis password (a Kubernetes secret), which
    /// overrides the URL's.
    #[arg(long, env = "SLUICE_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM CA certificates to trust for rediss://, instead of the system's.
    #[arg(long, env = "SLUICE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// Deadline of every call to the store on the Check path: a Check never
    /// waits longer for Redis; past it, the component's
    /// on_store_unavailable decides.
    #[arg(long, env = "SLUICE_REDIS_TIMEOUT", default_value = "25ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,
    /// Agent group reported to the controller.
    #[arg(long, env = "SLUICE_AGENT_GROUP", default_value = "default")]
    pub agent_group: String,
    /// Instance name reported to the controller (default <hostname>:<admin port>).
    #[arg(long, env = "SLUICE_INSTANCE", default_value = "")]
    pub instance: String,
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

/// An `http://` or `https://` URL with a host: anything else would fail
/// only when the health check runs, as an unhealthy container.
fn parse_http_url(s: &str) -> Result<http::Uri, String> {
    let expected = || format!("expected an http:// or https:// URL with a host, got {s:?}");
    let url: http::Uri = s.parse().map_err(|_| expected())?;
    match (url.scheme_str(), url.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(url),
        _ => Err(expected()),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected name=value, got {s:?}"))?;
    let name = name.trim();
    if !remote_write::valid_label_name(name) {
        return Err(format!("invalid label name {name:?}"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

impl RunArgs {
    /// The sidecar configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<Config> {
        let remote_write = match &self.remote_write_url {
            None => None,
            Some(url) => {
                let bearer_token = self
                    .remote_write_bearer_token_file
                    .as_deref()
                    .map(read_secret)
                    .transpose()?;
                Some(RemoteWriteConfig {
                    url: url.clone(),
                    interval: self.remote_write_interval,
                    external_labels: self.remote_write_labels.clone(),
                    bearer_token,
                    ca_file: self.remote_write_ca_file.clone(),
                    max_queued_batches: self.remote_write_max_queued_batches,
                    timeout: self.remote_write_timeout,
                })
            }
        };
        let store = if self.redis_urls.is_empty() {
            if self.redis_cluster {
                anyhow::bail!("--redis-cluster needs the cluster's seed nodes in --redis-url");
            }
            None
        } else {
            let password = self
                .redis_password_file
                .as_deref()
                .map(read_secret)
                .transpose()?;
            Some(RedisConfig {
                urls: self.redis_urls.clone(),
                cluster: self.redis_cluster,
                password,
                ca_file: self.redis_ca_file.clone(),
                timeout: self.redis_timeout,
            })
        };
        let flow_key = match &self.flow_key_file {
            None => None,
            Some(path) => {
                let secret = read_secret(path)?;
                if secret.len() < 16 {
                    anyhow::bail!(
                        "{}: a flow key needs at least 16 bytes, it has {}",
                        path.display(),
                        secret.len()
                    );
                }
                Some(FlowKey::from_secret(secret.as_bytes()))
            }
        };
        let controller_link = ControllerLink {
            tls: ClientTls {
                ca_file: self.controller_ca_file.clone(),
                identity: CertKey::from_flags(
                    self.controller_cert.as_ref(),
                    self.controller_key.as_ref(),
                    "--controller-cert",
                )?,
            },
            token: match &self.controller_token_file {
                Some(path) => {
                    read_secret(path)?;
                    Some(TokenFile(path.clone()))
                }
                None => None,
            },
            max_validity: self.controller_max_validity,
        };
        let grpc_tls = ServerTlsFiles::from_flags(
            self.grpc_tls_cert.as_ref(),
            self.grpc_tls_key.as_ref(),
            self.grpc_tls_client_ca.as_ref(),
            "the Check listener (--grpc-tls-cert, --grpc-tls-key)",
        )?;
        let admin_tls = ServerTlsFiles::from_flags(
            self.admin_tls_cert.as_ref(),
            self.admin_tls_key.as_ref(),
            self.admin_tls_client_ca.as_ref(),
            "the admin listener (--admin-tls-cert, --admin-tls-key)",
        )?;
        Ok(Config {
            store,
            remote_write,
            flow_key,
            controller_link,
            grpc_tls,
            grpc_limits: sluice_runtime::grpc::Limits {
                max_connections: self.max_connections,
                idle_timeout: self.idle_timeout,
                max_concurrent_streams: self.max_concurrent_streams,
                request_timeout: self.request_timeout,
                max_buffered_request_bytes: self.max_buffered_request_bytes,
            },
            admin_tls,
            grpc_listen: self.grpc_listen.clone(),
            admin_listen: self.admin_listen,
            policy: self.policy.clone(),
            policy_poll_interval: self.policy_poll_interval,
            default_control_point: self.default_control_point.clone(),
            service: self.service.clone(),
            max_label_values: self.max_label_values,
            max_inflight_flows: self.max_inflight_flows,
            max_check_request_bytes: self.max_check_request_bytes,
            max_log_request_bytes: self.max_log_request_bytes,
            otlp_http: self.otlp_http,
            preview: self.preview,
            preview_redact: self.preview_redact.clone(),
            controller: self.controller.clone(),
            agent_group: self.agent_group.clone(),
            instance: self.instance.clone(),
        })
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

/// Exit status of `sluice import-aperture` when something did not carry
/// over and `--allow-partial` was not given: apart from 1 (nothing could
/// be converted, or written), so that scripts can tell the two.
const IMPORT_PARTIAL: u8 = 2;

/// `sluice import-aperture`: converts every file, then writes every policy
/// or none: an error in any file (or anything not carried over, without
/// `allow_partial`) writes nothing, so no half-converted set is left
/// behind.
pub fn import_aperture(files: &[PathBuf], out: &std::path::Path, allow_partial: bool) -> ExitCode {
    use policy::aperture::convert;
    let mut converted = Vec::new();
    let mut failed = false;
    for path in files {
        let sources = match policy::load::read_sources(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
                continue;
            }
        };
        for (file, text) in sources {
            let stem = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match convert(&text, &stem) {
                Ok(c) => converted.push((file, c)),
                Err(e) => {
                    eprintln!("error: {}: {e}", file.display());
                    failed = true;
                }
            }
        }
    }
    if failed {
        eprintln!("error: nothing written");
        return ExitCode::FAILURE;
    }
    let mut partial = false;
    for (file, c) in &converted {
        for s in &c.skipped {
            eprintln!("{}: not carried over: {s}", file.display());
            partial = true;
        }
    }
    if partial && !allow_partial {
        eprintln!(
            "error: parts of the policies above do not carry over; nothing written (--allow-partial writes the rest)"
        );
        return ExitCode::from(IMPORT_PARTIAL);
    }
    let written = if out.as_os_str() == "-" {
        let texts: Vec<String> = converted
            .iter()
            .map(|(file, c)| c.file_text(&file.display().to_string()))
            .collect();
        print!("{}", texts.join("---\n"));
        Ok(())
    } else {
        write_policies(&converted, out)
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the converted policies to `out`: a file for one, or each as
/// `<name>.yaml` in a directory. Each file is written beside its place
/// under a hidden name (which policy directories skip) and renamed, so a
/// reader (a sidecar watching the directory) never sees half a policy;
/// what can be checked (the target, names that clash) is checked before
/// the first file is written.
fn write_policies(
    converted: &[(PathBuf, policy::aperture::Conversion)],
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let targets: Vec<PathBuf> = if out.is_dir() {
        converted
            .iter()
            .map(|(_, c)| out.join(format!("{}.yaml", c.name)))
            .collect()
    } else if converted.len() == 1 {
        vec![out.to_owned()]
    } else {
        anyhow::bail!(
            "{}: not a directory; several policies need one (or --out -); nothing written",
            out.display()
        );
    };
    for (i, t) in targets.iter().enumerate() {
        if targets[..i].contains(t) {
            anyhow::bail!(
                "two files convert to the policy {}; nothing written",
                t.display()
            );
        }
    }
    for ((file, c), target) in converted.iter().zip(&targets) {
        let dir = target
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let text = c.file_text(&file.display().to_string());
        let done = std::fs::write(&temp, text).and_then(|()| std::fs::rename(&temp, target));
        if let Err(e) = done {
            // Nothing half-written stays behind.
            let _ = std::fs::remove_file(&temp);
            anyhow::bail!("{}: {e}", target.display());
        }
        eprintln!(
            "wrote {} (policy {}, from {})",
            target.display(),
            c.name,
            file.display()
        );
    }
    Ok(())
}

/// `sluice health`: GETs `url`, printing one line; true when it answered
/// 2xx within `timeout`.
pub fn health(url: &http::Uri, timeout: Duration) -> bool {
    // One request: a single-threaded runtime is enough and starts at once.
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(get_status(url, timeout)));
    match outcome {
        Ok((status, _)) if status.is_success() => {
            println!("healthy: GET {url}: {status}");
            true
        }
        Ok((status, body)) => {
            let body = body.lines().next().unwrap_or("").trim();
            let body = body.get(..200).unwrap_or(body);
            if body.is_empty() {
                eprintln!("unhealthy: GET {url}: {status}");
            } else {
                eprintln!("unhealthy: GET {url}: {status}: {body}");
            }
            false
        }
        Err(e) => {
            eprintln!("unhealthy: GET {url}: {e:#}");
            false
        }
    }
}

/// The status and (lossy, at most 4 KiB of) body of `GET url`.
async fn get_status(
    url: &http::Uri,
    timeout: Duration,
) -> anyhow::Result<(http::StatusCode, String)> {
    // A long body is no error for a health check: only its start is shown.
    let (status, body) = sluice_runtime::http_client::get_once(url, timeout, 1 << 20).await?;
    let body = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
    Ok((status, body))
}

/// Prints an admin answer as JSON or for a person; false (with the reason
/// on stderr) when there is none.
fn print_answer(
    answer: anyhow::Result<(String, serde_json::Value)>,
    json: bool,
    render: fn(&serde_json::Value) -> String,
) -> bool {
    match answer {
        Ok((text, _)) if json => {
            println!("{}", text.trim_end());
            true
        }
        Ok((_, value)) => {
            print!("{}", render(&value));
            true
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            false
        }
    }
}

/// Runs the command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = match &cli.command {
        Some(Command::Validate { paths }) => Some(validate(paths)),
        Some(Command::Schema) => {
            println!("{:#}", policy::schema::policy_schema());
            Some(true)
        }
        Some(Command::Health { url, timeout }) => Some(health(url, *timeout)),
        Some(Command::Preview {
            control_point,
            service,
            samples,
            timeout,
            admin,
            json,
        }) => {
            let mut query = vec![
                ("control_point", control_point.clone()),
                ("samples", samples.to_string()),
                ("timeout", humantime::format_duration(*timeout).to_string()),
            ];
            if let Some(s) = service {
                query.push(("service", s.clone()));
            }
            // The sidecar answers after `timeout` at the latest.
            let wait = *timeout + Duration::from_secs(5);
            Some(print_answer(
                inspect::ask(admin, "/v1/preview", &query, wait),
                *json,
                inspect::render_preview,
            ))
        }
        Some(Command::EnvoyConfig {
            policy: path,
            listen,
            envoy_admin,
            upstream,
            sluice,
            control_point,
            service,
            failure_mode_allow,
            max_request_bytes,
        }) => Some(match policy::load_path(path) {
            Ok(set) => {
                let layout = crate::envoy::config::Layout {
                    listen: *listen,
                    admin: *envoy_admin,
                    upstream: *upstream,
                    sluice: *sluice,
                    control_point: control_point.clone(),
                    service: service.clone(),
                    failure_mode_allow: *failure_mode_allow,
                    max_request_bytes: *max_request_bytes,
                };
                let reads = sluice_engine::reads::reads(&set);
                print!("{}", crate::envoy::config::bootstrap(&reads, &layout));
                for (key, who) in &reads.extra_attributes {
                    eprintln!(
                        "warning: {who} observes access-log attribute {key:?}, which the generated log does not send: add it to the access log's attributes"
                    );
                }
                true
            }
            Err(e) => {
                eprintln!("error: {e}");
                false
            }
        }),
        Some(Command::Status {
            admin,
            json,
            timeout,
        }) => Some(print_answer(
            inspect::ask(admin, "/v1/status", &[], *timeout),
            *json,
            inspect::render_status,
        )),
        Some(Command::ImportAperture {
            files,
            out,
            allow_partial,
        }) => return import_aperture(files, out, *allow_partial),
        None => None,
    };
    if let Some(ok) = done {
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    logging::init(&cli.run.log_level, cli.run.log_format);
    let runtime = match sluice_runtime::runtime(cli.run.worker_threads, "sluice-worker") {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let config = match cli.run.config() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot start: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let sidecar = match Sidecar::start(&config).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot start: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        sluice_runtime::signal::terminate().await;
        tracing::info!("shutting down");
        sidecar.stop(Duration::from_secs(5)).await;
        ExitCode::SUCCESS
    })
}
