//! The OTLP logs receiver: opentelemetry-proto's own client over gRPC, the
//! OTLP/HTTP endpoint, and garbage on both.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use prost::Message;
use sluice::server::Sidecar;
use sluice_testkit::access_log::{self, accepted_flow, attribute};
use sluice_testkit::http;

const POLICY: &str =
    "name: p\nflux_meters:\n  - name: latency\n    selectors: [{control_point: ingress}]\n";

fn attr(key: &str, value: &str) -> KeyValue {
    attribute(key, value)
}

/// `n` records of accepted flows of `sidecar` metered by p/latency, 200 in
/// 5 ms.
fn export(sidecar: &Sidecar, n: usize) -> ExportLogsServiceRequest {
    let key = sidecar.engine.flow_key();
    access_log::export((0..n).map(|_| {
        let mut attrs = accepted_flow(key, "p/latency", 5);
        attrs.push(attr("user_agent", "curl/8"));
        attrs
    }))
}

/// Accepted 200s the `latency` meter observed. Its histogram has a series
/// per decision and status only once it observed one, so before that the
/// count is 0, but only if the meter itself is there (its
/// `invalid_flux_meter_total` exists from the start): a renamed meter must
/// not read as "nothing observed".
fn count(text: &str) -> f64 {
    metric(
        text,
        r#"invalid_flux_meter_total{flux_meter_name="latency",policy_name="p"}"#,
    );
    sluice_testkit::scrape(
        text,
        r#"flux_meter_count{decision_type="accepted",flow_status="OK",flux_meter_name="latency",http_status_code="200",policy_name="p"}"#,
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_hundred_thousand_records_in_one_export_are_processed() {
    let policy = PolicyFile::new(POLICY);
    let sidecar = sidecar(&policy).await;
    let mut logs = LogsServiceClient::connect(format!("http://{}", sidecar.grpc_addr))
        .await
        .expect("connect")
        .max_encoding_message_size(64 << 20);
    // The whole contract per record makes 100k records larger than the
    // default --max-log-request-bytes (16 MiB): a clear error, nothing half
    // done.
    let too_big = export(&sidecar, 100_000);
    assert!(too_big.encoded_len() > 16 << 20);
    let err = logs.export(too_big).await.expect_err("over the limit");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    assert_eq!(count(&metrics_text(&sidecar).await), 0.0);
    // The same 100k flows with the attributes a flux meter needs fit, and
    // are all processed.
    let key = sidecar.engine.flow_key();
    let request = access_log::export((1..=100_000u64).map(|id| {
        vec![
            attr(
                "sluice.flow",
                &access_log::accepted_flow_meta(key, id, "p/latency"),
            ),
            attr("http.status_code", "200"),
            attr("RESPONSE_DURATION", "6"),
        ]
    }));
    assert!(request.encoded_len() < 16 << 20, "within the default limit");
    let response = logs.export(request).await.expect("export").into_inner();
    assert_eq!(response.partial_success, None);
    let text = metrics_text(&sidecar).await;
    assert_eq!(count(&text), 100_000.0);
    assert_eq!(
        metric(&text, r#"flowcontrol_access_logs_total{result="matched"}"#),
        100_000.0
    );
    // Checks go on being answered.
    let mut checks = client(&sidecar).await;
    let resp = checks
        .check(check_request("GET", "/", &[]))
        .await
        .expect("check")
        .into_inner();
    assert_eq!(http_status(&resp), 200);
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn garbage_over_grpc_gets_an_error_and_odd_records_are_counted() {
    let policy = PolicyFile::new(POLICY);
    let sidecar = sidecar(&policy).await;
    const EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
    let err = raw_unary::<ExportLogsServiceResponse>(
        sidecar.grpc_addr,
        EXPORT,
        Bytes::from_static(b"\xff\xff\xff\x0fnot protobuf"),
    )
    .await
    .expect_err("malformed");
    assert_ne!(err.code(), tonic::Code::Ok);

    // Records without sluice.flow, with a broken or forged one, replayed,
    // with values that are not UTF-8, not numbers or out of bounds:
    // processed and counted, nothing lost, nothing observed that should not
    // be.
    let key = sidecar.engine.flow_key();
    let mut odd = export(&sidecar, 1);
    let records = &mut odd.resource_logs[0].scope_logs[0].log_records;
    let replayed = records[0].clone();
    records.push(LogRecord {
        attributes: vec![attr("http.status_code", "200")],
        ..Default::default()
    });
    records.push(LogRecord {
        attributes: vec![attr("sluice.flow", "-")],
        ..Default::default()
    });
    records.push(LogRecord {
        attributes: vec![attr("sluice.flow", "v=2;nonsense")],
        ..Default::default()
    });
    records.push(LogRecord {
        attributes: vec![
            attr(
                "sluice.flow",
                &access_log::accepted_flow_meta(sidecar.engine.flow_key(), 1, "p/latency"),
            ),
            attr("RESPONSE_DURATION", "soon"),
        ],
        ..Default::default()
    });
    let forged = access_log::accepted_flow_meta(key, 2, "p/latency").replace(";t=", ";t=0");
    records.push(LogRecord {
        attributes: vec![
            attr("sluice.flow", &forged[..forged.len() - 1]),
            attr("RESPONSE_DURATION", "2000"),
        ],
        ..Default::default()
    });
    records.push(replayed);
    records.push(LogRecord {
        attributes: vec![
            attr(
                "sluice.flow",
                &access_log::accepted_flow_meta(key, 3, "p/latency"),
            ),
            attr("http.status_code", "200"),
            attr("RESPONSE_DURATION", "1e308"),
            attr("authz_duration", "-1e308"),
        ],
        ..Default::default()
    });
    let mut bytes = odd.encode_to_vec();
    // Make the first record's user_agent value invalid UTF-8 in place.
    let at = bytes
        .windows(6)
        .position(|w| w == b"curl/8")
        .expect("value in encoding");
    bytes[at] = 0xff;
    raw_unary::<ExportLogsServiceResponse>(sidecar.grpc_addr, EXPORT, Bytes::from(bytes))
        .await
        .expect("accepted");
    let text = metrics_text(&sidecar).await;
    assert_eq!(
        metric(&text, r#"flowcontrol_access_logs_total{result="matched"}"#),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"flowcontrol_access_logs_total{result="without_flow"}"#
        ),
        2.0
    );
    for (result, records) in [("invalid", 1.0), ("unsigned", 2.0), ("duplicate", 1.0)] {
        assert_eq!(
            metric(
                &text,
                &format!(r#"flowcontrol_access_logs_total{{result="{result}"}}"#)
            ),
            records,
            "{result}"
        );
    }
    assert_eq!(count(&text), 1.0);
    let sum = metric(
        &text,
        r#"flux_meter_sum{decision_type="accepted",flow_status="OK",flux_meter_name="latency",http_status_code="200",policy_name="p"}"#,
    );
    assert_eq!(sum, 5.0, "only the first record's 6 ms less 1 ms in authz");
    assert_eq!(
        metric(
            &text,
            r#"invalid_flux_meter_total{flux_meter_name="latency",policy_name="p"}"#
        ),
        1.0
    );
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn otlp_http_accepts_protobuf_and_refuses_the_rest_clearly() {
    let policy = PolicyFile::new(POLICY);
    let sidecar = sidecar(&policy).await;
    let post = |content_type: &'static str, encoding: &'static str, body: Vec<u8>| {
        let addr = sidecar.admin_addr;
        async move {
            let mut headers = vec![("content-type", content_type)];
            if !encoding.is_empty() {
                headers.push(("content-encoding", encoding));
            }
            http::request(
                addr,
                "POST",
                "/v1/logs",
                &headers,
                &body,
                Duration::from_secs(10),
            )
            .await
            .expect("post")
        }
    };
    let ok = post(
        "application/x-protobuf",
        "",
        export(&sidecar, 10).encode_to_vec(),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.header("content-type"), Some("application/x-protobuf"));
    ExportLogsServiceResponse::decode(ok.body.clone()).expect("protobuf response");
    assert_eq!(count(&metrics_text(&sidecar).await), 10.0);

    let garbage = post("application/x-protobuf", "", b"\xff\xff\xff\x0f".to_vec()).await;
    assert_eq!(garbage.status, 400);
    assert!(
        garbage
            .text()
            .contains("not an OTLP ExportLogsServiceRequest"),
        "{}",
        garbage.text()
    );
    let json = post("application/json", "", b"{}".to_vec()).await;
    assert_eq!(json.status, 415);
    let gzip = post("application/x-protobuf", "gzip", vec![0x1f, 0x8b]).await;
    assert_eq!(gzip.status, 415);
    let get = http::get(sidecar.admin_addr, "/v1/logs", &[])
        .await
        .expect("get");
    assert_eq!(get.status, 405);
    assert_eq!(count(&metrics_text(&sidecar).await), 10.0);
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn otlp_http_can_be_turned_off() {
    let policy = PolicyFile::new(POLICY);
    let sidecar = sluice::server::Sidecar::start(&sluice::server::Config {
        policy: Some(policy.path.clone()),
        otlp_http: false,
        ..sluice::server::Config::ephemeral()
    })
    .await
    .expect("sidecar");
    let reply = http::request(
        sidecar.admin_addr,
        "POST",
        "/v1/logs",
        &[("content-type", "application/x-protobuf")],
        &export(&sidecar, 3).encode_to_vec(),
        Duration::from_secs(5),
    )
    .await
    .expect("post");
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert!(reply.text().contains("--otlp-http=false"));
    assert_eq!(count(&metrics_text(&sidecar).await), 0.0);
    sidecar.stop(Duration::from_secs(2)).await;
}
