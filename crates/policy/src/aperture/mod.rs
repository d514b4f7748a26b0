//! Aperture's policies in Sluice's language: what `sluice import-aperture`
//! runs.
//!
//! The input is one of Aperture's policies: its `Policy` custom resource
//! (`apiVersion: fluxninja.com/v1alpha1`, `kind: Policy`, the policy under
//! `spec`) or the plain policy `aperturectl blueprints generate` writes
//! (`circuit:` and `resources:` at the top, the policy named by its file).
//! Field names and defaults are those of Aperture's protos
//! (`api/aperture/policy/language/v1/*.proto` in fluxninja/aperture).
//! The output is one Sluice policy as YAML, which has been loaded with
//! [`crate::parse_policy`] before it is returned, and the list of what it
//! does not carry over, each with its path in the input and the reason.
//!
//! Nothing here reads or writes a file: the command line hands in the
//! text and writes what comes back.
//!
//! Layout:
//! - this file: [`convert`], telling Aperture's two forms apart, the
//!   policy assembled and loaded, and a component Sluice's loader refuses
//!   left out (and listed) until the rest loads;
//! - `input`: reading Aperture's YAML field by field, so that every field
//!   is carried over, ignored on purpose or listed;
//! - `matchers`: selectors and label matchers;
//! - `resources`: flux meters and classifiers;
//! - `flow`: the flow-control components (limiters, samplers, schedulers);
//! - `circuit`: the circuit's signal processors, and the AIMD and AIAD
//!   load schedulers;
//! - `output`: the ordered YAML tree written.

mod circuit;
mod flow;
mod input;
mod matchers;
mod output;
mod resources;

use std::fmt;
use std::path::Path;

use serde_json::Value;

use input::{Cx, Obj, Skip, index, join};
use output::{Node, map};

/// What `sluice import-aperture` made of one file.
#[derive(Clone, Debug)]
pub struct Conversion {
    /// The policy's name: the resource's `metadata.name`, or the file's
    /// name without its extension for a plain policy.
    pub name: String,
    /// The Sluice policy, YAML that [`crate::parse_policy`] loads.
    pub policy: String,
    /// What is not carried over, in the order met in the input.
    pub skipped: Vec<Skipped>,
}

/// A part of the input that is not carried over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Where it is in the input, e.g.
    /// `spec.resources.flow_control.classifiers[1].rego`.
    pub path: String,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// A file that cannot be converted at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportError {
    /// The text is not one YAML document.
    NotYaml(String),
    /// The document is not one of Aperture's policies.
    NotAperture(String),
    /// The policy has no name Sluice can use.
    Name(String),
    /// What was converted does not load: a fault of the converter, with
    /// Sluice's loader's message.
    DoesNotLoad(String),
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportError::NotYaml(e) => write!(f, "not a YAML document: {e}"),
            ImportError::NotAperture(e) => write!(f, "not an Aperture policy: {e}"),
            ImportError::Name(e) => write!(f, "no policy name: {e}"),
            ImportError::DoesNotLoad(e) => write!(
                f,
                "the converted policy does not load (a bug in import-aperture): {e}"
            ),
        }
    }
}

impl std::error::Error for ImportError {}

impl Conversion {
    /// The policy file's text: a header naming `source` and, when it is
    /// partial, listing what is not carried over, then the policy.
    pub fn file_text(&self, source: &str) -> String {
        let one_line = |s: &str| s.replace(['\n', '\r'], " ");
        let mut out = format!(
            "# Converted from Aperture's policy {} by `sluice import-aperture`.\n",
            one_line(source)
        );
        if !self.skipped.is_empty() {
            out.push_str("# Not carried over (see docs/migrating-from-aperture.md):\n");
            for s in &self.skipped {
                out.push_str(&format!("# - {}\n", one_line(&s.to_string())));
            }
        }
        out.push_str(&self.policy);
        out
    }
}

/// A component converted, with the path of what it came from.
pub(crate) struct Item {
    /// The component as written to the policy.
    node: Node,
    /// Where in the input it came from: what is listed if the loader
    /// refuses it, and the comment after its name.
    origin: String,
}

/// A classifier converted: its rules apart, so that one Sluice refuses
/// leaves the others.
pub(crate) struct Classifier {
    /// Where in the input it came from.
    origin: String,
    /// Its selectors, converted.
    selectors: Node,
    /// Label, rule, path of the rule.
    rules: Vec<(String, Node, String)>,
}

