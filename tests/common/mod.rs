//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use sluice::server::{Config, Sidecar};
pub use sluice_testkit::PolicyFile;
use sluice_testkit::process::Process;
use std::net::SocketAddr;
use std::path::Path;
use tonic::transport::Channel;

/// Starts an in-process sidecar on free ports with `policy`.
pub async fn sidecar(policy: &PolicyFile) -> Sidecar {
    let config = Config {
        policy: Some(policy.path.clone()),
        policy_poll_interval: Duration::from_millis(50),
        ..Config::ephemeral()
    };
    Sidecar::start(&config).await.expect("sidecar starts")
}

/// The closed loop's parts: sluice-controller running `policy` against
/// `prometheus` (ticking every second, decisions valid 3 s, its admin
/// listener on `controller_admin`), and an in-process sidecar subscribed
/// to it, remote-writing to `prometheus` every 500 ms with
/// `external_labels`.
pub async fn controlled_sidecar(
    policy: &PolicyFile,
    prometheus: &sluice_testkit::Prometheus,
    controller_admin: SocketAddr,
    external_labels: Vec<(String, String)>,
) -> (sluice_controller::Controller, Sidecar) {
    use sluice::telemetry::remote_write::RemoteWriteConfig;
    use sluice_controller::{Controller, ControllerConfig};
    let controller = Controller::start(ControllerConfig {
        tick: Duration::from_secs(1),
        decision_validity: Duration::from_secs(3),
        ..ControllerConfig::new(
            policy.path.clone(),
            &format!("http://{}", prometheus.addr),
            "127.0.0.1:0".parse().expect("addr"),
            controller_admin,
        )
    })
    .await
    .expect("controller");
    let sidecar = Sidecar::start(&Config {
        policy: Some(policy.path.clone()),
        controller: Some(
            format!("http://{}", controller.grpc_addr)
                .parse()
                .expect("url"),
        ),
        remote_write: Some(RemoteWriteConfig {
            url: prometheus.remote_write_url().parse().expect("url"),
            interval: Duration::from_millis(500),
            external_labels,
            bearer_token: None,
            ca_file: None,
            max_queued_batches: 30,
            timeout: Duration::from_secs(2),
        }),
        ..Config::ephemeral()
    })
    .await
    .expect("sidecar");
    (controller, sidecar)
}

pub async fn client(sidecar: &Sidecar) -> AuthorizationClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", sidecar.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect to sluice");
    AuthorizationClient::new(channel).max_decoding_message_size(64 << 20)
}

/// A CheckRequest as Envoy builds it for `method path` with `headers`.
pub fn check_request(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let mut map: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    map.insert(":method".into(), method.into());
    map.insert(":path".into(), path.into());
    let peer = |ip: &str, port: u32| {
        attribute_context::Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
                ),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.1.2.3", 40000)),
            destination: Some(peer("10.9.8.7", 8080)),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    host: "shop.local".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: map,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The HTTP status the response asks Envoy to answer with (200 for OK).
pub fn http_status(resp: &CheckResponse) -> u16 {
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    match &resp.http_response {
        Some(HttpResponse::OkResponse(_)) => 200,
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map_or(0, |s| s.code as u16),
        _ => 0,
    }
}

/// A header the response sets (on the request when OK, on the reply when
/// denied).
pub fn response_header(resp: &CheckResponse, name: &str) -> Option<String> {
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    let headers = match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => &ok.headers,
        Some(HttpResponse::DeniedResponse(d)) => &d.headers,
        _ => return None,
    };
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.clone())
}

/// The `sluice.flow` dynamic metadata.
pub fn flow_metadata(resp: &CheckResponse) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let value = resp.dynamic_metadata.as_ref()?.fields.get("sluice.flow")?;
    match &value.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

/// The value of one series (`name` or `name{labels}`, labels as the
/// exporter orders them) in an admin `/metrics` text. A missing series
/// fails the test, naming what is there: read as 0, a renamed series would
/// pass every check that something did not happen.
pub fn metric(text: &str, series: &str) -> f64 {
    sluice_testkit::metric(text, series).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Polls `f` until it returns true or `within` passes. `within` bounds a
/// failing test; it is never a claim about speed, so give it room.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Calls a unary gRPC method with raw request bytes.
pub async fn raw_unary<R: prost::Message + Default + Send + 'static>(
    addr: std::net::SocketAddr,
    path: &'static str,
    body: Bytes,
) -> Result<R, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        sluice_testkit::grpc::RawCodec::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The admin `/metrics` text of a sidecar.
pub async fn metrics_text(sidecar: &Sidecar) -> String {
    sluice_testkit::http::get(sidecar.admin_addr, "/metrics", &[])
        .await
        .expect("metrics")
        .text()
}

