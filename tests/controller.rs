//! sluice-controller and sidecars over the real control API: decisions
//! reach every subscriber, lapse when the controller goes, come back when
//! it returns; a dead Prometheus makes the controller hold its outputs.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sluice::controller::{Controller, ControllerConfig};
use sluice::harness::{Prometheus, http};
use sluice::server::{Config, Sidecar};

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
async fn decisions_reach_sidecars_lapse_without_the_controller_and_return_with_it() {
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
    assert!(
        eventually(Duration::from_secs(5), || async {
            multiplier(&first) == 0.5
        })
        .await
    );

    // A sidecar started mid-run has the current decisions at once.
    let second = sidecar_of(&policy, addr).await;
    assert!(
        eventually(Duration::from_millis(600), || async {
            multiplier(&second) == 0.5
        })
        .await
    );
    let text = metrics_text(&second).await;
    assert!(text.contains("controller_connected 1"), "{text}");
    assert!(
        text.contains(r#"controller_decisions_total{result="applied"}"#),
        "{text}"
    );

    // A sidecar restarted (same identity, new process state) gets the
    // current decisions within a tick (200 ms) of subscribing.
    second.stop(Duration::from_secs(2)).await;
    let second = sidecar_of(&policy, addr).await;
    assert!(
        eventually(Duration::from_millis(600), || async {
            multiplier(&second) == 0.5
        })
        .await,
        "the restarted sidecar has the decisions"
    );

    // The controller goes: at valid_until the sidecars pass everything again.
    controller.stop(Duration::from_secs(2)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            multiplier(&first) == 1.0
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            let text = metrics_text(&first).await;
            text.contains(r#"load_multiplier_expired{component="protect",policy_name="svc"} 1"#)
                && text.contains(
                    r#"controller_decision_active{component="protect",policy_name="svc"} 0"#,
                )
                && text.contains("controller_connected 0")
        })
        .await
    );

    // It comes back on the same address: the sidecars reconnect by themselves.
    let controller = Controller::start(config(&policy, "http://127.0.0.1:1", addr))
        .await
        .expect("restart");
    for sidecar in [&first, &second] {
        assert!(
            eventually(Duration::from_secs(15), || async {
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
    // Held: the controller says so, and the sidecar keeps 0.3 past the
    // decision validity (1 s).
    assert!(
        eventually(Duration::from_secs(3), || async {
            let text = controller_metrics().await;
            text.contains("controller_prometheus_up 0")
                && text.contains(r#"controller_outputs_held{policy_name="svc"} 1"#)
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        multiplier(&sidecar),
        0.3,
        "held through a Prometheus outage"
    );
    // After hold_outputs_for (2 s) nothing is sent: the sidecar lets go.
    assert!(
        eventually(Duration::from_secs(6), || async {
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
        eventually(Duration::from_secs(10), || async {
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

#[test]
fn explain_prints_the_expanded_blueprint() {
    let policy = PolicyFile::new(
        r#"
name: svc
flux_meters: [{name: latency, selectors: [{control_point: ingress}]}]
load_schedulers: [{name: protect, selectors: [{control_point: ingress}]}]
circuit:
  blueprint: load_scheduling.average_latency
  parameters: {flux_meter: latency, load_scheduler: protect}
"#,
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-controller"))
        .arg("explain")
        .arg(&policy.path)
        .output()
        .expect("run explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in [
        "12 components from blueprint load_scheduling.average_latency",
        "sum(increase(flux_meter_sum{flux_meter_name=\"latency\",policy_name=\"svc\"",
        "[30s])) / sum(increase(flux_meter_count{",
        "setpoint = baseline_latency * 1.1",
        "-> load scheduler protect multiplier",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    // A broken circuit is refused with its file and field.
    let broken = PolicyFile::new(
        "name: x\ncircuit:\n  components:\n    - actuator: {load_scheduler: nope, input: 1}\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-controller"))
        .arg("explain")
        .arg(&broken.path)
        .output()
        .expect("run explain");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("circuit: components[0]: no load scheduler of that name"),
        "{err}"
    );
}
