//! A tiny chat backend for wsbridge, in Rust: the same behaviour as `examples/backend.py`.
//!
//! ```text
//! cargo run --example backend [-- --max N]
//! ```
//!
//! It reads the inbound stream `<prefix>:in:chat` with a Redis consumer group and answers through
//! the gateway's backend API (`POST /send`):
//!
//! - `data` is an object with a non-empty string `"channel"` and a `"text"`: the message goes to
//!   every subscriber of that channel as `{"from": <user, or connection when anonymous>, "text"}`;
//! - anything else is echoed to the sending connection as `{"echo": DATA}`.
//!
//! An entry is acknowledged (XACK) only after the gateway accepted the reply (202). When the
//! gateway answers 5xx (503: Redis did not take it) or 429, or cannot be reached, the entry stays
//! pending and is retried after a backoff, before any newer entry. A 400 or 413 means the reply
//! can never be taken: it is logged and acknowledged (dropped). Any other answer (401 wrong key,
//! 404 wrong URL) is a misconfiguration: the backend exits with status 1 without acknowledging.
//! At start, entries that a dead consumer left pending for more than `--claim-idle-ms` (60 s)
//! are taken over with XAUTOCLAIM. A group this backend creates starts at the beginning of the
//! stream, as the gateway's own groups do, so no stored entry is skipped. SIGTERM / SIGINT stop
//! it between entries.
//!
//! Settings come from flags or the environment: `REDIS_URL` (redis://127.0.0.1:6379),
//! `WSBRIDGE_API` (http://127.0.0.1:8081), `WSBRIDGE_API_KEY` (none), `PREFIX` (wsbridge),
//! `STREAM` (chat), `GROUP` (backend), `CONSUMER` (`<hostname>-<pid>`); `--max N` exits after
//! handling N entries.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: backend [--redis-url URL] [--api URL] [--api-key KEY] [--prefix P] \
[--stream S] [--group G] [--consumer C] [--block-ms MS] [--claim-idle-ms MS] [--max N]";

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
    redis_url: String,
    api: Api,
    group: String,
    consumer: String,
    key: String,
    block_ms: u64,
    claim_idle_ms: u64,
    max: Option<u64>,
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
    let mut api = env("WSBRIDGE_API", "http://127.0.0.1:8081");
    let mut api_key = std::env::var("WSBRIDGE_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let mut prefix = env("PREFIX", "wsbridge");
    let mut stream = env("STREAM", "chat");
    let mut group = env("GROUP", "backend");
    let mut consumer = env("CONSUMER", &format!("{hostname}-{}", std::process::id()));
    let (mut block_ms, mut claim_idle_ms, mut max) = (5000, 60_000, None);

    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag} needs a number, got `{v}`"))
        };
        match flag.as_str() {
            "--redis-url" => redis_url = value,
            "--api" => api = value,
            "--api-key" => api_key = Some(value),
            "--prefix" => prefix = value,
            "--stream" => stream = value,
            "--group" => group = value,
            "--consumer" => consumer = value,
            "--block-ms" => block_ms = number(&value)?,
            "--claim-idle-ms" => claim_idle_ms = number(&value)?,
            "--max" => max = Some(number(&value)?),
            _ => return Err(format!("unknown flag `{flag}`\n{USAGE}")),
        }
    }
    Ok(Settings {
        redis_url,
        api: Api::new(&api, api_key)?,
        group,
        consumer,
        key: format!("{prefix}:in:{stream}"),
        block_ms,
        claim_idle_ms,
        max,
    })
}

/// The gateway's backend API: one plain HTTP/1.1 connection per call (loopback is cheap, and no
/// stale keep-alive connection can ever turn a good reply into a failure).
struct Api {
    base: String,
    authority: String,
    send_path: String,
    key: Option<String>,
}

/// Why a reply was not taken.
enum PostError {
    /// Try again later: the entry stays pending.
    Transient(String),
    /// Retrying cannot help until the backend is reconfigured.
    Fatal(String),
}

