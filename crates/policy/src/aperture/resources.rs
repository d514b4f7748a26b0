//! Aperture's `resources.flow_control`: flux meters (keyed by name) and
//! classifiers, whose rules lose the `extractor:` wrapper and whose path
//! templates keep Aperture's order of precedence.

use std::cmp::Reverse;

use serde_json::Value;

use super::input::{Cx, Obj, Skip, index, join, number, scalar_text, text};
use super::matchers::{label, selectors, valid};
use super::output::{Node, flow_map, map};
use crate::types::Name;

/// A flux meter of `resources.flow_control.flux_meters`, keyed by its
/// name.
pub(super) fn flux_meter(cx: &mut Cx, name: &str, v: &Value, path: String) -> Result<Node, Skip> {
    valid::<Name>(name).map_err(|e| Skip::new(&path, format!("its name: {e}")))?;
    let mut o = Obj::new(v, path)?;
    let selectors = selectors(cx, &mut o, "selectors")?;
    let attribute_key = o.non_empty("attribute_key")?.map(Node::str);
    let mut layout = None;
    for key in [
        "static_buckets",
        "linear_buckets",
        "exponential_buckets",
        "exponential_buckets_range",
    ] {
        let Some(mut b) = o.obj(key)? else {
            continue;
        };
        if layout.is_some() {
            return Err(Skip::new(b.path, "a flux meter has one bucket layout"));
        }
        let number_field = |b: &mut Obj, field: &str| -> Result<Option<Node>, Skip> {
            Ok(Some(Node::num(b.f64(field)?.unwrap_or(0.0))))
        };
        let node = match key {
            // Empty: Aperture's default buckets, which are Sluice's.
            "static_buckets" => {
                let path = b.at("buckets");
                let buckets = b
                    .list("buckets")?
                    .iter()
                    .enumerate()
                    .map(|(i, v)| number(v, &index(&path, i)).map(Node::num))
                    .collect::<Result<Vec<_>, _>>()?;
                (!buckets.is_empty()).then_some(Node::FlowList(buckets))
            }
            "linear_buckets" => Some(flow_map([
                ("start", number_field(&mut b, "start")?),
                ("width", number_field(&mut b, "width")?),
                ("count", number_field(&mut b, "count")?),
            ])),
            "exponential_buckets" => Some(flow_map([
                ("start", number_field(&mut b, "start")?),
                ("factor", number_field(&mut b, "factor")?),
                ("count", number_field(&mut b, "count")?),
            ])),
            _ => Some(flow_map([
                ("min", number_field(&mut b, "min")?),
                ("max", number_field(&mut b, "max")?),
                ("count", number_field(&mut b, "count")?),
            ])),
        };
        b.finish(cx, "FluxMeter buckets");
        layout = Some(node.map(|n| (key, n)));
    }
    o.finish(cx, "FluxMeter");
    let mut fields = vec![
        ("name".to_owned(), Node::str(name)),
        ("selectors".to_owned(), selectors),
    ];
    if let Some(a) = attribute_key {
        fields.push(("attribute_key".to_owned(), a));
    }
    if let Some(Some((key, node))) = layout {
        fields.push((key.to_owned(), node));
    }
    Ok(Node::Map(fields))
}

/// A classifier: its selectors and its rules, each rule converted on its
/// own (a rule Sluice cannot read is listed and left out; its classifier
/// keeps the others).
pub(super) fn classifier(cx: &mut Cx, v: &Value, path: String) -> Result<super::Classifier, Skip> {
    let mut o = Obj::new(v, path)?;
    let selectors = selectors(cx, &mut o, "selectors")?;
    if o.get("rego").is_some() {
        cx.skip(Skip::new(
            o.at("rego"),
            "Sluice has no Rego classifiers: write its labels as rules (from, json, jwt, path_template)",
        ));
    }
    let mut rules = Vec::new();
    let rules_path = o.at("rules");
    for (name, rule_value) in o.entries("rules")? {
        let rule_path = join(&rules_path, name);
        match rule(cx, name, rule_value, rule_path.clone()) {
            Ok(node) => rules.push((name.to_owned(), node, rule_path)),
            Err(s) => cx.skip(Skip::new(
                s.path,
                format!("{}; the rule is left out", s.reason),
            )),
        }
    }
    let origin = o.path.clone();
    o.finish(cx, "Classifier");
    if rules.is_empty() {
        return Err(Skip::new(origin, "no rule is carried over"));
    }
    Ok(super::Classifier {
        origin,
        selectors,
        rules,
    })
}

