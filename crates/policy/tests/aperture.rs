//! `sluice_policy::aperture`: Aperture policies written for these tests in
//! Aperture's format (after its protos and blueprints; `tests/aperture/`),
//! converted, loaded with Sluice's own loader, and checked field by field.

use std::path::Path;
use std::time::Duration;

use sluice_policy::aperture::{Conversion, ImportError, convert};
use sluice_policy::circuit::{
    AiadLoadSchedulerSpec, AimdLoadSchedulerSpec, AlerterSpec, ArithmeticOp, ArithmeticSpec,
    Comparison, ComponentSpec, DeciderSpec, ExtremumSpec, GradientParameters, GradientSpec,
    Operand, PromqlSpec, Severity, SwitcherSpec,
};
use sluice_policy::types::{DurationSpec, LabelName, Name, PositiveDuration};
use sluice_policy::{
    ExpressionSpec, ExtractorSpec, LabelMatcherSpec, Operator, PathTemplate, Policy, SchedulerSpec,
    Scope, StoreFallback, parse_policy,
};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/aperture/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `text` converted, and its output loaded as `sluice validate` loads it.
fn converted(text: &str, stem: &str) -> (Conversion, Policy) {
    let c = convert(text, stem).unwrap_or_else(|e| panic!("{stem}: {e}"));
    let policy = parse_policy(Path::new("out.yaml"), &c.policy)
        .unwrap_or_else(|e| panic!("{stem}: the output does not load: {e}\n{}", c.policy));
    // The file written, header and all, loads too.
    parse_policy(Path::new("out.yaml"), &c.file_text("in.yaml")).expect("the file loads");
    (c, policy)
}

fn name(n: &str) -> Name {
    Name(n.to_owned())
}

fn label(n: &str) -> LabelName {
    LabelName(n.to_owned())
}

