//! The shared store of Sluice's global limits (`scope: global`), on Redis
//! and anything that speaks its protocol (Valkey, KeyDB, managed Redis):
//! the engine's [`Store`] trait, implemented with the `redis` crate.
//!
//! Layout:
//! - this file: [`RedisStore`]: one multiplexed connection per node (a
//!   connection manager for one server, the cluster client's connections
//!   for a cluster; never a pool that grows when Redis stalls), a deadline
//!   on every call, and the [`breaker`];
//! - [`scripts`]: the Lua scripts, one key each (so one cluster slot), on
//!   Redis's clock;
//! - [`breaker`]: stops calling a store that keeps failing, and probes it
//!   again with backoff and jitter;
//! - [`config`]: what `--redis-url` and its companions say.
//!
//! Keys: `sluice:{<policy>/<component>[/<label id>]}:<kind>`. The braces
//! are a cluster hash tag, so one bucket or count lives in one slot; the
//! policy and component name it, so different policies never collide and
//! every sidecar running the same policy shares it; a label value appears
//! as the first 16 bytes of its SHA-256 (the engine's `leases::label_id`),
//! so its size costs nothing and no client can choose a value that shares
//! another's state.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod breaker;
pub mod config;
pub mod scripts;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use sluice_engine::store::{StateId, Store, StoreError, StoreFuture, TokenGrant};
use sluice_engine::token_bucket::BucketParams;
use sluice_time::Clock;
use tokio::sync::mpsc;

use breaker::Breaker;
pub use config::RedisConfig;

/// Slot returns waiting to be sent; beyond this many, a return is dropped
/// and its slot lapses at its ttl instead.
const RETURN_QUEUE: usize = 10_000;

/// The store's own metrics.
#[derive(Clone)]
struct StoreMetrics {
    /// `store_up`: 1 while the store answers.
    up: IntGauge,
    /// `store_request_duration_seconds{op}`.
    latency: HistogramVec,
    /// `store_errors_total{op, kind}`: `timeout`, `error`, `unavailable`.
    errors: IntCounterVec,
    /// `store_breaker_state`: 0 closed, 1 open, 2 probing.
    breaker: IntGauge,
}

impl StoreMetrics {
    fn register(registry: &Registry) -> anyhow::Result<Self> {
        let up = IntGauge::new(
            "store_up",
            "1 while the global limits' store (Redis) answers.",
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "store_request_duration_seconds",
                "Round trips to the global limits' store, by operation.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
            &["op"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "store_errors_total",
                "Calls to the global limits' store that failed, by operation and kind (timeout, error, unavailable).",
            ),
            &["op", "kind"],
        )?;
        let breaker = IntGauge::new(
            "store_breaker_state",
            "The store's circuit breaker: 0 closed, 1 open (not called), 2 probing.",
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(breaker.clone()))?;
        Ok(StoreMetrics {
            up,
            latency,
            errors,
            breaker,
        })
    }
}

/// A connection: one server's manager, or a cluster's client.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The store, on Redis.
pub struct RedisStore {
    /// Itself, for futures that outlive a call.
    me: std::sync::Weak<RedisStore>,
    /// The connection; `None` until a cluster's first connection succeeds.
    connection: RwLock<Option<Connection>>,
    /// For round-trip times.
    clock: Clock,
    /// Deadline of every call.
    timeout: Duration,
    breaker: Breaker,
    metrics: StoreMetrics,
    take_tokens: redis::Script,
    take_slot: redis::Script,
    /// Slots to give back, sent by a background task.
    returns: mpsc::Sender<(String, String)>,
    /// What it is, for logs.
    describe: String,
}

