//! Prometheus remote-write 1.0: every interval, the sidecar's metrics (flux
//! meter histograms and its own counters) go to `--remote-write-url` as a
//! snappy-compressed protobuf `WriteRequest`.
//!
//! Two tasks, neither on the Check path: a *collector* snapshots the
//! registry each interval into a batch and appends it to a bounded queue
//! (when full, the oldest batch is dropped and its samples counted in
//! `remote_write_dropped_samples_total`); a *sender* POSTs batches in order.
//! A batch that fails with a connection error, a timeout, 5xx or 429 is
//! retried with exponential backoff (100 ms doubling to 5 s, with jitter)
//! until it succeeds, while newer batches wait in the queue; any other 4xx
//! drops the batch (retrying cannot help). Every failed attempt counts in
//! `remote_write_failures_total`. The series are cumulative, so a dropped
//! batch loses resolution, not counts.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{IntCounter, IntGauge, Registry};
use prost::Message;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use sluice_runtime::backoff::Backoff;
use sluice_runtime::http_client::{self, HttpsClient};
use sluice_runtime::shutdown::Shutdown;

pub use sluice_proto::remote_write as wire;

/// First retry delay.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where and how to write.
#[derive(Clone, Debug)]
pub struct RemoteWriteConfig {
    /// The receiver, e.g. `http://prometheus:9090/api/v1/write`.
    pub url: http::Uri,
    /// How often the metrics are collected and sent.
    pub interval: Duration,
    /// Labels added to every series (`instance` among them).
    pub external_labels: Vec<(String, String)>,
    /// Sent as `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// Extra CA certificates (PEM) trusted for HTTPS, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Batches kept while the receiver is unreachable.
    pub max_queued_batches: usize,
    /// Time limit of one POST.
    pub timeout: Duration,
}

/// Counters of the writer, registered in the sidecar's registry (so they
/// are written too).
#[derive(Clone)]
pub struct RemoteWriteMetrics {
    /// `remote_write_samples_total`: samples the receiver accepted.
    pub sent: IntCounter,
    /// `remote_write_dropped_samples_total`: samples of dropped batches.
    pub dropped: IntCounter,
    /// `remote_write_failures_total`: failed POST attempts.
    pub failures: IntCounter,
    /// `remote_write_queued_batches`: batches waiting.
    pub queued: IntGauge,
}

impl RemoteWriteMetrics {
    /// Creates and registers the counters.
    pub fn register(registry: &Registry) -> anyhow::Result<Self> {
        let counter = |name: &str, help: &str| -> anyhow::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let queued = IntGauge::new(
            "remote_write_queued_batches",
            "Remote-write batches waiting to be sent.",
        )?;
        registry.register(Box::new(queued.clone()))?;
        Ok(RemoteWriteMetrics {
            sent: counter(
                "remote_write_samples_total",
                "Samples the remote-write receiver accepted.",
            )?,
            dropped: counter(
                "remote_write_dropped_samples_total",
                "Samples dropped: their batch was pushed out of the full queue or refused with a non-retryable status.",
            )?,
            failures: counter(
                "remote_write_failures_total",
                "Remote-write POSTs that failed (each retry counts).",
            )?,
            queued,
        })
    }
}

/// One collected batch.
struct Batch {
    /// The snappy-compressed WriteRequest.
    body: Bytes,
    /// Samples in it.
    samples: u64,
}

/// The queue between collector and sender.
struct Queue {
    batches: Mutex<VecDeque<Batch>>,
    ready: Notify,
    capacity: usize,
    metrics: RemoteWriteMetrics,
}

