//! The figures of an overload run: how well a control loop kept a service
//! busy and fast while more traffic came than it could serve.
//!
//! A run is a record of seconds ([`Second`]: what was offered, admitted,
//! served within the latency objective, and the multiplier in force),
//! split into three phases: calm, overload, calm again. [`Figures::of`]
//! turns it into the five figures the overload bench reports (loadtests'
//! `overload` scenario, `tests/overload.rs`, and the demo at its end):
//!
//! - **goodput**: requests served within the objective per overloaded
//!   second, as a share of what the upstream can serve within it (its
//!   [`Capacity::rate_within`]): a loop that cuts too much wastes capacity,
//!   one that cuts too little lets latency past the objective;
//! - **time to protect**: from the start of overload until latency stays
//!   below 1.2 × the objective for the rest of the overload;
//! - **stability**: once protected, the spread of the multiplier and of the
//!   latency, and the seconds whose latency went above 2 × (and 1.5 ×) the
//!   objective;
//! - **recovery**: from the end of overload until nothing is turned away
//!   and the multiplier (for loops that have one) is back at pass-through
//!   (≥ 0.99), and both stay so;
//! - **priority**: the high-priority workload's share of admitted requests
//!   in the seconds where anything was rejected, beside its share of what
//!   was offered then.
//!
//! Nothing here does I/O, so the figures are tested on made-up records.

use std::time::Duration;

use serde::Serialize;

use crate::upstream::Capacity;

/// One second of an overload run, `[t, t + 1)` from the start of traffic.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Second {
    /// Seconds since the traffic started.
    pub t: u64,
    /// Requests sent, per workload (index 0: the high-priority one).
    pub offered: [u64; 2],
    /// Requests answered 2xx (admitted and served), per workload.
    pub admitted: [u64; 2],
    /// Requests turned away by the flow control (Sluice's 429/503), per
    /// workload.
    pub rejected: [u64; 2],
    /// Requests without an answer or with another status.
    pub failed: u64,
    /// Admitted requests answered within the objective.
    pub within_objective: u64,
    /// Mean latency of the upstream for the admitted requests answered in
    /// this second (ms): what the objective is about.
    pub latency_ms: Option<f64>,
    /// Their mean latency as the client saw it (ms): the upstream's, the
    /// way there and back, and the time they waited in a queue.
    pub e2e_ms: Option<f64>,
    /// The load multiplier in force at the end of the second.
    pub lm: Option<f64>,
    /// The concurrency limit in force at the end of the second (a loop
    /// that limits flows in flight instead).
    pub limit: Option<u64>,
}

/// When overload starts and ends, in seconds from the start of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Overload {
    /// The first overloaded second.
    pub start: u64,
    /// The first second after it.
    pub end: u64,
}

/// The figures of one run (see the module's doc).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Served within the objective ÷ capacity within it, mean over the
    /// overloaded seconds.
    pub goodput: Option<f64>,
    /// Seconds from the start of overload until latency stays below
    /// 1.2 × the objective; `None`: never.
    pub protected_after_s: Option<u64>,
    /// Standard deviation of the multiplier once protected.
    pub lm_spread: Option<f64>,
    /// Standard deviation of latency ÷ objective once protected.
    pub latency_spread: Option<f64>,
    /// Overloaded seconds after protection whose latency was above 2 × the
    /// objective.
    pub seconds_above_2x: u64,
    /// ... above 1.5 × the objective.
    pub seconds_above_1_5x: u64,
    /// The highest latency ÷ objective of an overloaded second.
    pub worst_latency_ratio: Option<f64>,
    /// Seconds from the end of overload until nothing is turned away and
    /// the multiplier is back at pass-through, and both stay so; `None`:
    /// not by the end of the run.
    pub recovered_after_s: Option<u64>,
    /// The high-priority workload's share of admitted requests in seconds
    /// with rejections.
    pub priority_admitted_share: Option<f64>,
    /// Its share of the requests offered in those seconds.
    pub priority_offered_share: Option<f64>,
    /// The mean end-to-end latency of admitted requests over the
    /// overloaded seconds, ÷ the objective (queueing included).
    pub e2e_latency_ratio: Option<f64>,
}

/// Latency counts as protected below this × the objective.
const PROTECTED: f64 = 1.2;
/// A multiplier this high passes everything.
const PASS_THROUGH: f64 = 0.99;

