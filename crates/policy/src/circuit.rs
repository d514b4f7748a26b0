//! The `circuit:` section of a policy: what `sluice-controller` runs every
//! tick. Sidecars read it only to validate it.
//!
//! A circuit is a list of components wired by named signals. Each component
//! writes one signal (`out`) from constants and other signals; a component
//! reading a signal written later in the list (or by itself) gets that
//! signal's value from the previous tick, which is how feedback loops are
//! written. Actuators send a signal to a sidecar component. Or, in a few
//! lines, a blueprint that expands into such a list (`sluice-controller
//! explain` prints it).

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::types::{DurationSpec, Name};

pub mod alerter;
pub mod load_ramping;
pub mod load_scheduling;

pub use alerter::{AlerterSpec, Severity};
pub use load_ramping::{LoadRampSpec, LoadRampStep, LoadRampingParameters};
pub use load_scheduling::{
    AiadLoadSchedulerSpec, AimdLoadSchedulerSpec, AimdParameters, BlueprintGradient, Datapoint,
    GradientParameters, OverloadConfirmation, PromqlParameters, RangeDrivenLoadSchedulerSpec,
};

/// `circuit:`.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitSpec {
    /// A blueprint to expand: `load_scheduling.average_latency`,
    /// `load_scheduling.aimd`, `load_scheduling.promql` or
    /// `load_scheduling.capacity` or `load_ramping.base`. Its components run
    /// before `components`. Default none.
    #[serde(default)]
    pub blueprint: Option<String>,
    /// The blueprint's parameters; required with `blueprint`, refused without
    /// it. Read as they are written and checked against the blueprint's
    /// parameters when it is expanded.
    #[serde(default)]
    #[schemars(with = "Option<BlueprintParameters>")]
    pub parameters: Option<serde_json::Value>,
    /// Components, run in this order every tick, after the blueprint's (if
    /// any). Default none.
    #[serde(default)]
    pub components: Vec<ComponentSpec>,
}

// For the JSON Schema only: the loader reads `parameters` as any value, and
// `CircuitSpec::expand` deserializes it into the named blueprint's type.
/// The parameters of the blueprint `blueprint` names: one of these, each
/// titled with its blueprint.
#[derive(JsonSchema)]
#[schemars(untagged)]
#[allow(dead_code)]
enum BlueprintParameters {
    AverageLatency(AverageLatencyParameters),
    Aimd(AimdParameters),
    Promql(PromqlParameters),
    Capacity(CapacityParameters),
    LoadRamping(LoadRampingParameters),
}

/// A constant or a signal.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum Operand {
    /// A number.
    Constant(f64),
    /// The name of a signal.
    Signal(String),
}

/// One component.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ComponentSpec {
    /// A PromQL instant query.
    Promql(PromqlSpec),
    /// An exponential moving average.
    Ema(EmaSpec),
    /// `lhs op rhs`.
    Arithmetic(ArithmeticSpec),
    /// A comparison with hysteresis, 1 or 0.
    Decider(DeciderSpec),
    /// Scales a control variable by how far a signal is from its setpoint.
    GradientController(GradientSpec),
    /// A running sum, with reset.
    Integrator(IntegratorSpec),
    /// Chooses between two operands.
    Switcher(SwitcherSpec),
    /// The smallest present operand.
    Min(ExtremumSpec),
    /// The largest present operand.
    Max(ExtremumSpec),
    /// Sends a signal to a sidecar component.
    Actuator(ActuatorSpec),
    /// Aperture's AIMD load scheduler: drives a load scheduler.
    AimdLoadScheduler(AimdLoadSchedulerSpec),
    /// Aperture's AIAD load scheduler: drives a load scheduler.
    AiadLoadScheduler(AiadLoadSchedulerSpec),
    /// Aperture's range-driven load scheduler: drives a load scheduler.
    RangeDrivenLoadScheduler(RangeDrivenLoadSchedulerSpec),
    /// Aperture's load ramp: drives a sampler's accept percentage through
    /// steps.
    LoadRamp(LoadRampSpec),
    /// Aperture's alerter: an alert while a signal is non-zero.
    Alerter(AlerterSpec),
}

/// `promql`: its value is the query's result (the sum when it returns
/// several series); missing when it returns nothing.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromqlSpec {
    /// The signal it writes: a name no other component of the circuit writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// A PromQL instant query; when it returns several series their values are
    /// summed.
    pub query: String,
    /// How often the query runs, rounded up to a whole number of ticks; in
    /// between, the signal keeps its last value. Default none: every tick.
    #[serde(default)]
    pub evaluation_interval: Option<DurationSpec>,
}

/// `ema`: alpha = 2 / (window / tick + 1). Missing input: it holds (missing
/// until its first value). While `freeze` is non-zero it holds too.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmaSpec {
    /// The signal it writes: a name no other component of the circuit writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// What it averages: a number or a signal.
    pub input: Operand,
    /// Its span: alpha = 2 / (window / tick + 1), the window rounded up to a
    /// whole number of ticks.
    pub window: DurationSpec,
    /// Holds its value while this is non-zero. Default none.
    #[serde(default)]
    pub freeze: Option<Operand>,
}

/// Operators of `arithmetic`.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ArithmeticOp {
    /// `lhs + rhs`
    Add,
    /// `lhs - rhs`
    Sub,
    /// `lhs * rhs`
    Mul,
    /// `lhs / rhs` (missing when `rhs` is 0)
    Div,
}

/// `arithmetic`: missing when an operand is.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArithmeticSpec {
    /// The signal it writes: a name no other component of the circuit writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// The operator: `add`, `sub`, `mul` or `div`.
    pub op: ArithmeticOp,
    /// Left operand: a number or a signal.
    pub lhs: Operand,
    /// Right operand: a number or a signal.
    pub rhs: Operand,
}

/// Comparisons of `decider` (and of the load schedulers' overload
/// conditions).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// `lhs > rhs`
    Gt,
    /// `lhs < rhs`
    Lt,
    /// `lhs >= rhs`
    Gte,
    /// `lhs <= rhs`
    Lte,
    /// `lhs == rhs`
    Eq,
    /// `lhs != rhs`
    Neq,
}

impl Comparison {
    /// Whether `lhs op rhs` holds.
    pub fn holds(self, lhs: f64, rhs: f64) -> bool {
        match self {
            Comparison::Gt => lhs > rhs,
            Comparison::Lt => lhs < rhs,
            Comparison::Gte => lhs >= rhs,
            Comparison::Lte => lhs <= rhs,
            Comparison::Eq => lhs == rhs,
            Comparison::Neq => lhs != rhs,
        }
    }

    /// How policies write it: `gt`...
    pub fn name(self) -> &'static str {
        match self {
            Comparison::Gt => "gt",
            Comparison::Lt => "lt",
            Comparison::Gte => "gte",
            Comparison::Lte => "lte",
            Comparison::Eq => "eq",
            Comparison::Neq => "neq",
        }
    }

    /// The operator's symbol: `>`...
    pub fn symbol(self) -> &'static str {
        match self {
            Comparison::Gt => ">",
            Comparison::Lt => "<",
            Comparison::Gte => ">=",
            Comparison::Lte => "<=",
            Comparison::Eq => "==",
            Comparison::Neq => "!=",
        }
    }
}

