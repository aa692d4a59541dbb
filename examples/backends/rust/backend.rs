//! A small chat and whiteboard backend for wsbridge, in Rust (redis-rs, hyper-util's pooled HTTP
//! client, base64): the same flags, behaviour and log lines (error texts aside) as its siblings
//! `examples/backends/python/backend.py` and `examples/backends/node/backend.mjs`.
//!
//! ```text
//! cargo run --example backend                       # the chat
//! cargo run --example backend -- --stream board     # the whiteboard
//! ```
//!
//! It reads one inbound stream, `<prefix>:in:<stream>` (`chat` by default), with a Redis
//! consumer group, as every wsbridge backend does, and answers through the gateway's backend API
//! (`POST /send`). `examples/backends/README.md` specifies the messages; in short:
//!
//! - `data` with a `"board"` key is for the whiteboard (`examples/whiteboard`, stream `board`): a
//!   `"stroke"` is stored in the hash `<prefix>:whiteboard:<board>` and published to the channel
//!   `board:<board>`; `"load": true` sends the stored strokes to the asking connection;
//! - `data` with a non-empty string `"channel"` and a `"text"`: the message goes to every
//!   subscriber of that channel as `{"from": <user, or connection when anonymous>, "text"}`;
//! - anything else is echoed to the sending connection as `{"echo": DATA}`.
//!
//! An entry is acknowledged (XACK) only after the gateway accepted the reply (202). When the
//! gateway answers 5xx (503: Redis did not take it), 408 or 429, or cannot be reached, the entry
//! stays pending and is retried after a backoff, before any newer entry. A 400, 413 or 422 means
//! the reply itself can never be taken: it is logged and acknowledged (dropped). Any other answer
//! (401 wrong key, 404 wrong URL) is a misconfiguration: the backend exits with status 1 without
//! acknowledging, leaving the entry to a correctly configured instance. A group this backend
//! creates starts at the beginning of the stream, as the gateway's own groups do, so no stored
//! entry is skipped. SIGTERM / SIGINT stop it between entries; a consumer that holds nothing is
//! removed from the group on the way out.
//!
//! Backends that crash. Run as many instances as you like, each with its own consumer name (the
//! default is unique per process). An entry that an instance read but did not acknowledge stays
//! in the group's pending list under its name. At start, and then every `--reclaim-every-ms`
//! (half of `--claim-idle-ms` by default, at least 100), each instance takes over (XAUTOCLAIM
//! ... JUSTID) the entries that have been pending for more than `--claim-idle-ms` (60 s) -- those
//! of an instance that died or hangs -- and handles them before newer entries. On the same tick a
//! live instance refreshes the idle time of the entries it still holds (XCLAIM to itself, with a
//! min-idle guard), so that nobody takes over work it is retrying.
//!
//! Entries that can never be handled. Redis counts every delivery of a pending entry (XPENDING
//! shows the count); this backend reads its own pending entries one at a time, so each delivery
//! is one attempt. An entry whose handler failed is delivered again after a backoff; an entry
//! that is still pending after `--max-deliveries` deliveries (5) -- its handler failed, or the
//! instances that read it crashed, that many times -- is not handed to the handler again: it is
//! moved to the dead-letter stream `{<prefix>:in:<stream>}:dead` (e.g. `{wsbridge:in:chat}:dead`)
//! with its original fields plus `original_id`, `deliveries` and `reason`, and logged. One Lua
//! script adds it there and acknowledges it, so it is never in both places or in neither; the
//! braces put the dead-letter stream in the inbound stream's hash slot, so this holds on a Redis
//! Cluster too. Retrying a reply the gateway could not take for now (503, unreachable) does not
//! count as a delivery (the entry is read again with XRANGE, not XREADGROUP), so an outage of the
//! gateway does not dead-letter the backlog. Nothing trims the dead-letter stream: inspect it
//! with XRANGE, and XDEL what you have dealt with.
//!
//! Settings come from flags or the environment: `REDIS_URL` (redis://127.0.0.1:6379),
//! `REDIS_CLUSTER` / `--redis-cluster` (off), `WSBRIDGE_API` (http://127.0.0.1:8081),
//! `WSBRIDGE_API_KEY` (none), `PREFIX` (wsbridge), `STREAM` (chat), `GROUP` (backend), `CONSUMER`
//! (`<hostname>-<pid>`); `--block-ms` (5000), `--claim-idle-ms` (60000), `--reclaim-every-ms`,
//! `--max-deliveries` (5); `--max N` exits after handling N entries.
//!
//! Redis Cluster. With `--redis-cluster` (or `REDIS_CLUSTER=1`), `REDIS_URL` is a comma-separated
//! list of cluster nodes to start from, and the backend uses redis-rs's cluster client, which
//! sends each command to the node serving its key. Every command names one key, or two in the
//! same slot (the dead-letter script). As on a single Redis, the blocking XREADGROUP has a
//! connection of its own, so it does not hold up the other commands.
//!
//! Redis Sentinel. With `--redis-sentinel MASTER` (or `REDIS_SENTINEL=MASTER`), `REDIS_URL` is a
//! comma-separated list of Sentinels, and every new connection goes to the node they name as
//! MASTER's primary (redis-rs's `Sentinel::async_master_for`, which checks with ROLE that the node
//! is a master). After a failover the lost link (or a READONLY reply from a demoted node) takes
//! the backend's reconnect path, which asks the Sentinels again. The Sentinels' credentials come
//! from their URLs, the data nodes' from `REDIS_USERNAME` / `REDIS_PASSWORD`.
//!
//! Two flags exist for tests and demonstrations: `--fail-on TEXT` makes the handler fail on
//! every chat message whose text is TEXT (a message it can never handle), and `--work-ms MS`
//! spends MS milliseconds on each entry before replying (so that a killed instance dies holding
//! work).

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, RedisFuture, ServerErrorKind, Value};
use serde_json::{json, Value as J};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: backend [--redis-url URL] [--redis-cluster] \
[--redis-sentinel MASTER] [--api URL] \
[--api-key KEY] [--prefix P] [--stream S] [--group G] [--consumer C] [--block-ms MS] \
[--claim-idle-ms MS] [--reclaim-every-ms MS] [--max-deliveries N] [--max N] [--fail-on TEXT] \
[--work-ms MS]";

/// A whiteboard stroke has at most this many points.
const MAX_POINTS: usize = 500;
/// A snapshot message carries at most this many strokes.
const SNAPSHOT_STROKES: usize = 100;
/// The first backoff after a failed delivery; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

fn log(message: impl std::fmt::Display) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        % 86_400;
    println!(
        "{:02}:{:02}:{:02} backend: {message}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
}

