//! The `load_ramp` and `alerter` components and the `load_ramping.base`
//! blueprint, as the loader reads and checks them.

use std::path::Path;
use std::time::Duration;

use super::super::{AlerterSpec, ComponentSpec, Operand, Severity};
use super::*;
use crate::load::parse_policy;

/// A policy with samplers `beta` and `other`, a flux meter `latency`, and
/// `circuit` (indented under `circuit:`).
fn policy(circuit: &str) -> String {
    format!(
        "name: svc
flux_meters: [{{name: latency, selectors: [{{control_point: ingress}}]}}]
samplers:
  - {{name: beta, selectors: [{{control_point: ingress}}], accept_percentage: 0}}
  - {{name: other, selectors: [{{control_point: egress}}], accept_percentage: 100}}
circuit:
{circuit}"
    )
}

/// The expanded circuit, or the loader's error message (which must be the
/// `circuit` field's).
fn expand(circuit: &str) -> Result<Vec<ComponentSpec>, String> {
    let p = parse_policy(Path::new("p.yaml"), &policy(circuit)).map_err(|e| {
        assert_eq!(e.field, "circuit", "{e}");
        e.message
    })?;
    Ok(p.circuit
        .expect("a circuit")
        .value
        .expand("svc")
        .expect("loaded, so it expands"))
}

/// `components` (YAML list items, each on its own line after `- `) after a
/// `promql` component writing `x`.
fn components(items: &[&str]) -> Result<Vec<ComponentSpec>, String> {
    let mut circuit = "  components:\n    - promql: {out: x, query: q}\n".to_owned();
    for item in items {
        circuit.push_str(&format!("    - {item}\n"));
    }
    expand(&circuit)
}

fn refused(what: &str, loaded: Result<impl std::fmt::Debug, String>) -> String {
    match loaded {
        Ok(c) => panic!("{what} should be refused, loaded {c:?}"),
        Err(e) => e,
    }
}

/// The YAML loader's own error (a field missing, unknown or out of range):
/// its field and message.
fn yaml_error(circuit: &str) -> (String, String) {
    let e = parse_policy(Path::new("p.yaml"), &policy(circuit)).expect_err("refused");
    (e.field, e.message)
}

const RAMP: &str = "load_ramp: {out: pct, sampler: beta, forward: x, steps: [{target_accept_percentage: 1, duration: 0s}, {target_accept_percentage: 50, duration: 5m}]";

fn step(target: f64, secs: u64) -> LoadRampStep {
    LoadRampStep {
        target_accept_percentage: crate::types::Percentage(target),
        duration: DurationSpec(Duration::from_secs(secs)),
    }
}

#[test]
fn a_load_ramp_needs_only_its_sampler_steps_and_forward() {
    let c = components(&[&format!("{RAMP}}}")]).expect("loads");
    let ComponentSpec::LoadRamp(r) = &c[1] else {
        panic!("not a load ramp: {c:?}")
    };
    assert_eq!(r.steps.0, vec![step(1.0, 0), step(50.0, 300)]);
    assert_eq!(r.forward, Operand::Signal("x".to_owned()));
    assert_eq!(
        (&r.out_at_start, &r.out_at_end, &r.backward, &r.reset),
        (&None, &None, &None, &None)
    );
    assert_eq!(c[1].outs(), ["pct"]);
    // Its extra outputs are signals like any other.
    let c = components(&[
        &format!("{RAMP}, out_at_start: first, out_at_end: last, backward: 0, reset: x}}"),
        "arithmetic: {out: y, op: add, lhs: first, rhs: last}",
    ])
    .expect("loads");
    assert_eq!(c[1].outs(), ["pct", "first", "last"]);
    assert_eq!(c[1].inputs().len(), 3);
}

