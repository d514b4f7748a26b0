//! Aperture's flow-control components of a circuit (limiters, samplers,
//! schedulers) with their `parameters`, `request_parameters` and constant
//! `in_ports`, and the `denied_response_status_code` names.

use serde_json::Value;

use super::input::{Cx, Obj, Skip, index, number, scalar_text};
use super::matchers::{label_field, label_matcher, selectors, valid};
use super::output::{Node, flow_map, map};
use crate::types::Name;

/// Aperture's `flowcontrol.check.v1.StatusCode`, by name (protobuf's JSON
/// form of an enum) and number: the codes a rejection may carry.
const STATUS_CODES: &[(&str, u16)] = &[
    ("Empty", 0),
    ("Continue", 100),
    ("OK", 200),
    ("Created", 201),
    ("Accepted", 202),
    ("NonAuthoritativeInformation", 203),
    ("NoContent", 204),
    ("ResetContent", 205),
    ("PartialContent", 206),
    ("MultiStatus", 207),
    ("AlreadyReported", 208),
    ("IMUsed", 226),
    ("MultipleChoices", 300),
    ("MovedPermanently", 301),
    ("Found", 302),
    ("SeeOther", 303),
    ("NotModified", 304),
    ("UseProxy", 305),
    ("TemporaryRedirect", 307),
    ("PermanentRedirect", 308),
    ("BadRequest", 400),
    ("Unauthorized", 401),
    ("PaymentRequired", 402),
    ("Forbidden", 403),
    ("NotFound", 404),
    ("MethodNotAllowed", 405),
    ("NotAcceptable", 406),
    ("ProxyAuthenticationRequired", 407),
    ("RequestTimeout", 408),
    ("Conflict", 409),
    ("Gone", 410),
    ("LengthRequired", 411),
    ("PreconditionFailed", 412),
    ("PayloadTooLarge", 413),
    ("URITooLong", 414),
    ("UnsupportedMediaType", 415),
    ("RangeNotSatisfiable", 416),
    ("ExpectationFailed", 417),
    ("MisdirectedRequest", 421),
    ("UnprocessableEntity", 422),
    ("Locked", 423),
    ("FailedDependency", 424),
    ("UpgradeRequired", 426),
    ("PreconditionRequired", 428),
    ("TooManyRequests", 429),
    ("RequestHeaderFieldsTooLarge", 431),
    ("InternalServerError", 500),
    ("NotImplemented", 501),
    ("BadGateway", 502),
    ("ServiceUnavailable", 503),
    ("GatewayTimeout", 504),
    ("HTTPVersionNotSupported", 505),
    ("VariantAlsoNegotiates", 506),
    ("InsufficientStorage", 507),
    ("LoopDetected", 508),
    ("NotExtended", 510),
    ("NetworkAuthenticationRequired", 511),
];

/// Field `key` of `o`, a `denied_response_status_code`: its number for
/// `denied_status_code`, `None` for Aperture's `Empty` (the component's
/// default, which is Sluice's too). A status Sluice cannot answer with is
/// listed, and the component keeps Sluice's default: a limiter answering
/// with another status does more of what was meant than none at all.
fn status(cx: &mut Cx, o: &mut Obj, key: &str) -> Option<Node> {
    status_code(o, key).unwrap_or_else(|s| {
        cx.skip(Skip::new(
            s.path,
            format!("{}; the component answers with Sluice's default", s.reason),
        ));
        None
    })
}

fn status_code(o: &mut Obj, key: &str) -> Result<Option<Node>, Skip> {
    let path = o.at(key);
    let Some(v) = o.get(key) else {
        return Ok(None);
    };
    let code = match v {
        Value::String(name) => STATUS_CODES
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, c)| c)
            .ok_or_else(|| {
                Skip::new(
                    &path,
                    format!("{name:?} is not one of Aperture's status code names"),
                )
            })?,
        Value::Number(_) => {
            let n = number(v, &path)?;
            if n.fract() != 0.0 || !(0.0..1000.0).contains(&n) {
                return Err(Skip::new(path, format!("{n} is not an HTTP status")));
            }
            n as u16
        }
        other => {
            return Err(Skip::new(
                path,
                format!(
                    "expected a status code name, found {}",
                    super::input::kind(other)
                ),
            ));
        }
    };
    match code {
        0 => Ok(None),
        400..=599 => Ok(Some(Node::Int(i64::from(code)))),
        other => Err(Skip::new(
            path,
            format!("Sluice answers a rejection with a status from 400 to 599, not {other}"),
        )),
    }
}

