//! Hot reload: re-reads the policy path and puts a changed, valid policy set
//! in force without a restart.
//!
//! The path is polled (default every second) rather than watched with
//! inotify: polling sees every way a file can change, including Kubernetes
//! ConfigMap updates (an atomic swap of a symlinked directory) and editors
//! that write a new file and rename it, on every platform. A poll looks at
//! the files' metadata ([`stamp`]) and reads them only when it changed, or
//! when asked to (`reread`, which the binaries notify on SIGHUP); what was
//! read is hashed, and only a changed set is parsed.
//!
//! A set that does not validate is logged with its file, line and field and
//! counted; the set in force stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::load::{PolicySet, fingerprint, parse_sources, read_sources, stamp};

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// A new valid set was put in force.
    Applied,
    /// The files changed but do not validate; the old set stays.
    Rejected(String),
}

/// Polls `path` every `every` until `shutdown` resolves, and at once when
/// `reread` is notified. `last` is the fingerprint of the set in force;
/// `apply` puts a new set in force, or says why it cannot (then the set in
/// force stays, as for a set that does not validate); `report` hears every
/// outcome (for metrics and tests).
pub async fn watch(
    path: PathBuf,
    every: Duration,
    mut last: u64,
    reread: Arc<Notify>,
    apply: impl Fn(&PolicySet) -> Result<(), String> + Send + 'static,
    report: impl Fn(Reload) + Send + 'static,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_error: Option<String> = None;
    let mut last_stamp = None;
    loop {
        let asked = tokio::select! {
            _ = tick.tick() => false,
            _ = reread.notified() => true,
            () = &mut shutdown => return,
        };
        // Unchanged metadata: nothing to read. (The stamp is taken before
        // the read, so a change during it is seen at the next poll.)
        let stat_path = path.clone();
        let stamp_now = tokio::task::spawn_blocking(move || stamp(&stat_path))
            .await
            .ok()
            .flatten();
        if !asked && stamp_now.is_some() && stamp_now == last_stamp {
            continue;
        }
        last_stamp = stamp_now;
        let read_path = path.clone();
        let sources = match tokio::task::spawn_blocking(move || read_sources(&read_path)).await {
            Ok(sources) => sources,
            Err(e) => {
                tracing::error!(error = %e, "policy reader task failed");
                continue;
            }
        };
        let sources = match sources {
            Ok(s) => s,
            Err(e) => {
                // Often transient (a ConfigMap swap in progress); say it once.
                let message = e.to_string();
                if last_error.as_deref() != Some(&message) {
                    tracing::warn!(error = %message, "cannot read policy; keeping the one in force");
                    last_error = Some(message);
                }
                continue;
            }
        };
        let now = fingerprint(&sources);
        if now == last {
            if asked {
                tracing::info!(path = %path.display(), "policy re-read: unchanged");
            }
            continue;
        }
        last = now;
        match parse_sources(&sources)
            .map_err(|e| e.to_string())
            .and_then(|set| {
                apply(&set)?;
                Ok(set)
            }) {
            Ok(set) => {
                last_error = None;
                tracing::info!(
                    policies = set.policies.len(),
                    path = %path.display(),
                    "policy reloaded"
                );
                report(Reload::Applied);
            }
            Err(e) => {
                tracing::error!(error = %e, "policy not reloaded; keeping the one in force");
                report(Reload::Rejected(e));
            }
        }
    }
}
