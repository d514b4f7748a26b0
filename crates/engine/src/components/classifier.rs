//! Classifiers: add labels to a flow from what the request carries.
//!
//! Extractors: copy a label, header or request attribute (`from`); read a
//! value inside a JSON document, by default the body Envoy sent with
//! `with_request_body` (`json`); name the path template that matches the path,
//! or the value mapped to it (`path_template`); read a JWT claim, by default from the bearer token
//! (`jwt`). Classifier labels win over request labels of the same name for
//! every later stage, and those marked `telemetry` (the default, as in
//! Aperture) go upstream in the `baggage` header.
//!
//! A rule whose source is absent sets nothing. A rule whose source is there
//! but unreadable (a body that is not JSON, a token that is not a JWT) sets
//! nothing and counts `classifier_errors_total`: bad input never fails a flow.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine as _;
use prometheus::IntCounter;
use smallvec::SmallVec;

use sluice_policy::{ClassifierSpec, ExtractorSpec};

use super::selector::Selector;
use crate::labels::{FlowLabels, LabelRef};
use crate::metrics::{Metrics, Series};

/// One compiled classifier.
#[derive(Debug)]
pub struct Classifier {
    /// The policy it belongs to.
    pub policy: Arc<str>,
    /// Its name in metrics: `name`, or `classifiers[i]`.
    pub name: Arc<str>,
    /// Which flows it classifies.
    pub selectors: Box<[Selector]>,
    /// Its rules, in label-name order.
    rules: Box<[Rule]>,
    /// `classifier_counter_total` for this classifier.
    classified: IntCounter,
    /// `classifier_errors_total` for this classifier.
    errors: IntCounter,
    /// Every series it writes.
    pub series: Series,
}

#[derive(Debug)]
struct Rule {
    /// The label it sets.
    label: Arc<str>,
    /// How it finds the value.
    extractor: Extractor,
    /// Whether the label goes upstream in `baggage`.
    telemetry: bool,
}

#[derive(Debug)]
enum Extractor {
    Copy(Source),
    Json {
        from: Source,
        pointer: Box<str>,
    },
    PathTemplate {
        path: LabelRef,
        templates: Box<[PathTemplate]>,
    },
    Jwt {
        from: Source,
        claim: Claim,
    },
}

/// Where an extractor reads from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// A label (request attribute, header, baggage member, classifier label).
    Label(LabelRef),
    /// The request body.
    Body,
    /// The token of `authorization: Bearer <token>`; holds the header's label.
    Bearer(LabelRef),
}

impl Source {
    /// Reads a `from` as written: Aperture's `request.http.*` paths or a label.
    pub(crate) fn parse(from: &str) -> Self {
        let label = match from {
            "request.http.body" => return Source::Body,
            "request.http.bearer" => return Source::Bearer(LabelRef::header("authorization")),
            "request.http.method" => "http.method",
            "request.http.path" => "http.path",
            "request.http.host" => "http.host",
            "request.http.scheme" => "http.scheme",
            "request.http.protocol" => "http.flavor",
            _ => {
                if let Some(header) = from.strip_prefix("request.http.headers.") {
                    return Source::Label(LabelRef::header(header));
                }
                from
            }
        };
        Source::Label(LabelRef::new(label))
    }
}

#[derive(Debug)]
enum Claim {
    Name(Box<str>),
    Pointer(Box<str>),
}

#[derive(Debug)]
struct PathTemplate {
    /// The label's value when this template is the first to match.
    value: Box<str>,
    segments: Box<[Segment]>,
}

#[derive(Debug)]
enum Segment {
    Literal(Box<str>),
    /// `{name}`: any one non-empty segment.
    Param,
    /// A final `*`: the rest of the path, possibly empty.
    Rest,
}

impl PathTemplate {
    fn compile(text: &str, value: &str) -> Self {
        // A trailing slash is the same template, as it is the same path.
        let segments = text
            .trim_start_matches('/')
            .trim_end_matches('/')
            .split('/')
            .map(|seg| {
                if seg == "*" {
                    Segment::Rest
                } else if seg.starts_with('{') && seg.ends_with('}') {
                    Segment::Param
                } else {
                    Segment::Literal(seg.into())
                }
            })
            .collect();
        PathTemplate {
            value: value.into(),
            segments,
        }
    }

    fn matches(&self, path: &str) -> bool {
        let mut parts = path.trim_start_matches('/').split('/');
        for seg in self.segments.iter() {
            match seg {
                Segment::Rest => return true,
                Segment::Param => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(lit) => match parts.next() {
                    Some(p) if p == &**lit => {}
                    _ => return false,
                },
            }
        }
        // A trailing slash is the same path.
        matches!(parts.next(), None | Some("")) && parts.next().is_none()
    }
}

