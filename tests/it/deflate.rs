//! permessage-deflate (RFC 7692) as a client sees it: what the upgrade answers, which messages
//! arrive compressed, compressed client messages stored like any other, one compression per
//! message for all of a replica's recipients, and the closes for bad compressed input.
//!
//! The client here is raw (tokio-tungstenite refuses frames with RSV1): it writes masked frames
//! itself and inflates with flate2 directly, not through the gateway's code.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
const CHROMIUM_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A WebSocket client that speaks permessage-deflate by hand.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The `Sec-WebSocket-Extensions` the gateway answered, if any.
    extensions: Option<String>,
    msgpack: bool,
    connection: String,
}

/// A data message as it arrived.
struct Received {
    compressed: bool,
    value: Value,
}

impl Raw {
    async fn connect(gw: &Gateway, offer: Option<&str>, msgpack: bool) -> Raw {
        let addr = gw
            .ws_url
            .trim_start_matches("ws://")
            .trim_end_matches("/ws");
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        if let Some(offer) = offer {
            request.push_str(&format!("Sec-WebSocket-Extensions: {offer}\r\n"));
        }
        if msgpack {
            request.push_str("Sec-WebSocket-Protocol: wsbridge.msgpack\r\n");
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::with_capacity(4096);
        let end = loop {
            let n = tcp.read_buf(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed during the upgrade");
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8(buf[..end].to_vec()).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_string())
        });
        let mut raw = Raw {
            tcp,
            buf: buf[end..].to_vec(),
            extensions,
            msgpack,
            connection: String::new(),
        };
        let welcome = raw.recv().await.value;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        raw.connection = welcome["connection"].as_str().unwrap().to_string();
        raw
    }

    /// Writes one masked frame with `first` as its first byte (FIN, RSV1, opcode).
    async fn frame(&mut self, first: u8, payload: &[u8]) {
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&f).await.unwrap();
    }

    /// Sends `frame` in this client's encoding, compressed or not, in one frame.
    async fn send(&mut self, frame: Value, compress: bool) {
        let (opcode, payload) = self.encode(&frame);
        if compress {
            self.frame(0xc0 | opcode, &deflate(&payload)).await;
        } else {
            self.frame(0x80 | opcode, &payload).await;
        }
    }

    fn encode(&self, frame: &Value) -> (u8, Vec<u8>) {
        if self.msgpack {
            (2, rmp_serde::to_vec_named(frame).unwrap())
        } else {
            (1, frame.to_string().into_bytes())
        }
    }

    /// The next frame: (first byte, payload); `None` once the connection is gone.
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
                if len != usize::MAX && self.buf.len() >= at + len {
                    let first = self.buf[0];
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((first, payload));
                }
            }
            self.buf.reserve(65536);
            let n = tokio::time::timeout(PATIENCE, self.tcp.read_buf(&mut self.buf))
                .await
                .expect("a frame within PATIENCE")
                .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// The next data message, inflated when compressed; pings are skipped.
    async fn recv(&mut self) -> Received {
        loop {
            let (first, payload) = self.read_frame().await.expect("a message, not the end");
            match first & 0x0f {
                1 | 2 => {
                    assert_eq!(first & 0x80, 0x80, "the gateway sends whole messages");
                    let compressed = first & 0x40 != 0;
                    let payload = if compressed {
                        inflate(&payload)
                    } else {
                        payload
                    };
                    let value = if first & 0x0f == 2 {
                        server_frame_msgpack(&payload)
                    } else {
                        server_frame_json(std::str::from_utf8(&payload).unwrap())
                    };
                    return Received { compressed, value };
                }
                9 | 10 => continue,
                8 => panic!("closed: {:?}", close_code(&payload)),
                other => panic!("opcode {other}"),
            }
        }
    }

    /// The close code the gateway sends next, skipping anything else.
    async fn close_code(&mut self) -> Option<u16> {
        while let Some((first, payload)) = self.read_frame().await {
            if first & 0x0f == 8 {
                return close_code(&payload);
            }
        }
        None
    }
}

fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// Raw deflate of one message, the sync-flush tail taken off (RFC 7692 §7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert_eq!(c.total_in() as usize, data.len());
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Inflates one compressed message (RFC 7692 §7.2.2).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    assert_eq!(d.total_in() as usize, input.len(), "inflated in one go");
    out
}

fn deflated(path: &str) -> String {
    format!("wsbridge_deflate_messages_total{{path=\"{path}\"}}")
}

/// A message of about `len` bytes of JSON.
fn big(len: usize) -> Value {
    json!({"text": "all work and no play makes jack a dull boy ".repeat(len / 44 + 1)})
}

