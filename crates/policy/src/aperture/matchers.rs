//! Selectors and label matchers: Aperture's and Sluice's have the same
//! shape, less `agent_group` (gathered for the check in `mod.rs`) and with
//! `match_list` joining `match_expressions`; names, label names and
//! regular expressions are checked as Sluice checks them.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::input::{Cx, Obj, Skip, index, join, scalar_text, text};
use super::output::{Node, flow_map, map};
use crate::types::{LabelName, Name, RegexSpec};

/// `Ok` when `value` reads as Sluice's `T` (a name, a label name, a
/// regex), with Sluice's own message otherwise.
pub(super) fn valid<T: DeserializeOwned>(value: &str) -> Result<(), String> {
    serde_json::from_value::<T>(Value::String(value.to_owned()))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A label name, checked as Sluice checks it.
pub(super) fn label(value: &str, path: &str) -> Result<Node, Skip> {
    valid::<LabelName>(value)
        .map(|()| Node::str(value))
        .map_err(|e| Skip::new(path, e))
}

/// Field `key` of `o`, a label name, if given (empty is not given).
pub(super) fn label_field(o: &mut Obj, key: &str) -> Result<Option<Node>, Skip> {
    let path = o.at(key);
    o.non_empty(key)?.map(|v| label(v, &path)).transpose()
}

/// Field `key` of `owner`, a list of selectors. A selector Sluice cannot
/// read is left out (and listed); none left is an error.
pub(super) fn selectors(cx: &mut Cx, owner: &mut Obj, key: &str) -> Result<Node, Skip> {
    let path = owner.at(key);
    let list = owner.list(key)?;
    if list.is_empty() {
        return Err(Skip::new(path, "required, and missing"));
    }
    let mut out = Vec::new();
    for (i, v) in list.iter().enumerate() {
        match selector(cx, v, index(&path, i)) {
            Ok(n) => out.push(n),
            Err(s) => cx.skip(Skip::new(
                s.path,
                format!("{}; the selector is left out", s.reason),
            )),
        }
    }
    if out.is_empty() {
        return Err(Skip::new(path, "no selector is carried over"));
    }
    Ok(Node::List(out))
}

fn selector(cx: &mut Cx, v: &Value, path: String) -> Result<Node, Skip> {
    let mut o = Obj::new(v, path)?;
    let cp_path = o.at("control_point");
    let control_point = o
        .non_empty("control_point")?
        .ok_or_else(|| Skip::new(&cp_path, "required, and missing"))?;
    valid::<Name>(control_point)
        .map_err(|e| Skip::new(&cp_path, format!("Sluice's control points are names: {e}")))?;
    let group = o
        .non_empty("agent_group")?
        .unwrap_or("aperture-cloud")
        .to_owned();
    cx.agent_groups.push((o.at("agent_group"), group));
    let service = o.non_empty("service")?.filter(|s| *s != "any");
    let matcher = o
        .obj("label_matcher")?
        .map(|m| label_matcher(cx, m))
        .transpose()?
        .filter(|m| !matches!(m, Node::Map(e) if e.is_empty()));
    o.finish(cx, "Selector");
    let fields = [
        ("control_point", Some(Node::str(control_point))),
        ("service", service.map(Node::str)),
        ("label_matcher", matcher),
    ];
    Ok(if fields[2].1.is_some() {
        map(fields)
    } else {
        flow_map(fields)
    })
}

/// A `label_matcher`; `match_list` (Aperture 2.x's name) joins
/// `match_expressions`, as both are ANDed. Any part Sluice cannot read
/// fails the whole matcher: leaving a condition out would widen it.
pub(super) fn label_matcher(cx: &mut Cx, mut o: Obj) -> Result<Node, Skip> {
    let mut labels = Vec::new();
    for (k, v) in o.entries("match_labels")? {
        let path = join(&o.at("match_labels"), k);
        label(k, &path)?;
        labels.push((k.to_owned(), Node::Str(scalar_text(v, &path)?)));
    }
    let mut expressions = Vec::new();
    for key in ["match_expressions", "match_list"] {
        let path = o.at(key);
        for (i, v) in o.list(key)?.iter().enumerate() {
            expressions.push(requirement(cx, v, index(&path, i))?);
        }
    }
    let expression = o
        .get("expression")
        .map(|v| expression(cx, v, o.at("expression")))
        .transpose()?;
    o.finish(cx, "LabelMatcher");
    Ok(map([
        (
            "match_labels",
            (!labels.is_empty()).then_some(Node::Map(labels)),
        ),
        (
            "match_expressions",
            (!expressions.is_empty()).then_some(Node::List(expressions)),
        ),
        ("expression", expression),
    ]))
}

fn requirement(cx: &mut Cx, v: &Value, path: String) -> Result<Node, Skip> {
    let mut o = Obj::new(v, path)?;
    let key_path = o.at("key");
    let key = o
        .non_empty("key")?
        .ok_or_else(|| Skip::new(&key_path, "required, and missing"))?;
    let key = label(key, &key_path)?;
    let op_path = o.at("operator");
    let operator = o.str("operator")?.unwrap_or("");
    if !["In", "NotIn", "Exists", "DoesNotExist"].contains(&operator) {
        return Err(Skip::new(
            op_path,
            format!("{operator:?} is not In, NotIn, Exists or DoesNotExist"),
        ));
    }
    let values_path = o.at("values");
    let values = o
        .list("values")?
        .iter()
        .enumerate()
        .map(|(i, v)| scalar_text(v, &index(&values_path, i)).map(Node::Str))
        .collect::<Result<Vec<_>, _>>()?;
    o.finish(cx, "MatchRequirement");
    Ok(flow_map([
        ("key", Some(key)),
        ("operator", Some(Node::str(operator))),
        (
            "values",
            (!values.is_empty()).then_some(Node::FlowList(values)),
        ),
    ]))
}

/// Aperture's expression tree, which Sluice has in the same shape. Regular
/// expressions are Go's RE2 syntax in Aperture and the `regex` crate's in
/// Sluice: the same language but for a few spellings, checked here.
fn expression(cx: &mut Cx, v: &Value, path: String) -> Result<Node, Skip> {
    let mut o = Obj::new(v, path.clone())?;
    let given: Vec<&str> = [
        "not",
        "all",
        "any",
        "label_exists",
        "label_equals",
        "label_matches",
    ]
    .into_iter()
    .filter(|k| o.has(k))
    .collect();
    let [variant] = given[..] else {
        o.finish(cx, "Expression");
        return Err(Skip::new(
            path,
            "an expression needs exactly one of not, all, any, label_exists, label_equals, label_matches",
        ));
    };
    let at = o.at(variant);
    let node = match variant {
        "not" => Node::Map(vec![(
            "not".to_owned(),
            expression(cx, o.need("not")?, at)?,
        )]),
        "all" | "any" => {
            let mut list = o.obj(variant)?.expect("present");
            let of_path = list.at("of");
            let of = list
                .list("of")?
                .iter()
                .enumerate()
                .map(|(i, e)| expression(cx, e, index(&of_path, i)))
                .collect::<Result<Vec<_>, _>>()?;
            list.finish(cx, "Expression.List");
            Node::Map(vec![(
                variant.to_owned(),
                Node::Map(vec![("of".to_owned(), Node::List(of))]),
            )])
        }
        "label_exists" => flow_map([(
            "label_exists",
            Some(label(text(o.need("label_exists")?, &at)?, &at)?),
        )]),
        "label_equals" => {
            let mut e = o.obj("label_equals")?.expect("present");
            let label_path = e.at("label");
            let name = label(text(e.need("label")?, &label_path)?, &label_path)?;
            let value_path = e.at("value");
            let value = e
                .get("value")
                .map(|v| scalar_text(v, &value_path))
                .transpose()?
                .unwrap_or_default();
            e.finish(cx, "EqualsExpression");
            flow_map([(
                "label_equals",
                Some(flow_map([
                    ("label", Some(name)),
                    ("value", Some(Node::Str(value))),
                ])),
            )])
        }
        _ => {
            let mut e = o.obj("label_matches")?.expect("present");
            let label_path = e.at("label");
            let name = label(text(e.need("label")?, &label_path)?, &label_path)?;
            let regex_path = e.at("regex");
            let regex = text(e.need("regex")?, &regex_path)?;
            valid::<RegexSpec>(regex).map_err(|err| {
                // The regex crate's message spans lines (the pattern, a
                // caret, the error): its last line says what is wrong.
                let why = err.lines().last().unwrap_or_default().trim();
                Skip::new(
                    &regex_path,
                    format!("Sluice's regex syntax refuses {regex:?}: {why}"),
                )
            })?;
            e.finish(cx, "MatchesExpression");
            flow_map([(
                "label_matches",
                Some(flow_map([
                    ("label", Some(name)),
                    ("regex", Some(Node::str(regex))),
                ])),
            )])
        }
    };
    o.finish(cx, "Expression");
    Ok(node)
}
