//! Every replica's receiving end: pub/sub payloads → local recipients → per-connection queues.
//!
//! One task handles payloads in arrival order and keeps every per-message rule; the
//! per-recipient work of each message runs per fan-out shard, on the shard's lane or at once
//! (`shards.rs`), in dispatch order for every connection, so messages of one call reach a
//! connection in call order. Each message is encoded at most once per encoding; all recipients
//! share the bytes.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::envelope::{self, Item, Payload, PresenceEvent, PresenceKind, ReachCount, ReachRequest};
use super::history::{HistoryReader, Replay};
use super::reach::Reaches;
use super::routes::Acks;
use super::shards::{Lane, Lanes, Work};
use crate::backplane::interest::Interest;
use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::config::Config;
use crate::connection::deflate::Deflate;
use crate::connection::{server_frame, ConnHandle, Outgoing};
use crate::cursor::{Begin, ChannelCursors, Entry, Finish, Held, Live, Offset};
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
    /// The reach counts of the payload being dispatched, answered once it is fanned out (when
    /// the last lane holding it is done); `None` unless one of its messages asked.
    reach_answer: Option<Arc<ReachAnswer>>,
    /// Per history channel with local members, its ordering cursor: where the members stand,
    /// what is held while the channel catches up (data JSON and `Batch.ts`), and which replayed
    /// offsets live messages must not repeat. Every rule about that lives in `crate::cursor`.
    catch_ups: ChannelCursors<(String, u64)>,
    /// `catch_ups` is pruned of channels without local members when it grows past this.
    prune_at: usize,
    /// The fan-out shards' lanes: where per-recipient work runs.
    lanes: Lanes,
    /// Direct writes each lane may make for the payload being dispatched (see
    /// [`DIRECT_BUDGET`]); 0 when the payload must go through the queues.
    direct_budget: usize,
    /// Direct writes each lane may make for a payload nothing waits behind after a quiet spell
    /// ([`QUIET`]): [`DIRECT_BUDGET`] without lanes on several worker threads, else unbounded.
    direct_after_quiet: usize,
    /// When the last pub/sub payload came.
    last_payload: Instant,
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

/// How many recipients of one pub/sub payload the dispatcher (or each lane) may write to
/// directly, unless the payload comes after a quiet spell (see [`QUIET`]).
///
/// A direct write (`connection/direct.rs`) saves the recipient's writer task a wake-up, but it
/// is one `write` per message. It pays when a connection gets one message at a time. When more
/// payloads wait behind this one, queueing lets each writer send a whole burst in one `write`,
/// so the dispatcher (or a lane) then queues only. In a payload of several messages, channel and
/// broadcast messages are queued (their recipients usually get all of them: one `write` for the
/// lot), and connection and user messages (usually one per recipient) are written directly, at
/// most one per connection.
///
/// The budget keeps one payload for a huge audience from holding the dispatcher in syscalls
/// while more may come: past it, the writer tasks (on every worker thread) take over, and a
/// writer that finds several messages queued sends them in one `write`.
const DIRECT_BUDGET: usize = 2048;

/// A payload that comes this long after the one before it (and with nothing else waiting) is
/// written directly to every recipient, with no budget, when lanes share the fan-out or there is
/// one worker thread: no later message is near enough to share a `write` with, and a direct
/// write is the cheapest delivery (`bench/growth.sh`, one worker: 7.5 µs per delivery to 19,000
/// subscribers at 1 msg/s, against 10.3 µs with the budget). In bursts the budget stays: there,
/// unbounded direct writes cost 3.5-3.9 µs per delivery against 2.6 (`bench/scaling.sh`).
const QUIET: Duration = Duration::from_millis(20);

/// How many channels `Dispatcher::catch_ups` tracks before it forgets those without local
/// members (then at twice what is left): joins and leaves of many channels between catch-ups
/// cannot grow it without bound.
const PRUNE_AT: usize = 1024;

