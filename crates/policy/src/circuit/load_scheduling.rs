//! Aperture's load schedulers as circuit components (`aimd_load_scheduler`,
//! `aiad_load_scheduler`, `range_driven_load_scheduler`), and the
//! blueprints built on them (`load_scheduling.aimd`,
//! `load_scheduling.promql`), with Aperture's parameter names and defaults.
//!
//! Each component is Aperture's nested circuit in one: it decides whether
//! the service is overloaded, computes the load multiplier, writes it to
//! `out` and sends it to its `load_scheduler` (as an `actuator` would).
//! Where Aperture's desired multiplier is NaN (pass-through: at or above
//! `max_load_multiplier`, or a missing input), and wherever it is above 1,
//! the component sends 1: in Sluice a multiplier of 1 passes everything,
//! and sidecars refuse one above 1. docs/controller.md lists every
//! difference from Aperture.

use schemars::JsonSchema;
use serde::Deserialize;

use super::{
    ArithmeticOp, ArithmeticSpec, Comparison, ComponentSpec, DeciderSpec, ExtremumSpec, Operand,
    promql_every as promql, signal, zero,
};
use crate::types::{DurationSpec, Name, PositiveDuration};

/// `load_scheduling.aimd`.
pub const AIMD: &str = "load_scheduling.aimd";
/// `load_scheduling.promql`.
pub const PROMQL: &str = "load_scheduling.promql";

fn linear_increment() -> f64 {
    0.025
}
fn linear_decrement() -> f64 {
    0.05
}
fn two() -> f64 {
    2.0
}
fn ten_seconds() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(10))
}
fn gt() -> Comparison {
    Comparison::Gt
}

/// `aimd_load_scheduler`: Aperture's AIMD load scheduler. Overloaded while
/// `signal` is above `setpoint` (below it for a positive slope) and
/// `overload_confirmation` is non-zero (or missing); then the multiplier is
/// `observed_load_multiplier × clamp((signal / setpoint)^slope,
/// min_gradient, max_gradient)`. Otherwise it is `observed_load_multiplier`
/// plus a sum that grows by `load_multiplier_linear_increment` every
/// `step_interval` (reset to 0 by an overload seen at a step) up to
/// `max_load_multiplier`; from there on, pass-through. The multiplier sent
/// is capped at 1, and is 1 for pass-through and when an input it needs is
/// missing.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AimdLoadSchedulerSpec {
    /// The signal it writes: the load multiplier it sends to `load_scheduler`,
    /// 0 to 1 (1: pass-through). A name no other component writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// Also writes this signal: 1 while overloaded (and confirmed), else 0
    /// (Aperture's `is_overload` port). Default none.
    #[serde(default)]
    pub out_is_overload: Option<String>,
    /// The load scheduler of this policy it drives.
    pub load_scheduler: Name,
    /// What is measured: a number or a signal. Missing: not overloaded.
    pub signal: Operand,
    /// Where the signal should be: a number or a signal. Missing: not
    /// overloaded.
    pub setpoint: Operand,
    /// Overload counts only while this is non-zero; missing counts as
    /// confirmed (as in Aperture). Default none: always confirmed.
    #[serde(default)]
    pub overload_confirmation: Option<Operand>,
    /// The share of the incoming tokens the load scheduler admits (accepted ÷
    /// (accepted + rejected) tokens, from a `promql` component). Aperture's
    /// scheduler queries it itself; here it is wired in. Missing:
    /// pass-through.
    pub observed_load_multiplier: Operand,
    /// The gradient controller applied under overload.
    pub gradient: GradientParameters,
    /// Added to the multiplier every `step_interval` while not overloaded
    /// (>= 0). Default `0.025`.
    #[serde(default = "linear_increment")]
    #[schemars(range(min = 0.0))]
    pub load_multiplier_linear_increment: f64,
    /// Once the multiplier reaches this (> 0), the scheduler passes
    /// everything; the recovery sum never exceeds it. Default `2`.
    #[serde(default = "two")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub max_load_multiplier: f64,
    /// How often the linear increment applies (and an overload resets the
    /// sum), rounded up to whole ticks: Aperture's fixed 10 s. Default `10s`.
    #[serde(default = "ten_seconds")]
    pub step_interval: PositiveDuration,
}

