//! `sluice-controller explain`, run as users run it.

use sluice_testkit::PolicyFile;

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
        err.contains(r#"circuit: components[0]: no load scheduler "nope" in this policy"#),
        "{err}"
    );
}

/// `sluice-controller explain` on `policy`: its standard output.
fn explain(policy: &str) -> String {
    let policy = PolicyFile::new(policy);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-controller"))
        .arg("explain")
        .arg(&policy.path)
        .output()
        .expect("run explain");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn explain_prints_the_aimd_blueprint() {
    let text = explain(
        r#"
name: svc
flux_meters: [{name: latency, selectors: [{control_point: ingress}]}]
load_schedulers: [{name: protect, selectors: [{control_point: ingress}]}]
circuit:
  blueprint: load_scheduling.aimd
  parameters:
    flux_meter: latency
    load_scheduler: protect
    overload_confirmations: [{query_string: 'avg(cpu)', threshold: 0.8, operator: gte}]
"#,
    );
    for needle in [
        "8 components from blueprint load_scheduling.aimd",
        "signal = promql sum(increase(flux_meter_sum{flux_meter_name=\"latency\",policy_name=\"svc\"",
        "[1800s])) (every 30s)",
        "setpoint = signal_long_term * 1.25",
        "/ (sum(increase(accepted_tokens_total{policy_name=\"svc\",component=\"protect\"}[30s])) + sum(increase(rejected_tokens_total{",
        "overload_confirmation_0 = 1 when overload_confirmation_query_0 >= 0.8",
        "overload_confirmation = min(overload_confirmation_0)",
        "desired_load_multiplier = aimd_load_scheduler: observed_load_multiplier * clamp((signal / setpoint)^-1, 0.1, 1) while signal > setpoint and overload_confirmation; else observed_load_multiplier + 0.025 per 10s",
        "pass-through from 2; at most 1",
        "is_overload = 1 while overloaded",
        "desired_load_multiplier -> load scheduler protect multiplier",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
}

#[test]
fn explain_prints_the_promql_blueprint() {
    let text = explain(
        r#"
name: db
load_schedulers: [{name: protect, selectors: [{control_point: ingress}]}]
circuit:
  blueprint: load_scheduling.promql
  parameters:
    promql_query: 'sum(backends) / sum(max_backends) * 100'
    setpoint: 70
    overload_condition: gte
    load_scheduler: protect
"#,
    );
    for needle in [
        "2 components from blueprint load_scheduling.promql",
        "signal = promql sum(backends) / sum(max_backends) * 100 (every 10s)",
        "desired_load_multiplier = aiad_load_scheduler: from 2, - 0.05 per 10s down to 0 while signal >= 70; else + 0.025 per 10s; pass-through from 2; at most 1",
        "is_overload = 1 while overloaded",
        "desired_load_multiplier -> load scheduler protect multiplier",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    // A parameter of another blueprint is refused, naming both.
    let policy = PolicyFile::new(
        "name: x\nload_schedulers: [{name: protect, selectors: [{control_point: ingress}]}]\ncircuit:\n  blueprint: load_scheduling.promql\n  parameters: {promql_query: q, setpoint: 1, overload_condition: gt, load_scheduler: protect, flux_meter: m}\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-controller"))
        .arg("explain")
        .arg(&policy.path)
        .output()
        .expect("run explain");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("circuit: blueprint load_scheduling.promql: parameters.flux_meter: unknown field `flux_meter`"),
        "{err}"
    );
}

#[test]
fn explain_prints_the_load_ramping_blueprint_and_alerters() {
    let text = explain(
        r#"
name: rollout
flux_meters: [{name: latency, selectors: [{control_point: ingress}]}]
samplers:
  - {name: beta, selectors: [{control_point: ingress}], accept_percentage: 0, session_label_key: user, pass_through_label_values: [qa]}
circuit:
  blueprint: load_ramping.base
  parameters:
    sampler: beta
    start: true
    steps:
      - {target_accept_percentage: 1, duration: 0s}
      - {target_accept_percentage: 50, duration: 10m}
    drivers:
      promql_drivers:
        - query_string: 'sum(rate(errors[1m]))'
          criteria:
            forward: {threshold: 1, operator: lt}
            backward: {threshold: 5, operator: gte}
      average_latency_drivers:
        - {flux_meter: latency, criteria: {reset: {threshold: 500}}}
  components:
    - alerter: {signal: backward_intent, alert_name: Rollout backing off, severity: warn, labels: {team: edge}, alert_channels: [pager]}
"#,
    );
    for needle in [
        "12 components from blueprint load_ramping.base",
        "promql_driver_0 = promql sum(rate(errors[1m]))",
        "forward_0 = 1 when promql_driver_0 < 1",
        "backward_0 = 1 when promql_driver_0 >= 5",
        "average_latency_driver_0 = promql sum(increase(flux_meter_sum{flux_meter_name=\"latency\",policy_name=\"rollout\",decision_type=\"accepted\",flow_status=\"OK\"}[30s]))",
        "reset_0 = 1 when average_latency_driver_0 > 500",
        "forward = min(forward_intent, not_backward, 1)",
        "accept_percentage = load_ramp: 1% for 0s, then to 50% over 10m; forward while forward, back while backward_intent, to the start while reset",
        "at_end = 1 at the ramp's end, else 0",
        "accept_percentage -> sampler beta accept_percentage",
        "backward_intent -> alert \"Rollout backing off\" (warn) while non-zero, resolved 5s after; labels {team=\"edge\"}; channels pager",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
}
