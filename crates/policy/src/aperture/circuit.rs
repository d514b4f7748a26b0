//! Aperture's circuit, component by component: the signal processors
//! Sluice's circuit has (PromQL, arithmetic, deciders, switchers, min and
//! max, logic on 0/1 signals, gradient controllers, alerters), constants
//! from `variable`s, the flow-control components (into the policy's
//! component lists, with an actuator where a signal drives one), and the
//! AIMD and AIAD load schedulers (a load scheduler in `load_schedulers`,
//! the component driving it, the PromQL of its observed load multiplier
//! and its embedded alerter).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::flow::{self, Ctx, Port, port};
use super::input::{Cx, Obj, Skip, index, text};
use super::output::{Node, flow_map, map};
use super::{Draft, Item};
use crate::types::Name;

/// The interval of the blueprints' and components' PromQL queries when not
/// given: Aperture's `PromQL.evaluation_interval` default (Sluice's default
/// is every tick).
const PROMQL_DEFAULT_INTERVAL: &str = "10s";

/// The kind of a component: its one key.
fn kind_of(v: &Value) -> Option<String> {
    let keys: Vec<&String> = v.as_object()?.keys().collect();
    let [key] = keys[..] else {
        return None;
    };
    Some(key.clone())
}

/// What the circuit knows before converting its components: constants
/// (`variable`, `bool_variable`) and which signals are 0/1 and never
/// missing.
struct Signals {
    /// Signals written by `variable` and `bool_variable`: read as these
    /// numbers.
    constants: HashMap<String, f64>,
    /// Signals that are 0 or 1 and never missing, on which `and`, `or`
    /// and `inverter` have Sluice equivalents.
    booleans: HashSet<String>,
}

