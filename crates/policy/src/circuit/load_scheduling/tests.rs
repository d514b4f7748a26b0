//! Aperture's load scheduler components and blueprints, as the loader reads
//! and checks them.

use std::path::Path;
use std::time::Duration;

use super::super::{ComponentSpec, Operand, PromqlSpec};
use super::*;
use crate::load::parse_policy;

/// A policy with a flux meter `latency`, load schedulers `protect` and
/// `other`, and `circuit` (indented under `circuit:`).
fn policy(circuit: &str) -> String {
    format!(
        "name: svc
flux_meters: [{{name: latency, selectors: [{{control_point: ingress}}]}}]
load_schedulers:
  - {{name: protect, selectors: [{{control_point: ingress}}]}}
  - {{name: other, selectors: [{{control_point: egress}}]}}
circuit:
{circuit}"
    )
}

/// The expanded circuit of `circuit`, or the loader's error message
/// (which must be the `circuit` field's).
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

/// `component` as the only component of a circuit that also has signals
/// `x` and `obs`.
fn component(component: &str) -> Result<ComponentSpec, String> {
    let circuit = format!(
        "  components:\n    - promql: {{out: x, query: q}}\n    - promql: {{out: obs, query: r}}\n    - {component}\n"
    );
    expand(&circuit).map(|c| c[2].clone())
}

fn refused(what: &str, circuit: Result<impl std::fmt::Debug, String>) -> String {
    match circuit {
        Ok(c) => panic!("{what} should be refused, loaded {c:?}"),
        Err(e) => e,
    }
}

/// The YAML loader's own error (a field missing or unknown): its field and
/// message.
fn yaml_error(circuit: &str) -> (String, String) {
    let e = parse_policy(Path::new("p.yaml"), &policy(circuit)).expect_err("refused");
    (e.field, e.message)
}

const AIMD: &str = "aimd_load_scheduler: {out: lm, load_scheduler: protect, signal: x, setpoint: 10, observed_load_multiplier: obs, gradient: {slope: -1}";
const AIAD: &str =
    "aiad_load_scheduler: {out: lm, load_scheduler: protect, signal: x, setpoint: 10";
const RANGE: &str = "range_driven_load_scheduler: {out: lm, load_scheduler: protect, signal: x, low_throttle_threshold: {signal_value: 50, load_multiplier: 1}, high_throttle_threshold: {signal_value: 100, load_multiplier: 0.1}";

#[test]
fn aimd_defaults_are_apertures() {
    let ComponentSpec::AimdLoadScheduler(a) = component(&format!("{AIMD}}}")).expect("loads")
    else {
        panic!("not an AIMD scheduler")
    };
    assert_eq!(a.load_multiplier_linear_increment, 0.025);
    assert_eq!(a.max_load_multiplier, 2.0);
    assert_eq!(a.step_interval.0, Duration::from_secs(10));
    assert_eq!(
        a.gradient,
        GradientParameters {
            slope: -1.0,
            min_gradient: None,
            max_gradient: None
        }
    );
    assert_eq!((a.out_is_overload, a.overload_confirmation), (None, None));
}

#[test]
fn aimd_refuses_bad_values_by_name() {
    for (fields, message) in [
        (
            "gradient: {slope: 0}",
            "gradient.slope must be a number other than 0, got 0",
        ),
        (
            "gradient: {slope: -1, min_gradient: 2, max_gradient: 1}",
            "gradient.min_gradient (2) must not exceed gradient.max_gradient (1)",
        ),
        (
            "max_load_multiplier: 0",
            "max_load_multiplier must be a number > 0, got 0",
        ),
        (
            "load_multiplier_linear_increment: -0.1",
            "load_multiplier_linear_increment must be a number >= 0, got -0.1",
        ),
    ] {
        let c =
            format!("{AIMD}, {fields}}}").replace("gradient: {slope: -1}, gradient", "gradient");
        assert_eq!(
            refused(fields, component(&c)),
            format!("components[2]: aimd_load_scheduler: {message}"),
            "{fields}"
        );
    }
    // Required fields, and zero durations, are the YAML loader's.
    let (field, message) = yaml_error(
        "  components:\n    - aimd_load_scheduler: {out: lm, load_scheduler: protect, signal: 1, setpoint: 1, observed_load_multiplier: 1}\n",
    );
    assert!(
        field.ends_with("components[0].aimd_load_scheduler"),
        "{field}"
    );
    assert!(message.contains("missing field `gradient`"), "{message}");
    let (field, message) = yaml_error(&format!(
        "  components:\n    - {}, step_interval: 0s}}\n",
        AIMD.replace("signal: x", "signal: 1").replace(
            "observed_load_multiplier: obs",
            "observed_load_multiplier: 1"
        )
    ));
    assert!(field.ends_with("step_interval"), "{field}");
    assert!(message.contains("longer than zero"), "{message}");
}

