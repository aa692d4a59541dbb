//! Channel history, resume and exactly-once inbound: a client that reconnects gets exactly what
//! it missed, in order, or is told it was not recovered; a resent `send` is stored once.

use serde_json::{json, Value};

use crate::common::*;

async fn start(redis: &Redis, prefix: &str, size: u64, env: &[(&str, &str)]) -> Gateway {
    let gw = Gateway::spawn(&with_history(redis, prefix, size), prefix, env);
    gw.wait_ready().await;
    gw
}

async fn subscribe_since(c: &mut Client, channel: &str, since: &str) -> (Vec<Value>, Value) {
    c.send(json!({"type": "subscribe", "channel": channel, "since": since, "id": "resume"}))
        .await;
    let mut replayed = Vec::new();
    loop {
        let frame = c.recv().await;
        if frame["type"] == "subscribed" {
            return (replayed, frame);
        }
        assert_eq!(frame["type"], "message", "{frame}");
        replayed.push(frame);
    }
}

#[tokio::test]
async fn channel_messages_carry_increasing_offsets_and_send_returns_them() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("offsets");
        let a = start(&redis, &prefix, 100, &[]).await;
        let b = start(&redis, &prefix, 100, &[]).await;
        let mut c = Client::connect(&a).await;
        c.subscribe("room:1").await;
        c.subscribe("other").await;
        let (status, answer) = b
            .post(
                "/send",
                &json!([
                    {"to": {"channel": "room:1"}, "data": 1},
                    {"to": {"channel": "other"}, "data": 2},
                    {"to": {"channel": "room:1"}, "data": 3}
                ]),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        let offsets = answer["offsets"].as_array().unwrap();
        assert_eq!(offsets.len(), 3);
        assert!(offsets[1].is_null());
        let m1 = c.recv().await;
        let m2 = c.recv().await;
        let m3 = c.recv().await;
        assert_eq!(
            (m1["data"].as_i64(), m1["offset"].clone()),
            (Some(1), offsets[0].clone())
        );
        assert_eq!(m2["data"], 2);
        assert!(m2.get("offset").is_none(), "no history, no offset: {m2}");
        assert_eq!(
            (m3["data"].as_i64(), m3["offset"].clone()),
            (Some(3), offsets[2].clone())
        );
        let id = |o: &Value| -> (u64, u64) {
            let (_, id) = o.as_str().unwrap().rsplit_once(':').unwrap();
            let (ms, seq) = id.split_once('-').unwrap();
            (ms.parse().unwrap(), seq.parse().unwrap())
        };
        assert!(
            id(&offsets[2]) > id(&offsets[0]),
            "offsets must increase: {offsets:?}"
        );
        // Stored, and expiring.
        let mut conn = redis.conn().await;
        let key = format!("{prefix}:history:{{room:1}}");
        assert_eq!(xrange(&mut conn, &key).await.len(), 2);
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 600, "{ttl}");
    })
    .await;
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_what_it_missed_then_live() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("resume");
        let a = start(&redis, &prefix, 1000, &[]).await;
        let b = start(&redis, &prefix, 1000, &[]).await;
        let mut c = Client::connect_msgpack(&a).await;
        c.subscribe("room:r").await;
        b.send(json!({"to": {"channel": "room:r"}, "data": 0}))
            .await;
        let last = c.recv().await["offset"].as_str().unwrap().to_string();
        drop(c);
        for i in 1..=5 {
            b.send(json!({"to": {"channel": "room:r"}, "data": i}))
                .await;
        }
        // Reconnect to the other replica and resume.
        let mut c = Client::connect(&b).await;
        let (replayed, subscribed) = subscribe_since(&mut c, "room:r", &last).await;
        let data: Vec<i64> = replayed
            .iter()
            .map(|m| m["data"].as_i64().unwrap())
            .collect();
        assert_eq!(data, [1, 2, 3, 4, 5]);
        assert_eq!(
            subscribed,
            json!({"type": "subscribed", "channel": "room:r", "id": "resume", "recovered": true})
        );
        a.send(json!({"to": {"channel": "room:r"}, "data": 6}))
            .await;
        assert_eq!(c.recv().await["data"], 6);
        assert_eq!(
            b.metric("wsbridge_resumes_total{recovered=\"true\"}").await,
            1.0
        );
    })
    .await;
}