struct Settings {
    /// One URL, or with `redis_cluster` the cluster nodes to start from, comma-separated.
    redis_url: String,
    redis_cluster: bool,
    /// With Sentinel: the master's name (`redis_url` lists the Sentinels).
    redis_sentinel: Option<String>,
    api: Api,
    prefix: String,
    group: String,
    consumer: String,
    /// `<prefix>:in:<stream>`
    key: String,
    /// `{<prefix>:in:<stream>}:dead`: in the hash slot of `key`.
    dead_key: String,
    block_ms: u64,
    claim_idle_ms: u64,
    reclaim_every_ms: u64,
    max_deliveries: u64,
    max: Option<u64>,
    /// Test hook: the handler fails on chat messages with this text.
    fail_on: Option<String>,
    /// Test hook: simulated work per entry, before replying.
    work_ms: u64,
}

fn settings() -> Result<Settings, String> {
    let env = |name: &str, default: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_string())
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "backend".into());
    let mut redis_url = env("REDIS_URL", "redis://127.0.0.1:6379");
    let mut redis_cluster = matches!(
        env("REDIS_CLUSTER", "").to_ascii_lowercase().as_str(),
        "1" | "true" | "yes"
    );
    let mut redis_sentinel = std::env::var("REDIS_SENTINEL")
        .ok()
        .filter(|m| !m.is_empty());
    let mut api = env("WSBRIDGE_API", "http://127.0.0.1:8081");
    let mut api_key = std::env::var("WSBRIDGE_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let mut prefix = env("PREFIX", "wsbridge");
    let mut stream = env("STREAM", "chat");
    let mut group = env("GROUP", "backend");
    let mut consumer = env("CONSUMER", &format!("{hostname}-{}", std::process::id()));
    let (mut block_ms, mut claim_idle_ms, mut reclaim_every_ms) = (5000, 60_000, None);
    let (mut max_deliveries, mut max, mut fail_on, mut work_ms) = (5, None, None, 0);

    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Err(USAGE.into());
        }
        // The one flag without a value.
        if arg == "--redis-cluster" {
            redis_cluster = true;
            continue;
        }
        // `--flag value` or `--flag=value`.
        let (flag, value) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), value.to_string()),
            _ => {
                let value = args
                    .next()
                    .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))?;
                (arg, value)
            }
        };
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag} needs a number, got `{v}`"))
        };
        match flag.as_str() {
            "--redis-url" => redis_url = value,
            "--redis-sentinel" => redis_sentinel = Some(value),
            "--api" => api = value,
            "--api-key" => api_key = Some(value),
            "--prefix" => prefix = value,
            "--stream" => stream = value,
            "--group" => group = value,
            "--consumer" => consumer = value,
            "--block-ms" => block_ms = number(&value)?,
            "--claim-idle-ms" => claim_idle_ms = number(&value)?,
            "--reclaim-every-ms" => reclaim_every_ms = Some(number(&value)?),
            "--max-deliveries" => max_deliveries = number(&value)?,
            "--max" => max = Some(number(&value)?),
            "--fail-on" => fail_on = Some(value),
            "--work-ms" => work_ms = number(&value)?,
            "--redis-cluster" => return Err(format!("--redis-cluster takes no value\n{USAGE}")),
            _ => return Err(format!("unknown flag `{flag}`\n{USAGE}")),
        }
    }
    if max_deliveries < 1 {
        return Err(format!("--max-deliveries must be at least 1\n{USAGE}"));
    }
    if redis_cluster && redis_sentinel.is_some() {
        return Err(format!(
            "--redis-cluster and --redis-sentinel exclude each other\n{USAGE}"
        ));
    }
    Ok(Settings {
        redis_url,
        redis_cluster,
        redis_sentinel,
        api: Api::new(&api, api_key)?,
        group,
        consumer,
        key: format!("{prefix}:in:{stream}"),
        dead_key: format!("{{{prefix}:in:{stream}}}:dead"),
        prefix,
        block_ms,
        claim_idle_ms,
        reclaim_every_ms: reclaim_every_ms.unwrap_or(claim_idle_ms / 2).max(100),
        max_deliveries,
        max,
        fail_on,
        work_ms,
    })
}

/// The gateway's backend API, through hyper-util's pooled client: calls reuse kept-alive
/// connections instead of opening one each. The client retries a request on a pooled connection
/// that the gateway had closed before the request went out, so a stale connection does not turn
/// a good reply into a failure.
struct Api {
    base: String,
    send_uri: hyper::Uri,
    key: Option<String>,
    client: HttpClient,
}

type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// Why an entry was not handled.
enum Failure {
    /// The gateway could not take the reply for now: the entry stays pending and is retried
    /// without being delivered again (not counted towards `--max-deliveries`).
    Transient(String),
    /// The handler failed: the entry stays pending and its next delivery is another attempt.
    Handler(String),
    /// Retrying cannot help until the backend is reconfigured: exit with status 1.
    Fatal(String),
    /// Redis failed, which is not the entry's fault: reconnect, then retry it.
    Redis(RedisError),
}

impl Api {
    fn new(base: &str, key: Option<String>) -> Result<Self, String> {
        let base = base.trim_end_matches('/');
        let send_uri: hyper::Uri = format!("{base}/send")
            .parse()
            .map_err(|e| format!("WSBRIDGE_API `{base}`: {e}"))?;
        if send_uri.scheme_str() != Some("http") {
            return Err(format!(
                "WSBRIDGE_API `{base}`: only http:// is supported by this example"
            ));
        }
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        Ok(Self {
            base: base.to_string(),
            send_uri,
            key,
            client,
        })
    }

    /// `POST /send`: 202, or the status of a reply the gateway will never take (400, 413, 422).
    async fn send(&self, body: &J) -> Result<u16, Failure> {
        let (status, detail) =
            match tokio::time::timeout(Duration::from_secs(10), self.post(body)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => return Err(Failure::Transient(format!("gateway unreachable: {e}"))),
                Err(_) => return Err(Failure::Transient("gateway unreachable: timed out".into())),
            };
        match status {
            // This reply is bad: dropping it is the only way forward.
            202 | 400 | 413 | 422 => Ok(status),
            408 | 429 | 500.. => Err(Failure::Transient(format!("{status} {detail}"))),
            401 | 403 => Err(Failure::Fatal(format!(
                "the gateway refused the API key ({status}): {detail}"
            ))),
            _ => Err(Failure::Fatal(format!(
                "unexpected answer from {}/send ({status}): {detail}",
                self.base
            ))),
        }
    }

