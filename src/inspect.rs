//! The commands that ask a running sidecar's admin listener and print the
//! answer for a person: `sluice preview` (`GET /v1/preview`) and
//! `sluice status` (`GET /v1/status`). Each prints a readable table, or the
//! JSON as the sidecar sent it with `--json`, and exits 1 with one line
//! saying why when the sidecar cannot be asked or refuses the question.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

/// Largest answer read: a preview of 100 samples with large headers.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// `GET {admin}{path}?{query}`: the JSON answer, or why there is none.
pub fn ask(
    admin: &http::Uri,
    path: &str,
    query: &[(&str, String)],
    timeout: Duration,
) -> anyhow::Result<(String, Value)> {
    let mut url = format!("{}{path}", admin.to_string().trim_end_matches('/'));
    if !query.is_empty() {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            q.append_pair(k, v);
        }
        url.push('?');
        url.push_str(&q.finish());
    }
    let uri: http::Uri = url.parse()?;
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(sluice_runtime::http_client::get_once(
            &uri,
            timeout,
            MAX_ANSWER_BYTES,
        ));
    let (status, body) = answer.map_err(|e| anyhow::anyhow!("GET {uri}: {e:#}"))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        anyhow::bail!("GET {uri}: {status}: {}", text.trim());
    }
    let json = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("GET {uri}: the answer is not JSON: {e}"))?;
    Ok((text, json))
}

/// The text of a JSON string or number, `-` when absent or null; control
/// characters escaped, so that a request's header or baggage value cannot
/// drive the terminal (an `ESC [2J` in a baggage member).
fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => clean(s),
        other => other.to_string(),
    }
}

/// `s` with control characters shown escaped (`\u{1b}`).
fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Rows as aligned columns under `header`.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<w$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// One sample's decision in words.
fn decision(outcome: &Value) -> String {
    match outcome["decision"].as_str() {
        Some("accepted") if outcome["waited"] == Value::Bool(true) => {
            "accepted after waiting".into()
        }
        Some("accepted") => "accepted".into(),
        Some("rejected") => format!(
            "rejected by {}/{}: {} ({})",
            plain(&outcome["policy"]),
            plain(&outcome["component"]),
            plain(&outcome["reason"]),
            plain(&outcome["status"])
        ),
        Some("abandoned") => "abandoned by Envoy while waiting".into(),
        _ => plain(&outcome["decision"]),
    }
}

/// Width a preview's label lines are wrapped at.
const WIDTH: usize = 100;

/// `name=value` pairs of a list of labels, wrapped at [`WIDTH`] columns
/// with continuation lines indented by `indent`.
fn labels(list: &Value, indent: usize) -> String {
    let pairs: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| format!("{}={}", plain(&l["name"]), plain(&l["value"])))
        .collect();
    if pairs.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    let mut column = indent;
    for pair in pairs {
        let width = pair.chars().count();
        if column > indent {
            if column + 2 + width > WIDTH {
                out.push('\n');
                out.push_str(&" ".repeat(indent));
                column = indent;
            } else {
                out.push_str("  ");
                column += 2;
            }
        }
        out.push_str(&pair);
        column += width;
    }
    out
}

/// A preview's answer for a person: one row per sample, then each
/// sample's labels.
pub fn render_preview(answer: &Value) -> String {
    let samples = answer["samples"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let asked = plain(&answer["asked"]);
    let _ = writeln!(
        out,
        "{} of {asked} Checks at control point {}{}{}",
        samples.len(),
        plain(&answer["control_point"]),
        match &answer["service"] {
            Value::String(s) => format!(", service {s}"),
            _ => String::new(),
        },
        if answer["complete"] == Value::Bool(true) {
            ""
        } else {
            " (the rest did not come before the timeout)"
        }
    );
    if samples.is_empty() {
        return out;
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let matched: Vec<String> = s["matched"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| format!("{}/{}", plain(&m["policy"]), plain(&m["component"])))
                .collect();
            vec![
                (i + 1).to_string(),
                plain(&s["service"]),
                decision(&s["outcome"]),
                if matched.is_empty() {
                    "-".into()
                } else {
                    matched.join(", ")
                },
            ]
        })
        .collect();
    out.push_str(&table(&["#", "SERVICE", "DECISION", "MATCHED"], &rows));
    for (i, s) in samples.iter().enumerate() {
        let _ = write!(
            out,
            "\n#{}\n  request:    {}\n  classified: {}\n",
            i + 1,
            labels(&s["request"], 14),
            labels(&s["classified"], 14)
        );
        if let Some(n) = s["labels_left_out"].as_u64().filter(|&n| n > 0) {
            let _ = writeln!(out, "              ({n} more request labels not kept)");
        }
    }
    out
}

/// A number as a person reads it: at most two decimals, no trailing zeros.
fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => {
            let s = format!("{x:.2}");
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        }
        None => "-".to_owned(),
    }
}

