//! wsbridge's load generator: many real WebSocket clients against one or more gateway replicas
//! (wsbridge, or socket.io and nchan for comparison, or the floor: examples/floor.rs, raw
//! writes of the same frames), a publisher at a fixed rate or in a
//! burst, and exact accounting of what every client got.
//!
//! ```text
//! cargo run --release --example loadgen -- --target wsbridge --scenario fanout \
//!     --ws ws://127.0.0.1:8080/ws,ws://127.0.0.1:8090/ws --api http://127.0.0.1:8091 \
//!     --clients 1000 --messages 400 --rate 20 --pids 1234,1235 --json out.json
//! ```
//!
//! Scenarios (`--scenario`):
//! - `fanout`: every client joins `--channel`; `--messages` messages are published to it at
//!   `--rate` messages/s (0: as fast as the publisher goes), `--batch` per call.
//! - `direct`: `--messages` rounds, each one message to every connection by its id (wsbridge,
//!   socket.io), `--batch` per call, `--rate` rounds/s.
//! - `user`: as `direct`, addressed to users (wsbridge; needs `--jwt-secret`).
//! - `rooms`: `--rooms-per-endpoint` K channels per endpoint (`<channel>:<i>:<k>` for the i-th
//!   `--ws`), joined by the clients connected there, so each channel's members sit on one
//!   replica; `--messages` rounds, each one message to every room, `--batch` per call, `--rate`
//!   rounds/s (wsbridge). The case where broadcast routing makes every other replica receive and
//!   filter each message.
//!
//! With `--jwt-secret` (the gateway's `auth.jwt_secret`), client n authenticates as user `u<n>`
//! with an HS256 token.
//! - `inbound`: every client sends `--messages` frames to the stream `--stream` (chat), at most
//!   `--window` unacknowledged at a time; counts acks (an error frame fails the run). socket.io:
//!   emits with an ack callback, which the peer calls once it stored the message.
//! - `idle`: clients connect and join, then sit for `--settle-ms`; reports RSS per connection.
//! - `churn`, `storm`, `kill`, `query`: presence (wsbridge; see presence.rs): CPU per join,
//!   convergence and join events in a connection storm, leaves after a replica is killed,
//!   `POST /presence` latency.
//! - `wire`, `wire-idle`, `publish`: permessage-deflate and client publish (wire.rs; wsbridge and
//!   socket.io): bytes read off the sockets per delivery with `--deflate` offered or not, RSS per
//!   connection with compression negotiated, latency of a client's message to the other
//!   clients (`--publish-via client|stream`).
//!
//! Several load generators can share one run (more connections than one process may open):
//! with `--ready-file F` each writes F once its clients have joined and seen the warm-up, then
//! with `--go-file G` waits for G to exist before the measured part; `--receive-only` (fanout)
//! publishes nothing measured and expects `--messages` per client from the one that does. A run
//! with `--go-file` stamps messages with the wall clock (µs since 1970), so that latency is
//! comparable across processes; otherwise with the process's own clock.
//!
//! Every client must receive exactly what was addressed to it: the report has delivered and
//! expected counts, the number of clients short or over, latency from the publish call to the
//! frame read by the client (HDR histogram: p50/p99/p99.9), and, with `--pids` (the gateway
//! processes, in the order of `--ws`), their CPU time per delivery and RSS per connection from
//! /proc. Exit status 0 when every count is exact, 1 otherwise, 2 on bad arguments.
//!
//! Connections bind to source addresses 127.0.0.F, F+1, ... (F = `--first-source`, 1) rotating
//! every `--per-source` (4,000) connections. Binding before connecting takes a port from the
//! address's ~28k ephemeral ports, and the kernel's search for a free one slows down as they fill:
//! with 16,667 connections on one address, connecting took 49 s instead of 7 s, and the stalled
//! load generator let gateways time out its handshakes. Give load generators running side by
//! side distinct `--first-source` ranges. Raise `ulimit -n` for large runs.

mod presence;
mod proto;
mod publish;
mod wire;

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use proto::{Incoming, Kind, Ws};
use publish::{Publisher, To};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Fanout,
    Direct,
    User,
    Rooms,
    Inbound,
    Idle,
    /// Presence scenarios (presence.rs).
    Churn,
    Storm,
    Kill,
    Query,
    /// permessage-deflate and client publish (wire.rs).
    Wire,
    WireIdle,
    Publish,
}

