//! One shutdown signal for every task of a process.

use tokio::sync::watch;

/// Fires [`Shutdown`]s.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Resolves once the [`Trigger`] fires (or is dropped). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected pair.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Tells every [`Shutdown`] to resolve.
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Waits for the signal. Holds no lock while waiting or after.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await.map(|_| ());
    }
}
