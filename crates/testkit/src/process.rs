//! A child process of the test kit: its own temporary directory, output in a
//! log file there, killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// A running child process.
pub struct Process {
    /// For messages.
    name: &'static str,
    /// What was started, to start it again.
    program: PathBuf,
    args: Vec<String>,
    child: Child,
    dir: tempfile::TempDir,
}

impl Process {
    /// Spawns `program` with `args` (built by `args` from the process's
    /// directory), stdout and stderr going to `<dir>/<name>.log`.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        dir: tempfile::TempDir,
        args: &[String],
    ) -> anyhow::Result<Process> {
        let child = Self::start(name, program, dir.path(), args)?;
        Ok(Process {
            name,
            program: program.to_owned(),
            args: args.to_vec(),
            child,
            dir,
        })
    }

    fn start(name: &str, program: &Path, dir: &Path, args: &[String]) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))?;
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {name} ({})", program.display()))
    }

    /// Starts the program again, with the same arguments and directory
    /// (after [`Process::kill`]).
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        self.child = Self::start(self.name, &self.program, self.dir.path(), &self.args)?;
        Ok(())
    }

    /// Waits until `GET path` on `addr` answers 200, failing early if the
    /// process exits.
    pub async fn wait_http_ok(
        &mut self,
        addr: SocketAddr,
        path: &str,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}):\n{}", self.name, self.log_tail());
            }
            if let Ok(reply) = super::http::get(addr, path, &[]).await
                && reply.status == 200
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not ready within {within:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where it logs.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.name))
    }

    /// The last 30 lines it logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops it (SIGKILL) and waits for it to go.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }

    /// Its process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }
}

/// One of the workspace's own binaries (`sluice`, `sluice-controller`), as
/// users run it, from the build directory of the test, benchmark or example
/// calling (`target/<profile>/`).
///
/// Cargo builds a package's own binaries before its integration tests, but
/// not another package's: `make test` builds every binary first (`cargo
/// build --workspace --bins`), and a missing one is an error that says so,
/// never a skipped test.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/examples/<example>.
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot find the build directory")?;
    let path = profile.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it first with `cargo build --workspace --bins` (make test does)",
            path.display()
        );
    }
    Ok(path)
}