    async fn post(&self, body: &J) -> Result<(u16, String), String> {
        let mut request = hyper::Request::post(self.send_uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.key {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
    }
}

/// An entry's fields, in the order the stream holds them.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One stream entry; `fields` is `None` when the entry was trimmed away while pending.
struct Entry {
    id: String,
    fields: Option<Fields>,
}

/// The value of field `name` (the last one, should the entry repeat it).
fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .rev()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// Parses an XREADGROUP reply (RESP2 arrays or RESP3 maps) for one stream.
fn parse_read_reply(reply: Value) -> Vec<Entry> {
    let streams: Vec<Value> = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
        _ => Vec::new(),
    };
    streams.into_iter().flat_map(parse_entries).collect()
}

/// Parses a list of stream entries (an XRANGE reply, or one stream of an XREADGROUP reply).
fn parse_entries(entries: Value) -> Vec<Entry> {
    let Value::Array(entries) = entries else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries {
        let Value::Array(mut parts) = entry else {
            continue;
        };
        if parts.is_empty() {
            continue;
        }
        let fields = (parts.len() > 1).then(|| parts.swap_remove(1));
        let Some(id) = text(&parts[0]) else { continue };
        let fields = match fields {
            Some(Value::Array(flat)) => Some(
                flat.chunks(2)
                    .filter_map(|kv| Some((bytes(&kv[0])?, bytes(kv.get(1)?)?)))
                    .collect(),
            ),
            Some(Value::Map(pairs)) => Some(
                pairs
                    .iter()
                    .filter_map(|(k, v)| Some((bytes(k)?, bytes(v)?)))
                    .collect(),
            ),
            _ => None,
        };
        out.push(Entry { id, fields });
    }
    out
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The entry's `data` as a JSON value.
fn decode_data(fields: &Fields) -> J {
    let raw = field(fields, "data").unwrap_or(b"null");
    if field(fields, "encoding").unwrap_or(b"json") == b"msgpack" {
        let mut rest = raw;
        return match rmpv::decode::read_value(&mut rest) {
            Ok(value) if rest.is_empty() => msgpack_to_json(value),
            // Not valid MessagePack, or non-UTF-8 strings: echo the bytes.
            _ => None,
        }
        .unwrap_or_else(|| json!({"msgpack_base64": base64(raw)}));
    }
    // The gateway only stores valid JSON; be lenient anyway.
    serde_json::from_slice(raw).unwrap_or_else(|_| J::String(String::from_utf8_lossy(raw).into()))
}

/// A MessagePack value as JSON: binary and ext data become base64 text, non-string map keys
/// their JSON text, NaN and infinities null; `None` when a string is not UTF-8.
fn msgpack_to_json(v: rmpv::Value) -> Option<J> {
    use rmpv::Value as M;
    Some(match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(b),
        M::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(n), _) => J::from(n),
            (None, Some(n)) => J::from(n),
            _ => J::Null,
        },
        M::F32(f) => serde_json::Number::from_f64(f64::from(f)).map_or(J::Null, J::Number),
        M::F64(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        M::String(s) => J::String(s.into_str()?),
        M::Binary(b) => J::String(base64(&b)),
        M::Array(items) => J::Array(
            items
                .into_iter()
                .map(msgpack_to_json)
                .collect::<Option<_>>()?,
        ),
        M::Map(pairs) => {
            let mut map = serde_json::Map::new();
            for (k, v) in pairs {
                let key = match msgpack_to_json(k)? {
                    J::String(s) => s,
                    other => other.to_string(),
                };
                map.insert(key, msgpack_to_json(v)?);
            }
            J::Object(map)
        }
        M::Ext(code, data) => json!({"ext": code, "data": base64(&data)}),
    })
}