struct Args {
    target: Kind,
    scenario: Scenario,
    ws: Vec<String>,
    api: String,
    api_key: Option<String>,
    clients: usize,
    messages: u64,
    rate: f64,
    batch: usize,
    channel: String,
    rooms_per_endpoint: usize,
    payload: usize,
    window: usize,
    stream: String,
    pids: Vec<u32>,
    redis_pid: Option<u32>,
    per_source: usize,
    first_source: u8,
    connect_concurrency: usize,
    jwt_secret: Option<String>,
    settle_ms: u64,
    timeout_s: u64,
    json: Option<String>,
    quiet: bool,
    watchers: usize,
    probe_rate: f64,
    probe_clients: usize,
    probe_channel: String,
    probe_ms: u64,
    kill_pid: Option<u32>,
    limit: u64,
    deflate: bool,
    publishers: usize,
    publish_via: wire::Via,
    ready_file: Option<String>,
    go_file: Option<String>,
    receive_only: bool,
}

const USAGE: &str = "usage: loadgen --target wsbridge|socketio|nchan|floor --scenario fanout|direct|user|rooms|inbound|idle|churn|storm|kill|query|wire|wire-idle|publish \
--ws URL[,URL...] --api URL [--api-key K] [--clients N] [--messages N] [--rate R] [--batch N] \
[--channel C] [--rooms-per-endpoint K] [--payload BYTES] [--stream S] [--window N] [--pids P[,P...]] [--redis-pid P] [--per-source N] [--first-source N] \
[--connect-concurrency N] [--jwt-secret S] [--settle-ms MS] [--timeout-s S] [--json FILE] [--quiet] \
[--watchers N] [--probe-rate R] [--probe-clients N] [--probe-channel C] [--probe-ms MS] [--kill-pid P] [--limit N] \
[--deflate] [--publishers N] [--publish-via client|stream] [--ready-file F] [--go-file F] [--receive-only]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        target: Kind::Wsbridge,
        scenario: Scenario::Fanout,
        ws: vec!["ws://127.0.0.1:8080/ws".into()],
        api: "http://127.0.0.1:8081".into(),
        api_key: None,
        clients: 100,
        messages: 100,
        rate: 0.0,
        batch: 1,
        channel: "bench".into(),
        rooms_per_endpoint: 1,
        payload: 32,
        window: 16,
        stream: "chat".into(),
        pids: Vec::new(),
        redis_pid: None,
        per_source: 4_000,
        first_source: 1,
        connect_concurrency: 256,
        jwt_secret: None,
        settle_ms: 2000,
        timeout_s: 120,
        json: None,
        quiet: false,
        watchers: 1,
        probe_rate: 0.0,
        probe_clients: 100,
        probe_channel: "probe".into(),
        probe_ms: 0,
        kill_pid: None,
        limit: 0,
        deflate: false,
        publishers: 1,
        publish_via: wire::Via::Client,
        ready_file: None,
        go_file: None,
        receive_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--quiet" {
            a.quiet = true;
            continue;
        }
        if flag == "--deflate" {
            a.deflate = true;
            continue;
        }
        if flag == "--receive-only" {
            a.receive_only = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("{flag} {v:?}: expected a whole number"))
        };
        match flag.as_str() {
            "--target" => a.target = Kind::parse(&value)?,
            "--scenario" => {
                a.scenario = match value.as_str() {
                    "fanout" => Scenario::Fanout,
                    "direct" => Scenario::Direct,
                    "user" => Scenario::User,
                    "rooms" => Scenario::Rooms,
                    "inbound" => Scenario::Inbound,
                    "idle" => Scenario::Idle,
                    "churn" => Scenario::Churn,
                    "storm" => Scenario::Storm,
                    "kill" => Scenario::Kill,
                    "query" => Scenario::Query,
                    "wire" => Scenario::Wire,
                    "wire-idle" => Scenario::WireIdle,
                    "publish" => Scenario::Publish,
                    other => return Err(format!("--scenario {other:?}: unknown")),
                }
            }
            "--ws" => a.ws = value.split(',').map(str::to_owned).collect(),
            "--api" => a.api = value,
            "--api-key" => a.api_key = Some(value),
            "--clients" => a.clients = num(&value)? as usize,
            "--messages" => a.messages = num(&value)?,
            "--rate" => {
                a.rate = value
                    .parse()
                    .map_err(|_| format!("--rate {value:?}: expected a number"))?
            }
            "--batch" => a.batch = num(&value)?.max(1) as usize,
            "--channel" => a.channel = value,
            "--rooms-per-endpoint" => a.rooms_per_endpoint = num(&value)?.max(1) as usize,
            "--payload" => a.payload = num(&value)? as usize,
            "--stream" => a.stream = value,
            "--window" => a.window = num(&value)?.max(1) as usize,
            "--pids" => {
                a.pids = value
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| num(p).map(|p| p as u32))
                    .collect::<Result<_, _>>()?
            }
            "--redis-pid" => a.redis_pid = Some(num(&value)? as u32),
            "--first-source" => a.first_source = num(&value)?.clamp(1, 250) as u8,
            "--per-source" => a.per_source = num(&value)?.max(1) as usize,
            "--connect-concurrency" => a.connect_concurrency = num(&value)?.max(1) as usize,
            "--jwt-secret" => a.jwt_secret = Some(value),
            "--settle-ms" => a.settle_ms = num(&value)?,
            "--timeout-s" => a.timeout_s = num(&value)?,
            "--json" => a.json = Some(value),
            "--watchers" => a.watchers = num(&value)? as usize,
            "--probe-rate" => {
                a.probe_rate = value
                    .parse()
                    .map_err(|_| format!("--probe-rate {value:?}: expected a number"))?
            }
            "--probe-clients" => a.probe_clients = num(&value)? as usize,
            "--probe-channel" => a.probe_channel = value,
            "--probe-ms" => a.probe_ms = num(&value)?,
            "--kill-pid" => a.kill_pid = Some(num(&value)? as u32),
            "--limit" => a.limit = num(&value)?,
            "--publishers" => a.publishers = num(&value)?.max(1) as usize,
            "--publish-via" => a.publish_via = wire::Via::parse(&value)?,
            "--ready-file" => a.ready_file = Some(value),
            "--go-file" => a.go_file = Some(value),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    let presence = matches!(
        a.scenario,
        Scenario::Churn | Scenario::Storm | Scenario::Kill | Scenario::Query
    );
    if presence && a.target != Kind::Wsbridge {
        return Err("the presence scenarios are wsbridge only".into());
    }
    let wire = matches!(
        a.scenario,
        Scenario::Wire | Scenario::WireIdle | Scenario::Publish
    );
    if wire && matches!(a.target, Kind::Nchan | Kind::Floor) {
        return Err("the wire and publish scenarios are for wsbridge and socketio".into());
    }
    if a.scenario == Scenario::Publish && a.target != Kind::Wsbridge {
        return Err("--scenario publish is wsbridge only".into());
    }
    if a.receive_only && a.scenario != Scenario::Fanout {
        return Err("--receive-only is for --scenario fanout".into());
    }
    if (a.ready_file.is_some() || a.go_file.is_some())
        && !matches!(
            a.scenario,
            Scenario::Fanout | Scenario::Direct | Scenario::User | Scenario::Rooms | Scenario::Idle
        )
    {
        return Err(
            "--ready-file and --go-file are for the fanout, direct, user, rooms and idle scenarios"
                .into(),
        );
    }
    if a.ws.is_empty() || (a.clients == 0 && !presence) {
        return Err("--ws and --clients must not be empty".into());
    }
    match (a.scenario, a.target) {
        (Scenario::Direct, Kind::Nchan | Kind::Floor) => {
            return Err("--scenario direct: nchan and the floor have no connection ids".into())
        }
        (Scenario::User, Kind::Socketio | Kind::Nchan | Kind::Floor) => {
            return Err("--scenario user is wsbridge only".into())
        }
        (Scenario::Rooms, Kind::Socketio | Kind::Nchan | Kind::Floor) => {
            return Err("--scenario rooms is wsbridge only".into())
        }
        (Scenario::User, _) if a.jwt_secret.is_none() => {
            return Err("--scenario user needs --jwt-secret (the gateway's auth.jwt_secret)".into())
        }
        (Scenario::Inbound, Kind::Nchan | Kind::Floor) => {
            return Err(
                "--scenario inbound: nchan and the floor have no client-to-server messages".into(),
            )
        }
        _ => {}
    }
    Ok(a)
}