/// The output signal of a component (`out_ports.output`, or another port).
fn out_signal(o: &Value, port_name: &str) -> Option<String> {
    o.get("out_ports")?
        .get(port_name)?
        .get("signal_name")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn in_signals(o: &Value) -> Vec<Option<String>> {
    let Some(ins) = o.get("in_ports").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for v in ins.values() {
        let ports: Vec<&Value> = match v {
            Value::Array(list) => list.iter().collect(),
            other => vec![other],
        };
        for p in ports {
            if let Some(s) = p.get("signal_name").and_then(Value::as_str) {
                out.push(Some(s.to_owned()));
            } else {
                let c = p
                    .get("constant_signal")
                    .and_then(|c| c.get("value"))
                    .and_then(Value::as_f64);
                out.push(c.filter(|v| *v == 0.0 || *v == 1.0).map(|_| String::new()));
            }
        }
    }
    out
}

/// The first pass: constants and 0/1 signals.
fn signals(components: &[Value]) -> Signals {
    let mut constants = HashMap::new();
    let mut booleans = HashSet::new();
    for c in components {
        if let Some(v) = c.get("variable") {
            let value = v.get("constant_output").and_then(|c| {
                c.get("value")
                    .and_then(Value::as_f64)
                    .or_else(|| c.get("special_value").map(|_| f64::NAN))
                    .or(Some(0.0))
            });
            if let (Some(out), Some(value)) = (out_signal(v, "output"), value)
                && value.is_finite()
            {
                constants.insert(out, value);
            }
        }
        if let Some(v) = c.get("bool_variable") {
            let on = v
                .get("constant_output")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if let Some(out) = out_signal(v, "output") {
                constants.insert(out, if on { 1.0 } else { 0.0 });
            }
        }
        // A decider's output is 0 or 1, never missing (in both).
        if let Some(out) = c.get("decider").and_then(|d| out_signal(d, "output")) {
            booleans.insert(out);
        }
        if let Some(fc) = c.get("flow_control") {
            for kind in [
                "aimd_load_scheduler",
                "adaptive_load_scheduler",
                "aiad_load_scheduler",
            ] {
                if let Some(out) = fc.get(kind).and_then(|l| out_signal(l, "is_overload")) {
                    booleans.insert(out);
                }
            }
        }
    }
    // Logic over 0/1 signals is 0/1 again: to a fixed point, for logic fed
    // by logic written later in the list.
    loop {
        let before = booleans.len();
        for c in components {
            for kind in ["and", "or", "inverter", "first_valid"] {
                let Some(l) = c.get(kind) else { continue };
                let Some(out) = out_signal(l, "output") else {
                    continue;
                };
                let ins = in_signals(l);
                let all_boolean = !ins.is_empty()
                    && ins.iter().all(|s| match s {
                        Some(s) if s.is_empty() => true,
                        Some(s) => {
                            booleans.contains(s)
                                || constants.get(s).is_some_and(|v| *v == 0.0 || *v == 1.0)
                        }
                        None => false,
                    });
                let first_boolean = kind == "first_valid"
                    && ins.first().is_some_and(|s| match s {
                        Some(s) => s.is_empty() || booleans.contains(s),
                        None => false,
                    });
                if all_boolean || first_boolean {
                    booleans.insert(out);
                }
            }
        }
        if booleans.len() == before {
            break;
        }
    }
    Signals {
        constants,
        booleans,
    }
}

/// An operand of Sluice's circuit: a signal's name or a finite constant.
fn operand(p: Port, path: &str) -> Result<Node, Skip> {
    match p {
        Port::Const(v) if v.is_finite() => Ok(Node::num(v)),
        Port::Const(v) => Err(Skip::new(
            path,
            format!("{v}: Sluice's circuit constants are finite numbers"),
        )),
        Port::Signal(s) if s.trim().parse::<f64>().is_ok() => Err(Skip::new(
            path,
            format!("the signal {s:?} would read as a number in Sluice: rename it"),
        )),
        Port::Signal(s) => Ok(Node::Str(s)),
    }
}

/// Port `key` of `ins` as an operand, required.
fn need_operand(cx: &mut Cx, sig: &Signals, ins: &mut Obj, key: &str) -> Result<Node, Skip> {
    let path = ins.at(key);
    let p = port(cx, &sig.constants, ins, key)?
        .ok_or_else(|| Skip::new(&path, "required, and missing"))?;
    operand(p, &path)
}

/// Port `key` of `ins` as an operand, if given.
fn opt_operand(cx: &mut Cx, sig: &Signals, ins: &mut Obj, key: &str) -> Result<Option<Node>, Skip> {
    let path = ins.at(key);
    port(cx, &sig.constants, ins, key)?
        .map(|p| operand(p, &path))
        .transpose()
}

/// Whether an operand is never missing and 0 or 1 in Sluice.
fn is_boolean(sig: &Signals, node: &Node) -> bool {
    match node {
        Node::Int(v) => *v == 0 || *v == 1,
        Node::Str(s) => sig.booleans.contains(s),
        _ => false,
    }
}

/// `out_ports.<port_name>` of `o`, if wired.
fn out_port(cx: &mut Cx, o: &mut Obj, port_name: &str) -> Result<Option<String>, Skip> {
    let Some(mut outs) = o.obj("out_ports")? else {
        return Ok(None);
    };
    let out = match outs.obj(port_name)? {
        Some(mut p) => {
            let s = p.non_empty("signal_name")?.map(str::to_owned);
            p.finish(cx, "OutPort");
            s
        }
        None => None,
    };
    outs.finish(cx, "out_ports");
    Ok(out)
}

/// The circuit: every component converted, or listed.
pub(super) fn circuit(
    cx: &mut Cx,
    policy: &str,
    mut o: Obj,
    draft: &mut Draft,
) -> Result<(), Skip> {
    // The controller runs every circuit every `--tick` (10 s by default);
    // the components converted here reckon in time, not in ticks.
    o.ignore(&["evaluation_interval"]);
    let path = o.at("components");
    let components = o.list("components")?;
    o.finish(cx, "Circuit");
    let sig = signals(components);
    for (i, v) in components.iter().enumerate() {
        let at = index(&path, i);
        let Ok(mut c) = Obj::new(v, at.clone()) else {
            cx.skip(Skip::new(at, "expected a mapping"));
            continue;
        };
        let Some(kind) = kind_of(v) else {
            cx.skip(Skip::new(at, "a component has exactly one kind"));
            continue;
        };
        let body_path = c.at(&kind);
        let body = c.need(&kind).and_then(|b| Obj::new(b, body_path.clone()));
        c.finish(cx, "Component");
        let body = match body {
            Ok(b) => b,
            Err(s) => {
                cx.skip(s);
                continue;
            }
        };
        let done = match kind.as_str() {
            "query" => query(cx, body, draft),
            "flow_control" => flow_control(cx, &sig, policy, i, body, draft),
            "variable" | "bool_variable" => {
                // Read as constants by the first pass; a NaN one writes a
                // signal that is never valid.
                if v.get(&kind)
                    .and_then(|b| out_signal(b, "output"))
                    .is_some_and(|s| !sig.constants.contains_key(&s))
                {
                    Err(Skip::new(
                        body_path,
                        "a variable that is not a finite number: Sluice's constants are finite",
                    ))
                } else {
                    Ok(())
                }
            }
            "arithmetic_combinator"
            | "decider"
            | "switcher"
            | "min"
            | "max"
            | "and"
            | "or"
            | "inverter"
            | "first_valid"
            | "alerter"
            | "gradient_controller" => signal_processor(cx, &sig, &kind, body).map(|node| {
                if let Some(node) = node {
                    draft.circuit.push(Item {
                        node,
                        origin: body_path.clone(),
                    });
                }
            }),
            other => Err(Skip::new(
                body_path,
                format!("Sluice's circuits have no {other}"),
            )),
        };
        if let Err(s) = done {
            cx.skip(s);
        }
    }
    Ok(())
}

/// `query.promql`.
fn query(cx: &mut Cx, mut q: Obj, draft: &mut Draft) -> Result<(), Skip> {
    let mut p = q
        .obj("promql")?
        .ok_or_else(|| Skip::new(&q.path, "a query component has one promql"))?;
    q.finish(cx, "Query");
    let origin = p.path.clone();
    let query_path = p.at("query_string");
    let query = p
        .non_empty("query_string")?
        .ok_or_else(|| Skip::new(query_path, "required, and missing"))?
        .to_owned();
    let interval = p
        .duration("evaluation_interval")?
        .map(|d| d.text)
        .unwrap_or_else(|| PROMQL_DEFAULT_INTERVAL.to_owned());
    let out = out_port(cx, &mut p, "output")?;
    p.finish(cx, "PromQL");
    // A query writing no signal does nothing.
    if let Some(out) = out {
        draft.circuit.push(Item {
            node: promql(out, query, interval),
            origin,
        });
    }
    Ok(())
}

/// A `promql` component writing `out` every `interval`.
fn promql(out: String, query: String, interval: String) -> Node {
    map([(
        "promql",
        Some(map([
            ("out", Some(Node::Str(out))),
            ("query", Some(Node::Str(query))),
            ("evaluation_interval", Some(Node::Str(interval))),
        ])),
    )])
}

/// The signal processors Sluice's circuit has; `None` for one that writes
/// nothing (a no-op in Aperture too).
fn signal_processor(
    cx: &mut Cx,
    sig: &Signals,
    kind: &str,
    mut o: Obj,
) -> Result<Option<Node>, Skip> {
    let out = if kind == "alerter" {
        None
    } else {
        match out_port(cx, &mut o, "output")? {
            Some(out) => Some(Node::Str(out)),
            None => {
                o.ignore(&[
                    "in_ports",
                    "operator",
                    "true_for",
                    "false_for",
                    "parameters",
                    "manual_mode",
                    "manual_mode_config_key",
                ]);
                o.finish(cx, kind);
                return Ok(None);
            }
        }
    };
    let mut ins = o.need_obj("in_ports")?;
    let node = match kind {
        "arithmetic_combinator" => {
            let op_path = o.at("operator");
            let op = o.str("operator")?.unwrap_or("");
            if !["add", "sub", "mul", "div"].contains(&op) {
                return Err(Skip::new(
                    op_path,
                    format!("Sluice's arithmetic has add, sub, mul and div, not {op:?}"),
                ));
            }
            let lhs = need_operand(cx, sig, &mut ins, "lhs")?;
            let rhs = need_operand(cx, sig, &mut ins, "rhs")?;
            component(
                "arithmetic",
                [
                    ("out", out),
                    ("op", Some(Node::str(op))),
                    ("lhs", Some(lhs)),
                    ("rhs", Some(rhs)),
                ],
            )
        }
        "decider" => {
            let op_path = o.at("operator");
            let op = o.str("operator")?.unwrap_or("");
            if !["gt", "lt", "gte", "lte", "eq", "neq"].contains(&op) {
                return Err(Skip::new(
                    op_path,
                    format!("{op:?} is not gt, lt, gte, lte, eq or neq"),
                ));
            }
            let lhs = need_operand(cx, sig, &mut ins, "lhs")?;
            let rhs = need_operand(cx, sig, &mut ins, "rhs")?;
            let true_for = o.duration("true_for")?.filter(|d| !d.value.is_zero());
            let false_for = o.duration("false_for")?.filter(|d| !d.value.is_zero());
            component(
                "decider",
                [
                    ("out", out),
                    ("op", Some(Node::str(op))),
                    ("lhs", Some(lhs)),
                    ("rhs", Some(rhs)),
                    ("true_for", true_for.map(|d| Node::Str(d.text))),
                    ("false_for", false_for.map(|d| Node::Str(d.text))),
                ],
            )
        }
        "switcher" => {
            let switch = need_operand(cx, sig, &mut ins, "switch")?;
            let on = need_operand(cx, sig, &mut ins, "on_signal")?;
            let off = need_operand(cx, sig, &mut ins, "off_signal")?;
            component(
                "switcher",
                [
                    ("out", out),
                    ("switch", Some(switch)),
                    ("on_true", Some(on)),
                    ("on_false", Some(off)),
                ],
            )
        }
        "min" | "max" | "and" | "or" | "first_valid" => {
            let inputs = inputs(cx, sig, &mut ins)?;
            let all_boolean = inputs.iter().all(|n| is_boolean(sig, n));
            let into = match kind {
                "min" | "max" => kind,
                // On 0/1 operands that are never missing, AND is the least
                // and OR the greatest.
                "and" if all_boolean => "min",
                "or" if all_boolean => "max",
                "and" | "or" => {
                    return Err(Skip::new(
                        ins.path,
                        format!(
                            "Sluice has no logical {kind}: it is carried over as min or max on signals that are 0 or 1 and never missing (deciders, is_overload), which these are not all"
                        ),
                    ));
                }
                // The first input, when it is never missing, is always the
                // first valid one.
                _ => match inputs.first() {
                    Some(first)
                        if matches!(first, Node::Int(_) | Node::Float(_))
                            || is_boolean(sig, first) =>
                    {
                        let first = first.clone();
                        ins.finish(cx, "in_ports");
                        o.finish(cx, kind);
                        return Ok(Some(component(
                            "max",
                            [("out", out), ("inputs", Some(Node::FlowList(vec![first])))],
                        )));
                    }
                    _ => {
                        return Err(Skip::new(
                            ins.path,
                            "Sluice has no first_valid: it is carried over only when its first input is never missing (a constant or a decider's output)",
                        ));
                    }
                },
            };
            component(
                into,
                [("out", out), ("inputs", Some(Node::FlowList(inputs)))],
            )
        }
        "inverter" => {
            let input = need_operand(cx, sig, &mut ins, "input")?;
            if !is_boolean(sig, &input) {
                return Err(Skip::new(
                    ins.path,
                    "Sluice has no inverter: it is carried over as 1 - input on a signal that is 0 or 1 and never missing, which this is not",
                ));
            }
            component(
                "arithmetic",
                [
                    ("out", out),
                    ("op", Some(Node::str("sub"))),
                    ("lhs", Some(Node::Int(1))),
                    ("rhs", Some(input)),
                ],
            )
        }
        "gradient_controller" => {
            let signal = need_operand(cx, sig, &mut ins, "signal")?;
            let setpoint = need_operand(cx, sig, &mut ins, "setpoint")?;
            let control = need_operand(cx, sig, &mut ins, "control_variable")?;
            for bound in ["max", "min"] {
                if ins.has(bound) {
                    return Err(Skip::new(
                        ins.at(bound),
                        "Sluice's gradient controller has no output bounds: follow it with min and max",
                    ));
                }
            }
            if o.bool("manual_mode")?.unwrap_or(false) {
                return Err(Skip::new(
                    o.at("manual_mode"),
                    "Sluice's gradient controller has no manual mode",
                ));
            }
            o.ignore(&["manual_mode_config_key"]);
            let mut p = o.need_obj("parameters")?;
            let slope_path = p.at("slope");
            let slope = p
                .f64("slope")?
                .ok_or_else(|| Skip::new(slope_path, "required, and missing"))?;
            // Aperture's defaults are the widest numbers, Sluice's 0.1 and
            // 1: always written.
            let min = p.f64("min_gradient")?.unwrap_or(f64::MIN);
            let max = p.f64("max_gradient")?.unwrap_or(f64::MAX);
            p.finish(cx, "GradientController.Parameters");
            component(
                "gradient_controller",
                [
                    ("out", out),
                    ("signal", Some(signal)),
                    ("setpoint", Some(setpoint)),
                    ("control_variable", Some(control)),
                    ("slope", Some(Node::num(slope))),
                    ("min_gradient", Some(Node::Float(min))),
                    ("max_gradient", Some(Node::Float(max))),
                ],
            )
        }
        _ => {
            let signal = need_operand(cx, sig, &mut ins, "signal")?;
            let p = o.need_obj("parameters")?;
            alerter(cx, signal, p)?
        }
    };
    ins.finish(cx, "in_ports");
    o.finish(cx, kind);
    Ok(Some(node))
}

/// `in_ports.inputs`, a list of ports.
fn inputs(cx: &mut Cx, sig: &Signals, ins: &mut Obj) -> Result<Vec<Node>, Skip> {
    let path = ins.at("inputs");
    let list = ins.list("inputs")?;
    if list.is_empty() {
        return Err(Skip::new(path, "required, and missing"));
    }
    let mut out = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let at = index(&path, i);
        // Each input is an InPort: read it as the field of a one-field
        // mapping.
        let wrapped = serde_json::json!({ "p": v });
        let mut holder = Obj::new(&wrapped, at.clone())?;
        let p = port(cx, &sig.constants, &mut holder, "p")?
            .ok_or_else(|| Skip::new(&at, "an empty port"))?;
        out.push(operand(p, &at)?);
    }
    Ok(out)
}