#[test]
fn a_load_ramp_refuses_bad_wiring_by_name() {
    for (items, message) in [
        (
            vec![RAMP.replace("sampler: beta", "sampler: nope") + "}"],
            r#"components[1]: no sampler "nope" in this policy"#,
        ),
        (
            vec![
                format!("{RAMP}}}"),
                "actuator: {sampler: beta, input: 10}".to_owned(),
            ],
            r#"components[1]: sampler "beta" is driven by components[2] too"#,
        ),
        (
            vec![
                format!("{RAMP}}}"),
                RAMP.replace("out: pct", "out: pct2") + "}",
            ],
            r#"components[1]: sampler "beta" is driven by components[2] too"#,
        ),
        (
            vec![format!("{RAMP}, out_at_end: pct}}")],
            r#"components[1]: signal "pct" is written twice"#,
        ),
        (
            vec![format!("{RAMP}, reset: nowhere}}")],
            r#"components[1]: no component writes signal "nowhere""#,
        ),
    ] {
        let items: Vec<&str> = items.iter().map(String::as_str).collect();
        assert_eq!(refused(message, components(&items)), message);
    }
    // Another sampler is another matter.
    components(&[
        &format!("{RAMP}}}"),
        "actuator: {sampler: other, input: 10}",
    ])
    .expect("two samplers, one driver each");
}

#[test]
fn a_load_ramp_refuses_bad_values_where_written() {
    let ramp = |fields: &str| {
        format!("  components:\n    - load_ramp: {{out: p, sampler: beta, forward: 1, {fields}}}\n")
    };
    for (fields, at, message) in [
        (
            "steps: [{target_accept_percentage: 101, duration: 1s}]",
            "steps[0].target_accept_percentage",
            "must be a percentage between 0 and 100, got 101",
        ),
        (
            "steps: [{target_accept_percentage: 10, duration: -1s}]",
            "steps[0].duration",
            "",
        ),
        ("steps: []", "steps", "must have at least one entry"),
        (
            "steps: [{target_accept_percentage: 10}]",
            "steps[0]",
            "missing field `duration`",
        ),
        (
            "steps: [{target_accept_percentage: 10, duration: 1s, hold: 1s}]",
            "steps[0].hold",
            "unknown field `hold`",
        ),
        (
            "steps: [{target_accept_percentage: 10, duration: 1s}], kill_switch: 1",
            "kill_switch",
            "unknown field `kill_switch`",
        ),
    ] {
        let (field, e) = yaml_error(&ramp(fields));
        assert_eq!(
            field,
            format!("circuit.value.components[0].load_ramp.{at}"),
            "{fields}: {e}"
        );
        assert!(e.contains(message), "{fields}: {e}");
    }
    let (field, e) = yaml_error(
        "  components:\n    - load_ramp: {out: p, sampler: beta, steps: [{target_accept_percentage: 1, duration: 1s}]}\n",
    );
    assert!(field.ends_with("components[0].load_ramp"), "{field}");
    assert!(e.contains("missing field `forward`"), "{e}");
    let many = vec!["{target_accept_percentage: 1, duration: 1s}"; MAX_STEPS + 1].join(", ");
    assert_eq!(
        refused("too many steps", expand(&ramp(&format!("steps: [{many}]")))),
        "components[0]: load_ramp: at most 1000 steps, got 1001"
    );
}

// ---------------------------------------------------------------------------
// The alerter.

fn alerter(fields: &str) -> Result<AlerterSpec, String> {
    let c = components(&[&format!("alerter: {{signal: x, {fields}}}")])?;
    match &c[1] {
        ComponentSpec::Alerter(a) => Ok(a.clone()),
        other => panic!("not an alerter: {other:?}"),
    }
}

#[test]
fn alerter_defaults_are_apertures() {
    let a = alerter("alert_name: Latency high").expect("loads");
    assert_eq!(a.severity, Severity::Info);
    assert_eq!(a.resolve_timeout.0, Duration::from_secs(5));
    assert!(a.labels.is_empty() && a.alert_channels.is_empty());
    let c = components(&["alerter: {signal: x, alert_name: a}"]).expect("loads");
    assert_eq!(
        c[1].outs(),
        Vec::<&str>::new(),
        "an alerter writes no signal"
    );
    assert_eq!(c[1].inputs(), [&Operand::Signal("x".to_owned())]);
    let a = alerter(
        "alert_name: a, severity: crit, resolve_timeout: 1m, labels: {team: edge, tier: 1}, alert_channels: [pager, slack]",
    )
    .expect("loads");
    assert_eq!(
        (a.severity, a.resolve_timeout.0),
        (Severity::Crit, Duration::from_secs(60))
    );
    assert_eq!(a.labels["tier"], "1", "scalars are read as their text");
    assert_eq!(a.alert_channels, ["pager", "slack"]);
}

