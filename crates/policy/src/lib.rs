//! The policy language: what a user writes, as Rust types.
//!
//! A policy is one YAML document (one file). Field names follow Aperture's
//! where Aperture had the concept, so that existing policies port with few
//! edits (`docs/migrating-from-aperture.md`). Every type here validates itself
//! while it is read; [`load`] turns a read error into one that names the
//! file, line and field. The engine (`sluice-engine`) compiles these types
//! into its own; nothing here runs on the request path, and nothing here
//! knows the engine, a protocol or a listener.
//!
//! Layout:
//! - this file: [`Policy`] and the spec of every component kind;
//! - [`types`]: the validated scalars (names, label names, durations,
//!   percentages, statuses, regexes) every spec is built from;
//! - [`circuit`]: the controller's `circuit:` section (signals, blueprints,
//!   actuators), read by `sluice-controller` and ignored by sidecars;
//! - [`load`]: reading a file or directory into a [`PolicySet`], with
//!   errors that name file, line and field, and its fingerprint;
//! - [`schema`]: the JSON Schema of a policy file (`sluice schema`);
//! - [`watch`]: hot reload, polling the policy path;
//! - [`aperture`]: Aperture's policies translated into this language
//!   (`sluice import-aperture`), with what does not carry over.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod aperture;
pub mod circuit;
pub mod load;
pub mod schema;
pub mod types;
pub mod watch;

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

pub use load::{PolicyError, PolicySet, load_path, parse_policy};
use types::{
    DeniedStatus, DurationSpec, LabelName, LabelValues, Name, NonEmpty, NonNegative, Percentage,
    Positive, PositiveDuration, RegexSpec,
};

/// One policy: a named set of flow-control components.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The policy's name, unique across all loaded files: the `policy_name`
    /// label of its metrics. 1 to 128 letters, digits, `_`, `-` or `.`.
    #[schemars(with = "Name")]
    pub name: Spanned<Name>,
    /// Classifiers: add labels to flows, from headers, the body or a JWT (stage
    /// 2). Default none.
    #[serde(default)]
    pub classifiers: Vec<ClassifierSpec>,
    /// Samplers: accept a percentage of flows (stage 4). Default none.
    #[serde(default)]
    pub samplers: Vec<SamplerSpec>,
    /// Rate limiters: token buckets, optionally one per value of a label (stage
    /// 5). Default none.
    #[serde(default)]
    pub rate_limiters: Vec<RateLimiterSpec>,
    /// Flux meters: histograms of a value of each flow's access log, latency by
    /// default (attached at stage 3, observed when the log arrives). Default
    /// none.
    #[serde(default)]
    pub flux_meters: Vec<FluxMeterSpec>,
    /// Concurrency limiters: bounds on the flows in flight, optionally per
    /// value of a label (stage 5, after the rate limiters). Default none.
    #[serde(default)]
    pub concurrency_limiters: Vec<ConcurrencyLimiterSpec>,
    /// Concurrency schedulers: weighted-fair queues admitting at most
    /// `max_concurrency` flows in flight (stage 6). Default none.
    #[serde(default)]
    pub concurrency_schedulers: Vec<ConcurrencySchedulerSpec>,
    /// Quota schedulers: weighted-fair queues in front of a token bucket (stage
    /// 6, after the concurrency schedulers). Default none.
    #[serde(default)]
    pub quota_schedulers: Vec<QuotaSchedulerSpec>,
    /// Load schedulers: weighted-fair queues admitting a share (the load
    /// multiplier) of the incoming token rate (stage 6, last). Default none.
    #[serde(default)]
    pub load_schedulers: Vec<LoadSchedulerSpec>,
    /// The control loop `sluice-controller` runs for this policy every tick
    /// (docs/controller.md); sidecars only validate it. Default none.
    #[serde(default)]
    #[schemars(with = "Option<circuit::CircuitSpec>")]
    pub circuit: Option<Spanned<circuit::CircuitSpec>>,
}

/// Which flows a component applies to. A component applies to a flow when
/// any of its selectors matches.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// The control point: `ingress`, `egress`, or any name Envoy sends (gRPC
    /// initial metadata `control-point`, or the ext_authz context extension
    /// `control-point`; else the sidecar's `--default-control-point`).
    pub control_point: Name,
    /// The flow's service (the ext_authz context extension `service`, else the
    /// sidecar's `--service`); `any` matches every service. Default `any`.
    #[serde(default = "any_service")]
    pub service: String,
    /// Further conditions on the flow's labels; all given parts must hold.
    /// Default none: every flow at the control point matches.
    #[serde(default)]
    pub label_matcher: Option<LabelMatcherSpec>,
}

fn any_service() -> String {
    "any".to_owned()
}

/// Conditions on labels; all given parts must hold (Kubernetes semantics).
#[derive(Clone, Debug, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelMatcherSpec {
    /// Label name to value: each label must be present with exactly that value.
    /// Default none.
    #[serde(default)]
    #[schemars(with = "BTreeMap<LabelName, schema::ScalarText>")]
    pub match_labels: BTreeMap<LabelName, String>,
    /// Kubernetes-style set expressions; each must hold. Default none.
    #[serde(default)]
    pub match_expressions: Vec<MatchExpressionSpec>,
    /// Aperture's expression tree, for what the two above cannot say:
    /// alternatives, negation, regular expressions. Default none.
    #[serde(default)]
    pub expression: Option<ExpressionSpec>,
}

