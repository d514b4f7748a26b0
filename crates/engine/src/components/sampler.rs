//! Samplers: accept a share of the matching flows, reject the rest.
//!
//! With `session_label_key`, the draw is a hash of the session label's value
//! (xxh3, a specified, seedless hash), so a session is in or out on every
//! request and on every sidecar, and moving the percentage up only adds
//! sessions. Without it, or when a flow lacks the label, the draw is random.
//!
//! A flow whose session label has one of `pass_through_label_values` is
//! accepted whatever the percentage (the controller's included): the
//! values are sorted once, when the policy is compiled, and each Check
//! compares the label's bytes against them by binary search, allocating
//! nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use sluice_policy::SamplerSpec;
use sluice_time::Nanos;

use super::lease::Lease;
use super::selector::Selector;
use crate::decision::RejectReason;
use crate::labels::{FlowLabels, LabelRef};
use crate::metrics::{DecisionCounters, Metrics, Series};

/// The draw is an integer in `[0, SCALE)`; a flow passes when it is below the
/// accepted share, in parts per million.
const SCALE: u32 = 1_000_000;

/// One compiled sampler.
#[derive(Debug)]
pub struct Sampler {
    /// The policy it belongs to.
    pub policy: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
    /// Which flows it samples.
    pub selectors: Box<[Selector]>,
    /// Share accepted, in parts per million. Atomic so that the controller
    /// can move it without recompiling the policy.
    accept_ppm: AtomicU32,
    /// The policy's share (the default).
    default_ppm: u32,
    /// Until when the controller's share holds.
    pub lease: Lease,
    /// The label that makes the decision sticky, if any.
    session: Option<LabelRef>,
    /// Values of the session label always accepted, sorted and without
    /// duplicates (empty without a session label: the policy refuses
    /// them).
    pass_through: Box<[Box<str>]>,
    /// Status of a rejected flow.
    pub denied_status: u16,
    /// Decision counters.
    counters: DecisionCounters,
    /// Every series it writes.
    pub series: Series,
}

impl Sampler {
    /// Compiles a sampler of `policy`.
    pub fn compile(policy: &Arc<str>, spec: &SamplerSpec, metrics: &Metrics) -> Self {
        let name: Arc<str> = spec.name.value.0.as_str().into();
        let mut series = Series::default();
        Sampler {
            counters: DecisionCounters::new(
                metrics,
                &metrics.sampler,
                &mut series,
                [policy, &name],
                RejectReason::NotSampled.as_str(),
            ),
            lease: Lease::new(metrics, &mut series, policy, &name),
            policy: policy.clone(),
            name,
            selectors: spec.selectors.iter().map(Selector::compile).collect(),
            accept_ppm: AtomicU32::new(percent_to_ppm(spec.accept_percentage.0)),
            default_ppm: percent_to_ppm(spec.accept_percentage.0),
            session: spec.session_label_key.as_ref().map(|k| LabelRef::new(&k.0)),
            pass_through: pass_through(&spec.pass_through_label_values.0),
            denied_status: spec.denied_status_code.0,
            series,
        }
    }

    /// Decides whether the flow passes, and counts the decision.
    #[inline]
    pub fn accepts(&self, labels: &FlowLabels<'_>) -> bool {
        let threshold = self.accept_ppm.load(Ordering::Relaxed);
        let accepted = match self.session.as_ref().and_then(|k| labels.get(k)) {
            Some(session) if self.passes_through(&session) => true,
            Some(session) => ((xxh3_64(session.as_bytes()) % u64::from(SCALE)) as u32) < threshold,
            None => fastrand::u32(0..SCALE) < threshold,
        };
        self.counters.count(accepted);
        accepted
    }

    /// Whether `session` is one of the pass-through values.
    #[inline]
    fn passes_through(&self, session: &str) -> bool {
        !self.pass_through.is_empty()
            && self
                .pass_through
                .binary_search_by(|v| v.as_bytes().cmp(session.as_bytes()))
                .is_ok()
    }

    /// Changes the accepted share (the controller's actuator).
    pub fn set_accept_percentage(&self, percentage: f64) {
        self.accept_ppm
            .store(percent_to_ppm(percentage), Ordering::Relaxed);
    }

    /// Sets the controller's share until `until`.
    pub fn set_accept_percentage_until(&self, percentage: f64, until: Nanos) {
        self.set_accept_percentage(percentage);
        self.lease.grant(until);
    }

    /// Returns to the policy's share when the controller's lease lapsed.
    pub fn revert_if_lapsed(&self, now: Nanos) -> bool {
        let lapsed = self.lease.lapse(now);
        if lapsed {
            self.accept_ppm.store(self.default_ppm, Ordering::Relaxed);
        }
        lapsed
    }

