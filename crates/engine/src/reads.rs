//! What a policy set reads of a request, and whether it reads access logs:
//! so that Envoy can be asked for no more (`sluice envoy-config` writes an
//! ext_authz filter whose `allowed_headers` are these headers, buffers the
//! body only when a classifier reads it, and sends access logs only when
//! something observes flow ends).
//!
//! Names resolve as the engine resolves them when it decides
//! ([`LabelRef::new`], the classifiers' `from`): `http.request.header.*`
//! is a header, `http.method` and its kind are attributes Envoy always
//! sends, and any other name is a classifier's output or, failing that, a
//! member of the `baggage` header.

use std::collections::{BTreeMap, BTreeSet};

use sluice_policy::{
    ExpressionSpec, ExtractorSpec, LabelMatcherSpec, Policy, PolicySet, SchedulerSpec, Selector,
};

use crate::components::classifier::Source;
use crate::labels::{LabelKind, LabelRef};

/// What the policies read, each with the first reason found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    /// Request headers, by normalized name (lower case, `_` for `-`), and
    /// who reads each.
    pub headers: BTreeMap<String, String>,
    /// Who reads the request body, if anyone.
    pub body: Option<String>,
    /// Who needs the `baggage` header, if anyone: a label that is no
    /// classifier's output is a baggage member, and labels classifiers send
    /// upstream are merged into the request's baggage (Sluice must see it
    /// to keep the members already there).
    pub baggage: Option<String>,
    /// Who observes flows' ends from access logs, if anyone (flux meters,
    /// concurrency limiters and schedulers).
    pub access_logs: Option<String>,
    /// Access-log attributes outside the contract that flux meters
    /// observe, and which meter: Envoy's log must be given them by hand.
    pub extra_attributes: BTreeMap<String, String>,
}

impl Reads {
    fn header(&mut self, name: &str, why: impl FnOnce() -> String) {
        self.headers.entry(name.to_owned()).or_insert_with(why);
    }
}

/// The labels one component's configuration names, with where.
struct Walk<'a> {
    /// Classifier outputs of the whole set.
    produced: &'a BTreeSet<String>,
    reads: &'a mut Reads,
}

