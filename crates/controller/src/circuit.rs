//! A policy's circuit, compiled and run one tick at a time.
//!
//! Signals are numbered; each tick every component computes its `out` from
//! constants and signals, in list order. Reading a signal computed earlier
//! in this tick gives this tick's value; reading one computed later (or
//! itself) gives the previous tick's: that is the one-tick delay through
//! which feedback loops (a multiplier that rises from its last value)
//! are written. A signal may be missing (`None`): no data yet, a query
//! that returned nothing, a division by zero. Each component says what it
//! does then (see `sluice_policy::circuit`).
//!
//! Nothing here does I/O: PromQL results are handed in, actuator outputs
//! handed out, so circuits are tested on synthetic series.
//!
//! Aperture's load schedulers (`aimd_load_scheduler`,
//! `aiad_load_scheduler`, `range_driven_load_scheduler`) are components
//! that write their multiplier (and whether the service is overloaded) and
//! also hand it out, as an actuator of their load scheduler does; a
//! `load_ramp` (`ramp`) does the same with a sampler's accept percentage.
//! An `alerter` writes no signal: its alert's state is read with
//! [`Circuit::alerts`].
//!
//! When a policy changes, its circuit is compiled afresh; [`Circuit::carry_over`]
//! keeps the place of each load ramp whose sampler and steps did not
//! change, and the state of each alert that is still raised, so that
//! editing a policy neither restarts a rollout nor re-fires its alerts.

mod ramp;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sluice_policy::circuit::{ArithmeticOp, Comparison, ComponentSpec, Operand, Severity};

use ramp::Ramp;

/// A component's operand, compiled.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Const(f64),
    Signal(usize),
}

/// What an actuator drives.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A load scheduler's multiplier.
    LoadMultiplier(String),
    /// A sampler's accept percentage.
    AcceptPercentage(String),
    /// A concurrency limiter's limit.
    MaxConcurrency(String),
    /// A rate limiter's bucket.
    RateLimit(String),
    /// A quota scheduler's bucket.
    QuotaBucket(String),
    /// A concurrency scheduler's limit.
    SchedulerConcurrency(String),
}

/// One actuator's output this tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// What it drives.
    pub target: Target,
    /// The value (for a bucket: the capacity, if driven).
    pub value: Option<f64>,
    /// A bucket's fill amount, if driven.
    pub fill_amount: Option<f64>,
}

#[derive(Debug)]
enum Component {
    Promql {
        out: usize,
        query: String,
        every: u64,
    },
    Ema {
        out: usize,
        input: Op,
        alpha: f64,
        freeze: Option<Op>,
        state: Option<f64>,
    },
    Arithmetic {
        out: usize,
        op: ArithmeticOp,
        lhs: Op,
        rhs: Op,
    },
    Decider {
        out: usize,
        op: Comparison,
        lhs: Op,
        rhs: Op,
        true_for: u64,
        false_for: u64,
        /// Ticks the comparison has held (or failed) in a row.
        streak: u64,
        held: bool,
        state: bool,
    },
    Gradient {
        out: usize,
        signal: Op,
        setpoint: Op,
        control: Op,
        slope: f64,
        min: f64,
        max: f64,
    },
    Integrator {
        out: usize,
        input: Op,
        reset: Option<Op>,
        initial: f64,
        min: Option<f64>,
        max: Option<f64>,
        state: f64,
    },
    Switcher {
        out: usize,
        switch: Op,
        on_true: Op,
        on_false: Op,
    },
    Extremum {
        out: usize,
        max: bool,
        inputs: Vec<Op>,
    },
    Actuator {
        target: Target,
        input: Option<Op>,
        fill: Option<Op>,
    },
    /// One of Aperture's load schedulers.
    LoadScheduler {
        out: usize,
        is_overload: Option<usize>,
        /// The load scheduler it drives.
        target: String,
        signal: Op,
        confirmation: Option<Op>,
        strategy: Strategy,
        /// Ticks between steps of its sum.
        every: u64,
        /// Aperture's integrator: AIMD's recovery sum, AIAD's multiplier.
        sum: f64,
    },
    /// Aperture's load ramp: a sampler's accept percentage through steps.
    LoadRamp {
        out: usize,
        at_start: Option<usize>,
        at_end: Option<usize>,
        /// The sampler it drives.
        sampler: String,
        forward: Op,
        backward: Option<Op>,
        reset: Option<Op>,
        ramp: Ramp,
    },
    /// Aperture's alerter: alert `index` of [`Circuit::alerts`].
    Alerter { signal: Op, index: usize },
}

