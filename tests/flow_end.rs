//! The end of flows, for real: Envoy's OpenTelemetry access logger reports
//! every request to Sluice, flux meters reach Prometheus by remote-write,
//! concurrency slots come back with the logs, and a dead Prometheus costs
//! the Check path nothing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use sluice::server::Sidecar;
use sluice::telemetry::remote_write::RemoteWriteConfig;
use sluice_testkit::{Prometheus, http};

fn remote_write(prometheus: &Prometheus, interval: Duration, batches: usize) -> RemoteWriteConfig {
    RemoteWriteConfig {
        url: prometheus.remote_write_url().parse().expect("url"),
        interval,
        external_labels: vec![("env".to_owned(), "test".to_owned())],
        bearer_token: None,
        ca_file: None,
        max_queued_batches: batches,
        timeout: Duration::from_secs(2),
    }
}

async fn matched_logs(sidecar: &Sidecar) -> f64 {
    metric(
        &metrics_text(sidecar).await,
        r#"flowcontrol_access_logs_total{result="matched"}"#,
    )
}

const METERED: &str = r#"
name: shop
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 5
    fill_amount: 5
    interval: 60s
    limit_by_label_key: http.request.header.user_id
"#;

#[tokio::test]
async fn flux_meters_reach_prometheus_with_the_status_split() {
    let prometheus = Prometheus::start(&[], Duration::from_secs(60))
        .await
        .expect("prometheus");
    let policy = PolicyFile::new(METERED);
    let (sidecar, _upstream, envoy) = stack(
        &policy,
        Some(remote_write(&prometheus, Duration::from_millis(300), 30)),
    )
    .await;
    let front = envoy.listener();

    let mut sent: BTreeMap<u16, u64> = BTreeMap::new();
    let plan = [
        ("alice", "/items", 8),
        ("bob", "/status/500", 4),
        ("carol", "/delay/20", 3),
    ];
    for (user, path, times) in plan {
        for _ in 0..times {
            let reply = http::get(front, path, &[("user-id", user)])
                .await
                .expect("request");
            *sent.entry(reply.status).or_default() += 1;
        }
    }
    assert_eq!(sent, BTreeMap::from([(200, 8), (429, 3), (500, 4)]));
    let n = 15.0;

    // Every request's log came back, the rejected ones included (Envoy 1.40
    // emits ext_authz dynamic metadata for denied Checks too).
    assert!(
        eventually(Duration::from_secs(10), || async {
            matched_logs(&sidecar).await == n
        })
        .await,
        "{}",
        metrics_text(&sidecar).await
    );
    let total = || async {
        prometheus
            .query_one(r#"sum(flux_meter_count{flux_meter_name="latency",policy_name="shop"})"#)
            .await
            .expect("query")
    };
    assert!(
        eventually(Duration::from_secs(15), || async {
            total().await == Some(n)
        })
        .await,
        "Prometheus has {:?} of {n}",
        total().await
    );
    let split: BTreeMap<String, f64> = prometheus
        .query(r#"sum by (http_status_code) (flux_meter_count{flux_meter_name="latency"})"#)
        .await
        .expect("query")
        .into_iter()
        .map(|s| (s.label("http_status_code").to_owned(), s.value))
        .collect();
    assert_eq!(
        split,
        BTreeMap::from([
            ("200".to_owned(), 8.0),
            ("429".to_owned(), 3.0),
            ("500".to_owned(), 4.0)
        ])
    );
    let rejected = prometheus
        .query_one(r#"sum(flux_meter_count{decision_type="rejected",flow_status="Error"})"#)
        .await
        .expect("query");
    assert_eq!(rejected, Some(3.0));
    // Carol's upstream took at least 20 ms each time: durations are real.
    let carol = prometheus
        .query_one(r#"sum(flux_meter_sum{http_status_code="200"})"#)
        .await
        .expect("query")
        .expect("series");
    assert!(
        carol >= 3.0 * 19.0,
        "sum of 200s' workload durations {carol}"
    );
    // Series carry the external and the default instance labels; the
    // sidecar's own counters are written too.
    let labelled = prometheus
        .query(r#"flux_meter_count{env="test",instance=~".+:[0-9]+"}"#)
        .await
        .expect("query");
    assert!(!labelled.is_empty());
    let own = prometheus
        .query_one(r#"sum(rate_limiter_counter_total{decision_type="rejected"})"#)
        .await
        .expect("query");
    assert_eq!(own, Some(3.0));
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn concurrency_slots_come_back_with_the_access_log() {
    let policy = PolicyFile::new(
        r#"
name: busy
concurrency_limiters:
  - name: two
    selectors: [{control_point: ingress}]
    max_concurrency: 2
    max_inflight_duration: 60s
"#,
    );
    let (sidecar, _upstream, envoy) = stack(&policy, None).await;
    let front = envoy.listener();
    let burst = |n: usize| async move {
        let requests: Vec<_> = (0..n)
            .map(|_| {
                tokio::spawn(async move {
                    http::request(
                        front,
                        "GET",
                        "/delay/1000",
                        &[],
                        b"",
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("request")
                    .status
                })
            })
            .collect();
        let mut statuses = Vec::with_capacity(n);
        for r in requests {
            statuses.push(r.await.expect("request task"));
        }
        statuses.sort();
        statuses
    };
    assert_eq!(burst(5).await, [200, 200, 429, 429, 429]);
    // The two slots return when Envoy's access logs arrive, long before
    // max_inflight_duration (60 s).
    assert!(
        eventually(Duration::from_secs(5), || async {
            sidecar.engine.inflight_flows() == 0
        })
        .await,
        "slots still held"
    );
    assert_eq!(burst(2).await, [200, 200]);
    assert_eq!(sidecar.engine.metrics().inflight_expired.get(), 0);
    assert_eq!(sidecar.engine.metrics().inflight_evicted.get(), 0);
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_prometheus_costs_checks_nothing_and_data_resumes() {
    let mut prometheus = Prometheus::start(&[], Duration::from_secs(60))
        .await
        .expect("prometheus");
    let policy = PolicyFile::new(
        "name: shop\nflux_meters:\n  - name: latency\n    selectors: [{control_point: ingress}]\n",
    );
    let (sidecar, _upstream, envoy) = stack(
        &policy,
        Some(remote_write(&prometheus, Duration::from_millis(500), 5)),
    )
    .await;
    let front = envoy.listener();
    let ok = async |n: usize| {
        let mut ok = 0;
        for _ in 0..n {
            if http::get(front, "/", &[])
                .await
                .is_ok_and(|r| r.status == 200)
            {
                ok += 1;
            }
        }
        ok
    };

    assert_eq!(ok(20).await, 20);
    let count = r#"sum(flux_meter_count{flux_meter_name="latency"})"#;
    assert!(
        eventually(Duration::from_secs(30), || async {
            prometheus
                .query_one(count)
                .await
                .ok()
                .flatten()
                .is_some_and(|v| v >= 20.0)
        })
        .await,
        "data before the outage"
    );

    // Prometheus goes. Traffic goes on until remote-write is fully backed
    // up: its sender retrying with backoff, its queue of 5 batches full and
    // dropping the oldest.
    prometheus.kill().await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            ok(5).await;
            let text = metrics_text(&sidecar).await;
            metric(&text, "remote_write_failures_total") > 0.0
                && metric(&text, "remote_write_dropped_samples_total") > 0.0
        })
        .await,
        "remote-write never backed up: {}",
        metrics_text(&sidecar).await
    );
    // With telemetry stuck, Checks and access logs go on. Envoy gives a
    // Check 0.5 s and fails closed (envoy-configs/quickstart.yaml): a Check
    // that waited on remote-write would come back as an error, not a 200.
    let before = metrics_text(&sidecar).await;
    assert_eq!(
        ok(100).await,
        100,
        "every request during the outage was answered 200"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            let after = metrics_text(&sidecar).await;
            let grew = |series: &str| metric(&after, series) - metric(&before, series);
            grew("flowcontrol_requests_total") >= 100.0
                && grew(r#"flowcontrol_access_logs_total{result="matched"}"#) >= 100.0
        })
        .await,
        "the Checks were Sluice's, and their access logs were ingested"
    );

    prometheus.restart().await.expect("prometheus restarts");
    assert_eq!(ok(20).await, 20);
    let answered = metric(&metrics_text(&sidecar).await, "flowcontrol_requests_total");
    assert!(
        eventually(Duration::from_secs(30), || async {
            prometheus
                .query_one(count)
                .await
                .ok()
                .flatten()
                .is_some_and(|v| v >= answered)
        })
        .await,
        "new data after the outage: {:?} of at least {answered}",
        prometheus.query_one(count).await
    );
    sidecar.stop(Duration::from_secs(2)).await;
}
