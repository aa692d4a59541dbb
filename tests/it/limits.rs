//! Every configured limit refuses what it should, says why, counts it, and leaves other clients
//! alone.

use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

fn refusals(limit: &str) -> String {
    format!("wsbridge_limit_refusals_total{{limit=\"{limit}\"}}")
}

fn fragment(opcode: OpCode, fin: bool, payload: Vec<u8>) -> Message {
    let header = FrameHeader {
        is_final: fin,
        opcode,
        ..FrameHeader::default()
    };
    Message::Frame(Frame::from_payload(header, payload.into()))
}

#[tokio::test]
async fn an_endless_fragmented_message_is_cut_off_at_the_message_limit() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("fragments");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__MAX_MESSAGE_BYTES", "4096")],
        )
        .await;
        let mut hostile = Client::connect(&gw).await;
        let mut fine = Client::connect(&gw).await;
        // Fragments of 1 KiB each, each under the limit, never finished.
        hostile
            .ws
            .send(fragment(OpCode::Data(Data::Text), false, vec![b'a'; 1024]))
            .await
            .unwrap();
        for _ in 0..10 {
            if hostile
                .ws
                .send(fragment(
                    OpCode::Data(Data::Continue),
                    false,
                    vec![b'a'; 1024],
                ))
                .await
                .is_err()
            {
                break;
            }
        }
        assert_eq!(hostile.closed().await, Some(1009));
        assert_eq!(gw.metric(&refusals("message_size")).await, 1.0);

        // A fragmented message within the limit is reassembled and taken.
        let text =
            json!({"type": "send", "stream": "chat", "data": "x".repeat(2000), "id": "frag"})
                .to_string();
        let (a, b) = text.as_bytes().split_at(1000);
        fine.ws
            .send(fragment(OpCode::Data(Data::Text), false, a.to_vec()))
            .await
            .unwrap();
        fine.ws
            .send(fragment(OpCode::Data(Data::Continue), true, b.to_vec()))
            .await
            .unwrap();
        let ack = fine.recv().await;
        assert_eq!(
            (ack["type"].as_str(), ack["id"].as_str()),
            (Some("ack"), Some("frag"))
        );
    })
    .await;
}

#[tokio::test]
async fn a_fast_sender_is_rate_limited_but_stays_connected() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("rate");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__LIMITS__CLIENT_MESSAGES_PER_SECOND", "1"),
                ("WSBRIDGE__LIMITS__CLIENT_BURST_MESSAGES", "5"),
            ],
        )
        .await;
        const FRAMES: usize = 20;
        let mut c = Client::connect(&gw).await;
        let started = std::time::Instant::now();
        for i in 0..FRAMES {
            c.send(json!({"type": "subscribe", "channel": format!("r{i}"), "id": i}))
                .await;
        }
        let mut taken = Vec::new();
        let mut limited = 0;
        for i in 0..FRAMES {
            let reply = c.recv().await;
            assert_eq!(reply["id"], i);
            match reply["type"].as_str() {
                Some("subscribed") => taken.push(i),
                Some("error") => {
                    assert_eq!(reply["code"], "rate_limited");
                    limited += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        // The burst of 5 passes; after it, only the tokens refilled (1 a second) while the
        // frames were being taken, however slow the machine: the rest is refused.
        let refilled = started.elapsed().as_secs_f64().floor() as usize;
        assert!(taken.starts_with(&[0, 1, 2, 3, 4]), "the burst: {taken:?}");
        assert!(
            taken.len() <= 5 + refilled,
            "taken {taken:?} with {refilled} tokens refilled"
        );
        assert!(limited > 0, "nothing refused: {taken:?}");
        let taken = taken.len();
        assert_eq!(taken + limited, FRAMES);
        assert_eq!(gw.metric(&refusals("rate")).await, limited as f64);
        assert_eq!(
            gw.metric("wsbridge_inbound_rejected_total{code=\"rate_limited\"}")
                .await,
            limited as f64
        );
        assert_eq!(gw.metric("wsbridge_connections").await, 1.0);
    })
    .await;
}

#[tokio::test]
async fn subscriptions_per_connection_are_capped() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("subcap");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__MAX_SUBSCRIPTIONS_PER_CONNECTION", "3")],
        )
        .await;
        let mut c = Client::connect(&gw).await;
        for ch in ["a", "b", "c"] {
            c.subscribe(ch).await;
        }
        // Subscribing again to a channel already joined is not a new subscription.
        c.subscribe("a").await;
        c.send(json!({"type": "subscribe", "channel": "d", "id": "d"}))
            .await;
        let e = c.recv().await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("too_many_subscriptions"), Some("d"))
        );
        assert_eq!(gw.metric(&refusals("subscriptions")).await, 1.0);
        // Leaving one makes room.
        c.send(json!({"type": "unsubscribe", "channel": "a", "id": "u"}))
            .await;
        assert_eq!(c.recv().await["type"], "unsubscribed");
        c.subscribe("d").await;
    })
    .await;
}

#[tokio::test]
async fn connections_beyond_the_cap_get_503_before_the_upgrade() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("conncap");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__MAX_CONNECTIONS", "2")],
        )
        .await;
        let first = Client::connect(&gw).await;
        let _second = Client::connect(&gw).await;
        match Client::connect_url(&gw.ws_url, false).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
                let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
                assert!(body.contains("too_many_connections"), "{body}");
            }
            Err(other) => panic!("expected HTTP 503, got {other:?}"),
            Ok(_) => panic!("third connection accepted"),
        }
        assert_eq!(gw.metric(&refusals("connections")).await, 1.0);
        // When one leaves, its permit is free again.
        drop(first);
        eventually("a slot is free again", || async {
            Client::connect_url(&gw.ws_url, false).await.is_ok()
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn batches_over_the_limit_are_refused_whole() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("batchcap");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__MAX_BATCH_MESSAGES", "3")],
        )
        .await;
        let batch: Vec<_> = (0..4)
            .map(|i| json!({"to": {"all": true}, "data": i}))
            .collect();
        let (status, v) = gw.post("/send", &json!(batch)).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (413, Some("batch_too_long")),
            "{v}"
        );
        assert_eq!(gw.metric(&refusals("batch")).await, 1.0);
        assert_eq!(gw.metric("wsbridge_outbound_published_total").await, 0.0);
        let batch: Vec<_> = (0..3)
            .map(|i| json!({"to": {"all": true}, "data": i}))
            .collect();
        assert_eq!(gw.post("/send", &json!(batch)).await.0, 202);
    })
    .await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_dropped() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("slowloris");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__HANDSHAKE_TIMEOUT_SECONDS", "1")],
        )
        .await;
        let addr = gw
            .ws_url
            .trim_start_matches("ws://")
            .trim_end_matches("/ws")
            .to_string();
        let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
        slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // The server hangs up (EOF or an error status) instead of waiting forever for the rest.
        let mut buf = Vec::new();
        let read = tokio::time::timeout(PATIENCE, slow.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "server kept a half-sent handshake open");
        eventually("handshake timeout counted", || async {
            gw.metric(&refusals("handshake_timeout")).await == 1.0
        })
        .await;
        // Meanwhile a normal client connects as usual.
        Client::connect(&gw).await;
    })
    .await;
}
