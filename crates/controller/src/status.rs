//! What the controller is doing now: `GET /v1/status` on the admin
//! listener (JSON) and the table `sluice-controller status` prints from it.
//!
//! The body joins three things the controller already keeps, each read
//! once and briefly, never across an `.await`:
//!
//! - every running circuit's signals with their values and when each was
//!   last computed, and whether its queries were answered (the
//!   [`Running`] entries of the tick's [`State`], under the same short
//!   lock `/v1/alerts` takes);
//! - the decisions sent last: the set the tick published on the `watch`
//!   channel every subscriber's stream reads, so what is shown is exactly
//!   what went out (clamped, with its `valid_until`);
//! - the sidecars subscribed now ([`Subscribers`]: an entry per open
//!   stream, added by `Subscribe` and removed when the stream ends).
//!
//! A signal's age is the time since the controller last computed it: the
//! tick that wrote it, or, for a `promql` signal between its evaluations,
//! the tick whose query answered. It is not the age of the samples in
//! Prometheus: an instant query's answer carries the time it was asked,
//! and how far back Prometheus looked for each series is up to the query
//! (its range) and Prometheus's lookback. While Prometheus cannot be asked,
//! circuits do not run and every age grows.
//!
//! [`Running`]: crate::Running

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::IntGauge;
use serde_json::{Value, json};

use crate::State;
use crate::wire;

/// The longest agent group, service or instance kept for a subscriber:
/// they come from the sidecar's request, and a status is for reading.
const MAX_IDENTITY_BYTES: usize = 256;

/// The sidecars subscribed now, one entry per open `Subscribe` stream.
pub(crate) struct Subscribers {
    /// The next entry's key (streams of one sidecar may overlap while it
    /// reconnects, so the identity alone is no key).
    next: AtomicU64,
    /// The open streams' subscribers, by key.
    open: Mutex<BTreeMap<u64, Subscriber>>,
    /// `controller_subscribers`, kept equal to `open`'s length.
    gauge: IntGauge,
}

/// Who subscribed, as the sidecar said, and since when.
#[derive(Clone, Debug)]
struct Subscriber {
    /// `--agent-group` of the sidecar.
    agent_group: String,
    /// `--service` of the sidecar.
    service: String,
    /// `--instance` of the sidecar (by default its host name and admin
    /// port); empty from a sidecar that sends none.
    instance: String,
    /// Where the stream comes from, when it came over TCP.
    peer: Option<SocketAddr>,
    /// When it subscribed (unix ms).
    since_unix_ms: i64,
}

/// One open stream's entry: dropping it (the stream ended) removes it.
pub(crate) struct Subscription {
    subscribers: Arc<Subscribers>,
    key: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.subscribers.open.lock().remove(&self.key).is_some() {
            self.subscribers.gauge.dec();
        }
    }
}

/// `s` cut to at most [`MAX_IDENTITY_BYTES`], on a character boundary.
fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_IDENTITY_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl Subscribers {
    /// None yet; `gauge` counts them.
    pub(crate) fn new(gauge: IntGauge) -> Arc<Self> {
        Arc::new(Subscribers {
            next: AtomicU64::new(0),
            open: Mutex::new(BTreeMap::new()),
            gauge,
        })
    }

    /// Records the sidecar that sent `who` from `peer`, until the returned
    /// entry is dropped.
    pub(crate) fn add(
        self: &Arc<Self>,
        who: &wire::SubscribeRequest,
        peer: Option<SocketAddr>,
        now_unix_ms: i64,
    ) -> Subscription {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber {
            agent_group: bounded(&who.agent_group),
            service: bounded(&who.service),
            instance: bounded(&who.instance),
            peer,
            since_unix_ms: now_unix_ms,
        };
        self.open.lock().insert(key, subscriber);
        self.gauge.inc();
        Subscription {
            subscribers: self.clone(),
            key,
        }
    }

    /// Everyone subscribed now.
    fn list(&self) -> Vec<Subscriber> {
        self.open.lock().values().cloned().collect()
    }
}

