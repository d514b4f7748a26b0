//! k6 sending the demo's traffic (`traffic.js`), and its answers read back
//! while it runs.
//!
//! k6 writes every sample to a CSV file (`--out csv`, flushed every 200 ms,
//! millisecond timestamps); [`K6::poll`] reads what was added since the
//! last call and keeps the rows `traffic.js` records per answer
//! (`demo_answers`) and those where k6 had no virtual user free to send
//! (`dropped_iterations`).
//!
//! k6 talks to nothing but the Envoys' loopback listeners: `traffic.js` refuses
//! any other target, every address outside 127.0.0.0/8 is blacklisted, its
//! REST API is off and so is its usage report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sluice_testkit::repo_root;
use tokio::process::{Child, Command};

/// Every IPv4 address but 127.0.0.0/8, and all of IPv6.
const NOT_LOOPBACK: &str = "0.0.0.0/2,64.0.0.0/3,96.0.0.0/4,112.0.0.0/5,120.0.0.0/6,124.0.0.0/7,126.0.0.0/8,128.0.0.0/1,::/0";

/// The k6 binary: `$SLUICE_K6`, else the venv's.
pub fn binary() -> anyhow::Result<PathBuf> {
    sluice_testkit::venv_binary("SLUICE_K6", "k6")
}

/// What the traffic script needs to know.
pub struct Plan<'a> {
    /// Envoy's listener.
    pub target: SocketAddr,
    /// The second Envoy's listener (sources with `via: "b"`).
    pub target_b: SocketAddr,
    /// The sources, as JSON (see `traffic.js`).
    pub sources_json: String,
    /// Seconds of traffic.
    pub duration: u64,
    /// When the crowd comes and goes, in seconds from the start.
    pub crowd: (u64, u64),
    /// The k6 binary.
    pub binary: &'a Path,
}

/// One row of k6's output that the demo uses.
#[derive(Clone, Debug, PartialEq)]
pub enum Row {
    /// An answer to one request.
    Answer {
        /// Milliseconds since the test started.
        at_ms: u64,
        /// The source (k6 scenario).
        source: String,
        /// HTTP status, 0 when no answer came (timeout, reset).
        code: u16,
        /// The `x-sluice-rejected-by` header (`policy/component`), or "".
        by: String,
        /// Whether it carried `retry-after`.
        retry_after: bool,
        /// How long the answer took, as k6 saw it (ms).
        duration_ms: f64,
        /// The upstream's own time (Envoy's `x-envoy-upstream-service-time`),
        /// when the request reached it.
        upstream_ms: Option<f64>,
    },
    /// Requests k6 did not send, having no virtual user free.
    Dropped {
        /// Milliseconds since the test started.
        at_ms: u64,
        /// The source.
        source: String,
        /// How many.
        count: u64,
    },
}

/// A running k6; killed when dropped.
pub struct K6 {
    child: Child,
    /// Holds the CSV output, the console output and k6's log.
    dir: tempfile::TempDir,
    /// Unix time (ms) at which the test started (k6's `setup()`).
    pub started_ms: u64,
    /// The CSV output read so far.
    csv: CsvTail,
}