#[test]
fn alerter_refuses_bad_values_by_name() {
    let many: Vec<String> = (0..17).map(|i| format!("l{i}: v")).collect();
    let many = format!("alert_name: a, labels: {{{}}}", many.join(", "));
    let channels = format!(
        "alert_name: a, alert_channels: [{}]",
        vec!["c"; 17].join(", ")
    );
    for (fields, message) in [
        ("alert_name: ' '", "alert_name must not be empty".to_owned()),
        (
            "alert_name: a, labels: {policy_name: x}",
            r#"label "policy_name" is reserved (the alert's own labels are policy_name, alert_name, severity, alert_channels, alertname, job, instance)"#.to_owned(),
        ),
        (
            "alert_name: a, labels: {alertname: x}",
            r#"label "alertname" is reserved"#.to_owned(),
        ),
        (
            "alert_name: a, labels: {team-name: x}",
            r#"label "team-name" is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"#.to_owned(),
        ),
        (
            "alert_name: a, labels: {__name__: x}",
            r#"label "__name__" is not a Prometheus label name"#.to_owned(),
        ),
        (
            "alert_name: a, labels: {1st: x}",
            r#"label "1st" is not a Prometheus label name"#.to_owned(),
        ),
        (&many, "at most 16 labels, got 17".to_owned()),
        (&channels, "at most 16 alert_channels, got 17".to_owned()),
        (
            "alert_name: a, alert_channels: ['a,b']",
            r#"alert channel "a,b" must be 1 to 256 bytes, without commas"#.to_owned(),
        ),
    ] {
        let e = refused(fields, alerter(fields));
        assert!(
            e.starts_with(&format!("components[1]: alerter: {message}")),
            "{fields}: {e}"
        );
    }
    for (fields, at, message) in [
        ("severity: warn", "", "missing field `alert_name`"),
        (
            "alert_name: a, severity: error",
            ".severity",
            "unknown variant `error`",
        ),
        (
            "alert_name: a, resolve_timeout: soon",
            ".resolve_timeout",
            "",
        ),
        ("alert_name: a, for: 1m", ".for", "unknown field `for`"),
    ] {
        let (field, e) = yaml_error(&format!(
            "  components:\n    - alerter: {{signal: 1, {fields}}}\n"
        ));
        assert_eq!(
            field,
            format!("circuit.value.components[0].alerter{at}"),
            "{fields}: {e}"
        );
        assert!(e.contains(message), "{fields}: {e}");
    }
}

#[test]
fn one_alert_is_raised_by_one_alerter() {
    let e = refused(
        "twice",
        components(&[
            "alerter: {signal: x, alert_name: a, labels: {team: edge}}",
            "alerter: {signal: 1, alert_name: a, labels: {team: edge}, alert_channels: [other]}",
        ]),
    );
    assert_eq!(
        e,
        r#"components[2]: alert "a" (severity info) with these labels is raised by components[1] too: give one another name or labels"#
    );
    // Another severity or other labels make another alert.
    components(&[
        "alerter: {signal: x, alert_name: a, labels: {team: edge}}",
        "alerter: {signal: x, alert_name: a, labels: {team: core}}",
        "alerter: {signal: x, alert_name: a, labels: {team: edge}, severity: crit}",
    ])
    .expect("three alerts");
}

// ---------------------------------------------------------------------------
// The blueprint.

const BLUEPRINT: &str = "  blueprint: load_ramping.base\n  parameters:\n    sampler: beta\n    steps: [{target_accept_percentage: 1, duration: 0s}, {target_accept_percentage: 100, duration: 10m}]\n";

fn ramp_of(c: &[ComponentSpec]) -> &LoadRampSpec {
    match c.last() {
        Some(ComponentSpec::LoadRamp(r)) => r,
        other => panic!("the blueprint ends with its load ramp: {other:?}"),
    }
}

