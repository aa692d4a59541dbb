//! Hostile clients: garbage, broken framing, partial and absurdly large frames, floods, frames
//! after a close, readers that never read, and connection storms. Every test keeps a
//! well-behaved client on the same replica that must still be served at the end, and checks
//! what the replica counted rather than how long anything took.

use futures_util::future::join_all;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const CLOSE_REASONS: [&str; 8] = [
    "client",
    "error",
    "protocol",
    "idle_timeout",
    "slow_consumer",
    "backend",
    "token_expired",
    "shutdown",
];

fn closed(reason: &str) -> String {
    format!("wsbridge_connections_closed_total{{reason=\"{reason}\"}}")
}

fn refusals(limit: &str) -> String {
    format!("wsbridge_limit_refusals_total{{limit=\"{limit}\"}}")
}

fn rejected(code: &str) -> String {
    format!("wsbridge_inbound_rejected_total{{code=\"{code}\"}}")
}

const QUEUE_FULL: &str = "wsbridge_delivery_dropped_total{reason=\"queue_full\"}";

async fn closed_total(gw: &Gateway) -> f64 {
    let mut total = 0.0;
    for reason in CLOSE_REASONS {
        total += gw.metric(&closed(reason)).await;
    }
    total
}

/// Waits until the replica holds exactly `open` connections, then checks that every connection
/// it ever opened is either still open or was counted as closed.
async fn settles_at(gw: &Gateway, open: f64) {
    eventually(
        &format!("{open} connections left, and opened = closed + open"),
        || async {
            gw.metric("wsbridge_connections").await == open
                && gw.metric("wsbridge_connections_opened_total").await
                    == closed_total(gw).await + open
        },
    )
    .await;
}

/// The well-behaved client still gets a message sent to it and an ack for its own send.
async fn still_serves(gw: &Gateway, fine: &mut Client, n: usize) {
    gw.send(json!({"to": {"connection": fine.connection}, "data": {"check": n}}))
        .await;
    let message = fine.recv().await;
    assert_eq!(message["data"]["check"], n, "{message}");
    let id = format!("fine-{n}");
    fine.send(json!({"type": "send", "stream": "orders", "data": n, "id": id}))
        .await;
    let ack = fine.recv().await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some(id.as_str())),
        "{ack}"
    );
}

/// Deterministic noise (xorshift64*), so that a failure replays exactly.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn mask(&mut self) -> [u8; 4] {
        (self.next() as u32).to_be_bytes()
    }
}

/// WebSocket opcodes, as the first byte of a final frame.
const TEXT: u8 = 0x81;
const BINARY: u8 = 0x82;
const CLOSE: u8 = 0x88;

/// A client frame, built by hand: `first` is the first header byte (FIN, RSV and opcode), and
/// the payload is masked with `mask` when one is given (clients must mask; RFC 6455 §5.3).
fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = header(first, payload.len() as u64, mask);
    match mask {
        Some(m) => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4])),
        None => out.extend_from_slice(payload),
    }
    out
}

/// A frame header declaring `len` payload bytes, in the shortest encoding unless `len` needs
/// the 64-bit one.
fn header(first: u8, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
    let bit = if mask.is_some() { 0x80 } else { 0 };
    let mut out = vec![first];
    match len {
        0..=125 => out.push(bit | len as u8),
        126..=0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    out.extend(mask.into_iter().flatten());
    out
}

fn close_frame(code: u16, mask: [u8; 4]) -> Vec<u8> {
    frame(CLOSE, &code.to_be_bytes(), Some(mask))
}

fn public_addr(gw: &Gateway) -> String {
    gw.ws_url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_string()
}

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: wsbridge\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// A WebSocket client over a bare TCP socket, for what tungstenite refuses to send.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    connection: String,
}

