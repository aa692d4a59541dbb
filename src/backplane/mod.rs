//! The Redis backplane: the shared command link (XADD, PUBLISH, PING), the pub/sub link, their
//! health, and the key names everything agrees on.

pub mod durability;
pub mod health;
pub mod interest;
pub mod pubsub;
pub mod script;
pub mod sentinel;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{Config, RedisConfig};
use crate::metrics::{Metrics, RedisErrorKind};

/// Key and channel names under `redis.prefix`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// Pub/sub channel every replica listens on.
    pub broadcast: String,
    /// Lifecycle events stream.
    pub events: String,
    /// This replica's pub/sub health channel.
    pub health: String,
    /// This replica's own pub/sub channel: answers addressed to it (reach reports; under
    /// interest routing also subscribe acknowledgements, and connection and user messages).
    pub own: String,
}

impl Keys {
    /// Names for `prefix` and this replica.
    pub fn new(prefix: &str, replica_id: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            broadcast: format!("{prefix}:broadcast"),
            events: format!("{prefix}:events"),
            health: format!("{prefix}:health:{replica_id}"),
            own: format!("{prefix}:replica:{replica_id}"),
        }
    }

    /// Interest routing: the pub/sub channel of `channel`.
    pub fn channel(&self, channel: &str) -> String {
        format!("{}:ch:{{{channel}}}", self.prefix)
    }

    /// The channel a pub/sub channel name from [`Keys::channel`] stands for.
    pub fn channel_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(self.prefix.as_str())?
            .strip_prefix(":ch:{")?
            .strip_suffix('}')
    }

    /// The pub/sub channel of replica `replica` ([`Keys::own`] is this replica's).
    pub fn replica(&self, replica: &str) -> String {
        format!("{}:replica:{replica}", self.prefix)
    }

    /// Interest routing: the replicas holding connections of `user` (a sorted set scored by
    /// expiry, unix ms).
    pub fn user_replicas(&self, user: &str) -> String {
        format!("{}:user-replicas:{user}", self.prefix)
    }

    /// The key of inbound stream `stream`.
    pub fn inbound(&self, stream: &str) -> String {
        format!("{}:in:{stream}", self.prefix)
    }

    // Keys used together carry the same hash tag (`{...}`), so on a Redis Cluster they live in
    // one slot: a channel's history stream, epoch and pub/sub channel are tagged with the channel,
    // and a dedupe bucket with its inbound stream's key.

    /// The history stream of `channel`.
    pub fn history(&self, channel: &str) -> String {
        format!("{}:history:{{{channel}}}", self.prefix)
    }

    /// The epoch of `channel`'s history: it changes whenever the history was lost.
    pub fn epoch(&self, channel: &str) -> String {
        format!("{}:epoch:{{{channel}}}", self.prefix)
    }

    /// Which Redis incarnation last wrote `channel`'s history, and whether it persisted every
    /// write before answering: decides whether the history's epoch still holds after Redis
    /// restarted or failed over (`outbound::history`).
    pub fn writer(&self, channel: &str) -> String {
        format!("{}:writer:{{{channel}}}", self.prefix)
    }

    /// A presence channel's members: connection id → `<user key>\n<member JSON>`. In the
    /// channel's hash slot, with the keys below.
    pub fn presence(&self, channel: &str) -> String {
        format!("{}:presence:{{{channel}}}", self.prefix)
    }

    /// A presence channel's users: user key → how many of its connections are in.
    pub fn presence_users(&self, channel: &str) -> String {
        format!("{}:presence-users:{{{channel}}}", self.prefix)
    }

    /// The members of a presence channel that `replica` holds (a set of connection ids).
    pub fn presence_of(&self, channel: &str, replica: &str) -> String {
        format!("{}:presence-of:{{{channel}}}:{replica}", self.prefix)
    }

    /// The presence channels where `replica` has (or had) members.
    pub fn presence_channels(&self, replica: &str) -> String {
        format!("{}:presence-channels:{replica}", self.prefix)
    }

    /// Replicas and when each stops counting as alive (unix ms, Redis's clock).
    pub fn replicas_alive(&self) -> String {
        format!("{}:replicas-alive", self.prefix)
    }

    /// A signed-in user's connections anywhere: connection id → replica.
    pub fn user_connections(&self, user: &str) -> String {
        format!("{}:user-connections:{{{user}}}", self.prefix)
    }

    /// When a user's last connection closed (unix ms, Redis's clock).
    pub fn user_seen(&self, user: &str) -> String {
        format!("{}:user-seen:{{{user}}}", self.prefix)
    }

    /// The users with connections on `replica`.
    pub fn users_of(&self, replica: &str) -> String {
        format!("{}:users-of:{replica}", self.prefix)
    }

    /// Held by the replica that removes a dead `replica`'s presence members.
    pub fn presence_sweep(&self, replica: &str) -> String {
        format!("{}:presence-sweep:{replica}", self.prefix)
    }

    /// The prefix of inbound stream `stream`'s dedupe buckets, `{<prefix>:in:<stream>}:dedupe:`,
    /// which the slice number completes ([`crate::inbound::dedupe`]).
    pub fn dedupe_buckets(&self, stream: &str) -> String {
        format!("{{{}}}:dedupe:", self.inbound(stream))
    }
}

