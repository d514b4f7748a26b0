//! The control edge: the sidecar's subscription to `sluice-controller`.
//!
//! The sidecar dials the controller (`--controller`), identifies itself and
//! holds one server-streaming `Subscribe`; every [`wire::DecisionSet`] that
//! arrives is translated into engine decisions
//! ([`sluice_engine::control`]) and applied. On any error the subscription is
//! re-established with exponential backoff (100 ms doubling to 10 s, with
//! jitter). While disconnected, decisions already applied lapse at their
//! `valid_until` and components return to their policy's values.
//!
//! The controller is trusted only as far as [`ControllerLink`] makes it:
//! `https://` is TLS (an `https` controller that speaks plain text is an
//! error, never a fallback), with a client certificate for mTLS; a token
//! file adds `authorization: Bearer`. Every decision is still checked by
//! the engine (finite and in range; a refused one is counted as `invalid`
//! and the first of each subscription is logged), and none holds longer
//! than `--controller-max-validity`.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::Serialize;
use sluice_engine::Engine;
use sluice_engine::control::{Action, Applied, ControlDecision};
use sluice_runtime::backoff::Backoff;
use sluice_runtime::secret::TokenFile;
use sluice_runtime::shutdown::Shutdown;
use sluice_time::unix_ms;

use crate::server::ControllerLink;

pub use sluice_proto::control as wire;
use wire::decision::Action as WireAction;

/// First delay before subscribing again.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay before subscribing again.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Who this sidecar is, for the controller.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Agent group (as in Aperture: sidecars sharing a role).
    pub agent_group: String,
    /// The service it sits next to.
    pub service: String,
    /// This instance.
    pub instance: String,
}

/// The subscription's metrics.
#[derive(Clone)]
pub struct ControlMetrics {
    /// `controller_connected`: 1 while subscribed.
    pub connected: IntGauge,
    /// `controller_decisions_total{result}`.
    pub decisions: IntCounterVec,
}

impl ControlMetrics {
    /// Creates and registers them.
    pub fn register(registry: &Registry) -> anyhow::Result<Self> {
        let connected = IntGauge::new(
            "controller_connected",
            "1 while this sidecar holds a subscription to sluice-controller.",
        )?;
        registry.register(Box::new(connected.clone()))?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "controller_decisions_total",
                "Decisions received from sluice-controller, by what became of them.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        Ok(ControlMetrics {
            connected,
            decisions,
        })
    }
}

/// The subscription as `GET /v1/status` shows it: who this sidecar says it
/// is, whether it is subscribed and since when, when decisions last came,
/// the last error, and what became of the decisions.
pub struct Link {
    url: String,
    identity: Identity,
    metrics: ControlMetrics,
    state: Mutex<LinkState>,
}

#[derive(Clone, Default)]
struct LinkState {
    connected_since_unix_ms: Option<i64>,
    last_decisions_unix_ms: Option<i64>,
    last_error: Option<String>,
}

/// A [`Link`]'s status.
#[derive(Clone, Debug, Serialize)]
pub struct LinkStatus {
    /// The controller's URL.
    pub url: String,
    /// The agent group this sidecar subscribes as.
    pub agent_group: String,
    /// The service it subscribes for.
    pub service: String,
    /// Its instance name.
    pub instance: String,
    /// Whether it holds a subscription now.
    pub connected: bool,
    /// Since when (Unix ms), while connected.
    pub connected_since_unix_ms: Option<i64>,
    /// When the last decisions arrived (Unix ms).
    pub last_decisions_unix_ms: Option<i64>,
    /// Why the last subscription ended or could not start, if it did.
    pub last_error: Option<String>,
    /// Decisions received, by what became of them (as
    /// `controller_decisions_total`).
    pub decisions: std::collections::BTreeMap<&'static str, u64>,
}

impl Link {
    /// The link to `url` of a sidecar that is `identity`, counting in
    /// `metrics`.
    pub fn new(url: &http::Uri, identity: Identity, metrics: ControlMetrics) -> Arc<Link> {
        Arc::new(Link {
            url: url.to_string(),
            identity,
            metrics,
            state: Mutex::new(LinkState::default()),
        })
    }

    /// What it is now.
    pub fn status(&self) -> LinkStatus {
        let state = self.state.lock().clone();
        LinkStatus {
            url: self.url.clone(),
            agent_group: self.identity.agent_group.clone(),
            service: self.identity.service.clone(),
            instance: self.identity.instance.clone(),
            connected: self.metrics.connected.get() == 1,
            connected_since_unix_ms: state.connected_since_unix_ms,
            last_decisions_unix_ms: state.last_decisions_unix_ms,
            last_error: state.last_error,
            decisions: Applied::ALL
                .iter()
                .map(|a| {
                    let n = self
                        .metrics
                        .decisions
                        .with_label_values(&[a.as_str()])
                        .get();
                    (a.as_str(), n)
                })
                .collect(),
        }
    }

    fn connected(&self) {
        self.metrics.connected.set(1);
        self.state.lock().connected_since_unix_ms = Some(unix_ms());
    }

    fn delivered(&self) {
        self.state.lock().last_decisions_unix_ms = Some(unix_ms());
    }