/// Per-flow memo of parsed documents, so that several rules reading the
/// same body or token parse it once.
#[derive(Default)]
struct Parsed {
    /// Per (source, parser): the body or bearer token read as JSON or as a
    /// JWT. A rule's parse must never stand in for another parser's.
    body_json: Option<Option<serde_json::Value>>,
    body_jwt: Option<Option<serde_json::Value>>,
    bearer_json: Option<Option<serde_json::Value>>,
    bearer_jwt: Option<Option<serde_json::Value>>,
    scratch: Option<Option<serde_json::Value>>,
}

/// How a document is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parser {
    Json,
    Jwt,
}

impl Parser {
    fn parse(self, bytes: &[u8]) -> Option<serde_json::Value> {
        match self {
            Parser::Json => serde_json::from_slice(bytes).ok(),
            Parser::Jwt => parse_jwt_claims(bytes),
        }
    }
}

/// One classifier output: label, value, and whether it goes to `baggage`.
pub type Output<'a> = (Arc<str>, Cow<'a, str>, bool);

impl Classifier {
    /// Compiles classifier `index` of `policy`.
    pub fn compile(
        policy: &Arc<str>,
        index: usize,
        spec: &ClassifierSpec,
        metrics: &Metrics,
    ) -> Self {
        let name: Arc<str> = match &spec.name {
            Some(n) => n.value.0.as_str().into(),
            None => format!("classifiers[{index}]").into(),
        };
        let rules = spec
            .rules
            .iter()
            .map(|(label, rule)| Rule {
                label: label.0.as_str().into(),
                telemetry: rule.telemetry,
                extractor: match &rule.extractor {
                    ExtractorSpec::From(from) => Extractor::Copy(Source::parse(from)),
                    ExtractorSpec::Json { from, pointer } => Extractor::Json {
                        from: Source::parse(from),
                        pointer: pointer.as_str().into(),
                    },
                    ExtractorSpec::PathTemplate(templates) => Extractor::PathTemplate {
                        path: LabelRef::new("http.path"),
                        templates: templates
                            .iter()
                            .map(|t| PathTemplate::compile(&t.template, &t.value))
                            .collect(),
                    },
                    ExtractorSpec::Jwt { from, claim } => Extractor::Jwt {
                        from: Source::parse(from),
                        claim: if claim.starts_with('/') {
                            Claim::Pointer(claim.as_str().into())
                        } else {
                            Claim::Name(claim.as_str().into())
                        },
                    },
                },
            })
            .collect();
        let mut series = Series::default();
        Classifier {
            classified: metrics.classifier.series(&mut series, &[policy, &name]),
            errors: metrics
                .classifier_errors
                .series(&mut series, &[policy, &name]),
            series,
            policy: policy.clone(),
            selectors: spec.selectors.iter().map(Selector::compile).collect(),
            name,
            rules,
        }
    }

    /// Runs every rule on `labels` and appends what they found to `out`.
    /// Rules read the flow as it is before any of them writes.
    pub fn classify<'a>(&'a self, labels: &FlowLabels<'a>, out: &mut SmallVec<[Output<'a>; 4]>) {
        self.classified.inc();
        let mut parsed = Parsed::default();
        for rule in self.rules.iter() {
            let value = match &rule.extractor {
                Extractor::Copy(source) => read_text(source, labels),
                Extractor::PathTemplate { path, templates } => labels.get(path).and_then(|p| {
                    templates
                        .iter()
                        .find(|t| t.matches(&p))
                        .map(|t| Cow::Borrowed(&*t.value))
                }),
                Extractor::Json { from, pointer } => {
                    let doc = document(from, labels, &mut parsed, &self.errors, Parser::Json);
                    doc.and_then(|d| d.pointer(pointer)).and_then(json_text)
                }
                Extractor::Jwt { from, claim } => {
                    let doc = document(from, labels, &mut parsed, &self.errors, Parser::Jwt);
                    doc.and_then(|d| match claim {
                        Claim::Name(n) => d.get(&**n),
                        Claim::Pointer(p) => d.pointer(p),
                    })
                    .and_then(json_text)
                }
            };
            if let Some(value) = value {
                out.push((rule.label.clone(), value, rule.telemetry));
            }
        }
    }
}

fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The text of a source (the body as UTF-8, lossily).
fn read_text<'a>(source: &Source, labels: &FlowLabels<'a>) -> Option<Cow<'a, str>> {
    match source {
        Source::Label(key) => labels.get_detached(key),
        Source::Body => labels.source().body().map(String::from_utf8_lossy),
        Source::Bearer(header) => match labels.get_detached(header)? {
            Cow::Borrowed(h) => bearer_token(h).map(Cow::Borrowed),
            Cow::Owned(h) => bearer_token(&h).map(|t| Cow::Owned(t.to_owned())),
        },
    }
}

/// The parsed document at `source`, parsed at most once per flow for the
/// body and the bearer token.
fn document<'p>(
    source: &Source,
    labels: &FlowLabels<'_>,
    parsed: &'p mut Parsed,
    errors: &IntCounter,
    parser: Parser,
) -> Option<&'p serde_json::Value> {
    let run = || {
        let text: Cow<'_, [u8]> = match source {
            Source::Body => Cow::Borrowed(labels.source().body()?),
            other => match read_text(other, labels)? {
                Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
                Cow::Owned(s) => Cow::Owned(s.into_bytes()),
            },
        };
        let doc = parser.parse(&text);
        if doc.is_none() {
            errors.inc();
        }
        doc
    };
    let slot = match (source, parser) {
        (Source::Body, Parser::Json) => &mut parsed.body_json,
        (Source::Body, Parser::Jwt) => &mut parsed.body_jwt,
        (Source::Bearer(_), Parser::Json) => &mut parsed.bearer_json,
        (Source::Bearer(_), Parser::Jwt) => &mut parsed.bearer_jwt,
        // Another label holding a document: rare, so parsed every time.
        (Source::Label(_), _) => {
            parsed.scratch = None;
            &mut parsed.scratch
        }
    };
    slot.get_or_insert_with(run).as_ref()
}

