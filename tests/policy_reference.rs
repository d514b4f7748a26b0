//! The policy reference checked against the code, so that the docs cannot
//! drift from what the loader accepts.
//!
//! The policy types (`crates/policy/src/`) are the source of truth: their JSON
//! Schema (`sluice schema`, `sluice_policy::schema::policy_schema`) lists
//! every field, whether it is required, its default and its doc comment.
//! `docs/policy.md` (and `docs/controller.md`, for `circuit:`) document
//! fields in tables that follow one convention:
//!
//! ```text
//! <!-- fields: rate_limiters[] -->
//! | field | default | meaning |
//! | --- | --- | --- |
//! | `bucket_capacity` | required | ... |
//! | `max_idle_time` | `2h` | ... |
//! ```
//!
//! The comment names where the table's fields are, from the top of a
//! policy file: `.` for the top level, `a.b` for a field inside a field,
//! `[]` after a list (optional), `<label>` for a map's values and `*` for
//! any field (`*.selectors[]`: the selectors of every component); several
//! places may be given, separated by commas. Where one place holds one of
//! several types with a `title` (a blueprint's `circuit.parameters`),
//! `PLACE of TITLE` is the fields of that one only (`circuit.parameters of
//! load_scheduling.aimd`). The first cell of a row holds
//! the field's name (or a dotted path below the table's place) in
//! backticks; several names may share a row. The default cell says
//! `required` for a required field; otherwise, when the code has a default
//! for the field, the cell must show it in backticks.
//!
//! Checked here: every field the schema allows is documented (a type used
//! in several places, like selectors, once); every documented field exists;
//! required and default cells agree with the code; every field has a doc
//! comment, which states its default; every complete YAML example in the
//! docs (and in README.md's Policies section) loads with the real loader.
//! A block that is not a whole policy is fenced as ```` ```yaml fragment ````
//! and only has to be YAML.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;
use sluice_policy::schema::policy_schema;
use sluice_policy::types::DurationSpec;

