//! The pub/sub link: a RESP3 connection subscribed to the broadcast channel and to this
//! replica's health and own channels, owned by one supervising task.
//!
//! The task reconnects with backoff and resubscribes whenever the connection drops, and it proves
//! the link end to end on every health tick by publishing a token to its own health channel and
//! watching it come back. A link that is connected but no longer delivers (a failure the client
//! library cannot see) is thereby detected, reported by `/readyz`, and replaced. Under Sentinel
//! the link connects to the primary [`super::sentinel::Primary`] names, and is replaced when the
//! primary it is on is no longer the one known (a replica's PUBLISH reaches only its own
//! subscribers, so a link left on a demoted node would hear nothing from the others).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{AsyncPushSender, SendError};
use redis::{IntoConnectionInfo, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::interest::{Change, Interest};
use super::{Health, Keys};
use crate::config::RedisConfig;
use crate::metrics::{DropReason, Metrics};

/// Interest routing's part of the link: the wanted channels and their changes.
pub struct InterestLink {
    /// The wanted set.
    pub interest: Arc<Interest>,
    /// Changes to act on.
    pub changes: mpsc::Receiver<Change>,
    /// Local channel members.
    pub registry: Arc<dyn super::interest::LocalChannels>,
}

/// The most changes taken into one SUBSCRIBE / UNSUBSCRIBE pair.
const CHANGES_PER_BATCH: usize = 1024;

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
    /// Holds messages back until the link's subscriptions are in place (see [`Gate`]).
    gate: Arc<Gate>,
    /// To tell a subscription Redis dropped from one this replica let go of.
    keys: Keys,
    interest: Option<Arc<Interest>>,
}

impl PushSender {
    /// Whether Redis ended a subscription this replica still wants: a cluster does that to shard
    /// channels whose slot moved to another node. This replica's own unsubscribes are not: it
    /// takes a channel off the link's set before unsubscribing.
    fn dropped_by_redis(&self, data: &[Value]) -> bool {
        let Some(Value::BulkString(name)) = data.first() else {
            return false;
        };
        let name = String::from_utf8_lossy(name);
        match self.keys.channel_of(&name) {
            Some(channel) => self
                .interest
                .as_ref()
                .is_some_and(|interest| interest.listening(channel)),
            None => true,
        }
    }
}

/// A new link's first messages wait here until every subscription is in place (on a cluster,
/// channels on different shards are subscribed one by one). Then, when the link replaces an
/// earlier one, the catch-up signal goes out before them: the dispatcher takes signals before
/// payloads, so it starts catching up each history channel from the last offset it delivered
/// before the gap, and reads the gap after every subscription is in place.
struct Gate {
    /// Whether messages are being held: read on every message, so an open gate costs one atomic
    /// load and no lock.
    holding: AtomicBool,
    held: std::sync::Mutex<Vec<Bytes>>,
}

