//! The requests the load tests send: ext_authz Checks and OTLP log Exports
//! over gRPC, and HTTP requests through Envoy.
//!
//! gRPC bodies are encoded once, before the run, and sent as bytes (a
//! codec that copies them into the frame), and answers are decoded only as
//! far as the verdict: the generator should spend its CPU on sending, not
//! on protobuf.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message as _;
use sluice::envoy::wire;
use sluice_engine::flow_end::metadata::FlowKey;
use sluice_testkit::access_log;
use sluice_testkit::grpc::RawCodec;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

use crate::generate::{Answer, Shot, user_of};

/// The ext_authz Check method.
const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
/// The OTLP logs Export method.
const EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

/// Of a CheckResponse, only `status.code`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckVerdict {
    #[prost(message, optional, tag = "1")]
    pub status: Option<Code>,
}

/// `google.rpc.Status.code`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Code {
    #[prost(int32, tag = "1")]
    pub code: i32,
}

/// Of an ExportLogsServiceResponse, nothing: answered is all we need.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Nothing {}

/// `connections` HTTP/2 connections to a gRPC server (Envoy holds one per
/// worker to its ext_authz cluster).
pub async fn connect(addr: SocketAddr, connections: usize) -> anyhow::Result<Arc<[Channel]>> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        channels.push(channel);
    }
    Ok(channels.into())
}

/// A unary gRPC call with pre-encoded bodies, spread over connections.
pub struct Grpc<M> {
    channels: Arc<[Channel]>,
    bodies: Arc<[Bytes]>,
    /// With `hot` > 0, `hot_tenths` of every ten requests go to one of the
    /// first `hot` bodies (hot users), the rest spread over all of them.
    hot: u64,
    hot_tenths: u64,
    /// Send the bodies in order, round and round, instead of spread.
    in_order: bool,
    path: PathAndQuery,
    verdict: fn(&M) -> Answer,
}

impl<M> Clone for Grpc<M> {
    fn clone(&self) -> Self {
        Grpc {
            channels: self.channels.clone(),
            bodies: self.bodies.clone(),
            hot: self.hot,
            hot_tenths: self.hot_tenths,
            in_order: self.in_order,
            path: self.path.clone(),
            verdict: self.verdict,
        }
    }
}

impl<M: prost::Message + Default + Send + Sync + 'static> Shot for Grpc<M> {
    async fn fire(&self, n: u64) -> Answer {
        let channel = self.channels[n as usize % self.channels.len()].clone();
        let user = if self.in_order {
            n % self.bodies.len() as u64
        } else if self.hot > 0 && n % 10 < self.hot_tenths {
            (n / 10 * self.hot_tenths + n % 10) % self.hot
        } else {
            user_of(n, self.bodies.len() as u64)
        };
        let body = self.bodies[user as usize].clone();
        let mut grpc = tonic::client::Grpc::new(channel);
        if grpc.ready().await.is_err() {
            return Answer::Error;
        }
        match grpc
            .unary(
                tonic::Request::new(body),
                self.path.clone(),
                RawCodec::<M>::default(),
            )
            .await
        {
            Ok(response) => (self.verdict)(response.get_ref()),
            Err(_) => Answer::Error,
        }
    }
}

/// [`checks`] where `hot_tenths` of every ten requests go to `hot` users
/// (the first ones) and the others spread over all `users`: a few hot
/// keys, most of them cold.
pub fn skewed_checks(
    channels: Arc<[Channel]>,
    users: u64,
    hot: u64,
    hot_tenths: u64,
) -> Grpc<CheckVerdict> {
    Grpc {
        hot,
        hot_tenths: hot_tenths.min(10),
        ..checks(channels, users)
    }
}

/// Checks as Envoy's ext_authz filter sends them, for `users` users
/// (`user-id`), one in five a subscriber (`user-type`).
pub fn checks(channels: Arc<[Channel]>, users: u64) -> Grpc<CheckVerdict> {
    let bodies: Vec<Bytes> = (0..users.max(1))
        .map(|u| Bytes::from(check_request(u).encode_to_vec()))
        .collect();
    Grpc {
        channels,
        bodies: bodies.into(),
        hot: 0,
        hot_tenths: 0,
        in_order: false,
        path: PathAndQuery::from_static(CHECK),
        verdict: |v: &CheckVerdict| match v.status.as_ref().map_or(0, |s| s.code) {
            0 => Answer::Ok,
            _ => Answer::Denied,
        },
    }
}