impl Raw {
    /// Upgrades and reads the welcome.
    async fn connect(gw: &Gateway) -> Raw {
        let mut stream = TcpStream::connect(public_addr(gw)).await.unwrap();
        stream.write_all(UPGRADE.as_bytes()).await.unwrap();
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
            connection: String::new(),
        };
        let end = loop {
            if let Some(at) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(raw.fill().await, "connection ended during the handshake");
        };
        let response = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        assert!(response.starts_with("HTTP/1.1 101"), "{response}");
        raw.buf.drain(..end);
        let (opcode, payload) = raw.read_frame().await.expect("welcome");
        assert_eq!(opcode, 1);
        let welcome: Value = server_frame_json(std::str::from_utf8(&payload).unwrap());
        assert_eq!(welcome["type"], "welcome");
        raw.connection = welcome["connection"].as_str().unwrap().to_string();
        raw
    }

    /// Reads more bytes; false at the end of the stream (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
            .await
            .expect("the server neither sent anything nor closed")
        {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next server frame (server frames are not masked); None when the socket ended.
    async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if at > 0 && self.buf.len() >= at + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((opcode, payload));
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads until the server's close frame and returns its code, or None when the socket
    /// ended without one. Data frames before it are returned too.
    async fn closed(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut frames = Vec::new();
        while let Some((opcode, payload)) = self.read_frame().await {
            match opcode {
                8 if payload.len() >= 2 => {
                    return (Some(u16::from_be_bytes([payload[0], payload[1]])), frames)
                }
                8 => return (Some(1005), frames),
                1 => frames.push(server_frame_json(std::str::from_utf8(&payload).unwrap())),
                _ => {}
            }
        }
        (None, frames)
    }

    /// Writes, ignoring a peer that has gone (hostile clients do not care).
    async fn write(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }
}

/// Opens `n` clients with `open`, at most 50 at a time.
async fn open_many<T, F, Fut>(n: usize, mut open: F) -> Vec<T>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut all = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let wave: Vec<Fut> = (i..n.min(i + 50)).map(&mut open).collect();
        i += wave.len();
        all.extend(join_all(wave).await);
    }
    all
}

