//! What a flow took on its way through the stages (rate-limiter tokens,
//! concurrency slots, scheduler tokens) as values that give it back when
//! they are dropped.
//!
//! Every component that lends capacity is a [`Lender`]; what it lent one
//! flow is a [`Claim`]; a flow's claims together are its [`Admission`].
//! Whatever becomes of the flow, its claims settle themselves: dropping
//! them (a later stage rejected the flow, Envoy gave up while it waited in
//! a queue, a task unwound) gives everything back, and committing the
//! admission ([`Admission::commit`]) spends the tokens and hands the slots
//! to the in-flight table (`flow_end::inflight`), whose entries give them
//! back when they are dropped: the access log arrived, the slot's deadline
//! passed, or the table evicted the flow. No code path returns capacity by
//! hand, so none can forget to.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::label_table::Digest;
use sluice_time::Nanos;

/// A component that lends capacity to flows: tokens of a bucket, slots of
/// a concurrency limit.
pub trait Lender: Send + Sync + 'static {
    /// Takes back `amount` lent for `key` (`None`: the component's one
    /// bucket or count, without `limit_by_label_key`).
    fn give_back(&self, key: Option<Digest>, amount: f64);
}

/// A lender in a compiled plan, borrowed for the length of one Check (no
/// reference-count traffic on the request path) and shared only when a
/// flow must outlive the Check's borrow of the plan (it waits in a queue,
/// or its slot waits for its access log).
pub trait Shared: Send + Sync {
    /// The lender.
    fn lender(&self) -> &dyn Lender;
    /// The lender, owned.
    fn share(&self) -> Arc<dyn Lender>;
}

impl<T: Lender> Shared for Arc<T> {
    fn lender(&self) -> &dyn Lender {
        &**self
    }

    fn share(&self) -> Arc<dyn Lender> {
        self.clone()
    }
}

/// Where a claim goes back to.
enum Source<'a> {
    /// A component of the plan the Check holds.
    Plan(&'a dyn Shared),
    /// A component the claim keeps alive itself.
    Owned(Arc<dyn Lender>),
}

/// Capacity one component lent one flow; dropping it gives it back.
#[must_use = "a claim dropped at once gives its capacity straight back"]
pub struct Claim<'a> {
    /// `None` once spent: the flow keeps what it took.
    from: Option<Source<'a>>,
    /// Which bucket or count it came from.
    key: Option<Digest>,
    /// How much.
    amount: f64,
}

impl std::fmt::Debug for Claim<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.key)
            .field("amount", &self.amount)
            .field("spent", &self.from.is_none())
            .finish()
    }
}

impl<'a> Claim<'a> {
    /// `amount` lent by a component of the plan in force, for `key`.
    pub fn borrowed(lender: &'a dyn Shared, key: Option<Digest>, amount: f64) -> Self {
        Claim {
            from: Some(Source::Plan(lender)),
            key,
            amount,
        }
    }

    /// `amount` lent by `lender` for `key`, independent of any plan.
    pub fn owned(lender: Arc<dyn Lender>, key: Option<Digest>, amount: f64) -> Claim<'static> {
        Claim {
            from: Some(Source::Owned(lender)),
            key,
            amount,
        }
    }

    /// The same claim, independent of the plan's lifetime.
    pub fn into_owned(mut self) -> Claim<'static> {
        let from = self.from.take().map(|from| match from {
            Source::Plan(shared) => Source::Owned(shared.share()),
            Source::Owned(lender) => Source::Owned(lender),
        });
        Claim {
            from,
            key: self.key,
            amount: self.amount,
        }
    }

    /// Keeps what was taken for good: the flow was admitted, and the tokens
    /// it paid are spent.
    pub fn spend(mut self) {
        self.from = None;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        match self.from.take() {
            Some(Source::Plan(shared)) => shared.lender().give_back(self.key, self.amount),
            Some(Source::Owned(lender)) => lender.give_back(self.key, self.amount),
            None => {}
        }
    }
}

/// The concurrency slots of an admitted flow, each with the time it is
/// given back by if the flow's access log never comes.
pub type Slots = SmallVec<[(Claim<'static>, Nanos); 1]>;

/// Everything one flow has taken so far. Dropping it gives everything
/// back.
#[must_use = "an admission dropped at once gives everything back"]
#[derive(Debug, Default)]
pub struct Admission<'a> {
    /// Tokens: spent when the flow is admitted.
    tokens: SmallVec<[Claim<'a>; 2]>,
    /// Slots: held until the flow ends.
    slots: Slots,
}

impl<'a> Admission<'a> {
    /// Adds tokens the flow paid.
    pub fn pay(&mut self, tokens: Claim<'a>) {
        self.tokens.push(tokens);
    }

    /// Adds a slot the flow holds until its end, or `until` at the latest.
    pub fn hold(&mut self, slot: Claim<'a>, until: Nanos) {
        self.slots.push((slot.into_owned(), until));
    }

    /// The same admission, independent of the plan's lifetime, for a flow
    /// that waits in a queue.
    pub fn into_owned(self) -> Admission<'static> {
        Admission {
            tokens: self.tokens.into_iter().map(Claim::into_owned).collect(),
            slots: self.slots,
        }
    }

    /// The flow is admitted: its tokens are spent; its slots are returned,
    /// for the in-flight table to hold until the flow ends. What is left is
    /// empty. In place, not by value: an admission is a few hundred bytes,
    /// and this runs on every accepted Check.
    pub fn commit(&mut self) -> Option<Slots> {
        for claim in &mut self.tokens {
            claim.from = None;
        }
        self.tokens.clear();
        (!self.slots.is_empty()).then(|| std::mem::take(&mut self.slots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// Counts what is lent and given back.
    #[derive(Default)]
    struct Pool(Mutex<f64>);

    impl Pool {
        fn take(self: &Arc<Self>, amount: f64) -> Claim<'_> {
            *self.0.lock() += amount;
            Claim::borrowed(self, None, amount)
        }

        fn lent(&self) -> f64 {
            *self.0.lock()
        }
    }

    impl Lender for Pool {
        fn give_back(&self, _key: Option<Digest>, amount: f64) {
            *self.0.lock() -= amount;
        }
    }

    #[test]
    fn dropping_an_admission_gives_everything_back_and_committing_keeps_it() {
        let tokens = Arc::new(Pool::default());
        let slots = Arc::new(Pool::default());
        let mut admission = Admission::default();
        admission.pay(tokens.take(3.0));
        admission.hold(slots.take(1.0), 10);
        assert_eq!((tokens.lent(), slots.lent()), (3.0, 1.0));
        drop(admission);
        assert_eq!((tokens.lent(), slots.lent()), (0.0, 0.0));

        let mut admission = Admission::default();
        admission.pay(tokens.take(3.0));
        admission.hold(slots.take(1.0), 10);
        let held = admission.into_owned().commit().expect("a slot");
        assert_eq!(
            (tokens.lent(), slots.lent()),
            (3.0, 1.0),
            "tokens spent, slot held"
        );
        drop(held);
        assert_eq!(
            (tokens.lent(), slots.lent()),
            (3.0, 0.0),
            "the slot came back"
        );
    }

    #[test]
    fn a_claim_given_back_by_unwinding_is_not_lost() {
        let pool = Arc::new(Pool::default());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _claim = pool.take(1.0);
            panic!("a bug between taking and committing");
        }));
        assert!(outcome.is_err());
        assert_eq!(pool.lent(), 0.0);
    }
}