/// Sluice (with `policy`, remote-writing when `remote` is given), an
/// upstream, and Envoy on the quickstart config in front of both.
pub async fn stack(
    policy: &PolicyFile,
    remote: Option<sluice::telemetry::remote_write::RemoteWriteConfig>,
) -> (Sidecar, sluice_testkit::Upstream, sluice_testkit::Envoy) {
    let sidecar = Sidecar::start(&Config {
        policy: Some(policy.path.clone()),
        policy_poll_interval: Duration::from_millis(50),
        remote_write: remote,
        ..Config::ephemeral()
    })
    .await
    .expect("sidecar starts");
    let upstream = sluice_testkit::Upstream::start(0).await.expect("upstream");
    let ports = sluice_testkit::EnvoyPorts::free(upstream.addr.port(), sidecar.grpc_addr.port())
        .expect("ports");
    let envoy = sluice_testkit::Envoy::start("envoy-configs/quickstart.yaml", ports)
        .await
        .expect("envoy starts");
    (sidecar, upstream, envoy)
}

/// A binary of this workspace, started with `args` and ready when its
/// admin listener answers `/readyz`.
pub struct Server {
    pub process: Process,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Server {
    /// Everything it logged, without terminal colours.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.process.log_path()).expect("log");
        let mut plain = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(at) = rest.find('\x1b') {
            plain.push_str(&rest[..at]);
            rest = &rest[at..];
            rest = rest.find('m').map_or("", |end| &rest[end + 1..]);
        }
        plain.push_str(rest);
        plain
    }

    pub async fn start(name: &'static str, program: &Path, args: &[String]) -> Server {
        let (grpc, admin) = (
            sluice_testkit::free_port().expect("port"),
            sluice_testkit::free_port().expect("port"),
        );
        Server::start_on(name, program, args, grpc, admin).await
    }

    pub async fn start_on(
        name: &'static str,
        program: &Path,
        args: &[String],
        grpc: u16,
        admin: u16,
    ) -> Server {
        let (grpc, admin): (SocketAddr, SocketAddr) = (
            ([127, 0, 0, 1], grpc).into(),
            ([127, 0, 0, 1], admin).into(),
        );
        let listen = if name == "sluice" {
            "--grpc-listen"
        } else {
            "--listen"
        };
        let mut all: Vec<String> = vec![
            listen.into(),
            grpc.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--log-level".into(),
            "debug".into(),
        ];
        all.extend_from_slice(args);
        let dir = tempfile::tempdir().expect("dir");
        let mut process = Process::spawn(name, program, dir, &all).expect("spawn");
        process
            .wait_http_ok(admin, "/readyz", Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{name} not ready: {e:#}"));
        Server {
            process,
            grpc,
            admin,
        }
    }

    pub async fn metrics(&self) -> String {
        sluice_testkit::http::get(self.admin, "/metrics", &[])
            .await
            .map(|r| r.text())
            .unwrap_or_default()
    }
}

/// The sidecar binary with `policy`, re-read every 100 ms.
pub async fn sluice(policy: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--policy".to_owned(),
        policy.display().to_string(),
        "--policy-poll-interval".to_owned(),
        "100ms".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start("sluice", Path::new(env!("CARGO_BIN_EXE_sluice")), &args).await
}

/// Envoy on the quickstart config in front of `upstream` and `sidecar`.
pub async fn envoy(upstream: &sluice_testkit::Upstream, sidecar: &Server) -> sluice_testkit::Envoy {
    let ports =
        sluice_testkit::EnvoyPorts::free(upstream.addr.port(), sidecar.grpc.port()).expect("ports");
    sluice_testkit::Envoy::start("envoy-configs/quickstart.yaml", ports)
        .await
        .expect("envoy")
}

/// Sends `n` requests to `path` at once, each with `headers`; their
/// statuses, sorted.
pub async fn at_once(
    front: SocketAddr,
    n: usize,
    path: &str,
    headers: &[(&str, &str)],
) -> Vec<u16> {
    let requests: Vec<_> = (0..n)
        .map(|_| {
            let (path, headers): (String, Vec<(String, String)>) = (
                path.to_owned(),
                headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            tokio::spawn(async move {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                sluice_testkit::http::request(
                    front,
                    "GET",
                    &path,
                    &headers,
                    b"",
                    Duration::from_secs(20),
                )
                .await
                .map_or(0, |r| r.status)
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(r.await.expect("request task"));
    }
    statuses.sort_unstable();
    statuses
}

/// A policy whose circuit closes a door the policy leaves open: a sidecar
/// that believes the controller answers 403, one that does not, 200.
pub const DRIVEN: &str = r#"
name: driven
samplers:
  - name: door
    selectors: [{control_point: ingress}]
    accept_percentage: 100
circuit:
  components:
    - actuator: {sampler: door, input: 0}
"#;

/// Flags of a `sluice-controller` on `policy` that ticks every 200 ms, its
/// decisions valid for 1 s, and asks no Prometheus (nothing listens at
/// the address it is given): for circuits of constants.
pub fn ticking_controller_args(policy: &Path) -> Vec<String> {
    [
        "--policy",
        &policy.display().to_string(),
        "--prometheus-url",
        "http://127.0.0.1:1",
        "--tick",
        "200ms",
        "--decision-validity",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The HTTP status a sidecar at `addr` answers `GET /` with, over a new
/// connection; `None` when no answer comes within two seconds.
pub async fn check_status(addr: SocketAddr) -> Option<u16> {
    let mut client = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    let answer = tokio::time::timeout(
        Duration::from_secs(2),
        client.check(check_request("GET", "/", &[])),
    )
    .await
    .ok()?
    .ok()?;
    Some(http_status(answer.get_ref()))
}
