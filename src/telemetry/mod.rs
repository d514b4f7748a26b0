//! What the sidecar reports beyond the engine's metrics (which live in
//! `sluice_engine::metrics`, one registry for both): its policy reloads and
//! its process's footprint, and [`remote_write`], which sends the whole
//! registry to Prometheus.

pub mod remote_write;

use prometheus::{IntCounterVec, Opts, Registry};

/// The sidecar's own metrics.
#[derive(Clone)]
pub struct SidecarMetrics {
    /// `policy_reloads_total{result}`: `ok` or `error`.
    pub policy_reloads: IntCounterVec,
}

impl SidecarMetrics {
    /// Registers them in `registry` (the engine's), with the process's CPU
    /// seconds, resident memory and open descriptors: what a sidecar's
    /// footprint is judged by.
    pub fn register(registry: &Registry) -> anyhow::Result<Self> {
        let policy_reloads = IntCounterVec::new(
            Opts::new(
                "policy_reloads_total",
                "Policy loads and reloads, by result (ok, error).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(policy_reloads.clone()))?;
        // Both results from the start: a dashboard (or a test) reads "no
        // error yet" as 0, not as a missing series.
        for result in ["ok", "error"] {
            policy_reloads.with_label_values(&[result]);
        }
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(SidecarMetrics { policy_reloads })
    }
}