/// The gradient controller of `aimd_load_scheduler`: gradient =
/// `(signal / setpoint)^slope`, clamped to `[min_gradient, max_gradient]`.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GradientParameters {
    /// The exponent of signal / setpoint, not 0. Negative (the usual, -1):
    /// overload is a signal above its setpoint; positive: below it.
    pub slope: f64,
    /// The smallest gradient. Default none: unbounded (Aperture's default is
    /// -1.8e308).
    #[serde(default)]
    pub min_gradient: Option<f64>,
    /// The largest gradient. Default none: unbounded (Aperture's default is
    /// 1.8e308).
    #[serde(default)]
    pub max_gradient: Option<f64>,
}

/// `aiad_load_scheduler`: Aperture's AIAD load scheduler. Every
/// `step_interval` the multiplier falls by `load_multiplier_linear_decrement`
/// (to at most 1 − decrement, at least `min_load_multiplier`) while
/// `signal overload_condition setpoint` holds and `overload_confirmation` is
/// non-zero (or missing), and rises by `load_multiplier_linear_increment`
/// otherwise; at `max_load_multiplier` it passes everything (it starts
/// there). It does not read the observed multiplier. The multiplier sent is
/// capped at 1, and is 1 for pass-through.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AiadLoadSchedulerSpec {
    /// The signal it writes: the load multiplier it sends to `load_scheduler`,
    /// 0 to 1 (1: pass-through). A name no other component writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// Also writes this signal: 1 while overloaded (and confirmed), else 0
    /// (Aperture's `is_overload` port). Default none.
    #[serde(default)]
    pub out_is_overload: Option<String>,
    /// The load scheduler of this policy it drives.
    pub load_scheduler: Name,
    /// What is measured: a number or a signal. Missing: not overloaded.
    pub signal: Operand,
    /// Where the signal should be: a number or a signal. Missing: not
    /// overloaded.
    pub setpoint: Operand,
    /// Overload counts only while this is non-zero; missing counts as
    /// confirmed (as in Aperture). Default none: always confirmed.
    #[serde(default)]
    pub overload_confirmation: Option<Operand>,
    /// Overload is `signal <condition> setpoint`: `gt`, `lt`, `gte` or `lte`.
    /// Default `gt`.
    #[serde(default = "gt")]
    pub overload_condition: Comparison,
    /// Added to the multiplier every `step_interval` while not overloaded
    /// (>= 0). Default `0.025`.
    #[serde(default = "linear_increment")]
    #[schemars(range(min = 0.0))]
    pub load_multiplier_linear_increment: f64,
    /// Taken from the multiplier every `step_interval` while overloaded (>=
    /// 0). Default `0.05`.
    #[serde(default = "linear_decrement")]
    #[schemars(range(min = 0.0))]
    pub load_multiplier_linear_decrement: f64,
    /// Once the multiplier reaches this (>= 0), the scheduler passes
    /// everything; it starts there. Default `2`.
    #[serde(default = "two")]
    #[schemars(range(min = 0.0))]
    pub max_load_multiplier: f64,
    /// The multiplier never falls below this (>= 0, at most
    /// `max_load_multiplier`). Default `0`.
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub min_load_multiplier: f64,
    /// How often the multiplier steps, rounded up to whole ticks: Aperture's
    /// fixed 10 s. Default `10s`.
    #[serde(default = "ten_seconds")]
    pub step_interval: PositiveDuration,
}