/// The documents holding the reference.
const REFERENCE: [&str; 2] = ["docs/policy.md", "docs/controller.md"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(file: &str) -> String {
    std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Panics with every problem, so that one run shows all of them.
fn report(what: &str, problems: Vec<String>) {
    if !problems.is_empty() {
        panic!(
            "{what}: {} problem(s):\n  - {}\n",
            problems.len(),
            problems.join("\n  - ")
        );
    }
}

// ---------------------------------------------------------------------------
// The schema's fields.

/// One field of the schema, at one place.
#[derive(Clone, Debug)]
struct Field {
    /// Where, for people: `rate_limiters[].selectors[].service`.
    shown: String,
    /// Where, for matching: `["rate_limiters", "selectors", "service"]`
    /// (list items are transparent, map values are `*`).
    key: Vec<String>,
    /// The object schema declaring it, and its name there: a type used in
    /// several places (selectors...) declares its fields once.
    identity: (String, String),
    /// The `title` of the innermost titled type it is in (the blueprint of
    /// a blueprint's parameters).
    of: Option<String>,
    required: bool,
    /// The object declaring it is one of an enum's variants: `{promql: ...}`.
    variant: bool,
    default: Option<Value>,
    description: Option<String>,
}

struct Walk<'a> {
    root: &'a Value,
    /// `$ref`s being expanded, to stop at recursive types (expressions).
    expanding: Vec<String>,
    /// The titles of the types being expanded that have one.
    titles: Vec<String>,
    fields: Vec<Field>,
}

impl Walk<'_> {
    fn walk(&mut self, node: &Value, pointer: String, shown: &str, key: &[String]) {
        if let Some(target) = node.get("$ref").and_then(Value::as_str) {
            if self.expanding.iter().any(|r| r == target) {
                return;
            }
            let def = self
                .root
                .pointer(target.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling {target}"));
            let title = def.get("title").and_then(Value::as_str);
            self.titles.extend(title.map(str::to_owned));
            self.expanding.push(target.to_owned());
            self.walk(def, target.to_owned(), shown, key);
            self.expanding.pop();
            if title.is_some() {
                self.titles.pop();
            }
            return;
        }
        for combinator in ["allOf", "anyOf", "oneOf"] {
            for (i, sub) in node
                .get(combinator)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                self.walk(sub, format!("{pointer}/{combinator}/{i}"), shown, key);
            }
        }
        if let Some(items) = node.get("items").filter(|i| i.is_object()) {
            self.walk(
                items,
                format!("{pointer}/items"),
                &format!("{shown}[]"),
                key,
            );
        }
        let mut map_values: Vec<(String, &Value)> = Vec::new();
        for (pattern, sub) in node
            .get("patternProperties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            map_values.push((format!("{pointer}/patternProperties/{pattern}"), sub));
        }
        if let Some(sub) = node.get("additionalProperties").filter(|a| a.is_object()) {
            map_values.push((format!("{pointer}/additionalProperties"), sub));
        }
        for (pointer, sub) in map_values {
            let key = [key, &["*".to_owned()]].concat();
            self.walk(sub, pointer, &dotted(shown, "<name>"), &key);
        }
        let Some(properties) = node.get("properties").and_then(Value::as_object) else {
            return;
        };
        let required: BTreeSet<&str> = node
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        // An enum's variant `{kind: ...}`, one of several: `kind` is required
        // only once that variant is chosen, and the doc comment is the
        // variant's.
        let variant = properties.len() == 1 && pointer.rsplit('/').nth(1) == Some("oneOf");
        let variant_doc = node
            .get("description")
            .and_then(Value::as_str)
            .filter(|_| variant);
        for (name, sub) in properties {
            let shown = dotted(shown, name);
            let key = [key, std::slice::from_ref(name)].concat();
            self.fields.push(Field {
                shown: shown.clone(),
                key: key.clone(),
                identity: (pointer.clone(), name.clone()),
                of: self.titles.last().cloned(),
                required: required.contains(name.as_str()),
                variant,
                default: sub.get("default").cloned(),
                description: sub
                    .get("description")
                    .and_then(Value::as_str)
                    .or(variant_doc)
                    .map(str::to_owned),
            });
            self.walk(sub, format!("{pointer}/properties/{name}"), &shown, &key);
        }
    }
}

fn dotted(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// Every field of the policy schema, at every place it can appear.
fn schema_fields(schema: &Value) -> Vec<Field> {
    let mut walk = Walk {
        root: schema,
        expanding: Vec::new(),
        titles: Vec::new(),
        fields: Vec::new(),
    };
    walk.walk(schema, "#".to_owned(), "", &[]);
    walk.fields
}

// ---------------------------------------------------------------------------
// The docs' field tables.

/// One row of a field table, at one of the table's places.
#[derive(Debug)]
struct Row {
    /// `docs/policy.md:123`
    at: String,
    /// Where, as written: `rate_limiters[].max_idle_time`.
    shown: String,
    key: Vec<String>,
    /// `PLACE of TITLE`: only the fields of the type titled so.
    of: Option<String>,
    default: String,
}

/// `rate_limiters[].selectors[]` → `["rate_limiters", "selectors"]`;
/// `rules.<label>` → `["rules", "*"]`; `.` → `[]`.
fn path_key(path: &str) -> Vec<String> {
    path.split('.')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let s = s.trim_end_matches("[]");
            if s.starts_with('<') && s.ends_with('>') {
                "*".to_owned()
            } else {
                s.to_owned()
            }
        })
        .collect()
}

/// The cells of a table line, `\|` being a `|` inside a cell.
fn cells(line: &str) -> Vec<String> {
    let line = line.trim().trim_start_matches('|');
    let line = line.strip_suffix('|').unwrap_or(line);
    let mut out = vec![String::new()];
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_owned()).collect()
}