#[tokio::test]
async fn no_gap_and_no_duplicate_while_messages_keep_coming_during_the_resume() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("resume-race");
        let gw = start(&redis, &prefix, 10_000, &[]).await;
        let publisher = start(&redis, &prefix, 10_000, &[]).await;
        let mut first = Client::connect(&gw).await;
        first.subscribe("room:busy").await;
        publisher
            .send(json!({"to": {"channel": "room:busy"}, "data": 0}))
            .await;
        let since = first.recv().await["offset"].as_str().unwrap().to_string();
        drop(first);
        // A publisher keeps sending while clients resume.
        let api = publisher.api_url.clone();
        let sender = tokio::spawn(async move {
            for i in 1..=300 {
                let body = json!({"to": {"channel": "room:busy"}, "data": i}).to_string();
                let (status, _) = http("POST", &format!("{api}/send"), Some(&body), None).await;
                assert_eq!(status, 202);
            }
        });
        let mut clients = Vec::new();
        for _ in 0..10 {
            let mut c = Client::connect(&gw).await;
            let (replayed, subscribed) = subscribe_since(&mut c, "room:busy", &since).await;
            assert_eq!(subscribed["recovered"], true);
            clients.push((c, replayed));
        }
        sender.await.unwrap();
        for (mut c, replayed) in clients {
            let mut seen: Vec<i64> = replayed
                .iter()
                .map(|m| m["data"].as_i64().unwrap())
                .collect();
            while seen.last() != Some(&300) {
                seen.push(c.recv().await["data"].as_i64().unwrap());
            }
            assert_eq!(
                seen,
                (1..=300).collect::<Vec<_>>(),
                "gap or duplicate across the switch"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_trimmed_history_says_not_recovered_and_replays_nothing() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("trimmed");
        let gw = start(&redis, &prefix, 3, &[]).await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("room:t").await;
        gw.send(json!({"to": {"channel": "room:t"}, "data": 0}))
            .await;
        let since = c.recv().await["offset"].as_str().unwrap().to_string();
        drop(c);
        for i in 1..=10 {
            gw.send(json!({"to": {"channel": "room:t"}, "data": i}))
                .await;
        }
        let mut c = Client::connect(&gw).await;
        let (replayed, subscribed) = subscribe_since(&mut c, "room:t", &since).await;
        assert!(replayed.is_empty(), "{replayed:?}");
        assert_eq!(subscribed["recovered"], false);
        gw.send(json!({"to": {"channel": "room:t"}, "data": "live"}))
            .await;
        assert_eq!(c.recv().await["data"], "live");
        assert_eq!(
            gw.metric("wsbridge_resumes_total{recovered=\"false\"}")
                .await,
            1.0
        );
    })
    .await;
}

#[tokio::test]
async fn a_history_lost_with_redis_is_detected_by_its_epoch() {
    deadline(TEST_DEADLINE, async {
        let mut redis = Redis::start();
        let prefix = unique_prefix("epoch");
        let gw = start(&redis, &prefix, 100, &[]).await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("room:e").await;
        gw.send(json!({"to": {"channel": "room:e"}, "data": 0}))
            .await;
        let since = c.recv().await["offset"].as_str().unwrap().to_string();
        drop(c);
        // Redis restarts without persistence: the history is gone; new messages start a new epoch.
        redis.restart();
        // The replica may not have seen the restart yet: its first publish can fail with 503
        // ("may have been delivered"), and a backend would send it again.
        let body = json!({"to": {"channel": "room:e"}, "data": 1});
        eventually("a publish accepted after the restart", || async {
            gw.post("/send", &body).await.0 == 202
        })
        .await;
        let mut c = Client::connect(&gw).await;
        let (replayed, subscribed) = subscribe_since(&mut c, "room:e", &since).await;
        assert!(
            replayed.is_empty(),
            "entries of another epoch are not a replay: {replayed:?}"
        );
        assert_eq!(subscribed["recovered"], false);
    })
    .await;
}

