//! Configuration: a TOML file plus `WSBRIDGE__SECTION__KEY` environment overrides.
//!
//! Every key has a default, units are part of key names, unknown keys are refused, and
//! [`Config::load`] validates values so that a bad deployment stops at start-up with one line
//! naming the key, instead of failing later at run time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Keys holding lists, which environment variables give comma-separated.
const LIST_KEYS: [&str; 6] = [
    "server.allowed_origins",
    "redis.cluster_urls",
    "redis.sentinel_urls",
    "inbound.streams",
    "inbound.groups",
    "api.keys",
];

/// A configuration problem, always naming the key (or file) at fault, on one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// Folds multi-line messages (TOML parse errors quote the offending line) into one line.
    fn one_line(text: String) -> Self {
        let parts: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        Self(parts.join(" "))
    }

    fn key(key: &str, problem: impl std::fmt::Display) -> Self {
        Self(format!("config key `{key}`: {problem}"))
    }
}

/// The whole configuration. See `config/wsbridge.toml` for every key with its meaning.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners, connection timers and shutdown.
    pub server: ServerConfig,
    /// The Redis backplane.
    pub redis: RedisConfig,
    /// Client → backend streams.
    pub inbound: InboundConfig,
    /// Backend → client delivery.
    pub outbound: OutboundConfig,
    /// The backend API.
    pub api: ApiConfig,
    /// Client authentication.
    pub auth: AuthConfig,
    /// Limits that protect a replica from clients and backends.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Presence: liveness of replicas and limits of presence queries.
    pub presence: PresenceConfig,
    /// Per-channel-pattern settings.
    pub channels: Vec<ChannelConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public WebSocket listener.
    pub listen: String,
    /// Backend API and metrics listener.
    pub api_listen: String,
    /// This replica's name; empty means generated, unique per process.
    pub replica_id: String,
    /// Allowed `Origin` header values for the upgrade; empty allows any.
    pub allowed_origins: Vec<String>,
    /// How often the gateway pings each client.
    pub ping_interval_seconds: u64,
    /// A client silent for this long is closed.
    pub idle_timeout_seconds: u64,
    /// How long shutdown may take from the signal to the exit: the drain of every connection
    /// (sends answered, then 1012), the queued appends and the background tasks.
    pub shutdown_drain_seconds: u64,
    /// Accept permessage-deflate (RFC 7692) when a client offers it.
    pub permessage_deflate: bool,
    /// Messages shorter than this many bytes go out uncompressed.
    pub permessage_deflate_min_bytes: usize,
    /// zlib compression level of outgoing messages, 0 (none) to 9 (smallest, slowest).
    pub permessage_deflate_level: u8,
    /// Worker threads of the runtime; 0 means one per CPU core.
    pub worker_threads: usize,
    /// How often the allocator is asked to give free memory back to the system, when it holds
    /// 4 MiB or more it does not use (glibc only); 0 never.
    pub heap_trim_interval_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            api_listen: "127.0.0.1:8081".into(),
            replica_id: String::new(),
            allowed_origins: Vec::new(),
            ping_interval_seconds: 25,
            idle_timeout_seconds: 60,
            shutdown_drain_seconds: 10,
            permessage_deflate: true,
            permessage_deflate_min_bytes: 256,
            permessage_deflate_level: 6,
            worker_threads: 0,
            heap_trim_interval_seconds: 10,
        }
    }
}

