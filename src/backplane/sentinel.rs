//! Which node is the primary, when Redis Sentinel decides (`redis.sentinel_urls`).
//!
//! This is the one place that answers "where is the primary". The command link and the pub/sub
//! link have no fixed address: each asks [`Primary::locate`] on every (re)connect, and leaves a
//! node that turns out to be a replica (a `READONLY` reply, `ROLE` answering `slave`) or that
//! the other link has left behind ([`Primary::known_addr`] changed). So every link follows a
//! promotion without a restart.
//!
//! The Sentinels are asked with redis-rs's `sentinel` module, which asks them for their masters
//! and checks with `ROLE` on the named node that it really is a master. Its ready-made
//! `SentinelClient` is not used: it resolves once per connection it hands out, and the
//! reconnecting `ConnectionManager` keeps the address it was built with, so neither would move to
//! a new primary; the links here reconnect themselves and resolve on each attempt instead.

use std::sync::Mutex;
use std::time::Duration;

use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult};

use crate::config::RedisConfig;

/// Finds the primary through the Sentinels, and remembers the last one found.
pub struct Primary {
    master: String,
    sentinels: tokio::sync::Mutex<Sentinel>,
    /// How to speak to data nodes: user, password, database and TLS of `redis.url`.
    node: SentinelNodeConnectionInfo,
    /// The last node confirmed as primary.
    known: Mutex<Option<ConnectionInfo>>,
    timeout: Duration,
    /// `wsbridge_redis_primary_changes_total`.
    changes: metrics::Counter,
}

impl Primary {
    /// The Sentinels of `cfg.sentinel_urls`, with `cfg.sentinel_username`/`sentinel_password`,
    /// watching `cfg.sentinel_master`. Connects to nothing yet.
    ///
    /// # Errors
    /// When a URL cannot be used (validated earlier, so rare).
    pub fn new(cfg: &RedisConfig) -> RedisResult<Self> {
        let mut sentinels = Vec::new();
        for url in &cfg.sentinel_urls {
            let info = url.as_str().into_connection_info()?;
            let mut settings = info.redis_settings().clone();
            if !cfg.sentinel_username.is_empty() {
                settings = settings.set_username(&cfg.sentinel_username);
            }
            if !cfg.sentinel_password.is_empty() {
                settings = settings.set_password(&cfg.sentinel_password);
            }
            sentinels.push(info.set_redis_settings(settings));
        }
        let data = cfg.url.as_str().into_connection_info()?;
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(data.redis_settings().clone());
        // `rediss://` in `redis.url`: the data nodes the Sentinels name are spoken to over TLS.
        if let redis::ConnectionAddr::TcpTls { insecure, .. } = data.addr() {
            node = node.set_tls_mode(if *insecure {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            });
        }
        Ok(Self {
            master: cfg.sentinel_master.clone(),
            sentinels: tokio::sync::Mutex::new(Sentinel::build(sentinels)?),
            node,
            known: Mutex::new(None),
            timeout: Duration::from_millis(cfg.connect_timeout_ms),
            changes: metrics::counter!(crate::metrics::names::REDIS_PRIMARY_CHANGES),
        })
    }

    /// The primary now: the node the Sentinels name, once `ROLE` on it says `master`. When no
    /// Sentinel answers at all, the last known primary, if `ROLE` on it still says `master`:
    /// the gateway keeps working through a Sentinel outage.
    ///
    /// # Errors
    /// No primary answers: the Sentinels name none (a failover is under way) or the one they
    /// name does not answer; or no Sentinel answers and the last known primary is gone too.
    pub async fn locate(&self) -> RedisResult<ConnectionInfo> {
        let asked = tokio::time::timeout(self.timeout, async {
            let mut sentinels = self.sentinels.lock().await;
            sentinels
                .async_master_for(&self.master, Some(&self.node))
                .await
        })
        .await;
        let error = match asked {
            Ok(Ok(client)) => {
                let info = client.get_connection_info().clone();
                self.remember(&info);
                return Ok(info);
            }
            // The Sentinels answered and name no usable master (it is down, a failover is
            // under way): the last known primary is exactly the node not to write to.
            Ok(Err(e)) if e.kind() == redis::ErrorKind::MasterNameNotFoundBySentinel => {
                tracing::debug!(error = %e, "the Sentinels name no primary");
                return Err(RedisError::from((
                    redis::ErrorKind::MasterNameNotFoundBySentinel,
                    "no primary",
                    format!(
                        "the Sentinels name no usable primary for `{}` (a failover may be under way)",
                        self.master
                    ),
                )));
            }
            Ok(Err(e)) => e,
            Err(_) => RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no Sentinel answered in time",
            )),
        };
        let Some(known) = self.known.lock().expect("primary lock").clone() else {
            return Err(error);
        };
        match tokio::time::timeout(self.timeout, is_master(&known)).await {
            Ok(Ok(true)) => {
                tracing::debug!(error = %error, primary = %known.addr(), "Sentinels unreachable; keeping the known primary");
                Ok(known)
            }
            _ => Err(error),
        }
    }

    /// The address of the last node confirmed as primary (`host:port`), if any.
    pub fn known_addr(&self) -> Option<String> {
        self.known
            .lock()
            .expect("primary lock")
            .as_ref()
            .map(|info| info.addr().to_string())
    }

    fn remember(&self, info: &ConnectionInfo) {
        let mut known = self.known.lock().expect("primary lock");
        let changed = known.as_ref().map(|k| k.addr()) != Some(info.addr());
        if changed {
            if known.is_some() {
                self.changes.increment(1);
            }
            tracing::info!(primary = %info.addr(), master = %self.master, "Sentinel names the primary");
            *known = Some(info.clone());
        }
    }
}

/// Whether the node at `info` answers `ROLE` with `master`.
async fn is_master(info: &ConnectionInfo) -> RedisResult<bool> {
    let mut conn = redis::Client::open(info.clone())?
        .get_multiplexed_async_connection()
        .await?;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
    Ok(is_master_role(&role))
}

/// Whether a `ROLE` reply is a master's.
pub fn is_master_role(role: &[redis::Value]) -> bool {
    matches!(
        role.first(),
        Some(redis::Value::BulkString(kind)) if kind == b"master"
    ) || matches!(role.first(), Some(redis::Value::SimpleString(kind)) if kind == "master")
}
