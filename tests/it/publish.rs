//! Client publish: a `publish` frame goes through the same publisher as `POST /send`, where the
//! channel's config (and, with tokens, the token's `publish` claim) allows it.

use serde_json::{json, Value};

use crate::common::*;

const SECRET: &str = "publish-secret";

/// `cursor:*` takes client publishes (no history), `room:*` too and keeps history, `audit:*`
/// takes them and records them in the stream `audit`; `news:*` is configured but takes none.
fn publish_config(redis: &Redis, prefix: &str) -> String {
    format!(
        r#"{}
[[channels]]
pattern = "cursor:*"
client_publish = true

[[channels]]
pattern = "room:*"
history_size = 100
history_ttl_seconds = 600
client_publish = true

[[channels]]
pattern = "audit:*"
client_publish = true
publish_stream = "audit"

[[channels]]
pattern = "news:*"
history_size = 100
history_ttl_seconds = 600
"#,
        base_config(&redis.url(), prefix)
    )
}

async fn replica(redis: &Redis, prefix: &str, env: &[(&str, &str)]) -> Gateway {
    let gw = Gateway::spawn(&publish_config(redis, prefix), prefix, env);
    gw.wait_ready().await;
    gw
}

async fn replica_with_tokens(redis: &Redis, prefix: &str) -> Gateway {
    let config = format!(
        "{}\n[auth]\njwt_secret = \"{SECRET}\"\n",
        publish_config(redis, prefix)
    );
    let gw = Gateway::spawn(&config, prefix, &[]);
    gw.wait_ready().await;
    gw
}

fn publish(channel: &str, data: Value, id: Value) -> Value {
    json!({"type": "publish", "channel": channel, "data": data, "id": id})
}

/// Reads the next frame and checks it is the ack of `id`; returns its offset, if any.
async fn acked(c: &mut Client, id: Value) -> Option<String> {
    let ack = c.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], id, "{ack}");
    assert!(
        ack.get("entry").is_none(),
        "a publish ack has no entry: {ack}"
    );
    ack.get("offset").map(|o| o.as_str().unwrap().to_owned())
}

/// Reads the next frame and checks it is the error `code` for `id`.
async fn refused(c: &mut Client, id: Value, code: &str) -> Value {
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some(code)),
        "{e}"
    );
    assert_eq!(e["id"], id, "{e}");
    e
}

fn outcome(outcome: &str) -> String {
    format!("wsbridge_client_publishes_total{{outcome=\"{outcome}\"}}")
}

#[tokio::test]
async fn a_publish_reaches_subscribers_on_every_replica_and_the_publisher_itself() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("publish-reach");
        let a = replica(&redis, &prefix, &[]).await;
        let b = replica(&redis, &prefix, &[]).await;
        let mut publisher = Client::connect(&a).await;
        let mut on_b = Client::connect(&b).await;
        let mut elsewhere = Client::connect(&b).await;
        publisher.subscribe("cursor:1").await;
        on_b.subscribe("cursor:1").await;
        elsewhere.subscribe("cursor:2").await;

        publisher
            .send(publish("cursor:1", json!({"x": 10, "y": 20}), json!(1)))
            .await;
        // The subscriber on the other replica gets it as a backend's message, without an
        // offset (no history).
        let m = on_b.recv().await;
        assert_eq!(
            m,
            json!({"type": "message", "channel": "cursor:1", "data": {"x": 10, "y": 20}})
        );
        // The publisher is a subscriber like any other: it gets its own message, and the ack
        // (in either order: the ack follows Redis' answer, the message comes through pub/sub).
        let mut frames = [publisher.recv().await, publisher.recv().await];
        frames.sort_by_key(|f| f["type"].as_str().unwrap().to_owned());
        assert_eq!(frames[0], json!({"type": "ack", "id": 1}));
        assert_eq!(frames[1], m);
        // A member of another channel got nothing: the next thing it sees is a later message.
        b.send(json!({"to": {"channel": "cursor:2"}, "data": "next"}))
            .await;
        assert_eq!(elsewhere.recv().await["data"], "next");
        assert_eq!(a.metric(&outcome("accepted")).await, 1.0);
    })
    .await;
}