/// `[limits]`: every refusal is answered (close code, error frame or HTTP status) and counted in
/// `wsbridge_limit_refusals_total{limit}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest client message (a frame, or all fragments of a message together): 1009 beyond.
    pub max_message_bytes: usize,
    /// Open WebSocket connections per replica; upgrades beyond get HTTP 503.
    pub max_connections: usize,
    /// Channels one connection may be in; `too_many_subscriptions` beyond.
    pub max_subscriptions_per_connection: usize,
    /// Sustained client frames per second per connection (token bucket); `rate_limited` beyond.
    pub client_messages_per_second: u32,
    /// Frames a connection may send in a burst above the sustained rate.
    pub client_burst_messages: u32,
    /// Time a client has to send its upgrade request headers.
    pub handshake_timeout_seconds: u64,
    /// Messages in one `POST /send` array; 413 beyond.
    pub max_batch_messages: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            max_connections: 100_000,
            max_subscriptions_per_connection: 1000,
            client_messages_per_second: 100,
            client_burst_messages: 200,
            handshake_timeout_seconds: 10,
            max_batch_messages: 10_000,
        }
    }
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]`. With `sentinel_urls`, only its user, password and
    /// database are used (for the data nodes): the host is whichever node Sentinel names primary.
    pub url: String,
    /// Redis Cluster: seed nodes (any of the cluster's nodes); when set, `url` is not used.
    pub cluster_urls: Vec<String>,
    /// Redis Sentinel: the Sentinels (`redis://host:port`) that name the primary; every link
    /// finds the primary through them on each (re)connect and follows a promotion.
    pub sentinel_urls: Vec<String>,
    /// The master name the Sentinels monitor (`sentinel monitor <name> ...`).
    pub sentinel_master: String,
    /// User the Sentinels themselves require (their `requirepass`/ACL), if any.
    pub sentinel_username: String,
    /// Password the Sentinels themselves require, if any; the data nodes' comes from `url`.
    pub sentinel_password: String,
    /// Prefix of every key and channel the gateway uses.
    pub prefix: String,
    /// Timeout of one connection attempt.
    pub connect_timeout_ms: u64,
    /// Timeout of one command (XADD, PUBLISH, PING).
    pub command_timeout_ms: u64,
    /// How often the command link is pinged and the pub/sub link is round-tripped.
    pub health_interval_ms: u64,
    /// A link with no successful round trip for this long makes `/readyz` answer 503.
    pub unhealthy_after_ms: u64,
    /// Longest wait between two reconnection attempts of the pub/sub link.
    pub reconnect_max_backoff_ms: u64,
    /// Pub/sub messages buffered between Redis and the dispatcher; more are dropped and counted.
    pub pubsub_buffer_messages: usize,
    /// Replicas that must hold a client's stream append and a `/send`'s history append (`WAIT`)
    /// before the `ack` or the 202; 0 answers once the primary took it.
    pub wait_replicas: u32,
    /// How long `WAIT` may wait for `wait_replicas`; past it the append is answered as one that
    /// may have been stored.
    pub wait_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster_urls: Vec::new(),
            sentinel_urls: Vec::new(),
            sentinel_master: String::new(),
            sentinel_username: String::new(),
            sentinel_password: String::new(),
            prefix: "wsbridge".into(),
            connect_timeout_ms: 1000,
            command_timeout_ms: 2000,
            health_interval_ms: 1000,
            unhealthy_after_ms: 3000,
            reconnect_max_backoff_ms: 5000,
            pubsub_buffer_messages: 65536,
            wait_replicas: 0,
            wait_timeout_ms: 500,
        }
    }
}

/// `[inbound]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundConfig {
    /// Streams clients may `send` to (key `<prefix>:in:<stream>`).
    pub streams: Vec<String>,
    /// Consumer groups created on every inbound stream at start.
    pub groups: Vec<String>,
    /// Approximate maximum entries kept per stream (`XADD MAXLEN ~`).
    pub stream_max_len: u64,
    /// Whether lifecycle events go to `<prefix>:events`.
    pub events_enabled: bool,
    /// Approximate maximum entries kept in the events stream.
    pub events_max_len: u64,
    /// Appends waiting for Redis; when full, a client `send` is refused with `overloaded`.
    pub append_queue_capacity: usize,
    /// Appends sent to Redis in one pipeline at most.
    pub append_batch_max: usize,
    /// How long a `send` id is remembered, so that a resend with the same id is acked with the
    /// original entry instead of appending twice; 0 turns deduplication off.
    pub dedupe_window_seconds: u64,
    /// With `redis.wait_replicas = 0`: acked entries whose copy this replica keeps until
    /// Redis's replicas (without replicas, its persistence) hold them, to append them again
    /// after a failover or restart that lost them ([`crate::inbound::keeper`]); 0 keeps none.
    pub keep_unconfirmed_entries: usize,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            streams: Vec::new(),
            groups: Vec::new(),
            stream_max_len: 100_000,
            events_enabled: true,
            events_max_len: 100_000,
            append_queue_capacity: 16_384,
            append_batch_max: 512,
            dedupe_window_seconds: 120,
            keep_unconfirmed_entries: 100_000,
        }
    }
}

/// What to do when a connection's send queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueFullPolicy {
    /// Drop the new message for this connection (counted).
    Drop,
    /// Close the connection with 1013 (counted); the client reconnects and may resume.
    Close,
}

