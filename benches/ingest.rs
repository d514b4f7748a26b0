//! Access-log ingest: decode an OTLP Export of 1,000 records (as Envoy
//! sends them, the full attribute contract) and end every flow: parse the
//! attributes, find the flux meter, observe the histogram, look the flow up
//! in the in-flight table. The Exports come round from a ring whose flows
//! the sidecar does not take for replays (`access_log::ring`), so every
//! record takes the whole path.
//!
//! `cargo bench --bench ingest`; criterion reports records per second (one
//! core: the benchmark is single-threaded).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use sluice::otlp::{AccessLogs, wire};
use sluice_engine::Metrics;
use sluice_engine::flow_end::metadata::FlowKey;
use sluice_engine::{Engine, EngineOptions};
use sluice_policy::load::parse_sources;
use sluice_testkit::access_log;
use sluice_time::Clock;

const RECORDS: usize = 1_000;

/// Exports of `RECORDS` accepted flows' logs signed with `key`, encoded.
fn exports(key: &FlowKey) -> Vec<Bytes> {
    access_log::ring(key, "bench/latency", RECORDS)
        .iter()
        .map(|request| Bytes::from(request.encode_to_vec()))
        .collect()
}

fn ingest(c: &mut Criterion) {
    let engine = Engine::new(Clock::new(), Metrics::new(), EngineOptions::default());
    let policy =
        "name: bench\nflux_meters:\n  - name: latency\n    selectors: [{control_point: ingress}]\n";
    let sources = vec![(PathBuf::from("bench.yaml"), policy.to_owned())];
    engine
        .install(&parse_sources(&sources).expect("valid policy"))
        .expect("installs");
    let bodies = exports(engine.flow_key());
    let logs = AccessLogs::new(Arc::new(engine)).expect("one access-log edge per engine");
    let mut next = bodies.iter().cycle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function("decode_and_end_1000_records", |b| {
        b.iter(|| {
            let body = next.next().expect("a ring never ends").clone();
            let request = wire::ExportLogsServiceRequest::decode(body).expect("decodes");
            black_box(runtime.block_on(logs.export(&request)))
        })
    });
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