#[test]
fn aiad_defaults_are_apertures() {
    let ComponentSpec::AiadLoadScheduler(a) = component(&format!("{AIAD}}}")).expect("loads")
    else {
        panic!("not an AIAD scheduler")
    };
    assert_eq!(a.overload_condition, Comparison::Gt);
    assert_eq!(
        (
            a.load_multiplier_linear_increment,
            a.load_multiplier_linear_decrement,
            a.max_load_multiplier,
            a.min_load_multiplier
        ),
        (0.025, 0.05, 2.0, 0.0)
    );
    assert_eq!(a.step_interval.0, Duration::from_secs(10));
}

#[test]
fn aiad_refuses_bad_values_by_name() {
    for (fields, message) in [
        (
            "overload_condition: eq",
            "overload_condition must be gt, lt, gte or lte, not eq",
        ),
        (
            "load_multiplier_linear_decrement: -1",
            "load_multiplier_linear_decrement must be a number >= 0, got -1",
        ),
        (
            "max_load_multiplier: -1",
            "max_load_multiplier must be a number >= 0, got -1",
        ),
        (
            "min_load_multiplier: 0.9, max_load_multiplier: 0.5",
            "min_load_multiplier (0.9) must not exceed max_load_multiplier (0.5)",
        ),
    ] {
        assert_eq!(
            refused(fields, component(&format!("{AIAD}, {fields}}}"))),
            format!("components[2]: aiad_load_scheduler: {message}"),
        );
    }
    for ok in ["gt", "lt", "gte", "lte"] {
        component(&format!("{AIAD}, overload_condition: {ok}}}")).expect(ok);
    }
    let (field, message) = yaml_error(&format!(
        "  components:\n    - {}, overload_condition: above}}\n",
        AIAD.replace("signal: x", "signal: 1")
    ));
    assert!(field.ends_with("overload_condition"), "{field}");
    assert!(message.contains("unknown variant `above`"), "{message}");
}

#[test]
fn range_driven_needs_its_thresholds_and_a_positive_degree() {
    let ComponentSpec::RangeDrivenLoadScheduler(r) =
        component(&format!("{RANGE}, degree: 2}}")).expect("loads")
    else {
        panic!("not a range-driven scheduler")
    };
    assert_eq!(
        r.high_throttle_threshold,
        Datapoint {
            signal_value: 100.0,
            load_multiplier: 0.1
        }
    );
    for (fields, message) in [
        ("degree: 0", "degree must be a number > 0, got 0"),
        ("degree: -1", "degree must be a number > 0, got -1"),
    ] {
        assert_eq!(
            refused(fields, component(&format!("{RANGE}, {fields}}}"))),
            format!("components[2]: range_driven_load_scheduler: {message}"),
        );
    }
    let over = RANGE.replace("load_multiplier: 0.1", "load_multiplier: 1.5");
    assert_eq!(
        refused("1.5", component(&format!("{over}, degree: 1}}"))),
        "components[2]: range_driven_load_scheduler: high_throttle_threshold.load_multiplier must be between 0 and 1, got 1.5"
    );
    // No default degree (Aperture requires it), nor threshold fields.
    let (_, message) = yaml_error(&format!(
        "  components:\n    - {}}}\n",
        RANGE.replace("signal: x", "signal: 1")
    ));
    assert!(message.contains("missing field `degree`"), "{message}");
    let (field, message) = yaml_error(&format!(
        "  components:\n    - {}, degree: 1}}\n",
        RANGE
            .replace("signal: x", "signal: 1")
            .replace("signal_value: 50, ", "")
    ));
    assert!(field.ends_with("low_throttle_threshold"), "{field}");
    assert!(
        message.contains("missing field `signal_value`"),
        "{message}"
    );
}

