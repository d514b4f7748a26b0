//! The engine's metrics, with Aperture's names so that dashboards carry
//! over.
//!
//! One [`prometheus::Registry`] per engine (not the process-global default),
//! so that tests can run several engines in one process; the sidecar adds
//! its own edge metrics to it ([`Metrics::registry`]).
//!
//! Per-component series are owned by their component. A component resolves
//! each series it writes once, when it is compiled, through
//! [`Family::series`], which records it in the component's [`Series`]; the
//! request path then costs an atomic add, never a label lookup. When a
//! policy reload removes or renames a component, the engine retires every
//! series the old plan recorded and the new one does not
//! (`Engine::install`), so reload can neither leak a series nor orphan one
//! that a kept component still writes: there is no second list of series
//! to keep in step with the first.

use ahash::AHashSet;
use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// `decision_type` label value of an accepted flow.
pub const ACCEPTED: &str = "accepted";
/// `decision_type` label value of a rejected flow.
pub const REJECTED: &str = "rejected";

/// Registers `metric` in `registry`: the one place the engine registers
/// anything.
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<C>,
) -> C {
    // Every name and label set is a constant of this file, and each is
    // registered once in a registry the engine has just made, so neither
    // step can fail at run time; `metrics_register` below proves it.
    let metric = metric.expect("the engine's metric definitions are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each of the engine's metrics is registered once");
    metric
}

/// A metric family whose series belong to components: a vector with the
/// name its series are recorded under.
#[derive(Clone, Debug)]
pub struct Family<V> {
    name: &'static str,
    vec: V,
}

impl<T: MetricVecBuilder + 'static> Family<MetricVec<T>> {
    fn new(registry: &Registry, name: &'static str, vec: prometheus::Result<MetricVec<T>>) -> Self {
        Family {
            name,
            vec: register(registry, vec),
        }
    }

    /// The family, for reading (tests, status). A component resolves the
    /// series it writes with [`Family::series`], never here.
    pub fn vec(&self) -> &MetricVec<T> {
        &self.vec
    }

    /// The series with `labels`, recorded in `owner` so that it goes when
    /// its component goes.
    pub fn series(&self, owner: &mut Series, labels: &[&str]) -> T::M {
        owner.record(self.name, labels, Box::new(self.vec.clone()));
        self.vec.with_label_values(labels)
    }
}

/// How a recorded series is taken out of `/metrics`.
pub trait Retire: Send + Sync {
    /// Removes the series with `labels`.
    fn retire(&self, labels: &[Box<str>]);
}

impl<T: MetricVecBuilder> Retire for MetricVec<T> {
    fn retire(&self, labels: &[Box<str>]) {
        // A series that is already gone is what retiring wants.
        let _ = self.remove_label_values(labels);
    }
}

/// A collector registered on its own (a flux meter's histogram, which has
/// its own buckets), retired by unregistering it.
pub struct Registered {
    /// Where it is registered.
    pub registry: Registry,
    /// What is registered.
    pub collector: HistogramVec,
}

impl Retire for Registered {
    fn retire(&self, _labels: &[Box<str>]) {
        let _ = self.registry.unregister(Box::new(self.collector.clone()));
    }
}

/// One series: its family's name and its label values.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    family: &'static str,
    labels: Box<[Box<str>]>,
}

/// The series one component writes, recorded as it resolved them.
#[derive(Default)]
pub struct Series {
    owned: Vec<(SeriesKey, Box<dyn Retire>)>,
}

impl std::fmt::Debug for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.owned.iter().map(|(k, _)| k))
            .finish()
    }
}

impl Series {
    /// Records a series under `family` with `labels`.
    pub fn record(&mut self, family: &'static str, labels: &[&str], retire: Box<dyn Retire>) {
        let key = SeriesKey {
            family,
            labels: labels.iter().map(|l| Box::from(*l)).collect(),
        };
        self.owned.push((key, retire));
    }

    /// The recorded series.
    pub fn keys(&self) -> impl Iterator<Item = &SeriesKey> {
        self.owned.iter().map(|(k, _)| k)
    }

    /// Removes every recorded series not in `keep`.
    pub fn retire_except(&self, keep: &AHashSet<&SeriesKey>) {
        for (key, retire) in &self.owned {
            if !keep.contains(key) {
                retire.retire(&key.labels);
            }
        }
    }
}

/// The accepted/rejected pair of a component's decision counter, and its
/// rejections in `flowcontrol_reject_reasons_total`.
#[derive(Clone, Debug)]
pub struct DecisionCounters {
    /// Flows the component accepted.
    pub accepted: IntCounter,
    /// Flows the component rejected.
    pub rejected: IntCounter,
    /// Rejections, as counted in `flowcontrol_reject_reasons_total`.
    pub reject_reason: IntCounter,
}

