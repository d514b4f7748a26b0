//! Flux meters: histograms of what matching flows' access logs report
//! (by default the upstream's latency, `workload_duration_ms`).
//!
//! A flux meter is matched at Check time (stage 3, after classifiers, so it
//! can select on their labels) and named in the flow's `sluice.flow`
//! metadata; it observes the flow once, when the access log arrives, in the
//! histogram `flux_meter{flux_meter_name, policy_name, decision_type,
//! http_status_code, flow_status}`. A log without the observed value counts
//! `invalid_flux_meter_total` instead.
//!
//! Each meter has its own buckets, so each owns a `HistogramVec` with its
//! name and policy as constant labels; they share the metric name, and the
//! registry merges them into one family.

use std::sync::Arc;
use std::sync::OnceLock;

use prometheus::{HistogramOpts, HistogramVec, IntCounter};
use sluice_policy::FluxMeterSpec;

use super::selector::Selector;
use crate::flow_end::{ExtraAttributes, FlowEnd};
use crate::metrics::{ACCEPTED, Metrics, REJECTED, Registered, Series};

/// One compiled flux meter.
pub struct FluxMeter {
    /// The policy it belongs to.
    pub policy: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
    /// `policy/name`: how `sluice.flow` refers to it.
    pub key: Box<str>,
    /// Which flows it observes.
    pub selectors: Box<[Selector]>,
    /// What it observes.
    pub attribute_key: Box<str>,
    /// Its bucket bounds.
    pub buckets: Vec<f64>,
    /// The histogram (registered while the meter is in force).
    histogram: HistogramVec,
    /// `invalid_flux_meter_total` of this meter.
    invalid: IntCounter,
    /// Every series it writes (its histogram among them).
    pub series: Series,
}

impl std::fmt::Debug for FluxMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxMeter")
            .field("key", &self.key)
            .field("attribute_key", &self.attribute_key)
            .finish_non_exhaustive()
    }
}

/// `http_status_code` label values, without formatting per observation.
fn status_label(code: Option<u16>) -> &'static str {
    static LABELS: OnceLock<Vec<String>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..1000).map(|c| c.to_string()).collect());
    code.and_then(|c| labels.get(usize::from(c)))
        .map_or("0", String::as_str)
}

impl FluxMeter {
    /// Compiles a flux meter of `policy`, keeping `previous`'s histogram
    /// when the meter is unchanged; registers a new histogram otherwise
    /// (unregistering `previous`'s first: the two share their name and
    /// constant labels, which a registry holds once).
    pub fn compile(
        policy: &Arc<str>,
        spec: &FluxMeterSpec,
        metrics: &Metrics,
        previous: Option<&FluxMeter>,
    ) -> Self {
        let name: Arc<str> = spec.name.value.0.as_str().into();
        let histogram = match previous {
            Some(old)
                if old.buckets == spec.buckets && *old.attribute_key == *spec.attribute_key =>
            {
                old.histogram.clone()
            }
            _ => {
                if let Some(old) = previous {
                    let _ = metrics.registry.unregister(Box::new(old.histogram.clone()));
                }
                let opts = HistogramOpts::new(
                    "flux_meter",
                    "Flows observed by a flux meter (by default the upstream's latency in ms).",
                )
                .const_label("flux_meter_name", &*name)
                .const_label("policy_name", &**policy)
                .buckets(spec.buckets.clone());
                let histogram =
                    HistogramVec::new(opts, &["decision_type", "http_status_code", "flow_status"])
                        .expect("valid histogram definition");
                if let Err(e) = metrics.registry.register(Box::new(histogram.clone())) {
                    tracing::error!(error = %e, meter = %name, "cannot register flux meter histogram");
                }
                histogram
            }
        };
        let mut series = Series::default();
        series.record(
            "flux_meter",
            &[policy, &name],
            Box::new(Registered {
                registry: metrics.registry.clone(),
                collector: histogram.clone(),
            }),
        );
        FluxMeter {
            invalid: metrics
                .invalid_flux_meter
                .series(&mut series, &[&name, policy]),
            series,
            key: format!("{policy}/{name}").into(),
            policy: policy.clone(),
            name,
            selectors: spec.selectors.iter().map(Selector::compile).collect(),
            attribute_key: spec.attribute_key.as_str().into(),
            buckets: spec.buckets.clone(),
            histogram,
        }
    }

