//! The shared half of a connection: what the registry, the dispatcher and the appender hold to
//! reach a connection without touching its socket.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use super::deflate::Deflate;
use super::direct::{Direct, DirectWrite};
use super::queue::{PushError, Queue};
use crate::clock::{mono_ms, unix_us};
use tokio::sync::Notify;

use crate::auth::Identity;
use crate::config::QueueFullPolicy;
use crate::cursor::{Cursor, Entry, Finish, Live, Offset};
use crate::metrics::{CloseReason, DropReason, Metrics};
use crate::protocol::{Encoding, ServerFrame};

/// A message frame waiting in a connection's send queue. `frame` is shared by all recipients.
#[derive(Clone)]
pub struct Outgoing {
    /// Encoded `message` frame, in the connection's encoding.
    pub frame: Bytes,
    /// Whether `frame` is compressed already (permessage-deflate, once for every recipient);
    /// otherwise the writer compresses it if the connection agreed and it is large enough.
    pub deflated: bool,
    /// Unix microseconds when `/send` accepted the message (for the latency histogram); 0 for
    /// frames with no such moment (replayed history, the `subscribed` that ends a replay).
    pub accepted_us: u64,
}

/// A frame on the reply path: replies to the client's own frames and protocol obligations.
pub enum Reply {
    /// An encoded reply frame (ack, error, subscribed, ...).
    Frame(Bytes),
    /// A pong answering the client's ping.
    Pong(Vec<u8>),
    /// A data frame with its own opcode (the conformance echo only).
    Data(fastwebsockets::OpCode, Bytes),
}