/// Why a Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisFailure {
    /// No answer in time.
    #[error("Redis did not answer within {0} ms")]
    Timeout(u64),
    /// Redis or the connection reported an error.
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// The primary took the write, but fewer replicas than asked confirmed it in time (`WAIT`).
    #[error(
        "stored on the primary, but only {got} of {wanted} replicas confirmed it within {ms} ms"
    )]
    NotReplicated {
        /// `redis.wait_replicas`.
        wanted: u32,
        /// Replicas that confirmed.
        got: u64,
        /// `redis.wait_timeout_ms`.
        ms: u64,
    },
    /// Under Sentinel, the node the link reached is no longer the primary (it was demoted).
    #[error("{0} is not the primary any more; finding the new one")]
    NotPrimary(String),
}

impl RedisFailure {
    /// The metric label for this failure.
    pub fn kind(&self) -> RedisErrorKind {
        match self {
            RedisFailure::Timeout(_) | RedisFailure::NotReplicated { .. } => {
                RedisErrorKind::Timeout
            }
            RedisFailure::NotPrimary(_) => RedisErrorKind::Server,
            RedisFailure::Redis(e) if e.is_timeout() => RedisErrorKind::Timeout,
            RedisFailure::Redis(e) if e.code().is_some() => RedisErrorKind::Server,
            RedisFailure::Redis(_) => RedisErrorKind::Connection,
        }
    }

    /// Whether trying again later may succeed: no answer in time, a lost or refused connection,
    /// or a cluster in the middle of a failover or resharding (TRYAGAIN, CLUSTERDOWN, LOADING,
    /// MOVED...). An error reply about the command itself (a wrong type, a script error) is not.
    pub fn is_transient(&self) -> bool {
        use redis::ServerErrorKind as S;
        match self {
            RedisFailure::Timeout(_)
            | RedisFailure::NotReplicated { .. }
            | RedisFailure::NotPrimary(_) => true,
            RedisFailure::Redis(e) => {
                // Error replies, also those inside an aborted MULTI or a pipeline: transient
                // only if every one of them is about the cluster's state, not the command.
                if let Some(replies) = e.clone().into_server_errors() {
                    return !replies.is_empty()
                        && replies.iter().all(|(_, reply)| {
                            matches!(
                                reply.kind(),
                                Some(
                                    S::TryAgain
                                        | S::MasterDown
                                        | S::ClusterDown
                                        | S::BusyLoading
                                        | S::Moved
                                        | S::Ask
                                        | S::ReadOnly
                                )
                            )
                        });
                }
                // A Sentinel naming no primary: a failover is under way.
                matches!(
                    e.kind(),
                    redis::ErrorKind::Io
                        | redis::ErrorKind::ClusterConnectionNotFound
                        | redis::ErrorKind::MasterNameNotFoundBySentinel
                ) || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
            }
        }
    }

