//! Failover under load: 200 clients follow one channel with history while a backend publishes
//! 5,000 messages through another replica, and in the middle either their replica dies (SIGKILL)
//! or Redis restarts (SIGKILL, then again from its append-only file). Every client must end with
//! every message exactly once, in offset order, through reconnects and resumes with `since`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CLIENTS: usize = 200;
const MESSAGES: u64 = 5_000;
/// Messages per `POST /send` call (one call is one atomic publish).
const BATCH: u64 = 10;
/// Time between two calls: 500 calls take about 5 s.
const PACE: Duration = Duration::from_millis(10);
const CHANNEL: &str = "room:failover";
/// The 200-client tests take 15–25 s alone; on a loaded 2-core machine, more.
const CROWD_DEADLINE: Duration = Duration::from_secs(150);

/// An offset as `(epoch, entry id)`, to check the order (docs/history-and-resume.md:
/// `<epoch>:<stream entry id>`).
fn parse_offset(offset: &str) -> (String, (u64, u64)) {
    let (epoch, id) = offset.rsplit_once(':').expect("offset");
    let (ms, seq) = id.split_once('-').expect("entry id");
    (
        epoch.to_string(),
        (ms.parse().unwrap(), seq.parse().unwrap()),
    )
}

/// What one client received on the channel, in order; every message is checked to come after
/// the previous one as it arrives.
#[derive(Default)]
struct Received {
    seqs: Vec<u64>,
    offsets: Vec<String>,
    /// The `recovered` flag of each resume.
    resumes: Vec<bool>,
    /// Messages whose sequence number skipped ahead on a live connection: what the client
    /// missed without being able to notice (the test sees it because data = sequence number).
    unnoticed_gap: u64,
}

impl Received {
    fn last_offset(&self) -> Option<String> {
        self.offsets.last().cloned()
    }

    fn done(&self) -> bool {
        self.seqs.last() == Some(&(MESSAGES - 1))
    }

    /// Takes a `message` frame; panics unless its offset comes after the last one taken.
    fn take(&mut self, who: &str, frame: Frame) {
        assert!(
            frame.kind == "message" && frame.channel.as_deref() == Some(CHANNEL),
            "{who}: {frame:?}"
        );
        let offset = frame.offset.expect("offset");
        let seq = frame.data.expect("data is a sequence number");
        if let Some(last) = self.offsets.last() {
            let (prev_epoch, prev_id) = parse_offset(last);
            let (epoch, id) = parse_offset(&offset);
            assert!(
                epoch == prev_epoch && id > prev_id,
                "{who}: offset {offset} (seq {seq}) does not come after {last} (seq {:?})",
                self.seqs.last()
            );
        }
        self.seqs.push(seq);
        self.offsets.push(offset);
    }
}

/// Connects and reads the welcome frame; `None` while the replica does not accept.
async fn connect(url: &str) -> Option<Ws> {
    // tungstenite zeroes its whole read buffer before each socket read: 128 KiB by default,
    // which dominates 200 clients' CPU time in a debug build.
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false)
        .await
        .ok()?;
    let welcome = next_frame(&mut ws).await?;
    assert_eq!(welcome.kind, "welcome", "{welcome:?}");
    Some(ws)
}

/// The fields of a server frame this test looks at. A small struct rather than a
/// `serde_json::Value` keeps 200 clients' million frames affordable in a debug build.
#[derive(serde::Deserialize, Debug)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    channel: Option<String>,
    offset: Option<String>,
    data: Option<u64>,
    id: Option<String>,
    recovered: Option<bool>,
}