/// utime + stime of a process in seconds (10 ms resolution), or None when it is gone.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields[11].parse::<f64>().ok()? + fields[12].parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn cpu_of(pids: &[u32]) -> Vec<f64> {
    pids.iter()
        .map(|p| cpu_seconds(*p).unwrap_or(f64::NAN))
        .collect()
}

/// What all clients share with the orchestrator.
struct Shared {
    started: Instant,
    /// Stamp and read messages by the wall clock (load generators sharing a run), not `started`.
    wall_clock: bool,
    /// Measured messages each client received.
    counts: Vec<AtomicU64>,
    /// Messages (or acks) each client must receive.
    expected: AtomicU64,
    /// Clients that reached `expected`.
    complete: AtomicUsize,
    /// Clients that have seen a warm-up message.
    warmed: AtomicUsize,
    warm: Vec<AtomicBool>,
    /// Messages that arrived with a sequence number not above the client's previous one.
    out_of_order: AtomicU64,
    /// Connections that ended before the run did.
    lost: AtomicUsize,
    acks: AtomicU64,
    /// Error frames received.
    errors: AtomicU64,
    warned: AtomicBool,
    hist: Vec<Mutex<Histogram<u64>>>,
    changed: Notify,
}

impl Shared {
    fn now_us(&self) -> u64 {
        if self.wall_clock {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros() as u64
        } else {
            self.started.elapsed().as_micros() as u64
        }
    }
}