    /// Whether Redis may have applied the command anyway: a timeout or a connection lost after
    /// sending leaves it unknown; a refused connection or an error reply means it was not applied.
    pub fn maybe_applied(&self) -> bool {
        match self {
            RedisFailure::Timeout(_) | RedisFailure::NotReplicated { .. } => true,
            RedisFailure::NotPrimary(_) => false,
            RedisFailure::Redis(e) => {
                // The connection manager hands every waiting command a clone of its reconnect
                // error, and cloning drops the io::Error, so a refusal is only visible in the text.
                let refused =
                    e.is_connection_refusal() || e.to_string().contains("Connection refused");
                !refused && (e.is_timeout() || e.is_connection_dropped() || e.is_io_error())
            }
        }
    }
}

/// What `/readyz` reports, updated by the health loops.
pub struct Health {
    epoch: Instant,
    unhealthy_after_ms: u64,
    command_ok_ms: AtomicU64,
    pubsub_ok_ms: AtomicU64,
    shutting_down: AtomicBool,
    last_error: Mutex<String>,
}

impl Health {
    /// Fresh state: not ready until both links have answered once.
    pub fn new(unhealthy_after_ms: u64) -> Self {
        Self {
            epoch: Instant::now(),
            unhealthy_after_ms,
            command_ok_ms: AtomicU64::new(0),
            pubsub_ok_ms: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            last_error: Mutex::new("starting: Redis not reached yet".into()),
        }
    }