/// One alerter's alert and its state after the last tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    /// `alert_name`.
    pub name: String,
    /// `severity`.
    pub severity: Severity,
    /// `labels`.
    pub labels: BTreeMap<String, String>,
    /// `alert_channels`.
    pub channels: Vec<String>,
    /// Whether it fires now.
    pub firing: bool,
    /// Ticks the signal must stay zero before the alert resolves.
    resolve_ticks: u64,
    /// Ticks since the signal was last non-zero, while firing.
    quiet: u64,
}

impl Alert {
    /// Whether `other` is the same alert (name, severity and labels): one
    /// series, one entry of `/v1/alerts`.
    pub fn same(&self, other: &Alert) -> bool {
        self.name == other.name && self.severity == other.severity && self.labels == other.labels
    }

    /// One tick: fires while the signal is `active`; once it is not,
    /// resolves when it has been quiet for `resolve_ticks`.
    fn tick(&mut self, active: bool) {
        if active {
            self.firing = true;
            self.quiet = 0;
        } else if self.firing {
            self.quiet += 1;
            if self.quiet >= self.resolve_ticks {
                self.firing = false;
                self.quiet = 0;
            }
        }
    }
}

/// How one of Aperture's load schedulers computes its multiplier.
#[derive(Debug)]
enum Strategy {
    Aimd {
        setpoint: Op,
        observed: Op,
        slope: f64,
        min_gradient: Option<f64>,
        max_gradient: Option<f64>,
        increment: f64,
        max: f64,
    },
    Aiad {
        setpoint: Op,
        condition: Comparison,
        increment: f64,
        decrement: f64,
        max: f64,
        min: f64,
    },
    Range {
        /// (signal value, load multiplier) at the low and high thresholds.
        low: (f64, f64),
        high: (f64, f64),
        degree: f64,
    },
}

/// Aperture's gradient controller: `observed × clamp((signal /
/// setpoint)^slope, min, max)`; missing when an input is, when the setpoint
/// is 0 or the gradient is not a number.
fn gradient(
    signal: Option<f64>,
    setpoint: Option<f64>,
    observed: Option<f64>,
    slope: f64,
    min: Option<f64>,
    max: Option<f64>,
) -> Option<f64> {
    let (s, sp, o) = (signal?, setpoint?, observed?);
    if sp == 0.0 {
        return None;
    }
    let mut g = (s / sp).powf(slope);
    if let Some(lo) = min
        && g < lo
    {
        g = lo;
    }
    if let Some(hi) = max
        && g > hi
    {
        g = hi;
    }
    (!g.is_nan()).then_some(o * g)
}

/// Aperture's polynomial range function from `low` to `high` (`(signal,
/// multiplier)` points), clamped outside it to 1 on the side that does not
/// throttle and to the other end's multiplier on the side that does.
fn range_curve(x: f64, low: (f64, f64), high: (f64, f64), degree: f64) -> f64 {
    let ((x0, y0), (x1, y1)) = (low, high);
    let (pre_start, post_end) = if y0 >= y1 { (1.0, y1) } else { (y0, 1.0) };
    let t = if x1 != x0 {
        (x - x0) / (x1 - x0)
    } else if x <= x0 {
        0.0
    } else {
        1.0
    };
    if t < 0.0 {
        pre_start
    } else if t > 1.0 {
        post_end
    } else {
        y0 + t.powf(degree) * (y1 - y0)
    }
}

/// A compiled circuit and its state.
#[derive(Debug)]
pub struct Circuit {
    names: Vec<String>,
    components: Vec<Component>,
    alerts: Vec<Alert>,
    /// This tick's values (`computed` says which are from this tick).
    current: Vec<Option<f64>>,
    previous: Vec<Option<f64>>,
    computed: Vec<bool>,
    /// Which signals the last tick carried over rather than computed: a
    /// `promql` signal between its evaluations (see [`Circuit::renewed`]).
    carried: Vec<bool>,
    ticks: u64,
}

