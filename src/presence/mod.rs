//! Presence: who is in a channel, across every replica, kept in Redis.
//!
//! For each channel with `presence = true` Redis holds (all in the channel's hash slot):
//! - `presence:{c}`: connection id → `<user key>\n<member JSON>` (`connection`, `user`, `info`);
//! - `presence-users:{c}`: user key → how many of that user's connections are in (the user key
//!   is `u:<user>`, or `c:<connection>` for an anonymous connection, which counts as one user);
//! - `presence-of:{c}:<replica>`: the members that replica holds.
//!
//! Beside them, `presence-channels:<replica>` lists the channels where a replica has members,
//! and `replicas-alive` holds every replica with the time (Redis's clock) it stops counting as
//! alive. Counting is `HLEN`; listing is `HSCAN`, page by page.
//!
//! One task per replica ([`run`]) writes this replica's joins and leaves, in the order the
//! registry reports them ([`MembershipWatch`]), each with one script call that also publishes the
//! `join`/`leave` event (channels with `join_leave`) through the same pub/sub channel as the
//! channel's messages. A join publishes only when the user's count goes 0 → 1, a leave only
//! when it goes 1 → 0: a user with two tabs joins once and leaves with the last tab.
//!
//! The same task keeps presence true when things fail:
//! - every `presence.heartbeat_interval_ms` it renews this replica in `replicas-alive`; a
//!   replica found past its time (killed, or cut off) has its members removed by one live
//!   replica (which takes `presence-sweep:<replica>` first), leave events included;
//! - when the heartbeat finds this replica missing (Redis restarted empty, or others removed it
//!   while it was cut off), or a write failed or was dropped, it compares Redis with the
//!   registry and puts its own members right;
//! - at shutdown it removes its own members at once.
//!
//! With `presence.user_status` it also keeps every signed-in user's connections, wherever they
//! are (`user-connections:{u}`: connection → replica, `user-seen:{u}`: when the last one
//! closed, `users-of:<replica>`), by the same rules, for [`Presence::user_status`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backplane::script::{Invocation, Script};
use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::config::{Config, Routing};
use crate::connection::ConnHandle;
use crate::metrics::Metrics;
use crate::outbound::envelope::{presence_event, PresenceKind};
use crate::protocol::{PresencePage, PresenceQuery};
use crate::registry::{MembershipWatch, Registry, Target};

/// Adds a member (KEYS: members, users, this replica's members; ARGV: 1 events on/off, 2 the
/// publish command, 3 the pub/sub channel, 4 and 5 the event's text before and after the member,
/// 6 connection, 7 user key, 8 member JSON). Returns 1 when the member was not there before.
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HSETNX', KEYS[1], ARGV[6], ARGV[7] .. '\n' .. ARGV[8]) == 0 then return 0 end
redis.call('SADD', KEYS[3], ARGV[6])
if redis.call('HINCRBY', KEYS[2], ARGV[7], 1) == 1 and ARGV[1] == '1' then
  redis.call(ARGV[2], ARGV[3], ARGV[4] .. ARGV[8] .. ARGV[5])
end
return 1
",
    )
});

/// Removes members by connection id (KEYS as [`JOIN`]; ARGV 1–5 as there, then the ids), each
/// one's leave event written from what Redis stored of it. Returns how many were there.
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local removed = 0
for i = 6, #ARGV do
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  if stored then
    redis.call('HDEL', KEYS[1], ARGV[i])
    local nl = string.find(stored, '\n', 1, true)
    local user = string.sub(stored, 1, nl - 1)
    if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
      redis.call('HDEL', KEYS[2], user)
      if ARGV[1] == '1' then
        redis.call(ARGV[2], ARGV[3], ARGV[4] .. string.sub(stored, nl + 1) .. ARGV[5])
      end
    end
    removed = removed + 1
  end
  redis.call('SREM', KEYS[3], ARGV[i])
end
return removed
",
    )
});

/// Renews this replica (KEYS: replicas-alive; ARGV: replica, time to live in ms) and lists the
/// replicas past their time. Returns {1 when this replica was missing, {dead replicas}}.
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local missing = redis.call('ZADD', KEYS[1], now + ARGV[2], ARGV[1])
return {missing, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)}
",
    )
});