/// `range_driven_load_scheduler`: Aperture's range-driven load scheduler.
/// The multiplier follows a polynomial of `signal` from
/// `low_throttle_threshold` to `high_throttle_threshold` (outside them, 1 on
/// the side that does not throttle, the other end's multiplier on the side
/// that does). Below 1 and with `overload_confirmation` non-zero (or
/// missing) it is sent; otherwise, and when `signal` is missing, 1
/// (pass-through).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RangeDrivenLoadSchedulerSpec {
    /// The signal it writes: the load multiplier it sends to `load_scheduler`,
    /// 0 to 1 (1: pass-through). A name no other component writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// Also writes this signal: 1 while the curve is below 1 and confirmed,
    /// else 0 (Aperture's `is_overload` port). Default none.
    #[serde(default)]
    pub out_is_overload: Option<String>,
    /// The load scheduler of this policy it drives.
    pub load_scheduler: Name,
    /// What the curve is read at: a number or a signal. Missing:
    /// pass-through.
    pub signal: Operand,
    /// Throttles only while this is non-zero; missing counts as confirmed.
    /// Default none: always confirmed.
    #[serde(default)]
    pub overload_confirmation: Option<Operand>,
    /// Where the curve starts.
    pub low_throttle_threshold: Datapoint,
    /// Where the curve ends.
    pub high_throttle_threshold: Datapoint,
    /// The curve's shape (> 0): 1 linear, 2 quadratic, 3 cubic.
    pub degree: f64,
}

/// A point of the range-driven curve.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Datapoint {
    /// The signal's value there.
    pub signal_value: f64,
    /// The load multiplier there, 0 to 1.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub load_multiplier: f64,
}

fn finite(v: f64) -> bool {
    v.is_finite()
}

/// `Ok` when `v` (the value of `field`) is a finite number >= 0.
fn non_negative(field: &str, v: f64) -> Result<(), String> {
    if finite(v) && v >= 0.0 {
        Ok(())
    } else {
        Err(format!("{field} must be a number >= 0, got {v}"))
    }
}

impl AimdLoadSchedulerSpec {
    /// Its parameters' ranges (the wiring is checked with the circuit's).
    pub fn check(&self) -> Result<(), String> {
        let g = &self.gradient;
        if !(finite(g.slope) && g.slope != 0.0) {
            return Err(format!(
                "gradient.slope must be a number other than 0, got {}",
                g.slope
            ));
        }
        for (field, v) in [
            ("gradient.min_gradient", g.min_gradient),
            ("gradient.max_gradient", g.max_gradient),
        ] {
            if let Some(v) = v.filter(|v| !finite(*v)) {
                return Err(format!("{field} must be a number, got {v}"));
            }
        }
        if let (Some(lo), Some(hi)) = (g.min_gradient, g.max_gradient)
            && lo > hi
        {
            return Err(format!(
                "gradient.min_gradient ({lo}) must not exceed gradient.max_gradient ({hi})"
            ));
        }
        non_negative(
            "load_multiplier_linear_increment",
            self.load_multiplier_linear_increment,
        )?;
        if !(finite(self.max_load_multiplier) && self.max_load_multiplier > 0.0) {
            return Err(format!(
                "max_load_multiplier must be a number > 0, got {}",
                self.max_load_multiplier
            ));
        }
        Ok(())
    }
}

impl AiadLoadSchedulerSpec {
    /// Its parameters' ranges (the wiring is checked with the circuit's).
    pub fn check(&self) -> Result<(), String> {
        overload_condition(self.overload_condition)?;
        non_negative(
            "load_multiplier_linear_increment",
            self.load_multiplier_linear_increment,
        )?;
        non_negative(
            "load_multiplier_linear_decrement",
            self.load_multiplier_linear_decrement,
        )?;
        non_negative("max_load_multiplier", self.max_load_multiplier)?;
        non_negative("min_load_multiplier", self.min_load_multiplier)?;
        if self.min_load_multiplier > self.max_load_multiplier {
            return Err(format!(
                "min_load_multiplier ({}) must not exceed max_load_multiplier ({})",
                self.min_load_multiplier, self.max_load_multiplier
            ));
        }
        Ok(())
    }
}

impl RangeDrivenLoadSchedulerSpec {
    /// Its parameters' ranges (the wiring is checked with the circuit's).
    pub fn check(&self) -> Result<(), String> {
        for (field, d) in [
            ("low_throttle_threshold", &self.low_throttle_threshold),
            ("high_throttle_threshold", &self.high_throttle_threshold),
        ] {
            if !finite(d.signal_value) {
                return Err(format!(
                    "{field}.signal_value must be a number, got {}",
                    d.signal_value
                ));
            }
            if !(0.0..=1.0).contains(&d.load_multiplier) {
                return Err(format!(
                    "{field}.load_multiplier must be between 0 and 1, got {}",
                    d.load_multiplier
                ));
            }
        }
        if !(finite(self.degree) && self.degree > 0.0) {
            return Err(format!("degree must be a number > 0, got {}", self.degree));
        }
        Ok(())
    }
}

