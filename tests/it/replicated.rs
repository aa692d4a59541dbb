//! Acked means durable, where asked (#18 item 4): with `redis.wait_replicas`, a client's `ack`
//! and a backend's 202 for a history message come only once that many replicas of the Redis
//! primary hold the write; when they do not confirm in time, the answer is the "may have been
//! stored" error (the primary has it), never an ack.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// A `send` on `client` with frame id `id`; the answer.
async fn send(client: &mut Client, id: &str) -> (Value, Duration) {
    let started = Instant::now();
    client
        .send(json!({"type": "send", "stream": "chat", "data": id, "id": id}))
        .await;
    let answer = client.recv().await;
    (answer, started.elapsed())
}

/// With `wait_replicas = 1`: an acked `send` and a 202'd history message are on the replica by
/// the time they are answered. With the replica frozen (SIGSTOP: it stays connected, nothing
/// answers), the `send` is answered after the wait timeout with `redis_unavailable` saying it
/// may have been stored, and the `/send` with a 503 saying it may have been delivered; a resend
/// with the same id once the replica is back is acknowledged with the same entry (stored once).
#[tokio::test]
async fn with_wait_replicas_an_ack_means_a_replica_holds_the_write() {
    deadline(Duration::from_secs(60), async {
        let (primary, replica, mut rconn) = primary_and_replica().await;
        let prefix = unique_prefix("replicated");
        let env = [
            ("WSBRIDGE__REDIS__WAIT_REPLICAS", "1"),
            ("WSBRIDGE__REDIS__WAIT_TIMEOUT_MS", "300"),
        ];
        let gw = Gateway::spawn(&with_history(&primary, &prefix, 100), &prefix, &env);
        gw.wait_ready().await;
        let mut client = Client::connect(&gw).await;

        let (ack, _) = send(&mut client, "c1").await;
        assert_eq!(
            (&ack["type"], &ack["id"]),
            (&json!("ack"), &json!("c1")),
            "{ack}"
        );
        let entry = ack["entry"].as_str().unwrap().to_owned();
        let stream = format!("{prefix}:in:chat");
        let on_replica: Vec<redis::Value> = redis::cmd("XRANGE")
            .arg(&stream)
            .arg(&entry)
            .arg(&entry)
            .query_async(&mut rconn)
            .await
            .unwrap();
        assert_eq!(
            on_replica.len(),
            1,
            "the acked entry {entry} is on the replica"
        );

        let (status, answer) = gw
            .post("/send", &json!({"to": {"channel": "room:r"}, "data": 1}))
            .await;
        assert_eq!(status, 202, "{answer}");
        let history = format!("{prefix}:history:{{room:r}}");
        let len: u64 = redis::cmd("XLEN")
            .arg(&history)
            .query_async(&mut rconn)
            .await
            .unwrap();
        assert_eq!(len, 1, "the accepted history message is on the replica");

        replica.freeze(true);
        let (refused, took) = send(&mut client, "c2").await;
        assert_eq!(
            (&refused["type"], &refused["id"], &refused["code"]),
            (&json!("error"), &json!("c2"), &json!("redis_unavailable")),
            "{refused}"
        );
        let message = refused["message"].as_str().unwrap();
        assert!(message.contains("may have been stored"), "{message}");
        assert!(message.contains("0 of 1 replicas"), "{message}");
        assert!(
            took >= Duration::from_millis(300),
            "answered after {took:?}"
        );
        let (status, answer) = gw
            .post("/send", &json!({"to": {"channel": "room:r"}, "data": 2}))
            .await;
        assert_eq!(status, 503, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("may have been delivered"),
            "{answer}"
        );
        // Not a Redis outage: the replica stays ready.
        assert_eq!(gw.readyz().await.0, 200);

        replica.freeze(false);
        let (again, _) = send(&mut client, "c2").await;
        assert_eq!(
            (&again["type"], &again["id"]),
            (&json!("ack"), &json!("c2")),
            "{again}"
        );
        let mut pconn = primary.conn().await;
        let len: u64 = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut pconn)
            .await
            .unwrap();
        assert_eq!(len, 2, "c2 stored once although it was sent twice");
    })
    .await;
}