/// `decider`: 1 once `lhs op rhs` has held for `true_for`, 0 once it has
/// not held for `false_for` (0 at first). A missing operand counts as the
/// comparison not holding.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeciderSpec {
    /// The signal it writes: a name no other component of the circuit writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// The comparison: `gt` (lhs > rhs), `lt` (lhs < rhs), `gte` (>=), `lte`
    /// (<=), `eq` (==) or `neq` (!=).
    pub op: Comparison,
    /// Left operand: a number or a signal.
    pub lhs: Operand,
    /// Right operand: a number or a signal.
    pub rhs: Operand,
    /// How long the comparison must hold before the output switches to 1.
    /// Default `0s`.
    #[serde(default = "zero")]
    pub true_for: DurationSpec,
    /// How long it must fail before the output switches back to 0. Default
    /// `0s`.
    #[serde(default = "zero")]
    pub false_for: DurationSpec,
}

fn zero() -> DurationSpec {
    DurationSpec(std::time::Duration::ZERO)
}

/// `gradient_controller`: out = control_variable × clamp((signal /
/// setpoint)^slope, min_gradient, max_gradient). With a negative slope, a
/// signal above its setpoint scales the control variable down. Missing
/// when any input is, when the setpoint is not positive or when the signal
/// is negative.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GradientSpec {
    /// The signal it writes: a name no other component of the circuit writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// What is measured: a number or a signal.
    pub signal: Operand,
    /// Where the signal should be: a number or a signal (the output is missing
    /// unless it is above 0).
    pub setpoint: Operand,
    /// What is scaled: a number or a signal.
    pub control_variable: Operand,
    /// Sensitivity: the exponent of signal / setpoint. Negative: a signal above
    /// its setpoint scales the control variable down. Default `-1`.
    #[serde(default = "minus_one")]
    pub slope: f64,
    /// Smallest factor applied to the control variable. Default `0.1`.
    #[serde(default = "tenth")]
    pub min_gradient: f64,
    /// Largest factor applied to the control variable. Default `1`.
    #[serde(default = "one")]
    pub max_gradient: f64,
}

fn minus_one() -> f64 {
    -1.0
}
fn tenth() -> f64 {
    0.1
}
fn one() -> f64 {
    1.0
}

/// `integrator`: adds `input` every tick, within `[min, max]`; back to
/// `initial` while `reset` is non-zero. Missing input: it holds.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IntegratorSpec {
    /// The signal it writes: a name no other component of the circuit writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// What it adds every tick: a number or a signal.
    pub input: Operand,
    /// Back to `initial` while this is non-zero. Default none.
    #[serde(default)]
    pub reset: Option<Operand>,
    /// Its starting value, and its value while reset. Default `0`.
    #[serde(default)]
    pub initial: f64,
    /// Lower bound of the sum. Default none.
    #[serde(default)]
    pub min: Option<f64>,
    /// Upper bound of the sum. Default none.
    #[serde(default)]
    pub max: Option<f64>,
}

/// `switcher`: `on_true` while `switch` is non-zero, else `on_false`;
/// missing when the chosen operand (or the switch) is.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwitcherSpec {
    /// The signal it writes: a name no other component of the circuit writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// The condition: a number or a signal, true when non-zero.
    pub switch: Operand,
    /// Chosen while the switch is non-zero.
    pub on_true: Operand,
    /// Chosen while the switch is zero.
    pub on_false: Operand,
}

/// `min` / `max` over the present operands; missing when none is.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExtremumSpec {
    /// The signal it writes: a name no other component of the circuit writes.
    #[schemars(length(min = 1))]
    pub out: String,
    /// The operands: numbers or signals; missing ones are left out.
    pub inputs: Vec<Operand>,
}

/// `actuator`: sends its input(s) to one sidecar component of this policy.
/// Nothing is sent for a missing input; the sidecars' last decision lapses
/// at its `valid_until` and they return to the policy's own value.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActuatorSpec {
    /// A load scheduler of this policy: `input` is its load multiplier.
    #[serde(default)]
    pub load_scheduler: Option<Name>,
    /// A sampler of this policy: `input` is its accept percentage.
    #[serde(default)]
    pub sampler: Option<Name>,
    /// A concurrency limiter of this policy: `input` is its max concurrency.
    #[serde(default)]
    pub concurrency_limiter: Option<Name>,
    /// A rate limiter of this policy: `bucket_capacity` and/or `fill_amount`
    /// are sent (not `input`).
    #[serde(default)]
    pub rate_limiter: Option<Name>,
    /// A quota scheduler of this policy: `bucket_capacity` and/or
    /// `fill_amount` are sent (not `input`), as to a rate limiter.
    #[serde(default)]
    pub quota_scheduler: Option<Name>,
    /// A concurrency scheduler of this policy: `input` is its max
    /// concurrency.
    #[serde(default)]
    pub concurrency_scheduler: Option<Name>,
    /// The value sent to a load scheduler, sampler, concurrency limiter or
    /// concurrency scheduler.
    #[serde(default)]
    pub input: Option<Operand>,
    /// The bucket capacity sent to a rate limiter or quota scheduler.
    #[serde(default)]
    pub bucket_capacity: Option<Operand>,
    /// The fill amount sent to a rate limiter or quota scheduler.
    #[serde(default)]
    pub fill_amount: Option<Operand>,
}

/// Parameters of `load_scheduling.average_latency`.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
#[schemars(title = "load_scheduling.average_latency")]
pub struct AverageLatencyParameters {
    /// The flux meter of this policy measuring the service's latency.
    pub flux_meter: Name,
    /// The load scheduler of this policy protecting the service.
    pub load_scheduler: Name,
    /// Overload is when the recent average latency exceeds the long-term one
    /// times this (>= 1). Default `1.1`.
    #[serde(default = "tolerance")]
    #[schemars(range(min = 1.0))]
    pub latency_tolerance_multiplier: f64,
    /// The window of the recent average latency. Default `30s`.
    #[serde(default = "thirty_seconds")]
    pub signal_window: DurationSpec,
    /// The span of the long-term average (an EMA, frozen during overload).
    /// Default `30m`.
    #[serde(default = "thirty_minutes")]
    pub baseline_window: DurationSpec,
    /// How much the multiplier rises per tick when not overloaded (> 0), back
    /// to 1 (pass-through). Default `0.05`.
    #[serde(default = "recovery")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub recovery_step: f64,
    /// The gradient controller's slope. Default `-1`.
    #[serde(default = "minus_one")]
    pub slope: f64,
    /// The smallest multiplier the controller sets, 0 to 1. Default `0.05`.
    #[serde(default = "floor")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_load_multiplier: f64,
}