#[tokio::test]
async fn garbage_from_many_clients_gets_error_frames_or_protocol_closes() {
    deadline(TEST_DEADLINE, async {
        const TEXT_CLIENTS: usize = 70;
        const BINARY_CLIENTS: usize = 70;
        const RAW_CLIENTS: usize = 64;
        let redis = Redis::start();
        let prefix = unique_prefix("garbage");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut fine = Client::connect(&gw).await;

        // Text frames that are not JSON, and binary frames that are not MessagePack (0xc1 is the
        // one marker MessagePack never uses), two each: each gets a bad_frame error without id.
        let mut text_clients = open_many(TEXT_CLIENTS, |_| Client::connect(&gw)).await;
        let mut binary_clients = open_many(BINARY_CLIENTS, |_| Client::connect_msgpack(&gw)).await;
        join_all(
            text_clients
                .iter_mut()
                .enumerate()
                .map(|(i, c)| async move {
                    let mut noise = Noise(i as u64 + 1);
                    for _ in 0..2 {
                        let junk = String::from_utf8_lossy(&noise.bytes(64)).into_owned();
                        c.ws.send(Message::Text(format!("~{junk}").into()))
                            .await
                            .unwrap();
                    }
                    for _ in 0..2 {
                        let e = c.recv().await;
                        assert_eq!(
                            (e["type"].as_str(), e["code"].as_str()),
                            (Some("error"), Some("bad_frame"))
                        );
                        assert_eq!(e["id"], Value::Null);
                    }
                }),
        )
        .await;
        join_all(
            binary_clients
                .iter_mut()
                .enumerate()
                .map(|(i, c)| async move {
                    let mut noise = Noise(1000 + i as u64);
                    for _ in 0..2 {
                        let mut junk = vec![0xc1];
                        junk.extend(noise.bytes(64));
                        c.ws.send(Message::Binary(junk.into())).await.unwrap();
                    }
                    for _ in 0..2 {
                        let e = c.recv().await;
                        assert_eq!(
                            (e["type"].as_str(), e["code"].as_str()),
                            (Some("error"), Some("bad_frame"))
                        );
                        assert_eq!(e["id"], Value::Null);
                    }
                }),
        )
        .await;
        assert_eq!(
            gw.metric(&rejected("bad_frame")).await,
            (2 * (TEXT_CLIENTS + BINARY_CLIENTS)) as f64
        );

        // Bytes after the upgrade that are not valid WebSocket framing: each connection is failed
        // with the close code for what it broke.
        let mut raws = open_many(RAW_CLIENTS, |_| Raw::connect(&gw)).await;
        let outcomes = join_all(raws.iter_mut().enumerate().map(|(i, raw)| {
            let mut noise = Noise(5000 + i as u64);
            let mask = Some(noise.mask());
            let (bytes, want) = match i % 8 {
                // Reserved bits set, the rest noise.
                0 => {
                    let mut b = noise.bytes(32);
                    b[0] |= 0x40;
                    (b, 1002)
                }
                // A reserved opcode (3..7 are reserved data opcodes).
                1 => (frame(0x83 + (i as u8 % 5), &noise.bytes(8), mask), 1002),
                // A fragmented control frame (ping without FIN).
                2 => (frame(0x09, b"", mask), 1002),
                // A ping larger than a control frame may be.
                3 => (frame(0x89, &noise.bytes(126), mask), 1002),
                // A text frame that is not UTF-8.
                4 => (frame(TEXT, &[b'{', 0xff, 0xfe, b'}'], mask), 1007),
                // A continuation with no message to continue.
                5 => (frame(0x80, b"{}", mask), 1002),
                // A close frame with a code that must never be sent on the wire (1005), then noise.
                6 => {
                    let mut b = frame(CLOSE, &1005u16.to_be_bytes(), mask);
                    b.extend(noise.bytes(16));
                    (b, 1002)
                }
                // An HTTP request again, as a confused client would send ('G' has RSV1 set).
                _ => (UPGRADE.as_bytes().to_vec(), 1002),
            };
            async move {
                raw.write(&bytes).await;
                (i, raw.closed().await.0, want)
            }
        }))
        .await;
        for (i, got, want) in outcomes {
            assert_eq!(got, Some(want), "raw client {i}");
        }
        eventually("raw clients counted as protocol closes", || async {
            gw.metric(&closed("protocol")).await == RAW_CLIENTS as f64
        })
        .await;
        assert_eq!(gw.metric(&closed("client")).await, 0.0);
        assert_eq!(gw.metric(&closed("error")).await, 0.0);

        // An unmasked client frame fails the connection with 1002 (RFC 6455 §5.1) and is not
        // acted on: no ack, nothing stored.
        let mut unmasked = Raw::connect(&gw).await;
        let body = json!({"type": "send", "stream": "chat", "data": 1, "id": "unmasked"});
        unmasked
            .write(&frame(TEXT, body.to_string().as_bytes(), None))
            .await;
        let (code, frames) = unmasked.closed().await;
        assert_eq!(code, Some(1002), "{frames:?}");
        assert!(frames.iter().all(|f| f["type"] != "ack"), "{frames:?}");
        eventually(
            "the unmasked client counted as a protocol close",
            || async { gw.metric(&closed("protocol")).await == (RAW_CLIENTS + 1) as f64 },
        )
        .await;
        still_serves(&gw, &mut fine, 0).await;
        drop(unmasked);

        // The clients that sent bad frames were answered and are still connected.
        drop(raws);
        settles_at(&gw, (1 + TEXT_CLIENTS + BINARY_CLIENTS) as f64).await;
        still_serves(&gw, &mut fine, 1).await;
        drop(text_clients);
        drop(binary_clients);
        settles_at(&gw, 1.0).await;
        still_serves(&gw, &mut fine, 2).await;
    })
    .await;
}

