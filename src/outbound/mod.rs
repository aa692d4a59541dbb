//! The outbound path: `POST /send` → one PUBLISH → every replica's [`dispatch::Dispatcher`] →
//! local recipients' bounded send queues → socket writers.

pub mod dispatch;
pub mod envelope;

use crate::backplane::{Backplane, RedisFailure};
use crate::metrics::Metrics;
use envelope::{Batch, Op};

/// Publishes batches on the broadcast channel.
#[derive(Clone)]
pub struct Publisher {
    backplane: Backplane,
    channel: String,
    metrics: Metrics,
}

impl Publisher {
    /// A publisher on `channel`.
    pub fn new(backplane: Backplane, channel: String, metrics: Metrics) -> Self {
        Self {
            backplane,
            channel,
            metrics,
        }
    }

    /// Serializes the batch once and publishes it.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis did not take it: nothing of the batch was sent.
    pub async fn publish(&self, batch: &Batch<'_>) -> Result<(), RedisFailure> {
        let payload = serde_json::to_vec(batch).expect("batches serialize");
        self.backplane.publish(&self.channel, &payload).await?;
        let sends = batch.items.iter().filter(|i| i.op == Op::Send).count();
        self.metrics.outbound_published.increment(sends as u64);
        Ok(())
    }
}