/// A component's live state in a few words.
fn component_state(c: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    if c["scope"] == "global" {
        parts.push("global".into());
    }
    if c["bucket_capacity"].is_number() {
        let refill = format!(
            "+{} per {}s",
            num(&c["fill_amount"]),
            num(&c["interval_seconds"])
        );
        parts.push(if c["bucket_level"].is_number() {
            format!(
                "{} of {} tokens, {refill}",
                num(&c["bucket_level"]),
                num(&c["bucket_capacity"])
            )
        } else {
            format!("buckets of {}, {refill}", num(&c["bucket_capacity"]))
        });
    }
    if c["max_concurrency"].is_number() {
        let limit = num(&c["max_concurrency"]);
        let adaptive = if c["adaptive"] == Value::Bool(true) {
            " (adaptive)"
        } else {
            ""
        };
        parts.push(if c["in_flight"].is_number() {
            format!("{} of {limit}{adaptive} in flight", num(&c["in_flight"]))
        } else {
            format!("limit {limit}{adaptive}")
        });
    }
    if c["label_key"].is_string() {
        parts.push(format!(
            "per {} ({} values)",
            plain(&c["label_key"]),
            num(&c["label_values"])
        ));
    }
    if c["accept_percentage"].is_number() {
        parts.push(format!("{}% accepted", num(&c["accept_percentage"])));
    }
    if c["load_multiplier"].is_number() {
        parts.push(format!("multiplier {}", num(&c["load_multiplier"])));
        if c["incoming_rate"].is_number() {
            parts.push(format!("{}/s incoming", num(&c["incoming_rate"])));
        }
    }
    if c["dry_run"] == Value::Bool(true) {
        parts.push("dry run".into());
    }
    if c["queued"].is_number() {
        parts.push(format!("{} queued", num(&c["queued"])));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// A sidecar's status for a person: a table of components per policy,
/// then the controller subscription.
pub fn render_status(status: &Value) -> String {
    let mut out = String::new();
    let policies = status["policies"].as_array().cloned().unwrap_or_default();
    if policies.is_empty() {
        out.push_str("No policy in force: every Check is accepted.\n");
    }
    for p in &policies {
        let _ = writeln!(
            out,
            "Policy {} ({}, hash {})",
            plain(&p["name"]),
            plain(&p["file"]),
            plain(&p["hash"])
        );
        let rows: Vec<Vec<String>> = p["components"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let driven = &c["controller"];
                vec![
                    plain(&c["kind"]),
                    plain(&c["name"]),
                    component_state(c),
                    if driven.is_object() {
                        format!("driven, {}s left", num(&driven["valid_for_seconds"]))
                    } else {
                        "-".into()
                    },
                ]
            })
            .collect();
        for line in table(&["KIND", "NAME", "STATE", "CONTROLLER"], &rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "Flows holding slots until their access log: {}",
        num(&status["inflight_flows"])
    );
    let c = &status["controller"];
    if !c.is_object() {
        out.push_str("Controller: none (--controller not set)\n");
        return out;
    }
    let state = if c["connected"] == Value::Bool(true) {
        "subscribed".to_owned()
    } else {
        match &c["last_error"] {
            Value::String(e) => format!("NOT subscribed: {e}"),
            _ => "NOT subscribed yet".to_owned(),
        }
    };
    let decisions: Vec<String> = c["decisions"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "Controller {}: {state}, as {} / {} / {}; decisions: {}",
        plain(&c["url"]),
        plain(&c["agent_group"]),
        plain(&c["service"]),
        plain(&c["instance"]),
        if decisions.is_empty() {
            "none yet".to_owned()
        } else {
            decisions.join(", ")
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preview_reads_as_a_table() {
        let answer = serde_json::json!({
            "control_point": "ingress", "service": null, "asked": 3, "complete": false,
            "samples": [
                {"control_point": "ingress", "service": "shop",
                 "request": [{"name": "http.method", "value": "GET"},
                             {"name": "http.target", "value": "/a-long-path/that-goes-on-and-on/and-on"},
                             {"name": "http.request.header.user_agent", "value": "a-client/1.0"}],
                 "classified": [{"name": "user", "value": "ann"}],
                 "matched": [{"kind": "rate_limiter", "policy": "users", "component": "per-user"}],
                 "outcome": {"decision": "rejected", "policy": "users", "component": "per-user",
                             "reason": "rate_limited", "status": 429}},
                {"control_point": "ingress", "service": "shop", "request": [], "classified": [],
                 "matched": [], "outcome": {"decision": "accepted", "waited": true}}
            ]
        });
        let text = render_preview(&answer);
        assert!(
            render_preview(&serde_json::json!({"samples": [{"service": "a\u{1b}[2J"}]}))
                .contains("a\\u{1b}[2J"),
            "control characters are escaped"
        );
        assert_eq!(
            text,
            "2 of 3 Checks at control point ingress (the rest did not come before the timeout)\n\
             \n\
             #  SERVICE  DECISION                                        MATCHED\n\
             1  shop     rejected by users/per-user: rate_limited (429)  users/per-user\n\
             2  shop     accepted after waiting                          -\n\
             \n#1\n  request:    http.method=GET  http.target=/a-long-path/that-goes-on-and-on/and-on\n              \
             http.request.header.user_agent=a-client/1.0\n  classified: user=ann\n\
             \n#2\n  request:    -\n  classified: -\n"
        );
    }
}