/// `{key, operator, values}` as in Kubernetes label selectors.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, try_from = "RawMatchExpression")]
pub struct MatchExpressionSpec {
    /// The label.
    pub key: LabelName,
    /// How the label is compared.
    pub operator: Operator,
    /// The set for `In` and `NotIn`; empty for `Exists` and `DoesNotExist`.
    pub values: Vec<String>,
}

/// Operators of [`MatchExpressionSpec`].
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
pub enum Operator {
    /// The label is present and its value is in the set.
    In,
    /// The label is absent or its value is not in the set.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawMatchExpression {
    /// The label.
    key: LabelName,
    /// `In`: the label is present and its value is in `values`; `NotIn`: the
    /// label is absent or its value is not in `values`; `Exists`: the label is
    /// present; `DoesNotExist`: it is absent.
    operator: Operator,
    /// The set of values: non-empty for `In` and `NotIn`, empty (or absent) for
    /// `Exists` and `DoesNotExist`. Default `[]`.
    #[serde(default)]
    #[schemars(with = "Vec<schema::ScalarText>")]
    values: Vec<String>,
}

impl TryFrom<RawMatchExpression> for MatchExpressionSpec {
    type Error = String;
    fn try_from(raw: RawMatchExpression) -> Result<Self, String> {
        match raw.operator {
            Operator::In | Operator::NotIn if raw.values.is_empty() => Err(format!(
                "operator {:?} on key {} needs a non-empty `values` list",
                raw.operator, raw.key
            )),
            Operator::Exists | Operator::DoesNotExist if !raw.values.is_empty() => Err(format!(
                "operator {:?} on key {} takes no `values`",
                raw.operator, raw.key
            )),
            _ => Ok(MatchExpressionSpec {
                key: raw.key,
                operator: raw.operator,
                values: raw.values,
            }),
        }
    }
}

/// Aperture's label-matcher expression tree.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ExpressionSpec {
    /// All of the listed expressions hold.
    All(ExpressionList),
    /// At least one of the listed expressions holds.
    Any(ExpressionList),
    /// The expression does not hold.
    Not(Box<ExpressionSpec>),
    /// The label is present.
    LabelExists(LabelName),
    /// The label is present with exactly this value.
    LabelEquals(LabelValue),
    /// The label is present and the regex matches somewhere in its value
    /// (anchor it with `^...$` for a whole-value match).
    LabelMatches(LabelRegex),
}

/// `{of: [...]}`
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExpressionList {
    /// The operand expressions.
    pub of: Vec<ExpressionSpec>,
}

/// `{label, value}`
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelValue {
    /// The label.
    pub label: LabelName,
    /// The value it must have, exactly.
    #[schemars(with = "schema::ScalarText")]
    pub value: String,
}

/// `{label, regex}`
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelRegex {
    /// The label.
    pub label: LabelName,
    /// A regular expression (Rust `regex` syntax) that must match somewhere in
    /// the label's value: anchor it with `^...$` for a whole-value match.
    pub regex: RegexSpec,
}

/// Adds labels to matching flows.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    /// The classifier's name in metrics and logs, unique among the policy's
    /// components. Default `classifiers[<index>]`.
    #[serde(default)]
    #[schemars(with = "Option<Name>")]
    pub name: Option<Spanned<Name>>,
    /// Which flows it classifies: those matching any of these selectors (at
    /// least one).
    pub selectors: NonEmpty<Selector>,
    /// Output label name to the rule that finds its value. Rules of one
    /// classifier all read the flow as it was before the classifier ran; later
    /// classifiers see earlier ones' labels.
    pub rules: BTreeMap<LabelName, RuleSpec>,
}

/// How one classifier label gets its value: exactly one of `from`, `json`,
/// `path_template`, `jwt`.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, try_from = "RawRule")]
#[schemars(with = "RawRule")]
pub struct RuleSpec {
    /// The extractor.
    pub extractor: ExtractorSpec,
    /// Whether the label is also sent upstream in the `baggage` header
    /// (Aperture's default: yes).
    pub telemetry: bool,
}

/// The extractors a rule can use.
#[derive(Clone, Debug, PartialEq)]
pub enum ExtractorSpec {
    /// Copy a label, a header (`request.http.headers.<name>`) or another
    /// request attribute.
    From(String),
    /// A value inside a JSON document (the body by default).
    Json {
        /// Where the document is.
        from: String,
        /// RFC 6901 pointer, e.g. `/user/tier`.
        pointer: String,
    },
    /// The value of the first template, in order, that matches the path.
    PathTemplate(Vec<PathTemplate>),
    /// A claim of a JWT (the bearer token by default). The signature is not
    /// verified: that is the job of Envoy's `jwt_authn` filter in front.
    Jwt {
        /// Where the token is.
        from: String,
        /// Claim name, or a JSON pointer (`/realm_access/roles/0`).
        claim: String,
    },
}

