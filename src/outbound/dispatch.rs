//! Every replica's receiving end: pub/sub payloads → local recipients → per-connection queues.
//!
//! One task handles payloads in arrival order, so messages of one call reach a connection in call
//! order. Each message is encoded at most once per encoding; all recipients share the bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::envelope::{self, Item, Payload, PresenceEvent, PresenceKind, ReachCount, ReachRequest};
use super::history::{HistoryReader, Replay};
use super::reach::Reaches;
use super::routes::Acks;
use crate::backplane::interest::Interest;
use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::config::Config;
use crate::connection::deflate::Deflate;
use crate::connection::{server_frame, ConnHandle, Outgoing};
use crate::cursor::{Begin, ChannelCursors, Entry, Finish, Live, Offset};
use crate::inbound::{Event, Inbound};
use crate::metrics::{CloseReason, DeflatePath, DropReason, Metrics};
use crate::protocol::{message, Encoding, ErrorCode, FrameId, ServerFrame};
use crate::registry::{Registry, Target};

/// Work handed back to the dispatcher by the tasks that read history for it.
pub enum Control {
    /// A connection's `subscribe` with `since` has its history.
    Resume(ResumeDone),
    /// A channel's history after the pub/sub link came back.
    CatchUp(CatchUp),
    /// A connection joined a history channel.
    Joined(Joined),
}

/// A connection joined a history channel: where the channel's members stand is recorded from
/// it (see [`ChannelCursors::joined`]), so a gap before anything is delivered can be caught up too.
pub struct Joined {
    /// The channel.
    pub channel: String,
    /// Where the channel's history stood just before the join, when the joining task read it.
    pub start: Option<Offset>,
    /// The channel had no local member before.
    pub first: bool,
}

/// What a channel missed while this replica's pub/sub link was down.
pub struct CatchUp {
    /// The channel.
    pub channel: String,
    /// The last offset this replica delivered on it.
    pub since: Offset,
    /// The history read: the entries published since, or that the history cannot fill the gap,
    /// or an error that waiting could not cure.
    pub read: Result<Replay, RedisFailure>,
}

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
    /// The history read: the missed entries (offset, data JSON), or that the history cannot
    /// make the client whole, or that Redis could not be read (so nobody can tell yet).
    pub read: Result<Replay, RedisFailure>,
}

/// What the dispatcher uses of the replica.
pub struct Parts {
    /// Local connections.
    pub registry: Arc<Registry>,
    /// Subscribe and unsubscribe events of backend-made joins.
    pub inbound: Arc<Inbound>,
    /// Metric handles.
    pub metrics: Metrics,
    /// The command link (acknowledgements of interest-routed subscribes).
    pub backplane: Backplane,
    /// Key names.
    pub keys: Keys,
    /// Reads channel histories for catch-ups.
    pub history: HistoryReader,
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Where history reads hand their results back.
    pub control: mpsc::Sender<Control>,
    /// Interest routing: the channels the pub/sub link listens to.
    pub interest: Option<Arc<Interest>>,
    /// Interest routing: acknowledgements awaited by this replica's publisher.
    pub acks: Arc<Acks>,
    /// Reach reports awaited by this replica's publisher.
    pub reaches: Arc<Reaches>,
}

/// Routes received payloads to local connections.
pub struct Dispatcher {
    registry: Arc<Registry>,
    inbound: Arc<Inbound>,
    metrics: Metrics,
    backplane: Backplane,
    keys: Keys,
    history: HistoryReader,
    config: Arc<Config>,
    control: mpsc::Sender<Control>,
    /// Interest routing: the channels the pub/sub link listens to.
    interest: Option<Arc<Interest>>,
    /// Interest routing: acknowledgements awaited by this replica's publisher.
    acks: Arc<Acks>,
    /// Reach reports awaited by this replica's publisher.
    reaches: Arc<Reaches>,
    /// The reach counts of the payload being dispatched, answered once it is fanned out; `None`
    /// unless one of its messages asked.
    reach_answer: Option<ReachAnswer>,
    /// Per history channel with local members, its ordering cursor: where the members stand,
    /// what is held while the channel catches up (data JSON and `Batch.ts`), and which replayed
    /// offsets live messages must not repeat. Every rule about that lives in `crate::cursor`.
    catch_ups: ChannelCursors<(String, u64)>,
    /// `catch_ups` is pruned of channels without local members when it grows past this.
    prune_at: usize,
    /// Reused for every message, so finding recipients does not allocate.
    scratch: Vec<Arc<ConnHandle>>,
    /// Direct writes left for the payload being dispatched (see [`DIRECT_BUDGET`]); 0 when the
    /// payload must go through the queues.
    direct_budget: usize,
    /// Whether the payload being dispatched carries several messages.
    multi: bool,
    /// Numbers the payloads, so a connection gets at most one direct write per payload.
    payload_seq: u64,
    /// When the last `missed` notice went out, and whether another is due.
    missed: MissedNotices,
}