/// How many ticks make `d` (at least 1 for a non-zero duration).
fn ticks(d: Duration, tick: Duration) -> u64 {
    if d.is_zero() {
        return 0;
    }
    d.as_nanos().div_ceil(tick.as_nanos().max(1)).max(1) as u64
}

impl Circuit {
    /// Compiles validated components for a controller ticking every `tick`.
    pub fn compile(specs: &[ComponentSpec], tick: Duration) -> Circuit {
        let names: Vec<String> = specs
            .iter()
            .flat_map(ComponentSpec::outs)
            .map(str::to_owned)
            .collect();
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let op = |o: &Operand| match o {
            Operand::Constant(c) => Op::Const(*c),
            // Validated: every signal read is written somewhere.
            Operand::Signal(s) => index
                .get(s.as_str())
                .map_or(Op::Const(f64::NAN), |i| Op::Signal(*i)),
        };
        let out = |name: &str| index.get(name).copied().unwrap_or(0);
        let mut alerts = Vec::new();
        let components = specs
            .iter()
            .map(|c| match c {
                ComponentSpec::Promql(p) => Component::Promql {
                    out: out(&p.out),
                    query: p.query.clone(),
                    every: p.evaluation_interval.map_or(1, |d| ticks(d.0, tick).max(1)),
                },
                ComponentSpec::Ema(e) => Component::Ema {
                    out: out(&e.out),
                    input: op(&e.input),
                    alpha: 2.0 / (ticks(e.window.0, tick).max(1) as f64 + 1.0),
                    freeze: e.freeze.as_ref().map(op),
                    state: None,
                },
                ComponentSpec::Arithmetic(a) => Component::Arithmetic {
                    out: out(&a.out),
                    op: a.op,
                    lhs: op(&a.lhs),
                    rhs: op(&a.rhs),
                },
                ComponentSpec::Decider(d) => Component::Decider {
                    out: out(&d.out),
                    op: d.op,
                    lhs: op(&d.lhs),
                    rhs: op(&d.rhs),
                    true_for: ticks(d.true_for.0, tick),
                    false_for: ticks(d.false_for.0, tick),
                    streak: 0,
                    held: false,
                    state: false,
                },
                ComponentSpec::GradientController(g) => Component::Gradient {
                    out: out(&g.out),
                    signal: op(&g.signal),
                    setpoint: op(&g.setpoint),
                    control: op(&g.control_variable),
                    slope: g.slope,
                    min: g.min_gradient,
                    max: g.max_gradient,
                },
                ComponentSpec::Integrator(i) => Component::Integrator {
                    out: out(&i.out),
                    input: op(&i.input),
                    reset: i.reset.as_ref().map(op),
                    initial: i.initial,
                    min: i.min,
                    max: i.max,
                    state: i.initial,
                },
                ComponentSpec::Switcher(s) => Component::Switcher {
                    out: out(&s.out),
                    switch: op(&s.switch),
                    on_true: op(&s.on_true),
                    on_false: op(&s.on_false),
                },
                ComponentSpec::Min(m) => Component::Extremum {
                    out: out(&m.out),
                    max: false,
                    inputs: m.inputs.iter().map(op).collect(),
                },
                ComponentSpec::Max(m) => Component::Extremum {
                    out: out(&m.out),
                    max: true,
                    inputs: m.inputs.iter().map(op).collect(),
                },
                ComponentSpec::Actuator(a) => {
                    let name =
                        |n: &Option<sluice_policy::types::Name>| n.as_ref().map(|n| n.0.clone());
                    let target = if let Some(n) = name(&a.load_scheduler) {
                        Target::LoadMultiplier(n)
                    } else if let Some(n) = name(&a.sampler) {
                        Target::AcceptPercentage(n)
                    } else if let Some(n) = name(&a.concurrency_limiter) {
                        Target::MaxConcurrency(n)
                    } else if let Some(n) = name(&a.quota_scheduler) {
                        Target::QuotaBucket(n)
                    } else if let Some(n) = name(&a.concurrency_scheduler) {
                        Target::SchedulerConcurrency(n)
                    } else {
                        Target::RateLimit(name(&a.rate_limiter).unwrap_or_default())
                    };
                    let input = a.input.as_ref().or(a.bucket_capacity.as_ref()).map(op);
                    Component::Actuator {
                        target,
                        input,
                        fill: a.fill_amount.as_ref().map(op),
                    }
                }
                ComponentSpec::AimdLoadScheduler(a) => Component::LoadScheduler {
                    out: out(&a.out),
                    is_overload: a.out_is_overload.as_deref().map(out),
                    target: a.load_scheduler.0.clone(),
                    signal: op(&a.signal),
                    confirmation: a.overload_confirmation.as_ref().map(op),
                    strategy: Strategy::Aimd {
                        setpoint: op(&a.setpoint),
                        observed: op(&a.observed_load_multiplier),
                        slope: a.gradient.slope,
                        min_gradient: a.gradient.min_gradient,
                        max_gradient: a.gradient.max_gradient,
                        increment: a.load_multiplier_linear_increment,
                        max: a.max_load_multiplier,
                    },
                    every: ticks(a.step_interval.0, tick).max(1),
                    sum: a.max_load_multiplier,
                },
                ComponentSpec::AiadLoadScheduler(a) => Component::LoadScheduler {
                    out: out(&a.out),
                    is_overload: a.out_is_overload.as_deref().map(out),
                    target: a.load_scheduler.0.clone(),
                    signal: op(&a.signal),
                    confirmation: a.overload_confirmation.as_ref().map(op),
                    strategy: Strategy::Aiad {
                        setpoint: op(&a.setpoint),
                        condition: a.overload_condition,
                        increment: a.load_multiplier_linear_increment,
                        decrement: a.load_multiplier_linear_decrement,
                        max: a.max_load_multiplier,
                        min: a.min_load_multiplier,
                    },
                    every: ticks(a.step_interval.0, tick).max(1),
                    sum: a.max_load_multiplier,
                },
                ComponentSpec::RangeDrivenLoadScheduler(r) => Component::LoadScheduler {
                    out: out(&r.out),
                    is_overload: r.out_is_overload.as_deref().map(out),
                    target: r.load_scheduler.0.clone(),
                    signal: op(&r.signal),
                    confirmation: r.overload_confirmation.as_ref().map(op),
                    strategy: Strategy::Range {
                        low: (
                            r.low_throttle_threshold.signal_value,
                            r.low_throttle_threshold.load_multiplier,
                        ),
                        high: (
                            r.high_throttle_threshold.signal_value,
                            r.high_throttle_threshold.load_multiplier,
                        ),
                        degree: r.degree,
                    },
                    every: 1,
                    sum: 0.0,
                },
                ComponentSpec::LoadRamp(r) => Component::LoadRamp {
                    out: out(&r.out),
                    at_start: r.out_at_start.as_deref().map(out),
                    at_end: r.out_at_end.as_deref().map(out),
                    sampler: r.sampler.0.clone(),
                    forward: op(&r.forward),
                    backward: r.backward.as_ref().map(op),
                    reset: r.reset.as_ref().map(op),
                    ramp: Ramp::new(r.steps.iter().map(|s| {
                        (
                            s.target_accept_percentage.0,
                            ticks(s.duration.0, tick).max(1),
                        )
                    })),
                },
                ComponentSpec::Alerter(a) => {
                    alerts.push(Alert {
                        name: a.alert_name.clone(),
                        severity: a.severity,
                        labels: a.labels.clone(),
                        channels: a.alert_channels.clone(),
                        firing: false,
                        resolve_ticks: ticks(a.resolve_timeout.0, tick),
                        quiet: 0,
                    });
                    Component::Alerter {
                        signal: op(&a.signal),
                        index: alerts.len() - 1,
                    }
                }
            })
            .collect();
        let n = names.len();
        Circuit {
            names,
            components,
            alerts,
            current: vec![None; n],
            previous: vec![None; n],
            computed: vec![false; n],
            carried: vec![false; n],
            ticks: 0,
        }
    }

