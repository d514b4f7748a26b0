//! Clients that try to stall or bloat the sidecar, against the binary:
//! messages that are never finished, foreign content types, and more
//! connections than it keeps. Each leaves the memory bounded and normal
//! Checks answered (docs/security.md lists the bounds and their flags).
//!
//! Every bound here bounds a failing test; none is a claim about speed.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

type Chunks = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// An HTTP/2 connection to `addr`, driven in the background.
async fn h2(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<
    StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>,
> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// Starts a gRPC request to `path` with `content_type`; its body is what
/// is sent on the returned sender, and ends only when the sender is
/// dropped. The answer arrives on the returned task.
async fn open_request(
    addr: std::net::SocketAddr,
    path: &str,
    content_type: &str,
) -> (
    Chunks,
    tokio::task::JoinHandle<Option<(u16, Option<String>)>>,
) {
    let mut send = h2(addr).await;
    let (chunks, rx) = mpsc::channel(4);
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .expect("request");
    let answer = tokio::spawn(async move {
        let response = send.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let headers_status = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let collected = response.into_body().collect().await.ok();
        let trailer_status = collected.and_then(|c| c.trailers().cloned()).and_then(|t| {
            t.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        Some((status, headers_status.or(trailer_status)))
    });
    (chunks, answer)
}

fn resident_bytes(server: &Server) -> u64 {
    let pid = server.process.id().expect("pid") as i32;
    procfs::process::Process::new(pid)
        .and_then(|p| p.status())
        .ok()
        .and_then(|s| s.vmrss)
        .map_or(0, |kib| kib * 1024)
}

async fn a_check_is_answered(sidecar: &Server) -> bool {
    check_status(sidecar.grpc).await == Some(200)
}

const OPEN: &str = "name: open\nsamplers:\n  - name: door\n    selectors: [{control_point: ingress}]\n    accept_percentage: 100\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_never_finish_stay_within_the_budget_and_are_cut_off() {
    let policy = PolicyFile::new(OPEN);
    let sidecar = sluice(&policy.path, &["--request-timeout", "4s"]).await;
    let idle_rss = resident_bytes(&sidecar);

    // Forty Exports that each announce 16 MB, send 15 MB and stall.
    const MB: usize = 1 << 20;
    let mut stalled = Vec::new();
    for _ in 0..40 {
        let (chunks, answer) = open_request(sidecar.grpc, EXPORT, "application/grpc").await;
        let sender = tokio::spawn(async move {
            let mut prefix = vec![0u8];
            prefix.extend_from_slice(&(16 * MB as u32 - 1).to_be_bytes());
            if chunks
                .send(Ok(Frame::data(Bytes::from(prefix))))
                .await
                .is_err()
            {
                return chunks;
            }
            let megabyte = Bytes::from(vec![0x0a; MB]);
            for _ in 0..15 {
                if chunks
                    .send(Ok(Frame::data(megabyte.clone())))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            chunks // held: the message never ends
        });
        stalled.push((sender, answer));
    }
    // While they stall, Checks are answered and memory stays near the
    // budget (64 MiB by default), not 40 x 15 MB.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        a_check_is_answered(&sidecar).await,
        "a Check during the stall"
    );
    let stalled_rss = resident_bytes(&sidecar);
    assert!(
        stalled_rss < idle_rss + 200 * MB as u64,
        "RSS {} MB with forty stalled messages (idle {} MB)",
        stalled_rss >> 20,
        idle_rss >> 20
    );
    // Every stalled request is answered: refused for the budget, or cut
    // off by the request timeout.
    let mut refused = 0;
    for (sender, answer) in stalled {
        let answer = tokio::time::timeout(Duration::from_secs(15), answer)
            .await
            .expect("answered within the request timeout")
            .expect("task");
        let (_, grpc_status) = answer.expect("an answer");
        match grpc_status.as_deref() {
            Some("8") => refused += 1,  // RESOURCE_EXHAUSTED
            Some("4") | Some("1") => {} // DEADLINE_EXCEEDED / CANCELLED: cut off
            other => panic!("unexpected gRPC status {other:?}"),
        }
        sender.abort();
    }
    assert!(refused >= 30, "{refused} of 40 refused for the budget");
    assert!(a_check_is_answered(&sidecar).await, "a Check after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_content_type_is_refused() {
    let policy = PolicyFile::new(OPEN);
    let sidecar = sluice(&policy.path, &[]).await;
    for content_type in ["application/json", "text/plain", ""] {
        let (chunks, answer) = open_request(
            sidecar.grpc,
            "/envoy.service.auth.v3.Authorization/Check",
            content_type,
        )
        .await;
        drop(chunks);
        let (status, _) = answer.await.expect("task").expect("an answer");
        assert_eq!(status, 415, "{content_type:?}");
    }
    assert!(a_check_is_answered(&sidecar).await);
}

/// Whether `tcp` has been closed by the other side (reads end-of-file or
/// an error) within `within`.
async fn closed_by_peer(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {} // the server's HTTP/2 settings
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_the_limit_close_idle_ones_and_leave_used_ones_open() {
    let policy = PolicyFile::new(OPEN);
    let sidecar = sluice(&policy.path, &["--max-connections", "50"]).await;
    // Envoy's connection, opened first and in use throughout.
    let mut envoy = AuthorizationClient::connect(format!("http://{}", sidecar.grpc))
        .await
        .expect("connect");
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let in_use = tokio::spawn(async move {
        let mut failed = 0;
        let mut sent = 0;
        while stopped.try_recv().is_err() {
            match envoy.check(check_request("GET", "/", &[])).await {
                Ok(resp) if http_status(resp.get_ref()) == 200 => {}
                _ => failed += 1,
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (sent, failed)
    });
    let mut hoard = Vec::new();
    for _ in 0..500 {
        if let Ok(tcp) = tokio::net::TcpStream::connect(sidecar.grpc).await {
            hoard.push(tcp);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = sidecar.process.id().expect("pid") as i32;
    let descriptors = procfs::process::Process::new(pid)
        .and_then(|p| p.fd_count())
        .expect("fd count");
    assert!(descriptors < 200, "{descriptors} descriptors open");
    let health = sluice_testkit::http::get(sidecar.admin, "/healthz", &[]).await;
    assert!(health.is_ok_and(|r| r.status == 200));
    // Once the hoard has been idle a whole tick (a second, counted from
    // the first tick that saw it: two at most), a new client gets the
    // place of the connection idle longest, while the hoard is still open.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for _ in 0..5 {
        assert!(a_check_is_answered(&sidecar).await, "a new client");
    }
    let mut evicted = 0;
    for tcp in hoard.iter_mut().take(60) {
        if closed_by_peer(tcp, Duration::from_millis(50)).await {
            evicted += 1;
        }
    }
    assert!(evicted >= 5, "{evicted} of the first 60 hoarders closed");
    stop.send(()).expect("stop");
    let (sent, failed) = in_use.await.expect("in use");
    assert!(sent > 10);
    assert_eq!(failed, 0, "the connection in use was never closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_requests_is_closed_after_the_idle_timeout() {
    let policy = PolicyFile::new(OPEN);
    let sidecar = sluice(&policy.path, &["--idle-timeout", "2s"]).await;
    let mut silent = tokio::net::TcpStream::connect(sidecar.grpc)
        .await
        .expect("connect");
    assert!(
        !closed_by_peer(&mut silent, Duration::from_millis(1000)).await,
        "not before the timeout"
    );
    assert!(
        closed_by_peer(&mut silent, Duration::from_secs(5)).await,
        "closed after it"
    );
    assert!(a_check_is_answered(&sidecar).await);
}

/// A length-delimited protobuf field.
fn field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 10);
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// `n` empty repeated entries of field `tag`, two bytes each.
fn empty_entries(tag: u32, n: usize) -> Vec<u8> {
    let mut one = Vec::new();
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut one);
    one.push(0);
    one.repeat(n)
}

/// A Check whose `attributes.request.http.headers` are `headers`.
fn check_with_headers(headers: &[u8]) -> Bytes {
    Bytes::from(field(1, &field(4, &field(2, headers))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_of_empty_headers_in_a_loop_leave_memory_bounded_and_checks_answered() {
    let policy = PolicyFile::new(OPEN);
    let sidecar = sluice(&policy.path, &[]).await;
    let idle_rss = resident_bytes(&sidecar);
    const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
    // The finding's Check, 16 MiB of empty header entries, is refused
    // before it is read.
    let huge = check_with_headers(&empty_entries(3, 8 << 20));
    let refused = raw_unary::<()>(sidecar.grpc, CHECK, huge).await;
    assert_eq!(
        refused.expect_err("over --max-check-request-bytes").code(),
        tonic::Code::OutOfRange
    );
    // Within the byte limit, as many entries as fit: decoded, they would
    // take 32 times their size. They are counted first, and refused.
    let check = check_with_headers(&empty_entries(3, (1 << 20) / 2 - 16));
    assert!(check.len() <= 1 << 20);
    let refused = raw_unary::<()>(sidecar.grpc, CHECK, check.clone()).await;
    let refused = refused.expect_err("over 4,096 header entries");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    // So are header entries hidden in Envoy's other form, `header_map`.
    let mapped = check_with_headers(&field(13, &empty_entries(1, 5000)));
    let refused = raw_unary::<()>(sidecar.grpc, CHECK, mapped).await;
    assert_eq!(
        refused.expect_err("header_map").code(),
        tonic::Code::ResourceExhausted
    );
    // A Check with as many headers as Envoy sends is decided.
    let mut headers = Vec::new();
    for i in 0..200 {
        let entry = [field(1, format!("x-h{i}").as_bytes()), field(2, b"v")].concat();
        headers.extend(field(3, &entry));
    }
    let decided = raw_unary::<envoy_types::pb::envoy::service::auth::v3::CheckResponse>(
        sidecar.grpc,
        CHECK,
        check_with_headers(&headers),
    )
    .await
    .expect("200 headers are decided");
    assert_eq!(http_status(&decided), 200);

    let mut attackers = Vec::new();
    for _ in 0..2 {
        let (check, addr) = (check.clone(), sidecar.grpc);
        attackers.push(tokio::spawn(async move {
            for _ in 0..20 {
                let _ = raw_unary::<()>(addr, CHECK, check.clone()).await;
            }
        }));
    }
    let mut peak = 0;
    let mut answered = 0;
    for _ in 0..20 {
        if a_check_is_answered(&sidecar).await {
            answered += 1;
        }
        peak = peak.max(resident_bytes(&sidecar));
    }
    for attacker in attackers {
        let _ = attacker.await;
    }
    assert_eq!(answered, 20, "normal Checks during the attack");
    assert!(
        peak < idle_rss + (100 << 20),
        "peak RSS {} MB (idle {} MB)",
        peak >> 20,
        idle_rss >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_of_empty_entries_are_refused_before_they_are_decoded() {
    let policy = PolicyFile::new(OPEN);
    let sidecar = sluice(&policy.path, &[]).await;
    // Empty attributes of one record, empty records, empty resources: each
    // two bytes that decode into tens.
    let over = (1 << 16) + 1;
    let attributes = field(1, &field(2, &field(2, &empty_entries(6, over))));
    let records = field(1, &field(2, &empty_entries(2, over)));
    let resources = Bytes::from(empty_entries(1, over));
    for export in [attributes, records, resources.to_vec()] {
        let refused = raw_unary::<()>(sidecar.grpc, EXPORT, Bytes::from(export.clone())).await;
        assert_eq!(
            refused.expect_err("over the entries of an Export").code(),
            tonic::Code::ResourceExhausted
        );
        let http = sluice_testkit::http::request(
            sidecar.admin,
            "POST",
            "/v1/logs",
            &[("content-type", "application/x-protobuf")],
            &export,
            Duration::from_secs(10),
        )
        .await
        .expect("an answer");
        assert_eq!(http.status, 413, "{}", http.text());
    }
    let metrics = sluice_testkit::http::get(sidecar.admin, "/metrics", &[])
        .await
        .expect("metrics")
        .text();
    let ingested = metrics
        .lines()
        .filter(|l| l.starts_with("flowcontrol_access_logs_total{"))
        .filter(|l| !l.ends_with(" 0"))
        .collect::<Vec<_>>();
    assert!(
        ingested.is_empty(),
        "refused Exports ingested: {ingested:?}"
    );
    assert!(a_check_is_answered(&sidecar).await);
}
