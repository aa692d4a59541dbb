//! permessage-deflate (RFC 7692) measurements: subscribers that offer compression, read
//! compressed (RSV1) frames and inflate them, and count every byte read off their sockets.
//! bench/compression.sh runs these scenarios against wsbridge and socket.io.
//!
//! - `wire`: `--clients` subscribers of `--channel` get `--messages` realistic JSON messages
//!   of about `--payload` bytes (default 1,024; varied contents, so neither a compressor's
//!   context nor one message's repeats make them unrealistically small) at `--rate` messages/s
//!   through `POST /send`. Reported: bytes read off the sockets per delivery (frame headers
//!   and all) against the uncompressed message, how many frames came compressed, gateway CPU
//!   per delivery, latency.
//! - `wire-idle`: `--clients` subscribers connect and join, then sit for `--settle-ms`: RSS per
//!   connection; then one compressed-size message to each and another `--settle-ms`: RSS per
//!   connection again (a server that keeps a compressor per connection shows it there).
//! - `publish`: `--publishers` clients send `--messages` messages at `--rate` to the channel
//!   that `--clients` other clients joined; latency from the send to each receiver's read.
//!   `--publish-via client` sends `{"type":"publish","channel","data","id"}` (client publish,
//!   acked `{"type":"ack","id",...}`); `--publish-via stream` sends the same data as a `send`
//!   to the stream `--stream` as `{"channel":C,"text":DATA}`, for a backend
//!   (examples/backends) to post it to the channel with `POST /send` (it arrives as
//!   `{"from":..,"text":DATA}`).
//!
//! `--deflate` makes every client offer `permessage-deflate; client_no_context_takeover;
//! client_max_window_bits`; without it none is offered. The clients never compress what they
//! send (a client may always send uncompressed frames). The WebSocket client here is a small one
//! of our own: tokio-tungstenite 0.28 refuses frames with RSV1 set.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flate2::{Decompress, FlushDecompress, Status};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpSocket;
use tokio::sync::{Notify, Semaphore};

use crate::proto::Kind;
use crate::publish::{Publisher, To};
use crate::{cpu_of, cpu_seconds, log, rss_kib, wait_until, Args, Scenario};

/// The extension offer of `--deflate`: what Chromium offers, plus `client_no_context_takeover`
/// (we never compress, so the promise costs nothing).
const OFFER: &str = "permessage-deflate; client_no_context_takeover; client_max_window_bits";

/// How the measured messages go out in the `publish` scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A client `publish` frame, straight to the channel.
    Client,
    /// A client `send` to the inbound stream, which a backend posts to the channel.
    Stream,
}

impl Via {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "client" => Ok(Self::Client),
            "stream" => Ok(Self::Stream),
            other => Err(format!(
                "--publish-via {other:?}: expected client or stream"
            )),
        }
    }
}

/// Counters shared by every client of the run.
struct Totals {
    started: Instant,
    /// Bytes read off all sockets (after the handshake).
    wire_bytes: AtomicU64,
    /// Bytes of the messages' text after inflating (what the application got).
    text_bytes: AtomicU64,
    /// Data messages read, and how many of them had RSV1 set.
    frames: AtomicU64,
    compressed: AtomicU64,
    /// Measured messages received (all clients), warm-up ones, acks of publishes.
    delivered: AtomicU64,
    warmed: AtomicUsize,
    acks: AtomicU64,
    errors: AtomicU64,
    lost: AtomicUsize,
    warned: AtomicBool,
    hist: Mutex<Histogram<u64>>,
    changed: Notify,
}

impl Totals {
    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }
}

/// One client connection: our side of the socket, whether compression was negotiated, and the
/// inflater, made on the first compressed message (idle clients hold none).
struct Client {
    read: OwnedReadHalf,
    write: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    buf: Vec<u8>,
    extensions: Option<String>,
    inflater: Option<Decompress>,
    /// The server said `server_no_context_takeover`: every message starts a fresh window.
    server_resets: bool,
    /// Compressed messages read so far (the handshake's, when read by `join`).
    compressed_seen: u64,
}

