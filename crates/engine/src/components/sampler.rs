//! Samplers: accept a share of the matching flows, reject the rest.
//!
//! With `session_label_key`, the draw is a hash of the session label's value,
//! so a session is in or out on every request and on every sidecar, and
//! moving the percentage up only adds sessions. The hash and the comparison
//! are Aperture's (32-bit FNV-1a of the value's bytes, accepted when
//! `hash / (2^32 - 1) <= percentage / 100`, see `sticky_accepts`), so that
//! a rollout migrated from Aperture keeps every user on the side of it they
//! were on. Without the key, or when a flow lacks the label, the draw is
//! random.
//!
//! A flow whose session label has one of `pass_through_label_values` is
//! accepted whatever the percentage (the controller's included): the
//! values are sorted once, when the policy is compiled, and each Check
//! compares the label's bytes against them by binary search, allocating
//! nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_policy::SamplerSpec;
use sluice_time::Nanos;

use super::lease::Lease;
use super::selector::Selector;
use crate::decision::RejectReason;
use crate::labels::{FlowLabels, LabelRef};
use crate::metrics::{DecisionCounters, Metrics, Series};

/// One compiled sampler.
#[derive(Debug)]
pub struct Sampler {
    /// The policy it belongs to.
    pub policy: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
    /// Which flows it samples.
    pub selectors: Box<[Selector]>,
    /// Percentage accepted, the bits of an `f64` in `[0, 100]`: kept as the
    /// percentage itself (not rounded to a coarser share) so that sticky
    /// sessions compare against exactly what Aperture compared against.
    /// Atomic so that the controller can move it without recompiling the
    /// policy.
    accept_percentage: AtomicU64,
    /// The policy's percentage (the default), as `accept_percentage`.
    default_percentage: u64,
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
            accept_percentage: AtomicU64::new(percentage_bits(spec.accept_percentage.0)),
            default_percentage: percentage_bits(spec.accept_percentage.0),
            session: spec.session_label_key.as_ref().map(|k| LabelRef::new(&k.0)),
            pass_through: pass_through(&spec.pass_through_label_values.0),
            denied_status: spec.denied_status_code.0,
            series,
        }
    }

    /// Decides whether the flow passes, and counts the decision.
    #[inline]
    pub fn accepts(&self, labels: &FlowLabels<'_>) -> bool {
        let percentage = self.accept_percentage();
        let accepted = match self.session.as_ref().and_then(|k| labels.get(k)) {
            Some(session) if self.passes_through(&session) => true,
            Some(session) => sticky_accepts(session.as_bytes(), percentage),
            // `[0, 1)` against `< share`: none at 0 %, all at 100 %.
            None => fastrand::f64() < percentage / 100.0,
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
        self.accept_percentage
            .store(percentage_bits(percentage), Ordering::Relaxed);
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
            self.accept_percentage
                .store(self.default_percentage, Ordering::Relaxed);
        }
        lapsed
    }

    /// The accepted share, in percent.
    #[inline]
    pub fn accept_percentage(&self) -> f64 {
        f64::from_bits(self.accept_percentage.load(Ordering::Relaxed))
    }
}

/// The pass-through values, sorted by their bytes, once each.
fn pass_through(values: &[String]) -> Box<[Box<str>]> {
    let mut sorted: Vec<Box<str>> = values.iter().map(|v| v.as_str().into()).collect();
    sorted.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    sorted.dedup();
    sorted.into_boxed_slice()
}

/// A percentage as [`Sampler::accept_percentage`] stores it: within
/// `[0, 100]` (NaN as 0).
fn percentage_bits(percentage: f64) -> u64 {
    let p = if percentage.is_nan() {
        0.0
    } else {
        percentage.clamp(0.0, 100.0)
    };
    p.to_bits()
}

/// Whether a session whose label value is `session` is in at `percentage`:
/// Aperture's rule, bit for bit, so that sessions sampled by Aperture stay
/// where they were. Its sampler (`pkg/policies/flowcontrol/actuators/
/// sampler/sampler.go`, `Decide`, lines 333-343 at commit `bc7befc` of
/// fluxninja/aperture) hashes the value with Go's `hash/fnv` `New32a` and
/// accepts when `float64(hash)/float64(math.MaxUint32) <=
/// acceptPercentage/100.0`. Its load ramp runs that same sampler
/// (`pkg/policies/controlplane/components/flowcontrol/sampler/
/// load-ramp.go`, lines 119-123: a `Sampler` component with the ramp's
/// sampler parameters), as Sluice's load ramp drives a sampler of the
/// policy. The `<=` is kept: at 0 % a value whose hash is 0 (one in 2^32)
/// is still accepted, as it was in Aperture, and at 100 % every value is.
#[inline]
fn sticky_accepts(session: &[u8], percentage: f64) -> bool {
    f64::from(fnv1a_32(session)) / f64::from(u32::MAX) <= percentage / 100.0
}

/// 32-bit FNV-1a (Fowler, Noll, Vo; draft-eastlake-fnv): for each byte,
/// xor it into the hash, then multiply by the FNV prime, from the offset
/// basis 2166136261. Written here because it is four lines, and the `fnv`
/// crate has only the 64-bit variant.
#[inline]
fn fnv1a_32(bytes: &[u8]) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(PRIME)
    })
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
    fn fnv1a_32_matches_the_specification_vectors() {
        // The FNV test suite (draft-eastlake-fnv, and Landon Curt Noll's
        // `test_fnv.c`): the empty input is the offset basis.
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn sticky_sessions_fall_where_apertures_did() {
        // hash("a") = 0xe40c292c = 3826002220; / (2^32 - 1) = 0.890810...:
        // out at 89.08 %, in from 89.09 %.
        assert!(!sticky_accepts(b"a", 89.08));
        assert!(sticky_accepts(b"a", 89.09));
        // hash("foobar") = 0xbf9cf968 = 3214735720 → 0.748488...
        assert!(!sticky_accepts(b"foobar", 74.84));
        assert!(sticky_accepts(b"foobar", 74.85));
        // A label present and empty hashes to the offset basis → 0.504342...
        assert!(!sticky_accepts(b"", 50.43));
        assert!(sticky_accepts(b"", 50.44));
        // The bounds: everything at 100 %; at 0 % only a hash of 0.
        assert!(sticky_accepts(b"a", 100.0));
        assert!(!sticky_accepts(b"a", 0.0));
        // Through a compiled sampler, with the label's value.
        let s = sampler("accept_percentage: 89.08\nsession_label_key: user\n");
        assert!(!accepts(&s, Some("a")));
        s.set_accept_percentage(89.09);
        assert!(accepts(&s, Some("a")));
        assert!(accepts(&s, Some("foobar")));
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
