//! Appends client frames and lifecycle events to Redis Streams.
//!
//! Every connection hands its appends to one bounded queue; a single task drains whatever is
//! waiting (up to `inbound.append_batch_max`) into one pipeline on the shared multiplexed link.
//! Entries therefore keep each connection's order, many connections share round trips, and a
//! full queue refuses the frame with `overloaded` instead of growing.

use std::pin::pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backplane::{Backplane, RedisFailure};
use crate::connection::OwedAnswer;
use crate::inbound::keeper::{Keeper, KeptEntry};
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, FrameId, ServerFrame};

/// Who gets told how an append went.
pub struct AppendReply {
    /// The connection that sent the frame, which is owed the ack or error until this is
    /// dropped (after the answer is queued).
    pub answer: OwedAnswer,
    /// Its frame id.
    pub id: Option<FrameId>,
    /// Stream name, for the per-stream counter.
    pub stream: String,
}

/// Who is told how an append went.
pub enum Answer {
    /// A client `send`: the `ack` or error frame goes to the connection.
    Client(AppendReply),
    /// A client `publish` to a channel with a `publish_stream`: the task publishing it waits
    /// for the entry id (or why there is none) before it publishes.
    Waiter {
        /// Stream name, for the per-stream counter.
        stream: String,
        /// Gets the entry id, or a sentence saying why it was not stored.
        done: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
}

/// One XADD waiting to be sent.
pub struct AppendRequest {
    /// Stream key.
    pub key: Arc<str>,
    /// `MAXLEN ~` bound.
    pub max_len: u64,
    /// Entry fields, in order.
    pub fields: Vec<(&'static str, Bytes)>,
    /// For client frames: who is told how it went. `None` for lifecycle events.
    pub reply: Option<Answer>,
    /// When the frame was read.
    pub started: Instant,
    /// For client frames with an id: the key remembering the entry it produced, and for how
    /// many seconds. A resend within the window is acked with the original entry.
    pub dedupe: Option<(String, u64)>,
}

/// Appends once per frame id: returns the entry a previous append with the same id produced,
/// else appends and remembers the new entry for the window. One round trip, atomic.
///
/// KEYS: stream, dedupe key. ARGV: MAXLEN, window seconds, then field/value pairs.
const APPEND_ONCE: &str = r#"
local existing = redis.call('GET', KEYS[2])
if existing then
  return existing
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
return id
"#;

/// The sending side of the append queue.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<AppendRequest>,
}

impl Appender {
    /// Creates the queue; run [`run`] with the receiver.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<AppendRequest>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, rx)
    }

    /// Queues an append without waiting.
    ///
    /// # Errors
    /// Gives the request back when the queue is full or the appender has stopped.
    #[allow(clippy::result_large_err)]
    pub fn try_submit(&self, request: AppendRequest) -> Result<(), AppendRequest> {
        self.tx.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
        })
    }
}

