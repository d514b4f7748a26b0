//! sluice-controller and sidecars over the real control API: decisions
//! reach every subscriber, lapse when the controller goes, come back when
//! it returns; a dead Prometheus makes the controller hold its outputs; a
//! circuit tightens a quota scheduler and a concurrency scheduler, and
//! Checks feel it; alerters' alerts fire and resolve in the controller's
//! `/metrics` and `/v1/alerts`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sluice::server::{Config, Sidecar};
use sluice_controller::{Controller, ControllerConfig};
use sluice_testkit::{Prometheus, http};

/// The multiplier of load scheduler `protect` in force in a sidecar now.
fn multiplier(sidecar: &Sidecar) -> f64 {
    let plan = sidecar.engine.plan();
    let load = &plan.policies[0].load_schedulers[0];
    load.multiplier.at(sidecar.engine.clock().now()).0
}

async fn sidecar_of(policy: &PolicyFile, controller: SocketAddr) -> Sidecar {
    Sidecar::start(&Config {
        policy: Some(policy.path.clone()),
        controller: Some(format!("http://{controller}").parse().expect("url")),
        ..Config::ephemeral()
    })
    .await
    .expect("sidecar")
}

fn config(policy: &PolicyFile, prometheus: &str, listen: SocketAddr) -> ControllerConfig {
    ControllerConfig {
        tick: Duration::from_millis(200),
        decision_validity: Duration::from_millis(1000),
        hold_outputs_for: Duration::from_secs(2),
        policy_poll_interval: Duration::from_millis(100),
        ..ControllerConfig::new(
            policy.path.clone(),
            prometheus,
            listen,
            "127.0.0.1:0".parse().expect("addr"),
        )
    }
}

const CONSTANT: &str = r#"
name: svc
load_schedulers:
  - name: protect
    selectors: [{control_point: ingress}]
circuit:
  components:
    - actuator: {load_scheduler: protect, input: 0.5}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_subscribes_gets_the_decisions_in_force_at_once() {
    // The controller ticks once, at start, and not again for an hour: a
    // decision a later subscriber has can only have come with its
    // subscription.
    let policy = PolicyFile::new(CONSTANT);
    let controller = Controller::start(ControllerConfig {
        tick: Duration::from_secs(3600),
        decision_validity: Duration::from_secs(3600),
        ..config(
            &policy,
            "http://127.0.0.1:1",
            "127.0.0.1:0".parse().expect("addr"),
        )
    })
    .await
    .expect("controller");
    let addr = controller.grpc_addr;
    let first = sidecar_of(&policy, addr).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            multiplier(&first) == 0.5
        })
        .await
    );
    let second = sidecar_of(&policy, addr).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            multiplier(&second) == 0.5
        })
        .await,
        "a sidecar started mid-run has the current decisions"
    );
    let text = metrics_text(&second).await;
    assert_eq!(metric(&text, "controller_connected"), 1.0, "{text}");
    assert!(metric(&text, r#"controller_decisions_total{result="applied"}"#) >= 1.0);

    // Restarted (same identity, new process state): the same.
    second.stop(Duration::from_secs(2)).await;
    let second = sidecar_of(&policy, addr).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            multiplier(&second) == 0.5
        })
        .await,
        "the restarted sidecar has the decisions"
    );
    let ticks = http::get(controller.admin_addr, "/metrics", &[])
        .await
        .expect("controller metrics")
        .text();
    assert_eq!(metric(&ticks, "controller_ticks_total"), 1.0, "{ticks}");
    assert_eq!(
        metric(&ticks, "controller_tick_duration_seconds_count"),
        1.0,
        "every tick is timed: {ticks}"
    );
    controller.stop(Duration::from_secs(2)).await;
    first.stop(Duration::from_secs(2)).await;
    second.stop(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_lapse_without_the_controller_and_return_with_it() {
    let policy = PolicyFile::new(CONSTANT);
    let controller = Controller::start(config(
        &policy,
        "http://127.0.0.1:1",
        "127.0.0.1:0".parse().expect("addr"),
    ))
    .await
    .expect("controller");
    let addr = controller.grpc_addr;
    let first = sidecar_of(&policy, addr).await;
    let second = sidecar_of(&policy, addr).await;
    for sidecar in [&first, &second] {
        assert!(
            eventually(Duration::from_secs(10), || async {
                multiplier(sidecar) == 0.5
            })
            .await
        );
    }

    // The controller goes: at valid_until the sidecars pass everything again.
    controller.stop(Duration::from_secs(2)).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            multiplier(&first) == 1.0
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            let text = metrics_text(&first).await;
            metric(
                &text,
                r#"load_multiplier_expired{component="protect",policy_name="svc"}"#,
            ) == 1.0
                && metric(
                    &text,
                    r#"controller_decision_active{component="protect",policy_name="svc"}"#,
                ) == 0.0
                && metric(&text, "controller_connected") == 0.0
        })
        .await
    );

    // It comes back on the same address: the sidecars reconnect by themselves.
    let controller = Controller::start(config(&policy, "http://127.0.0.1:1", addr))
        .await
        .expect("restart");
    for sidecar in [&first, &second] {
        assert!(
            eventually(Duration::from_secs(20), || async {
                multiplier(sidecar) == 0.5
            })
            .await
        );
    }
    controller.stop(Duration::from_secs(2)).await;
    first.stop(Duration::from_secs(2)).await;
    second.stop(Duration::from_secs(2)).await;
}