/// `missed` notices: at most one per [`MISSED_EVERY`]; one asked for sooner goes out when that
/// time is up (a pub/sub buffer overflowing for a while signals on every dropped message).
struct MissedNotices {
    /// When the next notice may go out (the last one's time plus [`MISSED_EVERY`]). A field,
    /// so the dispatcher's loop reads no clock per payload.
    due: tokio::time::Instant,
    /// A notice was asked for before `due`.
    pending: bool,
}

/// The least time between two `missed` notices to the connections.
const MISSED_EVERY: Duration = Duration::from_secs(1);

/// The pause before a catch-up reads again after a read that failed for good (an error reply,
/// or a failure after its own retries): what the history holds is still unknown, so the members
/// keep waiting rather than be told `recovered: false`.
const CATCH_UP_RETRY: Duration = Duration::from_secs(1);

/// How many recipients of one pub/sub payload the dispatcher may write to directly.
///
/// A direct write (`connection/direct.rs`) saves the recipient's writer task a wake-up, but it
/// is one `write` per message. It pays when a connection gets one message at a time. When more
/// payloads wait behind this one, queueing lets each writer send a whole burst in one `write`,
/// so the dispatcher then queues only. In a payload of several messages, channel and broadcast
/// messages are queued (their recipients usually get all of them: one `write` for the lot),
/// and connection and user messages (usually one per recipient) are written directly, at most
/// one per connection. The budget also keeps one payload for a huge audience from holding the
/// dispatcher in syscalls: past it, the writer tasks (on every worker thread) take over.
const DIRECT_BUDGET: usize = 2048;

/// How many channels `Dispatcher::catch_ups` tracks before it forgets those without local
/// members (then at twice what is left): joins and leaves of many channels between catch-ups
/// cannot grow it without bound.
const PRUNE_AT: usize = 1024;

impl Dispatcher {
    /// A dispatcher over this replica's registry.
    pub fn new(parts: Parts) -> Self {
        let capacity = parts.config.redis.pubsub_buffer_messages;
        Self {
            registry: parts.registry,
            inbound: parts.inbound,
            metrics: parts.metrics,
            backplane: parts.backplane,
            keys: parts.keys,
            history: parts.history,
            config: parts.config,
            control: parts.control,
            interest: parts.interest,
            acks: parts.acks,
            reaches: parts.reaches,
            reach_answer: None,
            catch_ups: ChannelCursors::new(capacity),
            prune_at: PRUNE_AT,
            scratch: Vec::new(),
            direct_budget: 0,
            multi: false,
            payload_seq: 0,
            missed: MissedNotices {
                due: tokio::time::Instant::now(),
                pending: false,
            },
        }
    }