#[tokio::test]
async fn a_bad_since_is_refused_and_since_on_a_channel_without_history_is_not_recovered() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("badsince");
        let gw = start(&redis, &prefix, 100, &[]).await;
        let mut c = Client::connect(&gw).await;
        c.send(json!({"type": "subscribe", "channel": "room:x", "since": "garbage", "id": "g"}))
            .await;
        let e = c.recv().await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("bad_request"), Some("g"))
        );
        let (replayed, subscribed) = subscribe_since(&mut c, "plain", "e:1-0").await;
        assert!(replayed.is_empty());
        assert_eq!(subscribed["recovered"], false);
    })
    .await;
}

#[tokio::test]
async fn a_resent_send_is_stored_once_even_after_a_reconnect() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("dedupe");
        let secret = "dd";
        let gw = start(
            &redis,
            &prefix,
            100,
            &[("WSBRIDGE__AUTH__JWT_SECRET", secret)],
        )
        .await;
        let url = format!(
            "{}?token={}",
            gw.ws_url,
            token(secret, json!({"sub": "u1"}))
        );
        let mut c = Client::connect_url(&url, false).await.unwrap();
        let frame = json!({"type": "send", "stream": "chat", "data": {"n": 1}, "id": "once"});
        c.send(frame.clone()).await;
        let first = c.recv().await;
        c.send(frame.clone()).await;
        let second = c.recv().await;
        drop(c);
        let mut c = Client::connect_url(&url, false).await.unwrap();
        c.send(frame.clone()).await;
        let third = c.recv().await;
        for ack in [&first, &second, &third] {
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        assert_eq!(first["entry"], second["entry"]);
        assert_eq!(first["entry"], third["entry"]);
        // Another id is another entry; the same id from another user is theirs.
        c.send(json!({"type": "send", "stream": "chat", "data": 2, "id": "twice"}))
            .await;
        assert_ne!(c.recv().await["entry"], first["entry"]);
        let other = format!(
            "{}?token={}",
            gw.ws_url,
            token(secret, json!({"sub": "u2"}))
        );
        let mut o = Client::connect_url(&other, false).await.unwrap();
        o.send(frame).await;
        assert_ne!(o.recv().await["entry"], first["entry"]);
        let mut conn = redis.conn().await;
        assert_eq!(
            xrange(&mut conn, &format!("{prefix}:in:chat")).await.len(),
            3
        );
    })
    .await;
}

/// Cuts every pub/sub link and keeps them from reconnecting (Redis refuses new connections,
/// and the default user may not subscribe)
/// until the returned guard's `restore` runs; command links stay up, so publishing works. On a
/// cluster, on every node.
pub(crate) async fn cut_pubsub_links(redis: &Redis) -> Vec<redis::aio::MultiplexedConnection> {
    let mut nodes = redis.node_conns().await;
    let mut cut = 0;
    for conn in &mut nodes {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query_async(conn)
            .await
            .unwrap();
        let connected: i64 = info
            .lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(conn)
            .await
            .unwrap();
        let pubsub = list.lines().count() as i64;
        cut += pubsub;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(connected - pubsub)
            .query_async(conn)
            .await
            .unwrap();
        // A link that still gets in (another client closed between INFO and CONFIG SET, as a
        // cluster client's topology connections do) cannot subscribe until the restore.
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("-subscribe")
            .arg("-ssubscribe")
            .arg("-psubscribe")
            .query_async(conn)
            .await
            .unwrap();
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(conn)
            .await
            .unwrap();
    }
    assert!(cut >= 1, "no pub/sub links to cut");
    nodes
}

pub(crate) async fn restore_connections(nodes: &mut [redis::aio::MultiplexedConnection]) {
    for conn in nodes {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("+@all")
            .query_async(conn)
            .await
            .unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(10000)
            .query_async(conn)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_replica_catches_up_what_its_pubsub_link_missed() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("catchup");
        let a = start(&redis, &prefix, 1000, &[]).await;
        let b = start(&redis, &prefix, 1000, &[]).await;
        let mut c = Client::connect(&a).await;
        c.subscribe("room:c").await;
        b.send(json!({"to": {"channel": "room:c"}, "data": 0}))
            .await;
        assert_eq!(c.recv().await["data"], 0);

        let mut conn = cut_pubsub_links(&redis).await;
        // Published while replica A cannot hear pub/sub at all.
        for i in 1..=20 {
            b.send(json!({"to": {"channel": "room:c"}, "data": i}))
                .await;
        }
        restore_connections(&mut conn).await;
        eventually("A caught up", || async {
            a.metric("wsbridge_catch_ups_total{recovered=\"true\"}")
                .await
                == 1.0
        })
        .await;
        b.send(json!({"to": {"channel": "room:c"}, "data": 21}))
            .await;
        let mut seen = Vec::new();
        while seen.last() != Some(&21) {
            let m = c.recv().await;
            assert_eq!(m["type"], "message", "{m}");
            seen.push(m["data"].as_i64().unwrap());
        }
        assert_eq!(
            seen,
            (1..=21).collect::<Vec<_>>(),
            "the gap must be filled exactly once, in order"
        );
    })
    .await;
}

