//! The demo (`make demo`) in its short mode, as CI runs it: the real
//! upstream, Prometheus, Sluice, sluice-controller and Envoy on loopback,
//! k6 sending the traffic. Asserts from the [`demo::Summary`] it returns,
//! not from its prose: both accepted and rejected requests, the rate
//! limiter's 429 with `retry-after`, the sampler's 403, the load
//! scheduler's 503 for the crowd once the controller throttles, guests
//! turned away more than subscribers, the picture and the series written,
//! and nothing left running. A second run is stopped early, as Ctrl-C
//! would, and still writes what it has.
//!
//! Needs Envoy, Prometheus and k6 (`scripts/bootstrap.sh`, which `make
//! test` runs first); fails, never skips, without them.

#[path = "../examples/demo/lib.rs"]
mod demo;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sluice_testkit::repo_root;

/// The two runs share the machine's two cores: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn args(duration: &str, out: &str) -> demo::Args {
    let out = repo_root().join("target/demo-test").join(out);
    let argv = ["--duration", duration, "--out", &out.display().to_string()].map(String::from);
    demo::Args::parse(argv)
        .expect("arguments")
        .expect("not --help")
}

/// One source's answers by status, and by (status, rejecter).
fn answers(summary: &demo::Summary, source: &str) -> BTreeMap<(u16, String), (u64, u64)> {
    let mut out = BTreeMap::new();
    for a in summary.answers.iter().filter(|a| a.source == source) {
        let e: &mut (u64, u64) = out.entry((a.code, a.by.clone())).or_default();
        e.0 += a.count;
        e.1 += a.with_retry_after;
    }
    out
}

fn count(summary: &demo::Summary, source: &str, code: u16) -> u64 {
    summary
        .answers
        .iter()
        .filter(|a| a.source == source && a.code == code)
        .map(|a| a.count)
        .sum()
}

fn admitted_share(summary: &demo::Summary, source: &str) -> f64 {
    let all: u64 = summary
        .answers
        .iter()
        .filter(|a| a.source == source)
        .map(|a| a.count)
        .sum();
    count(summary, source, 200) as f64 / all.max(1) as f64
}