fn rule(cx: &mut Cx, name: &str, v: &Value, path: String) -> Result<Node, Skip> {
    label(name, &path)?;
    let mut o = Obj::new(v, path)?;
    let telemetry = o.bool("telemetry")?.unwrap_or(true);
    let mut e = o.need_obj("extractor")?;
    let given: Vec<&str> = ["from", "json", "address", "jwt", "path_templates"]
        .into_iter()
        .filter(|k| e.has(k))
        .collect();
    let [variant] = given[..] else {
        return Err(Skip::new(
            e.path,
            "an extractor needs exactly one of from, json, address, jwt, path_templates",
        ));
    };
    let at = e.at(variant);
    let (key, node) = match variant {
        "from" => (
            "from",
            Node::str(attribute(text(e.need("from")?, &at)?, &at)?),
        ),
        "json" => {
            let mut j = e.obj("json")?.expect("present");
            let from_path = j.at("from");
            let from = j
                .non_empty("from")?
                .ok_or_else(|| Skip::new(&from_path, "required, and missing"))?;
            let from = attribute(from, &from_path)?;
            let pointer = j.str("pointer")?.unwrap_or("");
            if !(pointer.is_empty() || pointer.starts_with('/')) {
                return Err(Skip::new(
                    j.at("pointer"),
                    format!("{pointer:?} is not a JSON pointer (RFC 6901)"),
                ));
            }
            j.finish(cx, "JSONExtractor");
            (
                "json",
                flow_map([
                    // Sluice's default source is the body.
                    (
                        "from",
                        (from != "request.http.body").then(|| Node::str(from)),
                    ),
                    ("pointer", Some(Node::str(pointer))),
                ]),
            )
        }
        "jwt" => {
            let mut j = e.obj("jwt")?.expect("present");
            let from_path = j.at("from");
            let from = j
                .non_empty("from")?
                .ok_or_else(|| Skip::new(&from_path, "required, and missing"))?;
            let from = attribute(from, &from_path)?;
            let pointer_path = j.at("json_pointer");
            let pointer = j.str("json_pointer")?.unwrap_or("");
            if pointer.is_empty() {
                return Err(Skip::new(
                    pointer_path,
                    "the whole JWT payload as a label: Sluice's jwt rule reads one claim",
                ));
            }
            if !pointer.starts_with('/') {
                return Err(Skip::new(
                    pointer_path,
                    format!("{pointer:?} is not a JSON pointer (RFC 6901)"),
                ));
            }
            j.finish(cx, "JWTExtractor");
            (
                "jwt",
                flow_map([
                    (
                        "from",
                        (from != "request.http.bearer").then(|| Node::str(from)),
                    ),
                    ("claim", Some(Node::str(pointer))),
                ]),
            )
        }
        "path_templates" => {
            let mut t = e.obj("path_templates")?.expect("present");
            let node = path_templates(&mut t)?;
            t.finish(cx, "PathTemplateMatcher");
            ("path_template", node)
        }
        _ => {
            return Err(Skip::new(
                at,
                "Sluice has no address extractor: its labels source.address and destination.address hold the IP without the port",
            ));
        }
    };
    e.finish(cx, "Extractor");
    o.finish(cx, "Rule");
    Ok(map([
        (key, Some(node)),
        ("telemetry", (!telemetry).then_some(Node::Bool(false))),
    ]))
}

