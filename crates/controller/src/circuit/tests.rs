//! Circuits on synthetic signal series.

use super::*;

const TICK: Duration = Duration::from_secs(10);

fn circuit(yaml: &str) -> Circuit {
    let specs: Vec<ComponentSpec> = serde_saphyr::from_str(yaml).expect("valid components");
    Circuit::compile(&specs, TICK)
}

/// Runs the circuit over `series` (values of the first PromQL component,
/// `None` for no data) and returns signal `name` after each tick.
fn run(c: &mut Circuit, series: &[Option<f64>], name: &str) -> Vec<Option<f64>> {
    series
        .iter()
        .map(|v| {
            let results = c.due_queries().into_iter().map(|(i, _)| (i, *v)).collect();
            c.tick(&results);
            c.signals().find(|(n, _)| *n == name).and_then(|(_, v)| v)
        })
        .collect()
}

fn round(v: Vec<Option<f64>>) -> Vec<Option<f64>> {
    v.into_iter()
        .map(|x| x.map(|x| (x * 1000.0).round() / 1000.0))
        .collect()
}

#[test]
fn ema_smooths_and_holds_through_missing_data() {
    // window 30 s at 10 s ticks: alpha = 2 / (3 + 1) = 0.5.
    let mut c = circuit("- promql: {out: x, query: q}\n- ema: {out: avg, input: x, window: 30s}\n");
    let avg = run(
        &mut c,
        &[None, Some(10.0), Some(20.0), None, Some(0.0)],
        "avg",
    );
    assert_eq!(
        avg,
        vec![None, Some(10.0), Some(15.0), Some(15.0), Some(7.5)]
    );
}

#[test]
fn ema_freezes_while_told_to() {
    let mut c = circuit(
        "- promql: {out: x, query: q}\n- ema: {out: avg, input: x, window: 30s, freeze: hold}\n- decider: {out: hold, op: gt, lhs: x, rhs: 100}\n",
    );
    // `hold` is read from the previous tick (it is computed after the EMA).
    let avg = run(
        &mut c,
        &[Some(10.0), Some(500.0), Some(600.0), Some(10.0), Some(10.0)],
        "avg",
    );
    assert_eq!(
        avg,
        vec![
            Some(10.0),
            Some(255.0),
            Some(255.0),
            Some(255.0),
            Some(132.5)
        ]
    );
}

#[test]
fn decider_switches_only_after_its_hysteresis() {
    let mut c = circuit(
        "- promql: {out: x, query: q}\n- decider: {out: high, op: gt, lhs: x, rhs: 5, true_for: 20s, false_for: 10s}\n",
    );
    let x = [1.0, 9.0, 9.0, 9.0, 9.0, 1.0, 9.0, 1.0, 1.0, 1.0];
    let high = run(&mut c, &x.map(Some), "high");
    let high: Vec<u8> = high
        .into_iter()
        .map(|h| h.expect("a decider always answers") as u8)
        .collect();
    // On after holding for 20 s (the third tick over), off after failing
    // for 10 s (the second tick under); a blip back does not reset it.
    assert_eq!(high, vec![0, 0, 0, 1, 1, 1, 1, 1, 0, 0]);
}

#[test]
fn decider_treats_missing_data_as_not_holding() {
    let mut c =
        circuit("- promql: {out: x, query: q}\n- decider: {out: high, op: gt, lhs: x, rhs: 5}\n");
    let high = run(&mut c, &[Some(9.0), None, Some(9.0)], "high");
    assert_eq!(high, vec![Some(1.0), Some(0.0), Some(1.0)]);
}

#[test]
fn gradient_scales_the_control_variable_within_its_clamp() {
    let mut c = circuit(
        "- promql: {out: latency, query: q}\n- gradient_controller: {out: lm, signal: latency, setpoint: 100, control_variable: 0.8, slope: -1, min_gradient: 0.25, max_gradient: 1}\n",
    );
    let lm = run(
        &mut c,
        &[Some(100.0), Some(200.0), Some(1000.0), Some(50.0), None],
        "lm",
    );
    // 1 × 0.8; 0.5 × 0.8; clamped at 0.25; clamped at 1; missing in, missing out.
    assert_eq!(
        round(lm),
        vec![Some(0.8), Some(0.4), Some(0.2), Some(0.8), None]
    );
}

#[test]
fn integrator_sums_clamps_and_resets() {
    let mut c = circuit(
        "- promql: {out: x, query: q}\n- decider: {out: reset, op: lt, lhs: x, rhs: 0}\n- integrator: {out: sum, input: x, reset: reset, initial: 1, max: 10}\n",
    );
    let sum = run(
        &mut c,
        &[Some(2.0), Some(3.0), None, Some(9.0), Some(-1.0), Some(4.0)],
        "sum",
    );
    assert_eq!(
        sum,
        vec![
            Some(3.0),
            Some(6.0),
            Some(6.0),
            Some(10.0),
            Some(1.0),
            Some(5.0)
        ]
    );
}

#[test]
fn arithmetic_switcher_and_extremes_with_missing_operands() {
    let mut c = circuit(
        r#"
- promql: {out: x, query: q}
- arithmetic: {out: half, op: div, lhs: x, rhs: 2}
- arithmetic: {out: inf, op: div, lhs: x, rhs: 0}
- min: {out: low, inputs: [x, 3]}
- max: {out: high, inputs: [x, half]}
- switcher: {out: pick, switch: low, on_true: half, on_false: x}
"#,
    );
    let series = [Some(4.0), None, Some(0.0)];
    assert_eq!(
        run(&mut c, &series, "half"),
        vec![Some(2.0), None, Some(0.0)]
    );
    let mut c2 = circuit(
        "- promql: {out: x, query: q}\n- arithmetic: {out: inf, op: div, lhs: x, rhs: 0}\n",
    );
    assert_eq!(
        run(&mut c2, &series, "inf"),
        vec![None, None, None],
        "division by zero is missing"
    );
    let mut c3 = circuit("- promql: {out: x, query: q}\n- min: {out: low, inputs: [x, 3]}\n");
    assert_eq!(
        run(&mut c3, &series, "low"),
        vec![Some(3.0), Some(3.0), Some(0.0)],
        "min of the present"
    );
    let mut c4 = circuit(
        "- promql: {out: x, query: q}\n- switcher: {out: pick, switch: x, on_true: 1, on_false: 2}\n",
    );
    assert_eq!(
        run(&mut c4, &series, "pick"),
        vec![Some(1.0), None, Some(2.0)]
    );
}