    /// Handles payloads, finished history reads and pub/sub reconnections until the pub/sub
    /// link's sender is gone.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Bytes>,
        mut control: mpsc::Receiver<Control>,
        mut resubscribed: mpsc::Receiver<()>,
    ) {
        loop {
            let missed_due = self.missed.due;
            tokio::select! {
                // Biased: the pub/sub link signals a reconnection before it forwards anything it
                // received after it, so the catch-up starts (and holds the channel) before the
                // first live payload of the new link is dispatched. Taken in the other order,
                // that payload would move the channel's last offset past the gap, and the
                // catch-up would read from after it. Control work goes first of all: a join
                // reported before a catch-up signal must be known when the signal is taken, or
                // its channel would have no starting point.
                biased;
                Some(work) = control.recv() => match work {
                    Control::Resume(done) => self.finish_resume(done),
                    Control::CatchUp(caught) => self.finish_catch_up(caught),
                    Control::Joined(joined) => self.joined(joined),
                },
                Some(()) = resubscribed.recv() => {
                    self.messages_missed();
                    self.start_catch_up();
                }
                () = tokio::time::sleep_until(missed_due), if self.missed.pending => self.tell_missed(),
                payload = rx.recv() => match payload {
                    Some(payload) => {
                        let alone = rx.is_empty();
                        self.dispatch(&payload, alone);
                    }
                    None => return,
                },
            }
        }
    }

    /// Handles one pub/sub payload; `alone` when no other payload waits behind it.
    pub fn dispatch(&mut self, payload: &[u8], alone: bool) {
        let (offsets, ts, items) = match envelope::decode(payload) {
            Ok(Payload::Batch {
                offsets, ts, items, ..
            }) => (offsets, ts, items),
            Ok(Payload::Ack { token, .. }) => {
                // An acknowledgement of a subscribe this replica published (interest routing).
                self.acks.arrived(&token);
                return;
            }
            Ok(Payload::Reach { token, counts, .. }) => {
                // A replica's reach counts for a call this replica published.
                self.metrics.reach_answers.increment(1);
                self.reaches.arrived(&token, &counts);
                return;
            }
            Err(e) => {
                self.metrics.dropped(DropReason::BadPayload).increment(1);
                tracing::warn!(error = %e, "undecodable pub/sub payload dropped");
                return;
            }
        };
        self.direct_budget = if alone { DIRECT_BUDGET } else { 0 };
        self.multi = items.len() > 1;
        self.payload_seq += 1;
        for (item, offset) in envelope::with_offsets(&items, &offsets) {
            self.apply(item, offset, ts);
        }
        if let Some(answer) = self.reach_answer.take() {
            answer.send(&self.keys, &self.backplane);
        }
    }

    fn apply(&mut self, item: &Item<'_>, offset: Option<&str>, ts: u64) {
        let target = item.target();
        match item {
            Item::Send(message) => {
                let channel = match target {
                    Target::Channel(c) => Some(c),
                    _ => None,
                };
                let count = message.reach.is_some();
                let reached = self.deliver(target, channel, offset, message.data, ts, count);
                if let Some(reach) = &message.reach {
                    self.count_reach(reach, reached);
                }
            }
            Item::Subscribe(join) => {
                let channel = &*join.channel;
                self.registry.recipients(target, &mut self.scratch);
                let ack = join.ack.as_ref().map(|ack| Ack {
                    channel: self.keys.replica(&ack.replica),
                    notice: envelope::ack(&ack.token),
                    backplane: self.backplane.clone(),
                });
                match &self.interest {
                    // Interest routing, and the link does not listen to the channel yet: join
                    // once it does, without holding up the dispatcher.
                    Some(interest) if !self.scratch.is_empty() && !interest.listening(channel) => {
                        let conns: Vec<_> = self.scratch.drain(..).collect();
                        let (interest, registry, inbound, control) = (
                            interest.clone(),
                            self.registry.clone(),
                            self.inbound.clone(),
                            self.control.clone(),
                        );
                        let history = self.config.history_for(channel).is_some();
                        let channel = channel.to_owned();
                        tokio::spawn(async move {
                            let prepared = interest.prepare(&channel).await;
                            let mut first = false;
                            for conn in conns {
                                first |= server_join(&registry, &inbound, &conn, &channel);
                            }
                            drop(prepared);
                            if history {
                                let joined = Joined {
                                    channel,
                                    start: None,
                                    first,
                                };
                                let _ = control.send(Control::Joined(joined)).await;
                            }
                            if let Some(ack) = ack {
                                ack.send().await;
                            }
                        });
                    }
                    _ => {
                        let mut first = false;
                        for conn in self.scratch.drain(..) {
                            first |= server_join(&self.registry, &self.inbound, &conn, channel);
                        }
                        if self.config.history_for(channel).is_some() {
                            self.joined(Joined {
                                channel: channel.to_owned(),
                                start: None,
                                first,
                            });
                        }
                        if let Some(ack) = ack {
                            tokio::spawn(ack.send());
                        }
                    }
                }
            }
            Item::Unsubscribe(leave) => {
                let channel = &*leave.channel;
                self.registry.recipients(target, &mut self.scratch);
                for conn in self.scratch.drain(..) {
                    self.inbound.leave(&self.registry, &conn, channel);
                    conn.reply(&ServerFrame::Unsubscribed { channel, id: None });
                }
            }
            Item::Disconnect(close) => {
                let (code, reason) = (close.code, close.reason.as_deref());
                let reason = reason.unwrap_or("disconnected by backend");
                self.registry.recipients(target, &mut self.scratch);
                for conn in self.scratch.drain(..) {
                    conn.close(code, reason, CloseReason::Backend);
                }
            }
            Item::Presence(event) => self.presence_event(target, event),
        }
    }

    /// Hands a `join` or `leave` to the channel's local subscribers, in order with its
    /// messages (and held with them while a subscriber resumes).
    fn presence_event(&mut self, target: Target<'_>, event: &PresenceEvent<'_>) {
        let member: serde_json::Value = match serde_json::from_str(event.member.get()) {
            Ok(member) => member,
            Err(e) => {
                self.metrics.dropped(DropReason::BadPayload).increment(1);
                tracing::warn!(error = %e, "presence event with a bad member dropped");
                return;
            }
        };
        let channel = &*event.channel;
        let frame = |encoding| {
            let frame = match event.kind {
                PresenceKind::Join => ServerFrame::Join {
                    channel,
                    member: &member,
                },
                PresenceKind::Leave => ServerFrame::Leave {
                    channel,
                    member: &member,
                },
            };
            frame.encode(encoding)
        };
        self.registry.recipients(target, &mut self.scratch);
        let (mut json, mut msgpack) = (None, None);
        for conn in self.scratch.drain(..) {
            let bytes = match conn.encoding {
                Encoding::Json => json.get_or_insert_with(|| frame(Encoding::Json)),
                Encoding::Msgpack => msgpack.get_or_insert_with(|| frame(Encoding::Msgpack)),
            };
            conn.deliver_channel(channel, None, bytes, false, None, 0);
        }
    }

    /// Hands a live message to its local recipients, unless the channel's catch-up holds it
    /// or has delivered it already. Returns how many connections it was handed to; for a held
    /// or replayed message, when `count`, the channel's local members (they get it, or got it,
    /// from the catch-up), else 0.
    fn deliver(
        &mut self,
        target: Target<'_>,
        channel: Option<&str>,
        offset: Option<&str>,
        data: &RawValue,
        ts: u64,
        count: bool,
    ) -> usize {
        if let (Some(channel), Some(offset)) = (channel, offset) {
            let keep = || (data.get().to_owned(), ts);
            match self.catch_ups.offer(channel, offset, keep) {
                Live::Deliver => {}
                Live::Held | Live::Duplicate if count => {
                    self.registry.recipients(target, &mut self.scratch);
                    let members = self.scratch.len();
                    self.scratch.clear();
                    return members;
                }
                Live::Held | Live::Duplicate => return 0,
            }
        }
        self.fan_out(target, channel, offset, data, ts)
    }

    /// Adds a message's count to the reach answer of the payload being dispatched.
    fn count_reach(&mut self, reach: &ReachRequest<'_>, reached: usize) {
        let count = ReachCount {
            item: reach.item,
            count: u32::try_from(reached).unwrap_or(u32::MAX),
        };
        match &mut self.reach_answer {
            Some(answer) if answer.token == reach.token && answer.replica == reach.replica => {
                answer.counts.push(count);
            }
            answer => {
                // The payload's first requested message. A payload holds the messages of one
                // call, which share a token; another token would be answered on its own.
                if let Some(done) = answer.take() {
                    done.send(&self.keys, &self.backplane);
                }
                *answer = Some(ReachAnswer {
                    replica: reach.replica.to_string(),
                    token: reach.token.to_string(),
                    counts: vec![count],
                });
            }
        }
    }

    /// Hands a message to its local recipients, with no catch-up rule applied: live messages
    /// come through [`Dispatcher::deliver`], replays and released held messages straight here.
    /// Returns how many recipients it was written to or queued for (not those it was dropped
    /// for: a full queue, a closing connection).
    fn fan_out(
        &mut self,
        target: Target<'_>,
        channel: Option<&str>,
        offset: Option<&str>,
        data: &RawValue,
        ts: u64,
    ) -> usize {
        let per_recipient = matches!(target, Target::Connection(_) | Target::User(_));
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
            return 0;
        }
        if let (Some(channel), Some(offset)) = (channel, offset) {
            self.catch_ups.delivered(channel, offset);
        }
        // Serialized once per encoding, as a payload (for the queue) and as a whole WebSocket
        // frame (for direct writes), and compressed once per encoding for the connections that
        // agreed on permessage-deflate; every recipient shares the same bytes.
        let (mut json, mut msgpack) = (None, None);
        let direct = self.direct_budget > 0 && (!self.multi || per_recipient);
        let once_per_conn = self.multi;
        let encode = |encoding| {
            let payload = message(encoding, channel, offset, data);
            Forms::new(encoding, payload, direct)
        };
        let mut reached = 0;
        for conn in self.scratch.drain(..) {
            let forms = match conn.encoding {
                Encoding::Json => json.get_or_insert_with(|| encode(Encoding::Json)),
                Encoding::Msgpack => msgpack.get_or_insert_with(|| encode(Encoding::Msgpack)),
            };
            let form = forms.pick(conn.deflate, &self.metrics);
            let whole = match &form.whole {
                Some(whole)
                    if self.direct_budget > 0
                        && (!once_per_conn || conn.first_direct_in(self.payload_seq)) =>
                {
                    self.direct_budget -= 1;
                    Some(whole)
                }
                _ => None,
            };
            let (frame, deflated) = (&form.payload, form.deflated);
            let handed = match channel {
                Some(channel) => conn.deliver_channel(channel, offset, frame, deflated, whole, ts),
                None => conn.deliver(frame, deflated, whole, ts),
            };
            reached += usize::from(handed);
        }
        reached
    }
}

