//! Interest routing's publishing side (`outbound.routing = "interest"`).
//!
//! A batch is split into runs of consecutive items for one destination: channel messages go to
//! `<prefix>:ch:<channel>`, connection messages to the pub/sub channel of the replica the
//! connection id names, user messages to every replica listed for the user, and messages to
//! everyone to the broadcast channel. One Lua script publishes every part (and appends history),
//! so a call is still taken whole or not at all.
//!
//! Replicas list themselves for their users in `<prefix>:user-replicas:<user>`, a sorted set of
//! replica ids scored by expiry (Redis time, ms): when a user's connection opens, and for every
//! local user each third of `outbound.user_route_ttl_seconds`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::envelope::{Batch, Item};
use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::config::ChannelConfig;
use crate::registry::{Registry, Target};

/// Lua that sets `now` to Redis' clock in milliseconds: user routes expire by Redis time, so
/// that replicas whose clocks differ agree.
macro_rules! lua_now {
    () => {
        "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
    };
}

/// Lists a replica for a user until Redis time + ARGV[2] ms. KEYS[1]: the user's set. ARGV[1]:
/// the replica id.
const LIST_REPLICA: &str = concat!(
    lua_now!(),
    r#"
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#
);

/// Publishes the parts of one batch. KEYS: per history part its stream and epoch keys, per user
/// part the user's set (in part order). ARGV[1]: an epoch to use where a channel has none;
/// ARGV[2]: the replica channel prefix (`<prefix>:replica:`); ARGV[3]: `PUBLISH`, or `SPUBLISH`
/// on a cluster (then with one part per call); then per part: its kind, then
/// - `p` (plain): the pub/sub channel, the payload;
/// - `h` (history): the pub/sub channel, the payload, MAXLEN, TTL, the number of messages, and
///   their data; published as `["<offset>",...]` + newline + payload;
/// - `u` (user): the payload, published to every replica listed and not expired.
///
/// Returns the offsets of every history message, in order, and per part the number of
/// replicas that received it.
const PUBLISH_ROUTED: &str = concat!(
    lua_now!(),
    r#"
local publish = ARGV[3]
local offsets, receivers = {}, {}
local k, a = 1, 4
while a <= #ARGV do
  local kind = ARGV[a]
  if kind == 'p' then
    receivers[#receivers + 1] = redis.call(publish, ARGV[a + 1], ARGV[a + 2])
    a = a + 3
  elseif kind == 'h' then
    local channel, payload = ARGV[a + 1], ARGV[a + 2]
    local maxlen, ttl, n = ARGV[a + 3], tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
    local stream, epoch_key = KEYS[k], KEYS[k + 1]
    k = k + 2
    local epoch = redis.call('GET', epoch_key)
    if not epoch then
      epoch = ARGV[1]
      redis.call('SET', epoch_key, epoch)
    end
    local mine = {}
    for i = 1, n do
      local id = redis.call('XADD', stream, 'MAXLEN', maxlen, '*', 'data', ARGV[a + 5 + i])
      mine[i] = epoch .. ':' .. id
      offsets[#offsets + 1] = mine[i]
    end
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', epoch_key, ttl)
    receivers[#receivers + 1] = redis.call(publish, channel, cjson.encode(mine) .. '\n' .. payload)
    a = a + 6 + n
  else
    local payload = ARGV[a + 1]
    local replicas = redis.call('ZRANGEBYSCORE', KEYS[k], now, '+inf')
    k = k + 1
    local got = 0
    for _, replica in ipairs(replicas) do
      got = got + redis.call(publish, ARGV[2] .. replica, payload)
    end
    receivers[#receivers + 1] = got
    a = a + 2
  end
end
return {offsets, receivers}
"#
);

/// The replicas listed for a user and not expired (Redis time). KEYS[1]: the user's set.
const LIVE_REPLICAS: &str = concat!(
    lua_now!(),
    "return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')\n"
);

/// One part's share of the publish script: its keys, its arguments, and the items that get
/// history offsets.
#[derive(Default)]
struct Step {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    history: Vec<usize>,
}

/// Where a part of a batch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination<'a> {
    Channel(&'a str),
    Replica(&'a str),
    User(&'a str),
    All,
}

/// What a routed publish did.
pub struct Published {
    /// Each item's history offset, if any.
    pub offsets: Vec<Option<String>>,
    /// How many replicas received items that ask for an acknowledgement (`Item::ack`).
    pub ack_receivers: usize,
}

/// Publishes `batch` by interest, in one atomic script; `history` lists the items bound for a
/// channel with history, with its settings.
///
/// # Errors
/// [`RedisFailure`] when Redis did not take it: nothing of the batch was sent or stored.
pub async fn publish(
    backplane: &Backplane,
    keys: &Keys,
    history: &[(usize, &ChannelConfig)],
    batch: &Batch<'_>,
) -> Result<Published, RedisFailure> {
    // Parts are runs of consecutive items for the same destination: published in call order,
    // they reach a connection that several of them are for in call order too.
    let mut parts: Vec<(Destination<'_>, Vec<usize>)> = Vec::new();
    for (index, item) in batch.items.iter().enumerate() {
        let Some(destination) = destination(item) else {
            continue;
        };
        match parts.last_mut() {
            Some((last, indexes)) if *last == destination => indexes.push(index),
            _ => parts.push((destination, vec![index])),
        }
    }
    let mut steps = Vec::with_capacity(parts.len());
    for (destination, indexes) in &parts {
        let items: Vec<&Item<'_>> = indexes.iter().map(|&i| &batch.items[i]).collect();
        let payload = serde_json::to_vec(&Part {
            ts: batch.ts,
            items: &items,
        })
        .expect("batches serialize");
        let mut step = Step::default();
        match destination {
            Destination::Channel(channel) => {
                let with_history: Vec<usize> = indexes
                    .iter()
                    .copied()
                    .filter(|&i| batch.items[i].history)
                    .collect();
                // A part's history items are all for its one channel: they share its settings.
                let settings = with_history
                    .first()
                    .and_then(|first| history.iter().find(|(i, _)| i == first))
                    .map(|&(_, settings)| settings);
                match settings {
                    Some(settings) => {
                        step.keys = vec![keys.history(channel), keys.epoch(channel)];
                        step.args = vec![
                            b"h".to_vec(),
                            keys.channel(channel).into_bytes(),
                            payload,
                            settings.history_size.to_string().into_bytes(),
                            settings.history_ttl_seconds.to_string().into_bytes(),
                            with_history.len().to_string().into_bytes(),
                        ];
                        for &i in &with_history {
                            let data = batch.items[i].data.map(|d| d.get()).unwrap_or("null");
                            step.args.push(data.as_bytes().to_vec());
                        }
                        step.history = with_history;
                    }
                    _ => {
                        step.args =
                            vec![b"p".to_vec(), keys.channel(channel).into_bytes(), payload];
                    }
                }
            }
            Destination::Replica(replica) => {
                step.args = vec![b"p".to_vec(), keys.replica(replica).into_bytes(), payload];
            }
            Destination::All => {
                step.args = vec![b"p".to_vec(), keys.broadcast.clone().into_bytes(), payload];
            }
            Destination::User(user) => {
                step.keys = vec![keys.user_replicas(user)];
                step.args = vec![b"u".to_vec(), payload];
            }
        }
        steps.push(step);
    }
    let mut offsets = vec![None; batch.items.len()];
    if parts.is_empty() {
        return Ok(Published {
            offsets,
            ack_receivers: 0,
        });
    }
    let epoch = format!("{:08x}", crate::random_u32());
    let (got, receivers) = if backplane.is_cluster() {
        publish_sharded(backplane, keys, &epoch, &steps).await?
    } else {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUBLISH_ROUTED)
            .arg(steps.iter().map(|s| s.keys.len()).sum::<usize>());
        for key in steps.iter().flat_map(|s| &s.keys) {
            cmd.arg(key);
        }
        cmd.arg(&epoch).arg(keys.replica("")).arg("PUBLISH");
        for arg in steps.iter().flat_map(|s| &s.args) {
            cmd.arg(arg.as_slice());
        }
        backplane.query(&cmd).await?
    };
    let history_items = steps.iter().flat_map(|s| s.history.iter().copied());
    for (index, offset) in history_items.zip(got) {
        offsets[index] = Some(offset);
    }
    let ack_receivers = parts
        .iter()
        .zip(receivers)
        .map(|((_, indexes), got)| {
            let asking = indexes
                .iter()
                .filter(|&&i| batch.items[i].ack.is_some())
                .count();
            asking * got
        })
        .sum();
    Ok(Published {
        offsets,
        ack_receivers,
    })
}

/// Acknowledgements of items that ask for one (`Item::ack`), awaited by the replica that
/// published them.
#[derive(Default)]
pub struct Acks {
    waiting: std::sync::Mutex<std::collections::HashMap<String, Waiter>>,
}

#[derive(Default)]
struct Waiter {
    got: usize,
    expected: Option<usize>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Acks {
    /// Starts waiting for acknowledgements of `token` (before publishing: they may come back
    /// before the publish call returns).
    pub fn expect(&self, token: &str) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = Waiter {
            done: Some(tx),
            ..Waiter::default()
        };
        self.lock().insert(token.to_owned(), waiter);
        rx
    }

    /// `count` acknowledgements of `token` are due.
    pub fn due(&self, token: &str, count: usize) {
        let mut waiting = self.lock();
        if let Some(w) = waiting.get_mut(token) {
            w.expected = Some(count);
        }
        Self::settle(&mut waiting, token);
    }

    /// An acknowledgement of `token` arrived.
    pub fn arrived(&self, token: &str) {
        let mut waiting = self.lock();
        if let Some(w) = waiting.get_mut(token) {
            w.got += 1;
        }
        Self::settle(&mut waiting, token);
    }

    /// Stops waiting for `token`.
    pub fn forget(&self, token: &str) {
        self.lock().remove(token);
    }

    fn settle(waiting: &mut std::collections::HashMap<String, Waiter>, token: &str) {
        let complete = waiting
            .get(token)
            .is_some_and(|w| w.expected.is_some_and(|e| w.got >= e));
        if complete {
            if let Some(mut w) = waiting.remove(token) {
                if let Some(done) = w.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Waiter>> {
        self.waiting.lock().expect("acks lock")
    }
}

/// On a Redis Cluster each part is published on its own shard: a channel's history part with the
/// script (its keys and pub/sub channel share a hash tag), a user part after reading the user's
/// replicas, the rest with SPUBLISH. Parts are published in order, but a call whose parts live
/// on several shards is no longer one atomic step: if Redis fails part-way, the parts before
/// the failure were published.
async fn publish_sharded(
    backplane: &Backplane,
    keys: &Keys,
    epoch: &str,
    steps: &[Step],
) -> Result<(Vec<String>, Vec<usize>), RedisFailure> {
    let (mut offsets, mut receivers) = (Vec::new(), Vec::new());
    for step in steps {
        match step.args[0].as_slice() {
            b"h" => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(PUBLISH_ROUTED).arg(step.keys.len());
                for key in &step.keys {
                    cmd.arg(key);
                }
                cmd.arg(epoch).arg(keys.replica("")).arg("SPUBLISH");
                for arg in &step.args {
                    cmd.arg(arg.as_slice());
                }
                let (got, counts): (Vec<String>, Vec<usize>) = backplane.query(&cmd).await?;
                offsets.extend(got);
                receivers.extend(counts);
            }
            b"u" => {
                let live: Vec<String> = backplane
                    .query(
                        redis::cmd("EVAL")
                            .arg(LIVE_REPLICAS)
                            .arg(1)
                            .arg(&step.keys[0]),
                    )
                    .await?;
                let mut got = 0;
                for replica in live {
                    let mut cmd = redis::cmd("SPUBLISH");
                    cmd.arg(keys.replica(&replica)).arg(step.args[1].as_slice());
                    got += backplane.query::<usize>(&cmd).await?;
                }
                receivers.push(got);
            }
            _ => {
                let mut cmd = redis::cmd("SPUBLISH");
                cmd.arg(step.args[1].as_slice())
                    .arg(step.args[2].as_slice());
                receivers.push(backplane.query::<usize>(&cmd).await?);
            }
        }
    }
    Ok((offsets, receivers))
}

/// A part of a batch, serialized as a [`Batch`].
#[derive(serde::Serialize)]
struct Part<'a, 'b> {
    ts: u64,
    items: &'a [&'a Item<'b>],
}

/// Where `item` goes; `None` when no replica can hold its recipient (a connection id that
/// names none).
fn destination<'a>(item: &'a Item<'_>) -> Option<Destination<'a>> {
    match item.to.target().ok()? {
        Target::Channel(channel) => Some(Destination::Channel(channel)),
        Target::Connection(id) => id.split_once('.').map(|(r, _)| Destination::Replica(r)),
        Target::User(user) => Some(Destination::User(user)),
        Target::All => Some(Destination::All),
    }
}

/// Lists this replica for `user` (when one of its connections opens).
///
/// # Errors
/// [`RedisFailure`] when Redis did not take it; the periodic refresh tries again.
pub async fn list_user(
    backplane: &Backplane,
    keys: &Keys,
    replica: &str,
    user: &str,
    ttl: Duration,
) -> Result<(), RedisFailure> {
    backplane
        .query::<i64>(&list_cmd(keys, replica, user, ttl))
        .await
        .map(|_| ())
}

/// The command listing `replica` for `user` for `ttl`.
fn list_cmd(keys: &Keys, replica: &str, user: &str, ttl: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(LIST_REPLICA)
        .arg(1)
        .arg(keys.user_replicas(user))
        .arg(replica)
        .arg(ttl.as_millis() as u64);
    cmd
}

/// Keeps this replica listed for every user it holds, each third of `ttl`, until `stop`.
pub async fn refresh_users(
    backplane: Backplane,
    keys: Keys,
    replica: String,
    registry: Arc<Registry>,
    ttl: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let users = registry.user_names();
        let list = |user: &Arc<str>| list_cmd(&keys, &replica, user, ttl);
        for chunk in users.chunks(1000) {
            let result = if backplane.is_cluster() {
                // Users' keys live on different shards: one command each, all in flight.
                let cmds: Vec<redis::Cmd> = chunk.iter().map(list).collect();
                let listed = cmds.iter().map(|cmd| backplane.query::<i64>(cmd));
                futures_util::future::join_all(listed)
                    .await
                    .into_iter()
                    .find_map(Result::err)
                    .map_or(Ok(()), Err)
            } else {
                let mut pipe = redis::pipe();
                for user in chunk {
                    pipe.add_command(list(user)).ignore();
                }
                backplane.query_pipeline::<()>(&pipe).await
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "refreshing user routes failed; retrying at the next tick");
                break;
            }
        }
    }
}