#[test]
fn feedback_reads_the_previous_tick() {
    // A multiplier rising by 0.25 a tick from its own last value, to 1.
    let mut c = circuit(
        "- arithmetic: {out: up, op: add, lhs: lm, rhs: 0.25}\n- min: {out: lm, inputs: [up, 1]}\n",
    );
    let lm = run(&mut c, &[None, None, None], "lm");
    assert_eq!(lm, vec![Some(1.0), Some(1.0), Some(1.0)]);
    let mut c = circuit(
        "- promql: {out: start, query: q}\n- arithmetic: {out: up, op: add, lhs: lm, rhs: 0.25}\n- min: {out: capped, inputs: [up, 1]}\n- min: {out: lm, inputs: [start, capped]}\n",
    );
    // Pulled down to 0.25 by `start`, then rising one step per tick.
    let lm = run(&mut c, &[Some(0.25), None, None, None, None], "lm");
    assert_eq!(
        lm,
        vec![Some(0.25), Some(0.5), Some(0.75), Some(1.0), Some(1.0)]
    );
}

#[test]
fn queries_run_at_their_interval_and_hold_between() {
    let mut c = circuit("- promql: {out: x, query: q, evaluation_interval: 30s}\n");
    assert_eq!(c.due_queries().len(), 1);
    let x = run(&mut c, &[Some(1.0), Some(2.0), Some(3.0), Some(4.0)], "x");
    assert_eq!(x, vec![Some(1.0), Some(1.0), Some(1.0), Some(4.0)]);
}

#[test]
fn actuators_send_present_values_only() {
    let mut c = circuit(
        "- promql: {out: x, query: q}\n- actuator: {load_scheduler: protect, input: x}\n- actuator: {rate_limiter: rl, fill_amount: x}\n",
    );
    let results = HashMap::from([(0, Some(0.5))]);
    assert_eq!(
        c.tick(&results),
        vec![
            Output {
                target: Target::LoadMultiplier("protect".into()),
                value: Some(0.5),
                fill_amount: None
            },
            Output {
                target: Target::RateLimit("rl".into()),
                value: None,
                fill_amount: Some(0.5)
            },
        ]
    );
    assert!(c.tick(&HashMap::from([(0, None)])).is_empty());
}

#[test]
fn schedulers_are_driven_like_the_limiters_of_their_kind() {
    // A quota scheduler takes a bucket (a constant capacity, a computed
    // fill amount), a concurrency scheduler an input.
    let mut c = circuit(
        "- promql: {out: x, query: q}\n\
         - arithmetic: {out: fill, op: mul, lhs: x, rhs: 2}\n\
         - arithmetic: {out: slots, op: add, lhs: x, rhs: 1}\n\
         - actuator: {quota_scheduler: quota, bucket_capacity: 5, fill_amount: fill}\n\
         - actuator: {concurrency_scheduler: gate, input: slots}\n",
    );
    let outputs = c.tick(&HashMap::from([(0, Some(3.0))]));
    assert_eq!(
        outputs,
        vec![
            Output {
                target: Target::QuotaBucket("quota".into()),
                value: Some(5.0),
                fill_amount: Some(6.0)
            },
            Output {
                target: Target::SchedulerConcurrency("gate".into()),
                value: Some(4.0),
                fill_amount: None
            },
        ]
    );
    // Without data the computed values are missing: the quota scheduler
    // still gets its constant capacity, the concurrency scheduler nothing.
    assert_eq!(
        c.tick(&HashMap::from([(0, None)])),
        vec![Output {
            target: Target::QuotaBucket("quota".into()),
            value: Some(5.0),
            fill_amount: None
        }]
    );
}

/// The average-latency blueprint (tolerance 1.1, baseline over 10 ticks,
/// recovery 0.25 per tick) run over (latency, observed multiplier) pairs;
/// `None` as observed feeds back the multiplier it sent. Returns the
/// multiplier sent after each tick, to two decimals.
fn average_latency(ticks: &[(f64, Option<f64>)]) -> Vec<f64> {
    use sluice_policy::load::parse_policy;
    let policy = parse_policy(
        std::path::Path::new("p.yaml"),
        r#"
name: svc
flux_meters: [{name: latency, selectors: [{control_point: ingress}]}]
load_schedulers: [{name: protect, selectors: [{control_point: ingress}]}]
circuit:
  blueprint: load_scheduling.average_latency
  parameters:
    flux_meter: latency
    load_scheduler: protect
    baseline_window: 100s
    recovery_step: 0.25
"#,
    )
    .expect("valid policy");
    let specs = policy
        .circuit
        .as_ref()
        .expect("circuit")
        .value
        .expand("svc")
        .expect("expands");
    let mut c = Circuit::compile(&specs, TICK);
    let query = |needle: &str| {
        c.due_queries()
            .into_iter()
            .find(|(_, q)| q.contains(needle))
            .expect("query")
            .0
    };
    let (latency_q, observed_q) = (query("flux_meter_sum"), query("accepted_tokens"));
    let mut sent = 1.0;
    ticks
        .iter()
        .map(|&(latency, observed)| {
            let out = c.tick(&HashMap::from([
                (latency_q, Some(latency)),
                (observed_q, Some(observed.unwrap_or(sent))),
            ]));
            sent = out
                .first()
                .and_then(|o| o.value)
                .expect("the actuator sends every tick");
            (sent * 100.0).round() / 100.0
        })
        .collect()
}

#[test]
fn the_average_latency_blueprint_throttles_under_overload_and_recovers() {
    let latencies = [10.0, 10.0, 10.0, 40.0, 40.0, 10.0, 10.0, 10.0, 10.0, 10.0];
    let ticks: Vec<_> = latencies.iter().map(|&l| (l, None)).collect();
    // Pass-through, then on a 4x latency step the multiplier follows the
    // gradient (observed × setpoint / latency, the setpoint frozen at
    // 11 = 10 × 1.1), and then rises 0.25 per tick back to 1.
    assert_eq!(
        average_latency(&ticks),
        vec![1.0, 1.0, 1.0, 0.28, 0.08, 0.33, 0.58, 0.83, 1.0, 1.0]
    );
}

#[test]
fn the_average_latency_blueprint_never_raises_the_multiplier_while_overloaded() {
    // After the cut to 0.28 the observed multiplier reads high (a windowed
    // ratio lags, and can exceed 1); while latency stays above the
    // setpoint the multiplier must not follow it up.
    let ticks = [
        (10.0, Some(1.0)),
        (10.0, Some(1.0)),
        (40.0, Some(1.0)),
        (40.0, Some(1.2)),
        (30.0, Some(1.0)),
        (10.0, Some(1.0)),
    ];
    assert_eq!(
        average_latency(&ticks),
        vec![1.0, 1.0, 0.28, 0.28, 0.28, 0.53]
    );
}

// ---------------------------------------------------------------------------
// Aperture's load schedulers.