    fn ended(&self, error: Option<String>) {
        self.metrics.connected.set(0);
        let mut state = self.state.lock();
        state.connected_since_unix_ms = None;
        state.last_error =
            Some(error.unwrap_or_else(|| "the controller closed the subscription".into()));
    }
}

/// Applies a decision set; returns how many were put in force. The first
/// invalid decision is logged (and `warned` set), the rest only counted: a
/// broken controller repeats itself every tick.
pub fn apply(
    engine: &Engine,
    set: &wire::DecisionSet,
    metrics: &ControlMetrics,
    warned: &mut bool,
) -> usize {
    let now = unix_ms();
    let mut applied = 0;
    let mut invalid = |d: &wire::Decision, why: &str| {
        metrics.decisions.with_label_values(&["invalid"]).inc();
        if !std::mem::replace(warned, true) {
            tracing::warn!(
                policy = %d.policy_name, why,
                "refused a controller decision (later ones are only counted in controller_decisions_total{{result=\"invalid\"}})"
            );
        }
    };
    for d in &set.decisions {
        let Some(action) = &d.action else {
            invalid(d, "no action");
            continue;
        };
        let Ok(policy_hash) = u64::from_str_radix(&d.policy_hash, 16) else {
            invalid(d, "a policy hash that is not hex");
            continue;
        };
        let action = match action {
            WireAction::LoadMultiplier(l) => Action::LoadMultiplier {
                component: &l.load_scheduler,
                value: l.multiplier,
            },
            WireAction::RateLimit(r) => Action::RateLimit {
                component: &r.rate_limiter,
                bucket_capacity: r.bucket_capacity,
                fill_amount: r.fill_amount,
            },
            WireAction::AcceptPercentage(a) => Action::AcceptPercentage {
                component: &a.sampler,
                value: a.percentage,
            },
            WireAction::MaxConcurrency(m) => Action::MaxConcurrency {
                component: &m.concurrency_limiter,
                value: m.max_concurrency,
            },
            WireAction::QuotaBucket(q) => Action::QuotaBucket {
                component: &q.quota_scheduler,
                bucket_capacity: q.bucket_capacity,
                fill_amount: q.fill_amount,
            },
            WireAction::SchedulerConcurrency(c) => Action::SchedulerConcurrency {
                component: &c.concurrency_scheduler,
                value: c.max_concurrency,
            },
        };
        let valid_for =
            Duration::from_millis(d.valid_until_unix_ms.saturating_sub(now).max(0) as u64);
        match engine.apply(&ControlDecision {
            policy: &d.policy_name,
            policy_hash,
            valid_for,
            action,
        }) {
            Applied::Invalid(why) => invalid(d, why),
            outcome => {
                metrics
                    .decisions
                    .with_label_values(&[outcome.as_str()])
                    .inc();
                if outcome == Applied::Applied {
                    applied += 1;
                }
            }
        }
    }
    applied
}

/// Subscribes to the controller at `url` and applies what it sends, until
/// `shutdown`; reconnects with backoff.
pub async fn subscribe(
    engine: Arc<Engine>,
    url: http::Uri,
    link: ControllerLink,
    status: Arc<Link>,
    mut shutdown: Shutdown,
) {
    let (identity, metrics) = (&status.identity, &status.metrics);
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let mut said_down = false;
    loop {
        // Whether this session brought any decisions: only then was it a
        // working connection after which retrying fast is right. A
        // controller that accepts and hangs up at once keeps backing off.
        let mut delivered = false;
        let session = async {
            let channel = sluice_runtime::grpc::connect(&url, &link.tls).await?;
            let mut client = wire::control_client::ControlClient::new(channel);
            let mut request = tonic::Request::new(wire::SubscribeRequest {
                agent_group: identity.agent_group.clone(),
                service: identity.service.clone(),
                instance: identity.instance.clone(),
            });
            if let Some(file) = &link.token {
                let header = TokenFile::header(&file.read().await?);
                request
                    .metadata_mut()
                    .insert("authorization", header.parse()?);
            }
            let mut stream = client.subscribe(request).await?.into_inner();
            status.connected();
            tracing::info!(controller = %url, "subscribed to the controller");
            let mut warned = false;
            while let Some(set) = stream.message().await? {
                delivered = true;
                status.delivered();
                apply(&engine, &set, metrics, &mut warned);
            }
            anyhow::Ok(())
        };
        let result = tokio::select! {
            r = session => r,
            _ = shutdown.wait() => return,
        };
        status.ended(result.as_ref().err().map(|e| format!("{e:#}")));
        if delivered {
            backoff.reset();
            said_down = false;
        }
        match result {
            Ok(()) => {
                tracing::warn!(controller = %url, "controller closed the subscription; reconnecting")
            }
            Err(e) if !said_down => {
                let refused = e
                    .downcast_ref::<tonic::Status>()
                    .is_some_and(|s| s.code() == tonic::Code::Unauthenticated);
                if refused {
                    tracing::error!(controller = %url, error = %e, "the controller refused this sidecar: check --controller-token-file; retrying with backoff");
                } else {
                    tracing::warn!(controller = %url, error = %format!("{e:#}"), "cannot reach the controller; retrying with backoff");
                }
                said_down = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = shutdown.wait() => return,
        }
    }
}