/// The last tick, as the ticker saw it end.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LastTick {
    /// When its decisions were published (unix ms).
    pub ended_unix_ms: i64,
    /// From its start to its decisions being published.
    pub took: Duration,
    /// Whether every query it asked was answered.
    pub prometheus_up: bool,
    /// Ticks run since the controller started, this one included.
    pub count: u64,
}

/// What one query round of a policy's circuit came to.
#[derive(Clone, Debug)]
pub(crate) struct Queried {
    /// When the tick that asked ended its queries (unix ms).
    pub unix_ms: i64,
    /// The first query Prometheus could not answer, if one could not.
    pub error: Option<String>,
}

/// The `policy` parameter of `GET /v1/status`, from the request's query
/// string. Any other parameter is refused rather than ignored: a
/// misspelt filter would otherwise show everything as if it had matched.
pub(crate) fn parse_query(query: Option<&str>) -> Result<Option<String>, String> {
    let mut policy = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "policy" if policy.is_none() => policy = Some(value.to_owned()),
            "policy" => return Err("policy is given twice".to_owned()),
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (GET /v1/status takes: policy)"
                ));
            }
        }
    }
    Ok(policy)
}

/// Seconds from `then` to `now` (unix ms), never below 0 (a wall clock
/// set back).
fn seconds_since(then: i64, now: i64) -> f64 {
    (now.saturating_sub(then).max(0)) as f64 / 1000.0
}

/// A decision as one entry of a policy's `outputs`.
fn output(d: &wire::Decision) -> Option<Value> {
    use wire::decision::Action;
    let valid_until = d.valid_until_unix_ms;
    Some(match d.action.as_ref()? {
        Action::LoadMultiplier(a) => json!({
            "component": a.load_scheduler, "component_kind": "load_scheduler",
            "kind": "load_multiplier", "value": a.multiplier,
            "valid_until_unix_ms": valid_until,
        }),
        Action::AcceptPercentage(a) => json!({
            "component": a.sampler, "component_kind": "sampler",
            "kind": "accept_percentage", "value": a.percentage,
            "valid_until_unix_ms": valid_until,
        }),
        Action::MaxConcurrency(a) => json!({
            "component": a.concurrency_limiter, "component_kind": "concurrency_limiter",
            "kind": "max_concurrency", "value": a.max_concurrency,
            "valid_until_unix_ms": valid_until,
        }),
        Action::SchedulerConcurrency(a) => json!({
            "component": a.concurrency_scheduler, "component_kind": "concurrency_scheduler",
            "kind": "scheduler_concurrency", "value": a.max_concurrency,
            "valid_until_unix_ms": valid_until,
        }),
        Action::RateLimit(a) => json!({
            "component": a.rate_limiter, "component_kind": "rate_limiter",
            "kind": "rate_limit", "bucket_capacity": a.bucket_capacity,
            "fill_amount": a.fill_amount, "valid_until_unix_ms": valid_until,
        }),
        Action::QuotaBucket(a) => json!({
            "component": a.quota_scheduler, "component_kind": "quota_scheduler",
            "kind": "quota_bucket", "bucket_capacity": a.bucket_capacity,
            "fill_amount": a.fill_amount, "valid_until_unix_ms": valid_until,
        }),
    })
}

/// One running circuit as `/v1/status` shows it, copied out of the tick's
/// lock.
struct PolicyCopy {
    name: String,
    hash: u64,
    ran: Option<i64>,
    queried: Option<Queried>,
    held: bool,
    /// Each signal's name, value and when it was last computed.
    signals: Vec<(String, Option<f64>, Option<i64>)>,
}