/// Waits until nothing listens on any of the parts' addresses any more and
/// k6 has gone.
async fn assert_all_stopped(started: &demo::Started) {
    let addrs: [(&str, SocketAddr); 11] = [
        ("upstream", started.upstream),
        ("envoy", started.envoy),
        ("envoy b", started.envoy_b),
        ("sluice b", started.sluice_b),
        ("redis", started.redis),
        ("envoy admin", started.envoy_admin),
        ("sluice", started.sluice),
        ("sluice admin", started.sluice_admin),
        ("controller", started.controller),
        ("controller admin", started.controller_admin),
        ("prometheus", started.prometheus),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for (name, addr) in addrs {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} still listens on {addr} after the demo returned"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let k6 = started.k6_pid.expect("k6 had a pid");
    assert!(
        !PathBuf::from(format!("/proc/{k6}")).exists(),
        "k6 (pid {k6}) still runs after the demo returned"
    );
}

/// The picture has its three panels, with titled axes, and the JSON every
/// second of the run.
fn assert_written(summary: &demo::Summary) {
    let svg = std::fs::read_to_string(&summary.svg)
        .unwrap_or_else(|e| panic!("{}: {e}", summary.svg.display()));
    for panel in [
        "(a) Upstream latency",
        "(b) Load multiplier",
        "(c) Share admitted per workload",
    ] {
        assert!(
            svg.contains(panel),
            "no panel {panel:?} in {}",
            summary.svg.display()
        );
    }
    assert_eq!(
        svg.matches("seconds since the traffic started").count(),
        3,
        "each panel's time axis is titled"
    );
    for text in [
        "latency (ms)",
        "multiplier",
        "% admitted",
        "subscribers (priority 200)",
        "crowd",
    ] {
        assert!(svg.contains(text), "no {text:?} in the picture");
    }
    assert!(svg.matches("<polyline").count() >= 4, "no lines drawn");

    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&summary.json).unwrap_or_else(|e| panic!("{}: {e}", summary.json.display())),
    )
    .expect("demo.json is JSON");
    let seconds = json["seconds"].as_array().expect("seconds");
    assert_eq!(seconds.len(), summary.seconds.len());
    assert!(seconds.iter().enumerate().all(|(i, s)| s["t"] == i as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_demo_shows_the_whole_loop() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (seconds, _) = tokio::sync::watch::channel(0);
    let summary = demo::run(args("30s", "short"), std::future::pending(), seconds)
        .await
        .expect("the demo runs (Envoy, Prometheus and k6 come from scripts/bootstrap.sh)");
    let shown = serde_json::to_string_pretty(&summary.answers).expect("json");

    assert!(!summary.interrupted);
    assert_eq!(summary.seconds.len(), 30, "one record per second");
    // The preview of the first Checks: each with its labels and the
    // components the demo policy's selectors matched.
    let preview = summary.preview.as_ref().expect("a preview was shown");
    let samples = preview["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 4, "{preview:#}");
    for s in samples {
        assert_eq!(s["control_point"], "ingress", "{s:#}");
        assert!(
            s["request"]
                .as_array()
                .is_some_and(|r| r.iter().any(|l| l["name"] == "http.request.header.user_id")),
            "{s:#}"
        );
        assert!(
            s["matched"].as_array().is_some_and(|m| !m.is_empty()),
            "{s:#}"
        );
    }
    let (start, end) = (summary.phases.crowd_start, summary.phases.crowd_end);
    assert_eq!((start, end), (8, 22));

    // Both accepted and rejected requests. The thresholds here are about
    // what happened, not how much: k6's volume depends on the machine.
    let accepted: u64 = demo::SOURCES
        .iter()
        .map(|s| count(&summary, s.name, 200))
        .sum();
    let rejected: u64 = summary
        .answers
        .iter()
        .filter(|a| a.code != 200)
        .map(|a| a.count)
        .sum();
    assert!(
        accepted > 0 && rejected > 0,
        "accepted {accepted}, rejected {rejected}:\n{shown}"
    );
    let unanswered: u64 = summary
        .answers
        .iter()
        .filter(|a| a.code == 0)
        .map(|a| a.count)
        .sum();
    assert!(
        unanswered * 10 < accepted + rejected,
        "{unanswered} requests without an answer:\n{shown}"
    );

    // Alice: the per-user rate limiter's 429, each with retry-after.
    let alice = answers(&summary, "alice");
    let (limited, with_retry_after) = alice
        .get(&(429, "demo/per-user".to_owned()))
        .copied()
        .unwrap_or_else(|| panic!("no 429 from demo/per-user for alice:\n{shown}"));
    assert!(limited > 0, "alice never limited:\n{shown}");
    assert_eq!(
        with_retry_after, limited,
        "a 429 without retry-after:\n{shown}"
    );
    assert!(
        count(&summary, "alice", 200) > 0,
        "alice never got through:\n{shown}"
    );

    // Erin, through both Envoy and Sluice pairs: one global bucket (5, then
    // 1/s) for both. 2/s through each for 30 s (and k6's graceful stop):
    // per-sidecar buckets would let about 70 through, the shared one at
    // most 5 + 33.
    let through = |via: &str| summary.erin_admitted.get(via).copied().unwrap_or(0);
    let (a, b) = (through("a"), through("b"));
    assert!(
        a > 0 && b > 0,
        "erin admitted {a} via A, {b} via B:\n{shown}"
    );
    assert!(
        a + b <= 5 + 33,
        "erin admitted {a} + {b}: her limit did not hold across both sidecars:\n{shown}"
    );
    for via in ["erin-a", "erin-b"] {
        assert!(
            answers(&summary, via).contains_key(&(429, "demo/per-user".to_owned())),
            "{via} never limited:\n{shown}"
        );
    }

    // Dave: the closed beta, the sampler's 403 and nothing else.
    let dave = answers(&summary, "dave");
    assert!(
        dave.keys()
            .all(|k| *k == (403, "demo/beta-rollout".to_owned()))
            && !dave.is_empty(),
        "dave: {dave:?}"
    );

    // The crowd: the controller lowers the multiplier and the load
    // scheduler turns requests away with 503, guests more than
    // subscribers.
    let lowest = summary.lowest_lm.expect("the multiplier was read");
    assert!(
        lowest < 1.0,
        "the controller never throttled (lowest lm {lowest:.2})"
    );
    let throttled = summary
        .seconds
        .iter()
        .find(|s| s.lm.is_some_and(|lm| lm < 1.0))
        .map(|s| s.t)
        .expect("a second with lm < 1");
    assert!(
        throttled >= start,
        "first throttled at t={throttled}s, before the crowd came at {start}s"
    );
    let guests = answers(&summary, "guests");
    let turned_away = guests
        .get(&(503, "demo/service".to_owned()))
        .map_or(0, |c| c.0);
    assert!(
        turned_away > 0,
        "guests got no 503 from demo/service:\n{shown}"
    );
    assert!(
        count(&summary, "subscribers", 503) > 0,
        "subscribers were never turned away:\n{shown}"
    );
    let (subscribers, guests) = (
        admitted_share(&summary, "subscribers"),
        admitted_share(&summary, "guests"),
    );
    assert!(
        subscribers > guests,
        "admitted: subscribers {subscribers:.2}, guests {guests:.2}"
    );
    // The run is scored as the overload bench scores one: against the
    // setpoint the controller held, with the crowd as the overload.
    let objective = summary.objective_ms.expect("a setpoint during the crowd");
    assert!(objective > 0.0, "objective {objective}");
    let goodput = summary.figures.goodput.expect("goodput during the crowd");
    assert!(
        goodput > 0.0,
        "nothing served within {objective:.0} ms: {:?}",
        summary.figures
    );
    // Nothing was turned away by the load scheduler before the crowd came.
    let early_503 = summary
        .seconds
        .iter()
        .filter(|s| s.t < start)
        .find(|s| s.answers.values().any(|by_code| by_code.contains_key(&503)));
    assert!(early_503.is_none(), "503s in the calm phase: {early_503:?}");

    // Prometheus received Sluice's decisions by remote-write.
    let decisions = |kind: &str| {
        summary
            .prometheus
            .iter()
            .find(|r| {
                r.what == "decisions"
                    && r.labels.get("decision_type").map(String::as_str) == Some(kind)
            })
            .map_or(0.0, |r| r.value)
    };
    assert!(
        decisions("accepted") > 0.0 && decisions("rejected") > 0.0,
        "Prometheus: {:?}",
        summary.prometheus
    );

    assert_written(&summary);
    assert_all_stopped(&summary.started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_early_it_writes_what_it_has_and_stops_everything() {
    let _one = ONE_AT_A_TIME.lock().await;
    // As Ctrl-C would, three seconds into the traffic.
    let (seconds, mut recorded) = tokio::sync::watch::channel(0);
    let stop = async move {
        let _ = recorded.wait_for(|&n| n >= 3).await;
    };
    let summary = demo::run(args("30s", "interrupted"), stop, seconds)
        .await
        .expect("the demo runs (Envoy, Prometheus and k6 come from scripts/bootstrap.sh)");
    assert!(summary.interrupted);
    let ran = summary.seconds.len();
    assert!((1..30).contains(&ran), "{ran} seconds recorded");
    assert!(
        count(&summary, "alice", 200) + count(&summary, "alice", 429) > 0,
        "no answers kept: {:?}",
        summary.answers
    );
    assert_written(&summary);
    let svg = std::fs::read_to_string(&summary.svg).expect("svg");
    assert!(
        svg.contains("interrupted after"),
        "the picture says it was cut short"
    );
    assert_all_stopped(&summary.started).await;
}