/// One template of a `path_template` rule and the label value it gives.
#[derive(Clone, Debug, PartialEq)]
pub struct PathTemplate {
    /// The template, starting with `/`: `/users/{id}`, `/static/*`.
    pub template: String,
    /// The label's value when it is the first template to match: the
    /// template itself in the list form, the mapped value in the map form
    /// (Aperture's `template_values`).
    pub value: String,
}

/// `path_template`: a list of templates (each its own value) or a map from
/// template to value, in the order written; not empty.
struct RawPathTemplates(Vec<PathTemplate>);

impl<'de> Deserialize<'de> for RawPathTemplates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawPathTemplates;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of path templates, or a map from path template to value")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(template) = seq.next_element::<String>()? {
                    out.push(PathTemplate {
                        value: template.clone(),
                        template,
                    });
                }
                Ok(RawPathTemplates(out))
            }
            // A visitor rather than a map type, so that the order written is
            // the order tried.
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out: Vec<PathTemplate> = Vec::new();
                while let Some((template, value)) = map.next_entry::<String, String>()? {
                    if out.iter().any(|t| t.template == template) {
                        return Err(serde::de::Error::custom(format!(
                            "path template {template:?} is given twice"
                        )));
                    }
                    out.push(PathTemplate { template, value });
                }
                Ok(RawPathTemplates(out))
            }
        }
        let templates = d.deserialize_any(Visitor)?;
        if templates.0.is_empty() {
            return Err(serde::de::Error::custom("must have at least one template"));
        }
        Ok(templates)
    }
}

impl JsonSchema for RawPathTemplates {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PathTemplates".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [
                {
                    "type": "array",
                    "items": { "type": "string", "pattern": "^/" },
                    "minItems": 1,
                },
                {
                    "type": "object",
                    "propertyNames": { "pattern": "^/" },
                    "additionalProperties": { "type": ["string", "number", "boolean"] },
                    "minProperties": 1,
                },
            ]
        })
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRule {
    /// Copy a value: a flow label, a request header
    /// (`request.http.headers.<name>`), or `request.http.method`, `path`,
    /// `host`, `scheme`, `protocol`, `body` or `bearer`.
    #[serde(default)]
    from: Option<String>,
    /// A value inside a JSON document, the request body by default: strings as
    /// they are, numbers and booleans printed, objects and arrays as compact
    /// JSON, `null` as absent.
    #[serde(default)]
    json: Option<RawJson>,
    /// Path templates, each starting with `/`, e.g. `/users/{id}` (`{name}`
    /// is one non-empty segment, a final `*` the rest), tried in order: a
    /// list (the value is the first template that matches the path), or a
    /// map from template to value (the value of the first that matches, as
    /// Aperture's `template_values`).
    #[serde(default)]
    path_template: Option<RawPathTemplates>,
    /// A claim of a JWT, the bearer token by default. The signature is not
    /// verified: that is the job of Envoy's `jwt_authn` filter in front.
    #[serde(default)]
    jwt: Option<RawJwt>,
    /// Whether the label is also sent upstream, in the `baggage` header.
    /// Default `true`, as in Aperture.
    #[serde(default = "yes")]
    telemetry: bool,
}

fn yes() -> bool {
    true
}

/// `json`: a value inside a JSON document.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "JsonExtractor")]
struct RawJson {
    /// Where the JSON document is, as for `from`. Default `request.http.body`
    /// (Envoy must send the body: `with_request_body`).
    #[serde(default = "body_source")]
    from: String,
    /// RFC 6901 pointer to the value, e.g. `/account/tier`; empty for the whole
    /// document.
    #[schemars(regex(pattern = "^(/|$)"))]
    pointer: String,
}

/// `jwt`: a claim of a JWT, whose signature is not verified.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "JwtExtractor")]
struct RawJwt {
    /// Where the token is, as for `from`. Default `request.http.bearer`, the
    /// bearer token of the `authorization` header.
    #[serde(default = "bearer_source")]
    from: String,
    /// The claim: a name (`sub`) or a JSON pointer (`/realm_access/roles/0`).
    #[schemars(length(min = 1))]
    claim: String,
}

fn body_source() -> String {
    "request.http.body".to_owned()
}

fn bearer_source() -> String {
    "request.http.bearer".to_owned()
}

/// A rule's source must name a header or label as a token (RFC 9110), as
/// label names do: it ends up in metrics, baggage and generated Envoy
/// configs (`sluice envoy-config`), where anything else could break them.
fn check_source(from: &str) -> Result<(), String> {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if from.is_empty() {
        return Err("`from` must not be empty".to_owned());
    }
    match from.chars().find(|&c| !is_tchar(c)) {
        Some(c) => Err(format!("invalid character {c:?} in `from` {from:?}")),
        None => Ok(()),
    }
}