fn tolerance() -> f64 {
    1.1
}
fn thirty_seconds() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(30))
}
fn thirty_minutes() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(1800))
}
fn recovery() -> f64 {
    0.05
}
fn floor() -> f64 {
    0.05
}

/// Parameters of `load_scheduling.capacity`: admit what the service has
/// shown it can serve (see [`capacity`] for the loop).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
#[schemars(title = "load_scheduling.capacity")]
pub struct CapacityParameters {
    /// The flux meter of this policy measuring the service's latency.
    pub flux_meter: Name,
    /// The load scheduler of this policy protecting the service.
    pub load_scheduler: Name,
    /// The latency (ms) the service should keep to. Default none: the
    /// long-term average latency × `latency_tolerance_multiplier`, learned
    /// as `load_scheduling.average_latency` learns it.
    #[serde(default)]
    pub latency_setpoint_ms: Option<f64>,
    /// Without a setpoint: overload is latency above the long-term average
    /// × this (>= 1). Default `1.5`.
    #[serde(default = "one_and_a_half")]
    #[schemars(range(min = 1.0))]
    pub latency_tolerance_multiplier: f64,
    /// Without a setpoint: the span of the long-term average. Default `30m`.
    #[serde(default = "thirty_minutes")]
    pub baseline_window: DurationSpec,
    /// Which quantile of the flux meter is the latency signal, in (0, 1).
    /// The median drops as soon as a backlog has drained, where a mean
    /// stays high until the window has forgotten it. Default `0.5`.
    #[serde(default = "half")]
    pub latency_quantile: f64,
    /// The window of every rate and quantile: at least twice the sidecars'
    /// remote-write interval. Default `30s`.
    #[serde(default = "thirty_seconds")]
    pub signal_window: DurationSpec,
    /// The service is taking in more than it completes when the accepted
    /// rate is above the served rate × this (> 1). Default `1.25`.
    #[serde(default = "one_and_a_quarter")]
    pub piling_tolerance: f64,
    /// Piling up counts only while latency is above the setpoint × this
    /// (0 to 1): a service at its capacity has a queue, and a queue shows
    /// in latency; without it, an accepted rate ahead of the served one is
    /// the access logs' lag (at start, or at a few requests a second).
    /// Default `0.75`.
    #[serde(default = "three_quarters")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub piling_latency_ratio: f64,
    /// After a cut, the share of the measured capacity admitted at once,
    /// 0 to 1. Default `0.9`.
    #[serde(default = "nine_tenths")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub capacity_share: f64,
    /// Above `capacity_share` of its measured capacity, how much more than
    /// is accepted now the service is offered per tick (> 0): slowly, because a
    /// service that queues gives no warning before its cliff. Default
    /// `0.01`.
    #[serde(default = "hundredth")]
    pub capacity_probe: f64,
    /// The largest factor by which the admitted rate rises in one tick
    /// below the measured capacity (> 1). Default `1.2`.
    #[serde(default = "six_fifths")]
    pub max_gradient: f64,
    /// The smallest factor it is cut by in one tick, 0 to 1. Default `0.1`.
    #[serde(default = "tenth")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_gradient: f64,
    /// The smallest multiplier sent, 0 to 1. Default `0.05`.
    #[serde(default = "floor")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_load_multiplier: f64,
}

fn one_and_a_half() -> f64 {
    1.5
}
fn half() -> f64 {
    0.5
}
fn one_and_a_quarter() -> f64 {
    1.25
}
fn three_quarters() -> f64 {
    0.75
}
fn nine_tenths() -> f64 {
    0.9
}
fn hundredth() -> f64 {
    0.01
}
fn six_fifths() -> f64 {
    1.2
}

/// `load_scheduling.average_latency`.
pub const AVERAGE_LATENCY: &str = "load_scheduling.average_latency";
/// `load_scheduling.capacity`.
pub const CAPACITY: &str = "load_scheduling.capacity";

impl ComponentSpec {
    /// The signal it writes, its `out` (actuators and alerters write none).
    pub fn out(&self) -> Option<&str> {
        Some(match self {
            ComponentSpec::Promql(c) => &c.out,
            ComponentSpec::Ema(c) => &c.out,
            ComponentSpec::Arithmetic(c) => &c.out,
            ComponentSpec::Decider(c) => &c.out,
            ComponentSpec::GradientController(c) => &c.out,
            ComponentSpec::Integrator(c) => &c.out,
            ComponentSpec::Switcher(c) => &c.out,
            ComponentSpec::Min(c) | ComponentSpec::Max(c) => &c.out,
            ComponentSpec::AimdLoadScheduler(c) => &c.out,
            ComponentSpec::AiadLoadScheduler(c) => &c.out,
            ComponentSpec::RangeDrivenLoadScheduler(c) => &c.out,
            ComponentSpec::LoadRamp(c) => &c.out,
            ComponentSpec::Actuator(_) | ComponentSpec::Alerter(_) => return None,
        })
    }

    /// Every signal it writes: its `out`, then any other (a load
    /// scheduler's `out_is_overload`, a load ramp's `out_at_start` and
    /// `out_at_end`).
    pub fn outs(&self) -> Vec<&str> {
        let more = match self {
            ComponentSpec::AimdLoadScheduler(c) => [c.out_is_overload.as_deref(), None],
            ComponentSpec::AiadLoadScheduler(c) => [c.out_is_overload.as_deref(), None],
            ComponentSpec::RangeDrivenLoadScheduler(c) => [c.out_is_overload.as_deref(), None],
            ComponentSpec::LoadRamp(c) => [c.out_at_start.as_deref(), c.out_at_end.as_deref()],
            _ => [None, None],
        };
        self.out()
            .into_iter()
            .chain(more.into_iter().flatten())
            .collect()
    }

    /// The load scheduler it drives, when it is one of Aperture's load
    /// schedulers (actuators say what they drive themselves).
    pub fn drives(&self) -> Option<&Name> {
        match self {
            ComponentSpec::AimdLoadScheduler(c) => Some(&c.load_scheduler),
            ComponentSpec::AiadLoadScheduler(c) => Some(&c.load_scheduler),
            ComponentSpec::RangeDrivenLoadScheduler(c) => Some(&c.load_scheduler),
            _ => None,
        }
    }