impl Walk<'_> {
    /// A label read by `who`.
    fn label(&mut self, name: &str, who: &str) {
        match LabelRef::new(name).kind {
            LabelKind::Header(h) => self
                .reads
                .header(&h, || format!("{who} reads label {name}")),
            // A classifier's output is read from baggage wherever that
            // classifier did not run or found nothing: baggage is sent for
            // every such label, whoever sets it.
            LabelKind::Baggage => {
                self.reads.baggage.get_or_insert_with(|| {
                    let set = if self.produced.contains(name) {
                        "a classifier's output, else"
                    } else {
                        "no classifier sets it:"
                    };
                    format!("{who} reads label {name} ({set} a baggage member)")
                });
            }
            _ => {}
        }
    }

    fn source(&mut self, from: &str, who: &str) {
        match Source::parse(from) {
            Source::Label(l) => self.label(&l.name, who),
            Source::Body => {
                self.reads
                    .body
                    .get_or_insert_with(|| format!("{who} reads the request body"));
            }
            Source::Bearer(_) => self
                .reads
                .header("authorization", || format!("{who} reads the bearer token")),
        }
    }

    fn matcher(&mut self, m: &LabelMatcherSpec, who: &str) {
        for key in m.match_labels.keys() {
            self.label(&key.0, who);
        }
        for e in &m.match_expressions {
            self.label(&e.key.0, who);
        }
        if let Some(e) = &m.expression {
            self.expression(e, who);
        }
    }

    fn expression(&mut self, e: &ExpressionSpec, who: &str) {
        match e {
            ExpressionSpec::All(l) | ExpressionSpec::Any(l) => {
                l.of.iter().for_each(|e| self.expression(e, who));
            }
            ExpressionSpec::Not(e) => self.expression(e, who),
            ExpressionSpec::LabelExists(l) => self.label(&l.0, who),
            ExpressionSpec::LabelEquals(v) => self.label(&v.label.0, who),
            ExpressionSpec::LabelMatches(r) => self.label(&r.label.0, who),
        }
    }

    fn selectors<'s>(&mut self, selectors: impl IntoIterator<Item = &'s Selector>, who: &str) {
        for s in selectors {
            if let Some(m) = &s.label_matcher {
                self.matcher(m, who);
            }
        }
    }

    fn scheduler(&mut self, s: &SchedulerSpec, who: &str) {
        for w in &s.workloads {
            if let Some(m) = &w.label_matcher {
                self.matcher(m, who);
            }
        }
        for key in [
            &s.priority_label_key,
            &s.tokens_label_key,
            &s.workload_label_key,
            &s.fairness_label_key,
        ]
        .into_iter()
        .flatten()
        {
            self.label(&key.0, who);
        }
    }

    fn policy(&mut self, p: &Policy) {
        let policy = &p.name.value.0;
        let who = |kind: &str, name: &str| format!("{policy}/{name} ({kind})");
        for (i, c) in p.classifiers.iter().enumerate() {
            let name = c
                .name
                .as_ref()
                .map_or_else(|| format!("classifiers[{i}]"), |n| n.value.0.clone());
            let w = who("classifier", &name);
            self.selectors(c.selectors.iter(), &w);
            for (output, rule) in &c.rules {
                match &rule.extractor {
                    ExtractorSpec::From(from)
                    | ExtractorSpec::Json { from, .. }
                    | ExtractorSpec::Jwt { from, .. } => self.source(from, &w),
                    ExtractorSpec::PathTemplate(_) => {}
                }
                if rule.telemetry && self.reads.baggage.is_none() {
                    self.reads.baggage = Some(format!(
                        "{w} sends label {} upstream in baggage, merged with the request's",
                        output.0
                    ));
                }
            }
        }
        for f in &p.flux_meters {
            let w = who("flux meter", &f.name.value.0);
            self.selectors(f.selectors.iter(), &w);
            if !crate::flow_end::CONTRACT_ATTRIBUTES.contains(&f.attribute_key.as_str()) {
                self.reads
                    .extra_attributes
                    .entry(f.attribute_key.clone())
                    .or_insert_with(|| w.clone());
            }
            self.reads.access_logs.get_or_insert(w);
        }
        for s in &p.samplers {
            let w = who("sampler", &s.name.value.0);
            self.selectors(s.selectors.iter(), &w);
            if let Some(k) = &s.session_label_key {
                self.label(&k.0, &w);
            }
        }
        for r in &p.rate_limiters {
            let w = who("rate limiter", &r.name.value.0);
            self.selectors(r.selectors.iter(), &w);
            for k in [&r.limit_by_label_key, &r.tokens_label_key]
                .into_iter()
                .flatten()
            {
                self.label(&k.0, &w);
            }
        }
        for c in &p.concurrency_limiters {
            let w = who("concurrency limiter", &c.name.value.0);
            self.selectors(c.selectors.iter(), &w);
            if let Some(k) = &c.limit_by_label_key {
                self.label(&k.0, &w);
            }
            self.reads.access_logs.get_or_insert(w);
        }
        for c in &p.concurrency_schedulers {
            let w = who("concurrency scheduler", &c.name.value.0);
            self.selectors(c.selectors.iter(), &w);
            self.scheduler(&c.scheduler, &w);
            self.reads.access_logs.get_or_insert(w);
        }
        for q in &p.quota_schedulers {
            let w = who("quota scheduler", &q.name.value.0);
            self.selectors(q.selectors.iter(), &w);
            self.scheduler(&q.scheduler, &w);
            if let Some(k) = &q.limit_by_label_key {
                self.label(&k.0, &w);
            }
            self.reads.access_logs.get_or_insert(w);
        }
        for l in &p.load_schedulers {
            let w = who("load scheduler", &l.name.value.0);
            self.selectors(l.selectors.iter(), &w);
            self.scheduler(&l.scheduler, &w);
            self.reads.access_logs.get_or_insert(w);
        }
    }
}