#[tokio::test]
async fn partial_frames_and_absurd_declared_lengths() {
    deadline(TEST_DEADLINE, async {
        const MAX: u64 = 2 * 1024 * 1024;
        const STALLED: usize = 20;
        let redis = Redis::start();
        let prefix = unique_prefix("lengths");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__MAX_MESSAGE_BYTES", &MAX.to_string())],
        )
        .await;
        let mut fine = Client::connect(&gw).await;
        let mut noise = Noise(7);

        // Headers declaring 1 MiB followed by a few bytes, then nothing: the replica waits for
        // the rest without holding anyone else up.
        let mut stalled = open_many(STALLED, |_| Raw::connect(&gw)).await;
        for raw in &mut stalled {
            let mut bytes = header(TEXT, 1024 * 1024, Some(noise.mask()));
            bytes.extend(noise.bytes(10));
            raw.write(&bytes).await;
        }
        still_serves(&gw, &mut fine, 1).await;
        assert_eq!(
            gw.metric("wsbridge_connections").await,
            (1 + STALLED) as f64
        );
        // Then they vanish, mid-frame, without a close frame.
        drop(stalled);
        // A header cut in its middle, then a disconnect.
        let mut cut = Raw::connect(&gw).await;
        cut.write(&header(BINARY, 1024 * 1024, Some(noise.mask()))[..3])
            .await;
        drop(cut);
        settles_at(&gw, 1.0).await;
        assert_eq!(gw.metric(&closed("error")).await, (STALLED + 1) as f64);

        // Lengths beyond the limit are refused from the header alone, with 1009.
        let declared = [MAX + 1, 1 << 63, u64::MAX, (1 << 63) - 1];
        for (i, len) in declared.iter().enumerate() {
            let mut raw = Raw::connect(&gw).await;
            let mut bytes = header(
                if i % 2 == 0 { TEXT } else { BINARY },
                *len,
                Some(noise.mask()),
            );
            bytes.extend(noise.bytes(100));
            raw.write(&bytes).await;
            let (code, _) = raw.closed().await;
            assert_eq!(code, Some(1009), "declared {len}");
        }
        settles_at(&gw, 1.0).await;
        assert_eq!(
            gw.metric(&refusals("message_size")).await,
            declared.len() as f64
        );

        // A message of exactly the limit is taken, in two fragments and as one frame.
        let mut exact = Raw::connect(&gw).await;
        let head = json!({"type": "send", "stream": "chat", "id": "exact", "data": ""}).to_string();
        let body = json!({"type": "send", "stream": "chat", "id": "exact",
            "data": "y".repeat(MAX as usize - head.len())})
        .to_string();
        assert_eq!(body.len() as u64, MAX);
        let (first, rest) = body.as_bytes().split_at(1000);
        let mut bytes = frame(0x01, first, Some(noise.mask()));
        bytes.extend(frame(0x80, rest, Some(noise.mask())));
        exact.write(&bytes).await;
        let (opcode, ack) = exact.read_frame().await.expect("an answer");
        let ack: Value = server_frame_json(std::str::from_utf8(&ack).unwrap());
        assert_eq!(
            (opcode, ack["type"].as_str(), ack["id"].as_str()),
            (1, Some("ack"), Some("exact")),
            "{ack}"
        );
        let mut single = Raw::connect(&gw).await;
        single
            .write(&frame(0x81, body.as_bytes(), Some(noise.mask())))
            .await;
        let (opcode, ack) = single.read_frame().await.expect("an answer");
        let ack: Value = server_frame_json(std::str::from_utf8(&ack).unwrap());
        assert_eq!(
            (opcode, ack["type"].as_str(), ack["id"].as_str()),
            (1, Some("ack"), Some("exact")),
            "{ack}"
        );
        drop((exact, single));
        settles_at(&gw, 1.0).await;
        assert_eq!(gw.metric(&closed("protocol")).await, declared.len() as f64);
        still_serves(&gw, &mut fine, 2).await;
    })
    .await;
}