    /// The operands it reads.
    pub fn inputs(&self) -> Vec<&Operand> {
        match self {
            ComponentSpec::Promql(_) => vec![],
            ComponentSpec::Ema(c) => [Some(&c.input), c.freeze.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            ComponentSpec::Arithmetic(c) => vec![&c.lhs, &c.rhs],
            ComponentSpec::Decider(c) => vec![&c.lhs, &c.rhs],
            ComponentSpec::GradientController(c) => {
                vec![&c.signal, &c.setpoint, &c.control_variable]
            }
            ComponentSpec::Integrator(c) => [Some(&c.input), c.reset.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            ComponentSpec::Switcher(c) => vec![&c.switch, &c.on_true, &c.on_false],
            ComponentSpec::Min(c) | ComponentSpec::Max(c) => c.inputs.iter().collect(),
            ComponentSpec::Actuator(a) => [
                a.input.as_ref(),
                a.bucket_capacity.as_ref(),
                a.fill_amount.as_ref(),
            ]
            .into_iter()
            .flatten()
            .collect(),
            ComponentSpec::AimdLoadScheduler(c) => [
                Some(&c.signal),
                Some(&c.setpoint),
                c.overload_confirmation.as_ref(),
                Some(&c.observed_load_multiplier),
            ]
            .into_iter()
            .flatten()
            .collect(),
            ComponentSpec::AiadLoadScheduler(c) => [
                Some(&c.signal),
                Some(&c.setpoint),
                c.overload_confirmation.as_ref(),
            ]
            .into_iter()
            .flatten()
            .collect(),
            ComponentSpec::RangeDrivenLoadScheduler(c) => {
                [Some(&c.signal), c.overload_confirmation.as_ref()]
                    .into_iter()
                    .flatten()
                    .collect()
            }
            ComponentSpec::LoadRamp(c) => [Some(&c.forward), c.backward.as_ref(), c.reset.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            ComponentSpec::Alerter(c) => vec![&c.signal],
        }
    }

    /// Its parameters' ranges, for the components that have rules beyond
    /// their types.
    fn check(&self) -> Result<(), String> {
        match self {
            ComponentSpec::Promql(p) if p.query.trim().is_empty() => Err("empty query".to_owned()),
            ComponentSpec::AimdLoadScheduler(c) => {
                c.check().map_err(|e| format!("aimd_load_scheduler: {e}"))
            }
            ComponentSpec::AiadLoadScheduler(c) => {
                c.check().map_err(|e| format!("aiad_load_scheduler: {e}"))
            }
            ComponentSpec::RangeDrivenLoadScheduler(c) => c
                .check()
                .map_err(|e| format!("range_driven_load_scheduler: {e}")),
            ComponentSpec::LoadRamp(c) => c.check().map_err(|e| format!("load_ramp: {e}")),
            ComponentSpec::Alerter(c) => c.check().map_err(|e| format!("alerter: {e}")),
            _ => Ok(()),
        }
    }
}

fn signal(name: &str) -> Operand {
    Operand::Signal(name.to_owned())
}

fn seconds(d: &DurationSpec) -> String {
    format!("{}s", d.0.as_secs().max(1))
}

/// The blueprints `circuit.blueprint` may name.
pub const BLUEPRINTS: [&str; 5] = [
    AVERAGE_LATENCY,
    load_scheduling::AIMD,
    load_scheduling::PROMQL,
    CAPACITY,
    load_ramping::BASE,
];

/// `parameters` read as a blueprint's type `P`: an unknown or missing field
/// is an error naming the field (and [`CircuitSpec::expand`] the
/// blueprint).
fn parameters<P: DeserializeOwned>(value: &serde_json::Value) -> Result<P, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let e = e.into_inner();
        match path.as_str() {
            "." => format!("parameters: {e}"),
            path => format!("parameters.{path}: {e}"),
        }
    })
}

impl CircuitSpec {
    /// The components to run: the blueprint's, then `components`.
    ///
    /// A blueprint is a function from its parameters (a type deriving
    /// `Deserialize` with `deny_unknown_fields`, and `JsonSchema`: add it to
    /// `BlueprintParameters` too) to components; adding one is a name in
    /// [`BLUEPRINTS`] and an arm here.
    pub fn expand(&self, policy: &str) -> Result<Vec<ComponentSpec>, String> {
        let mut out = match (&self.blueprint, &self.parameters) {
            (None, None) => Vec::new(),
            (None, Some(_)) => return Err("`parameters` without a `blueprint`".to_owned()),
            (Some(b), None) => return Err(format!("blueprint {b:?} needs `parameters`")),
            (Some(b), Some(p)) => match b.as_str() {
                AVERAGE_LATENCY => parameters(p).and_then(|p| average_latency(policy, &p)),
                load_scheduling::AIMD => {
                    parameters(p).and_then(|p| load_scheduling::aimd(policy, &p))
                }
                CAPACITY => parameters(p).and_then(|p| capacity(policy, &p)),
                load_scheduling::PROMQL => {
                    parameters(p).and_then(|p| load_scheduling::promql_blueprint(policy, &p))
                }
                load_ramping::BASE => parameters(p).and_then(|p| load_ramping::base(policy, &p)),
                _ => {
                    return Err(format!(
                        "unknown blueprint {b:?} (known: {})",
                        BLUEPRINTS.join(", ")
                    ));
                }
            }
            .map_err(|e| format!("blueprint {b}: {e}"))?,
        };
        out.extend(self.components.iter().cloned());
        Ok(out)
    }
}

/// The PromQL selector of a flux meter's served flows
/// (`decision_type="accepted", flow_status="OK"`: the latency of requests
/// the service actually served), as every blueprint queries it.
pub(super) fn served_flows(policy: &str, flux_meter: &Name) -> String {
    format!(
        r#"flux_meter_name="{flux_meter}",policy_name="{policy}",decision_type="accepted",flow_status="OK""#
    )
}

