//! The processes under load: Sluice, the no-op Check server, the limitador
//! rate-limit service, Envoy and sluice-controller, each its own OS process (so that its CPU time and
//! peak RSS are its own), on free loopback ports, optionally pinned to a
//! set of cores.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sluice_engine::flow_end::metadata::FlowKey;
use sluice_testkit::envoy::{self, EnvoyPorts};
use sluice_testkit::free_port;
use sluice_testkit::process::Process;

/// Where the load tests put what they start, and on which cores.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Directory holding `sluice`, `examples/noop_check` and
    /// `examples/limitador_rls`: the profile directory this load test was
    /// built into.
    pub bin_dir: PathBuf,
    /// `taskset -c` list for the servers (Sluice, the no-op, limitador,
    /// Envoy), or `None` to let them run anywhere.
    pub servers_on: Option<String>,
    /// `--worker-threads` for Sluice, the no-op and limitador alike;
    /// `None` for their default (2 each).
    pub server_threads: Option<usize>,
}

impl Placement {
    /// Binaries next to this executable; servers pinned to `servers_on`.
    pub fn new(servers_on: Option<String>, server_threads: Option<usize>) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        // target/<profile>/examples/loadtest → target/<profile>
        let bin_dir = exe
            .parent()
            .and_then(Path::parent)
            .context("cannot find the build directory")?
            .to_owned();
        Ok(Placement {
            bin_dir,
            servers_on,
            server_threads,
        })
    }

    fn binary(&self, relative: &str) -> anyhow::Result<PathBuf> {
        let path = self.bin_dir.join(relative);
        if !path.exists() {
            bail!(
                "{} is missing: build it first (loadtests/run does: cargo build --release --bins --examples)",
                path.display()
            );
        }
        Ok(path)
    }

    /// `--worker-threads N`, when set.
    fn threads(&self) -> Vec<String> {
        self.server_threads
            .map(|n| vec!["--worker-threads".to_owned(), n.to_string()])
            .unwrap_or_default()
    }

    /// `program args`, under `taskset` when pinned.
    fn spawn(
        &self,
        name: &'static str,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<Process> {
        let dir = tempfile::tempdir()?;
        match &self.servers_on {
            Some(cpus) => {
                let mut all = vec!["-c".to_owned(), cpus.clone(), program.display().to_string()];
                all.extend_from_slice(args);
                Process::spawn(name, Path::new("/usr/bin/taskset"), dir, &all)
            }
            None => Process::spawn(name, program, dir, args),
        }
    }
}

/// A server process under load.
pub struct Server {
    /// What it is, in the report.
    pub name: &'static str,
    /// Its gRPC (or, for Envoy, HTTP) address.
    pub addr: SocketAddr,
    /// Its admin listener (Sluice's `/metrics`, Envoy's `/stats`), where
    /// the load tests read it.
    pub admin: Option<SocketAddr>,
    process: Process,
    pid: i32,
    /// Envoy's rendered config or Sluice's flow-key file, removed when it
    /// stops.
    _config: Option<tempfile::TempDir>,
    /// The key Sluice signs `sluice.flow` with, for access logs the load
    /// tests make up.
    pub flow_key: Option<FlowKey>,
}

/// The secret of the load tests' `--flow-key-file`.
const FLOW_SECRET: &str = "the load tests' flow key, not a secret";

impl Server {
    /// Sluice (`target/<profile>/sluice`) with `policy`, its runtime as
    /// shipped.
    pub async fn sluice(place: &Placement, policy: &Path) -> anyhow::Result<Server> {
        Server::sluice_with(place, "sluice", policy, &[]).await
    }

