//! The control points and services this sidecar has seen, for
//! `/control-points` (Aperture's `aperturectl flow-control control-points`).
//!
//! Control point and service names come from requests, so the table is
//! bounded; pairs beyond the bound are counted, not stored.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use prometheus::IntCounter;
use serde::Serialize;

/// Pairs kept at most.
pub const MAX_PAIRS: usize = 1024;

/// Read on every Check: ahash, not SipHash (names are bounded by
/// [`MAX_PAIRS`], so flooding the table gains nothing).
type HashMap<K, V> = ahash::AHashMap<K, V>;

/// Checks per service of one control point.
type Services = HashMap<Box<str>, AtomicU64>;

/// Counts of Checks per control point and service.
pub struct ControlPoints {
    /// control point → service → Checks.
    seen: RwLock<HashMap<Box<str>, Services>>,
    /// Pairs stored.
    pairs: AtomicU64,
    /// Checks of pairs that did not fit.
    overflow: IntCounter,
}

/// One row of `/control-points`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ControlPointStat {
    /// The control point.
    pub control_point: String,
    /// The service.
    pub service: String,
    /// Checks seen.
    pub checks: u64,
}

impl ControlPoints {
    /// An empty table; overflow is counted on `overflow`.
    pub fn new(overflow: IntCounter) -> Self {
        ControlPoints {
            seen: RwLock::new(HashMap::new()),
            pairs: AtomicU64::new(0),
            overflow,
        }
    }

    /// Counts one Check. Takes the write lock only for a new pair.
    #[inline]
    pub fn record(&self, control_point: &str, service: &str) {
        {
            let seen = self.seen.read();
            if let Some(count) = seen.get(control_point).and_then(|s| s.get(service)) {
                count.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if self.pairs.load(Ordering::Relaxed) >= MAX_PAIRS as u64 {
            self.overflow.inc();
            return;
        }
        let mut seen = self.seen.write();
        let services = seen.entry(control_point.into()).or_default();
        if !services.contains_key(service) {
            self.pairs.fetch_add(1, Ordering::Relaxed);
        }
        services
            .entry(service.into())
            .or_insert_with(|| AtomicU64::new(0))
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Every pair seen, sorted.
    pub fn snapshot(&self) -> Vec<ControlPointStat> {
        let seen = self.seen.read();
        let mut rows: Vec<ControlPointStat> = seen
            .iter()
            .flat_map(|(cp, services)| {
                services.iter().map(move |(service, n)| ControlPointStat {
                    control_point: cp.to_string(),
                    service: service.to_string(),
                    checks: n.load(Ordering::Relaxed),
                })
            })
            .collect();
        rows.sort_by(|a, b| (&a.control_point, &a.service).cmp(&(&b.control_point, &b.service)));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_pairs_and_bounds_the_table() {
        let t = ControlPoints::new(IntCounter::new("o", "o").unwrap());
        t.record("ingress", "a");
        t.record("ingress", "a");
        t.record("egress", "b");
        assert_eq!(
            t.snapshot(),
            vec![
                ControlPointStat {
                    control_point: "egress".into(),
                    service: "b".into(),
                    checks: 1
                },
                ControlPointStat {
                    control_point: "ingress".into(),
                    service: "a".into(),
                    checks: 2
                },
            ]
        );
        for i in 0..2 * MAX_PAIRS {
            t.record("x", &i.to_string());
        }
        assert_eq!(t.snapshot().len(), MAX_PAIRS);
        assert_eq!(t.overflow.get(), (2 * MAX_PAIRS - MAX_PAIRS + 2) as u64);
    }
}