/// An attribute path of Envoy's `AttributeContext` (Aperture's `from`) as
/// Sluice's `from` reads it. Envoy's `request.http.path` is the request
/// target with its query string, which is Sluice's `http.target` label
/// (Sluice's `request.http.path` is the path without it).
fn attribute<'a>(from: &'a str, path: &str) -> Result<&'a str, Skip> {
    match from {
        "request.http.path" => Ok("http.target"),
        "request.http.method"
        | "request.http.host"
        | "request.http.scheme"
        | "request.http.protocol"
        | "request.http.body"
        | "request.http.bearer" => Ok(from),
        _ if from
            .strip_prefix("request.http.headers.")
            .is_some_and(|h| !h.is_empty() && !h.contains('.')) =>
        {
            Ok(from)
        }
        _ => Err(Skip::new(
            path,
            format!(
                "Sluice's classifiers read request.http.headers.<name>, method, path, host, scheme, protocol, body and bearer, not {from:?}"
            ),
        )),
    }
}

/// One template of Aperture's `template_values`, parsed as Aperture's
/// `ParsePathTemplate` does (`pkg/policies/flowcontrol/resources/
/// classifier/extractors/path_template.go`).
struct Template {
    /// The segments, empty ones (`//`, a trailing `/`) dropped.
    segments: Vec<String>,
    /// Static segments before the first parameter.
    prefix: usize,
    /// `{...}` segments.
    params: usize,
    /// A final `*`.
    wildcard: bool,
    /// Aperture's normalized text (`/a/b/{}/*`), its tie-breaker.
    normalized: String,
    /// The label's value when it matches.
    value: String,
}

/// `template_values` in Aperture's order of precedence, which Sluice's
/// map form (first match wins) then keeps: Aperture sorts by normalized
/// text, then (stably) puts the most specific first: more static
/// segments, then more parameters, then no wildcard (`compile.go`,
/// `fromMostSpecific`, and `IsMoreSpecificThan`).
fn path_templates(o: &mut Obj) -> Result<Node, Skip> {
    let path = o.at("template_values");
    let mut templates = Vec::new();
    for (raw, value) in o.entries("template_values")? {
        let at = join(&path, raw);
        let value = scalar_text(value, &at)?;
        if value.is_empty() {
            return Err(Skip::new(at, "a template's value must not be empty"));
        }
        let mut t = Template {
            segments: Vec::new(),
            prefix: 0,
            params: 0,
            wildcard: false,
            normalized: String::new(),
            value,
        };
        for segment in raw.split('/').filter(|s| !s.is_empty()) {
            if t.wildcard {
                return Err(Skip::new(at, "`*` must be the last segment"));
            }
            if segment == "*" {
                t.wildcard = true;
            } else if segment.contains(['{', '}']) {
                if !(segment.starts_with('{') && segment.ends_with('}')) {
                    return Err(Skip::new(at, format!("invalid parameter {segment:?}")));
                }
                t.params += 1;
            } else if t.params != 0 {
                return Err(Skip::new(
                    at,
                    "parameters must come after the static segments",
                ));
            } else {
                t.prefix += 1;
            }
            t.segments.push(segment.to_owned());
        }
        let statics = &t.segments[..t.prefix];
        t.normalized = format!(
            "/{}{}{}",
            statics.join("/"),
            "/{}".repeat(t.params),
            if t.wildcard { "/*" } else { "" }
        );
        templates.push(t);
    }
    if templates.is_empty() {
        return Err(Skip::new(path, "required, and missing"));
    }
    templates.sort_by(|a, b| a.normalized.cmp(&b.normalized));
    templates.sort_by_key(|t| (Reverse(t.prefix), Reverse(t.params), t.wildcard));
    let mut out: Vec<(String, Node)> = Vec::new();
    for t in templates {
        let template = format!("/{}", t.segments.join("/"));
        // Two spellings of one template (`/a`, `/a/`): Aperture's choice
        // between them depended on Go's map order; the first is kept.
        if !out.iter().any(|(k, _)| *k == template) {
            out.push((template, Node::Str(t.value)));
        }
    }
    Ok(Node::Map(out))
}