    /// The PromQL queries due this tick, by component index.
    pub fn due_queries(&self) -> Vec<(usize, &str)> {
        self.components
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c {
                Component::Promql { query, every, .. } if self.ticks.is_multiple_of(*every) => {
                    Some((i, query.as_str()))
                }
                _ => None,
            })
            .collect()
    }

    fn get(&self, op: Op) -> Option<f64> {
        match op {
            Op::Const(c) => Some(c).filter(|c| c.is_finite()),
            Op::Signal(i) if self.computed[i] => self.current[i],
            Op::Signal(i) => self.previous[i],
        }
    }

    /// Runs one tick with the results of the due queries (by component
    /// index; a due query without a result is missing) and returns the
    /// actuators' outputs.
    pub fn tick(&mut self, results: &HashMap<usize, Option<f64>>) -> Vec<Output> {
        self.previous.clone_from(&self.current);
        self.computed.iter_mut().for_each(|c| *c = false);
        let mut outputs = Vec::new();
        for i in 0..self.components.len() {
            match self.components[i] {
                Component::LoadScheduler { .. } => {
                    outputs.push(self.load_scheduler(i));
                    continue;
                }
                Component::LoadRamp { .. } => {
                    outputs.push(self.load_ramp(i));
                    continue;
                }
                Component::Alerter { signal, index } => {
                    let active = self.get(signal).is_some_and(|v| v != 0.0);
                    self.alerts[index].tick(active);
                    continue;
                }
                _ => {}
            }
            let (out, value) = self.evaluate(i, results);
            if let Some(out) = out {
                self.current[out] = value.filter(|v| v.is_finite());
                self.computed[out] = true;
                self.carried[out] = matches!(
                    self.components[i],
                    Component::Promql { every, .. } if !self.ticks.is_multiple_of(every)
                );
            }
            if let Component::Actuator {
                target,
                input,
                fill,
            } = &self.components[i]
            {
                let (value, fill) = (
                    input.and_then(|o| self.get(o)),
                    fill.and_then(|o| self.get(o)),
                );
                if value.is_some() || fill.is_some() {
                    outputs.push(Output {
                        target: target.clone(),
                        value,
                        fill_amount: fill,
                    });
                }
            }
        }
        self.ticks += 1;
        outputs
    }

    /// Computes component `i`: which signal it writes and the value.
    fn evaluate(
        &mut self,
        i: usize,
        results: &HashMap<usize, Option<f64>>,
    ) -> (Option<usize>, Option<f64>) {
        // Inputs first (immutable reads), then the component's own state.
        let read = |op: &Op| self.get(*op);
        match &self.components[i] {
            Component::Promql { out, every, .. } => {
                let value = if self.ticks.is_multiple_of(*every) {
                    results.get(&i).copied().flatten()
                } else {
                    // Between evaluations a query keeps its last value.
                    self.previous[*out]
                };
                (Some(*out), value)
            }
            Component::Ema {
                out, input, freeze, ..
            } => {
                let (out, x) = (*out, read(input));
                let frozen = freeze.as_ref().and_then(read).is_some_and(|f| f != 0.0);
                let Component::Ema { alpha, state, .. } = &mut self.components[i] else {
                    unreachable!("matched above")
                };
                if let Some(x) = x
                    && !frozen
                {
                    *state = Some(state.map_or(x, |s| s + *alpha * (x - s)));
                }
                (Some(out), *state)
            }
            Component::Arithmetic { out, op, lhs, rhs } => {
                let value = match (read(lhs), read(rhs)) {
                    (Some(a), Some(b)) => match op {
                        ArithmeticOp::Add => Some(a + b),
                        ArithmeticOp::Sub => Some(a - b),
                        ArithmeticOp::Mul => Some(a * b),
                        ArithmeticOp::Div => (b != 0.0).then(|| a / b),
                    },
                    _ => None,
                };
                (Some(*out), value)
            }
            Component::Decider {
                out, op, lhs, rhs, ..
            } => {
                let out = *out;
                // Missing data is no evidence: the comparison does not hold.
                let holds = match (read(lhs), read(rhs)) {
                    (Some(a), Some(b)) => op.holds(a, b),
                    _ => false,
                };
                let Component::Decider {
                    true_for,
                    false_for,
                    streak,
                    held,
                    state,
                    ..
                } = &mut self.components[i]
                else {
                    unreachable!("matched above")
                };
                if holds == *held {
                    *streak += 1;
                } else {
                    *held = holds;
                    *streak = 1;
                }
                let needed = if holds { *true_for } else { *false_for };
                if *streak > needed || needed == 0 {
                    *state = holds;
                }
                (Some(out), Some(f64::from(u8::from(*state))))
            }
            Component::Gradient {
                out,
                signal,
                setpoint,
                control,
                slope,
                min,
                max,
            } => {
                let value = match (read(signal), read(setpoint), read(control)) {
                    (Some(s), Some(sp), Some(cv)) if sp > 0.0 && s >= 0.0 => {
                        let g = (s / sp).powf(*slope);
                        let g = if g.is_finite() {
                            g.clamp(*min, *max)
                        } else {
                            *min
                        };
                        Some(cv * g)
                    }
                    _ => None,
                };
                (Some(*out), value)
            }
            Component::Integrator {
                out, input, reset, ..
            } => {
                let (out, x) = (*out, read(input));
                let resetting = reset.as_ref().and_then(read).is_some_and(|r| r != 0.0);
                let Component::Integrator {
                    initial,
                    min,
                    max,
                    state,
                    ..
                } = &mut self.components[i]
                else {
                    unreachable!("matched above")
                };
                if resetting {
                    *state = *initial;
                } else if let Some(x) = x {
                    let mut v = *state + x;
                    if let Some(lo) = min {
                        v = v.max(*lo);
                    }
                    if let Some(hi) = max {
                        v = v.min(*hi);
                    }
                    *state = v;
                }
                (Some(out), Some(*state))
            }
            Component::Switcher {
                out,
                switch,
                on_true,
                on_false,
            } => {
                let value = match read(switch) {
                    Some(s) if s != 0.0 => read(on_true),
                    Some(_) => read(on_false),
                    None => None,
                };
                (Some(*out), value)
            }
            Component::Extremum { out, max, inputs } => {
                let present = inputs.iter().filter_map(read);
                let value = if *max {
                    present.reduce(f64::max)
                } else {
                    present.reduce(f64::min)
                };
                (Some(*out), value)
            }
            Component::Actuator { .. }
            | Component::LoadScheduler { .. }
            | Component::LoadRamp { .. }
            | Component::Alerter { .. } => (None, None),
        }
    }

    /// Runs load scheduler `i` (Aperture's nested circuit for its kind):
    /// writes its signals and returns the multiplier it sends, in [0, 1]:
    /// 1 where Aperture's desired multiplier is NaN (pass-through: at or
    /// above `max_load_multiplier`, or a missing input).
    fn load_scheduler(&mut self, i: usize) -> Output {
        let Component::LoadScheduler {
            out,
            is_overload,
            target,
            signal,
            confirmation,
            strategy,
            every,
            sum,
        } = &self.components[i]
        else {
            unreachable!("called for load schedulers only")
        };
        let read = |op: &Op| self.get(*op);
        let s = read(signal);
        // Aperture's FirstValid(confirmation, 1): missing confirms.
        let confirmed = confirmation
            .as_ref()
            .and_then(read)
            .is_none_or(|c| c != 0.0);
        // Aperture's integrator runs one tick after each multiple of its
        // interval: first at the second tick, then every `every` ticks.
        let step = self.ticks >= 1 && (self.ticks - 1).is_multiple_of(*every);
        let mut sum = *sum;
        let (overload, desired) = match strategy {
            Strategy::Aimd {
                setpoint,
                observed,
                slope,
                min_gradient,
                max_gradient,
                increment,
                max,
            } => {
                let (sp, o) = (read(setpoint), read(observed));
                // The slope's sign says which side of the setpoint is
                // overload; missing data is not.
                let beyond = match (s, sp) {
                    (Some(s), Some(sp)) if *slope <= 0.0 => s > sp,
                    (Some(s), Some(sp)) => s < sp,
                    _ => false,
                };
                let overload = beyond && confirmed;
                if step {
                    sum = if overload {
                        0.0
                    } else {
                        (sum + increment).min(*max)
                    };
                }
                let lm = if overload {
                    gradient(s, sp, o, *slope, *min_gradient, *max_gradient)
                } else {
                    o.map(|o| o + sum)
                };
                (overload, lm.filter(|lm| lm < max))
            }
            Strategy::Aiad {
                setpoint,
                condition,
                increment,
                decrement,
                max,
                min,
            } => {
                let beyond =
                    matches!((s, read(setpoint)), (Some(s), Some(sp)) if condition.holds(s, sp));
                let overload = beyond && confirmed;
                if step {
                    let (delta, high) = if overload {
                        (-decrement, 1.0 - decrement)
                    } else {
                        (*increment, *max)
                    };
                    sum = (sum + delta).min(high).max(*min);
                }
                (overload, Some(sum).filter(|lm| lm < max))
            }
            Strategy::Range { low, high, degree } => {
                let lm = s.map(|s| range_curve(s, *low, *high, *degree));
                let overload = confirmed && lm.is_some_and(|lm| lm < 1.0);
                (overload, lm.filter(|_| overload))
            }
        };
        let sent = desired
            .filter(|d| d.is_finite())
            .map_or(1.0, |d| d.clamp(0.0, 1.0));
        let (out, is_overload, target) = (*out, *is_overload, target.clone());
        self.current[out] = Some(sent);
        self.computed[out] = true;
        if let Some(o) = is_overload {
            self.current[o] = Some(f64::from(u8::from(overload)));
            self.computed[o] = true;
        }
        if let Component::LoadScheduler { sum: state, .. } = &mut self.components[i] {
            *state = sum;
        }
        Output {
            target: Target::LoadMultiplier(target),
            value: Some(sent),
            fill_amount: None,
        }
    }

    /// Runs load ramp `i`: moves it (reset first; forward or backward when
    /// only one of them is non-zero; a missing input is zero), writes its
    /// signals and returns the percentage it sends.
    fn load_ramp(&mut self, i: usize) -> Output {
        let Component::LoadRamp {
            forward,
            backward,
            reset,
            ..
        } = &self.components[i]
        else {
            unreachable!("called for load ramps only")
        };
        let on = |op: Option<Op>| op.and_then(|o| self.get(o)).is_some_and(|v| v != 0.0);
        let (forward, backward, reset) = (on(Some(*forward)), on(*backward), on(*reset));
        let Component::LoadRamp {
            out,
            at_start,
            at_end,
            sampler,
            ramp,
            ..
        } = &mut self.components[i]
        else {
            unreachable!("matched above")
        };
        ramp.tick(forward, backward, reset);
        let value = ramp.value();
        let mut write = |signal: Option<usize>, v: f64| {
            if let Some(s) = signal {
                self.current[s] = Some(v);
                self.computed[s] = true;
            }
        };
        write(Some(*out), value);
        write(*at_start, f64::from(u8::from(ramp.at_start())));
        write(*at_end, f64::from(u8::from(ramp.at_end())));
        Output {
            target: Target::AcceptPercentage(sampler.clone()),
            value: Some(value),
            fill_amount: None,
        }
    }

    /// The alerts of its alerters, in circuit order, after the last tick.
    pub fn alerts(&self) -> &[Alert] {
        &self.alerts
    }

    /// Takes over what `old` (this policy's previous circuit) had reached:
    /// the place of each load ramp that writes the same signal, drives the
    /// same sampler and has the same steps; the state of each alert it
    /// still raises.
    pub fn carry_over(&mut self, old: &Circuit) {
        for c in &mut self.components {
            let Component::LoadRamp {
                out, sampler, ramp, ..
            } = c
            else {
                continue;
            };
            let found = old.components.iter().find_map(|o| match o {
                Component::LoadRamp {
                    out: o_out,
                    sampler: o_sampler,
                    ramp: o_ramp,
                    ..
                } if old.names[*o_out] == self.names[*out]
                    && o_sampler == sampler
                    && o_ramp.same_steps(ramp) =>
                {
                    Some(o_ramp)
                }
                _ => None,
            });
            if let Some(o) = found {
                ramp.take_place(o);
            }
        }
        for alert in &mut self.alerts {
            if let Some(o) = old.alerts.iter().find(|o| o.same(alert)) {
                alert.firing = o.firing;
                alert.quiet = o.quiet;
            }
        }
    }

    /// Every signal and its value after the last tick.
    pub fn signals(&self) -> impl Iterator<Item = (&str, Option<f64>)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.current.iter().copied())
    }

    /// Whether the last tick computed each signal anew (in the order of
    /// [`Circuit::signals`]): false only for a `promql` signal between its
    /// evaluations, which keeps what its query last returned. The
    /// controller dates each signal by it, so that a query run every
    /// minute shows the age of its answer, not of the last tick.
    pub fn renewed(&self) -> impl Iterator<Item = bool> + '_ {
        self.carried.iter().map(|carried| !carried)
    }
}

#[cfg(test)]
mod tests;