#[tokio::test]
async fn a_publish_on_a_history_channel_is_acked_with_its_offset_and_a_resume_replays_it() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("publish-history");
        let gw = replica(&redis, &prefix, &[]).await;
        let (status, sent) = gw
            .post("/send", &json!({"to": {"channel": "room:1"}, "data": "before"}))
            .await;
        assert_eq!(status, 202, "{sent}");
        let before = sent["offsets"][0].as_str().unwrap().to_owned();

        let mut publisher = Client::connect(&gw).await;
        publisher
            .send(publish("room:1", json!("from a client"), json!("p1")))
            .await;
        let offset = acked(&mut publisher, json!("p1"))
            .await
            .expect("an offset on a channel with history");
        assert_ne!(offset, before);

        // A client resuming from the offset before it gets it from the history, with the offset
        // the publisher was told.
        let mut late = Client::connect(&gw).await;
        late.send(json!({"type": "subscribe", "channel": "room:1", "since": before, "id": "r"}))
            .await;
        let replayed = late.recv().await;
        assert_eq!(
            replayed,
            json!({"type": "message", "channel": "room:1", "offset": offset, "data": "from a client"})
        );
        let subscribed = late.recv().await;
        assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
        assert_eq!(subscribed["recovered"], true, "{subscribed}");
    })
    .await;
}

#[tokio::test]
async fn a_publish_to_a_channel_that_does_not_allow_it_is_refused_and_not_delivered() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("publish-not-allowed");
        let gw = replica(&redis, &prefix, &[]).await;
        let mut subscriber = Client::connect(&gw).await;
        subscriber.subscribe("news:1").await;
        subscriber.subscribe("plain").await;
        let mut publisher = Client::connect(&gw).await;
        // A pattern without client_publish, and a channel no pattern matches.
        for (channel, id) in [("news:1", 1), ("plain", 2)] {
            publisher
                .send(publish(channel, json!("sneaky"), json!(id)))
                .await;
            let e = refused(&mut publisher, json!(id), "publish_not_allowed").await;
            assert!(
                e["message"].as_str().unwrap().contains("client_publish"),
                "{e}"
            );
        }
        // Nothing reached the subscriber: the first thing it gets is what a backend sent after.
        for channel in ["news:1", "plain"] {
            gw.send(json!({"to": {"channel": channel}, "data": "after"}))
                .await;
            let m = subscriber.recv().await;
            assert_eq!(
                (m["channel"].as_str(), &m["data"]),
                (Some(channel), &json!("after"))
            );
        }
        // Nor was anything kept in the history channel's history: it holds "after" alone.
        let mut conn = redis.conn().await;
        let kept: usize = redis::cmd("XLEN")
            .arg(format!("{prefix}:history:{{news:1}}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(kept, 1);
        // The publisher's connection still works.
        publisher
            .send(publish("cursor:1", json!("fine"), json!(3)))
            .await;
        acked(&mut publisher, json!(3)).await;
        assert_eq!(gw.metric(&outcome("publish_not_allowed")).await, 2.0);
        assert_eq!(
            gw.metric("wsbridge_inbound_rejected_total{code=\"publish_not_allowed\"}")
                .await,
            2.0
        );
    })
    .await;
}

#[tokio::test]
async fn with_tokens_only_the_publish_claim_allows_publishing() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("publish-claims");
        let gw = replica_with_tokens(&redis, &prefix).await;
        let connect = |claims: Value| {
            let url = format!("{}?token={}", gw.ws_url, token(SECRET, claims));
            async move { Client::connect_url(&url, false).await.unwrap() }
        };
        // Ann may subscribe to every cursor channel, and publish nowhere.
        let mut ann = connect(json!({"sub": "ann", "channels": ["cursor:*"]})).await;
        // Bob may publish to cursor:1 only.
        let mut bob = connect(json!({"sub": "bob", "publish": ["cursor:1"]})).await;
        ann.subscribe("cursor:1").await;
        ann.subscribe("cursor:2").await;

        // Subscribing is not publishing: the channels claim alone allows no publish.
        ann.send(publish("cursor:1", json!("from ann"), json!("a1")))
            .await;
        let e = refused(&mut ann, json!("a1"), "publish_forbidden").await;
        assert!(
            e["message"].as_str().unwrap().contains("publish claim"),
            "{e}"
        );
        // Outside the publish claim.
        bob.send(publish("cursor:2", json!("from bob"), json!("b1")))
            .await;
        refused(&mut bob, json!("b1"), "publish_forbidden").await;
        // The config comes first: a channel that takes no client publishes says so, whatever
        // the token.
        bob.send(publish("news:1", json!("from bob"), json!("b2")))
            .await;
        refused(&mut bob, json!("b2"), "publish_not_allowed").await;
        // Inside it, without being subscribed.
        bob.send(publish("cursor:1", json!("from bob"), json!("b3")))
            .await;
        acked(&mut bob, json!("b3")).await;
        // The first message Ann gets is Bob's allowed one: the refused ones went nowhere.
        assert_eq!(
            ann.recv().await,
            json!({"type": "message", "channel": "cursor:1", "data": "from bob"})
        );
        assert_eq!(gw.metric(&outcome("publish_forbidden")).await, 2.0);
    })
    .await;
}