impl Dispatcher {
    /// A dispatcher over this replica's registry.
    pub fn new(parts: Parts) -> Self {
        let capacity = parts.config.redis.pubsub_buffer_messages;
        let lanes = Lanes::start(
            parts.registry.clone(),
            &parts.config.outbound,
            parts.metrics.clone(),
        );
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let direct_after_quiet = if parts.registry.shards() == 1 && workers > 1 {
            DIRECT_BUDGET
        } else {
            usize::MAX
        };
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
            lanes,
            direct_budget: 0,
            direct_after_quiet,
            last_payload: Instant::now(),
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
                        // Nothing waits behind it: no payload, and no lane still busy with an
                        // earlier one (in a burst the lanes fall behind; queueing then lets
                        // each writer send several messages in one `write`).
                        let alone = rx.is_empty() && self.lanes.all_idle();
                        let started = Instant::now();
                        let quiet = started.duration_since(self.last_payload) >= QUIET;
                        self.last_payload = started;
                        self.direct_budget = match (alone, quiet) {
                            (false, _) => 0,
                            (true, false) => DIRECT_BUDGET,
                            (true, true) => self.direct_after_quiet,
                        };
                        self.dispatch(&payload);
                        self.metrics
                            .dispatch_seconds
                            .record(started.elapsed().as_secs_f64());
                    }
                    None => return,
                },
            }
            if self.lanes.must_flush() {
                self.lanes.flush().await;
            }
        }
    }

    /// Handles one pub/sub payload, with `self.direct_budget` direct writes per lane.
    fn dispatch(&mut self, payload: &[u8]) {
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
        self.multi = items.len() > 1;
        self.payload_seq += 1;
        for (item, offset) in envelope::with_offsets(&items, &offsets) {
            self.apply(item, offset, ts);
        }
        // Sent once no lane holds it any more.
        self.reach_answer = None;
    }

    fn apply(&mut self, item: &Item<'_>, offset: Option<&str>, ts: u64) {
        let target = item.target();
        match item {
            Item::Send(message) => {
                let channel = match target {
                    Target::Channel(c) => Some(c),
                    _ => None,
                };
                let reach = message.reach.as_ref().map(|reach| self.reach_slot(reach));
                self.deliver(target, channel, offset, message.data, ts, reach);
            }
            Item::Subscribe(join) => {
                let channel = &*join.channel;
                let ack = join.ack.as_ref().map(|ack| Ack {
                    channel: self.keys.replica(&ack.replica),
                    notice: envelope::ack(&ack.token),
                    backplane: self.backplane.clone(),
                });
                let members = self.lanes.count(target);
                match &self.interest {
                    // Interest routing, and the link does not listen to the channel yet: join
                    // once it does, without holding up the dispatcher.
                    Some(interest) if members > 0 && !interest.listening(channel) => {
                        let mut conns = Vec::with_capacity(members);
                        self.registry.recipients(target, &mut conns);
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
                        // The channel's first local members: read before the joins, which may
                        // run on the lanes after this returns.
                        let first = members > 0 && !self.registry.has_channel(channel);
                        let work = Joins {
                            target: To::owned(target),
                            channel: channel.to_owned(),
                            inbound: self.inbound.clone(),
                            _ack: AckOnDrop(ack),
                        };
                        // Without recipients the work is dropped here, which sends the ack.
                        self.lanes.spread(Arc::new(work));
                        if members > 0 && self.config.history_for(channel).is_some() {
                            self.joined(Joined {
                                channel: channel.to_owned(),
                                start: None,
                                first,
                            });
                        }
                    }
                }
            }
            Item::Unsubscribe(leave) => {
                let work = Leaves {
                    target: To::owned(target),
                    channel: leave.channel.to_string(),
                    inbound: self.inbound.clone(),
                };
                self.lanes.spread_to(target, Arc::new(work));
            }
            Item::Disconnect(close) => {
                let reason = close.reason.as_deref();
                let work = Closes {
                    target: To::owned(target),
                    code: close.code,
                    reason: reason.unwrap_or("disconnected by backend").to_owned(),
                };
                self.lanes.spread_to(target, Arc::new(work));
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
        if self.lanes.count(target) == 0 {
            return;
        }
        let work = Frames {
            target: To::owned(target),
            channel: Some(channel.to_owned()),
            json: frame(Encoding::Json),
            msgpack: frame(Encoding::Msgpack),
        };
        self.lanes.spread(Arc::new(work));
    }

    /// Hands a live message to its local recipients, unless the channel's catch-up holds it
    /// or has delivered it already. `reach` gets how many connections it was handed to; for a
    /// held or replayed message, the channel's local members (they get it, or got it, from the
    /// catch-up).
    fn deliver(
        &mut self,
        target: Target<'_>,
        channel: Option<&str>,
        offset: Option<&str>,
        data: &RawValue,
        ts: u64,
        reach: Option<ReachSlot>,
    ) {
        if let (Some(channel), Some(offset)) = (channel, offset) {
            let keep = || (data.get().to_owned(), ts);
            match self.catch_ups.offer(channel, offset, keep) {
                Live::Deliver => {}
                Live::Held | Live::Duplicate => {
                    if let Some((answer, at)) = reach {
                        answer.add(at, self.lanes.count(target));
                    }
                    return;
                }
            }
        }
        self.fan_out(target, channel, offset, data, ts, reach);
    }

    /// A place for a message's count in the reach answer of the payload being dispatched.
    fn reach_slot(&mut self, reach: &ReachRequest<'_>) -> ReachSlot {
        let count = ReachCount {
            item: reach.item,
            count: 0,
        };
        let answer = match &self.reach_answer {
            Some(answer) if answer.token == reach.token && answer.replica == reach.replica => {
                answer.clone()
            }
            _ => {
                // The payload's first requested message. A payload holds the messages of one
                // call, which share a token; another token is answered on its own (the one
                // replaced is sent once no lane holds it).
                let answer = Arc::new(ReachAnswer {
                    replica: reach.replica.to_string(),
                    token: reach.token.to_string(),
                    counts: Mutex::new(Vec::new()),
                    channel: self.keys.replica(&reach.replica),
                    backplane: self.backplane.clone(),
                });
                self.reach_answer = Some(answer.clone());
                answer
            }
        };
        let mut counts = answer.counts.lock().expect("reach counts lock");
        counts.push(count);
        let at = counts.len() - 1;
        drop(counts);
        (answer, at)
    }

    /// Hands a message to its local recipients, with no catch-up rule applied: live messages
    /// come through [`Dispatcher::deliver`], replays and released held messages straight here.
    /// `reach` gets how many recipients it was written to or queued for (not those it was
    /// dropped for: a full queue, a closing connection).
    fn fan_out(
        &mut self,
        target: Target<'_>,
        channel: Option<&str>,
        offset: Option<&str>,
        data: &RawValue,
        ts: u64,
        reach: Option<ReachSlot>,
    ) {
        let per_recipient = matches!(target, Target::Connection(_) | Target::User(_));
        self.metrics.pubsub_received.increment(1);
        let started = Instant::now();
        let recipients = self.lanes.count(target);
        self.metrics
            .filter_seconds
            .record(started.elapsed().as_secs_f64());
        self.metrics.fanout_recipients.record(recipients as f64);
        if recipients == 0 {
            self.metrics.pubsub_filtered.increment(1);
            return;
        }
        if let (Some(channel), Some(offset)) = (channel, offset) {
            self.catch_ups.delivered(channel, offset);
        }
        let direct = self.direct_budget > 0 && (!self.multi || per_recipient);
        let message = Message {
            target: To::borrowed(target),
            channel: channel.map(Cow::Borrowed),
            offset: offset.map(Cow::Borrowed),
            data: Cow::Borrowed(data),
            ts,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
            direct,
            budget: self.direct_budget,
            once_per_conn: self.multi,
            payload: self.payload_seq,
            reach,
            metrics: self.metrics.clone(),
        };
        if self.lanes.all_here() {
            // Borrowing the payload: nothing is copied for a message written at once.
            self.lanes.run_here(&message);
        } else {
            self.lanes.spread(Arc::new(message.into_owned()));
        }
    }
}

/// A message's count in a payload's reach answer: the answer, and the count's index in it.
type ReachSlot = (Arc<ReachAnswer>, usize);

/// Who a [`Work`] is for: a [`Target`] that may own its name, so that a lane can run it later.
enum To<'a> {
    Connection(Cow<'a, str>),
    User(Cow<'a, str>),
    Channel(Cow<'a, str>),
    All,
}

impl<'a> To<'a> {
    fn borrowed(target: Target<'a>) -> Self {
        match target {
            Target::Connection(id) => To::Connection(Cow::Borrowed(id)),
            Target::User(user) => To::User(Cow::Borrowed(user)),
            Target::Channel(channel) => To::Channel(Cow::Borrowed(channel)),
            Target::All => To::All,
        }
    }

    fn owned(target: Target<'_>) -> To<'static> {
        To::borrowed(target).into_owned()
    }

    fn into_owned(self) -> To<'static> {
        match self {
            To::Connection(id) => To::Connection(Cow::Owned(id.into_owned())),
            To::User(user) => To::User(Cow::Owned(user.into_owned())),
            To::Channel(channel) => To::Channel(Cow::Owned(channel.into_owned())),
            To::All => To::All,
        }
    }

    fn target(&self) -> Target<'_> {
        match self {
            To::Connection(id) => Target::Connection(id),
            To::User(user) => Target::User(user),
            To::Channel(channel) => Target::Channel(channel),
            To::All => Target::All,
        }
    }
}

/// One message for the recipients of one shard: serialized once per encoding, as a payload (for
/// the queue) and as a whole WebSocket frame (for direct writes), and compressed once per
/// encoding for the connections that agreed on permessage-deflate, by whichever lane needs it
/// first; every recipient on every lane shares the same bytes.
struct Message<'a> {
    target: To<'a>,
    channel: Option<Cow<'a, str>>,
    offset: Option<Cow<'a, str>>,
    data: Cow<'a, RawValue>,
    ts: u64,
    json: OnceLock<Forms>,
    msgpack: OnceLock<Forms>,
    /// Whole frames are built for direct writes.
    direct: bool,
    /// Direct writes each lane may make for this payload (whichever of its messages makes
    /// them: only those with `direct` have whole frames to write).
    budget: usize,
    /// The payload has several messages: a connection gets at most one of them directly.
    once_per_conn: bool,
    /// The payload's number.
    payload: u64,
    reach: Option<ReachSlot>,
    metrics: Metrics,
}

impl Message<'_> {
    fn into_owned(self) -> Message<'static> {
        Message {
            target: self.target.into_owned(),
            channel: self.channel.map(|c| Cow::Owned(c.into_owned())),
            offset: self.offset.map(|o| Cow::Owned(o.into_owned())),
            data: Cow::Owned(self.data.into_owned()),
            ts: self.ts,
            json: self.json,
            msgpack: self.msgpack,
            direct: self.direct,
            budget: self.budget,
            once_per_conn: self.once_per_conn,
            payload: self.payload,
            reach: self.reach,
            metrics: self.metrics,
        }
    }

    fn forms(&self, encoding: Encoding) -> &Forms {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::Msgpack => &self.msgpack,
        };
        cell.get_or_init(|| {
            let payload = message(
                encoding,
                self.channel.as_deref(),
                self.offset.as_deref(),
                &self.data,
            );
            Forms::new(encoding, payload, self.direct)
        })
    }
}