const FROM_PROMETHEUS: &str = r#"
name: svc
load_schedulers:
  - name: protect
    selectors: [{control_point: ingress}]
circuit:
  components:
    - promql: {out: lm, query: "vector(0.3)"}
    - actuator: {load_scheduler: protect, input: lm}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_prometheus_makes_the_controller_hold_then_let_go() {
    let mut prometheus = Prometheus::start(&[], Duration::from_secs(60))
        .await
        .expect("prometheus");
    let policy = PolicyFile::new(FROM_PROMETHEUS);
    let url = format!("http://{}", prometheus.addr);
    let controller = Controller::start(config(&policy, &url, "127.0.0.1:0".parse().expect("addr")))
        .await
        .expect("controller");
    let sidecar = sidecar_of(&policy, controller.grpc_addr).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            multiplier(&sidecar) == 0.3
        })
        .await
    );
    let admin = controller.admin_addr;
    let controller_metrics = || async move {
        http::get(admin, "/metrics", &[])
            .await
            .expect("metrics")
            .text()
    };
    assert!(
        controller_metrics()
            .await
            .contains("controller_prometheus_up 1")
    );
    assert!(
        controller_metrics()
            .await
            .contains(r#"controller_signal{policy_name="svc",signal="lm"} 0.3"#)
    );

    prometheus.kill().await;
    // Held: the controller says so, and keeps sending the last output with
    // a fresh valid_until, which the sidecar applies: three more decision
    // sets arrive while Prometheus is gone, and 0.3 holds throughout.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let text = controller_metrics().await;
            text.contains("controller_prometheus_up 0")
                && text.contains(r#"controller_outputs_held{policy_name="svc"} 1"#)
        })
        .await
    );
    let applied = async || {
        metric(
            &metrics_text(&sidecar).await,
            r#"controller_decisions_total{result="applied"}"#,
        )
    };
    let before = applied().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            assert_eq!(
                multiplier(&sidecar),
                0.3,
                "held through a Prometheus outage"
            );
            applied().await >= before + 3.0
        })
        .await,
        "held outputs are re-sent"
    );
    // After hold_outputs_for (2 s) nothing is sent: the sidecar lets go.
    assert!(
        eventually(Duration::from_secs(15), || async {
            multiplier(&sidecar) == 1.0
        })
        .await
    );
    let text = controller_metrics().await;
    assert!(
        text.contains(r#"controller_outputs_held{policy_name="svc"} 0"#),
        "{text}"
    );
    // Nor does its /metrics show an output it no longer sends.
    let output =
        r#"controller_output{component="protect",field="load_multiplier",policy_name="svc"}"#;
    assert!(!text.contains(output), "{text}");

    prometheus.restart().await.expect("prometheus back");
    assert!(
        eventually(Duration::from_secs(20), || async {
            multiplier(&sidecar) == 0.3
        })
        .await
    );
    assert!(
        controller_metrics()
            .await
            .contains(&format!("{output} 0.3"))
    );
    controller.stop(Duration::from_secs(2)).await;
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn decisions_for_another_policy_version_are_ignored() {
    let policy = PolicyFile::new(CONSTANT);
    let controller = Controller::start(config(
        &policy,
        "http://127.0.0.1:1",
        "127.0.0.1:0".parse().expect("addr"),
    ))
    .await
    .expect("controller");
    // The sidecar runs an edited copy: another hash.
    let edited = PolicyFile::new(&format!("{CONSTANT}# edited\n"));
    let sidecar = sidecar_of(&edited, controller.grpc_addr).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            metrics_text(&sidecar)
                .await
                .contains(r#"controller_decisions_total{result="other_version"}"#)
        })
        .await
    );
    assert_eq!(multiplier(&sidecar), 1.0);
    controller.stop(Duration::from_secs(2)).await;
    sidecar.stop(Duration::from_secs(2)).await;
}

