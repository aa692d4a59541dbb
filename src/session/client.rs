//! The protocol frames of one client: decode, rate limit, act (`send`, `publish`, `subscribe`
//! with or without `since`, `unsubscribe`), answer. A resume's history read is started here and handed
//! to the dispatcher, which queues the replay in order with live messages (`crate::cursor`).

use std::sync::Arc;
use std::time::Instant;

use fastwebsockets::OpCode;

use crate::connection::{ConnHandle, MessageSink};
use crate::cursor::Offset;
use crate::inbound::Event;
use crate::metrics::Limit;
use crate::outbound::dispatch::{Control, Joined, ResumeDone};
use crate::outbound::envelope::{Batch, Item, Message, Recipient};
use crate::protocol::{
    self, ClientFrame, ErrorCode, FrameError, PresencePage, PresenceQuery, ServerFrame,
};
use crate::state::AppState;

use crate::connection::Expiry;

/// A token bucket: `rate` frames per second sustained, `burst` at once.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The gateway protocol: decode, rate limit, act, answer.
pub(crate) struct ClientFrames<'a> {
    handle: &'a Arc<ConnHandle>,
    state: &'a AppState,
    bucket: TokenBucket,
    /// The token's expiry, moved by `refresh` (followed by the replica's expiry task).
    expiry: &'a Expiry<'a>,
}

impl<'a> ClientFrames<'a> {
    /// A sink for one gateway connection.
    pub(crate) fn new(
        handle: &'a Arc<ConnHandle>,
        state: &'a AppState,
        expiry: &'a Expiry<'a>,
    ) -> Self {
        let limits = &state.config.limits;
        Self {
            handle,
            state,
            expiry,
            bucket: TokenBucket::new(
                limits.client_messages_per_second,
                limits.client_burst_messages,
            ),
        }
    }
}

impl ClientFrames<'_> {
    /// Takes a fresh token of the same user: the connection then lasts until its `exp`. Nothing
    /// changes when it is refused.
    fn refresh(
        &self,
        token: &str,
        id: &Option<protocol::FrameId>,
    ) -> Result<Option<u64>, FrameError> {
        if !self.state.auth.enabled() {
            return Err(FrameError::new(
                id.clone(),
                ErrorCode::BadRequest,
                "tokens are off on this gateway (no auth.jwt_secret or auth.jwt_public_key): nothing to refresh",
            ));
        }
        let fresh = self.state.auth.authenticate(Some(token)).map_err(|e| {
            FrameError::new(
                id.clone(),
                ErrorCode::TokenInvalid,
                format!("{e}; the connection keeps its current token"),
            )
        })?;
        if fresh.user != self.handle.identity.user {
            return Err(FrameError::new(
                id.clone(),
                ErrorCode::TokenUserMismatch,
                format!(
                    "the token is for {}, this connection is {}; a connection cannot change user: reconnect with it",
                    fresh.user.as_deref().unwrap_or("no user"),
                    self.handle.identity.user.as_deref().unwrap_or("anonymous"),
                ),
            ));
        }
        self.expiry.set(self.handle, fresh.expires_at);
        Ok(fresh.expires_at)
    }
}

impl MessageSink for ClientFrames<'_> {
    async fn on_message(&mut self, opcode: OpCode, payload: &[u8]) {
        let decoded = if opcode == OpCode::Text {
            protocol::decode_json(payload)
        } else {
            protocol::decode_msgpack(payload)
        };
        // The reader's future, kept by every connection for its whole life, is as large as the
        // largest future it may await. Frames that wait (for Redis or the dispatcher) are
        // answered in a future of their own, allocated only while one is in flight: awaited
        // here, their Redis calls made every idle connection ~5 KiB larger.
        if self.waits(&decoded) {
            Box::pin(self.answer_waiting(decoded)).await;
        } else {
            self.answer(decoded);
        }
    }
}

