//! The outbound path: `POST /send` → one PUBLISH → every replica's [`dispatch::Dispatcher`] →
//! local recipients' bounded send queues → socket writers.

pub mod dispatch;
pub mod envelope;
pub mod history;
pub mod publish;
pub mod reach;
pub mod routes;
pub mod shards;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::config::Config;
use crate::metrics::Metrics;
use envelope::{AckRequest, Batch, Item, ReachRequest, Recipient, Unpublished};
use publish::{Destination, Step};

/// Why a `/send` (or subscribe, unsubscribe, disconnect) call was not wholly published.
#[derive(Debug)]
pub struct PublishError {
    /// What Redis said, or that it did not answer.
    pub failure: RedisFailure,
    /// Parts of the call published before the failure. Always 0 on a single Redis, where a call
    /// is one atomic step; a Redis Cluster publishes a call part by part.
    pub published_parts: usize,
}

impl PublishError {
    /// What the backend is told (with a 503): whether anything of the call may have been
    /// delivered, so whether a retry may deliver it twice.
    pub fn explain(&self) -> String {
        let e = &self.failure;
        if self.published_parts > 0 {
            format!(
                "Redis failed after {} part(s) of this call were published ({e}): those may have \
                 been delivered, and a retry delivers them again",
                self.published_parts
            )
        } else if e.maybe_applied() {
            format!("Redis did not confirm the publish ({e}); it may have been delivered")
        } else {
            format!("not accepted, nothing was sent ({e}); retry")
        }
    }
}

impl From<RedisFailure> for PublishError {
    fn from(failure: RedisFailure) -> Self {
        Self {
            failure,
            published_parts: 0,
        }
    }
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.explain())
    }
}

/// What a published call gives back.
#[derive(Debug)]
pub struct Sent {
    /// Each item's history offset, if any.
    pub offsets: Vec<Option<String>>,
    /// The reach report, when a message of the call asked for one
    /// ([`Message::reach`](envelope::Message::reach)).
    pub reach: Option<ReachReport>,
}

/// How many connections a call's messages were handed to, over every replica that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReachReport {
    /// Per item: the count, for the messages that asked; `None` for the others.
    pub counts: Vec<Option<u64>>,
    /// Every replica that received the messages answered within `redis.command_timeout_ms`.
    pub complete: bool,
}

/// Publishes batches on the broadcast channel, keeping channel history where configured.
#[derive(Clone)]
pub struct Publisher {
    backplane: Backplane,
    keys: Keys,
    config: Arc<Config>,
    metrics: Metrics,
    replica: String,
    acks: Arc<routes::Acks>,
    reaches: Arc<reach::Reaches>,
    /// Which Redis persists every write before answering (stamped beside each history).
    durability: crate::backplane::durability::Durability,
}

impl Publisher {
    /// A publisher on the broadcast channel of `keys`, for replica `replica`.
    pub fn new(
        backplane: Backplane,
        keys: Keys,
        config: Arc<Config>,
        metrics: Metrics,
        replica: &str,
        durability: crate::backplane::durability::Durability,
    ) -> Self {
        Self {
            durability,
            backplane,
            keys,
            config,
            metrics,
            replica: replica.to_owned(),
            acks: Arc::default(),
            reaches: Arc::default(),
        }
    }

    /// Reach reports this replica waits for (the dispatcher hands them in).
    pub fn reaches(&self) -> &Arc<reach::Reaches> {
        &self.reaches
    }

    /// Acknowledgements this replica waits for (the dispatcher hands them in).
    pub fn acks(&self) -> &Arc<routes::Acks> {
        &self.acks
    }