/// A complete data message.
struct Message {
    text: String,
    compressed: bool,
}

impl Client {
    /// Connects from `source` and upgrades, offering permessage-deflate when `deflate`.
    async fn connect(url: &str, source: Ipv4Addr, deflate: bool) -> Result<Self, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: only ws:// URLs"))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let addr: SocketAddr = authority
            .parse()
            .map_err(|e| format!("{url}: {e} (use an IP address and a port)"))?;
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(source.into(), 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
        let mut stream = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect {addr} from {source}: {e}"))?;
        stream.set_nodelay(true).ok();
        let offer = if deflate {
            format!("Sec-WebSocket-Extensions: {OFFER}\r\n")
        } else {
            String::new()
        };
        // The key need not be random against our own servers; its accept value is not checked.
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(1024);
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return Err(format!("upgrade {url}: response head too long"));
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("upgrade {url}: connection closed"));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!(
                "upgrade {url}: {}",
                head.lines().next().unwrap_or("")
            ));
        }
        let extensions = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_string())
        });
        let server_resets = extensions
            .as_deref()
            .is_some_and(|e| e.contains("server_no_context_takeover"));
        buf.drain(..head_end);
        let (read, write) = stream.into_split();
        Ok(Self {
            read,
            write: Arc::new(tokio::sync::Mutex::new(write)),
            buf,
            extensions,
            inflater: None,
            server_resets,
            compressed_seen: 0,
        })
    }

    fn negotiated(&self) -> bool {
        self.extensions
            .as_deref()
            .is_some_and(|e| e.starts_with("permessage-deflate"))
    }

    /// A masked client frame (RFC 6455 5.3: every client frame is masked).
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x5a, 0x3c, 0x96, 0xe1];
        let mut out = Vec::with_capacity(payload.len() + 14);
        out.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn send(
        write: &tokio::sync::Mutex<OwnedWriteHalf>,
        opcode: u8,
        payload: &[u8],
    ) -> Result<(), String> {
        write
            .lock()
            .await
            .write_all(&Self::frame(opcode, payload))
            .await
            .map_err(|e| e.to_string())
    }

    async fn send_text(&self, text: &str) -> Result<(), String> {
        Self::send(&self.write, 0x1, text.as_bytes()).await
    }

    /// Reads until `buf` holds `n` bytes; counts what it read.
    async fn fill(&mut self, n: usize, wire: &AtomicU64) -> Result<(), String> {
        while self.buf.len() < n {
            let mut chunk = [0u8; 8192];
            let got = self
                .read
                .read(&mut chunk)
                .await
                .map_err(|e| e.to_string())?;
            if got == 0 {
                return Err("connection ended".into());
            }
            wire.fetch_add(got as u64, Ordering::Relaxed);
            self.buf.extend_from_slice(&chunk[..got]);
        }
        Ok(())
    }

    /// The next data message, inflated; answers pings on the way.
    async fn next(&mut self, wire: &AtomicU64) -> Result<Message, String> {
        let mut message: Option<(Vec<u8>, bool)> = None;
        loop {
            self.fill(2, wire).await?;
            let (b0, b1) = (self.buf[0], self.buf[1]);
            let (fin, rsv1, opcode) = (b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x0f);
            if b1 & 0x80 != 0 {
                return Err("a masked frame from the server".into());
            }
            let (len, mut at) = match b1 & 0x7f {
                126 => {
                    self.fill(4, wire).await?;
                    (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                }
                127 => {
                    self.fill(10, wire).await?;
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.buf[2..10]);
                    (u64::from_be_bytes(b) as usize, 10)
                }
                n => (n as usize, 2),
            };
            self.fill(at + len, wire).await?;
            let payload: Vec<u8> = self.buf[at..at + len].to_vec();
            at += len;
            self.buf.drain(..at);
            match opcode {
                0x8 => {
                    return Err(format!(
                        "closed by the server: {:?}",
                        String::from_utf8_lossy(&payload)
                    ))
                }
                0x9 => Self::send(&self.write, 0xA, &payload).await?,
                0xA => {}
                0x1 | 0x2 => {
                    if rsv1 && !self.negotiated() {
                        return Err("RSV1 set without permessage-deflate negotiated".into());
                    }
                    message = Some((payload, rsv1));
                }
                0x0 => match message.as_mut() {
                    Some((data, _)) => data.extend_from_slice(&payload),
                    None => return Err("a continuation frame without a message".into()),
                },
                other => return Err(format!("opcode {other:#x}")),
            }
            if fin && matches!(opcode, 0x0..=0x2) {
                let (data, compressed) = message.take().expect("a data frame came first");
                let data = if compressed {
                    self.compressed_seen += 1;
                    self.inflate(data)?
                } else {
                    data
                };
                let text = String::from_utf8(data).map_err(|e| e.to_string())?;
                return Ok(Message { text, compressed });
            }
        }
    }

    /// RFC 7692 7.2.2: append 00 00 ff ff to the message and inflate it as raw deflate.
    fn inflate(&mut self, mut data: Vec<u8>) -> Result<Vec<u8>, String> {
        data.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
        let resets = self.server_resets;
        let inflater = self.inflater.get_or_insert_with(|| Decompress::new(false));
        if resets {
            inflater.reset(false);
        }
        let mut out = Vec::with_capacity(data.len() * 4);
        let mut input = &data[..];
        loop {
            if out.capacity() - out.len() < 4096 {
                out.reserve(out.capacity().max(4096));
            }
            let before_in = inflater.total_in();
            let status = inflater
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|e| format!("inflate: {e}"))?;
            input = &input[(inflater.total_in() - before_in) as usize..];
            match status {
                Status::StreamEnd => break,
                _ if input.is_empty() && out.len() < out.capacity() => break,
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Connects and joins `channel` (when `subscribe`) the way `kind` does; returns the client.
async fn join(
    kind: Kind,
    url: &str,
    source: Ipv4Addr,
    deflate: bool,
    channel: &str,
    subscribe: bool,
    wire: &AtomicU64,
) -> Result<Client, String> {
    let mut c = Client::connect(url, source, deflate).await?;
    match kind {
        Kind::Wsbridge => {
            let welcome = c.next(wire).await?.text;
            if !welcome.contains(r#""type":"welcome""#) {
                return Err(format!("expected welcome, got {welcome}"));
            }
            if subscribe {
                c.send_text(&format!(
                    r#"{{"type":"subscribe","channel":"{channel}","id":"s"}}"#
                ))
                .await?;
                let reply = c.next(wire).await?.text;
                if !reply.contains(r#""type":"subscribed""#) {
                    return Err(format!("subscribe refused: {reply}"));
                }
            }
        }
        Kind::Socketio => {
            let open = c.next(wire).await?.text;
            if !open.starts_with('0') {
                return Err(format!("expected an Engine.IO open packet, got {open}"));
            }
            c.send_text("40").await?;
            loop {
                let t = c.next(wire).await?.text;
                if t == "2" {
                    c.send_text("3").await?;
                } else if t.starts_with("40") {
                    break;
                } else {
                    return Err(format!("expected 40{{sid}}, got {t}"));
                }
            }
            if subscribe {
                c.send_text(&format!(r#"42["subscribe","{channel}"]"#))
                    .await?;
                loop {
                    let t = c.next(wire).await?.text;
                    if t == "2" {
                        c.send_text("3").await?;
                    } else if t.starts_with(r#"42["subscribed""#) {
                        break;
                    } else {
                        return Err(format!("expected subscribed, got {t}"));
                    }
                }
            }
        }
        Kind::Nchan | Kind::Floor => {
            return Err("the wire scenarios are for wsbridge and socketio".into())
        }
    }
    Ok(c)
}

/// The message's `data`: wsbridge's `message` frame or socket.io's `42["message",DATA]`.
/// Ok(None) for frames that are not messages; Err(text) to answer (Engine.IO ping).
fn data_of(kind: Kind, text: &str) -> Result<Option<Value>, &'static str> {
    match kind {
        Kind::Socketio => {
            if text == "2" {
                return Err("3");
            }
            let Some(rest) = text.strip_prefix("42") else {
                return Ok(None);
            };
            match serde_json::from_str::<(String, Value)>(rest) {
                Ok((event, data)) if event == "message" => Ok(Some(data)),
                Ok((event, _)) if event == "ack" => Ok(Some(json!({"ack": true}))),
                _ => Ok(None),
            }
        }
        _ => {
            let Ok(mut v) = serde_json::from_str::<Value>(text) else {
                return Ok(None);
            };
            match v["type"].as_str() {
                Some("message") => Ok(Some(v["data"].take())),
                Some("ack") => Ok(Some(json!({"ack": true}))),
                Some("error") => Ok(Some(json!({"error": v}))),
                _ => Ok(None),
            }
        }
    }
}

/// Reads one client's messages until its connection ends.
async fn read_loop(kind: Kind, mut c: Client, totals: Arc<Totals>) {
    let mut local = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let mut warm = false;
    loop {
        let m = match c.next(&totals.wire_bytes).await {
            Ok(m) => m,
            Err(e) => {
                if !totals.warned.swap(true, Ordering::Relaxed) {
                    eprintln!("loadgen: a client's connection ended: {e}");
                }
                break;
            }
        };
        totals.frames.fetch_add(1, Ordering::Relaxed);
        totals
            .text_bytes
            .fetch_add(m.text.len() as u64, Ordering::Relaxed);
        if m.compressed {
            totals.compressed.fetch_add(1, Ordering::Relaxed);
        }
        let data = match data_of(kind, &m.text) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(answer) => {
                let _ = c.send_text(answer).await;
                continue;
            }
        };
        if data.get("ack").is_some() {
            totals.acks.fetch_add(1, Ordering::Relaxed);
            totals.changed.notify_one();
            continue;
        }
        if let Some(e) = data.get("error") {
            totals.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("loadgen: error frame: {e}");
            totals.changed.notify_one();
            continue;
        }
        // A backend's chat message carries ours in `text`.
        let payload = data.get("text").filter(|t| t.is_object()).unwrap_or(&data);
        if payload["w"] == 1 {
            if !warm {
                warm = true;
                totals.warmed.fetch_add(1, Ordering::Relaxed);
                totals.changed.notify_one();
            }
            continue;
        }
        let Some(t) = payload["t"].as_u64() else {
            continue;
        };
        local.saturating_record(totals.now_us().saturating_sub(t).max(1));
        totals.delivered.fetch_add(1, Ordering::Relaxed);
        totals.hist.lock().unwrap().add(&local).ok();
        local.reset();
        totals.changed.notify_one();
    }
    totals.lost.fetch_add(1, Ordering::Relaxed);
    totals.changed.notify_one();
}

/// A JSON message of about `size` bytes, shaped like an application's event (a batch of
/// trades): the keys repeat as they do in real JSON, the values vary from message to message,
/// so it compresses the way such a message does, neither like a run of one letter nor like
/// noise.
pub fn realistic(seq: u64, t: u64, warm: bool, size: usize) -> String {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let sides = ["buy", "sell"];
    let symbols = ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCHF", "EURGBP"];
    let mut s = format!(
        r#"{{"seq":{seq},"t":{t},"w":{},"type":"trades","room":"market:fx","items":["#,
        u8::from(warm)
    );
    let mut first = true;
    while s.len() + 2 < size {
        if !first {
            s.push(',');
        }
        first = false;
        let r = next();
        s.push_str(&format!(
            r#"{{"id":"{:08x}","user":"user_{}","symbol":"{}","price":{}.{:05},"qty":{},"side":"{}","ts":{}}}"#,
            r as u32,
            (r >> 32) % 100_000,
            symbols[(r >> 20) as usize % symbols.len()],
            1 + (r >> 40) % 150,
            (r >> 8) % 100_000,
            100 * ((r >> 12) % 500),
            sides[(r >> 3) as usize % 2],
            1_765_000_000_000u64 + (next() % 1_000_000_000),
        ));
    }
    s.push_str("]}");
    s
}

/// Runs `wire`, `wire-idle` or `publish`; the report goes to `--json` and stdout.
pub async fn run(a: Args) -> Result<bool, String> {
    let totals = Arc::new(Totals {
        started: Instant::now(),
        wire_bytes: AtomicU64::new(0),
        text_bytes: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        compressed: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        warmed: AtomicUsize::new(0),
        acks: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        lost: AtomicUsize::new(0),
        warned: AtomicBool::new(false),
        hist: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()),
        changed: Notify::new(),
    });
    let rss_before: Vec<Option<u64>> = a.pids.iter().map(|p| rss_kib(*p)).collect();
    let publishers = if a.scenario == Scenario::Publish {
        a.publishers.max(1)
    } else {
        0
    };

    log(
        &a,
        &format!(
            "connecting {} clients (+{publishers} publishers), deflate offered: {}",
            a.clients, a.deflate
        ),
    );
    let connect_started = Instant::now();
    let gate = Arc::new(Semaphore::new(a.connect_concurrency));
    let mut joins = Vec::new();
    for n in 0..a.clients + publishers {
        let endpoint = a.ws[n % a.ws.len()].clone();
        let source = Ipv4Addr::new(127, 0, 0, a.first_source + (n / a.per_source) as u8);
        let url = a
            .target
            .url(&endpoint, &a.channel, crate::client_token(&a, n).as_deref());
        let (kind, deflate, channel, gate, totals) = (
            a.target,
            a.deflate,
            a.channel.clone(),
            gate.clone(),
            totals.clone(),
        );
        let subscribe = n < a.clients;
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.expect("gate");
            let mut attempt = 0;
            loop {
                match join(
                    kind,
                    &url,
                    source,
                    deflate,
                    &channel,
                    subscribe,
                    &totals.wire_bytes,
                )
                .await
                {
                    Err(e) if attempt < 3 => {
                        attempt += 1;
                        eprintln!("loadgen: client {n}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                    }
                    other => return other,
                }
            }
        }));
    }
    let mut negotiated = 0usize;
    let mut handshake_compressed = 0u64;
    let mut extensions: Option<String> = None;
    let mut writers = Vec::new();
    for (n, j) in joins.into_iter().enumerate() {
        let c = j
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("client {n}: {e}"))?;
        if c.negotiated() {
            negotiated += 1;
        }
        handshake_compressed += c.compressed_seen;
        if extensions.is_none() {
            extensions = c.extensions.clone();
        }
        if n >= a.clients {
            writers.push(c.write.clone());
        }
        tokio::spawn(read_loop(a.target, c, totals.clone()));
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    log(&a, &format!("joined in {connect_s:.1} s; {negotiated} negotiated permessage-deflate ({extensions:?})"));

    let mut publisher = Publisher::new(a.target, &a.api, a.api_key.clone())?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let size = a.payload;
    let mut report = json!({
        "target": a.target.name(),
        "scenario": format!("{:?}", a.scenario).to_lowercase(),
        "deflate_offered": a.deflate,
        "offer": a.deflate.then_some(OFFER),
        "negotiated": negotiated,
        // Frames of the protocol's own handshake (welcome, subscribed; Engine.IO open, 40)
        // that came compressed: ws compresses every frame, however small, while it keeps its
        // compression context (its threshold applies only with server_no_context_takeover).
        "handshake_frames_compressed": handshake_compressed,
        "extensions": extensions,
        "clients": a.clients,
        "replicas": a.ws.len(),
        "payload_bytes": size,
        "connect_s": connect_s,
    });

    if a.scenario == Scenario::WireIdle {
        tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
        let rss_idle: Vec<Option<u64>> = a.pids.iter().map(|p| rss_kib(*p)).collect();
        // One message to each client: a server that keeps compression state per connection
        // allocates it now.
        let warm = realistic(0, 0, true, size);
        publisher
            .publish(&[(To::Channel(&a.channel), warm)])
            .await?;
        let all = wait_until(&totals.changed, deadline, || {
            totals.warmed.load(Ordering::Relaxed) == a.clients
        })
        .await;
        tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
        let rss_after: Vec<Option<u64>> = a.pids.iter().map(|p| rss_kib(*p)).collect();
        let per_conn = |after: &[Option<u64>]| -> Option<f64> {
            rss_before
                .iter()
                .zip(after)
                .map(|(b, a)| Some(*a.as_ref()? as f64 - *b.as_ref()? as f64))
                .sum::<Option<f64>>()
                .map(|kib| kib / a.clients as f64)
        };
        report["rss_kib_per_connection_idle"] = json!(per_conn(&rss_idle));
        report["rss_kib_per_connection_after_one_message"] = json!(per_conn(&rss_after));
        report["one_message_received"] = json!(totals.warmed.load(Ordering::Relaxed));
        report["compressed_frames"] = json!(totals.compressed.load(Ordering::Relaxed));
        report["processes"] = json!(a
            .pids
            .iter()
            .enumerate()
            .map(|(i, pid)| json!({"pid": pid, "rss_kib_before": rss_before[i], "rss_kib_idle": rss_idle[i], "rss_kib_after_one_message": rss_after[i]}))
            .collect::<Vec<_>>());
        report["exact"] = json!(all && totals.lost.load(Ordering::Relaxed) == 0);
        return finish(&a, report);
    }

    // Warm-up: one message per round until every subscriber has one (every replica routes).
    loop {
        let warm = realistic(0, 0, true, size);
        if a.scenario == Scenario::Publish && a.publish_via == Via::Stream {
            // Through the backend too, so its consumer group exists and its connection is up.
            let frame = json!({"type":"send","stream":a.stream,"data":{"channel":a.channel,"text":serde_json::from_str::<Value>(&warm).unwrap()}});
            Client::send(&writers[0], 0x1, frame.to_string().as_bytes()).await?;
        } else {
            publisher
                .publish(&[(To::Channel(&a.channel), warm)])
                .await?;
        }
        if wait_until(
            &totals.changed,
            Instant::now() + Duration::from_millis(500),
            || totals.warmed.load(Ordering::Relaxed) == a.clients,
        )
        .await
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "warm-up: only {} of {} clients got a message",
                totals.warmed.load(Ordering::Relaxed),
                a.clients
            ));
        }
    }
    log(&a, "every client receives: measuring");

    // The measured window.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let wire0 = totals.wire_bytes.load(Ordering::Relaxed);
    let text0 = totals.text_bytes.load(Ordering::Relaxed);
    let frames0 = totals.frames.load(Ordering::Relaxed);
    let compressed0 = totals.compressed.load(Ordering::Relaxed);
    let acks0 = totals.acks.load(Ordering::Relaxed);
    let cpu0 = cpu_of(&a.pids);
    let own0 = cpu_seconds(std::process::id());
    let t0 = Instant::now();
    let mut message_bytes = 0u64;
    let mut ticker = (a.rate > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    for seq in 1..=a.messages {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let data = realistic(seq, totals.now_us(), false, size);
        message_bytes += data.len() as u64;
        match (a.scenario, a.publish_via) {
            (Scenario::Publish, via) => {
                let id = format!("p{seq}");
                let frame = match via {
                    Via::Client => format!(
                        r#"{{"type":"publish","channel":"{}","id":"{id}","data":{data}}}"#,
                        a.channel
                    ),
                    Via::Stream => format!(
                        r#"{{"type":"send","stream":"{}","id":"{id}","data":{{"channel":"{}","text":{data}}}}}"#,
                        a.stream, a.channel
                    ),
                };
                let w = &writers[seq as usize % writers.len()];
                Client::send(w, 0x1, frame.as_bytes()).await?;
            }
            _ => {
                publisher
                    .publish(&[(To::Channel(&a.channel), data)])
                    .await?
            }
        }
    }
    let expected = a.messages * a.clients as u64;
    let all = wait_until(&totals.changed, deadline, || {
        totals.delivered.load(Ordering::Relaxed) >= expected
            || totals.lost.load(Ordering::Relaxed) > 0
            || totals.errors.load(Ordering::Relaxed) > 0
    })
    .await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_of(&a.pids);
    let own = cpu_seconds(std::process::id())
        .zip(own0)
        .map(|(b, a)| b - a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let delivered = totals.delivered.load(Ordering::Relaxed);
    let wire = totals.wire_bytes.load(Ordering::Relaxed) - wire0;
    let text = totals.text_bytes.load(Ordering::Relaxed) - text0;
    let frames = totals.frames.load(Ordering::Relaxed) - frames0;
    let compressed = totals.compressed.load(Ordering::Relaxed) - compressed0;
    let gateway_cpu: f64 = cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).sum();
    let hist = totals.hist.lock().unwrap().clone();
    let q = |p: f64| (!hist.is_empty()).then(|| hist.value_at_quantile(p) as f64 / 1000.0);
    let per = |x: f64| (delivered > 0).then(|| x / delivered as f64);
    report["messages"] = json!(a.messages);
    report["rate"] = json!(a.rate);
    report["mean_message_bytes"] = json!(message_bytes as f64 / a.messages.max(1) as f64);
    report["expected_total"] = json!(expected);
    report["delivered_total"] = json!(delivered);
    report["frames_read"] = json!(frames);
    report["compressed_frames"] = json!(compressed);
    report["wire_bytes"] = json!(wire);
    report["wire_bytes_per_delivery"] = json!(per(wire as f64));
    report["text_bytes_per_delivery"] = json!(per(text as f64));
    report["wire_over_text"] = json!((text > 0).then(|| wire as f64 / text as f64));
    report["elapsed_s"] = json!(elapsed);
    report["gateway_cpu_s"] = json!(gateway_cpu);
    report["gateway_cpu_us_per_delivery"] = json!(per(gateway_cpu * 1e6));
    report["loadgen_cpu_s"] = json!(own);
    report["latency_ms"] = json!({"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": (!hist.is_empty()).then(|| hist.max() as f64 / 1000.0)});
    report["processes"] = json!(a
        .pids
        .iter()
        .enumerate()
        .map(|(i, pid)| json!({"pid": pid, "cpu_s": cpu1[i] - cpu0[i]}))
        .collect::<Vec<_>>());
    if a.scenario == Scenario::Publish {
        report["publish_via"] = json!(format!("{:?}", a.publish_via).to_lowercase());
        report["publishers"] = json!(publishers);
        report["acks"] = json!(totals.acks.load(Ordering::Relaxed) - acks0);
    }
    report["error_frames"] = json!(totals.errors.load(Ordering::Relaxed));
    report["connections_lost"] = json!(totals.lost.load(Ordering::Relaxed));
    report["exact"] = json!(
        all && delivered == expected
            && totals.lost.load(Ordering::Relaxed) == 0
            && totals.errors.load(Ordering::Relaxed) == 0
    );
    finish(&a, report)
}

fn finish(a: &Args, report: Value) -> Result<bool, String> {
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap())
            .map_err(|e| format!("--json {path}: {e}"))?;
    }
    crate::print_table(&report);
    Ok(report["exact"] == true)
}
