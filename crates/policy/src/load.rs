//! Reading policies from disk, with errors that say where the problem is.
//!
//! `--policy` names a file or a directory. A directory contributes every
//! `*.yaml` / `*.yml` file directly in it, in name order, skipping hidden
//! entries (so a Kubernetes ConfigMap mount, with its `..data` links, works
//! as is). Each file holds one policy; policy names are unique across files.

use std::fmt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::Policy;

/// A policy that does not load, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// The file at fault (or the path given, when it cannot be read).
    pub file: PathBuf,
    /// 1-based line of the offending value, when known.
    pub line: Option<u64>,
    /// 1-based column of the offending value, when known.
    pub column: Option<u64>,
    /// Path of the offending field, e.g. `rate_limiters[0].bucket_capacity`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PolicyError {}

impl PolicyError {
    fn io(file: &Path, err: impl fmt::Display) -> Self {
        PolicyError {
            file: file.to_owned(),
            line: None,
            column: None,
            field: String::new(),
            message: err.to_string(),
        }
    }

    fn at(file: &Path, at: &serde_saphyr::Location, field: String, message: String) -> Self {
        PolicyError {
            file: file.to_owned(),
            line: Some(at.line()),
            column: Some(at.column()),
            field,
            message,
        }
    }
}

/// One policy as loaded, with where it came from.
#[derive(Clone, Debug)]
pub struct LoadedPolicy {
    /// The policy.
    pub policy: Policy,
    /// The file it was read from.
    pub file: PathBuf,
    /// xxh3 of the file's text: identifies this version of the policy (the
    /// controller tags its decisions with it).
    pub hash: u64,
}

/// Every policy in force, sorted by name.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    /// The policies.
    pub policies: Vec<LoadedPolicy>,
}

/// Largest policy file read: policies are kilobytes, and a file dropped
/// into the policy directory by mistake (a log, an image) must not be read
/// whole every second.
pub const MAX_POLICY_FILE_BYTES: u64 = 1 << 20;