/// A circuit component `{kind: {fields}}`.
fn component<const N: usize>(kind: &str, fields: [(&str, Option<Node>); N]) -> Node {
    Node::Map(vec![(kind.to_owned(), flow_map(fields))])
}

/// `Alerter.Parameters` with its signal.
fn alerter(cx: &mut Cx, signal: Node, mut p: Obj) -> Result<Node, Skip> {
    let name_path = p.at("alert_name");
    let name = p
        .non_empty("alert_name")?
        .ok_or_else(|| Skip::new(name_path, "required, and missing"))?;
    let severity_path = p.at("severity");
    let severity = p.non_empty("severity")?;
    if let Some(s) = severity.filter(|s| !["info", "warn", "crit"].contains(s)) {
        return Err(Skip::new(
            severity_path,
            format!("{s:?} is not info, warn or crit"),
        ));
    }
    let resolve = p.duration("resolve_timeout")?.map(|d| Node::Str(d.text));
    let channels_path = p.at("alert_channels");
    let channels = p
        .list("alert_channels")?
        .iter()
        .enumerate()
        .map(|(i, v)| text(v, &index(&channels_path, i)).map(Node::str))
        .collect::<Result<Vec<_>, _>>()?;
    let labels_path = p.at("labels");
    let mut labels = Vec::new();
    for (k, v) in p.entries("labels")? {
        labels.push((
            k.to_owned(),
            Node::str(text(v, &super::input::join(&labels_path, k))?),
        ));
    }
    p.finish(cx, "Alerter.Parameters");
    Ok(Node::Map(vec![(
        "alerter".to_owned(),
        map([
            ("signal", Some(signal)),
            ("alert_name", Some(Node::str(name))),
            ("severity", severity.map(Node::str)),
            ("resolve_timeout", resolve),
            (
                "alert_channels",
                (!channels.is_empty()).then_some(Node::FlowList(channels)),
            ),
            (
                "labels",
                (!labels.is_empty()).then_some(Node::FlowMap(labels)),
            ),
        ]),
    )]))
}