/// How messages reach the replicas that hold their recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Every message goes to every replica, which keeps what is for its own connections.
    Broadcast,
    /// Channel messages go to the replicas with members of the channel, connection and user
    /// messages to the replicas holding them.
    Interest,
}

/// `[outbound]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Messages queued per connection before the policy applies.
    pub queue_capacity_messages: usize,
    /// `drop` or `close`.
    pub queue_full_policy: QueueFullPolicy,
    /// Replies (acks, errors, pongs) queued per connection; when full the client is closed (1013).
    pub reply_queue_capacity: usize,
    /// `broadcast` or `interest`.
    pub routing: Routing,
    /// Interest routing: how long a replica stays listed for a user after its last refresh.
    pub user_route_ttl_seconds: u64,
    /// Fan-out shards the connections are split into, each with its own lane; 0 means one per
    /// worker thread.
    pub fanout_shards: usize,
    /// Jobs a fan-out lane queues before the dispatcher waits for room.
    pub fanout_lane_capacity: usize,
    /// Messages with at least this many local recipients are fanned out on the lanes, in
    /// parallel; smaller ones are written by the dispatcher at once while their lanes are idle.
    pub fanout_lane_min_recipients: usize,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            queue_capacity_messages: 4096,
            queue_full_policy: QueueFullPolicy::Drop,
            reply_queue_capacity: 1024,
            routing: Routing::Broadcast,
            user_route_ttl_seconds: 60,
            fanout_shards: 0,
            fanout_lane_capacity: 1024,
            fanout_lane_min_recipients: 256,
        }
    }
}