#[test]
fn the_blueprint_does_not_start_by_default() {
    let c = expand(BLUEPRINT).expect("loads");
    // Not started, no drivers: forward is min(0), nothing else.
    assert_eq!(c.len(), 2, "{c:?}");
    assert_eq!(
        c[0],
        ComponentSpec::Min(ExtremumSpec {
            out: "forward".to_owned(),
            inputs: vec![Operand::Constant(0.0)]
        })
    );
    let r = ramp_of(&c);
    assert_eq!(r.sampler.0, "beta");
    assert_eq!(r.steps.0, vec![step(1.0, 0), step(100.0, 600)]);
    assert_eq!(r.forward, Operand::Signal("forward".to_owned()));
    assert_eq!((&r.backward, &r.reset), (&None, &None));
    assert_eq!(c[1].outs(), ["accept_percentage", "at_start", "at_end"]);
    // Started: every tick.
    let c = expand(&format!("{BLUEPRINT}    start: true\n")).expect("loads");
    assert_eq!(
        c[0],
        ComponentSpec::Min(ExtremumSpec {
            out: "forward".to_owned(),
            inputs: vec![Operand::Constant(1.0)]
        })
    );
}

#[test]
fn the_blueprint_wires_drivers_as_aperture_does() {
    let c = expand(&format!(
        "{BLUEPRINT}    start: true
    drivers:
      promql_drivers:
        - query_string: 'sum(rate(errors[1m]))'
          criteria:
            forward: {{threshold: 1, operator: lt}}
            backward: {{threshold: 5, operator: gte}}
        - query_string: 'up'
          criteria:
            reset: {{threshold: 1, operator: neq}}
      average_latency_drivers:
        - {{flux_meter: latency, criteria: {{forward: {{threshold: 50}}, backward: {{threshold: 100}}}}}}
      percentile_latency_drivers:
        - {{flux_meter: latency, percentile: 99, criteria: {{reset: {{threshold: 500}}}}}}
"
    ))
    .expect("loads");
    let outs: Vec<&str> = c.iter().flat_map(ComponentSpec::outs).collect();
    assert_eq!(
        outs,
        [
            "promql_driver_0",
            "forward_0",
            "backward_0",
            "promql_driver_1",
            "reset_0",
            "average_latency_driver_0",
            "forward_1",
            "backward_1",
            "percentile_latency_driver_0",
            "reset_1",
            "forward_intent",
            "backward_intent",
            "reset",
            "not_backward",
            "forward",
            "accept_percentage",
            "at_start",
            "at_end",
        ]
    );
    let decider = |name: &str| {
        c.iter()
            .find_map(|c| match c {
                ComponentSpec::Decider(d) if d.out == name => {
                    Some((d.op, d.lhs.clone(), d.rhs.clone()))
                }
                _ => None,
            })
            .expect(name)
    };
    let s = |n: &str| Operand::Signal(n.to_owned());
    assert_eq!(
        decider("forward_0"),
        (Comparison::Lt, s("promql_driver_0"), Operand::Constant(1.0))
    );
    assert_eq!(
        decider("backward_0"),
        (
            Comparison::Gte,
            s("promql_driver_0"),
            Operand::Constant(5.0)
        )
    );
    assert_eq!(
        decider("reset_0"),
        (
            Comparison::Neq,
            s("promql_driver_1"),
            Operand::Constant(1.0)
        )
    );
    // Latency drivers: forward below, backward and reset above.
    assert_eq!(
        decider("forward_1"),
        (
            Comparison::Lt,
            s("average_latency_driver_0"),
            Operand::Constant(50.0)
        )
    );
    assert_eq!(
        decider("backward_1"),
        (
            Comparison::Gt,
            s("average_latency_driver_0"),
            Operand::Constant(100.0)
        )
    );
    assert_eq!(
        decider("reset_1"),
        (
            Comparison::Gt,
            s("percentile_latency_driver_0"),
            Operand::Constant(500.0)
        )
    );
    let query = |name: &str| {
        c.iter()
            .find_map(|c| match c {
                ComponentSpec::Promql(p) if p.out == name => {
                    Some((p.query.clone(), p.evaluation_interval))
                }
                _ => None,
            })
            .expect(name)
    };
    assert_eq!(
        query("promql_driver_0"),
        ("sum(rate(errors[1m]))".to_owned(), None),
        "every tick"
    );
    let flows = r#"{flux_meter_name="latency",policy_name="svc",decision_type="accepted",flow_status="OK"}"#;
    assert_eq!(
        query("average_latency_driver_0").0,
        format!(
            "sum(increase(flux_meter_sum{flows}[30s])) / sum(increase(flux_meter_count{flows}[30s]))"
        )
    );
    assert_eq!(
        query("percentile_latency_driver_0").0,
        format!("histogram_quantile(0.99, sum by (le) (rate(flux_meter_bucket{flows}[30s])))")
    );
    // Any forward criterion, and no backward one, and started.
    let extremum = |name: &str| {
        c.iter()
            .find_map(|c| match c {
                ComponentSpec::Min(e) | ComponentSpec::Max(e) if e.out == name => {
                    Some(e.inputs.clone())
                }
                _ => None,
            })
            .expect(name)
    };
    assert_eq!(extremum("forward_intent"), [s("forward_0"), s("forward_1")]);
    assert_eq!(
        extremum("backward_intent"),
        [s("backward_0"), s("backward_1")]
    );
    assert_eq!(extremum("reset"), [s("reset_0"), s("reset_1")]);
    assert!(
        matches!(&c[c.len() - 2], ComponentSpec::Min(e) if e.inputs == [s("forward_intent"), s("not_backward"), Operand::Constant(1.0)])
    );
    let r = ramp_of(&c);
    assert_eq!(
        (&r.forward, &r.backward, &r.reset),
        (
            &s("forward"),
            &Some(s("backward_intent")),
            &Some(s("reset"))
        )
    );
}