    /// Interest routing. A subscribe is answered once every replica it reached has joined
    /// (each acknowledges on this replica's channel), so a message the backend sends to the
    /// channel after the answer reaches the new member; within `redis.command_timeout_ms`.
    /// Returns each item's history offset, and how many reach answers are due.
    async fn publish_routed(
        &self,
        batch: &mut Batch<'_>,
        sends: usize,
    ) -> Result<(Vec<Option<String>>, usize), PublishError> {
        let token = batch
            .items
            .iter()
            .any(|i| matches!(i, Item::Subscribe(_)))
            .then(|| {
                format!(
                    "{:08x}{:08x}",
                    crate::ids::random_u32(),
                    crate::ids::random_u32()
                )
            });
        let acked = token.as_ref().map(|token| {
            for item in &mut batch.items {
                if let Item::Subscribe(join) = item {
                    join.ack = Some(AckRequest {
                        replica: self.replica.clone().into(),
                        token: token.clone().into(),
                    });
                }
            }
            self.acks.expect(token)
        });
        let published = routes::publish(
            &self.backplane,
            &self.keys,
            &self.durability,
            &self.config,
            batch,
        )
        .await;
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
        Ok((published.offsets, published.reach_receivers))
    }

    /// Serializes the batch once and publishes it; sends to channels with history are appended
    /// to it in the same atomic step. Returns each item's history offset, if any.
    ///
    /// # Errors
    /// [`PublishError`] when Redis did not take it: nothing of the batch was sent or stored,
    /// except, on a Redis Cluster, the parts published before the failure.
    pub async fn publish(
        &self,
        batch: &mut Batch<'_>,
    ) -> Result<Vec<Option<String>>, PublishError> {
        self.publish_reporting(batch).await.map(|sent| sent.offsets)
    }

    /// [`Publisher::publish`], and, when a message asks for it ([`Message::reach`]: any value
    /// marks it; this fills in where the answers go), the reach report: the answers of every
    /// replica that received the call, awaited for at most `redis.command_timeout_ms` after the
    /// publish.
    ///
    /// # Errors
    /// As [`Publisher::publish`]; no report is awaited then.
    ///
    /// [`Message::reach`]: envelope::Message::reach
    pub async fn publish_reporting(&self, batch: &mut Batch<'_>) -> Result<Sent, PublishError> {
        // Sends bound for a channel with history take an offset each.
        let mut sends = 0;
        let mut asking = false;
        for item in &mut batch.items {
            if let Item::Send(message) = item {
                sends += 1;
                asking |= message.reach.is_some();
                if let Recipient::Channel(channel) = &message.to {
                    message.history = self.config.history_for(channel).is_some();
                }
            }
        }
        // Started before publishing: answers may come back before the publish call returns.
        // Dropped on a failed publish, which stops the wait.
        let waiting = asking.then(|| self.ask_reach(batch));
        let (offsets, due) = if self.config.outbound.routing == crate::config::Routing::Interest {
            self.publish_routed(batch, sends).await?
        } else {
            self.publish_broadcast(batch, sends).await?
        };
        self.wait_replicas(batch, &offsets).await?;
        let reach = match waiting {
            Some(waiting) => Some(self.reach_report(batch, waiting, due).await),
            None => None,
        };
        Ok(Sent { offsets, reach })
    }

    /// With `redis.wait_replicas`, waits until that many replicas hold the history appends of
    /// the call just published (`WAIT`): once on a single Redis, where one connection carried
    /// them all; once per channel on a cluster, where each shard has its own.
    ///
    /// # Errors
    /// [`PublishError`] (may have been delivered: the primary has it) when fewer replicas
    /// confirmed within `redis.wait_timeout_ms`, or Redis failed.
    async fn wait_replicas(
        &self,
        batch: &Batch<'_>,
        offsets: &[Option<String>],
    ) -> Result<(), PublishError> {
        let redis = &self.config.redis;
        if redis.wait_replicas == 0 {
            return Ok(());
        }
        let mut channels: Vec<&str> = Vec::new();
        for (item, offset) in batch.items.iter().zip(offsets) {
            if let (Item::Send(message), Some(_)) = (item, offset) {
                if let Recipient::Channel(channel) = &message.to {
                    if !channels.contains(&channel.as_ref()) {
                        channels.push(channel);
                    }
                }
            }
        }
        if !self.backplane.is_cluster() {
            channels.truncate(1);
        }
        for channel in channels {
            let key = self.keys.history(channel);
            self.backplane
                .wait_replicas(&key, redis.wait_replicas, redis.wait_timeout_ms)
                .await
                .map_err(|failure| {
                    tracing::debug!(error = %failure, channel, "history append not replicated in time");
                    PublishError::from(failure)
                })?;
        }
        Ok(())
    }