/// The policy files behind `path`, in load order.
fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let meta = std::fs::metadata(path).map_err(|e| PolicyError::io(path, e))?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| PolicyError::io(path, e))? {
            let entry = entry.map_err(|e| PolicyError::io(path, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            let file = entry.path();
            // metadata() follows symlinks, as ConfigMap mounts need.
            if is_yaml
                && !name.starts_with('.')
                && std::fs::metadata(&file).is_ok_and(|m| m.is_file())
            {
                files.push(file);
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    Ok(files)
}

/// The policy files behind `path`, with their text, in load order. A file
/// over [`MAX_POLICY_FILE_BYTES`] is an error, read no further than that.
pub fn read_sources(path: &Path) -> Result<Vec<(PathBuf, String)>, PolicyError> {
    use std::io::Read as _;
    policy_files(path)?
        .into_iter()
        .map(|file| {
            let too_big = || {
                PolicyError::io(
                    &file,
                    format!("larger than {MAX_POLICY_FILE_BYTES} bytes; not a policy"),
                )
            };
            let opened = std::fs::File::open(&file).map_err(|e| PolicyError::io(&file, e))?;
            if opened
                .metadata()
                .is_ok_and(|m| m.len() > MAX_POLICY_FILE_BYTES)
            {
                return Err(too_big());
            }
            let mut bytes = Vec::new();
            opened
                .take(MAX_POLICY_FILE_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| PolicyError::io(&file, e))?;
            if bytes.len() as u64 > MAX_POLICY_FILE_BYTES {
                return Err(too_big());
            }
            let text = String::from_utf8(bytes)
                .map_err(|e| PolicyError::io(&file, format!("not UTF-8: {e}")))?;
            Ok((file, text))
        })
        .collect()
}

/// What the policy files behind `path` look like from outside (names,
/// sizes, times, inodes), to tell without reading them whether they may
/// have changed. An error (the path gone mid-swap) is `None`: look again.
pub fn stamp(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for file in policy_files(path).ok()? {
        let m = std::fs::metadata(&file).ok()?;
        h.update(file.as_os_str().as_encoded_bytes());
        for n in [
            m.len(),
            m.ino(),
            m.mtime() as u64,
            m.mtime_nsec() as u64,
            m.ctime() as u64,
            m.ctime_nsec() as u64,
        ] {
            h.update(&n.to_le_bytes());
        }
    }
    Some(h.digest())
}

/// Parses and validates one policy document.
pub fn parse_policy(file: &Path, text: &str) -> Result<Policy, PolicyError> {
    let mut field = String::new();
    let options = serde_saphyr::options! { with_snippet: false };
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize::<_, Policy>(de).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    });
    let policy = parsed.map_err(|e| {
        let (line, column) = match e.location() {
            Some(at) => (Some(at.line()), Some(at.column())),
            None => (None, None),
        };
        let field = if field == "." { String::new() } else { field };
        PolicyError {
            file: file.to_owned(),
            line,
            column,
            field,
            message: strip_location(&e.without_snippet().to_string()),
        }
    })?;
    check_component_count(file, &policy)?;
    check_unique_names(file, &policy)?;
    check_samplers(file, &policy)?;
    check_concurrency_schedulers(file, &policy)?;
    if let Some(circuit) = &policy.circuit {
        let name = &policy.name.value.0;
        circuit
            .value
            .expand(name)
            .and_then(|components| super::circuit::validate(&components, &policy))
            .map_err(|message| {
                PolicyError::at(file, &circuit.defined, "circuit".to_owned(), message)
            })?;
    }
    Ok(policy)
}

/// The YAML error text ends with its location, which [`PolicyError`] prints
/// in front; drop the copy.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// Most components (classifiers included) in one policy. Every Check at a
/// control point evaluates the selectors of its components, so a policy of
/// ten thousand made each Check ten times slower: policies are untrusted
/// input too. Per-tenant limits take one component with
/// `limit_by_label_key`, not one per tenant.
pub const MAX_COMPONENTS_PER_POLICY: usize = 1_000;

/// A policy has at most [`MAX_COMPONENTS_PER_POLICY`] components.
fn check_component_count(file: &Path, policy: &Policy) -> Result<(), PolicyError> {
    let components = policy.classifiers.len()
        + policy.samplers.len()
        + policy.rate_limiters.len()
        + policy.flux_meters.len()
        + policy.concurrency_limiters.len()
        + policy.concurrency_schedulers.len()
        + policy.quota_schedulers.len()
        + policy.load_schedulers.len();
    if components > MAX_COMPONENTS_PER_POLICY {
        return Err(PolicyError::at(
            file,
            &policy.name.defined,
            "name".to_owned(),
            format!(
                "{components} components; a policy holds at most {MAX_COMPONENTS_PER_POLICY} \
                 (one component with limit_by_label_key serves many tenants)"
            ),
        ));
    }
    Ok(())
}

/// Component names are unique within a policy across all kinds: a name
/// identifies the component in metrics and in `x-sluice-rejected-by`.
fn check_unique_names(file: &Path, policy: &Policy) -> Result<(), PolicyError> {
    type Named<'a> = (String, &'a serde_saphyr::Spanned<super::types::Name>);
    let classifiers = policy.classifiers.iter().enumerate().filter_map(|(i, c)| {
        c.name
            .as_ref()
            .map(|n| (format!("classifiers[{i}].name"), n))
    });
    let samplers =
        (policy.samplers.iter().enumerate()).map(|(i, s)| (format!("samplers[{i}].name"), &s.name));
    let limiters = (policy.rate_limiters.iter().enumerate())
        .map(|(i, r)| (format!("rate_limiters[{i}].name"), &r.name));
    let meters = (policy.flux_meters.iter().enumerate())
        .map(|(i, f)| (format!("flux_meters[{i}].name"), &f.name));
    let concurrency = (policy.concurrency_limiters.iter().enumerate())
        .map(|(i, c)| (format!("concurrency_limiters[{i}].name"), &c.name));
    let concurrency_schedulers = (policy.concurrency_schedulers.iter().enumerate())
        .map(|(i, c)| (format!("concurrency_schedulers[{i}].name"), &c.name));
    let quota_schedulers = (policy.quota_schedulers.iter().enumerate())
        .map(|(i, q)| (format!("quota_schedulers[{i}].name"), &q.name));
    let load_schedulers = (policy.load_schedulers.iter().enumerate())
        .map(|(i, l)| (format!("load_schedulers[{i}].name"), &l.name));
    let mut seen: Vec<Named<'_>> = Vec::new();
    let all = classifiers
        .chain(samplers)
        .chain(limiters)
        .chain(meters)
        .chain(concurrency)
        .chain(concurrency_schedulers)
        .chain(quota_schedulers)
        .chain(load_schedulers);
    for (field, name) in all {
        if let Some((other, _)) = seen.iter().find(|(_, n)| n.value == name.value) {
            return Err(PolicyError::at(
                file,
                &name.defined,
                field,
                format!("duplicate component name {:?} (also {other})", name.value.0),
            ));
        }
        seen.push((field, name));
    }
    Ok(())
}

