//! The outbound path: `POST /send` → one PUBLISH → every replica's [`dispatch::Dispatcher`] →
//! local recipients' bounded send queues → socket writers.

pub mod dispatch;
pub mod envelope;
pub mod history;
pub mod routes;

use std::sync::Arc;

use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::config::{ChannelConfig, Config};
use crate::metrics::Metrics;
use envelope::{Batch, Op};

/// Appends every history item to its channel's history stream and publishes the batch, in one
/// atomic step: offsets then increase in publish order per channel, whichever replica or
/// backend published, and a message is never in the history without having been published (or
/// the reverse).
///
/// KEYS: the broadcast channel, then per history item its stream and epoch keys.
/// ARGV: the batch JSON, an epoch to use where a channel has none, then per history item its
/// data, `MAXLEN` and TTL in seconds. Publishes `["<offset>",...]` + newline + batch, and returns
/// the offsets (`<epoch>:<entry id>`).
const PUBLISH_WITH_HISTORY: &str = r#"
local n = (#KEYS - 1) / 2
local offsets = {}
for i = 1, n do
  local stream, epoch_key = KEYS[2 * i], KEYS[2 * i + 1]
  local data, maxlen, ttl = ARGV[3 * i], ARGV[3 * i + 1], tonumber(ARGV[3 * i + 2])
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    epoch = ARGV[2]
    redis.call('SET', epoch_key, epoch)
  end
  local id = redis.call('XADD', stream, 'MAXLEN', maxlen, '*', 'data', data)
  redis.call('EXPIRE', stream, ttl)
  redis.call('EXPIRE', epoch_key, ttl)
  offsets[i] = epoch .. ':' .. id
end
redis.call('PUBLISH', KEYS[1], cjson.encode(offsets) .. '\n' .. ARGV[1])
return offsets
"#;

/// Publishes batches on the broadcast channel, keeping channel history where configured.
#[derive(Clone)]
pub struct Publisher {
    backplane: Backplane,
    keys: Keys,
    config: Arc<Config>,
    metrics: Metrics,
    replica: String,
    acks: Arc<routes::Acks>,
}

impl Publisher {
    /// A publisher on the broadcast channel of `keys`, for replica `replica`.
    pub fn new(
        backplane: Backplane,
        keys: Keys,
        config: Arc<Config>,
        metrics: Metrics,
        replica: &str,
    ) -> Self {
        Self {
            backplane,
            keys,
            config,
            metrics,
            replica: replica.to_owned(),
            acks: Arc::default(),
        }
    }

    /// Acknowledgements this replica waits for (the dispatcher hands them in).
    pub fn acks(&self) -> &Arc<routes::Acks> {
        &self.acks
    }

    /// Interest routing. A subscribe is answered once every replica it reached has joined
    /// (each acknowledges on this replica's channel), so a message the backend sends to the
    /// channel after the answer reaches the new member; within `redis.command_timeout_ms`.
    async fn publish_routed(
        &self,
        batch: &mut Batch<'_>,
        history: &[(usize, &ChannelConfig)],
        sends: usize,
    ) -> Result<Vec<Option<String>>, RedisFailure> {
        let token = batch
            .items
            .iter()
            .any(|i| i.op == Op::Subscribe)
            .then(|| format!("{:08x}{:08x}", crate::random_u32(), crate::random_u32()));
        let acked = token.as_ref().map(|token| {
            let ack = format!("{} {token}", self.replica);
            for item in batch.items.iter_mut().filter(|i| i.op == Op::Subscribe) {
                item.ack = Some(ack.clone().into());
            }
            self.acks.expect(token)
        });
        let published = routes::publish(&self.backplane, &self.keys, history, batch).await;
        let published = match published {
            Ok(published) => published,
            Err(e) => {
                if let Some(token) = &token {
                    self.acks.forget(token);
                }
                return Err(e);
            }
        };
        self.metrics.outbound_published.increment(sends as u64);
        if let (Some(token), Some(acked)) = (&token, acked) {
            self.acks.due(token, published.ack_receivers);
            let wait = std::time::Duration::from_millis(self.config.redis.command_timeout_ms);
            if tokio::time::timeout(wait, acked).await.is_err() {
                self.acks.forget(token);
                tracing::warn!("a subscribe was not acknowledged in time by every replica it reached; answering anyway");
            }
        }
        Ok(published.offsets)
    }

    /// Serializes the batch once and publishes it; sends to channels with history are appended
    /// to it in the same atomic step. Returns each item's history offset, if any.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis did not take it: nothing of the batch was sent or stored.
    pub async fn publish(
        &self,
        batch: &mut Batch<'_>,
    ) -> Result<Vec<Option<String>>, RedisFailure> {
        // Each item bound for a channel with history, with that channel's settings.
        let mut history: Vec<(usize, &ChannelConfig)> = Vec::new();
        for (index, item) in batch.items.iter_mut().enumerate() {
            if item.op != Op::Send {
                continue;
            }
            let Some(channel) = item.to.channel.as_deref() else {
                continue;
            };
            if let Some(settings) = self.config.history_for(channel) {
                item.history = true;
                history.push((index, settings));
            }
        }
        let sends = batch.items.iter().filter(|i| i.op == Op::Send).count();
        if self.config.outbound.routing == crate::config::Routing::Interest {
            return self.publish_routed(batch, &history, sends).await;
        }
        let payload = serde_json::to_vec(&*batch).expect("batches serialize");
        let mut offsets = vec![None; batch.items.len()];
        if history.is_empty() {
            self.backplane
                .publish(&self.keys.broadcast, &payload)
                .await?;
        } else {
            let channel = |index: usize| batch.items[index].to.channel.as_deref().unwrap_or("");
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(PUBLISH_WITH_HISTORY)
                .arg(1 + 2 * history.len())
                .arg(&self.keys.broadcast);
            for &(index, _) in &history {
                cmd.arg(self.keys.history(channel(index)))
                    .arg(self.keys.epoch(channel(index)));
            }
            cmd.arg(&payload)
                .arg(format!("{:08x}", crate::random_u32()));
            for &(index, settings) in &history {
                let data = batch.items[index].data.map(|d| d.get()).unwrap_or("null");
                cmd.arg(data)
                    .arg(settings.history_size)
                    .arg(settings.history_ttl_seconds);
            }
            let got: Vec<String> = self.backplane.query(&cmd).await?;
            for (&(index, _), offset) in history.iter().zip(got) {
                offsets[index] = Some(offset);
            }
        }
        self.metrics.outbound_published.increment(sends as u64);
        Ok(offsets)
    }
}