/// Off by default: with the replica frozen, acks and 202s come as before (the primary took the
/// write), which is the window a primary lost before replicating can take them with it.
#[tokio::test]
async fn without_wait_replicas_acks_do_not_wait_for_replicas() {
    deadline(Duration::from_secs(60), async {
        let (primary, replica, _rconn) = primary_and_replica().await;
        let prefix = unique_prefix("unreplicated");
        let gw = Gateway::spawn(&with_history(&primary, &prefix, 100), &prefix, &[]);
        gw.wait_ready().await;
        let mut client = Client::connect(&gw).await;
        replica.freeze(true);
        let (ack, took) = send(&mut client, "c1").await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert!(took < Duration::from_millis(300), "answered after {took:?}");
        let (status, answer) = gw
            .post("/send", &json!({"to": {"channel": "room:r"}, "data": 1}))
            .await;
        assert_eq!(status, 202, "{answer}");
        replica.freeze(false);
    })
    .await;
}

/// What a primary killed mid-stream took with it: acked sends and accepted history messages,
/// and how many of each the replica (then promoted) lacks.
struct Killed {
    acked: usize,
    acked_lost: usize,
    errors: usize,
    accepted: usize,
    accepted_lost: usize,
}

/// A client pipelines sends (rounds of 200, each sent before any of its answers is read) and a
/// backend publishes history messages one by one; the replica stalls (SIGSTOP) and loses its
/// link before the third round, and the primary is killed (SIGKILL) right after it;
/// then the replica is promoted by hand and searched for every acknowledged entry and every
/// accepted message.
async fn kill_primary_mid_stream(name: &str, wait_replicas: &str) -> Killed {
    let (mut primary, replica, mut rconn) = primary_and_replica().await;
    let prefix = unique_prefix(name);
    let env = [
        ("WSBRIDGE__REDIS__WAIT_REPLICAS", wait_replicas),
        ("WSBRIDGE__REDIS__WAIT_TIMEOUT_MS", "300"),
        ("WSBRIDGE__LIMITS__CLIENT_MESSAGES_PER_SECOND", "100000"),
        ("WSBRIDGE__LIMITS__CLIENT_BURST_MESSAGES", "100000"),
    ];
    let gw = Gateway::spawn(&with_history(&primary, &prefix, 10_000), &prefix, &env);
    gw.wait_ready().await;
    let mut client = Client::connect(&gw).await;

    const ROUND: usize = 200;
    const ROUNDS: usize = 6;
    let api = gw.api_url.clone();
    let backend = tokio::spawn(async move {
        let mut accepted = Vec::new();
        loop {
            let body = json!({"to": {"channel": "room:k"}, "data": accepted.len()}).to_string();
            let (status, answer) = http("POST", &format!("{api}/send"), Some(&body), None).await;
            if status != 202 {
                assert_eq!(status, 503, "{answer}");
                break;
            }
            let answer: Value = serde_json::from_str(&answer).unwrap();
            accepted.push(answer["offsets"][0].as_str().unwrap().to_owned());
        }
        accepted
    });
    let mut acked = Vec::new();
    let mut errors = 0;
    let mut pconn = primary.conn().await;
    for round in 0..ROUNDS {
        if round == 2 {
            // The replica stalls and loses its link: what the primary takes now never reaches
            // it, as when a replica lags behind and the primary dies.
            replica.freeze(true);
            let _: redis::Value = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("replica")
                .query_async(&mut pconn)
                .await
                .unwrap();
        }
        if round == 3 {
            primary.kill();
        }
        for n in round * ROUND..(round + 1) * ROUND {
            let id = format!("s{n}");
            client
                .send(json!({"type": "send", "stream": "chat", "data": n, "id": id}))
                .await;
        }
        for _ in 0..ROUND {
            let answer = client.recv().await;
            match answer["type"].as_str() {
                Some("ack") => acked.push(answer["entry"].as_str().unwrap().to_owned()),
                Some("error") => {
                    assert_eq!(answer["code"], "redis_unavailable", "{answer}");
                    errors += 1;
                }
                _ => panic!("{answer}"),
            }
        }
    }
    let accepted = backend.await.unwrap();
    replica.freeze(false);
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut rconn)
        .await
        .unwrap();
    let ids = |key: String| {
        let mut rconn = rconn.clone();
        async move {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .query_async(&mut rconn)
                .await
                .unwrap();
            reply.ids.into_iter().map(|e| e.id).collect::<Vec<String>>()
        }
    };
    let stream = ids(format!("{prefix}:in:chat")).await;
    let history = ids(format!("{prefix}:history:{{room:k}}")).await;
    let acked_lost = acked.iter().filter(|e| !stream.contains(e)).count();
    let accepted_lost = accepted
        .iter()
        .filter(|o| !history.contains(&o.rsplit_once(':').unwrap().1.to_owned()))
        .count();
    let killed = Killed {
        acked: acked.len(),
        acked_lost,
        errors,
        accepted: accepted.len(),
        accepted_lost,
    };
    eprintln!(
        "wait_replicas = {wait_replicas}, primary killed: {} acked, {} of them lost; {} errors; \
         {} history messages accepted, {} of them lost",
        killed.acked, killed.acked_lost, killed.errors, killed.accepted, killed.accepted_lost
    );
    assert!(
        killed.acked > 0 && killed.errors > 0,
        "the kill fell mid-stream"
    );
    killed
}