impl Reply {
    /// Payload length.
    pub fn len(&self) -> usize {
        match self {
            Reply::Frame(bytes) => bytes.len(),
            Reply::Pong(payload) => payload.len(),
            Reply::Data(_, bytes) => bytes.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How and why the connection is being closed.
#[derive(Debug, Clone)]
pub struct Closing {
    /// WebSocket close code sent to the client.
    pub code: u16,
    /// Close reason sent to the client.
    pub reason: String,
    /// Metric label.
    pub why: CloseReason,
    /// Whether the replies queued when the close was asked for are written before the close
    /// frame (a drained connection's acks); otherwise the close frame goes first.
    pub replies_first: bool,
}

/// The channels a connection is in, and whether it has left the registry for good.
#[derive(Default)]
pub struct Membership {
    /// Channels joined.
    pub joined: HashSet<Arc<str>>,
    /// Set when the connection was removed from the registry: joining is refused from then on,
    /// so a subscribe racing with the removal cannot leave the handle in a channel index.
    pub removed: bool,
}

/// Everything other tasks may do to a connection.
pub struct ConnHandle {
    /// Local sequence number, the registry key.
    pub seq: u64,
    /// Cluster-unique id.
    pub id: Arc<str>,
    /// Who the connection belongs to.
    pub identity: Identity,
    /// The user id as shared by the registry's user index.
    pub user: Option<Arc<str>>,
    /// Frame encoding.
    pub encoding: Encoding,
    /// permessage-deflate terms, when the client's offer was accepted.
    pub deflate: Option<Deflate>,
    /// Channels joined; guarded by a per-connection lock never held across `.await`.
    pub channels: Mutex<Membership>,
    /// Messages, read by the writer (`queue.rs`).
    pub(crate) messages: Queue<Outgoing>,
    /// Replies, read by the writer before messages (`queue.rs`).
    pub(crate) replies: Queue<Reply>,
    policy: QueueFullPolicy,
    /// Why the connection is closing, once it is: the first request wins.
    closing: OnceLock<Closing>,
    /// Notified when `closing` is set, to wake the tasks that wait for it (a `Notify` in place:
    /// a cancellation token is a separate allocation of ~120 bytes per connection).
    close_requested: Notify,
    /// Set while any channel of this connection is resuming; read on every delivery, so the
    /// common case costs one atomic load.
    resuming_any: AtomicBool,
    /// The order of each resuming channel's messages, from before the join until the first
    /// live message after the replay (see `crate::cursor`).
    resuming: Mutex<HashMap<Arc<str>, Cursor<Outgoing>>>,
    warned_drop: AtomicBool,
    metrics: Metrics,
    /// Writes that skip the queue when nothing is waiting (see `direct.rs`).
    pub direct: DirectWrite,
    /// The dispatcher's number of the last payload that wrote to this connection directly.
    direct_payload: AtomicU64,
    /// Set by [`ConnHandle::drain`]: no new `send` is taken.
    draining: AtomicBool,
    /// Answers owed to the client: one per [`OwedAnswer`] alive.
    owed: AtomicUsize,
    /// When the client was last heard from (any frame; [`crate::clock::mono_ms`]).
    heard_ms: AtomicU64,
    /// The second the connection opened ([`crate::clock::mono_ms`] / 1000): its pings are due
    /// every ping interval from then on, as a timer of its own would have them.
    opened_s: u32,
    /// Set by the keepalive sweep: the writer sends a ping.
    ping_due: AtomicBool,
}

/// An answer the connection owes its client: a `send` taken and not yet acked or refused, or a
/// frame the reader is handling. Counted on the connection while it lives; dropped once the
/// answer is queued. A draining connection closes when the last one drops (see
/// [`ConnHandle::drain`]), so the close frame never overtakes an answer it owes.
pub struct OwedAnswer {
    conn: Arc<ConnHandle>,
}

impl OwedAnswer {
    /// The connection the answer goes to.
    pub fn conn(&self) -> &Arc<ConnHandle> {
        &self.conn
    }
}

impl Drop for OwedAnswer {
    fn drop(&mut self) {
        // SeqCst pairs with `drain`: of the last release and the drain, whichever comes second
        // sees the other (count 0, or draining set) and closes. Both may; the first close wins.
        let left = self.conn.owed.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 && self.conn.draining.load(Ordering::SeqCst) {
            self.conn.close_drained();
        }
    }
}

impl ConnHandle {
    /// Creates a handle; its writer reads `messages` and `replies`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seq: u64,
        id: Arc<str>,
        identity: Identity,
        encoding: Encoding,
        deflate: Option<Deflate>,
        queue_capacity: usize,
        reply_capacity: usize,
        policy: QueueFullPolicy,
        metrics: Metrics,
    ) -> Arc<Self> {
        let user = identity.user.as_deref().map(Arc::from);
        let opened_ms = mono_ms();
        Arc::new(Self {
            seq,
            id,
            identity,
            user,
            encoding,
            deflate,
            channels: Mutex::new(Membership::default()),
            messages: Queue::new(queue_capacity),
            replies: Queue::new(reply_capacity),
            policy,
            closing: OnceLock::new(),
            close_requested: Notify::new(),
            resuming_any: AtomicBool::new(false),
            resuming: Mutex::new(HashMap::new()),
            warned_drop: AtomicBool::new(false),
            metrics,
            direct: DirectWrite::default(),
            direct_payload: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            owed: AtomicUsize::new(0),
            heard_ms: AtomicU64::new(opened_ms),
            opened_s: (opened_ms / 1000) as u32,
            ping_due: AtomicBool::new(false),
        })
    }

    /// Delivers a message frame (`deflated`: compressed already): written straight to the
    /// socket when `whole` (the same message as a complete WebSocket frame, shared by all
    /// recipients) is given and nothing else is waiting there; else queued. When the queue is full the configured policy applies and the
    /// drop is counted; the caller never waits.
    ///
    /// True when the message was written or queued; false when it was dropped (a full queue, a
    /// closing connection or a failed write).
    pub fn deliver(
        &self,
        frame: &Bytes,
        deflated: bool,
        whole: Option<&Bytes>,
        accepted_us: u64,
    ) -> bool {
        if let Some(written) =
            whole.and_then(|whole| self.direct_write(frame.len(), whole, accepted_us))
        {
            return written;
        }
        self.enqueue(frame.clone(), deflated, accepted_us, false)
    }

    /// True the first time it is asked for payload `seq` (payload numbers only grow): the
    /// dispatcher writes to a connection directly at most once per payload and queues the rest,
    /// which its writer then sends in one `write`.
    pub fn first_direct_in(&self, seq: u64) -> bool {
        self.direct_payload.swap(seq, Ordering::Relaxed) != seq
    }

    /// Tries a direct write: `Some(true)` when the message is written, `Some(false)` when the
    /// connection failed (nothing more to do), `None` when it must be queued instead.
    fn direct_write(&self, payload_len: usize, whole: &Bytes, accepted_us: u64) -> Option<bool> {
        if self.closing.get().is_some() {
            return None;
        }
        match self.direct.try_write(whole) {
            Direct::Written => {
                self.metrics.deliveries.increment(1);
                self.metrics.sent_bytes.increment(payload_len as u64);
                self.metrics.delivered_after(accepted_us, unix_us());
                Some(true)
            }
            Direct::Busy => None,
            Direct::Failed(e) => {
                self.close(1000, &e.to_string(), CloseReason::Error);
                Some(false)
            }
        }
    }

    /// Queues a message; `resumable` when it carries a history offset. Dropping such a message
    /// would leave a gap the client cannot see (offsets are not consecutive), so under either
    /// policy the connection is closed with 1013 instead: the client resumes from its last
    /// offset and gets the message from the history. True when queued.
    fn enqueue(&self, frame: Bytes, deflated: bool, accepted_us: u64, resumable: bool) -> bool {
        let handed = self.direct.hand(1);
        let out = Outgoing {
            frame,
            deflated,
            accepted_us,
        };
        match self.messages.try_push(out) {
            Ok(()) => {
                handed.queued();
                self.wake_writer();
                return true;
            }
            Err(PushError::Full(_)) => {
                drop(handed);
                self.metrics.dropped(DropReason::QueueFull).increment(1);
                if self.policy == QueueFullPolicy::Close || resumable {
                    self.close(1013, "send queue full", CloseReason::SlowConsumer);
                } else if !self.warned_drop.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        connection = %self.id,
                        "send queue full: dropping messages for this slow client (counted in wsbridge_delivery_dropped_total{{reason=\"queue_full\"}})"
                    );
                }
            }
            Err(PushError::Closed(_)) => {
                drop(handed);
                self.metrics.dropped(DropReason::Closed).increment(1);
            }
        }
        false
    }

