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

/// The text of a JSON string or number, `-` when absent or null.
fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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

/// `name=value` pairs of a list of labels.
fn labels(list: &Value) -> String {
    let pairs: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| format!("{}={}", plain(&l["name"]), plain(&l["value"])))
        .collect();
    if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join("  ")
    }
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
            labels(&s["request"]),
            labels(&s["classified"])
        );
    }
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
                 "request": [{"name": "http.method", "value": "GET"}],
                 "classified": [{"name": "user", "value": "ann"}],
                 "matched": [{"kind": "rate_limiter", "policy": "users", "component": "per-user"}],
                 "outcome": {"decision": "rejected", "policy": "users", "component": "per-user",
                             "reason": "rate_limited", "status": 429}},
                {"control_point": "ingress", "service": "shop", "request": [], "classified": [],
                 "matched": [], "outcome": {"decision": "accepted", "waited": true}}
            ]
        });
        let text = render_preview(&answer);
        assert_eq!(
            text,
            "2 of 3 Checks at control point ingress (the rest did not come before the timeout)\n\
             \n\
             #  SERVICE  DECISION                                        MATCHED\n\
             1  shop     rejected by users/per-user: rate_limited (429)  users/per-user\n\
             2  shop     accepted after waiting                          -\n\
             \n#1\n  request:    http.method=GET\n  classified: user=ann\n\
             \n#2\n  request:    -\n  classified: -\n"
        );
    }
}
