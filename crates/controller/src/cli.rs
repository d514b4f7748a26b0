//! The `sluice-controller` command line.
//!
//! `sluice-controller --policy PATH [FLAGS]` runs the controller;
//! `sluice-controller explain PATH` prints each policy's circuit with its
//! blueprint expanded; `sluice-controller status` asks a running
//! controller's admin listener what it is doing (`GET /v1/status`). Every
//! flag of the controller can also be set by an environment variable
//! `SLUICE_CONTROLLER_<FLAG>`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use sluice_policy as policy;
use sluice_policy::circuit::{ComponentSpec, Operand};
use sluice_runtime::logging::{self, LogFormat};
use sluice_runtime::secret::TokenFile;
use sluice_runtime::tls::ServerTlsFiles;

use super::{Controller, ControllerConfig};

/// The admin listener's default address, one literal for `--admin-listen`
/// and the URL `status` asks by default.
macro_rules! default_admin_listen {
    () => {
        "127.0.0.1:8083"
    };
}

/// sluice-controller: closed-loop flow control for Sluice sidecars.
///
/// Reads signals from Prometheus (where sidecars remote-write), runs each
/// policy's `circuit:` every tick, and pushes its outputs (load
/// multipliers, limits, sampling) to every sidecar subscribed with
/// `--controller`.
#[derive(Debug, Parser)]
#[command(
    name = "sluice-controller",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A command other than running the controller.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of the controller.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Commands besides running.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print each policy's circuit, blueprints expanded, and exit.
    Explain {
        /// Policy files or directories (as for --policy).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print what a running controller is doing, and exit.
    ///
    /// Every circuit's signals with their values and ages, the outputs it
    /// sent, the sidecars subscribed (GET /v1/status on its admin
    /// listener). Exits 1 when the controller cannot be asked.
    Status(StatusArgs),
}

/// Flags of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The controller's admin listener (its --admin-listen) as a URL; a
    /// path is kept (a proxy's prefix), /v1/status is added to it unless
    /// it ends so already.
    #[arg(long, default_value = concat!("http://", default_admin_listen!()), value_parser = parse_admin_url)]
    pub admin: http::Uri,
    /// Print the JSON the controller answered, as it came, instead of
    /// tables.
    #[arg(long)]
    pub json: bool,
    /// Only this policy (its name, not its file).
    #[arg(long, value_parser = parse_policy_name)]
    pub policy: Option<String>,
    /// How long to wait for the whole answer, connecting included.
    #[arg(long, default_value = "5s", value_parser = sluice_time::parse_duration)]
    pub timeout: Duration,
}

/// An `http://` or `https://` URL with a host and no query.
fn parse_admin_url(s: &str) -> Result<http::Uri, String> {
    let expected = || format!("expected an http:// or https:// URL with a host, got {s:?}");
    let url: http::Uri = s.parse().map_err(|_| expected())?;
    match (url.scheme_str(), url.authority(), url.query()) {
        (Some("http" | "https"), Some(_), None) => Ok(url),
        _ => Err(expected()),
    }
}

/// A policy name as policies spell them (so it needs no escaping in a
/// URL).
fn parse_policy_name(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a policy name (letters, digits, '_', '-', '.')"
        ))
    }
}