impl TryFrom<RawRule> for RuleSpec {
    type Error = String;
    fn try_from(raw: RawRule) -> Result<Self, String> {
        for from in [
            raw.from.as_deref(),
            raw.json.as_ref().map(|j| j.from.as_str()),
            raw.jwt.as_ref().map(|j| j.from.as_str()),
        ]
        .into_iter()
        .flatten()
        {
            check_source(from)?;
        }
        let mut found = Vec::new();
        if let Some(from) = raw.from {
            found.push(ExtractorSpec::From(from));
        }
        if let Some(json) = raw.json {
            if !(json.pointer.is_empty() || json.pointer.starts_with('/')) {
                return Err(format!(
                    "json.pointer {:?} must be empty or start with '/' (RFC 6901)",
                    json.pointer
                ));
            }
            found.push(ExtractorSpec::Json {
                from: json.from,
                pointer: json.pointer,
            });
        }
        if let Some(templates) = raw.path_template {
            for t in templates.0.iter() {
                if !t.template.starts_with('/') {
                    return Err(format!(
                        "path_template {:?} must start with '/'",
                        t.template
                    ));
                }
            }
            found.push(ExtractorSpec::PathTemplate(templates.0));
        }
        if let Some(jwt) = raw.jwt {
            if jwt.claim.is_empty() {
                return Err("jwt.claim must not be empty".to_owned());
            }
            found.push(ExtractorSpec::Jwt {
                from: jwt.from,
                claim: jwt.claim,
            });
        }
        if found.len() != 1 {
            return Err(format!(
                "a rule needs exactly one of `from`, `json`, `path_template`, `jwt` (found {})",
                found.len()
            ));
        }
        Ok(RuleSpec {
            extractor: found.remove(0),
            telemetry: raw.telemetry,
        })
    }
}

/// Accepts a percentage of matching flows; rejects the rest.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplerSpec {
    /// The sampler's name, unique among the policy's components of all kinds:
    /// it names the component in metrics and in the `x-sluice-rejected-by`
    /// header.
    #[schemars(with = "Name")]
    pub name: Spanned<Name>,
    /// Which flows it samples: those matching any of these selectors (at least
    /// one).
    pub selectors: NonEmpty<Selector>,
    /// Percentage of flows accepted, 0 to 100. The controller can override it
    /// (a `sampler` actuator).
    pub accept_percentage: Percentage,
    /// A label whose value decides: the decision is a hash of it, so a session
    /// (user, device...) is always in or always out, on every sidecar, and
    /// raising the percentage only adds sessions. Flows without the label, and
    /// samplers without the key, are sampled at random. Default none.
    #[serde(default)]
    pub session_label_key: Option<LabelName>,
    /// Values of `session_label_key` whose flows are always accepted, whatever
    /// the percentage (Aperture's `pass_through_label_values`): testers,
    /// internal users. Matched exactly against the label's value; a flow
    /// without the label is not passed through. Needs `session_label_key`;
    /// at most 1000 values. Default none.
    #[serde(default)]
    pub pass_through_label_values: LabelValues,
    /// HTTP status of a rejected flow, 400 to 599. Default `403`.
    #[serde(default = "DeniedStatus::forbidden")]
    pub denied_status_code: DeniedStatus,
}

/// A token bucket, optionally one per value of a label.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterSpec {
    /// The rate limiter's name, unique among the policy's components of all
    /// kinds: it names the component in metrics and in the
    /// `x-sluice-rejected-by` header.
    #[schemars(with = "Name")]
    pub name: Spanned<Name>,
    /// Which flows it limits: those matching any of these selectors (at least
    /// one).
    pub selectors: NonEmpty<Selector>,
    /// Most tokens a bucket holds (>= 0); a new bucket starts full. The
    /// controller can override it (a `rate_limiter` actuator).
    pub bucket_capacity: NonNegative,
    /// Tokens added to a bucket per `interval` (>= 0). The controller can
    /// override it.
    pub fill_amount: NonNegative,
    /// The refill period (> 0).
    pub interval: PositiveDuration,
    /// `true`: refill smoothly; `false`: add whole `fill_amount`s at interval
    /// boundaries. Default `true`.
    #[serde(default = "yes")]
    pub continuous_fill: bool,
    /// One bucket per value of this label; a flow without the label passes.
    /// Default none: one bucket for all matching flows.
    #[serde(default)]
    pub limit_by_label_key: Option<LabelName>,
    /// A label whose value (a number >= 0) is what a flow costs. Default none:
    /// a flow costs 1 (so does one whose label is not such a number).
    #[serde(default)]
    pub tokens_label_key: Option<LabelName>,
    /// A label value's bucket is forgotten after this long unused. Default
    /// `2h`.
    #[serde(default = "two_hours")]
    pub max_idle_time: DurationSpec,
    /// Where its state lives: `sidecar` (each sidecar its own, as without a
    /// store) or `global` (shared by every sidecar running the policy, in the
    /// store given by `--redis-url`). Default `sidecar`.
    #[serde(default)]
    pub scope: Scope,
    /// What a `global` component decides while the store cannot be asked
    /// (down, slow past `--redis-timeout`, refusing): `local` (this sidecar's
    /// own state, as with `scope: sidecar`), `accept` or `reject`. Default
    /// `local`.
    #[serde(default)]
    pub on_store_unavailable: StoreFallback,
    /// HTTP status of a rejected flow, 400 to 599. Default `429`.
    #[serde(default = "DeniedStatus::too_many_requests")]
    pub denied_status_code: DeniedStatus,
}

