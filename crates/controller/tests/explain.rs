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