/// Drains the queue into pipelines. After `stop`, new appends are refused and what is already
/// queued is still sent, then the task ends.
///
/// `give_up` is the drain's last call for answers: every append pending at that moment (sent
/// and waiting for Redis, or still queued) is answered at once with `redis_unavailable` (lifecycle
/// events are counted as failed), so the connections waiting for those answers can close.
/// Appends queued later are sent as usual.
pub async fn run(
    mut rx: mpsc::Receiver<AppendRequest>,
    backplane: Backplane,
    metrics: Metrics,
    batch_max: usize,
    confirmation: Confirmation,
    stop: CancellationToken,
    give_up: CancellationToken,
) {
    let confirmation = &confirmation;
    let mut batch = Vec::with_capacity(batch_max);
    let mut groups: Vec<Vec<AppendRequest>> = Vec::new();
    let mut stopping = false;
    let mut gave_up = false;
    loop {
        let received = tokio::select! {
            biased;
            _ = give_up.cancelled(), if !gave_up => {
                gave_up = true;
                abandon(&mut rx, [], &metrics);
                continue;
            }
            received = rx.recv_many(&mut batch, batch_max) => received,
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                rx.close();
                continue;
            }
        };
        if received == 0 {
            return;
        }
        if backplane.is_cluster() {
            // A pipeline must stay in one slot: one per stream (its dedupe keys share its slot),
            // all in flight together. Each connection's entries in a stream keep their order.
            groups.clear();
            for request in batch.drain(..) {
                match groups.iter_mut().find(|g| g[0].key == request.key) {
                    Some(group) => group.push(request),
                    None => groups.push(vec![request]),
                }
            }
        }
        // `append` takes requests out of their vector only once Redis answered, so when the
        // drain gives up midway, what is left there is exactly what was sent and not answered.
        let answered = {
            let appends = pin!(async {
                if backplane.is_cluster() {
                    let appends = groups
                        .iter_mut()
                        .map(|group| append(group, &backplane, &metrics, confirmation));
                    futures_util::future::join_all(appends).await;
                } else {
                    // The batch's buffer is kept for the next round.
                    append(&mut batch, &backplane, &metrics, confirmation).await;
                }
            });
            if gave_up {
                appends.await;
                true
            } else {
                tokio::select! {
                    biased;
                    () = appends => true,
                    () = give_up.cancelled() => false,
                }
            }
        };
        if !answered {
            gave_up = true;
            let sent = batch
                .drain(..)
                .chain(groups.iter_mut().flat_map(|g| g.drain(..)));
            abandon(&mut rx, sent, &metrics);
        }
    }
}

/// Answers the appends `sent` (may have been stored) and those still queued in `rx` (not stored)
/// as not confirmed, because the drain cannot wait for Redis any longer.
fn abandon(
    rx: &mut mpsc::Receiver<AppendRequest>,
    sent: impl IntoIterator<Item = AppendRequest>,
    metrics: &Metrics,
) {
    let in_flight = Failure(
        "the replica is shutting down and Redis did not confirm the append in time; it may have \
         been stored: resend with the same id, and backends can drop the duplicate by user (or \
         connection) and id"
            .to_owned(),
    );
    let queued = Failure(
        "the replica is shutting down and Redis did not take the append in time: not stored; \
         resend with the same id"
            .to_owned(),
    );
    let (mut sends, mut events) = (0usize, 0usize);
    let mut answer = |request: AppendRequest, failure: &Failure| {
        if request.reply.is_some() {
            sends += 1;
        } else {
            events += 1;
        }
        finish::<Failure>(request, Err(failure.clone()), metrics);
    };
    for request in sent {
        answer(request, &in_flight);
    }
    while let Ok(request) = rx.try_recv() {
        answer(request, &queued);
    }
    if sends + events > 0 {
        tracing::warn!(
            sends,
            events,
            "drain: appends Redis had not confirmed in time were answered as not confirmed"
        );
    }
}

/// What an ack waits for besides the primary taking the append; one of these, decided at start
/// (`redis.wait_replicas`, `inbound.keep_unconfirmed_entries`).
#[derive(Clone)]
pub enum Confirmation {
    /// Nothing more (on a Redis Cluster, or with both settings 0).
    None,
    /// `WAIT`: acked once that many replicas hold it.
    Wait(Replicated),
    /// Acked at once; a copy is kept until Redis's replicas hold it ([`Keeper`]).
    Keep(Keeper),
}

/// How many replicas must hold an append before it is acknowledged (`redis.wait_replicas`),
/// and how long to wait for them (`redis.wait_timeout_ms`).
#[derive(Debug, Clone, Copy)]
pub struct Replicated {
    /// 0: acknowledged once the primary took it.
    pub replicas: u32,
    /// The longest `WAIT`.
    pub timeout_ms: u64,
}