impl Dispatcher {
    /// Queues, in order: the replayed history, the `subscribed` reply that ends it, and the live
    /// messages held meanwhile that the replay did not already cover. When they do not fit the
    /// send queue the replay is given up and the client is told (`recovered: false`); when even
    /// the live messages do not fit, the connection is closed with 1013 rather than lose any.
    /// When Redis could not be read, the client is not told `recovered: false` (nothing says the
    /// history lost anything): it leaves the channel and gets `redis_unavailable`, to subscribe
    /// again with the same `since`.
    fn finish_resume(&mut self, done: ResumeDone) {
        let conn = &done.conn;
        let channel = done.channel.as_str();
        let replay = match done.read {
            Ok(Replay::Complete(entries)) => Some(entries),
            Ok(Replay::Incomplete) => None,
            Err(e) => {
                conn.cancel_resume(channel);
                self.inbound.leave(&self.registry, conn, channel);
                self.metrics
                    .rejected(ErrorCode::RedisUnavailable)
                    .increment(1);
                let message = format!(
                    "the channel's history could not be read ({e}); you are not subscribed: \
                     subscribe again with the same `since`"
                );
                conn.reply(&ServerFrame::Error {
                    id: done.id.as_ref(),
                    code: ErrorCode::RedisUnavailable.as_str(),
                    message: &message,
                });
                return;
            }
        };
        let Some(finish) = conn.finish_resume(channel, replay) else {
            return;
        };
        let subscribed = |recovered: bool| Outgoing {
            frame: ServerFrame::Subscribed {
                channel,
                id: done.id.as_ref(),
                recovered: Some(recovered),
            }
            .encode(conn.encoding),
            deflated: false,
            accepted_us: 0,
        };
        let held = match finish {
            // More arrived meanwhile than a send queue holds: the client resumes again.
            Finish::ReadAgain { .. } | Finish::NotRecovered { whole: false, .. } => {
                conn.cancel_resume(channel);
                conn.close(
                    1013,
                    "too many messages arrived while resuming",
                    CloseReason::SlowConsumer,
                );
                return;
            }
            Finish::Recovered { replay, held } => {
                let held: Vec<Outgoing> = held.into_iter().map(|h| h.item).collect();
                let mut frames = Vec::with_capacity(replay.len() + 1 + held.len());
                for Entry { offset, data } in replay {
                    let raw = RawValue::from_string(data).unwrap_or_else(|_| null().to_owned());
                    frames.push(Outgoing {
                        frame: message(conn.encoding, Some(channel), Some(&offset), &raw),
                        deflated: false,
                        accepted_us: 0,
                    });
                }
                frames.push(subscribed(true));
                frames.extend(held.iter().cloned());
                if conn.deliver_all(frames) {
                    self.metrics.resumes(true).increment(1);
                    return;
                }
                // The replay does not fit the send queue: given up, and the client told.
                conn.cancel_resume(channel);
                held
            }
            Finish::NotRecovered { held, whole: true } => {
                held.into_iter().map(|h| h.item).collect()
            }
        };
        self.metrics.resumes(false).increment(1);
        let mut frames = vec![subscribed(false)];
        frames.extend(held);
        if !conn.deliver_all(frames) {
            conn.close(
                1013,
                "send queue full while resuming",
                CloseReason::SlowConsumer,
            );
        }
    }
}