/// The PromQL selector of a load scheduler's token counters.
pub(super) fn scheduler_tokens(policy: &str, load_scheduler: &Name) -> String {
    format!(r#"policy_name="{policy}",component="{load_scheduler}""#)
}

/// A PromQL component run every tick.
pub(super) fn promql(out: &str, query: String) -> ComponentSpec {
    ComponentSpec::Promql(PromqlSpec {
        out: out.to_owned(),
        query,
        evaluation_interval: None,
    })
}

/// A PromQL component run every `every`.
pub(super) fn promql_every(out: &str, query: String, every: std::time::Duration) -> ComponentSpec {
    ComponentSpec::Promql(PromqlSpec {
        out: out.to_owned(),
        query,
        evaluation_interval: Some(DurationSpec(every)),
    })
}

/// `load_scheduling.average_latency`: protect a service by its average
/// latency. Overloaded when the recent average (over `signal_window`) is
/// above the long-term one (an EMA frozen during overload) × tolerance;
/// then the load multiplier follows a gradient controller on the observed
/// multiplier (accepted ÷ incoming tokens), otherwise it rises by
/// `recovery_step` per tick back to 1 (pass-through).
fn average_latency(
    policy: &str,
    p: &AverageLatencyParameters,
) -> Result<Vec<ComponentSpec>, String> {
    if !(p.latency_tolerance_multiplier.is_finite() && p.latency_tolerance_multiplier >= 1.0) {
        return Err("latency_tolerance_multiplier must be a number >= 1".to_owned());
    }
    if !(p.recovery_step.is_finite() && p.recovery_step > 0.0) {
        return Err("recovery_step must be a number > 0".to_owned());
    }
    if !(p.min_load_multiplier.is_finite() && (0.0..=1.0).contains(&p.min_load_multiplier)) {
        return Err("min_load_multiplier must be between 0 and 1".to_owned());
    }
    let (flows, tokens) = (
        served_flows(policy, &p.flux_meter),
        scheduler_tokens(policy, &p.load_scheduler),
    );
    let w = seconds(&p.signal_window);
    Ok(vec![
        promql(
            "latency",
            format!(
                "sum(increase(flux_meter_sum{{{flows}}}[{w}])) / sum(increase(flux_meter_count{{{flows}}}[{w}]))"
            ),
        ),
        promql(
            "observed_load_multiplier",
            format!(
                "sum(increase(accepted_tokens_total{{{tokens}}}[{w}])) / sum(increase(incoming_tokens_total{{{tokens}}}[{w}]))"
            ),
        ),
        // Overload is judged against the setpoint of the previous tick, so
        // that the baseline can freeze before it sees an overloaded sample.
        ComponentSpec::Decider(DeciderSpec {
            out: "overloaded".to_owned(),
            op: Comparison::Gt,
            lhs: signal("latency"),
            rhs: signal("setpoint"),
            true_for: zero(),
            false_for: zero(),
        }),
        ComponentSpec::Ema(EmaSpec {
            out: "baseline_latency".to_owned(),
            input: signal("latency"),
            window: p.baseline_window,
            freeze: Some(signal("overloaded")),
        }),
        ComponentSpec::Arithmetic(ArithmeticSpec {
            out: "setpoint".to_owned(),
            op: ArithmeticOp::Mul,
            lhs: signal("baseline_latency"),
            rhs: Operand::Constant(p.latency_tolerance_multiplier),
        }),
        ComponentSpec::GradientController(GradientSpec {
            out: "desired_load_multiplier".to_owned(),
            signal: signal("latency"),
            setpoint: signal("setpoint"),
            control_variable: signal("observed_load_multiplier"),
            slope: p.slope,
            min_gradient: 0.1,
            max_gradient: 1.0,
        }),
        // Never raise the multiplier while overloaded: the observed
        // multiplier is a ratio of two windowed rates, and right after a
        // load change it can read high (even above 1). `load_multiplier`
        // is last tick's value here, missing on the first tick.
        ComponentSpec::Min(ExtremumSpec {
            out: "capped_load_multiplier".to_owned(),
            inputs: vec![signal("desired_load_multiplier"), signal("load_multiplier")],
        }),
        ComponentSpec::Max(ExtremumSpec {
            out: "throttled_load_multiplier".to_owned(),
            inputs: vec![
                signal("capped_load_multiplier"),
                Operand::Constant(p.min_load_multiplier),
            ],
        }),
        ComponentSpec::Arithmetic(ArithmeticSpec {
            out: "recovering_load_multiplier".to_owned(),
            op: ArithmeticOp::Add,
            lhs: signal("load_multiplier"),
            rhs: Operand::Constant(p.recovery_step),
        }),
        ComponentSpec::Min(ExtremumSpec {
            out: "recovered_load_multiplier".to_owned(),
            inputs: vec![signal("recovering_load_multiplier"), Operand::Constant(1.0)],
        }),
        ComponentSpec::Switcher(SwitcherSpec {
            out: "load_multiplier".to_owned(),
            switch: signal("overloaded"),
            on_true: signal("throttled_load_multiplier"),
            on_false: signal("recovered_load_multiplier"),
        }),
        ComponentSpec::Actuator(ActuatorSpec {
            load_scheduler: Some(p.load_scheduler.clone()),
            sampler: None,
            concurrency_limiter: None,
            rate_limiter: None,
            quota_scheduler: None,
            concurrency_scheduler: None,
            input: Some(signal("load_multiplier")),
            bucket_capacity: None,
            fill_amount: None,
        }),
    ])
}

/// `load_scheduling.capacity`: admit what the service has shown it can
/// serve, and find out how much that is from its own answers.
///
/// Each tick it reads, over `signal_window`: the latency (a quantile of the
/// flux meter), the served rate (requests the flux meter saw answered OK),
/// and the load scheduler's accepted and incoming rates. Then:
///
/// - **piling up**: the accepted rate is above the served rate ×
///   `piling_tolerance` while latency is above `piling_latency_ratio` ×
///   the setpoint: the service takes in more than it completes and has a
///   queue, so it is at capacity, and what it serves now *is* its capacity
///   (an EMA of it over `signal_window` is kept while it piles up, and
///   held between). This sees a service that queues (whose latency stays
///   flat until its workers are all busy, then climbs by a whole queue a
///   second) before its latency reaches the setpoint. Without the latency
///   condition, the access logs' lag behind the Checks looks like piling
///   up whenever the rates are young or small.
/// - **overloaded** (latency above the setpoint) or piling up: the
///   admitted rate is cut to the served rate × (setpoint ÷ latency),
///   clamped to [`min_gradient`, `max_gradient`], and no higher than 0.9 ×
///   the served rate while piling up: a backlog drains, not just stops
///   growing.
/// - **otherwise** it rises to the served rate × (setpoint ÷ latency) up
///   to `max_gradient` a tick, but no further than `capacity_share` × the
///   measured capacity (when one was measured), then by `capacity_probe`
///   of what is accepted a tick (a service that got faster is found, one at
///   its cliff is approached slowly); and never lower than `capacity_share`
///   × the measured capacity, so that a cut ends as soon as latency is
///   back, not after a slow climb. The probe is on the accepted rate, like
///   the incoming rate the multiplier divides it by: calm never cuts below
///   what is admitted now, whatever other components turn away before the
///   scheduler or the access logs' lag does to the served rate.
///
/// The multiplier sent is that rate ÷ the incoming rate, within
/// [`min_load_multiplier`, 1]: once demand falls below what the service
/// serves, it is 1 (pass-through) at once, whatever it was. Without the
/// data for it nothing is sent: the sidecars hold the last decision until
/// its `valid_until`, then pass everything.
///
/// Working from rates rather than from the last multiplier is what keeps
/// it from the swings of `load_scheduling.average_latency`: a multiplier
/// computed from a lagging latency compounds its own lag (each tick cuts
/// again what the last already cut), a rate computed from what the service
/// served does not.
fn capacity(policy: &str, p: &CapacityParameters) -> Result<Vec<ComponentSpec>, String> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let share = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
    if p.latency_setpoint_ms.is_some_and(|s| !positive(s)) {
        return Err("latency_setpoint_ms must be a number > 0".to_owned());
    }
    if !(p.latency_tolerance_multiplier.is_finite() && p.latency_tolerance_multiplier >= 1.0) {
        return Err("latency_tolerance_multiplier must be a number >= 1".to_owned());
    }
    if !(positive(p.latency_quantile) && p.latency_quantile < 1.0) {
        return Err("latency_quantile must be between 0 and 1".to_owned());
    }
    if !(p.piling_tolerance.is_finite() && p.piling_tolerance > 1.0) {
        return Err("piling_tolerance must be a number > 1".to_owned());
    }
    if !(p.max_gradient.is_finite() && p.max_gradient > 1.0) {
        return Err("max_gradient must be a number > 1".to_owned());
    }
    if !positive(p.capacity_probe) {
        return Err("capacity_probe must be a number > 0".to_owned());
    }
    for (name, v) in [
        ("capacity_share", p.capacity_share),
        ("piling_latency_ratio", p.piling_latency_ratio),
        ("min_gradient", p.min_gradient),
        ("min_load_multiplier", p.min_load_multiplier),
    ] {
        if !share(v) {
            return Err(format!("{name} must be between 0 and 1"));
        }
    }
    let (flows, tokens) = (
        served_flows(policy, &p.flux_meter),
        scheduler_tokens(policy, &p.load_scheduler),
    );
    let w = seconds(&p.signal_window);
    let arithmetic = |out: &str, op, lhs: Operand, rhs: Operand| {
        ComponentSpec::Arithmetic(ArithmeticSpec {
            out: out.to_owned(),
            op,
            lhs,
            rhs,
        })
    };
    let extremum = |max: bool, out: &str, inputs: Vec<Operand>| {
        let spec = ExtremumSpec {
            out: out.to_owned(),
            inputs,
        };
        if max {
            ComponentSpec::Max(spec)
        } else {
            ComponentSpec::Min(spec)
        }
    };
    let switcher = |out: &str, switch: &str, on_true: &str, on_false: &str| {
        ComponentSpec::Switcher(SwitcherSpec {
            out: out.to_owned(),
            switch: signal(switch),
            on_true: signal(on_true),
            on_false: signal(on_false),
        })
    };
    let decider = |out: &str, lhs: &str, rhs: &str| {
        ComponentSpec::Decider(DeciderSpec {
            out: out.to_owned(),
            op: Comparison::Gt,
            lhs: signal(lhs),
            rhs: signal(rhs),
            true_for: zero(),
            false_for: zero(),
        })
    };
    let c = Operand::Constant;
    let mut out = vec![
        promql(
            "latency",
            format!(
                "histogram_quantile({}, sum by (le) (rate(flux_meter_bucket{{{flows}}}[{w}])))",
                p.latency_quantile
            ),
        ),
        promql(
            "served_rate",
            format!("sum(rate(flux_meter_count{{{flows}}}[{w}]))"),
        ),
        promql(
            "accepted_rate",
            format!("sum(rate(accepted_tokens_total{{{tokens}}}[{w}]))"),
        ),
        promql(
            "incoming_rate",
            format!("sum(rate(incoming_tokens_total{{{tokens}}}[{w}]))"),
        ),
    ];
    match p.latency_setpoint_ms {
        Some(ms) => out.push(arithmetic("setpoint", ArithmeticOp::Mul, c(ms), c(1.0))),
        // As `load_scheduling.average_latency` learns it: the long-term
        // average, frozen while overloaded (judged against the previous
        // tick's setpoint, so it freezes before it sees an overloaded
        // sample), times the tolerance.
        None => out.extend([
            decider("overloaded", "latency", "setpoint"),
            ComponentSpec::Ema(EmaSpec {
                out: "baseline_latency".to_owned(),
                input: signal("latency"),
                window: p.baseline_window,
                freeze: Some(signal("overloaded")),
            }),
            arithmetic(
                "setpoint",
                ArithmeticOp::Mul,
                signal("baseline_latency"),
                c(p.latency_tolerance_multiplier),
            ),
        ]),
    }
    if p.latency_setpoint_ms.is_some() {
        out.push(decider("overloaded", "latency", "setpoint"));
    }
    out.extend([
        arithmetic(
            "piling_threshold",
            ArithmeticOp::Mul,
            signal("served_rate"),
            c(p.piling_tolerance),
        ),
        decider("taking_more", "accepted_rate", "piling_threshold"),
        arithmetic(
            "queueing_latency",
            ArithmeticOp::Mul,
            signal("setpoint"),
            c(p.piling_latency_ratio),
        ),
        decider("queueing", "latency", "queueing_latency"),
        extremum(
            false,
            "piling_up",
            vec![signal("taking_more"), signal("queueing")],
        ),
        // Missing unless piling up (a division by zero is missing), so the
        // EMA holds the capacity measured the last time the service was
        // at it.
        arithmetic(
            "saturated_rate",
            ArithmeticOp::Div,
            signal("served_rate"),
            signal("piling_up"),
        ),
        ComponentSpec::Ema(EmaSpec {
            out: "capacity".to_owned(),
            input: signal("saturated_rate"),
            window: p.signal_window,
            freeze: None,
        }),
        ComponentSpec::GradientController(GradientSpec {
            out: "gradient_rate".to_owned(),
            signal: signal("latency"),
            setpoint: signal("setpoint"),
            control_variable: signal("served_rate"),
            slope: -1.0,
            min_gradient: p.min_gradient,
            max_gradient: p.max_gradient,
        }),
        arithmetic(
            "draining_rate",
            ArithmeticOp::Mul,
            signal("served_rate"),
            c(0.9),
        ),
        extremum(
            false,
            "piling_rate",
            vec![signal("gradient_rate"), signal("draining_rate")],
        ),
        switcher("cut_rate", "piling_up", "piling_rate", "gradient_rate"),
        arithmetic(
            "capacity_floor",
            ArithmeticOp::Mul,
            signal("capacity"),
            c(p.capacity_share),
        ),
        extremum(
            false,
            "rising_rate",
            vec![signal("gradient_rate"), signal("capacity_floor")],
        ),
        arithmetic(
            "probing_rate",
            ArithmeticOp::Mul,
            signal("accepted_rate"),
            c(1.0 + p.capacity_probe),
        ),
        extremum(
            true,
            "calm_rate",
            vec![
                signal("rising_rate"),
                signal("probing_rate"),
                signal("capacity_floor"),
            ],
        ),
        extremum(
            true,
            "cutting",
            vec![signal("overloaded"), signal("piling_up")],
        ),
        switcher("admitted_rate", "cutting", "cut_rate", "calm_rate"),
        arithmetic(
            "desired_load_multiplier",
            ArithmeticOp::Div,
            signal("admitted_rate"),
            signal("incoming_rate"),
        ),
        extremum(
            false,
            "capped_load_multiplier",
            vec![signal("desired_load_multiplier"), c(1.0)],
        ),
        extremum(
            true,
            "bounded_load_multiplier",
            vec![signal("capped_load_multiplier"), c(p.min_load_multiplier)],
        ),
        // Missing whenever the desired multiplier is (a switcher whose
        // switch is missing is): without data nothing is sent, and the
        // sidecars hold the last decision until it lapses, rather than
        // pass everything for a tick because one query came back empty.
        switcher(
            "load_multiplier",
            "desired_load_multiplier",
            "bounded_load_multiplier",
            "bounded_load_multiplier",
        ),
        ComponentSpec::Actuator(ActuatorSpec {
            load_scheduler: Some(p.load_scheduler.clone()),
            input: Some(signal("load_multiplier")),
            ..ActuatorSpec::default()
        }),
    ]);
    Ok(out)
}

