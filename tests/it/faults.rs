//! Redis faults: outage, restart, a frozen server, and a replica started before Redis.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn redis_outage_is_reported_and_everything_recovers_without_restarts() {
    deadline(TEST_DEADLINE, async {
        let mut redis = Redis::start();
        let prefix = unique_prefix("outage");
        let a = Gateway::start(&redis, &prefix).await;
        let b = Gateway::start(&redis, &prefix).await;
        let mut on_a = Client::connect(&a).await;
        let mut on_b = Client::connect(&b).await;
        on_a.subscribe("room:1").await;
        on_b.subscribe("room:1").await;

        redis.kill();

        // Readiness turns 503 with a reason naming Redis.
        eventually("readyz 503 on both replicas", || async {
            a.readyz().await.0 == 503 && b.readyz().await.0 == 503
        })
        .await;
        let (_, reason) = a.readyz().await;
        assert!(reason.contains("Redis"), "{reason}");
        // A backend learns its send was not accepted.
        let (status, v) = b
            .post(
                "/send",
                &json!({"to": {"channel": "room:1"}, "data": "lost?"}),
            )
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (503, Some("redis_unavailable")),
            "{v}"
        );
        // Redis refuses connections by now, so the gateway knows nothing was sent, and says so.
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("nothing was sent"), "{v}");
        // A client learns its message was not stored.
        on_a.send(json!({"type": "send", "stream": "chat", "data": 1, "id": "during-outage"}))
            .await;
        let e = on_a.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
            (
                Some("error"),
                Some("redis_unavailable"),
                Some("during-outage")
            ),
            "{e}"
        );
        assert!(
            e["message"].as_str().unwrap().starts_with("not stored"),
            "{e}"
        );

        assert!(
            a.metric("wsbridge_redis_errors_total{kind=\"connection\"}")
                .await
                >= 1.0
        );
        assert_eq!(a.metric("wsbridge_redis_up").await, 0.0);

        redis.restart();

        eventually("both replicas ready again", || async {
            a.readyz().await.0 == 200 && b.readyz().await.0 == 200
        })
        .await;
        // The same sockets are still open; pub/sub was resubscribed; delivery works both ways.
        b.send(json!({"to": {"channel": "room:1"}, "data": "after"}))
            .await;
        assert_eq!(on_a.recv().await["data"], "after");
        assert_eq!(on_b.recv().await["data"], "after");
        on_a.send(json!({"type": "send", "stream": "chat", "data": 2, "id": "after-outage"}))
            .await;
        let ack = on_a.recv().await;
        assert_eq!(
            (ack["type"].as_str(), ack["id"].as_str()),
            (Some("ack"), Some("after-outage"))
        );
        // Consumer groups were recreated on the empty Redis, so backends can read again.
        let mut conn = redis.conn().await;
        let entries = read_group(&mut conn, &format!("{prefix}:in:chat"), "backend", 10).await;
        assert_eq!(entries.len(), 1);
        assert_eq!(a.metric("wsbridge_connections").await, 1.0);
    })
    .await;
}

#[tokio::test]
async fn a_frozen_redis_is_detected_by_the_round_trip() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("frozen");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("room:f").await;

        // Connections stay open but nothing answers: only a round trip can tell.
        redis.freeze(true);
        eventually("readyz 503 while Redis is frozen", || async {
            gw.readyz().await.0 == 503
        })
        .await;
        redis.freeze(false);
        eventually("ready after thaw", || async { gw.readyz().await.0 == 200 }).await;
        gw.send(json!({"to": {"channel": "room:f"}, "data": "thawed"}))
            .await;
        assert_eq!(c.recv().await["data"], "thawed");
    })
    .await;
}

#[tokio::test]
async fn a_replica_started_before_redis_becomes_ready_when_redis_appears() {
    deadline(TEST_DEADLINE, async {
        let mut redis = Redis::start();
        redis.kill();
        let prefix = unique_prefix("late");
        let gw = Gateway::spawn(&base_config(&redis.url(), &prefix), &prefix, &[]);
        let (status, reason) = gw.readyz().await;
        assert_eq!(status, 503, "{reason}");
        // Clients may connect meanwhile; their sends are refused, not lost silently.
        let mut c = Client::connect(&gw).await;
        c.send(json!({"type": "send", "stream": "chat", "data": 1, "id": "early"}))
            .await;
        assert_eq!(c.recv().await["code"], "redis_unavailable");

        redis.restart();
        gw.wait_ready().await;
        c.subscribe("room:late").await;
        gw.send(json!({"to": {"channel": "room:late"}, "data": "hello"}))
            .await;
        assert_eq!(c.recv().await["data"], "hello");
    })
    .await;
}

#[tokio::test]
async fn a_pubsub_round_trip_failure_alone_makes_the_replica_unready() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("pausewrite");
        let gw = Gateway::start(&redis, &prefix).await;
        // CLIENT PAUSE WRITE holds PUBLISH but lets PING through: the command link looks healthy,
        // only the round trip through pub/sub can notice that nothing is being delivered. (On a
        // cluster, on every node.) The pause lasts until the test lifts it, once the replica
        // has said so: no race between the pause running out and the detection.
        let mut nodes = redis.node_conns().await;
        for conn in &mut nodes {
            let _: () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(120_000)
                .arg("WRITE")
                .query_async(conn)
                .await
                .unwrap();
        }
        eventually("readyz 503 from the pub/sub round trip", || async {
            let (status, reason) = gw.readyz().await;
            status == 503 && reason.contains("pub/sub")
        })
        .await;
        assert_eq!(gw.metric("wsbridge_redis_up").await, 1.0);
        for conn in &mut nodes {
            let _: () = redis::cmd("CLIENT")
                .arg("UNPAUSE")
                .query_async(conn)
                .await
                .unwrap();
        }
        eventually("ready after the pause", || async {
            gw.readyz().await.0 == 200
        })
        .await;
    })
    .await;
}
