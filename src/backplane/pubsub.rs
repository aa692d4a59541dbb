//! The pub/sub link: a RESP3 connection subscribed to the broadcast channel and to this
//! replica's health channel, owned by one supervising task.
//!
//! The task reconnects with backoff and resubscribes whenever the connection drops, and it proves
//! the link end to end on every health tick by publishing a token to its own health channel and
//! watching it come back. A link that is connected but no longer delivers (a failure the client
//! library cannot see) is thereby detected, reported by `/readyz`, and replaced.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{AsyncPushSender, SendError};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::{Health, Keys};
use crate::config::RedisConfig;
use crate::metrics::{DropReason, Metrics};

/// Hands pushes from the Redis connection to the dispatcher without blocking it.
struct PushSender {
    tx: mpsc::Sender<Bytes>,
    health_channel: Vec<u8>,
    health: Arc<Health>,
    disconnected: Arc<Notify>,
    metrics: Metrics,
    warned_full: AtomicBool,
    /// Tells the dispatcher to catch up its history channels: messages were missed.
    catch_up: mpsc::Sender<()>,
    /// On a reconnection: the catch-up signal is still to be sent for this connection.
    reconnected: AtomicBool,
}

impl PushSender {
    /// Signals a reconnection once, before the first message of the new connection reaches the
    /// dispatcher (the dispatcher takes signals before payloads): its last delivered offsets are
    /// then still those from before the gap.
    fn announce_reconnection(&self) {
        if self.reconnected.swap(false, Ordering::AcqRel) {
            let _ = self.catch_up.try_send(());
        }
    }
}

impl AsyncPushSender for PushSender {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        match info.kind {
            PushKind::Message => {
                let mut data = info.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (data.next(), data.next())
                else {
                    return Ok(());
                };
                if channel == self.health_channel {
                    self.health.pubsub_ok();
                    return Ok(());
                }
                self.announce_reconnection();
                if self.tx.try_send(Bytes::from(payload)).is_err() {
                    self.metrics.dropped(DropReason::PubsubBacklog).increment(1);
                    // History channels get what was dropped back from their history.
                    let _ = self.catch_up.try_send(());
                    if !self.warned_full.swap(true, Ordering::Relaxed) {
                        tracing::warn!("pub/sub buffer full: dropping messages (raise redis.pubsub_buffer_messages?); history channels will catch up");
                    }
                } else {
                    self.warned_full.store(false, Ordering::Relaxed);
                }
            }
            PushKind::Subscribe => self.announce_reconnection(),
            PushKind::Disconnection => self.disconnected.notify_one(),
            _ => {}
        }
        Ok(())
    }
}

/// Runs the pub/sub link until `shutdown`, feeding message payloads into `tx`.
pub async fn run(
    cfg: RedisConfig,
    keys: Keys,
    tx: mpsc::Sender<Bytes>,
    health: Arc<Health>,
    metrics: Metrics,
    resubscribed: mpsc::Sender<()>,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_millis(cfg.health_interval_ms);
    let max_backoff = Duration::from_millis(cfg.reconnect_max_backoff_ms);
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    let mut connected_before = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let disconnected = Arc::new(Notify::new());
        let sender = PushSender {
            tx: tx.clone(),
            health_channel: keys.health.clone().into_bytes(),
            health: health.clone(),
            disconnected: disconnected.clone(),
            metrics: metrics.clone(),
            warned_full: AtomicBool::new(false),
            catch_up: resubscribed.clone(),
            reconnected: AtomicBool::new(connected_before),
        };
        let conn = connect(&cfg, &keys, sender).await;
        let mut conn = match conn {
            Ok(conn) => {
                tracing::info!(channel = %keys.broadcast, "pub/sub link up");
                // Messages published while the link was down never reached this replica; the
                // dispatcher catches up the channels that keep history. The push sender has
                // signalled it already, at the subscription, before any message.
                connected_before = true;
                backoff = Duration::from_millis(100);
                conn
            }
            Err(e) => {
                metrics.pubsub_up.set(0.0);
                metrics
                    .redis_error(super::RedisFailure::from(e.clone()).kind())
                    .increment(1);
                health.failed(format!("pub/sub link: {e}"));
                if first {
                    tracing::warn!(error = %e, "pub/sub link cannot connect; retrying with backoff");
                } else {
                    tracing::debug!(error = %e, "pub/sub reconnect failed");
                }
                first = false;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
        };
        first = true;
        let connected_at = std::time::Instant::now();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reason = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = disconnected.notified() => break "connection lost".to_string(),
                _ = tick.tick() => {}
            }
            // Each tick sends a token round the loop; readiness is judged on the last return.
            let publish = redis::cmd("PUBLISH")
                .arg(&keys.health)
                .arg("ping")
                .to_owned();
            match tokio::time::timeout(interval * 2, publish.query_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    metrics
                        .redis_error(super::RedisFailure::from(e.clone()).kind())
                        .increment(1);
                    break format!("health publish failed: {e}");
                }
                Err(_) => {
                    metrics
                        .redis_error(crate::metrics::RedisErrorKind::Timeout)
                        .increment(1);
                    break "health publish timed out".to_string();
                }
            }
            match health.pubsub_age_ms() {
                Some(age) if age <= cfg.unhealthy_after_ms => metrics.pubsub_up.set(1.0),
                _ => {
                    // Give a fresh link one full window before declaring it dead.
                    if connected_at.elapsed().as_millis() as u64 > cfg.unhealthy_after_ms {
                        break "round trip through pub/sub not seen in time".to_string();
                    }
                }
            }
        };
        metrics.pubsub_up.set(0.0);
        metrics.pubsub_reconnects.increment(1);
        health.failed(format!("pub/sub link: {reason}"));
        tracing::warn!(reason = %reason, "pub/sub link lost; reconnecting");
    }
}

async fn connect(
    cfg: &RedisConfig,
    keys: &Keys,
    sender: PushSender,
) -> Result<redis::aio::MultiplexedConnection, redis::RedisError> {
    // Pushes on a shared multiplexed connection need RESP3.
    let sep = if cfg.url.contains('?') { '&' } else { '?' };
    let client = redis::Client::open(format!("{}{sep}protocol=resp3", cfg.url))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)))
        .set_response_timeout(Some(Duration::from_millis(cfg.command_timeout_ms)))
        .set_push_sender(sender);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    conn.subscribe(&[keys.broadcast.as_str(), keys.health.as_str()])
        .await?;
    Ok(conn)
}