impl ClientFrames<'_> {
    /// Whether answering `decoded` may wait: a `publish` or `presence` (Redis), or a
    /// `subscribe` under interest routing (the replica listens first) or to a channel with
    /// history (its position is read, and the dispatcher told of the join).
    fn waits(&self, decoded: &Result<ClientFrame, FrameError>) -> bool {
        match decoded {
            Ok(ClientFrame::Publish { .. } | ClientFrame::Presence { .. }) => true,
            Ok(ClientFrame::Subscribe { channel, .. }) => {
                self.state.interest.is_some() || self.state.config.history_for(channel).is_some()
            }
            _ => false,
        }
    }

    /// Answers a frame that never waits (see [`ClientFrames::waits`]).
    fn answer(&mut self, decoded: Result<ClientFrame, FrameError>) {
        if let Ok(ClientFrame::Refresh { token, id }) = &decoded {
            let _owed = self.handle.owe_answer();
            let answer = if self.bucket.take() {
                self.refresh(token, id)
            } else {
                Err(rate_limited(self.state, id.clone()))
            };
            match answer {
                Ok(expires_at) => self.handle.reply(&ServerFrame::Refreshed {
                    id: id.as_ref(),
                    expires_at,
                }),
                Err(e) => refuse(self.handle, self.state, &e),
            }
            return;
        }
        // A channel this joins has no history (else the frame would wait): the dispatcher
        // needs no word of the join.
        on_message(decoded, self.handle, self.state, &mut self.bucket);
    }

    /// Answers a frame that may wait (see [`ClientFrames::waits`]).
    async fn answer_waiting(&mut self, decoded: Result<ClientFrame, FrameError>) {
        if let Ok(ClientFrame::Publish {
            channel,
            data,
            encoding,
            id,
        }) = &decoded
        {
            // Answered here: it waits for Redis, which `act` never does. The reader waits with
            // it, so one client's publishes are published in the order it sent them.
            let _owed = self.handle.owe_answer();
            let published = if self.bucket.take() {
                publish(self.handle, self.state, channel, data, *encoding, id).await
            } else {
                Err(rate_limited(self.state, id.clone()))
            };
            match published {
                Ok(offset) => {
                    self.state.metrics.publishes_accepted.increment(1);
                    self.handle.reply(&ServerFrame::Published {
                        id: id.as_ref(),
                        offset: offset.as_deref(),
                    });
                }
                Err(e) => {
                    self.state.metrics.publish_refused(e.code);
                    refuse(self.handle, self.state, &e);
                }
            }
            return;
        }
        if let Ok(ClientFrame::Presence { channel, query, id }) = &decoded {
            // Answered here: it waits for Redis, which `act` never does.
            let _owed = self.handle.owe_answer();
            let page = if self.bucket.take() {
                presence_page(self.handle, self.state, channel, query, id).await
            } else {
                Err(rate_limited(self.state, id.clone()))
            };
            match page {
                Ok(page) => self.handle.reply(&ServerFrame::Presence {
                    channel,
                    id: id.as_ref(),
                    page: &page,
                }),
                Err(e) => refuse(self.handle, self.state, &e),
            }
            return;
        }
        // Interest routing: the replica listens to a channel before a client joins it, so
        // `subscribed` promises every message published after it.
        let _prepared = match (&self.state.interest, &decoded) {
            (Some(interest), Ok(ClientFrame::Subscribe { channel, .. }))
                if self.handle.identity.may_join(channel) && !self.handle.is_in(channel) =>
            {
                Some(interest.prepare(channel).await)
            }
            _ => None,
        };
        // The first local member of a history channel reads where the channel's history stands
        // before it joins: a catch-up starts there when nothing was delivered since (see
        // `crate::cursor`). Read before the join, so every message after it is owed; a
        // member joining a channel that has members already needs none.
        //
        // When Redis cannot say (it is down), a resuming member still tells where it stands:
        // its `since`. Everything after it is owed to it, and its own resume cursor drops what
        // a catch-up from there repeats; without it, the catch-up that follows the outage would
        // find the channel's position unknown and tell the resuming client `recovered: false`
        // although the history holds everything.
        let start = match &decoded {
            Ok(ClientFrame::Subscribe { channel, since, .. })
                if self.handle.identity.may_join(channel)
                    && !self.handle.is_in(channel)
                    && !self.state.registry.has_channel(channel) =>
            {
                match self.state.config.history_for(channel) {
                    Some(settings) => {
                        let ttl = settings.history_ttl_seconds;
                        let read = self.state.history.read_start(channel, ttl).await;
                        let since = since.as_deref().and_then(Offset::parse);
                        read.inspect_err(|e| {
                            tracing::debug!(error = %e, channel = %channel, resuming = since.is_some(), "history position not read; the channel starts at the resume's offset, or is unknown");
                        })
                        .ok()
                        .or(since)
                    }
                    None => None,
                }
            }
            _ => None,
        };
        let joined = on_message(decoded, self.handle, self.state, &mut self.bucket);
        if let Some((channel, first)) = joined {
            if self.state.config.history_for(&channel).is_some() {
                let joined = Joined {
                    channel,
                    start,
                    first,
                };
                let _ = self.state.control_tx.send(Control::Joined(joined)).await;
            }
        }
    }
}

