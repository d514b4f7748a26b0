//! The access-log edge: OTLP logs, as Envoy's OpenTelemetry access logger
//! sends them (gRPC `LogsService/Export` on the Check listener), or as any
//! OTLP/HTTP exporter does (`POST /v1/logs`, protobuf, on the admin
//! listener).
//!
//! Each log record's attributes become a [`FlowEnd`] for
//! [`Engine::end_flow`]. Requests are decoded with Sluice's own
//! wire-compatible messages ([`wire`], `sluice_proto::otlp_logs`, from
//! `proto/sluice/otlp_logs.proto`):
//! strings as bytes, so one value that is not UTF-8 cannot make a whole
//! batch undecodable. Large batches yield to the runtime every
//! [`YIELD_EVERY`] records, so that ingesting telemetry never holds up the
//! Checks sharing the worker threads.

use std::borrow::Cow;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use prometheus::IntCounter;
use tonic::{Request, Response, Status};

use sluice_engine::flow_end::{AttrValue, ExtraAttributes, FlowEnd};
use sluice_engine::{EndOutcome, Engine};

pub use sluice_proto::otlp_logs as wire;

use wire::any_value::Value;
use wire::logs_service_server::{LogsService, LogsServiceServer};

/// Records processed between yields to the runtime.
pub const YIELD_EVERY: usize = 1024;

/// How one Export went: records by [`EndOutcome`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ingested([u64; EndOutcome::ALL.len()]);

impl Ingested {
    /// Records that ended as `outcome`.
    pub fn of(&self, outcome: EndOutcome) -> u64 {
        self.0[outcome as usize]
    }

    /// All records.
    pub fn records(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Turns OTLP log records into flow ends.
#[derive(Clone)]
pub struct AccessLogs {
    engine: Arc<Engine>,
    /// `flowcontrol_access_logs_total{result}`, indexed by [`EndOutcome`].
    counted: [IntCounter; EndOutcome::ALL.len()],
}

/// The attributes of one record, for flux meters observing an attribute
/// outside the contract.
struct RecordAttributes<'a>(&'a [wire::KeyValue]);

fn attr_value(value: Option<&wire::AnyValue>) -> Option<AttrValue<'_>> {
    Some(match value?.value.as_ref()? {
        Value::StringValue(b) | Value::BytesValue(b) => AttrValue::Text(String::from_utf8_lossy(b)),
        Value::BoolValue(b) => AttrValue::Bool(*b),
        Value::IntValue(i) => AttrValue::Int(*i),
        Value::DoubleValue(d) => AttrValue::Double(*d),
    })
}

impl ExtraAttributes for RecordAttributes<'_> {
    fn number(&self, key: &str) -> Option<f64> {
        let kv = self.0.iter().find(|kv| kv.key == key.as_bytes())?;
        attr_value(kv.value.as_ref())?.number()
    }
}

impl AccessLogs {
    /// Ends flows on `engine`, counting records in
    /// `flowcontrol_access_logs_total{result}` of the engine's registry, one
    /// series per [`EndOutcome`]. One per engine: a second would register
    /// the counter twice, which is an error.
    pub fn new(engine: Arc<Engine>) -> anyhow::Result<Self> {
        let family = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "flowcontrol_access_logs_total",
                "Access-log records, by what became of them (matched, without_flow, \
                 invalid, unsigned, duplicate).",
            ),
            &["result"],
        )?;
        engine
            .metrics()
            .registry()
            .register(Box::new(family.clone()))?;
        let counted = EndOutcome::ALL.map(|o| family.with_label_values(&[o.as_str()]));
        Ok(AccessLogs { engine, counted })
    }

    /// Ends one record's flow.
    pub fn record(&self, record: &wire::LogRecord) -> EndOutcome {
        let mut end = FlowEnd::default();
        for kv in &record.attributes {
            let Some(value) = attr_value(kv.value.as_ref()) else {
                continue;
            };
            let key: Cow<'_, str> = String::from_utf8_lossy(&kv.key);
            end.set(&key, value);
        }
        let outcome = self
            .engine
            .end_flow(&end, &RecordAttributes(&record.attributes));
        self.counted[outcome as usize].inc();
        outcome
    }

    /// Ends every record's flow, yielding to the runtime now and then.
    pub async fn export(&self, request: &wire::ExportLogsServiceRequest) -> Ingested {
        let mut done = Ingested::default();
        let records = request
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| &s.log_records);
        for (i, record) in records.enumerate() {
            if i > 0 && i % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            done.0[self.record(record) as usize] += 1;
        }
        done
    }

    /// The gRPC service, accepting requests up to `max_request_bytes`.
    pub fn into_server(self, max_request_bytes: usize) -> LogsServiceServer<Self> {
        LogsServiceServer::new(self).max_decoding_message_size(max_request_bytes)
    }
}

#[tonic::async_trait]
impl LogsService for AccessLogs {
    async fn export(
        &self,
        request: Request<wire::ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        AccessLogs::export(self, request.get_ref()).await;
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}
