//! The Grafana dashboards in `dashboards/` against real data: traffic
//! through the real Envoy and Sluice (a per-user rate limiter that turns
//! some of it away, a flux meter, an adaptive concurrency scheduler, a
//! load scheduler driven by sluice-controller's capacity loop), Sluice
//! remote-writing to the real Prometheus, which scrapes the controller.
//! Every panel's query, with the template variables as Grafana fills them
//! for "All", must parse and return data; the variables' own queries must
//! list the policy and its components. A dashboard that names a metric or
//! label Sluice does not have, or a query Prometheus refuses, fails here.
//!
//! Needs Envoy and Prometheus (`scripts/bootstrap.sh`, which `make test`
//! runs first); fails, never skips, without them.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::Value;
use sluice_testkit::prometheus::query_escape;
use sluice_testkit::{Envoy, EnvoyPorts, Latency, Prometheus, Upstream, http};

const POLICY: &str = r#"
name: dash
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user: {from: request.http.headers.user}
      user_type: {from: request.http.headers.user-type}
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 5
    fill_amount: 5
    interval: 1s
    limit_by_label_key: user
concurrency_schedulers:
  - name: slots
    selectors: [{control_point: ingress}]
    max_concurrency: 100
    adaptive: {latency_setpoint_ms: 500}
load_schedulers:
  - name: protect
    selectors: [{control_point: ingress}]
    rate_window: 3s
    scheduler:
      workloads:
        - name: paid
          label_matcher: {match_labels: {user_type: paid}}
          parameters: {priority: 200}
        - name: free
          label_matcher: {match_labels: {user_type: free}}
          parameters: {priority: 20}
circuit:
  blueprint: load_scheduling.capacity
  parameters:
    flux_meter: latency
    load_scheduler: protect
    latency_setpoint_ms: 500
    signal_window: 3s
"#;

/// The dashboards, by file.
fn dashboards() -> Vec<(&'static str, Value)> {
    [
        "dashboards/sluice-sidecar.json",
        "dashboards/sluice-controller.json",
    ]
    .into_iter()
    .map(|file| {
        let text = std::fs::read_to_string(sluice_testkit::repo_root().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        (file, json)
    })
    .collect()
}

/// Every panel's queries: (dashboard, panel title, PromQL).
fn queries() -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for panel in d["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().expect("title").to_owned();
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr").to_owned();
                out.push((file, title.clone(), expr));
            }
        }
    }
    out
}

/// A query as Grafana sends it with "All" selected (each variable's
/// `allValue`) and a rate interval that holds several of the test's
/// 500 ms samples.
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$policy_name", ".*")
        .replace("$component", ".*")
        .replace("$__rate_interval", "5s")
}

