//! Leases: tokens a sidecar takes from a global bucket in the store before
//! it spends them, so that a hot key's Checks never wait for the store and
//! all sidecars together never admit more than the bucket allows.
//!
//! The truth is the store's bucket (refilled on the store's own clock).
//! Per key, this sidecar holds a [`Lease`]: tokens already taken from the
//! store, spent locally with no I/O. A lease is sized from this sidecar's
//! recent demand for the key: about [`LEASE_SPAN`] of it, at most
//! [`MAX_LEASE_SHARE`] of the bucket (and never fewer tokens than the flow
//! asking needs), so a cold key leases what one Check needs and a hot key
//! leases many. When a hot lease runs low, the next one is asked for in
//! the background; when it is empty, the Check that finds it so waits for
//! one round trip (bounded by the store's deadline).
//!
//! Leased tokens lapse [`LEASE_TTL`] after they were granted: a token never
//! spent is stranded, never spent late, so the sidecars together may fall
//! short of the bucket (by at most their leases outstanding at any time)
//! but can never exceed it. When the store grants nothing, it says when the
//! bucket will hold what was asked; until then the key's Checks are turned
//! away here without asking again, so a client hammering an empty bucket
//! costs the store nothing.

use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::{Counter, IntCounter};
use sha2::{Digest as _, Sha256};
use sluice_time::{Clock, Nanos, nanos};

use crate::label_table::{Digest, LabelTable, TableMetrics};
use crate::metrics::{Metrics, Series};
use crate::store::{SharedStore, StateId, StoreError, TokenGrant};
use crate::token_bucket::BucketParams;

/// How much demand a lease covers.
pub const LEASE_SPAN: Nanos = 100_000_000;
/// The largest lease, as a share of the bucket's capacity: what one sidecar
/// can strand.
pub const MAX_LEASE_SHARE: f64 = 0.05;
/// How long leased tokens stay spendable.
pub const LEASE_TTL: Nanos = 1_000_000_000;
/// How fast demand estimates forget: the weight of the last second.
const DEMAND_WINDOW: Nanos = 1_000_000_000;

/// The tokens of one global bucket this sidecar holds.
#[derive(Clone, Debug, Default)]
pub struct Lease {
    /// The bucket's name in the store: the SHA-256 (first 16 bytes) of the
    /// label value, the same on every sidecar. Hashed, so that a value's
    /// size costs nothing and no value can be chosen to share another's
    /// bucket.
    id: Option<[u8; 16]>,
    /// Tokens taken from the store and not spent.
    tokens: f64,
    /// When they lapse.
    expires: Nanos,
    /// The store said the bucket cannot pay before then.
    denied_until: Nanos,
    /// A refill is on its way.
    refilling: bool,
    /// Recent demand, tokens per second.
    demand: f64,
    /// When demand was last counted.
    seen: Nanos,
}

impl Lease {
    fn count_demand(&mut self, n: f64, now: Nanos) {
        let elapsed = now.saturating_sub(self.seen) as f64;
        let keep = (-elapsed / DEMAND_WINDOW as f64).exp();
        self.demand = self.demand * keep + n * (1.0 - keep) * 1e9 / elapsed.max(1.0);
        self.seen = now;
    }

    fn spendable(&self, now: Nanos) -> f64 {
        if now < self.expires { self.tokens } else { 0.0 }
    }
}

/// The SHA-256 name of a label value (see [`Lease`]).
pub fn label_id(value: &str) -> [u8; 16] {
    let hash = Sha256::digest(value.as_bytes());
    let mut id = [0; 16];
    id.copy_from_slice(&hash[..16]);
    id
}

/// What spending from a lease found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Spend {
    /// Spent.
    Spent,
    /// The bucket cannot pay for this long (from the store's last answer).
    Denied(Nanos),
    /// Nothing leased: the store must be asked.
    Empty,
}

/// A lease to ask the store for: which bucket, how much.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    /// The key in this sidecar's table (`None`: the component's one bucket).
    pub key: Option<Digest>,
    /// The bucket's name in the store.
    pub id: Option<[u8; 16]>,
    /// Tokens wanted.
    pub want: f64,
    /// Tokens the asking flow needs (0 for a background refill): the
    /// store grants nothing unless it has that many.
    pub min: f64,
    /// A flow waits for this answer and spends `min` of the grant at once;
    /// otherwise (a refill, or a scheduler's queue, which spends from the
    /// lease in its own time) the whole grant goes to the lease.
    pub for_flow: bool,
}

/// The series of a component's leases.
#[derive(Clone, Debug)]
pub struct LeaseMetrics {
    /// `store_leases_total{policy_name, component}`: leases asked.
    pub asked: IntCounter,
    /// `store_tokens_granted_total{policy_name, component}`.
    pub granted: Counter,
    /// `store_fallback_total{policy_name, component}`: Checks decided
    /// without the store (`on_store_unavailable`).
    pub fallbacks: IntCounter,
}