/// An adaptive concurrency limit is this sidecar's own, revised from the
/// flows it admitted: with `scope: global` the store's count is shared by
/// every sidecar, and a limit cut below it by one would admit nothing
/// there (so no flow would end to raise it again).
fn check_concurrency_schedulers(file: &Path, policy: &Policy) -> Result<(), PolicyError> {
    for (i, c) in policy.concurrency_schedulers.iter().enumerate() {
        if c.adaptive.is_some() && c.scope == crate::Scope::Global {
            return Err(PolicyError::at(
                file,
                &c.name.defined,
                format!("concurrency_schedulers[{i}].adaptive"),
                "an adaptive limit is each sidecar's own: use it with scope: sidecar".to_owned(),
            ));
        }
    }
    Ok(())
}

/// A sampler's `pass_through_label_values` are values of its
/// `session_label_key`: without the key they could match nothing (Aperture
/// reads a missing key as the empty value, so only a listed `""` would
/// pass, and then every flow), so the list is refused.
fn check_samplers(file: &Path, policy: &Policy) -> Result<(), PolicyError> {
    for (i, s) in policy.samplers.iter().enumerate() {
        if !s.pass_through_label_values.0.is_empty() && s.session_label_key.is_none() {
            return Err(PolicyError::at(
                file,
                &s.name.defined,
                format!("samplers[{i}].pass_through_label_values"),
                "pass_through_label_values are values of session_label_key: set session_label_key too"
                    .to_owned(),
            ));
        }
    }
    Ok(())
}

/// Parses a set of sources into a [`PolicySet`].
pub fn parse_sources(sources: &[(PathBuf, String)]) -> Result<PolicySet, PolicyError> {
    let mut policies: Vec<LoadedPolicy> = Vec::with_capacity(sources.len());
    for (file, text) in sources {
        let policy = parse_policy(file, text)?;
        if let Some(other) = policies
            .iter()
            .find(|p| p.policy.name.value == policy.name.value)
        {
            return Err(PolicyError::at(
                file,
                &policy.name.defined,
                "name".to_owned(),
                format!(
                    "policy {:?} is already defined in {}",
                    policy.name.value.0,
                    other.file.display()
                ),
            ));
        }
        policies.push(LoadedPolicy {
            policy,
            file: file.clone(),
            hash: xxh3_64(text.as_bytes()),
        });
    }
    policies.sort_by(|a, b| a.policy.name.value.cmp(&b.policy.name.value));
    Ok(PolicySet { policies })
}

/// Identifies a set of sources (names and texts), to notice changes.
pub fn fingerprint(sources: &[(PathBuf, String)]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (file, text) in sources {
        h.update(file.as_os_str().as_encoded_bytes());
        h.update(&[0]);
        h.update(text.as_bytes());
        h.update(&[0]);
    }
    h.digest()
}