/// A quota scheduler and a concurrency scheduler the policy leaves
/// generous, and a circuit that tightens both: a constant capacity and a
/// computed fill amount for the one, a computed limit for the other.
const SCHEDULERS: &str = r#"
name: sched
quota_schedulers:
  - name: quota
    selectors: [{control_point: ingress, label_matcher: {match_labels: {http.path: /quota}}}]
    bucket_capacity: 100
    fill_amount: 100
    interval: 1s
    scheduler:
      default_workload_parameters: {queue_timeout: 50ms}
concurrency_schedulers:
  - name: slots
    selectors: [{control_point: ingress, label_matcher: {match_labels: {http.path: /slots}}}]
    max_concurrency: 10
    scheduler:
      default_workload_parameters: {queue_timeout: 50ms}
circuit:
  components:
    - arithmetic: {out: fill, op: div, lhs: 1, rhs: 1000}
    - arithmetic: {out: limit, op: sub, lhs: 2, rhs: 1}
    - actuator: {quota_scheduler: quota, bucket_capacity: 2, fill_amount: fill}
    - actuator: {concurrency_scheduler: slots, input: limit}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_drives_quota_and_concurrency_schedulers_until_it_goes() {
    let policy = PolicyFile::new(SCHEDULERS);
    let controller = Controller::start(config(
        &policy,
        "http://127.0.0.1:1",
        "127.0.0.1:0".parse().expect("addr"),
    ))
    .await
    .expect("controller");
    let sidecar = sidecar_of(&policy, controller.grpc_addr).await;
    let series = |name: &str, component: &str| {
        format!(r#"{name}{{component="{component}",policy_name="sched"}}"#)
    };
    let driven = |text: &str| {
        metric(text, &series("controller_decision_active", "quota")) == 1.0
            && metric(text, &series("controller_decision_active", "slots")) == 1.0
    };
    // Driven, and the sweep (every second) shows the controller's fill
    // rate: 0.001 tokens per 1 s interval.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let text = metrics_text(&sidecar).await;
            driven(&text) && metric(&text, &series("token_bucket_fill_rate", "quota")) == 0.001
        })
        .await,
        "{}",
        metrics_text(&sidecar).await
    );

    let mut envoy = client(&sidecar).await;
    let mut check = async |path: &str| {
        let answer = envoy
            .check(check_request("GET", path, &[]))
            .await
            .expect("check")
            .into_inner();
        (
            http_status(&answer),
            response_header(&answer, "x-sluice-rejected-by"),
        )
    };
    // The controller's bucket of 2, refilled by a thousandth of a token a
    // second: two pass, the third waits its 50 ms and is refused (the
    // policy's bucket of 100 would let all three through).
    assert_eq!(check("/quota").await, (200, None));
    assert_eq!(check("/quota").await, (200, None));
    assert_eq!(check("/quota").await, (503, Some("sched/quota".to_owned())));
    // The controller's one slot: the first flow holds it (no access log
    // comes to give it back), the second waits and is refused (the
    // policy's 10 would admit it).
    assert_eq!(check("/slots").await, (200, None));
    assert_eq!(check("/slots").await, (503, Some("sched/slots".to_owned())));

    // The controller goes: at valid_until both are back to their policy's
    // values, with no restart of anything.
    controller.stop(Duration::from_secs(2)).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let text = metrics_text(&sidecar).await;
            metric(&text, &series("controller_decision_active", "quota")) == 0.0
                && metric(&text, &series("controller_decision_active", "slots")) == 0.0
                && metric(&text, &series("token_bucket_fill_rate", "quota")) == 100.0
        })
        .await,
        "{}",
        metrics_text(&sidecar).await
    );
    for _ in 0..3 {
        assert_eq!(check("/quota").await, (200, None), "the policy's bucket");
    }
    assert_eq!(check("/slots").await, (200, None), "the policy's limit");
    sidecar.stop(Duration::from_secs(2)).await;
}