/// Runs one tick, answering each due query by its text from `data` (a
/// query not in `data`, or `None` there, has no data), and returns the
/// multiplier sent to load scheduler `protect`.
fn sent(c: &mut Circuit, data: &[(&str, Option<f64>)]) -> f64 {
    let results = c
        .due_queries()
        .into_iter()
        .map(|(i, q)| {
            let v = data.iter().find(|(k, _)| *k == q).and_then(|(_, v)| *v);
            (i, v)
        })
        .collect();
    let outputs = c.tick(&results);
    let to_protect: Vec<&Output> = outputs
        .iter()
        .filter(|o| o.target == Target::LoadMultiplier("protect".into()))
        .collect();
    assert_eq!(to_protect.len(), 1, "one multiplier a tick: {outputs:?}");
    let v = to_protect[0].value.expect("always a value");
    assert!((0.0..=1.0).contains(&v), "never outside [0, 1]: {v}");
    (v * 1000.0).round() / 1000.0
}

/// Signal `name` after the last tick.
fn value(c: &Circuit, name: &str) -> Option<f64> {
    c.signals().find(|(n, _)| *n == name).and_then(|(_, v)| v)
}

/// (latency, observed multiplier) each tick → (sent, is_overload).
fn aimd_run(c: &mut Circuit, ticks: &[(Option<f64>, Option<f64>)]) -> Vec<(f64, f64)> {
    ticks
        .iter()
        .map(|&(latency, observed)| {
            let lm = sent(c, &[("latency", latency), ("observed", observed)]);
            let out = value(c, "lm").map(|v| (v * 1000.0).round() / 1000.0);
            assert_eq!(out, Some(lm), "`out` is what is sent");
            (lm, value(c, "over").expect("is_overload is always written"))
        })
        .collect()
}

const AIMD: &str = r#"
- promql: {out: latency, query: latency}
- promql: {out: observed, query: observed}
- aimd_load_scheduler:
    out: lm
    out_is_overload: over
    load_scheduler: protect
    signal: latency
    setpoint: 100
    observed_load_multiplier: observed
    gradient: {slope: -1, min_gradient: 0.1, max_gradient: 1}
    load_multiplier_linear_increment: 0.25
"#;

#[test]
fn aimd_cuts_by_the_gradient_of_the_observed_multiplier_and_rises_linearly() {
    let mut c = circuit(AIMD);
    let got = aimd_run(
        &mut c,
        &[
            // Starts in pass-through: its sum starts at max (2).
            (Some(100.0), Some(1.0)),
            // Overload: observed × (100 / latency), at least × 0.1.
            (Some(200.0), Some(1.0)),
            (Some(400.0), Some(0.5)),
            (Some(2000.0), Some(0.125)),
            // Recovery: observed + 0.25 per step (the sum was reset)...
            (Some(50.0), Some(0.2)),
            (Some(50.0), Some(0.45)),
            // ...sent at most 1 (Aperture's 1.65 and 2.0: the latter is
            // its pass-through)...
            (Some(50.0), Some(0.9)),
            (Some(50.0), Some(1.0)),
            // ...until the next overload, cut from what was admitted.
            (Some(125.0), Some(0.8)),
        ],
    );
    assert_eq!(
        got,
        vec![
            (1.0, 0.0),
            (0.5, 1.0),
            (0.125, 1.0),
            (0.013, 1.0),
            (0.45, 0.0),
            (0.95, 0.0),
            (1.0, 0.0),
            (1.0, 0.0),
            (0.64, 1.0),
        ]
    );
}

#[test]
fn aimd_passes_through_once_at_its_max_multiplier() {
    // max 0.8 (below 1, so that the pass-through shows): observed 0.1
    // plus 0.25 a step reaches 0.85 >= 0.8 at the third step.
    let mut c = circuit(&format!("{AIMD}    max_load_multiplier: 0.8\n"));
    let lm: Vec<f64> = aimd_run(
        &mut c,
        &[
            (Some(100.0), Some(0.1)),
            (Some(1000.0), Some(1.0)),
            (Some(50.0), Some(0.1)),
            (Some(50.0), Some(0.1)),
            (Some(50.0), Some(0.1)),
            (Some(50.0), Some(0.1)),
            (Some(200.0), Some(1.0)),
        ],
    )
    .into_iter()
    .map(|(lm, _)| lm)
    .collect();
    // Pass-through at start; cut; 0.35, 0.6; then 0.85 (the sum is capped
    // at 0.8 too: 0.9) is at or above max: pass-through; overload again
    // ends it.
    assert_eq!(lm, vec![1.0, 0.1, 0.35, 0.6, 1.0, 1.0, 0.5]);
}

#[test]
fn aimd_needs_a_confirmed_overload_to_cut() {
    let mut c = circuit(&format!(
        "- promql: {{out: confirm, query: confirm}}\n{AIMD}    overload_confirmation: confirm\n"
    ));
    let run = |c: &mut Circuit, confirm: Option<f64>| {
        let lm = sent(
            c,
            &[
                ("latency", Some(200.0)),
                ("observed", Some(0.4)),
                ("confirm", confirm),
            ],
        );
        (lm, value(c, "over"))
    };
    // Not confirmed: no cut (the sum, at max, passes everything).
    assert_eq!(run(&mut c, Some(0.0)), (1.0, Some(0.0)));
    // Missing confirmation confirms (Aperture: FirstValid(confirmation, 1)).
    assert_eq!(run(&mut c, None), (0.2, Some(1.0)));
    // Not confirmed: the recovery path (the sum was reset at the cut).
    assert_eq!(run(&mut c, Some(0.0)), (0.65, Some(0.0)));
    // Any non-zero value confirms.
    assert_eq!(run(&mut c, Some(0.5)), (0.2, Some(1.0)));
}

#[test]
fn aimd_with_missing_signals() {
    let mut c = circuit(
        r#"
- promql: {out: latency, query: latency}
- promql: {out: setpoint, query: setpoint}
- promql: {out: observed, query: observed}
- aimd_load_scheduler:
    out: lm
    out_is_overload: over
    load_scheduler: protect
    signal: latency
    setpoint: setpoint
    observed_load_multiplier: observed
    gradient: {slope: -1}
    load_multiplier_linear_increment: 0.25
"#,
    );
    let mut run = |latency, setpoint, observed| {
        let lm = sent(
            &mut c,
            &[
                ("latency", latency),
                ("setpoint", setpoint),
                ("observed", observed),
            ],
        );
        (lm, value(&c, "over"))
    };
    // A cut, to leave pass-through (unbounded gradient: 0.5 × 1/4).
    run(Some(100.0), Some(100.0), Some(1.0));
    assert_eq!(run(Some(400.0), Some(100.0), Some(0.5)), (0.125, Some(1.0)));
    // No signal, or no setpoint: not overloaded, so observed + the sum.
    assert_eq!(run(None, Some(100.0), Some(0.25)), (0.5, Some(0.0)));
    assert_eq!(run(Some(400.0), None, Some(0.25)), (0.75, Some(0.0)));
    // No observed multiplier: Aperture's multiplier is NaN, pass-through,
    // overloaded or not.
    assert_eq!(run(Some(100.0), Some(100.0), None), (1.0, Some(0.0)));
    assert_eq!(run(Some(400.0), Some(100.0), None), (1.0, Some(1.0)));
    // A setpoint of 0 under overload: no gradient, pass-through.
    assert_eq!(run(Some(400.0), Some(0.0), Some(0.5)), (1.0, Some(1.0)));
}

