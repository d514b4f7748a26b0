//! Aperture's `LoadRamp` as a circuit component (`load_ramp`), and the
//! blueprint built on it (`load_ramping.base`, Aperture's
//! `load-ramping/base`): a sampler whose accept percentage a circuit raises
//! step by step while its signals stay healthy, and lowers again when they
//! do not.
//!
//! The component is Aperture's signal generator and sampler actuator in
//! one: it walks `steps` one tick at a time while `forward` is non-zero,
//! walks back along the same line while `backward` is, returns to the first
//! step while `reset` is, writes the percentage to `out` and sends it to
//! its `sampler` every tick (as an `actuator` would). docs/controller.md
//! lists the differences from Aperture.

use schemars::JsonSchema;
use serde::Deserialize;

use super::{
    ArithmeticOp, ArithmeticSpec, Comparison, ComponentSpec, DeciderSpec, ExtremumSpec, Operand,
    promql, signal, zero,
};
use crate::types::{DurationSpec, Name, NonEmpty, Percentage};

/// `load_ramping.base`.
pub const BASE: &str = "load_ramping.base";

/// Most steps a ramp has.
pub const MAX_STEPS: usize = 1_000;

/// One step of a load ramp.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadRampStep {
    /// The accept percentage at the end of this step, 0 to 100.
    pub target_accept_percentage: Percentage,
    /// How long the ramp takes from the previous step's percentage to this
    /// one's, in a straight line, rounded up to whole ticks (`0s`: one
    /// tick). The first step holds its percentage this long.
    pub duration: DurationSpec,
}

/// `load_ramp`: Aperture's load ramp. The accept percentage starts at the
/// first step's `target_accept_percentage` and moves, one tick at a time,
/// in a straight line to each next step's over that step's `duration`:
/// forward while `forward` is non-zero, back along the same line while
/// `backward` is (both: it holds), to the first step at once while `reset`
/// is (whatever the others say). A missing input counts as zero. It is
/// sent to `sampler` every tick.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadRampSpec {
    /// The signal it writes: the accept percentage it sends to `sampler`, 0 to
    /// 100. A name no other component writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// Also writes this signal: 1 while the ramp is at its start (the first
    /// step, before it moved), else 0 (Aperture's `at_start` port). Default
    /// none.
    #[serde(default)]
    pub out_at_start: Option<String>,
    /// Also writes this signal: 1 once the ramp has reached the last step's
    /// percentage, else 0 (Aperture's `at_end` port). Default none.
    #[serde(default)]
    pub out_at_end: Option<String>,
    /// The sampler of this policy whose accept percentage it drives (by
    /// nothing else).
    pub sampler: Name,
    /// The steps, at least one.
    pub steps: NonEmpty<LoadRampStep>,
    /// The ramp moves forward, one tick a tick, while this is non-zero (and
    /// `backward` is not): a number or a signal.
    pub forward: Operand,
    /// The ramp moves back along its steps while this is non-zero (and
    /// `forward` is not). Default none: never.
    #[serde(default)]
    pub backward: Option<Operand>,
    /// The ramp is back at its start while this is non-zero, whatever
    /// `forward` and `backward` say. Default none: never.
    #[serde(default)]
    pub reset: Option<Operand>,
}

