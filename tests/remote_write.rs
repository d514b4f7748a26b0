//! The remote-write sender against a receiver that records what it gets and
//! answers what the test tells it: headers, snappy protobuf body, bearer
//! token, retries on 5xx/429, no retries on other 4xx, and HTTPS.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use prost::Message;
use sluice::server::{Config, Sidecar};
use sluice::telemetry::remote_write::{RemoteWriteConfig, wire};

/// What the receiver saw.
#[derive(Default)]
struct Receiver {
    /// Statuses to answer, in order; 204 once empty.
    answers: Mutex<VecDeque<u16>>,
    /// Requests received: headers and decoded body.
    seen: Mutex<Vec<(http::HeaderMap, wire::WriteRequest)>>,
}

async fn handle(
    receiver: Arc<Receiver>,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let decoded = snap::raw::Decoder::new()
        .decompress_vec(&body)
        .ok()
        .and_then(|raw| wire::WriteRequest::decode(&raw[..]).ok())
        .unwrap_or_default();
    receiver.seen.lock().push((headers, decoded));
    let status = receiver.answers.lock().pop_front().unwrap_or(204);
    http::Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(b"")))
        .unwrap_or_default()
}

/// Serves `receiver` on loopback, over TLS when `tls` is given.
async fn serve(receiver: Arc<Receiver>, tls: Option<tokio_rustls::TlsAcceptor>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let receiver = receiver.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let receiver = receiver.clone();
                    async move { Ok::<_, Infallible>(handle(receiver, req).await) }
                });
                match tls {
                    None => {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn config(url: &str) -> RemoteWriteConfig {
    RemoteWriteConfig {
        url: url.parse().expect("url"),
        interval: Duration::from_millis(200),
        external_labels: vec![("cluster".to_owned(), "c1".to_owned())],
        bearer_token: None,
        ca_file: None,
        max_queued_batches: 10,
        timeout: Duration::from_secs(2),
    }
}

async fn sidecar_writing_to(remote: RemoteWriteConfig) -> Sidecar {
    Sidecar::start(&Config {
        remote_write: Some(remote),
        ..Config::ephemeral()
    })
    .await
    .expect("sidecar")
}

fn label<'a>(series: &'a wire::TimeSeries, name: &str) -> Option<&'a str> {
    series
        .labels
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.value.as_str())
}

#[tokio::test]
async fn retries_server_errors_with_the_same_batch_and_sends_what_prometheus_expects() {
    let receiver = Arc::new(Receiver::default());
    receiver.answers.lock().extend([503, 429]);
    let addr = serve(receiver.clone(), None).await;
    let mut remote = config(&format!("http://{addr}/api/v1/write"));
    remote.bearer_token = Some("t0k3n".to_owned());
    let sidecar = sidecar_writing_to(remote).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            receiver.seen.lock().len() >= 3
        })
        .await
    );

    {
        let seen = receiver.seen.lock();
        let stamp = |i: usize| seen[i].1.timeseries.first().map(|t| t.samples[0].timestamp);
        assert!(stamp(0).is_some(), "a decodable snappy WriteRequest");
        assert_eq!(
            stamp(0),
            stamp(1),
            "the batch refused with 503 is sent again"
        );
        assert_eq!(stamp(1), stamp(2), "and again after 429");
        let (headers, body) = &seen[0];
        assert_eq!(headers["authorization"], "Bearer t0k3n");
        assert_eq!(headers["content-encoding"], "snappy");
        assert_eq!(headers["content-type"], "application/x-protobuf");
        assert_eq!(headers["x-prometheus-remote-write-version"], "0.1.0");
        let requests = body
            .timeseries
            .iter()
            .find(|t| label(t, "__name__") == Some("flowcontrol_requests_total"))
            .expect("the sidecar's own counters are written");
        assert_eq!(label(requests, "cluster"), Some("c1"));
        let instance = label(requests, "instance").expect("a default instance label");
        assert!(
            instance.ends_with(&format!(":{}", sidecar.admin_addr.port())),
            "{instance}"
        );
        for t in &body.timeseries {
            let names: Vec<&str> = t.labels.iter().map(|l| l.name.as_str()).collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted, "labels sorted by name");
        }
    }
    let text = metrics_text(&sidecar).await;
    assert_eq!(metric(&text, "remote_write_failures_total"), 2.0);
    assert_eq!(metric(&text, "remote_write_dropped_samples_total"), 0.0);
    assert!(metric(&text, "remote_write_samples_total") > 0.0);
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn other_client_errors_drop_the_batch_without_retrying() {
    let receiver = Arc::new(Receiver::default());
    receiver.answers.lock().extend([400, 400, 400]);
    let addr = serve(receiver.clone(), None).await;
    let sidecar = sidecar_writing_to(config(&format!("http://{addr}/api/v1/write"))).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            receiver.seen.lock().len() >= 4
        })
        .await
    );
    let stamps: Vec<i64> = receiver.seen.lock()[..4]
        .iter()
        .map(|(_, b)| b.timeseries[0].samples[0].timestamp)
        .collect();
    let mut distinct = stamps.clone();
    distinct.dedup();
    assert_eq!(stamps, distinct, "each request is a new batch: {stamps:?}");
    let text = metrics_text(&sidecar).await;
    assert_eq!(metric(&text, "remote_write_failures_total"), 3.0);
    assert!(metric(&text, "remote_write_dropped_samples_total") > 0.0);
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn writes_over_https_with_a_private_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let dir = tempfile::tempdir().expect("dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).expect("write ca");
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("tls config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let receiver = Arc::new(Receiver::default());
    let addr = serve(receiver.clone(), Some(acceptor)).await;

    let mut remote = config(&format!("https://localhost:{}/api/v1/write", addr.port()));
    remote.ca_file = Some(ca);
    let sidecar = sidecar_writing_to(remote).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            !receiver.seen.lock().is_empty()
        })
        .await
    );
    assert!(!receiver.seen.lock()[0].1.timeseries.is_empty());
    assert_eq!(
        metric(&metrics_text(&sidecar).await, "remote_write_failures_total"),
        0.0
    );
    sidecar.stop(Duration::from_secs(2)).await;

    // Without the CA the certificate is not trusted: failures, no data.
    let receiver = Arc::new(Receiver::default());
    let cert2 =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let key2 = rustls_pki_types::PrivateKeyDer::Pkcs8(cert2.signing_key.serialize_der().into());
    let server2 = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert2.cert.der().clone()], key2)
        .expect("tls config");
    let addr = serve(
        receiver.clone(),
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(server2))),
    )
    .await;
    let sidecar = sidecar_writing_to(config(&format!(
        "https://localhost:{}/api/v1/write",
        addr.port()
    )))
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(&metrics_text(&sidecar).await, "remote_write_failures_total") > 0.0
        })
        .await
    );
    assert!(receiver.seen.lock().is_empty());
    sidecar.stop(Duration::from_secs(2)).await;
}
