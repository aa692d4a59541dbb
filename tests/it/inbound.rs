//! Inbound: client frames become stream entries a backend reads with XREADGROUP; lifecycle
//! events; bad client input gets error frames and leaves the connection working.

use futures_util::SinkExt;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn send_is_acked_after_redis_stored_it_and_a_group_reads_every_field() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("inbound");
        let secret = "s3";
        let gw = Gateway::start_with(&redis, &prefix, &[("WSBRIDGE__AUTH__JWT_SECRET", secret)]).await;
        let url = format!(
            "{}?token={}",
            gw.ws_url,
            token(secret, json!({"sub": "u42"}))
        );
        let mut json_client = Client::connect_url(&url, false).await.unwrap();
        let mut mp_client = Client::connect_url(&url, true).await.unwrap();

        json_client
            .send(json!({"type": "send", "stream": "chat", "data": {"text": "hé", "n": 1}, "id": "c1"}))
            .await;
        let ack = json_client.recv().await;
        assert_eq!(ack["type"], "ack");
        assert_eq!(ack["id"], "c1");
        let entry_json = ack["entry"].as_str().unwrap().to_string();

        mp_client
            .send(json!({"type": "send", "stream": "chat", "data": [1, "two"], "id": 7}))
            .await;
        let ack = mp_client.recv().await;
        assert_eq!(
            (ack["type"].as_str(), ack["id"].as_i64()),
            (Some("ack"), Some(7))
        );
        let entry_mp = ack["entry"].as_str().unwrap().to_string();

        let mut conn = redis.conn().await;
        let entries = read_group(&mut conn, &format!("{prefix}:in:chat"), "backend", 10).await;
        assert_eq!(entries.len(), 2, "{entries:?}");
        let (id, f) = &entries[0];
        assert_eq!(id, &entry_json);
        assert_eq!(text(&f["connection"]), json_client.connection);
        assert_eq!(text(&f["user"]), "u42");
        let data: serde_json::Value = serde_json::from_slice(&f["data"]).unwrap();
        assert_eq!(data, json!({"text": "hé", "n": 1}));
        assert_eq!(text(&f["encoding"]), "json");
        assert_eq!(text(&f["id"]), "c1");
        assert!(!text(&f["replica"]).is_empty());
        let ts: u64 = text(&f["ts"]).parse().unwrap();
        assert!(ts.abs_diff(now_secs() * 1000) < 60_000);

        let (id, f) = &entries[1];
        assert_eq!(id, &entry_mp);
        assert_eq!(text(&f["encoding"]), "msgpack");
        assert_eq!(text(&f["id"]), "7");
        assert_eq!(text(&f["connection"]), mp_client.connection);
        let data: (u8, String) = rmp_serde::from_slice(&f["data"]).unwrap();
        assert_eq!(data, (1, "two".to_string()));
        assert_eq!(
            gw.metric("wsbridge_inbound_messages_total{stream=\"chat\"}")
                .await,
            2.0
        );
    })
    .await;
}

#[tokio::test]
async fn many_sends_from_many_connections_keep_per_connection_order() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("order-in");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut clients = Vec::new();
        for _ in 0..20 {
            clients.push(Client::connect(&gw).await);
        }
        // Every client fires 50 sends without waiting for acks.
        for c in clients.iter_mut() {
            for i in 0..50 {
                c.send(json!({"type": "send", "stream": "orders", "data": i, "id": i}))
                    .await;
            }
        }
        for c in clients.iter_mut() {
            for i in 0..50 {
                let ack = c.recv().await;
                assert_eq!(
                    (ack["type"].as_str(), ack["id"].as_i64()),
                    (Some("ack"), Some(i)),
                    "{ack}"
                );
            }
        }
        let mut conn = redis.conn().await;
        let entries = xrange(&mut conn, &format!("{prefix}:in:orders")).await;
        assert_eq!(entries.len(), 1000);
        for c in &clients {
            let mine: Vec<i64> = entries
                .iter()
                .filter(|(_, f)| text(&f["connection"]) == c.connection)
                .map(|(_, f)| text(&f["data"]).parse().unwrap())
                .collect();
            assert_eq!(mine, (0..50).collect::<Vec<_>>());
        }
    })
    .await;
}