/// One page of a channel's presence (KEYS: members, users; ARGV: `users` or `connections`,
/// cursor, count): {connections, users, next cursor, {field, value, ...}}.
static PAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local scanned = ARGV[1] == 'users' and KEYS[2] or KEYS[1]
local page = redis.call('HSCAN', scanned, ARGV[2], 'COUNT', ARGV[3])
return {redis.call('HLEN', KEYS[1]), redis.call('HLEN', KEYS[2]), page[1], page[2]}
",
    )
});

/// A signed-in user's connection opened (KEYS: user-connections; ARGV: connection, replica).
static USER_ON: LazyLock<Script> =
    LazyLock::new(|| Script::new("redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])\nreturn 1\n"));

/// A user's connections closed (KEYS: user-connections, user-seen; ARGV: last-seen TTL in ms,
/// `connection` or `replica`, then the connection id or the replica whose connections all
/// closed). When none is left, the user is last seen now. Returns how many were removed.
static USER_OFF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local removed = 0
if ARGV[2] == 'connection' then
  removed = redis.call('HDEL', KEYS[1], ARGV[3])
else
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i + 1] == ARGV[3] then
      removed = removed + redis.call('HDEL', KEYS[1], all[i])
    end
  end
end
if removed > 0 and redis.call('HLEN', KEYS[1]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000), 'PX', ARGV[1])
end
return removed
",
    )
});

/// A user's status (KEYS: user-connections, user-seen): {connections, last seen or false, now}.
static USER_STATUS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
return {redis.call('HLEN', KEYS[1]), redis.call('GET', KEYS[2]), t[1] * 1000 + math.floor(t[2] / 1000)}
",
    )
});

/// Members taken from a dead replica's set per script call.
const SWEEP_BATCH: usize = 500;

/// A join or a leave, a connect or a disconnect, as the task writes it.
#[derive(Debug)]
enum Change {
    Join(Member),
    Leave(Member),
    Connected(UserConnection),
    Disconnected(UserConnection),
}

/// A signed-in user's connection.
#[derive(Debug)]
struct UserConnection {
    user: Arc<str>,
    connection: Arc<str>,
}

/// Whether a user is connected anywhere, as backends get it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserStatus {
    /// The user.
    pub user: String,
    /// At least one connection, on any replica.
    pub online: bool,
    /// Its connections, across replicas.
    pub connections: u64,
    /// Unix ms: now when online; else when its last connection closed; `null` when that is
    /// unknown (never seen, or longer ago than `presence.last_seen_ttl_seconds`).
    pub last_seen_ms: Option<u64>,
}

/// A connection in a presence channel.
#[derive(Debug)]
struct Member {
    channel: Arc<str>,
    connection: Arc<str>,
    /// `u:<user>`, or `c:<connection>` when anonymous.
    user_key: String,
    /// `{"connection":..,"user":..,"info":..}`.
    json: String,
}

impl Member {
    fn of(handle: &ConnHandle, channel: &str) -> Self {
        let user_key = match &handle.user {
            Some(user) => format!("u:{user}"),
            None => format!("c:{}", handle.id),
        };
        let json = serde_json::json!({
            "connection": &*handle.id,
            "user": handle.user.as_deref(),
            "info": handle.identity.info,
        })
        .to_string();
        Self {
            channel: Arc::from(channel),
            connection: handle.id.clone(),
            user_key,
            json,
        }
    }
}

/// This replica's presence: what the registry reports to, what queries go through.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    keys: Keys,
    backplane: Backplane,
    metrics: Metrics,
    replica: String,
    changes: mpsc::Sender<Change>,
    /// A change was dropped or failed: the next heartbeat compares Redis with the registry.
    dirty: AtomicBool,
}

/// The receiving end of the changes, for [`run`].
pub struct Changes(mpsc::Receiver<Change>);

impl Presence {
    /// Presence for this replica, and the queue its task reads.
    pub fn new(
        config: Arc<Config>,
        keys: Keys,
        backplane: Backplane,
        metrics: Metrics,
        replica: String,
    ) -> (Self, Changes) {
        let (tx, rx) = mpsc::channel(config.presence.queue_capacity);
        let inner = Inner {
            config,
            keys,
            backplane,
            metrics,
            replica,
            changes: tx,
            dirty: AtomicBool::new(false),
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            Changes(rx),
        )
    }