impl RedisStore {
    /// Connects to the store `config` names (lazily: a store that is down
    /// at start is a store that is down, not a sidecar that does not
    /// start), registers its metrics in `registry`, and starts the task
    /// that gives slots back. Needs a tokio runtime.
    pub fn start(
        config: &RedisConfig,
        registry: &Registry,
        clock: Clock,
    ) -> anyhow::Result<Arc<RedisStore>> {
        let metrics = StoreMetrics::register(registry)?;
        let (returns, queue) = mpsc::channel(RETURN_QUEUE);
        let store = Arc::new_cyclic(|me| RedisStore {
            me: me.clone(),
            connection: RwLock::new(None),
            breaker: Breaker::new(clock.clone(), metrics.breaker.clone()),
            clock,
            timeout: config.timeout,
            metrics,
            take_tokens: redis::Script::new(scripts::TAKE_TOKENS),
            take_slot: redis::Script::new(scripts::TAKE_SLOT),
            returns,
            describe: config.describe(),
        });
        if config.cluster {
            let client = config.cluster_client()?;
            let connecting = Arc::downgrade(&store);
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(100);
                loop {
                    let Some(store) = connecting.upgrade() else {
                        return;
                    };
                    match client.get_async_connection().await {
                        Ok(conn) => {
                            *store.connection.write() = Some(Connection::Cluster(conn));
                            tracing::info!(store = %store.describe, "connected to the Redis cluster");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(store = %store.describe, error = %e, "cannot reach the Redis cluster yet; global limits fall back meanwhile");
                        }
                    }
                    drop(store);
                    let jitter =
                        Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4));
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            });
        } else {
            let client = config.client()?;
            let manager = ConnectionManager::new_lazy_with_config(
                client.clone(),
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(250))))
                    .set_response_timeout(Some(config.timeout))
                    .set_min_delay(Duration::from_millis(100))
                    .set_max_delay(Duration::from_secs(10)),
            )?;
            *store.connection.write() = Some(Connection::Single(manager));
            // The manager connects (and reconnects) on its own, but a call
            // waiting on it only times out; this probe says why it cannot
            // connect (refused, wrong password, TLS), once per reason.
            tokio::spawn(first_contact(
                client,
                config.timeout,
                store.describe.clone(),
            ));
        }
        tokio::spawn(give_back_slots(Arc::downgrade(&store), queue));
        tracing::info!(store = %store.describe, timeout = ?config.timeout, "global limits in the store");
        Ok(store)
    }

    /// Runs `script` on the store within the deadline, through the breaker,
    /// timing and counting it.
    async fn run<T: redis::FromRedisValue + Send>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let connection = self.connection.read().clone();
        let Some(connection) = connection.filter(|_| self.breaker.allows()) else {
            self.metrics
                .errors
                .with_label_values(&[op, "unavailable"])
                .inc();
            return Err(StoreError::Unavailable);
        };
        let started = self.clock.now();
        let call = async {
            match connection {
                Connection::Single(mut c) => invocation.invoke_async(&mut c).await,
                Connection::Cluster(mut c) => invocation.invoke_async(&mut c).await,
            }
        };
        let outcome = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout),
            Ok(Err(e)) => Err(StoreError::Failed(e.to_string())),
            Err(_) => Err(StoreError::Timeout),
        };
        self.metrics
            .latency
            .with_label_values(&[op])
            .observe(self.clock.now().saturating_sub(started) as f64 / 1e9);
        match &outcome {
            Ok(_) => {
                self.metrics.up.set(1);
                if self.breaker.success() {
                    tracing::info!(store = %self.describe, "store reachable again; global limits back in force");
                }
            }
            Err(e) => {
                let kind = if *e == StoreError::Timeout {
                    "timeout"
                } else {
                    "error"
                };
                self.metrics.errors.with_label_values(&[op, kind]).inc();
                if self.breaker.failure() {
                    self.metrics.up.set(0);
                    tracing::warn!(store = %self.describe, error = %e, "store unavailable; global limits fall back (on_store_unavailable) until it answers again");
                }
            }
        }
        outcome
    }
}