#[tokio::test]
async fn lifecycle_events_are_appended() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("events");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("room:9").await;
        c.send(json!({"type": "unsubscribe", "channel": "room:9", "id": "u"}))
            .await;
        assert_eq!(
            c.recv().await,
            json!({"type": "unsubscribed", "channel": "room:9", "id": "u"})
        );
        c.ws.close(None).await.unwrap();
        let mut conn = redis.conn().await;
        let key = format!("{prefix}:events");
        eventually("disconnect event", || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move { xrange(&mut conn, &key).await.len() >= 4 }
        })
        .await;
        let events = xrange(&mut conn, &key).await;
        let kinds: Vec<&str> = events.iter().map(|(_, f)| text(&f["event"])).collect();
        assert_eq!(kinds, ["connect", "subscribe", "unsubscribe", "disconnect"]);
        for (_, f) in &events {
            assert_eq!(text(&f["connection"]), c.connection);
            assert_eq!(text(&f["user"]), "");
            assert!(!text(&f["replica"]).is_empty());
            assert!(text(&f["ts"]).parse::<u64>().is_ok());
        }
        assert_eq!(text(&events[1].1["channel"]), "room:9");
        assert_eq!(text(&events[3].1["code"]), "1000");
        assert!(events[3].1.contains_key("reason"));
    })
    .await;
}

#[tokio::test]
async fn bad_client_frames_get_error_frames_and_the_connection_keeps_working() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("badclient");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect(&gw).await;
        let mut other = Client::connect(&gw).await;
        other.subscribe("room:ok").await;

        c.ws.send(tokio_tungstenite::tungstenite::Message::Text(
            "{not json".into(),
        ))
        .await
        .unwrap();
        let e = c.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("bad_frame"))
        );
        assert!(e["id"].is_null());
        assert!(!e["message"].as_str().unwrap().is_empty());

        c.send(json!({"type": "dance", "id": "d1"})).await;
        let e = c.recv().await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("unknown_type"), Some("d1"))
        );

        c.send(json!({"type": "send", "stream": "secret", "data": 1, "id": "s1"}))
            .await;
        let e = c.recv().await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("stream_not_allowed"), Some("s1"))
        );
        assert!(e["message"].as_str().unwrap().contains("secret"));

        c.send(json!({"type": "subscribe", "id": "n1"})).await;
        let e = c.recv().await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("bad_request"), Some("n1"))
        );

        c.send(json!({"type": "subscribe", "channel": 5, "id": "n2"}))
            .await;
        let e = c.recv().await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("bad_frame"), Some("n2"))
        );

        // Still working: subscribe, receive, send.
        c.subscribe("room:ok").await;
        gw.send(json!({"to": {"channel": "room:ok"}, "data": "still here"}))
            .await;
        assert_eq!(c.recv().await["data"], "still here");
        assert_eq!(other.recv().await["data"], "still here");
        c.send(json!({"type": "send", "stream": "chat", "data": 1, "id": "ok"}))
            .await;
        assert_eq!(c.recv().await["type"], "ack");
        assert_eq!(
            gw.metric("wsbridge_inbound_rejected_total{code=\"unknown_type\"}")
                .await,
            1.0
        );
        assert_eq!(
            gw.metric("wsbridge_inbound_rejected_total{code=\"stream_not_allowed\"}")
                .await,
            1.0
        );
    })
    .await;
}

#[tokio::test]
async fn subscribe_since_without_history_says_not_recovered() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("since");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect(&gw).await;
        c.send(json!({"type": "subscribe", "channel": "room:1", "since": "5-0", "id": "r"}))
            .await;
        assert_eq!(
            c.recv().await,
            json!({"type": "subscribed", "channel": "room:1", "id": "r", "recovered": false})
        );
    })
    .await;
}
