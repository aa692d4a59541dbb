//! On a real Redis Cluster (`redis.cluster_urls`): sharded pub/sub, hash-tagged keys, and a
//! master failing over while clients stay connected.

use redis::AsyncCommands;
use serde_json::json;

use crate::common::*;

const SECRET: &str = "cluster-secret";

/// A replica on `cluster` with auth and a history channel pattern (`room:*`).
async fn gateway(cluster: &Cluster, prefix: &str) -> Gateway {
    let config = format!(
        "{}\n[outbound]\nrouting = \"interest\"\n\n[auth]\njwt_secret = \"{SECRET}\"\n",
        history_config(&cluster.urls(), prefix, 100)
    );
    let gw = Gateway::spawn(&config, prefix, &[]);
    gw.wait_ready().await;
    gw
}

async fn connect_as(gw: &Gateway, user: &str) -> Client {
    Client::connect_as(gw, SECRET, user, false).await
}

#[tokio::test]
async fn the_contract_holds_on_a_cluster() {
    let cluster = Cluster::start(3, 0);
    let prefix = unique_prefix("cluster");
    let a = gateway(&cluster, &prefix).await;
    let b = gateway(&cluster, &prefix).await;
    let mut alice = connect_as(&a, "alice").await;
    let mut bob = connect_as(&b, "bob").await;

    // Channels with and without history, across replicas; offsets come back from /send.
    alice.subscribe("room:1").await;
    bob.subscribe("lobby").await;
    let (status, answer) = b
        .post(
            "/send",
            &json!([
                {"to": {"channel": "room:1"}, "data": 1},
                {"to": {"channel": "lobby"}, "data": 2},
                {"to": {"channel": "room:1"}, "data": 3}
            ]),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let offsets = answer["offsets"].as_array().unwrap().clone();
    let m1 = alice.recv().await;
    assert_eq!(
        (m1["data"].clone(), m1["offset"].clone()),
        (json!(1), offsets[0].clone())
    );
    assert_eq!(alice.recv().await["data"], 3);
    assert_eq!(bob.recv().await["data"], 2);

    // Users, connections, everyone.
    a.send(json!({"to": {"user": "bob"}, "data": "to bob"}))
        .await;
    assert_eq!(bob.recv().await["data"], "to bob");
    b.send(json!({"to": {"connection": alice.connection.clone()}, "data": "to alice"}))
        .await;
    assert_eq!(alice.recv().await["data"], "to alice");
    a.send(json!({"to": {"all": true}, "data": "all"})).await;
    assert_eq!(alice.recv().await["data"], "all");
    assert_eq!(bob.recv().await["data"], "all");

    // A backend's subscribe, then a send right after it.
    let (status, _) = a
        .post("/subscribe", &json!({"user": "bob", "channel": "room:2"}))
        .await;
    assert_eq!(status, 202);
    a.send(json!({"to": {"channel": "room:2"}, "data": "joined"}))
        .await;
    assert_eq!(bob.recv().await["type"], "subscribed");
    assert_eq!(bob.recv().await["data"], "joined");

    // Client frames land in the inbound stream, acked with their entry id.
    alice
        .send(json!({"type": "send", "stream": "chat", "data": {"hi": 1}, "id": "c1"}))
        .await;
    let ack = alice.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let mut conn = cluster.conn().await;
    let entries: redis::streams::StreamRangeReply =
        conn.xrange_all(format!("{prefix}:in:chat")).await.unwrap();
    assert_eq!(entries.ids.len(), 1);
    assert_eq!(entries.ids[0].id, ack["entry"].as_str().unwrap());

    // A reconnecting client resumes from its offset on the other replica.
    drop(alice);
    b.send(json!({"to": {"channel": "room:1"}, "data": 4}))
        .await;
    let mut again = connect_as(&b, "alice").await;
    again
        .send(json!({"type": "subscribe", "channel": "room:1", "since": offsets[2], "id": "r"}))
        .await;
    assert_eq!(again.recv().await["data"], 4);
    let subscribed = again.recv().await;
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
}

#[tokio::test]
async fn a_master_fails_over_and_deliveries_resume() {
    let mut cluster = Cluster::start(3, 1);
    let prefix = unique_prefix("cluster-failover");
    let a = gateway(&cluster, &prefix).await;
    let b = gateway(&cluster, &prefix).await;
    let mut member = connect_as(&a, "carol").await;
    member.subscribe("room:failover").await;
    b.send(json!({"to": {"channel": "room:failover"}, "data": "before"}))
        .await;
    assert_eq!(member.recv().await["data"], "before");

    // Kill the master of the channel's shard; its replica takes over.
    let victim = cluster.master_of("{room:failover}").expect("a master");
    cluster.kill(victim);
    let survivor = (victim + 1) % cluster.ports.len();
    eventually_within(
        "the cluster fails over",
        std::time::Duration::from_secs(20),
        || async {
            cluster.ok_on(survivor)
                && cluster
                    .master_of("{room:failover}")
                    .is_some_and(|m| m != victim)
        },
    )
    .await;
    // Deliveries resume on the connection the client kept: send until one arrives. The
    // replica's pub/sub link reconnected meanwhile; where its catch-up could not read the gap
    // from the history, the client was told so (`subscribed` with `recovered: false`).
    let mut n = 0;
    'resumed: loop {
        let (status, _) = b
            .post(
                "/send",
                &json!({"to": {"channel": "room:failover"}, "data": n}),
            )
            .await;
        if status == 202 {
            let wait = std::time::Duration::from_millis(500);
            while let Ok(Some(Ok(frame))) = tokio::time::timeout(wait, member.next_frame()).await {
                match frame["type"].as_str() {
                    Some("message") => break 'resumed,
                    Some("subscribed") => assert_eq!(frame["channel"], "room:failover"),
                    _ => panic!("unexpected frame {frame}"),
                }
            }
        }
        n += 1;
        assert!(n < 60, "no delivery after the failover");
    }
    assert_eq!(a.metric("wsbridge_connections").await, 1.0);
}

#[tokio::test]
async fn a_channel_whose_slot_moves_keeps_delivering() {
    let cluster = Cluster::start(3, 0);
    let prefix = unique_prefix("cluster-reshard");
    let a = gateway(&cluster, &prefix).await;
    let b = gateway(&cluster, &prefix).await;
    let mut member = connect_as(&a, "dave").await;
    member.subscribe("room:moving").await;
    b.send(json!({"to": {"channel": "room:moving"}, "data": "before"}))
        .await;
    assert_eq!(member.recv().await["data"], "before");

    // Move the channel's slot (its history and pub/sub channel) to another master, as
    // resharding does. Redis tells the shard channel's subscribers it is gone.
    let from = cluster.master_of("{room:moving}").expect("a master");
    let to = (from + 1) % cluster.ports.len();
    cluster.move_slot_of("{room:moving}", from, to);
    assert_eq!(cluster.master_of("{room:moving}"), Some(to));

    // Deliveries continue on the client's connection, with no message lost: what was published
    // after the move arrives, in order (a catch-up from history may announce itself first).
    for n in 0..5 {
        let (status, answer) = b
            .post(
                "/send",
                &json!({"to": {"channel": "room:moving"}, "data": n}),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        let frame = member.recv().await;
        match frame["type"].as_str() {
            Some("message") => got.push(frame["data"].clone()),
            Some("subscribed") => assert_eq!(frame["channel"], "room:moving"),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert_eq!(got, [json!(0), json!(1), json!(2), json!(3), json!(4)]);
}