#[test]
fn aimd_with_a_positive_slope_is_overloaded_below_its_setpoint() {
    let mut c = circuit(
        r#"
- promql: {out: headroom, query: headroom}
- aimd_load_scheduler:
    out: lm
    load_scheduler: protect
    signal: headroom
    setpoint: 100
    observed_load_multiplier: 1
    gradient: {slope: 1, min_gradient: 0.1, max_gradient: 1}
"#,
    );
    assert_eq!(sent(&mut c, &[("headroom", Some(150.0))]), 1.0);
    // (50 / 100)^1 × 1.
    assert_eq!(sent(&mut c, &[("headroom", Some(50.0))]), 0.5);
}

#[test]
fn aimd_steps_every_step_interval_whatever_the_tick() {
    // 30 s steps at 10 s ticks: the sum moves at the second tick, then
    // every third; an overload between steps cuts but does not reset it
    // (Aperture's integrator).
    let mut c = circuit(&format!("{AIMD}    step_interval: 30s\n"));
    let lm: Vec<f64> = aimd_run(
        &mut c,
        &[
            (Some(100.0), Some(0.5)),
            (Some(200.0), Some(0.5)), // a step: reset to 0
            (Some(50.0), Some(0.5)),
            (Some(50.0), Some(0.5)),
            (Some(50.0), Some(0.5)), // a step: 0.25
            (Some(200.0), Some(0.5)),
            (Some(50.0), Some(0.5)),
            (Some(50.0), Some(0.5)), // a step: 0.5
        ],
    )
    .into_iter()
    .map(|(lm, _)| lm)
    .collect();
    assert_eq!(lm, vec![1.0, 0.25, 0.5, 0.5, 0.75, 0.25, 0.75, 1.0]);
}

const AIAD: &str = r#"
- promql: {out: signal, query: signal}
- aiad_load_scheduler:
    out: lm
    out_is_overload: over
    load_scheduler: protect
    signal: signal
    setpoint: 70
    load_multiplier_linear_increment: 0.4
    load_multiplier_linear_decrement: 0.2
    max_load_multiplier: 1.2
    min_load_multiplier: 0.3
"#;

#[test]
fn aiad_decrements_and_increments_within_its_bounds() {
    let mut c = circuit(AIAD);
    let signals = [
        Some(80.0),
        Some(80.0),
        Some(80.0),
        Some(80.0),
        Some(80.0),
        Some(60.0),
        None,
        Some(60.0),
        Some(60.0),
        Some(80.0),
    ];
    let got: Vec<(f64, Option<f64>)> = signals
        .iter()
        .map(|s| {
            let lm = sent(&mut c, &[("signal", *s)]);
            (lm, value(&c, "over"))
        })
        .collect();
    assert_eq!(
        got,
        vec![
            // It starts at max: pass-through (overloaded, but no step yet).
            (1.0, Some(1.0)),
            // The first step under overload: at most 1 − decrement.
            (0.8, Some(1.0)),
            (0.6, Some(1.0)),
            (0.4, Some(1.0)),
            // Not below min.
            (0.3, Some(1.0)),
            // Up 0.4 a step; a missing signal is no overload.
            (0.7, Some(0.0)),
            (1.0, Some(0.0)),
            // 1.1 is sent as 1; at max (1.2), pass-through.
            (1.0, Some(0.0)),
            (1.0, Some(0.0)),
            // From max back to 1 − decrement at once.
            (0.8, Some(1.0)),
        ]
    );
}

#[test]
fn aiad_overload_conditions() {
    for (condition, signal, overloaded) in [
        ("gt", 70.0, false),
        ("gte", 70.0, true),
        ("lt", 69.0, true),
        ("lte", 70.0, true),
        ("lt", 70.0, false),
    ] {
        let mut c = circuit(&format!("{AIAD}    overload_condition: {condition}\n"));
        sent(&mut c, &[("signal", Some(signal))]);
        assert_eq!(
            sent(&mut c, &[("signal", Some(signal))]),
            if overloaded { 0.8 } else { 1.0 },
            "{signal} {condition} 70"
        );
    }
}

#[test]
fn aiad_is_held_by_a_missing_confirmation_only_when_it_says_no() {
    let mut c = circuit(&format!(
        "- promql: {{out: confirm, query: confirm}}\n{AIAD}    overload_confirmation: confirm\n"
    ));
    let mut run = |confirm| sent(&mut c, &[("signal", Some(80.0)), ("confirm", confirm)]);
    assert_eq!(run(Some(1.0)), 1.0);
    assert_eq!(run(Some(0.0)), 1.0, "not confirmed: rises (stays at max)");
    assert_eq!(run(None), 0.8, "missing: confirmed");
    assert_eq!(run(Some(0.0)), 1.0, "0.8 + 0.4, sent as 1");
}

#[test]
fn aiad_steps_every_10s_at_a_1s_tick() {
    let specs: Vec<ComponentSpec> = serde_saphyr::from_str(AIAD).expect("valid components");
    let mut c = Circuit::compile(&specs, Duration::from_secs(1));
    let lm: Vec<f64> = (0..23)
        .map(|_| sent(&mut c, &[("signal", Some(80.0))]))
        .collect();
    // Steps at the 2nd tick, then every 10th: ticks 1, 11, 21.
    let mut want = vec![1.0];
    want.extend([0.8; 10]);
    want.extend([0.6; 10]);
    want.extend([0.4; 2]);
    assert_eq!(lm, want);
}

const RANGE: &str = r#"
- promql: {out: cpu, query: cpu}
- range_driven_load_scheduler:
    out: lm
    out_is_overload: over
    load_scheduler: protect
    signal: cpu
    low_throttle_threshold: {signal_value: 50, load_multiplier: 1}
    high_throttle_threshold: {signal_value: 100, load_multiplier: 0.1}
    degree: 2
"#;

#[test]
fn range_driven_interpolates_and_passes_through_outside_its_range() {
    let mut c = circuit(RANGE);
    let got: Vec<(f64, Option<f64>)> = [
        Some(40.0),
        Some(50.0),
        Some(75.0),
        Some(90.0),
        Some(100.0),
        Some(150.0),
        None,
    ]
    .iter()
    .map(|x| {
        let lm = sent(&mut c, &[("cpu", *x)]);
        (lm, value(&c, "over"))
    })
    .collect();
    assert_eq!(
        got,
        vec![
            // Below the range: 1, pass-through.
            (1.0, Some(0.0)),
            // At the low point: 1, pass-through.
            (1.0, Some(0.0)),
            // 1 + 0.5² × (0.1 − 1) and 1 + 0.8² × (0.1 − 1).
            (0.775, Some(1.0)),
            (0.424, Some(1.0)),
            (0.1, Some(1.0)),
            // Above it: the high point's multiplier.
            (0.1, Some(1.0)),
            // No signal: pass-through.
            (1.0, Some(0.0)),
        ]
    );
}

