//! Every replica's receiving end: pub/sub payloads → local recipients → per-connection queues.
//!
//! One task handles payloads in arrival order, so messages of one call reach a connection in call
//! order. Each message is encoded at most once per encoding; all recipients share the bytes.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::envelope::{split_payload, Batch, Item, Op};
use super::history::Offset;
use crate::connection::{ConnHandle, Outgoing};
use crate::inbound::{Event, Inbound};
use crate::metrics::{CloseReason, DropReason, Metrics};
use crate::protocol::{message, message_json, message_msgpack, Encoding, FrameId, ServerFrame};
use crate::registry::{Registry, Target};

/// A resume's history read, handed to the dispatcher so that the replay, the `subscribed`
/// reply and the live messages held meanwhile are queued in order by the one task that also
/// delivers live messages.
pub struct ResumeDone {
    /// The resuming connection.
    pub conn: Arc<ConnHandle>,
    /// The channel.
    pub channel: String,
    /// The `subscribe` frame's id.
    pub id: Option<FrameId>,
    /// The client's offset.
    pub since: Offset,
    /// The missed entries (offset, data JSON), or `None` when the history cannot make the
    /// client whole.
    pub replay: Option<Vec<(String, String)>>,
}

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

    /// Handles payloads and finished resumes until the pub/sub link's sender is gone.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Bytes>,
        mut resumes: mpsc::Receiver<ResumeDone>,
    ) {
        loop {
            tokio::select! {
                payload = rx.recv() => match payload {
                    Some(payload) => self.dispatch(&payload),
                    None => return,
                },
                Some(done) = resumes.recv() => self.finish_resume(done),
            }
        }
    }

    /// Handles one pub/sub payload.
    pub fn dispatch(&mut self, payload: &[u8]) {
        let decoded = split_payload(payload)
            .and_then(|(offsets, json)| Ok((offsets, serde_json::from_slice::<Batch>(json)?)));
        let (offsets, batch) = match decoded {
            Ok(decoded) => decoded,
            Err(e) => {
                self.metrics.dropped(DropReason::BadPayload).increment(1);
                tracing::warn!(error = %e, "undecodable pub/sub payload dropped");
                return;
            }
        };
        let mut offsets = offsets.iter();
        for item in &batch.items {
            let offset = if item.history {
                offsets.next().map(String::as_str)
            } else {
                None
            };
            self.apply(item, offset, batch.ts);
        }
    }

    fn apply(&mut self, item: &Item<'_>, offset: Option<&str>, ts: u64) {
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
                self.deliver(target, channel, offset, data, ts);
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

    fn deliver(
        &mut self,
        target: Target<'_>,
        channel: Option<&str>,
        offset: Option<&str>,
        data: &RawValue,
        ts: u64,
    ) {
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
                Encoding::Json => json.get_or_insert_with(|| message_json(channel, offset, data)),
                Encoding::Msgpack => {
                    msgpack.get_or_insert_with(|| message_msgpack(channel, offset, data))
                }
            };
            match channel {
                Some(channel) => conn.deliver_channel(channel, offset, frame.clone(), ts),
                None => conn.deliver(frame.clone(), ts),
            }
        }
    }
}

impl Dispatcher {
    /// Queues, in order: the replayed history, the `subscribed` reply that ends it, and the live
    /// messages held meanwhile that the replay did not already cover. When they do not fit the
    /// send queue the replay is given up and the client is told (`recovered: false`); when even
    /// the live messages do not fit, the connection is closed with 1013 rather than lose any.
    fn finish_resume(&mut self, done: ResumeDone) {
        let conn = &done.conn;
        let held = conn.finish_resume(&done.channel);
        if held.overflowed {
            conn.close(
                1013,
                "too many messages arrived while resuming",
                CloseReason::SlowConsumer,
            );
            return;
        }
        let subscribed = |recovered: bool| Outgoing {
            frame: ServerFrame::Subscribed {
                channel: &done.channel,
                id: done.id.as_ref(),
                recovered: Some(recovered),
            }
            .encode(conn.encoding),
            accepted_us: 0,
        };
        if let Some(entries) = &done.replay {
            let mut last = done.since.clone();
            let mut frames = Vec::with_capacity(entries.len() + 1 + held.messages.len());
            for (offset, data) in entries {
                let raw = RawValue::from_string(data.clone()).unwrap_or_else(|_| null().to_owned());
                frames.push(Outgoing {
                    frame: message(conn.encoding, Some(&done.channel), Some(offset), &raw),
                    accepted_us: 0,
                });
                if let Some(parsed) = Offset::parse(offset) {
                    last = parsed;
                }
            }
            frames.push(subscribed(true));
            for live in &held.messages {
                let newer = match live.offset.as_deref().and_then(Offset::parse) {
                    Some(offset) => offset.is_after(&last) || offset.epoch != last.epoch,
                    None => true,
                };
                if newer {
                    frames.push(Outgoing {
                        frame: live.frame.clone(),
                        accepted_us: live.accepted_us,
                    });
                }
            }
            if conn.deliver_all(frames) {
                self.metrics.resumes(true).increment(1);
                return;
            }
        }
        self.metrics.resumes(false).increment(1);
        let mut frames = vec![subscribed(false)];
        frames.extend(held.messages.into_iter().map(|live| Outgoing {
            frame: live.frame,
            accepted_us: live.accepted_us,
        }));
        if !conn.deliver_all(frames) {
            conn.close(
                1013,
                "send queue full while resuming",
                CloseReason::SlowConsumer,
            );
        }
    }
}

fn null() -> &'static RawValue {
    static NULL: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| RawValue::from_string("null".into()).expect("null is JSON"))
}