/// Connects once, as the connection manager will, and logs why it cannot
/// until it can: the reason a store is unavailable at start (a refused
/// password, an unreachable address, a TLS failure) belongs in the log,
/// not behind calls that time out.
async fn first_contact(client: redis::Client, timeout: Duration, describe: String) {
    let mut backoff = Duration::from_millis(100);
    let mut said = String::new();
    loop {
        let attempt = tokio::time::timeout(timeout.max(Duration::from_millis(250)), async {
            let mut c = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await;
        let reason = match attempt {
            Ok(Ok(_)) => {
                tracing::info!(store = %describe, "connected to Redis");
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in time".to_owned(),
        };
        if reason != said {
            tracing::warn!(store = %describe, error = %reason, "cannot use Redis yet; global limits fall back (on_store_unavailable) meanwhile");
            said = reason;
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The key of one piece of shared state.
fn key(id: &StateId<'_>, kind: &str) -> String {
    match id.label {
        Some(label) => format!("sluice:{{{}/{}/{}}}:{kind}", id.policy, id.component, label),
        None => format!("sluice:{{{}/{}}}:{kind}", id.policy, id.component),
    }
}

impl Store for RedisStore {
    fn take_tokens(
        &self,
        id: StateId<'_>,
        params: BucketParams,
        want: f64,
        min: f64,
    ) -> StoreFuture<TokenGrant> {
        let key = key(&id, "bucket");
        let this = self.handle();
        Box::pin(async move {
            let Some(this) = this else {
                return Err(StoreError::Unavailable);
            };
            let mut invocation = this.take_tokens.prepare_invoke();
            invocation
                .key(key)
                .arg(params.capacity)
                .arg(params.fill_amount)
                .arg((params.interval / 1_000).max(1))
                .arg(u8::from(params.continuous))
                .arg(want)
                .arg(min);
            let (granted, wait): (String, i64) = this.run("take_tokens", &invocation).await?;
            let granted: f64 = granted
                .parse()
                .ok()
                .filter(|g: &f64| g.is_finite() && *g >= 0.0 && *g <= want.max(min))
                .ok_or_else(|| StoreError::Failed(format!("not a grant: {granted:?}")))?;
            Ok(TokenGrant {
                granted,
                retry_after: (wait >= 0).then(|| Duration::from_micros(wait as u64)),
            })
        })
    }

    fn take_slot(
        &self,
        id: StateId<'_>,
        max: u64,
        holder: u64,
        ttl: Duration,
    ) -> StoreFuture<bool> {
        let key = key(&id, "inflight");
        let this = self.handle();
        Box::pin(async move {
            let Some(this) = this else {
                return Err(StoreError::Unavailable);
            };
            let mut invocation = this.take_slot.prepare_invoke();
            invocation
                .key(key)
                .arg(max)
                .arg(format!("{holder:016x}"))
                .arg(ttl.as_millis().max(1) as u64);
            let taken: i64 = this.run("take_slot", &invocation).await?;
            Ok(taken == 1)
        })
    }

    fn give_back_slot(&self, id: StateId<'_>, holder: u64) {
        // Full: the slot lapses at its ttl instead.
        let _ = self
            .returns
            .try_send((key(&id, "inflight"), format!("{holder:016x}")));
    }

    fn available(&self) -> bool {
        self.breaker.may_call()
    }
}

impl RedisStore {
    /// This store, for a future that outlives the call (the store lives as
    /// long as the sidecar; `None` only while it is being dropped).
    fn handle(&self) -> Option<Arc<RedisStore>> {
        self.me.upgrade()
    }
}

/// Sends slot returns (`ZREM`) one after another, so that a Check never
/// waits for one, and a slow store gets one command at a time.
async fn give_back_slots(
    store: std::sync::Weak<RedisStore>,
    mut queue: mpsc::Receiver<(String, String)>,
) {
    while let Some((key, holder)) = queue.recv().await {
        let Some(store) = store.upgrade() else { return };
        let Some(connection) = store.connection.read().clone() else {
            continue;
        };
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(&key).arg(&holder);
        let call = async {
            match connection {
                Connection::Single(mut c) => c.req_packed_command(&cmd).await,
                Connection::Cluster(mut c) => c.req_packed_command(&cmd).await,
            }
        };
        if !matches!(tokio::time::timeout(store.timeout, call).await, Ok(Ok(_))) {
            store
                .metrics
                .errors
                .with_label_values(&["give_back_slot", "error"])
                .inc();
        }
    }
}
