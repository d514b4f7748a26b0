//! The signals a process heeds: those that stop it, and SIGHUP, which
//! re-reads its files.

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends).
pub async fn terminate() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Calls `reload` on every SIGHUP until `shutdown`, instead of the default
/// (which ends the process without a word). The handler is in place when
/// this returns, so a SIGHUP right after start is not fatal either.
pub fn on_hangup(
    mut shutdown: crate::shutdown::Shutdown,
    reload: impl Fn() + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                received = hangups.recv() => match received {
                    Some(()) => {
                        tracing::info!("SIGHUP: re-reading the policy and the TLS certificates");
                        reload();
                    }
                    None => return,
                },
                _ = shutdown.wait() => return,
            }
        }
    }))
}