/// The policy being assembled, one list per kind of component.
#[derive(Default)]
pub(crate) struct Draft {
    /// `classifiers`.
    classifiers: Vec<Classifier>,
    /// `flux_meters`.
    flux_meters: Vec<Item>,
    /// `samplers`.
    samplers: Vec<Item>,
    /// `rate_limiters`.
    rate_limiters: Vec<Item>,
    /// `concurrency_limiters`.
    concurrency_limiters: Vec<Item>,
    /// `concurrency_schedulers`.
    concurrency_schedulers: Vec<Item>,
    /// `quota_schedulers`.
    quota_schedulers: Vec<Item>,
    /// `load_schedulers`, those the AIMD and AIAD components drive too.
    load_schedulers: Vec<Item>,
    /// `circuit.components`, in Aperture's order (feedback loops read last
    /// tick's value in both).
    circuit: Vec<Item>,
}

/// Top-level keys of a Sluice policy: a file with `name` and one of these
/// is Sluice's already.
const SLUICE_KEYS: [&str; 9] = [
    "classifiers",
    "flux_meters",
    "samplers",
    "rate_limiters",
    "concurrency_limiters",
    "concurrency_schedulers",
    "quota_schedulers",
    "load_schedulers",
    "circuit",
];

/// Converts one Aperture policy, `text`; `file_stem` (the file's name
/// without its extension) names a plain policy, as `aperturectl` named the
/// file after the policy.
pub fn convert(text: &str, file_stem: &str) -> Result<Conversion, ImportError> {
    let options = serde_saphyr::options! { with_snippet: false };
    let mut docs: Vec<Value> = serde_saphyr::from_str_multiple_with_options(text, options)
        .map_err(|e| ImportError::NotYaml(e.to_string()))?;
    if docs.len() > 1 {
        return Err(ImportError::NotAperture(format!(
            "{} YAML documents: give one policy per file",
            docs.len()
        )));
    }
    let doc = docs.pop().unwrap_or(Value::Null);
    let Value::Object(top) = &doc else {
        return Err(ImportError::NotAperture(format!(
            "expected a mapping (a Policy resource, or circuit: and resources:), found {}",
            input::kind(&doc)
        )));
    };
    let mut cx = Cx::default();
    let (name, spec, prefix) = if top.contains_key("apiVersion") || top.contains_key("kind") {
        let api = top.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = top.get("kind").and_then(Value::as_str).unwrap_or("");
        if api != "fluxninja.com/v1alpha1" || kind != "Policy" {
            return Err(ImportError::NotAperture(format!(
                "apiVersion {api:?}, kind {kind:?}: Aperture's policy resource is apiVersion fluxninja.com/v1alpha1, kind Policy"
            )));
        }
        let name = top
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ImportError::Name("the Policy resource has no metadata.name".to_owned())
            })?;
        let spec = top.get("spec").filter(|s| s.is_object()).ok_or_else(|| {
            ImportError::NotAperture("the Policy resource has no spec".to_owned())
        })?;
        if top
            .get("dynamicConfig")
            .is_some_and(|d| !d.is_null() && !is_empty(d))
        {
            cx.skip(Skip::new(
                "dynamicConfig",
                "Sluice has no dynamic configuration: the policy's own values are used; edit them instead",
            ));
        }
        for key in top.keys() {
            // metadata's other fields and status are Kubernetes' business.
            if ![
                "apiVersion",
                "kind",
                "metadata",
                "spec",
                "dynamicConfig",
                "status",
            ]
            .contains(&key.as_str())
            {
                cx.skip(Skip::new(
                    key.as_str(),
                    "not a field of Aperture's Policy resource that Sluice knows",
                ));
            }
        }
        (name.to_owned(), spec, "spec")
    } else {
        if !(top.contains_key("circuit") || top.contains_key("resources")) {
            let sluice =
                top.contains_key("name") && SLUICE_KEYS.iter().any(|k| top.contains_key(*k));
            return Err(ImportError::NotAperture(if sluice {
                "it has name: and Sluice's component lists: it is a Sluice policy already"
                    .to_owned()
            } else {
                "neither a Policy resource (apiVersion fluxninja.com/v1alpha1, kind Policy) nor a policy with circuit: or resources:".to_owned()
            }));
        }
        (file_stem.to_owned(), &doc, "")
    };
    matchers::valid::<crate::types::Name>(&name)
        .map_err(|e| ImportError::Name(format!("{name:?}: {e}")))?;

    let mut draft = Draft::default();
    if let Ok(mut spec) = Obj::new(spec, prefix.to_owned()) {
        match spec.obj("resources") {
            Ok(Some(r)) => resources(&mut cx, r, &mut draft),
            Ok(None) => {}
            Err(s) => cx.skip(s),
        }
        match spec.obj("circuit") {
            Ok(Some(c)) => {
                if let Err(s) = circuit::circuit(&mut cx, &name, c, &mut draft) {
                    cx.skip(s);
                }
            }
            Ok(None) => {}
            Err(s) => cx.skip(s),
        }
        spec.finish(&mut cx, "Policy");
    }
    agent_groups(&mut cx);
    let policy = load(&mut cx, &name, &mut draft)?;
    Ok(Conversion {
        name,
        policy,
        skipped: cx.skipped,
    })
}