/// `[api]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Bearer keys accepted by the backend API; empty means no key is required.
    pub keys: Vec<String>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            max_body_bytes: 1 << 20,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret; setting it turns auth on.
    pub jwt_secret: String,
    /// Path to an RS256 public key (PEM); setting it turns auth on.
    pub jwt_public_key: String,
    /// Required `aud` claim, if set.
    pub audience: String,
    /// Required `iss` claim, if set.
    pub issuer: String,
    /// How long before a token's `exp` the client is sent `refresh_required`; 0 sends none.
    pub refresh_notice_seconds: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            jwt_public_key: String::new(),
            audience: String::new(),
            issuer: String::new(),
            refresh_notice_seconds: 60,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable `key=value` lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `wsbridge=debug`, ... (`RUST_LOG` wins when set).
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[presence]`: how presence (`[[channels]] presence = true`) is kept in Redis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// How long a replica counts as alive after its last heartbeat. The members of a replica
    /// that stopped (SIGKILL, a lost host) leave presence at most this long, plus one heartbeat
    /// interval, after its last heartbeat.
    pub replica_ttl_seconds: u64,
    /// How often a replica proves it is alive, and looks for replicas that are not.
    pub heartbeat_interval_ms: u64,
    /// Joins and leaves waiting to be written to Redis; past it they are counted as dropped and
    /// the next heartbeat puts presence right.
    pub queue_capacity: usize,
    /// The most members (or users) one presence query returns; a query asks for fewer with
    /// `limit` and gets the rest page by page with `cursor`.
    pub max_page: usize,
    /// Keep every signed-in user's connections in Redis, for `POST /user_status`: one script
    /// call per connect and disconnect.
    pub user_status: bool,
    /// How long a user's last-seen time is kept after its last connection closed.
    pub last_seen_ttl_seconds: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            replica_ttl_seconds: 10,
            heartbeat_interval_ms: 2000,
            queue_capacity: 65536,
            max_page: 1000,
            user_status: true,
            last_seen_ttl_seconds: 30 * 24 * 3600,
        }
    }
}

/// `[[channels]]`: settings for channels whose name matches `pattern`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Glob with `*` for any run of characters, e.g. `room:*`.
    pub pattern: String,
    /// Messages kept for resuming; 0 keeps none.
    #[serde(default)]
    pub history_size: u64,
    /// How long history is kept after the last message.
    #[serde(default)]
    pub history_ttl_seconds: u64,
    /// Keep the channel's members in Redis: clients and backends can ask who is there.
    #[serde(default)]
    pub presence: bool,
    /// Send `join` and `leave` frames to the channel's subscribers when a user (or an anonymous
    /// connection) comes or goes; needs `presence`.
    #[serde(default)]
    pub join_leave: bool,
    /// Clients may `publish` to the channel (with auth on, only where the token's `publish`
    /// claim covers it); off by default, so only backends publish.
    #[serde(default)]
    pub client_publish: bool,
    /// A stream (key `<prefix>:in:<name>`) every accepted client publish is also appended to,
    /// for a backend to audit or persist; needs `client_publish`. Empty: none.
    #[serde(default)]
    pub publish_stream: String,
}

impl Config {
    /// Loads `path` (when given) and the environment overrides, then validates.
    ///
    /// Without a path, `config/wsbridge.toml` is read when it exists, else built-in defaults.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file or key and the problem.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let default_path = PathBuf::from("config/wsbridge.toml");
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => default_path.exists().then_some(default_path),
        };
        let mut builder = config::Config::builder();
        if let Some(path) = &path {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }
        // Values stay text until serde reads them as the key's type: with the crate's parsing on,
        // a replica id `007` or a numeric secret would silently change.
        let env = config::Environment::with_prefix("WSBRIDGE")
            .prefix_separator("__")
            .separator("__");
        builder = builder.add_source(env);
        // List keys take comma-separated values; split them here, exactly as written.
        for key in LIST_KEYS {
            let var = format!("WSBRIDGE__{}", key.replace('.', "__").to_uppercase());
            if let Ok(value) = std::env::var(&var) {
                let items: Vec<String> = value.split(',').map(|s| s.trim().to_owned()).collect();
                builder = builder
                    .set_override(key, items)
                    .map_err(|e| ConfigError(format!("{var}: {e}")))?;
            }
        }
        let file = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let raw = builder
            .build()
            .map_err(|e| ConfigError::one_line(format!("config file {file}: {e}")))?;
        let config: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError::one_line(describe_deserialize_error(&e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML string (no environment), then validates. Used by tests and tools.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key and the problem.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|e| ConfigError(e.to_string()))?;
        let config: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError(describe_deserialize_error(&e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that types alone cannot.
    ///
    /// # Errors
    /// The first problem found, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("server.listen", &self.server.listen)?;
        parse_addr("server.api_listen", &self.server.api_listen)?;
        let id = &self.server.replica_id;
        if id.len() > 64
            || id
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(ConfigError::key(
                "server.replica_id",
                format!("`{id}` must be at most 64 characters of letters, digits, `-` or `_`"),
            ));
        }
        if self.server.permessage_deflate_level > 9 {
            return Err(ConfigError::key(
                "server.permessage_deflate_level",
                format!(
                    "{} is not a zlib level: use 0 (no compression) to 9 (smallest)",
                    self.server.permessage_deflate_level
                ),
            ));
        }
        for (key, value) in [
            (
                "server.ping_interval_seconds",
                self.server.ping_interval_seconds,
            ),
            (
                "server.idle_timeout_seconds",
                self.server.idle_timeout_seconds,
            ),
            (
                "limits.max_message_bytes",
                self.limits.max_message_bytes as u64,
            ),
            ("limits.max_connections", self.limits.max_connections as u64),
            (
                "limits.max_subscriptions_per_connection",
                self.limits.max_subscriptions_per_connection as u64,
            ),
            (
                "limits.client_messages_per_second",
                self.limits.client_messages_per_second as u64,
            ),
            (
                "limits.client_burst_messages",
                self.limits.client_burst_messages as u64,
            ),
            (
                "limits.handshake_timeout_seconds",
                self.limits.handshake_timeout_seconds,
            ),
            (
                "limits.max_batch_messages",
                self.limits.max_batch_messages as u64,
            ),
            ("redis.connect_timeout_ms", self.redis.connect_timeout_ms),
            ("redis.command_timeout_ms", self.redis.command_timeout_ms),
            ("redis.health_interval_ms", self.redis.health_interval_ms),
            (
                "redis.pubsub_buffer_messages",
                self.redis.pubsub_buffer_messages as u64,
            ),
            (
                "inbound.append_queue_capacity",
                self.inbound.append_queue_capacity as u64,
            ),
            (
                "inbound.append_batch_max",
                self.inbound.append_batch_max as u64,
            ),
            (
                "outbound.queue_capacity_messages",
                self.outbound.queue_capacity_messages as u64,
            ),
            (
                "outbound.reply_queue_capacity",
                self.outbound.reply_queue_capacity as u64,
            ),
            (
                "outbound.user_route_ttl_seconds",
                self.outbound.user_route_ttl_seconds,
            ),
            (
                "outbound.fanout_lane_capacity",
                self.outbound.fanout_lane_capacity as u64,
            ),
            ("api.max_body_bytes", self.api.max_body_bytes as u64),
        ] {
            positive(key, value)?;
        }
        redis::Client::open(self.redis.url.as_str()).map_err(|e| {
            ConfigError::key(
                "redis.url",
                format!("`{}` is not a Redis URL: {e}", self.redis.url),
            )
        })?;
        for url in &self.redis.cluster_urls {
            redis::Client::open(url.as_str()).map_err(|e| {
                ConfigError::key(
                    "redis.cluster_urls",
                    format!("`{}` is not a Redis URL: {e}", redact_url(url)),
                )
            })?;
        }
        if !self.redis.sentinel_urls.is_empty() {
            if !self.redis.cluster_urls.is_empty() {
                return Err(ConfigError::key(
                    "redis.sentinel_urls",
                    "cannot be set together with redis.cluster_urls: a deployment is either a Redis Cluster or a primary watched by Sentinel",
                ));
            }
            if self.redis.sentinel_master.is_empty() {
                return Err(ConfigError::key(
                    "redis.sentinel_master",
                    "is required with redis.sentinel_urls: the master name the Sentinels monitor",
                ));
            }
            for url in &self.redis.sentinel_urls {
                redis::Client::open(url.as_str()).map_err(|e| {
                    ConfigError::key(
                        "redis.sentinel_urls",
                        format!("`{}` is not a Redis URL: {e}", redact_url(url)),
                    )
                })?;
            }
        } else if !self.redis.sentinel_master.is_empty() {
            return Err(ConfigError::key(
                "redis.sentinel_master",
                "is set but redis.sentinel_urls is empty: list the Sentinels",
            ));
        }
        if !self.redis.cluster_urls.is_empty() && self.outbound.routing != Routing::Interest {
            return Err(ConfigError::key(
                "redis.cluster_urls",
                "a Redis Cluster needs outbound.routing = \"interest\" (broadcast would put every message on one shard)",
            ));
        }
        if self.redis.wait_replicas > 0 {
            positive("redis.wait_timeout_ms", self.redis.wait_timeout_ms)?;
            if self.redis.wait_timeout_ms >= self.redis.command_timeout_ms {
                return Err(ConfigError::key(
                    "redis.wait_timeout_ms",
                    format!(
                        "must be less than redis.command_timeout_ms ({}): WAIT is one command, and \
                         its answer must come back within that",
                        self.redis.command_timeout_ms
                    ),
                ));
            }
        }
        if self.redis.prefix.is_empty() {
            return Err(ConfigError::key("redis.prefix", "must not be empty"));
        }
        // Braces would change which cluster slot a key hashes to (hash tags).
        if self.redis.prefix.contains(['{', '}']) {
            return Err(ConfigError::key(
                "redis.prefix",
                "must not contain `{` or `}`",
            ));
        }
        if self.redis.unhealthy_after_ms <= self.redis.health_interval_ms {
            return Err(ConfigError::key(
                "redis.unhealthy_after_ms",
                "must be larger than redis.health_interval_ms",
            ));
        }
        for (key, names) in [
            ("inbound.streams", &self.inbound.streams),
            ("inbound.groups", &self.inbound.groups),
        ] {
            for name in names {
                if !valid_stream_name(name) {
                    return Err(ConfigError::key(
                        key,
                        format!("`{name}` must be non-empty, without spaces or braces"),
                    ));
                }
            }
        }
        if self.api.keys.iter().any(String::is_empty) {
            return Err(ConfigError::key(
                "api.keys",
                "keys must not be empty strings",
            ));
        }
        if !self.auth.jwt_secret.is_empty() && !self.auth.jwt_public_key.is_empty() {
            return Err(ConfigError::key(
                "auth.jwt_secret",
                "set either auth.jwt_secret (HS256) or auth.jwt_public_key (RS256), not both",
            ));
        }
        if !self.auth.jwt_public_key.is_empty() {
            let pem = std::fs::read(&self.auth.jwt_public_key).map_err(|e| {
                ConfigError::key(
                    "auth.jwt_public_key",
                    format!("cannot read `{}`: {e}", self.auth.jwt_public_key),
                )
            })?;
            // jsonwebtoken also takes a private key here, and then no valid token verifies.
            if !String::from_utf8_lossy(&pem).contains("PUBLIC KEY-----") {
                return Err(ConfigError::key(
                    "auth.jwt_public_key",
                    format!(
                        "`{}` is not a public key PEM (BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY)",
                        self.auth.jwt_public_key
                    ),
                ));
            }
            jsonwebtoken::DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                ConfigError::key(
                    "auth.jwt_public_key",
                    format!(
                        "`{}` is not an RSA public key in PEM: {e}",
                        self.auth.jwt_public_key
                    ),
                )
            })?;
        }
        for (i, ch) in self.channels.iter().enumerate() {
            if ch.pattern.is_empty() {
                return Err(ConfigError::key(
                    &format!("channels[{i}].pattern"),
                    "must not be empty",
                ));
            }
            if ch.join_leave && !ch.presence {
                return Err(ConfigError::key(
                    &format!("channels[{i}].join_leave"),
                    "needs presence = true in the same [[channels]] entry (join and leave follow presence)",
                ));
            }
            if !ch.publish_stream.is_empty() {
                let key = format!("channels[{i}].publish_stream");
                if !ch.client_publish {
                    return Err(ConfigError::key(
                        &key,
                        "needs client_publish = true in the same [[channels]] entry (only client publishes are appended to it)",
                    ));
                }
                if !valid_stream_name(&ch.publish_stream) {
                    return Err(ConfigError::key(
                        &key,
                        format!(
                            "`{}` must be non-empty, without spaces or braces",
                            ch.publish_stream
                        ),
                    ));
                }
            }
            if ch.history_size > 0 && ch.history_ttl_seconds == 0 {
                return Err(ConfigError::key(
                    &format!("channels[{i}].history_ttl_seconds"),
                    "must be greater than 0 when history_size is set (history would never expire)",
                ));
            }
        }
        if self.presence.replica_ttl_seconds == 0 {
            return Err(ConfigError::key(
                "presence.replica_ttl_seconds",
                "must be greater than 0",
            ));
        }
        if self.presence.heartbeat_interval_ms == 0
            || self.presence.heartbeat_interval_ms >= self.presence.replica_ttl_seconds * 1000
        {
            return Err(ConfigError::key(
                "presence.heartbeat_interval_ms",
                "must be greater than 0 and shorter than presence.replica_ttl_seconds (a live replica would look dead)",
            ));
        }
        if self.presence.queue_capacity == 0 {
            return Err(ConfigError::key(
                "presence.queue_capacity",
                "must be greater than 0",
            ));
        }
        if self.presence.last_seen_ttl_seconds == 0 {
            return Err(ConfigError::key(
                "presence.last_seen_ttl_seconds",
                "must be greater than 0",
            ));
        }
        if self.presence.max_page == 0 {
            return Err(ConfigError::key(
                "presence.max_page",
                "must be greater than 0",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::key("log.level", format!("`{}`: {e}", self.log.level)))?;
        Ok(())
    }

    /// `redis.url` without its password, for logs.
    pub fn redis_url_redacted(&self) -> String {
        redact_url(&self.redis.url)
    }

    /// The history settings of `channel`: the first `[[channels]]` pattern that matches it, if
    /// that pattern keeps history.
    pub fn history_for(&self, channel: &str) -> Option<&ChannelConfig> {
        self.channels
            .iter()
            .find(|c| glob_match(&c.pattern, channel))
            .filter(|c| c.history_size > 0)
    }

    /// The presence settings of `channel`: the first `[[channels]]` pattern that matches it, if
    /// that pattern keeps presence.
    pub fn presence_for(&self, channel: &str) -> Option<&ChannelConfig> {
        self.channels
            .iter()
            .find(|c| glob_match(&c.pattern, channel))
            .filter(|c| c.presence)
    }

    /// The `[[channels]]` entry that applies to `channel` (the first pattern that matches it).
    pub fn channel_settings(&self, channel: &str) -> Option<&ChannelConfig> {
        self.channels
            .iter()
            .find(|c| glob_match(&c.pattern, channel))
    }

    /// The client-publish settings of `channel`: the first `[[channels]]` pattern that matches
    /// it, if that pattern lets clients publish.
    pub fn client_publish_for(&self, channel: &str) -> Option<&ChannelConfig> {
        self.channel_settings(channel).filter(|c| c.client_publish)
    }

    /// Every stream name clients' frames may end up in: `inbound.streams`, then the
    /// `publish_stream`s of `[[channels]]`, each once (consumer groups are created on each).
    pub fn inbound_stream_names(&self) -> Vec<String> {
        let mut names = self.inbound.streams.clone();
        for ch in &self.channels {
            if !ch.publish_stream.is_empty() && !names.contains(&ch.publish_stream) {
                names.push(ch.publish_stream.clone());
            }
        }
        names
    }

    /// The public listener address (validated).
    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.parse().expect("validated")
    }

    /// The API listener address (validated).
    pub fn api_listen_addr(&self) -> SocketAddr {
        self.server.api_listen.parse().expect("validated")
    }
}

/// Replaces the password of `scheme://user:password@host` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((auth, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::key(
            key,
            format!("`{value}` is not a socket address like 127.0.0.1:8080"),
        )
    })
}

