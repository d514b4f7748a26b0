//! The real Redis (Debian's `redis-server`, which `scripts/bootstrap.sh`
//! installs) on free loopback ports: one server, or a three-master cluster.
//! Nothing is saved to disk; every server stops when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::free_port;
use super::process::Process;

/// A program of the Redis package, found on `PATH` or in `/usr/bin`.
fn program(name: &str) -> anyhow::Result<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.exists());
    found.with_context(|| {
        format!("{name} not found: run scripts/bootstrap.sh (`make test` does), which installs the Debian package redis-server")
    })
}

/// A running redis-server.
pub struct Redis {
    /// Where it listens.
    pub addr: SocketAddr,
    process: Process,
    /// With TLS: the CA file `redis-cli` trusts.
    tls: Option<PathBuf>,
}

impl Redis {
    /// A server on a free loopback port, with `extra` arguments (for
    /// example `--requirepass secret`).
    pub async fn start(extra: &[&str]) -> anyhow::Result<Redis> {
        Redis::start_with(extra, None).await
    }

    /// A server speaking only TLS on a free loopback port, with the PEM
    /// certificate `cert` and key `key` (clients are not asked for one);
    /// `cert` is also the CA `redis-cli` trusts.
    pub async fn start_tls(cert: &Path, key: &Path) -> anyhow::Result<Redis> {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let tls = [
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &cert,
            "--tls-auth-clients",
            "no",
        ];
        Redis::start_with(&tls, Some(PathBuf::from(&cert))).await
    }

    async fn start_with(extra: &[&str], tls: Option<PathBuf>) -> anyhow::Result<Redis> {
        let port = free_port()?.to_string();
        let dir = tempfile::tempdir()?;
        let listen: [&str; 4] = match &tls {
            None => ["--port", &port, "--tls-port", "0"],
            Some(_) => ["--port", "0", "--tls-port", &port],
        };
        let mut args: Vec<String> = listen.iter().map(|s| s.to_string()).collect();
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir.path().display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = Process::spawn("redis", &program("redis-server")?, dir, &args)?;
        let redis = Redis {
            addr: ([127, 0, 0, 1], port.parse()?).into(),
            process,
            tls,
        };
        redis.wait_ready(extra).await?;
        Ok(redis)
    }

    async fn wait_ready(&self, extra: &[&str]) -> anyhow::Result<()> {
        let password = extra
            .windows(2)
            .find(|w| w[0] == "--requirepass")
            .map(|w| w[1].to_owned());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut args = vec![];
            if let Some(p) = &password {
                args.extend(["-a".to_owned(), p.clone(), "--no-auth-warning".to_owned()]);
            }
            args.push("PING".to_owned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            if self.cli(&args).await.is_ok_and(|r| r.trim() == "PONG") {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("redis-server not ready:\n{}", self.process.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Runs `redis-cli` against it with `args`; its output.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        match &self.tls {
            None => cli(self.addr, args).await,
            Some(ca) => {
                let ca = ca.display().to_string();
                let mut all = vec!["--tls", "--cacert", &ca];
                all.extend_from_slice(args);
                cli(self.addr, &all).await
            }
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        self.process.dir()
    }

    /// Stops it (SIGKILL).
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.respawn()?;
        self.wait_ready(&[]).await
    }

    /// Calls of each command so far (`INFO commandstats`), by lower-case
    /// name (`evalsha`, `eval`, `zrem`, ...).
    pub async fn command_calls(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let text = self.cli(&["INFO", "commandstats"]).await?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("cmdstat_")?;
                let (name, stats) = rest.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect())
    }
}

/// Runs `redis-cli -h 127.0.0.1 -p <port> args…`.
pub async fn cli(addr: SocketAddr, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(program("redis-cli")?)
        .arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Redis Cluster of three masters on loopback.
pub struct RedisCluster {
    /// Its nodes.
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Three cluster-enabled servers, joined with `redis-cli --cluster
    /// create`, ready when every node says `cluster_state:ok`.
    pub async fn start() -> anyhow::Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            // The cluster bus listens on port + 10000 unless told where:
            // that can land in the kernel's ephemeral range, where a
            // connection's source port may hold it, so it gets a free port
            // of its own.
            let bus = free_port()?.to_string();
            nodes.push(
                Redis::start(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
                .await?,
            );
        }
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        nodes[0]
            .cli(&args)
            .await
            .context("redis-cli --cluster create")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            loop {
                let info = node.cli(&["CLUSTER", "INFO"]).await.unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("the cluster never became ok: {info}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(RedisCluster { nodes })
    }

    /// The seed nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }
}