/// The body of `GET /v1/status` at `now` (unix ms), or why `policy` names
/// nothing to show.
pub(crate) fn json(
    state: &State,
    sent: &wire::DecisionSet,
    subscribers: &Subscribers,
    policy: Option<&str>,
    now: i64,
) -> Result<Vec<u8>, String> {
    let age = |t: Option<i64>| t.map(|t| seconds_since(t, now));
    let last_tick = *state.last_tick.lock();
    // Copy what is shown under the tick's lock; build the JSON after it.
    let copied: Vec<PolicyCopy> = state
        .running
        .lock()
        .iter()
        .filter(|r| policy.is_none_or(|p| p == r.name))
        .map(|r| PolicyCopy {
            name: r.name.clone(),
            hash: r.hash,
            ran: r.ran_unix_ms,
            queried: r.queried.clone(),
            held: r.held,
            signals: r
                .circuit
                .signals()
                .enumerate()
                .map(|(i, (name, value))| {
                    (
                        name.to_owned(),
                        value,
                        r.signal_at.get(i).copied().flatten(),
                    )
                })
                .collect(),
        })
        .collect();
    let mut policies = Vec::new();
    for c in copied {
        let signals: Vec<Value> = c
            .signals
            .iter()
            .map(|(name, value, at)| {
                json!({
                    "name": name,
                    "value": value,
                    "updated_unix_ms": at,
                    "age_seconds": age(*at),
                })
            })
            .collect();
        policies.push(json!({
            "policy_name": c.name,
            "policy_hash": format!("{:016x}", c.hash),
            "circuit_ran_unix_ms": c.ran,
            "circuit_ran_age_seconds": age(c.ran),
            "queries": c.queried.as_ref().map(|q| json!({
                "ok": q.error.is_none(),
                "error": q.error,
                "unix_ms": q.unix_ms,
            })),
            "outputs_held": c.held,
            "signals": signals,
        }));
    }
    if let Some(p) = policy
        && policies.is_empty()
    {
        return Err(format!(
            "no policy named {p:?} has a circuit running on this controller"
        ));
    }
    for p in &mut policies {
        let name = p["policy_name"].as_str().unwrap_or_default().to_owned();
        let outputs: Vec<Value> = sent
            .decisions
            .iter()
            .filter(|d| d.policy_name == name)
            .filter_map(output)
            .collect();
        p["outputs"] = Value::Array(outputs);
    }
    let mut sidecars = subscribers.list();
    sidecars.sort_by(|a, b| {
        (&a.agent_group, &a.service, &a.instance, a.since_unix_ms).cmp(&(
            &b.agent_group,
            &b.service,
            &b.instance,
            b.since_unix_ms,
        ))
    });
    let sidecars: Vec<Value> = sidecars
        .iter()
        .map(|s| {
            json!({
                "agent_group": s.agent_group,
                "service": s.service,
                "instance": s.instance,
                "peer": s.peer.map(|p| p.to_string()),
                "since_unix_ms": s.since_unix_ms,
                "connected_seconds": seconds_since(s.since_unix_ms, now),
            })
        })
        .collect();
    let body = json!({
        "now_unix_ms": now,
        "tick_seconds": state.tick.as_secs_f64(),
        "last_tick": last_tick.map(|t| json!({
            "unix_ms": t.ended_unix_ms,
            "age_seconds": seconds_since(t.ended_unix_ms, now),
            "duration_seconds": t.took.as_secs_f64(),
            "prometheus_up": t.prometheus_up,
            "count": t.count,
        })),
        "decisions_sent_unix_ms": (sent.sent_unix_ms > 0).then_some(sent.sent_unix_ms),
        "policies": policies,
        "sidecars": sidecars,
    });
    let mut out = serde_json::to_vec_pretty(&body).map_err(|e| e.to_string())?;
    out.push(b'\n');
    Ok(out)
}