fn two_hours() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(7200))
}

/// Observes matching flows in a histogram when their access logs arrive.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(try_from = "RawFluxMeter")]
pub struct FluxMeterSpec {
    /// Unique among the policy's components; the `flux_meter_name` label.
    #[schemars(with = "Name")]
    pub name: Spanned<Name>,
    /// Which flows to observe.
    pub selectors: NonEmpty<Selector>,
    /// The access-log value observed.
    pub attribute_key: String,
    /// Upper bounds of the histogram buckets, increasing (`+Inf` implied).
    pub buckets: Vec<f64>,
}

/// Where a limiter's or scheduler's state lives.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Each sidecar's own: a limit holds per replica.
    #[default]
    Sidecar,
    /// Shared by every sidecar running the policy, in the store: a limit
    /// holds however many replicas run.
    Global,
}

/// What a global component decides while the store cannot be asked.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreFallback {
    /// Decide with this sidecar's own state, as `scope: sidecar` does.
    #[default]
    Local,
    /// Let every flow through.
    Accept,
    /// Turn every flow away.
    Reject,
}

impl StoreFallback {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreFallback::Local => "local",
            StoreFallback::Accept => "accept",
            StoreFallback::Reject => "reject",
        }
    }
}

impl Policy {
    /// Its components whose state lives in the store (`scope: global`), by
    /// name.
    pub fn global_components(&self) -> impl Iterator<Item = &str> {
        fn name(n: &Spanned<Name>) -> &str {
            n.value.0.as_str()
        }
        self.rate_limiters
            .iter()
            .filter(|c| c.scope == Scope::Global)
            .map(|c| name(&c.name))
            .chain(
                self.concurrency_limiters
                    .iter()
                    .filter(|c| c.scope == Scope::Global)
                    .map(|c| name(&c.name)),
            )
            .chain(
                self.quota_schedulers
                    .iter()
                    .filter(|c| c.scope == Scope::Global)
                    .map(|c| name(&c.name)),
            )
            .chain(
                self.concurrency_schedulers
                    .iter()
                    .filter(|c| c.scope == Scope::Global)
                    .map(|c| name(&c.name)),
            )
    }
}

/// Default flux meter buckets, in milliseconds (docs/policy.md).
pub const DEFAULT_FLUX_METER_BUCKETS: [f64; 11] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawFluxMeter {
    /// The flux meter's name, unique among the policy's components: the
    /// `flux_meter_name` label of its histogram.
    #[schemars(with = "Name")]
    name: Spanned<Name>,
    /// Which flows it observes: those matching any of these selectors (at least
    /// one).
    selectors: NonEmpty<Selector>,
    /// The access-log value observed. Default `workload_duration_ms`, the
    /// upstream's time.
    #[serde(default = "workload_duration")]
    #[schemars(length(min = 1))]
    attribute_key: String,
    /// Upper bounds of the histogram buckets, strictly increasing and finite
    /// (`+Inf` is implied). At most one bucket layout is given; without one,
    /// the buckets are 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000.
    #[serde(default)]
    #[schemars(length(min = 1, max = MAX_BUCKETS))]
    static_buckets: Option<Vec<f64>>,
    /// `count` buckets: `start`, `start + width`, ...
    #[serde(default)]
    linear_buckets: Option<LinearBuckets>,
    /// `count` buckets: `start`, `start * factor`, ...
    #[serde(default)]
    exponential_buckets: Option<ExponentialBuckets>,
    /// `count` buckets spread exponentially from `min` to `max`.
    #[serde(default)]
    exponential_buckets_range: Option<ExponentialBucketsRange>,
}

fn workload_duration() -> String {
    "workload_duration_ms".to_owned()
}

/// `count` buckets: `start`, `start + width`, ...
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct LinearBuckets {
    /// The first bound.
    start: f64,
    /// The step between bounds (> 0).
    #[schemars(extend("exclusiveMinimum" = 0))]
    width: f64,
    /// How many buckets, 1 to 200.
    #[schemars(range(min = 1, max = MAX_BUCKETS))]
    count: u32,
}

/// `count` buckets: `start`, `start * factor`, ...
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ExponentialBuckets {
    /// The first bound (> 0).
    #[schemars(extend("exclusiveMinimum" = 0))]
    start: f64,
    /// Each bound is the previous one times this (> 1).
    #[schemars(extend("exclusiveMinimum" = 1))]
    factor: f64,
    /// How many buckets, 1 to 200.
    #[schemars(range(min = 1, max = MAX_BUCKETS))]
    count: u32,
}

/// `count` buckets spread exponentially from `min` to `max`.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ExponentialBucketsRange {
    /// The first bound (> 0).
    #[schemars(extend("exclusiveMinimum" = 0))]
    min: f64,
    /// The last bound (> `min`).
    max: f64,
    /// How many buckets, 2 to 200.
    #[schemars(range(min = 2, max = MAX_BUCKETS))]
    count: u32,
}

/// Most buckets a flux meter may have: each is a series per label set.
const MAX_BUCKETS: u32 = 200;

