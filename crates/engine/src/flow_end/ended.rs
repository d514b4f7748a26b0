//! Flows whose access log arrived recently, so that a log ends a flow at
//! most once.
//!
//! A record replayed with a genuine `sluice.flow` (whoever can read Envoy's
//! access logs can copy one) would otherwise be observed again by the flow's
//! flux meters. The table is direct-mapped: slot `id % len` holds the last
//! id that ended there, so it costs one atomic swap per log and a fixed
//! amount of memory. A duplicate is caught while its slot has not been
//! taken by a later flow, that is over roughly the last [`SLOTS`] flows;
//! an older flow's log replayed is not, which docs/security.md says (its
//! concurrency slots are gone by then anyway: the in-flight table gives
//! each back once).

use std::sync::atomic::{AtomicU64, Ordering};

/// Flows remembered: 2^16 (512 KiB).
pub const SLOTS: usize = 1 << 16;

/// The table.
pub struct RecentlyEnded {
    slots: Box<[AtomicU64]>,
}

impl Default for RecentlyEnded {
    fn default() -> Self {
        RecentlyEnded {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RecentlyEnded {
    /// Records that flow `id` ended; false if it had already (as far as
    /// the table remembers). Flow ids are uniformly random and never 0 (the
    /// empty slot), and only signed ones reach here, so their low bits pick
    /// the slot and nobody can aim at one.
    pub fn first_end(&self, id: u64) -> bool {
        self.slots[(id as usize) % SLOTS].swap(id, Ordering::Relaxed) != id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_ends_once_and_others_are_unaffected() {
        let ended = RecentlyEnded::default();
        assert!(ended.first_end(42));
        assert!(!ended.first_end(42));
        assert!(ended.first_end(43));
        // Another flow in the same slot pushes the first out: its replay is
        // no longer caught (the documented limit), the newer one's is.
        let same_slot = 42 + SLOTS as u64;
        assert!(ended.first_end(same_slot));
        assert!(!ended.first_end(same_slot));
        assert!(ended.first_end(42));
    }
}
