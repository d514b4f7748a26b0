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

/// On every SIGHUP until `shutdown`, instead of the default (which ends
/// the process without a word): wakes the policy watcher (`policy`) to read
/// its files at once, and re-reads the listeners' `certificates`. The
/// handler is in place when this returns, so a SIGHUP right after start is
/// not fatal either.
pub fn reread_on_hangup(
    mut shutdown: crate::shutdown::Shutdown,
    policy: std::sync::Arc<tokio::sync::Notify>,
    certificates: Vec<std::sync::Arc<crate::tls::ServerTls>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                received = hangups.recv() => match received {
                    Some(()) => {
                        tracing::info!("SIGHUP: re-reading the policy and the TLS certificates");
                        policy.notify_one();
                        certificates.iter().for_each(|tls| tls.reload());
                    }
                    None => return,
                },
                _ = shutdown.wait() => return,
            }
        }
    }))
}