impl Dispatcher {
    /// Records a join on a history channel (see [`ChannelCursors::joined`]).
    fn joined(&mut self, joined: Joined) {
        tracing::debug!(
            channel = %joined.channel,
            start = ?joined.start,
            first = joined.first,
            "history channel joined"
        );
        self.catch_ups
            .joined(&joined.channel, joined.start, joined.first);
        if self.catch_ups.len() > self.prune_at {
            let registry = &self.registry;
            self.catch_ups
                .retain(|channel| registry.has_channel(channel));
            self.prune_at = (2 * self.catch_ups.len()).max(PRUNE_AT);
        }
    }

    /// Live messages may have been lost before the pub/sub link's next one: every connection is
    /// told `missed` (now, or when [`MISSED_EVERY`] has passed since the last notice).
    fn messages_missed(&mut self) {
        if tokio::time::Instant::now() < self.missed.due {
            self.missed.pending = true;
        } else {
            self.tell_missed();
        }
    }

    /// Queues `{"type":"missed"}` to every local connection, encoded once per encoding.
    fn tell_missed(&mut self) {
        self.missed = MissedNotices {
            due: tokio::time::Instant::now() + MISSED_EVERY,
            pending: false,
        };
        let json = ServerFrame::Missed.encode(Encoding::Json);
        let msgpack = ServerFrame::Missed.encode(Encoding::Msgpack);
        let conns = self.registry.all();
        for conn in &conns {
            let frame = match conn.encoding {
                Encoding::Json => &json,
                Encoding::Msgpack => &msgpack,
            };
            conn.deliver(frame, false, None, 0);
        }
        self.metrics.missed_notices.increment(conns.len() as u64);
    }