/// Acts on a decoded client frame. Returns the channel a `subscribe` joined, and whether the
/// connection is its first local member.
fn on_message(
    decoded: Result<ClientFrame, FrameError>,
    handle: &Arc<ConnHandle>,
    state: &AppState,
    bucket: &mut TokenBucket,
) -> Option<(String, bool)> {
    // Held until this frame's answer is queued (an error, `subscribed`, ...; a send taken hands
    // the appender an answer of its own to owe): a draining connection does not close between
    // taking a frame and answering it.
    let _owed = handle.owe_answer();
    let result = match decoded {
        Ok(_) if !bucket.take() => Err(rate_limited(state, frame_id(&decoded))),
        Ok(frame) => act(frame, handle, state),
        Err(e) => Err(e),
    };
    match result {
        Ok(joined) => joined,
        Err(e) => {
            refuse(handle, state, &e);
            None
        }
    }
}

/// A frame refused by the per-connection rate limit (counted here).
fn rate_limited(state: &AppState, id: Option<protocol::FrameId>) -> FrameError {
    state.metrics.refused(Limit::Rate).increment(1);
    FrameError::new(
        id,
        ErrorCode::RateLimited,
        "too many frames: slow down (limits.client_messages_per_second); this one was not taken",
    )
}

/// Answers a refused frame with its error frame, counted by code.
fn refuse(handle: &ConnHandle, state: &AppState, e: &FrameError) {
    state.metrics.rejected(e.code).increment(1);
    handle.reply(&ServerFrame::Error {
        id: e.id.as_ref(),
        code: e.code.as_str(),
        message: &e.message,
    });
}

fn frame_id(decoded: &Result<ClientFrame, FrameError>) -> Option<protocol::FrameId> {
    match decoded {
        Ok(ClientFrame::Send { id, .. })
        | Ok(ClientFrame::Subscribe { id, .. })
        | Ok(ClientFrame::Unsubscribe { id, .. })
        | Ok(ClientFrame::Presence { id, .. })
        | Ok(ClientFrame::Publish { id, .. })
        | Ok(ClientFrame::Refresh { id, .. }) => id.clone(),
        Err(e) => e.id.clone(),
    }
}