/// `flow_control`: the component goes into its list in the policy, named
/// after its kind and place in the circuit (`rate-limiter-3`).
fn flow_control(
    cx: &mut Cx,
    sig: &Signals,
    policy: &str,
    i: usize,
    mut o: Obj,
    draft: &mut Draft,
) -> Result<(), Skip> {
    let keys: Vec<&'static str> = [
        "rate_limiter",
        "concurrency_limiter",
        "concurrency_scheduler",
        "quota_scheduler",
        "sampler",
        "load_scheduler",
        "aimd_load_scheduler",
        "adaptive_load_scheduler",
        "aiad_load_scheduler",
        "range_driven_load_scheduler",
        "load_ramp",
        "private",
    ]
    .into_iter()
    .filter(|k| o.has(k))
    .collect();
    let [kind] = keys[..] else {
        let path = o.path.clone();
        o.finish(cx, "FlowControl");
        return Err(Skip::new(
            path,
            "a flow_control component has exactly one kind",
        ));
    };
    let path = o.at(kind);
    let body = Obj::new(o.need(kind)?, path.clone())?;
    o.finish(cx, "FlowControl");
    let name = format!("{}-{i}", kind.replace('_', "-"));
    let ctx = Ctx {
        name: name.clone(),
        constants: &sig.constants,
    };
    let item = |node| Item {
        node,
        origin: path.clone(),
    };
    let what = kind.replace('_', " ");
    let not_carried = |s: Skip| {
        Skip::new(
            s.path,
            format!("{}; the {what} is not carried over", s.reason),
        )
    };
    match kind {
        "rate_limiter" => {
            let node = flow::rate_limiter(cx, &ctx, body).map_err(not_carried)?;
            draft.rate_limiters.push(item(node));
        }
        "concurrency_limiter" => {
            let node = flow::concurrency_limiter(cx, &ctx, body).map_err(not_carried)?;
            draft.concurrency_limiters.push(item(node));
        }
        "concurrency_scheduler" => {
            let node = flow::concurrency_scheduler(cx, &ctx, body).map_err(not_carried)?;
            draft.concurrency_schedulers.push(item(node));
        }
        "quota_scheduler" => {
            let node = flow::quota_scheduler(cx, &ctx, body).map_err(not_carried)?;
            draft.quota_schedulers.push(item(node));
        }
        "sampler" => {
            let (node, driven_by) = flow::sampler(cx, &ctx, body).map_err(not_carried)?;
            draft.samplers.push(item(node));
            if let Some(signal) = driven_by {
                let input = operand(Port::Signal(signal), &path)?;
                draft.circuit.push(item(component(
                    "actuator",
                    [("sampler", Some(Node::str(&name))), ("input", Some(input))],
                )));
            }
        }
        "load_scheduler" => {
            load_scheduler(cx, sig, policy, &name, body, draft).map_err(not_carried)?
        }
        "aimd_load_scheduler" | "adaptive_load_scheduler" | "aiad_load_scheduler" => {
            driven_load_scheduler(cx, sig, policy, kind, i, body, draft).map_err(not_carried)?
        }
        "load_ramp" => {
            return Err(Skip::new(
                path,
                "write it as Sluice's load_ramp component or load_ramping.base blueprint, which name a sampler of the policy (docs/controller.md)",
            ));
        }
        "range_driven_load_scheduler" => {
            return Err(Skip::new(
                path,
                "not converted: write it as Sluice's range_driven_load_scheduler, which names a load scheduler of the policy (docs/controller.md)",
            ));
        }
        _ => {
            return Err(Skip::new(
                path,
                "Aperture's private components are not Sluice's",
            ));
        }
    }
    Ok(())
}