#[test]
fn range_driven_curves_the_other_way_and_at_a_point() {
    // The low point throttles more: below it, its multiplier; above the
    // high one, 1.
    let mut c = circuit(
        r#"
- promql: {out: free, query: free}
- range_driven_load_scheduler:
    out: lm
    load_scheduler: protect
    signal: free
    low_throttle_threshold: {signal_value: 10, load_multiplier: 0.2}
    high_throttle_threshold: {signal_value: 50, load_multiplier: 1}
    degree: 1
"#,
    );
    let lm: Vec<f64> = [5.0, 30.0, 60.0]
        .iter()
        .map(|x| sent(&mut c, &[("free", Some(*x))]))
        .collect();
    assert_eq!(lm, vec![0.2, 0.6, 1.0]);
    // Both points at one signal value: the low one up to it, the high one
    // above.
    let mut c = circuit(&RANGE.replace("signal_value: 100", "signal_value: 50"));
    let lm: Vec<f64> = [50.0, 51.0]
        .iter()
        .map(|x| sent(&mut c, &[("cpu", Some(*x))]))
        .collect();
    assert_eq!(lm, vec![1.0, 0.1]);
}

#[test]
fn range_driven_throttles_only_when_confirmed() {
    let mut c = circuit(&format!(
        "- promql: {{out: confirm, query: confirm}}\n{RANGE}    overload_confirmation: confirm\n"
    ));
    let mut run = |confirm| {
        let lm = sent(&mut c, &[("cpu", Some(75.0)), ("confirm", confirm)]);
        (lm, value(&c, "over"))
    };
    assert_eq!(run(Some(0.0)), (1.0, Some(0.0)));
    assert_eq!(run(None), (0.775, Some(1.0)));
    assert_eq!(run(Some(1.0)), (0.775, Some(1.0)));
}

#[test]
fn decider_compares_with_every_operator() {
    for (op, want) in [
        ("gt", [0, 0, 1]),
        ("lt", [1, 0, 0]),
        ("gte", [0, 1, 1]),
        ("lte", [1, 1, 0]),
        ("eq", [0, 1, 0]),
        ("neq", [1, 0, 1]),
    ] {
        let mut c = circuit(&format!(
            "- promql: {{out: x, query: q}}\n- decider: {{out: d, op: {op}, lhs: x, rhs: 5}}\n"
        ));
        let d: Vec<u8> = run(&mut c, &[Some(4.0), Some(5.0), Some(6.0)], "d")
            .into_iter()
            .map(|v| v.expect("a decider always answers") as u8)
            .collect();
        assert_eq!(d, want, "{op}");
    }
}

/// A policy with `circuit`, compiled at 10 s ticks.
fn blueprint(circuit_yaml: &str) -> Circuit {
    let text = format!(
        "name: svc\nflux_meters: [{{name: latency, selectors: [{{control_point: ingress}}]}}]\nload_schedulers: [{{name: protect, selectors: [{{control_point: ingress}}]}}]\ncircuit:\n{circuit_yaml}"
    );
    let policy =
        sluice_policy::load::parse_policy(std::path::Path::new("p.yaml"), &text).expect("valid");
    let specs = policy
        .circuit
        .as_ref()
        .expect("circuit")
        .value
        .expand("svc")
        .expect("expands");
    Circuit::compile(&specs, TICK)
}

/// Answers the due queries of `c` by the first needle each contains.
fn answer(c: &mut Circuit, data: &[(&str, Option<f64>)]) -> f64 {
    let results = c
        .due_queries()
        .into_iter()
        .map(|(i, q)| {
            let v = data
                .iter()
                .find(|(needle, _)| q.contains(needle))
                .and_then(|(_, v)| *v);
            (i, v)
        })
        .collect();
    let out = c.tick(&results);
    assert_eq!(out.len(), 1, "{out:?}");
    (out[0].value.expect("a value") * 1000.0).round() / 1000.0
}

#[test]
fn the_aimd_blueprint_cuts_against_the_long_term_latency_when_confirmed() {
    let mut c = blueprint(
        "  blueprint: load_scheduling.aimd\n  parameters:\n    flux_meter: latency\n    load_scheduler: protect\n    overload_confirmations:\n      - {query_string: cpu_ratio, threshold: 0.8, operator: gte}\n",
    );
    let mut run = |latency, cpu| {
        answer(
            &mut c,
            &[
                ("[30s])) / sum(increase(flux_meter_count", Some(latency)),
                ("[1800s]", Some(100.0)),
                ("accepted_tokens_total", Some(0.8)),
                ("cpu_ratio", cpu),
            ],
        )
    };
    // Setpoint 100 × 1.25: 200 is overload, cut to 0.8 × 125 / 200 once
    // the CPU confirms; missing CPU data does not confirm.
    assert_eq!(run(200.0, Some(0.5)), 1.0);
    assert_eq!(run(200.0, None), 1.0);
    assert_eq!(run(200.0, Some(0.9)), 0.5);
    assert_eq!(run(100.0, Some(0.9)), 0.825, "0.8 + 0.025");
}

#[test]
fn the_promql_blueprint_drives_an_aiad_scheduler() {
    let mut c = blueprint(
        "  blueprint: load_scheduling.promql\n  parameters:\n    promql_query: backends_used\n    setpoint: 70\n    overload_condition: gt\n    load_scheduler: protect\n",
    );
    let lm: Vec<f64> = [80.0, 80.0, 80.0, 60.0]
        .iter()
        .map(|v| answer(&mut c, &[("backends_used", Some(*v))]))
        .collect();
    assert_eq!(lm, vec![1.0, 0.95, 0.9, 0.925]);
}

// ---------------------------------------------------------------------------
// Load ramps.

/// Runs one tick, answering each due query by its text from `data` (a
/// query not in `data`, or `None` there, has no data), and returns the
/// outputs.
fn tick_with(c: &mut Circuit, data: &[(&str, Option<f64>)]) -> Vec<Output> {
    let results = c
        .due_queries()
        .into_iter()
        .map(|(i, q)| {
            let v = data.iter().find(|(k, _)| *k == q).and_then(|(_, v)| *v);
            (i, v)
        })
        .collect();
    c.tick(&results)
}