/// The `code spans` of a cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Lines outside fenced code blocks, numbered from 1.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The rows of every field table of `file`, expanded over the table's
/// places (`*` against `places`, the schema's), with the problems found.
fn doc_rows(
    file: &str,
    places: &BTreeMap<Vec<String>, String>,
    problems: &mut Vec<String>,
) -> Vec<Row> {
    let text = read(file);
    let lines = prose_lines(&text);
    let mut rows = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let (n, line) = lines[i];
        i += 1;
        let trimmed = line.trim();
        if trimmed.starts_with('|') {
            if cells(trimmed).first().is_some_and(|c| c == "field") {
                problems.push(format!(
                    "{file}:{n}: a field table without a `<!-- fields: PLACE -->` line above it"
                ));
            }
            while i < lines.len() && lines[i].1.trim().starts_with('|') {
                i += 1;
            }
            continue;
        }
        let Some(listed) = trimmed
            .strip_prefix("<!-- fields:")
            .and_then(|rest| rest.strip_suffix("-->"))
        else {
            continue;
        };
        // The places, each matched against the schema (`*`: any field).
        let mut prefixes: Vec<(String, Vec<String>, Option<String>)> = Vec::new();
        for place in listed.split(',').map(str::trim) {
            let (place, of) = match place.split_once(" of ") {
                Some((place, of)) => (place.trim(), Some(of.trim().to_owned())),
                None => (place, None),
            };
            let pattern = path_key(place);
            let matches: Vec<(Vec<String>, String)> = if pattern.is_empty() {
                vec![(pattern, String::new())]
            } else {
                places
                    .iter()
                    .filter(|(k, _)| {
                        k.len() == pattern.len()
                            && k.iter().zip(&pattern).all(|(k, p)| p == "*" || k == p)
                    })
                    .map(|(k, shown)| (k.clone(), shown.clone()))
                    .collect()
            };
            if matches.is_empty() {
                problems.push(format!(
                    "{file}:{n}: `{place}` is not a place in the policy schema (see `sluice schema`)"
                ));
            }
            for (key, shown) in matches {
                prefixes.push((shown, key, of.clone()));
            }
        }
        while i < lines.len() && lines[i].1.trim().is_empty() {
            i += 1;
        }
        if i >= lines.len() || !lines[i].1.trim().starts_with('|') {
            problems.push(format!(
                "{file}:{n}: `<!-- fields: ... -->` not followed by a table"
            ));
            continue;
        }
        let header = cells(lines[i].1);
        let default_col = header
            .iter()
            .position(|c| c.eq_ignore_ascii_case("default"));
        if header.first().map(String::as_str) != Some("field") || default_col.is_none() {
            problems.push(format!(
                "{file}:{}: a field table's header is `| field | default | ... |`, got {header:?}",
                lines[i].0
            ));
        }
        i += 2; // header and separator
        while i < lines.len() && lines[i].1.trim().starts_with('|') {
            let (n, line) = lines[i];
            i += 1;
            let row = cells(line);
            let names = code_spans(&row[0]);
            if names.is_empty() {
                problems.push(format!(
                    "{file}:{n}: no `field` in the first cell of {line:?}"
                ));
            }
            let default = default_col
                .and_then(|c| row.get(c))
                .cloned()
                .unwrap_or_default();
            for name in names {
                for (shown_prefix, prefix, of) in &prefixes {
                    rows.push(Row {
                        at: format!("{file}:{n}"),
                        shown: dotted(shown_prefix, &name),
                        key: [prefix.clone(), path_key(&name)].concat(),
                        of: of.clone(),
                        default: default.clone(),
                    });
                }
            }
        }
    }
    rows
}

// ---------------------------------------------------------------------------
// Defaults.

/// Whether `token` (from a default cell) says `value` (the schema's).
fn same_default(value: &Value, token: &str) -> bool {
    match value {
        Value::String(s) => {
            s == token
                || matches!(
                    (DurationSpec::parse(s), DurationSpec::parse(token)),
                    (Ok(a), Ok(b)) if a == b
                )
        }
        Value::Number(n) => token.parse::<f64>().ok() == n.as_f64(),
        Value::Bool(b) => token == b.to_string(),
        other => serde_json::from_str::<Value>(token).ok().as_ref() == Some(other),
    }
}