/// An input port: a signal or a constant.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Port {
    /// A signal of the circuit.
    Signal(String),
    /// A constant (possibly NaN or infinite: Aperture's special values).
    Const(f64),
}

/// Field `key` of `o`, an `InPort`. A signal written by a `variable` (a
/// constant) is that constant.
pub(super) fn port(
    cx: &mut Cx,
    constants: &std::collections::HashMap<String, f64>,
    o: &mut Obj,
    key: &str,
) -> Result<Option<Port>, Skip> {
    let Some(mut p) = o.obj(key)? else {
        return Ok(None);
    };
    let port = if let Some(name) = p.non_empty("signal_name")? {
        match constants.get(name) {
            Some(&v) => Port::Const(v),
            None => Port::Signal(name.to_owned()),
        }
    } else if let Some(mut c) = p.obj("constant_signal")? {
        let v = if let Some(special) = c.non_empty("special_value")? {
            match special {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                other => {
                    return Err(Skip::new(
                        c.at("special_value"),
                        format!("{other:?} is not NaN, +Inf or -Inf"),
                    ));
                }
            }
        } else {
            c.f64("value")?.unwrap_or(0.0)
        };
        c.finish(cx, "ConstantSignal");
        Port::Const(v)
    } else {
        return Err(Skip::new(
            p.path,
            "a port needs signal_name or constant_signal",
        ));
    };
    p.finish(cx, "InPort");
    Ok(Some(port))
}

/// A port that must be a finite constant >= 0 (a limiter's value, which
/// Sluice takes from the policy).
fn constant_port(
    cx: &mut Cx,
    constants: &std::collections::HashMap<String, f64>,
    o: &mut Obj,
    key: &str,
) -> Result<f64, Skip> {
    let path = o.at(key);
    match port(cx, constants, o, key)? {
        None => Err(Skip::new(path, "required, and missing")),
        Some(Port::Const(v)) if v.is_finite() && v >= 0.0 => Ok(v),
        Some(Port::Const(v)) => Err(Skip::new(path, format!("{v} is not a number >= 0"))),
        Some(Port::Signal(s)) => Err(Skip::new(
            path,
            format!(
                "the signal {s:?}: Sluice takes this value from the policy (a circuit actuator can change it for a while); give it a constant"
            ),
        )),
    }
}

/// `pass_through`: absent or 0 is what Sluice does; anything else cannot be
/// said.
fn pass_through(
    cx: &mut Cx,
    constants: &std::collections::HashMap<String, f64>,
    o: &mut Obj,
) -> Result<(), Skip> {
    let path = o.at("pass_through");
    match port(cx, constants, o, "pass_through")? {
        None => Ok(()),
        Some(Port::Const(0.0)) => Ok(()),
        Some(_) => Err(Skip::new(
            path,
            "Sluice's limiters have no pass-through switch: leave the component out instead",
        )),
    }
}

/// What every component converted from a circuit's `flow_control` needs.
pub(super) struct Ctx<'c> {
    /// The component's name in Sluice.
    pub name: String,
    /// Signals written by `variable`s: constants.
    pub constants: &'c std::collections::HashMap<String, f64>,
}

