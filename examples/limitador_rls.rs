//! The peer Sluice is measured against: Envoy's rate-limit service (RLS
//! v3, `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) on
//! Kuadrant's `limitador` crate, with its counters in memory, as
//! limitador's own server runs it with `memory` storage.
//!
//! A request is answered as limitador's server answers it: the `domain`
//! is limitador's namespace (an empty one is `UNKNOWN`), the descriptors'
//! entries are bound as the list `descriptors` that limits read
//! (`descriptors[0].user_id`), `hits_addend` 0 counts as 1, and
//! `check_rate_limited_and_update` decides `OVER_LIMIT` or `OK`;
//! limitador's errors (of its counters' storage, or of a limit's
//! expression) are `UNAVAILABLE`, which Envoy treats by its
//! `failure_mode_deny`. Like limitador's server without
//! `--rate-limit-headers`, it sends no headers back. It does not keep
//! limitador's Prometheus counters or tracing spans: if anything it is
//! cheaper than limitador's server.
//!
//! It serves on exactly the stack of the no-op Check server
//! (`examples/noop_check.rs`) and of Sluice: the same tonic server settings
//! (`sluice_runtime::grpc::server`), listener options and runtime, so that
//! the load tests compare the two limiters and not two gRPC stacks. The
//! request is decoded whole, into `envoy-types`' `RateLimitRequest`.
//!
//! One limit, per user: `--max-value` hits per `--seconds` window for each
//! value of the descriptor entry `--descriptor-key` (`user_id`, which the
//! load tests' `loadtests/envoy/limitador.yaml` fills from the `user-id`
//! header), in `--domain`. The defaults are the counterpart of the per-user
//! rate limiter of `examples/bench.yaml`, a token bucket of 1,000,000
//! tokens refilled by 100,000 a second. limitador counts in fixed windows;
//! 1,000,000 hits per 10 s window has the bucket's average rate
//! (100,000/s) and, over any 10 s, the same most it lets through
//! (2,000,000: a full bucket plus 10 s of refill; two windows' worth across
//! a window's edge). Over shorter spans they differ (across a window's
//! edge 2,000,000 may pass within one second, through the bucket
//! 1,100,000), and neither comes near rejecting at the load tests' rates: that is the
//! point, both limiters do their bookkeeping and accept every request.
//!
//! ```text
//! cargo run --release --example limitador_rls -- [--listen 127.0.0.1:0] [--worker-threads 2]
//!     [--domain sluice-bench] [--descriptor-key user_id] [--max-value 1000000] [--seconds 10]
//!     [--cache-size 100000]
//! ```
//!
//! Prints `listening on ADDR` once it accepts connections; stops on Ctrl-C
//! or SIGTERM. `tests/envoy_configs.rs` includes this file to run the
//! service in process behind the real Envoy on
//! `loadtests/envoy/limitador.yaml`, with a limit small enough to reach.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use limitador::RateLimiter;
use limitador::limit::{Context, Expression, Limit, Namespace, Predicate};
use sluice_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// The domain (limitador's namespace) of the limit, unless `--domain`
/// says otherwise: `loadtests/envoy/limitador.yaml`'s.
pub const DOMAIN: &str = "sluice-bench";
/// The descriptor entry the limit counts per value of, unless
/// `--descriptor-key` says otherwise: the one `limitador.yaml` fills from
/// the `user-id` header.
pub const DESCRIPTOR_KEY: &str = "user_id";

/// limitador's in-memory limiter, behind Envoy's RLS protocol.
pub struct Rls {
    limiter: RateLimiter,
}

impl Rls {
    /// A limiter holding `limit`, its counters in memory: at most
    /// `cache_size` of them (one per user), as limitador's server's
    /// `memory` storage keeps `--cache-size`.
    pub fn new(limit: Limit, cache_size: u64) -> Rls {
        let limiter = RateLimiter::new(cache_size);
        limiter.add_limit(limit);
        Rls { limiter }
    }