/// `resources`: flux meters and classifiers; infra meters and telemetry
/// collectors (OpenTelemetry collectors in Aperture's agents) are listed.
fn resources(cx: &mut Cx, mut r: Obj, draft: &mut Draft) {
    for key in ["infra_meters", "telemetry_collectors"] {
        // The blueprints write `infra_meters: {}`: nothing to list.
        if r.get(key).is_some_and(|v| !is_empty(v)) {
            cx.skip(Skip::new(
                r.at(key),
                "Sluice's sidecars run no OpenTelemetry collectors: scrape or remote-write those metrics to Prometheus otherwise",
            ));
        }
    }
    let fc = match r.obj("flow_control") {
        Ok(fc) => fc,
        Err(s) => {
            cx.skip(s);
            None
        }
    };
    r.finish(cx, "Resources");
    let Some(mut fc) = fc else {
        return;
    };
    let meters_path = fc.at("flux_meters");
    match fc.entries("flux_meters") {
        Ok(meters) => {
            for (name, v) in meters {
                let path = join(&meters_path, name);
                match resources::flux_meter(cx, name, v, path.clone()) {
                    Ok(node) => draft.flux_meters.push(Item { node, origin: path }),
                    Err(s) => cx.skip(not_carried(s, "flux meter")),
                }
            }
        }
        Err(s) => cx.skip(s),
    }
    let classifiers_path = fc.at("classifiers");
    match fc.list("classifiers") {
        Ok(list) => {
            for (i, v) in list.iter().enumerate() {
                match resources::classifier(cx, v, index(&classifiers_path, i)) {
                    Ok(c) => draft.classifiers.push(c),
                    Err(s) => cx.skip(not_carried(s, "classifier")),
                }
            }
        }
        Err(s) => cx.skip(s),
    }
    fc.finish(cx, "FlowControlResources");
}

/// An empty mapping or list: a field written with nothing in it.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(l) => l.is_empty(),
        _ => false,
    }
}

fn not_carried(s: Skip, what: &str) -> Skip {
    Skip::new(
        s.path,
        format!("{}; the {what} is not carried over", s.reason),
    )
}

/// A Sluice policy applies to every sidecar that loads it: one agent group.
/// When the selectors name several, those outside the group most of them
/// name are listed.
fn agent_groups(cx: &mut Cx) {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for (_, g) in &cx.agent_groups {
        match counts.iter_mut().find(|(name, _)| name == g) {
            Some((_, n)) => *n += 1,
            None => counts.push((g, 1)),
        }
    }
    if counts.len() < 2 {
        return;
    }
    // The most named group; of equals, the first named.
    let main = counts
        .iter()
        .fold(counts[0], |best, &c| if c.1 > best.1 { c } else { best })
        .0
        .to_owned();
    let others: Vec<(String, String)> = cx
        .agent_groups
        .iter()
        .filter(|(_, g)| *g != main)
        .cloned()
        .collect();
    for (path, group) in others {
        cx.skip(Skip::new(
            path,
            format!(
                "agent group {group:?}, where most of the policy's selectors name {main:?}: a Sluice policy applies to every sidecar that loads it, so split the policy by group"
            ),
        ));
    }
}

/// The policy as one YAML mapping, in the order of docs/policy.md.
fn assemble(name: &str, draft: &Draft) -> Node {
    let list = |items: &[Item]| {
        (!items.is_empty()).then(|| Node::List(items.iter().map(commented).collect()))
    };
    let classifiers = (!draft.classifiers.is_empty()).then(|| {
        Node::List(
            draft
                .classifiers
                .iter()
                .map(|c| {
                    map([
                        ("selectors", Some(c.selectors.clone())),
                        (
                            "rules",
                            Some(Node::Map(
                                c.rules
                                    .iter()
                                    .map(|(label, rule, _)| (label.clone(), rule.clone()))
                                    .collect(),
                            )),
                        ),
                    ])
                })
                .collect(),
        )
    });
    let circuit = (!draft.circuit.is_empty()).then(|| {
        map([(
            "components",
            Some(Node::List(
                draft.circuit.iter().map(|i| i.node.clone()).collect(),
            )),
        )])
    });
    map([
        ("name", Some(Node::str(name))),
        ("classifiers", classifiers),
        ("flux_meters", list(&draft.flux_meters)),
        ("samplers", list(&draft.samplers)),
        ("rate_limiters", list(&draft.rate_limiters)),
        ("concurrency_limiters", list(&draft.concurrency_limiters)),
        (
            "concurrency_schedulers",
            list(&draft.concurrency_schedulers),
        ),
        ("quota_schedulers", list(&draft.quota_schedulers)),
        ("load_schedulers", list(&draft.load_schedulers)),
        ("circuit", circuit),
    ])
}