    fn now_ms(&self) -> u64 {
        // Offset by one so that 0 keeps meaning "never".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The command link answered.
    pub fn command_ok(&self) {
        self.command_ok_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A pub/sub round trip completed.
    pub fn pubsub_ok(&self) {
        self.pubsub_ok_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Seconds since the last pub/sub round trip, or since start when there was none.
    pub fn pubsub_age_seconds(&self) -> f64 {
        let ms = self
            .pubsub_age_ms()
            .unwrap_or_else(|| self.epoch.elapsed().as_millis() as u64);
        ms as f64 / 1000.0
    }

    /// Milliseconds since the last pub/sub round trip, if any.
    pub fn pubsub_age_ms(&self) -> Option<u64> {
        let at = self.pubsub_ok_ms.load(Ordering::Relaxed);
        (at != 0).then(|| self.now_ms().saturating_sub(at))
    }

    /// Records the latest failure, for `/readyz`.
    pub fn failed(&self, what: String) {
        *self.last_error.lock().expect("health lock") = what;
    }

    /// Marks the replica as draining: `/readyz` answers 503 from now on.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// `Ok` when ready, else a one-line reason.
    ///
    /// # Errors
    /// The reason the replica is not ready.
    pub fn readiness(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        let now = self.now_ms();
        let stale = |at: u64| at == 0 || now.saturating_sub(at) > self.unhealthy_after_ms;
        let last_error = || self.last_error.lock().expect("health lock").clone();
        if stale(self.command_ok_ms.load(Ordering::Relaxed)) {
            return Err(format!("Redis command link down: {}", last_error()));
        }
        if stale(self.pubsub_ok_ms.load(Ordering::Relaxed)) {
            return Err(format!(
                "Redis pub/sub round trip failing: {}",
                last_error()
            ));
        }
        Ok(())
    }
}

/// The shared, multiplexed command link. Cloning is cheap; concurrent commands from many tasks
/// are batched into shared writes by redis-rs.
#[derive(Clone)]
pub struct Backplane {
    link: Link,
    timeout: Duration,
    metrics: Metrics,
}

/// A single Redis, a Redis Cluster (commands are routed by key slot), or a primary found
/// through Sentinel.
#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(Arc<ClusterLink>),
    Sentinel(Arc<SentinelLink>),
}

/// A connection to the primary Sentinel names, made on first use and again after a failure
/// that was not Redis answering, or a `READONLY` reply: each new connection asks the Sentinels
/// first ([`sentinel::Primary::locate`]). `ConnectionManager` cannot do this: it reconnects to
/// the address it was built with.
struct SentinelLink {
    primary: Arc<sentinel::Primary>,
    config: redis::AsyncConnectionConfig,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl SentinelLink {
    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, redis::RedisError> {
        let mut conn = self.conn.lock().await;
        if let Some(conn) = conn.as_ref() {
            return Ok(conn.clone());
        }
        let primary = self.primary.locate().await?;
        let made = redis::Client::open(primary)?
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *conn = Some(made.clone());
        Ok(made)
    }

    /// Drops the connection: the next command finds the primary again.
    fn reset(&self) {
        if let Ok(mut conn) = self.conn.try_lock() {
            *conn = None;
        }
    }
}

/// A cluster connection, made on first use and again after it failed to be made.
struct ClusterLink {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<Option<redis::cluster_async::ClusterConnection>>,
}

impl ClusterLink {
    async fn conn(&self) -> Result<redis::cluster_async::ClusterConnection, redis::RedisError> {
        let mut conn = self.conn.lock().await;
        if let Some(conn) = conn.as_ref() {
            return Ok(conn.clone());
        }
        let made = self.client.get_async_connection().await?;
        *conn = Some(made.clone());
        Ok(made)
    }

    /// Drops the connection after a failure that was not Redis answering: the next command
    /// makes a fresh one (with a fresh view of the cluster), as the single-Redis connection
    /// manager reconnects.
    fn reset(&self) {
        if let Ok(mut conn) = self.conn.try_lock() {
            *conn = None;
        }
    }
}

/// A cluster client builder for `cfg.cluster_urls`, with the configured timeouts.
pub(crate) fn cluster_builder(cfg: &RedisConfig) -> redis::cluster::ClusterClientBuilder {
    redis::cluster::ClusterClientBuilder::new(cfg.cluster_urls.clone())
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .response_timeout(Duration::from_millis(cfg.command_timeout_ms))
        .retries(2)
        .min_retry_wait(50)
        .max_retry_wait(cfg.reconnect_max_backoff_ms)
}

impl Backplane {
    /// Creates the link lazily: it connects on first use and reconnects after failures, so a
    /// replica starts while Redis is away and recovers when it returns.
    ///
    /// # Errors
    /// When the URL cannot be used (validated earlier, so rare).
    pub fn new(cfg: &RedisConfig, metrics: Metrics) -> Result<Self, RedisFailure> {
        let link = if !cfg.sentinel_urls.is_empty() {
            Link::Sentinel(Arc::new(SentinelLink {
                primary: Arc::new(sentinel::Primary::new(cfg)?),
                config: redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)))
                    .set_response_timeout(Some(Duration::from_millis(cfg.command_timeout_ms))),
                conn: tokio::sync::Mutex::new(None),
            }))
        } else if cfg.cluster_urls.is_empty() {
            let client = redis::Client::open(cfg.url.as_str())?;
            let manager_cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)))
                .set_response_timeout(Some(Duration::from_millis(cfg.command_timeout_ms)))
                // One quick retry: callers get an answer (often an error) fast, and the health
                // loop keeps reconnecting in the background while Redis is away.
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(cfg.reconnect_max_backoff_ms));
            Link::Single(ConnectionManager::new_lazy_with_config(
                client,
                manager_cfg,
            )?)
        } else {
            let client = cluster_builder(cfg).build()?;
            Link::Cluster(Arc::new(ClusterLink {
                client,
                conn: tokio::sync::Mutex::new(None),
            }))
        };
        Ok(Self {
            link,
            timeout: Duration::from_millis(cfg.command_timeout_ms),
            metrics,
        })
    }

    /// Whether this is a Redis Cluster: multi-key commands and pipelines must stay in one slot,
    /// and channel traffic uses sharded pub/sub.
    pub fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    /// Under Sentinel, what finds the primary (the pub/sub link follows it too).
    pub fn primary(&self) -> Option<Arc<sentinel::Primary>> {
        match &self.link {
            Link::Sentinel(link) => Some(link.primary.clone()),
            _ => None,
        }
    }

    /// Checks the command link: `PING`; under Sentinel `ROLE`, which must say `master`, or the
    /// link is dropped so that the next command finds the new primary.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis failed or did not answer in time, or
    /// [`RedisFailure::NotPrimary`] when the node was demoted.
    pub async fn ping(&self) -> Result<(), RedisFailure> {
        let Link::Sentinel(link) = &self.link else {
            return self.query::<String>(&redis::cmd("PING")).await.map(|_| ());
        };
        let role: Vec<redis::Value> = self.query(&redis::cmd("ROLE")).await?;
        if sentinel::is_master_role(&role) {
            return Ok(());
        }
        link.reset();
        let node = link.primary.known_addr().unwrap_or_default();
        self.count(Err(RedisFailure::NotPrimary(node)))
    }

    /// Runs one command with the configured timeout.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis failed or did not answer in time.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisFailure> {
        self.bounded(self.send(cmd)).await
    }

    /// Waits until `replicas` replicas hold every write this link sent before (`WAIT`), at most
    /// `timeout_ms`. `key` names the slot whose master took the writes on a cluster (there each
    /// node has its own connection, and WAIT counts that connection's writes only); on a single
    /// Redis every command shares the one connection. A no-op for 0 replicas.
    ///
    /// # Errors
    /// [`RedisFailure::NotReplicated`] when fewer confirmed in time, and also when the `WAIT`
    /// itself failed: the writes before it were taken by the primary, so whatever went wrong
    /// afterwards (a connection refused once the primary died, say) leaves them "may have been
    /// stored", never "nothing was sent".
    pub async fn wait_replicas(
        &self,
        key: &str,
        replicas: u32,
        timeout_ms: u64,
    ) -> Result<(), RedisFailure> {
        if replicas == 0 {
            return Ok(());
        }
        self.wait_for(key, replicas, timeout_ms)
            .await
            .map_err(|failure| match failure {
                RedisFailure::NotReplicated { .. } => failure,
                other => {
                    tracing::debug!(error = %other, "WAIT failed after the primary took the writes");
                    RedisFailure::NotReplicated {
                        wanted: replicas,
                        got: 0,
                        ms: timeout_ms,
                    }
                }
            })
    }

    async fn wait_for(
        &self,
        key: &str,
        replicas: u32,
        timeout_ms: u64,
    ) -> Result<(), RedisFailure> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout_ms);
        let got: u64 = match &self.link {
            // One multiplexed connection carries every write, so WAIT covers them.
            Link::Single(_) | Link::Sentinel(_) => self.query(&cmd).await?,
            Link::Cluster(link) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let run = async {
                    let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                    let routing =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                    let answer = link.conn().await?.route_command(cmd, routing).await?;
                    redis::from_redis_value::<u64>(answer).map_err(redis::RedisError::from)
                };
                self.bounded(run).await?
            }
        };
        if got < u64::from(replicas) {
            // Counted, but not a link failure: the cluster connection is not reset for it.
            let failure = RedisFailure::NotReplicated {
                wanted: replicas,
                got,
                ms: timeout_ms,
            };
            self.metrics.redis_error(failure.kind()).increment(1);
            return Err(failure);
        }
        Ok(())
    }

    /// Runs one command on every master (the one Redis without a cluster), with the configured
    /// timeout: each node's answer, keyed by its address (`""` without a cluster).
    ///
    /// # Errors
    /// [`RedisFailure`] when a node failed or did not answer in time.
    pub async fn query_each_master<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<Vec<(String, T)>, RedisFailure> {
        use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
        let link = match &self.link {
            Link::Single(_) | Link::Sentinel(_) => {
                return Ok(vec![(String::new(), self.query(cmd).await?)])
            }
            Link::Cluster(link) => link,
        };
        let run = async {
            let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            let answers = link
                .conn()
                .await?
                .route_command(cmd.clone(), routing)
                .await?;
            redis::from_redis_value::<std::collections::HashMap<String, T>>(answers)
                .map_err(redis::RedisError::from)
        };
        self.bounded(run).await.map(|m| m.into_iter().collect())
    }

    /// Calls a script by its SHA (EVALSHA) with the configured timeout; where Redis answers
    /// NOSCRIPT, loads it and calls it again (see [`script`]).
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis failed or did not answer in time.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &script::Invocation<'_>,
    ) -> Result<T, RedisFailure> {
        let cmd = invocation.cmd();
        let scripts = [invocation.script()];
        let run = self.loading(&scripts, || self.send(&cmd));
        self.bounded(run).await
    }

    /// Runs `run`; where Redis answers NOSCRIPT, loads `scripts` (each once) and runs it again.
    async fn loading<T, F>(
        &self,
        scripts: &[&script::Script],
        run: impl Fn() -> F,
    ) -> redis::RedisResult<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match run().await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let mut loaded: Vec<&script::Script> = Vec::new();
                for &script in scripts {
                    if !loaded.iter().any(|s| std::ptr::eq(*s, script)) {
                        self.send::<()>(&script.load()).await?;
                        loaded.push(script);
                    }
                }
                run().await
            }
            result => result,
        }
    }

    /// `run` with the configured timeout, its failure counted ([`Backplane::count`]).
    async fn bounded<T>(
        &self,
        run: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisFailure> {
        let result = match tokio::time::timeout(self.timeout, run).await {
            Ok(result) => result.map_err(RedisFailure::from),
            Err(_) => Err(RedisFailure::Timeout(self.timeout.as_millis() as u64)),
        };
        self.count(result)
    }

    /// Sends one pipeline, with neither timeout nor counting.
    async fn send_pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> redis::RedisResult<T> {
        match &self.link {
            Link::Single(conn) => pipe.query_async(&mut conn.clone()).await,
            Link::Cluster(link) => pipe.query_async(&mut link.conn().await?).await,
            Link::Sentinel(link) => pipe.query_async(&mut link.conn().await?).await,
        }
    }

    /// Sends one command, with neither timeout nor counting.
    async fn send<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match &self.link {
            Link::Single(conn) => cmd.query_async(&mut conn.clone()).await,
            Link::Cluster(link) => cmd.query_async(&mut link.conn().await?).await,
            Link::Sentinel(link) => cmd.query_async(&mut link.conn().await?).await,
        }
    }

    /// Counts a failure in `wsbridge_redis_errors_total`; expected replies (an existing
    /// consumer group) are not failures.
    fn count<T>(&self, result: Result<T, RedisFailure>) -> Result<T, RedisFailure> {
        if let Err(e) = &result {
            let expected = matches!(e, RedisFailure::Redis(r) if r.code() == Some("BUSYGROUP"));
            if !expected {
                self.metrics.redis_error(e.kind()).increment(1);
            }
            let answered = e.kind() == RedisErrorKind::Server;
            match &self.link {
                Link::Cluster(link) if !answered => link.reset(),
                // A demoted primary answers writes with READONLY: find the new one.
                Link::Sentinel(link)
                    if !answered
                        || matches!(e, RedisFailure::Redis(r) if r.code() == Some("READONLY")) =>
                {
                    link.reset()
                }
                _ => {}
            }
        }
        result
    }

    /// Runs a pipeline with the configured timeout.
    ///
    /// # Errors
    /// [`RedisFailure`] when the pipeline as a whole failed.
    pub async fn query_pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RedisFailure> {
        self.bounded(self.send_pipeline(pipe)).await
    }

    /// Calls scripts by their SHA (EVALSHA) in one pipeline, with the configured timeout. When
    /// Redis does not know one (NOSCRIPT: it restarted, or failed over), loads the calls'
    /// scripts and runs the whole pipeline again: only for scripts that are safe to run twice.
    /// A pipeline of `EVAL`s would carry the script's text once per call.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis failed or did not answer in time, or a call failed.
    pub async fn invoke_pipeline<T: redis::FromRedisValue>(
        &self,
        calls: &[script::Invocation<'_>],
    ) -> Result<T, RedisFailure> {
        let mut pipe = redis::pipe();
        for call in calls {
            pipe.add_command(call.cmd());
        }
        let scripts: Vec<&script::Script> = calls.iter().map(|call| call.script()).collect();
        let run = self.loading(&scripts, || self.send_pipeline(&pipe));
        self.bounded(run).await
    }

    /// The metric handles, for callers that see per-command failures inside a pipeline.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Publishes one payload on `channel`.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis did not take it.
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), RedisFailure> {
        self.publish_counted(channel, payload).await.map(|_| ())
    }

    /// Publishes `payload` on `channel`, as [`Backplane::publish`] does, and returns how many
    /// subscribers received it (on a cluster, those on the channel's shard).
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis did not take it.
    pub async fn publish_counted(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> Result<usize, RedisFailure> {
        // SPUBLISH on a cluster: sharded pub/sub.
        let command = if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        self.query::<usize>(redis::cmd(command).arg(channel).arg(payload))
            .await
    }

    /// Creates the configured consumer groups (with MKSTREAM) on every inbound stream and every
    /// `publish_stream`; existing groups are kept.
    ///
    /// # Errors
    /// The first failure other than "group exists".
    pub async fn ensure_groups(&self, config: &Config, keys: &Keys) -> Result<(), RedisFailure> {
        for stream in &config.inbound_stream_names() {
            let key = keys.inbound(stream);
            for group in &config.inbound.groups {
                let result = self
                    .query::<()>(
                        redis::cmd("XGROUP")
                            .arg("CREATE")
                            .arg(&key)
                            .arg(group)
                            .arg("0")
                            .arg("MKSTREAM"),
                    )
                    .await;
                match result {
                    Ok(()) => {
                        tracing::info!(stream = %key, group = %group, "created consumer group")
                    }
                    Err(RedisFailure::Redis(e)) if e.code() == Some("BUSYGROUP") => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error redis-rs makes of an error reply.
    fn reply(text: &str) -> RedisFailure {
        let value = redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap();
        RedisFailure::Redis(value.extract_error().unwrap_err())
    }

    #[test]
    fn failures_worth_waiting_out_are_transient() {
        let io = |kind| RedisFailure::Redis(std::io::Error::new(kind, "test").into());
        assert!(RedisFailure::Timeout(1000).is_transient());
        assert!(io(std::io::ErrorKind::ConnectionRefused).is_transient());
        assert!(io(std::io::ErrorKind::BrokenPipe).is_transient());
        assert!(io(std::io::ErrorKind::ConnectionReset).is_transient());
        for text in [
            "CLUSTERDOWN The cluster is down",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "LOADING Redis is loading the dataset in memory",
            "MOVED 12005 127.0.0.1:7001",
            "MASTERDOWN Link with MASTER is down",
        ] {
            assert!(reply(text).is_transient(), "{text}");
        }
    }

    #[test]
    fn errors_about_the_command_itself_are_not_transient() {
        for text in [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "ERR unknown command",
            "NOSCRIPT No matching script",
            "NOPERM this user has no permissions",
        ] {
            assert!(!reply(text).is_transient(), "{text}");
        }
    }
}
