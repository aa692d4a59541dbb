//! Every replica's receiving end: pub/sub payloads → local recipients → per-connection queues.
//!
//! One task handles payloads in arrival order, so messages of one call reach a connection in call
//! order. Each message is encoded at most once per encoding; all recipients share the bytes.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::envelope::{Batch, Item, Op};
use crate::connection::ConnHandle;
use crate::inbound::{Event, Inbound};
use crate::metrics::{CloseReason, DropReason, Metrics};
use crate::protocol::{message_json, message_msgpack, Encoding, ServerFrame};
use crate::registry::{Registry, Target};

/// Routes received payloads to local connections.
pub struct Dispatcher {
    registry: Arc<Registry>,
    inbound: Arc<Inbound>,
    metrics: Metrics,
    /// Reused for every message, so finding recipients does not allocate.
    scratch: Vec<Arc<ConnHandle>>,
}

impl Dispatcher {
    /// A dispatcher over this replica's registry.
    pub fn new(registry: Arc<Registry>, inbound: Arc<Inbound>, metrics: Metrics) -> Self {
        Self {
            registry,
            inbound,
            metrics,
            scratch: Vec::new(),
        }
    }

    /// Handles payloads until the pub/sub link's sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Bytes>) {
        while let Some(payload) = rx.recv().await {
            self.dispatch(&payload);
        }
    }

    /// Handles one pub/sub payload.
    pub fn dispatch(&mut self, payload: &[u8]) {
        let batch: Batch = match serde_json::from_slice(payload) {
            Ok(batch) => batch,
            Err(e) => {
                self.metrics.dropped(DropReason::BadPayload).increment(1);
                tracing::warn!(error = %e, "undecodable pub/sub payload dropped");
                return;
            }
        };
        for item in &batch.items {
            self.apply(item, batch.ts);
        }
    }

    fn apply(&mut self, item: &Item<'_>, ts: u64) {
        let target = match item.to.target() {
            Ok(target) => target,
            Err(e) => {
                self.metrics.dropped(DropReason::BadPayload).increment(1);
                tracing::warn!(error = %e, "pub/sub item with a bad target dropped");
                return;
            }
        };
        match item.op {
            Op::Send => {
                let data: &RawValue = match item.data {
                    Some(data) => data,
                    None => null(),
                };
                let channel = match target {
                    Target::Channel(c) => Some(c),
                    _ => None,
                };
                self.deliver(target, channel, data, ts);
            }
            Op::Subscribe | Op::Unsubscribe => {
                let Some(channel) = item.channel.as_deref() else {
                    return;
                };
                self.registry.recipients(target, &mut self.scratch);
                for conn in self.scratch.drain(..) {
                    if item.op == Op::Subscribe {
                        // A backend's subscribe is not bound by the per-connection limit, which
                        // protects the replica from clients.
                        if self.registry.subscribe(&conn, channel, usize::MAX) == Ok(true) {
                            self.inbound.event(&conn, Event::Subscribe(channel));
                        }
                        conn.reply(&ServerFrame::Subscribed {
                            channel,
                            id: None,
                            recovered: None,
                        });
                    } else {
                        if self.registry.unsubscribe(&conn, channel) {
                            self.inbound.event(&conn, Event::Unsubscribe(channel));
                        }
                        conn.reply(&ServerFrame::Unsubscribed { channel, id: None });
                    }
                }
            }
            Op::Disconnect => {
                let code = item.code.unwrap_or(4000);
                let reason = item.reason.as_deref().unwrap_or("disconnected by backend");
                self.registry.recipients(target, &mut self.scratch);
                for conn in self.scratch.drain(..) {
                    conn.close(code, reason, CloseReason::Backend);
                }
            }
        }
    }

    fn deliver(&mut self, target: Target<'_>, channel: Option<&str>, data: &RawValue, ts: u64) {
        self.metrics.pubsub_received.increment(1);
        let started = Instant::now();
        self.registry.recipients(target, &mut self.scratch);
        self.metrics
            .filter_seconds
            .record(started.elapsed().as_secs_f64());
        let recipients = self.scratch.len();
        self.metrics.fanout_recipients.record(recipients as f64);
        if recipients == 0 {
            self.metrics.pubsub_filtered.increment(1);
            return;
        }
        let (mut json, mut msgpack) = (None, None);
        for conn in self.scratch.drain(..) {
            let frame = match conn.encoding {
                Encoding::Json => json.get_or_insert_with(|| message_json(channel, data)),
                Encoding::Msgpack => msgpack.get_or_insert_with(|| message_msgpack(channel, data)),
            };
            conn.deliver(frame.clone(), ts);
        }
    }
}

fn null() -> &'static RawValue {
    static NULL: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| RawValue::from_string("null".into()).expect("null is JSON"))
}
