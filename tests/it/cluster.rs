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
    deadline(TEST_DEADLINE, async {
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
    })
    .await;
}

/// Messages the failover test publishes, one per call, while the master dies in the middle.
const FAILOVER_MESSAGES: u64 = 60;

/// `redis-cli -p <port> <args>`.
fn cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The channel history's data fields, in order, once the cluster answers.
async fn history_data(urls: &str, key: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let read: redis::RedisResult<redis::streams::StreamRangeReply> = match conn_to(urls).await {
            Ok(mut conn) => conn.xrange_all(key).await,
            Err(e) => Err(e),
        };
        if let Ok(read) = read {
            return read
                .ids
                .iter()
                .map(|e| e.get::<String>("data").unwrap())
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster does not answer"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The master serving the channel dies (SIGKILL) while a backend publishes through the other
/// replica and the client stays connected. The backend resends a call only when the 503 says
/// nothing was sent, or when the history shows that a "may have been delivered" call was not
/// taken. Every accepted message must reach the client exactly once, in order, with the offset
/// the backend was given; where the promoted replica's history cannot be proven whole (always,
/// after a failover: see `lua_continuity` in `src/outbound/history.rs`) the client is told
/// `recovered: false` once instead of getting a replay that could skip lost entries.
#[tokio::test]
async fn a_master_fails_over_and_every_accepted_message_arrives_once_in_order() {
    deadline(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(3, 1);
        let prefix = unique_prefix("cluster-failover");
        let a = gateway(&cluster, &prefix).await;
        let b = gateway(&cluster, &prefix).await;
        let mut member = connect_as(&a, "carol").await;
        member.subscribe("room:failover").await;
        let history_key = format!("{prefix}:history:{{room:failover}}");

        // Replication is asynchronous: the test kills the master only once its replica holds the
        // channel's history and epoch, as a master that has been up for a while would.
        b.send(json!({"to": {"channel": "room:failover"}, "data": 0}))
            .await;
        assert_eq!(member.recv().await["data"], 0);
        let victim = cluster.master_of("{room:failover}").expect("a master");
        let victim_id = cli(cluster.ports[victim], &["cluster", "myid"])
            .trim()
            .to_string();
        let replica = (0..cluster.ports.len())
            .find(|&i| {
                cli(cluster.ports[i], &["info", "replication"])
                    .contains(&format!("master_port:{}", cluster.ports[victim]))
            })
            .expect("the master has a replica");
        eventually("the replica holds the history", || async {
            let port = cluster.ports[replica];
            let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let _: () = redis::cmd("READONLY").query_async(&mut conn).await.unwrap();
            let len: u64 = redis::cmd("XLEN")
                .arg(&history_key)
                .query_async(&mut conn)
                .await
                .unwrap_or(0);
            len == 1
        })
        .await;

        // The backend: one message per call, resending only what was certainly not taken.
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
        let publisher = {
            let (api, sent) = (b.api_url.clone(), sent.clone());
            let urls = cluster.urls();
            let history_key = history_key.clone();
            tokio::spawn(async move {
                let mut offsets: Vec<Option<String>> = Vec::new();
                let (mut retried, mut ambiguous) = (0, 0);
                for seq in 1..=FAILOVER_MESSAGES {
                    let body = json!({"to": {"channel": "room:failover"}, "data": seq}).to_string();
                    loop {
                        let (status, answer) =
                            http("POST", &format!("{api}/send"), Some(&body), None).await;
                        if status == 202 {
                            let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
                            offsets.push(Some(answer["offsets"][0].as_str().unwrap().to_string()));
                            break;
                        }
                        assert_eq!(status, 503, "{answer}");
                        if answer.contains("may have been delivered") {
                            ambiguous += 1;
                            let data = history_data(&urls, &history_key).await;
                            if data.contains(&seq.to_string()) {
                                offsets.push(None);
                                break;
                            }
                        } else {
                            assert!(answer.contains("nothing was sent"), "{answer}");
                            retried += 1;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    sent.store(seq + 1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                (offsets, retried, ambiguous)
            })
        };

        // Kill the master a third of the way; its replica takes over.
        eventually("a third of the messages sent", || async {
            sent.load(std::sync::atomic::Ordering::Relaxed) > FAILOVER_MESSAGES / 3
        })
        .await;
        cluster.kill(victim);
        let survivor = replica;
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
        let (offsets, retried, ambiguous) =
            tokio::time::timeout(std::time::Duration::from_secs(60), publisher)
                .await
                .expect("the backend published everything within a minute")
                .unwrap();

        // Every message at most once, in order, with the offset the backend was given. The
        // promoted replica may lack the newest entries its master acknowledged (replication is
        // asynchronous), and nothing it holds can show whether it does: the history's epoch ends
        // with the failover, and the client is told so once (`recovered: false`). Only there
        // may messages be missing; everything after the notice arrives in order.
        let mut got = Vec::new();
        let mut notices = Vec::new();
        while got.last().map(|(s, _)| *s) != Some(FAILOVER_MESSAGES) {
            let frame = member.recv().await;
            if frame["type"] == "subscribed" {
                assert_eq!(frame["recovered"], false, "{frame}");
                notices.push(got.len());
                continue;
            }
            assert_eq!(frame["type"], "message", "{frame}");
            got.push((frame["data"].as_u64().unwrap(), frame["offset"].clone()));
        }
        assert!(
            notices.len() <= 1,
            "told {} times: {notices:?}",
            notices.len()
        );
        for (i, pair) in got.windows(2).enumerate() {
            let (before, after) = (pair[0].0, pair[1].0);
            assert!(
                after > before,
                "message {after} after {before}: out of order or twice"
            );
            assert!(
                after == before + 1 || notices == [i + 1],
                "messages {before}..{after} missing without a recovered: false notice"
            );
        }
        for (seq, offset) in &got {
            if let Some(promised) = &offsets[*seq as usize - 1] {
                assert_eq!(
                    offset, promised,
                    "message {seq}: another offset than the 202 gave"
                );
            }
        }
        let data = history_data(&cluster.urls(), &history_key).await;
        let expected: Vec<String> = (0..=FAILOVER_MESSAGES).map(|n| n.to_string()).collect();
        assert_eq!(
            data, expected,
            "the history holds every message once, in order"
        );
        let caught_up = a
            .metric("wsbridge_catch_ups_total{recovered=\"true\"}")
            .await
            + a.metric("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await;
        assert!(
            caught_up >= 1.0,
            "A must have caught up after its shard link moved"
        );
        eprintln!(
            "master {victim_id} killed: {retried} calls resent after a nothing-sent 503, \
         {ambiguous} may-have-been 503s; A caught up {caught_up} times"
        );
        assert_eq!(a.metric("wsbridge_connections").await, 1.0);
    })
    .await;
}

#[tokio::test]
async fn a_channel_whose_slot_moves_keeps_delivering() {
    deadline(TEST_DEADLINE, async {
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
        // after the move arrives, in order, and the client is never told `recovered: false` (the
        // history moved with the slot, so the replica's catch-up can always fill the gap).
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
            assert_eq!(frame["type"], "message", "{frame}");
            got.push(frame["data"].clone());
        }
        assert_eq!(got, [json!(0), json!(1), json!(2), json!(3), json!(4)]);
        assert_eq!(
            a.metric("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await,
            0.0
        );
    })
    .await;
}