#[test]
fn load_scheduler_components_are_wired_like_the_rest() {
    // Its load scheduler must exist...
    assert_eq!(
        refused(
            "nope",
            component(
                &format!("{AIAD}, load_scheduler: nope}}").replace("load_scheduler: protect, ", "")
            )
        ),
        r#"components[2]: no load scheduler "nope" in this policy"#
    );
    // ...and be driven by nothing else.
    let twice = format!(
        "  components:\n    - promql: {{out: x, query: q}}\n    - {AIAD}}}\n    - actuator: {{load_scheduler: protect, input: 0.5}}\n"
    );
    assert_eq!(
        refused("twice", expand(&twice)),
        r#"components[1]: load scheduler "protect" is driven by components[2] too"#
    );
    let elsewhere = twice.replace(
        "{load_scheduler: protect, input",
        "{load_scheduler: other, input",
    );
    expand(&elsewhere).expect("another load scheduler");
    // Its signals are read and written like any component's.
    assert_eq!(
        refused(
            "missing",
            component(&format!("{AIAD}, overload_confirmation: nowhere}}"))
        ),
        r#"components[2]: no component writes signal "nowhere""#
    );
    assert_eq!(
        refused(
            "twice written",
            component(&format!("{AIAD}, out_is_overload: x}}"))
        ),
        r#"components[2]: signal "x" is written twice"#
    );
    let ComponentSpec::AiadLoadScheduler(_) = component(&format!(
        "{AIAD}, out_is_overload: over, overload_confirmation: obs}}"
    ))
    .expect("loads") else {
        panic!("not an AIAD scheduler")
    };
}

// ---------------------------------------------------------------------------
// Blueprints.

const AIMD_BLUEPRINT: &str = "  blueprint: load_scheduling.aimd\n  parameters:\n    flux_meter: latency\n    load_scheduler: protect\n";
const PROMQL_BLUEPRINT: &str = "  blueprint: load_scheduling.promql\n  parameters:\n    promql_query: 'sum(backends)'\n    setpoint: 70\n    overload_condition: gt\n    load_scheduler: protect\n";