    /// What limitador says of `request`.
    fn decide(&self, request: RateLimitRequest) -> Result<Code, limitador::errors::LimitadorError> {
        if request.domain.is_empty() {
            return Ok(Code::Unknown);
        }
        let namespace = Namespace::from(request.domain);
        let descriptors: Vec<HashMap<String, String>> = request
            .descriptors
            .into_iter()
            .map(|d| d.entries.into_iter().map(|e| (e.key, e.value)).collect())
            .collect();
        let mut ctx = Context::default();
        ctx.list_binding("descriptors".to_owned(), descriptors);
        // Optional in the protocol, meaning 1; absent on the wire is 0.
        let hits = u64::from(request.hits_addend.max(1));
        let result = self
            .limiter
            .check_rate_limited_and_update(&namespace, &ctx, hits)?;
        Ok(if result.limited {
            Code::OverLimit
        } else {
            Code::Ok
        })
    }
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        // limitador fails when its counters' storage does (in memory it
        // hardly can) or a limit's expression cannot be evaluated on these
        // descriptors. As limitador's server does, answer UNAVAILABLE, so
        // that Envoy applies its failure mode rather than read an answer
        // into it.
        let code = self
            .decide(request.into_inner())
            .map_err(|e| Status::unavailable(format!("limitador: {e}")))?;
        Ok(Response::new(RateLimitResponse {
            overall_code: code.into(),
            ..Default::default()
        }))
    }
}

/// The one limit: `max_value` hits per `seconds` in `domain` for each
/// value of the descriptor entry `key` (letters, digits and `_`).
pub fn limit(domain: &str, key: &str, max_value: u64, seconds: u64) -> Result<Limit, String> {
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "descriptor key: letters, digits and _ only, not {key:?}"
        ));
    }
    let variable = Expression::parse(format!("descriptors[0].{key}"))
        .map_err(|e| format!("descriptor key {key:?}: {e}"))?;
    Ok(Limit::new(
        domain,
        max_value,
        seconds.max(1),
        Vec::<Predicate>::new(),
        [variable],
    ))
}

/// Serves `rls` on `listener` with Sluice's gRPC settings (those of
/// `sluice_runtime::grpc`, as Sluice and the no-op Check server have them)
/// until `stopped` fires.
pub async fn serve(listener: TcpListener, rls: Rls, stopped: Shutdown) {
    let limits = sluice_runtime::grpc::Limits::default();
    let router =
        sluice_runtime::grpc::server(&limits).add_service(RateLimitServiceServer::new(rls));
    let listener = sluice_runtime::grpc::Bound::Tcp(listener);
    sluice_runtime::grpc::serve(router, listener, None, limits.connections(), stopped).await;
}

struct Args {
    listen: SocketAddr,
    worker_threads: usize,
    domain: String,
    descriptor_key: String,
    max_value: u64,
    seconds: u64,
    cache_size: u64,
}

const USAGE: &str = "usage: limitador_rls [--listen 127.0.0.1:0] [--worker-threads 2] \
[--domain sluice-bench] [--descriptor-key user_id] [--max-value 1000000] [--seconds 10] [--cache-size 100000]";

fn args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        worker_threads: 2,
        domain: DOMAIN.to_owned(),
        descriptor_key: DESCRIPTOR_KEY.to_owned(),
        max_value: 1_000_000,
        seconds: 10,
        // limitador's server sizes it from the free memory when not told;
        // this holds the load tests' 10,000 users ten times over.
        cache_size: 100_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{arg}: {e}"));
        match arg.as_str() {
            "--listen" => args.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--worker-threads" => {
                args.worker_threads = value()?
                    .parse()
                    .map_err(|e| format!("--worker-threads: {e}"))?
            }
            "--domain" => args.domain = value()?,
            "--descriptor-key" => args.descriptor_key = value()?,
            "--max-value" => args.max_value = number(value()?)?,
            "--seconds" => args.seconds = number(value()?)?,
            "--cache-size" => args.cache_size = number(value()?)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
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
    let limit = match limit(
        &args.domain,
        &args.descriptor_key,
        args.max_value,
        args.seconds,
    ) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rls = Rls::new(limit, args.cache_size);
    let runtime = match sluice_runtime::runtime(args.worker_threads, "rls-worker") {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match TcpListener::bind(args.listen).await {
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
        let (stop, stopped) = sluice_runtime::shutdown::channel();
        tokio::spawn(async move {
            sluice_runtime::signal::terminate().await;
            stop.fire();
        });
        serve(listener, rls, stopped).await;
        ExitCode::SUCCESS
    })
}