/// The percentage sent to sampler `beta` by the tick that returned
/// `outputs`: exactly one, present, within [0, 100].
fn to_beta(outputs: &[Output]) -> f64 {
    let sent: Vec<&Output> = outputs
        .iter()
        .filter(|o| o.target == Target::AcceptPercentage("beta".into()))
        .collect();
    assert_eq!(sent.len(), 1, "one percentage a tick: {outputs:?}");
    let v = sent[0].value.expect("always a value");
    assert!((0.0..=100.0).contains(&v), "{v}");
    (v * 1000.0).round() / 1000.0
}

/// (percentage sent, at_start, at_end) after one tick with `data`;
/// `out` is what is sent.
fn ramp_tick(c: &mut Circuit, data: &[(&str, Option<f64>)]) -> (f64, f64, f64) {
    let pct = to_beta(&tick_with(c, data));
    assert_eq!(
        value(c, "pct").map(|v| (v * 1000.0).round() / 1000.0),
        Some(pct),
        "`out` is what is sent"
    );
    let flag = |n| value(c, n).expect("always written");
    (pct, flag("first"), flag("last"))
}

#[test]
fn load_ramp_interpolates_its_steps_tick_by_tick() {
    // Steps of 2, 4 (35 s rounded up to whole 10 s ticks) and 1 (0 s)
    // ticks: the first holds 10 %, the second goes 10 → 50 %, the last
    // jumps to 100 % a tick later.
    let mut c = circuit(
        r#"
- load_ramp:
    out: pct
    out_at_start: first
    out_at_end: last
    sampler: beta
    forward: 1
    steps:
      - {target_accept_percentage: 10, duration: 20s}
      - {target_accept_percentage: 50, duration: 35s}
      - {target_accept_percentage: 100, duration: 0s}
"#,
    );
    let got: Vec<(f64, f64, f64)> = (0..9).map(|_| ramp_tick(&mut c, &[])).collect();
    assert_eq!(
        got,
        vec![
            (10.0, 0.0, 0.0),
            (10.0, 0.0, 0.0),
            (20.0, 0.0, 0.0),
            (30.0, 0.0, 0.0),
            (40.0, 0.0, 0.0),
            (50.0, 0.0, 0.0),
            // Aperture's generator would stop at 50 (one tick short of
            // the last step's target, `at_end` there): Sluice reaches it.
            (100.0, 0.0, 1.0),
            (100.0, 0.0, 1.0),
            (100.0, 0.0, 1.0),
        ]
    );
}

const RAMP: &str = r#"
- promql: {out: f, query: f}
- promql: {out: b, query: b}
- promql: {out: r, query: r}
- load_ramp:
    out: pct
    out_at_start: first
    out_at_end: last
    sampler: beta
    forward: f
    backward: b
    reset: r
    steps:
      - {target_accept_percentage: 0, duration: 0s}
      - {target_accept_percentage: 100, duration: 40s}
"#;

#[test]
fn load_ramp_goes_forward_back_and_to_its_start() {
    // Steps of 1 and 4 ticks: 0, then 0 → 100 % in quarters.
    let mut c = circuit(RAMP);
    let mut at = |f: Option<f64>, b: Option<f64>, r: Option<f64>| {
        ramp_tick(&mut c, &[("f", f), ("b", b), ("r", r)])
    };
    let (on, off) = (Some(1.0), Some(0.0));
    // No data at all: it holds at its start, and sends the first step's.
    assert_eq!(at(None, None, None), (0.0, 1.0, 0.0));
    assert_eq!(
        at(on, off, off),
        (0.0, 0.0, 0.0),
        "a tick along, same value"
    );
    assert_eq!(at(on, None, None), (25.0, 0.0, 0.0));
    assert_eq!(at(on, None, None), (50.0, 0.0, 0.0));
    // Forward and backward at once: it holds.
    assert_eq!(at(on, on, off), (50.0, 0.0, 0.0));
    // Backward: down the same line, a tick at a time; a missing forward
    // is no forward.
    assert_eq!(at(off, on, off), (25.0, 0.0, 0.0));
    assert_eq!(at(None, on, None), (0.0, 0.0, 0.0));
    assert_eq!(at(None, on, None), (0.0, 1.0, 0.0), "back at its start");
    assert_eq!(at(None, on, None), (0.0, 1.0, 0.0), "and no further");
    // Any non-zero value counts, negative ones too.
    assert_eq!(at(Some(-2.0), None, None), (0.0, 0.0, 0.0));
    for expected in [25.0, 50.0, 75.0] {
        assert_eq!(at(on, None, None).0, expected);
    }
    assert_eq!(at(on, None, None), (100.0, 0.0, 1.0));
    assert_eq!(at(on, None, None), (100.0, 0.0, 1.0), "stays at its end");
    assert_eq!(at(None, None, None), (100.0, 0.0, 1.0), "missing: holds");
    assert_eq!(at(off, on, off), (75.0, 0.0, 0.0), "back from the end");
    // Reset wins over everything, at once.
    assert_eq!(at(on, on, on), (0.0, 1.0, 0.0));
    assert_eq!(
        at(on, off, on),
        (0.0, 1.0, 0.0),
        "held there while it lasts"
    );
    assert_eq!(
        at(on, off, None),
        (0.0, 0.0, 0.0),
        "a missing reset is none"
    );
    assert_eq!(at(on, off, off), (25.0, 0.0, 0.0));
}

#[test]
fn a_changed_policy_keeps_its_ramps_place_unless_the_steps_change() {
    let mut old = circuit(RAMP);
    for _ in 0..3 {
        ramp_tick(&mut old, &[("f", Some(1.0))]);
    }
    assert_eq!(value(&old, "pct"), Some(50.0));
    // Another circuit around the same ramp (a component more, inputs
    // wired anew): the ramp goes on from where it was.
    let mut new = circuit(&format!("- promql: {{out: extra, query: extra}}\n{RAMP}"));
    new.carry_over(&old);
    assert_eq!(ramp_tick(&mut new, &[("f", None)]).0, 50.0);
    assert_eq!(ramp_tick(&mut new, &[("f", Some(1.0))]).0, 75.0);
    // Other steps (or another sampler, or another `out`): a new ramp.
    let mut other = circuit(&RAMP.replace("duration: 40s", "duration: 80s"));
    other.carry_over(&new);
    assert_eq!(ramp_tick(&mut other, &[]), (0.0, 1.0, 0.0));
    let mut other = circuit(&RAMP.replace("sampler: beta", "sampler: gamma"));
    other.carry_over(&new);
    assert_eq!(value(&other, "pct"), None, "not ticked yet");
    let outputs = tick_with(&mut other, &[]);
    assert_eq!(outputs[0].value, Some(0.0), "{outputs:?}");
}