impl LeaseMetrics {
    /// The series of component `component` of `policy`.
    pub fn new(metrics: &Metrics, series: &mut Series, policy: &str, component: &str) -> Self {
        let labels = &[policy, component];
        LeaseMetrics {
            asked: metrics.store_leases.series(series, labels),
            granted: metrics.store_tokens_granted.series(series, labels),
            fallbacks: metrics.store_fallbacks.series(series, labels),
        }
    }
}

/// A component's leases of one global bucket, or one per label value.
pub struct Leases {
    /// The store.
    pub store: SharedStore,
    /// The engine's clock: when grants arrive and lapse.
    clock: Clock,
    /// The policy, for the store's names.
    policy: Arc<str>,
    /// The component, for the store's names.
    component: Arc<str>,
    /// Without `limit_by_label_key`.
    one: Mutex<Lease>,
    /// With it.
    per_label: LabelTable<Lease>,
    /// Its series.
    pub metrics: LeaseMetrics,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("component", &self.component)
            .finish_non_exhaustive()
    }
}

impl Leases {
    /// Leases of component `component` of `policy` in `store`.
    pub fn new(
        store: SharedStore,
        clock: Clock,
        policy: &Arc<str>,
        component: &Arc<str>,
        max_label_values: usize,
        table: TableMetrics,
        metrics: LeaseMetrics,
    ) -> Self {
        Leases {
            store,
            clock,
            policy: policy.clone(),
            component: component.clone(),
            one: Mutex::new(Lease::default()),
            // A lease a refill will fill must stay; an idle one may go (its
            // tokens are stranded, as they would be at their ttl).
            per_label: LabelTable::new(max_label_values, table, |l: &Lease| !l.refilling),
            metrics,
        }
    }

    fn with<R>(
        &self,
        key: Option<Digest>,
        value: Option<&str>,
        now: Nanos,
        f: impl FnOnce(&mut Lease) -> R,
    ) -> R {
        match key {
            None => f(&mut self.one.lock()),
            Some(key) => self.per_label.with_digest(
                key,
                now,
                || Lease {
                    id: value.map(label_id),
                    ..Lease::default()
                },
                f,
            ),
        }
    }

    /// Spends `n` leased tokens of `key` (whose label value is `value`),
    /// bucket `params`. Also returns a refill to start in the background
    /// when this sidecar's demand will soon empty the lease.
    pub fn spend(
        &self,
        key: Option<Digest>,
        value: Option<&str>,
        params: &BucketParams,
        n: f64,
        now: Nanos,
    ) -> (Spend, Option<Ask>) {
        self.with(key, value, now, |lease| {
            lease.count_demand(n, now);
            if now < lease.denied_until {
                return (Spend::Denied(lease.denied_until - now), None);
            }
            if lease.spendable(now) < n {
                return (Spend::Empty, None);
            }
            lease.tokens -= n;
            let size = lease_size(lease.demand, n, params);
            // Refill early only for leases of several tokens: a one-token
            // lease asked for in advance would strand a token whenever its
            // key falls quiet, which a small bucket cannot afford.
            let refill =
                (size >= 2.0 && !lease.refilling && lease.tokens < size / 2.0).then(|| {
                    lease.refilling = true;
                    Ask {
                        key,
                        id: lease.id,
                        want: size,
                        min: 0.0,
                        for_flow: false,
                    }
                });
            (Spend::Spent, refill)
        })
    }

    /// The lease the flow that found `key` empty should ask for.
    pub fn ask(
        &self,
        key: Option<Digest>,
        value: Option<&str>,
        params: &BucketParams,
        n: f64,
        now: Nanos,
    ) -> Ask {
        self.with(key, value, now, |lease| Ask {
            key,
            id: lease.id,
            want: lease_size(lease.demand, n, params),
            min: n,
            for_flow: true,
        })
    }

    /// Makes sure a lease for `key` (label value `value`) exists, so that a
    /// scheduler's queue, which knows keys but not values, can fill it.
    pub fn touch(&self, key: Digest, value: &str, now: Nanos) {
        self.with(Some(key), Some(value), now, |_| ());
    }

    /// The lease a scheduler's queue should ask for when `key`'s lease
    /// cannot pay its head request of `n` tokens: `None` while one is on
    /// its way, while the store's last denial holds, or when the lease was
    /// forgotten (its label value with it).
    pub fn ask_for_queue(
        &self,
        key: Option<Digest>,
        params: &BucketParams,
        n: f64,
        now: Nanos,
    ) -> Option<Ask> {
        self.with(key, None, now, |lease| {
            let nameless = key.is_some() && lease.id.is_none();
            if lease.refilling || now < lease.denied_until || nameless {
                return None;
            }
            lease.refilling = true;
            Some(Ask {
                key,
                id: lease.id,
                want: lease_size(lease.demand, n, params),
                min: n,
                for_flow: false,
            })
        })
    }