    /// After a pub/sub reconnect or a dropped payload: for every history channel with local
    /// members, hold its live messages and read what was published since where they stand; or,
    /// when that is unknown, tell them `recovered: false`.
    fn start_catch_up(&mut self) {
        let registry = self.registry.clone();
        self.catch_ups
            .retain(|channel| registry.has_channel(channel));
        self.prune_at = (2 * self.catch_ups.len()).max(PRUNE_AT);
        let mut reads = 0;
        for channel in registry.channel_names() {
            if self.config.history_for(&channel).is_none() {
                continue;
            }
            match self.catch_ups.begin(&channel) {
                Begin::Read(since) => {
                    reads += 1;
                    self.read_history(&channel, since);
                }
                Begin::Unknown => {
                    tracing::info!(channel = %channel, "catch-up: where this channel's subscribers stand is unknown; telling them recovered: false");
                    self.tell_not_recovered(&channel);
                    self.metrics.catch_ups(false).increment(1);
                }
                Begin::Running => {}
            }
        }
        if reads > 0 {
            tracing::info!(
                channels = reads,
                "messages missed on pub/sub: catching up history channels"
            );
        }
    }

    /// Reads `channel`'s history after `since` and hands it back as [`Control::CatchUp`].
    fn read_history(&self, channel: &str, since: Offset) {
        self.read_history_after(channel, since, Duration::ZERO);
    }