    /// Marks the messages that ask for a reach report with this replica, a token for the call
    /// and their index, and starts waiting for the answers.
    fn ask_reach(&self, batch: &mut Batch<'_>) -> reach::Waiting {
        let token = format!(
            "{:08x}{:08x}",
            crate::ids::random_u32(),
            crate::ids::random_u32()
        );
        for (index, item) in batch.items.iter_mut().enumerate() {
            if let Item::Send(message) = item {
                if let Some(reach) = &mut message.reach {
                    *reach = ReachRequest {
                        replica: self.replica.clone().into(),
                        token: token.clone().into(),
                        item: u32::try_from(index).expect("a batch holds fewer than 2^32 items"),
                    };
                }
            }
        }
        self.reaches.expect(&token, batch.items.len())
    }

    /// Waits for `due` reach answers, at most `redis.command_timeout_ms`, and reports per item.
    async fn reach_report(
        &self,
        batch: &Batch<'_>,
        waiting: reach::Waiting,
        due: usize,
    ) -> ReachReport {
        let started = Instant::now();
        let within = Duration::from_millis(self.config.redis.command_timeout_ms);
        let report = waiting.report(due, within).await;
        self.metrics
            .reach_wait_seconds
            .record(started.elapsed().as_secs_f64());
        self.metrics.reach_queries(report.complete).increment(1);
        if !report.complete {
            tracing::warn!(
                due,
                answered = report.answered,
                "a reach report is incomplete: not every replica that received the messages answered within redis.command_timeout_ms; answering with the counts that arrived"
            );
        }
        let counts = batch
            .items
            .iter()
            .enumerate()
            .map(|(index, item)| match item {
                Item::Send(message) if message.reach.is_some() => {
                    Some(report.counts.get(index).copied().unwrap_or(0))
                }
                _ => None,
            })
            .collect();
        ReachReport {
            counts,
            complete: report.complete,
        }
    }

    /// Broadcast routing: the whole batch in one payload to every replica. Returns each item's
    /// history offset, and how many replicas received it (each answers a reach request).
    async fn publish_broadcast(
        &self,
        batch: &Batch<'_>,
        sends: usize,
    ) -> Result<(Vec<Option<String>>, usize), PublishError> {
        let payload = Unpublished::batch(batch.ts, &batch.items[..]);
        let mut offsets = vec![None; batch.items.len()];
        let appends =
            publish::appends(&self.keys, &self.config, &batch.items, 0..batch.items.len());
        let receivers;
        if appends.is_empty() {
            receivers = self
                .backplane
                .publish_counted(&self.keys.broadcast, &payload.json)
                .await?;
        } else {
            let step = Step {
                to: Destination::Channel(self.keys.broadcast.clone()),
                payload,
                appends,
            };
            let ran = publish::run(
                &self.backplane,
                &self.keys,
                &self.durability,
                std::slice::from_ref(&step),
            )
            .await?;
            for (append, offset) in step.appends.iter().zip(ran.offsets) {
                offsets[append.item] = Some(offset);
            }
            receivers = ran.receivers.first().copied().unwrap_or(0);
        }
        self.metrics.outbound_published.increment(sends as u64);
        Ok((offsets, receivers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_is_told_whether_a_failed_call_may_have_been_delivered() {
        let refused = || {
            RedisFailure::Redis(
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into(),
            )
        };
        let nothing = PublishError::from(refused());
        assert!(nothing
            .explain()
            .starts_with("not accepted, nothing was sent"));
        let unconfirmed = PublishError::from(RedisFailure::Timeout(1000));
        assert!(unconfirmed.explain().contains("it may have been delivered"));
        // A cluster call that failed after its first part: however the failure reads, the
        // backend must not be told that nothing was sent.
        let part = PublishError {
            failure: refused(),
            published_parts: 1,
        };
        let told = part.explain();
        assert!(!told.contains("nothing was sent"), "{told}");
        assert!(
            told.contains("1 part(s) of this call were published"),
            "{told}"
        );
    }
}
