//! The policy language: what a user writes, as Rust types.
//!
//! A policy is one YAML document (one file). Field names follow Aperture's
//! where Aperture had the concept, so that existing policies port with few
//! edits (`docs/migrating-from-aperture.md`). Every type here validates itself
//! while it is read (see [`types`]); [`load`] turns a read error into one that
//! names the file, line and field. The engine compiles these types into its
//! own (`crate::flow`); nothing here is used on the request path.

pub mod load;
pub mod types;
pub mod watch;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

pub use load::{PolicyError, PolicySet, load_path, parse_policy};
use types::{
    DeniedStatus, DurationSpec, LabelName, Name, NonEmpty, NonNegative, Percentage,
    PositiveDuration, RegexSpec,
};

/// One policy: a named set of flow-control components.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique across all loaded files; labels every metric of the policy.
    pub name: Spanned<Name>,
    /// Add labels to flows, from headers, the body or a JWT.
    #[serde(default)]
    pub classifiers: Vec<ClassifierSpec>,
    /// Accept a percentage of flows.
    #[serde(default)]
    pub samplers: Vec<SamplerSpec>,
    /// Token buckets, optionally one per value of a label.
    #[serde(default)]
    pub rate_limiters: Vec<RateLimiterSpec>,
}

/// Which flows a component applies to. A component applies to a flow when
/// any of its selectors matches.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// The control point (`ingress`, `egress`, or a name set in Envoy's
    /// ext_authz `initial_metadata`).
    pub control_point: Name,
    /// The service, from the ext_authz context extension `service` or the
    /// sidecar's `--service`; `any` matches all.
    #[serde(default = "any_service")]
    pub service: String,
    /// Further conditions on the flow's labels.
    #[serde(default)]
    pub label_matcher: Option<LabelMatcherSpec>,
}

fn any_service() -> String {
    "any".to_owned()
}

/// Conditions on labels; all given parts must hold (Kubernetes semantics).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelMatcherSpec {
    /// Label equals value, for each entry.
    #[serde(default)]
    pub match_labels: BTreeMap<LabelName, String>,
    /// Kubernetes-style set expressions.
    #[serde(default)]
    pub match_expressions: Vec<MatchExpressionSpec>,
    /// Aperture's expression tree, for what the two above cannot say
    /// (alternatives, negation, regular expressions).
    #[serde(default)]
    pub expression: Option<ExpressionSpec>,
}

/// `{key, operator, values}` as in Kubernetes label selectors.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, try_from = "RawMatchExpression")]
pub struct MatchExpressionSpec {
    /// The label.
    pub key: LabelName,
    /// How to compare it.
    pub operator: Operator,
    /// The set for `In`/`NotIn`; empty for `Exists`/`DoesNotExist`.
    pub values: Vec<String>,
}

/// Operators of [`MatchExpressionSpec`].
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatchExpression {
    key: LabelName,
    operator: Operator,
    #[serde(default)]
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
#[derive(Clone, Debug, Deserialize, PartialEq)]
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
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExpressionList {
    /// The operands.
    pub of: Vec<ExpressionSpec>,
}

/// `{label, value}`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelValue {
    /// The label.
    pub label: LabelName,
    /// The value it must have.
    pub value: String,
}

/// `{label, regex}`
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelRegex {
    /// The label.
    pub label: LabelName,
    /// The pattern its value must match.
    pub regex: RegexSpec,
}

/// Adds labels to matching flows.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    /// Optional; names the classifier in metrics (default `classifiers[i]`).
    #[serde(default)]
    pub name: Option<Spanned<Name>>,
    /// Which flows to classify.
    pub selectors: NonEmpty<Selector>,
    /// Output label name to how its value is found. Rules of one classifier
    /// all read the flow as it was before the classifier ran; later
    /// classifiers see earlier ones' labels.
    pub rules: BTreeMap<LabelName, RuleSpec>,
}

/// How one classifier label gets its value: exactly one of `from`, `json`,
/// `path_template`, `jwt`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, try_from = "RawRule")]
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
    /// The first template that matches the path, e.g. `/users/{id}`.
    PathTemplate(Vec<String>),
    /// A claim of a JWT (the bearer token by default). The signature is not
    /// verified: that is the job of Envoy's `jwt_authn` filter in front.
    Jwt {
        /// Where the token is.
        from: String,
        /// Claim name, or a JSON pointer (`/realm_access/roles/0`).
        claim: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    json: Option<RawJson>,
    #[serde(default)]
    path_template: Option<NonEmpty<String>>,
    #[serde(default)]
    jwt: Option<RawJwt>,
    #[serde(default = "yes")]
    telemetry: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJson {
    #[serde(default = "body_source")]
    from: String,
    pointer: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    #[serde(default = "bearer_source")]
    from: String,
    claim: String,
}

fn body_source() -> String {
    "request.http.body".to_owned()
}

fn bearer_source() -> String {
    "request.http.bearer".to_owned()
}

impl TryFrom<RawRule> for RuleSpec {
    type Error = String;
    fn try_from(raw: RawRule) -> Result<Self, String> {
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
            for t in templates.iter() {
                if !t.starts_with('/') {
                    return Err(format!("path_template {t:?} must start with '/'"));
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
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplerSpec {
    /// Unique among the policy's samplers.
    pub name: Spanned<Name>,
    /// Which flows to sample.
    pub selectors: NonEmpty<Selector>,
    /// Share of flows accepted.
    pub accept_percentage: Percentage,
    /// When set, the decision is a pure function of this label's value, so a
    /// session (user, device, ...) is either always in or always out, on
    /// every sidecar. Flows without the label are sampled at random.
    #[serde(default)]
    pub session_label_key: Option<LabelName>,
    /// Status of a rejected flow.
    #[serde(default = "DeniedStatus::forbidden")]
    pub denied_status_code: DeniedStatus,
}

/// A token bucket, optionally one per value of a label.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterSpec {
    /// Unique among the policy's rate limiters.
    pub name: Spanned<Name>,
    /// Which flows to limit.
    pub selectors: NonEmpty<Selector>,
    /// Most tokens a bucket holds; a new bucket starts full.
    pub bucket_capacity: NonNegative,
    /// Tokens added per `interval`.
    pub fill_amount: NonNegative,
    /// The refill period.
    pub interval: PositiveDuration,
    /// Refill smoothly (default) or all at once at each interval boundary.
    #[serde(default = "yes")]
    pub continuous_fill: bool,
    /// One bucket per value of this label; a flow without the label passes.
    /// Without it, one bucket for all matching flows.
    #[serde(default)]
    pub limit_by_label_key: Option<LabelName>,
    /// Tokens a flow costs, read from this label (default 1 per flow).
    #[serde(default)]
    pub tokens_label_key: Option<LabelName>,
    /// A label value's bucket is forgotten after this long unused.
    #[serde(default = "two_hours")]
    pub max_idle_time: DurationSpec,
    /// Status of a rejected flow.
    #[serde(default = "DeniedStatus::too_many_requests")]
    pub denied_status_code: DeniedStatus,
}

fn two_hours() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(7200))
}