impl Work for Message<'_> {
    fn run(&self, lane: &mut Lane) {
        lane.find(self.target.target());
        let mut conns = std::mem::take(&mut lane.scratch);
        let budget = lane.budget_for(self.payload, self.budget);
        let (channel, offset) = (self.channel.as_deref(), self.offset.as_deref());
        // This lane's compressed forms, so the shared list is locked once per form.
        let mut picked = Vec::new();
        let mut reached = 0;
        for conn in conns.drain(..) {
            let forms = self.forms(conn.encoding);
            let form = forms.pick(conn.deflate, &mut picked, &self.metrics);
            let whole = match &form.whole {
                Some(whole)
                    if *budget > 0
                        && (!self.once_per_conn || conn.first_direct_in(self.payload)) =>
                {
                    *budget -= 1;
                    Some(whole)
                }
                _ => None,
            };
            let (frame, deflated) = (&form.payload, form.deflated);
            let handed = match channel {
                Some(channel) => {
                    conn.deliver_channel(channel, offset, frame, deflated, whole, self.ts)
                }
                None => conn.deliver(frame, deflated, whole, self.ts),
            };
            reached += usize::from(handed);
        }
        lane.scratch = conns;
        if let Some((answer, at)) = &self.reach {
            answer.add(*at, reached);
        }
    }
}

