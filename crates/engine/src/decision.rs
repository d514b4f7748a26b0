//! What the engine decides, as adapters see it: the [`FlowRequest`] an
//! edge hands in, and the [`Decision`] it gets back (with the
//! [`Rejection`] and its [`RejectReason`] when the flow may not pass).

use std::time::Duration;

use smallvec::SmallVec;

use crate::components::flux_meter::FluxMeter;
use crate::flow_end::metadata::FlowKey;
use crate::labels::{FlowLabels, LabelSource};
use crate::waiting::Waiting;

/// A flow as an adapter presents it.
#[derive(Clone, Copy)]
pub struct FlowRequest<'a> {
    /// Where in the traffic the flow is (`ingress`, `egress`, ...).
    pub control_point: &'a str,
    /// The service it is for; `any` when unknown.
    pub service: &'a str,
    /// Its labels.
    pub labels: &'a dyn LabelSource,
}

/// Why a flow was rejected; the values of the `reason` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// A sampler did not pick it.
    NotSampled,
    /// A rate limiter's bucket was empty.
    RateLimited,
    /// A concurrency limiter had no free slot.
    ConcurrencyLimited,
    /// A scheduler could not admit it before its deadline.
    QueueTimeout,
    /// A scheduler's queue was full.
    QueueFull,
    /// It costs more tokens than a scheduler's bucket can ever hold.
    NoTokens,
}

impl RejectReason {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotSampled => "not_sampled",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::ConcurrencyLimited => "concurrency_limited",
            RejectReason::QueueTimeout => "queue_timeout",
            RejectReason::QueueFull => "queue_full",
            RejectReason::NoTokens => "no_tokens",
        }
    }

    /// Words for the body of a rejected response.
    pub fn describe(self) -> &'static str {
        match self {
            RejectReason::NotSampled => "not sampled",
            RejectReason::RateLimited => "rate limited",
            RejectReason::ConcurrencyLimited => "concurrency limited",
            RejectReason::QueueTimeout => "no capacity in time (overloaded)",
            RejectReason::QueueFull => "queue full (overloaded)",
            RejectReason::NoTokens => "request larger than the quota",
        }
    }
}

/// What rejected a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection<'a> {
    /// The policy of the rejecting component.
    pub policy: &'a str,
    /// The rejecting component.
    pub component: &'a str,
    /// Why.
    pub reason: RejectReason,
    /// The HTTP status to answer with.
    pub status: u16,
    /// When trying again could succeed, if known.
    pub retry_after: Option<Duration>,
}

/// The engine's answer for one flow.
pub struct Decision<'a> {
    /// Identifies the flow to its access log.
    pub flow_id: u64,
    /// Signs [`Decision::metadata`].
    pub(crate) flow_key: FlowKey,
    /// `None` when the flow is accepted.
    pub rejection: Option<Rejection<'a>>,
    /// The flow's labels, including what classifiers added.
    pub labels: FlowLabels<'a>,
    /// The flux meters that observe the flow when its access log arrives.
    pub flux_meters: SmallVec<[&'a FluxMeter; 2]>,
    /// The schedulers (`policy/name`) and workloads the flow was scheduled
    /// in, for their latency estimates.
    pub workloads: SmallVec<[(&'a str, usize); 1]>,
    /// When the flow must still wait in schedulers: what it holds and where
    /// it waits. Take it and [`Waiting::run`] it.
    pub waiting: Option<Box<Waiting>>,
    /// Which classifier labels go upstream in `baggage` (indices into
    /// `labels.classified()`).
    pub(crate) telemetry: SmallVec<[u16; 4]>,
    /// Whether the flow's access log will be read: it holds slots until
    /// then, waits (and may take some), names flux meters, or teaches
    /// schedulers its workload's latency. Without any of those, Envoy
    /// is sent no `sluice.flow` to carry.
    pub(crate) observed_at_end: bool,
}

impl<'a> Decision<'a> {
    /// True when the flow may pass.
    pub fn accepted(&self) -> bool {
        self.rejection.is_none()
    }

    /// The `sluice.flow` metadata that lets the access log find this flow
    /// again (see [`crate::flow_end::metadata`]); `None` when nothing
    /// would read it there (no slots, no flux meter, no workload): Envoy
    /// is then asked to carry nothing, and its access log of the flow
    /// counts as `without_flow`.
    pub fn metadata(&self) -> Option<String> {
        if !self.observed_at_end {
            return None;
        }
        let by = self
            .rejection
            .as_ref()
            .map(|r| format!("{}/{}", r.policy, r.component));
        Some(self.encode_metadata(self.accepted(), by.as_deref()))
    }

    fn encode_metadata(&self, accepted: bool, rejected_by: Option<&str>) -> String {
        let mut out =
            String::with_capacity(64 + 32 * (self.flux_meters.len() + self.workloads.len()));
        crate::flow_end::metadata::encode(
            &mut out,
            &self.flow_key,
            self.flow_id,
            accepted,
            rejected_by,
            self.flux_meters.iter().map(|m| &*m.key),
            // Only admitted flows teach schedulers their workloads' latency.
            self.workloads.iter().copied().filter(|_| accepted),
        );
        out
    }

    /// The classifier labels to send upstream in `baggage`; when a label was
    /// set twice, the later value.
    pub fn baggage(&self) -> impl Iterator<Item = (&str, &str)> {
        let classified = self.labels.classified();
        self.telemetry.iter().filter_map(move |&i| {
            let (name, value) = &classified[usize::from(i)];
            let overridden = classified[usize::from(i) + 1..]
                .iter()
                .any(|(later, _)| later == name);
            (!overridden).then_some((&**name, &**value))
        })
    }
}