/// Live messages without history (to a channel without history, a connection, everyone) that
/// were published while a replica's pub/sub link was down never reach its clients; each client
/// is told with `{"type":"missed"}`, once, before the next live message (JSON and MessagePack
/// clients alike).
#[tokio::test]
async fn live_messages_lost_while_the_pubsub_link_was_down_are_announced() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("missed");
        let a = start(&redis, &prefix, 10, &[]).await;
        let b = start(&redis, &prefix, 10, &[]).await;
        let mut json_client = Client::connect(&a).await;
        let mut msgpack_client = Client::connect_msgpack(&a).await;
        for c in [&mut json_client, &mut msgpack_client] {
            c.subscribe("lobby").await;
        }
        b.send(json!({"to": {"channel": "lobby"}, "data": 0})).await;
        for c in [&mut json_client, &mut msgpack_client] {
            assert_eq!(c.recv().await["data"], 0);
        }

        let mut conn = cut_pubsub_links(&redis).await;
        b.send(json!({"to": {"channel": "lobby"}, "data": 1})).await;
        b.send(json!({"to": {"connection": json_client.connection}, "data": 2}))
            .await;
        b.send(json!({"to": {"all": true}, "data": 3})).await;
        restore_connections(&mut conn).await;
        eventually("A's clients are told", || async {
            a.metric("wsbridge_missed_notices_total").await >= 2.0
        })
        .await;

        b.send(json!({"to": {"channel": "lobby"}, "data": "live"}))
            .await;
        for c in [&mut json_client, &mut msgpack_client] {
            assert_eq!(c.recv().await["data"], "live", "1..=3 were lost");
            assert_eq!(c.missed, 1, "one notice, before the next live message");
        }
    })
    .await;
}

#[tokio::test]
async fn a_gap_the_history_cannot_fill_is_announced() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("catchup-lost");
        let a = start(&redis, &prefix, 3, &[]).await;
        let b = start(&redis, &prefix, 3, &[]).await;
        let mut c = Client::connect(&a).await;
        c.subscribe("room:l").await;
        b.send(json!({"to": {"channel": "room:l"}, "data": 0}))
            .await;
        assert_eq!(c.recv().await["data"], 0);
        let mut conn = cut_pubsub_links(&redis).await;
        for i in 1..=10 {
            b.send(json!({"to": {"channel": "room:l"}, "data": i}))
                .await;
        }
        restore_connections(&mut conn).await;
        // Only 3 of the 10 are kept: the subscriber is told instead of getting a partial stream.
        let notice = c.recv().await;
        assert_eq!(
            notice,
            json!({"type": "subscribed", "channel": "room:l", "recovered": false})
        );
        b.send(json!({"to": {"channel": "room:l"}, "data": "live"}))
            .await;
        assert_eq!(c.recv().await["data"], "live");
        assert_eq!(
            a.metric("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await,
            1.0
        );
    })
    .await;
}