/// Reads, parses and validates every policy behind `path`.
pub fn load_path(path: &Path) -> Result<PolicySet, PolicyError> {
    parse_sources(&read_sources(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> PolicyError {
        parse_policy(Path::new("p.yaml"), text).expect_err("policy should not load")
    }

    const SELECTORS: &str = "    selectors:\n      - control_point: ingress\n";

    #[test]
    fn a_negative_capacity_is_named_with_file_line_and_field() {
        let e = err(&format!(
            "name: p\nrate_limiters:\n  - name: rl\n{SELECTORS}    bucket_capacity: -5\n    fill_amount: 1\n    interval: 1s\n"
        ));
        assert_eq!(e.line, Some(6), "{e}");
        assert_eq!(e.field, "rate_limiters[0].bucket_capacity");
        assert!(e.message.contains(">= 0"), "{e}");
        assert!(e.to_string().starts_with("p.yaml:6:"), "{e}");
    }

    #[test]
    fn a_rule_source_that_is_not_a_token_is_refused() {
        for from in [
            r#""request.http.headers.x\nnode: 1""#,
            r#""user id""#,
            r#""""#,
        ] {
            let e = err(&format!(
                "name: p\nclassifiers:\n  - selectors: [{{control_point: ingress}}]\n    rules:\n      u: {{from: {from}}}\n"
            ));
            assert_eq!(e.field, "classifiers[0].rules.u", "{e}");
            assert!(e.message.contains("`from`"), "{e}");
        }
        for json_from in [r#""a b""#, r#""x;y""#] {
            let e = err(&format!(
                "name: p\nclassifiers:\n  - selectors: [{{control_point: ingress}}]\n    rules:\n      u: {{json: {{from: {json_from}, pointer: /a}}}}\n"
            ));
            assert!(e.message.contains("invalid character"), "{e}");
        }
    }

    #[test]
    fn an_unknown_field_is_named() {
        let e = err(&format!(
            "name: p\nsamplers:\n  - name: s\n{SELECTORS}    accept_percentage: 5\n    acept: 1\n"
        ));
        assert_eq!(e.line, Some(7), "{e}");
        assert!(e.field.ends_with("acept"), "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn an_adaptive_limit_that_could_admit_nothing_is_refused() {
        let scheduler = |adaptive: &str| {
            format!(
                "name: p\nconcurrency_schedulers:\n  - name: c\n{SELECTORS}    max_concurrency: 8\n    adaptive: {adaptive}\n"
            )
        };
        let e = err(&scheduler("{latency_setpoint_ms: 30, min_concurrency: 0}"));
        assert!(e.field.ends_with("min_concurrency"), "{e}");
        assert!(e.message.contains("at least 1"), "{e}");
        let e = err(&scheduler("{latency_setpoint_ms: 0}"));
        assert!(e.message.contains("> 0"), "{e}");
        let e = err(&scheduler(
            "{latency_setpoint_ms: 30, late_percentage: 101}",
        ));
        assert!(e.message.contains("between 0 and 100"), "{e}");
        let e = err(&scheduler("{latency_setpoint_ms: 30}\n    scope: global"));
        assert!(e.field.ends_with("adaptive"), "{e}");
        assert!(e.message.contains("scope: sidecar"), "{e}");
        let ok = parse_policy(Path::new("p.yaml"), &scheduler("{latency_setpoint_ms: 30}"))
            .expect("valid");
        let adaptive = ok.concurrency_schedulers[0]
            .adaptive
            .clone()
            .expect("adaptive");
        assert_eq!(adaptive.late_percentage.0, 10.0);
        assert_eq!(adaptive.interval.0, std::time::Duration::from_millis(100));
        assert_eq!(adaptive.min_concurrency, 1);
    }

    #[test]
    fn a_syntax_error_has_a_line() {
        let e = err("name: p\nsamplers: [\n  - name: x\n");
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let e = err(&format!(
            "name: p\nsamplers:\n  - name: s\n{SELECTORS}    accept_percentage: 5\n  - name: s\n{SELECTORS}    accept_percentage: 5\n"
        ));
        assert_eq!(e.field, "samplers[1].name");
        assert_eq!(e.line, Some(7), "{e}");
    }

    #[test]
    fn pass_through_label_values_need_a_session_label_and_are_bounded() {
        let sampler = |extra: &str| {
            format!("name: p\nsamplers:\n  - name: s\n{SELECTORS}    accept_percentage: 5\n{extra}")
        };
        let ok = parse_policy(
            Path::new("p.yaml"),
            &sampler("    session_label_key: user\n    pass_through_label_values: [a, 7, true]\n"),
        )
        .expect("loads");
        assert_eq!(
            ok.samplers[0].pass_through_label_values.0,
            ["a", "7", "true"],
            "scalars read as the text written"
        );
        let e = err(&sampler("    pass_through_label_values: [a]\n"));
        assert_eq!(e.field, "samplers[0].pass_through_label_values", "{e}");
        assert_eq!(
            e.message,
            "pass_through_label_values are values of session_label_key: set session_label_key too"
        );
        assert_eq!(e.line, Some(3), "the sampler's line: {e}");
        let many: Vec<String> = (0..=crate::types::MAX_LABEL_VALUES)
            .map(|i| i.to_string())
            .collect();
        let e = err(&sampler(&format!(
            "    session_label_key: user\n    pass_through_label_values: [{}]\n",
            many.join(", ")
        )));
        assert_eq!(e.field, "samplers[0].pass_through_label_values", "{e}");
        assert!(e.message.contains("at most 1000 values, got 1001"), "{e}");
        let e = err(&sampler(
            "    session_label_key: user\n    pass_through_label_values: [[a]]\n",
        ));
        assert!(
            e.field.starts_with("samplers[0].pass_through_label_values"),
            "{e}"
        );
    }

    #[test]
    fn rules_need_exactly_one_extractor() {
        let e = err(&format!(
            "name: p\nclassifiers:\n  -\n{SELECTORS}    rules:\n      tier:\n        from: a\n        jwt: {{claim: b}}\n"
        ));
        assert!(e.message.contains("exactly one"), "{e}");
        assert_eq!(e.field, "classifiers[0].rules.tier");
    }

    #[test]
    fn bad_regexes_and_statuses_are_refused_where_written() {
        let e = err(
            "name: p\nsamplers:\n  - name: s\n    selectors:\n      - control_point: ingress\n        label_matcher:\n          expression:\n            label_matches: {label: a, regex: '(('}\n    accept_percentage: 5\n",
        );
        assert!(e.message.contains("invalid regex"), "{e}");
        assert_eq!(e.line, Some(8), "{e}");
        let e = err(&format!(
            "name: p\nsamplers:\n  - name: s\n{SELECTORS}    accept_percentage: 5\n    denied_status_code: 200\n"
        ));
        assert_eq!(e.field, "samplers[0].denied_status_code", "{e}");
    }

    #[test]
    fn flux_meter_bucket_layouts() {
        let meter = |buckets: &str| {
            parse_policy(
                Path::new("p.yaml"),
                &format!("name: p\nflux_meters:\n  - name: m\n{SELECTORS}{buckets}"),
            )
            .map(|p| p.flux_meters[0].buckets.clone())
        };
        assert_eq!(
            meter("").expect("default"),
            crate::DEFAULT_FLUX_METER_BUCKETS
        );
        assert_eq!(
            meter("    static_buckets: [1, 2.5, 10]\n").expect("static"),
            [1.0, 2.5, 10.0]
        );
        assert_eq!(
            meter("    linear_buckets: {start: 10, width: 5, count: 3}\n").expect("linear"),
            [10.0, 15.0, 20.0]
        );
        assert_eq!(
            meter("    exponential_buckets: {start: 1, factor: 2, count: 4}\n").expect("exp"),
            [1.0, 2.0, 4.0, 8.0]
        );
        let range =
            meter("    exponential_buckets_range: {min: 1, max: 1000, count: 4}\n").expect("range");
        for (got, want) in range.iter().zip([1.0, 10.0, 100.0, 1000.0]) {
            assert!((got - want).abs() < 1e-9, "{range:?}");
        }
        for bad in [
            "    static_buckets: [2, 1]\n",
            "    static_buckets: []\n",
            "    linear_buckets: {start: 0, width: 0, count: 3}\n",
            "    exponential_buckets: {start: 1, factor: 1, count: 3}\n",
            "    exponential_buckets_range: {min: 5, max: 1, count: 3}\n",
            "    linear_buckets: {start: 0, width: 1, count: 100000}\n",
            "    static_buckets: [1]\n    linear_buckets: {start: 0, width: 1, count: 2}\n",
        ] {
            let e = meter(bad).expect_err(bad);
            assert_eq!(e.field, "flux_meters[0]", "{e}");
            assert_eq!(e.line, Some(3), "{e}");
        }
    }

    #[test]
    fn a_full_policy_loads() {
        let p = parse_policy(
            Path::new("p.yaml"),
            r#"
name: demo
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user: {from: request.http.headers.user-id}
      tier: {json: {pointer: /tier}, telemetry: false}
      route: {path_template: ["/users/{id}"]}
      sub: {jwt: {claim: sub}}
samplers:
  - name: half
    selectors:
      - control_point: ingress
        service: shop
        label_matcher:
          match_labels: {http.method: GET}
          match_expressions:
            - {key: tier, operator: In, values: [gold, silver]}
          expression:
            any:
              of:
                - label_exists: user
                - not: {label_equals: {label: tier, value: free}}
    accept_percentage: 50
    session_label_key: user
rate_limiters:
  - name: per-user
    selectors: [{control_point: ingress}]
    bucket_capacity: 5
    fill_amount: 5
    interval: 1s
    continuous_fill: false
    limit_by_label_key: user
"#,
        )
        .expect("loads");
        assert_eq!(p.classifiers[0].rules.len(), 4);
        assert_eq!(p.samplers[0].selectors[0].service, "shop");
        assert_eq!(p.rate_limiters[0].max_idle_time.0.as_secs(), 7200);
        assert_eq!(p.rate_limiters[0].denied_status_code.0, 429);
    }

    #[test]
    fn path_templates_are_a_list_or_a_map_kept_in_order() {
        use crate::{ExtractorSpec, PathTemplate};
        let rule = |rule: &str| {
            let text = format!(
                "name: p\nclassifiers:\n  - selectors: [{{control_point: ingress}}]\n    rules:\n      route: {rule}\n"
            );
            parse_policy(Path::new("p.yaml"), &text)
        };
        let templates = |rule_text: &str| match rule(rule_text).expect(rule_text).classifiers[0]
            .rules
            .values()
            .next()
            .map(|r| r.extractor.clone())
        {
            Some(ExtractorSpec::PathTemplate(t)) => t,
            other => panic!("{other:?}"),
        };
        let t = |template: &str, value: &str| PathTemplate {
            template: template.to_owned(),
            value: value.to_owned(),
        };
        assert_eq!(
            templates(r#"{path_template: ["/b/{id}", "/a"]}"#),
            [t("/b/{id}", "/b/{id}"), t("/a", "/a")]
        );
        // Not sorted: the order written is the order tried.
        assert_eq!(
            templates(r#"{path_template: {"/z/{id}": user, "/a/*": 2}}"#),
            [t("/z/{id}", "user"), t("/a/*", "2")]
        );
        for bad in [
            r#"{path_template: {}}"#,
            r#"{path_template: []}"#,
            r#"{path_template: {"a/b": x}}"#,
            r#"{path_template: {"/a": x, "/a": y}}"#,
            r#"{path_template: "/a"}"#,
        ] {
            let e = rule(bad).expect_err(bad);
            assert!(e.field.starts_with("classifiers[0].rules"), "{bad}: {e}");
        }
    }
}

#[cfg(test)]
mod size_and_stamp {
    use super::*;

    #[test]
    fn a_policy_of_too_many_components_is_refused_with_the_reason() {
        let mut text = String::from("name: many\nrate_limiters:\n");
        for i in 0..=MAX_COMPONENTS_PER_POLICY {
            text.push_str(&format!(
                "  - {{name: r{i}, selectors: [{{control_point: ingress}}], bucket_capacity: 1, fill_amount: 1, interval: 1s}}\n"
            ));
        }
        let err = parse_policy(Path::new("many.yaml"), &text).expect_err("too many");
        assert!(err.to_string().contains("at most 1000"), "{err}");
    }

    #[test]
    fn a_huge_file_is_refused_without_being_read_and_the_stamp_sees_changes() {
        let dir = tempfile::tempdir().expect("dir");
        let good = dir.path().join("a.yaml");
        std::fs::write(&good, "name: a\n").expect("write");
        let before = stamp(dir.path()).expect("stamp");
        assert_eq!(
            stamp(dir.path()),
            Some(before),
            "unchanged files, same stamp"
        );

        let huge = dir.path().join("b.yaml");
        let file = std::fs::File::create(&huge).expect("create");
        // Sparse: 1 GiB that costs nothing to make, and must cost nothing
        // to refuse.
        file.set_len(1 << 30).expect("grow");
        assert_ne!(stamp(dir.path()), Some(before), "a new file changes it");
        let err = read_sources(dir.path()).expect_err("too large");
        assert!(err.to_string().contains("larger than"), "{err}");
        assert!(err.to_string().contains("b.yaml"), "{err}");
    }
}
