//! The weighted-fair queue at the heart of every scheduler, with no async,
//! no locks and no clock of its own: time is passed in, so its behaviour
//! is tested exactly on simulated time.
//!
//! Ordering is weighted fair queuing on virtual finish time, two levels
//! deep. Between workloads, a request costs `tokens / priority` of virtual
//! time, and the workload whose head request would finish first (in
//! virtual time) goes next: two saturated workloads of priorities 2 and 1
//! get tokens in a 2:1 ratio, and a request of 5 tokens costs five times
//! one of 1. Within a workload, requests are ordered the same way per value
//! of the fairness label, with equal weights, so the values share the
//! workload's capacity evenly. Virtual time never runs ahead of the backlog
//! (start-time fair queuing), so a workload that was idle gets its share
//! when it comes back, not a burst for the time it missed, and none
//! starves: every queued request's finish tag is finite, and later arrivals
//! get later tags.
//!
//! Admission is head-of-line: the chosen request goes only when the
//! capacity (a [`Capacity`]) can take it; smaller requests do not overtake
//! it, which is what keeps large requests from starving. A request leaves
//! the queue admitted, at its deadline (rejected), or when its waiter is
//! gone (cancelled; its capacity is not taken).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use sluice_time::Nanos;

/// What a queue draws admissions from.
pub trait Capacity {
    /// Takes `tokens` at `now` if available.
    fn try_take(&mut self, now: Nanos, tokens: f64) -> bool;
    /// When `tokens` will be available if nothing else happens; `None`
    /// when only an outside event (a slot returned) can make room.
    fn ready_at(&self, now: Nanos, tokens: f64) -> Option<Nanos>;
}

/// A queued request, as the queue needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Index of its workload.
    pub workload: usize,
    /// What it costs.
    pub tokens: f64,
    /// Its weight (> 0).
    pub priority: f64,
    /// Its fairness label value, if the scheduler has a fairness key.
    pub fairness: Option<Box<str>>,
    /// When it arrived.
    pub arrived: Nanos,
    /// When it must have left the queue.
    pub deadline: Nanos,
}

/// Identifies a queued request to its waiter.
pub type Ticket = u64;

/// How a request left the queue.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Admitted after waiting this long.
    Admitted {
        /// Time spent queued.
        waited: Nanos,
    },
    /// Its deadline passed in the queue.
    TimedOut {
        /// Time spent queued.
        waited: Nanos,
    },
}

/// What [`Queue::offer`] did with a new request.
#[derive(Clone, Debug, PartialEq)]
pub enum Offer {
    /// Admitted at once (no wait).
    Admitted,
    /// Queued; its outcome comes from [`Queue::dispatch`].
    Queued(Ticket),
    /// The queue is full.
    Full,
    /// It could not be admitted at once and its deadline leaves no time to
    /// wait.
    NoTime,
}

#[derive(Debug)]
struct Entry {
    request: Request,
    /// Finish tag among its workload's fairness values.
    sub_finish: f64,
}

#[derive(Debug, Default)]
struct Workload {
    /// Virtual finish time of the workload's last dispatched request.
    finish: f64,
    /// Virtual start time of the workload's head request: fixed when the
    /// head becomes the head (the virtual time then, or the previous
    /// request's finish when the workload stays backlogged), never
    /// re-read from the advancing virtual time, which would starve it.
    start: f64,
    /// Requests of this workload waiting.
    live: usize,
    /// Waiting requests by (fairness finish tag, arrival order).
    waiting: BinaryHeap<Reverse<(OrderedF64, u64)>>,
    /// Per fairness value: its last finish tag and its requests waiting.
    fairness: HashMap<Option<Box<str>>, Value>,
    /// Fairness values with requests waiting.
    active_values: usize,
    /// Fairness virtual time (start tag of the last dispatched request).
    sub_time: f64,
}

/// A fairness value's standing within its workload.
#[derive(Debug, Default, Clone, Copy)]
struct Value {
    /// Finish tag of its latest request.
    last: f64,
    /// Its requests waiting.
    live: usize,
}