#[tokio::test]
async fn a_fan_out_is_compressed_once_and_every_deflate_client_gets_it_compressed() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("deflate-fanout");
        let a = Gateway::start(&redis, &prefix).await;
        let b = Gateway::start(&redis, &prefix).await;
        let mut on_a = Vec::new();
        for _ in 0..3 {
            let mut c = Raw::connect(&a, Some(CHROMIUM_OFFER), false).await;
            assert_eq!(c.extensions.as_deref(), Some(ANSWER));
            c.send(
                json!({"type": "subscribe", "channel": "room:z", "id": 1}),
                false,
            )
            .await;
            assert_eq!(c.recv().await.value["type"], "subscribed");
            on_a.push(c);
        }
        let mut mp = Raw::connect(&a, Some("permessage-deflate"), true).await;
        mp.send(
            json!({"type": "subscribe", "channel": "room:z", "id": 1}),
            false,
        )
        .await;
        assert_eq!(mp.recv().await.value["type"], "subscribed");
        let mut plain = Raw::connect(&b, None, false).await;
        assert_eq!(plain.extensions, None, "no offer, no extension");
        plain
            .send(
                json!({"type": "subscribe", "channel": "room:z", "id": 1}),
                false,
            )
            .await;
        assert_eq!(plain.recv().await.value["type"], "subscribed");
        let fanout_before = a.metric(&deflated("fanout")).await;

        let data = big(2000);
        b.send(json!({"to": {"channel": "room:z"}, "data": data}))
            .await;
        for c in on_a.iter_mut().chain([&mut mp]) {
            let got = c.recv().await;
            assert!(
                got.compressed,
                "a large message to a deflate client is compressed"
            );
            assert_eq!(got.value["data"], data);
        }
        let got = plain.recv().await;
        assert!(!got.compressed);
        assert_eq!(got.value["data"], data);
        // Three JSON recipients and one MessagePack recipient: compressed once per encoding.
        assert_eq!(a.metric(&deflated("fanout")).await - fanout_before, 2.0);
        assert_eq!(b.metric(&deflated("fanout")).await, 0.0);

        // Below server.permessage_deflate_min_bytes (256) nothing is compressed.
        b.send(json!({"to": {"channel": "room:z"}, "data": "small"}))
            .await;
        for c in on_a.iter_mut().chain([&mut mp, &mut plain]) {
            let got = c.recv().await;
            assert!(!got.compressed, "a small message goes out as it is");
            assert_eq!(got.value["data"], "small");
        }
    })
    .await;
}

#[tokio::test]
async fn compressed_client_messages_are_stored_like_any_other_and_replies_are_compressed() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("deflate-inbound");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Raw::connect(&gw, Some(CHROMIUM_OFFER), false).await;
        let data = big(5000);
        c.send(
            json!({"type": "send", "stream": "chat", "data": data, "id": "z1"}),
            true,
        )
        .await;
        let ack = c.recv().await.value;
        assert_eq!(
            (ack["type"].as_str(), ack["id"].as_str()),
            (Some("ack"), Some("z1"))
        );

        // The same message in three fragments: RSV1 on the first only.
        let (_, payload) =
            c.encode(&json!({"type": "send", "stream": "chat", "data": data, "id": "z2"}));
        let compressed = deflate(&payload);
        let third = compressed.len() / 3;
        c.frame(0x40 | 1, &compressed[..third]).await;
        c.frame(0x00, &compressed[third..2 * third]).await;
        c.frame(0x80, &compressed[2 * third..]).await;
        let ack = c.recv().await.value;
        assert_eq!(
            (ack["type"].as_str(), ack["id"].as_str()),
            (Some("ack"), Some("z2"))
        );

        let mut mp = Raw::connect(&gw, Some(CHROMIUM_OFFER), true).await;
        mp.send(
            json!({"type": "send", "stream": "chat", "data": data, "id": "z3"}),
            true,
        )
        .await;
        assert_eq!(mp.recv().await.value["type"], "ack");

        let mut conn = redis.conn().await;
        let entries = xrange(&mut conn, &format!("{prefix}:in:chat")).await;
        let stored: Vec<(&str, Value)> = entries
            .iter()
            .map(|(_, f)| {
                let data = match text(&f["encoding"]) {
                    "msgpack" => rmp_serde::from_slice(&f["data"]).unwrap(),
                    _ => serde_json::from_slice(&f["data"]).unwrap(),
                };
                (text(&f["id"]), data)
            })
            .collect();
        assert_eq!(
            stored,
            [
                ("z1", data.clone()),
                ("z2", data.clone()),
                ("z3", data.clone())
            ]
        );
        assert_eq!(gw.metric(&deflated("inbound")).await, 3.0);

        // A reply over the minimum size is compressed for its one connection: an error frame
        // that names a long stream.
        let long = "s".repeat(300);
        c.send(
            json!({"type": "send", "stream": long, "data": 1, "id": "z4"}),
            false,
        )
        .await;
        let error = c.recv().await;
        assert_eq!(error.value["type"], "error");
        assert_eq!(error.value["code"], "stream_not_allowed");
        assert!(error.value.to_string().len() > 300, "it names the stream");
        assert!(error.compressed);
        assert_eq!(gw.metric(&deflated("connection")).await, 1.0);
    })
    .await;
}