/// A client that stops reading a history channel is not silently given a gap, even under the
/// `drop` policy: when its send queue is full it is closed with 1013 (a dropped message would
/// be a gap it cannot see, offsets not being consecutive). It keeps every message it was sent
/// before the close, resumes on another replica from the last one, and ends with every message
/// exactly once, in order. Clients on the same replica that keep up lose nothing.
#[tokio::test]
async fn a_slow_client_on_a_history_channel_is_closed_not_given_a_gap_and_resumes() {
    deadline(TEST_DEADLINE, async {
        const PAD: usize = 32 * 1024;
        let redis = Redis::start();
        let prefix = unique_prefix("slow-history");
        let a = start(
            &redis,
            &prefix,
            100_000,
            &[
                ("WSBRIDGE__OUTBOUND__QUEUE_CAPACITY_MESSAGES", "16"),
                ("WSBRIDGE__OUTBOUND__QUEUE_FULL_POLICY", "drop"),
            ],
        )
        .await;
        let b = start(&redis, &prefix, 100_000, &[]).await;
        let mut slow = Client::connect(&a).await;
        slow.subscribe("room:firehose").await;
        let mut fine = Client::connect(&a).await;
        fine.subscribe("room:firehose").await;

        // Publish in batches of 10 until A gives up on the slow client; the fine one keeps up.
        let pad = "x".repeat(PAD);
        let mut published = 0u64;
        let slow_closed = "wsbridge_connections_closed_total{reason=\"slow_consumer\"}";
        while !a.closing_decided(&slow.connection, 1013) {
            assert!(published < 20_000, "the slow client was never closed");
            let batch: Vec<Value> = (published..published + 10)
                .map(|n| json!({"to": {"channel": "room:firehose"}, "data": {"n": n, "pad": pad}}))
                .collect();
            b.send(json!(batch)).await;
            for n in published..published + 10 {
                assert_eq!(
                    fine.recv().await["data"]["n"],
                    n,
                    "the fine client gets all"
                );
            }
            published += 10;
        }
        // What the slow client got before the close: a prefix of the stream, then 1013.
        let (frames, closed) = slow.frames_until_close().await;
        assert_eq!(closed, Closed::Code(1013));
        eventually("the slow client counted as closed", || async {
            a.metric(slow_closed).await == 1.0
        })
        .await;
        assert_eq!(
            a.metric("wsbridge_connections").await,
            1.0,
            "only the slow client was closed"
        );
        let mut got = Vec::new();
        let mut last_offset = None;
        for frame in frames {
            assert_eq!(frame["type"], "message", "{frame}");
            got.push(frame["data"]["n"].as_u64().unwrap());
            last_offset = Some(frame["offset"].as_str().unwrap().to_string());
        }
        let kept = got.len() as u64;
        assert!(kept > 0 && kept < published, "{kept} of {published}");
        assert_eq!(got, (0..kept).collect::<Vec<_>>(), "a prefix, in order");

        // Resume on B from the last message kept: the rest, exactly once, then live.
        let mut again = Client::connect(&b).await;
        let (replayed, subscribed) =
            subscribe_since(&mut again, "room:firehose", &last_offset.unwrap()).await;
        assert_eq!(subscribed["recovered"], true, "{subscribed}");
        let rest: Vec<u64> = replayed
            .iter()
            .map(|m| m["data"]["n"].as_u64().unwrap())
            .collect();
        assert_eq!(rest, (kept..published).collect::<Vec<_>>());
        b.send(json!({"to": {"channel": "room:firehose"}, "data": {"n": published}}))
            .await;
        assert_eq!(again.recv().await["data"]["n"], published);
    })
    .await;
}

#[tokio::test]
async fn a_send_with_history_is_published_after_redis_forgot_the_publish_script() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("noscript");
        let gw = start(&redis, &prefix, 100, &[]).await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("room:1").await;
        let send = |n: u64| json!({"to": {"channel": "room:1"}, "data": {"n": n}});
        let (status, first) = gw.post("/send", &send(1)).await;
        assert_eq!(status, 202, "{first}");
        // A restart or a failover loses the scripts Redis had loaded: the next call by SHA
        // answers NOSCRIPT, and the gateway loads the script and calls it again.
        for mut node in redis.node_conns().await {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut node)
                .await
                .unwrap();
        }
        let (status, second) = gw.post("/send", &send(2)).await;
        assert_eq!(status, 202, "{second}");
        for (n, answer) in [(1, &first), (2, &second)] {
            let m = c.recv().await;
            assert_eq!(m["data"]["n"], n, "{m}");
            assert_eq!(m["offset"], answer["offsets"][0], "{m} {answer}");
        }
        // NOSCRIPT is part of calling by SHA, not a failure.
        let errors = r#"wsbridge_redis_errors_total{kind="server"}"#;
        assert_eq!(gw.metric(errors).await, 0.0);
    })
    .await;
}
