//! Interest routing's publishing side (`outbound.routing = "interest"`).
//!
//! A batch is split into runs of consecutive items for one destination: channel messages go to
//! `<prefix>:ch:<channel>`, connection messages to the pub/sub channel of the replica the
//! connection id names, user messages to every replica listed for the user, and messages to
//! everyone to the broadcast channel. One call of the publish script (`publish.rs`, which the
//! broadcast path uses too) publishes every part and appends its history, so a call is still
//! taken whole or not at all (on a cluster, see `publish_sharded`).
//!
//! Replicas list themselves for their users in `<prefix>:user-replicas:<user>`, a sorted set of
//! replica ids scored by expiry (Redis time, ms): when a user's connection opens, and for every
//! local user each third of `outbound.user_route_ttl_seconds`.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::envelope::{Batch, Item, Unpublished};
use super::publish::{self, lua_now, Destination, Ran, Step};
use super::PublishError;
use crate::backplane::durability::Durability;
use crate::backplane::script::Script;
use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::config::Config;
use crate::registry::{Registry, Target};

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

/// The replicas listed for a user and not expired (Redis time). KEYS[1]: the user's set.
static LIVE_REPLICAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')\n"
    ))
});

/// Where a part of a batch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Channel(&'a str),
    Replica(&'a str),
    User(&'a str),
    All,
}

/// What a routed publish did.
pub struct Published {
    /// Each item's history offset, if any.
    pub offsets: Vec<Option<String>>,
    /// How many replicas received items that ask for an acknowledgement
    /// ([`Join::ack`](super::envelope::Join::ack)).
    pub ack_receivers: usize,
    /// How many reach answers are due: per part with a message asking for a reach report
    /// ([`Message::reach`](super::envelope::Message::reach)), the replicas that received it
    /// (each answers once per payload).
    pub reach_receivers: usize,
}

/// Publishes `batch` by interest, in one call of the publish script (one per part on a
/// cluster); the sends marked for history are appended to it.
///
/// # Errors
/// [`PublishError`] when Redis did not take it: on a single Redis nothing of the batch was sent
/// or stored; on a cluster the parts before the failure were (see [`publish_sharded`]).
pub async fn publish(
    backplane: &Backplane,
    keys: &Keys,
    durability: &Durability,
    config: &Config,
    batch: &Batch<'_>,
) -> Result<Published, PublishError> {
    // Parts are runs of consecutive items for the same destination: published in call order,
    // they reach a connection that several of them are for in call order too.
    let mut parts: Vec<(Route<'_>, Vec<usize>)> = Vec::new();
    for (index, item) in batch.items.iter().enumerate() {
        let Some(route) = route(item) else {
            continue;
        };
        match parts.last_mut() {
            Some((last, indexes)) if *last == route => indexes.push(index),
            _ => parts.push((route, vec![index])),
        }
    }
    let mut offsets = vec![None; batch.items.len()];
    if parts.is_empty() {
        return Ok(Published {
            offsets,
            ack_receivers: 0,
            reach_receivers: 0,
        });
    }
    let steps: Vec<Step<'_>> = parts
        .iter()
        .map(|(route, indexes)| {
            let items: Vec<&Item<'_>> = indexes.iter().map(|&i| &batch.items[i]).collect();
            let to = match route {
                Route::Channel(channel) => Destination::Channel(keys.channel(channel)),
                Route::Replica(replica) => Destination::Channel(keys.replica(replica)),
                Route::All => Destination::Channel(keys.broadcast.clone()),
                Route::User(user) => Destination::UserReplicas(keys.user_replicas(user)),
            };
            Step {
                to,
                payload: Unpublished::batch(batch.ts, &items),
                appends: publish::appends(keys, config, &batch.items, indexes.iter().copied()),
            }
        })
        .collect();
    let ran = if backplane.is_cluster() {
        publish_sharded(backplane, keys, durability, &steps).await?
    } else {
        publish::run(backplane, keys, durability, &steps).await?
    };
    let appended = steps.iter().flat_map(|s| s.appends.iter().map(|a| a.item));
    for (index, offset) in appended.zip(ran.offsets) {
        offsets[index] = Some(offset);
    }
    let reach_receivers = parts
        .iter()
        .zip(&ran.receivers)
        .filter(|((_, indexes), _)| {
            indexes
                .iter()
                .any(|&i| matches!(&batch.items[i], Item::Send(m) if m.reach.is_some()))
        })
        .map(|(_, got)| got)
        .sum();
    let ack_receivers = parts
        .iter()
        .zip(ran.receivers)
        .map(|((_, indexes), got)| {
            let asking = indexes
                .iter()
                .filter(|&&i| matches!(&batch.items[i], Item::Subscribe(j) if j.ack.is_some()))
                .count();
            asking * got
        })
        .sum();
    Ok(Published {
        offsets,
        ack_receivers,
        reach_receivers,
    })
}

/// Acknowledgements of items that ask for one ([`Join::ack`](super::envelope::Join::ack)), awaited by the replica that
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

/// On a Redis Cluster each part is published on its own shard: a part with history by the
/// publish script (its keys and pub/sub channel share a hash tag), a user part after reading
/// the user's replicas, the rest with SPUBLISH. Parts are published in order, but a call whose
/// parts live on several shards is no longer one atomic step: if Redis fails part-way, the
/// parts before the failure were published.
async fn publish_sharded(
    backplane: &Backplane,
    keys: &Keys,
    durability: &Durability,
    steps: &[Step<'_>],
) -> Result<Ran, PublishError> {
    let mut done = Ran {
        offsets: Vec::new(),
        receivers: Vec::new(),
    };
    for (published, step) in steps.iter().enumerate() {
        publish_part(backplane, keys, durability, step, &mut done)
            .await
            .map_err(|failure| PublishError {
                failure,
                published_parts: published,
            })?;
    }
    Ok(done)
}

/// Publishes one part of a call on a cluster (see [`publish_sharded`]).
async fn publish_part(
    backplane: &Backplane,
    keys: &Keys,
    durability: &Durability,
    step: &Step<'_>,
    done: &mut Ran,
) -> Result<(), RedisFailure> {
    {
        if !step.appends.is_empty() {
            let ran = publish::run(backplane, keys, durability, std::slice::from_ref(step)).await?;
            done.offsets.extend(ran.offsets);
            done.receivers.extend(ran.receivers);
            return Ok(());
        }
        let payload = step.payload.json.as_slice();
        match &step.to {
            Destination::Channel(channel) => {
                let mut cmd = redis::cmd("SPUBLISH");
                cmd.arg(channel).arg(payload);
                done.receivers.push(backplane.query::<usize>(&cmd).await?);
            }
            Destination::UserReplicas(set) => {
                let live: Vec<String> = backplane
                    .invoke(LIVE_REPLICAS.call().key(set.as_str()))
                    .await?;
                let mut got = 0;
                for replica in live {
                    let mut cmd = redis::cmd("SPUBLISH");
                    cmd.arg(keys.replica(&replica)).arg(payload);
                    got += backplane.query::<usize>(&cmd).await?;
                }
                done.receivers.push(got);
            }
        }
    }
    Ok(())
}

/// Where `item` goes; `None` when no replica can hold its recipient (a connection id that
/// names none).
fn route<'a>(item: &'a Item<'_>) -> Option<Route<'a>> {
    match item.target() {
        Target::Channel(channel) => Some(Route::Channel(channel)),
        Target::Connection(id) => id.split_once('.').map(|(r, _)| Route::Replica(r)),
        Target::User(user) => Some(Route::User(user)),
        Target::All => Some(Route::All),
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
