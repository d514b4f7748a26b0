//! Fuzzing on the stable toolchain: property tests (proptest) that feed
//! mutated and random input to every decoder of untrusted input and check
//! that nothing panics and nothing out of bounds gets through.
//!
//! Targets: the Check decoder and label view (with the engine deciding on
//! it), OTLP decoding and the flow end, `sluice.flow` parsing, the policy
//! loader, and the validation of controller decisions. Inputs are seeds
//! (the shipped example policies, requests as Envoy builds them, signed
//! flows) mutated by byte flips, insertions and truncations, plus plain
//! random bytes.
//!
//! `make test` runs a bounded number of cases per target (tens of seconds
//! for all on two cores in a debug build); `make fuzz` runs many more:
//! `SLUICE_FUZZ_CASES=100000 cargo test --release --test fuzz`. A failure
//! is kept in `tests/fuzz.proptest-regressions` and replayed first from
//! then on: commit it with the fix.

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use prost::Message as _;
use sluice::envoy::AuthzService;
use sluice::envoy::wire;
use sluice::otlp::AccessLogs;
use sluice_engine::control::{Action, Applied, ControlDecision};
use sluice_engine::flow_end::metadata::{FlowKey, FlowMeta};
use sluice_engine::{Engine, EngineOptions, Metrics};
use sluice_policy::load::{parse_policy, parse_sources};
use sluice_proto::bounded;
use sluice_testkit::access_log;
use sluice_time::Clock;

/// Cases per target: `SLUICE_FUZZ_CASES`, else 20,000. Failures are
/// kept beside this file.
fn config() -> Config {
    let cases = std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

fn example(name: &str) -> String {
    std::fs::read_to_string(sluice_testkit::repo_root().join("examples").join(name))
        .expect("example")
}

/// The shipped examples that need no store: every kind of component and
/// classifier, JSON bodies and JWTs included.
fn example_policies() -> Vec<(PathBuf, String)> {
    ["api-keys.yaml", "bench.yaml", "jwt-and-body.yaml"]
        .iter()
        .map(|n| (PathBuf::from(n), example(n)))
        .collect()
}

/// An engine with the example policies, and the services in front of it.
struct Sidecar {
    engine: Arc<Engine>,
    authz: AuthzService,
    logs: AccessLogs,
    runtime: tokio::runtime::Runtime,
}

static SIDECAR: LazyLock<Sidecar> = LazyLock::new(|| {
    let engine = Arc::new(Engine::new(
        Clock::new(),
        Metrics::new(),
        EngineOptions::default(),
    ));
    engine
        .install(&parse_sources(&example_policies()).expect("examples load"))
        .expect("examples install");
    Sidecar {
        authz: AuthzService::new(engine.clone(), "ingress", "any"),
        logs: AccessLogs::new(engine.clone()).expect("access logs"),
        engine,
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime"),
    }
});

/// `seeds` mutated: one of them, with bytes flipped, inserted and cut.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let seeds = Arc::new(seeds);
    let count = seeds.len();
    (
        0..count,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..8),
        prop::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(move |(seed, edits, cut)| {
            let mut bytes = seeds[seed].clone();
            for (at, byte, kind) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let at = at.index(bytes.len());
                match kind {
                    0 => bytes[at] ^= byte | 1,
                    1 => bytes.insert(at, byte),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            if let Some(cut) = cut
                && !bytes.is_empty()
            {
                bytes.truncate(cut.index(bytes.len()));
            }
            bytes
        })
}

/// Mutated seeds half the time, random bytes the other half.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![mutated(seeds), prop::collection::vec(any::<u8>(), 0..512),]
}

fn check_seeds() -> Vec<Vec<u8>> {
    let body = br#"{"tier":"gold","items":[1,2,3]}"#;
    let mut seeds: Vec<Vec<u8>> = [
        (
            "GET",
            "/api/items?page=2",
            vec![("user-id", "alice"), ("x-api-key", "k1")],
        ),
        (
            "POST",
            "/orders",
            vec![
                ("content-type", "application/json"),
                (
                    "authorization",
                    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJib2IifQ.",
                ),
            ],
        ),
        ("DELETE", "/", vec![]),
    ]
    .iter()
    .map(|(method, path, headers)| {
        let mut request = sluice_testkit::check::http(method, path, headers);
        if *method == "POST"
            && let Some(http) = request
                .attributes
                .as_mut()
                .and_then(|a| a.request.as_mut())
                .and_then(|r| r.http.as_mut())
        {
            http.body = bytes::Bytes::from_static(body);
        }
        request.encode_to_vec()
    })
    .collect();
    seeds.push(Vec::new());
    seeds
}