/// `x > bound` for a finite `x` (false for NaN and infinities).
fn finite_above(x: f64, bound: f64) -> bool {
    x.is_finite() && x > bound
}

fn bucket_count(count: u32) -> Result<usize, String> {
    if count == 0 || count > MAX_BUCKETS {
        return Err(format!(
            "count must be between 1 and {MAX_BUCKETS}, got {count}"
        ));
    }
    Ok(count as usize)
}

impl TryFrom<RawFluxMeter> for FluxMeterSpec {
    type Error = String;
    fn try_from(raw: RawFluxMeter) -> Result<Self, String> {
        let given = [
            raw.static_buckets.is_some(),
            raw.linear_buckets.is_some(),
            raw.exponential_buckets.is_some(),
            raw.exponential_buckets_range.is_some(),
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if given > 1 {
            return Err("give at most one of static_buckets, linear_buckets, exponential_buckets, exponential_buckets_range".to_owned());
        }
        if raw.attribute_key.is_empty() {
            return Err("attribute_key must not be empty".to_owned());
        }
        let buckets: Vec<f64> = if let Some(b) = raw.static_buckets {
            b
        } else if let Some(l) = raw.linear_buckets {
            if !finite_above(l.width, 0.0) {
                return Err(format!("linear_buckets.width must be > 0, got {}", l.width));
            }
            let n = bucket_count(l.count)?;
            (0..n).map(|i| l.start + l.width * i as f64).collect()
        } else if let Some(e) = raw.exponential_buckets {
            if !finite_above(e.start, 0.0) || !finite_above(e.factor, 1.0) {
                return Err(format!(
                    "exponential_buckets needs start > 0 and factor > 1, got start {} factor {}",
                    e.start, e.factor
                ));
            }
            let n = bucket_count(e.count)?;
            (0..n).map(|i| e.start * e.factor.powi(i as i32)).collect()
        } else if let Some(r) = raw.exponential_buckets_range {
            if !finite_above(r.min, 0.0) || !finite_above(r.max, r.min) || r.count < 2 {
                return Err(format!(
                    "exponential_buckets_range needs 0 < min < max and count >= 2, got min {} max {} count {}",
                    r.min, r.max, r.count
                ));
            }
            let n = bucket_count(r.count)?;
            let factor = (r.max / r.min).powf(1.0 / (n - 1) as f64);
            (0..n).map(|i| r.min * factor.powi(i as i32)).collect()
        } else {
            DEFAULT_FLUX_METER_BUCKETS.to_vec()
        };
        if buckets.is_empty() || buckets.len() > MAX_BUCKETS as usize {
            return Err(format!("a flux meter needs 1 to {MAX_BUCKETS} buckets"));
        }
        if buckets.iter().any(|b| !b.is_finite()) {
            return Err("bucket bounds must be finite numbers".to_owned());
        }
        if buckets.windows(2).any(|w| w[0] >= w[1]) {
            return Err("bucket bounds must be strictly increasing".to_owned());
        }
        Ok(FluxMeterSpec {
            name: raw.name,
            selectors: raw.selectors,
            attribute_key: raw.attribute_key,
            buckets,
        })
    }
}

/// Bounds the flows in flight; a slot is returned when the flow's access
/// log arrives, or after `max_inflight_duration`.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyLimiterSpec {
    /// The concurrency limiter's name, unique among the policy's components of
    /// all kinds: it names the component in metrics and in the
    /// `x-sluice-rejected-by` header.
    #[schemars(with = "Name")]
    pub name: Spanned<Name>,
    /// Which flows it limits: those matching any of these selectors (at least
    /// one).
    pub selectors: NonEmpty<Selector>,
    /// Most flows in flight (per value of `limit_by_label_key`, when set). The
    /// controller can override it (a `concurrency_limiter` actuator).
    pub max_concurrency: u64,
    /// One count per value of this label; a flow without the label passes.
    /// Default none: one count for all matching flows.
    #[serde(default)]
    pub limit_by_label_key: Option<LabelName>,
    /// A flow whose access log has not arrived after this long is taken to have
    /// ended, and its slot returned. Default `1m`.
    #[serde(default = "one_minute")]
    pub max_inflight_duration: PositiveDuration,
    /// Where its state lives: `sidecar` (each sidecar its own, as without a
    /// store) or `global` (shared by every sidecar running the policy, in the
    /// store given by `--redis-url`). Default `sidecar`.
    #[serde(default)]
    pub scope: Scope,
    /// What a `global` component decides while the store cannot be asked
    /// (down, slow past `--redis-timeout`, refusing): `local` (this sidecar's
    /// own state, as with `scope: sidecar`), `accept` or `reject`. Default
    /// `local`.
    #[serde(default)]
    pub on_store_unavailable: StoreFallback,
    /// HTTP status of a rejected flow, 400 to 599. Default `429`.
    #[serde(default = "DeniedStatus::too_many_requests")]
    pub denied_status_code: DeniedStatus,
}

fn one_minute() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(60))
}