/// Flags of the controller.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy file, or directory of *.yaml files: the sidecars' policies,
    /// whose `circuit:` sections the controller runs. Re-read on change.
    #[arg(long, env = "SLUICE_CONTROLLER_POLICY")]
    pub policy: Option<PathBuf>,
    /// Prometheus to query (where the sidecars remote-write).
    #[arg(
        long,
        env = "SLUICE_CONTROLLER_PROMETHEUS_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    pub prometheus_url: String,
    /// PEM file of CA certificates to trust for an https:// Prometheus.
    #[arg(long, env = "SLUICE_CONTROLLER_PROMETHEUS_CA_FILE")]
    pub prometheus_ca_file: Option<PathBuf>,
    /// Address of the control API that sidecars subscribe to (gRPC).
    #[arg(
        long,
        env = "SLUICE_CONTROLLER_LISTEN",
        default_value = "127.0.0.1:8082"
    )]
    pub listen: SocketAddr,
    /// Address for /metrics, /healthz, /readyz, /v1/alerts and /v1/status.
    #[arg(
        long,
        env = "SLUICE_CONTROLLER_ADMIN_LISTEN",
        default_value = default_admin_listen!()
    )]
    pub admin_listen: SocketAddr,
    /// How often the circuits run.
    #[arg(long, env = "SLUICE_CONTROLLER_TICK", default_value = "10s", value_parser = sluice_time::parse_duration)]
    pub tick: Duration,
    /// How long a decision holds in the sidecars (default: 3 ticks).
    #[arg(long, env = "SLUICE_CONTROLLER_DECISION_VALIDITY", value_parser = sluice_time::parse_duration)]
    pub decision_validity: Option<Duration>,
    /// How long the last outputs are held while Prometheus cannot be asked;
    /// after that nothing is sent and sidecars return to their policies.
    #[arg(long, env = "SLUICE_CONTROLLER_HOLD_OUTPUTS_FOR", default_value = "2m", value_parser = sluice_time::parse_duration)]
    pub hold_outputs_for: Duration,
    /// Connections the control listener keeps open at once: one per
    /// subscribed sidecar (each holds its stream open), so at least the
    /// number of sidecars. Raise the process's open-file limit with it.
    #[arg(
        long,
        env = "SLUICE_CONTROLLER_MAX_CONNECTIONS",
        default_value_t = 4096
    )]
    pub max_connections: usize,
    /// How often the policy path is checked for changes.
    #[arg(long, env = "SLUICE_CONTROLLER_POLICY_POLL_INTERVAL", default_value = "1s", value_parser = sluice_time::parse_duration)]
    pub policy_poll_interval: Duration,
    /// PEM certificate chain of the control listener: sidecars then
    /// subscribe with --controller https://…
    #[arg(long, env = "SLUICE_CONTROLLER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SLUICE_CONTROLLER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CAs whose client certificates the control listener requires
    /// (mTLS): a sidecar without one cannot subscribe.
    #[arg(long, env = "SLUICE_CONTROLLER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM certificate chain of the admin listener (HTTPS).
    #[arg(long, env = "SLUICE_CONTROLLER_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of --admin-tls-cert.
    #[arg(long, env = "SLUICE_CONTROLLER_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// PEM CAs whose client certificates the admin listener requires.
    #[arg(long, env = "SLUICE_CONTROLLER_ADMIN_TLS_CLIENT_CA")]
    pub admin_tls_client_ca: Option<PathBuf>,
    /// A file holding the bearer token sidecars must present to subscribe
    /// (their --controller-token-file); re-read on every subscription.
    #[arg(long, env = "SLUICE_CONTROLLER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Log filter: a level or tracing directives.
    #[arg(long, env = "SLUICE_CONTROLLER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log line format.
    #[arg(long, env = "SLUICE_CONTROLLER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn operand(o: &Operand) -> String {
    match o {
        Operand::Constant(c) => c.to_string(),
        Operand::Signal(s) => s.clone(),
    }
}

