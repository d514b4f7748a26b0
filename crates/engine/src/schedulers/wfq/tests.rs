//! The fair queue on simulated time.

use super::*;

const MS: Nanos = 1_000_000;
const SEC: Nanos = 1_000 * MS;

/// A token bucket refilled at `rate` tokens/s holding at most `max`.
struct Bucket {
    rate: f64,
    max: f64,
    tokens: f64,
    last: Nanos,
}

impl Bucket {
    fn new(rate: f64, max: f64) -> Self {
        Bucket {
            rate,
            max,
            tokens: 0.0,
            last: 0,
        }
    }
    fn refill(&mut self, now: Nanos) {
        self.tokens =
            (self.tokens + self.rate * (now - self.last) as f64 / SEC as f64).min(self.max);
        self.last = now;
    }
}

impl Capacity for Bucket {
    fn try_take(&mut self, now: Nanos, tokens: f64) -> bool {
        self.refill(now);
        if tokens <= self.tokens + 1e-9 {
            self.tokens -= tokens;
            true
        } else {
            false
        }
    }
    fn ready_at(&self, now: Nanos, tokens: f64) -> Option<Nanos> {
        let missing = (tokens - self.tokens).max(0.0);
        Some(now + (missing / self.rate * SEC as f64).ceil() as Nanos)
    }
}

fn request(
    workload: usize,
    tokens: f64,
    priority: f64,
    fairness: Option<&str>,
    now: Nanos,
) -> Request {
    Request {
        workload,
        tokens,
        priority,
        fairness: fairness.map(Into::into),
        arrived: now,
        deadline: now + 3600 * SEC,
    }
}

/// Keeps `backlog` requests of each kind queued for `seconds`, against a
/// bucket of `rate` tokens/s; returns the tokens admitted per kind.
fn saturate(kinds: &[(usize, f64, f64, Option<&str>)], rate: f64, seconds: u64) -> Vec<f64> {
    let mut queue = Queue::new(8, 100_000);
    // Room for the largest request, no more: admission follows the rate.
    let largest = kinds.iter().map(|k| k.1).fold(1.0, f64::max);
    let mut bucket = Bucket::new(rate, largest);
    let mut kind_of: HashMap<Ticket, usize> = HashMap::new();
    let mut admitted = vec![0.0; kinds.len()];
    let backlog = 20;
    let offer = |queue: &mut Queue,
                 bucket: &mut Bucket,
                 kind_of: &mut HashMap<Ticket, usize>,
                 k: usize,
                 now: Nanos| {
        let (w, tokens, priority, fairness) = kinds[k];
        match queue.offer(request(w, tokens, priority, fairness, now), now, bucket) {
            Offer::Queued(t) => {
                kind_of.insert(t, k);
            }
            other => panic!("saturated queue should queue, got {other:?}"),
        }
    };
    // Prime with a few tokens' worth of demand so nothing is admitted at once.
    bucket.tokens = 0.0;
    for k in 0..kinds.len() {
        for _ in 0..backlog {
            offer(&mut queue, &mut bucket, &mut kind_of, k, 0);
        }
    }
    let mut now = 0;
    while now < seconds * SEC {
        now += MS;
        let mut left = Vec::new();
        queue.dispatch(now, &mut bucket, &mut |_| true, &mut |t, r, o| {
            assert!(matches!(o, Outcome::Admitted { .. }), "{o:?}");
            left.push((t, r.tokens));
        });
        for (t, tokens) in left {
            let k = kind_of.remove(&t).expect("known ticket");
            admitted[k] += tokens;
            offer(&mut queue, &mut bucket, &mut kind_of, k, now);
        }
    }
    admitted
}

fn close(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= expected * tolerance
}