impl Api {
    fn new(base: &str, key: Option<String>) -> Result<Self, String> {
        let uri: hyper::Uri = base
            .parse()
            .map_err(|e| format!("WSBRIDGE_API `{base}`: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "WSBRIDGE_API `{base}`: only http:// is supported by this example"
            ));
        }
        let host = uri
            .host()
            .ok_or(format!("WSBRIDGE_API `{base}`: no host"))?;
        let authority = format!("{host}:{}", uri.port_u16().unwrap_or(80));
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            authority,
            send_path: format!("{}/send", uri.path().trim_end_matches('/')),
            key,
        })
    }

    /// `POST /send`: 202, or the status of a reply the gateway will never take (400, 413).
    async fn send(&self, body: &serde_json::Value) -> Result<u16, PostError> {
        let (status, detail) = match tokio::time::timeout(Duration::from_secs(10), self.post(body))
            .await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(PostError::Transient(format!("gateway unreachable: {e}"))),
            Err(_) => {
                return Err(PostError::Transient(
                    "gateway did not answer within 10 s".into(),
                ))
            }
        };
        match status {
            202 | 400 | 413 | 422 => Ok(status),
            408 | 429 | 500.. => Err(PostError::Transient(format!("{status} {detail}"))),
            401 | 403 => Err(PostError::Fatal(format!(
                "the gateway refused the API key ({status}): {detail}"
            ))),
            _ => Err(PostError::Fatal(format!(
                "unexpected answer from {}/send ({status}): {detail}",
                self.base
            ))),
        }
    }

    async fn post(&self, body: &serde_json::Value) -> Result<(u16, String), String> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut request = hyper::Request::post(self.send_path.as_str())
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.key {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
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

/// One stream entry; `fields` is `None` when the entry was trimmed away while pending.
struct Entry {
    id: String,
    fields: Option<HashMap<String, Vec<u8>>>,
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
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            continue;
        };
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
                        .filter_map(|kv| Some((text(&kv[0])?, bytes(kv.get(1)?)?)))
                        .collect(),
                ),
                Some(Value::Map(pairs)) => Some(
                    pairs
                        .iter()
                        .filter_map(|(k, v)| Some((text(k)?, bytes(v)?)))
                        .collect(),
                ),
                _ => None,
            };
            out.push(Entry { id, fields });
        }
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

/// The `/send` body for one entry, and a short description for the log.
fn reply_for(fields: &HashMap<String, Vec<u8>>) -> (serde_json::Value, String) {
    let field = |name: &str| {
        fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let connection = field("connection");
    let user = field("user");
    let from = if user.is_empty() { &connection } else { &user };
    let raw = fields.get("data").map(Vec::as_slice).unwrap_or(b"null");
    let data = if field("encoding") == "msgpack" {
        match rmpv::decode::read_value(&mut &raw[..]) {
            Ok(value) => msgpack_to_json(value),
            Err(_) => json!({"msgpack_base64": base64(raw)}),
        }
    } else {
        serde_json::from_slice(raw)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(raw).into()))
    };
    let channel = data
        .get("channel")
        .and_then(|c| c.as_str())
        .filter(|c| !c.is_empty());
    match (channel, data.get("text")) {
        (Some(channel), Some(text)) => (
            json!({"to": {"channel": channel}, "data": {"from": from, "text": text}}),
            format!("chat {channel} from {from}"),
        ),
        _ => (
            json!({"to": {"connection": connection}, "data": {"echo": data}}),
            format!("echo to {connection}"),
        ),
    }
}

/// A MessagePack value as JSON: binary and ext data become base64 text, non-string map keys
/// their JSON text, NaN and infinities null (as `examples/backend.py` does).
fn msgpack_to_json(v: rmpv::Value) -> serde_json::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(b),
        M::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(n), _) => J::from(n),
            (None, Some(n)) => J::from(n),
            _ => J::Null,
        },
        M::F32(f) => serde_json::Number::from_f64(f64::from(f)).map_or(J::Null, J::Number),
        M::F64(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        M::String(s) => match s.into_str() {
            Some(s) => J::String(s),
            None => J::Null,
        },
        M::Binary(b) => J::String(base64(&b)),
        M::Array(items) => J::Array(items.into_iter().map(msgpack_to_json).collect()),
        M::Map(pairs) => J::Object(
            pairs
                .into_iter()
                .map(|(k, v)| {
                    let key = match msgpack_to_json(k) {
                        J::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, msgpack_to_json(v))
                })
                .collect(),
        ),
        M::Ext(code, data) => json!({"ext": code, "data": base64(&data)}),
    }
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How a run ends.
enum Exit {
    /// Signal or `--max` reached.
    Done,
    /// Misconfigured: exit status 1.
    Fatal(String),
}