impl LoadRampSpec {
    /// Its parameters' ranges (the wiring is checked with the circuit's).
    pub fn check(&self) -> Result<(), String> {
        if self.steps.len() > MAX_STEPS {
            return Err(format!(
                "at most {MAX_STEPS} steps, got {}",
                self.steps.len()
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The blueprint.

fn ninety_five() -> f64 {
    95.0
}

/// Parameters of `load_ramping.base`: Aperture's `load-ramping/base`
/// (`policy.load_ramp`, `policy.start` and `policy.drivers`).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
#[schemars(title = "load_ramping.base")]
pub struct LoadRampingParameters {
    /// The sampler of this policy whose accept percentage the ramp drives
    /// (Aperture: `load_ramp.sampler`, its selectors and session label).
    pub sampler: Name,
    /// The ramp's steps (Aperture: `load_ramp.steps`), at least one.
    pub steps: NonEmpty<LoadRampStep>,
    /// Whether the ramp moves forward at all: until this is `true` it stays
    /// where it is (at its first step when new); setting it back to `false`
    /// pauses it. Backward and reset criteria act either way. Default
    /// `false`.
    #[serde(default)]
    pub start: bool,
    /// What moves the ramp forward, back, or to its start. Default none: it
    /// moves forward every tick once started.
    #[serde(default)]
    pub drivers: Drivers,
}

/// The drivers of `load_ramping.base`: queries compared with thresholds.
/// The ramp moves forward while any forward criterion holds (every tick
/// when there is none) and no backward or reset criterion does; back while
/// any backward criterion holds and no reset criterion does; to its start
/// while any reset criterion holds. A query without data meets no
/// criterion.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drivers {
    /// Any PromQL query, with its own operators. Default none.
    #[serde(default)]
    pub promql_drivers: Vec<PromqlDriver>,
    /// The average latency of a flux meter of this policy (its `accepted`,
    /// `OK` flows over 30 s): forward below the threshold, backward and reset
    /// above it. Default none.
    #[serde(default)]
    pub average_latency_drivers: Vec<LatencyDriver>,
    /// A percentile of the latency of a flux meter of this policy (its
    /// `accepted`, `OK` flows over 30 s): forward below the threshold,
    /// backward and reset above it. Default none.
    #[serde(default)]
    pub percentile_latency_drivers: Vec<PercentileLatencyDriver>,
}

/// A PromQL query compared with thresholds.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromqlDriver {
    /// A PromQL instant query (several series are summed), run every tick.
    pub query_string: String,
    /// When its value moves the ramp.
    pub criteria: PromqlCriteria,
}

/// The criteria of a PromQL driver, each optional.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromqlCriteria {
    /// The ramp may move forward while this holds. Default none.
    #[serde(default)]
    pub forward: Option<PromqlCriterion>,
    /// The ramp moves back while this holds. Default none.
    #[serde(default)]
    pub backward: Option<PromqlCriterion>,
    /// The ramp returns to its start while this holds. Default none.
    #[serde(default)]
    pub reset: Option<PromqlCriterion>,
}

/// `value <operator> threshold`.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromqlCriterion {
    /// What the query's value is compared with.
    pub threshold: f64,
    /// The comparison, `value <operator> threshold`: `gt`, `lt`, `gte`,
    /// `lte`, `eq` or `neq`.
    pub operator: Comparison,
}

/// The average latency of a flux meter compared with thresholds.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LatencyDriver {
    /// The flux meter of this policy measuring the latency (Aperture: the
    /// selectors of a flux meter the blueprint adds).
    pub flux_meter: Name,
    /// When the latency moves the ramp.
    pub criteria: LatencyCriteria,
}

/// A percentile of the latency of a flux meter compared with thresholds.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PercentileLatencyDriver {
    /// The flux meter of this policy measuring the latency (Aperture: a flux
    /// meter the blueprint adds); its buckets bound the percentile's
    /// precision.
    pub flux_meter: Name,
    /// The percentile, above 0 and below 100. Default `95`.
    #[serde(default = "ninety_five")]
    pub percentile: f64,
    /// When the latency moves the ramp.
    pub criteria: LatencyCriteria,
}

/// The criteria of a latency driver, each optional: forward is latency
/// below its threshold, backward and reset latency above theirs.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LatencyCriteria {
    /// The ramp may move forward while the latency is below this. Default
    /// none.
    #[serde(default)]
    pub forward: Option<Threshold>,
    /// The ramp moves back while the latency is above this. Default none.
    #[serde(default)]
    pub backward: Option<Threshold>,
    /// The ramp returns to its start while the latency is above this.
    /// Default none.
    #[serde(default)]
    pub reset: Option<Threshold>,
}

/// A latency criterion's threshold.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// The latency compared with, in the flux meter's unit (ms by default).
    pub threshold: f64,
}

/// One criterion of one driver: the signal it reads, its comparison.
struct Criterion {
    signal: String,
    op: Comparison,
    threshold: f64,
}

/// The forward, backward and reset deciders' signal names so far.
#[derive(Default)]
struct Intents {
    forward: Vec<Operand>,
    backward: Vec<Operand>,
    reset: Vec<Operand>,
}

impl Intents {
    /// Appends the decider of `criterion` (`kind` is `forward`, `backward`
    /// or `reset`) to `out`.
    fn add(
        &mut self,
        out: &mut Vec<ComponentSpec>,
        kind: &str,
        criterion: Criterion,
    ) -> Result<(), String> {
        if !criterion.threshold.is_finite() {
            return Err(format!(
                "the {kind} threshold of {} must be a number",
                criterion.signal
            ));
        }
        let list = match kind {
            "forward" => &mut self.forward,
            "backward" => &mut self.backward,
            _ => &mut self.reset,
        };
        let name = format!("{kind}_{}", list.len());
        out.push(ComponentSpec::Decider(DeciderSpec {
            out: name.clone(),
            op: criterion.op,
            lhs: signal(&criterion.signal),
            rhs: Operand::Constant(criterion.threshold),
            true_for: zero(),
            false_for: zero(),
        }));
        list.push(signal(&name));
        Ok(())
    }
}

