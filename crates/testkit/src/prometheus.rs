//! The real Prometheus (Debian's 2.42), on a free loopback port, with the
//! remote-write receiver on and its storage in a temporary directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::free_port;
use super::process::Process;

/// The Prometheus binary: `$SLUICE_PROMETHEUS`, else `prometheus` on PATH.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_PROMETHEUS") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("prometheus");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "prometheus not found on PATH: run `make test` or scripts/bootstrap.sh (Debian package prometheus)"
    )
}

/// One series of a query result.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Its labels.
    pub labels: serde_json::Map<String, serde_json::Value>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// A label's value, or "".
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).and_then(|v| v.as_str()).unwrap_or("")
    }
}

/// A running Prometheus; killed when dropped.
pub struct Prometheus {
    /// Where its HTTP API listens.
    pub addr: SocketAddr,
    process: Process,
}

impl Prometheus {
    /// Starts Prometheus scraping `scrape_targets` (host:port of `/metrics`
    /// endpoints) every `scrape_interval`, and waits until it is ready.
    pub async fn start(
        scrape_targets: &[SocketAddr],
        scrape_interval: Duration,
    ) -> anyhow::Result<Prometheus> {
        Prometheus::start_on(free_port()?, scrape_targets, scrape_interval).await
    }

    /// As [`Prometheus::start`], on a given port (to restart one where it was).
    pub async fn start_on(
        port: u16,
        scrape_targets: &[SocketAddr],
        scrape_interval: Duration,
    ) -> anyhow::Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let targets: Vec<String> = scrape_targets.iter().map(|t| format!("'{t}'")).collect();
        let interval = format!("{}ms", scrape_interval.as_millis().max(100));
        let scrape = if targets.is_empty() {
            String::new()
        } else {
            format!(
                "scrape_configs:\n  - job_name: sluice\n    scrape_interval: {interval}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            )
        };
        let config = format!(
            "global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n{scrape}"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address={addr}"),
            "--web.enable-remote-write-receiver".to_owned(),
            "--storage.tsdb.retention.time=1h".to_owned(),
            "--log.level=warn".to_owned(),
        ];
        let mut process = Process::spawn("prometheus", &binary()?, dir, &args)?;
        process
            .wait_http_ok(addr, "/-/ready", Duration::from_secs(30))
            .await?;
        Ok(Prometheus { addr, process })
    }

    /// The last lines Prometheus logged.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Stops it at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts it again on the same port and storage, after [`Prometheus::kill`].
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.respawn()?;
        self.process
            .wait_http_ok(self.addr, "/-/ready", Duration::from_secs(30))
            .await
    }

    /// The remote-write URL.
    pub fn remote_write_url(&self) -> String {
        format!("http://{}/api/v1/write", self.addr)
    }

    /// Runs an instant query.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<Sample>> {
        let path = format!("/api/v1/query?query={}", query_escape(promql));
        let reply = super::http::get(self.addr, &path, &[]).await?;
        let json: serde_json::Value = serde_json::from_slice(&reply.body)
            .with_context(|| format!("prometheus answered {}: {}", reply.status, reply.text()))?;
        if json["status"] != "success" {
            bail!("query {promql:?} failed: {json}");
        }
        let result = json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(result
            .into_iter()
            .filter_map(|r| {
                let labels = r["metric"].as_object()?.clone();
                let value = r["value"][1].as_str()?.parse().ok()?;
                Some(Sample { labels, value })
            })
            .collect())
    }

    /// The value of a query that yields one series, or `None`.
    pub async fn query_one(&self, promql: &str) -> anyhow::Result<Option<f64>> {
        Ok(self.query(promql).await?.first().map(|s| s.value))
    }
}

/// Percent-encodes a URL query value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