/// Aperture's overload conditions: `gt`, `lt`, `gte`, `lte`.
fn overload_condition(c: Comparison) -> Result<(), String> {
    match c {
        Comparison::Gt | Comparison::Lt | Comparison::Gte | Comparison::Lte => Ok(()),
        Comparison::Eq | Comparison::Neq => Err(format!(
            "overload_condition must be gt, lt, gte or lte, not {}",
            c.name()
        )),
    }
}

// ---------------------------------------------------------------------------
// The blueprints.

/// One of a blueprint's `overload_confirmations`: a PromQL query compared
/// with a threshold. Missing data does not confirm.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OverloadConfirmation {
    /// A PromQL instant query (several series are summed), run every 10 s.
    pub query_string: String,
    /// What its value is compared with.
    pub threshold: f64,
    /// The comparison, `value <operator> threshold`: `gt`, `lt`, `gte`,
    /// `lte`, `eq` or `neq`.
    pub operator: Comparison,
}

/// The gradient controller of `load_scheduling.aimd`, with the blueprint's
/// defaults.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlueprintGradient {
    /// The exponent of latency / setpoint (not 0). Default `-1`.
    #[serde(default = "super::minus_one")]
    pub slope: f64,
    /// The smallest gradient. Default `0.1`.
    #[serde(default = "super::tenth")]
    pub min_gradient: f64,
    /// The largest gradient. Default `1`.
    #[serde(default = "super::one")]
    pub max_gradient: f64,
}

impl Default for BlueprintGradient {
    fn default() -> Self {
        BlueprintGradient {
            slope: super::minus_one(),
            min_gradient: super::tenth(),
            max_gradient: super::one(),
        }
    }
}

fn latency_tolerance() -> f64 {
    1.25
}
fn thirty_minutes() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(1800))
}
fn thirty_seconds() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(30))
}

/// Parameters of `load_scheduling.aimd`: Aperture's
/// `load-scheduling/average-latency` (`policy.latency_baseliner` and
/// `policy.load_scheduling_core`, flattened).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
#[schemars(title = "load_scheduling.aimd")]
pub struct AimdParameters {
    /// The flux meter of this policy measuring the service's latency.
    pub flux_meter: Name,
    /// The load scheduler of this policy protecting the service.
    pub load_scheduler: Name,
    /// Overload is when the recent average latency (30 s) exceeds the
    /// long-term one times this (> 0). Default `1.25`.
    #[serde(default = "latency_tolerance")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub latency_tolerance_multiplier: f64,
    /// How far back the long-term average latency reaches. Default `30m`.
    #[serde(default = "thirty_minutes")]
    pub long_term_query_interval: PositiveDuration,
    /// How often the long-term query runs. Default `30s`.
    #[serde(default = "thirty_seconds")]
    pub long_term_query_periodic_interval: PositiveDuration,
    /// The AIMD scheduler's gradient controller. Default: the blueprint's
    /// slope, min_gradient and max_gradient below.
    #[serde(default)]
    pub gradient: BlueprintGradient,
    /// Once the multiplier reaches this (> 0), the scheduler passes
    /// everything. Default `2`.
    #[serde(default = "two")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub max_load_multiplier: f64,
    /// Added to the multiplier every 10 s while not overloaded (>= 0).
    /// Default `0.025`.
    #[serde(default = "linear_increment")]
    #[schemars(range(min = 0.0))]
    pub load_multiplier_linear_increment: f64,
    /// Queries that must all confirm an overload before the scheduler
    /// throttles. Default none.
    #[serde(default)]
    pub overload_confirmations: Vec<OverloadConfirmation>,
}

