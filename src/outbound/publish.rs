//! The one publish script, shared by every way a batch is published, each with its own list
//! of [`Step`]s: broadcast (a batch with history: one step, to the broadcast channel), interest
//! routing (every batch: a step per run of items for one destination) and interest routing on
//! a Redis Cluster (each step with history on its own, on the shard of its channel). A
//! broadcast batch without history, and a cluster step without, is a plain PUBLISH / SPUBLISH.
//!
//! A step publishes one payload to one destination, after appending the history it carries;
//! offsets then increase in publish order per channel, whichever replica or backend published,
//! and a message is never in the history without having been published (or the reverse).
//!
//! The script is called by its SHA (EVALSHA), and sent to a node only when the node answers
//! NOSCRIPT ([`Backplane::invoke`]).

use std::sync::LazyLock;

use serde::Serialize;

use super::envelope::{Item, Recipient, Unpublished};
use super::history::lua_continuity;
use crate::backplane::durability::Durability;
use crate::backplane::script::{Invocation, Script};
use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::config::{ChannelConfig, Config};

/// Lua that sets `now` to Redis' clock in milliseconds: user routes expire by Redis time, so
/// that replicas whose clocks differ agree.
macro_rules! lua_now {
    () => {
        "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
    };
}

pub(crate) use lua_now;

/// Runs the steps in order. KEYS and ARGV are written by [`Step::write`] (see there); ARGV[1]
/// is an epoch to use where a channel has none (or where its epoch no longer holds: see
/// [`lua_continuity`]), ARGV[2] the replica channel prefix (`<prefix>:replica:`), ARGV[3]
/// `PUBLISH`, or `SPUBLISH` on a cluster, ARGV[4] the run id of the Redis known to persist
/// every write before answering ([`Durability`]). Returns the offsets of
/// every append, in order, and per step how many replicas received its payload.
static PUBLISH: LazyLock<Script> = LazyLock::new(|| Script::new(PUBLISH_LUA));

const PUBLISH_LUA: &str = concat!(
    lua_now!(),
    lua_continuity!(),
    r#"
local publish = ARGV[3]
local offsets, receivers = {}, {}
local k, a = 1, 5
while a <= #ARGV do
  local step, payload = cjson.decode(ARGV[a]), ARGV[a + 1]
  a = a + 2
  local mine = {}
  for i = 1, step.appends do
    local stream, epoch_key, writer_key = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    local maxlen, ttl, data = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2]
    k, a = k + 3, a + 3
    local epoch = history_epoch(epoch_key, writer_key)
    if not epoch then
      epoch = ARGV[1]
      redis.call('SET', epoch_key, epoch)
    end
    local id = redis.call('XADD', stream, 'MAXLEN', maxlen, '*', 'data', data)
    stamp_writer(writer_key, ARGV[4], ttl)
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', epoch_key, ttl)
    mine[i] = epoch .. ':' .. id
    offsets[#offsets + 1] = mine[i]
  end
  if #mine > 0 then
    local at = step.offsets_at
    payload = string.sub(payload, 1, at) .. '"' .. table.concat(mine, '","') .. '"'
      .. string.sub(payload, at + 1)
  end
  if step.to.kind == 'channel' then
    receivers[#receivers + 1] = redis.call(publish, step.to.name, payload)
  else
    local replicas = redis.call('ZRANGEBYSCORE', KEYS[k], now, '+inf')
    k = k + 1
    local got = 0
    for _, replica in ipairs(replicas) do
      got = got + redis.call(publish, ARGV[2] .. replica, payload)
    end
    receivers[#receivers + 1] = got
  end
end
return {offsets, receivers}
"#
);

/// One publish of the script.
#[derive(Debug)]
pub struct Step<'a> {
    /// Where the payload goes.
    pub to: Destination,
    /// The payload, `offsets` still empty.
    pub payload: Unpublished,
    /// History appends, in item order; their offsets are written into the payload.
    pub appends: Vec<Append<'a>>,
}

/// Where a step's payload goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A pub/sub channel (a channel's, a replica's, or the broadcast channel).
    Channel(String),
    /// The channel of every replica listed, and not expired (Redis time), in a user's sorted
    /// set (the key).
    UserReplicas(String),
}

/// One message appended to a channel's history.
#[derive(Debug)]
pub struct Append<'a> {
    /// The index of its item in the batch.
    pub item: usize,
    /// The channel's history stream.
    pub stream: String,
    /// The channel's epoch key.
    pub epoch: String,
    /// The channel's writer key ([`Keys::writer`]).
    pub writer: String,
    /// The message (raw JSON).
    pub data: &'a str,
    /// MAXLEN (`history_size`) and TTL of the channel's history.
    pub settings: &'a ChannelConfig,
}