/// `flow_control.load_scheduler`: a load scheduler, driven by an actuator
/// when its multiplier is a signal, and with the PromQL of its observed
/// multiplier when that output is wired.
fn load_scheduler(
    cx: &mut Cx,
    sig: &Signals,
    policy: &str,
    name: &str,
    mut o: Obj,
    draft: &mut Draft,
) -> Result<(), Skip> {
    let origin = o.path.clone();
    let ins = o.obj("in_ports")?;
    let mut multiplier = None;
    let mut driven_by = None;
    if let Some(mut ins) = ins {
        let path = ins.at("load_multiplier");
        match port(cx, &sig.constants, &mut ins, "load_multiplier")? {
            Some(Port::Const(v)) if v.is_finite() && v >= 0.0 => multiplier = Some(v),
            Some(Port::Const(v)) => {
                return Err(Skip::new(path, format!("{v} is not a number >= 0")));
            }
            Some(p @ Port::Signal(_)) => driven_by = Some(operand(p, &path)?),
            None => {}
        }
        ins.finish(cx, "LoadScheduler.Ins");
    }
    let observed = out_port(cx, &mut o, "observed_load_multiplier")?;
    let dry_run = o.bool("dry_run")?.unwrap_or(false);
    o.ignore(&["dry_run_config_key"]);
    let params = o.need_obj("parameters")?;
    let node = flow::load_scheduler_parameters(cx, name, params, multiplier, dry_run)?;
    o.finish(cx, "LoadScheduler");
    let item = |node| Item {
        node,
        origin: origin.clone(),
    };
    draft.load_schedulers.push(item(node));
    if let Some(input) = driven_by {
        draft.circuit.push(item(component(
            "actuator",
            [
                ("load_scheduler", Some(Node::str(name))),
                ("input", Some(input)),
            ],
        )));
    }
    if let Some(out) = observed {
        draft.circuit.push(item(observed_promql(policy, name, out)));
    }
    Ok(())
}