/// An `f64` ordered totally (tags are never NaN), so it can key a heap.
#[derive(Clone, Copy, Debug)]
struct OrderedF64(f64);
impl PartialEq for OrderedF64 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrderedF64 {}
impl PartialOrd for OrderedF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderedF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The queue of one scheduler (or of one label value of a quota scheduler).
#[derive(Debug)]
pub struct Queue {
    /// Virtual time: the start tag of the last dispatched request.
    time: f64,
    workloads: Vec<Workload>,
    entries: HashMap<Ticket, Entry>,
    /// Tokens of the waiting requests, kept as they come and go so that a
    /// rejection's `retry-after` does not sum the whole queue.
    backlog: f64,
    deadlines: BinaryHeap<Reverse<(Nanos, Ticket)>>,
    next_ticket: Ticket,
    max_queued: usize,
}

impl Queue {
    /// A queue for `workloads` workloads holding at most `max_queued`.
    pub fn new(workloads: usize, max_queued: usize) -> Self {
        Queue {
            time: 0.0,
            workloads: (0..workloads).map(|_| Workload::default()).collect(),
            entries: HashMap::new(),
            backlog: 0.0,
            deadlines: BinaryHeap::new(),
            next_ticket: 0,
            max_queued,
        }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True while `ticket` waits.
    pub fn contains(&self, ticket: Ticket) -> bool {
        self.entries.contains_key(&ticket)
    }

    /// True when none waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tokens waiting, all workloads together.
    pub fn backlog_tokens(&self) -> f64 {
        self.backlog
    }

    /// Takes a request out of the queue, keeping the backlog.
    fn remove(&mut self, ticket: Ticket) -> Option<Entry> {
        let e = self.entries.remove(&ticket)?;
        // Exactly zero when empty, so rounding never accumulates.
        self.backlog = if self.entries.is_empty() {
            0.0
        } else {
            (self.backlog - e.request.tokens).max(0.0)
        };
        Some(e)
    }

    /// A new request: admitted at once when nobody waits and `capacity`
    /// has room; queued otherwise (then dispatched in order).
    pub fn offer(&mut self, request: Request, now: Nanos, capacity: &mut dyn Capacity) -> Offer {
        if self.entries.is_empty() && capacity.try_take(now, request.tokens) {
            // Charge its virtual time so that a burst that fits the capacity
            // still counts against its workload's share later.
            let cost = request.tokens / request.priority;
            let w = &mut self.workloads[request.workload];
            let start = w.finish.max(self.time);
            w.finish = start + cost;
            self.time = self.time.max(start);
            return Offer::Admitted;
        }
        if request.deadline <= now {
            return Offer::NoTime;
        }
        if self.entries.len() >= self.max_queued {
            return Offer::Full;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let time = self.time;
        let w = &mut self.workloads[request.workload];
        if w.live == 0 {
            w.start = w.finish.max(time);
            w.fairness.clear();
            w.active_values = 0;
        } else if w.fairness.len() > 64 + 2 * w.waiting.len() {
            // Idle values whose last tag is behind the fairness time are as
            // good as new: forget them, so that many distinct values under a
            // standing backlog cannot grow the map without bound.
            let now = w.sub_time;
            w.fairness.retain(|_, v| v.live > 0 || v.last > now);
        }
        let value = w.fairness.entry(request.fairness.clone()).or_default();
        let sub_finish = value.last.max(w.sub_time) + request.tokens;
        value.last = sub_finish;
        value.live += 1;
        if value.live == 1 {
            w.active_values += 1;
        }
        w.waiting.push(Reverse((OrderedF64(sub_finish), ticket)));
        w.live += 1;
        self.deadlines.push(Reverse((request.deadline, ticket)));
        self.backlog += request.tokens;
        self.entries.insert(
            ticket,
            Entry {
                request,
                sub_finish,
            },
        );
        Offer::Queued(ticket)
    }

    /// Head request of workload `w`, dropping tickets that already left.
    fn head(&mut self, w: usize) -> Option<Ticket> {
        let workload = &mut self.workloads[w];
        while let Some(Reverse((_, ticket))) = workload.waiting.peek() {
            if self.entries.contains_key(ticket) {
                return Some(*ticket);
            }
            workload.waiting.pop();
        }
        None
    }

    /// The next request in fair order and its workload finish tag.
    fn next(&mut self) -> Option<(Ticket, f64)> {
        let mut best: Option<(Ticket, f64)> = None;
        for w in 0..self.workloads.len() {
            let Some(ticket) = self.head(w) else { continue };
            let r = &self.entries[&ticket].request;
            let finish = self.workloads[w].start + r.tokens / r.priority;
            if best.is_none_or(|(_, f)| finish < f) {
                best = Some((ticket, finish));
            }
        }
        best
    }

    /// Rejects what is past its deadline and admits what `capacity` allows,
    /// in fair order. `alive` says whether a ticket's waiter still waits (a
    /// cancelled request is dropped without taking capacity, and without
    /// `done`). Calls `done` for every request that leaves.
    pub fn dispatch(
        &mut self,
        now: Nanos,
        capacity: &mut dyn Capacity,
        alive: &mut dyn FnMut(Ticket) -> bool,
        done: &mut dyn FnMut(Ticket, &Request, Outcome),
    ) {
        while let Some(Reverse((deadline, ticket))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            if let Some(e) = self.remove(ticket) {
                self.left_unserved(&e);
                let waited = now.saturating_sub(e.request.arrived);
                done(ticket, &e.request, Outcome::TimedOut { waited });
            }
        }
        while let Some((ticket, finish)) = self.next() {
            let entry = &self.entries[&ticket];
            if !alive(ticket) {
                if let Some(e) = self.remove(ticket) {
                    self.left_unserved(&e);
                }
                continue;
            }
            if !capacity.try_take(now, entry.request.tokens) {
                break;
            }
            let Some(e) = self.remove(ticket) else {
                break;
            };
            let w = &mut self.workloads[e.request.workload];
            let start = w.start;
            w.finish = finish;
            w.start = finish;
            w.live -= 1;
            // Fairness time advances as in fluid fair sharing: a dispatch
            // of `tokens` moves it by tokens / values waiting, so a value
            // that was just served waits for the others' turns, and no
            // longer than that.
            let active = w.active_values.max(1) as f64;
            w.sub_time =
                w.sub_time.max(e.sub_finish - e.request.tokens) + e.request.tokens / active;
            Self::value_left(w, &e);
            self.time = self.time.max(start);
            let waited = now.saturating_sub(e.request.arrived);
            done(ticket, &e.request, Outcome::Admitted { waited });
        }
        self.compact();
    }

    /// A request leaves without being served (deadline, cancelled): it must
    /// not count against its fairness value, or a value whose requests keep
    /// timing out would fall ever further behind and never be served. Its
    /// tokens come off the value's schedule (requests of the value still
    /// waiting keep their places).
    fn left_unserved(&mut self, e: &Entry) {
        let w = &mut self.workloads[e.request.workload];
        w.live -= 1;
        if let Some(value) = w.fairness.get_mut(&e.request.fairness) {
            value.last -= e.request.tokens;
        }
        Self::value_left(w, e);
    }

    /// Counts a request out of its fairness value.
    fn value_left(w: &mut Workload, e: &Entry) {
        if let Some(value) = w.fairness.get_mut(&e.request.fairness) {
            value.live = value.live.saturating_sub(1);
            if value.live == 0 {
                w.active_values = w.active_values.saturating_sub(1);
            }
        }
    }

    /// Drops tickets of requests that already left from the heaps, when
    /// they have come to outnumber the waiting requests.
    fn compact(&mut self) {
        let live = self.entries.len();
        if self.deadlines.len() > 64 + 2 * live {
            let entries = &self.entries;
            self.deadlines
                .retain(|Reverse((_, t))| entries.contains_key(t));
        }
        for w in &mut self.workloads {
            if w.waiting.len() > 64 + 2 * live {
                let entries = &self.entries;
                w.waiting.retain(|Reverse((_, t))| entries.contains_key(t));
            }
        }
    }

    /// When [`Queue::dispatch`] should run again if nothing else happens:
    /// the earliest deadline, or when the next request's tokens are there.
    pub fn next_event(&mut self, now: Nanos, capacity: &dyn Capacity) -> Option<Nanos> {
        let deadline = loop {
            match self.deadlines.peek() {
                Some(Reverse((d, t))) if !self.entries.contains_key(t) => {
                    let _ = (d, t);
                    self.deadlines.pop();
                }
                Some(Reverse((d, _))) => break Some(*d),
                None => break None,
            }
        };
        let ready = self
            .next()
            .and_then(|(t, _)| capacity.ready_at(now, self.entries[&t].request.tokens));
        match (deadline, ready) {
            (Some(d), Some(r)) => Some(d.min(r)),
            (d, r) => d.or(r),
        }
    }
}

#[cfg(test)]
mod tests;