    fn submit(&self, change: Change) {
        if self.inner.changes.try_send(change).is_err() {
            self.inner.metrics.presence_dropped.increment(1);
            if !self.inner.dirty.swap(true, Ordering::Relaxed) {
                tracing::warn!("presence queue full: joins and leaves dropped (presence.queue_capacity); the next heartbeat puts them right");
            }
        }
    }

    /// One page of `channel`'s presence.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis did not answer.
    pub async fn page(
        &self,
        channel: &str,
        query: &PresenceQuery,
    ) -> Result<PresencePage, RedisFailure> {
        let inner = &self.inner;
        let limit = query
            .limit
            .map_or(inner.config.presence.max_page, |l| l as usize)
            .clamp(1, inner.config.presence.max_page);
        let mut call = PAGE.call();
        call.key(inner.keys.presence(channel))
            .key(inner.keys.presence_users(channel))
            .arg(if query.users { "users" } else { "connections" }.as_bytes())
            .arg(query.cursor.as_deref().unwrap_or("0").as_bytes().to_vec())
            .number(limit as u64);
        let (connections, users, cursor, flat): (u64, u64, String, Vec<String>) =
            inner.backplane.invoke(&call).await?;
        inner.metrics.presence_queries.increment(1);
        let members = flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [field, value] if query.users => Some(user_entry(field, value)),
                [_, value] => member_json(value),
                _ => None,
            })
            .collect();
        Ok(PresencePage {
            connections,
            users,
            members,
            cursor: (cursor != "0").then_some(cursor),
        })
    }
}

/// A member's JSON from what the members hash stores (`<user key>\n<JSON>`).
fn member_json(stored: &str) -> Option<serde_json::Value> {
    let (_, json) = stored.split_once('\n')?;
    serde_json::from_str(json).ok()
}

/// A users-view entry from the users hash: user key → connections.
fn user_entry(key: &str, count: &str) -> serde_json::Value {
    let connections: u64 = count.parse().unwrap_or(0);
    match key.split_once(':') {
        Some(("u", user)) => serde_json::json!({"user": user, "connections": connections}),
        Some((_, connection)) => serde_json::json!({
            "user": null,
            "connection": connection,
            "connections": connections,
        }),
        None => serde_json::json!({"user": key, "connections": connections}),
    }
}

impl Presence {
    /// Whether `user` is connected anywhere, with how many connections, and when last seen.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis did not answer.
    pub async fn user_status(&self, user: &str) -> Result<UserStatus, RedisFailure> {
        let inner = &self.inner;
        let mut call = USER_STATUS.call();
        call.key(inner.keys.user_connections(user))
            .key(inner.keys.user_seen(user));
        let (connections, seen, now): (u64, Option<u64>, u64) =
            inner.backplane.invoke(&call).await?;
        inner.metrics.presence_queries.increment(1);
        let online = connections > 0;
        Ok(UserStatus {
            user: user.to_owned(),
            online,
            connections,
            last_seen_ms: if online { Some(now) } else { seen },
        })
    }

    fn user_change(&self, handle: &ConnHandle, connected: bool) {
        if !self.inner.config.presence.user_status {
            return;
        }
        let Some(user) = &handle.user else { return };
        let change = UserConnection {
            user: user.clone(),
            connection: handle.id.clone(),
        };
        self.submit(if connected {
            Change::Connected(change)
        } else {
            Change::Disconnected(change)
        });
    }
}

impl MembershipWatch for Presence {
    fn connected(&self, handle: &ConnHandle) {
        self.user_change(handle, true);
    }

    fn disconnected(&self, handle: &ConnHandle) {
        self.user_change(handle, false);
    }

    fn joined(&self, handle: &ConnHandle, channel: &str) {
        if self.inner.config.presence_for(channel).is_some() {
            self.inner.metrics.presence_members.increment(1.0);
            self.submit(Change::Join(Member::of(handle, channel)));
        }
    }

    fn left(&self, handle: &ConnHandle, channel: &str) {
        if self.inner.config.presence_for(channel).is_some() {
            self.inner.metrics.presence_members.decrement(1.0);
            self.submit(Change::Leave(Member::of(handle, channel)));
        }
    }
}