/// A backend's subscribe, for the targeted connections of one shard.
struct Joins {
    target: To<'static>,
    channel: String,
    inbound: Arc<Inbound>,
    /// Sent once every lane is done with the joins (when dropped: never read).
    _ack: AckOnDrop,
}

impl Work for Joins {
    fn run(&self, lane: &mut Lane) {
        lane.each(self.target.target(), |registry, conn| {
            server_join(registry, &self.inbound, conn, &self.channel);
        });
    }
}

/// A backend's unsubscribe, for the targeted connections of one shard.
struct Leaves {
    target: To<'static>,
    channel: String,
    inbound: Arc<Inbound>,
}

impl Work for Leaves {
    fn run(&self, lane: &mut Lane) {
        let channel = self.channel.as_str();
        lane.each(self.target.target(), |registry, conn| {
            self.inbound.leave(registry, conn, channel);
            conn.reply(&ServerFrame::Unsubscribed { channel, id: None });
        });
    }
}

/// A backend's disconnect, for the targeted connections of one shard.
struct Closes {
    target: To<'static>,
    code: u16,
    reason: String,
}

impl Work for Closes {
    fn run(&self, lane: &mut Lane) {
        lane.each(self.target.target(), |_, conn| {
            conn.close(self.code, &self.reason, CloseReason::Backend);
        });
    }
}