#[test]
fn priorities_two_and_one_share_tokens_two_to_one() {
    let admitted = saturate(&[(0, 1.0, 2.0, None), (1, 1.0, 1.0, None)], 100.0, 60);
    let ratio = admitted[0] / admitted[1];
    assert!(close(ratio, 2.0, 0.10), "{admitted:?} ratio {ratio}");
    assert!(
        close(admitted[0] + admitted[1], 6000.0, 0.01),
        "the capacity is used: {admitted:?}"
    );
}

#[test]
fn a_five_token_request_costs_five_times_a_one_token_request() {
    let admitted = saturate(&[(0, 5.0, 1.0, None), (1, 1.0, 1.0, None)], 100.0, 60);
    // Equal priority: equal tokens, so one fifth of the requests.
    assert!(close(admitted[0] / admitted[1], 1.0, 0.10), "{admitted:?}");
    let requests = (admitted[0] / 5.0, admitted[1]);
    assert!(close(requests.1 / requests.0, 5.0, 0.10), "{requests:?}");
}

#[test]
fn fairness_values_within_a_workload_share_it_evenly() {
    // Three users of one workload, one much greedier (larger backlog does
    // not matter: each keeps requests queued), against another workload.
    let admitted = saturate(
        &[
            (0, 1.0, 1.0, Some("a")),
            (0, 1.0, 1.0, Some("b")),
            (0, 1.0, 1.0, Some("c")),
            (1, 1.0, 1.0, None),
        ],
        90.0,
        60,
    );
    let workload0 = admitted[0] + admitted[1] + admitted[2];
    assert!(
        close(workload0 / admitted[3], 1.0, 0.10),
        "workloads share equally: {admitted:?}"
    );
    for a in &admitted[..3] {
        assert!(
            close(*a, workload0 / 3.0, 0.10),
            "values share evenly: {admitted:?}"
        );
    }
}

#[test]
fn a_thousand_to_one_priority_still_does_not_starve() {
    let admitted = saturate(&[(0, 1.0, 1000.0, None), (1, 1.0, 1.0, None)], 100.0, 60);
    assert!(admitted[1] >= 5.0, "the low priority got {admitted:?}");
    assert!(
        close(admitted[0] / admitted[1], 1000.0, 0.5),
        "{admitted:?}"
    );
}

#[test]
fn an_idle_workload_gets_its_share_back_not_a_burst() {
    // Workload 1 waits 30 s while 0 is served alone, then both saturate:
    // from then on they share 1:1; 1 does not get 30 s of catching up.
    let mut queue = Queue::new(2, 1000);
    let mut bucket = Bucket::new(100.0, 1.0);
    let mut kind: HashMap<Ticket, usize> = HashMap::new();
    let mut admitted_after = [0.0, 0.0];
    let mut now = 0;
    let offer = |queue: &mut Queue,
                 bucket: &mut Bucket,
                 w: usize,
                 now: Nanos,
                 kind: &mut HashMap<Ticket, usize>| {
        if let Offer::Queued(t) = queue.offer(request(w, 1.0, 1.0, None, now), now, bucket) {
            kind.insert(t, w);
        }
    };
    for _ in 0..10 {
        offer(&mut queue, &mut bucket, 0, 0, &mut kind);
    }
    while now < 60 * SEC {
        now += MS;
        if now == 30 * SEC {
            for _ in 0..10 {
                offer(&mut queue, &mut bucket, 1, now, &mut kind);
            }
        }
        let mut left = Vec::new();
        queue.dispatch(now, &mut bucket, &mut |_| true, &mut |t, _, _| left.push(t));
        for t in left {
            let w = kind.remove(&t).expect("known");
            if now > 30 * SEC {
                admitted_after[w] += 1.0;
            }
            offer(&mut queue, &mut bucket, w, now, &mut kind);
        }
    }
    assert!(
        close(admitted_after[0] / admitted_after[1], 1.0, 0.10),
        "{admitted_after:?}"
    );
}

struct Closed;
impl Capacity for Closed {
    fn try_take(&mut self, _: Nanos, _: f64) -> bool {
        false
    }
    fn ready_at(&self, _: Nanos, _: f64) -> Option<Nanos> {
        None
    }
}