/// A component with where it came from after its name.
fn commented(item: &Item) -> Node {
    match &item.node {
        Node::Map(fields) => Node::Map(
            fields
                .iter()
                .map(|(k, v)| {
                    if k == "name" {
                        (
                            k.clone(),
                            Node::Commented(Box::new(v.clone()), item.origin.clone()),
                        )
                    } else {
                        (k.clone(), v.clone())
                    }
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Writes the draft and loads it as Sluice would; a component the loader
/// refuses is left out and listed (with the loader's reason), and the rest
/// loaded again, until it loads. Whatever Sluice refuses beyond what the
/// conversion checks (a bucket layout, a circuit's wiring, names that
/// clash) thus never reaches the output.
fn load(cx: &mut Cx, name: &str, draft: &mut Draft) -> Result<String, ImportError> {
    let file = format!("{name}.yaml");
    loop {
        let yaml = output::to_yaml(&assemble(name, draft)).map_err(ImportError::DoesNotLoad)?;
        let err = match crate::parse_policy(Path::new(&file), &yaml) {
            Ok(_) => return Ok(yaml),
            Err(e) => e,
        };
        let refused =
            |origin: &str, what: String| Skip::new(origin, format!("Sluice refuses it: {what}"));
        let (list, i) = split_index(&err.field);
        let lists: [(&str, &mut Vec<Item>); 7] = [
            ("flux_meters", &mut draft.flux_meters),
            ("samplers", &mut draft.samplers),
            ("rate_limiters", &mut draft.rate_limiters),
            ("concurrency_limiters", &mut draft.concurrency_limiters),
            ("concurrency_schedulers", &mut draft.concurrency_schedulers),
            ("quota_schedulers", &mut draft.quota_schedulers),
            ("load_schedulers", &mut draft.load_schedulers),
        ];
        let mut dropped = false;
        // What the loader says, less the position in the output, which
        // the reader of the list has not seen.
        let within = err
            .field
            .split_once(']')
            .map_or("", |(_, rest)| rest.trim_start_matches('.'));
        let what = if within.is_empty() {
            err.message.clone()
        } else {
            format!("{within}: {}", err.message)
        };
        if let Some(i) = i {
            for (key, items) in lists {
                if key == list && i < items.len() {
                    let item = items.remove(i);
                    cx.skip(refused(&item.origin, what.clone()));
                    dropped = true;
                    break;
                }
            }
            if list == "classifiers" && i < draft.classifiers.len() {
                let c = &mut draft.classifiers[i];
                let rule = err
                    .field
                    .strip_prefix(&format!("classifiers[{i}].rules."))
                    .and_then(|rest| {
                        c.rules
                            .iter()
                            .position(|(l, _, _)| rest == l || rest.starts_with(&format!("{l}.")))
                    });
                match rule {
                    Some(r) => {
                        let (_, _, origin) = c.rules.remove(r);
                        cx.skip(refused(&origin, err.message.clone()));
                        if c.rules.is_empty() {
                            draft.classifiers.remove(i);
                        }
                    }
                    None => {
                        let c = draft.classifiers.remove(i);
                        cx.skip(refused(&c.origin, what.clone()));
                    }
                }
                dropped = true;
            }
        } else if err.field == "circuit" {
            // The circuit's errors name the component: `components[i]: ...`.
            let (_, i) = split_index(&err.message);
            if let Some(i) = i.filter(|&i| i < draft.circuit.len()) {
                let item = draft.circuit.remove(i);
                let message = err
                    .message
                    .split_once(": ")
                    .map_or(err.message.as_str(), |(_, m)| m);
                match message.strip_prefix("no component writes signal ") {
                    // Its input is the output of something not carried over.
                    Some(signal) => cx.skip(Skip::new(
                        &item.origin,
                        format!("it reads the signal {signal}, which nothing carried over writes"),
                    )),
                    None => cx.skip(refused(&item.origin, message.to_owned())),
                }
                dropped = true;
            }
        }
        if !dropped {
            return Err(ImportError::DoesNotLoad(err.to_string()));
        }
    }
}

/// `list[i]...` → (`list`, `Some(i)`); otherwise the whole text and `None`.
fn split_index(field: &str) -> (&str, Option<usize>) {
    let Some((list, rest)) = field.split_once('[') else {
        return (field, None);
    };
    let i = rest.split_once(']').and_then(|(i, _)| i.parse().ok());
    (list, i)
}