impl Frame {
    /// Reads a channel message the way the gateway writes it today, without a JSON parser;
    /// `None` for anything else, which is then parsed as JSON.
    fn message(text: &str) -> Option<Frame> {
        let rest =
            text.strip_prefix(r#"{"type":"message","channel":"room:failover","offset":""#)?;
        let (offset, rest) = rest.split_once('"')?;
        let data = rest.strip_prefix(r#","data":"#)?.strip_suffix('}')?;
        Some(Frame {
            kind: "message".into(),
            channel: Some(CHANNEL.into()),
            offset: Some(offset.into()),
            data: Some(data.parse().ok()?),
            id: None,
            recovered: None,
        })
    }
}

/// Fast-path messages read so far, to check one in 256 against the schema.
static SAMPLED: AtomicU64 = AtomicU64::new(0);

/// The next text frame; `None` when the connection ended (close, error or EOF). Fails after
/// [`PATIENCE`] without a frame.
async fn next_frame(ws: &mut Ws) -> Option<Frame> {
    loop {
        let next = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no frame within {PATIENCE:?}"));
        match next {
            Some(Ok(Message::Text(text))) => {
                // The fast path reads one literal shape; a sample of its frames and every
                // other frame are checked against docs/schema/server-frame.json.
                let frame = match Frame::message(&text) {
                    Some(frame) => {
                        if SAMPLED.fetch_add(1, Ordering::Relaxed) % 256 == 0 {
                            server_frame_json(&text);
                        }
                        frame
                    }
                    None => serde_json::from_value(server_frame_json(&text))
                        .unwrap_or_else(|e| panic!("{e}: {text}")),
                };
                // About messages without history (a Redis restart drops the pub/sub link);
                // this channel's history is what these tests check.
                if frame.kind == "missed" {
                    continue;
                }
                return Some(frame);
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => continue,
        }
    }
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send a frame");
}

/// Joins the channel (with `since` to resume) and takes the replayed messages; returns the
/// `subscribed` reply.
async fn join(ws: &mut Ws, who: &str, since: Option<String>, got: &mut Received) -> Frame {
    let mut frame = json!({"type": "subscribe", "channel": CHANNEL, "id": "join"});
    if let Some(since) = since {
        frame["since"] = Value::String(since);
    }
    send(ws, frame).await;
    loop {
        let frame = next_frame(ws)
            .await
            .unwrap_or_else(|| panic!("{who}: connection lost while joining"));
        if frame.kind == "subscribed" {
            assert_eq!(frame.id.as_deref(), Some("join"), "{who}: {frame:?}");
            return frame;
        }
        got.take(who, frame);
    }
}

/// Connects to `url`, retrying while it refuses, for at most [`PATIENCE`].
async fn connect_retrying(url: &str, who: &str) -> Ws {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(ws) = connect(url).await {
            return ws;
        }
        assert!(
            Instant::now() < deadline,
            "{who}: cannot reconnect to {url}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes a live message, noting a skipped sequence number (the client itself cannot).
fn take_live(who: &str, frame: Frame, got: &mut Received) {
    if let (Some(&last), Some(seq)) = (got.seqs.last(), frame.data) {
        got.unnoticed_gap += seq.saturating_sub(last + 1);
    }
    got.take(who, frame);
}

/// The 200 clients' counters: joined, and saw at least one message.
#[derive(Default)]
struct Crowd {
    joined: AtomicUsize,
    started: AtomicUsize,
}

/// Publishes sequence numbers 0..MESSAGES to the channel through `api`, `BATCH` per call, one
/// call every `PACE`; `sent` counts what was accepted. Returns each message's offset.
///
/// Without `retry` (Redis URL and key prefix) every call must be accepted. With it, a 503 that
/// says nothing was sent is sent again, and a 503 that says it may have been delivered is looked
/// up in the channel's history and sent again only if it is not there.
async fn publish(
    api: String,
    sent: Arc<AtomicU64>,
    retry: Option<(String, String)>,
) -> Publication {
    let url = format!("{api}/send");
    let mut out = Publication::default();
    let mut tick = tokio::time::interval(PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for first in (0..MESSAGES).step_by(BATCH as usize) {
        tick.tick().await;
        let body: Vec<Value> = (first..first + BATCH)
            .map(|seq| json!({"to": {"channel": CHANNEL}, "data": seq}))
            .collect();
        let body = Value::Array(body).to_string();
        loop {
            let (status, answer) = http("POST", &url, Some(&body), None).await;
            if status == 202 {
                let answer: Value = serde_json::from_str(&answer).unwrap();
                let offsets = answer["offsets"].as_array().expect("offsets");
                assert_eq!(offsets.len() as u64, BATCH, "{answer}");
                out.offsets.extend(
                    offsets
                        .iter()
                        .map(|o| Some(o.as_str().unwrap().to_string())),
                );
                break;
            }
            let (redis_url, prefix) = retry
                .as_ref()
                .unwrap_or_else(|| panic!("/send answered {status}: {answer}"));
            assert_eq!(status, 503, "{answer}");
            if answer.contains("nothing was sent") {
                // Redis certainly did not take the call: sending it again cannot duplicate.
                out.retried += 1;
            } else {
                // Redis may have taken it. Resolve it from the channel's history, which the
                // publish writes atomically with the PUBLISH: retry only if it is not there.
                assert!(answer.contains("may have been delivered"), "{answer}");
                out.ambiguous += 1;
                if in_history(redis_url, prefix, first).await {
                    out.ambiguous_taken += 1;
                    out.offsets.extend((0..BATCH).map(|_| None));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent.store(first + BATCH, Ordering::Relaxed);
    }
    out
}

#[derive(Default)]
struct Publication {
    /// By sequence number; `None` where the answer was lost (taken from the history instead).
    offsets: Vec<Option<String>>,
    /// Calls sent again after a 503 saying nothing was sent.
    retried: u64,
    /// 503s saying the call may have been delivered, and how many of those had been.
    ambiguous: u64,
    ambiguous_taken: u64,
}

/// The channel's history key, as the reference config documents it.
fn history_key(prefix: &str) -> String {
    format!("{prefix}:history:{{{CHANNEL}}}")
}

/// Stream entries as XRANGE returns them: (entry id, [(field, value)]).
type Entries = Vec<(String, Vec<(String, String)>)>;

/// The channel's history: (entry id, data) in order, once Redis answers.
async fn history(redis_url: &str, prefix: &str) -> Vec<(String, String)> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(mut conn) = conn_to(redis_url).await {
            let reply: redis::RedisResult<Entries> = redis::cmd("XRANGE")
                .arg(history_key(prefix))
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await;
            if let Ok(entries) = reply {
                return entries
                    .into_iter()
                    .map(|(id, fields)| {
                        let data = fields.into_iter().find(|(k, _)| k == "data").unwrap().1;
                        (id, data)
                    })
                    .collect();
            }
        }
        assert!(Instant::now() < deadline, "Redis does not answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether sequence number `seq` is in the channel's history.
async fn in_history(redis_url: &str, prefix: &str, seq: u64) -> bool {
    let seq = seq.to_string();
    history(redis_url, prefix)
        .await
        .iter()
        .any(|(_, data)| *data == seq)
}

/// Asserts that `seqs` is exactly 0..MESSAGES, describing the first difference.
fn assert_whole(client: usize, seqs: &[u64]) {
    if let Some(at) = (0..MESSAGES as usize).find(|&i| seqs.get(i) != Some(&(i as u64))) {
        let around = &seqs[at.saturating_sub(3)..(at + 3).min(seqs.len())];
        panic!(
            "client {client}: not every message exactly once in order: {} messages, the first \
             difference at index {at}: ... {around:?} ...",
            seqs.len()
        );
    }
    assert_eq!(
        seqs.len() as u64,
        MESSAGES,
        "client {client}: more than every message"
    );
}

/// Two replicas on one Redis, 200 clients on `a` joined to the channel, and the sequence
/// number each client has taken last (for the lag report).
struct Setup {
    a: Gateway,
    b: Gateway,
    crowd: Arc<Crowd>,
    last_seq: Arc<Vec<AtomicU64>>,
}

/// Waits until every client joined, starts the publisher on `b`, and waits until half the
/// messages are out and every client is receiving. Returns the publisher, its progress and the
/// largest lag of a client behind it at that moment.
async fn publish_half_way(
    setup: &Setup,
    retry: Option<(String, String)>,
) -> (tokio::task::JoinHandle<Publication>, Arc<AtomicU64>, u64) {
    let crowd = &setup.crowd;
    eventually_within("every client joined", Duration::from_secs(30), || async {
        crowd.joined.load(Ordering::Relaxed) == CLIENTS
    })
    .await;
    let sent = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn(publish(setup.b.api_url.clone(), sent.clone(), retry));
    eventually_within(
        "half the messages out, every client receiving",
        Duration::from_secs(40),
        || async {
            sent.load(Ordering::Relaxed) >= MESSAGES / 2
                && crowd.started.load(Ordering::Relaxed) == CLIENTS
        },
    )
    .await;
    let out = sent.load(Ordering::Relaxed);
    let slowest = setup
        .last_seq
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .min()
        .unwrap();
    (publisher, sent, out.saturating_sub(slowest + 1))
}

async fn start_replicas(redis: &Redis, prefix: &str) -> Setup {
    // The harness's settings (a 1 s command timeout, tighter than the 2 s default): 200 clients
    // resuming at once must be made whole without giving Redis more time.
    let config = with_history(redis, prefix, 10_000);
    let a = Gateway::spawn(&config, prefix, &[]);
    let b = Gateway::spawn(&config, prefix, &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    Setup {
        a,
        b,
        crowd: Arc::new(Crowd::default()),
        last_seq: Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect()),
    }
}

/// Takes a live frame for client `n` and publishes its progress.
fn take_counted(
    n: usize,
    who: &str,
    frame: Frame,
    got: &mut Received,
    setup: (&Crowd, &[AtomicU64]),
) {
    take_live(who, frame, got);
    let (crowd, last_seq) = setup;
    if got.seqs.len() == 1 {
        crowd.started.fetch_add(1, Ordering::Relaxed);
    }
    last_seq[n].store(*got.seqs.last().unwrap(), Ordering::Relaxed);
}

/// Replica A dies (SIGKILL) in the middle of a steady stream published through B. Its 200
/// clients notice the dropped connection, reconnect to B, resume with the last offset they saw
/// and are told `recovered: true`; in the end each got every message exactly once, in order, with
/// the offsets the publisher was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_replica_resume_on_another_without_gap_or_duplicate() {
    deadline(CROWD_DEADLINE, async {
        let started_at = Instant::now();
        let redis = Redis::start();
        let prefix = unique_prefix("failover-kill");
        let setup = start_replicas(&redis, &prefix).await;

        let mut clients = Vec::new();
        for n in 0..CLIENTS {
            let (first, second) = (setup.a.ws_url.clone(), setup.b.ws_url.clone());
            let (crowd, last_seq) = (setup.crowd.clone(), setup.last_seq.clone());
            clients.push(tokio::spawn(async move {
                let who = format!("client {n}");
                let mut got = Received::default();
                let mut ws = connect_retrying(&first, &who).await;
                let joined = join(&mut ws, &who, None, &mut got).await;
                assert_eq!(joined.recovered, None, "{who}: {joined:?}");
                crowd.joined.fetch_add(1, Ordering::Relaxed);
                while !got.done() {
                    match next_frame(&mut ws).await {
                        Some(frame) => take_counted(n, &who, frame, &mut got, (&crowd, &last_seq)),
                        None => {
                            // The replica is gone: resume on the other one.
                            assert!(got.resumes.is_empty(), "{who}: dropped twice");
                            let since = got.last_offset().expect("a message before the kill");
                            ws = connect_retrying(&second, &who).await;
                            let joined = join(&mut ws, &who, Some(since), &mut got).await;
                            got.resumes.push(joined.recovered == Some(true));
                        }
                    }
                }
                got
            }));
        }

        let (publisher, sent, lag) = publish_half_way(&setup, None).await;
        setup.a.signal("-KILL");
        let killed_at = sent.load(Ordering::Relaxed);
        let published = publisher.await.unwrap();
        assert!(killed_at < MESSAGES, "A must die mid-stream");

        let offsets: Vec<String> = published.offsets.into_iter().map(Option::unwrap).collect();
        for (n, client) in clients.into_iter().enumerate() {
            let got = client.await.unwrap();
            assert_eq!(got.resumes, [true], "client {n}: one resume, recovered");
            assert_whole(n, &got.seqs);
            assert!(
                got.offsets == offsets,
                "client {n}: offsets differ from the publisher's"
            );
            assert_eq!(got.unnoticed_gap, 0, "client {n}");
        }
        let b = &setup.b;
        assert_eq!(
            b.metric("wsbridge_resumes_total{recovered=\"true\"}").await,
            CLIENTS as f64
        );
        assert_eq!(
            b.metric("wsbridge_delivery_dropped_total{reason=\"queue_full\"}")
                .await,
            0.0
        );
        eprintln!(
        "replica killed after {killed_at} of {MESSAGES} messages (slowest client {lag} behind): \
         {CLIENTS} clients whole after {:.1} s",
        started_at.elapsed().as_secs_f64()
    );
    })
    .await;
}

/// Redis is killed (SIGKILL) in the middle of the stream and started again on the same port from
/// its append-only file (`appendfsync always`: it keeps every write it acknowledged, the channel's
/// history and its epoch included). The 200 clients stay connected to replica A and do nothing
/// about the outage: A's pub/sub link reconnects and A catches its channels up from the history
/// (messages published after Redis was back but before A's link had resubscribed never reached A
/// live, and offsets are not consecutive, so a client could not see that gap itself). The
/// publisher sends a call again only when the 503 said nothing was sent, or when the history
/// shows that a "may have been delivered" call was not taken. Every client ends with every
/// message exactly once, in order, with the offsets in the history, and its live stream never
/// skipped a message.
///
/// Redis kept every write, so the history can always fill the gap: no client may be told
/// `recovered: false` (an unsolicited `subscribed`), and A must have caught the channel up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stay_connected_through_a_redis_restart_and_miss_nothing() {
    deadline(CROWD_DEADLINE, async {
        let started_at = Instant::now();
        let mut redis = Redis::start_with_aof();
        let prefix = unique_prefix("failover-redis");
        let setup = start_replicas(&redis, &prefix).await;

        let mut clients = Vec::new();
        for n in 0..CLIENTS {
            let url = setup.a.ws_url.clone();
            let (crowd, last_seq) = (setup.crowd.clone(), setup.last_seq.clone());
            clients.push(tokio::spawn(async move {
                let who = format!("client {n}");
                let mut got = Received::default();
                let mut ws = connect_retrying(&url, &who).await;
                join(&mut ws, &who, None, &mut got).await;
                crowd.joined.fetch_add(1, Ordering::Relaxed);
                while !got.done() {
                    let frame = next_frame(&mut ws).await.unwrap_or_else(|| {
                        panic!("{who}: lost its connection to A; it must survive the Redis restart")
                    });
                    // An unsolicited `subscribed` says the replica could not fill a gap: with the
                    // history intact, that is the gateway's own catch-up failing.
                    assert_ne!(
                        frame.kind, "subscribed",
                        "{who}: told {frame:?} although Redis kept the whole history"
                    );
                    take_counted(n, &who, frame, &mut got, (&crowd, &last_seq));
                }
                got
            }));
        }

        let retry = Some((redis.url(), prefix.clone()));
        let (publisher, sent, lag) = publish_half_way(&setup, retry).await;
        let a = &setup.a;
        redis.kill();
        let killed_at = sent.load(Ordering::Relaxed);
        // Keep Redis down until A notices (/readyz 503), as in a real outage, then bring it back.
        eventually("A reports Redis down", || async {
            a.readyz().await.0 == 503
        })
        .await;
        redis.restart();
        eventually("A ready again", || async { a.readyz().await.0 == 200 }).await;
        let published = publisher.await.unwrap();
        assert!(killed_at < MESSAGES, "Redis must restart mid-stream");
        assert!(
            published.retried + published.ambiguous > 0,
            "the publisher must have met the outage"
        );

        // The history, which survived the restart, holds every message once, in order; its entry
        // ids (under one epoch) are the offsets everyone must have seen.
        let history = history(&redis.url(), &prefix).await;
        let data: Vec<String> = history.iter().map(|(_, d)| d.clone()).collect();
        let expected_data: Vec<String> = (0..MESSAGES).map(|n| n.to_string()).collect();
        assert!(
            data == expected_data,
            "the history does not hold every message exactly once, in order"
        );
        let first = published.offsets.iter().flatten().next().unwrap();
        let (epoch, _) = parse_offset(first);
        let offsets: Vec<String> = history
            .iter()
            .map(|(id, _)| format!("{epoch}:{id}"))
            .collect();
        for (seq, offset) in published.offsets.iter().enumerate() {
            if let Some(offset) = offset {
                assert_eq!(
                    *offset, offsets[seq],
                    "seq {seq}: the publisher was told another offset"
                );
            }
        }

        for (n, client) in clients.into_iter().enumerate() {
            let got = client.await.unwrap();
            assert_whole(n, &got.seqs);
            assert!(
                got.offsets == offsets,
                "client {n}: offsets differ from the history's"
            );
            assert_eq!(
                got.unnoticed_gap, 0,
                "client {n}: its live stream skipped messages"
            );
        }
        a.caught_up().await;
        let caught_up = a
            .metric("wsbridge_catch_ups_total{recovered=\"true\"}")
            .await;
        let not_caught_up = a
            .metric("wsbridge_catch_ups_total{recovered=\"false\"}")
            .await;
        assert_eq!(
            not_caught_up, 0.0,
            "a catch-up failed with the history intact"
        );
        assert!(
            caught_up >= 1.0,
            "A must have caught the channel up after its link came back"
        );
        eprintln!(
        "Redis restarted after {killed_at} of {MESSAGES} messages (slowest client {lag} behind); \
         publisher: {} calls sent again after a nothing-sent 503, {} may-have-been 503s ({} of \
         them taken); A caught up {caught_up} times; {CLIENTS} clients whole after {:.1} s",
        published.retried,
        published.ambiguous,
        published.ambiguous_taken,
        started_at.elapsed().as_secs_f64()
    );
    })
    .await;
}

/// The next data frame within `wait` (longer than [`Client::recv`]'s patience).
async fn frame_within(client: &mut Client, wait: Duration, what: &str) -> Value {
    tokio::time::timeout(wait, client.next_frame())
        .await
        .unwrap_or_else(|_| panic!("no frame within {wait:?}: {what}"))
        .expect("the connection stays open")
        .expect("a data frame, not a close")
}

/// Asserts that `frame` ends a resume made with frame id `id`, and that it recovered.
fn assert_recovered(frame: &Value, id: &str) {
    assert_eq!(
        (&frame["type"], &frame["id"], &frame["recovered"]),
        (&json!("subscribed"), &json!(id), &json!(true)),
        "{frame}"
    );
}

/// A `subscribe` frame resuming `channel` from `since`.
fn resume(channel: &str, since: &Value, id: &str) -> Value {
    json!({"type": "subscribe", "channel": channel, "since": since, "id": id})
}

/// Two clients on a history channel, the first of which saw three messages; returns the
/// replica, the second client (not subscribed yet) and the three offsets.
async fn three_messages_seen(redis: &Redis, prefix: &str) -> (Gateway, Client, Client, Vec<Value>) {
    let gw = Gateway::spawn(&with_history(redis, prefix, 100), prefix, &[]);
    gw.wait_ready().await;
    let mut first = Client::connect(&gw).await;
    first.subscribe("room:outage").await;
    let second = Client::connect(&gw).await;
    let (status, answer) = gw
        .post(
            "/send",
            &json!([1, 2, 3]
                .iter()
                .map(|n| json!({"to": {"channel": "room:outage"}, "data": n}))
                .collect::<Vec<_>>()),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let offsets = answer["offsets"].as_array().unwrap().clone();
    for n in 1..=3 {
        assert_eq!(first.recv().await["data"], n);
    }
    (gw, first, second, offsets)
}

/// The number of failed attempts the replica has logged for history reads.
fn failed_reads(gw: &Gateway) -> usize {
    gw.log_text()
        .matches("history read failed; trying again")
        .count()
}

/// A client resumes while Redis is down (killed; it comes back from its append-only file, so
/// the history is intact). The replica cannot tell yet what the history holds, so it keeps
/// trying rather than answer: once Redis is back, the client gets what it missed and
/// `recovered: true`, never `recovered: false`.
#[tokio::test]
async fn a_resume_made_while_redis_is_down_is_answered_once_redis_is_back() {
    deadline(TEST_DEADLINE, async {
        let mut redis = Redis::start_with_aof();
        let prefix = unique_prefix("resume-outage");
        let (gw, _first, mut second, offsets) = three_messages_seen(&redis, &prefix).await;

        redis.kill();
        second.send(resume("room:outage", &offsets[0], "r")).await;
        // Keep Redis down well past the first failures (six attempts take about 2.5 s), then
        // bring it back.
        eventually("the resume's history read failed six times", || async {
            failed_reads(&gw) >= 6
        })
        .await;
        redis.restart();

        for n in [2, 3] {
            let wait = Duration::from_secs(30);
            let frame = frame_within(&mut second, wait, "the replay once Redis is back").await;
            assert_eq!(
                (&frame["type"], &frame["data"], &frame["offset"]),
                (&json!("message"), &json!(n), &offsets[n - 1]),
                "{frame}"
            );
        }
        assert_recovered(&second.recv().await, "r");
        assert_eq!(
            gw.metric("wsbridge_resumes_total{recovered=\"false\"}")
                .await,
            0.0
        );
    })
    .await;
}

/// Redis stays down longer than a resume waits (10 s): the client is told `redis_unavailable`
/// for its subscribe, not `recovered: false`, and is not in the channel. Subscribing again with
/// the same `since` once Redis is back replays everything it missed.
#[tokio::test]
async fn a_resume_redis_cannot_answer_is_refused_as_unavailable_not_as_lost() {
    deadline(TEST_DEADLINE, async {
        let mut redis = Redis::start_with_aof();
        let prefix = unique_prefix("resume-refused");
        let (gw, mut first, mut second, offsets) = three_messages_seen(&redis, &prefix).await;

        redis.kill();
        second.send(resume("room:outage", &offsets[0], "r")).await;
        let answer = frame_within(&mut second, Duration::from_secs(30), "the refusal").await;
        assert_eq!(
            (&answer["type"], &answer["id"], &answer["code"]),
            (&json!("error"), &json!("r"), &json!("redis_unavailable")),
            "{answer}"
        );
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("subscribe again"),
            "{answer}"
        );

        // Not in the channel: a message published now reaches the first client only, and the
        // second gets it through its new resume, after 2 and 3, exactly once.
        redis.restart();
        gw.wait_ready().await;
        gw.send(json!({"to": {"channel": "room:outage"}, "data": 4}))
            .await;
        assert_eq!(first.recv().await["data"], 4);
        second
            .send(resume("room:outage", &offsets[0], "again"))
            .await;
        for n in [2, 3, 4] {
            let frame = second.recv().await;
            assert_eq!(
                (&frame["type"], &frame["data"]),
                (&json!("message"), &json!(n)),
                "{frame}"
            );
        }
        assert_recovered(&second.recv().await, "again");
        assert_eq!(
            gw.metric("wsbridge_resumes_total{recovered=\"false\"}")
                .await,
            0.0
        );
    })
    .await;
}

/// A resume that missed more than one page of history (the replica reads 500 entries per round
/// trip): every missed message comes back once, in order, then `recovered: true`.
#[tokio::test]
async fn a_resume_that_missed_many_pages_gets_all_of_them_in_order() {
    deadline(TEST_DEADLINE, async {
        const MISSED: u64 = 1_234;
        let redis = Redis::start();
        let prefix = unique_prefix("resume-pages");
        let gw = Gateway::spawn(&with_history(&redis, &prefix, 5_000), &prefix, &[]);
        gw.wait_ready().await;
        let (status, answer) = gw
            .post(
                "/send",
                &json!({"to": {"channel": "room:pages"}, "data": "first"}),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        let since = answer["offsets"][0].clone();
        let mut offsets = Vec::new();
        for chunk in (0..MISSED).collect::<Vec<_>>().chunks(400) {
            let body: Vec<Value> = chunk
                .iter()
                .map(|n| json!({"to": {"channel": "room:pages"}, "data": n}))
                .collect();
            let (status, answer) = gw.post("/send", &Value::Array(body)).await;
            assert_eq!(status, 202, "{answer}");
            offsets.extend(answer["offsets"].as_array().unwrap().iter().cloned());
        }

        let mut client = Client::connect(&gw).await;
        client.send(resume("room:pages", &since, "r")).await;
        for (n, offset) in offsets.iter().enumerate() {
            let frame = client.recv().await;
            assert_eq!(
                (&frame["type"], &frame["data"], &frame["offset"]),
                (&json!("message"), &json!(n), offset),
                "replayed message {n}"
            );
        }
        assert_recovered(&client.recv().await, "r");
    })
    .await;
}