/// How a scheduler orders and bounds the requests it queues.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSpec {
    /// Classes of requests, each with its own parameters: the first whose
    /// `label_matcher` matches a request wins. Default none: every request gets
    /// `default_workload_parameters`.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Parameters of requests no workload matches. Default priority 1, tokens
    /// 1, queue timeout 1s.
    #[serde(default)]
    pub default_workload_parameters: WorkloadParameters,
    /// A label whose value (a number > 0) overrides a request's priority.
    /// Default none.
    #[serde(default)]
    pub priority_label_key: Option<LabelName>,
    /// A label whose value (a number >= 0) overrides a request's tokens.
    /// Default none.
    #[serde(default)]
    pub tokens_label_key: Option<LabelName>,
    /// A label whose value names the request's workload (a workload's `name`),
    /// overriding the label matchers. Default none.
    #[serde(default)]
    pub workload_label_key: Option<LabelName>,
    /// Requests of one workload share its capacity evenly across the values of
    /// this label (users, tenants...). Default none.
    #[serde(default)]
    pub fairness_label_key: Option<LabelName>,
    /// Time kept back from Envoy's gRPC deadline, so that the answer arrives
    /// before Envoy gives up. Default `10ms`.
    #[serde(default = "ten_ms")]
    pub decision_deadline_margin: DurationSpec,
    /// HTTP status of a rejected request, 400 to 599. Default `503`.
    #[serde(default = "DeniedStatus::service_unavailable")]
    pub denied_status_code: DeniedStatus,
    /// Most requests waiting at once; a request finding the queue full is
    /// rejected at once. Default `1000`.
    #[serde(default = "thousand")]
    pub max_queued_requests: usize,
}

fn ten_ms() -> DurationSpec {
    DurationSpec(std::time::Duration::from_millis(10))
}

fn thousand() -> usize {
    1000
}

/// A class of requests.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Names the workload, for `workload_label_key`. Default none. (Metrics
    /// label workloads by position: `workload_index`.)
    #[serde(default)]
    pub name: Option<Name>,
    /// Which requests belong to it. Default none: all requests.
    #[serde(default)]
    pub label_matcher: Option<LabelMatcherSpec>,
    /// How its requests are scheduled. Default priority 1, tokens 1, queue
    /// timeout 1s.
    #[serde(default)]
    pub parameters: WorkloadParameters,
}

/// How a workload's requests are scheduled.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadParameters {
    /// Weight (> 0): of two saturated workloads, one of priority 2 gets twice
    /// the tokens of one of priority 1. Default `1`.
    #[serde(default = "one")]
    pub priority: Positive,
    /// What one request costs (>= 0), unless `tokens_label_key` or
    /// `workload_latency_based_tokens` say otherwise. Default `1`.
    #[serde(default = "one_nonneg")]
    pub tokens: NonNegative,
    /// Longest wait in the queue, also bounded by Envoy's deadline less
    /// `decision_deadline_margin`. Default `1s`.
    #[serde(default = "one_second")]
    pub queue_timeout: DurationSpec,
}

impl Default for WorkloadParameters {
    fn default() -> Self {
        WorkloadParameters {
            priority: one(),
            tokens: one_nonneg(),
            queue_timeout: one_second(),
        }
    }
}

fn one() -> Positive {
    Positive(1.0)
}

fn one_nonneg() -> NonNegative {
    NonNegative(1.0)
}

fn one_second() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(1))
}

/// Admits a share of the incoming token rate; protects a service under
/// load (the controller moves the share).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadSchedulerSpec {
    /// The load scheduler's name, unique among the policy's components of all
    /// kinds: it names the component in metrics and in the
    /// `x-sluice-rejected-by` header.
    #[schemars(with = "Name")]
    pub name: Spanned<Name>,
    /// Which flows it schedules: those matching any of these selectors (at
    /// least one).
    pub selectors: NonEmpty<Selector>,
    /// Share of the incoming token rate admitted (>= 0); 1 or more passes
    /// everything. The controller overrides it for a while (a `load_scheduler`
    /// actuator). Default `1`.
    #[serde(default = "one_nonneg")]
    pub load_multiplier: NonNegative,
    /// Window over which the incoming token rate is observed. Default `10s`.
    #[serde(default = "ten_seconds")]
    pub rate_window: PositiveDuration,
    /// Estimate each workload's tokens per request from its observed latency
    /// (ms, from the access logs) instead of `tokens`. Default `false`.
    #[serde(default)]
    pub workload_latency_based_tokens: bool,
    /// Decide and count, but admit everything. Default `false`.
    #[serde(default)]
    pub dry_run: bool,
    /// Queueing and ordering. Default: the `scheduler` defaults.
    #[serde(default)]
    pub scheduler: SchedulerSpec,
}

fn ten_seconds() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_secs(10))
}

impl Default for SchedulerSpec {
    fn default() -> Self {
        SchedulerSpec {
            workloads: Vec::new(),
            default_workload_parameters: WorkloadParameters::default(),
            priority_label_key: None,
            tokens_label_key: None,
            workload_label_key: None,
            fairness_label_key: None,
            decision_deadline_margin: ten_ms(),
            denied_status_code: DeniedStatus::service_unavailable(),
            max_queued_requests: thousand(),
        }
    }
}