#[test]
fn deadlines_are_honoured_to_the_nanosecond() {
    let mut queue = Queue::new(1, 10);
    let mut r = request(0, 1.0, 1.0, None, 1_000);
    r.deadline = 1_000 + 250 * MS;
    let Offer::Queued(ticket) = queue.offer(r, 1_000, &mut Closed) else {
        panic!("queued")
    };
    assert_eq!(queue.next_event(1_000, &Closed), Some(1_000 + 250 * MS));
    let mut out = Vec::new();
    queue.dispatch(
        1_000 + 250 * MS - 1,
        &mut Closed,
        &mut |_| true,
        &mut |t, _, o| out.push((t, o)),
    );
    assert!(out.is_empty(), "one nanosecond early");
    queue.dispatch(
        1_000 + 250 * MS,
        &mut Closed,
        &mut |_| true,
        &mut |t, _, o| out.push((t, o)),
    );
    assert_eq!(out, vec![(ticket, Outcome::TimedOut { waited: 250 * MS })]);
    assert!(queue.is_empty());
    assert_eq!(queue.next_event(2 * SEC, &Closed), None);
}

#[test]
fn a_request_without_time_to_wait_is_refused_at_once() {
    let mut queue = Queue::new(1, 10);
    let mut r = request(0, 1.0, 1.0, None, SEC);
    r.deadline = SEC;
    assert_eq!(queue.offer(r, SEC, &mut Closed), Offer::NoTime);
}

#[test]
fn a_full_queue_refuses_at_once() {
    let mut queue = Queue::new(1, 3);
    for _ in 0..3 {
        assert!(matches!(
            queue.offer(request(0, 1.0, 1.0, None, 0), 0, &mut Closed),
            Offer::Queued(_)
        ));
    }
    assert_eq!(
        queue.offer(request(0, 1.0, 1.0, None, 0), 0, &mut Closed),
        Offer::Full
    );
    assert_eq!(queue.len(), 3);
}

#[test]
fn admission_is_immediate_when_nobody_waits() {
    let mut queue = Queue::new(1, 3);
    let mut bucket = Bucket::new(10.0, 5.0);
    bucket.tokens = 2.0;
    assert_eq!(
        queue.offer(request(0, 1.0, 1.0, None, 0), 0, &mut bucket),
        Offer::Admitted
    );
    assert_eq!(
        queue.offer(request(0, 1.0, 1.0, None, 0), 0, &mut bucket),
        Offer::Admitted
    );
    assert!(matches!(
        queue.offer(request(0, 1.0, 1.0, None, 0), 0, &mut bucket),
        Offer::Queued(_)
    ));
    // Tokens for it arrive 100 ms later.
    assert_eq!(queue.next_event(0, &bucket), Some(100 * MS));
}

#[test]
fn cancelled_waiters_take_no_capacity() {
    let mut queue = Queue::new(1, 10);
    let mut bucket = Bucket::new(1.0, 1.0);
    let Offer::Queued(gone) = queue.offer(request(0, 1.0, 1.0, None, 0), 0, &mut bucket) else {
        panic!()
    };
    let Offer::Queued(waiting) = queue.offer(request(0, 1.0, 1.0, None, 0), 0, &mut bucket) else {
        panic!()
    };
    let mut out = Vec::new();
    queue.dispatch(SEC, &mut bucket, &mut |t| t != gone, &mut |t, _, o| {
        out.push((t, o))
    });
    assert_eq!(out, vec![(waiting, Outcome::Admitted { waited: SEC })]);
    assert!(queue.is_empty());
}

