//! The alerting rules operators load (`deploy/prometheus-rules.yaml`,
//! docs/operating.md): Prometheus's own `promtool` checks them and runs
//! their unit tests (`deploy/prometheus-rules.test.yaml`), in which every
//! rule must have a case where it fires and one where it does not, and
//! every metric a rule reads must be one Sluice documents (README's
//! metrics table, docs/controller.md): a renamed metric would leave an
//! alert that can never fire.
//!
//! Needs `promtool` (Debian's `prometheus` package, which
//! `scripts/bootstrap.sh` installs and `make test` runs first); fails,
//! never skips, without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

const RULES: &str = "deploy/prometheus-rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus-rules.test.yaml";

fn root() -> PathBuf {
    sluice_testkit::repo_root()
}

/// `promtool`: `$SLUICE_PROMTOOL`, else on PATH.
fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_PROMTOOL") {
        return PathBuf::from(p);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file())
        .expect("promtool not found on PATH: run `make test` or scripts/bootstrap.sh (Debian package prometheus)")
}

/// Runs promtool with `args` in `dir`; its output, or a failure with it.
fn run_promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Deserialize)]
struct Group {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: String,
    expr: String,
}

fn rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(root().join(RULES)).expect(RULES);
    let file: RuleFile = serde_saphyr::from_str(&text).expect("the rules are YAML");
    file.groups.into_iter().flat_map(|g| g.rules).collect()
}

#[test]
fn promtool_checks_the_rules_and_their_tests_pass() {
    let checked = run_promtool(&root(), &["check", "rules", RULES]);
    let count = rules().len();
    assert!(
        checked.contains(&format!("SUCCESS: {count} rules found")),
        "{checked}"
    );
    // promtool resolves `rule_files:` from the test file's directory.
    let tested = run_promtool(
        &root().join("deploy"),
        &["test", "rules", "prometheus-rules.test.yaml"],
    );
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_rule_has_a_case_that_fires_and_one_that_does_not() {
    let text = std::fs::read_to_string(root().join(RULE_TESTS)).expect(RULE_TESTS);
    let tests: Value = serde_saphyr::from_str(&text).expect("the rule tests are YAML");
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .expect("tests:")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    for rule in rules() {
        let expected = |fires: bool| {
            cases.iter().any(|c| {
                c["alertname"] == rule.alert.as_str()
                    && c["exp_alerts"]
                        .as_array()
                        .is_some_and(|a| a.is_empty() != fires)
            })
        };
        assert!(expected(true), "{}: no case where it fires", rule.alert);
        assert!(
            expected(false),
            "{}: no case where it stays quiet",
            rule.alert
        );
    }
}

/// The metric names an expression reads: what is left once strings,
/// label matchers, ranges, `by (...)` lists, numbers and PromQL's own
/// words are taken out.
fn metrics_of(expr: &str) -> Vec<String> {
    let strip = |text: &str, pattern: &str| {
        regex::Regex::new(pattern)
            .expect("pattern")
            .replace_all(text, " ")
            .into_owned()
    };
    let mut text = strip(expr, r#""[^"]*""#);
    for pattern in [
        r"\{[^}]*\}",
        r"\[[^\]]*\]",
        r"\b(by|on|ignoring)\s*\([^)]*\)",
    ] {
        text = strip(&text, pattern);
    }
    const PROMQL: [&str; 5] = ["rate", "increase", "sum", "and", "unless"];
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_alphabetic()))
        .filter(|w| !PROMQL.contains(w))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_a_rule_reads_is_one_sluice_documents() {
    let documented = ["README.md", "docs/controller.md"]
        .map(|f| std::fs::read_to_string(root().join(f)).expect(f))
        .join("\n");
    let mut read = 0;
    for rule in rules() {
        for metric in metrics_of(&rule.expr) {
            read += 1;
            // `up` is Prometheus's own, for every scrape target.
            assert!(
                metric == "up" || documented.contains(&format!("`{metric}")),
                "{}: reads {metric}, which README.md and docs/controller.md do not name",
                rule.alert
            );
        }
    }
    assert!(read >= 10, "only {read} metrics found in the rules");
}

#[test]
fn the_metric_names_of_an_expression_are_found() {
    assert_eq!(
        metrics_of(
            r#"sum by (policy_name, component) (rate(flowcontrol_reject_reasons_total{reason="queue_timeout"}[5m]))
             / sum by (policy_name) (rate(workload_requests_total[5m])) > 0.1"#
        ),
        [
            "flowcontrol_reject_reasons_total",
            "workload_requests_total"
        ]
    );
    assert_eq!(metrics_of(r#"up{job="sluice"} == 0"#), ["up"]);
    assert_eq!(
        metrics_of("a == 1 and on (instance, component) sum by (instance) (rate(b[5m])) > 0"),
        ["a", "b"]
    );
}