fn act(
    frame: ClientFrame,
    handle: &Arc<ConnHandle>,
    state: &AppState,
) -> Result<Option<(String, bool)>, FrameError> {
    match frame {
        ClientFrame::Send {
            stream,
            data,
            encoding,
            id,
        } => {
            // Decided under the reader's `OwedAnswer`: a send taken here is answered before the
            // drain's close frame; one refused here was not stored.
            if handle.is_draining() {
                return Err(FrameError::new(
                    id,
                    ErrorCode::ShuttingDown,
                    "this replica is shutting down and takes no new sends: not stored; resend \
                     with the same id after reconnecting",
                ));
            }
            state
                .inbound
                .send(handle, stream, data, encoding, id)
                .map(|()| None)
        }
        ClientFrame::Subscribe { channel, since, id } => {
            if !handle.identity.may_join(&channel) {
                return Err(FrameError::new(
                    id,
                    ErrorCode::ChannelNotAllowed,
                    format!("the token's channels claim does not allow `{channel}`"),
                ));
            }
            let max = state.config.limits.max_subscriptions_per_connection;
            // A resume on a channel with history: hold back live messages, join, then read
            // what was missed; the dispatcher queues replay, `subscribed` and live in order.
            let resume = match (&since, state.config.history_for(&channel)) {
                (Some(since), Some(settings)) if !handle.is_in(&channel) => {
                    // The last possible stream id has nothing after it: Redis refuses to read
                    // past it, and no offset the gateway gave can be it (its ids come from
                    // XADD `*`).
                    let Some(since) = Offset::parse(since).filter(|o| o.id != (u64::MAX, u64::MAX))
                    else {
                        return Err(FrameError::new(
                            id,
                            ErrorCode::BadRequest,
                            format!("`since` must be an offset this gateway gave, not `{since}`"),
                        ));
                    };
                    handle.begin_resume(&channel, since.clone());
                    Some((since, settings.history_size))
                }
                _ => None,
            };
            if let Some((since, limit)) = resume {
                let joined = state.registry.join(handle, &channel, max);
                if let Ok(first) = joined {
                    if first.is_some() {
                        state.inbound.event(handle, Event::Subscribe(&channel));
                    }
                    let joined = first.map(|first| (channel.clone(), first));
                    spawn_resume(handle.clone(), state, channel, id, since, limit);
                    return Ok(joined);
                }
                handle.cancel_resume(&channel);
            }
            // A `since` on a channel without history (or one already joined) cannot be honoured:
            // say so rather than pretend.
            let subscribed = || {
                handle.reply(&ServerFrame::Subscribed {
                    channel: &channel,
                    id: id.as_ref(),
                    recovered: since.as_ref().map(|_| false),
                })
            };
            // `subscribed` is queued as the connection joins, before the channel's messages can
            // reach it: a message published at that moment cannot overtake it.
            match state
                .registry
                .subscribe_announced(handle, &channel, max, subscribed)
            {
                Ok(Some(first)) => {
                    state.inbound.event(handle, Event::Subscribe(&channel));
                    return Ok(Some((channel, first)));
                }
                Ok(None) => subscribed(),
                Err(_) => {
                    state.metrics.refused(Limit::Subscriptions).increment(1);
                    return Err(FrameError::new(
                        id,
                        ErrorCode::TooManySubscriptions,
                        format!("a connection may be in at most {max} channels (limits.max_subscriptions_per_connection)"),
                    ));
                }
            }
            Ok(None)
        }
        // Answered by `ClientFrames::on_message` before they get here.
        ClientFrame::Presence { .. }
        | ClientFrame::Refresh { .. }
        | ClientFrame::Publish { .. } => Ok(None),
        ClientFrame::Unsubscribe { channel, id } => {
            state.inbound.leave(&state.registry, handle, &channel);
            handle.reply(&ServerFrame::Unsubscribed {
                channel: &channel,
                id: id.as_ref(),
            });
            Ok(None)
        }
    }
}