#[tokio::test]
async fn a_subscribe_flood_is_rate_limited_and_capped() {
    deadline(TEST_DEADLINE, async {
        const FLOOD: usize = 3000;
        const CAP: usize = 50;
        let redis = Redis::start();
        let prefix = unique_prefix("subflood");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[(
                "WSBRIDGE__LIMITS__MAX_SUBSCRIPTIONS_PER_CONNECTION",
                &CAP.to_string(),
            )],
        )
        .await;
        let mut fine = Client::connect(&gw).await;
        let mut flood = Client::connect(&gw).await;
        let id = flood.connection.clone();

        // Written as fast as the socket takes them, in chunks of 500 so that at most 500 replies
        // are outstanding: the reply queue (1024) is not what this test is about.
        let mut replies = Vec::with_capacity(FLOOD);
        for chunk in 0..FLOOD / 500 {
            for i in chunk * 500..(chunk + 1) * 500 {
                let frame = json!({"type": "subscribe", "channel": format!("f{i}"), "id": i});
                flood
                    .ws
                    .feed(Message::Text(frame.to_string().into()))
                    .await
                    .unwrap();
            }
            flood.ws.flush().await.unwrap();
            for _ in 0..500 {
                replies.push(flood.recv().await);
            }
        }

        let mut subscribed = Vec::new();
        let (mut capped, mut limited) = (0, 0);
        for (i, reply) in replies.iter().enumerate() {
            assert_eq!(reply["id"], i, "replies come in order: {reply}");
            match (reply["type"].as_str(), reply["code"].as_str()) {
                (Some("subscribed"), _) => subscribed.push(i),
                (Some("error"), Some("too_many_subscriptions")) => capped += 1,
                (Some("error"), Some("rate_limited")) => limited += 1,
                _ => panic!("unexpected reply {reply}"),
            }
        }
        // The first CAP frames join; later ones find the cap, or no token in the bucket.
        assert_eq!(subscribed, (0..CAP).collect::<Vec<_>>());
        assert!(
            capped > 0 && limited > 0,
            "capped {capped}, limited {limited}"
        );
        assert_eq!(CAP + capped + limited, FLOOD);
        assert_eq!(gw.metric(&refusals("subscriptions")).await, capped as f64);
        assert_eq!(gw.metric(&refusals("rate")).await, limited as f64);
        assert_eq!(
            gw.metric(&rejected("too_many_subscriptions")).await,
            capped as f64
        );
        assert_eq!(gw.metric(&rejected("rate_limited")).await, limited as f64);

        // The registry holds the connection in CAP channels, no more: the events stream says so,
        // and a message to a refused channel reaches nobody here.
        let mut redis_conn = redis.conn().await;
        let events_key = format!("{prefix}:events");
        eventually("subscribe events recorded", || async {
            let events = xrange(&mut redis.conn().await, &events_key).await;
            events
                .iter()
                .filter(|(_, f)| text(&f["event"]) == "subscribe")
                .count()
                >= CAP
        })
        .await;
        let events = xrange(&mut redis_conn, &events_key).await;
        let joined: Vec<&str> = events
            .iter()
            .filter(|(_, f)| text(&f["event"]) == "subscribe" && text(&f["connection"]) == id)
            .map(|(_, f)| text(&f["channel"]))
            .collect();
        assert_eq!(joined.len(), CAP);
        let filtered = gw.metric("wsbridge_pubsub_filtered_total").await;
        gw.send(json!({"to": {"channel": format!("f{}", FLOOD - 1)}, "data": "refused"}))
            .await;
        gw.send(json!({"to": {"channel": "f0"}, "data": "joined"}))
            .await;
        gw.send(json!({"to": {"connection": id}, "data": "marker"}))
            .await;
        assert_eq!(flood.recv().await["data"], "joined");
        assert_eq!(flood.recv().await["data"], "marker");
        // The refused channel's message has no recipient here: filtered under broadcast, never
        // received under interest routing (the replica does not listen to that channel).
        let refused_cost = if interest_routing() { 0.0 } else { 1.0 };
        assert_eq!(
            gw.metric("wsbridge_pubsub_filtered_total").await,
            filtered + refused_cost
        );

        assert_eq!(gw.metric("wsbridge_connections").await, 2.0);
        still_serves(&gw, &mut fine, 1).await;
    })
    .await;
}