    /// The accepted share, in percent.
    pub fn accept_percentage(&self) -> f64 {
        f64::from(self.accept_ppm.load(Ordering::Relaxed)) * 100.0 / f64::from(SCALE)
    }
}

/// The pass-through values, sorted by their bytes, once each.
fn pass_through(values: &[String]) -> Box<[Box<str>]> {
    let mut sorted: Vec<Box<str>> = values.iter().map(|v| v.as_str().into()).collect();
    sorted.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    sorted.dedup();
    sorted.into_boxed_slice()
}

fn percent_to_ppm(percentage: f64) -> u32 {
    (percentage.clamp(0.0, 100.0) * f64::from(SCALE) / 100.0).round() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::MapLabels;

    fn sampler(extra: &str) -> Sampler {
        let yaml = format!("name: s\nselectors: [{{control_point: ingress}}]\n{extra}");
        let spec: SamplerSpec = serde_saphyr::from_str(&yaml).expect("valid sampler");
        Sampler::compile(&"p".into(), &spec, &Metrics::new())
    }

    fn accepts(s: &Sampler, session: Option<&str>) -> bool {
        let source = match session {
            Some(v) => MapLabels::from_pairs([("user", v)]),
            None => MapLabels::default(),
        };
        s.accepts(&FlowLabels::new(&source))
    }

    #[test]
    fn zero_and_hundred_percent_are_exact() {
        let none = sampler("accept_percentage: 0\n");
        let all = sampler("accept_percentage: 100\n");
        for _ in 0..10_000 {
            assert!(!accepts(&none, None));
            assert!(accepts(&all, None));
        }
    }

    #[test]
    fn sticky_sampling_is_stable_and_close_to_the_percentage() {
        let s = sampler("accept_percentage: 30\nsession_label_key: user\n");
        let ids: Vec<String> = (0..10_000).map(|i| format!("session-{i}")).collect();
        let first: Vec<bool> = ids.iter().map(|id| accepts(&s, Some(id))).collect();
        let again: Vec<bool> = ids.iter().map(|id| accepts(&s, Some(id))).collect();
        assert_eq!(first, again, "a session's decision never changes");
        let share = first.iter().filter(|&&a| a).count() as f64 / ids.len() as f64;
        assert!((share - 0.30).abs() < 0.02, "accepted share {share}");
        // Raising the percentage only adds sessions.
        s.set_accept_percentage(60.0);
        for (id, was_in) in ids.iter().zip(&first) {
            if *was_in {
                assert!(accepts(&s, Some(id)));
            }
        }
    }

    #[test]
    fn pass_through_values_are_accepted_whatever_the_percentage() {
        let s = sampler(
            "accept_percentage: 0\nsession_label_key: user\npass_through_label_values: [tester, alice, tester, '']\n",
        );
        for _ in 0..1_000 {
            assert!(accepts(&s, Some("alice")));
            assert!(accepts(&s, Some("tester")));
            // Whole values, byte for byte: no prefix, no case folding.
            assert!(!accepts(&s, Some("alic")));
            assert!(!accepts(&s, Some("alice2")));
            assert!(!accepts(&s, Some("Alice")));
            assert!(!accepts(&s, Some("bob")));
        }
        // `''` matches a label present and empty; a flow without the label
        // is sampled as any other (here: rejected), unlike Aperture, which
        // reads a missing label as ''.
        assert!(accepts(&s, Some("")));
        assert!(!accepts(&s, None));
        // The controller's percentage does not touch them either.
        s.set_accept_percentage(0.0);
        assert!(accepts(&s, Some("alice")));
        assert_eq!(&*s.pass_through, ["", "alice", "tester"].map(Box::from));
    }

    #[test]
    fn pass_through_leaves_the_other_sessions_sticky() {
        let plain = sampler("accept_percentage: 30\nsession_label_key: user\n");
        let listed = sampler(
            "accept_percentage: 30\nsession_label_key: user\npass_through_label_values: [session-1, session-2]\n",
        );
        for i in 3..2_000 {
            let id = format!("session-{i}");
            assert_eq!(
                accepts(&plain, Some(&id)),
                accepts(&listed, Some(&id)),
                "{id}"
            );
        }
        assert!(accepts(&listed, Some("session-1")) && accepts(&listed, Some("session-2")));
    }

    #[test]
    fn random_sampling_is_close_to_the_percentage() {
        let s = sampler("accept_percentage: 25\n");
        fastrand::seed(7);
        let accepted = (0..20_000).filter(|_| accepts(&s, None)).count();
        let share = accepted as f64 / 20_000.0;
        assert!((share - 0.25).abs() < 0.02, "accepted share {share}");
    }
}