/// A default as a doc comment writes it: `2h`, `1` (not `1.0`), `true`.
fn shown_default(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------
// The checks.

#[test]
fn every_field_has_a_doc_comment_stating_its_default() {
    let mut problems = Vec::new();
    for field in schema_fields(&policy_schema()) {
        let Some(description) = field
            .description
            .as_deref()
            .filter(|d| !d.trim().is_empty())
        else {
            problems.push(format!(
                "`{}` has no doc comment: document the field in crates/policy/src/",
                field.shown
            ));
            continue;
        };
        if let Some(default) = field.default.as_ref().filter(|d| !d.is_null()) {
            let shown = shown_default(default);
            if !(description.to_lowercase().contains("default") && description.contains(&shown)) {
                problems.push(format!(
                    "`{}` defaults to `{shown}` in the code, but its doc comment does not say so: {description:?}",
                    field.shown
                ));
            }
        }
    }
    report("doc comments of the policy types", problems);
}

#[test]
fn the_reference_documents_every_field_and_only_fields_that_exist() {
    let schema = policy_schema();
    let fields = schema_fields(&schema);
    assert!(
        fields.len() > 100,
        "the schema walk found too few fields: {}",
        fields.len()
    );
    let mut by_key: BTreeMap<&[String], Vec<&Field>> = BTreeMap::new();
    for f in &fields {
        by_key.entry(&f.key).or_default().push(f);
    }
    // The places a table can document (fields, and map values: `rules.*`),
    // with how they are shown (`classifiers[].rules.<name>`).
    let places: BTreeMap<Vec<String>, String> = fields
        .iter()
        .flat_map(|f| {
            let shown: Vec<&str> = f.shown.split('.').collect();
            (1..=f.key.len()).map(move |n| (f.key[..n].to_vec(), shown[..n].join(".")))
        })
        .collect();

    let mut problems = Vec::new();
    let mut rows = Vec::new();
    for file in REFERENCE {
        rows.extend(doc_rows(file, &places, &mut problems));
    }

    let mut documented: BTreeSet<&(String, String)> = BTreeSet::new();
    for row in &rows {
        // `PLACE of TITLE`: the fields of that type only.
        let found: Vec<&Field> = by_key
            .get(row.key.as_slice())
            .into_iter()
            .flatten()
            .copied()
            .filter(|f| row.of.is_none() || f.of == row.of)
            .collect();
        if found.is_empty() {
            problems.push(format!(
                "{}: documents `{}`{}, which is not a field of the policy schema \
                 (renamed or removed in crates/policy/src/? `sluice schema` prints the fields)",
                row.at,
                row.shown,
                row.of
                    .as_ref()
                    .map(|of| format!(" of {of}"))
                    .unwrap_or_default()
            ));
            continue;
        }
        // A documented field documents the fields it is inside, too.
        for len in 1..row.key.len() {
            for f in by_key.get(&row.key[..len]).into_iter().flatten() {
                documented.insert(&f.identity);
            }
        }
        for f in &found {
            documented.insert(&f.identity);
        }
        for f in found {
            let says_required = row.default.to_lowercase().starts_with("required");
            if !f.variant && says_required != f.required {
                problems.push(format!(
                    "{}: `{}` is {} in the code, but the docs' default cell says {:?}",
                    row.at,
                    f.shown,
                    if f.required { "required" } else { "optional" },
                    row.default
                ));
            }
            if let Some(default) = f.default.as_ref().filter(|d| !d.is_null()) {
                let spans = code_spans(&row.default);
                if !spans.iter().any(|s| same_default(default, s)) {
                    problems.push(format!(
                        "{}: `{}` defaults to `{}` in the code, but the docs' default cell says {:?}",
                        row.at,
                        f.shown,
                        shown_default(default),
                        row.default
                    ));
                }
            }
        }
    }

    // Every field, once per declaring type, shown at its first place.
    let mut reported = BTreeSet::new();
    for f in &fields {
        if !documented.contains(&f.identity) && reported.insert(&f.identity) {
            problems.push(format!(
                "`{}`{} is not documented: add a row for it to the field table of its place in {}",
                f.shown,
                f.of.as_ref()
                    .map(|of| format!(" (of {of})"))
                    .unwrap_or_default(),
                if f.key[0] == "circuit" {
                    "docs/controller.md"
                } else {
                    "docs/policy.md"
                }
            ));
        }
    }
    report("the policy reference against the code", problems);
}

/// The ```yaml blocks of `text`: (line of the fence, info string, body).
fn yaml_blocks(text: &str, first_line: usize) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = first_line + i;
        let fence = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = fence.strip_prefix("```") {
                    open = Some((n, info.trim().to_owned(), String::new()));
                }
            }
            Some((_, _, body)) => {
                if fence.starts_with("```") {
                    let (at, info, body) = open.take().unwrap();
                    if info.starts_with("yaml") || info.starts_with("yml") {
                        out.push((at, info, body));
                    }
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    out
}

/// README.md's `## Policies` section, and the line it starts at.
fn readme_policies() -> (String, usize) {
    let text = read("README.md");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "## Policies")
        .expect("README.md has a `## Policies` section");
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |e| start + 1 + e);
    (lines[start..end].join("\n"), start + 1)
}