const SHARDS: usize = 16;

/// Attempts after the first before a client's connection failure fails the run.
const CONNECT_ATTEMPTS: u64 = 3;

type Sink = Arc<tokio::sync::Mutex<SplitSink<Ws, Message>>>;

/// Reads one client's frames until the connection ends.
async fn read_client(
    kind: Kind,
    n: usize,
    mut stream: SplitStream<Ws>,
    sink: Sink,
    shared: Arc<Shared>,
    window: Arc<Semaphore>,
) {
    let mut last_seq = None;
    let mut local = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let mut unflushed = 0u32;
    while let Some(frame) = stream.next().await {
        let text = match frame {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        match kind.incoming(&text) {
            Incoming::Message(p) if p.w == 1 => {
                if !shared.warm[n].swap(true, Ordering::Relaxed) {
                    shared.warmed.fetch_add(1, Ordering::Relaxed);
                    shared.changed.notify_one();
                }
            }
            Incoming::Message(p) => {
                local.saturating_record(shared.now_us().saturating_sub(p.t).max(1));
                unflushed += 1;
                if last_seq.is_some_and(|l| p.seq <= l) {
                    shared.out_of_order.fetch_add(1, Ordering::Relaxed);
                }
                last_seq = Some(p.seq);
                let got = shared.counts[n].fetch_add(1, Ordering::Relaxed) + 1;
                if got == shared.expected.load(Ordering::Relaxed) {
                    shared.complete.fetch_add(1, Ordering::Relaxed);
                    shared.changed.notify_one();
                }
                if unflushed >= 64 || got == shared.expected.load(Ordering::Relaxed) {
                    shared.hist[n % SHARDS].lock().unwrap().add(&local).ok();
                    local.reset();
                    unflushed = 0;
                }
            }
            Incoming::Ack => {
                window.add_permits(1);
                shared.acks.fetch_add(1, Ordering::Relaxed);
                let got = shared.counts[n].fetch_add(1, Ordering::Relaxed) + 1;
                if got == shared.expected.load(Ordering::Relaxed) {
                    shared.complete.fetch_add(1, Ordering::Relaxed);
                    shared.changed.notify_one();
                }
            }
            Incoming::Error => {
                window.add_permits(1);
                shared.errors.fetch_add(1, Ordering::Relaxed);
                shared.changed.notify_one();
                if !shared.warned.swap(true, Ordering::Relaxed) {
                    eprintln!("loadgen: client {n} got an error frame: {text}");
                }
            }
            Incoming::Answer(text) => {
                let _ = sink.lock().await.send(Message::Text(text.into())).await;
            }
            Incoming::Other => {}
        }
    }
    if unflushed > 0 {
        shared.hist[n % SHARDS].lock().unwrap().add(&local).ok();
    }
    shared.lost.fetch_add(1, Ordering::Relaxed);
    shared.changed.notify_one();
}

/// Inbound: sends `messages` frames, at most `window` unacknowledged.
async fn write_client(
    kind: Kind,
    stream: String,
    messages: u64,
    sink: Sink,
    shared: Arc<Shared>,
    window: Arc<Semaphore>,
    payload: String,
) {
    for id in 0..messages {
        let Ok(permit) = window.acquire().await else {
            return;
        };
        permit.forget(); // given back by the reader on the ack
        let data = format!(
            r#"{{"seq":{id},"t":{},"pad":"{payload}"}}"#,
            shared.now_us()
        );
        let Some(text) = kind.client_send(&stream, id, &data) else {
            return;
        };
        if sink
            .lock()
            .await
            .send(Message::Text(text.into()))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The `rooms` scenario's k-th channel for the clients of the i-th endpoint.
fn room(channel: &str, i: usize, k: usize) -> String {
    format!("{channel}:{i}:{k}")
}

/// Every room of the `rooms` scenario.
fn all_rooms(a: &Args) -> Vec<String> {
    (0..a.ws.len())
        .flat_map(|i| (0..a.rooms_per_endpoint).map(move |k| (i, k)))
        .map(|(i, k)| room(&a.channel, i, k))
        .collect()
}

/// Client n's token with `--jwt-secret` (user `u<n>`), else none.
fn client_token(a: &Args, n: usize) -> Option<String> {
    a.jwt_secret
        .as_ref()
        .map(|secret| token(secret, &format!("u{n}")))
}

fn token(secret: &str, user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 24 * 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        // `publish`: client publish (bench/compression.sh) is allowed on every channel the
        // gateway's config opens to it.
        &json!({"sub": user, "exp": exp, "publish": ["*"]}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

/// Waits until `done()` or the deadline, checking whenever `changed` is notified; false on the
/// deadline.
async fn wait_until(changed: &Notify, deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    while !done() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // Notifications can be coalesced; poll at least every 50 ms.
        let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), changed.notified()).await;
    }
    true
}

fn log(a: &Args, msg: &str) {
    if !a.quiet {
        eprintln!("loadgen: {msg}");
    }
}

async fn run(a: Args) -> Result<bool, String> {
    let shared = Arc::new(Shared {
        started: Instant::now(),
        wall_clock: a.go_file.is_some(),
        counts: (0..a.clients).map(|_| AtomicU64::new(0)).collect(),
        expected: AtomicU64::new(u64::MAX),
        complete: AtomicUsize::new(0),
        warmed: AtomicUsize::new(0),
        warm: (0..a.clients).map(|_| AtomicBool::new(false)).collect(),
        out_of_order: AtomicU64::new(0),
        lost: AtomicUsize::new(0),
        acks: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        warned: AtomicBool::new(false),
        hist: (0..SHARDS)
            .map(|_| Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()))
            .collect(),
        changed: Notify::new(),
    });
    let rss_before: Vec<Option<u64>> = a.pids.iter().map(|p| rss_kib(*p)).collect();
    let pad: String = "x".repeat(a.payload);

    // Connect and join, `connect_concurrency` at a time.
    log(&a, &format!("connecting {} clients", a.clients));
    let connect_started = Instant::now();
    let gate = Arc::new(Semaphore::new(a.connect_concurrency));
    let retries = Arc::new(AtomicU64::new(0));
    let mut joins = Vec::with_capacity(a.clients);
    for n in 0..a.clients {
        let endpoint = a.ws[n % a.ws.len()].clone();
        let source = Ipv4Addr::new(127, 0, 0, a.first_source + (n / a.per_source) as u8);
        let token = client_token(&a, n);
        let channel = match a.scenario {
            Scenario::Rooms => {
                let endpoints = a.ws.len();
                room(
                    &a.channel,
                    n % endpoints,
                    (n / endpoints) % a.rooms_per_endpoint,
                )
            }
            _ => a.channel.clone(),
        };
        let (kind, gate) = (a.target, gate.clone());
        let retries = retries.clone();
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.expect("gate");
            let url = kind.url(&endpoint, &channel, token.as_deref());
            // A connection storm can fail an attempt (a full accept queue, a handshake cut
            // short); try again a few times, and count it.
            let mut attempt = 0;
            loop {
                let joined = match proto::open(&url, source).await {
                    Ok(ws) => kind.join(ws, &channel, true).await,
                    Err(e) => Err(e),
                };
                match joined {
                    Err(e) if attempt < CONNECT_ATTEMPTS => {
                        attempt += 1;
                        retries.fetch_add(1, Ordering::Relaxed);
                        if attempt == 1 {
                            eprintln!("loadgen: client {n}: {e}; retrying");
                        }
                        tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                    }
                    other => return other,
                }
            }
        }));
    }
    let mut ids = Vec::with_capacity(a.clients);
    let mut sinks = Vec::with_capacity(a.clients);
    let mut windows = Vec::with_capacity(a.clients);
    for (n, join) in joins.into_iter().enumerate() {
        let joined = join
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("client {n}: {e}"))?;
        ids.push(joined.id);
        let (sink, stream) = joined.ws.split();
        let sink: Sink = Arc::new(tokio::sync::Mutex::new(sink));
        let window = Arc::new(Semaphore::new(a.window));
        tokio::spawn(read_client(
            a.target,
            n,
            stream,
            sink.clone(),
            shared.clone(),
            window.clone(),
        ));
        sinks.push(sink);
        windows.push(window);
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    log(
        &a,
        &format!("{} clients joined in {connect_s:.1} s", a.clients),
    );

    let mut publisher = Publisher::new(a.target, &a.api, a.api_key.clone())?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    // Warm-up: until every client has seen a message on the channel, all replicas route it.
    if a.scenario != Scenario::Inbound && a.scenario != Scenario::Idle {
        let warm = r#"{"seq":0,"t":0,"w":1}"#.to_string();
        let mut warm_unconfirmed = 0u64;
        let rooms: Vec<String> = match a.scenario {
            Scenario::Rooms => all_rooms(&a),
            _ => vec![a.channel.clone()],
        };
        loop {
            let warm_items: Vec<(To, String)> = rooms
                .iter()
                .map(|r| (To::Channel(r), warm.clone()))
                .collect();
            match publisher.publish(&warm_items).await {
                Ok(()) => {}
                // 503: the gateway could not confirm the publish (Redis did not answer in time,
                // as when 100k connections arriving hold the CPU); it may have gone out. A
                // warm-up message is not counted, so it is simply published again.
                Err(e) if e.contains(": 503 ") => {
                    warm_unconfirmed += 1;
                    if warm_unconfirmed == 1 {
                        eprintln!(
                            "loadgen: a warm-up publish was not confirmed, trying again: {e}"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
            // Publish again only once the warm-up has stopped spreading: a fan-out to tens of
            // thousands takes longer than a round here, and publishing into it only adds work
            // (which several load generators warming one channel would multiply).
            let mut all = false;
            let mut seen = usize::MAX;
            while !all && shared.warmed.load(Ordering::Relaxed) != seen {
                seen = shared.warmed.load(Ordering::Relaxed);
                all = wait_until(
                    &shared.changed,
                    Instant::now() + Duration::from_millis(200),
                    || shared.warmed.load(Ordering::Relaxed) == a.clients,
                )
                .await;
            }
            if all {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "warm-up: only {} of {} clients got a message",
                    shared.warmed.load(Ordering::Relaxed),
                    a.clients
                ));
            }
        }
        log(&a, "every client receives: measuring");
    }

    if let Some(path) = &a.ready_file {
        std::fs::write(path, format!("{}\n", a.clients))
            .map_err(|e| format!("--ready-file {path}: {e}"))?;
    }
    if let Some(path) = &a.go_file {
        log(&a, &format!("waiting for {path}"));
        while !std::path::Path::new(path).exists() {
            if Instant::now() > deadline {
                return Err(format!("--go-file {path}: not there after --timeout-s"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Measured from here: a run that waited for its go file gets --timeout-s again.
    let deadline = if a.go_file.is_some() {
        Instant::now() + Duration::from_secs(a.timeout_s)
    } else {
        deadline
    };

    let per_client = match a.scenario {
        Scenario::Idle => 0,
        _ => a.messages,
    };
    shared.expected.store(per_client, Ordering::Relaxed);
    let cpu0 = cpu_of(&a.pids);
    let redis_cpu0 = a.redis_pid.and_then(cpu_seconds);
    let own_cpu0 = cpu_seconds(std::process::id());
    let t0 = Instant::now();
    let mut publish_s = 0.0;
    let mut calls = 0u64;

    match a.scenario {
        Scenario::Idle => {
            tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
        }
        Scenario::Churn
        | Scenario::Storm
        | Scenario::Kill
        | Scenario::Query
        | Scenario::Wire
        | Scenario::WireIdle
        | Scenario::Publish => {
            unreachable!("the presence and wire scenarios run in presence.rs and wire.rs")
        }
        Scenario::Inbound => {
            for (sink, window) in sinks.iter().zip(&windows) {
                tokio::spawn(write_client(
                    a.target,
                    a.stream.clone(),
                    a.messages,
                    sink.clone(),
                    shared.clone(),
                    window.clone(),
                    pad.clone(),
                ));
            }
        }
        Scenario::Fanout | Scenario::Direct | Scenario::User | Scenario::Rooms => {
            let users: Vec<String> = (0..a.clients).map(|n| format!("u{n}")).collect();
            let rooms = all_rooms(&a);
            let per_round: Vec<To> = match a.scenario {
                Scenario::Fanout => vec![To::Channel(&a.channel)],
                Scenario::Rooms => rooms.iter().map(|r| To::Channel(r)).collect(),
                Scenario::Direct => ids
                    .iter()
                    .map(|id| To::Connection(id.as_deref().unwrap_or("")))
                    .collect(),
                _ => users.iter().map(|u| To::User(u)).collect(),
            };
            // A call carries `batch` messages; in fanout each is one message, in direct/user a
            // round is one message per client, split into calls of `batch`.
            let mut ticker = (a.rate > 0.0).then(|| {
                let every = match a.scenario {
                    Scenario::Fanout => a.batch as f64 / a.rate,
                    _ => 1.0 / a.rate,
                };
                let mut t = tokio::time::interval(Duration::from_secs_f64(every));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut seq = 0u64;
            let rounds = match a.scenario {
                // Another load generator publishes; this one only counts.
                Scenario::Fanout if a.receive_only => 0,
                Scenario::Fanout => a.messages.div_ceil(a.batch as u64),
                _ => a.messages,
            };
            for _ in 0..rounds {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let items: Vec<(To, String)> = match a.scenario {
                    Scenario::Fanout => {
                        let n = (a.batch as u64).min(a.messages - seq);
                        let now = shared.now_us();
                        let items = (seq..seq + n)
                            .map(|s| {
                                (
                                    To::Channel(&a.channel),
                                    format!(r#"{{"seq":{s},"t":{now},"pad":"{pad}"}}"#),
                                )
                            })
                            .collect();
                        seq += n;
                        items
                    }
                    _ => {
                        let now = shared.now_us();
                        let data = format!(r#"{{"seq":{seq},"t":{now},"pad":"{pad}"}}"#);
                        seq += 1;
                        per_round
                            .iter()
                            .map(|to| (to.clone(), data.clone()))
                            .collect()
                    }
                };
                let p0 = Instant::now();
                for chunk in items.chunks(a.batch) {
                    publisher.publish(chunk).await?;
                    calls += 1;
                }
                publish_s += p0.elapsed().as_secs_f64();
            }
        }
    }

    let expected_total = per_client * a.clients as u64;
    let all_done = a.scenario == Scenario::Idle
        || wait_until(&shared.changed, deadline, || {
            shared.complete.load(Ordering::Relaxed) == a.clients
                || shared.lost.load(Ordering::Relaxed) > 0
                || shared.errors.load(Ordering::Relaxed) > 0
        })
        .await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_of(&a.pids);
    let redis_cpu = a
        .redis_pid
        .and_then(cpu_seconds)
        .zip(redis_cpu0)
        .map(|(b, a)| b - a);
    let own_cpu = cpu_seconds(std::process::id())
        .zip(own_cpu0)
        .map(|(b, a)| b - a);
    let rss_after: Vec<Option<u64>> = a.pids.iter().map(|p| rss_kib(*p)).collect();
    // Anything beyond what was expected arrives soon after: wait a little, then count.
    if a.scenario != Scenario::Idle {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let counts: Vec<u64> = shared
        .counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let delivered: u64 = counts.iter().sum();
    let short = counts.iter().filter(|c| **c < per_client).count();
    let over = counts.iter().filter(|c| **c > per_client).count();
    let min = counts.iter().min().copied().unwrap_or(0);
    let max = counts.iter().max().copied().unwrap_or(0);
    let out_of_order = shared.out_of_order.load(Ordering::Relaxed);
    let lost = shared.lost.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    for shard in &shared.hist {
        hist.add(&*shard.lock().unwrap()).ok();
    }
    let q = |p: f64| (!hist.is_empty()).then(|| hist.value_at_quantile(p) as f64 / 1000.0);

    // Connections per endpoint, for RSS per connection.
    let per_endpoint: Vec<usize> = (0..a.ws.len())
        .map(|e| (0..a.clients).filter(|n| n % a.ws.len() == e).count())
        .collect();
    let gateway_cpu: f64 = cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).sum();
    let processes: Vec<_> = a
        .pids
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            let conns = per_endpoint.get(i).copied().unwrap_or(0);
            let rss_per_conn = match (rss_before[i], rss_after[i]) {
                (Some(b), Some(a)) if conns > 0 => Some((a as f64 - b as f64) / conns as f64),
                _ => None,
            };
            json!({
                "pid": pid,
                "cpu_s": cpu1[i] - cpu0[i],
                "rss_kib_before": rss_before[i],
                "rss_kib_after": rss_after[i],
                "connections": conns,
                "rss_kib_per_connection": rss_per_conn,
            })
        })
        .collect();
    let rss_growth: Option<f64> = rss_before
        .iter()
        .zip(&rss_after)
        .map(|(b, a)| Some(*a.as_ref()? as f64 - *b.as_ref()? as f64))
        .sum::<Option<f64>>()
        .map(|kib| kib / a.clients as f64);
    let exact = a.scenario == Scenario::Idle
        || (all_done && short == 0 && over == 0 && lost == 0 && out_of_order == 0 && errors == 0);
    let report = json!({
        "target": a.target.name(),
        "scenario": format!("{:?}", a.scenario).to_lowercase(),
        "clients": a.clients,
        "replicas": a.ws.len(),
        "messages": a.messages,
        "rate": a.rate,
        "batch": a.batch,
        "payload_bytes": a.payload,
        "connect_s": connect_s,
        "connect_retries": retries.load(Ordering::Relaxed),
        "expected_per_client": per_client,
        "expected_total": expected_total,
        "delivered_total": delivered,
        "clients_short": short,
        "clients_over": over,
        "min_per_client": min,
        "max_per_client": max,
        "out_of_order": out_of_order,
        "connections_lost": lost,
        "error_frames": errors,
        "exact": exact,
        "elapsed_s": elapsed,
        "publish_calls": calls,
        "publish_s": publish_s,
        "deliveries_per_s": delivered as f64 / elapsed,
        "latency_ms": {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": (!hist.is_empty()).then(|| hist.max() as f64 / 1000.0)},
        "gateway_cpu_s": gateway_cpu,
        "gateway_cpu_us_per_delivery": (delivered > 0 && !a.pids.is_empty()).then(|| gateway_cpu / delivered as f64 * 1e6),
        "rss_kib_per_connection": rss_growth,
        "redis_cpu_s": redis_cpu,
        "loadgen_cpu_s": own_cpu,
        "processes": processes,
    });
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap())
            .map_err(|e| format!("--json {path}: {e}"))?;
    }
    print_table(&report);
    Ok(exact)
}

/// Prints the report as an aligned two-column table.
fn print_table(report: &serde_json::Value) {
    let fmt = |v: &serde_json::Value| match v {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    for (k, v) in report.as_object().unwrap() {
        match v {
            serde_json::Value::Object(inner) => {
                let parts: Vec<String> = inner
                    .iter()
                    .map(|(k2, v2)| format!("{k2}={}", fmt(v2)))
                    .collect();
                println!("{k:<30} {}", parts.join(" "));
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    let parts: Vec<String> = item
                        .as_object()
                        .map(|o| {
                            o.iter()
                                .map(|(k2, v2)| format!("{k2}={}", fmt(v2)))
                                .collect()
                        })
                        .unwrap_or_default();
                    println!("{k:<30} {}", parts.join(" "));
                }
            }
            _ => println!("{k:<30} {}", fmt(v)),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.scenario {
        Scenario::Churn | Scenario::Storm | Scenario::Kill | Scenario::Query => {
            presence::run(args).await
        }
        Scenario::Wire | Scenario::WireIdle | Scenario::Publish => wire::run(args).await,
        _ => run(args).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loadgen: counts are not exact (see clients_short, clients_over, out_of_order, connections_lost)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}