/// A frame encoded once per encoding (presence events, notices), for the targeted connections
/// of one shard; in order with the channel's messages when `channel` is given.
struct Frames {
    target: To<'static>,
    channel: Option<String>,
    json: Bytes,
    msgpack: Bytes,
}

impl Work for Frames {
    fn run(&self, lane: &mut Lane) {
        lane.each(self.target.target(), |_, conn| {
            let frame = match conn.encoding {
                Encoding::Json => &self.json,
                Encoding::Msgpack => &self.msgpack,
            };
            match &self.channel {
                Some(channel) => conn.deliver_channel(channel, None, frame, false, None, 0),
                None => conn.deliver(frame, false, None, 0),
            };
        });
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
        // In order with the live messages its shard has pending.
        let (registry, inbound, metrics) = (
            self.registry.clone(),
            self.inbound.clone(),
            self.metrics.clone(),
        );
        let conn = done.conn.clone();
        self.lanes.for_conn(
            &conn,
            Box::new(move |_: &mut Lane| finish_resume(done, &registry, &inbound, &metrics)),
        );
    }
}

/// [`Dispatcher::finish_resume`], on the connection's shard.
fn finish_resume(done: ResumeDone, registry: &Registry, inbound: &Inbound, metrics: &Metrics) {
    {
        let conn = &done.conn;
        let channel = done.channel.as_str();
        let replay = match done.read {
            Ok(Replay::Complete(entries)) => Some(entries),
            Ok(Replay::Incomplete) => None,
            Err(e) => {
                conn.cancel_resume(channel);
                inbound.leave(registry, conn, channel);
                metrics.rejected(ErrorCode::RedisUnavailable).increment(1);
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
                    metrics.resumes(true).increment(1);
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
        metrics.resumes(false).increment(1);
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
        let work = Frames {
            target: To::All,
            channel: None,
            json: ServerFrame::Missed.encode(Encoding::Json),
            msgpack: ServerFrame::Missed.encode(Encoding::Msgpack),
        };
        let told = self.lanes.spread_to(Target::All, Arc::new(work));
        self.metrics.missed_notices.increment(told as u64);
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
        let notice = ServerFrame::Subscribed {
            channel,
            id: None,
            recovered: Some(false),
        };
        let work = Frames {
            target: To::owned(Target::Channel(channel)),
            channel: None,
            json: notice.encode(Encoding::Json),
            msgpack: notice.encode(Encoding::Msgpack),
        };
        self.lanes
            .spread_to(Target::Channel(channel), Arc::new(work));
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
        match finish {
            Finish::Recovered { replay, held } => {
                self.replay(channel, replay);
                self.release_held(channel, held);
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
                self.release_held(channel, held);
                self.metrics.catch_ups(false).increment(1);
            }
        }
    }

    /// Hands the live messages a catch-up of `channel` held to its local members.
    fn release_held(&mut self, channel: &str, held: Vec<Held<(String, u64)>>) {
        for held in held {
            let (data, ts) = held.item;
            let raw = RawValue::from_string(data).unwrap_or_else(|_| null().to_owned());
            let target = Target::Channel(channel);
            self.fan_out(
                target,
                Some(channel),
                held.offset.as_deref(),
                &raw,
                ts,
                None,
            );
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
                None,
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
    /// Per (window bits, level): the compressed form (`None` if zlib failed). Shared by the
    /// lanes; each keeps its own list of what it took (see [`Forms::pick`]).
    deflated: Mutex<Vec<(DeflateKey, Option<Arc<Form>>)>>,
    /// Whether whole frames are built for direct writes.
    direct: bool,
}

/// permessage-deflate terms a compressed form is made for: (window bits, level).
type DeflateKey = (u8, u8);

/// The compressed forms one lane took, per encoding and terms.
type Picked = Vec<((Encoding, DeflateKey), Option<Arc<Form>>)>;

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
            deflated: Mutex::new(Vec::new()),
            direct,
        }
    }

    /// The form for a connection with these deflate terms, compressing on first use by any
    /// lane; `picked` is the calling lane's list of forms taken.
    fn pick<'f>(
        &'f self,
        deflate: Option<Deflate>,
        picked: &'f mut Picked,
        metrics: &Metrics,
    ) -> &'f Form {
        let Some(d) = deflate.filter(|d| d.wants(self.plain.payload.len())) else {
            return &self.plain;
        };
        let key = (self.encoding, (d.window_bits, d.level));
        let at = match picked.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                let mut shared = self.deflated.lock().expect("deflated forms lock");
                let form = match shared.iter().find(|(k, _)| *k == key.1) {
                    Some((_, form)) => form.clone(),
                    None => {
                        metrics.deflated(DeflatePath::Fanout).increment(1);
                        let form = d.compress(&self.plain.payload).map(|payload| {
                            Arc::new(Form {
                                whole: self
                                    .direct
                                    .then(|| server_frame(self.encoding, &payload, true)),
                                payload,
                                deflated: true,
                            })
                        });
                        shared.push((key.1, form.clone()));
                        form
                    }
                };
                picked.push((key, form));
                picked.len() - 1
            }
        };
        picked[at].1.as_deref().unwrap_or(&self.plain)
    }
}

