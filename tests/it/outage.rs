//! "Cannot tell now" is not "gone" (#18 item 3): while Redis cannot be read, nothing that waits
//! for the history (a client's resume, a replica's catch-up) is told `recovered: false`; it is
//! answered once Redis is back, with everything it missed, exactly once.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// The number of failed attempts `gw` has logged for history reads.
fn failed_reads(gw: &Gateway) -> usize {
    gw.log_text()
        .matches("history read failed; trying again")
        .count()
}

/// Clients on replica A are subscribed to a history channel and have seen messages 1..=5. Redis
/// and A die together (Redis comes back from its append-only file, history intact). The clients
/// reconnect to replica B, which has no member of the channel and cannot read where the channel
/// stands, and resume with `since` while Redis is still down. Once Redis is back, every client
/// gets what it missed, `recovered: true`, then the messages published after, each exactly once
/// and in order; none is ever told `recovered: false` (neither by its resume nor by B's catch-up
/// after B's pub/sub link comes back).
#[tokio::test]
async fn clients_of_a_dead_replica_resuming_on_another_while_redis_is_down_are_not_told_lost() {
    deadline(Duration::from_secs(120), async {
        let mut redis = Redis::start_with_aof();
        let prefix = unique_prefix("outage-resume");
        let config = with_history(&redis, &prefix, 100);
        let a = Gateway::spawn(&config, &prefix, &[]);
        let b = Gateway::spawn(&config, &prefix, &[]);
        a.wait_ready().await;
        b.wait_ready().await;

        const CLIENTS: usize = 4;
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let mut c = Client::connect(&a).await;
            c.subscribe("room:ha").await;
            clients.push(c);
        }
        let offsets = publish_numbered(&b, "room:ha", 1, 5).await;
        for c in &mut clients {
            for n in 1..=5 {
                let frame = c.recv().await;
                assert_eq!(
                    (&frame["data"], &frame["offset"]),
                    (&json!(n), &offsets[n - 1])
                );
            }
        }

        // Redis and A die together; the clients' sockets to A end.
        redis.kill();
        drop(a);
        let mut resumed = Vec::new();
        for (i, old) in clients.into_iter().enumerate() {
            drop(old);
            let mut c = Client::connect(&b).await;
            // Half resume from the last message seen, half from an earlier one (a client that
            // saved its offset a little before it lost the connection).
            let seen = if i % 2 == 0 { 5 } else { 2 };
            c.send(json!({"type": "subscribe", "channel": "room:ha",
                          "since": offsets[seen - 1], "id": format!("r{i}")}))
                .await;
            resumed.push((c, seen));
        }
        eventually("B's resume reads failed while Redis is down", || async {
            failed_reads(&b) >= 2 * CLIENTS
        })
        .await;
        redis.restart();

        for (i, (c, seen)) in resumed.iter_mut().enumerate() {
            let who = format!("client {i}");
            for n in *seen + 1..=5 {
                let frame = frame_within(c, Duration::from_secs(30), "the replay").await;
                assert_eq!(
                    (&frame["type"], &frame["data"], &frame["offset"]),
                    (&json!("message"), &json!(n), &offsets[n - 1]),
                    "{who}: {frame}"
                );
            }
            let frame = frame_within(c, Duration::from_secs(30), "subscribed").await;
            assert_eq!(
                (&frame["type"], &frame["id"], &frame["recovered"]),
                (&json!("subscribed"), &json!(format!("r{i}")), &json!(true)),
                "{who}: {frame}"
            );
        }
        // B's pub/sub link is back (it delivers again) and its catch-up ran: the messages
        // published now arrive once each, in order, with nothing before them.
        b.wait_ready().await;
        let later = publish_numbered(&b, "room:ha", 6, 8).await;
        for (i, (c, _)) in resumed.iter_mut().enumerate() {
            for n in 6..=8 {
                let frame = frame_within(c, Duration::from_secs(30), "a later message").await;
                assert_eq!(
                    (&frame["type"], &frame["data"], &frame["offset"]),
                    (&json!("message"), &json!(n), &later[n - 6]),
                    "client {i}: {frame} (nothing may come between the resume and message 6)"
                );
            }
        }
        assert_eq!(
            b.metric("wsbridge_resumes_total{recovered=\"false\"}")
                .await,
            0.0
        );
        assert_eq!(
            b.metric_opt("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await
                .unwrap_or(0.0),
            0.0
        );
    })
    .await;
}