/// One line per component.
pub fn describe(components: &[ComponentSpec]) -> String {
    let mut out = String::new();
    let width = components
        .iter()
        .flat_map(ComponentSpec::outs)
        .map(str::len)
        .max()
        .unwrap_or(0);
    // Signal read before it is written → its readers, in circuit order.
    let mut delayed: indexmap::IndexMap<&str, Vec<&str>> = indexmap::IndexMap::new();
    for (i, c) in components.iter().enumerate() {
        for input in c.inputs() {
            // Written later in the list (or by itself): last tick's value.
            if let Operand::Signal(s) = input
                && !components[..i]
                    .iter()
                    .any(|p| p.outs().contains(&s.as_str()))
            {
                let reader = match c {
                    ComponentSpec::Alerter(_) => "an alerter",
                    c => c.out().unwrap_or("an actuator"),
                };
                delayed.entry(s.as_str()).or_default().push(reader);
            }
        }
        let line = match c {
            ComponentSpec::Promql(p) => format!(
                "promql {}{}",
                p.query,
                p.evaluation_interval
                    .map(|d| format!(" (every {})", humantime::format_duration(d.0)))
                    .unwrap_or_default()
            ),
            ComponentSpec::Ema(e) => format!(
                "ema of {} over {}{}",
                operand(&e.input),
                humantime::format_duration(e.window.0),
                e.freeze
                    .as_ref()
                    .map(|f| format!(", frozen while {}", operand(f)))
                    .unwrap_or_default()
            ),
            ComponentSpec::Arithmetic(a) => {
                let op = match a.op {
                    policy::circuit::ArithmeticOp::Add => "+",
                    policy::circuit::ArithmeticOp::Sub => "-",
                    policy::circuit::ArithmeticOp::Mul => "*",
                    policy::circuit::ArithmeticOp::Div => "/",
                };
                format!("{} {op} {}", operand(&a.lhs), operand(&a.rhs))
            }
            ComponentSpec::Decider(d) => format!(
                "1 when {} {} {} (for {}), 0 when not (for {})",
                operand(&d.lhs),
                d.op.symbol(),
                operand(&d.rhs),
                humantime::format_duration(d.true_for.0),
                humantime::format_duration(d.false_for.0)
            ),
            ComponentSpec::GradientController(g) => format!(
                "{} * clamp(({} / {})^{}, {}, {})",
                operand(&g.control_variable),
                operand(&g.signal),
                operand(&g.setpoint),
                g.slope,
                g.min_gradient,
                g.max_gradient
            ),
            ComponentSpec::Integrator(n) => format!(
                "sum of {} from {}{}",
                operand(&n.input),
                n.initial,
                n.reset
                    .as_ref()
                    .map(|r| format!(", reset while {}", operand(r)))
                    .unwrap_or_default()
            ),
            ComponentSpec::Switcher(s) => format!(
                "{} if {} else {}",
                operand(&s.on_true),
                operand(&s.switch),
                operand(&s.on_false)
            ),
            ComponentSpec::Min(m) => format!(
                "min({})",
                m.inputs.iter().map(operand).collect::<Vec<_>>().join(", ")
            ),
            ComponentSpec::Max(m) => format!(
                "max({})",
                m.inputs.iter().map(operand).collect::<Vec<_>>().join(", ")
            ),
            ComponentSpec::Actuator(a) => {
                let target = if let Some(n) = &a.load_scheduler {
                    format!("load scheduler {n} multiplier")
                } else if let Some(n) = &a.sampler {
                    format!("sampler {n} accept_percentage")
                } else if let Some(n) = &a.concurrency_limiter {
                    format!("concurrency limiter {n} max_concurrency")
                } else if let Some(n) = &a.concurrency_scheduler {
                    format!("concurrency scheduler {n} max_concurrency")
                } else if let Some(n) = &a.quota_scheduler {
                    format!("quota scheduler {n}")
                } else {
                    format!(
                        "rate limiter {}",
                        a.rate_limiter.as_ref().map(|n| n.0.as_str()).unwrap_or("")
                    )
                };
                let value = [
                    a.input.as_ref().map(operand),
                    a.bucket_capacity
                        .as_ref()
                        .map(|o| format!("bucket_capacity {}", operand(o))),
                    a.fill_amount
                        .as_ref()
                        .map(|o| format!("fill_amount {}", operand(o))),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", ");
                let _ = writeln!(out, "  {:>width$} -> {target}", value);
                continue;
            }
            ComponentSpec::AimdLoadScheduler(_)
            | ComponentSpec::AiadLoadScheduler(_)
            | ComponentSpec::RangeDrivenLoadScheduler(_) => {
                describe_load_scheduler(&mut out, c, width);
                continue;
            }
            ComponentSpec::LoadRamp(r) => {
                describe_load_ramp(&mut out, r, width);
                continue;
            }
            ComponentSpec::Alerter(a) => {
                let labels: Vec<String> =
                    a.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                let _ = writeln!(
                    out,
                    "  {:>width$} -> alert {:?} ({}) while non-zero, resolved {} after{}{}",
                    operand(&a.signal),
                    a.alert_name,
                    a.severity.name(),
                    humantime::format_duration(a.resolve_timeout.0),
                    if labels.is_empty() {
                        String::new()
                    } else {
                        format!("; labels {{{}}}", labels.join(", "))
                    },
                    if a.alert_channels.is_empty() {
                        String::new()
                    } else {
                        format!("; channels {}", a.alert_channels.join(", "))
                    },
                );
                continue;
            }
        };
        let _ = writeln!(out, "  {:>width$} = {line}", c.out().unwrap_or(""));
    }
    if !delayed.is_empty() {
        let delayed: Vec<String> = delayed
            .iter()
            .map(|(s, readers)| format!("{s} (read by {})", readers.join(", ")))
            .collect();
        let _ = writeln!(out, "  (from the previous tick: {})", delayed.join("; "));
    }
    out
}