/// The reach counts one payload's requested messages had on this replica, for the replica that
/// asked; sent when dropped, that is once the dispatcher and every lane are done with it.
struct ReachAnswer {
    replica: String,
    token: String,
    counts: Mutex<Vec<ReachCount>>,
    /// The asking replica's channel.
    channel: String,
    backplane: Backplane,
}

impl ReachAnswer {
    /// Adds `reached` to the count at `at`.
    fn add(&self, at: usize, reached: usize) {
        let mut counts = self.counts.lock().expect("reach counts lock");
        let count = &mut counts[at].count;
        *count = count.saturating_add(u32::try_from(reached).unwrap_or(u32::MAX));
    }
}

impl Drop for ReachAnswer {
    /// Publishes the answer to the asking replica's channel, without holding up anyone.
    fn drop(&mut self) {
        let counts = std::mem::take(self.counts.get_mut().expect("reach counts lock"));
        let notice = envelope::reach(&self.token, &counts);
        let (channel, backplane) = (std::mem::take(&mut self.channel), self.backplane.clone());
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

/// An [`Ack`] sent when dropped: once every lane is done with the joins it follows.
struct AckOnDrop(Option<Ack>);

impl Drop for AckOnDrop {
    fn drop(&mut self) {
        if let Some(ack) = self.0.take() {
            tokio::spawn(ack.send());
        }
    }
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