/// What is wrong with the ```yaml block of `file` whose fence is at line
/// `at`, if anything.
fn check_example(file: &str, at: usize, info: &str, body: String) -> Option<String> {
    const HOW: &str = "fence it as ```yaml fragment if it is not a whole policy";
    match info {
        "yaml" => {
            let name = PathBuf::from(format!("{file}:{at}"));
            let e = sluice_policy::load::parse_sources(&[(name, body)]).err()?;
            // The error's line is within the block: make it the document's.
            let line = e
                .line
                .map_or(String::new(), |l| format!(":{}", at + l as usize));
            let field = match e.field.as_str() {
                "" => String::new(),
                field => format!(" {field}:"),
            };
            Some(format!(
                "{file}{line}: the example at line {at} does not load:{field} {} ({HOW})",
                e.message
            ))
        }
        "yaml fragment" => serde_saphyr::from_str::<Value>(&body)
            .err()
            .map(|e| format!("{file}:{at}: the fragment is not YAML: {e}")),
        other => Some(format!(
            "{file}:{at}: fence a policy example as ```yaml, or ```yaml fragment \
             when it is not a whole policy (got ```{other})"
        )),
    }
}

#[test]
fn every_policy_example_in_the_docs_loads() {
    let mut sources: Vec<(&str, String, usize)> =
        REFERENCE.iter().map(|f| (*f, read(f), 1)).collect();
    let (section, line) = readme_policies();
    sources.push(("README.md", section, line));

    let mut problems = Vec::new();
    let mut complete = 0;
    for (file, text, first_line) in &sources {
        for (at, info, body) in yaml_blocks(text, *first_line) {
            complete += usize::from(info == "yaml");
            problems.extend(check_example(file, at, &info, body));
        }
    }
    assert!(
        complete >= 10,
        "found only {complete} complete policy examples"
    );
    report("policy examples in the docs", problems);
}

#[test]
fn sluice_schema_prints_the_policy_schema() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("schema")
        .output()
        .expect("run sluice schema");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("sluice schema prints JSON");
    assert_eq!(printed, policy_schema());
    assert_eq!(
        printed["$schema"], "http://json-schema.org/draft-07/schema#",
        "docs/policy.md says draft-07, what yaml-language-server supports best"
    );
    // A spot check that doc comments and serde defaults reach the schema.
    let rate_limiter = &printed["definitions"]["RateLimiterSpec"]["properties"];
    assert_eq!(
        rate_limiter["max_idle_time"]["default"], "2h",
        "rate_limiters[].max_idle_time in {rate_limiter:#}"
    );
    assert!(
        rate_limiter["bucket_capacity"]["description"].is_string(),
        "rate_limiters[].bucket_capacity in {rate_limiter:#}"
    );
}