/// `while <overload> and <confirmation>`.
fn overloaded_while(condition: String, confirmation: Option<&Operand>) -> String {
    match confirmation {
        Some(c) => format!("while {condition} and {}", operand(c)),
        None => format!("while {condition}"),
    }
}

/// The lines of one of Aperture's load schedulers: what it writes, and
/// what it sends.
fn describe_load_scheduler(out: &mut String, c: &ComponentSpec, width: usize) {
    let every = |d: &policy::types::PositiveDuration| humantime::format_duration(d.0).to_string();
    let (line, is_overload) = match c {
        ComponentSpec::AimdLoadScheduler(a) => {
            let g = &a.gradient;
            let op = if g.slope <= 0.0 { ">" } else { "<" };
            let (signal, setpoint) = (operand(&a.signal), operand(&a.setpoint));
            (
                format!(
                    "aimd_load_scheduler: {} * clamp(({signal} / {setpoint})^{}, {}, {}) {}; else {} + {} per {} since the last overload; pass-through from {}; at most 1",
                    operand(&a.observed_load_multiplier),
                    g.slope,
                    g.min_gradient.map_or("-inf".to_owned(), |v| v.to_string()),
                    g.max_gradient.map_or("inf".to_owned(), |v| v.to_string()),
                    overloaded_while(
                        format!("{signal} {op} {setpoint}"),
                        a.overload_confirmation.as_ref()
                    ),
                    operand(&a.observed_load_multiplier),
                    a.load_multiplier_linear_increment,
                    every(&a.step_interval),
                    a.max_load_multiplier,
                ),
                a.out_is_overload.as_deref(),
            )
        }
        ComponentSpec::AiadLoadScheduler(a) => (
            format!(
                "aiad_load_scheduler: from {max}, - {} per {} down to {} {}; else + {} per {}; pass-through from {max}; at most 1",
                a.load_multiplier_linear_decrement,
                every(&a.step_interval),
                a.min_load_multiplier,
                overloaded_while(
                    format!(
                        "{} {} {}",
                        operand(&a.signal),
                        a.overload_condition.symbol(),
                        operand(&a.setpoint)
                    ),
                    a.overload_confirmation.as_ref()
                ),
                a.load_multiplier_linear_increment,
                every(&a.step_interval),
                max = a.max_load_multiplier,
            ),
            a.out_is_overload.as_deref(),
        ),
        ComponentSpec::RangeDrivenLoadScheduler(r) => {
            let (low, high) = (&r.low_throttle_threshold, &r.high_throttle_threshold);
            (
                format!(
                    "range_driven_load_scheduler: {signal} on the curve from ({}, {}) to ({}, {}), degree {}, {}; else pass-through",
                    low.signal_value,
                    low.load_multiplier,
                    high.signal_value,
                    high.load_multiplier,
                    r.degree,
                    overloaded_while("below 1".to_owned(), r.overload_confirmation.as_ref()),
                    signal = operand(&r.signal),
                ),
                r.out_is_overload.as_deref(),
            )
        }
        _ => return,
    };
    let name = c.out().unwrap_or("");
    let _ = writeln!(out, "  {name:>width$} = {line}");
    if let Some(o) = is_overload {
        let _ = writeln!(out, "  {o:>width$} = 1 while overloaded (as above), else 0");
    }
    if let Some(ls) = c.drives() {
        let _ = writeln!(out, "  {name:>width$} -> load scheduler {ls} multiplier");
    }
}