#[tokio::test]
async fn bad_compressed_input_closes_only_its_own_connection() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("deflate-bad");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__MAX_MESSAGE_BYTES", "65536")],
        )
        .await;
        let mut bystander = Raw::connect(&gw, Some(CHROMIUM_OFFER), false).await;
        bystander
            .send(
                json!({"type": "subscribe", "channel": "room:b", "id": 1}),
                true,
            )
            .await;
        assert_eq!(bystander.recv().await.value["type"], "subscribed");

        // 1 MiB of spaces is about a kilobyte compressed: it must not inflate past 64 KiB.
        let mut bomb = Raw::connect(&gw, Some(CHROMIUM_OFFER), false).await;
        let spaces = format!(
            "{{\"type\":\"send\",\"stream\":\"chat\",\"data\":\"{}\"}}",
            " ".repeat(1 << 20)
        );
        let small = deflate(spaces.as_bytes());
        assert!(small.len() < 4096, "{} bytes", small.len());
        bomb.frame(0xc1, &small).await;
        assert_eq!(bomb.close_code().await, Some(1009));
        assert_eq!(
            gw.metric("wsbridge_limit_refusals_total{limit=\"message_size\"}")
                .await,
            1.0
        );

        let mut garbage = Raw::connect(&gw, Some(CHROMIUM_OFFER), false).await;
        garbage.frame(0xc1, &[0xff, 0xfe, 0xfd, 0xfc]).await;
        assert_eq!(garbage.close_code().await, Some(1007));

        // Deflated bytes that are not UTF-8 text.
        let mut not_text = Raw::connect(&gw, Some(CHROMIUM_OFFER), false).await;
        not_text.frame(0xc1, &deflate(&[0xc3, 0x28, b'a'])).await;
        assert_eq!(not_text.close_code().await, Some(1007));

        // RSV1 on a connection that agreed on no compression, and on a control frame.
        let mut no_offer = Raw::connect(&gw, None, false).await;
        no_offer.frame(0xc1, &deflate(b"{}")).await;
        assert_eq!(no_offer.close_code().await, Some(1002));
        let mut ping = Raw::connect(&gw, Some(CHROMIUM_OFFER), false).await;
        ping.frame(0xc9, b"").await;
        assert_eq!(ping.close_code().await, Some(1002));

        // Nothing else broke.
        gw.send(json!({"to": {"channel": "room:b"}, "data": big(1000)}))
            .await;
        let got = bystander.recv().await;
        assert!(got.compressed);
        assert_eq!(got.value["data"], big(1000));
    })
    .await;
}

#[tokio::test]
async fn offers_the_gateway_cannot_honour_are_declined_and_it_can_be_turned_off() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("deflate-offers");
        let gw = Gateway::start(&redis, &prefix).await;
        let declined = Raw::connect(
            &gw,
            Some("permessage-deflate; server_max_window_bits=8"),
            false,
        )
        .await;
        assert_eq!(declined.extensions, None);
        let mut second = Raw::connect(
            &gw,
            Some("permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10"),
            false,
        )
        .await;
        assert_eq!(
            second.extensions.as_deref(),
            Some(&*format!("{ANSWER}; server_max_window_bits=10"))
        );
        second
            .send(json!({"type": "subscribe", "channel": "room:w", "id": 1}), false)
            .await;
        second.recv().await;
        gw.send(json!({"to": {"channel": "room:w"}, "data": big(3000)}))
            .await;
        let got = second.recv().await;
        assert!(got.compressed);
        assert_eq!(got.value["data"], big(3000));

        let off = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__SERVER__PERMESSAGE_DEFLATE", "false")],
        )
        .await;
        let mut c = Raw::connect(&off, Some(CHROMIUM_OFFER), false).await;
        assert_eq!(c.extensions, None);
        c.send(json!({"type": "subscribe", "channel": "room:w", "id": 1}), false)
            .await;
        c.recv().await;
        off.send(json!({"to": {"channel": "room:w"}, "data": big(3000)}))
            .await;
        let got = c.recv().await;
        assert!(!got.compressed);
    })
    .await;
}