/// Appends `requests` in one pipeline and answers each, leaving `requests` empty. With
/// [`Confirmation::Wait`], one `WAIT` follows the pipeline (on the connection that carried
/// it): the appends it stored are acknowledged only when that many replicas hold them, and are
/// otherwise answered as "may have been stored". With [`Confirmation::Keep`], a copy of each
/// acked entry is kept until Redis's replicas hold it.
async fn append(
    requests: &mut Vec<AppendRequest>,
    backplane: &Backplane,
    metrics: &Metrics,
    confirmation: &Confirmation,
) {
    let keeper = match confirmation {
        Confirmation::Keep(keeper) => Some(keeper),
        _ => None,
    };
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for request in requests.iter() {
        let cmd = match &request.dedupe {
            Some((key, window)) => pipe
                .cmd("EVAL")
                .arg(APPEND_ONCE)
                .arg(2)
                .arg(&*request.key)
                .arg(key)
                .arg(request.max_len)
                .arg(*window),
            None => pipe
                .cmd("XADD")
                .arg(&*request.key)
                .arg("MAXLEN")
                .arg("~")
                .arg(request.max_len)
                .arg("*"),
        };
        for (name, value) in &request.fields {
            cmd.arg(*name).arg(&value[..]);
        }
    }
    let results: Result<Vec<redis::RedisResult<String>>, RedisFailure> =
        backplane.query_pipeline(&pipe).await;
    match results {
        Ok(results) => {
            let stored = results.iter().any(Result::is_ok);
            let not_replicated = match (requests.first(), confirmation) {
                (Some(first), Confirmation::Wait(replicated)) if stored => backplane
                    .wait_replicas(&first.key, replicated.replicas, replicated.timeout_ms)
                    .await
                    .err()
                    .map(|e| {
                        tracing::debug!(error = %e, entries = requests.len(), "stream appends not replicated in time");
                        Failure::from(e)
                    }),
                _ => None,
            };
            let mut kept = Vec::new();
            for (mut request, result) in requests.drain(..).zip(results) {
                if let (Some(failure), Ok(_)) = (&not_replicated, &result) {
                    finish::<Failure>(request, Err(failure.clone()), metrics);
                    continue;
                }
                let result = result.map_err(RedisFailure::from);
                match &result {
                    Err(e) => metrics.redis_error(e.kind()).increment(1),
                    Ok(entry) if keeper.is_some() && request.reply.is_some() => {
                        kept.push(KeptEntry {
                            key: request.key.clone(),
                            entry: entry.clone(),
                            max_len: request.max_len,
                            fields: std::mem::take(&mut request.fields),
                            dedupe: request.dedupe.take(),
                        });
                    }
                    Ok(_) => {}
                }
                finish(request, result, metrics);
            }
            if let Some(keeper) = keeper.filter(|_| !kept.is_empty()) {
                keeper.keep(kept);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, entries = requests.len(), "stream append failed");
            let failure = Failure::from(e);
            for request in requests.drain(..) {
                finish::<Failure>(request, Err(failure.clone()), metrics);
            }
        }
    }
}

#[derive(Clone)]
struct Failure(String);

impl From<RedisFailure> for Failure {
    fn from(e: RedisFailure) -> Self {
        if e.maybe_applied() {
            Failure(format!(
                "Redis did not confirm the append ({e}); it may have been stored: resend with the \
                 same id, and backends can drop the duplicate by connection and id"
            ))
        } else {
            Failure(format!("not stored ({e}); resend with the same id"))
        }
    }
}

fn finish<E: Into<Failure>>(request: AppendRequest, result: Result<String, E>, metrics: &Metrics) {
    let Some(reply) = request.reply else {
        if result.is_err() {
            metrics.events_failed.increment(1);
        }
        return;
    };
    let reply = match reply {
        Answer::Client(reply) => reply,
        Answer::Waiter { stream, done } => {
            if result.is_ok() {
                metrics.inbound(&stream).increment(1);
            }
            let _ = done.send(result.map_err(|e| e.into().0));
            return;
        }
    };
    match result {
        Ok(entry) => {
            metrics
                .stream_append_seconds
                .record(request.started.elapsed().as_secs_f64());
            metrics.inbound(&reply.stream).increment(1);
            reply.answer.conn().reply(&ServerFrame::Ack {
                id: reply.id.as_ref(),
                entry: &entry,
            });
        }
        Err(e) => {
            let Failure(message) = e.into();
            metrics.rejected(ErrorCode::RedisUnavailable).increment(1);
            reply.answer.conn().reply(&ServerFrame::Error {
                id: reply.id.as_ref(),
                code: ErrorCode::RedisUnavailable.as_str(),
                message: &message,
            });
        }
    }
}