#[tokio::test]
async fn publishes_count_against_the_rate_limit() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("publish-rate");
        let gw = replica(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__LIMITS__CLIENT_MESSAGES_PER_SECOND", "1"),
                ("WSBRIDGE__LIMITS__CLIENT_BURST_MESSAGES", "3"),
            ],
        )
        .await;
        let mut subscriber = Client::connect(&gw).await;
        subscriber.subscribe("cursor:1").await;
        let mut publisher = Client::connect(&gw).await;
        const FRAMES: i64 = 12;
        let started = std::time::Instant::now();
        for i in 0..FRAMES {
            publisher
                .send(publish("cursor:1", json!(i), json!(i)))
                .await;
        }
        let (mut taken, mut limited) = (Vec::new(), 0);
        for i in 0..FRAMES {
            let reply = publisher.recv().await;
            assert_eq!(reply["id"], i, "{reply}");
            match reply["type"].as_str() {
                Some("ack") => taken.push(i),
                Some("error") => {
                    assert_eq!(reply["code"], "rate_limited", "{reply}");
                    limited += 1;
                }
                _ => panic!("{reply}"),
            }
        }
        let elapsed = started.elapsed().as_secs();
        assert!(taken.len() >= 3, "the burst is taken: {taken:?}");
        assert!(
            taken.len() as u64 <= 3 + elapsed + 1,
            "{} taken in {elapsed} s",
            taken.len()
        );
        assert!(limited > 0);
        // Exactly the acked ones were delivered, then a backend's message.
        gw.send(json!({"to": {"channel": "cursor:1"}, "data": "end"}))
            .await;
        for i in &taken {
            assert_eq!(subscriber.recv().await["data"], *i);
        }
        assert_eq!(subscriber.recv().await["data"], "end");
        assert_eq!(gw.metric(&outcome("rate_limited")).await, limited as f64);
        assert_eq!(
            gw.metric("wsbridge_limit_refusals_total{limit=\"rate\"}")
                .await,
            limited as f64
        );
    })
    .await;
}

