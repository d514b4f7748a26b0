//! OTLP access-log Exports as Envoy's OpenTelemetry access logger builds
//! them (every attribute a string), for tests, benchmarks and load tools.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use sluice_engine::flow_end::ended;
use sluice_engine::flow_end::metadata::{self, FlowKey};

/// A string attribute.
pub fn attribute(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// One Export holding one record per item of `records`.
pub fn export(records: impl IntoIterator<Item = Vec<KeyValue>>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: records
                    .into_iter()
                    .map(|attributes| LogRecord {
                        attributes,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// The `sluice.flow` of flow `id`, accepted and observed by flux meter
/// `meter` (`policy/name`), signed with `key`: the sidecar's
/// (`Engine::flow_key`), or `FlowKey::from_secret` of its `--flow-key-file`.
pub fn accepted_flow_meta(key: &FlowKey, id: u64, meter: &str) -> String {
    let mut flow = String::new();
    metadata::encode(&mut flow, key, id, true, None, [meter], []);
    flow
}

/// The access log of an accepted flow with a random id, observed by flux
/// meter `meter` (`policy/name`) and signed with `key`: 200, `workload_ms`
/// of upstream time, the whole contract.
pub fn accepted_flow(key: &FlowKey, meter: &str, workload_ms: u64) -> Vec<KeyValue> {
    flow_record(key, fastrand::u64(1..), meter, workload_ms)
}

fn flow_record(key: &FlowKey, id: u64, meter: &str, workload_ms: u64) -> Vec<KeyValue> {
    vec![
        attribute("sluice.flow", accepted_flow_meta(key, id, meter)),
        attribute("http.status_code", "200"),
        attribute("authz_duration", "1"),
        attribute("DURATION", (workload_ms + 2).to_string()),
        attribute("REQUEST_DURATION", "0"),
        attribute("REQUEST_TX_DURATION", "1"),
        attribute("RESPONSE_DURATION", (workload_ms + 1).to_string()),
        attribute("RESPONSE_TX_DURATION", "0"),
        attribute("BYTES_RECEIVED", "0"),
        attribute("BYTES_SENT", "367"),
    ]
}

/// Exports of `per_export` accepted flows' logs (flux meter `meter`,
/// upstream time from 3 to 62 ms) that can be sent round and round, as
/// benchmarks and load tests do, without the sidecar taking the second
/// round for replays.
///
/// A sidecar ignores a log whose flow ended lately (it remembers the last
/// flow per slot of its [`ended`] table). So the ring holds two flows per
/// slot, in slot order: by the time a flow comes round again, the other
/// flow of its slot has pushed it out. That is 2 x `ended::SLOTS` records,
/// a few tens of megabytes once encoded.
pub fn ring(key: &FlowKey, meter: &str, per_export: usize) -> Vec<ExportLogsServiceRequest> {
    let per_export = per_export.max(1);
    let records = 2 * ended::SLOTS;
    (0..records.div_ceil(per_export))
        .map(|e| {
            export(
                (e * per_export..((e + 1) * per_export).min(records)).map(|i| {
                    // High bits random and non-zero, low bits the slot.
                    let id = (fastrand::u64(..) | 1 << 63) & !(ended::SLOTS as u64 - 1)
                        | (i % ended::SLOTS) as u64;
                    flow_record(key, id, meter, 3 + (i as u64 * 7) % 60)
                }),
            )
        })
        .collect()
}
