//! The alerts of every policy's alerters, as the controller shows them:
//! the `controller_alert` series on `/metrics` (one per alerter, 1 while
//! it fires, 0 otherwise, with the alert's own labels: a Prometheus
//! alerting rule on `controller_alert == 1` routes them), and
//! `GET /v1/alerts` on the admin listener (JSON: each alert that has fired
//! since the controller started, firing or resolved, with when).
//!
//! The circuits say whether each alert fires ([`Circuit::alerts`]); this
//! module keeps when it started and when it resolved (wall clock, unix
//! ms), across policy reloads that keep the alert.
//!
//! [`Circuit::alerts`]: crate::circuit::Circuit::alerts

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto;

use crate::State;
use crate::circuit::Alert;

/// When one alert last started firing and resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Times {
    /// When it last started firing; `None` if it never has.
    pub since: Option<i64>,
    /// When it last resolved, if it is not firing.
    pub resolved: Option<i64>,
}

/// Updates `times` (one per alert of `alerts`) after a tick at `now`
/// (unix ms).
pub(crate) fn update(alerts: &[Alert], times: &mut Vec<Times>, now: i64) {
    times.resize(alerts.len(), Times::default());
    for (alert, t) in alerts.iter().zip(times.iter_mut()) {
        match (alert.firing, t.since, t.resolved) {
            (true, None, _) | (true, Some(_), Some(_)) => {
                *t = Times {
                    since: Some(now),
                    resolved: None,
                }
            }
            (false, Some(_), None) => t.resolved = Some(now),
            _ => {}
        }
    }
}

/// The times of `alerts`, taken from `old_alerts` (a policy's previous
/// circuit) and `old_times` for the alerts that are the same.
pub(crate) fn carry_over(
    alerts: &[Alert],
    old_alerts: &[Alert],
    old_times: &[Times],
) -> Vec<Times> {
    alerts
        .iter()
        .map(|a| {
            old_alerts
                .iter()
                .zip(old_times)
                .find(|(o, _)| o.same(a))
                .map_or_else(Times::default, |(_, t)| *t)
        })
        .collect()
}

/// The labels of alert `a` of policy `policy`, sorted by name.
fn labels<'a>(policy: &'a str, a: &'a Alert, channels: &'a str) -> BTreeMap<&'a str, &'a str> {
    let mut labels: BTreeMap<&str, &str> = a
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    labels.insert("policy_name", policy);
    labels.insert("alert_name", &a.name);
    labels.insert("severity", a.severity.name());
    if !channels.is_empty() {
        labels.insert("alert_channels", channels);
    }
    labels
}

/// The JSON body of `GET /v1/alerts`.
pub(crate) fn json(state: &State) -> Vec<u8> {
    let running = state.running.lock();
    let mut alerts = Vec::new();
    for r in running.iter() {
        for (a, t) in r.circuit.alerts().iter().zip(&r.alert_times) {
            let Some(since) = t.since else { continue };
            alerts.push(serde_json::json!({
                "policy_name": r.name,
                "alert_name": a.name,
                "severity": a.severity.name(),
                "labels": a.labels,
                "alert_channels": a.channels,
                "status": if a.firing { "firing" } else { "resolved" },
                "since_unix_ms": since,
                "resolved_unix_ms": t.resolved.filter(|_| !a.firing),
            }));
        }
    }
    drop(running);
    let key = |v: &serde_json::Value| {
        (
            v["policy_name"].to_string(),
            v["alert_name"].to_string(),
            v["severity"].to_string(),
            v["labels"].to_string(),
        )
    };
    alerts.sort_by_key(key);
    let mut body = serde_json::to_vec(&serde_json::json!({ "alerts": alerts }))
        .unwrap_or_else(|_| b"{\"alerts\":[]}".to_vec());
    body.push(b'\n');
    body
}

/// `controller_alert`: one series per alerter of every running circuit,
/// read from the circuits when scraped.
pub(crate) struct AlertSeries {
    state: Arc<State>,
    desc: Desc,
}

/// The series' name.
const NAME: &str = "controller_alert";

impl AlertSeries {
    pub(crate) fn new(state: Arc<State>) -> prometheus::Result<Self> {
        let desc = Desc::new(
            NAME.to_owned(),
            "1 while an alerter's alert fires, 0 otherwise; labelled policy_name, alert_name, severity, alert_channels (comma-separated, when any) and the alert's labels.".to_owned(),
            Vec::new(),
            Default::default(),
        )?;
        Ok(AlertSeries { state, desc })
    }
}

impl Collector for AlertSeries {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let mut metrics = Vec::new();
        for r in self.state.running.lock().iter() {
            for a in r.circuit.alerts() {
                let channels = a.channels.join(",");
                let mut m = proto::Metric::default();
                m.set_label(
                    labels(&r.name, a, &channels)
                        .into_iter()
                        .map(|(k, v)| {
                            let mut l = proto::LabelPair::default();
                            l.set_name(k.to_owned());
                            l.set_value(v.to_owned());
                            l
                        })
                        .collect(),
                );
                let mut g = proto::Gauge::default();
                g.set_value(f64::from(u8::from(a.firing)));
                m.set_gauge(g);
                metrics.push(m);
            }
        }
        let mut family = proto::MetricFamily::default();
        family.set_name(NAME.to_owned());
        family.set_help(self.desc.help.clone());
        family.set_field_type(proto::MetricType::GAUGE);
        family.set_metric(metrics);
        vec![family]
    }
}
