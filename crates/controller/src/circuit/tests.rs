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