/// The PromQL of a load scheduler's observed multiplier, into `out`.
fn observed_promql(policy: &str, load_scheduler: &str, out: String) -> Node {
    let query =
        crate::circuit::load_scheduling::observed_query(policy, &Name(load_scheduler.to_owned()));
    promql(out, query, PROMQL_DEFAULT_INTERVAL.to_owned())
}

/// `aimd_load_scheduler` (and its deprecated name
/// `adaptive_load_scheduler`) or `aiad_load_scheduler`: the load scheduler
/// its `parameters.load_scheduler` describes (`load-scheduler-<i>`), the
/// Sluice component of the same kind driving it, the PromQL of the observed
/// multiplier AIMD reads, and the embedded alerter (firing while the
/// multiplier is below 1, as Aperture's nested circuit has it).
fn driven_load_scheduler(
    cx: &mut Cx,
    sig: &Signals,
    policy: &str,
    kind: &str,
    i: usize,
    mut o: Obj,
    draft: &mut Draft,
) -> Result<(), Skip> {
    let origin = o.path.clone();
    let aimd = kind != "aiad_load_scheduler";
    let ls_name = format!("load-scheduler-{i}");
    let mut ins = o.need_obj("in_ports")?;
    let signal = need_operand(cx, sig, &mut ins, "signal")?;
    let setpoint = need_operand(cx, sig, &mut ins, "setpoint")?;
    let confirmation = opt_operand(cx, sig, &mut ins, "overload_confirmation")?;
    ins.finish(cx, "in_ports");
    // Outputs: the multiplier and is_overload as Aperture named them; the
    // observed multiplier is Sluice's own query, under Aperture's name
    // when it is wired.
    let (desired, is_overload, observed) = match o.obj("out_ports")? {
        Some(mut outs) => {
            let mut one = |outs: &mut Obj, key: &str| -> Result<Option<String>, Skip> {
                match outs.obj(key)? {
                    Some(mut p) => {
                        let s = p.non_empty("signal_name")?.map(str::to_owned);
                        p.finish(cx, "OutPort");
                        Ok(s)
                    }
                    None => Ok(None),
                }
            };
            let d = one(&mut outs, "desired_load_multiplier")?;
            let v = one(&mut outs, "is_overload")?;
            let b = one(&mut outs, "observed_load_multiplier")?;
            outs.finish(cx, "out_ports");
            (d, v, b)
        }
        None => (None, None, None),
    };
    let desired = desired.unwrap_or_else(|| format!("desired_load_multiplier_{i}"));
    let dry_run = o.bool("dry_run")?.unwrap_or(false);
    o.ignore(&["dry_run_config_key"]);
    let condition = if aimd {
        None
    } else {
        let path = o.at("overload_condition");
        match o.non_empty("overload_condition")? {
            Some(c) if ["gt", "lt", "gte", "lte"].contains(&c) => Some(Node::str(c)),
            Some(c) => return Err(Skip::new(path, format!("{c:?} is not gt, lt, gte or lte"))),
            None => None,
        }
    };
    let mut p = o.need_obj("parameters")?;
    let ls = p.need_obj("load_scheduler")?;
    let ls_node = flow::load_scheduler_parameters(cx, &ls_name, ls, None, dry_run)?;
    let mut fields = vec![
        ("out", Some(Node::Str(desired.clone()))),
        ("out_is_overload", is_overload.map(Node::Str)),
        ("load_scheduler", Some(Node::str(&ls_name))),
        ("signal", Some(signal)),
        ("setpoint", Some(setpoint)),
        ("overload_confirmation", confirmation),
    ];
    let number =
        |p: &mut Obj, key: &str| -> Result<Option<Node>, Skip> { Ok(p.f64(key)?.map(Node::num)) };
    let observed_signal = observed.unwrap_or_else(|| format!("observed_load_multiplier_{i}"));
    if aimd {
        fields.push((
            "observed_load_multiplier",
            Some(Node::Str(observed_signal.clone())),
        ));
        let mut g = p.need_obj("gradient")?;
        let slope_path = g.at("slope");
        let slope = g
            .f64("slope")?
            .ok_or_else(|| Skip::new(slope_path, "required, and missing"))?;
        let gradient = flow_map([
            ("slope", Some(Node::num(slope))),
            ("min_gradient", number(&mut g, "min_gradient")?),
            ("max_gradient", number(&mut g, "max_gradient")?),
        ]);
        g.finish(cx, "GradientController.Parameters");
        fields.push(("gradient", Some(gradient)));
        // The deprecated adaptive load scheduler's own default increment.
        let increment = number(&mut p, "load_multiplier_linear_increment")?
            .or((kind == "adaptive_load_scheduler").then_some(Node::Float(0.0025)));
        fields.push(("load_multiplier_linear_increment", increment));
        fields.push((
            "max_load_multiplier",
            number(&mut p, "max_load_multiplier")?,
        ));
    } else {
        fields.push(("overload_condition", condition));
        fields.push((
            "load_multiplier_linear_increment",
            number(&mut p, "load_multiplier_linear_increment")?,
        ));
        fields.push((
            "load_multiplier_linear_decrement",
            number(&mut p, "load_multiplier_linear_decrement")?,
        ));
        fields.push((
            "max_load_multiplier",
            number(&mut p, "max_load_multiplier")?,
        ));
        fields.push((
            "min_load_multiplier",
            number(&mut p, "min_load_multiplier")?,
        ));
    }
    let alerter_params = p.obj("alerter")?;
    let alert = alerter_params
        .map(|a| alerter(cx, Node::Str(format!("{desired}_alert")), a))
        .transpose()?;
    p.finish(cx, "load scheduler parameters");
    o.finish(cx, kind);

    let item = |node| Item {
        node,
        origin: origin.clone(),
    };
    draft.load_schedulers.push(item(ls_node));
    if aimd {
        draft
            .circuit
            .push(item(observed_promql(policy, &ls_name, observed_signal)));
    }
    let component_kind = if aimd {
        "aimd_load_scheduler"
    } else {
        "aiad_load_scheduler"
    };
    draft.circuit.push(item(Node::Map(vec![(
        component_kind.to_owned(),
        Node::Map(
            fields
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
                .collect(),
        ),
    )])));
    if let Some(alert) = alert {
        // Aperture's LOAD_MULTIPLIER_ALERT: the desired multiplier below 1.
        draft.circuit.push(item(component(
            "decider",
            [
                ("out", Some(Node::Str(format!("{desired}_alert")))),
                ("op", Some(Node::str("lt"))),
                ("lhs", Some(Node::Str(desired))),
                ("rhs", Some(Node::Int(1))),
            ],
        )));
        draft.circuit.push(item(alert));
    }
    Ok(())
}
