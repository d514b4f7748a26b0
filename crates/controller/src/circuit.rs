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

use std::collections::HashMap;
use std::time::Duration;

use sluice_policy::circuit::{ArithmeticOp, Comparison, ComponentSpec, Operand};

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
}

/// A compiled circuit and its state.
#[derive(Debug)]
pub struct Circuit {
    names: Vec<String>,
    components: Vec<Component>,
    /// This tick's values (`computed` says which are from this tick).
    current: Vec<Option<f64>>,
    previous: Vec<Option<f64>>,
    computed: Vec<bool>,
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
            .filter_map(|c| c.out().map(str::to_owned))
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
            })
            .collect();
        let n = names.len();
        Circuit {
            names,
            components,
            current: vec![None; n],
            previous: vec![None; n],
            computed: vec![false; n],
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
            let (out, value) = self.evaluate(i, results);
            if let Some(out) = out {
                self.current[out] = value.filter(|v| v.is_finite());
                self.computed[out] = true;
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
                    (Some(a), Some(b)) => match op {
                        Comparison::Gt => a > b,
                        Comparison::Lt => a < b,
                    },
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
            Component::Actuator { .. } => (None, None),
        }
    }

    /// Every signal and its value after the last tick.
    pub fn signals(&self) -> impl Iterator<Item = (&str, Option<f64>)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.current.iter().copied())
    }
}

#[cfg(test)]
mod tests;