    /// [`Dispatcher::read_history`], starting after `pause`.
    fn read_history_after(&self, channel: &str, since: Offset, pause: Duration) {
        let Some(settings) = self.config.history_for(channel) else {
            return;
        };
        let history = self.history.clone();
        let registry = self.registry.clone();
        let control = self.control.clone();
        let (channel, limit) = (channel.to_owned(), settings.history_size);
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            // No deadline: while Redis does not answer, nothing new is published either, and
            // the held live messages are bounded. Giving up would tell subscribers the history
            // lost what it most likely still holds. The read stops trying once the channel has
            // no local subscriber left.
            let keep_trying = || registry.has_channel(&channel);
            let read = history
                .read_since(&channel, &since, limit, keep_trying)
                .await;
            if let Err(e) = &read {
                tracing::warn!(error = %e, channel = %channel, "catch-up history read failed");
            }
            let caught = CatchUp {
                channel,
                since,
                read,
            };
            let _ = control.send(Control::CatchUp(caught)).await;
        });
    }

    /// Every local subscriber of `channel` gets an unsolicited `subscribed` with
    /// `recovered: false`: it missed messages nobody can give back.
    fn tell_not_recovered(&mut self, channel: &str) {
        self.registry
            .recipients(Target::Channel(channel), &mut self.scratch);
        for conn in self.scratch.drain(..) {
            let notice = ServerFrame::Subscribed {
                channel,
                id: None,
                recovered: Some(false),
            };
            conn.deliver(&notice.encode(conn.encoding), false, None, 0);
        }
    }

    /// Delivers what a channel missed, then the live messages held meanwhile that are newer;
    /// when the hold could not keep every live message, reads again from the end of the
    /// replay. When the gap cannot be filled, every local subscriber gets `subscribed` with
    /// `recovered: false` first, so it knows to reload.
    fn finish_catch_up(&mut self, caught: CatchUp) {
        let channel = caught.channel.as_str();
        let replay = match caught.read {
            Ok(Replay::Complete(entries)) => Some(entries),
            Ok(Replay::Incomplete) => None,
            // A read Redis did not answer says nothing about what the history holds: telling
            // the members `recovered: false` would send every one of them to reload its state,
            // just when the backends are weakest. While the channel has members, read again
            // after a pause and keep holding (the hold is bounded; what it cannot keep, the
            // next read fetches). With no member left, nobody is told anything.
            Err(e) if self.registry.has_channel(channel) => {
                tracing::warn!(error = %e, channel, "catch-up history read failed; reading again, holding live messages meanwhile");
                self.read_history_after(channel, caught.since, CATCH_UP_RETRY);
                return;
            }
            Err(_) => None,
        };
        let Some(finish) = self.catch_ups.finish(channel, replay) else {
            return;
        };
        let target = Target::Channel(channel);
        match finish {
            Finish::Recovered { replay, held } => {
                self.replay(channel, replay);
                for held in held {
                    let (data, ts) = held.item;
                    let raw = RawValue::from_string(data).unwrap_or_else(|_| null().to_owned());
                    self.fan_out(target, Some(channel), held.offset.as_deref(), &raw, ts);
                }
                self.metrics.catch_ups(true).increment(1);
            }
            Finish::ReadAgain { replay, since } => {
                self.replay(channel, replay);
                tracing::debug!(
                    channel,
                    "catch-up: more live messages than held; reading on"
                );
                self.read_history(channel, since);
            }
            Finish::NotRecovered { held, .. } => {
                self.tell_not_recovered(channel);
                for held in held {
                    let (data, ts) = held.item;
                    let raw = RawValue::from_string(data).unwrap_or_else(|_| null().to_owned());
                    self.fan_out(target, Some(channel), held.offset.as_deref(), &raw, ts);
                }
                self.metrics.catch_ups(false).increment(1);
            }
        }
    }

    /// Hands replayed history entries of `channel` to its local members.
    fn replay(&mut self, channel: &str, replay: Vec<Entry>) {
        for Entry { offset, data } in replay {
            let raw = RawValue::from_string(data).unwrap_or_else(|_| null().to_owned());
            self.fan_out(
                Target::Channel(channel),
                Some(channel),
                Some(&offset),
                &raw,
                0,
            );
        }
    }
}