#[tokio::test]
async fn a_publish_to_a_channel_with_a_publish_stream_is_also_appended_to_it() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("publish-stream");
        let gw = replica(&redis, &prefix, &[]).await;
        let mut subscriber = Client::connect(&gw).await;
        subscriber.subscribe("audit:1").await;
        let mut json_client = Client::connect(&gw).await;
        let mut msgpack_client = Client::connect_msgpack(&gw).await;
        json_client
            .send(publish("audit:1", json!({"stroke": [1, 2]}), json!("j1")))
            .await;
        acked(&mut json_client, json!("j1")).await;
        msgpack_client
            .send(publish("audit:1", json!({"stroke": [3]}), json!(7)))
            .await;
        acked(&mut msgpack_client, json!(7)).await;
        // A resend with the same id is published again, but recorded once.
        json_client
            .send(publish("audit:1", json!({"stroke": [1, 2]}), json!("j1")))
            .await;
        acked(&mut json_client, json!("j1")).await;
        for want in [
            json!({"stroke": [1, 2]}),
            json!({"stroke": [3]}),
            json!({"stroke": [1, 2]}),
        ] {
            assert_eq!(subscriber.recv().await["data"], want);
        }
        // A publish to a channel without a publish stream records nothing.
        json_client
            .send(publish("cursor:1", json!("not recorded"), json!("j2")))
            .await;
        acked(&mut json_client, json!("j2")).await;

        // A backend reads the stream with the consumer group the config creates on it.
        let mut conn = redis.conn().await;
        let key = format!("{prefix}:in:audit");
        let entries = read_group(&mut conn, &key, "backend", 10).await;
        assert_eq!(entries.len(), 2, "{entries:?}");
        let (_, first) = &entries[0];
        assert_eq!(text(&first["publish"]), "audit:1");
        assert_eq!(text(&first["connection"]), json_client.connection);
        assert_eq!(text(&first["encoding"]), "json");
        assert_eq!(text(&first["id"]), "j1");
        assert_eq!(text(&first["user"]), "");
        let data: Value = serde_json::from_slice(&first["data"]).unwrap();
        assert_eq!(data, json!({"stroke": [1, 2]}));
        let (_, second) = &entries[1];
        assert_eq!(text(&second["publish"]), "audit:1");
        assert_eq!(text(&second["connection"]), msgpack_client.connection);
        assert_eq!(text(&second["encoding"]), "msgpack");
        assert_eq!(text(&second["id"]), "7");
        let data: Value = rmp_serde::from_slice(&second["data"]).unwrap();
        assert_eq!(data, json!({"stroke": [3]}));
        // Counted per publish the stream took, the resend answered with its first entry
        // included, as for a `send`.
        assert_eq!(
            gw.metric("wsbridge_inbound_messages_total{stream=\"audit\"}")
                .await,
            3.0
        );
    })
    .await;
}

#[tokio::test]
async fn a_publish_while_redis_is_down_is_refused_and_the_connection_publishes_after() {
    deadline(TEST_DEADLINE, async {
        let mut redis = Redis::start();
        let prefix = unique_prefix("publish-outage");
        let gw = replica(&redis, &prefix, &[]).await;
        let mut subscriber = Client::connect(&gw).await;
        subscriber.subscribe("cursor:1").await;
        let mut publisher = Client::connect(&gw).await;

        redis.kill();
        eventually("readyz 503", || async { gw.readyz().await.0 == 503 }).await;
        publisher
            .send(publish("cursor:1", json!("lost"), json!("down")))
            .await;
        let e = refused(&mut publisher, json!("down"), "redis_unavailable").await;
        assert!(
            e["message"].as_str().unwrap().contains("nothing was sent"),
            "{e}"
        );
        // With a publish stream, the append fails first and nothing is published.
        publisher
            .send(publish("audit:1", json!("lost"), json!("down2")))
            .await;
        let e = refused(&mut publisher, json!("down2"), "redis_unavailable").await;
        assert!(
            e["message"].as_str().unwrap().contains("not published"),
            "{e}"
        );

        redis.restart();
        eventually("ready again", || async { gw.readyz().await.0 == 200 }).await;
        publisher
            .send(publish("cursor:1", json!("back"), json!("up")))
            .await;
        acked(&mut publisher, json!("up")).await;
        assert_eq!(subscriber.recv().await["data"], "back");
        assert_eq!(gw.metric(&outcome("redis_unavailable")).await, 2.0);
    })
    .await;
}

#[tokio::test]
async fn a_messagepack_client_publishes_to_json_and_messagepack_subscribers() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("publish-msgpack");
        let gw = replica(&redis, &prefix, &[]).await;
        let mut json_sub = Client::connect(&gw).await;
        let mut msgpack_sub = Client::connect_msgpack(&gw).await;
        json_sub.subscribe("room:m").await;
        msgpack_sub.subscribe("room:m").await;
        let mut publisher = Client::connect_msgpack(&gw).await;
        let data = json!({"x": 1, "y": [2.5, "three", null, true]});
        publisher
            .send(publish("room:m", data.clone(), json!(5)))
            .await;
        // The ack, in MessagePack, with the message's offset.
        let offset = acked(&mut publisher, json!(5)).await.expect("history");
        let want = json!({"type": "message", "channel": "room:m", "offset": offset, "data": data});
        assert_eq!(json_sub.recv().await, want);
        assert_eq!(msgpack_sub.recv().await, want);
        // Refusals come in MessagePack too.
        publisher.send(publish("news:1", json!(1), json!(6))).await;
        refused(&mut publisher, json!(6), "publish_not_allowed").await;
    })
    .await;
}