impl DecisionCounters {
    /// Resolves the series of component `component` of `policy` in
    /// `family`, rejecting for `reason`.
    pub fn new(
        metrics: &Metrics,
        family: &Family<IntCounterVec>,
        owner: &mut Series,
        [policy, component]: [&str; 2],
        reason: &str,
    ) -> Self {
        DecisionCounters {
            accepted: family.series(owner, &[policy, component, ACCEPTED]),
            rejected: family.series(owner, &[policy, component, REJECTED]),
            reject_reason: metrics
                .reject_reasons
                .series(owner, &[policy, component, reason]),
        }
    }

    /// Counts one decision.
    #[inline]
    pub fn count(&self, accepted: bool) {
        if accepted {
            self.accepted.inc();
        } else {
            self.rejected.inc();
            self.reject_reason.inc();
        }
    }
}

/// Every metric the engine writes.
#[derive(Clone)]
pub struct Metrics {
    /// Where the metrics live; `/metrics` encodes it.
    pub registry: Registry,
    /// `flowcontrol_requests_total`: Checks decided.
    pub requests: IntCounter,
    /// `flowcontrol_decisions_total{decision_type="accepted"}`.
    pub accepted: IntCounter,
    /// `flowcontrol_decisions_total{decision_type="rejected"}`.
    pub rejected: IntCounter,
    /// `policy_loaded`: 1 once a valid policy set is in force.
    pub policy_loaded: IntGauge,
    /// `control_points_overflow_total`: Checks whose control point/service
    /// pair was not recorded because the table of pairs was full.
    pub control_points_overflow: IntCounter,
    /// `flowcontrol_inflight_flows`: accepted flows holding concurrency
    /// slots, waiting for their access log.
    pub inflight_flows: IntGauge,
    /// `flowcontrol_inflight_flows_expired_total`: flows whose slots were
    /// returned at `max_inflight_duration`, their log never seen.
    pub inflight_expired: IntCounter,
    /// `flowcontrol_inflight_flows_evicted_total`: flows whose slots were
    /// returned early because the table of flows in flight was full.
    pub inflight_evicted: IntCounter,
    /// `flowcontrol_reject_reasons_total{policy_name, component, reason}`.
    pub reject_reasons: Family<IntCounterVec>,
    /// `rate_limiter_counter_total{policy_name, component, decision_type}`.
    pub rate_limiter: Family<IntCounterVec>,
    /// `sampler_counter_total{policy_name, component, decision_type}`.
    pub sampler: Family<IntCounterVec>,
    /// `concurrency_limiter_counter_total{policy_name, component, decision_type}`.
    pub concurrency_limiter: Family<IntCounterVec>,
    /// `invalid_flux_meter_total{flux_meter_name, policy_name}`: access logs
    /// without the value a flux meter observes.
    pub invalid_flux_meter: Family<IntCounterVec>,
    /// `workload_requests_total{policy_name, component, workload_index,
    /// decision_type}`: scheduler decisions per workload.
    pub workload_requests: Family<IntCounterVec>,
    /// `incoming_tokens_total{policy_name, component, workload_index}`.
    pub incoming_tokens: Family<CounterVec>,
    /// `accepted_tokens_total{policy_name, component, workload_index}`.
    pub accepted_tokens: Family<CounterVec>,
    /// `rejected_tokens_total{policy_name, component, workload_index}`.
    pub rejected_tokens: Family<CounterVec>,
    /// `request_in_queue_duration_ms{policy_name, component, workload_index}`.
    pub request_in_queue_duration: Family<HistogramVec>,
    /// `workload_latency_ms{policy_name, component, workload_index}`: the
    /// upstream's latency of admitted flows, from their access logs.
    pub workload_latency: Family<HistogramVec>,
    /// `token_bucket_lm_ratio{policy_name, component}`: the load multiplier
    /// in force (1 when passing everything).
    pub lm_ratio: Family<GaugeVec>,
    /// `token_bucket_fill_rate{policy_name, component}`: tokens per second.
    pub fill_rate: Family<GaugeVec>,
    /// `token_bucket_available_tokens_total{policy_name, component}`.
    pub available_tokens: Family<GaugeVec>,
    /// `controller_decision_active{policy_name, component}`: 1 while a
    /// controller's decision holds for the component, 0 once it lapsed and
    /// the component is back to its policy's value.
    pub controller_decision_active: Family<IntGaugeVec>,
    /// `concurrency_limit{policy_name, component}`: a concurrency
    /// scheduler's limit in force (adaptive, the controller's or the
    /// policy's).
    pub concurrency_limit: Family<IntGaugeVec>,
    /// `load_multiplier_expired{policy_name, component}`: 1 while a load
    /// scheduler passes everything because the controller's multiplier
    /// lapsed.
    pub lm_expired: Family<IntGaugeVec>,
    /// `classifier_counter_total{policy_name, component}`: flows classified.
    pub classifier: Family<IntCounterVec>,
    /// `classifier_errors_total{policy_name, component}`: rules whose
    /// source was present but could not be read (bad JSON, bad JWT, ...).
    pub classifier_errors: Family<IntCounterVec>,
    /// `label_state_evicted_total{policy_name, component}`: per-label state
    /// dropped because a component's table was full.
    pub label_state_evicted: Family<IntCounterVec>,
    /// `label_state_expired_total{policy_name, component}`: per-label state
    /// dropped after `max_idle_time` unused.
    pub label_state_expired: Family<IntCounterVec>,
    /// `label_state_entries{policy_name, component}`: label values tracked.
    pub label_state_entries: Family<IntGaugeVec>,
    /// `store_leases_total{policy_name, component}`: leases a global
    /// component asked the store for.
    pub store_leases: Family<IntCounterVec>,
    /// `store_tokens_granted_total{policy_name, component}`: tokens the
    /// store granted them.
    pub store_tokens_granted: Family<CounterVec>,
    /// `store_fallback_total{policy_name, component}`: Checks a global
    /// component decided without the store (`on_store_unavailable`).
    pub store_fallbacks: Family<IntCounterVec>,
}