/// Access-log Exports of `records` records each, as Envoy's OpenTelemetry
/// access logger batches them, every record observed by the benchmark
/// policy's flux meter and signed with `key` (Sluice's `--flow-key-file`).
/// They come from a ring that Sluice never takes for replays, so that
/// every record takes the whole path.
pub fn exports(channels: Arc<[Channel]>, key: &FlowKey, records: usize) -> Grpc<Nothing> {
    let bodies: Vec<Bytes> = access_log::ring(key, "bench/latency", records)
        .iter()
        .map(|export| Bytes::from(export.encode_to_vec()))
        .collect();
    Grpc {
        channels,
        bodies: bodies.into(),
        hot: 0,
        hot_tenths: 0,
        in_order: true,
        path: PathAndQuery::from_static(EXPORT),
        verdict: |_| Answer::Ok,
    }
}

/// The CheckRequest Envoy 1.40 sends for `GET /api/items?page=2` from user
/// `user` through the load tests' Envoy configs: its headers (including
/// those Envoy adds), peers, and the route's context extension.
pub fn check_request(user: u64) -> wire::CheckRequest {
    let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
    let id = format!("{:08x}-{:04x}-4000-8000-{:012x}", user, user % 65536, user);
    let user_type = if user.is_multiple_of(5) {
        "subscriber"
    } else {
        "guest"
    };
    let headers = [
        (":authority", "shop.example"),
        (":method", "GET"),
        (":path", "/api/items?page=2"),
        (":scheme", "http"),
        ("accept", "*/*"),
        ("user-agent", "loadtest/1.0"),
        ("user-id", &format!("user-{user}")),
        ("user-type", user_type),
        ("x-forwarded-proto", "http"),
        ("x-request-id", &id),
    ];
    let peer = |port: u32| wire::Peer {
        address: Some(wire::Address {
            socket_address: Some(wire::SocketAddress {
                address: b("127.0.0.1"),
                port_value: port,
            }),
        }),
    };
    wire::CheckRequest {
        attributes: Some(wire::AttributeContext {
            source: Some(peer(40_000 + (user % 20_000) as u32)),
            destination: Some(peer(10_000)),
            request: Some(wire::Request {
                http: Some(wire::HttpRequest {
                    id: b(&user.to_string()),
                    method: b("GET"),
                    headers: headers
                        .iter()
                        .map(|(k, v)| wire::StringEntry {
                            key: b(k),
                            value: b(v),
                        })
                        .collect(),
                    path: b("/api/items?page=2"),
                    host: b("shop.example"),
                    scheme: b("http"),
                    protocol: b("HTTP/1.1"),
                    ..Default::default()
                }),
            }),
            context_extensions: vec![wire::StringEntry {
                key: b("service"),
                value: b("demo-app"),
            }],
        }),
    }
}

/// `GET /api/items?page=2` through Envoy, HTTP/1.1 over a pool of
/// keep-alive connections, for `users` users.
#[derive(Clone)]
pub struct HttpGet {
    client: Client<HttpConnector, Empty<Bytes>>,
    uri: http::Uri,
    users: u64,
}

impl HttpGet {
    /// Requests to Envoy's listener at `addr`.
    pub fn new(addr: SocketAddr, users: u64) -> anyhow::Result<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .build(connector);
        Ok(HttpGet {
            client,
            uri: format!("http://{addr}/api/items?page=2").parse()?,
            users,
        })
    }
}

impl Shot for HttpGet {
    async fn fire(&self, n: u64) -> Answer {
        let user = user_of(n, self.users);
        let request = http::Request::get(self.uri.clone())
            .header("user-id", format!("user-{user}"))
            .header(
                "user-type",
                if user.is_multiple_of(5) {
                    "subscriber"
                } else {
                    "guest"
                },
            )
            .body(Empty::new());
        let Ok(request) = request else {
            return Answer::Error;
        };
        match self.client.request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                if response.into_body().collect().await.is_err() {
                    return Answer::Error;
                }
                match status {
                    200..=299 => Answer::Ok,
                    403 | 429 | 503 => Answer::Denied,
                    _ => Answer::Error,
                }
            }
            Err(_) => Answer::Error,
        }
    }
}