struct Backend {
    cfg: Settings,
    client: redis::Client,
    stop: CancellationToken,
    handled: u64,
    /// Our own pending list must be (re)read: at start and after a failed delivery.
    pending: bool,
    retry_at: Instant,
    backoff: Duration,
}

impl Backend {
    fn remaining(&self) -> Option<u64> {
        self.cfg.max.map(|max| max.saturating_sub(self.handled))
    }

    /// Connects (two links: one for the blocking read, one for everything else), makes sure the
    /// group exists and reclaims abandoned entries, then serves until done or Redis fails.
    async fn session(&mut self) -> Result<Exit, RedisError> {
        // The blocking read needs no response timeout (redis-rs defaults to 500 ms); the BLOCK
        // argument bounds it, and the select on `stop` below interrupts it.
        let mut reader = self
            .client
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await?;
        let mut cmds = self
            .client
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5))),
            )
            .await?;
        self.ensure_group(&mut cmds).await?;
        self.reclaim(&mut cmds).await?;
        self.pending = true;
        self.retry_at = Instant::now();
        while !self.stop.is_cancelled() && self.remaining() != Some(0) {
            let entries = if self.pending {
                let wait = self.retry_at.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
                let entries = self.read(&mut cmds, "0", None).await?; // oldest first
                if entries.is_empty() {
                    self.pending = false;
                    continue;
                }
                entries
            } else {
                let read = self.read(&mut reader, ">", Some(self.cfg.block_ms));
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    entries = read => entries?,
                }
            };
            if let Some(exit) = self.process(&mut cmds, entries).await? {
                return Ok(exit);
            }
        }
        self.cleanup(&mut cmds).await;
        Ok(Exit::Done)
    }

    async fn ensure_group(&self, conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
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
    async fn reclaim(&self, conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
        let (mut start, mut total) = ("0-0".to_string(), 0);
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
            let Value::Array(parts) = reply else { break };
            if let Some(Value::Array(ids)) = parts.get(1) {
                total += ids.len();
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
        }
        Ok(())
    }

    async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        start: &str,
        block_ms: Option<u64>,
    ) -> Result<Vec<Entry>, RedisError> {
        let count = self.remaining().map_or(100, |r| r.min(100));
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

    /// Handles entries in order; stops at the first that must be retried.
    async fn process(
        &mut self,
        conn: &mut MultiplexedConnection,
        entries: Vec<Entry>,
    ) -> Result<Option<Exit>, RedisError> {
        for entry in entries {
            let Some(fields) = &entry.fields else {
                self.ack(conn, &entry.id).await?;
                log(format_args!(
                    "{} was deleted from the stream; acknowledged",
                    entry.id
                ));
                continue;
            };
            let (body, what) = reply_for(fields);
            match self.cfg.api.send(&body).await {
                Ok(status) => {
                    self.ack(conn, &entry.id).await?;
                    self.handled += 1;
                    self.backoff = Duration::from_millis(500);
                    if status == 202 {
                        log(format_args!("{} {what}: sent, acknowledged", entry.id));
                    } else {
                        log(format_args!(
                            "{} {what}: the gateway refused the reply ({status}); dropped, acknowledged",
                            entry.id
                        ));
                    }
                    if self.remaining() == Some(0) {
                        break;
                    }
                }
                Err(PostError::Transient(e)) => {
                    log(format_args!(
                        "{} {what}: not delivered ({e}); left pending, retry in {:.1} s",
                        entry.id,
                        self.backoff.as_secs_f64()
                    ));
                    self.pending = true;
                    self.retry_at = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
                    break;
                }
                Err(PostError::Fatal(e)) => return Ok(Some(Exit::Fatal(e))),
            }
        }
        if self.remaining() == Some(0) {
            self.cleanup(conn).await;
            return Ok(Some(Exit::Done));
        }
        Ok(None)
    }

    async fn ack(&self, conn: &mut MultiplexedConnection, id: &str) -> Result<(), RedisError> {
        redis::cmd("XACK")
            .arg(&self.cfg.key)
            .arg(&self.cfg.group)
            .arg(id)
            .query_async::<i64>(conn)
            .await
            .map(|_| ())
    }

    /// Removes this consumer from the group when it holds nothing, so names do not pile up.
    async fn cleanup(&self, conn: &mut MultiplexedConnection) {
        let result: Result<(), RedisError> = async {
            let pending: Vec<Value> = redis::cmd("XPENDING")
                .arg(&self.cfg.key)
                .arg(&self.cfg.group)
                .arg("-")
                .arg("+")
                .arg(1)
                .arg(&self.cfg.consumer)
                .query_async(conn)
                .await?;
            if pending.is_empty() {
                redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&self.cfg.key)
                    .arg(&self.cfg.group)
                    .arg(&self.cfg.consumer)
                    .query_async::<i64>(conn)
                    .await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            log(format_args!(
                "could not remove consumer {}: {e}",
                self.cfg.consumer
            ));
        }
    }

    async fn run(&mut self) -> Exit {
        log(format_args!(
            "reading {} as {}/{}, replying via {}",
            self.cfg.key, self.cfg.group, self.cfg.consumer, self.cfg.api.base
        ));
        loop {
            match self.session().await {
                Ok(exit) => return exit,
                Err(e) => {
                    // Also covers NOGROUP (stream or group deleted): the next session recreates it.
                    log(format_args!("Redis: {e}; reconnecting in 1 s"));
                    tokio::select! {
                        _ = self.stop.cancelled() => return Exit::Done,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
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
    let client = match redis::Client::open(cfg.redis_url.as_str()) {
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
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            };
            log(format_args!("{name}: stopping"));
            stop.cancel();
        }
    });
    let mut backend = Backend {
        cfg,
        client,
        stop,
        handled: 0,
        pending: true,
        retry_at: Instant::now(),
        backoff: Duration::from_millis(500),
    };
    let exit = backend.run().await;
    log(format_args!(
        "stopped after handling {} entries",
        backend.handled
    ));
    match exit {
        Exit::Done => ExitCode::SUCCESS,
        Exit::Fatal(e) => {
            log(e);
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn chat_goes_to_the_channel_and_anything_else_is_echoed() {
        let (body, _) = reply_for(&fields(&[
            ("connection", b"c1"),
            ("user", b""),
            ("data", br#"{"channel":"room:1","text":"hi"}"#),
            ("encoding", b"json"),
        ]));
        assert_eq!(
            body,
            json!({"to": {"channel": "room:1"}, "data": {"from": "c1", "text": "hi"}})
        );
        let (body, _) = reply_for(&fields(&[
            ("connection", b"c1"),
            ("user", b"alice"),
            ("data", br#"{"channel":"","text":"hi"}"#),
            ("encoding", b"json"),
        ]));
        assert_eq!(
            body,
            json!({"to": {"connection": "c1"}, "data": {"echo": {"channel": "", "text": "hi"}}})
        );
    }

    #[test]
    fn msgpack_data_is_decoded() {
        // {"channel": "r", "text": "t", "bin": b"\x00\xff"} in MessagePack.
        let data = b"\x83\xa7channel\xa1r\xa4text\xa1t\xa3bin\xc4\x02\x00\xff";
        let (body, _) = reply_for(&fields(&[
            ("connection", b"c1"),
            ("user", b"bob"),
            ("data", data),
            ("encoding", b"msgpack"),
        ]));
        assert_eq!(
            body,
            json!({"to": {"channel": "r"}, "data": {"from": "bob", "text": "t"}})
        );
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