/// Buckets of `request_in_queue_duration_ms`, in ms.
const QUEUE_BUCKETS: [f64; 13] = [
    0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

const COMPONENT: &[&str] = &["policy_name", "component"];
const DECISION: &[&str] = &["policy_name", "component", "decision_type"];
const WORKLOAD: &[&str] = &["policy_name", "component", "workload_index"];

impl Metrics {
    /// Creates every metric in a registry of its own.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let counter = |name: &str, help: &str| register(r, IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| register(r, IntGauge::new(name, help));
        let counters = |name, help, labels| {
            Family::new(r, name, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let float_counters = |name, help, labels| {
            Family::new(r, name, CounterVec::new(Opts::new(name, help), labels))
        };
        let gauges =
            |name, help| Family::new(r, name, GaugeVec::new(Opts::new(name, help), COMPONENT));
        let int_gauges =
            |name, help| Family::new(r, name, IntGaugeVec::new(Opts::new(name, help), COMPONENT));
        let histograms = |name, help, buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            Family::new(r, name, HistogramVec::new(opts, WORKLOAD))
        };
        let decisions = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "flowcontrol_decisions_total",
                    "Flow-control decisions by type.",
                ),
                &["decision_type"],
            ),
        );
        Metrics {
            requests: counter(
                "flowcontrol_requests_total",
                "Flow-control Checks answered by this sidecar.",
            ),
            accepted: decisions.with_label_values(&[ACCEPTED]),
            rejected: decisions.with_label_values(&[REJECTED]),
            policy_loaded: gauge("policy_loaded", "1 once a valid policy set is in force."),
            control_points_overflow: counter(
                "control_points_overflow_total",
                "Checks whose control point and service were not recorded for /control-points because its table was full.",
            ),
            inflight_flows: gauge(
                "flowcontrol_inflight_flows",
                "Accepted flows holding concurrency slots until their access log arrives.",
            ),
            inflight_expired: counter(
                "flowcontrol_inflight_flows_expired_total",
                "Flows whose concurrency slots were returned at max_inflight_duration, their access log never seen.",
            ),
            inflight_evicted: counter(
                "flowcontrol_inflight_flows_evicted_total",
                "Flows whose concurrency slots were returned early because the table of flows in flight was full.",
            ),
            reject_reasons: counters(
                "flowcontrol_reject_reasons_total",
                "Rejections by the component that rejected and why.",
                &["policy_name", "component", "reason"],
            ),
            rate_limiter: counters(
                "rate_limiter_counter_total",
                "Flows seen by a rate limiter, by decision.",
                DECISION,
            ),
            sampler: counters(
                "sampler_counter_total",
                "Flows seen by a sampler, by decision.",
                DECISION,
            ),
            concurrency_limiter: counters(
                "concurrency_limiter_counter_total",
                "Flows seen by a concurrency limiter, by decision.",
                DECISION,
            ),
            invalid_flux_meter: counters(
                "invalid_flux_meter_total",
                "Access logs without the value a flux meter observes.",
                &["flux_meter_name", "policy_name"],
            ),
            workload_requests: counters(
                "workload_requests_total",
                "Scheduler decisions per workload.",
                &[
                    "policy_name",
                    "component",
                    "workload_index",
                    "decision_type",
                ],
            ),
            incoming_tokens: float_counters(
                "incoming_tokens_total",
                "Tokens of the requests a scheduler saw, per workload.",
                WORKLOAD,
            ),
            accepted_tokens: float_counters(
                "accepted_tokens_total",
                "Tokens of the requests a scheduler admitted, per workload.",
                WORKLOAD,
            ),
            rejected_tokens: float_counters(
                "rejected_tokens_total",
                "Tokens of the requests a scheduler rejected, per workload.",
                WORKLOAD,
            ),
            request_in_queue_duration: histograms(
                "request_in_queue_duration_ms",
                "Time requests spent in a scheduler's queue, ms.",
                &QUEUE_BUCKETS,
            ),
            workload_latency: histograms(
                "workload_latency_ms",
                "Upstream latency of admitted flows per workload, ms, from access logs.",
                &sluice_policy::DEFAULT_FLUX_METER_BUCKETS,
            ),
            lm_ratio: gauges(
                "token_bucket_lm_ratio",
                "Load multiplier in force (1: passing everything).",
            ),
            fill_rate: gauges(
                "token_bucket_fill_rate",
                "Token bucket fill rate, tokens/s.",
            ),
            available_tokens: gauges(
                "token_bucket_available_tokens_total",
                "Tokens available in the bucket now.",
            ),
            controller_decision_active: int_gauges(
                "controller_decision_active",
                "1 while a sluice-controller decision holds for the component; 0 when it lapsed to the policy's value.",
            ),
            concurrency_limit: int_gauges(
                "concurrency_limit",
                "A concurrency scheduler's limit on flows in flight now: its adaptive limit, the controller's or the policy's.",
            ),
            lm_expired: int_gauges(
                "load_multiplier_expired",
                "1 while a load scheduler passes everything because its multiplier's valid_until passed.",
            ),
            classifier: counters(
                "classifier_counter_total",
                "Flows a classifier ran on.",
                COMPONENT,
            ),
            classifier_errors: counters(
                "classifier_errors_total",
                "Classifier rules whose source was present but unreadable (bad JSON, bad JWT).",
                COMPONENT,
            ),
            label_state_evicted: counters(
                "label_state_evicted_total",
                "Per-label state dropped because the component's table was full.",
                COMPONENT,
            ),
            label_state_expired: counters(
                "label_state_expired_total",
                "Per-label state dropped after max_idle_time unused.",
                COMPONENT,
            ),
            label_state_entries: int_gauges(
                "label_state_entries",
                "Label values a component tracks.",
            ),
            store_leases: counters(
                "store_leases_total",
                "Leases of tokens a global component asked the store for.",
                COMPONENT,
            ),
            store_tokens_granted: float_counters(
                "store_tokens_granted_total",
                "Tokens the store granted a global component.",
                COMPONENT,
            ),
            store_fallbacks: counters(
                "store_fallback_total",
                "Checks a global component decided without the store (on_store_unavailable).",
                COMPONENT,
            ),
            registry,
        }
    }

    /// Where the engine's metrics live, for `/metrics`, remote-write and the
    /// edges' own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders every metric in the Prometheus text format.
    pub fn encode_text(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding only fails on a write error, which a Vec cannot have.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_register() {
        let metrics = Metrics::new();
        metrics.requests.inc();
        assert!(
            metrics
                .encode_text()
                .contains("flowcontrol_requests_total 1")
        );
    }

    #[test]
    fn retiring_removes_only_what_is_not_kept() {
        let metrics = Metrics::new();
        let (mut old, mut new) = (Series::default(), Series::default());
        metrics
            .sampler
            .series(&mut old, &["p", "gone", ACCEPTED])
            .inc();
        metrics
            .sampler
            .series(&mut old, &["p", "kept", ACCEPTED])
            .inc();
        metrics
            .sampler
            .series(&mut new, &["p", "kept", ACCEPTED])
            .inc();
        let keep: AHashSet<&SeriesKey> = new.keys().collect();
        old.retire_except(&keep);
        let text = metrics.encode_text();
        assert!(!text.contains("component=\"gone\""), "{text}");
        assert!(
            text.contains(r#"sampler_counter_total{component="kept",decision_type="accepted",policy_name="p"} 2"#),
            "{text}"
        );
    }
}