impl<'a> Append<'a> {
    /// Item `item`'s message `data`, for `channel` with `settings`.
    pub fn new(
        keys: &Keys,
        item: usize,
        channel: &str,
        data: &'a str,
        settings: &'a ChannelConfig,
    ) -> Self {
        Self {
            item,
            stream: keys.history(channel),
            epoch: keys.epoch(channel),
            writer: keys.writer(channel),
            data,
            settings,
        }
    }
}

/// The appends of the items at `indexes`: the sends marked for history
/// ([`Message::history`](super::envelope::Message::history)), with their channel's settings.
pub fn appends<'a>(
    keys: &Keys,
    config: &'a Config,
    items: &'a [Item<'_>],
    indexes: impl IntoIterator<Item = usize>,
) -> Vec<Append<'a>> {
    let mut appends = Vec::new();
    for index in indexes {
        let Item::Send(message) = &items[index] else {
            continue;
        };
        let Recipient::Channel(channel) = &message.to else {
            continue;
        };
        if !message.history {
            continue;
        }
        if let Some(settings) = config.history_for(channel) {
            appends.push(Append::new(
                keys,
                index,
                channel,
                message.data.get(),
                settings,
            ));
        }
    }
    appends
}

/// What the script reads of a step first, as JSON (cjson): where the payload goes, how many
/// appends follow and where their offsets go in the payload.
#[derive(Serialize)]
struct Header<'s> {
    to: HeaderTo<'s>,
    appends: usize,
    offsets_at: usize,
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum HeaderTo<'s> {
    Channel { name: &'s str },
    UserReplicas,
}

impl Step<'_> {
    /// Adds the step's KEYS and ARGV: ARGV gets the [`Header`] JSON and the payload, then per
    /// append its MAXLEN, TTL in seconds and data; KEYS gets per append the stream, epoch
    /// and writer keys, then for [`Destination::UserReplicas`] the user's set.
    fn write<'s>(&'s self, invocation: &mut Invocation<'s>) {
        let to = match &self.to {
            Destination::Channel(name) => HeaderTo::Channel { name },
            Destination::UserReplicas(_) => HeaderTo::UserReplicas,
        };
        let header = Header {
            to,
            appends: self.appends.len(),
            offsets_at: Unpublished::OFFSETS_AT,
        };
        invocation
            .arg(serde_json::to_vec(&header).expect("headers serialize"))
            .arg(self.payload.json.as_slice());
        for append in &self.appends {
            invocation
                .key(append.stream.as_str())
                .key(append.epoch.as_str())
                .key(append.writer.as_str())
                .number(append.settings.history_size)
                .number(append.settings.history_ttl_seconds)
                .arg(append.data.as_bytes());
        }
        if let Destination::UserReplicas(set) = &self.to {
            invocation.key(set.as_str());
        }
    }
}

/// What the script did.
#[derive(Debug)]
pub struct Ran {
    /// The offset of every append, in step and append order (`<epoch>:<entry id>`).
    pub offsets: Vec<String>,
    /// Per step, how many replicas received its payload.
    pub receivers: Vec<usize>,
}

/// Runs `steps` in one call of the publish script, with `PUBLISH` (`SPUBLISH` on a cluster:
/// then every key and channel of the steps must be in one slot).
///
/// # Errors
/// [`RedisFailure`] when Redis did not take it: nothing of it was sent or stored.
pub async fn run(
    backplane: &Backplane,
    keys: &Keys,
    durability: &Durability,
    steps: &[Step<'_>],
) -> Result<Ran, RedisFailure> {
    let publish = if backplane.is_cluster() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    };
    let mut invocation = PUBLISH.call();
    invocation
        .arg(format!("{:08x}", crate::ids::random_u32()).into_bytes())
        .arg(keys.replica("").into_bytes())
        .arg(publish.as_bytes())
        .arg(durability.run_id().into_bytes());
    for step in steps {
        step.write(&mut invocation);
    }
    let (offsets, receivers) = backplane.invoke(&invocation).await?;
    Ok(Ran { offsets, receivers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_what_the_script_reads() {
        let header = |to| {
            serde_json::to_string(&Header {
                to,
                appends: 2,
                offsets_at: Unpublished::OFFSETS_AT,
            })
            .unwrap()
        };
        assert_eq!(
            header(HeaderTo::Channel { name: "p:ch:{c}" }),
            format!(
                r#"{{"to":{{"kind":"channel","name":"p:ch:{{c}}"}},"appends":2,"offsets_at":{}}}"#,
                Unpublished::OFFSETS_AT
            )
        );
        assert!(header(HeaderTo::UserReplicas).starts_with(r#"{"to":{"kind":"user_replicas"}"#));
    }
}