#[test]
fn every_panel_reads_its_datasource_and_the_variables_exist() {
    for (file, d) in dashboards() {
        assert!(
            d["uid"].as_str().is_some_and(|u| u.starts_with("sluice")),
            "{file}: uid"
        );
        let variables: Vec<&str> = d["templating"]["list"]
            .as_array()
            .expect("templating")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert!(
            variables.contains(&"datasource") && variables.contains(&"policy_name"),
            "{file}: {variables:?}"
        );
        let mut ids = Vec::new();
        for panel in d["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().unwrap_or("?");
            ids.push(panel["id"].as_u64().expect("id"));
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: {title}"
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{file}: {title} has no query");
            for t in targets {
                let expr = t["expr"].as_str().unwrap_or("");
                // A variable the dashboard does not define would reach
                // Prometheus as text.
                for used in ["$policy_name", "$component"] {
                    if expr.contains(used) {
                        assert!(
                            variables.contains(&&used[1..]),
                            "{file}: {title} uses {used}"
                        );
                    }
                }
            }
        }
        let count = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), count, "{file}: panel ids repeat");
    }
    assert!(queries().len() >= 20, "{} queries", queries().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data_from_a_real_run() {
    // Prometheus scrapes the controller's admin port, reserved first.
    let controller_admin: std::net::SocketAddr =
        ([127, 0, 0, 1], sluice_testkit::free_port().expect("port")).into();
    let prometheus = Prometheus::start(&[controller_admin], Duration::from_millis(500))
        .await
        .expect("prometheus");
    let policy = PolicyFile::new(POLICY);
    let (controller, sidecar) = controlled_sidecar(
        &policy,
        &prometheus,
        controller_admin,
        vec![("instance".to_owned(), "sidecar-a".to_owned())],
    )
    .await;
    let upstream = Upstream::start_with(
        0,
        Latency {
            base: Duration::from_millis(5),
            per_inflight: Duration::ZERO,
        },
    )
    .await
    .expect("upstream");
    let ports = EnvoyPorts::free(upstream.addr.port(), sidecar.grpc_addr.port()).expect("ports");
    let envoy = Envoy::start("envoy-configs/quickstart.yaml", ports)
        .await
        .expect("envoy");
    let front = envoy.listener();

    // 50 requests a second: alice (a third of them) above her per-user
    // limit of 5 a second, bob and carol within theirs, paid and free.
    let running = Arc::new(AtomicBool::new(true));
    let traffic = {
        let running = running.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut n = 0u64;
            // Bounded: two minutes at most, whatever happens.
            while running.load(Ordering::Relaxed) && n < 6_000 {
                tick.tick().await;
                n += 1;
                let user = ["alice", "bob", "alice", "carol", "alice", "bob"][n as usize % 6];
                let kind = if n.is_multiple_of(2) { "paid" } else { "free" };
                tokio::spawn(async move {
                    let _ = http::request(
                        front,
                        "GET",
                        "/",
                        &[("user", user), ("user-type", kind)],
                        b"",
                        Duration::from_secs(5),
                    )
                    .await;
                });
            }
        })
    };

    // Poll until every query has data, for at most a minute (the
    // controller's outputs need a few windows of data first).
    let queries = queries();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut empty: Vec<String>;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        empty = Vec::new();
        for (file, title, expr) in &queries {
            let promql = as_grafana_sends(expr);
            match prometheus.query(&promql).await {
                // Data is a number: an empty vector, or only NaN (a
                // quantile of nothing, a ratio of zero rates), is not.
                Ok(samples) if !samples.iter().any(|s| s.value.is_finite()) => {
                    empty.push(format!("{file}: {title}: {promql}"))
                }
                Ok(_) => {}
                // A query Prometheus refuses does not mend with time.
                Err(e) => panic!("{file}: {title}: {promql}: {e:#}"),
            }
        }
        if empty.is_empty() || tokio::time::Instant::now() > deadline {
            break;
        }
    }
    running.store(false, Ordering::Relaxed);
    let _ = traffic.await;
    assert!(
        empty.is_empty(),
        "panels without data after a minute of traffic:\n{}\nprometheus:\n{}",
        empty.join("\n"),
        prometheus.log_tail()
    );

    // The variables' own queries, as the dashboards write them (Grafana's
    // `label_values([matcher,] label)`), list the policy and its
    // components.
    let values = |label: &str, matcher: &str| {
        let path = format!(
            "/api/v1/label/{label}/values?match[]={}",
            query_escape(matcher)
        );
        let addr = prometheus.addr;
        async move {
            let reply = http::get(addr, &path, &[]).await.expect("label values");
            let json: Value = serde_json::from_slice(&reply.body).expect("json");
            json["data"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }
    };
    let mut listed = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (file, d) in dashboards() {
        for v in d["templating"]["list"].as_array().expect("templating") {
            if v["type"] != "query" {
                continue;
            }
            let definition = v["definition"].as_str().expect("definition");
            let inner = definition
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{file}: {definition}: not label_values(...)"));
            let (matcher, label) = match inner.rsplit_once(',') {
                Some((m, l)) => (as_grafana_sends(m.trim()), l.trim().to_owned()),
                None => (
                    format!(r#"{{{}!=""}}"#, inner.trim()),
                    inner.trim().to_owned(),
                ),
            };
            let found = values(&label, &matcher).await;
            listed.entry(label).or_default().extend(found);
        }
    }
    let has = |label: &str, value: &str| {
        listed
            .get(label)
            .is_some_and(|v| v.iter().any(|x| x == value))
    };
    assert!(has("policy_name", "dash"), "{listed:?}");
    for c in ["per-user", "slots", "protect"] {
        assert!(has("component", c), "{c} not listed: {listed:?}");
    }

    drop(envoy);
    sidecar.stop(Duration::from_secs(2)).await;
    controller.stop(Duration::from_secs(2)).await;
}