    /// Sluice named `name` in the report, with `policy` and `extra` flags.
    pub async fn sluice_with(
        place: &Placement,
        name: &'static str,
        policy: &Path,
        extra: &[String],
    ) -> anyhow::Result<Server> {
        let (grpc, admin) = (free_port()?, free_port()?);
        let dir = tempfile::tempdir()?;
        let key_file = dir.path().join("flow-key");
        std::fs::write(&key_file, FLOW_SECRET)?;
        let args: Vec<String> = [
            "--flow-key-file",
            &key_file.display().to_string(),
            "--policy",
            &policy.display().to_string(),
            "--grpc-listen",
            &format!("127.0.0.1:{grpc}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(place.threads())
        .chain(extra.iter().cloned())
        .collect();
        let mut process = place.spawn(name, &place.binary("sluice")?, &args)?;
        process
            .wait_http_ok(
                ([127, 0, 0, 1], admin).into(),
                "/readyz",
                Duration::from_secs(20),
            )
            .await?;
        let mut server = Server::new(name, ([127, 0, 0, 1], grpc).into(), process)?;
        server._config = Some(dir);
        server.flow_key = Some(FlowKey::from_secret(FLOW_SECRET.as_bytes()));
        Ok(server)
    }

    /// `sluice-controller` (`target/<profile>/sluice-controller`) with
    /// `policy`, asking the Prometheus at `prometheus_url` every `tick`,
    /// its runtime as shipped.
    pub async fn controller(
        place: &Placement,
        policy: &Path,
        prometheus_url: &str,
        tick: Duration,
    ) -> anyhow::Result<Server> {
        let (grpc, admin) = (free_port()?, free_port()?);
        let args: Vec<String> = [
            "--policy",
            &policy.display().to_string(),
            "--prometheus-url",
            prometheus_url,
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--tick",
            &humantime::format_duration(tick).to_string(),
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let binary = place.binary("sluice-controller")?;
        let mut process = place.spawn("sluice-controller", &binary, &args)?;
        let admin = ([127, 0, 0, 1], admin).into();
        process
            .wait_http_ok(admin, "/readyz", Duration::from_secs(20))
            .await?;
        let mut server = Server::new("sluice-controller", ([127, 0, 0, 1], grpc).into(), process)?;
        server.admin = Some(admin);
        Ok(server)
    }

    /// The no-op Check server (`examples/noop_check`).
    pub async fn noop(place: &Placement) -> anyhow::Result<Server> {
        let port = free_port()?;
        let mut args = vec!["--listen".to_owned(), format!("127.0.0.1:{port}")];
        args.extend(place.threads());
        let process = place.spawn("noop", &place.binary("examples/noop_check")?, &args)?;
        let addr = ([127, 0, 0, 1], port).into();
        wait_listening(addr, &process).await?;
        Server::new("noop", addr, process)
    }

    /// The limitador rate-limit service (`examples/limitador_rls`) with
    /// its default limit, the counterpart of `examples/bench.yaml`'s
    /// per-user rate limiter.
    pub async fn limitador(place: &Placement) -> anyhow::Result<Server> {
        let port = free_port()?;
        let mut args = vec!["--listen".to_owned(), format!("127.0.0.1:{port}")];
        args.extend(place.threads());
        let binary = place.binary("examples/limitador_rls")?;
        let process = place.spawn("limitador", &binary, &args)?;
        let addr = ([127, 0, 0, 1], port).into();
        wait_listening(addr, &process).await?;
        Server::new("limitador", addr, process)
    }

    /// Envoy on `config` (a file under `loadtests/envoy/`), checking with
    /// (or asking the rate-limit service at) `authz`, if any.
    pub async fn envoy(
        place: &Placement,
        name: &'static str,
        config: &str,
        authz: Option<SocketAddr>,
    ) -> anyhow::Result<Server> {
        let ports = EnvoyPorts::free_for(None, authz.map(|a| a.port()))?;
        let (dir, args) = envoy::staged(&envoy::rendered(config, &ports)?)?;
        let mut process = place.spawn(name, &envoy::binary()?, &args)?;
        process
            .wait_http_ok(
                ([127, 0, 0, 1], ports.admin).into(),
                "/ready",
                Duration::from_secs(30),
            )
            .await?;
        let mut server = Server::new(name, ([127, 0, 0, 1], ports.listener).into(), process)?;
        server._config = Some(dir);
        server.admin = Some(([127, 0, 0, 1], ports.admin).into());
        Ok(server)
    }

    /// A counter of Envoy's (`/stats` on its admin listener); 0 if it has
    /// none by that name yet.
    pub async fn envoy_counter(&self, name: &str) -> anyhow::Result<u64> {
        let admin = self.admin.context("no admin listener")?;
        let path = format!("/stats?filter=^{name}$");
        let reply = sluice_testkit::http::get(admin, &path, &[]).await?;
        anyhow::ensure!(reply.status == 200, "{path}: {}", reply.status);
        let text = reply.text();
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    fn new(name: &'static str, addr: SocketAddr, process: Process) -> anyhow::Result<Server> {
        let pid = process.id().context("the process has no pid")? as i32;
        Ok(Server {
            name,
            addr,
            admin: None,
            process,
            pid,
            _config: None,
            flow_key: None,
        })
    }

    /// CPU time (user + system) it has used so far.
    pub fn cpu(&self) -> Duration {
        cpu_of(procfs::process::Process::new(self.pid))
    }

    /// Its peak resident set so far, in bytes.
    pub fn peak_rss(&self) -> u64 {
        procfs::process::Process::new(self.pid)
            .and_then(|p| p.status())
            .ok()
            .and_then(|s| s.vmhwm)
            .map_or(0, |kib| kib * 1024)
    }

    /// Its resident set now, in bytes.
    pub fn rss(&self) -> u64 {
        procfs::process::Process::new(self.pid)
            .and_then(|p| p.status())
            .ok()
            .and_then(|s| s.vmrss)
            .map_or(0, |kib| kib * 1024)
    }

    /// The end of its log, for errors.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

impl Placement {
    /// Moves the running process `pid` (a server started by someone else,
    /// such as the test kit's Redis) onto the servers' cores.
    pub fn pin(&self, pid: u32) -> anyhow::Result<()> {
        let Some(cpus) = &self.servers_on else {
            return Ok(());
        };
        let status = std::process::Command::new("taskset")
            .args(["-cp", cpus, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "taskset -cp {cpus} {pid} failed");
        Ok(())
    }
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_of_pid(pid: u32) -> Duration {
    cpu_of(procfs::process::Process::new(pid as i32))
}

/// CPU time the load generator has used so far: this process and the
/// generators it ran and waited for (k6, h2load).
pub fn own_cpu() -> Duration {
    let ticks = procfs::ticks_per_second() as f64;
    procfs::process::Process::myself()
        .and_then(|p| p.stat())
        .map(|s| {
            let children = (s.cutime + s.cstime).max(0) as u64;
            Duration::from_secs_f64((s.utime + s.stime + children) as f64 / ticks)
        })
        .unwrap_or_default()
}

fn cpu_of(process: procfs::ProcResult<procfs::process::Process>) -> Duration {
    let ticks = procfs::ticks_per_second() as f64;
    process
        .and_then(|p| p.stat())
        .map(|s| Duration::from_secs_f64((s.utime + s.stime) as f64 / ticks))
        .unwrap_or_default()
}

/// Waits until `addr` accepts connections (the process printed nothing we
/// need to parse: its port was chosen for it).
async fn wait_listening(addr: SocketAddr, process: &Process) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{addr} never accepted a connection:\n{}",
        process.log_tail()
    )
}
