//! `outbound.routing`: broadcast sends every message to every replica; interest sends each only
//! to the replicas holding its recipients. Both deliver the same messages; what differs is what
//! the other replicas receive and filter.

use redis::AsyncCommands;
use serde_json::json;

use crate::common::*;

const INTEREST: [(&str, &str); 1] = [("WSBRIDGE__OUTBOUND__ROUTING", "interest")];
const BROADCAST: [(&str, &str); 1] = [("WSBRIDGE__OUTBOUND__ROUTING", "broadcast")];

/// Subscribers of pub/sub channel `name` (shard channel on a cluster), over every node.
async fn subscribers(redis: &Redis, name: &str) -> i64 {
    let command = if on_cluster() {
        "SHARDNUMSUB"
    } else {
        "NUMSUB"
    };
    let mut total = 0;
    for mut conn in redis.node_conns().await {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg(command)
            .arg(name)
            .query_async(&mut conn)
            .await
            .unwrap();
        total += n;
    }
    total
}

/// Received and filtered counts of a replica.
async fn pubsub(gw: &Gateway) -> (f64, f64) {
    (
        gw.metric("wsbridge_pubsub_received_total").await,
        gw.metric("wsbridge_pubsub_filtered_total").await,
    )
}

/// Ten channel messages published through `b` for a subscriber on `a`, then a fence from `a` for
/// a subscriber on `b`; returns what `b` received and filtered meanwhile, and what `a` filtered.
async fn channel_traffic_seen_by_the_other_replica(routing: [(&str, &str); 1]) -> (f64, f64, f64) {
    let redis = Redis::start();
    let prefix = unique_prefix("route");
    let a = Gateway::start_with(&redis, &prefix, &routing).await;
    let b = Gateway::start_with(&redis, &prefix, &routing).await;
    let mut on_a = Client::connect(&a).await;
    on_a.subscribe("room:a").await;
    // b holds a client too (in another channel): filtering is about replicas with clients.
    let mut on_b = Client::connect(&b).await;
    on_b.subscribe("room:b").await;
    let before = pubsub(&b).await;
    for n in 0..10 {
        b.send(json!({"to": {"channel": "room:a"}, "data": n}))
            .await;
    }
    for n in 0..10 {
        assert_eq!(on_a.recv().await["data"], n);
    }
    // A message b does deliver comes after the ten on b's link too: its counts are final.
    a.send(json!({"to": {"channel": "room:b"}, "data": "fence"}))
        .await;
    assert_eq!(on_b.recv().await["data"], "fence");
    let after = pubsub(&b).await;
    (after.0 - before.0, after.1 - before.1, pubsub(&a).await.1)
}

#[tokio::test]
async fn interest_routing_spares_replicas_the_channels_they_have_no_member_of() {
    deadline(TEST_DEADLINE, async {
        // Broadcast: b received all ten and the fence, and filtered the ten; a filtered the fence.
        let seen = channel_traffic_seen_by_the_other_replica(BROADCAST).await;
        assert_eq!(seen, (11.0, 10.0, 1.0));
        // Interest: b received only the fence; nobody filtered anything.
        let seen = channel_traffic_seen_by_the_other_replica(INTEREST).await;
        assert_eq!(seen, (1.0, 0.0, 0.0));
    })
    .await;
}