/// A token bucket whose excess requests queue in fair order.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuotaSchedulerSpec {
    /// The quota scheduler's name, unique among the policy's components of all
    /// kinds: it names the component in metrics and in the
    /// `x-sluice-rejected-by` header.
    #[schemars(with = "Name")]
    pub name: Spanned<Name>,
    /// Which flows it schedules: those matching any of these selectors (at
    /// least one).
    pub selectors: NonEmpty<Selector>,
    /// Most tokens a bucket holds (>= 0); a new bucket starts full.
    pub bucket_capacity: NonNegative,
    /// Tokens added to a bucket per `interval` (>= 0).
    pub fill_amount: NonNegative,
    /// The refill period (> 0).
    pub interval: PositiveDuration,
    /// `true`: refill smoothly; `false`: add whole `fill_amount`s at interval
    /// boundaries. Default `true`.
    #[serde(default = "yes")]
    pub continuous_fill: bool,
    /// One bucket (and queue) per value of this label; a flow without the label
    /// passes. Default none: one bucket for all matching flows.
    #[serde(default)]
    pub limit_by_label_key: Option<LabelName>,
    /// Where its state lives: `sidecar` (each sidecar its own, as without a
    /// store) or `global` (shared by every sidecar running the policy, in the
    /// store given by `--redis-url`). Default `sidecar`.
    #[serde(default)]
    pub scope: Scope,
    /// What a `global` component decides while the store cannot be asked
    /// (down, slow past `--redis-timeout`, refusing): `local` (this sidecar's
    /// own state, as with `scope: sidecar`), `accept` or `reject`. Default
    /// `local`.
    #[serde(default)]
    pub on_store_unavailable: StoreFallback,
    /// Queueing and ordering. Default: the `scheduler` defaults.
    #[serde(default)]
    pub scheduler: SchedulerSpec,
}

/// At most `max_concurrency` flows in flight; the excess queues in fair order.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencySchedulerSpec {
    /// The concurrency scheduler's name, unique among the policy's components
    /// of all kinds: it names the component in metrics and in the
    /// `x-sluice-rejected-by` header.
    #[schemars(with = "Name")]
    pub name: Spanned<Name>,
    /// Which flows it schedules: those matching any of these selectors (at
    /// least one).
    pub selectors: NonEmpty<Selector>,
    /// Most flows in flight; the excess waits in the queue.
    pub max_concurrency: u64,
    /// A flow whose access log has not arrived after this long is taken to have
    /// ended, and its slot returned. Default `1m`.
    #[serde(default = "one_minute")]
    pub max_inflight_duration: PositiveDuration,
    /// Where its state lives: `sidecar` (each sidecar its own, as without a
    /// store) or `global` (shared by every sidecar running the policy, in the
    /// store given by `--redis-url`). Default `sidecar`.
    #[serde(default)]
    pub scope: Scope,
    /// What a `global` component decides while the store cannot be asked
    /// (down, slow past `--redis-timeout`, refusing): `local` (this sidecar's
    /// own state, as with `scope: sidecar`), `accept` or `reject`. Default
    /// `local`.
    #[serde(default)]
    pub on_store_unavailable: StoreFallback,
    /// Queueing and ordering. Default: the `scheduler` defaults.
    #[serde(default)]
    pub scheduler: SchedulerSpec,
    /// Adapt the limit in the sidecar, below `max_concurrency` (or the
    /// controller's), from the latency of the flows that end. Default none:
    /// the limit is `max_concurrency`.
    #[serde(default)]
    pub adaptive: Option<AdaptiveConcurrency>,
}

/// A concurrency limit the sidecar adapts itself, every `interval`, from
/// the access logs of the flows it admitted: more than `late_percentage`
/// of them above `latency_setpoint_ms`, it is cut below the flows in
/// flight; otherwise, while flows wait for a slot, it rises by one. The
/// service is protected within an interval or two of an overload, without
/// waiting for Prometheus and the controller's tick.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConcurrency {
    /// The latency (ms, `workload_duration_ms` of the access log: the
    /// upstream's time) flows should keep to.
    pub latency_setpoint_ms: Positive,
    /// The share of flows (percent) that may end above the setpoint
    /// before the limit is cut. Default `10`.
    #[serde(default = "ten_percent")]
    pub late_percentage: Percentage,
    /// How often the limit is revised (less often when fewer than four
    /// flows ended meanwhile). Default `100ms`.
    #[serde(default = "hundred_ms")]
    pub interval: PositiveDuration,
    /// The lowest limit, at least 1 (a limit of 0 would admit nothing, so
    /// no flow would end to raise it). Default `1`.
    #[serde(default = "one_flow", deserialize_with = "at_least_one")]
    #[schemars(range(min = 1))]
    pub min_concurrency: u64,
}

fn at_least_one<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1, got 0")),
        n => Ok(n),
    }
}

fn ten_percent() -> Percentage {
    Percentage(10.0)
}
fn hundred_ms() -> PositiveDuration {
    PositiveDuration(std::time::Duration::from_millis(100))
}
fn one_flow() -> u64 {
    1
}