impl Queue {
    fn push(&self, batch: Batch) {
        let dropped = {
            let mut q = self.batches.lock();
            let dropped = if q.len() >= self.capacity {
                q.pop_front()
            } else {
                None
            };
            q.push_back(batch);
            self.metrics.queued.set(q.len() as i64);
            dropped
        };
        if let Some(old) = dropped {
            self.metrics.dropped.inc_by(old.samples);
        }
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<Batch> {
        let mut q = self.batches.lock();
        let b = q.pop_front();
        self.metrics.queued.set(q.len() as i64);
        b
    }
}

/// Label names external labels may use (Prometheus's rule).
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// Converts gathered metric families into remote-write series: counters and
/// gauges as one sample, histograms as `_bucket{le}` (cumulative, with
/// `+Inf`), `_sum` and `_count`, as Prometheus's scraper would store them.
/// Labels are sorted by name, as remote-write requires.
pub fn to_timeseries(
    families: &[MetricFamily],
    external: &[(String, String)],
    timestamp_ms: i64,
) -> Vec<wire::TimeSeries> {
    let mut out = Vec::new();
    let mut push = |name: &str, labels: &[(&str, String)], value: f64| {
        let mut all: Vec<wire::Label> = Vec::with_capacity(labels.len() + external.len() + 1);
        all.push(wire::Label {
            name: "__name__".to_owned(),
            value: name.to_owned(),
        });
        for (k, v) in labels {
            all.push(wire::Label {
                name: (*k).to_owned(),
                value: v.clone(),
            });
        }
        for (k, v) in external {
            // A series' own label wins over an external one of the same name.
            if !labels.iter().any(|(own, _)| own == k) {
                all.push(wire::Label {
                    name: k.clone(),
                    value: v.clone(),
                });
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        out.push(wire::TimeSeries {
            labels: all,
            samples: vec![wire::Sample {
                value,
                timestamp: timestamp_ms,
            }],
        });
    };
    for family in families {
        let name = family.name();
        for metric in family.get_metric() {
            let labels: Vec<(&str, String)> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value().to_owned()))
                .collect();
            match family.get_field_type() {
                MetricType::COUNTER => push(name, &labels, metric.get_counter().get_value()),
                MetricType::GAUGE => push(name, &labels, metric.get_gauge().get_value()),
                // No collector of this crate produces untyped metrics.
                MetricType::UNTYPED => {}
                MetricType::HISTOGRAM => {
                    let h = metric.get_histogram();
                    let bucket_name = format!("{name}_bucket");
                    let mut with_le = labels.clone();
                    with_le.push(("le", String::new()));
                    let le = with_le.len() - 1;
                    for b in h.get_bucket() {
                        with_le[le].1 = b.upper_bound().to_string();
                        push(&bucket_name, &with_le, b.cumulative_count() as f64);
                    }
                    with_le[le].1 = "+Inf".to_owned();
                    push(&bucket_name, &with_le, h.get_sample_count() as f64);
                    push(&format!("{name}_sum"), &labels, h.get_sample_sum());
                    push(
                        &format!("{name}_count"),
                        &labels,
                        h.get_sample_count() as f64,
                    );
                }
                MetricType::SUMMARY => {
                    let s = metric.get_summary();
                    push(&format!("{name}_sum"), &labels, s.sample_sum());
                    push(&format!("{name}_count"), &labels, s.sample_count() as f64);
                }
            }
        }
    }
    out
}

/// Why a POST failed.
enum SendError {
    /// Worth retrying: connection error, timeout, 5xx, 429.
    Retry(String),
    /// Not worth retrying: other 4xx.
    Drop(String),
}

async fn send(
    client: &HttpsClient,
    config: &RemoteWriteConfig,
    batch: &Batch,
) -> Result<(), SendError> {
    let mut req = http::Request::post(config.url.clone())
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .header(http::header::CONTENT_ENCODING, "snappy")
        .header(
            http::header::USER_AGENT,
            concat!("sluice/", env!("CARGO_PKG_VERSION")),
        )
        .header("X-Prometheus-Remote-Write-Version", "0.1.0");
    if let Some(token) = &config.bearer_token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(batch.body.clone()))
        .map_err(|e| SendError::Drop(e.to_string()))?;
    let response = match tokio::time::timeout(config.timeout, client.request(req)).await {
        Err(_) => {
            return Err(SendError::Retry(format!(
                "no answer within {:?}",
                config.timeout
            )));
        }
        Ok(Err(e)) => return Err(SendError::Retry(format!("{e:#}"))),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = tokio::time::timeout(Duration::from_secs(1), response.into_body().collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| {
            String::from_utf8_lossy(&b.to_bytes())
                .trim()
                .chars()
                .take(200)
                .collect::<String>()
        })
        .unwrap_or_default();
    let message = format!("{status}: {body}");
    if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
        Err(SendError::Retry(message))
    } else {
        Err(SendError::Drop(message))
    }
}