impl Gate {
    fn new(holding: bool) -> Arc<Self> {
        Arc::new(Gate {
            holding: AtomicBool::new(holding),
            held: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Keeps `payload` while the gate is closed (up to `room` messages, past which it is
    /// dropped and counted); gives it back when the gate is open.
    fn hold(&self, payload: Bytes, room: usize, metrics: &Metrics) -> Option<Bytes> {
        if !self.holding.load(Ordering::Acquire) {
            return Some(payload);
        }
        let mut held = self.held.lock().expect("gate lock");
        // Opened while this waited for the lock: the held messages are through already.
        if !self.holding.load(Ordering::Acquire) {
            return Some(payload);
        }
        if held.len() < room {
            held.push(payload);
        } else {
            metrics.dropped(DropReason::PubsubBacklog).increment(1);
        }
        None
    }

    /// Opens the gate: the catch-up signal (when the link replaces an earlier one), then the held
    /// messages, then whatever comes next.
    fn open(
        &self,
        catch_up: Option<&mpsc::Sender<()>>,
        tx: &mpsc::Sender<Bytes>,
        metrics: &Metrics,
    ) {
        let mut held = self.held.lock().expect("gate lock");
        if !self.holding.load(Ordering::Acquire) {
            return;
        }
        if let Some(catch_up) = catch_up {
            let _ = catch_up.try_send(());
        }
        for payload in held.drain(..) {
            if tx.try_send(payload).is_err() {
                metrics.dropped(DropReason::PubsubBacklog).increment(1);
            }
        }
        self.holding.store(false, Ordering::Release);
    }
}

impl AsyncPushSender for PushSender {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
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
                let room = self.tx.max_capacity();
                let Some(payload) = self.gate.hold(Bytes::from(payload), room, &self.metrics)
                else {
                    return Ok(());
                };
                if self.tx.try_send(payload).is_err() {
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
            // A slot moved: its channels must be subscribed again where it lives now, and what
            // they missed caught up. A fresh link does both.
            PushKind::SUnsubscribe if self.dropped_by_redis(&info.data) => {
                tracing::info!("Redis ended a shard channel subscription (its slot moved); reconnecting the pub/sub link");
                self.disconnected.notify_one();
            }
            PushKind::Disconnection => self.disconnected.notify_one(),
            _ => {}
        }
        Ok(())
    }
}

/// Runs the pub/sub link until `shutdown`, feeding message payloads into `tx`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: RedisConfig,
    keys: Keys,
    tx: mpsc::Sender<Bytes>,
    health: Arc<Health>,
    metrics: Metrics,
    resubscribed: mpsc::Sender<()>,
    mut interest: Option<InterestLink>,
    primary: Option<Arc<super::sentinel::Primary>>,
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
        let gate = Gate::new(true);
        let sender = PushSender {
            tx: tx.clone(),
            health_channel: keys.health.clone().into_bytes(),
            health: health.clone(),
            disconnected: disconnected.clone(),
            metrics: metrics.clone(),
            warned_full: AtomicBool::new(false),
            catch_up: resubscribed.clone(),
            gate: gate.clone(),
            keys: keys.clone(),
            interest: interest.as_ref().map(|link| link.interest.clone()),
        };
        let catch_up = connected_before.then_some(&resubscribed);
        let conn = connect(&cfg, &keys, sender, interest.as_ref(), primary.as_deref()).await;
        if conn.is_ok() {
            gate.open(catch_up, &tx, &metrics);
        }
        let (mut conn, node) = match conn {
            Ok((conn, node)) => {
                tracing::info!(channel = %keys.broadcast, node = ?node, "pub/sub link up");
                // Messages published while the link was down never reached this replica; the
                // dispatcher catches up the channels that keep history. The gate has signalled
                // it already, before any message of this link.
                connected_before = true;
                backoff = Duration::from_millis(100);
                (conn, node)
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
                // Joins asked for while the link is down go ahead: the next link subscribes to
                // every wanted channel.
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = &mut sleep => break,
                        Some(_) = next_change(&mut interest) => {}
                    }
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
                Some(change) = next_change(&mut interest) => {
                    let link = interest.as_mut().expect("a change implies interest routing");
                    match apply_changes(change, link, &keys, &mut conn).await {
                        Ok(()) => {
                            metrics.pubsub_channels.set(link.interest.on_link_len() as f64);
                            continue;
                        }
                        Err(e) => {
                            metrics
                                .redis_error(super::RedisFailure::from(e.clone()).kind())
                                .increment(1);
                            break format!("subscription change failed: {e}");
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            // Under Sentinel, the command link found a new primary (it checks ROLE each tick).
            if let (Some(primary), Some(node)) = (&primary, &node) {
                if primary.known_addr().is_some_and(|known| known != *node) {
                    break format!("the primary moved from {node}");
                }
            }
            // Each tick sends a token round the loop; readiness is judged on the last return.
            match tokio::time::timeout(interval * 2, conn.publish(&keys.health, "ping")).await {
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
        if let Some(link) = &interest {
            link.interest.set_on_link([]);
        }
        health.failed(format!("pub/sub link: {reason}"));
        tracing::warn!(reason = %reason, "pub/sub link lost; reconnecting");
    }
}

/// The pub/sub connection: to a single Redis (channels), or to a cluster (shard channels).
enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    /// Subscribes to `names`, or unsubscribes from them.
    async fn set(&mut self, names: &[String], subscribed: bool) -> Result<(), redis::RedisError> {
        match self {
            Conn::Single(conn) if subscribed => conn.subscribe(names).await,
            Conn::Single(conn) => conn.unsubscribe(names).await,
            // Shard channels of different slots cannot share a command: one each, together.
            Conn::Cluster(conn) => {
                let each = names.iter().map(|name| {
                    let mut conn = conn.clone();
                    async move {
                        if subscribed {
                            conn.ssubscribe(name).await
                        } else {
                            conn.sunsubscribe(name).await
                        }
                    }
                });
                futures_util::future::try_join_all(each).await.map(|_| ())
            }
        }
    }

    async fn publish(&mut self, channel: &str, payload: &str) -> Result<i64, redis::RedisError> {
        let command = match self {
            Conn::Single(_) => "PUBLISH",
            Conn::Cluster(_) => "SPUBLISH",
        };
        let cmd = redis::cmd(command).arg(channel).arg(payload).to_owned();
        match self {
            Conn::Single(conn) => cmd.query_async(conn).await,
            Conn::Cluster(conn) => cmd.query_async(conn).await,
        }
    }
}

async fn connect(
    cfg: &RedisConfig,
    keys: &Keys,
    sender: PushSender,
    interest: Option<&InterestLink>,
    primary: Option<&super::sentinel::Primary>,
) -> Result<(Conn, Option<String>), redis::RedisError> {
    let mut node = None;
    let mut conn = if cfg.cluster_urls.is_empty() {
        // One node: the primary the Sentinels name, or `redis.url`.
        let info = match primary {
            Some(primary) => {
                let info = primary.locate().await?;
                node = Some(info.addr().to_string());
                info
            }
            None => cfg.url.as_str().into_connection_info()?,
        };
        // Pushes on a shared multiplexed connection need RESP3.
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)))
            .set_response_timeout(Some(Duration::from_millis(cfg.command_timeout_ms)))
            .set_push_sender(sender);
        Conn::Single(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        )
    } else {
        let client = super::cluster_builder(cfg)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(sender)
            .build()?;
        Conn::Cluster(client.get_async_connection().await?)
    };
    // The replica's own channel under either routing: reach reports come back on it.
    let mut names = vec![
        keys.broadcast.clone(),
        keys.health.clone(),
        keys.own.clone(),
    ];
    let wanted = match interest {
        Some(link) => {
            let wanted = link.interest.all_wanted(&*link.registry);
            names.extend(wanted.iter().map(|c| keys.channel(c)));
            wanted
        }
        None => Vec::new(),
    };
    // One SUBSCRIBE for everything (on a cluster, one SSUBSCRIBE per shard channel). Messages
    // that arrive meanwhile wait in the gate, which opens once this returns.
    conn.set(&names, true).await?;
    if let Some(link) = interest {
        link.interest.set_on_link(wanted);
    }
    Ok((conn, node))
}

/// The next interest change, or never without interest routing.
async fn next_change(interest: &mut Option<InterestLink>) -> Option<Change> {
    match interest {
        Some(link) => link.changes.recv().await,
        None => std::future::pending().await,
    }
}

/// Takes `first` and whatever changes wait behind it, and brings the link's subscriptions in
/// line with what is wanted now; then releases the joins that waited.
async fn apply_changes(
    first: Change,
    link: &mut InterestLink,
    keys: &Keys,
    conn: &mut Conn,
) -> Result<(), redis::RedisError> {
    let mut touched = std::collections::HashSet::new();
    let mut waiters = Vec::new();
    let mut next = Some(first);
    while let Some(change) = next.take() {
        match change {
            Change::Want(channel, waiter) => {
                touched.insert(channel);
                waiters.extend(waiter);
            }
            Change::Unwant(channel) => {
                touched.insert(channel);
            }
        }
        if touched.len() < CHANGES_PER_BATCH {
            next = link.changes.try_recv().ok();
        }
    }
    let plan = link.interest.plan(touched, &*link.registry);
    if !plan.remove.is_empty() {
        let names: Vec<String> = plan.remove.iter().map(|c| keys.channel(c)).collect();
        conn.set(&names, false).await?;
    }
    if !plan.add.is_empty() {
        let names: Vec<String> = plan.add.iter().map(|c| keys.channel(c)).collect();
        conn.set(&names, true).await?;
        link.interest.subscribed(&plan.add);
    }
    for waiter in waiters {
        let _ = waiter.send(());
    }
    Ok(())
}