/// Parameters of `load_scheduling.promql`: Aperture's
/// `load-scheduling/promql` (`policy` and
/// `policy.load_scheduling_core.aiad_load_scheduler`, flattened).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
#[schemars(title = "load_scheduling.promql")]
pub struct PromqlParameters {
    /// The PromQL query whose value is the signal (several series are summed),
    /// run every 10 s.
    pub promql_query: String,
    /// The signal's setpoint.
    pub setpoint: f64,
    /// Overload is `signal <condition> setpoint`: `gt`, `lt`, `gte` or `lte`.
    pub overload_condition: Comparison,
    /// The load scheduler of this policy protecting the service.
    pub load_scheduler: Name,
    /// Added to the multiplier every 10 s while not overloaded (>= 0).
    /// Default `0.025`.
    #[serde(default = "linear_increment")]
    #[schemars(range(min = 0.0))]
    pub load_multiplier_linear_increment: f64,
    /// Taken from the multiplier every 10 s while overloaded (>= 0). Default
    /// `0.05`.
    #[serde(default = "linear_decrement")]
    #[schemars(range(min = 0.0))]
    pub load_multiplier_linear_decrement: f64,
    /// Once the multiplier reaches this (>= 0), the scheduler passes
    /// everything. Default `2`.
    #[serde(default = "two")]
    #[schemars(range(min = 0.0))]
    pub max_load_multiplier: f64,
    /// The multiplier never falls below this (>= 0). Default `0`.
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub min_load_multiplier: f64,
    /// Queries that must all confirm an overload before the scheduler
    /// throttles. Default none.
    #[serde(default)]
    pub overload_confirmations: Vec<OverloadConfirmation>,
}

/// Aperture's metric scrape interval: how often the blueprints' queries run.
const SCRAPE: std::time::Duration = std::time::Duration::from_secs(10);

/// The observed load multiplier of load scheduler `ls`, as Aperture queries
/// it: accepted ÷ (accepted + rejected) tokens over 30 s.
fn observed(policy: &str, ls: &Name) -> ComponentSpec {
    promql(
        "observed_load_multiplier",
        observed_query(policy, ls),
        SCRAPE,
    )
}

/// The PromQL of [`observed`], run every 10 s (Aperture's scrape interval);
/// `sluice import-aperture` wires it to the AIMD load schedulers it
/// converts, whose multiplier Aperture's scheduler observed itself.
pub(crate) fn observed_query(policy: &str, ls: &Name) -> String {
    let tokens = super::scheduler_tokens(policy, ls);
    let sum = |metric: &str| format!("sum(increase({metric}{{{tokens}}}[30s]))");
    format!(
        "{} / ({} + {})",
        sum("accepted_tokens_total"),
        sum("accepted_tokens_total"),
        sum("rejected_tokens_total")
    )
}

/// Appends the components of `confirmations` to `out` and returns the
/// signal the scheduler's `overload_confirmation` reads, if any: each query
/// (every 10 s) compared with its threshold by a `decider` (missing data:
/// 0), all ANDed by a `min`.
fn overload_confirmations(
    confirmations: &[OverloadConfirmation],
    out: &mut Vec<ComponentSpec>,
) -> Result<Option<Operand>, String> {
    if confirmations.is_empty() {
        return Ok(None);
    }
    let mut each = Vec::new();
    for (i, c) in confirmations.iter().enumerate() {
        if c.query_string.trim().is_empty() {
            return Err(format!(
                "overload_confirmations[{i}].query_string must not be empty"
            ));
        }
        if !finite(c.threshold) {
            return Err(format!(
                "overload_confirmations[{i}].threshold must be a number"
            ));
        }
        let (query, decided) = (
            format!("overload_confirmation_query_{i}"),
            format!("overload_confirmation_{i}"),
        );
        out.push(promql(&query, c.query_string.clone(), SCRAPE));
        out.push(ComponentSpec::Decider(DeciderSpec {
            out: decided.clone(),
            op: c.operator,
            lhs: signal(&query),
            rhs: Operand::Constant(c.threshold),
            true_for: zero(),
            false_for: zero(),
        }));
        each.push(signal(&decided));
    }
    out.push(ComponentSpec::Min(ExtremumSpec {
        out: "overload_confirmation".to_owned(),
        inputs: each,
    }));
    Ok(Some(signal("overload_confirmation")))
}