/// Entries of a stream appended by one connection, as their `id` fields.
async fn entries_of(redis: &Redis, key: &str, connection: &str) -> Vec<String> {
    xrange(&mut redis.conn().await, key)
        .await
        .iter()
        .filter(|(_, f)| text(&f["connection"]) == connection)
        .map(|(_, f)| text(&f["id"]).to_string())
        .collect()
}

async fn disconnected(redis: &Redis, prefix: &str, connection: &str) {
    let key = format!("{prefix}:events");
    eventually("disconnect event", || async {
        xrange(&mut redis.conn().await, &key)
            .await
            .iter()
            .any(|(_, f)| text(&f["event"]) == "disconnect" && text(&f["connection"]) == connection)
    })
    .await;
}

#[tokio::test]
async fn frames_after_a_close_are_not_acted_on() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("afterclose");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut fine = Client::connect(&gw).await;
        let chat = format!("{prefix}:in:chat");
        let mut noise = Noise(11);
        let send = |id: &str, mask| {
            let body = json!({"type": "send", "stream": "chat", "data": 1, "id": id});
            frame(TEXT, body.to_string().as_bytes(), Some(mask))
        };
        let subscribe = |mask| {
            let body = json!({"type": "subscribe", "channel": "late", "id": "late"});
            frame(TEXT, body.to_string().as_bytes(), Some(mask))
        };

        // The client closes, and in the same write and afterwards keeps sending.
        let mut raw = Raw::connect(&gw).await;
        let mut bytes = send("before", noise.mask());
        bytes.extend(close_frame(1000, noise.mask()));
        for i in 0..10 {
            bytes.extend(send(&format!("after-{i}"), noise.mask()));
        }
        bytes.extend(subscribe(noise.mask()));
        raw.write(&bytes).await;
        let (code, frames) = raw.closed().await;
        assert_eq!(code, Some(1000));
        for i in 0..10 {
            raw.write(&send(&format!("later-{i}"), noise.mask())).await;
        }
        assert!(
            frames.iter().all(|f| f["id"] == "before"),
            "only the frame before the close is answered: {frames:?}"
        );
        disconnected(&redis, &prefix, &raw.connection).await;
        assert_eq!(entries_of(&redis, &chat, &raw.connection).await, ["before"]);

        // The server closes (a backend asked for it); what the client sends before answering
        // with its own close frame is ignored.
        let mut raw2 = Raw::connect(&gw).await;
        let (status, _) = gw
            .post(
                "/disconnect",
                &json!({"connection": raw2.connection, "code": 4001}),
            )
            .await;
        assert_eq!(status, 202);
        let (opcode, payload) = raw2.read_frame().await.expect("server close");
        assert_eq!((opcode, &payload[..2]), (8, &4001u16.to_be_bytes()[..]));
        let mut bytes = Vec::new();
        for i in 0..10 {
            bytes.extend(send(&format!("ignored-{i}"), noise.mask()));
        }
        bytes.extend(subscribe(noise.mask()));
        bytes.extend(close_frame(4001, noise.mask()));
        raw2.write(&bytes).await;
        assert_eq!(raw2.closed().await, (None, vec![]));
        disconnected(&redis, &prefix, &raw2.connection).await;
        assert!(entries_of(&redis, &chat, &raw2.connection).await.is_empty());

        let subscribes = xrange(&mut redis.conn().await, &format!("{prefix}:events"))
            .await
            .iter()
            .filter(|(_, f)| text(&f["event"]) == "subscribe")
            .count();
        assert_eq!(subscribes, 0);
        assert_eq!(
            gw.metric("wsbridge_inbound_messages_total{stream=\"chat\"}")
                .await,
            1.0
        );
        settles_at(&gw, 1.0).await;
        assert_eq!(gw.metric(&closed("client")).await, 1.0);
        assert_eq!(gw.metric(&closed("backend")).await, 1.0);
        still_serves(&gw, &mut fine, 1).await;
    })
    .await;
}