impl Figures {
    /// The figures of `seconds` (in order of `t`) for an upstream of
    /// `capacity` and a latency `objective`.
    pub fn of(
        seconds: &[Second],
        overload: Overload,
        capacity: &Capacity,
        objective: Duration,
    ) -> Figures {
        let objective_ms = objective.as_secs_f64() * 1000.0;
        let during: Vec<&Second> = seconds
            .iter()
            .filter(|s| (overload.start..overload.end).contains(&s.t))
            .collect();
        let ratio = |s: &Second| s.latency_ms.map(|l| l / objective_ms);

        let goodput = mean(during.iter().filter_map(|s| {
            let capacity = capacity.rate_within(objective, Duration::from_secs(s.t));
            (capacity.is_finite() && capacity > 0.0).then(|| s.within_objective as f64 / capacity)
        }));

        // The first overloaded second from which every later one is below
        // the bound (a second without admitted answers is no evidence).
        let protected_from = (0..during.len())
            .find(|&i| {
                during[i..]
                    .iter()
                    .all(|s| ratio(s).is_none_or(|r| r < PROTECTED))
                    && ratio(during[i]).is_some()
            })
            .map(|i| during[i].t);
        let settled: Vec<&Second> = during
            .iter()
            .copied()
            .filter(|s| protected_from.is_some_and(|p| s.t >= p))
            .collect();
        let above = |k: f64| {
            settled
                .iter()
                .filter(|s| ratio(s).is_some_and(|r| r > k))
                .count() as u64
        };

        let after: Vec<&Second> = seconds.iter().filter(|s| s.t >= overload.end).collect();
        let recovered_from = (0..after.len())
            .find(|&i| {
                after[i..].iter().all(|s| {
                    s.lm.is_none_or(|lm| lm >= PASS_THROUGH) && s.rejected.iter().sum::<u64>() == 0
                })
            })
            .map(|i| after[i].t);

        let rejecting: Vec<&Second> = seconds
            .iter()
            .filter(|s| s.rejected.iter().sum::<u64>() > 0)
            .collect();
        let share = |f: fn(&Second) -> [u64; 2]| {
            let (high, all) = rejecting.iter().fold((0, 0), |(h, a), s| {
                let v = f(s);
                (h + v[0], a + v[0] + v[1])
            });
            (all > 0).then(|| high as f64 / all as f64)
        };

        Figures {
            goodput,
            protected_after_s: protected_from.map(|p| p - overload.start),
            lm_spread: spread(settled.iter().filter_map(|s| s.lm)),
            latency_spread: spread(settled.iter().filter_map(|s| ratio(s))),
            seconds_above_2x: above(2.0),
            seconds_above_1_5x: above(1.5),
            worst_latency_ratio: during.iter().filter_map(|s| ratio(s)).reduce(f64::max),
            recovered_after_s: recovered_from.map(|r| r - overload.end),
            priority_admitted_share: share(|s| s.admitted),
            priority_offered_share: share(|s| s.offered),
            e2e_latency_ratio: mean(during.iter().filter_map(|s| s.e2e_ms))
                .map(|e| e / objective_ms),
        }
    }

    /// The figures on one line: `goodput 0.91 protected 2 s ...`.
    pub fn line(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let s = |v: Option<u64>| v.map_or("never".to_owned(), |v| format!("{v} s"));
        format!(
            "goodput {} | protected after {} | after that: lm spread {}, latency spread {}×, {} s above 2× and {} s above 1.5× the objective (worst {}×) | recovered after {} | high priority {} of admitted, {} of offered | end-to-end {}× the objective",
            f(self.goodput),
            s(self.protected_after_s),
            f(self.lm_spread),
            f(self.latency_spread),
            self.seconds_above_2x,
            self.seconds_above_1_5x,
            f(self.worst_latency_ratio),
            s(self.recovered_after_s),
            f(self.priority_admitted_share),
            f(self.priority_offered_share),
            f(self.e2e_latency_ratio),
        )
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / f64::from(n))
}