/// Standard base64 with padding, as the Python and Node siblings write it.
fn base64(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

/// What one entry asks for, before any Redis work.
#[derive(Debug, PartialEq)]
enum Plan {
    /// Post these bodies (chat, echo, a whiteboard error).
    Send(Vec<J>),
    /// A whiteboard stroke: `HSET key field value`, then post `body`.
    Store {
        key: String,
        field: String,
        value: String,
        body: J,
    },
    /// The whiteboard so far (the hash `key`), to the asking connection.
    Load {
        key: String,
        board: String,
        connection: String,
    },
}

/// The entry's plan, and a short description for the log.
fn plan_for(prefix: &str, entry_id: &str, fields: &Fields) -> (Plan, String) {
    let field_text = |name: &str| {
        field(fields, name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let connection = field_text("connection");
    let user = field_text("user");
    let who = if user.is_empty() { &connection } else { &user };
    let data = decode_data(fields);
    if let Some(board) = data.get("board") {
        return board_plan(prefix, entry_id, who, &connection, &data, board);
    }
    let channel = data
        .get("channel")
        .and_then(J::as_str)
        .filter(|c| !c.is_empty());
    match (channel, data.get("text")) {
        (Some(channel), Some(text)) => (
            Plan::Send(vec![
                json!({"to": {"channel": channel}, "data": {"from": who, "text": text}}),
            ]),
            format!("chat {channel} from {who}"),
        ),
        _ => (
            Plan::Send(vec![
                json!({"to": {"connection": connection}, "data": {"echo": data}}),
            ]),
            format!("echo to {connection}"),
        ),
    }
}

/// The whiteboard: a stroke to store and publish to the board's channel, the board so far for
/// the asking connection, or an error for it.
fn board_plan(
    prefix: &str,
    entry_id: &str,
    who: &str,
    connection: &str,
    data: &J,
    board: &J,
) -> (Plan, String) {
    let error = match board.as_str().filter(|b| is_board_name(b)) {
        None => "board must be 1 to 64 characters of A-Z a-z 0-9 _ -".to_string(),
        Some(name) => match data.get("stroke") {
            Some(stroke) => match stroke_error(stroke) {
                Some(error) => error,
                None => {
                    let mut stroke = stroke.clone();
                    stroke["seq"] = J::from(entry_id);
                    let id = stroke["id"].as_str().unwrap_or_default().to_string();
                    // Idempotent: storing the same stroke again (a redelivery) changes nothing.
                    let plan = Plan::Store {
                        key: format!("{prefix}:whiteboard:{name}"),
                        field: id.clone(),
                        value: stroke.to_string(),
                        body: json!({"to": {"channel": format!("board:{name}")},
                                     "data": {"type": "stroke", "board": name, "stroke": stroke}}),
                    };
                    return (plan, format!("board {name} stroke {id} from {who}"));
                }
            },
            None if data.get("load") == Some(&J::Bool(true)) => {
                let plan = Plan::Load {
                    key: format!("{prefix}:whiteboard:{name}"),
                    board: name.to_string(),
                    connection: connection.to_string(),
                };
                return (plan, format!("board {name} load for {connection}"));
            }
            None => r#"a board message needs "stroke" or "load": true"#.to_string(),
        },
    };
    (
        Plan::Send(vec![json!({"to": {"connection": connection},
                               "data": {"type": "error", "board": board, "error": error}})]),
        format!("board {} error to {connection}", board_text(board)),
    )
}

/// 1 to 64 characters of `A-Z a-z 0-9 _ -`.
fn is_board_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_number(v: Option<&J>, low: f64, high: f64) -> bool {
    v.and_then(J::as_f64).is_some_and(|n| low <= n && n <= high)
}

/// What is wrong with a whiteboard stroke, or `None` when it is well formed.
fn stroke_error(stroke: &J) -> Option<String> {
    let Some(stroke) = stroke.as_object() else {
        return Some("stroke must be an object".into());
    };
    let id = stroke.get("id").and_then(J::as_str);
    if !id.is_some_and(|id| (1..=64).contains(&id.chars().count())) {
        return Some("stroke.id must be a string of 1 to 64 characters".into());
    }
    let color = stroke.get("color").and_then(J::as_str);
    if !color.is_some_and(|c| {
        c.len() == 7 && c.starts_with('#') && c[1..].bytes().all(|b| b.is_ascii_hexdigit())
    }) {
        return Some(r##"stroke.color must be "#rrggbb""##.into());
    }
    if !is_number(stroke.get("width"), 1.0, 50.0) {
        return Some("stroke.width must be a number from 1 to 50".into());
    }
    let points = stroke.get("points").and_then(J::as_array);
    let Some(points) = points.filter(|p| (1..=MAX_POINTS).contains(&p.len())) else {
        return Some(format!(
            "stroke.points must be a list of 1 to {MAX_POINTS} points"
        ));
    };
    let is_point = |p: &J| {
        p.as_array()
            .is_some_and(|xy| xy.len() == 2 && xy.iter().all(|c| is_number(Some(c), 0.0, 1.0)))
    };
    if !points.iter().all(is_point) {
        return Some("every point must be [x, y] with numbers from 0 to 1".into());
    }
    None
}

/// Sorts strokes by `seq`, a stream entry id `"<ms>-<n>"`.
fn seq_key(stroke: &J) -> Result<(i128, i128), String> {
    let Some(stroke) = stroke.as_object() else {
        return Err(format!("a stored stroke is not an object: {stroke}"));
    };
    let seq = match stroke.get("seq") {
        None => "0-0",
        Some(J::String(seq)) => seq,
        Some(other) => return Err(format!("a stored stroke's seq is not text: {other}")),
    };
    let (ms, n) = seq.split_once('-').unwrap_or((seq, ""));
    let number = |s: &str| {
        s.trim()
            .parse::<i128>()
            .map_err(|_| format!("a stored stroke's seq is not an entry id: {seq:?}"))
    };
    Ok((number(ms)?, if n.is_empty() { 0 } else { number(n)? }))
}

/// The `/send` bodies of a board's snapshot: its stored strokes ordered by `seq`, at most
/// [`SNAPSHOT_STROKES`] per message, `last` on the final one (which may be empty).
fn snapshots(board: &str, connection: &str, stored: &[Vec<u8>]) -> Result<Vec<J>, String> {
    let mut strokes = Vec::with_capacity(stored.len());
    for raw in stored {
        let stroke: J =
            serde_json::from_slice(raw).map_err(|e| format!("a stored stroke is not JSON: {e}"))?;
        let seq = seq_key(&stroke)?;
        strokes.push((seq, stroke));
    }
    strokes.sort_by_key(|(seq, _)| *seq);
    let strokes: Vec<J> = strokes.into_iter().map(|(_, stroke)| stroke).collect();
    let mut chunks: Vec<&[J]> = strokes.chunks(SNAPSHOT_STROKES).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let count = chunks.len();
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            json!({"to": {"connection": connection},
                   "data": {"type": "snapshot", "board": board, "strokes": chunk,
                            "last": i == count - 1}})
        })
        .collect())
}

/// A board name for the log: a string as it is, anything else as JSON.
fn board_text(v: &J) -> String {
    match v {
        J::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A Redis error as text: a server error as Redis sent it (`CODE detail`).
fn redis_text(e: &RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

/// Whether a Redis error means the link failed (reconnect and retry) rather than a command.
///
/// On a cluster, so do the cluster's own errors (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, MASTERDOWN,
/// no node for a slot): the cluster is changing, and a new connection gets its new layout. On a
/// single Redis they mean that REDIS_URL is a cluster node: a misconfiguration.
fn is_connection_error(e: &RedisError, cluster: bool) -> bool {
    let link_failed = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::BusyLoading)
        );
    // Under Sentinel: no primary named right now (a failover under way), or a demoted one.
    let primary_moving = matches!(
        e.kind(),
        ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::Server(ServerErrorKind::ReadOnly)
    );
    let cluster_changing = e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound | ErrorKind::Server(ServerErrorKind::MasterDown)
        );
    link_failed || primary_moving || (cluster && cluster_changing)
}

/// Why the backend leaves its loop.
enum Halt {
    /// Redis failed: NOGROUP recreates the group, a failed link reconnects, anything else ends
    /// the backend with status 1.
    Redis(RedisError),
    /// Misconfigured: exit status 1.
    Fatal(String),
}

impl From<RedisError> for Halt {
    fn from(e: RedisError) -> Self {
        Halt::Redis(e)
    }
}

/// Where Redis is: a single Redis, a Redis Cluster, or the primary the Sentinels name.
enum Client {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
    Sentinel {
        sentinels: Box<tokio::sync::Mutex<redis::sentinel::Sentinel>>,
        master: String,
        node: redis::sentinel::SentinelNodeConnectionInfo,
    },
}

impl Client {
    /// `block_ms`: the blocking read's timeout, which the response timeout must outlast.
    fn open(
        url: &str,
        cluster: bool,
        sentinel: Option<&str>,
        block_ms: u64,
    ) -> Result<Self, RedisError> {
        if let Some(master) = sentinel {
            let urls: Vec<&str> = url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect();
            let mut data = redis::RedisConnectionInfo::default();
            if let Ok(user) = std::env::var("REDIS_USERNAME") {
                data = data.set_username(user);
            }
            if let Ok(password) = std::env::var("REDIS_PASSWORD") {
                data = data.set_password(password);
            }
            return Ok(Client::Sentinel {
                sentinels: Box::new(tokio::sync::Mutex::new(redis::sentinel::Sentinel::build(
                    urls,
                )?)),
                master: master.to_string(),
                node: redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(data),
            });
        }
        if !cluster {
            return Ok(Client::Single(redis::Client::open(url)?));
        }
        let nodes = url.split(',').map(str::trim).filter(|u| !u.is_empty());
        let client = ClusterClient::builder(nodes)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(response_timeout(block_ms))
            // No retries inside the client: a failed command comes back to the backend's own
            // reconnect path, which reads its pending list again. (A read whose reply was lost
            // and silently retried would leave entries in that list, unseen.)
            .retries(0)
            .build()?;
        Ok(Client::Cluster(Box::new(client)))
    }

    /// A new connection, which shares no TCP connection with any other [`Conn`] (on a cluster:
    /// its own connection to each node).
    async fn connect(&self, block_ms: u64) -> Result<Conn, RedisError> {
        match self {
            Client::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(response_timeout(block_ms)));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Conn::Single(conn))
            }
            Client::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
            Client::Sentinel {
                sentinels,
                master,
                node,
            } => {
                // Asked on every connect: after a failover, this is the new primary.
                let primary = sentinels
                    .lock()
                    .await
                    .async_master_for(master, Some(node))
                    .await?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(response_timeout(block_ms)));
                let conn = primary
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Conn::Single(conn))
            }
        }
    }
}