/// `max(inputs)` written to `out` (Aperture's `Or` of 0/1 signals), if
/// there are inputs.
fn any(out: &mut Vec<ComponentSpec>, name: &str, inputs: Vec<Operand>) -> Option<Operand> {
    if inputs.is_empty() {
        return None;
    }
    out.push(ComponentSpec::Max(ExtremumSpec {
        out: name.to_owned(),
        inputs,
    }));
    Some(signal(name))
}

/// `load_ramping.base`: Aperture's load-ramping blueprint. Each driver is a
/// `promql` component (every tick) and a `decider` per criterion; the
/// criteria of a kind are ORed (`max`); the ramp moves forward while any
/// forward criterion holds (always, without one), no backward one does and
/// `start` is set; back while a backward criterion holds; to its start
/// while a reset criterion holds.
pub(super) fn base(policy: &str, p: &LoadRampingParameters) -> Result<Vec<ComponentSpec>, String> {
    let mut out = Vec::new();
    let mut intents = Intents::default();
    for (i, d) in p.drivers.promql_drivers.iter().enumerate() {
        if d.query_string.trim().is_empty() {
            return Err(format!(
                "drivers.promql_drivers[{i}].query_string must not be empty"
            ));
        }
        let name = format!("promql_driver_{i}");
        out.push(promql(&name, d.query_string.clone()));
        let c = &d.criteria;
        for (kind, criterion) in [
            ("forward", c.forward),
            ("backward", c.backward),
            ("reset", c.reset),
        ] {
            if let Some(k) = criterion {
                intents.add(
                    &mut out,
                    kind,
                    Criterion {
                        signal: name.clone(),
                        op: k.operator,
                        threshold: k.threshold,
                    },
                )?;
            }
        }
    }
    let flows = |fm: &Name| super::served_flows(policy, fm);
    let mut latency = Vec::new();
    for (i, d) in p.drivers.average_latency_drivers.iter().enumerate() {
        let f = flows(&d.flux_meter);
        latency.push((
            format!("average_latency_driver_{i}"),
            format!(
                "sum(increase(flux_meter_sum{{{f}}}[30s])) / sum(increase(flux_meter_count{{{f}}}[30s]))"
            ),
            &d.criteria,
        ));
    }
    for (i, d) in p.drivers.percentile_latency_drivers.iter().enumerate() {
        if !(d.percentile.is_finite() && d.percentile > 0.0 && d.percentile < 100.0) {
            return Err(format!(
                "drivers.percentile_latency_drivers[{i}].percentile must be above 0 and below 100, got {}",
                d.percentile
            ));
        }
        let f = flows(&d.flux_meter);
        latency.push((
            format!("percentile_latency_driver_{i}"),
            format!(
                "histogram_quantile({}, sum by (le) (rate(flux_meter_bucket{{{f}}}[30s])))",
                d.percentile / 100.0
            ),
            &d.criteria,
        ));
    }
    for (name, query, c) in latency {
        out.push(promql(&name, query));
        for (kind, op, criterion) in [
            ("forward", Comparison::Lt, c.forward),
            ("backward", Comparison::Gt, c.backward),
            ("reset", Comparison::Gt, c.reset),
        ] {
            if let Some(t) = criterion {
                intents.add(
                    &mut out,
                    kind,
                    Criterion {
                        signal: name.clone(),
                        op,
                        threshold: t.threshold,
                    },
                )?;
            }
        }
    }
    let forward_intent = any(&mut out, "forward_intent", intents.forward);
    let backward = any(&mut out, "backward_intent", intents.backward);
    let reset = any(&mut out, "reset", intents.reset);
    let mut forward_when = Vec::from_iter(forward_intent);
    if let Some(b) = &backward {
        out.push(ComponentSpec::Arithmetic(ArithmeticSpec {
            out: "not_backward".to_owned(),
            op: ArithmeticOp::Sub,
            lhs: Operand::Constant(1.0),
            rhs: b.clone(),
        }));
        forward_when.push(signal("not_backward"));
    }
    forward_when.push(Operand::Constant(f64::from(u8::from(p.start))));
    out.push(ComponentSpec::Min(ExtremumSpec {
        out: "forward".to_owned(),
        inputs: forward_when,
    }));
    let ramp = LoadRampSpec {
        out: "accept_percentage".to_owned(),
        out_at_start: Some("at_start".to_owned()),
        out_at_end: Some("at_end".to_owned()),
        sampler: p.sampler.clone(),
        steps: p.steps.clone(),
        forward: signal("forward"),
        backward,
        reset,
    };
    ramp.check()?;
    out.push(ComponentSpec::LoadRamp(ramp));
    Ok(out)
}

#[cfg(test)]
mod tests;