/// Publishes a client's `publish` through the publisher `POST /send` uses (history, routing,
/// Redis Cluster alike), after appending it to the channel's `publish_stream` when it has one.
/// Returns the message's history offset, on channels with history.
///
/// The stream comes first so that it holds every message that was published: a failed publish
/// leaves an entry behind (the client is told, and a resend with the same id is not appended
/// again), a failed append publishes nothing.
async fn publish(
    handle: &ConnHandle,
    state: &AppState,
    channel: &str,
    data: &bytes::Bytes,
    encoding: protocol::Encoding,
    id: &Option<protocol::FrameId>,
) -> Result<Option<String>, FrameError> {
    let Some(settings) = state.config.client_publish_for(channel) else {
        return Err(FrameError::new(
            id.clone(),
            ErrorCode::PublishNotAllowed,
            format!("clients may not publish to `{channel}` (no [[channels]] pattern with client_publish = true matches it): not published"),
        ));
    };
    if !handle.identity.may_publish(channel) {
        return Err(FrameError::new(
            id.clone(),
            ErrorCode::PublishForbidden,
            format!("the token's publish claim does not cover `{channel}`: not published"),
        ));
    }
    // `data` travels as JSON between replicas, as a backend's does; MessagePack is converted.
    let json = match encoding {
        protocol::Encoding::Json => String::from_utf8(data.to_vec()).ok(),
        protocol::Encoding::Msgpack => rmp_serde::from_slice::<serde_json::Value>(data)
            .ok()
            .map(|value| value.to_string()),
    };
    let Some(raw) = json.and_then(|text| serde_json::value::RawValue::from_string(text).ok())
    else {
        return Err(FrameError::new(
            id.clone(),
            ErrorCode::BadRequest,
            "`data` cannot be carried as JSON (binary, extension types or non-string map keys): not published",
        ));
    };
    if !settings.publish_stream.is_empty() {
        state
            .inbound
            .record_publish(
                handle,
                &settings.publish_stream,
                channel,
                data.clone(),
                encoding,
                id.as_ref(),
            )
            .await?;
    }
    let mut batch = Batch {
        ts: crate::clock::unix_us(),
        items: vec![Item::Send(Message {
            to: Recipient::Channel(channel.into()),
            data: &raw,
            history: false,
            reach: None,
        })],
    };
    match state.publisher.publish(&mut batch).await {
        Ok(mut offsets) => Ok(offsets.pop().flatten()),
        Err(e) => {
            tracing::debug!(error = %e, channel, "client publish failed");
            Err(FrameError::new(
                id.clone(),
                ErrorCode::RedisUnavailable,
                e.explain(),
            ))
        }
    }
}

/// How long a resume keeps trying to read the history while Redis does not answer. After that
/// the client gets `redis_unavailable` (try the subscribe again), never `recovered: false`: the
/// history may well hold everything, this replica just cannot tell yet.
const RESUME_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads what the client missed and hands it to the dispatcher, which queues the replay (or
/// says why there is none) in order with the live messages held meanwhile.
fn spawn_resume(
    conn: Arc<ConnHandle>,
    state: &AppState,
    channel: String,
    id: Option<protocol::FrameId>,
    since: Offset,
    limit: u64,
) {
    let history = state.history.clone();
    let control_tx = state.control_tx.clone();
    tokio::spawn(async move {
        let give_up = Instant::now() + RESUME_PATIENCE;
        let keep_trying = || Instant::now() < give_up && conn.closing().is_none();
        let read = history
            .read_since(&channel, &since, limit, keep_trying)
            .await;
        if let Err(e) = &read {
            tracing::debug!(error = %e, channel = %channel, "history read failed; resume refused");
        }
        let done = ResumeDone {
            conn,
            channel,
            id,
            since,
            read,
        };
        let _ = control_tx.send(Control::Resume(done)).await;
    });
}

/// A page of `channel`'s presence for the client, or why not.
async fn presence_page(
    handle: &ConnHandle,
    state: &AppState,
    channel: &str,
    query: &PresenceQuery,
    id: &Option<protocol::FrameId>,
) -> Result<PresencePage, FrameError> {
    if !handle.identity.may_join(channel) {
        return Err(FrameError::new(
            id.clone(),
            ErrorCode::ChannelNotAllowed,
            format!("the token's channels claim does not allow `{channel}`"),
        ));
    }
    if state.config.presence_for(channel).is_none() {
        return Err(FrameError::new(
            id.clone(),
            ErrorCode::PresenceDisabled,
            format!("`{channel}` does not keep presence (no [[channels]] pattern with presence = true matches it)"),
        ));
    }
    state.presence.page(channel, query).await.map_err(|e| {
        FrameError::new(
            id.clone(),
            ErrorCode::RedisUnavailable,
            format!("presence could not be read ({e}); ask again"),
        )
    })
}