fn export_seeds(key: &FlowKey) -> Vec<Vec<u8>> {
    let mut extreme = access_log::accepted_flow(key, "bench/latency", 5);
    extreme.push(access_log::attribute("RESPONSE_DURATION", "1e308"));
    vec![
        access_log::export((0..3).map(|i| access_log::accepted_flow(key, "bench/latency", i)))
            .encode_to_vec(),
        access_log::export([extreme]).encode_to_vec(),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Whatever bytes arrive as a Check, decoding either fails cleanly or
    /// the engine decides on them and an answer is built.
    #[test]
    fn checks_decode_and_decide_without_panicking(bytes in input(check_seeds())) {
        if let Ok(request) = bounded::decode::<wire::CheckRequest>(bytes.into()) {
            let sidecar = &*SIDECAR;
            let response = sidecar.runtime.block_on(sidecar.authz.decide(
                None,
                &request,
                Some(Duration::from_millis(1)),
            ));
            prop_assert!(response.is_ok_and(|r| r.status.is_some()));
        }
    }

    /// Whatever bytes arrive as an Export, each record is counted once and
    /// no flux meter's sum stops being finite.
    #[test]
    fn exports_decode_and_end_flows_without_panicking(
        bytes in input(export_seeds(SIDECAR.engine.flow_key()))
    ) {
        if let Ok(request) = bounded::decode::<sluice::otlp::wire::ExportLogsServiceRequest>(bytes.into()) {
            let sidecar = &*SIDECAR;
            let records: usize = request
                .resource_logs
                .iter()
                .flat_map(|r| &r.scope_logs)
                .map(|s| s.log_records.len())
                .sum();
            let done = sidecar.runtime.block_on(sidecar.logs.export(&request));
            prop_assert_eq!(done.records(), records as u64);
            let text = sidecar.engine.metrics().encode_text();
            for line in text.lines().filter(|l| l.starts_with("flux_meter_sum")) {
                let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
                prop_assert!(value.is_finite(), "{}", line);
            }
        }
    }

    /// `sluice.flow` values: anything but this key's signature is refused,
    /// and nothing panics.
    #[test]
    fn flow_values_verify_or_are_refused(
        text in prop_oneof![
            mutated(vec![
                FlowKey::from_secret(b"fuzz key of sixteen bytes")
                    .sign("v=1;id=00000000000000ff;d=accepted;fm=a/b,c/d;ws=a/s:1")
                    .into_bytes(),
                b"v=1;id=1;d=rejected;by=p/c".to_vec(),
            ]),
            prop::collection::vec(any::<u8>(), 0..128),
        ]
    ) {
        let key = FlowKey::from_secret(b"fuzz key of sixteen bytes");
        let text = String::from_utf8_lossy(&text);
        if let Ok(meta) = FlowMeta::decode(&text, &key) {
            // Verified: then it is exactly what the key signed.
            let (signed, _) = text.trim().rsplit_once(";t=").expect("a tag");
            prop_assert_eq!(key.sign(signed), text.trim());
            let _ = (meta.flux_meters().count(), meta.workloads().count());
        }
    }

    /// Policy files: mutated examples and random text load or fail with
    /// an error, never a panic.
    #[test]
    fn policies_load_or_fail_cleanly(
        text in mutated(example_policies().into_iter().map(|(_, t)| t.into_bytes()).collect())
    ) {
        let text = String::from_utf8_lossy(&text);
        let _ = parse_policy(std::path::Path::new("fuzz.yaml"), &text);
    }

    /// Controller decisions: any numbers, every kind; what is applied is in
    /// range (and holds at most the sidecar's bound, which the engine's
    /// tests check), and what is out of range is refused as such.
    #[test]
    fn controller_decisions_are_applied_only_in_range(
        kind in 0u8..6,
        value in prop_oneof![any::<f64>(), -2.0f64..200.0],
        other in prop::option::of(any::<f64>()),
        valid_ms in 0u64..200_000,
    ) {
        let sidecar = &*SIDECAR;
        let plan = sidecar.engine.plan();
        let policy = plan.policies.iter().find(|p| &*p.name == "bench").expect("bench policy");
        let action = match kind {
            0 => Action::LoadMultiplier { component: "protect", value },
            1 => Action::AcceptPercentage { component: "most", value },
            2 => Action::RateLimit { component: "per-user", bucket_capacity: Some(value), fill_amount: other },
            3 => Action::MaxConcurrency { component: "none", value: value.abs() as u64 },
            4 => Action::QuotaBucket { component: "none", bucket_capacity: other, fill_amount: Some(value) },
            _ => Action::SchedulerConcurrency { component: "none", value: value.abs() as u64 },
        };
        let decision = ControlDecision {
            policy: "bench",
            policy_hash: policy.hash,
            valid_for: Duration::from_millis(valid_ms),
            action: action.clone(),
        };
        let applied = sidecar.engine.apply(&decision);
        if applied == Applied::Applied {
            prop_assert!(action.invalid().is_none(), "{:?}", action);
        }
        // Out of range is refused before the component is looked for:
        // whatever it names.
        if valid_ms > 0 && action.invalid().is_some() {
            prop_assert!(matches!(applied, Applied::Invalid(_)), "{:?}: {:?}", action, applied);
        }
    }
}
