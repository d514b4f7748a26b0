//! The overload bench in its short form, as CI runs it: the real Envoy,
//! Prometheus, Sluice and sluice-controller on loopback in front of an
//! upstream of fixed capacity (workers with a fixed service time), twice
//! its capacity offered for 15 s, once with the controller's capacity loop
//! and once with the sidecar's adaptive concurrency limit, one after the
//! other (both at once would share two cores). Asserts each loop's floor:
//! the upstream is protected (latency below 2 × the objective) within
//! 10 s of the overload's start, and nothing is turned away (the
//! multiplier back at pass-through) within 10 s of its end. The figures themselves are a benchmark
//! (`loadtests/run overload`, BENCHMARKS.md), not a test.
//!
//! Needs Envoy and Prometheus (`scripts/bootstrap.sh`, which `make test`
//! runs first); fails, never skips, without them.

// The driver (`loadtests/run overload`) uses the profiles and loops this
// test does not.
#[allow(dead_code)]
#[path = "../loadtests/overload.rs"]
mod overload;

use overload::{Loop, Plan, Profile};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_loop_protects_a_fixed_capacity_upstream_and_recovers() {
    for lp in [Loop::Capacity, Loop::Adaptive] {
        let outcome = overload::run(Profile::Workers, lp, Plan::short())
            .await
            .expect("the overload run");
        println!("{}", overload::summary(&outcome));
        println!("{}", overload::trace(&outcome));
        let dir = sluice_testkit::repo_root().join("target/overload-test");
        std::fs::create_dir_all(&dir).expect("target/overload-test");
        let record = serde_json::to_vec_pretty(&outcome).expect("the record");
        std::fs::write(dir.join(format!("workers-{}.json", lp.name())), record)
            .expect("the record written");
        assert_floor(&outcome);
    }
}

/// The floor every loop must hold (see the module's doc).
fn assert_floor(outcome: &overload::Outcome) {
    let name = outcome.control.name();
    let objective_ms = overload::OBJECTIVE.as_secs_f64() * 1000.0;
    let start = outcome.overload.start;
    // Within 10 s of the start of overload, every later overloaded second
    // below 2 × the objective.
    let late: Vec<_> = outcome
        .seconds
        .iter()
        .filter(|s| s.t >= start + 10 && s.t < outcome.overload.end)
        .filter(|s| s.latency_ms.is_some_and(|l| l > 2.0 * objective_ms))
        .map(|s| (s.t, s.latency_ms))
        .collect();
    assert!(
        late.is_empty(),
        "{name}: latency above 2× the objective 10 s after the overload began: {late:?}"
    );
    // Something was turned away while overloaded: the loop acted.
    let rejected: u64 = outcome
        .seconds
        .iter()
        .map(|s| s.rejected.iter().sum::<u64>())
        .sum();
    assert!(
        rejected > 0,
        "{name}: nothing rejected under twice the capacity"
    );
    let recovered = outcome.figures.recovered_after_s;
    assert!(
        recovered.is_some_and(|r| r <= 10),
        "{name}: still turning requests away 10 s after the end: {recovered:?}"
    );
    let failed: u64 = outcome.seconds.iter().map(|s| s.failed).sum();
    assert_eq!(
        failed, 0,
        "{name}: requests without an answer or with an unexpected status"
    );
}