/// Writes this replica's joins and leaves, renews it, removes dead replicas' members, and puts
/// its own right when Redis lost them; until `shutdown`, then removes its own members.
pub async fn run(
    presence: Presence,
    Changes(mut changes): Changes,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let mut task = Task {
        inner: presence.inner.clone(),
        registry,
        listed: HashSet::new(),
        listed_users: HashSet::new(),
    };
    // The renewal runs on its own: neither a backlog of joins (a connection storm) nor a long
    // sweep or reconcile may hold it up, or the other replicas would take this one for dead
    // and sweep its members while it is busy writing them.
    let beats = Arc::new(Beats::default());
    let renewing = CancellationToken::new();
    let renewer = tokio::spawn(renew(task.inner.clone(), beats.clone(), renewing.clone()));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = beats.ready.notified() => {
                let beat = std::mem::take(&mut *beats.found.lock().expect("beats lock"));
                task.after_beat(beat).await;
            }
            Some(change) = changes.recv() => task.apply(change).await,
        }
    }
    renewing.cancel();
    let _ = renewer.await;
    // What is still queued is this replica's own, and goes with the rest of its members.
    changes.close();
    while changes.try_recv().is_ok() {}
    let me = task.inner.replica.clone();
    let gone = async {
        let removed = task.sweep(&me).await?;
        let mut forget = redis::cmd("ZREM");
        forget.arg(task.inner.keys.replicas_alive()).arg(&me);
        task.inner.backplane.query::<()>(&forget).await?;
        Ok::<_, RedisFailure>(removed)
    };
    match gone.await {
        Ok(removed) => tracing::info!(removed, "presence: this replica's members removed"),
        Err(e) => {
            tracing::warn!(error = %e, "presence: this replica's members could not be removed; the other replicas will once its heartbeat runs out")
        }
    }
}

/// Handed from the renewal to the presence task: what renewals found since it last looked.
#[derive(Default)]
struct Beats {
    found: std::sync::Mutex<Beat>,
    ready: tokio::sync::Notify,
}

/// What renewals found.
#[derive(Debug, Default)]
struct Beat {
    /// This replica was missing from `replicas-alive`: Redis lost it, or the others took it for
    /// dead.
    missing: bool,
    /// Replicas past their time.
    dead: Vec<String>,
}