/// `load_scheduling.aimd`: Aperture's average-latency blueprint. The flux
/// meter's average latency over 30 s (every 10 s) against its average over
/// `long_term_query_interval` (every `long_term_query_periodic_interval`)
/// × `latency_tolerance_multiplier`, driving an `aimd_load_scheduler`.
pub(super) fn aimd(policy: &str, p: &AimdParameters) -> Result<Vec<ComponentSpec>, String> {
    if !(finite(p.latency_tolerance_multiplier) && p.latency_tolerance_multiplier > 0.0) {
        return Err(format!(
            "latency_tolerance_multiplier must be a number > 0, got {}",
            p.latency_tolerance_multiplier
        ));
    }
    let flows = super::served_flows(policy, &p.flux_meter);
    let latency = |window: &str| {
        format!(
            "sum(increase(flux_meter_sum{{{flows}}}[{window}])) / sum(increase(flux_meter_count{{{flows}}}[{window}]))"
        )
    };
    let long_term = super::seconds(&DurationSpec(p.long_term_query_interval.0));
    let mut out = vec![
        promql("signal", latency("30s"), SCRAPE),
        promql(
            "signal_long_term",
            latency(&long_term),
            p.long_term_query_periodic_interval.0,
        ),
        ComponentSpec::Arithmetic(ArithmeticSpec {
            out: "setpoint".to_owned(),
            op: ArithmeticOp::Mul,
            lhs: signal("signal_long_term"),
            rhs: Operand::Constant(p.latency_tolerance_multiplier),
        }),
        observed(policy, &p.load_scheduler),
    ];
    let overload_confirmation = overload_confirmations(&p.overload_confirmations, &mut out)?;
    let scheduler = AimdLoadSchedulerSpec {
        out: "desired_load_multiplier".to_owned(),
        out_is_overload: Some("is_overload".to_owned()),
        load_scheduler: p.load_scheduler.clone(),
        signal: signal("signal"),
        setpoint: signal("setpoint"),
        overload_confirmation,
        observed_load_multiplier: signal("observed_load_multiplier"),
        gradient: GradientParameters {
            slope: p.gradient.slope,
            min_gradient: Some(p.gradient.min_gradient),
            max_gradient: Some(p.gradient.max_gradient),
        },
        load_multiplier_linear_increment: p.load_multiplier_linear_increment,
        max_load_multiplier: p.max_load_multiplier,
        step_interval: ten_seconds(),
    };
    scheduler.check()?;
    out.push(ComponentSpec::AimdLoadScheduler(scheduler));
    Ok(out)
}

/// `load_scheduling.promql`: Aperture's promql blueprint. A PromQL query
/// (every 10 s) against a constant setpoint, driving an
/// `aiad_load_scheduler`.
pub(super) fn promql_blueprint(
    _policy: &str,
    p: &PromqlParameters,
) -> Result<Vec<ComponentSpec>, String> {
    if p.promql_query.trim().is_empty() {
        return Err("promql_query must not be empty".to_owned());
    }
    if !finite(p.setpoint) {
        return Err(format!("setpoint must be a number, got {}", p.setpoint));
    }
    let mut out = vec![promql("signal", p.promql_query.clone(), SCRAPE)];
    let overload_confirmation = overload_confirmations(&p.overload_confirmations, &mut out)?;
    let scheduler = AiadLoadSchedulerSpec {
        out: "desired_load_multiplier".to_owned(),
        out_is_overload: Some("is_overload".to_owned()),
        load_scheduler: p.load_scheduler.clone(),
        signal: signal("signal"),
        setpoint: Operand::Constant(p.setpoint),
        overload_confirmation,
        overload_condition: p.overload_condition,
        load_multiplier_linear_increment: p.load_multiplier_linear_increment,
        load_multiplier_linear_decrement: p.load_multiplier_linear_decrement,
        max_load_multiplier: p.max_load_multiplier,
        min_load_multiplier: p.min_load_multiplier,
        step_interval: ten_seconds(),
    };
    scheduler.check()?;
    out.push(ComponentSpec::AiadLoadScheduler(scheduler));
    Ok(out)
}

#[cfg(test)]
mod tests;