    /// Observes one finished flow.
    pub fn observe(&self, end: &FlowEnd<'_>, accepted: bool, extras: &dyn ExtraAttributes) {
        match end.value(&self.attribute_key, accepted, extras) {
            Some(value) => self
                .histogram
                .with_label_values(&[
                    if accepted { ACCEPTED } else { REJECTED },
                    status_label(end.status_code),
                    end.flow_status(),
                ])
                .observe(value),
            None => self.invalid.inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow_end::{AttrValue, NoExtras};

    fn meter(metrics: &Metrics, extra: &str) -> FluxMeter {
        let yaml = format!("name: latency\nselectors: [{{control_point: ingress}}]\n{extra}");
        let spec: FluxMeterSpec = serde_saphyr::from_str(&yaml).expect("valid meter");
        FluxMeter::compile(&"p".into(), &spec, metrics, None)
    }

    fn end(status: &'static str, response: &'static str) -> FlowEnd<'static> {
        let mut e = FlowEnd::default();
        e.set("http.status_code", AttrValue::Text(status.into()));
        e.set("RESPONSE_DURATION", AttrValue::Text(response.into()));
        e.set("authz_duration", AttrValue::Text("1".into()));
        e
    }

    #[test]
    fn observes_into_labelled_series_and_counts_invalid_logs() {
        let metrics = Metrics::new();
        let m = meter(&metrics, "static_buckets: [10, 100]\n");
        m.observe(&end("200", "5"), true, &NoExtras);
        m.observe(&end("200", "50"), true, &NoExtras);
        m.observe(&end("500", "500"), true, &NoExtras);
        m.observe(&end("429", "-"), false, &NoExtras);
        m.observe(&end("200", "-"), true, &NoExtras);
        let text = metrics.encode_text();
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("no {needle} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(
            line(
                r#"flux_meter_bucket{decision_type="accepted",flow_status="OK",flux_meter_name="latency",http_status_code="200",policy_name="p",le="10"}"#
            ),
            "1"
        );
        assert_eq!(
            line(
                r#"flux_meter_count{decision_type="accepted",flow_status="OK",flux_meter_name="latency",http_status_code="200",policy_name="p"}"#
            ),
            "2"
        );
        assert_eq!(
            line(
                r#"flux_meter_sum{decision_type="accepted",flow_status="Error",flux_meter_name="latency",http_status_code="500",policy_name="p"}"#
            ),
            "499"
        );
        assert_eq!(
            line(
                r#"flux_meter_sum{decision_type="rejected",flow_status="Error",flux_meter_name="latency",http_status_code="429",policy_name="p"}"#
            ),
            "0"
        );
        assert_eq!(
            line(r#"invalid_flux_meter_total{flux_meter_name="latency",policy_name="p"}"#),
            "1"
        );
    }

    #[test]
    fn meters_of_different_buckets_share_the_family() {
        let metrics = Metrics::new();
        let a = meter(&metrics, "static_buckets: [1]\n");
        let spec: FluxMeterSpec = serde_saphyr::from_str(
            "name: other\nselectors: [{control_point: ingress}]\nstatic_buckets: [1, 2, 3]\n",
        )
        .expect("valid");
        let b = FluxMeter::compile(&"p".into(), &spec, &metrics, None);
        a.observe(&end("200", "5"), true, &NoExtras);
        b.observe(&end("200", "5"), true, &NoExtras);
        let text = metrics.encode_text();
        assert_eq!(
            text.matches("# TYPE flux_meter histogram").count(),
            1,
            "{text}"
        );
        assert_eq!(text.matches("flux_meter_count{").count(), 2, "{text}");
        // A changed meter replaces its histogram; an unchanged one keeps it
        // and its counts.
        let changed_spec: FluxMeterSpec = serde_saphyr::from_str(
            "name: latency\nselectors: [{control_point: ingress}]\nstatic_buckets: [1, 5]\n",
        )
        .expect("valid");
        let a2 = FluxMeter::compile(&"p".into(), &changed_spec, &metrics, Some(&a));
        let b2 = FluxMeter::compile(&"p".into(), &spec, &metrics, Some(&b));
        a2.observe(&end("200", "3"), true, &NoExtras);
        let text = metrics.encode_text();
        assert!(
            text.contains(
                r#"flux_meter_name="latency",http_status_code="200",policy_name="p",le="5"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"flux_meter_count{decision_type="accepted",flow_status="OK",flux_meter_name="other",http_status_code="200",policy_name="p"} 1"#), "{text}");
        // Removed: its series retire, the histogram with them.
        b2.series.retire_except(&Default::default());
        let text = metrics.encode_text();
        assert!(!text.contains(r#"flux_meter_count{decision_type="accepted",flow_status="OK",flux_meter_name="other""#), "{text}");
        assert_eq!(status_label(Some(429)), "429");
        assert_eq!(status_label(None), "0");
    }
}