/// The lines of a load ramp: its steps and inputs, what it writes, and
/// what it sends.
fn describe_load_ramp(out: &mut String, r: &policy::circuit::LoadRampSpec, width: usize) {
    let mut steps = Vec::new();
    for (i, s) in r.steps.iter().enumerate() {
        let (pct, d) = (
            s.target_accept_percentage.0,
            humantime::format_duration(s.duration.0),
        );
        steps.push(if i == 0 {
            format!("{pct}% for {d}")
        } else {
            format!("to {pct}% over {d}")
        });
    }
    let inputs = [
        Some(format!("forward while {}", operand(&r.forward))),
        r.backward
            .as_ref()
            .map(|b| format!("back while {}", operand(b))),
        r.reset
            .as_ref()
            .map(|x| format!("to the start while {}", operand(x))),
    ];
    let inputs: Vec<String> = inputs.into_iter().flatten().collect();
    let _ = writeln!(
        out,
        "  {:>width$} = load_ramp: {}; {}",
        r.out,
        steps.join(", then "),
        inputs.join(", ")
    );
    if let Some(s) = &r.out_at_start {
        let _ = writeln!(out, "  {s:>width$} = 1 at the ramp's start, else 0");
    }
    if let Some(e) = &r.out_at_end {
        let _ = writeln!(out, "  {e:>width$} = 1 at the ramp's end, else 0");
    }
    let _ = writeln!(
        out,
        "  {:>width$} -> sampler {} accept_percentage",
        r.out, r.sampler
    );
}

/// `sluice-controller explain`: prints the expanded circuits.
pub fn explain(paths: &[PathBuf]) -> bool {
    let mut ok = true;
    for path in paths {
        match policy::load_path(path) {
            Ok(set) => {
                for loaded in &set.policies {
                    let name = &loaded.policy.name.value.0;
                    let Some(circuit) = &loaded.policy.circuit else {
                        println!("policy {name} ({}): no circuit", loaded.file.display());
                        continue;
                    };
                    match circuit.value.expand(name) {
                        Ok(components) => {
                            println!(
                                "policy {name} ({}), {} components{}:",
                                loaded.file.display(),
                                components.len(),
                                circuit
                                    .value
                                    .blueprint
                                    .as_ref()
                                    .map(|b| format!(" from blueprint {b}"))
                                    .unwrap_or_default()
                            );
                            print!("{}", describe(&components));
                        }
                        Err(e) => {
                            eprintln!("error: {}: {e}", loaded.file.display());
                            ok = false;
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ok = false;
            }
        }
    }
    ok
}

/// The URL of `GET /v1/status` under `admin`, for `policy` alone if given.
fn status_url(admin: &http::Uri, policy: Option<&str>) -> anyhow::Result<http::Uri> {
    let base = admin.to_string();
    let base = base.trim_end_matches('/');
    let mut url = if base.ends_with("/v1/status") {
        base.to_owned()
    } else {
        format!("{base}/v1/status")
    };
    if let Some(p) = policy {
        url.push_str("?policy=");
        url.push_str(p);
    }
    Ok(url.parse()?)
}

/// `sluice-controller status`: prints the controller's status; false when
/// it could not be had.
pub fn status(args: &StatusArgs) -> bool {
    let fetched = status_url(&args.admin, args.policy.as_deref()).and_then(|url| {
        // One request: a single-threaded runtime is enough and starts at once.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let answer = runtime
            .block_on(sluice_runtime::http_client::get_once(
                &url,
                args.timeout,
                STATUS_LIMIT,
            ))
            .with_context(|| format!("cannot ask the controller: GET {url}"))?;
        Ok((url, answer))
    });
    let (url, (code, body)) = match fetched {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("error: {e:#}");
            return false;
        }
    };
    if code != http::StatusCode::OK {
        let text = String::from_utf8_lossy(&body);
        let reason = text.lines().next().unwrap_or("").trim();
        let reason = reason.get(..200).unwrap_or(reason);
        eprintln!("error: GET {url} answered {code}: {reason}");
        return false;
    }
    let parsed: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: GET {url} answered 200 but not with the controller's status: {e}");
            return false;
        }
    };
    if args.json {
        print!("{}", String::from_utf8_lossy(&body));
    } else {
        print!("{}", crate::status::render(&parsed));
    }
    true
}