fn signal(s: &str) -> Operand {
    Operand::Signal(s.to_owned())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn matcher(labels: &[(&str, &str)]) -> Option<LabelMatcherSpec> {
    Some(LabelMatcherSpec {
        match_labels: labels
            .iter()
            .map(|(k, v)| (label(k), (*v).to_owned()))
            .collect(),
        ..LabelMatcherSpec::default()
    })
}

fn circuit(p: &Policy) -> &[ComponentSpec] {
    &p.circuit.as_ref().expect("a circuit").value.components
}

#[test]
fn flow_control_components_convert_in_full() {
    let (c, p) = converted(&fixture("flow-control.yaml"), "ignored");
    assert_eq!(c.skipped, [], "{}", c.policy);
    assert_eq!(c.name, "checkout", "metadata.name");
    assert_eq!(p.name.value, name("checkout"));

    // Flux meters: the four bucket layouts, Aperture's `{buckets: [...]}`
    // flattened, an empty one as the default buckets.
    let meter = |n: &str| {
        p.flux_meters
            .iter()
            .find(|f| f.name.value == name(n))
            .unwrap_or_else(|| panic!("flux meter {n}"))
    };
    let latency = meter("checkout-latency");
    assert_eq!(latency.buckets, [5.0, 10.0, 20.0, 50.0, 100.0]);
    assert_eq!(latency.attribute_key, "workload_duration_ms");
    assert_eq!(
        latency.selectors[0].service,
        "checkout.shop.svc.cluster.local"
    );
    assert_eq!(latency.selectors[0].control_point, name("ingress"));
    let bytes = meter("checkout-bytes");
    assert_eq!(bytes.attribute_key, "BYTES_SENT");
    assert_eq!(bytes.buckets, [100.0, 200.0, 300.0, 400.0, 500.0]);
    assert_eq!(meter("checkout-exp").buckets, [1.0, 2.0, 4.0, 8.0]);
    let range = &meter("checkout-range").buckets;
    assert_eq!(range.len(), 4);
    assert!((range[0] - 1.0).abs() < 1e-9 && (range[3] - 1000.0).abs() < 1e-6);
    assert_eq!(
        meter("checkout-default").buckets,
        sluice_policy::DEFAULT_FLUX_METER_BUCKETS
    );
    assert_eq!(meter("checkout-default").selectors[0].service, "any");

    // Classifier: selectors with match_labels and match_expressions +
    // match_list joined; rules unwrapped from `extractor:`.
    let classifier = &p.classifiers[0];
    let m = classifier.selectors[0]
        .label_matcher
        .as_ref()
        .expect("matcher");
    assert_eq!(m.match_labels[&label("http.method")], "POST");
    let expressions: Vec<(&str, Operator, Vec<String>)> = m
        .match_expressions
        .iter()
        .map(|e| (e.key.0.as_str(), e.operator, e.values.clone()))
        .collect();
    assert_eq!(
        expressions,
        [
            (
                "http.request.header.content_type",
                Operator::In,
                vec!["application/json".to_owned()]
            ),
            (
                "http.request.header.x_debug",
                Operator::DoesNotExist,
                vec![]
            ),
        ]
    );
    let rule = |n: &str| &classifier.rules[&label(n)];
    assert_eq!(
        rule("user").extractor,
        ExtractorSpec::From("request.http.headers.user-id".to_owned())
    );
    assert!(rule("user").telemetry);
    assert_eq!(
        rule("tier").extractor,
        ExtractorSpec::Json {
            from: "request.http.body".to_owned(),
            pointer: "/account/tier".to_owned()
        }
    );
    assert!(!rule("tier").telemetry, "telemetry: false");
    assert_eq!(
        rule("tenant").extractor,
        ExtractorSpec::Jwt {
            from: "request.http.bearer".to_owned(),
            claim: "/realm/tenant".to_owned()
        },
        "jwt.json_pointer is the claim"
    );
    // Envoy's request.http.path carries the query string: Sluice's
    // http.target.
    assert_eq!(
        rule("target").extractor,
        ExtractorSpec::From("http.target".to_owned())
    );
    // template_values, most specific first, as Aperture orders them: more
    // static segments, then more parameters, then no wildcard; ties by
    // Aperture's normalized text. A trailing slash is dropped.
    let t = |template: &str, value: &str| PathTemplate {
        template: template.to_owned(),
        value: value.to_owned(),
    };
    assert_eq!(
        rule("route").extractor,
        ExtractorSpec::PathTemplate(vec![
            t("/users/orders/{orderId}", "orders"),
            t("/users/{userId}", "user"),
            t("/register", "register"),
            t("/static/*", "static"),
            t("/users/*", "users"),
        ])
    );

    // Rate limiters: constant in_ports, parameters, request_parameters,
    // the status by name, Aperture's agent-group-wide state.
    let rl = &p.rate_limiters[0];
    assert_eq!(rl.name.value, name("rate-limiter-0"));
    assert_eq!((rl.bucket_capacity.0, rl.fill_amount.0), (40.0, 2.0));
    assert_eq!(rl.interval, PositiveDuration(Duration::from_secs(1)));
    assert!(!rl.continuous_fill);
    assert_eq!(rl.limit_by_label_key, Some(label("user")));
    assert_eq!(rl.tokens_label_key, Some(label("cost")));
    assert_eq!(rl.max_idle_time, DurationSpec(Duration::from_secs(3600)));
    assert_eq!(rl.denied_status_code.0, 400, "BadRequest");
    assert_eq!(rl.scope, Scope::Global);
    assert_eq!(rl.on_store_unavailable, StoreFallback::Accept);
    assert_eq!(rl.selectors[0].service, "checkout.shop.svc.cluster.local");
    let eq = |l: &str, v: &str| {
        ExpressionSpec::LabelEquals(sluice_policy::LabelValue {
            label: label(l),
            value: v.to_owned(),
        })
    };
    let expression = rl.selectors[0]
        .label_matcher
        .as_ref()
        .and_then(|m| m.expression.clone())
        .expect("expression");
    let ExpressionSpec::All(all) = expression else {
        panic!("all: {expression:?}");
    };
    assert_eq!(all.of[0], ExpressionSpec::LabelExists(label("user")));
    assert_eq!(all.of[1], ExpressionSpec::Not(Box::new(eq("tier", "free"))));
    let ExpressionSpec::Any(any) = &all.of[2] else {
        panic!("any: {:?}", all.of[2]);
    };
    let ExpressionSpec::LabelMatches(re) = &any.of[0] else {
        panic!("label_matches: {:?}", any.of[0]);
    };
    assert_eq!(
        (re.label.0.as_str(), re.regex.0.as_str()),
        ("http.path", "^/api/")
    );
    assert_eq!(any.of[1], eq("http.method", "GET"));

    let rl = &p.rate_limiters[1];
    assert_eq!(rl.limit_by_label_key, Some(label("tenant")), "label_key");
    assert_eq!(rl.interval, PositiveDuration(ms(500)));
    assert!(rl.continuous_fill, "Aperture's default");
    assert_eq!(rl.denied_status_code.0, 429, "Aperture's default");
    assert_eq!(rl.max_idle_time, DurationSpec(Duration::from_secs(7200)));

    let cl = &p.concurrency_limiters[0];
    assert_eq!(cl.name.value, name("concurrency-limiter-2"));
    assert_eq!(cl.max_concurrency, 20);
    assert_eq!(cl.limit_by_label_key, Some(label("tenant")));
    assert_eq!(
        cl.max_inflight_duration,
        PositiveDuration(Duration::from_secs(30))
    );
    assert_eq!(cl.denied_status_code.0, 503, "ServiceUnavailable");
    assert_eq!(cl.scope, Scope::Global);

    // Schedulers: workloads, their parameters, the label keys.
    let cs = &p.concurrency_schedulers[0];
    assert_eq!(cs.max_concurrency, 8);
    assert_eq!(
        cs.max_inflight_duration,
        PositiveDuration(Duration::from_secs(60))
    );
    assert_eq!(cs.scope, Scope::Global);
    let s: &SchedulerSpec = &cs.scheduler;
    assert_eq!(s.workloads.len(), 2);
    assert_eq!(s.workloads[0].name, Some(name("paid")));
    assert_eq!(s.workloads[0].label_matcher, matcher(&[("tier", "paid")]));
    assert_eq!(s.workloads[0].parameters.priority.0, 200.0);
    assert_eq!(s.workloads[0].parameters.tokens.0, 2.0);
    assert_eq!(
        s.workloads[0].parameters.queue_timeout,
        DurationSpec(ms(500))
    );
    let not_paid = &s.workloads[1]
        .label_matcher
        .as_ref()
        .expect("matcher")
        .match_expressions[0];
    assert_eq!(
        (
            not_paid.key.0.as_str(),
            not_paid.operator,
            not_paid.values.clone()
        ),
        ("tier", Operator::NotIn, vec!["paid".to_owned()]),
        "match_list"
    );
    assert_eq!(s.workloads[1].parameters.priority.0, 20.0);
    assert_eq!(s.workloads[1].parameters.tokens.0, 1.0);
    assert_eq!(s.default_workload_parameters.priority.0, 10.0);
    assert_eq!(
        s.default_workload_parameters.queue_timeout,
        DurationSpec(ms(200))
    );
    assert_eq!(s.priority_label_key, Some(label("priority")));
    assert_eq!(s.tokens_label_key, Some(label("cost")));
    assert_eq!(s.workload_label_key, Some(label("workload")));
    assert_eq!(s.fairness_label_key, Some(label("user")));
    assert_eq!(s.decision_deadline_margin, DurationSpec(ms(20)));
    assert_eq!(s.denied_status_code.0, 429, "TooManyRequests");

    let qs = &p.quota_schedulers[0];
    assert_eq!((qs.bucket_capacity.0, qs.fill_amount.0), (500.0, 50.0));
    assert_eq!(qs.limit_by_label_key, Some(label("partner")));
    assert_eq!(qs.scope, Scope::Global);
    assert_eq!(qs.scheduler.workloads[0].parameters.priority.0, 100.0);
    assert_eq!(qs.scheduler.denied_status_code.0, 503, "Aperture's default");

    let sampler = &p.samplers[0];
    assert_eq!(sampler.name.value, name("sampler-5"));
    assert_eq!(sampler.accept_percentage.0, 25.0);
    assert_eq!(sampler.session_label_key, Some(label("user")));
    assert_eq!(sampler.pass_through_label_values.0, ["qa-1", "qa-2"]);
    assert_eq!(sampler.denied_status_code.0, 401, "Unauthorized");
    assert_eq!(
        sampler.selectors[0].label_matcher,
        matcher(&[("route", "/beta/*")])
    );

    let ls = &p.load_schedulers[0];
    assert_eq!(ls.load_multiplier.0, 0.8);
    assert!(ls.workload_latency_based_tokens);
    assert!(ls.dry_run);
    assert_eq!(ls.scheduler.workloads[0].name, Some(name("subscribers")));
    assert!(p.circuit.is_none(), "constant inputs need no circuit");
}

#[test]
fn the_average_latency_blueprints_policy_converts_in_full() {
    let text = fixture("search.yaml");
    let (c, p) = converted(&text, "search");
    assert_eq!(c.skipped, [], "{}", c.policy);
    assert_eq!(c.name, "search", "a plain policy is named by its file");

    let meter = &p.flux_meters[0];
    assert_eq!(meter.name.value, name("search"));
    assert_eq!(meter.selectors[0].service, "search.prod.svc.cluster.local");
    let ls = &p.load_schedulers[0];
    assert_eq!(ls.name.value, name("load-scheduler-7"));
    assert_eq!(ls.load_multiplier.0, 1.0, "driven by the circuit");
    assert!(!ls.dry_run);
    assert_eq!(
        ls.scheduler.workloads[1].label_matcher,
        matcher(&[("http.request.header.plan", "pro")])
    );
    assert_eq!(ls.scheduler.workloads[1].parameters.priority.0, 100.0);

    // The query strings come through byte for byte, however the YAML
    // folds them.
    let query = |signal: &str| {
        let line = text
            .lines()
            .skip_while(|l| !l.contains(&format!("signal_name: {signal}")))
            .find(|l| l.contains("query_string:"))
            .expect("query");
        line.split_once("query_string: ")
            .expect("value")
            .1
            .to_owned()
    };
    let promql = |out: &str, query: String, every: u64| {
        ComponentSpec::Promql(PromqlSpec {
            out: out.to_owned(),
            query,
            evaluation_interval: Some(DurationSpec(Duration::from_secs(every))),
        })
    };
    let decider = |out: &str, op, lhs: &str, rhs: f64| {
        ComponentSpec::Decider(DeciderSpec {
            out: out.to_owned(),
            op,
            lhs: signal(lhs),
            rhs: Operand::Constant(rhs),
            true_for: DurationSpec(Duration::ZERO),
            false_for: DurationSpec(Duration::ZERO),
        })
    };
    let extremum = |out: &str, inputs: &[&str]| ExtremumSpec {
        out: out.to_owned(),
        inputs: inputs.iter().map(|s| signal(s)).collect(),
    };
    let observed = r#"sum(increase(accepted_tokens_total{policy_name="search",component="load-scheduler-7"}[30s])) / (sum(increase(accepted_tokens_total{policy_name="search",component="load-scheduler-7"}[30s])) + sum(increase(rejected_tokens_total{policy_name="search",component="load-scheduler-7"}[30s])))"#;
    let expected = vec![
        promql("PROMQL_0", query("PROMQL_0"), 10),
        decider("CONFIRMATION_SIGNAL_0", Comparison::Gt, "PROMQL_0", 0.7),
        // first_valid of a decider and 0: the decider, never missing.
        ComponentSpec::Max(extremum(
            "OVERLOAD_CONFIRMATION_0",
            &["CONFIRMATION_SIGNAL_0"],
        )),
        promql("PROMQL_1", query("PROMQL_1"), 10),
        decider("CONFIRMATION_SIGNAL_1", Comparison::Gte, "PROMQL_1", 50.0),
        ComponentSpec::Max(extremum(
            "OVERLOAD_CONFIRMATION_1",
            &["CONFIRMATION_SIGNAL_1"],
        )),
        // `and` of 0/1 signals: their least.
        ComponentSpec::Min(extremum(
            "OVERLOAD_CONFIRMATION",
            &["OVERLOAD_CONFIRMATION_0", "OVERLOAD_CONFIRMATION_1"],
        )),
        promql("OBSERVED_LOAD_MULTIPLIER", observed.to_owned(), 10),
        ComponentSpec::AimdLoadScheduler(AimdLoadSchedulerSpec {
            out: "DESIRED_LOAD_MULTIPLIER".to_owned(),
            out_is_overload: None,
            load_scheduler: name("load-scheduler-7"),
            signal: signal("SIGNAL"),
            setpoint: signal("SETPOINT"),
            overload_confirmation: Some(signal("OVERLOAD_CONFIRMATION")),
            observed_load_multiplier: signal("OBSERVED_LOAD_MULTIPLIER"),
            gradient: GradientParameters {
                slope: -1.0,
                min_gradient: Some(0.1),
                max_gradient: Some(1.0),
            },
            load_multiplier_linear_increment: 0.05,
            max_load_multiplier: 1.5,
            step_interval: PositiveDuration(Duration::from_secs(10)),
        }),
        // The embedded alerter, on Aperture's LOAD_MULTIPLIER_ALERT.
        ComponentSpec::Decider(DeciderSpec {
            out: "DESIRED_LOAD_MULTIPLIER_alert".to_owned(),
            op: Comparison::Lt,
            lhs: signal("DESIRED_LOAD_MULTIPLIER"),
            rhs: Operand::Constant(1.0),
            true_for: DurationSpec(Duration::ZERO),
            false_for: DurationSpec(Duration::ZERO),
        }),
        ComponentSpec::Alerter(AlerterSpec {
            signal: signal("DESIRED_LOAD_MULTIPLIER_alert"),
            alert_name: "AIMD Load Throttling Event".to_owned(),
            severity: Severity::Info,
            resolve_timeout: DurationSpec(Duration::from_secs(5)),
            labels: Default::default(),
            alert_channels: vec![],
        }),
        promql("SIGNAL", query("SIGNAL"), 10),
        promql("SIGNAL_LONG_TERM", query("SIGNAL_LONG_TERM"), 60),
        ComponentSpec::Arithmetic(ArithmeticSpec {
            out: "SETPOINT".to_owned(),
            op: ArithmeticOp::Mul,
            lhs: signal("SIGNAL_LONG_TERM"),
            rhs: Operand::Constant(1.1),
        }),
    ];
    let got = circuit(&p);
    assert_eq!(got.len(), expected.len(), "{}", c.policy);
    for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(got, expected, "components[{i}]");
    }
    assert!(query("SIGNAL").contains(r#"flux_meter_name="search""#));
}

#[test]
fn a_hand_written_circuit_converts_in_full() {
    let (c, p) = converted(&fixture("circuit.yaml"), "ignored");
    assert_eq!(c.skipped, [], "{}", c.policy);
    let components = circuit(&p);
    let find = |pred: &dyn Fn(&ComponentSpec) -> bool| {
        components
            .iter()
            .find(|c| pred(c))
            .unwrap_or_else(|| panic!("not in {components:#?}"))
            .clone()
    };
    let writes = |out: &'static str| move |c: &ComponentSpec| c.out() == Some(out);
    // A `variable` is a constant where it is read.
    assert_eq!(
        find(&writes("FAST")),
        ComponentSpec::Decider(DeciderSpec {
            out: "FAST".to_owned(),
            op: Comparison::Lte,
            lhs: signal("P90"),
            rhs: Operand::Constant(250.0),
            true_for: DurationSpec(Duration::ZERO),
            false_for: DurationSpec(Duration::ZERO),
        })
    );
    assert_eq!(
        find(&writes("FAILING")),
        ComponentSpec::Decider(DeciderSpec {
            out: "FAILING".to_owned(),
            op: Comparison::Gt,
            lhs: signal("ERROR_RATIO"),
            rhs: Operand::Constant(0.2),
            true_for: DurationSpec(Duration::from_secs(30)),
            false_for: DurationSpec(Duration::from_secs(120)),
        })
    );
    // Logic on 0/1 signals: `or` the greatest, `inverter` 1 - x (its
    // input is the decider FAST; the `or` reads it, written later).
    assert_eq!(
        find(&writes("TROUBLE")),
        ComponentSpec::Max(ExtremumSpec {
            out: "TROUBLE".to_owned(),
            inputs: vec![signal("FAILING"), signal("SLOW")],
        })
    );
    assert_eq!(
        find(&writes("SLOW")),
        ComponentSpec::Arithmetic(ArithmeticSpec {
            out: "SLOW".to_owned(),
            op: ArithmeticOp::Sub,
            lhs: Operand::Constant(1.0),
            rhs: signal("FAST"),
        })
    );
    assert_eq!(
        find(&writes("BETA_SHARE")),
        ComponentSpec::Switcher(SwitcherSpec {
            out: "BETA_SHARE".to_owned(),
            switch: signal("TROUBLE"),
            on_true: Operand::Constant(10.0),
            on_false: Operand::Constant(100.0),
        })
    );
    assert_eq!(
        find(&writes("SHARE")),
        ComponentSpec::Max(ExtremumSpec {
            out: "SHARE".to_owned(),
            inputs: vec![signal("CAPPED_SHARE"), Operand::Constant(5.0)],
        })
    );
    // A PromQL component without an interval: Aperture's 10 s.
    let ComponentSpec::Promql(p90) = find(&writes("P90")) else {
        unreachable!()
    };
    assert_eq!(
        p90.evaluation_interval,
        Some(DurationSpec(Duration::from_secs(10)))
    );
    let ComponentSpec::Alerter(alert) =
        find(&|c| matches!(c, ComponentSpec::Alerter(a) if a.alert_name == "API in trouble"))
    else {
        unreachable!()
    };
    assert_eq!(alert.signal, signal("TROUBLE"));
    assert_eq!(alert.severity, Severity::Crit);
    assert_eq!(alert.resolve_timeout, DurationSpec(Duration::from_secs(30)));
    assert_eq!(alert.alert_channels, ["oncall"]);
    assert_eq!(alert.labels.get("team").map(String::as_str), Some("api"));
    // Aperture's gradient bounds default to the widest numbers (Sluice's
    // to 0.1 and 1): written out.
    assert_eq!(
        find(&writes("BACKGROUND_MULTIPLIER")),
        ComponentSpec::GradientController(GradientSpec {
            out: "BACKGROUND_MULTIPLIER".to_owned(),
            signal: signal("P90"),
            setpoint: Operand::Constant(250.0),
            control_variable: Operand::Constant(1.0),
            slope: -2.0,
            min_gradient: 0.2,
            max_gradient: f64::MAX,
        })
    );

    // A sampler whose percentage is a signal: 100 in the policy (Aperture's
    // sampler without a valid signal), the signal sent by an actuator.
    let sampler = &p.samplers[0];
    assert_eq!(sampler.name.value, name("sampler-11"));
    assert_eq!(sampler.accept_percentage.0, 100.0);
    let actuated = |kind: &dyn Fn(&sluice_policy::circuit::ActuatorSpec) -> bool| {
        components.iter().find_map(|c| match c {
            ComponentSpec::Actuator(a) if kind(a) => a.input.clone(),
            _ => None,
        })
    };
    assert_eq!(
        actuated(&|a| a.sampler == Some(name("sampler-11"))),
        Some(signal("SHARE"))
    );
    // A load scheduler whose multiplier is a signal, its observed
    // multiplier wired to Aperture's output name.
    assert_eq!(
        actuated(&|a| a.load_scheduler == Some(name("load-scheduler-13"))),
        Some(signal("BACKGROUND_MULTIPLIER"))
    );
    let ComponentSpec::Promql(observed) = find(&writes("BACKGROUND_OBSERVED")) else {
        unreachable!()
    };
    assert!(observed.query.contains(r#"component="load-scheduler-13""#));

    // AIMD with a constant setpoint and no out_ports: named outputs, the
    // observed multiplier's query, dry_run on its load scheduler.
    let aimd = find(&|c| matches!(c, ComponentSpec::AimdLoadScheduler(_)));
    let ComponentSpec::AimdLoadScheduler(aimd) = aimd else {
        unreachable!()
    };
    assert_eq!(aimd.load_scheduler, name("load-scheduler-14"));
    assert_eq!(aimd.setpoint, Operand::Constant(400.0));
    assert_eq!(aimd.out_is_overload.as_deref(), Some("OVERLOADED"));
    assert_eq!(aimd.overload_confirmation, None);
    assert_eq!(
        aimd.load_multiplier_linear_increment, 0.025,
        "Aperture's default"
    );
    assert_eq!(aimd.max_load_multiplier, 2.0, "Aperture's default");
    let ls = |n: &str| {
        p.load_schedulers
            .iter()
            .find(|l| l.name.value == name(n))
            .unwrap_or_else(|| panic!("{n}"))
    };
    assert!(ls("load-scheduler-14").dry_run);
    assert!(ls("load-scheduler-14").workload_latency_based_tokens);
    let aiad = find(&|c| matches!(c, ComponentSpec::AiadLoadScheduler(_)));
    assert_eq!(
        aiad,
        ComponentSpec::AiadLoadScheduler(AiadLoadSchedulerSpec {
            out: "desired_load_multiplier_15".to_owned(),
            out_is_overload: None,
            load_scheduler: name("load-scheduler-15"),
            signal: signal("ERROR_RATIO"),
            setpoint: Operand::Constant(0.05),
            overload_confirmation: Some(signal("OVERLOADED")),
            overload_condition: Comparison::Gte,
            load_multiplier_linear_increment: 0.025,
            load_multiplier_linear_decrement: 0.1,
            max_load_multiplier: 2.0,
            min_load_multiplier: 0.2,
            step_interval: PositiveDuration(Duration::from_secs(10)),
        })
    );
    assert_eq!(
        ls("load-scheduler-15").selectors[0].control_point,
        name("egress")
    );
}

#[test]
fn what_cannot_be_carried_over_is_listed_by_path_and_the_rest_loads() {
    let (c, p) = converted(&fixture("partial.yaml"), "ignored");
    let listed: Vec<&str> = c.skipped.iter().map(|s| s.path.as_str()).collect();
    let reason = |path: &str| {
        c.skipped
            .iter()
            .find(|s| s.path == path)
            .map(|s| s.reason.as_str())
            .unwrap_or_else(|| panic!("{path} is not listed: {listed:#?}"))
    };
    let expected = [
        ("dynamicConfig", "dynamic configuration"),
        ("spec.resources.infra_meters", "OpenTelemetry collectors"),
        (
            "spec.resources.flow_control.classifiers[0].rules.claims.extractor.jwt.json_pointer",
            "the whole JWT payload",
        ),
        (
            "spec.resources.flow_control.classifiers[0].rules.peer.extractor.address",
            "no address extractor",
        ),
        (
            "spec.resources.flow_control.classifiers[0].rules.query.extractor.from",
            "request.http.query",
        ),
        ("spec.resources.flow_control.classifiers[1].rego", "Rego"),
        ("spec.resources.flow_control.classifiers[1]", "no rule"),
        (
            "spec.resources.flow_control.flux_meters.broken",
            "count must be between 1 and 200",
        ),
        (
            "spec.circuit.components[0].flow_control.rate_limiter.in_ports.bucket_capacity",
            "the signal \"CAPACITY\"",
        ),
        (
            "spec.circuit.components[1].flow_control.rate_limiter.selectors[0].control_point",
            "the selector is left out",
        ),
        (
            "spec.circuit.components[1].flow_control.rate_limiter.selectors[1].label_matcher.expression.label_matches.regex",
            "unrecognized escape",
        ),
        (
            "spec.circuit.components[1].flow_control.rate_limiter.selectors[3].agent_groups",
            "not a field of Aperture's Selector",
        ),
        (
            "spec.circuit.components[1].flow_control.rate_limiter.selectors[3].agent_group",
            "agent group \"canary\"",
        ),
        (
            "spec.circuit.components[1].flow_control.rate_limiter.parameters.delay_initial_fill",
            "starts full",
        ),
        (
            "spec.circuit.components[1].flow_control.rate_limiter.request_parameters.denied_response_status_code",
            "not 200",
        ),
        ("spec.circuit.components[2].ema", "no ema"),
        (
            "spec.circuit.components[4].decider",
            "reads the signal \"LATENCY_EMA\"",
        ),
        (
            "spec.circuit.components[5].flow_control.load_ramp",
            "load_ramp",
        ),
    ];
    for (path, words) in expected {
        assert!(reason(path).contains(words), "{path}: {}", reason(path));
    }
    assert_eq!(listed.len(), expected.len(), "{listed:#?}");

    // What carries over did: the rule next to the ones left out, the
    // selectors of the rate limiter that Sluice reads, its status at
    // Sluice's default.
    let rules: Vec<&str> = p.classifiers[0]
        .rules
        .keys()
        .map(|l| l.0.as_str())
        .collect();
    assert_eq!(rules, ["user"]);
    assert_eq!(p.classifiers.len(), 1);
    let names: Vec<&str> = p
        .flux_meters
        .iter()
        .map(|f| f.name.value.0.as_str())
        .collect();
    assert_eq!(names, ["storefront"]);
    assert_eq!(p.rate_limiters.len(), 1);
    let rl = &p.rate_limiters[0];
    assert_eq!(rl.name.value, name("rate-limiter-1"));
    assert_eq!(rl.selectors.len(), 2);
    assert_eq!(
        rl.selectors[0].label_matcher,
        matcher(&[("http.method", "POST")])
    );
    assert_eq!(rl.selectors[1].control_point, name("egress"));
    assert_eq!(rl.denied_status_code.0, 429);
    let outs: Vec<Option<&str>> = circuit(&p).iter().map(ComponentSpec::out).collect();
    assert_eq!(outs, [Some("LATENCY")]);
    // The file says what is missing.
    let file = c.file_text("partial.yaml");
    assert!(
        file.contains("# - spec.resources.flow_control.classifiers[1].rego: "),
        "{file}"
    );
}

#[test]
fn what_is_not_an_aperture_policy_is_an_error() {
    let not_aperture = |text: &str| match convert(text, "x") {
        Err(ImportError::NotAperture(e)) => e,
        other => panic!("{text:?}: {other:?}"),
    };
    let deployment =
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 2}\n";
    assert!(not_aperture(deployment).contains("apps/v1"));
    let other_kind =
        "apiVersion: fluxninja.com/v1alpha1\nkind: Agent\nmetadata: {name: a}\nspec: {}\n";
    assert!(not_aperture(other_kind).contains("kind \"Agent\""));
    let sluice = "name: shop\nsamplers:\n  - {name: s, selectors: [{control_point: ingress}], accept_percentage: 5}\n";
    assert!(not_aperture(sluice).contains("a Sluice policy already"));
    assert!(not_aperture("just: text\n").contains("neither"));
    assert!(not_aperture("- a\n- b\n").contains("a list"));
    assert!(not_aperture("").contains("nothing"));
    let two = "resources: {}\n---\nresources: {}\n";
    assert!(not_aperture(two).contains("2 YAML documents"));
    assert!(matches!(
        convert("{: nope", "x"),
        Err(ImportError::NotYaml(_))
    ));
    let nameless = "apiVersion: fluxninja.com/v1alpha1\nkind: Policy\nspec: {resources: {}}\n";
    assert!(matches!(convert(nameless, "x"), Err(ImportError::Name(_))));
    // A plain policy's name is its file's, and must be a Sluice name.
    let plain = "resources: {flow_control: {classifiers: []}}\n";
    assert!(matches!(convert(plain, "a b"), Err(ImportError::Name(_))));
    let (c, p) = converted(plain, "empty-policy");
    assert_eq!((c.name.as_str(), c.skipped.len()), ("empty-policy", 0));
    assert!(p.rate_limiters.is_empty() && p.circuit.is_none());
}

#[test]
fn status_codes_by_name_or_number_and_values_that_look_like_numbers() {
    let policy = |status: &str| {
        format!(
            r#"apiVersion: fluxninja.com/v1alpha1
kind: Policy
metadata: {{name: p}}
spec:
  circuit:
    components:
      - flow_control:
          sampler:
            in_ports: {{accept_percentage: {{constant_signal: {{value: 50}}}}}}
            parameters:
              denied_response_status_code: {status}
              selectors:
                - control_point: ingress
                  label_matcher:
                    match_labels: {{code: "404", flag: "true", ratio: 1.5, empty: ""}}
"#
        )
    };
    for (status, code) in [
        ("TooManyRequests", 429),
        ("PaymentRequired", 402),
        ("NetworkAuthenticationRequired", 511),
        ("418", 418),
        ("Empty", 403),
    ] {
        let (c, p) = converted(&policy(status), "p");
        assert_eq!(c.skipped, [], "{status}");
        assert_eq!(p.samplers[0].denied_status_code.0, code, "{status}");
        let m = p.samplers[0].selectors[0]
            .label_matcher
            .as_ref()
            .expect("m");
        let values: Vec<&str> = m.match_labels.values().map(String::as_str).collect();
        // Label values are text, whatever they look like.
        assert_eq!(values, ["404", "", "true", "1.5"]);
    }
    for bad in ["Found", "Teapot", "600"] {
        let (c, p) = converted(&policy(bad), "p");
        assert_eq!(c.skipped.len(), 1, "{bad}");
        assert!(c.skipped[0].path.ends_with("denied_response_status_code"));
        assert_eq!(
            p.samplers[0].denied_status_code.0, 403,
            "{bad}: the default"
        );
    }
}

#[test]
fn path_templates_apertures_parser_refuses_are_listed() {
    let policy = |templates: &str| {
        format!(
            r#"circuit: {{}}
resources:
  flow_control:
    classifiers:
      - selectors: [{{control_point: ingress}}]
        rules:
          route: {{extractor: {{path_templates: {{template_values: {templates}}}}}}}
          user: {{extractor: {{from: request.http.headers.user}}}}
"#
        )
    };
    for bad in [
        r#"{"/a/{id}/b": x}"#,
        r#"{"/a/*/b": x}"#,
        r#"{"/a/x{id}": x}"#,
        r#"{"/a": ""}"#,
        "{}",
    ] {
        let (c, p) = converted(&policy(bad), "p");
        assert_eq!(c.skipped.len(), 1, "{bad}: {:?}", c.skipped);
        assert!(
            c.skipped[0]
                .path
                .starts_with("resources.flow_control.classifiers[0].rules.route"),
            "{bad}: {:?}",
            c.skipped
        );
        let rules: Vec<&str> = p.classifiers[0]
            .rules
            .keys()
            .map(|l| l.0.as_str())
            .collect();
        assert_eq!(rules, ["user"], "{bad}");
    }
}
