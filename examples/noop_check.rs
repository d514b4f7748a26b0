//! The floor Sluice is measured against: an ext_authz v3 Check server that
//! answers OK without looking at the request.
//!
//! It is built on exactly Sluice's stack — the same tonic server settings
//! (`sluice_runtime::grpc::server`), the same listener options, the same
//! runtime (`sluice_runtime::runtime`), and the same request decoding (Sluice's
//! lean `CheckRequest`) — so that the difference the load tests measure is
//! Sluice's own work: reading the request, deciding, and writing an answer
//! with headers and dynamic metadata.
//!
//! ```text
//! cargo run --release --example noop_check -- [--listen 127.0.0.1:0] [--worker-threads 2]
//! ```
//!
//! Prints `listening on ADDR` once it accepts connections; stops on Ctrl-C
//! or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;

use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, OkHttpResponse, check_response};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use sluice::envoy::wire::CheckRequest;
use sluice::envoy::wire::authorization_server::{Authorization, AuthorizationServer};
use tonic::{Request, Response, Status};

/// Says OK to everything.
struct Noop;

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse {
            status: Some(RpcStatus {
                code: 0,
                ..Default::default()
            }),
            http_response: Some(check_response::HttpResponse::OkResponse(
                OkHttpResponse::default(),
            )),
            ..Default::default()
        }))
    }
}

struct Args {
    listen: SocketAddr,
    worker_threads: usize,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        worker_threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => args.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--worker-threads" => {
                args.worker_threads = value()?
                    .parse()
                    .map_err(|e| format!("--worker-threads: {e}"))?
            }
            "-h" | "--help" => {
                println!("usage: noop_check [--listen 127.0.0.1:0] [--worker-threads 2]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match sluice_runtime::runtime(args.worker_threads, "noop-worker") {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => println!("listening on {addr}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
        let limits = sluice_runtime::grpc::Limits::default();
        let router =
            sluice_runtime::grpc::server(&limits).add_service(AuthorizationServer::new(Noop));
        let (stop, stopped) = sluice_runtime::shutdown::channel();
        tokio::spawn(async move {
            sluice_runtime::signal::terminate().await;
            stop.fire();
        });
        let listener = sluice_runtime::grpc::Bound::Tcp(listener);
        sluice_runtime::grpc::serve(router, listener, None, limits.connections(), stopped).await;
        ExitCode::SUCCESS
    })
}