/// What `set` reads of requests, and whether it reads access logs.
pub fn reads(set: &PolicySet) -> Reads {
    let produced: BTreeSet<String> = set
        .policies
        .iter()
        .flat_map(|l| &l.policy.classifiers)
        .flat_map(|c| c.rules.keys())
        .map(|k| k.0.clone())
        .collect();
    let mut reads = Reads::default();
    let mut walk = Walk {
        produced: &produced,
        reads: &mut reads,
    };
    for loaded in &set.policies {
        walk.policy(&loaded.policy);
    }
    reads
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn of(doc: &str) -> Reads {
        let set = sluice_policy::load::parse_sources(&[(PathBuf::from("p.yaml"), doc.to_owned())])
            .expect("valid");
        reads(&set)
    }

    #[test]
    fn a_rate_limit_by_header_reads_that_header_and_no_log() {
        let r = of(r#"
name: p
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress, label_matcher: {match_labels: {http.method: GET}}}]
    bucket_capacity: 5
    fill_amount: 1
    interval: 1s
    limit_by_label_key: http.request.header.user_id
"#);
        assert_eq!(r.headers.keys().collect::<Vec<_>>(), ["user_id"]);
        assert_eq!(r.body, None);
        assert_eq!(r.baggage, None);
        assert_eq!(r.access_logs, None);
    }

    #[test]
    fn everything_a_policy_can_name_is_found() {
        let r = of(r#"
name: p
classifiers:
  - selectors:
      - control_point: ingress
        label_matcher:
          match_expressions: [{key: http.request.header.x-tenant, operator: Exists}]
          expression: {not: {label_equals: {label: http.request.header.x-beta, value: "1"}}}
    rules:
      user: {from: request.http.headers.user-id, telemetry: false}
      tier: {json: {pointer: /tier}, telemetry: false}
      sub: {jwt: {claim: sub}, telemetry: false}
      plan: {from: http.request.header.x-plan}
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
samplers:
  - name: canary
    selectors: [{control_point: ingress}]
    accept_percentage: 50
    session_label_key: user
load_schedulers:
  - name: load
    selectors: [{control_point: ingress}]
    scheduler:
      workloads:
        - label_matcher: {match_labels: {http.request.header.user_type: gold, region: eu}}
          parameters: {priority: 10}
      priority_label_key: http.request.header.x-priority
"#);
        assert_eq!(
            r.headers.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "authorization",
                "user_id",
                "user_type",
                "x_beta",
                "x_plan",
                "x_priority",
                "x_tenant"
            ]
        );
        assert_eq!(
            r.body.as_deref(),
            Some("p/classifiers[0] (classifier) reads the request body")
        );
        // `user` is a classifier's output, `region` a baggage member: either
        // is read from baggage where no classifier sets it.
        assert!(r.baggage.is_some(), "labels from baggage");
        assert_eq!(r.access_logs.as_deref(), Some("p/latency (flux meter)"));
    }

    #[test]
    fn a_label_no_classifier_sets_is_a_baggage_member() {
        let r = of(r#"
name: p
rate_limiters:
  - name: by-tenant
    selectors: [{control_point: ingress}]
    bucket_capacity: 5
    fill_amount: 1
    interval: 1s
    limit_by_label_key: tenant
"#);
        assert!(r.headers.is_empty());
        assert!(r.baggage.is_some_and(|w| w.contains("tenant")));
    }

    #[test]
    fn a_label_a_classifier_sets_elsewhere_still_comes_from_baggage() {
        let r = of(r#"
name: p
classifiers:
  - selectors: [{control_point: egress}]
    rules:
      tenant: {from: request.http.headers.x-tenant, telemetry: false}
rate_limiters:
  - name: by-tenant
    selectors: [{control_point: ingress}]
    bucket_capacity: 5
    fill_amount: 1
    interval: 1s
    limit_by_label_key: tenant
"#);
        assert!(r.baggage.is_some_and(|w| w.contains("tenant")));
    }

    #[test]
    fn a_flux_meter_on_an_attribute_outside_the_contract_is_named() {
        let r = of(r#"
name: p
flux_meters:
  - name: upstream
    selectors: [{control_point: ingress}]
    attribute_key: upstream_service_time
  - name: bytes
    selectors: [{control_point: ingress}]
    attribute_key: BYTES_SENT
"#);
        assert_eq!(
            r.extra_attributes.keys().collect::<Vec<_>>(),
            ["upstream_service_time"]
        );
    }
}