/// Aperture's shared (agent-group-wide) state, as Sluice says it: state in
/// the store, and every flow let through while the store cannot be asked
/// (Aperture failed open when its cache did).
fn global() -> [(&'static str, Option<Node>); 2] {
    [
        ("scope", Some(Node::str("global"))),
        ("on_store_unavailable", Some(Node::str("accept"))),
    ]
}

/// Whether `d` is Aperture's default `max_idle_time`, 2 h.
fn two_hours(d: &super::input::Duration) -> bool {
    d.value == std::time::Duration::from_secs(7200)
}

/// A `RateLimiter.Parameters` as a Sluice bucket's fields; `with_idle`:
/// whether the component has `max_idle_time` (rate limiters do, quota
/// schedulers do not: listed unless it is Aperture's default).
fn bucket_parameters(
    cx: &mut Cx,
    mut p: Obj,
    with_idle: bool,
) -> Result<Vec<(&'static str, Option<Node>)>, Skip> {
    let mut limit_by = label_field(&mut p, "limit_by_label_key")?;
    if limit_by.is_none() {
        limit_by = label_field(&mut p, "label_key")?;
    }
    let interval_path = p.at("interval");
    let interval = p
        .duration("interval")?
        .ok_or_else(|| Skip::new(&interval_path, "required, and missing"))?;
    let continuous = p.bool("continuous_fill")?.unwrap_or(true);
    let idle_path = p.at("max_idle_time");
    let idle = p.duration("max_idle_time")?;
    let idle = match idle {
        Some(d) if d.value.is_zero() => {
            cx.skip(Skip::new(
                idle_path,
                "0 (never forget a label value's bucket): Sluice forgets a bucket unused for max_idle_time (2h by default)",
            ));
            None
        }
        Some(d) if !with_idle && !two_hours(&d) => {
            cx.skip(Skip::new(
                idle_path,
                "a quota scheduler in Sluice forgets idle buckets on its own schedule",
            ));
            None
        }
        Some(d) if with_idle => Some(Node::Str(d.text)),
        _ => None,
    };
    if p.bool("delay_initial_fill")?.unwrap_or(false) {
        cx.skip(Skip::new(
            p.at("delay_initial_fill"),
            "a new Sluice bucket starts full",
        ));
    }
    // Sluice's global buckets lease tokens ahead instead of syncing lazily
    // (docs/policy.md, Global limits): nothing to carry over.
    p.ignore(&["lazy_sync"]);
    p.finish(cx, "RateLimiter.Parameters");
    Ok(vec![
        ("interval", Some(Node::Str(interval.text))),
        (
            "continuous_fill",
            (!continuous).then_some(Node::Bool(false)),
        ),
        ("limit_by_label_key", limit_by),
        ("max_idle_time", idle),
    ])
}

/// `flow_control.rate_limiter`.
pub(super) fn rate_limiter(cx: &mut Cx, ctx: &Ctx, mut o: Obj) -> Result<Node, Skip> {
    let mut ins = o.need_obj("in_ports")?;
    let capacity = constant_port(cx, ctx.constants, &mut ins, "bucket_capacity")?;
    let fill = constant_port(cx, ctx.constants, &mut ins, "fill_amount")?;
    pass_through(cx, ctx.constants, &mut ins)?;
    ins.finish(cx, "RateLimiter.Ins");
    let selectors = selectors(cx, &mut o, "selectors")?;
    let params = o.need_obj("parameters")?;
    let bucket = bucket_parameters(cx, params, true)?;
    let (tokens, status) = request_parameters(cx, &mut o)?;
    o.ignore(&["out_ports"]);
    o.finish(cx, "RateLimiter");
    let mut fields = vec![
        ("name", Some(Node::str(&ctx.name))),
        ("selectors", Some(selectors)),
        ("bucket_capacity", Some(Node::num(capacity))),
        ("fill_amount", Some(Node::num(fill))),
    ];
    fields.extend(bucket);
    fields.push(("tokens_label_key", tokens));
    fields.extend(global());
    fields.push(("denied_status_code", status));
    Ok(entries(fields))
}

/// `request_parameters`: `tokens_label_key` and the status.
fn request_parameters(cx: &mut Cx, o: &mut Obj) -> Result<(Option<Node>, Option<Node>), Skip> {
    let Some(mut r) = o.obj("request_parameters")? else {
        return Ok((None, None));
    };
    let tokens = label_field(&mut r, "tokens_label_key")?;
    let status = status(cx, &mut r, "denied_response_status_code");
    r.finish(cx, "RequestParameters");
    Ok((tokens, status))
}

/// A `ConcurrencyLimiter.Parameters`: the label key (when the component
/// has one in Sluice) and `max_inflight_duration`. `max_idle_time` is left:
/// a count nobody holds is nothing to keep.
fn concurrency_parameters(
    cx: &mut Cx,
    mut p: Obj,
    with_label: bool,
) -> Result<(Option<Node>, Node), Skip> {
    let limit_by = label_field(&mut p, "limit_by_label_key")?;
    if limit_by.is_some() && !with_label {
        return Err(Skip::new(
            p.at("limit_by_label_key"),
            "Sluice's concurrency scheduler has one count for all its flows",
        ));
    }
    let inflight_path = p.at("max_inflight_duration");
    let inflight = p
        .duration("max_inflight_duration")?
        .ok_or_else(|| Skip::new(&inflight_path, "required, and missing"))?;
    p.ignore(&["max_idle_time"]);
    p.finish(cx, "ConcurrencyLimiter.Parameters");
    Ok((limit_by, Node::Str(inflight.text)))
}

/// The max concurrency port, a whole number >= 0.
fn max_concurrency(cx: &mut Cx, ctx: &Ctx, ins: &mut Obj) -> Result<Node, Skip> {
    let path = ins.at("max_concurrency");
    let v = constant_port(cx, ctx.constants, ins, "max_concurrency")?;
    if v.fract() != 0.0 {
        return Err(Skip::new(
            path,
            format!("{v}: Sluice counts flows in flight in whole numbers"),
        ));
    }
    pass_through(cx, ctx.constants, ins)?;
    Ok(Node::num(v))
}

/// `flow_control.concurrency_limiter`.
pub(super) fn concurrency_limiter(cx: &mut Cx, ctx: &Ctx, mut o: Obj) -> Result<Node, Skip> {
    let mut ins = o.need_obj("in_ports")?;
    let max = max_concurrency(cx, ctx, &mut ins)?;
    ins.finish(cx, "ConcurrencyLimiter.Ins");
    let selectors = selectors(cx, &mut o, "selectors")?;
    let params = o.need_obj("parameters")?;
    let (limit_by, inflight) = concurrency_parameters(cx, params, true)?;
    let tokens_path = o.at("request_parameters.tokens_label_key");
    let (tokens, status) = request_parameters(cx, &mut o)?;
    if tokens.is_some() {
        return Err(Skip::new(
            tokens_path,
            "a flow takes one slot of a Sluice concurrency limiter",
        ));
    }
    o.ignore(&["out_ports"]);
    o.finish(cx, "ConcurrencyLimiter");
    let mut fields = vec![
        ("name", Some(Node::str(&ctx.name))),
        ("selectors", Some(selectors)),
        ("max_concurrency", Some(max)),
        ("limit_by_label_key", limit_by),
        ("max_inflight_duration", Some(inflight)),
    ];
    fields.extend(global());
    fields.push(("denied_status_code", status));
    Ok(entries(fields))
}

fn entries(fields: Vec<(&str, Option<Node>)>) -> Node {
    Node::Map(
        fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect(),
    )
}

/// `flow_control.concurrency_scheduler`.
pub(super) fn concurrency_scheduler(cx: &mut Cx, ctx: &Ctx, mut o: Obj) -> Result<Node, Skip> {
    let mut ins = o.need_obj("in_ports")?;
    let max = max_concurrency(cx, ctx, &mut ins)?;
    ins.finish(cx, "ConcurrencyLimiter.Ins");
    let selectors = selectors(cx, &mut o, "selectors")?;
    let params = o.need_obj("concurrency_limiter")?;
    let (_, inflight) = concurrency_parameters(cx, params, false)?;
    let scheduler = o.obj("scheduler")?.map(|s| scheduler(cx, s)).transpose()?;
    o.ignore(&["out_ports"]);
    o.finish(cx, "ConcurrencyScheduler");
    let mut fields = vec![
        ("name", Some(Node::str(&ctx.name))),
        ("selectors", Some(selectors)),
        ("max_concurrency", Some(max)),
        ("max_inflight_duration", Some(inflight)),
    ];
    fields.extend(global());
    fields.push(("scheduler", scheduler));
    Ok(entries(fields))
}

/// `flow_control.quota_scheduler`.
pub(super) fn quota_scheduler(cx: &mut Cx, ctx: &Ctx, mut o: Obj) -> Result<Node, Skip> {
    let mut ins = o.need_obj("in_ports")?;
    let capacity = constant_port(cx, ctx.constants, &mut ins, "bucket_capacity")?;
    let fill = constant_port(cx, ctx.constants, &mut ins, "fill_amount")?;
    pass_through(cx, ctx.constants, &mut ins)?;
    ins.finish(cx, "RateLimiter.Ins");
    let selectors = selectors(cx, &mut o, "selectors")?;
    let params = o.need_obj("rate_limiter")?;
    let bucket = bucket_parameters(cx, params, false)?;
    let scheduler = o.obj("scheduler")?.map(|s| scheduler(cx, s)).transpose()?;
    o.ignore(&["out_ports"]);
    o.finish(cx, "QuotaScheduler");
    let mut fields = vec![
        ("name", Some(Node::str(&ctx.name))),
        ("selectors", Some(selectors)),
        ("bucket_capacity", Some(Node::num(capacity))),
        ("fill_amount", Some(Node::num(fill))),
    ];
    fields.extend(bucket);
    fields.extend(global());
    fields.push(("scheduler", scheduler));
    Ok(entries(fields))
}

/// `flow_control.sampler`. An accept percentage from a signal is the
/// policy's 100 (what Aperture's sampler takes while the signal is
/// missing) with an actuator, returned beside it.
pub(super) fn sampler(cx: &mut Cx, ctx: &Ctx, mut o: Obj) -> Result<(Node, Option<String>), Skip> {
    let mut params = o.need_obj("parameters")?;
    let selectors = selectors(cx, &mut params, "selectors")?;
    let session = label_field(&mut params, "session_label_key")?;
    let status = status(cx, &mut params, "denied_response_status_code");
    if params.bool("ramp_mode")?.unwrap_or(false) {
        return Err(Skip::new(
            params.at("ramp_mode"),
            "a sampler in ramp mode belongs to a load ramp: use Sluice's load_ramp (docs/controller.md)",
        ));
    }
    params.finish(cx, "Sampler.Parameters");
    let percentage_path = o.at("in_ports.accept_percentage");
    let mut driven_by = None;
    let percentage = match o.obj("in_ports")? {
        Some(mut ins) => {
            let p = port(cx, ctx.constants, &mut ins, "accept_percentage")?;
            ins.finish(cx, "Sampler.Ins");
            p
        }
        None => None,
    };
    let percentage = match percentage {
        Some(Port::Const(v)) if (0.0..=100.0).contains(&v) => v,
        Some(Port::Const(v)) => {
            return Err(Skip::new(
                percentage_path,
                format!("{v} is not a percentage"),
            ));
        }
        Some(Port::Signal(s)) => {
            driven_by = Some(s);
            100.0
        }
        None => {
            return Err(Skip::new(
                percentage_path,
                "required, and missing (Aperture's sampler without it accepted nothing)",
            ));
        }
    };
    let values_path = o.at("pass_through_label_values");
    let values = o
        .list("pass_through_label_values")?
        .iter()
        .enumerate()
        .map(|(i, v)| scalar_text(v, &index(&values_path, i)).map(Node::Str))
        .collect::<Result<Vec<_>, _>>()?;
    o.ignore(&["pass_through_label_values_config_key"]);
    o.finish(cx, "Sampler");
    let node = entries(vec![
        ("name", Some(Node::str(&ctx.name))),
        ("selectors", Some(selectors)),
        ("accept_percentage", Some(Node::num(percentage))),
        ("session_label_key", session),
        (
            "pass_through_label_values",
            (!values.is_empty()).then_some(Node::FlowList(values)),
        ),
        ("denied_status_code", status),
    ]);
    Ok((node, driven_by))
}

/// A `LoadScheduler.Parameters` (with the component's `dry_run`) as a
/// Sluice load scheduler named `name`.
pub(super) fn load_scheduler_parameters(
    cx: &mut Cx,
    name: &str,
    mut p: Obj,
    load_multiplier: Option<f64>,
    dry_run: bool,
) -> Result<Node, Skip> {
    let selectors = selectors(cx, &mut p, "selectors")?;
    let latency_tokens = p.bool("workload_latency_based_tokens")?.unwrap_or(false);
    let scheduler = p.obj("scheduler")?.map(|s| scheduler(cx, s)).transpose()?;
    p.finish(cx, "LoadScheduler.Parameters");
    Ok(entries(vec![
        ("name", Some(Node::str(name))),
        ("selectors", Some(selectors)),
        ("load_multiplier", load_multiplier.map(Node::num)),
        (
            "workload_latency_based_tokens",
            latency_tokens.then_some(Node::Bool(true)),
        ),
        ("dry_run", dry_run.then_some(Node::Bool(true))),
        ("scheduler", scheduler),
    ]))
}

/// `Scheduler`: workloads, defaults, label keys and the status.
fn scheduler(cx: &mut Cx, mut o: Obj) -> Result<Node, Skip> {
    let workloads_path = o.at("workloads");
    let mut workloads = Vec::new();
    for (i, v) in o.list("workloads")?.iter().enumerate() {
        let mut w = Obj::new(v, index(&workloads_path, i))?;
        let name_path = w.at("name");
        let name = match w.non_empty("name")? {
            Some(n) => {
                match valid::<Name>(n) {
                    Ok(()) => Some(Node::str(n)),
                    Err(e) => {
                        cx.skip(Skip::new(
                        name_path,
                        format!("{e}; the workload is left unnamed (workload_label_key cannot name it)"),
                    ));
                        None
                    }
                }
            }
            None => None,
        };
        let matcher = w
            .obj("label_matcher")?
            .map(|m| label_matcher(cx, m))
            .transpose()?
            .filter(|m| !matches!(m, Node::Map(e) if e.is_empty()));
        let parameters = w
            .obj("parameters")?
            .map(|p| workload_parameters(cx, p))
            .transpose()?;
        w.finish(cx, "Scheduler.Workload");
        workloads.push(map([
            ("name", name),
            ("label_matcher", matcher),
            ("parameters", parameters),
        ]));
    }
    let defaults = o
        .obj("default_workload_parameters")?
        .map(|p| workload_parameters(cx, p))
        .transpose()?;
    let margin = o
        .duration("decision_deadline_margin")?
        .map(|d| Node::Str(d.text));
    let mut fields = vec![
        (
            "workloads",
            (!workloads.is_empty()).then_some(Node::List(workloads)),
        ),
        ("default_workload_parameters", defaults),
    ];
    for key in [
        "priority_label_key",
        "tokens_label_key",
        "workload_label_key",
        "fairness_label_key",
    ] {
        fields.push((key, label_field(&mut o, key)?));
    }
    fields.push(("decision_deadline_margin", margin));
    fields.push((
        "denied_status_code",
        status(cx, &mut o, "denied_response_status_code"),
    ));
    o.finish(cx, "Scheduler");
    Ok(entries(fields))
}

/// `Workload.Parameters`. An absent `queue_timeout` is Aperture's "until
/// the Check's deadline" and Sluice's 1 s: the same with Envoy's ext_authz
/// timeout below 1 s (0.25 s in Aperture's Istio chart).
fn workload_parameters(cx: &mut Cx, mut p: Obj) -> Result<Node, Skip> {
    let priority = p.f64("priority")?;
    if let Some(v) = priority.filter(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(Skip::new(p.at("priority"), format!("{v} is not above 0")));
    }
    let tokens = p.f64("tokens")?;
    if let Some(v) = tokens.filter(|v| !(v.is_finite() && *v >= 0.0)) {
        return Err(Skip::new(
            p.at("tokens"),
            format!("{v} is not a number >= 0"),
        ));
    }
    let timeout = p.duration("queue_timeout")?.map(|d| Node::Str(d.text));
    p.finish(cx, "Workload.Parameters");
    Ok(flow_map([
        ("priority", priority.map(Node::num)),
        ("tokens", tokens.map(Node::num)),
        ("queue_timeout", timeout),
    ]))
}