/// A replica's pub/sub link drops while Redis is unreachable (frozen: connections stay open,
/// nothing answers) and comes back with the history intact: its subscribers are not told
/// `recovered: false`; they go on receiving every message once, in order.
#[tokio::test]
async fn a_catch_up_redis_cannot_answer_waits_instead_of_saying_lost() {
    deadline(Duration::from_secs(90), async {
        let redis = Redis::start_with_aof();
        let prefix = unique_prefix("outage-catchup");
        let gw = Gateway::spawn(&with_history(&redis, &prefix, 100), &prefix, &[]);
        gw.wait_ready().await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("room:cu").await;
        let first = publish_numbered(&gw, "room:cu", 1, 3).await;
        for n in 1..=3 {
            assert_eq!(c.recv().await["offset"], first[n - 1]);
        }

        redis.freeze(true);
        eventually("the replica reports Redis down", || async {
            gw.readyz().await.0 == 503
        })
        .await;
        eventually_within(
            "the pub/sub link is given up",
            Duration::from_secs(30),
            || async { gw.log_text().contains("pub/sub link lost") },
        )
        .await;
        redis.freeze(false);
        gw.wait_ready().await;

        let later = publish_numbered(&gw, "room:cu", 4, 6).await;
        for n in 4..=6 {
            let frame = frame_within(&mut c, Duration::from_secs(30), "a later message").await;
            assert_eq!(
                (&frame["type"], &frame["data"], &frame["offset"]),
                (&json!("message"), &json!(n), &later[n - 4]),
                "{frame}: nothing, and no `recovered: false`, before message 4"
            );
        }
        assert_eq!(
            gw.metric_opt("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await
                .unwrap_or(0.0),
            0.0
        );
    })
    .await;
}

/// A catch-up whose history read fails with an error reply rather than silence (here the ACL
/// takes XRANGE away from the gateway's user for a while, so the read script is refused) is not
/// turned into `recovered: false`: the replica holds the channel's live messages and reads again
/// until the read lands, then delivers what was missed and what it held, once each, in order.
#[tokio::test]
async fn a_catch_up_read_refused_for_a_while_is_read_again_not_reported_lost() {
    deadline(Duration::from_secs(60), async {
        let redis = Redis::start_single();
        let prefix = unique_prefix("outage-refused");
        let gw = Gateway::spawn(&with_history(&redis, &prefix, 100), &prefix, &[]);
        gw.wait_ready().await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("room:acl").await;
        let first = publish_numbered(&gw, "room:acl", 1, 2).await;
        for n in 1..=2 {
            assert_eq!(c.recv().await["offset"], first[n - 1]);
        }

        let mut conn = redis.conn().await;
        let admin = conn.clone();
        let acl = |rule: &'static str| {
            let mut conn = admin.clone();
            async move {
                let _: () = redis::cmd("ACL")
                    .arg("SETUSER")
                    .arg("default")
                    .arg(rule)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        };
        acl("-xrange").await;
        // The pub/sub link drops: the replica catches up, and its read is refused.
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        eventually("the catch-up read was refused", || async {
            gw.log_text().contains("catch-up history read failed")
        })
        .await;
        let later = publish_numbered(&gw, "room:acl", 3, 4).await;
        acl("+xrange").await;

        for n in 3..=4 {
            let frame = frame_within(&mut c, Duration::from_secs(30), "a later message").await;
            assert_eq!(
                (&frame["type"], &frame["data"], &frame["offset"]),
                (&json!("message"), &json!(n), &later[n - 3]),
                "{frame}: nothing, and no `recovered: false`, before message 3"
            );
        }
        assert_eq!(
            gw.metric_opt("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await
                .unwrap_or(0.0),
            0.0
        );
    })
    .await;
}