/// Starts the collector and the sender; they stop with `shutdown`.
pub fn start(
    config: RemoteWriteConfig,
    registry: Registry,
    metrics: RemoteWriteMetrics,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    if !matches!(config.url.scheme_str(), Some("http" | "https")) || config.url.host().is_none() {
        bail!(
            "remote-write URL must be http:// or https:// with a host, got {}",
            config.url
        );
    }
    let client = http_client::build(config.ca_file.as_deref(), config.timeout)?;
    let queue = Arc::new(Queue {
        batches: Mutex::new(VecDeque::new()),
        ready: Notify::new(),
        capacity: config.max_queued_batches.max(1),
        metrics,
    });
    let collector = {
        let queue = queue.clone();
        let mut shutdown = shutdown.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait() => return,
                }
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let series = to_timeseries(&registry.gather(), &config.external_labels, now_ms);
                let samples = series.len() as u64;
                let encoded = wire::WriteRequest { timeseries: series }.encode_to_vec();
                match snap::raw::Encoder::new().compress_vec(&encoded) {
                    Ok(body) => queue.push(Batch {
                        body: body.into(),
                        samples,
                    }),
                    Err(e) => tracing::error!(error = %e, "cannot compress a remote-write batch"),
                }
            }
        })
    };
    let sender = {
        let mut shutdown = shutdown;
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                let batch = loop {
                    if let Some(b) = queue.pop() {
                        break b;
                    }
                    tokio::select! {
                        _ = queue.ready.notified() => {}
                        _ = shutdown.wait() => return,
                    }
                };
                let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
                loop {
                    match send(&client, &config, &batch).await {
                        Ok(()) => {
                            queue.metrics.sent.inc_by(batch.samples);
                            if failing {
                                tracing::info!(url = %config.url, "remote-write recovered");
                                failing = false;
                            }
                            break;
                        }
                        Err(SendError::Drop(message)) => {
                            queue.metrics.failures.inc();
                            queue.metrics.dropped.inc_by(batch.samples);
                            tracing::warn!(url = %config.url, error = %message, "remote-write batch refused; dropped");
                            break;
                        }
                        Err(SendError::Retry(message)) => {
                            queue.metrics.failures.inc();
                            if !failing {
                                tracing::warn!(url = %config.url, error = %message, "remote-write failing; retrying with backoff");
                                failing = true;
                            }
                            tokio::select! {
                                _ = backoff.wait() => {}
                                _ = shutdown.wait() => return,
                            }
                        }
                    }
                }
            }
        })
    };
    Ok(vec![collector, sender])
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

    #[test]
    fn histograms_become_classic_series_with_sorted_labels() {
        let registry = Registry::new();
        let h = HistogramVec::new(
            HistogramOpts::new("flux_meter", "h")
                .const_label("policy_name", "p")
                .buckets(vec![10.0, 100.0]),
            &["decision_type"],
        )
        .unwrap();
        registry.register(Box::new(h.clone())).unwrap();
        let c = IntCounterVec::new(Opts::new("zz_total", "c"), &["instance"]).unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        h.with_label_values(&["accepted"]).observe(5.0);
        h.with_label_values(&["accepted"]).observe(50.0);
        h.with_label_values(&["accepted"]).observe(500.0);
        c.with_label_values(&["own"]).inc_by(3);

        let external = vec![
            ("instance".to_owned(), "node-1".to_owned()),
            ("env".to_owned(), "test".to_owned()),
        ];
        let series = to_timeseries(&registry.gather(), &external, 1234);
        let show: Vec<String> = series
            .iter()
            .map(|s| {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|l| format!("{}={}", l.name, l.value))
                    .collect();
                format!(
                    "{} {} @{}",
                    labels.join(","),
                    s.samples[0].value,
                    s.samples[0].timestamp
                )
            })
            .collect();
        assert_eq!(
            show,
            [
                "__name__=flux_meter_bucket,decision_type=accepted,env=test,instance=node-1,le=10,policy_name=p 1 @1234",
                "__name__=flux_meter_bucket,decision_type=accepted,env=test,instance=node-1,le=100,policy_name=p 2 @1234",
                "__name__=flux_meter_bucket,decision_type=accepted,env=test,instance=node-1,le=+Inf,policy_name=p 3 @1234",
                "__name__=flux_meter_sum,decision_type=accepted,env=test,instance=node-1,policy_name=p 555 @1234",
                "__name__=flux_meter_count,decision_type=accepted,env=test,instance=node-1,policy_name=p 3 @1234",
                "__name__=zz_total,env=test,instance=own 3 @1234",
            ]
        );
    }

    #[test]
    fn the_queue_drops_the_oldest_batch_and_counts_its_samples() {
        let metrics = RemoteWriteMetrics::register(&Registry::new()).unwrap();
        let q = Queue {
            batches: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            capacity: 2,
            metrics: metrics.clone(),
        };
        for samples in [10, 20, 30] {
            q.push(Batch {
                body: Bytes::new(),
                samples,
            });
        }
        assert_eq!(metrics.dropped.get(), 10);
        assert_eq!(metrics.queued.get(), 2);
        assert_eq!(q.pop().map(|b| b.samples), Some(20));
        assert_eq!(q.pop().map(|b| b.samples), Some(30));
        assert!(q.pop().is_none());
    }

    #[test]
    fn label_names() {
        assert!(valid_label_name("instance"));
        assert!(valid_label_name("_x1"));
        assert!(!valid_label_name("1x"));
        assert!(!valid_label_name("a-b"));
        assert!(!valid_label_name("__name__"));
        assert!(!valid_label_name(""));
    }
}