    /// Whether the connection is in `channel`.
    pub fn is_in(&self, channel: &str) -> bool {
        self.channels
            .lock()
            .expect("channel set lock")
            .joined
            .contains(channel)
    }

    /// Starts holding back live messages of `channel` (before joining it): a resume from
    /// `since`, until [`ConnHandle::finish_resume`] or [`ConnHandle::cancel_resume`]. At most a
    /// send queue's worth is held.
    pub fn begin_resume(&self, channel: &str, since: Offset) {
        let cursor = Cursor::resuming(since, self.messages.capacity());
        let mut resuming = self.resuming.lock().expect("resume lock");
        resuming.insert(Arc::from(channel), cursor);
        self.resuming_any.store(true, Ordering::Release);
    }

    /// The resume's history read landed (`None`: the history cannot fill the gap): what to
    /// queue, in order (see [`Finish`]). The cursor stays while it has replayed offsets to
    /// drop. `None` when `channel` was not resuming.
    pub fn finish_resume(
        &self,
        channel: &str,
        replay: Option<Vec<Entry>>,
    ) -> Option<Finish<Outgoing>> {
        let mut resuming = self.resuming.lock().expect("resume lock");
        let finish = resuming.get_mut(channel)?.finish(replay);
        if resuming.get(channel).is_some_and(Cursor::is_settled) {
            resuming.remove(channel);
        }
        self.update_resuming_any(&resuming);
        finish
    }

    /// Stops following `channel`'s resume: the join failed, the read did, or the replay was
    /// not queued. Live messages flow again as they come.
    pub fn cancel_resume(&self, channel: &str) {
        let mut resuming = self.resuming.lock().expect("resume lock");
        resuming.remove(channel);
        self.update_resuming_any(&resuming);
    }

    fn update_resuming_any(&self, resuming: &HashMap<Arc<str>, Cursor<Outgoing>>) {
        if resuming.is_empty() {
            self.resuming_any.store(false, Ordering::Release);
        }
    }

    /// Delivers a channel message, or holds it back while that channel is resuming.
    ///
    /// `whole` is the same message as a complete WebSocket frame, when a direct write may be
    /// tried. True when the message was written, queued or held for the resume (or the resume's
    /// replay has it already); false when it was dropped, as [`ConnHandle::deliver`] says.
    pub fn deliver_channel(
        &self,
        channel: &str,
        offset: Option<&str>,
        frame: &Bytes,
        deflated: bool,
        whole: Option<&Bytes>,
        accepted_us: u64,
    ) -> bool {
        if self.resuming_any.load(Ordering::Acquire) {
            let mut resuming = self.resuming.lock().expect("resume lock");
            if let Some(cursor) = resuming.get_mut(channel) {
                let keep = || Outgoing {
                    frame: frame.clone(),
                    deflated,
                    accepted_us,
                };
                match cursor.offer(offset, keep) {
                    Live::Held | Live::Duplicate => return true,
                    Live::Deliver => {
                        if cursor.is_settled() {
                            resuming.remove(channel);
                            self.update_resuming_any(&resuming);
                        }
                    }
                }
            }
        }
        if let Some(written) =
            whole.and_then(|whole| self.direct_write(frame.len(), whole, accepted_us))
        {
            return written;
        }
        self.enqueue(frame.clone(), deflated, accepted_us, offset.is_some())
    }

