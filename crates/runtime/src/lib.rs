//! What both Sluice binaries (`sluice`, `sluice-controller`) run on, so
//! that each helper exists once: nothing here knows the engine, a policy or
//! a protocol message.
//!
//! Layout:
//! - [`logging`]: `--log-level` and `--log-format`, one subscriber;
//! - [`signal`]: waiting for SIGTERM or Ctrl-C;
//! - [`shutdown`]: one stop signal for every task of a process;
//! - [`backoff`]: exponential backoff with jitter, for every reconnect and
//!   retry loop;
//! - [`http_client`]: the HTTPS client (hyper + rustls) for Prometheus and
//!   health checks;
//! - [`admin`]: the HTTP/1.1 admin server both binaries serve `/metrics`
//!   and probes on;
//! - [`grpc`]: the gRPC server settings and bounds both binaries (and the
//!   load tests' no-op Check server) serve with, and the client's;
//!   [`grpc_guard`]: the content type and the budget of request bytes;
//!   [`conns`]: the bound on a listener's connections, idle ones closed;
//! - [`tls`]: rustls for every listener (re-read when certificates rotate)
//!   and client;
//! - [`secret`]: passwords and tokens kept in files;
//! - this file: the async [`runtime`] and the [`hostname`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod backoff;
pub mod conns;
pub mod grpc;
pub mod grpc_guard;
pub mod http_client;
pub mod logging;
pub mod secret;
pub mod shutdown;
pub mod signal;
pub mod tls;

/// The async runtime Sluice's binaries (and the load tests' no-op Check
/// server) run on: `threads` workers, 0 for one per core, at most 4.
pub fn runtime(threads: usize, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        n => n,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
}

/// This machine's name, for default `instance` labels: `$HOSTNAME` (set in
/// every Kubernetes pod), else the kernel's, else `localhost`.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