const PAD: usize = 32 * 1024;
const CAPACITY: usize = 16;

/// Publishes batches of ten padded messages to `channel`, each batch after `fine` read the
/// previous one, until `done` holds (checked after each batch) or `max_batches` were sent.
/// Returns how many messages were published.
async fn flood_until<F, Fut>(
    gw: &Gateway,
    fine: &mut Client,
    channel: &str,
    max_batches: usize,
    mut done: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let pad = "x".repeat(PAD);
    let mut n = 0;
    for _ in 0..max_batches {
        let batch: Vec<Value> = (n..n + 10)
            .map(|i| json!({"to": {"channel": channel}, "data": {"n": i, "pad": pad}}))
            .collect();
        gw.send(json!(batch)).await;
        for i in n..n + 10 {
            assert_eq!(
                fine.recv().await["data"]["n"],
                i,
                "the fine client gets everything"
            );
        }
        n += 10;
        if done().await {
            return n;
        }
    }
    panic!("{n} messages published and the slow clients still keep up");
}

/// Waits for the next send-queue-depth sample of `connections` connections and checks that no
/// sample ever exceeded the queue's capacity. Returns how many samples were at most `le`.
async fn depth_samples(gw: &Gateway, connections: f64, le: &str) -> (f64, f64) {
    let count = "wsbridge_send_queue_depth_count";
    let before = gw.metric(count).await;
    eventually("a queue depth sample (every 5 s)", || async {
        gw.metric(count).await >= before + connections
    })
    .await;
    let total = gw.metric(count).await;
    let capacity = format!("wsbridge_send_queue_depth_bucket{{le=\"{CAPACITY}\"}}");
    assert_eq!(gw.metric(&capacity).await, total, "a sample above capacity");
    let at_most = format!("wsbridge_send_queue_depth_bucket{{le=\"{le}\"}}");
    (gw.metric(&at_most).await, total)
}

/// A replica with small send queues under `policy`, `slow` clients on "firehose" that will
/// never read, and one that does. The Redis is returned to keep it running.
async fn never_readers(policy: &str, slow: usize) -> (Redis, Gateway, Vec<Client>, Client) {
    let redis = Redis::start();
    let prefix = unique_prefix(&format!("neverread-{policy}"));
    let capacity = CAPACITY.to_string();
    let gw = Gateway::start_with(
        &redis,
        &prefix,
        &[
            ("WSBRIDGE__OUTBOUND__QUEUE_CAPACITY_MESSAGES", &capacity),
            ("WSBRIDGE__OUTBOUND__QUEUE_FULL_POLICY", policy),
        ],
    )
    .await;
    let mut slow_clients = Vec::new();
    for _ in 0..slow {
        let mut c = Client::connect(&gw).await;
        c.subscribe("firehose").await;
        slow_clients.push(c);
    }
    let mut fine = Client::connect(&gw).await;
    fine.subscribe("firehose").await;
    (redis, gw, slow_clients, fine)
}

