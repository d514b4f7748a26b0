//! The sidecar's own metrics.
//!
//! One [`prometheus::Registry`] per engine (not the process-global default),
//! so that tests can run several sidecars in one process. Counters that the
//! request path touches are resolved to concrete series when a policy is
//! compiled ([`ComponentCounters`]), so a decision costs an atomic add, never
//! a label lookup. Metric names are Aperture's, so dashboards carry over.

pub mod remote_write;

use prometheus::{
    CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// `decision_type` label values.
pub const ACCEPTED: &str = "accepted";
/// `decision_type` label values.
pub const REJECTED: &str = "rejected";

/// Every metric the engine and its adapters write.
#[derive(Clone)]
pub struct Metrics {
    /// Where the metrics live; `/metrics` encodes it.
    pub registry: Registry,
    /// `flowcontrol_requests_total`: Checks answered.
    pub requests: IntCounter,
    /// `flowcontrol_decisions_total{decision_type}`, resolved per value.
    pub accepted: IntCounter,
    /// See [`Metrics::accepted`].
    pub rejected: IntCounter,
    /// `flowcontrol_reject_reasons_total{policy_name, component, reason}`.
    pub reject_reasons: IntCounterVec,
    /// `rate_limiter_counter_total{policy_name, component, decision_type}`.
    pub rate_limiter: IntCounterVec,
    /// `sampler_counter_total{policy_name, component, decision_type}`.
    pub sampler: IntCounterVec,
    /// `concurrency_limiter_counter_total{policy_name, component, decision_type}`.
    pub concurrency_limiter: IntCounterVec,
    /// `invalid_flux_meter_total{flux_meter_name, policy_name}`: access logs
    /// without the value a flux meter observes.
    pub invalid_flux_meter: IntCounterVec,
    /// `flowcontrol_access_logs_total{result}`: access-log records by
    /// whether they named a flow (`matched`), did not (`without_flow`: a
    /// flow Sluice never saw, or one Envoy let through while Sluice was
    /// down), or named it unreadably (`invalid`).
    pub access_logs: IntCounterVec,
    /// `flowcontrol_inflight_flows`: accepted flows holding concurrency
    /// slots, waiting for their access log.
    pub inflight_flows: IntGauge,
    /// `flowcontrol_inflight_flows_expired_total`: flows whose slots were
    /// returned at `max_inflight_duration`, their log never seen.
    pub inflight_expired: IntCounter,
    /// `flowcontrol_inflight_flows_evicted_total`: flows whose slots were
    /// returned early because the table of flows in flight was full.
    pub inflight_evicted: IntCounter,
    /// `workload_requests_total{policy_name, component, workload_index,
    /// decision_type}`: scheduler decisions per workload.
    pub workload_requests: IntCounterVec,
    /// `incoming_tokens_total{policy_name, component, workload_index}`.
    pub incoming_tokens: CounterVec,
    /// `accepted_tokens_total{policy_name, component, workload_index}`.
    pub accepted_tokens: CounterVec,
    /// `rejected_tokens_total{policy_name, component, workload_index}`.
    pub rejected_tokens: CounterVec,
    /// `request_in_queue_duration_ms{policy_name, component, workload_index}`.
    pub request_in_queue_duration: HistogramVec,
    /// `workload_latency_ms{policy_name, component, workload_index}`: the
    /// upstream's latency of admitted flows, from their access logs.
    pub workload_latency: HistogramVec,
    /// `token_bucket_lm_ratio{policy_name, component}`: the load multiplier
    /// in force (1 when passing everything).
    pub lm_ratio: GaugeVec,
    /// `token_bucket_fill_rate{policy_name, component}`: tokens per second.
    pub fill_rate: GaugeVec,
    /// `token_bucket_available_tokens_total{policy_name, component}`.
    pub available_tokens: GaugeVec,
    /// `controller_decision_active{policy_name, component}`: 1 while a
    /// controller's decision holds for the component, 0 once it lapsed and
    /// the component is back to its policy's value.
    pub controller_decision_active: IntGaugeVec,
    /// `load_multiplier_expired{policy_name, component}`: 1 while a load
    /// scheduler passes everything because the controller's multiplier
    /// lapsed.
    pub lm_expired: IntGaugeVec,
    /// `classifier_counter_total{policy_name, component}`: flows classified.
    pub classifier: IntCounterVec,
    /// `classifier_errors_total{policy_name, component}`: rules whose
    /// source was present but could not be read (bad JSON, bad JWT, ...).
    pub classifier_errors: IntCounterVec,
    /// `label_state_evicted_total{policy_name, component}`: per-label state
    /// dropped because a component's table was full.
    pub label_state_evicted: IntCounterVec,
    /// `label_state_expired_total{policy_name, component}`: per-label state
    /// dropped after `max_idle_time` unused.
    pub label_state_expired: IntCounterVec,
    /// `label_state_entries{policy_name, component}`: label values tracked.
    pub label_state_entries: prometheus::IntGaugeVec,
    /// `policy_reloads_total{result}`: `ok` or `error`.
    pub policy_reloads: IntCounterVec,
    /// `policy_loaded`: 1 once a valid policy set is in force.
    pub policy_loaded: IntGauge,
    /// `control_points_overflow_total`: Checks whose control point/service
    /// pair was not recorded because the table of pairs was full.
    pub control_points_overflow: IntCounter,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounter::new(
            "flowcontrol_requests_total",
            "Flow-control Checks answered by this sidecar.",
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(requests.clone()))
            .expect("metric registered once");
        let decisions = counter_vec(
            &registry,
            "flowcontrol_decisions_total",
            "Flow-control decisions by type.",
            &["decision_type"],
        );
        let policy_loaded =
            IntGauge::new("policy_loaded", "1 once a valid policy set is in force.")
                .expect("valid metric definition");
        registry
            .register(Box::new(policy_loaded.clone()))
            .expect("metric registered once");
        let control_points_overflow = IntCounter::new(
            "control_points_overflow_total",
            "Checks whose control point and service were not recorded for /control-points because its table was full.",
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(control_points_overflow.clone()))
            .expect("metric registered once");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let inflight_flows = gauge(
            "flowcontrol_inflight_flows",
            "Accepted flows holding concurrency slots until their access log arrives.",
        );
        let inflight_expired = counter(
            "flowcontrol_inflight_flows_expired_total",
            "Flows whose concurrency slots were returned at max_inflight_duration, their access log never seen.",
        );
        let inflight_evicted = counter(
            "flowcontrol_inflight_flows_evicted_total",
            "Flows whose concurrency slots were returned early because the table of flows in flight was full.",
        );
        #[cfg(target_os = "linux")]
        {
            // CPU seconds, resident memory, open fds: what a sidecar's
            // footprint is judged by.
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        let component = &["policy_name", "component"];
        let with_decision = &["policy_name", "component", "decision_type"];
        let workload = &["policy_name", "component", "workload_index"];
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let c =
                CounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let gauges = |name: &str, help: &str| {
            let g =
                GaugeVec::new(Opts::new(name, help), component).expect("valid metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let histograms = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), workload)
                .expect("valid metric definition");
            registry
                .register(Box::new(h.clone()))
                .expect("metric registered once");
            h
        };
        let lm_expired = IntGaugeVec::new(
            Opts::new(
                "load_multiplier_expired",
                "1 while a load scheduler passes everything because its multiplier's valid_until passed.",
            ),
            component,
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(lm_expired.clone()))
            .expect("metric registered once");
        let controller_decision_active = IntGaugeVec::new(
            Opts::new(
                "controller_decision_active",
                "1 while a sluice-controller decision holds for the component; 0 when it lapsed to the policy's value.",
            ),
            component,
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(controller_decision_active.clone()))
            .expect("metric registered once");
        Metrics {
            controller_decision_active,
            workload_requests: counter_vec(
                &registry,
                "workload_requests_total",
                "Scheduler decisions per workload.",
                &[
                    "policy_name",
                    "component",
                    "workload_index",
                    "decision_type",
                ],
            ),
            incoming_tokens: counters(
                "incoming_tokens_total",
                "Tokens of the requests a scheduler saw, per workload.",
                workload,
            ),
            accepted_tokens: counters(
                "accepted_tokens_total",
                "Tokens of the requests a scheduler admitted, per workload.",
                workload,
            ),
            rejected_tokens: counters(
                "rejected_tokens_total",
                "Tokens of the requests a scheduler rejected, per workload.",
                workload,
            ),
            request_in_queue_duration: histograms(
                "request_in_queue_duration_ms",
                "Time requests spent in a scheduler's queue, ms.",
                vec![
                    0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
                    5000.0,
                ],
            ),
            workload_latency: histograms(
                "workload_latency_ms",
                "Upstream latency of admitted flows per workload, ms, from access logs.",
                crate::policy::DEFAULT_FLUX_METER_BUCKETS.to_vec(),
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
            lm_expired,
            accepted: decisions.with_label_values(&[ACCEPTED]),
            rejected: decisions.with_label_values(&[REJECTED]),
            reject_reasons: counter_vec(
                &registry,
                "flowcontrol_reject_reasons_total",
                "Rejections by the component that rejected and why.",
                &["policy_name", "component", "reason"],
            ),
            rate_limiter: counter_vec(
                &registry,
                "rate_limiter_counter_total",
                "Flows seen by a rate limiter, by decision.",
                with_decision,
            ),
            concurrency_limiter: counter_vec(
                &registry,
                "concurrency_limiter_counter_total",
                "Flows seen by a concurrency limiter, by decision.",
                with_decision,
            ),
            invalid_flux_meter: counter_vec(
                &registry,
                "invalid_flux_meter_total",
                "Access logs without the value a flux meter observes.",
                &["flux_meter_name", "policy_name"],
            ),
            access_logs: counter_vec(
                &registry,
                "flowcontrol_access_logs_total",
                "Access-log records, by whether they named a flow (matched, without_flow, invalid).",
                &["result"],
            ),
            inflight_flows,
            inflight_expired,
            inflight_evicted,
            sampler: counter_vec(
                &registry,
                "sampler_counter_total",
                "Flows seen by a sampler, by decision.",
                with_decision,
            ),
            classifier: counter_vec(
                &registry,
                "classifier_counter_total",
                "Flows a classifier ran on.",
                component,
            ),
            classifier_errors: counter_vec(
                &registry,
                "classifier_errors_total",
                "Classifier rules whose source was present but unreadable (bad JSON, bad JWT).",
                component,
            ),
            label_state_evicted: counter_vec(
                &registry,
                "label_state_evicted_total",
                "Per-label state dropped because the component's table was full.",
                component,
            ),
            label_state_expired: counter_vec(
                &registry,
                "label_state_expired_total",
                "Per-label state dropped after max_idle_time unused.",
                component,
            ),
            label_state_entries: {
                let g = prometheus::IntGaugeVec::new(
                    Opts::new("label_state_entries", "Label values a component tracks."),
                    component,
                )
                .expect("valid metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            policy_reloads: counter_vec(
                &registry,
                "policy_reloads_total",
                "Policy loads and reloads, by result (ok, error).",
                &["result"],
            ),
            registry,
            requests,
            policy_loaded,
            control_points_overflow,
        }
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

/// The accepted/rejected pair of a component's decision counter.
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
    /// Resolves the series of one component of `family`.
    pub fn new(
        family: &IntCounterVec,
        reasons: &IntCounterVec,
        policy: &str,
        component: &str,
        reason: &str,
    ) -> Self {
        DecisionCounters {
            accepted: family.with_label_values(&[policy, component, ACCEPTED]),
            rejected: family.with_label_values(&[policy, component, REJECTED]),
            reject_reason: reasons.with_label_values(&[policy, component, reason]),
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

/// Removes every series of one component from `family`, so that a removed
/// component's metrics disappear with it. Families whose label sets do not
/// fit are skipped silently: removal of a series that does not exist is not
/// an error worth reporting.
pub fn forget_component(metrics: &Metrics, policy: &str, component: &str) {
    for family in [
        &metrics.rate_limiter,
        &metrics.sampler,
        &metrics.concurrency_limiter,
    ] {
        for decision in [ACCEPTED, REJECTED] {
            let _ = family.remove_label_values(&[policy, component, decision]);
        }
    }
    for family in [
        &metrics.classifier,
        &metrics.classifier_errors,
        &metrics.label_state_evicted,
        &metrics.label_state_expired,
    ] {
        let _ = family.remove_label_values(&[policy, component]);
    }
    let _ = metrics
        .label_state_entries
        .remove_label_values(&[policy, component]);
    let _ = metrics
        .invalid_flux_meter
        .remove_label_values(&[component, policy]);
    for reason in crate::flow::RejectReason::ALL {
        let _ = metrics
            .reject_reasons
            .remove_label_values(&[policy, component, reason.as_str()]);
    }
}

/// Removes the series of scheduler `old` that `new` (the scheduler of the
/// same name in the new plan, if any) does not have.
pub fn forget_scheduler(
    metrics: &Metrics,
    old: &crate::flow::scheduling::AnyScheduler,
    new: Option<&crate::flow::scheduling::AnyScheduler>,
) {
    let (policy, component) = old.names();
    let kept: Vec<&str> = new
        .map(|n| n.config().workload_indices().collect())
        .unwrap_or_default();
    for index in old.config().workload_indices() {
        if kept.contains(&index) {
            continue;
        }
        let labels = [&**policy, &**component, index];
        for decision in [ACCEPTED, REJECTED] {
            let _ = metrics
                .workload_requests
                .remove_label_values(&[policy, component, index, decision]);
        }
        for family in [
            &metrics.incoming_tokens,
            &metrics.accepted_tokens,
            &metrics.rejected_tokens,
        ] {
            let _ = family.remove_label_values(&labels);
        }
        for family in [
            &metrics.request_in_queue_duration,
            &metrics.workload_latency,
        ] {
            let _ = family.remove_label_values(&labels);
        }
    }
    if new.is_none() {
        let labels = [&**policy, &**component];
        for family in [
            &metrics.lm_ratio,
            &metrics.fill_rate,
            &metrics.available_tokens,
        ] {
            let _ = family.remove_label_values(&labels);
        }
        let _ = metrics.lm_expired.remove_label_values(&labels);
    }
}