#[test]
fn the_load_ramping_blueprint_moves_on_its_drivers() {
    let text = r#"
name: svc
samplers: [{name: beta, selectors: [{control_point: ingress}], accept_percentage: 0}]
circuit:
  blueprint: load_ramping.base
  parameters:
    sampler: beta
    start: true
    steps:
      - {target_accept_percentage: 0, duration: 0s}
      - {target_accept_percentage: 100, duration: 40s}
    drivers:
      promql_drivers:
        - query_string: errors
          criteria:
            forward: {threshold: 1, operator: lt}
            backward: {threshold: 5, operator: gt}
            reset: {threshold: 50, operator: gt}
"#;
    let policy =
        sluice_policy::load::parse_policy(std::path::Path::new("p.yaml"), text).expect("valid");
    let specs = policy
        .circuit
        .expect("circuit")
        .value
        .expand("svc")
        .expect("expands");
    let mut c = Circuit::compile(&specs, TICK);
    let mut run = |errors: Option<f64>| to_beta(&tick_with(&mut c, &[("errors", errors)]));
    let got: Vec<f64> = [
        Some(0.0),  // healthy: forward (0 → first tick of the ramp)
        Some(0.0),  // 25
        None,       // no data: no criterion holds, it holds
        Some(2.0),  // neither healthy nor failing: holds
        Some(0.0),  // 50
        Some(6.0),  // failing: back to 25
        Some(0.0),  // 50
        Some(60.0), // broken: to the start
        Some(0.0),  // and on again
    ]
    .into_iter()
    .map(&mut run)
    .collect();
    assert_eq!(got, vec![0.0, 25.0, 25.0, 25.0, 50.0, 25.0, 50.0, 0.0, 0.0]);
    // Not started: it stays at its start, whatever the drivers say.
    let specs = sluice_policy::load::parse_policy(
        std::path::Path::new("p.yaml"),
        &text.replace("start: true", "start: false"),
    )
    .expect("valid")
    .circuit
    .expect("circuit")
    .value
    .expand("svc")
    .expect("expands");
    let mut c = Circuit::compile(&specs, TICK);
    for _ in 0..5 {
        assert_eq!(to_beta(&tick_with(&mut c, &[("errors", Some(0.0))])), 0.0);
    }
    assert_eq!(value(&c, "at_start"), Some(1.0));
}

// ---------------------------------------------------------------------------
// Alerters.

/// Whether the circuit's only alert fires after each tick of `series`
/// (the values of query `x`).
fn firing(c: &mut Circuit, series: &[Option<f64>]) -> Vec<bool> {
    series
        .iter()
        .map(|v| {
            assert!(
                tick_with(c, &[("x", *v)]).is_empty(),
                "an alerter sends nothing"
            );
            c.alerts()[0].firing
        })
        .collect()
}

#[test]
fn an_alert_fires_holds_for_its_resolve_timeout_and_resolves() {
    // 30 s at 10 s ticks: resolved at the third tick after the signal's
    // last non-zero one.
    let mut c = circuit(
        "- promql: {out: x, query: x}\n- alerter: {signal: x, alert_name: Errors high, severity: crit, resolve_timeout: 30s, labels: {team: edge}, alert_channels: [pager]}\n",
    );
    let a = &c.alerts()[0];
    assert_eq!(
        (a.name.as_str(), a.severity, a.firing),
        ("Errors high", Severity::Crit, false)
    );
    assert_eq!(a.labels, BTreeMap::from([("team".into(), "edge".into())]));
    assert_eq!(a.channels, ["pager"]);
    let (on, off) = (Some(1.0), Some(0.0));
    assert_eq!(
        firing(
            &mut c,
            &[
                off,
                on,
                Some(-3.0),
                off,
                off,
                off,
                off,
                on,
                off,
                None,
                None,
                None
            ]
        ),
        vec![
            false, true, true, // fires while non-zero, negative too
            true, true, // held for 20 s of zeros
            false, false, // resolved at 30 s
            true, true, true, // a missing signal is zero...
            false, false, // ...and resolves it the same way
        ]
    );
}

#[test]
fn the_default_resolve_timeout_resolves_at_the_next_tick_and_missing_never_fires() {
    // 5 s, rounded up to one 10 s tick: resolved as soon as the signal is
    // seen at zero (Aperture's alert would end 5 s after its last firing
    // evaluation, before the next one).
    let mut c = circuit("- promql: {out: x, query: x}\n- alerter: {signal: x, alert_name: a}\n");
    assert_eq!(c.alerts()[0].severity, Severity::Info);
    let (on, off) = (Some(1.0), Some(0.0));
    assert_eq!(
        firing(&mut c, &[on, off, on, on, None]),
        vec![true, false, true, true, false]
    );
    let mut never =
        circuit("- promql: {out: x, query: x}\n- alerter: {signal: x, alert_name: a}\n");
    assert_eq!(firing(&mut never, &[None; 5]), vec![false; 5]);
    // A signal read before it is written is last tick's, as for any reader.
    let mut late = circuit(
        "- alerter: {signal: later, alert_name: a, resolve_timeout: 0s}\n- promql: {out: x, query: x}\n- arithmetic: {out: later, op: mul, lhs: x, rhs: 1}\n",
    );
    assert_eq!(firing(&mut late, &[on, off, off]), vec![false, true, false]);
}

#[test]
fn a_changed_policy_keeps_its_alerts_state() {
    let yaml = "- promql: {out: x, query: x}\n- alerter: {signal: x, alert_name: a, resolve_timeout: 30s}\n";
    let mut old = circuit(yaml);
    assert_eq!(firing(&mut old, &[Some(1.0), Some(0.0)]), vec![true, true]);
    let mut new = circuit(&format!("{yaml}- alerter: {{signal: 1, alert_name: b}}\n"));
    new.carry_over(&old);
    assert!(new.alerts()[0].firing && !new.alerts()[1].firing);
    // The quiet ticks carry over too: resolved 30 s after the last one.
    assert_eq!(firing(&mut new, &[Some(0.0), Some(0.0)]), vec![true, false]);
    // Another name is another alert.
    let mut other = circuit(&yaml.replace("alert_name: a", "alert_name: c"));
    other.carry_over(&old);
    assert!(!other.alerts()[0].firing);
}

/// One tick of the capacity blueprint's inputs: latency (ms), served,
/// accepted and incoming rates (requests/s); `None` for no data.
type CapacityTick = (Option<f64>, Option<f64>, Option<f64>, Option<f64>);