#[tokio::test]
async fn readers_that_never_read_lose_messages_under_the_drop_policy() {
    deadline(TEST_DEADLINE, async {
        const SLOW: usize = 3;
        let (_redis, gw, slow, mut fine) = never_readers("drop", SLOW).await;

        // Until a batch is dropped whole for every slow client: all their queues are full.
        let before = std::cell::Cell::new(0.0);
        flood_until(&gw, &mut fine, "firehose", 200, || {
            let before = &before;
            let gw = &gw;
            async move {
                let now = gw.metric(QUEUE_FULL).await;
                let whole = now - before.get() == (10 * SLOW) as f64;
                before.set(now);
                whole
            }
        })
        .await;
        let dropped = gw.metric(QUEUE_FULL).await;
        assert!(dropped >= (10 * SLOW) as f64);

        // Sampled while they are stuck, their queues are full (above 4) but never above capacity.
        let (at_most_4, total) = depth_samples(&gw, (SLOW + 1) as f64, "4").await;
        assert!(at_most_4 <= total - SLOW as f64, "{at_most_4} of {total}");

        // Nobody was closed: the drop policy keeps slow clients, with a gap.
        assert_eq!(gw.metric("wsbridge_connections").await, (SLOW + 1) as f64);
        assert_eq!(closed_total(&gw).await, 0.0);
        still_serves(&gw, &mut fine, 1).await;
        drop(slow);
        settles_at(&gw, 1.0).await;
    })
    .await;
}

#[tokio::test]
async fn readers_that_never_read_are_closed_under_the_close_policy() {
    deadline(TEST_DEADLINE, async {
        const SLOW: usize = 3;
        let (_redis, gw, mut slow, mut fine) = never_readers("close", SLOW).await;

        let ids: Vec<String> = slow.iter().map(|c| c.connection.clone()).collect();
        flood_until(&gw, &mut fine, "firehose", 200, || async {
            ids.iter().all(|id| gw.closing_decided(id, 1013))
        })
        .await;
        for c in &mut slow {
            // Reading now, each finds what was queued and then 1013 (not a reset).
            c.expect_close(1013).await;
        }
        settles_at(&gw, 1.0).await;
        assert_eq!(gw.metric(&closed("slow_consumer")).await, SLOW as f64);
        assert_eq!(closed_total(&gw).await, SLOW as f64);
        // Each was dropped at least the message that overflowed its queue.
        assert!(gw.metric(QUEUE_FULL).await >= SLOW as f64);
        depth_samples(&gw, 1.0, "4").await;
        still_serves(&gw, &mut fine, 1).await;
    })
    .await;
}

#[tokio::test]
async fn a_connection_storm_leaves_nothing_behind() {
    deadline(TEST_DEADLINE, async {
        const STORM: usize = 500;
        let redis = Redis::start();
        let prefix = unique_prefix("storm");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut fine = Client::connect(&gw).await;
        let addr = public_addr(&gw);

        let kinds = open_many(STORM, |i| {
            let gw = &gw;
            let addr = addr.clone();
            async move {
                match i % 10 {
                    // A clean close: close frame, then gone.
                    0..=3 => {
                        let mut c = Client::connect(gw).await;
                        c.ws.close(None).await.unwrap();
                        "clean"
                    }
                    // Welcomed, then the TCP connection dropped without a close frame.
                    4..=6 => {
                        drop(Client::connect(gw).await);
                        "dropped"
                    }
                    // Half a handshake, then gone.
                    7 | 8 => {
                        let mut s = TcpStream::connect(&addr).await.unwrap();
                        let _ = s.write_all(&UPGRADE.as_bytes()[..40]).await;
                        "half"
                    }
                    // A whole upgrade request, gone before the answer.
                    _ => {
                        let mut s = TcpStream::connect(&addr).await.unwrap();
                        let _ = s.write_all(UPGRADE.as_bytes()).await;
                        "unanswered"
                    }
                }
            }
        })
        .await;
        let count = |k: &str| kinds.iter().filter(|&&x| x == k).count() as f64;

        settles_at(&gw, 1.0).await;
        let opened = gw.metric("wsbridge_connections_opened_total").await;
        let welcomed = 1.0 + count("clean") + count("dropped");
        assert!(
            opened >= welcomed && opened <= welcomed + count("unanswered"),
            "opened {opened}"
        );
        assert_eq!(gw.metric(&closed("client")).await, count("clean"));
        assert_eq!(gw.metric(&closed("protocol")).await, 0.0);
        assert_eq!(gw.metric(&refusals("connections")).await, 0.0);
        still_serves(&gw, &mut fine, 1).await;
    })
    .await;
}