/// Checks an expanded circuit against its policy: every signal written
/// once, every signal read is written somewhere, every actuator names one
/// component of this policy of the right kind with the right inputs.
pub fn validate(components: &[ComponentSpec], policy: &super::Policy) -> Result<(), String> {
    let mut outs: Vec<&str> = Vec::new();
    for (i, c) in components.iter().enumerate() {
        for out in c.outs() {
            if out.is_empty() {
                return Err(format!("components[{i}]: `out` must not be empty"));
            }
            if outs.contains(&out) {
                return Err(format!("components[{i}]: signal {out:?} is written twice"));
            }
            outs.push(out);
        }
    }
    for (i, c) in components.iter().enumerate() {
        for input in c.inputs() {
            match input {
                Operand::Signal(s) if !outs.contains(&s.as_str()) => {
                    return Err(format!("components[{i}]: no component writes signal {s:?}"));
                }
                Operand::Constant(n) if !n.is_finite() => {
                    return Err(format!("components[{i}]: constants must be finite"));
                }
                _ => {}
            }
        }
        c.check().map_err(|e| format!("components[{i}]: {e}"))?;
        if let Some(ls) = c.drives() {
            if !policy.load_schedulers.iter().any(|l| &l.name.value == ls) {
                return Err(format!(
                    "components[{i}]: no load scheduler {:?} in this policy",
                    ls.0
                ));
            }
            // Two multipliers for one scheduler would take turns.
            let driving = |o: &ComponentSpec| match o {
                ComponentSpec::Actuator(a) => a.load_scheduler.as_ref() == Some(ls),
                o => o.drives() == Some(ls),
            };
            if let Some(j) = (0..components.len()).find(|&j| j != i && driving(&components[j])) {
                return Err(format!(
                    "components[{i}]: load scheduler {:?} is driven by components[{j}] too",
                    ls.0
                ));
            }
        }
        if let ComponentSpec::Actuator(a) = c {
            validate_actuator(a, policy).map_err(|e| format!("components[{i}]: {e}"))?;
        }
        if let ComponentSpec::LoadRamp(r) = c {
            validate_load_ramp(components, i, r, policy)?;
        }
        if let ComponentSpec::Alerter(a) = c
            && let Some(j) = (0..i)
                .find(|&j| matches!(&components[j], ComponentSpec::Alerter(b) if b.same_alert(a)))
        {
            return Err(format!(
                "components[{i}]: alert {:?} (severity {}) with these labels is raised by components[{j}] too: give one another name or labels",
                a.alert_name,
                a.severity.name()
            ));
        }
    }
    Ok(())
}