/// Renews this replica in `replicas-alive` every heartbeat until `stop`, and hands what it finds
/// to the presence task (the latest dead list; `missing` kept until taken).
async fn renew(inner: Arc<Inner>, beats: Arc<Beats>, stop: CancellationToken) {
    let ttl_ms = inner.config.presence.replica_ttl_seconds * 1000;
    let mut tick = tokio::time::interval(Duration::from_millis(
        inner.config.presence.heartbeat_interval_ms,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut call = HEARTBEAT.call();
        call.key(inner.keys.replicas_alive())
            .arg(inner.replica.as_bytes().to_vec())
            .number(ttl_ms);
        match inner.backplane.invoke::<(u64, Vec<String>)>(&call).await {
            Ok((missing, dead)) => {
                {
                    let mut found = beats.found.lock().expect("beats lock");
                    found.missing |= missing == 1;
                    found.dead = dead;
                }
                beats.ready.notify_one();
            }
            Err(e) => {
                tracing::debug!(error = %e, "presence heartbeat failed");
                inner.dirty.store(true, Ordering::Relaxed);
            }
        }
    }
}

struct Task {
    inner: Arc<Inner>,
    registry: Arc<Registry>,
    /// Channels known to be in this replica's `presence-channels` set.
    listed: HashSet<Arc<str>>,
    /// Users known to be in this replica's `users-of` set.
    listed_users: HashSet<Arc<str>>,
}

impl Task {
    /// The event arguments (ARGV 1–5) of a change in `channel`.
    fn event_args(&self, call: &mut Invocation<'_>, channel: &str, kind: PresenceKind) {
        let inner = &self.inner;
        let events = inner
            .config
            .presence_for(channel)
            .is_some_and(|c| c.join_leave);
        let to = match inner.config.outbound.routing {
            Routing::Broadcast => inner.keys.broadcast.clone(),
            Routing::Interest => inner.keys.channel(channel),
        };
        let publish = if inner.backplane.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let (before, after) = presence_event(kind, channel, crate::clock::unix_us());
        call.arg(if events { &b"1"[..] } else { &b"0"[..] })
            .arg(publish.as_bytes())
            .arg(to.into_bytes())
            .arg(before.into_bytes())
            .arg(after.into_bytes());
    }

    /// The keys (KEYS 1–3) of `replica`'s members in `channel`.
    fn keys_of(&self, call: &mut Invocation<'_>, channel: &str, replica: &str) {
        let keys = &self.inner.keys;
        call.key(keys.presence(channel))
            .key(keys.presence_users(channel))
            .key(keys.presence_of(channel, replica));
    }

    async fn apply(&mut self, change: Change) {
        let result = match &change {
            Change::Join(member) => self.join(member).await,
            Change::Leave(member) => {
                let me = self.inner.replica.clone();
                let connection = [member.connection.to_string()];
                self.remove(&member.channel, &me, &connection)
                    .await
                    .map(|_| ())
            }
            Change::Connected(user) => self.user_on(user).await,
            Change::Disconnected(user) => self
                .user_off(&user.user, "connection", &user.connection)
                .await
                .map(|_| ()),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, change = ?change, "presence change not written; the next heartbeat puts it right");
            self.inner.dirty.store(true, Ordering::Relaxed);
        }
    }

    async fn join(&mut self, member: &Member) -> Result<(), RedisFailure> {
        let inner = self.inner.clone();
        if !self.listed.contains(&member.channel) {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(inner.keys.presence_channels(&inner.replica))
                .arg(&*member.channel);
            inner.backplane.query::<()>(&cmd).await?;
            self.listed.insert(member.channel.clone());
        }
        let mut call = JOIN.call();
        self.keys_of(&mut call, &member.channel, &inner.replica);
        self.event_args(&mut call, &member.channel, PresenceKind::Join);
        call.arg(member.connection.as_bytes().to_vec())
            .arg(member.user_key.as_bytes().to_vec())
            .arg(member.json.as_bytes().to_vec());
        let added: u64 = inner.backplane.invoke(&call).await?;
        if added == 1 {
            inner.metrics.presence_changes(true).increment(1);
        }
        Ok(())
    }

    async fn user_on(&mut self, user: &UserConnection) -> Result<(), RedisFailure> {
        let inner = self.inner.clone();
        if !self.listed_users.contains(&user.user) {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(inner.keys.users_of(&inner.replica))
                .arg(&*user.user);
            inner.backplane.query::<()>(&cmd).await?;
            self.listed_users.insert(user.user.clone());
        }
        let mut call = USER_ON.call();
        call.key(inner.keys.user_connections(&user.user))
            .arg(user.connection.as_bytes().to_vec())
            .arg(inner.replica.as_bytes().to_vec());
        inner.backplane.invoke::<()>(&call).await
    }

    /// Removes a user's connection (`by` = `connection`), or all its connections on a replica
    /// (`by` = `replica`).
    async fn user_off(&self, user: &str, by: &str, which: &str) -> Result<u64, RedisFailure> {
        let inner = &self.inner;
        let mut call = USER_OFF.call();
        call.key(inner.keys.user_connections(user))
            .key(inner.keys.user_seen(user))
            .number(inner.config.presence.last_seen_ttl_seconds * 1000)
            .arg(by.as_bytes().to_vec())
            .arg(which.as_bytes().to_vec());
        inner.backplane.invoke(&call).await
    }

    /// Removes `connections` of `replica` from `channel`, with their leave events.
    async fn remove(
        &self,
        channel: &str,
        replica: &str,
        connections: &[String],
    ) -> Result<u64, RedisFailure> {
        let mut call = REMOVE.call();
        self.keys_of(&mut call, channel, replica);
        self.event_args(&mut call, channel, PresenceKind::Leave);
        for connection in connections {
            call.arg(connection.as_bytes().to_vec());
        }
        let removed: u64 = self.inner.backplane.invoke(&call).await?;
        self.inner
            .metrics
            .presence_changes(false)
            .increment(removed);
        Ok(removed)
    }

    /// Renews this replica; removes dead replicas' members; puts this replica's right when
    /// Redis lost them or a change was not written.
    /// After a renewal: puts this replica's members right when Redis lost them (or a write
    /// failed), and removes the members of replicas past their time.
    async fn after_beat(&mut self, beat: Beat) {
        let inner = self.inner.clone();
        let ttl_ms = inner.config.presence.replica_ttl_seconds * 1000;
        if beat.missing || inner.dirty.swap(false, Ordering::Relaxed) {
            if let Err(e) = self.reconcile().await {
                tracing::debug!(error = %e, "presence not put right yet");
                inner.dirty.store(true, Ordering::Relaxed);
            }
        }
        for replica in beat.dead.into_iter().filter(|r| *r != inner.replica) {
            if let Err(e) = self.sweep_dead(&replica, ttl_ms).await {
                tracing::warn!(error = %e, replica, "presence: a dead replica's members not removed yet");
            }
        }
    }

    /// Removes a dead replica's members, unless another live replica is at it.
    async fn sweep_dead(&self, replica: &str, ttl_ms: u64) -> Result<(), RedisFailure> {
        let keys = &self.inner.keys;
        let mut claim = redis::cmd("SET");
        claim
            .arg(keys.presence_sweep(replica))
            .arg(&self.inner.replica)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms);
        let claimed: Option<String> = self.inner.backplane.query(&claim).await?;
        if claimed.is_none() {
            return Ok(());
        }
        let removed = self.sweep(replica).await?;
        self.inner.metrics.presence_ghosts.increment(removed);
        tracing::info!(
            replica,
            removed,
            "presence: members of a replica that stopped removed"
        );
        // Two commands, not a pipeline: on a cluster the keys live on different nodes. Should
        // either fail, the next heartbeat sweeps again and finds nothing left.
        let mut forget = redis::cmd("ZREM");
        forget.arg(keys.replicas_alive()).arg(replica);
        self.inner.backplane.query::<()>(&forget).await?;
        let mut release = redis::cmd("DEL");
        release.arg(keys.presence_sweep(replica));
        self.inner.backplane.query::<()>(&release).await?;
        Ok(())
    }

    /// Removes every member `replica` holds, channel by channel, with their leave events.
    ///
    /// Nothing is taken off a list before it is removed: the lists are read (`SRANDMEMBER`),
    /// and each entry leaves its list once its removal is written. A sweep cut short (a
    /// timeout, the sweeping replica dying) leaves the rest listed for the next sweep.
    async fn sweep(&self, replica: &str) -> Result<u64, RedisFailure> {
        let keys = &self.inner.keys;
        let some = |key: String, count: usize| {
            let mut cmd = redis::cmd("SRANDMEMBER");
            cmd.arg(key).arg(count);
            cmd
        };
        let mut removed = 0;
        loop {
            let channels: Vec<String> = self
                .inner
                .backplane
                .query(&some(keys.presence_channels(replica), 100))
                .await?;
            if channels.is_empty() {
                break;
            }
            for channel in channels {
                loop {
                    // The removal script takes each one off this list.
                    let of = some(keys.presence_of(&channel, replica), SWEEP_BATCH);
                    let members: Vec<String> = self.inner.backplane.query(&of).await?;
                    if members.is_empty() {
                        break;
                    }
                    removed += self.remove(&channel, replica, &members).await?;
                }
                let mut done = redis::cmd("SREM");
                done.arg(keys.presence_channels(replica)).arg(&channel);
                self.inner.backplane.query::<()>(&done).await?;
            }
        }
        loop {
            let users: Vec<String> = self
                .inner
                .backplane
                .query(&some(keys.users_of(replica), SWEEP_BATCH))
                .await?;
            if users.is_empty() {
                return Ok(removed);
            }
            for user in users {
                self.user_off(&user, "replica", replica).await?;
                let mut done = redis::cmd("SREM");
                done.arg(keys.users_of(replica)).arg(&user);
                self.inner.backplane.query::<()>(&done).await?;
            }
        }
    }

    /// Makes Redis hold exactly this replica's members: adds those missing (Redis restarted
    /// empty, or this replica was taken for dead), removes those gone (a leave not written).
    async fn reconcile(&mut self) -> Result<(), RedisFailure> {
        let inner = self.inner.clone();
        self.listed.clear();
        let mut local = Vec::new();
        for channel in self.registry.channel_names() {
            if inner.config.presence_for(&channel).is_none() {
                continue;
            }
            let mut members = Vec::new();
            self.registry
                .recipients(Target::Channel(&channel), &mut members);
            local.push((channel, members));
        }
        let mut smembers = redis::cmd("SMEMBERS");
        smembers.arg(inner.keys.presence_channels(&inner.replica));
        let listed: Vec<String> = inner.backplane.query(&smembers).await?;
        for channel in listed {
            if !local.iter().any(|(c, _)| **c == *channel) {
                let mut all = redis::cmd("SMEMBERS");
                all.arg(inner.keys.presence_of(&channel, &inner.replica));
                let stale: Vec<String> = inner.backplane.query(&all).await?;
                if !stale.is_empty() {
                    self.remove(&channel, &inner.replica, &stale).await?;
                }
                let mut srem = redis::cmd("SREM");
                srem.arg(inner.keys.presence_channels(&inner.replica))
                    .arg(&channel);
                inner.backplane.query::<()>(&srem).await?;
            }
        }
        let mut added = 0usize;
        for (channel, members) in local {
            let mut all = redis::cmd("SMEMBERS");
            all.arg(inner.keys.presence_of(&channel, &inner.replica));
            let stored: HashSet<String> = inner.backplane.query(&all).await?;
            let here: HashSet<&str> = members.iter().map(|m| &*m.id).collect();
            let stale: Vec<String> = stored
                .iter()
                .filter(|c| !here.contains(c.as_str()))
                .cloned()
                .collect();
            if !stale.is_empty() {
                self.remove(&channel, &inner.replica, &stale).await?;
            }
            for handle in members.iter().filter(|m| !stored.contains(&*m.id)) {
                // Left meanwhile: its leave is queued behind this, and finds nothing to remove.
                if handle.is_in(&channel) {
                    self.join(&Member::of(handle, &channel)).await?;
                    added += 1;
                }
            }
        }
        if added > 0 {
            tracing::info!(added, "presence: this replica's members put back");
        }
        if inner.config.presence.user_status {
            self.reconcile_users().await?;
        }
        Ok(())
    }

    /// Makes Redis hold exactly this replica's connections of signed-in users.
    async fn reconcile_users(&mut self) -> Result<(), RedisFailure> {
        let inner = self.inner.clone();
        let me = inner.replica.clone();
        self.listed_users.clear();
        let local: Vec<Arc<str>> = self.registry.user_names();
        let mut smembers = redis::cmd("SMEMBERS");
        smembers.arg(inner.keys.users_of(&me));
        let listed: Vec<String> = inner.backplane.query(&smembers).await?;
        for user in listed.iter().filter(|u| !local.iter().any(|l| **l == ***u)) {
            self.user_off(user, "replica", &me).await?;
            let mut srem = redis::cmd("SREM");
            srem.arg(inner.keys.users_of(&me)).arg(user);
            inner.backplane.query::<()>(&srem).await?;
        }
        for user in local {
            let mut conns = Vec::new();
            self.registry.recipients(Target::User(&user), &mut conns);
            let mut all = redis::cmd("HGETALL");
            all.arg(inner.keys.user_connections(&user));
            let stored: std::collections::HashMap<String, String> =
                inner.backplane.query(&all).await?;
            for (connection, _) in stored
                .iter()
                .filter(|(c, r)| **r == me && !conns.iter().any(|h| *h.id == ***c))
            {
                self.user_off(&user, "connection", connection).await?;
            }
            for handle in conns.iter().filter(|h| !stored.contains_key(&*h.id)) {
                let change = UserConnection {
                    user: user.clone(),
                    connection: handle.id.clone(),
                };
                self.user_on(&change).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_members_and_user_counts_read_back_as_documented() {
        let stored = "u:ann\n{\"connection\":\"r.1\",\"user\":\"ann\",\"info\":{\"n\":1}}";
        let member = member_json(stored).unwrap();
        assert_eq!(member["user"], "ann");
        assert_eq!(member["info"]["n"], 1);
        assert_eq!(
            user_entry("u:ann", "2"),
            serde_json::json!({"user": "ann", "connections": 2})
        );
        assert_eq!(
            user_entry("c:r.7", "1"),
            serde_json::json!({"user": null, "connection": "r.7", "connections": 1})
        );
    }
}