/// The claims of a JWT, without verifying its signature.
fn parse_jwt_claims(token: &[u8]) -> Option<serde_json::Value> {
    let token = std::str::from_utf8(token).ok()?.trim();
    let mut parts = token.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    parts.next()?; // a JWS has three parts; the signature is not checked
    let payload = payload.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A JSON value as label text: strings as they are, scalars printed,
/// containers as compact JSON, null as absent.
fn json_text<'a>(v: &serde_json::Value) -> Option<Cow<'a, str>> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(Cow::Owned(s.clone())),
        other => Some(Cow::Owned(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::MapLabels;

    fn classifier(rules: &str) -> (Classifier, Metrics) {
        let yaml = format!("selectors: [{{control_point: ingress}}]\nrules:\n{rules}");
        let spec: ClassifierSpec = serde_saphyr::from_str(&yaml).expect("valid classifier");
        let metrics = Metrics::new();
        (
            Classifier::compile(&"p".into(), 0, &spec, &metrics),
            metrics,
        )
    }

    fn run(c: &Classifier, source: &MapLabels) -> Vec<(String, String, bool)> {
        let labels = FlowLabels::new(source);
        let mut out = SmallVec::new();
        c.classify(&labels, &mut out);
        out.into_iter()
            .map(|(k, v, t)| (k.to_string(), v.into_owned(), t))
            .collect()
    }

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(r#"{"alg":"none"}"#), b64(claims))
    }

    #[test]
    fn copies_headers_and_labels() {
        let (c, _) = classifier(
            "  user: {from: request.http.headers.User-Id}\n  verb: {from: http.method, telemetry: false}\n  gone: {from: nothing}\n",
        );
        let source = MapLabels::from_pairs([
            ("http.request.header.user_id", "u1"),
            ("http.method", "GET"),
        ]);
        assert_eq!(
            run(&c, &source),
            vec![
                ("user".into(), "u1".into(), true),
                ("verb".into(), "GET".into(), false),
            ]
        );
    }

    #[test]
    fn reads_json_bodies_by_pointer() {
        let (c, m) = classifier(
            "  tier: {json: {pointer: /user/tier}}\n  n: {json: {pointer: /items/1}}\n  obj: {json: {pointer: /user}}\n",
        );
        let source =
            MapLabels::default().with_body(br#"{"user": {"tier": "gold"}, "items": [1, 2.5]}"#);
        let out = run(&c, &source);
        assert_eq!(out[0].1, "2.5");
        assert_eq!(out[1].1, r#"{"tier":"gold"}"#);
        assert_eq!(out[2].1, "gold");
        assert_eq!(
            m.classifier_errors
                .vec()
                .with_label_values(&["p", "classifiers[0]"])
                .get(),
            0
        );

        let source = MapLabels::default().with_body(b"not json {");
        assert!(run(&c, &source).is_empty());
        // Parsed once per flow, so one error for three rules.
        assert_eq!(
            m.classifier_errors
                .vec()
                .with_label_values(&["p", "classifiers[0]"])
                .get(),
            1
        );
        assert!(
            run(&c, &MapLabels::default()).is_empty(),
            "no body, no labels"
        );
    }

    #[test]
    fn reads_jwt_claims_from_the_bearer_token() {
        let (c, m) = classifier(
            "  sub: {jwt: {claim: sub}}\n  role: {jwt: {claim: /realm/roles/0}}\n  other: {jwt: {from: http.request.header.x_token, claim: sub}}\n",
        );
        let token = jwt(r#"{"sub": "alice", "realm": {"roles": ["admin"]}}"#);
        let header = format!("Bearer {token}");
        let source = MapLabels::from_pairs([
            ("http.request.header.authorization", header.as_str()),
            ("http.request.header.x_token", token.as_str()),
        ]);
        let out = run(&c, &source);
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[0].1, "alice");
        assert_eq!(out[1].1, "admin");
        assert_eq!(out[2].1, "alice");

        let source = MapLabels::from_pairs([("http.request.header.authorization", "Bearer junk")]);
        assert!(run(&c, &source).is_empty());
        assert_eq!(
            m.classifier_errors
                .vec()
                .with_label_values(&["p", "classifiers[0]"])
                .get(),
            1
        );
        let source = MapLabels::from_pairs([("http.request.header.authorization", "Basic abc")]);
        assert!(run(&c, &source).is_empty(), "not a bearer token");
    }

    #[test]
    fn names_the_matching_path_template() {
        let (c, _) = classifier(
            "  route: {path_template: [\"/users/{id}\", \"/users/{id}/orders\", \"/static/*\"]}\n",
        );
        let route = |path: &str| {
            run(&c, &MapLabels::from_pairs([("http.path", path)]))
                .first()
                .map(|o| o.1.clone())
        };
        assert_eq!(route("/users/42").as_deref(), Some("/users/{id}"));
        assert_eq!(route("/users/42/").as_deref(), Some("/users/{id}"));
        assert_eq!(
            route("/users/42/orders").as_deref(),
            Some("/users/{id}/orders")
        );
        assert_eq!(route("/static/css/site.css").as_deref(), Some("/static/*"));
        assert_eq!(route("/users/").as_deref(), None);
        assert_eq!(route("/users/42/orders/7").as_deref(), None);
        assert_eq!(route("/other").as_deref(), None);
        let (c, _) = classifier("  route: {path_template: [\"/users/\"]}\n");
        let route = |path: &str| run(&c, &MapLabels::from_pairs([("http.path", path)])).len();
        assert_eq!(route("/users"), 1, "a template's trailing slash is ignored");
        assert_eq!(route("/users/"), 1);
    }

    #[test]
    fn maps_the_matching_path_template_to_its_value() {
        // The map form (Aperture's `template_values`): the first template
        // that matches, in the order written, gives its value.
        let (c, _) = classifier(
            "  route:\n    path_template:\n      /users/{id}/orders: orders\n      /users/{}: user\n      /*: other\n",
        );
        let route = |path: &str| {
            run(&c, &MapLabels::from_pairs([("http.path", path)]))
                .first()
                .map(|o| o.1.clone())
        };
        assert_eq!(route("/users/42/orders").as_deref(), Some("orders"));
        assert_eq!(route("/users/42").as_deref(), Some("user"));
        assert_eq!(route("/").as_deref(), Some("other"));
        assert_eq!(route("/users/42/orders/7").as_deref(), Some("other"));
    }

    #[test]
    fn json_and_jwt_rules_on_one_source_do_not_share_a_parse() {
        let (c, m) = classifier(
            "  a_raw: {json: {from: request.http.bearer, pointer: /x}}\n  tenant: {jwt: {claim: tenant}}\n",
        );
        let header = format!("Bearer {}", jwt(r#"{"tenant": "t1"}"#));
        let source =
            MapLabels::from_pairs([("http.request.header.authorization", header.as_str())]);
        let out = run(&c, &source);
        assert_eq!(out, vec![("tenant".into(), "t1".into(), true)]);
        // The token is not JSON: one error, from the json rule only.
        assert_eq!(
            m.classifier_errors
                .vec()
                .with_label_values(&["p", "classifiers[0]"])
                .get(),
            1
        );
    }
}