/// The largest status answer read: a few hundred bytes per signal and per
/// sidecar, so thousands of each.
const STATUS_LIMIT: usize = 16 << 20;

/// The controller configuration these flags describe.
pub fn config(args: &RunArgs, policy: &Path) -> anyhow::Result<ControllerConfig> {
    let tls = ServerTlsFiles::from_flags(
        args.tls_cert.as_ref(),
        args.tls_key.as_ref(),
        args.tls_client_ca.as_ref(),
        "the control listener (--tls-cert, --tls-key)",
    )?;
    let admin_tls = ServerTlsFiles::from_flags(
        args.admin_tls_cert.as_ref(),
        args.admin_tls_key.as_ref(),
        args.admin_tls_client_ca.as_ref(),
        "the admin listener (--admin-tls-cert, --admin-tls-key)",
    )?;
    if let Some(path) = &args.token_file {
        // Read once here so that a missing file stops the start, not every
        // subscription.
        sluice_runtime::secret::read_secret(path)?;
    }
    Ok(ControllerConfig {
        tls,
        admin_tls,
        token: args.token_file.clone().map(TokenFile),
        policy: policy.to_owned(),
        policy_poll_interval: args.policy_poll_interval,
        prometheus_url: args.prometheus_url.clone(),
        prometheus_ca_file: args.prometheus_ca_file.clone(),
        listen: args.listen,
        admin_listen: args.admin_listen,
        tick: args.tick,
        decision_validity: args.decision_validity.unwrap_or(args.tick * 3),
        hold_outputs_for: args.hold_outputs_for,
        max_connections: args.max_connections,
    })
}

/// Runs the command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = match &cli.command {
        Some(Command::Explain { paths }) => Some(explain(paths)),
        Some(Command::Status(args)) => Some(status(args)),
        None => None,
    };
    if let Some(ok) = done {
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let Some(policy) = cli.run.policy.clone() else {
        eprintln!(
            "error: --policy is required (a policy file or directory with circuit: sections)"
        );
        return ExitCode::FAILURE;
    };
    logging::init(&cli.run.log_level, cli.run.log_format);
    let runtime = match sluice_runtime::runtime(2, "sluice-controller") {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let started = match config(&cli.run, &policy) {
            Ok(config) => Controller::start(config).await,
            Err(e) => Err(e),
        };
        let controller = match started {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot start: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        sluice_runtime::signal::terminate().await;
        tracing::info!("shutting down");
        controller.stop(Duration::from_secs(5)).await;
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_url_is_under_the_admin_url() {
        let url = |admin: &str, policy| {
            let admin = parse_admin_url(admin).expect("admin URL");
            status_url(&admin, policy).expect("URL").to_string()
        };
        assert_eq!(
            url("http://127.0.0.1:8083", None),
            "http://127.0.0.1:8083/v1/status"
        );
        assert_eq!(
            url("https://proxy/api/ctl/", Some("checkout")),
            "https://proxy/api/ctl/v1/status?policy=checkout"
        );
        assert_eq!(
            url("http://c:8083/v1/status", None),
            "http://c:8083/v1/status"
        );
        assert!(parse_admin_url("127.0.0.1:8083").is_err());
        assert!(parse_admin_url("http://c:8083/?policy=x").is_err());
        assert!(parse_policy_name("policies/").is_err());
    }
}
