//! Selectors: which components apply to a flow.
//!
//! A component applies when any of its selectors matches: the control point
//! (used to index components, see `plan.rs`), the service (`any` matches
//! all), and a label matcher compiled from `match_labels`,
//! `match_expressions` and Aperture's `expression` tree into one [`Matcher`].

use std::sync::Arc;

use sluice_policy::{self as policy, ExpressionSpec, Operator};

use crate::labels::{FlowLabels, LabelRef};

/// One compiled selector.
#[derive(Clone, Debug)]
pub struct Selector {
    /// The control point it applies at.
    pub control_point: Arc<str>,
    /// The service it applies to; `None` for `any`.
    pub service: Option<Arc<str>>,
    /// Conditions on labels; `None` when there are none.
    pub matcher: Option<Matcher>,
}

impl Selector {
    /// Compiles a selector as written in a policy.
    pub fn compile(spec: &policy::Selector) -> Self {
        Selector {
            control_point: spec.control_point.0.as_str().into(),
            service: (spec.service != "any").then(|| spec.service.as_str().into()),
            matcher: spec.label_matcher.as_ref().map(Matcher::compile),
        }
    }

    /// True when this selector admits a flow of `service` with `labels`
    /// (its control point has been checked by the caller).
    #[inline]
    pub fn admits(&self, service: &str, labels: &FlowLabels<'_>) -> bool {
        if let Some(s) = &self.service
            && **s != *service
        {
            return false;
        }
        self.matcher.as_ref().is_none_or(|m| m.matches(labels))
    }
}

/// A compiled condition on a flow's labels.
#[derive(Clone, Debug)]
pub enum Matcher {
    /// Every operand holds (true when empty).
    All(Box<[Matcher]>),
    /// Some operand holds (false when empty).
    Any(Box<[Matcher]>),
    /// The operand does not hold.
    Not(Box<Matcher>),
    /// The label is present.
    Exists(LabelRef),
    /// The label is present with this value.
    Equals(LabelRef, Box<str>),
    /// The label is present with one of these values.
    In(LabelRef, Box<[Box<str>]>),
    /// The label is present and the regex finds a match in it.
    Regex(LabelRef, regex::Regex),
}

impl Matcher {
    /// Compiles a `label_matcher`: all of its parts must hold.
    pub fn compile(spec: &policy::LabelMatcherSpec) -> Self {
        let mut all = Vec::new();
        for (label, value) in &spec.match_labels {
            all.push(Matcher::Equals(
                LabelRef::new(&label.0),
                value.as_str().into(),
            ));
        }
        for expr in &spec.match_expressions {
            let key = LabelRef::new(&expr.key.0);
            let values = || expr.values.iter().map(|v| v.as_str().into()).collect();
            all.push(match expr.operator {
                Operator::In => Matcher::In(key, values()),
                Operator::NotIn => Matcher::Not(Box::new(Matcher::In(key, values()))),
                Operator::Exists => Matcher::Exists(key),
                Operator::DoesNotExist => Matcher::Not(Box::new(Matcher::Exists(key))),
            });
        }
        if let Some(expr) = &spec.expression {
            all.push(Matcher::compile_expression(expr));
        }
        if all.len() == 1 {
            all.remove(0)
        } else {
            Matcher::All(all.into())
        }
    }

    fn compile_expression(spec: &ExpressionSpec) -> Self {
        match spec {
            ExpressionSpec::All(list) => {
                Matcher::All(list.of.iter().map(Matcher::compile_expression).collect())
            }
            ExpressionSpec::Any(list) => {
                Matcher::Any(list.of.iter().map(Matcher::compile_expression).collect())
            }
            ExpressionSpec::Not(inner) => {
                Matcher::Not(Box::new(Matcher::compile_expression(inner)))
            }
            ExpressionSpec::LabelExists(label) => Matcher::Exists(LabelRef::new(&label.0)),
            ExpressionSpec::LabelEquals(eq) => {
                Matcher::Equals(LabelRef::new(&eq.label.0), eq.value.as_str().into())
            }
            ExpressionSpec::LabelMatches(m) => {
                Matcher::Regex(LabelRef::new(&m.label.0), m.regex.0.clone())
            }
        }
    }