    /// Queues frames in order if all fit, without any policy; false (nothing queued) otherwise.
    pub fn deliver_all(&self, frames: Vec<Outgoing>) -> bool {
        let handed = self.direct.hand(frames.len());
        if self.messages.try_push_all(frames).is_err() {
            return false;
        }
        handed.queued();
        self.wake_writer();
        true
    }

    /// Messages waiting in the send queue.
    pub fn queue_depth(&self) -> usize {
        self.messages.len()
    }

    /// Queues a reply frame. A client that lets its replies pile up is closed with 1013.
    pub fn reply(&self, frame: &ServerFrame<'_>) {
        self.reply_raw(Reply::Frame(frame.encode(self.encoding)));
    }

    /// Queues an already encoded reply or a pong.
    ///
    /// Returns false when the reply could not be queued.
    pub fn reply_raw(&self, reply: Reply) -> bool {
        let handed = self.direct.hand(1);
        match self.replies.try_push(reply) {
            Ok(()) => {
                handed.queued();
                self.wake_writer();
                true
            }
            Err(PushError::Full(_)) => {
                drop(handed);
                self.close(1013, "reply queue full", CloseReason::SlowConsumer);
                false
            }
            Err(PushError::Closed(_)) => false,
        }
    }

    /// Queues a reply, waiting for room: backpressure for the conformance echo, which must
    /// answer every message rather than apply a policy.
    pub async fn reply_wait(&self, reply: Reply) {
        let handed = self.direct.hand(1);
        if self.replies.push(reply).await.is_ok() {
            handed.queued();
            self.wake_writer();
        }
    }

    /// Records an answer owed to the client until the returned guard is dropped: take it before
    /// acting on a frame, drop it after its answer is queued.
    pub fn owe_answer(self: &Arc<Self>) -> OwedAnswer {
        self.owed.fetch_add(1, Ordering::SeqCst);
        OwedAnswer { conn: self.clone() }
    }