#[test]
fn the_blueprint_refuses_bad_parameters_by_name() {
    for (extra, message) in [
        (
            "    kill_switch: true\n",
            "blueprint load_ramping.base: parameters.kill_switch: unknown field `kill_switch`",
        ),
        (
            "    drivers: {average_latency_drivers: [{flux_meter: latency, criteria: {forward: {threshold: 1, operator: lt}}}]}\n",
            "blueprint load_ramping.base: parameters.drivers.average_latency_drivers[0].criteria.forward.operator: unknown field `operator`",
        ),
        (
            "    drivers: {promql_drivers: [{query_string: q, criteria: {forward: {threshold: 1}}}]}\n",
            "blueprint load_ramping.base: parameters.drivers.promql_drivers[0].criteria.forward: missing field `operator`",
        ),
        (
            "    drivers: {promql_drivers: [{query_string: ' ', criteria: {}}]}\n",
            "blueprint load_ramping.base: drivers.promql_drivers[0].query_string must not be empty",
        ),
        (
            "    drivers: {percentile_latency_drivers: [{flux_meter: latency, percentile: 100, criteria: {}}]}\n",
            "blueprint load_ramping.base: drivers.percentile_latency_drivers[0].percentile must be above 0 and below 100, got 100",
        ),
        (
            "    start: yes please\n",
            "blueprint load_ramping.base: parameters.start: ",
        ),
    ] {
        let e = refused(extra, expand(&format!("{BLUEPRINT}{extra}")));
        assert!(e.starts_with(message), "{extra}: {e}");
    }
    let e = refused(
        "no steps",
        expand("  blueprint: load_ramping.base\n  parameters: {sampler: beta}\n"),
    );
    assert_eq!(
        e,
        "blueprint load_ramping.base: parameters: missing field `steps`"
    );
    let e = refused(
        "empty steps",
        expand("  blueprint: load_ramping.base\n  parameters: {sampler: beta, steps: []}\n"),
    );
    assert_eq!(
        e,
        "blueprint load_ramping.base: parameters.steps: must have at least one entry"
    );
    // The sampler is checked with the circuit, after expansion.
    let e = refused(
        "sampler",
        expand(&BLUEPRINT.replace("sampler: beta", "sampler: nope")),
    );
    assert_eq!(e, r#"components[1]: no sampler "nope" in this policy"#);
    let e = refused(
        "driven twice",
        expand(&format!(
            "{BLUEPRINT}  components:\n    - actuator: {{sampler: beta, input: 5}}\n"
        )),
    );
    assert_eq!(
        e,
        r#"components[1]: sampler "beta" is driven by components[2] too"#
    );
}