/// The population standard deviation.
fn spread(values: impl Iterator<Item = f64> + Clone) -> Option<f64> {
    let m = mean(values.clone())?;
    mean(values.map(|v| (v - m) * (v - m))).map(f64::sqrt)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKERS: Capacity = Capacity::Workers {
        workers: 4,
        service: Duration::from_millis(20),
        halved_after: None,
    };
    const OBJECTIVE: Duration = Duration::from_millis(40);

    /// A second at `t` with `latency` ms, `lm`, `within` served in time,
    /// and offered/admitted/rejected per workload.
    fn second(
        t: u64,
        latency: f64,
        lm: f64,
        within: u64,
        admitted: [u64; 2],
        rejected: [u64; 2],
    ) -> Second {
        Second {
            t,
            offered: [admitted[0] + rejected[0], admitted[1] + rejected[1]],
            admitted,
            rejected,
            failed: 0,
            within_objective: within,
            latency_ms: Some(latency),
            e2e_ms: Some(latency + 1.0),
            lm: Some(lm),
            limit: None,
        }
    }

    #[test]
    fn a_loop_without_a_multiplier_recovers_when_nothing_is_turned_away() {
        let mut run = [
            second(0, 90.0, 1.0, 100, [100, 100], [0, 0]),
            second(1, 30.0, 1.0, 180, [100, 90], [0, 110]),
            second(2, 20.0, 1.0, 100, [50, 40], [0, 10]),
            second(3, 20.0, 1.0, 100, [50, 50], [0, 0]),
        ];
        for s in &mut run {
            s.lm = None;
            s.limit = Some(9);
        }
        let f = Figures::of(&run, Overload { start: 0, end: 2 }, &WORKERS, OBJECTIVE);
        assert_eq!(f.recovered_after_s, Some(1), "{f:?}");
    }

    #[test]
    fn a_loop_that_protects_and_recovers_scores_well() {
        // Capacity 200/s within 40 ms. Calm at 0..2, overload 2..6,
        // calm from 6.
        let run = [
            second(0, 20.0, 1.0, 100, [50, 50], [0, 0]),
            second(1, 20.0, 1.0, 100, [50, 50], [0, 0]),
            second(2, 90.0, 1.0, 100, [100, 100], [0, 0]), // overloaded, cutting
            second(3, 44.0, 0.6, 180, [100, 90], [0, 110]), // 1.1×: protected
            second(4, 36.0, 0.5, 190, [100, 95], [0, 105]),
            second(5, 40.0, 0.5, 190, [100, 95], [0, 105]),
            second(6, 30.0, 0.8, 100, [50, 50], [0, 0]),
            second(7, 20.0, 1.0, 100, [50, 50], [0, 0]),
            second(8, 20.0, 1.0, 100, [50, 50], [0, 0]),
        ];
        let f = Figures::of(&run, Overload { start: 2, end: 6 }, &WORKERS, OBJECTIVE);
        // (100 + 180 + 190 + 190) / 4 / 200
        assert!((f.goodput.unwrap() - 0.825).abs() < 1e-9, "{f:?}");
        assert_eq!(f.protected_after_s, Some(1));
        assert_eq!(f.seconds_above_2x, 0);
        assert_eq!(f.seconds_above_1_5x, 0);
        assert!((f.worst_latency_ratio.unwrap() - 2.25).abs() < 1e-9);
        assert!((f.lm_spread.unwrap() - (0.0022222f64).sqrt()).abs() < 1e-3);
        assert_eq!(f.recovered_after_s, Some(1));
        // Seconds 3..6 rejected: high priority 300 of 580 admitted, 300 of
        // 900 offered.
        assert!((f.priority_admitted_share.unwrap() - 300.0 / 580.0).abs() < 1e-9);
        assert!((f.priority_offered_share.unwrap() - 300.0 / 900.0).abs() < 1e-9);
        assert!(f.line().contains("protected after 1 s"), "{}", f.line());
    }

    #[test]
    fn a_loop_that_never_settles_is_never_protected_nor_recovered() {
        let run = [
            second(0, 90.0, 1.0, 10, [50, 50], [0, 0]),
            second(1, 40.0, 0.3, 100, [50, 20], [0, 30]),
            second(2, 95.0, 0.9, 10, [50, 50], [0, 0]),
            second(3, 20.0, 0.7, 100, [50, 50], [0, 0]),
            second(4, 20.0, 0.8, 100, [50, 50], [0, 0]),
        ];
        let f = Figures::of(&run, Overload { start: 0, end: 3 }, &WORKERS, OBJECTIVE);
        // Above 1.2× again in its last overloaded second.
        assert_eq!(f.protected_after_s, None);
        assert_eq!(f.lm_spread, None);
        assert_eq!(f.recovered_after_s, None);
        assert!(f.line().contains("protected after never"));
    }

    #[test]
    fn capacity_that_halves_is_what_goodput_is_measured_against() {
        let halving = Capacity::Workers {
            workers: 4,
            service: Duration::from_millis(20),
            halved_after: Some(Duration::from_secs(1)),
        };
        // 100 in time each second: half of 200/s, then all of 100/s.
        let run = [
            second(0, 30.0, 0.5, 100, [50, 50], [0, 50]),
            second(1, 30.0, 0.5, 100, [50, 50], [0, 50]),
        ];
        let f = Figures::of(&run, Overload { start: 0, end: 2 }, &halving, OBJECTIVE);
        assert!((f.goodput.unwrap() - 0.75).abs() < 1e-9);
    }

    #[test]
    fn seconds_without_answers_are_no_evidence() {
        let mut quiet = second(2, 0.0, 0.1, 0, [0, 0], [0, 100]);
        quiet.latency_ms = None;
        quiet.lm = None;
        let run = [
            second(0, 100.0, 1.0, 10, [50, 50], [0, 0]),
            second(1, 30.0, 0.2, 50, [20, 10], [30, 40]),
            quiet,
        ];
        let f = Figures::of(&run, Overload { start: 0, end: 3 }, &WORKERS, OBJECTIVE);
        assert_eq!(f.protected_after_s, Some(1));
        // After the end there are no seconds: not recovered.
        assert_eq!(f.recovered_after_s, None);
    }
}