/// A message in one encoding as its recipients get it: plain, and compressed once for each set
/// of permessage-deflate terms in use (usually one), so that the fan-out compresses a message
/// once rather than once per connection.
struct Forms {
    encoding: Encoding,
    plain: Form,
    /// Per (window bits, level): the compressed form (`None` if zlib failed).
    deflated: Vec<((u8, u8), Option<Form>)>,
    /// Whether whole frames are built for direct writes.
    direct: bool,
}

/// A message's bytes for one kind of recipient.
struct Form {
    /// The frame's payload, for the queue.
    payload: Bytes,
    /// Whether `payload` is compressed.
    deflated: bool,
    /// The whole frame, for direct writes.
    whole: Option<Bytes>,
}

impl Forms {
    fn new(encoding: Encoding, payload: Bytes, direct: bool) -> Self {
        let whole = direct.then(|| server_frame(encoding, &payload, false));
        Self {
            encoding,
            plain: Form {
                payload,
                deflated: false,
                whole,
            },
            deflated: Vec::new(),
            direct,
        }
    }

    /// The form for a connection with these deflate terms, compressing on first use.
    fn pick(&mut self, deflate: Option<Deflate>, metrics: &Metrics) -> &Form {
        let Some(d) = deflate.filter(|d| d.wants(self.plain.payload.len())) else {
            return &self.plain;
        };
        let key = (d.window_bits, d.level);
        let at = match self.deflated.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                metrics.deflated(DeflatePath::Fanout).increment(1);
                let form = d.compress(&self.plain.payload).map(|payload| Form {
                    whole: self
                        .direct
                        .then(|| server_frame(self.encoding, &payload, true)),
                    payload,
                    deflated: true,
                });
                self.deflated.push((key, form));
                self.deflated.len() - 1
            }
        };
        self.deflated[at].1.as_ref().unwrap_or(&self.plain)
    }
}

/// The reach counts one payload's requested messages had on this replica, for the replica that
/// asked.
struct ReachAnswer {
    replica: String,
    token: String,
    counts: Vec<ReachCount>,
}

impl ReachAnswer {
    /// Publishes the answer to the asking replica's channel, without holding up the dispatcher.
    fn send(self, keys: &Keys, backplane: &Backplane) {
        let channel = keys.replica(&self.replica);
        let notice = envelope::reach(&self.token, &self.counts);
        let backplane = backplane.clone();
        tokio::spawn(async move {
            // Lost, the asking replica reports the counts it got as incomplete.
            if let Err(e) = backplane.publish(&channel, notice.as_bytes()).await {
                tracing::debug!(error = %e, "reach answer not sent");
            }
        });
    }
}

/// The acknowledgement a subscribe asked for (interest routing), sent once the join is in effect.
struct Ack {
    channel: String,
    notice: String,
    backplane: Backplane,
}

impl Ack {
    async fn send(self) {
        // Lost, the publishing replica answers the backend after its timeout anyway.
        if let Err(e) = self
            .backplane
            .publish(&self.channel, self.notice.as_bytes())
            .await
        {
            tracing::debug!(error = %e, "subscribe acknowledgement not sent");
        }
    }
}

/// A backend's subscribe, applied to one local connection. It is not bound by the
/// per-connection limit, which protects the replica from clients. True when the connection is
/// the channel's first local member.
fn server_join(
    registry: &Registry,
    inbound: &Inbound,
    conn: &Arc<ConnHandle>,
    channel: &str,
) -> bool {
    let joined = registry.join(conn, channel, usize::MAX);
    if let Ok(Some(_)) = joined {
        inbound.event(conn, Event::Subscribe(channel));
    }
    conn.reply(&ServerFrame::Subscribed {
        channel,
        id: None,
        recovered: None,
    });
    joined == Ok(Some(true))
}

fn null() -> &'static RawValue {
    static NULL: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| RawValue::from_string("null".into()).expect("null is JSON"))
}