/// The capacity blueprint with a 30 ms setpoint, run over `ticks`; the
/// multiplier sent after each, to two decimals (`None`: nothing sent).
fn capacity_sent(ticks: &[CapacityTick]) -> Vec<Option<f64>> {
    use sluice_policy::load::parse_policy;
    let policy = parse_policy(
        std::path::Path::new("p.yaml"),
        r#"
name: svc
flux_meters: [{name: latency, selectors: [{control_point: ingress}]}]
load_schedulers: [{name: protect, selectors: [{control_point: ingress}]}]
circuit:
  blueprint: load_scheduling.capacity
  parameters:
    flux_meter: latency
    load_scheduler: protect
    latency_setpoint_ms: 30
"#,
    )
    .expect("valid policy");
    let specs = policy
        .circuit
        .as_ref()
        .expect("circuit")
        .value
        .expand("svc")
        .expect("expands");
    let mut c = Circuit::compile(&specs, TICK);
    let query = |needle: &str| {
        c.due_queries()
            .into_iter()
            .find(|(_, q)| q.contains(needle))
            .expect("query")
            .0
    };
    let queries = [
        query("histogram_quantile"),
        query("flux_meter_count"),
        query("accepted_tokens"),
        query("incoming_tokens"),
    ];
    ticks
        .iter()
        .map(|&(latency, served, accepted, incoming)| {
            let values = [latency, served, accepted, incoming];
            let out = c.tick(&queries.iter().copied().zip(values).collect());
            out.first()
                .and_then(|o| o.value)
                .map(|sent| (sent * 100.0).round() / 100.0)
        })
        .collect()
}

/// [`capacity_sent`] where every tick sends.
fn capacity(ticks: &[CapacityTick]) -> Vec<f64> {
    capacity_sent(ticks)
        .into_iter()
        .map(|s| s.expect("the actuator sends every tick"))
        .collect()
}

#[test]
fn the_capacity_blueprint_admits_what_the_service_served_and_passes_when_demand_falls() {
    let tick = |l: f64, s: f64, a: f64, i: f64| (Some(l), Some(s), Some(a), Some(i));
    let sent = capacity(&[
        // Calm: 100/s in, 100/s served in 20 ms: pass-through.
        tick(20.0, 100.0, 100.0, 100.0),
        // More is accepted than served, at the idle latency: the access
        // logs lag behind the Checks, nothing queues. Still pass-through.
        tick(20.0, 100.0, 200.0, 200.0),
        // Twice the capacity arrives and is admitted; 200/s are served
        // and a queue shows in latency (above 3/4 of the setpoint): it
        // piles up, so 200/s is its capacity; 0.9 of it is admitted (180
        // of 400).
        tick(25.0, 200.0, 400.0, 400.0),
        // The backlog shows in latency (1 s): cut to served × 0.1 = 20,
        // at most; 20 / 400 = 0.05.
        tick(1000.0, 200.0, 180.0, 400.0),
        // Drained: back to 0.9 of the capacity measured, at once.
        tick(20.0, 20.0, 20.0, 400.0),
        // Below the setpoint, above 0.9 of the capacity it rises only by 1 %
        // of what is accepted a tick (181.8 of 400) ...
        tick(21.0, 180.0, 180.0, 400.0),
        // ... and goes on doing so past it (202 of 400).
        tick(21.0, 200.0, 200.0, 400.0),
        // Demand falls to 80/s: what is served is more than that, so the
        // multiplier is 1 at once.
        tick(21.0, 200.0, 200.0, 80.0),
    ]);
    assert_eq!(sent, vec![1.0, 1.0, 0.45, 0.05, 0.45, 0.45, 0.51, 1.0]);
}

#[test]
fn the_capacity_blueprint_follows_latency_where_nothing_piles_up() {
    // A service that slows down with load but serves everything it
    // takes: the rate follows served × setpoint / latency.
    let tick = |l: f64, s: f64, i: f64| (Some(l), Some(s), Some(s), Some(i));
    let sent = capacity(&[
        tick(90.0, 400.0, 400.0), // 400 × 30/90 = 133 → 0.33
        tick(24.0, 133.0, 400.0), // 133 × 1.2 (at most) = 160 → 0.4
        tick(25.0, 160.0, 400.0), // 160 × 1.2 = 192 → 0.48
        tick(30.0, 192.0, 400.0), // at the setpoint: 1 % above what it serves → 0.48
        tick(60.0, 192.0, 400.0), // twice it: halved → 0.24
    ]);
    assert_eq!(sent, vec![0.33, 0.4, 0.48, 0.48, 0.24]);
}

#[test]
fn the_capacity_blueprint_never_cuts_a_calm_service() {
    // Latency well below the setpoint and nothing piling up, but the
    // served rate behind what the scheduler accepts (other components turn
    // flows away after it, or the access logs lag): the multiplier stays
    // where it is and rises, it is not cut to what was served.
    let tick = |l: f64, s: f64, a: f64, i: f64| (Some(l), Some(s), Some(a), Some(i));
    let sent = capacity(&[
        tick(18.0, 45.0, 100.0, 100.0),
        tick(18.0, 45.0, 100.0, 100.0),
        // After a cut to half: 1 % more than is accepted now, or what
        // latency allows of the served rate (45 × 1.2), whichever is more.
        tick(18.0, 45.0, 50.0, 100.0),
    ]);
    assert_eq!(sent, vec![1.0, 1.0, 0.54]);
}

#[test]
fn the_capacity_blueprint_sends_nothing_without_data() {
    // Without the incoming rate (no traffic, or a query that came back
    // empty) nothing is sent: the sidecars hold the last decision until it
    // lapses, then pass everything. A cut is never lifted for a tick by a
    // gap in the data.
    let tick = |l: f64, s: f64, a: f64, i: f64| (Some(l), Some(s), Some(a), Some(i));
    let sent = capacity_sent(&[
        (None, None, None, None),
        tick(25.0, 200.0, 400.0, 400.0),
        (Some(20.0), Some(200.0), Some(400.0), None),
        (None, Some(100.0), Some(100.0), None),
        tick(20.0, 20.0, 20.0, 400.0),
    ]);
    assert_eq!(sent, vec![None, Some(0.45), None, None, Some(0.45)]);
}

#[test]
fn a_query_between_its_evaluations_is_carried_not_renewed() {
    // Every 30 s at 10 s ticks: the query runs at ticks 0 and 3; in
    // between its signal keeps the answer, and says it was not computed
    // anew, while what is computed from it is, every tick.
    let mut c = circuit(
        "- promql: {out: x, query: q, evaluation_interval: 30s}\n- arithmetic: {out: y, op: mul, lhs: x, rhs: 2}\n",
    );
    let mut seen = Vec::new();
    for v in [1.0, 2.0, 3.0, 4.0] {
        let results = c
            .due_queries()
            .into_iter()
            .map(|(i, _)| (i, Some(v)))
            .collect();
        c.tick(&results);
        let renewed: Vec<bool> = c.renewed().collect();
        let x = c.signals().find(|(n, _)| *n == "x").and_then(|(_, v)| v);
        seen.push((x, renewed));
    }
    assert_eq!(
        seen,
        vec![
            (Some(1.0), vec![true, true]),
            (Some(1.0), vec![false, true]),
            (Some(1.0), vec![false, true]),
            (Some(4.0), vec![true, true]),
        ]
    );
}