    /// Whether the connection is draining: it takes no new `send`.
    ///
    /// Read while holding an [`OwedAnswer`], it decides for good: a send taken because this
    /// said false is answered before the drain closes the connection.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Shutdown: stop taking sends, and close with 1012 once every answer owed is queued (at
    /// once when none is). The close frame follows those answers.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        if self.owed.load(Ordering::SeqCst) == 0 {
            self.close_drained();
        }
    }

    fn close_drained(&self) {
        self.request_close(Closing {
            code: 1012,
            reason: "replica shutting down".to_owned(),
            why: CloseReason::Shutdown,
            replies_first: true,
        });
    }

    /// Asks the connection to close. The first request wins; later ones are ignored.
    pub fn close(&self, code: u16, reason: &str, why: CloseReason) {
        self.request_close(Closing {
            code,
            reason: reason.to_owned(),
            why,
            replies_first: false,
        });
    }

    fn request_close(&self, closing: Closing) {
        let (code, why) = (closing.code, closing.why);
        let first = self.closing.set(closing).is_ok();
        if first {
            // The decision is logged when it is taken: the close frame may leave much later (it
            // waits behind what a slow client has not read), and the connection is counted as
            // closed only then.
            let reason = self.closing.get().map_or("", |c| c.reason.as_str());
            tracing::debug!(connection = %self.id, code, reason, why = ?why, "closing connection");
            self.close_requested.notify_waiters();
            self.wake_writer();
        }
    }

    /// Wakes the writer task: it waits on this one wake-up for everything it writes (a stored
    /// permit when it is busy, so nothing is missed).
    fn wake_writer(&self) {
        self.direct.kick.notify_one();
    }

    /// The client was heard from (any frame): it is not idle.
    pub(crate) fn heard(&self) {
        self.heard_ms.store(mono_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the client was last heard from, at `now` ([`crate::clock::mono_ms`]).
    pub fn silent_ms(&self, now: u64) -> u64 {
        now.saturating_sub(self.heard_ms.load(Ordering::Relaxed))
    }

    /// Whether a ping interval of `every_s` seconds ended for this connection in the seconds
    /// after `from_s` up to `to_s` ([`crate::clock::mono_ms`] / 1000): its pings are due at
    /// whole intervals after it opened.
    pub fn ping_due_between(&self, from_s: u64, to_s: u64, every_s: u64) -> bool {
        let opened = u64::from(self.opened_s);
        let every = every_s.max(1);
        to_s > opened && to_s.saturating_sub(opened) / every > from_s.saturating_sub(opened) / every
    }

    /// Asks the writer for a ping (the keepalive sweep).
    pub fn ping(&self) {
        self.ping_due.store(true, Ordering::Release);
        self.wake_writer();
    }

    /// Whether a ping is due; the writer sends it.
    pub(super) fn take_ping(&self) -> bool {
        self.ping_due.load(Ordering::Acquire) && self.ping_due.swap(false, Ordering::AcqRel)
    }

    /// Resolves once a close was asked for.
    pub async fn close_requested(&self) {
        let mut requested = std::pin::pin!(self.close_requested.notified());
        // Registered before `closing` is read: a request made in between still wakes it.
        requested.as_mut().enable();
        if self.closing.get().is_some() {
            return;
        }
        requested.await;
    }

    /// Why the connection is closing, if it is.
    pub fn closing(&self) -> Option<&Closing> {
        self.closing.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::Entry;

    fn handle(queue: usize) -> Arc<ConnHandle> {
        ConnHandle::new(
            1,
            Arc::from("c1"),
            Identity::default(),
            Encoding::Json,
            None,
            queue,
            8,
            QueueFullPolicy::Drop,
            Metrics::new(&[]),
        )
    }

    fn o(id: u64) -> String {
        format!("e:{id}-0")
    }

    fn live(conn: &ConnHandle, id: u64) {
        let frame = Bytes::from(format!("live {id}"));
        conn.deliver_channel("ch", Some(&o(id)), &frame, false, None, 0);
    }

    fn queued(conn: &ConnHandle) -> Vec<Bytes> {
        std::iter::from_fn(|| conn.messages.try_pop().map(|out| out.frame)).collect()
    }

    #[test]
    fn a_resuming_channel_holds_live_messages_then_drops_the_replayed_ones() {
        let conn = handle(8);
        conn.begin_resume("ch", Offset::parse(&o(1)).unwrap());
        live(&conn, 2);
        live(&conn, 3);
        // Another channel is not held.
        conn.deliver_channel("other", None, &Bytes::from("x"), false, None, 0);
        assert_eq!(queued(&conn), vec![Bytes::from("x")]);
        let replay = vec![Entry {
            offset: o(2),
            data: "2".into(),
        }];
        match conn.finish_resume("ch", Some(replay)) {
            Some(Finish::Recovered { held, .. }) => {
                let held: Vec<_> = held.into_iter().map(|h| h.item.frame).collect();
                assert_eq!(held, vec![Bytes::from("live 3")], "2 was in the replay");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // 2's live copy was still on its way: dropped; 3 is newer and lets the cursor go.
        live(&conn, 2);
        live(&conn, 4);
        live(&conn, 5);
        assert_eq!(
            queued(&conn),
            vec![Bytes::from("live 4"), Bytes::from("live 5")]
        );
        assert!(!conn.resuming_any.load(Ordering::Acquire));
    }

    #[test]
    fn a_resume_holds_at_most_a_send_queue_and_then_asks_for_the_close() {
        let conn = handle(2);
        conn.begin_resume("ch", Offset::parse(&o(1)).unwrap());
        for id in 2..=4 {
            live(&conn, id);
        }
        assert!(matches!(
            conn.finish_resume("ch", Some(Vec::new())),
            Some(Finish::ReadAgain { .. })
        ));
        conn.cancel_resume("ch");
        assert!(!conn.resuming_any.load(Ordering::Acquire));
    }

    #[test]
    fn a_full_queue_leaves_the_direct_write_books_balanced() {
        let conn = handle(1);
        conn.deliver(&Bytes::from("a"), false, None, 0);
        conn.deliver(&Bytes::from("b"), false, None, 0);
        conn.reply(&ServerFrame::Unsubscribed {
            channel: "ch",
            id: None,
        });
        assert_eq!(conn.direct.on_books(), 2, "a and the reply; b was dropped");
        let two = Outgoing {
            frame: Bytes::from("d"),
            deflated: false,
            accepted_us: 0,
        };
        assert!(!conn.deliver_all(vec![two.clone(), two]));
        assert_eq!(
            conn.direct.on_books(),
            2,
            "a refused batch leaves nothing behind"
        );
        assert_eq!(queued(&conn), vec![Bytes::from("a")]);
    }
}