/// `s` with control characters escaped: names come from sidecars and
/// policy files, and a terminal must not take them for commands.
fn clean(s: &str) -> String {
    if s.is_empty() {
        return "-".to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A number as an operator reads it: integers plainly, others to four
/// significant decimals; `-` for none.
fn number(v: &Value) -> String {
    match v.as_f64() {
        None => "-".to_owned(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => {
            let s = format!("{x:.4}");
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        }
    }
}

/// Seconds as `0.4s`, `12s` or `3m 12s`; `-` for none.
fn span(v: &Value) -> String {
    match v.as_f64() {
        None => "-".to_owned(),
        Some(s) if s < 10.0 => format!("{s:.1}s"),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) => humantime::format_duration(Duration::from_secs(s as u64)).to_string(),
    }
}

/// A tick's duration: milliseconds below a second, else as [`span`].
fn took(v: &Value) -> String {
    match v.as_f64() {
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1000.0),
        _ => span(v),
    }
}

/// Rows as columns padded to their widest cell, each line after `indent`.
fn table(out: &mut String, indent: &str, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = indent.to_owned();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// The table `sluice-controller status` prints from a `/v1/status` body.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let now = status["now_unix_ms"].as_i64().unwrap_or(0);
    let tick = &status["last_tick"];
    let every = span(&status["tick_seconds"]);
    if tick.is_null() {
        let _ = writeln!(out, "controller: ticks every {every}; no tick yet");
    } else {
        let prometheus = if tick["prometheus_up"].as_bool() == Some(true) {
            "Prometheus answered every query"
        } else {
            "Prometheus did not answer every query"
        };
        let _ = writeln!(
            out,
            "controller: ticks every {every}; last tick {} ago, took {}; {prometheus}",
            span(&tick["age_seconds"]),
            took(&tick["duration_seconds"]),
        );
    }
    let empty = Vec::new();
    let policies = status["policies"].as_array().unwrap_or(&empty);
    if policies.is_empty() {
        let _ = writeln!(out, "\nno policy with a circuit");
    }
    for p in policies {
        let ran = if p["circuit_ran_unix_ms"].is_null() {
            "circuit not run yet".to_owned()
        } else {
            format!("circuit ran {} ago", span(&p["circuit_ran_age_seconds"]))
        };
        let queries = match p["queries"]["error"].as_str() {
            Some(e) => format!("; queries failed: {}", clean(e)),
            None => String::new(),
        };
        let held = if p["outputs_held"].as_bool() == Some(true) {
            "; last outputs held"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "\npolicy {} ({}): {ran}{queries}{held}",
            clean(p["policy_name"].as_str().unwrap_or_default()),
            clean(p["policy_hash"].as_str().unwrap_or_default()),
        );
        let mut rows = vec![vec!["signal".to_owned(), "value".into(), "age".into()]];
        for s in p["signals"].as_array().unwrap_or(&empty) {
            rows.push(vec![
                clean(s["name"].as_str().unwrap_or_default()),
                number(&s["value"]),
                span(&s["age_seconds"]),
            ]);
        }
        table(&mut out, "  ", &rows);
        let outputs = p["outputs"].as_array().unwrap_or(&empty);
        if outputs.is_empty() {
            let _ = writeln!(out, "  no outputs sent");
            continue;
        }
        let mut rows = vec![vec![
            "sent to".to_owned(),
            "kind".into(),
            "value".into(),
            "valid for".into(),
        ]];
        for o in outputs {
            let value = if o.get("value").is_some() {
                number(&o["value"])
            } else {
                format!(
                    "bucket_capacity {}, fill_amount {}",
                    number(&o["bucket_capacity"]),
                    number(&o["fill_amount"])
                )
            };
            let left = o["valid_until_unix_ms"].as_i64().unwrap_or(0) - now;
            let valid = if left > 0 {
                span(&json!(left as f64 / 1000.0))
            } else {
                "lapsed".to_owned()
            };
            rows.push(vec![
                format!(
                    "{} {}",
                    clean(o["component_kind"].as_str().unwrap_or_default()),
                    clean(o["component"].as_str().unwrap_or_default())
                ),
                clean(o["kind"].as_str().unwrap_or_default()),
                value,
                valid,
            ]);
        }
        table(&mut out, "  ", &rows);
    }
    let sidecars = status["sidecars"].as_array().unwrap_or(&empty);
    let _ = writeln!(out, "\nsidecars subscribed: {}", sidecars.len());
    if !sidecars.is_empty() {
        let mut rows = vec![vec![
            "agent_group".to_owned(),
            "service".into(),
            "instance".into(),
            "peer".into(),
            "for".into(),
        ]];
        for s in sidecars {
            rows.push(vec![
                clean(s["agent_group"].as_str().unwrap_or_default()),
                clean(s["service"].as_str().unwrap_or_default()),
                clean(s["instance"].as_str().unwrap_or_default()),
                clean(s["peer"].as_str().unwrap_or_default()),
                span(&s["connected_seconds"]),
            ]);
        }
        table(&mut out, "  ", &rows);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_policy_parameter_is_taken() {
        assert_eq!(parse_query(None), Ok(None));
        assert_eq!(parse_query(Some("")), Ok(None));
        assert_eq!(parse_query(Some("policy=api")), Ok(Some("api".to_owned())));
        assert!(
            parse_query(Some("polcy=api"))
                .unwrap_err()
                .contains("unknown parameter \"polcy\"")
        );
        assert!(parse_query(Some("policy=a&policy=b")).is_err());
    }

    #[test]
    fn subscribers_leave_when_their_stream_ends() {
        let gauge = IntGauge::new("g", "g").expect("gauge");
        let subscribers = Subscribers::new(gauge.clone());
        let who = wire::SubscribeRequest {
            agent_group: "edge".to_owned(),
            service: "é".repeat(200),
            instance: String::new(),
        };
        let first = subscribers.add(&who, None, 1);
        let second = subscribers.add(&who, None, 2);
        assert_eq!(gauge.get(), 2);
        let listed = subscribers.list();
        assert_eq!(listed.len(), 2, "a reconnecting sidecar's streams overlap");
        // Cut on a character boundary: 'é' is two bytes.
        assert_eq!(listed[0].service.len(), MAX_IDENTITY_BYTES);
        drop(first);
        assert_eq!(subscribers.list()[0].since_unix_ms, 2);
        drop(second);
        assert!(subscribers.list().is_empty());
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn the_table_escapes_what_sidecars_send_and_shows_missing_values() {
        let status = json!({
            "now_unix_ms": 10_000,
            "tick_seconds": 1.0,
            "last_tick": null,
            "policies": [{
                "policy_name": "p", "policy_hash": "00", "circuit_ran_unix_ms": null,
                "queries": null, "outputs_held": false,
                "signals": [{"name": "x", "value": null, "age_seconds": null},
                            {"name": "y", "value": 0.333333, "age_seconds": 0.25}],
                "outputs": [{"component": "api", "component_kind": "rate_limiter",
                             "kind": "rate_limit", "bucket_capacity": 50.0,
                             "fill_amount": null, "valid_until_unix_ms": 12_500}],
            }],
            "sidecars": [{"agent_group": "a\u{1b}[2J", "service": "s", "instance": "",
                          "peer": null, "connected_seconds": 130.0}],
        });
        let text = render(&status);
        for needle in [
            "no tick yet",
            "circuit not run yet",
            "x       -",
            "y       0.3333  0.2s",
            "rate_limiter api  rate_limit  bucket_capacity 50, fill_amount -  2.5s",
            "a\\u{1b}[2J",
            "2m 10s",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from\n{text}");
        }
        assert!(!text.contains('\u{1b}'));

        let ticked = json!({
            "tick_seconds": 10.0,
            "last_tick": {"age_seconds": 4.0, "duration_seconds": 0.0019, "prometheus_up": false},
            "policies": [],
            "sidecars": [],
        });
        assert_eq!(
            render(&ticked),
            "controller: ticks every 10s; last tick 4.0s ago, took 1.9ms; \
             Prometheus did not answer every query\n\nno policy with a circuit\n\n\
             sidecars subscribed: 0\n"
        );
    }
}