/// A load ramp's sampler is one of the policy's, driven by nothing else:
/// two percentages for one sampler would take turns.
fn validate_load_ramp(
    components: &[ComponentSpec],
    i: usize,
    r: &LoadRampSpec,
    policy: &super::Policy,
) -> Result<(), String> {
    let sampler = &r.sampler;
    if !policy.samplers.iter().any(|s| &s.name.value == sampler) {
        return Err(format!(
            "components[{i}]: no sampler {:?} in this policy",
            sampler.0
        ));
    }
    let driving = |o: &ComponentSpec| match o {
        ComponentSpec::Actuator(a) => a.sampler.as_ref() == Some(sampler),
        ComponentSpec::LoadRamp(o) => &o.sampler == sampler,
        _ => false,
    };
    match (0..components.len()).find(|&j| j != i && driving(&components[j])) {
        Some(j) => Err(format!(
            "components[{i}]: sampler {:?} is driven by components[{j}] too",
            sampler.0
        )),
        None => Ok(()),
    }
}

fn validate_actuator(a: &ActuatorSpec, policy: &super::Policy) -> Result<(), String> {
    /// One kind of component an actuator can drive.
    struct Kind<'a> {
        /// The actuator's field naming it.
        field: &'static str,
        /// What errors call it.
        kind: &'static str,
        /// The component this actuator names, if of this kind.
        named: Option<&'a Name>,
        /// Takes `bucket_capacity` and/or `fill_amount`, not `input`.
        bucket: bool,
        /// The policy's components of this kind.
        exist: Vec<&'a Name>,
    }
    let kinds = [
        Kind {
            field: "load_scheduler",
            kind: "load scheduler",
            named: a.load_scheduler.as_ref(),
            bucket: false,
            exist: policy
                .load_schedulers
                .iter()
                .map(|x| &x.name.value)
                .collect(),
        },
        Kind {
            field: "sampler",
            kind: "sampler",
            named: a.sampler.as_ref(),
            bucket: false,
            exist: policy.samplers.iter().map(|x| &x.name.value).collect(),
        },
        Kind {
            field: "concurrency_limiter",
            kind: "concurrency limiter",
            named: a.concurrency_limiter.as_ref(),
            bucket: false,
            exist: policy
                .concurrency_limiters
                .iter()
                .map(|x| &x.name.value)
                .collect(),
        },
        Kind {
            field: "rate_limiter",
            kind: "rate limiter",
            named: a.rate_limiter.as_ref(),
            bucket: true,
            exist: policy.rate_limiters.iter().map(|x| &x.name.value).collect(),
        },
        Kind {
            field: "quota_scheduler",
            kind: "quota scheduler",
            named: a.quota_scheduler.as_ref(),
            bucket: true,
            exist: policy
                .quota_schedulers
                .iter()
                .map(|x| &x.name.value)
                .collect(),
        },
        Kind {
            field: "concurrency_scheduler",
            kind: "concurrency scheduler",
            named: a.concurrency_scheduler.as_ref(),
            bucket: false,
            exist: policy
                .concurrency_schedulers
                .iter()
                .map(|x| &x.name.value)
                .collect(),
        },
    ];
    let mut targets = kinds.iter().filter(|k| k.named.is_some());
    let (Some(target), None) = (targets.next(), targets.next()) else {
        let fields: Vec<&str> = kinds.iter().map(|k| k.field).collect();
        return Err(format!(
            "an actuator names exactly one of {}",
            fields.join(", ")
        ));
    };
    if target.bucket {
        if a.input.is_some() || (a.bucket_capacity.is_none() && a.fill_amount.is_none()) {
            return Err(format!(
                "a {} actuator takes bucket_capacity and/or fill_amount, not input",
                target.field
            ));
        }
    } else if a.input.is_none() || a.bucket_capacity.is_some() || a.fill_amount.is_some() {
        return Err(
            "this actuator takes `input` (bucket_capacity and fill_amount are for rate limiters and quota schedulers)"
                .to_owned(),
        );
    }
    match target.named {
        Some(name) if !target.exist.contains(&name) => {
            Err(format!("no {} {:?} in this policy", target.kind, name.0))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::load::parse_policy;

    /// A policy with one component of every kind an actuator can drive
    /// (and a concurrency limiter and rate limiter named like nothing
    /// else, to catch a target looked up among the wrong kind).
    const COMPONENTS: &str = r#"
name: p
rate_limiters:
  - {name: rl, selectors: [{control_point: ingress}], bucket_capacity: 1, fill_amount: 1, interval: 1s}
concurrency_limiters:
  - {name: cl, selectors: [{control_point: ingress}], max_concurrency: 1}
quota_schedulers:
  - {name: quota, selectors: [{control_point: ingress}], bucket_capacity: 10, fill_amount: 10, interval: 1s}
concurrency_schedulers:
  - {name: slots, selectors: [{control_point: ingress}], max_concurrency: 4}
circuit:
  components:
    - promql: {out: x, query: q}
"#;

    /// Loads [`COMPONENTS`] with `actuator` as the circuit's second
    /// component; the error's message if it is refused (by the circuit's
    /// validation: the error is the `circuit` field's).
    fn actuator(actuator: &str) -> Result<(), String> {
        let text = format!("{COMPONENTS}    - actuator: {actuator}\n");
        parse_policy(Path::new("p.yaml"), &text)
            .map(drop)
            .map_err(|e| {
                assert_eq!(e.field, "circuit", "{e}");
                e.message
            })
    }

    #[test]
    fn a_quota_scheduler_takes_a_bucket_capacity_and_or_a_fill_amount() {
        for ok in [
            "{quota_scheduler: quota, fill_amount: x}",
            "{quota_scheduler: quota, bucket_capacity: 5}",
            "{quota_scheduler: quota, bucket_capacity: x, fill_amount: 1}",
        ] {
            assert_eq!(actuator(ok), Ok(()), "{ok}");
        }
        let not_input = "components[1]: a quota_scheduler actuator takes bucket_capacity and/or fill_amount, not input";
        for wrong in [
            "{quota_scheduler: quota, input: x}",
            "{quota_scheduler: quota, input: x, fill_amount: 1}",
            "{quota_scheduler: quota}",
        ] {
            assert_eq!(actuator(wrong), Err(not_input.to_owned()), "{wrong}");
        }
        // A rate limiter is not a quota scheduler, however alike.
        for name in ["nope", "rl"] {
            assert_eq!(
                actuator(&format!("{{quota_scheduler: {name}, fill_amount: 1}}")),
                Err(format!(
                    "components[1]: no quota scheduler {name:?} in this policy"
                ))
            );
        }
    }

    #[test]
    fn a_concurrency_scheduler_takes_an_input() {
        assert_eq!(actuator("{concurrency_scheduler: slots, input: x}"), Ok(()));
        assert_eq!(actuator("{concurrency_scheduler: slots, input: 2}"), Ok(()));
        let input_only = "components[1]: this actuator takes `input` (bucket_capacity and fill_amount are for rate limiters and quota schedulers)";
        for wrong in [
            "{concurrency_scheduler: slots, fill_amount: x}",
            "{concurrency_scheduler: slots, input: x, bucket_capacity: 1}",
            "{concurrency_scheduler: slots}",
        ] {
            assert_eq!(actuator(wrong), Err(input_only.to_owned()), "{wrong}");
        }
        // A concurrency limiter is not a concurrency scheduler.
        for name in ["nope", "cl"] {
            assert_eq!(
                actuator(&format!("{{concurrency_scheduler: {name}, input: 1}}")),
                Err(format!(
                    "components[1]: no concurrency scheduler {name:?} in this policy"
                ))
            );
        }
        // Nor the other way round.
        assert_eq!(
            actuator("{concurrency_limiter: slots, input: 1}"),
            Err(r#"components[1]: no concurrency limiter "slots" in this policy"#.to_owned())
        );
    }

    #[test]
    fn an_actuator_names_exactly_one_target() {
        let one = "components[1]: an actuator names exactly one of load_scheduler, sampler, concurrency_limiter, rate_limiter, quota_scheduler, concurrency_scheduler";
        for wrong in [
            "{input: 1}",
            "{quota_scheduler: quota, concurrency_scheduler: slots, input: 1}",
            "{quota_scheduler: quota, rate_limiter: rl, fill_amount: 1}",
            "{concurrency_scheduler: slots, concurrency_limiter: cl, input: 1}",
        ] {
            assert_eq!(actuator(wrong), Err(one.to_owned()), "{wrong}");
        }
    }

    #[test]
    fn a_limits_own_field_name_is_not_an_actuator_field() {
        // `max_concurrency` is the scheduler's field, not the actuator's:
        // refused by name, where it is written.
        let text = format!(
            "{COMPONENTS}    - actuator: {{concurrency_scheduler: slots, max_concurrency: 1}}\n"
        );
        let e = parse_policy(Path::new("p.yaml"), &text).expect_err("refused");
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(e.field.ends_with("max_concurrency"), "{e}");
    }

    /// A policy with a flux meter and a load scheduler, and the capacity
    /// blueprint with `parameters`; the error's message if refused.
    fn capacity(parameters: &str) -> Result<usize, String> {
        let text = format!(
            "name: p\nflux_meters: [{{name: latency, selectors: [{{control_point: ingress}}]}}]\nload_schedulers: [{{name: ls, selectors: [{{control_point: ingress}}]}}]\ncircuit:\n  blueprint: load_scheduling.capacity\n  parameters: {parameters}\n"
        );
        let policy = parse_policy(Path::new("p.yaml"), &text).map_err(|e| e.message)?;
        let circuit = policy.circuit.expect("a circuit");
        Ok(circuit.value.expand("p").expect("validated").len())
    }

    #[test]
    fn the_capacity_blueprint_learns_its_setpoint_unless_given_one() {
        let learned = capacity("{flux_meter: latency, load_scheduler: ls}").expect("valid");
        let given = capacity("{flux_meter: latency, load_scheduler: ls, latency_setpoint_ms: 30}")
            .expect("valid");
        // The learned setpoint takes a baseline EMA and a product more.
        assert_eq!(learned, given + 1);
        for (bad, why) in [
            (
                "latency_setpoint_ms: 0",
                "latency_setpoint_ms must be a number > 0",
            ),
            (
                "latency_quantile: 1",
                "latency_quantile must be between 0 and 1",
            ),
            (
                "piling_tolerance: 1",
                "piling_tolerance must be a number > 1",
            ),
            (
                "capacity_share: 1.5",
                "capacity_share must be between 0 and 1",
            ),
            ("max_gradient: 0.9", "max_gradient must be a number > 1"),
            ("capacity_probe: 0", "capacity_probe must be a number > 0"),
        ] {
            let err = capacity(&format!(
                "{{flux_meter: latency, load_scheduler: ls, {bad}}}"
            ))
            .expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
        // Another blueprint's field is not this one's.
        let err = capacity("{flux_meter: latency, load_scheduler: ls, recovery_step: 0.1}")
            .expect_err("unknown field");
        assert!(
            err.contains("load_scheduling.capacity") && err.contains("recovery_step"),
            "{err}"
        );
        let err =
            capacity("{flux_meter: latency, load_scheduler: nope}").expect_err("no such scheduler");
        assert!(err.contains("no load scheduler"), "{err}");
    }
}