    /// Evaluates the condition on a flow.
    pub fn matches(&self, labels: &FlowLabels<'_>) -> bool {
        match self {
            Matcher::All(ms) => ms.iter().all(|m| m.matches(labels)),
            Matcher::Any(ms) => ms.iter().any(|m| m.matches(labels)),
            Matcher::Not(m) => !m.matches(labels),
            Matcher::Exists(key) => labels.get(key).is_some(),
            Matcher::Equals(key, value) => labels.get(key).is_some_and(|v| *v == **value),
            Matcher::In(key, values) => labels
                .get(key)
                .is_some_and(|v| values.iter().any(|x| **x == *v)),
            Matcher::Regex(key, re) => labels.get(key).is_some_and(|v| re.is_match(&v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::MapLabels;

    fn selector(yaml: &str) -> Selector {
        let spec: policy::Selector = serde_saphyr::from_str(yaml).expect("valid selector");
        Selector::compile(&spec)
    }

    fn admits(sel: &Selector, service: &str, labels: &[(&str, &str)]) -> bool {
        let source = MapLabels::from_pairs(labels.iter().copied());
        sel.admits(service, &FlowLabels::new(&source))
    }

    #[test]
    fn service_any_matches_every_service() {
        let s = selector("control_point: ingress\n");
        assert!(admits(&s, "a", &[]));
        let s = selector("control_point: ingress\nservice: shop\n");
        assert!(admits(&s, "shop", &[]));
        assert!(!admits(&s, "cart", &[]));
    }

    #[test]
    fn match_labels_all_must_hold() {
        let s = selector("control_point: i\nlabel_matcher:\n  match_labels: {a: '1', b: '2'}\n");
        assert!(admits(&s, "x", &[("a", "1"), ("b", "2")]));
        assert!(!admits(&s, "x", &[("a", "1")]));
        assert!(!admits(&s, "x", &[("a", "1"), ("b", "3")]));
    }

    #[test]
    fn set_operators_follow_kubernetes() {
        let s = selector(
            "control_point: i\nlabel_matcher:\n  match_expressions:\n    - {key: tier, operator: In, values: [gold, silver]}\n",
        );
        assert!(admits(&s, "x", &[("tier", "gold")]));
        assert!(!admits(&s, "x", &[("tier", "free")]));
        assert!(!admits(&s, "x", &[]));
        let s = selector(
            "control_point: i\nlabel_matcher:\n  match_expressions:\n    - {key: tier, operator: NotIn, values: [free]}\n",
        );
        assert!(admits(&s, "x", &[("tier", "gold")]));
        assert!(admits(&s, "x", &[]), "NotIn holds when the label is absent");
        assert!(!admits(&s, "x", &[("tier", "free")]));
        let s = selector(
            "control_point: i\nlabel_matcher:\n  match_expressions:\n    - {key: a, operator: Exists}\n    - {key: b, operator: DoesNotExist}\n",
        );
        assert!(admits(&s, "x", &[("a", "")]));
        assert!(!admits(&s, "x", &[("a", ""), ("b", "")]));
        assert!(!admits(&s, "x", &[]));
    }

    #[test]
    fn expressions_nest() {
        let s = selector(
            r#"control_point: i
label_matcher:
  expression:
    any:
      of:
        - label_matches: {label: http.path, regex: "^/api/"}
        - all:
            of:
              - label_exists: admin
              - not: {label_equals: {label: env, value: prod}}
"#,
        );
        assert!(admits(&s, "x", &[("http.path", "/api/users")]));
        assert!(!admits(&s, "x", &[("http.path", "/web/api/")]));
        assert!(admits(&s, "x", &[("admin", "1"), ("env", "dev")]));
        assert!(!admits(&s, "x", &[("admin", "1"), ("env", "prod")]));
        assert!(!admits(&s, "x", &[]));
    }

    #[test]
    fn classifier_labels_win_over_request_labels() {
        let s = selector("control_point: i\nlabel_matcher:\n  match_labels: {tier: gold}\n");
        let source = MapLabels::from_pairs([("tier", "free")]);
        let mut labels = FlowLabels::new(&source);
        assert!(!s.admits("x", &labels));
        labels.set("tier".into(), "gold".into());
        assert!(s.admits("x", &labels));
    }
}