impl K6 {
    /// Starts k6 on `traffic.js` and waits until its test has started.
    pub async fn start(plan: &Plan<'_>) -> anyhow::Result<K6> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-demo-k6")
            .tempdir()?;
        let log = std::fs::File::create(dir.path().join("k6.log"))?;
        let script = repo_root().join("examples/demo/traffic.js");
        let csv = dir.path().join("k6.csv");
        let console = dir.path().join("console.log");
        let mut command = Command::new(plan.binary);
        command
            .arg("run")
            .args(["--quiet", "--no-color", "--no-summary", "--no-usage-report"])
            // No REST API listener: several k6 may run at once.
            .args(["--address", ""])
            .args(["--blacklist-ip", NOT_LOOPBACK])
            .arg("--include-system-env-vars=false")
            .args(["--system-tags", "scenario"])
            .arg("--out")
            .arg(format!("csv={}", csv.display()))
            .arg("--console-output")
            .arg(&console)
            .arg("-e")
            .arg(format!("TARGET={}", plan.target))
            .arg("-e")
            .arg(format!("TARGET_B={}", plan.target_b))
            .arg("-e")
            .arg(format!("SOURCES={}", plan.sources_json))
            .arg("-e")
            .arg(format!("DURATION={}", plan.duration))
            .arg("-e")
            .arg(format!("CROWD_START={}", plan.crowd.0))
            .arg("-e")
            .arg(format!("CROWD_END={}", plan.crowd.1))
            .arg(&script)
            .env("K6_NO_USAGE_REPORT", "true")
            .env("K6_CSV_SAVE_INTERVAL", "200ms")
            .env("K6_CSV_TIME_FORMAT", "unix_milli")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("start k6 ({})", plan.binary.display()))?;
        let mut k6 = K6 {
            child,
            dir,
            started_ms: 0,
            csv: CsvTail::new(csv),
        };
        // `setup()` logs `demo-start <unix ms>` right before the scenarios
        // start.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if let Some(ms) = text
                .split("demo-start ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|ms| ms.parse().ok())
            {
                k6.started_ms = ms;
                return Ok(k6);
            }
            if let Some(status) = k6.child.try_wait()? {
                bail!("k6 exited ({status}) before starting:\n{}", k6.log_tail());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("k6 did not start within 60 s:\n{}", k6.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The rows k6 wrote since the last call.
    pub fn poll(&mut self) -> Vec<Row> {
        let lines = self.csv.lines();
        lines
            .iter()
            .filter_map(|line| self.csv.row(line, self.started_ms))
            .collect()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits up to `within` for it to finish its scenarios.
    pub async fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Stops it (SIGKILL) and waits for it to go.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// The last lines k6 logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("k6.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// A CSV file being written by k6: what was read, where the columns are.
struct CsvTail {
    path: PathBuf,
    /// Bytes read so far.
    offset: u64,
    /// The end of the last read, up to a line not yet complete.
    partial: String,
    /// Column index by name, from the header.
    columns: Vec<String>,
}

impl CsvTail {
    fn new(path: PathBuf) -> CsvTail {
        CsvTail {
            path,
            offset: 0,
            partial: String::new(),
            columns: Vec::new(),
        }
    }

    /// The complete lines added since the last call (header excluded).
    fn lines(&mut self) -> Vec<String> {
        use std::io::{Read as _, Seek as _};
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let mut bytes = Vec::new();
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err()
            || file.read_to_end(&mut bytes).is_err()
        {
            return Vec::new();
        }
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(end + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        let mut lines: Vec<String> = complete.lines().map(str::to_owned).collect();
        if self.columns.is_empty() && !lines.is_empty() {
            self.columns = fields(&lines.remove(0));
        }
        lines
    }

    fn row(&self, line: &str, started_ms: u64) -> Option<Row> {
        let fields = fields(line);
        let get = |name: &str| {
            let i = self.columns.iter().position(|c| c == name)?;
            fields.get(i).map(String::as_str)
        };
        let at_ms = get("timestamp")?
            .parse::<u64>()
            .ok()?
            .saturating_sub(started_ms);
        let source = get("scenario")?.to_owned();
        let value: f64 = get("metric_value")?.parse().ok()?;
        match get("metric_name")? {
            "demo_answers" => {
                let tags = get("extra_tags")?;
                let tag = |name: &str| {
                    tags.split('&')
                        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                };
                Some(Row::Answer {
                    at_ms,
                    source,
                    code: tag("code")?.parse().ok()?,
                    by: tag("by").unwrap_or("").to_owned(),
                    retry_after: tag("retry_after") == Some("yes"),
                    duration_ms: value,
                    upstream_ms: tag("upstream_ms").and_then(|v| v.parse().ok()),
                })
            }
            "dropped_iterations" => Some(Row::Dropped {
                at_ms,
                source,
                count: value as u64,
            }),
            _ => None,
        }
    }
}

/// The fields of a CSV line as Go's `encoding/csv` writes them (quoted
/// when they hold a comma or a quote, quotes doubled).
fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    out.push(field);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_as_go_writes_them() {
        assert_eq!(fields("a,,b"), ["a", "", "b"]);
        assert_eq!(
            fields(r#"a,"b,c","say ""hi""""#),
            ["a", "b,c", r#"say "hi""#]
        );
    }
}