/// Killing the primary mid-stream (SIGKILL) with `wait_replicas = 1`: every `send` that was
/// acknowledged, and every history message answered 202, is on the replica that is then
/// promoted; the sends in flight when it died are answered with errors, never with acks.
#[tokio::test]
async fn with_wait_replicas_killing_the_primary_loses_nothing_acknowledged() {
    deadline(Duration::from_secs(90), async {
        let killed = kill_primary_mid_stream("replicated-kill", "1").await;
        assert_eq!(killed.acked_lost, 0, "acked entries lost");
        assert_eq!(killed.accepted_lost, 0, "accepted history messages lost");
    })
    .await;
}

/// The same with `wait_replicas = 0` (the default): the sends the primary acknowledged while
/// the replica lagged are acked and missing on the promoted replica — what the replica lacked
/// when the primary died (here one whole round of 200), printed for BENCHMARKS.md. The gateway
/// here is not pointed at the promoted replica, so its kept copies are never appended again:
/// this is the window `inbound.keep_unconfirmed_entries` covers when the gateway follows the
/// promotion (`ha_load::without_durable_acks_…`).
#[tokio::test]
async fn without_wait_replicas_killing_the_primary_loses_what_the_replica_lacked() {
    deadline(Duration::from_secs(90), async {
        let killed = kill_primary_mid_stream("unreplicated-kill", "0").await;
        assert_eq!(killed.acked, 600, "rounds 0..=2 acknowledged");
        assert_eq!(
            killed.acked_lost, 200,
            "round 2, taken while the replica lagged"
        );
    })
    .await;
}

/// With `wait_replicas = 0` (the default) a replica keeps a copy of each acked `send` only until
/// Redis's replicas hold it: with the replica frozen (SIGSTOP) the copies stay
/// (`wsbridge_inbound_unconfirmed_entries`), and once it is thawed and catches up they are
/// dropped, so the copies cost memory only while replication lags.
#[tokio::test]
async fn acked_sends_are_kept_until_the_replica_holds_them() {
    deadline(Duration::from_secs(60), async {
        let (primary, replica, _rconn) = primary_and_replica().await;
        let prefix = unique_prefix("kept");
        let gw = Gateway::spawn(&base_config(&primary.url(), &prefix), &prefix, &[]);
        gw.wait_ready().await;
        let mut client = Client::connect(&gw).await;
        let kept = || async { gw.metric("wsbridge_inbound_unconfirmed_entries").await };

        replica.freeze(true);
        for n in 1..=3 {
            send_acked(&mut client, &format!("k{n}"), json!(n)).await;
        }
        // A check after the three acks (the gauge is set by each) finds them unconfirmed.
        eventually("copies kept while the replica lags", || async {
            kept().await == 3.0
        })
        .await;

        replica.freeze(false);
        eventually(
            "the copies are dropped once the replica holds them",
            || async { kept().await == 0.0 },
        )
        .await;
        assert_eq!(
            gw.metric("wsbridge_inbound_appended_again_total").await,
            0.0
        );
    })
    .await;
}