#[tokio::test]
async fn a_message_sent_right_after_subscribed_arrives() {
    deadline(TEST_DEADLINE, async {
        // The replica listens to a channel before it tells the client `subscribed`: a backend that
        // publishes the moment the client is in (through the other replica) is never too early.
        let redis = Redis::start();
        let prefix = unique_prefix("route-join");
        let a = Gateway::start_with(&redis, &prefix, &INTEREST).await;
        let b = Gateway::start_with(&redis, &prefix, &INTEREST).await;
        let mut client = Client::connect(&a).await;
        for n in 0..20 {
            let channel = format!("fresh:{n}");
            client.subscribe(&channel).await;
            b.send(json!({"to": {"channel": channel}, "data": n})).await;
            assert_eq!(client.recv().await["data"], n);
        }
        assert_eq!(a.metric("wsbridge_pubsub_channels").await, 20.0);
        // Leaving the last channel member's channel stops the subscription.
        client
            .send(json!({"type": "unsubscribe", "channel": "fresh:0", "id": "u"}))
            .await;
        assert_eq!(client.recv().await["type"], "unsubscribed");
        eventually("the link drops the channel", || async {
            a.metric("wsbridge_pubsub_channels").await == 19.0
        })
        .await;
        // And Redis has taken the unsubscription (on a cluster the confirmation may come first).
        let key = format!("{prefix}:ch:{{fresh:0}}");
        eventually("Redis has no subscriber for the channel", || async {
            subscribers(&redis, &key).await == 0
        })
        .await;
        let (received, _) = pubsub(&a).await;
        b.send(json!({"to": {"channel": "fresh:0"}, "data": "gone"}))
            .await;
        b.send(json!({"to": {"connection": client.connection.clone()}, "data": "fence"}))
            .await;
        assert_eq!(client.recv().await["data"], "fence");
        assert_eq!(pubsub(&a).await.0, received + 1.0, "only the fence came");
        // A client leaving closes its channels' subscriptions too.
        drop(client);
        eventually("the link drops every channel", || async {
            a.metric("wsbridge_pubsub_channels").await == 0.0
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn user_messages_go_to_the_replicas_listed_for_the_user() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("route-user");
        let secret = "s";
        let env = [
            INTEREST[0],
            ("WSBRIDGE__AUTH__JWT_SECRET", secret),
            ("WSBRIDGE__SERVER__REPLICA_ID", "ra"),
        ];
        let a = Gateway::start_with(&redis, &prefix, &env).await;
        let env_b = [env[0], env[1], ("WSBRIDGE__SERVER__REPLICA_ID", "rb")];
        let b = Gateway::start_with(&redis, &prefix, &env_b).await;
        let mut alice_a = Client::connect_as(&a, secret, "alice", false).await;
        let mut bob_b = Client::connect_as(&b, secret, "bob", false).await;
        // The replica listed itself before the welcome.
        let mut conn = redis.conn().await;
        let listed: Vec<String> = conn
            .zrange(format!("{prefix}:user-replicas:alice"), 0, -1)
            .await
            .unwrap();
        assert_eq!(listed, ["ra"]);

        let before_b = pubsub(&b).await;
        b.send(json!({"to": {"user": "alice"}, "data": "to alice"}))
            .await;
        assert_eq!(alice_a.recv().await["data"], "to alice");
        // Once alice also connects on b, both replicas get her messages.
        let mut alice_b = Client::connect_as(&b, secret, "alice", true).await;
        a.send(json!({"to": {"user": "alice"}, "data": "both"}))
            .await;
        assert_eq!(alice_a.recv().await["data"], "both");
        assert_eq!(alice_b.recv().await["data"], "both");
        // Connection messages go to the replica the id names.
        a.send(json!({"to": {"connection": bob_b.connection.clone()}, "data": "to bob"}))
            .await;
        assert_eq!(bob_b.recv().await["data"], "to bob");
        // b received "both" and "to bob" and nothing for anyone else; a filtered nothing.
        let after_b = pubsub(&b).await;
        assert_eq!((after_b.0 - before_b.0, after_b.1 - before_b.1), (2.0, 0.0));
        assert_eq!(pubsub(&a).await.1, 0.0);
    })
    .await;
}

#[tokio::test]
async fn a_message_sent_right_after_a_backend_subscribe_arrives() {
    deadline(TEST_DEADLINE, async {
        // POST /subscribe answers once the replica holding the connection has joined it (under
        // interest routing it acknowledges after it listens to the channel), so a send right after
        // the 202 reaches the new member, whichever replica the calls go to.
        let redis = Redis::start();
        let prefix = unique_prefix("route-backend-join");
        let secret = "s";
        let env = [INTEREST[0], ("WSBRIDGE__AUTH__JWT_SECRET", secret)];
        let a = Gateway::start_with(&redis, &prefix, &env).await;
        let b = Gateway::start_with(&redis, &prefix, &env).await;
        let mut client = Client::connect_as(&a, secret, "carol", false).await;
        for n in 0..20 {
            let channel = format!("joined-by-backend:{n}");
            // Alternate the two ways of naming the member.
            let who = if n % 2 == 0 {
                json!({"connection": client.connection.clone()})
            } else {
                json!({"user": "carol"})
            };
            let mut body = who.clone();
            body["channel"] = json!(channel);
            let (status, answer) = b.post("/subscribe", &body).await;
            assert_eq!(status, 202, "{answer}");
            b.send(json!({"to": {"channel": channel}, "data": n})).await;
            let subscribed = client.recv().await;
            assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
            assert_eq!(client.recv().await["data"], n);
        }
        // A subscribe for a connection no replica holds is answered at once: its replica is gone.
        let (status, _) = b
            .post(
                "/subscribe",
                &json!({"connection": "gone.00000000.1", "channel": "x"}),
            )
            .await;
        assert_eq!(status, 202);
    })
    .await;
}