fn query<'a>(components: &'a [ComponentSpec], out: &str) -> &'a PromqlSpec {
    components
        .iter()
        .find_map(|c| match c {
            ComponentSpec::Promql(p) if p.out == out => Some(p),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no query {out} in {components:?}"))
}

#[test]
fn the_aimd_blueprint_fills_in_apertures_defaults() {
    let c = expand(AIMD_BLUEPRINT).expect("loads");
    let signal = query(&c, "signal");
    assert!(
        signal.query.contains(
            r#"flux_meter_sum{flux_meter_name="latency",policy_name="svc",decision_type="accepted",flow_status="OK"}[30s]"#
        ),
        "{}",
        signal.query
    );
    assert_eq!(
        signal.evaluation_interval,
        Some(DurationSpec(Duration::from_secs(10)))
    );
    let long = query(&c, "signal_long_term");
    assert!(long.query.contains("[1800s]"), "{}", long.query);
    assert_eq!(
        long.evaluation_interval,
        Some(DurationSpec(Duration::from_secs(30)))
    );
    assert!(
        c.contains(&ComponentSpec::Arithmetic(ArithmeticSpec {
            out: "setpoint".to_owned(),
            op: ArithmeticOp::Mul,
            lhs: signal_op("signal_long_term"),
            rhs: Operand::Constant(1.25),
        })),
        "{c:?}"
    );
    assert!(
        query(&c, "observed_load_multiplier").query.contains(
            r#"/ (sum(increase(accepted_tokens_total{policy_name="svc",component="protect"}[30s])) + sum(increase(rejected_tokens_total{"#
        )
    );
    let Some(ComponentSpec::AimdLoadScheduler(a)) = c.last() else {
        panic!("the scheduler comes last: {c:?}")
    };
    assert_eq!(a.load_scheduler.0, "protect");
    assert_eq!(
        a.gradient,
        GradientParameters {
            slope: -1.0,
            min_gradient: Some(0.1),
            max_gradient: Some(1.0)
        }
    );
    assert_eq!(
        (a.load_multiplier_linear_increment, a.max_load_multiplier),
        (0.025, 2.0)
    );
    assert_eq!(a.overload_confirmation, None, "none: always confirmed");
    assert_eq!(a.out_is_overload.as_deref(), Some("is_overload"));
}

fn signal_op(name: &str) -> Operand {
    Operand::Signal(name.to_owned())
}

#[test]
fn the_aimd_blueprint_takes_its_parameters() {
    let c = expand(&format!(
        "{AIMD_BLUEPRINT}    latency_tolerance_multiplier: 1.5\n    long_term_query_interval: 1h\n    long_term_query_periodic_interval: 1m\n    gradient: {{slope: -2}}\n    max_load_multiplier: 1.5\n    load_multiplier_linear_increment: 0.1\n"
    ))
    .expect("loads");
    let long = query(&c, "signal_long_term");
    assert!(long.query.contains("[3600s]"), "{}", long.query);
    assert_eq!(
        long.evaluation_interval,
        Some(DurationSpec(Duration::from_secs(60)))
    );
    let Some(ComponentSpec::AimdLoadScheduler(a)) = c.last() else {
        panic!("the scheduler comes last")
    };
    // A partial gradient keeps the blueprint's other defaults.
    assert_eq!(
        a.gradient,
        GradientParameters {
            slope: -2.0,
            min_gradient: Some(0.1),
            max_gradient: Some(1.0)
        }
    );
    assert_eq!(
        (a.load_multiplier_linear_increment, a.max_load_multiplier),
        (0.1, 1.5)
    );
}

#[test]
fn blueprint_errors_name_the_field_and_the_blueprint() {
    for (extra, message) in [
        (
            "    flux_metr: x\n",
            "blueprint load_scheduling.aimd: parameters.flux_metr: unknown field `flux_metr`",
        ),
        (
            "    gradient: {slop: 1}\n",
            "blueprint load_scheduling.aimd: parameters.gradient.slop: unknown field `slop`",
        ),
        // The average-latency blueprint's parameter is not this one's.
        (
            "    recovery_step: 0.1\n",
            "blueprint load_scheduling.aimd: parameters.recovery_step: unknown field `recovery_step`",
        ),
        (
            "    latency_tolerance_multiplier: 0\n",
            "blueprint load_scheduling.aimd: latency_tolerance_multiplier must be a number > 0, got 0",
        ),
        (
            "    gradient: {slope: 0}\n",
            "blueprint load_scheduling.aimd: gradient.slope must be a number other than 0, got 0",
        ),
        (
            "    max_load_multiplier: -1\n",
            "blueprint load_scheduling.aimd: max_load_multiplier must be a number > 0, got -1",
        ),
        (
            "    long_term_query_interval: 0s\n",
            "blueprint load_scheduling.aimd: parameters.long_term_query_interval: must be longer than zero",
        ),
    ] {
        let e = refused(extra, expand(&format!("{AIMD_BLUEPRINT}{extra}")));
        assert!(e.starts_with(message), "{extra}: {e}");
    }
    let e = refused(
        "no flux meter",
        expand("  blueprint: load_scheduling.aimd\n  parameters: {load_scheduler: protect}\n"),
    );
    assert_eq!(
        e,
        "blueprint load_scheduling.aimd: parameters: missing field `flux_meter`"
    );
    // The promql blueprint's fields are its own too.
    let e = refused(
        "tolerance",
        expand(&format!(
            "{PROMQL_BLUEPRINT}    latency_tolerance_multiplier: 1.1\n"
        )),
    );
    assert!(
        e.starts_with("blueprint load_scheduling.promql: parameters.latency_tolerance_multiplier: unknown field"),
        "{e}"
    );
    // And the average-latency blueprint's.
    let e = refused(
        "average latency",
        expand(
            "  blueprint: load_scheduling.average_latency\n  parameters: {flux_meter: latency, load_scheduler: protect, gradient: {slope: -1}}\n",
        ),
    );
    assert!(
        e.starts_with("blueprint load_scheduling.average_latency: parameters.gradient: unknown field `gradient`"),
        "{e}"
    );
    let e = refused(
        "unknown",
        expand("  blueprint: load_scheduling.nope\n  parameters: {}\n"),
    );
    assert_eq!(
        e,
        format!(
            r#"unknown blueprint "load_scheduling.nope" (known: {})"#,
            super::super::BLUEPRINTS.join(", ")
        )
    );
    assert!(
        e.contains("load_scheduling.average_latency, load_scheduling.aimd, load_scheduling.promql"),
        "{e}"
    );
}

#[test]
fn overload_confirmations_are_anded_queries() {
    let c = expand(&format!(
        "{AIMD_BLUEPRINT}    overload_confirmations:\n      - {{query_string: cpu, threshold: 0.8, operator: gte}}\n      - {{query_string: mem, threshold: 0.9, operator: neq}}\n"
    ))
    .expect("loads");
    assert_eq!(query(&c, "overload_confirmation_query_1").query, "mem");
    let deciders: Vec<&DeciderSpec> = c
        .iter()
        .filter_map(|c| match c {
            ComponentSpec::Decider(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(
        deciders
            .iter()
            .map(|d| (d.out.as_str(), d.op, d.rhs.clone()))
            .collect::<Vec<_>>(),
        vec![
            (
                "overload_confirmation_0",
                Comparison::Gte,
                Operand::Constant(0.8)
            ),
            (
                "overload_confirmation_1",
                Comparison::Neq,
                Operand::Constant(0.9)
            ),
        ]
    );
    assert!(c.contains(&ComponentSpec::Min(ExtremumSpec {
        out: "overload_confirmation".to_owned(),
        inputs: vec![
            signal_op("overload_confirmation_0"),
            signal_op("overload_confirmation_1")
        ],
    })));
    let Some(ComponentSpec::AimdLoadScheduler(a)) = c.last() else {
        panic!("the scheduler comes last")
    };
    assert_eq!(
        a.overload_confirmation,
        Some(signal_op("overload_confirmation"))
    );

    for (entry, message) in [
        (
            "{query_string: ' ', threshold: 1, operator: gt}",
            "blueprint load_scheduling.aimd: overload_confirmations[0].query_string must not be empty",
        ),
        (
            "{query_string: cpu, threshold: 1, operator: ne}",
            "blueprint load_scheduling.aimd: parameters.overload_confirmations[0].operator: unknown variant `ne`",
        ),
        (
            "{query_string: cpu, operator: gt}",
            "blueprint load_scheduling.aimd: parameters.overload_confirmations[0]: missing field `threshold`",
        ),
    ] {
        let e = refused(
            entry,
            expand(&format!(
                "{AIMD_BLUEPRINT}    overload_confirmations: [{entry}]\n"
            )),
        );
        assert!(e.starts_with(message), "{entry}: {e}");
    }
}

#[test]
fn the_promql_blueprint_fills_in_apertures_defaults() {
    let c = expand(PROMQL_BLUEPRINT).expect("loads");
    assert_eq!(query(&c, "signal").query, "sum(backends)");
    let Some(ComponentSpec::AiadLoadScheduler(a)) = c.last() else {
        panic!("the scheduler comes last: {c:?}")
    };
    assert_eq!(a.setpoint, Operand::Constant(70.0));
    assert_eq!(a.overload_condition, Comparison::Gt);
    assert_eq!(
        (
            a.load_multiplier_linear_increment,
            a.load_multiplier_linear_decrement,
            a.max_load_multiplier,
            a.min_load_multiplier
        ),
        (0.025, 0.05, 2.0, 0.0)
    );
    let c = expand(&format!(
        "{PROMQL_BLUEPRINT}    overload_confirmations: [{{query_string: cpu, threshold: 1, operator: lt}}]\n"
    ))
    .expect("loads");
    let Some(ComponentSpec::AiadLoadScheduler(a)) = c.last() else {
        panic!("the scheduler comes last")
    };
    assert_eq!(
        a.overload_confirmation,
        Some(signal_op("overload_confirmation"))
    );
}

#[test]
fn the_promql_blueprint_refuses_bad_values() {
    for (from, to, message) in [
        (
            "    overload_condition: gt\n",
            "",
            "blueprint load_scheduling.promql: parameters: missing field `overload_condition`",
        ),
        (
            "overload_condition: gt",
            "overload_condition: neq",
            "blueprint load_scheduling.promql: overload_condition must be gt, lt, gte or lte, not neq",
        ),
        (
            "promql_query: 'sum(backends)'",
            "promql_query: ''",
            "blueprint load_scheduling.promql: promql_query must not be empty",
        ),
        (
            "load_scheduler: protect\n",
            "load_scheduler: protect\n    min_load_multiplier: 3\n",
            "blueprint load_scheduling.promql: min_load_multiplier (3) must not exceed max_load_multiplier (2)",
        ),
    ] {
        let e = refused(to, expand(&PROMQL_BLUEPRINT.replace(from, to)));
        assert_eq!(e, message);
    }
    // The load scheduler is checked with the circuit.
    let e = refused(
        "nope",
        expand(&PROMQL_BLUEPRINT.replace("load_scheduler: protect", "load_scheduler: nope")),
    );
    assert_eq!(
        e,
        r#"components[1]: no load scheduler "nope" in this policy"#
    );
}

#[test]
fn the_average_latency_blueprint_is_unchanged() {
    let c = expand(
        "  blueprint: load_scheduling.average_latency\n  parameters: {flux_meter: latency, load_scheduler: protect}\n",
    )
    .expect("loads");
    assert_eq!(c.len(), 12);
    assert!(c.contains(&ComponentSpec::Arithmetic(ArithmeticSpec {
        out: "setpoint".to_owned(),
        op: ArithmeticOp::Mul,
        lhs: signal_op("baseline_latency"),
        rhs: Operand::Constant(1.1),
    })));
    let e = refused(
        "no parameters",
        expand("  blueprint: load_scheduling.average_latency\n"),
    );
    assert_eq!(
        e,
        r#"blueprint "load_scheduling.average_latency" needs `parameters`"#
    );
}
