//! The inbound path: client `send` frames and lifecycle events become Redis Stream entries that
//! backends read with consumer groups.

pub mod appender;
pub mod backlog;
pub mod confirm;
pub mod dedupe;
pub mod keeper;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

pub use appender::Appender;
use appender::{Answer, AppendReply, AppendRequest};
use dedupe::DedupeId;

use crate::backplane::Keys;
use crate::config::Config;
use crate::connection::ConnHandle;
use crate::metrics::Metrics;
use crate::protocol::{Encoding, ErrorCode, FrameError, FrameId};
use crate::registry::Registry;

/// A lifecycle event kind (field `event` of `<prefix>:events`).
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A connection opened.
    Connect,
    /// A connection closed, with the close code and reason.
    Disconnect {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: &'a str,
    },
    /// A connection joined a channel.
    Subscribe(&'a str),
    /// A connection left a channel.
    Unsubscribe(&'a str),
}

/// Turns client frames and lifecycle events into stream entries.
pub struct Inbound {
    appender: Appender,
    streams: HashMap<String, Arc<str>>,
    stream_max_len: u64,
    events_key: Option<Arc<str>>,
    events_max_len: u64,
    replica: Bytes,
    metrics: Metrics,
    keys: Keys,
    dedupe_window_seconds: u64,
}

impl Inbound {
    /// Builds from config.
    pub fn new(
        config: &Config,
        keys: &Keys,
        replica: &str,
        appender: Appender,
        metrics: Metrics,
    ) -> Self {
        Self {
            appender,
            streams: config
                .inbound
                .streams
                .iter()
                .map(|s| (s.clone(), Arc::from(keys.inbound(s))))
                .collect(),
            stream_max_len: config.inbound.stream_max_len,
            events_key: config
                .inbound
                .events_enabled
                .then(|| Arc::from(keys.events.as_str())),
            events_max_len: config.inbound.events_max_len,
            replica: Bytes::copy_from_slice(replica.as_bytes()),
            metrics,
            keys: keys.clone(),
            dedupe_window_seconds: config.inbound.dedupe_window_seconds,
        }
    }

    /// Queues a client `send`. The ack (or an error frame) reaches the client once Redis answered.
    ///
    /// # Errors
    /// A [`FrameError`] when the stream is not allowed or the append queue is full.
    pub fn send(
        &self,
        conn: &Arc<ConnHandle>,
        stream: String,
        data: Bytes,
        encoding: Encoding,
        id: Option<FrameId>,
    ) -> Result<(), FrameError> {
        let Some(key) = self.streams.get(&stream) else {
            return Err(FrameError::new(
                id,
                ErrorCode::StreamNotAllowed,
                format!("stream `{stream}` is not one of the configured inbound.streams"),
            ));
        };
        let dedupe = self.dedupe(conn, &stream, id.as_ref());
        let fields = self.entry_fields(conn, data, encoding, id.as_ref());
        let request = AppendRequest {
            key: key.clone(),
            max_len: self.stream_max_len,
            fields,
            reply: Some(Answer::Client(AppendReply {
                answer: conn.owe_answer(),
                id,
                stream,
            })),
            started: Instant::now(),
            dedupe,
        };
        self.appender.try_submit(request).map_err(|request| {
            let id = match request.reply {
                Some(Answer::Client(reply)) => reply.id,
                _ => None,
            };
            FrameError::new(
                id,
                ErrorCode::Overloaded,
                "the gateway's append queue is full; not stored, resend with the same id",
            )
        })
    }

    /// Ids are scoped to the user, so a resend after a reconnect (a new connection) is still
    /// recognised; anonymous clients are scoped to their connection, because their ids need
    /// not be unique across clients. `None` without an id or with deduplication off.
    fn dedupe(&self, conn: &ConnHandle, stream: &str, id: Option<&FrameId>) -> Option<DedupeId> {
        match (id, self.dedupe_window_seconds) {
            (Some(frame_id), window) if window > 0 => {
                let scope = match conn.user.as_deref() {
                    Some(user) => format!("u:{user}"),
                    None => format!("c:{}", conn.id),
                };
                Some(DedupeId::new(
                    self.keys.dedupe_buckets(stream),
                    &scope,
                    &frame_id.to_field(),
                    window,
                ))
            }
            _ => None,
        }
    }

    /// The fields of a client frame's entry, the same for a `send` and a recorded `publish`.
    fn entry_fields(
        &self,
        conn: &ConnHandle,
        data: Bytes,
        encoding: Encoding,
        id: Option<&FrameId>,
    ) -> Vec<(&'static str, Bytes)> {
        vec![
            ("connection", Bytes::copy_from_slice(conn.id.as_bytes())),
            ("user", user_field(conn)),
            ("data", data),
            ("encoding", Bytes::from_static(encoding.as_str().as_bytes())),
            (
                "id",
                id.map(|i| Bytes::from(i.to_field())).unwrap_or_default(),
            ),
            ("replica", self.replica.clone()),
            ("ts", Bytes::from(crate::clock::unix_ms().to_string())),
        ]
    }

    /// Appends a client `publish` to its channel's `publish_stream` (key `<prefix>:in:<stream>`):
    /// the fields of a `send` entry plus `publish`, the channel. Once per frame id within
    /// `inbound.dedupe_window_seconds`, as a `send`, so a publish resent after an error is not
    /// recorded twice.
    ///
    /// # Errors
    /// The entry was not stored: a [`FrameError`] with `overloaded` (the append queue is full)
    /// or `redis_unavailable` (Redis did not store it; the sentence says whether it may have).
    pub async fn record_publish(
        &self,
        conn: &ConnHandle,
        stream: &str,
        channel: &str,
        data: Bytes,
        encoding: Encoding,
        id: Option<&FrameId>,
    ) -> Result<String, FrameError> {
        let mut fields = self.entry_fields(conn, data, encoding, id);
        fields.push(("publish", Bytes::copy_from_slice(channel.as_bytes())));
        let (done, answer) = tokio::sync::oneshot::channel();
        let request = AppendRequest {
            key: Arc::from(self.keys.inbound(stream)),
            max_len: self.stream_max_len,
            fields,
            reply: Some(Answer::Waiter {
                stream: stream.to_owned(),
                done,
            }),
            started: Instant::now(),
            dedupe: self.dedupe(conn, stream, id),
        };
        if self.appender.try_submit(request).is_err() {
            return Err(FrameError::new(
                id.cloned(),
                ErrorCode::Overloaded,
                "the gateway's append queue is full; not published, resend with the same id",
            ));
        }
        let refused = |why: String| {
            FrameError::new(
                id.cloned(),
                ErrorCode::RedisUnavailable,
                format!("not published: the channel's publish_stream did not take it: {why}"),
            )
        };
        match answer.await {
            Ok(Ok(entry)) => Ok(entry),
            Ok(Err(why)) => Err(refused(why)),
            Err(_) => Err(refused("the appender has stopped".to_owned())),
        }
    }

    /// Takes `conn` out of `channel` and, when it was in, tells the backends (an `unsubscribe`
    /// event): the one way a connection leaves a channel, whoever asks. True when it was in.
    pub fn leave(&self, registry: &Registry, conn: &ConnHandle, channel: &str) -> bool {
        let left = registry.unsubscribe(conn, channel);
        if left {
            self.event(conn, Event::Unsubscribe(channel));
        }
        left
    }

    /// Queues a lifecycle event; when Redis or the queue cannot take it, it is counted in
    /// `wsbridge_events_failed_total`.
    pub fn event(&self, conn: &ConnHandle, event: Event<'_>) {
        let Some(key) = &self.events_key else { return };
        let (name, channel, close) = match event {
            Event::Connect => ("connect", "", None),
            Event::Disconnect { code, reason } => ("disconnect", "", Some((code, reason))),
            Event::Subscribe(channel) => ("subscribe", channel, None),
            Event::Unsubscribe(channel) => ("unsubscribe", channel, None),
        };
        let mut fields = vec![
            ("event", Bytes::from_static(name.as_bytes())),
            ("connection", Bytes::copy_from_slice(conn.id.as_bytes())),
            ("user", user_field(conn)),
            ("channel", Bytes::copy_from_slice(channel.as_bytes())),
            ("replica", self.replica.clone()),
            ("ts", Bytes::from(crate::clock::unix_ms().to_string())),
        ];
        if let Some((code, reason)) = close {
            fields.push(("code", Bytes::from(code.to_string())));
            fields.push(("reason", Bytes::copy_from_slice(reason.as_bytes())));
        }
        let request = AppendRequest {
            key: key.clone(),
            max_len: self.events_max_len,
            fields,
            reply: None,
            started: Instant::now(),
            dedupe: None,
        };
        if self.appender.try_submit(request).is_err() {
            self.metrics.events_failed.increment(1);
        }
    }
}

fn user_field(conn: &ConnHandle) -> Bytes {
    conn.user
        .as_deref()
        .map(|u| Bytes::copy_from_slice(u.as_bytes()))
        .unwrap_or_default()
}