#[test]
fn many_distinct_fairness_values_do_not_grow_memory_without_bound() {
    let mut queue = Queue::new(1, 100);
    let mut bucket = Bucket::new(1000.0, 1.0);
    let mut now = 0;
    for i in 0..100_000u64 {
        now += MS;
        let value = i.to_string();
        let _ = queue.offer(request(0, 1.0, 1.0, Some(&value), now), now, &mut bucket);
        queue.dispatch(now, &mut bucket, &mut |_| true, &mut |_, _, _| {});
    }
    assert!(
        queue.workloads[0].fairness.len() < 1000,
        "{}",
        queue.workloads[0].fairness.len()
    );
    assert!(queue.workloads[0].waiting.len() < 1000);
}

#[test]
fn values_whose_requests_time_out_keep_their_fair_share() {
    // One workload over capacity (20 requests/s for 14/s, 250 ms timeout):
    // 50 values sending 0.4/s each and one sending 1/s. Max-min fairness
    // gives each value 14/51 = 0.27/s; requests that time out must not
    // count against their value, or the busier one would starve.
    let mut queue = Queue::new(1, 10_000);
    let mut bucket = Bucket::new(14.0, 1.0);
    let mut kind: HashMap<Ticket, bool> = HashMap::new();
    let (mut busy, mut crowd) = (0.0, 0.0);
    let mut rng = fastrand::Rng::with_seed(11);
    let mut now = 0;
    while now < 120 * SEC {
        now += MS;
        for (is_busy, per_second) in [(false, 20), (true, 1)] {
            if rng.u32(0..1000) >= per_second {
                continue;
            }
            let value = if is_busy {
                "busy".to_owned()
            } else {
                format!("v{}", rng.u32(0..50))
            };
            let mut r = request(0, 1.0, 1.0, Some(&value), now);
            r.deadline = now + 250 * MS;
            if let Offer::Queued(t) = queue.offer(r, now, &mut bucket) {
                kind.insert(t, is_busy);
            }
        }
        queue.dispatch(now, &mut bucket, &mut |_| true, &mut |t, _, o| {
            let is_busy = kind.remove(&t).expect("known");
            if matches!(o, Outcome::Admitted { .. }) {
                if is_busy { busy += 1.0 } else { crowd += 1.0 }
            }
        });
    }
    let per_crowd_value = crowd / 50.0;
    assert!(
        busy >= 0.8 * per_crowd_value,
        "busy value {busy} vs {per_crowd_value} per crowd value"
    );
    assert!(
        close(busy + crowd, 14.0 * 120.0, 0.05),
        "capacity used: {}",
        busy + crowd
    );
}

#[test]
fn requests_that_timed_out_leave_no_debt_behind() {
    // For 10 s nothing is admitted and every request of value "old" times
    // out. Then capacity returns, and "old" and "new" send alike: they must
    // share from the start, not "old" wait for the 100 requests it never got.
    let mut queue = Queue::new(1, 10_000);
    let mut bucket = Bucket::new(0.0, 1.0);
    let mut kind: HashMap<Ticket, &'static str> = HashMap::new();
    let mut admitted: HashMap<&'static str, f64> = HashMap::new();
    let mut now = 0;
    while now < 20 * SEC {
        now += MS;
        if now == 10 * SEC {
            bucket.refill(now);
            bucket.rate = 10.0;
        }
        if now % (100 * MS) == 0 {
            for value in ["old", "new"] {
                if value == "new" && now < 10 * SEC {
                    continue;
                }
                let mut r = request(0, 1.0, 1.0, Some(value), now);
                r.deadline = now + 250 * MS;
                if let Offer::Queued(t) = queue.offer(r, now, &mut bucket) {
                    kind.insert(t, value);
                }
            }
        }
        queue.dispatch(now, &mut bucket, &mut |_| true, &mut |t, _, o| {
            let value = kind.remove(&t).expect("known");
            if matches!(o, Outcome::Admitted { .. }) {
                *admitted.entry(value).or_default() += 1.0;
            }
        });
    }
    let (old, new) = (
        admitted.get("old").copied().unwrap_or(0.0),
        admitted.get("new").copied().unwrap_or(0.0),
    );
    assert!(close(old, new, 0.2), "old {old} vs new {new}");
}