/// A stream or group name: non-empty, no spaces, no control characters, and no braces (which
/// would change the cluster slot a key hashes to).
fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '{' || c == '}')
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::key(key, "must be greater than 0"));
    }
    Ok(())
}

/// The `config` crate reports unknown fields without the section; add it where we can.
fn describe_deserialize_error(e: &config::ConfigError) -> String {
    let text = e.to_string();
    if text.contains("unknown field") {
        return format!("unknown config key: {text}");
    }
    text
}

/// Matches a channel name against a glob where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            pi += 1;
            mark = ni;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        assert_eq!(redact_url("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://:secret@h:1"), "redis://:***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn glob() {
        assert!(glob_match("room:*", "room:1"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("room:*", "rooms:1"));
        assert!(!glob_match("room", "room:1"));
    }

    #[test]
    fn sentinel_keys_are_validated_by_name() {
        let err = |text: &str| Config::from_toml(text).unwrap_err().to_string();
        let both = err("[redis]\nsentinel_urls = [\"redis://127.0.0.1:26379\"]\nsentinel_master = \"m\"\ncluster_urls = [\"redis://127.0.0.1:7000\"]\n");
        assert!(
            both.contains("redis.sentinel_urls") && both.contains("redis.cluster_urls"),
            "{both}"
        );
        let no_master = err("[redis]\nsentinel_urls = [\"redis://127.0.0.1:26379\"]\n");
        assert!(no_master.contains("redis.sentinel_master"), "{no_master}");
        let no_sentinels = err("[redis]\nsentinel_master = \"m\"\n");
        assert!(
            no_sentinels.contains("redis.sentinel_urls"),
            "{no_sentinels}"
        );
        // TLS to the Sentinels and the data nodes.
        Config::from_toml(
            "[redis]\nurl = \"rediss://127.0.0.1:6380\"\nsentinel_urls = [\"rediss://127.0.0.1:26379\"]\nsentinel_master = \"m\"\n",
        )
        .unwrap();
        Config::from_toml(
            "[redis]\nsentinel_urls = [\"redis://127.0.0.1:26379\", \"redis://127.0.0.1:26380\"]\nsentinel_master = \"m\"\n",
        )
        .unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[server]\nlistn = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn bad_address_is_named() {
        let err = Config::from_toml("[server]\nlisten = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn a_publish_stream_needs_client_publish_and_a_valid_name() {
        let err = Config::from_toml(
            "[[channels]]\npattern = \"cursor:*\"\npublish_stream = \"cursors\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("channels[0].publish_stream"), "{err}");
        assert!(err.contains("client_publish"), "{err}");
        let err = Config::from_toml(
            "[[channels]]\npattern = \"a\"\nclient_publish = true\npublish_stream = \"x y\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("channels[0].publish_stream"), "{err}");
        let ok = Config::from_toml(
            "[inbound]\nstreams = [\"chat\"]\n[[channels]]\npattern = \"cursor:*\"\nclient_publish = true\npublish_stream = \"cursors\"\n[[channels]]\npattern = \"room:*\"\n",
        )
        .unwrap();
        assert!(ok.client_publish_for("cursor:1").is_some());
        assert!(ok.client_publish_for("room:1").is_none());
        assert!(ok.client_publish_for("other").is_none());
        assert_eq!(ok.inbound_stream_names(), ["chat", "cursors"]);
    }

    #[test]
    fn bad_url_is_named() {
        let err = Config::from_toml("[redis]\nurl = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis.url"), "{err}");
    }
}
