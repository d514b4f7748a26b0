//! OTLP access-log Exports as Envoy's OpenTelemetry access logger builds
//! them (every attribute a string), for tests, benchmarks and load tools.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};

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

/// The access log of an accepted flow observed by flux meter `meter`
/// (`policy/name`): 200, `workload_ms` of upstream time, the whole contract.
pub fn accepted_flow(meter: &str, workload_ms: u64) -> Vec<KeyValue> {
    vec![
        attribute(
            "sluice.flow",
            format!("v=1;id={:016x};d=accepted;fm={meter}", fastrand::u64(..)),
        ),
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
