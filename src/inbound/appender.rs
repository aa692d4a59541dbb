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
use crate::inbound::dedupe::DedupeId;
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
    /// For client frames with an id (and the window on): the id, remembered with the entry it
    /// produced for the window. A resend within the window is acked with the original entry.
    pub dedupe: Option<DedupeId>,
}

/// Appends a run of a stream's entries that have frame ids in one call, each once per frame id
/// ([`super::dedupe`]): an entry whose id a bucket of the window holds gets the entry it
/// remembers, and so does an id repeated within the run (the first one's entry); the others are
/// appended and their ids written into the current bucket with one `HSET`. Returns the entry
/// ids in order. Atomic; one call for the run instead of one per entry saves Redis a script call
/// per entry, and one hash field per id instead of a key with its own expiry halves what the id
/// costs (`bench/inbound_redis.sh`). Entries without a frame id are plain XADDs.
///
/// KEYS: the stream. ARGV: MAXLEN, the buckets' key prefix, the window in ms, the number of
/// entries, then per entry: its dedupe field, its number of field/value arguments, and those.
const APPEND_BATCH: &str = concat!(
    super::dedupe::dedupe_lua!(),
    r#"
local maxlen, prefix, window, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local buckets, expires = dedupe_buckets(prefix, window)
local fields = {}
local a = 5
for i = 1, n do
  fields[i] = ARGV[a]
  a = a + 2 + tonumber(ARGV[a + 1])
end
local known = {}
for b = 1, #buckets do
  local found = redis.call('HMGET', buckets[b], unpack(fields))
  for i = 1, n do
    if found[i] and not known[i] then
      known[i] = found[i]
    end
  end
end
local ids, first, new = {}, {}, {}
a = 5
for i = 1, n do
  local field, count = ARGV[a], tonumber(ARGV[a + 1])
  local id = known[i] or first[field]
  if not id then
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, a + 2, a + 1 + count))
    first[field] = id
    new[#new + 1] = field
    new[#new + 1] = id
  end
  ids[i] = id
  a = a + 2 + count
end
if #new > 0 then
  redis.call('HSET', buckets[1], unpack(new))
  redis.call('PEXPIREAT', buckets[1], expires)
end
return ids
"#
);

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
    // The calls, each a run of request indices: an entry without a frame id is a plain XADD
    // (a call of one), and a stream's consecutive entries with one (and the same window) share a script call. Calls
    // go out in one pipeline, each stream's in the order its entries came (a batch mixes
    // streams only on a single Redis).
    let mut streams: Vec<Vec<usize>> = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        match streams
            .iter_mut()
            .find(|s| requests[s[0]].key == request.key)
        {
            Some(stream) => stream.push(i),
            None => streams.push(vec![i]),
        }
    }
    let mut calls: Vec<Vec<usize>> = Vec::new();
    for stream in &streams {
        for &i in stream {
            match calls.last_mut() {
                Some(run)
                    if requests[i].dedupe.as_ref().is_some_and(|d| {
                        requests[run[0]]
                            .dedupe
                            .as_ref()
                            .is_some_and(|r| r.window_seconds == d.window_seconds)
                    }) && requests[run[0]].key == requests[i].key =>
                {
                    run.push(i)
                }
                _ => calls.push(vec![i]),
            }
        }
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in &calls {
        let first = &requests[call[0]];
        let Some(dedupe) = &first.dedupe else {
            let cmd = pipe
                .cmd("XADD")
                .arg(&*first.key)
                .arg("MAXLEN")
                .arg("~")
                .arg(first.max_len)
                .arg("*");
            for (name, value) in &first.fields {
                cmd.arg(*name).arg(&value[..]);
            }
            continue;
        };
        // The run shares the first entry's stream and window (how runs are cut, above).
        let cmd = pipe
            .cmd("EVAL")
            .arg(APPEND_BATCH)
            .arg(1)
            .arg(&*first.key)
            .arg(first.max_len)
            .arg(&dedupe.buckets)
            .arg(dedupe.window_ms())
            .arg(call.len());
        for &i in call {
            let request = &requests[i];
            let field = request.dedupe.as_ref().map_or("", |d| d.field.as_str());
            cmd.arg(field).arg(2 * request.fields.len());
            for (name, value) in &request.fields {
                cmd.arg(*name).arg(&value[..]);
            }
        }
    }
    let answers: Result<Vec<redis::RedisResult<redis::Value>>, RedisFailure> =
        backplane.query_pipeline(&pipe).await;
    // Back to one result per request, in the requests' order.
    let results = answers.map(|answers| {
        let mut results: Vec<Option<redis::RedisResult<String>>> =
            (0..requests.len()).map(|_| None).collect();
        for (call, answer) in calls.iter().zip(answers) {
            let ids = answer.and_then(|value| {
                let ids: Vec<String> = if requests[call[0]].dedupe.is_none() {
                    vec![redis::from_redis_value(value)?]
                } else {
                    redis::from_redis_value(value)?
                };
                if ids.len() == call.len() {
                    Ok(ids)
                } else {
                    Err(redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "append script",
                        format!("{} entry ids for {} entries", ids.len(), call.len()),
                    )))
                }
            });
            match ids {
                Ok(ids) => {
                    for (&i, id) in call.iter().zip(ids) {
                        results[i] = Some(Ok(id));
                    }
                }
                Err(e) => {
                    for &i in call {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every request is in one call"))
            .collect::<Vec<_>>()
    });
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