/// The response timeout outlasts the blocking read, so a silently dead link is noticed.
fn response_timeout(block_ms: u64) -> Duration {
    Duration::from_millis(block_ms) + Duration::from_secs(10)
}

/// A connection to a single Redis or to a cluster. Commands run on either the same way,
/// `cmd.query_async(&mut conn)`: on a cluster, each goes to the node that serves its key.
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The two connections to Redis: one for the blocking read, one for everything else (a
/// connection answers its commands in order, so nothing could pass a blocked read).
struct Links {
    reader: Conn,
    cmds: Conn,
}

/// Moves an entry to the dead-letter stream: adds it there, then acknowledges it, atomically
/// (`EVAL`: Redis caches the script). KEYS: the inbound stream, the dead-letter stream (one hash
/// slot); ARGV: the group, the entry id, then the dead letter's fields as name, value, ...
const DEAD_LETTER_LUA: &str = r"
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
";

struct Backend {
    cfg: Settings,
    client: Client,
    stop: CancellationToken,
    handled: u64,
    /// Whether our own pending list may hold entries to (re)process: at start, after taking
    /// over entries, and after a failed delivery.
    pending: bool,
    retry_at: Instant,
    /// Before retrying a failed delivery: 0.5 s, doubled up to 30 s.
    backoff: Duration,
    /// When to refresh our entries and look for abandoned ones.
    next_tick: Instant,
    /// The entry whose reply the gateway could not take for now: it is retried without being
    /// delivered again, so that the retries do not count towards `--max-deliveries`.
    transient_id: Option<String>,
    /// Entry id -> the last handler error, for the dead-letter `reason`.
    errors: HashMap<String, String>,
}

impl Backend {
    fn new(cfg: Settings, client: Client, stop: CancellationToken) -> Self {
        Backend {
            cfg,
            client,
            stop,
            handled: 0,
            pending: true,
            retry_at: Instant::now(),
            backoff: FIRST_BACKOFF,
            next_tick: Instant::now(),
            transient_id: None,
            errors: HashMap::new(),
        }
    }

    fn remaining(&self) -> Option<u64> {
        self.cfg.max.map(|max| max.saturating_sub(self.handled))
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        self.client.connect(self.cfg.block_ms).await
    }

    async fn ensure_group(&self, conn: &mut Conn) -> Result<(), RedisError> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.cfg.key)
            .arg(&self.cfg.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Ok(()) => {
                log(format_args!(
                    "created group {} on {}",
                    self.cfg.group, self.cfg.key
                ));
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Takes over entries that other (dead) consumers left pending too long.
    ///
    /// JUSTID: taking an entry over is not a delivery; reading it from our pending list is.
    async fn reclaim(&mut self, conn: &mut Conn) -> Result<(), RedisError> {
        let (mut start, mut total, mut deleted) = ("0-0".to_string(), 0, 0);
        loop {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&self.cfg.key)
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg(self.cfg.claim_idle_ms)
                .arg(&start)
                .arg("COUNT")
                .arg(100)
                .arg("JUSTID")
                .query_async(conn)
                .await?;
            // [next cursor, claimed ids, deleted ids]
            let Value::Array(parts) = reply else { break };
            if let Some(Value::Array(ids)) = parts.get(1) {
                total += ids.len();
            }
            if let Some(Value::Array(ids)) = parts.get(2) {
                deleted += ids.len();
            }
            match parts.first().and_then(text) {
                Some(next) if next != "0-0" => start = next,
                _ => break,
            }
        }
        if total > 0 {
            log(format_args!(
                "reclaimed {total} entries idle for more than {} ms",
                self.cfg.claim_idle_ms
            ));
            self.pending = true;
        }
        if deleted > 0 {
            log(format_args!(
                "{deleted} abandoned entries were deleted from the stream; dropped"
            ));
        }
        Ok(())
    }

    /// `XPENDING key group [IDLE ms] - + count consumer`: the oldest entries this consumer
    /// holds, as (id, consumer, idle ms, deliveries).
    async fn my_pending(
        &self,
        conn: &mut Conn,
        min_idle_ms: Option<u64>,
        count: usize,
    ) -> Result<Vec<(String, String, u64, u64)>, RedisError> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&self.cfg.key).arg(&self.cfg.group);
        if let Some(ms) = min_idle_ms {
            cmd.arg("IDLE").arg(ms);
        }
        cmd.arg("-").arg("+").arg(count).arg(&self.cfg.consumer);
        cmd.query_async(conn).await
    }

    /// Resets the idle time of the entries we hold, so no other consumer takes them over while
    /// we work on them. The min-idle guard leaves alone an entry another consumer has just taken
    /// (its idle time is near 0).
    async fn keep_fresh(&self, conn: &mut Conn) -> Result<(), RedisError> {
        let guard = self.cfg.reclaim_every_ms / 2;
        let mine = self.my_pending(conn, Some(guard), 100).await?;
        if !mine.is_empty() {
            let mut claim = redis::cmd("XCLAIM");
            claim
                .arg(&self.cfg.key)
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg(guard);
            for (id, ..) in &mine {
                claim.arg(id);
            }
            claim.arg("JUSTID").query_async::<Value>(conn).await?;
        }
        Ok(())
    }

    /// Every `--reclaim-every-ms`: keep our entries fresh, then take over abandoned ones.
    async fn tick(&mut self, conn: &mut Conn) -> Result<(), RedisError> {
        let now = Instant::now();
        if now < self.next_tick {
            return Ok(());
        }
        self.next_tick = now + Duration::from_millis(self.cfg.reclaim_every_ms);
        self.keep_fresh(conn).await?;
        self.reclaim(conn).await
    }

    async fn read(
        &self,
        conn: &mut Conn,
        start: &str,
        block_ms: Option<u64>,
        count: Option<u64>,
    ) -> Result<Vec<Entry>, RedisError> {
        let count = count.unwrap_or_else(|| self.remaining().map_or(100, |r| r.clamp(1, 100)));
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(ms) = block_ms {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS").arg(&self.cfg.key).arg(start);
        Ok(parse_read_reply(cmd.query_async(conn).await?))
    }

    /// `XRANGE key id id`: the entry, or `None` when it was deleted from the stream.
    async fn entry(&self, conn: &mut Conn, id: &str) -> Result<Option<Fields>, RedisError> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(&self.cfg.key)
            .arg(id)
            .arg(id)
            .query_async(conn)
            .await?;
        Ok(parse_entries(reply)
            .into_iter()
            .next()
            .and_then(|entry| entry.fields))
    }

    /// Does the entry's work (the whiteboard stores strokes) and returns the `/send` bodies to
    /// post, in order, and a short description for the log.
    async fn work_for(
        &self,
        conn: &mut Conn,
        entry_id: &str,
        fields: &Fields,
    ) -> Result<(Vec<J>, String), Failure> {
        // Redis failing is not the entry's fault; a command Redis refused (WRONGTYPE) is.
        let failed = |e: RedisError| {
            if is_connection_error(&e, self.cfg.redis_cluster) {
                return Failure::Redis(e);
            }
            Failure::Handler(redis_text(&e))
        };
        let (plan, what) = plan_for(&self.cfg.prefix, entry_id, fields);
        let bodies = match plan {
            Plan::Send(bodies) => bodies,
            Plan::Store {
                key,
                field,
                value,
                body,
            } => {
                redis::cmd("HSET")
                    .arg(key)
                    .arg(field)
                    .arg(value)
                    .query_async::<i64>(conn)
                    .await
                    .map_err(failed)?;
                vec![body]
            }
            Plan::Load {
                key,
                board,
                connection,
            } => {
                let stored: Vec<Vec<u8>> = redis::cmd("HVALS")
                    .arg(key)
                    .query_async(conn)
                    .await
                    .map_err(failed)?;
                snapshots(&board, &connection, &stored).map_err(Failure::Handler)?
            }
        };
        Ok((bodies, what))
    }

    fn check_fail_on(&self, bodies: &[J]) -> Result<(), Failure> {
        let Some(fail_on) = &self.cfg.fail_on else {
            return Ok(());
        };
        if bodies
            .iter()
            .any(|body| body["data"].get("text").and_then(J::as_str) == Some(fail_on))
        {
            return Err(Failure::Handler(format!(
                "--fail-on {fail_on:?}: this handler cannot take it"
            )));
        }
        Ok(())
    }

    /// Posts every body, all of them again after a failure: a reply sent twice is harmless (the
    /// page merges strokes by id), a reply never sent is not. 202, or the last refusal.
    async fn deliver(&self, bodies: &[J]) -> Result<u16, Failure> {
        self.check_fail_on(bodies)?;
        if self.cfg.work_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.cfg.work_ms)).await;
        }
        let mut status = 202;
        for body in bodies {
            let answer = self.cfg.api.send(body).await?;
            if answer != 202 {
                status = answer;
            }
        }
        Ok(status)
    }

    /// `Ok(true)` when the entry is done (acknowledged), `Ok(false)` to keep it pending.
    async fn handle(&mut self, conn: &mut Conn, entry: Entry) -> Result<bool, Halt> {
        let id = entry.id;
        let Some(fields) = entry.fields else {
            // Trimmed away while it was pending: nothing left to do.
            self.ack(conn, &id).await?;
            log(format_args!(
                "{id} was deleted from the stream; acknowledged"
            ));
            self.done(&id);
            return Ok(true);
        };
        let mut what = "entry".to_string();
        let outcome = match self.work_for(conn, &id, &fields).await {
            Ok((bodies, description)) => {
                what = description;
                self.deliver(&bodies).await
            }
            Err(failure) => Err(failure),
        };
        let status = match outcome {
            Ok(status) => status,
            Err(Failure::Transient(e)) => {
                log(format_args!(
                    "{id} {what}: not delivered ({e}); left pending, retry in {:.1} s",
                    self.backoff.as_secs_f64()
                ));
                self.transient_id = Some(id);
                return Ok(false);
            }
            Err(Failure::Handler(e)) => {
                // A bug, or an entry this handler cannot take: retry, then give up.
                log(format_args!(
                    "{id} {what}: handler failed ({e}); left pending, retry in {:.1} s",
                    self.backoff.as_secs_f64()
                ));
                self.errors
                    .insert(id.clone(), format!("handler failed: {e}"));
                if self.transient_id.as_ref() == Some(&id) {
                    self.transient_id = None;
                }
                return Ok(false);
            }
            Err(Failure::Fatal(e)) => return Err(Halt::Fatal(e)),
            Err(Failure::Redis(e)) => return Err(Halt::Redis(e)),
        };
        self.ack(conn, &id).await?;
        self.done(&id);
        if status == 202 {
            log(format_args!("{id} {what}: sent, acknowledged"));
        } else {
            log(format_args!(
                "{id} {what}: the gateway refused the reply ({status}); dropped, acknowledged"
            ));
        }
        Ok(true)
    }

    fn done(&mut self, id: &str) {
        self.handled += 1;
        self.errors.remove(id);
        if self.transient_id.as_deref() == Some(id) {
            self.transient_id = None;
        }
    }

    async fn ack(&self, conn: &mut Conn, id: &str) -> Result<(), RedisError> {
        redis::cmd("XACK")
            .arg(&self.cfg.key)
            .arg(&self.cfg.group)
            .arg(id)
            .query_async::<i64>(conn)
            .await
            .map(|_| ())
    }

    /// Moves a pending entry to the dead-letter stream, atomically with its XACK.
    async fn dead_letter(
        &mut self,
        conn: &mut Conn,
        id: &str,
        deliveries: u64,
    ) -> Result<(), RedisError> {
        let Some(mut fields) = self.entry(conn, id).await? else {
            self.ack(conn, id).await?;
            log(format_args!(
                "{id} was deleted from the stream; acknowledged"
            ));
            self.done(id);
            return Ok(());
        };
        let reason = self.errors.get(id).cloned().unwrap_or_else(|| {
            format!(
                "still pending after {deliveries} deliveries (its consumers crashed or gave up)"
            )
        });
        for (name, value) in [
            ("original_id", id.to_string()),
            ("deliveries", deliveries.to_string()),
            ("reason", reason.clone()),
        ] {
            match fields.iter_mut().find(|(k, _)| k == name.as_bytes()) {
                Some((_, v)) => *v = value.into_bytes(),
                None => fields.push((name.into(), value.into_bytes())),
            }
        }
        let mut eval = redis::cmd("EVAL");
        eval.arg(DEAD_LETTER_LUA)
            .arg(2)
            .arg(&self.cfg.key)
            .arg(&self.cfg.dead_key)
            .arg(&self.cfg.group)
            .arg(id);
        for (name, value) in &fields {
            eval.arg(name).arg(value);
        }
        eval.query_async::<i64>(conn).await?;
        self.done(id);
        self.backoff = FIRST_BACKOFF; // the entry that kept failing is gone
        log(format_args!(
            "{id} moved to {} after {deliveries} deliveries: {reason}",
            self.cfg.dead_key
        ));
        Ok(())
    }

    fn failed(&mut self) {
        self.pending = true;
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Handles new entries in order; stops at the first that must be retried.
    async fn process(&mut self, conn: &mut Conn, entries: Vec<Entry>) -> Result<(), Halt> {
        for entry in entries {
            if !self.handle(conn, entry).await? {
                self.failed();
                return Ok(());
            }
            self.backoff = FIRST_BACKOFF;
            if self.remaining() == Some(0) {
                return Ok(());
            }
            self.tick(conn).await?;
        }
        Ok(())
    }

    /// Handles our own pending entries, oldest first, one at a time so that each delivery Redis
    /// counts is one attempt; stops at the first that must be retried.
    async fn process_pending(&mut self, conn: &mut Conn) -> Result<(), Halt> {
        while !self.stop.is_cancelled() && self.remaining() != Some(0) {
            self.tick(conn).await?;
            let head = self.my_pending(conn, None, 1).await?;
            let Some((id, _, _, deliveries)) = head.into_iter().next() else {
                self.pending = false;
                return Ok(());
            };
            let entry = if self.transient_id.as_ref() == Some(&id) {
                // The gateway failed: not another delivery.
                let fields = self.entry(conn, &id).await?;
                Entry { id, fields }
            } else if deliveries >= self.cfg.max_deliveries {
                self.dead_letter(conn, &id, deliveries).await?;
                continue;
            } else {
                match self
                    .read(conn, "0", None, Some(1))
                    .await?
                    .into_iter()
                    .next()
                {
                    Some(entry) => entry,
                    None => continue,
                }
            };
            if !self.handle(conn, entry).await? {
                self.failed();
                return Ok(());
            }
            self.backoff = FIRST_BACKOFF;
        }
        Ok(())
    }

    async fn step(&mut self, links: &mut Links) -> Result<(), Halt> {
        self.tick(&mut links.cmds).await?;
        if self.pending {
            let wait = self.retry_at.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                // Short naps, so that the ticks go on.
                tokio::select! {
                    _ = self.stop.cancelled() => {}
                    _ = tokio::time::sleep(wait.min(Duration::from_millis(500))) => {}
                }
                return Ok(());
            }
            self.process_pending(&mut links.cmds).await
        } else {
            // Wake up for the next tick even when nothing arrives.
            let until_tick = self.next_tick.saturating_duration_since(Instant::now());
            let block = self.cfg.block_ms.min(until_tick.as_millis() as u64).max(1);
            let entries = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                entries = self.read(&mut links.reader, ">", Some(block), None) => entries?,
            };
            self.process(&mut links.cmds, entries).await
        }
    }

    /// Connects when needed, (re)creates the group and takes over abandoned entries when needed,
    /// then takes one step.
    async fn turn(&mut self, links: &mut Option<Links>, ready: &mut bool) -> Result<(), Halt> {
        if links.is_none() {
            *links = Some(Links {
                reader: self.connect().await?,
                cmds: self.connect().await?,
            });
        }
        let Some(links) = links.as_mut() else {
            return Ok(());
        };
        if !*ready {
            self.ensure_group(&mut links.cmds).await?;
            self.next_tick = Instant::now(); // take over abandoned entries now
            self.tick(&mut links.cmds).await?;
            *ready = true;
            // (Re)read our own pending list.
            self.pending = true;
            self.retry_at = Instant::now();
        }
        self.step(links).await
    }

    /// Removes this consumer from the group when it holds nothing, so names do not pile up.
    async fn cleanup(&self) {
        let result: Result<(), RedisError> = async {
            let mut conn = self.connect().await?;
            let pending = self.my_pending(&mut conn, None, 1).await?;
            if pending.is_empty() {
                redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&self.cfg.key)
                    .arg(&self.cfg.group)
                    .arg(&self.cfg.consumer)
                    .query_async::<i64>(&mut conn)
                    .await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            log(format_args!(
                "could not remove consumer {}: {}",
                self.cfg.consumer,
                redis_text(&e)
            ));
        }
    }

    /// Serves until a signal or `--max`; `Err` with the reason when it must exit with status 1.
    async fn run(&mut self) -> Result<(), String> {
        log(format_args!(
            "reading {} as {}/{}, replying via {}",
            self.cfg.key, self.cfg.group, self.cfg.consumer, self.cfg.api.base
        ));
        let (mut links, mut ready) = (None, false);
        while !self.stop.is_cancelled() && self.remaining() != Some(0) {
            match self.turn(&mut links, &mut ready).await {
                Ok(()) => {}
                Err(Halt::Fatal(e)) => return Err(e),
                // Stream or group deleted under us: create it again. (UNBLOCKED: the stream was
                // deleted during our blocking read.)
                Err(Halt::Redis(e)) if matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")) => {
                    log(format_args!("{}; creating the group again", redis_text(&e)));
                    ready = false;
                }
                Err(Halt::Redis(e)) if is_connection_error(&e, self.cfg.redis_cluster) => {
                    log(format_args!("Redis: {}; retrying in 1 s", redis_text(&e)));
                    (links, ready) = (None, false);
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(Halt::Redis(e)) => return Err(format!("Redis: {}", redis_text(&e))),
            }
        }
        // A fresh connection: a read interrupted by a signal leaves the reader mid-reply, and
        // closing it ends that read before Redis delivers anything to it.
        drop(links);
        self.cleanup().await;
        log(format_args!(
            "stopped after handling {} entries",
            self.handled
        ));
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cfg = match settings() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let client = match Client::open(
        &cfg.redis_url,
        cfg.redis_cluster,
        cfg.redis_sentinel.as_deref(),
        cfg.block_ms,
    ) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("REDIS_URL `{}`: {e}", cfg.redis_url);
            return ExitCode::from(2);
        }
    };
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                // Only a blocking read or a wait is interrupted; an entry in progress completes.
                log(format_args!("{name}: stopping"));
                stop.cancel();
            }
        }
    });
    let mut backend = Backend::new(cfg, client, stop);
    match backend.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(e);
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &[u8])]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    fn json_entry(data: &J) -> Fields {
        fields(&[
            ("connection", b"c1"),
            ("user", b""),
            ("data", data.to_string().as_bytes()),
            ("encoding", b"json"),
        ])
    }

    /// The bodies of a plan that only sends.
    fn sent(plan: Plan) -> Vec<J> {
        match plan {
            Plan::Send(bodies) => bodies,
            other => panic!("not a plain send: {other:?}"),
        }
    }

    #[test]
    fn chat_goes_to_the_channel_and_anything_else_is_echoed() {
        let (plan, what) = plan_for(
            "p",
            "1-0",
            &json_entry(&json!({"channel": "room:1", "text": "hi"})),
        );
        assert_eq!(
            sent(plan),
            [json!({"to": {"channel": "room:1"}, "data": {"from": "c1", "text": "hi"}})]
        );
        assert_eq!(what, "chat room:1 from c1");
        let (plan, what) = plan_for(
            "p",
            "1-0",
            &fields(&[
                ("connection", b"c1"),
                ("user", b"alice"),
                ("data", br#"{"channel":"","text":"hi"}"#),
                ("encoding", b"json"),
            ]),
        );
        assert_eq!(
            sent(plan),
            [json!({"to": {"connection": "c1"}, "data": {"echo": {"channel": "", "text": "hi"}}})]
        );
        assert_eq!(what, "echo to c1");
    }

    #[test]
    fn msgpack_data_is_decoded() {
        // {"channel": "r", "text": "t", "bin": b"\x00\xff"} in MessagePack.
        let data = b"\x83\xa7channel\xa1r\xa4text\xa1t\xa3bin\xc4\x02\x00\xff";
        let (plan, _) = plan_for(
            "p",
            "1-0",
            &fields(&[
                ("connection", b"c1"),
                ("user", b"bob"),
                ("data", data),
                ("encoding", b"msgpack"),
            ]),
        );
        assert_eq!(
            sent(plan),
            [json!({"to": {"channel": "r"}, "data": {"from": "bob", "text": "t"}})]
        );
        // A string that is not UTF-8, or trailing bytes: the bytes are echoed, as base64.
        for data in [&b"\x81\xa1k\xa1\xff"[..], b"\x01\x02"] {
            let entry = fields(&[
                ("connection", b"c1"),
                ("data", data),
                ("encoding", b"msgpack"),
            ]);
            assert_eq!(
                sent(plan_for("p", "1-0", &entry).0),
                [json!({"to": {"connection": "c1"},
                        "data": {"echo": {"msgpack_base64": base64(data)}}})]
            );
        }
    }

    #[test]
    fn a_stroke_is_stored_with_its_seq_and_published() {
        let stroke = json!({"id": "s1", "color": "#00ffAA", "width": 3,
                            "points": [[0, 0.5], [1, 1.0]]});
        let (plan, what) = plan_for(
            "p",
            "17-3",
            &json_entry(&json!({"board": "b-1", "stroke": stroke})),
        );
        let mut with_seq = stroke.clone();
        with_seq["seq"] = json!("17-3");
        let Plan::Store {
            key,
            field,
            value,
            body,
        } = plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!((key.as_str(), field.as_str()), ("p:whiteboard:b-1", "s1"));
        assert_eq!(serde_json::from_str::<J>(&value).unwrap(), with_seq);
        assert_eq!(
            body,
            json!({"to": {"channel": "board:b-1"},
                   "data": {"type": "stroke", "board": "b-1", "stroke": with_seq}})
        );
        assert_eq!(what, "board b-1 stroke s1 from c1");
    }

    #[test]
    fn bad_board_messages_get_an_error() {
        let good = json!({"id": "s", "color": "#000000", "width": 1, "points": [[0, 0]]});
        let cases = [
            (json!({"board": "a b"}), "board must be 1 to 64"),
            (json!({"board": 5, "load": true}), "board must be 1 to 64"),
            (json!({"board": "b"}), r#"needs "stroke" or "load": true"#),
            (
                json!({"board": "b", "load": 1}),
                r#"needs "stroke" or "load": true"#,
            ),
            (
                json!({"board": "b", "stroke": null}),
                "stroke must be an object",
            ),
            (json!({"board": "b", "stroke": {"id": ""}}), "stroke.id"),
            (
                json!({"board": "b", "stroke": {"id": "x".repeat(65)}}),
                "stroke.id",
            ),
            (
                json!({"board": "b", "stroke": {"id": "s", "color": "red"}}),
                "stroke.color",
            ),
            (
                json!({"board": "b", "stroke": {"id": "s", "color": "#00000g"}}),
                "stroke.color",
            ),
            (
                json!({"board": "b", "stroke": {"id": "s", "color": "#000000", "width": 51}}),
                "stroke.width",
            ),
            (
                json!({"board": "b", "stroke": {"id": "s", "color": "#000000", "width": true}}),
                "stroke.width",
            ),
            (
                json!({"board": "b", "stroke": {"id": "s", "color": "#000000", "width": 1,
                                                "points": []}}),
                "stroke.points must be a list of 1 to 500 points",
            ),
            (
                json!({"board": "b", "stroke": {"id": "s", "color": "#000000", "width": 1,
                                                "points": [[0, 1.5]]}}),
                "every point",
            ),
            (
                json!({"board": "b", "stroke": {"id": "s", "color": "#000000", "width": 1,
                                                "points": [[0, 0, 0]]}}),
                "every point",
            ),
        ];
        for (data, error) in cases {
            let (plan, what) = plan_for("p", "1-0", &json_entry(&data));
            let bodies = sent(plan);
            assert_eq!(bodies.len(), 1, "{data}");
            let reply = &bodies[0];
            assert_eq!(reply["to"], json!({"connection": "c1"}), "{data}");
            assert_eq!(reply["data"]["type"], "error", "{data}");
            assert_eq!(reply["data"]["board"], data["board"], "{data}");
            let got = reply["data"]["error"].as_str().unwrap();
            assert!(got.contains(error), "{data}: {got}");
            assert_eq!(
                what,
                format!("board {} error to c1", board_text(&data["board"]))
            );
        }
        assert!(stroke_error(&good).is_none());
        let many = json!({"id": "s", "color": "#000000", "width": 50.0,
                          "points": vec![[1, 0]; MAX_POINTS]});
        assert!(stroke_error(&many).is_none());
    }

    #[test]
    fn load_sends_the_strokes_in_seq_order_in_snapshots_of_at_most_100() {
        let (plan, what) = plan_for(
            "p",
            "1-0",
            &json_entry(&json!({"board": "b", "load": true})),
        );
        assert_eq!(
            plan,
            Plan::Load {
                key: "p:whiteboard:b".into(),
                board: "b".into(),
                connection: "c1".into()
            }
        );
        assert_eq!(what, "board b load for c1");

        let empty = snapshots("b", "c1", &[]).unwrap();
        assert_eq!(
            empty,
            [json!({"to": {"connection": "c1"},
                    "data": {"type": "snapshot", "board": "b", "strokes": [], "last": true}})]
        );
        // 250 strokes, stored out of order; "10-0" sorts after "9-5" (numbers, not text).
        let stored: Vec<Vec<u8>> = (0..250)
            .rev()
            .map(|i| json!({"id": format!("s{i}"), "seq": format!("{}-{}", i / 3, i % 3)}))
            .map(|s| s.to_string().into_bytes())
            .collect();
        let bodies = snapshots("b", "c1", &stored).unwrap();
        assert_eq!(bodies.len(), 3);
        let ids: Vec<&str> = bodies
            .iter()
            .flat_map(|b| b["data"]["strokes"].as_array().unwrap())
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = (0..250).map(|i| format!("s{i}")).collect();
        assert_eq!(ids, expected);
        let sizes: Vec<usize> = bodies
            .iter()
            .map(|b| b["data"]["strokes"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, [100, 100, 50]);
        let lasts: Vec<&J> = bodies.iter().map(|b| &b["data"]["last"]).collect();
        assert_eq!(lasts, [&json!(false), &json!(false), &json!(true)]);
        assert!(snapshots("b", "c1", &[b"not json".to_vec()]).is_err());
        assert!(snapshots("b", "c1", &[br#"{"seq":"x-1"}"#.to_vec()]).is_err());
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0, 255, 254, 1]), "AP/+AQ==");
    }
}