/// Alerters on computed signals (no Prometheus): one that fires for the
/// first 24 ticks (about 5 s at 200 ms) and then resolves, one that always
/// fires, one that never does.
const ALERTS: &str = r#"
name: alerts
circuit:
  components:
    - integrator: {out: ticks, input: 1}
    - decider: {out: early, op: lt, lhs: ticks, rhs: 25}
    - alerter:
        signal: early
        alert_name: Early ticks
        severity: warn
        resolve_timeout: 1s
        labels: {team: edge}
        alert_channels: [pager, slack]
    - alerter: {signal: 1, alert_name: always, severity: crit}
    - alerter: {signal: 0, alert_name: never}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_and_resolve_in_the_metrics_and_on_v1_alerts() {
    let policy = PolicyFile::new(ALERTS);
    let started = sluice_time::unix_ms();
    let controller = Controller::start(config(
        &policy,
        "http://127.0.0.1:1",
        "127.0.0.1:0".parse().expect("addr"),
    ))
    .await
    .expect("controller");
    let admin = controller.admin_addr;
    let metrics = || async move {
        http::get(admin, "/metrics", &[])
            .await
            .expect("metrics")
            .text()
    };
    let alerts = || async move {
        let reply = http::get(admin, "/v1/alerts", &[]).await.expect("alerts");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let json: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
        json["alerts"].as_array().expect("a list").clone()
    };
    let early = r#"controller_alert{alert_channels="pager,slack",alert_name="Early ticks",policy_name="alerts",severity="warn",team="edge"}"#;
    let always = r#"controller_alert{alert_name="always",policy_name="alerts",severity="crit"}"#;
    let never = r#"controller_alert{alert_name="never",policy_name="alerts",severity="info"}"#;

    // Firing: 1 in the metrics, listed with when it began.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let text = metrics().await;
            metric(&text, early) == 1.0 && metric(&text, always) == 1.0
        })
        .await,
        "{}",
        metrics().await
    );
    assert_eq!(
        metric(&metrics().await, never),
        0.0,
        "a series from the start"
    );
    let listed = alerts().await;
    let now = sluice_time::unix_ms();
    assert_eq!(
        listed.len(),
        2,
        "the alert that never fired is not listed: {listed:?}"
    );
    let firing = &listed[0];
    assert_eq!(firing["policy_name"], "alerts");
    assert_eq!(firing["alert_name"], "Early ticks");
    assert_eq!(firing["severity"], "warn");
    assert_eq!(firing["labels"], serde_json::json!({"team": "edge"}));
    assert_eq!(
        firing["alert_channels"],
        serde_json::json!(["pager", "slack"])
    );
    assert_eq!(firing["status"], "firing");
    assert!(firing["resolved_unix_ms"].is_null(), "{firing}");
    let since = firing["since_unix_ms"].as_i64().expect("since");
    assert!(
        (started..=now).contains(&since),
        "{started} <= {since} <= {now}"
    );
    assert_eq!(listed[1]["alert_name"], "always");
    assert_eq!(listed[1]["status"], "firing");

    // Its signal goes to zero at the 25th tick; a second later it
    // resolves: 0 in the metrics, listed as resolved, with when.
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(&metrics().await, early) == 0.0
        })
        .await,
        "{}",
        metrics().await
    );
    let listed = alerts().await;
    let resolved = &listed[0];
    assert_eq!(resolved["alert_name"], "Early ticks");
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(
        resolved["since_unix_ms"].as_i64(),
        Some(since),
        "the same episode"
    );
    let at = resolved["resolved_unix_ms"].as_i64().expect("resolved at");
    // 24 ticks of 200 ms firing, then 1 s of zeros.
    assert!(
        at >= since + 4_000,
        "resolved {} ms after it fired",
        at - since
    );
    assert_eq!(listed[1]["status"], "firing");
    let text = metrics().await;
    assert_eq!(metric(&text, always), 1.0);
    assert_eq!(metric(&text, never), 0.0);
    controller.stop(Duration::from_secs(2)).await;
}