    /// Until when the store's last denial for `key` holds, if it does.
    pub fn denied_until(&self, key: Option<Digest>, now: Nanos) -> Option<Nanos> {
        let until = match key {
            None => self.one.lock().denied_until,
            Some(key) => self.per_label.with_existing(key, |l| l.denied_until)?,
        };
        (until > now).then_some(until)
    }

    /// Asks the store for `ask` on bucket `params`, within the store's
    /// deadline, and keeps what it grants. A grant of at least `ask.min`
    /// has `ask.min` spent at once, for the flow that asked.
    pub async fn fetch(&self, ask: Ask, params: BucketParams) -> Result<TokenGrant, StoreError> {
        let id_hex;
        let label = match ask.id {
            Some(id) => {
                id_hex = hex(&id);
                Some(id_hex.as_str())
            }
            None => None,
        };
        let state = StateId {
            policy: &self.policy,
            component: &self.component,
            label,
        };
        self.metrics.asked.inc();
        let answer = self
            .store
            .take_tokens(state, params, ask.want, ask.min)
            .await;
        let now = self.clock.now();
        let keep = |lease: &mut Lease| {
            if !ask.for_flow {
                lease.refilling = false;
            }
            let Ok(grant) = &answer else { return };
            self.metrics.granted.inc_by(grant.granted);
            if grant.granted > 0.0 {
                let unspent = lease.spendable(now);
                let spent = if ask.for_flow {
                    ask.min.min(grant.granted)
                } else {
                    0.0
                };
                lease.tokens = unspent + grant.granted - spent;
                lease.expires = now.saturating_add(LEASE_TTL);
                lease.denied_until = 0;
            } else if ask.min > 0.0 {
                lease.denied_until = match grant.retry_after {
                    Some(wait) => now.saturating_add(nanos(wait)),
                    None => now.saturating_add(LEASE_TTL),
                };
            }
        };
        match ask.key {
            None => keep(&mut self.one.lock()),
            // A lease forgotten meanwhile (evicted from a full table) loses
            // the grant: stranded, as at its ttl.
            Some(key) => {
                self.per_label.with_existing(key, keep);
            }
        }
        answer
    }

    /// Returns `n` tokens a flow took from `key`'s lease but did not spend
    /// (a later stage rejected it).
    pub fn give_back(&self, key: Option<Digest>, n: f64) {
        match key {
            None => self.one.lock().tokens += n,
            Some(key) => {
                self.per_label.with_existing(key, |l| l.tokens += n);
            }
        }
    }

    /// Forgets leases idle for `max_idle`.
    pub fn sweep(&self, now: Nanos, max_idle: Nanos) {
        self.per_label.sweep(now, max_idle);
    }
}

/// How many tokens to lease: this sidecar's demand over [`LEASE_SPAN`], at
/// least the flow's `n`, at most [`MAX_LEASE_SHARE`] of the bucket.
fn lease_size(demand: f64, n: f64, params: &BucketParams) -> f64 {
    let span = demand * LEASE_SPAN as f64 / 1e9;
    let most = (params.capacity * MAX_LEASE_SHARE).floor().max(n);
    span.ceil().clamp(n, most.max(n))
}

/// A label id as the store names it: 32 lower-case hex digits.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = 1_000_000_000;

    fn params(capacity: f64) -> BucketParams {
        BucketParams {
            capacity,
            fill_amount: capacity,
            interval: SEC,
            continuous: true,
        }
    }

    #[test]
    fn a_cold_key_leases_what_the_flow_needs_and_a_hot_one_more() {
        let p = params(1_000_000.0);
        assert_eq!(lease_size(0.0, 1.0, &p), 1.0);
        assert_eq!(lease_size(0.0, 3.0, &p), 3.0);
        // 10,000 tokens/s: a tenth of a second's worth.
        assert_eq!(lease_size(10_000.0, 1.0, &p), 1_000.0);
        // Never more than 5 % of the bucket, never less than the flow.
        assert_eq!(lease_size(10_000.0, 1.0, &params(20.0)), 1.0);
        assert_eq!(lease_size(10_000.0, 4.0, &params(20.0)), 4.0);
    }

    #[test]
    fn label_ids_are_the_same_everywhere_and_fixed_in_size() {
        assert_eq!(label_id("alice"), label_id("alice"));
        assert_ne!(label_id("alice"), label_id("bob"));
        assert_eq!(hex(&label_id("alice")).len(), 32);
    }
}
