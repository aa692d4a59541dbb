//! The copies of acked sends (`redis.wait_replicas = 0`) on the most common deployment, one
//! Redis without replicas (issue #20): its persistence confirms them, so they do not pile up to
//! `inbound.keep_unconfirmed_entries` and trip `WsbridgeAckedSendsUnprotected` under steady load.
//! Without replicas and without persistence they are confirmed at once
//! (`lost_writes::acked_sends_a_snapshot_restart_lost_are_appended_again`).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

/// `INFO persistence`'s `name` field.
async fn persistence_field(redis: &Redis, name: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in INFO persistence"))
        .trim()
        .to_string()
}

/// One Redis with `appendonly yes`, `appendfsync everysec`: the copies are dropped once two
/// seconds have passed since the ack (Redis fsyncs every second, two at worst), not before; the
/// entries then survive a SIGKILL and restart without the gateway's help.
#[tokio::test]
async fn acked_sends_on_one_redis_with_appendfsync_everysec_are_confirmed_two_seconds_on() {
    deadline(Duration::from_secs(60), async {
        let mut redis =
            Redis::start_single_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
        assert_eq!(persistence_field(&redis, "aof_enabled").await, "1");
        let prefix = unique_prefix("kept-everysec");
        let gw = Gateway::spawn(&base_config(&redis.url(), &prefix), &prefix, &[]);
        gw.wait_ready().await;
        let mut c = Client::connect(&gw).await;
        let mut entries = Vec::new();
        for n in 1..=3 {
            entries.push(send_acked(&mut c, &format!("e{n}"), json!(n)).await);
        }
        let acked = Instant::now();
        let kept = || async { gw.metric("wsbridge_inbound_unconfirmed_entries").await };
        eventually("a copy of each acked send is kept first", || async {
            kept().await == 3.0
        })
        .await;
        eventually("the copies are confirmed by the fsync window", || async {
            kept().await == 0.0
        })
        .await;
        // The window starts at the keeper's first check after it kept the copy, which may come
        // a moment before the ack reaches this test: a little slack below 2 s.
        assert!(
            acked.elapsed() >= Duration::from_millis(1900),
            "confirmed {:?} after the acks, before the fsync window",
            acked.elapsed()
        );
        assert_eq!(
            gw.metric("wsbridge_inbound_unconfirmed_dropped_total")
                .await,
            0.0
        );

        // What Redis wrote to its append-only file survives the kill.
        redis.kill();
        redis.restart();
        gw.wait_ready().await;
        let key = format!("{prefix}:in:chat");
        let ids: Vec<String> = xrange(&mut redis.conn().await, &key)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, entries);
    })
    .await;
}

/// One Redis with snapshots only (a save point, no AOF): copies acked before a successful save
/// are dropped when the save ends; one acked after it is kept until the next.
#[tokio::test]
async fn acked_sends_on_one_redis_with_snapshots_are_confirmed_by_the_next_save() {
    deadline(Duration::from_secs(60), async {
        let redis = Redis::start_single_with(&["--save", "3600 1"]);
        let prefix = unique_prefix("kept-snapshots");
        let gw = Gateway::spawn(&base_config(&redis.url(), &prefix), &prefix, &[]);
        gw.wait_ready().await;
        let mut c = Client::connect(&gw).await;
        for n in 1..=2 {
            send_acked(&mut c, &format!("s{n}"), json!(n)).await;
        }
        let kept = || async { gw.metric("wsbridge_inbound_unconfirmed_entries").await };
        eventually("kept until a save", || async { kept().await == 2.0 }).await;

        // `rdb_last_save_time` counts whole seconds (Redis's start, before any save): a save
        // ending in the same second would not show.
        let mut conn = redis.conn().await;
        eventually("Redis's clock is past the second of its start", || {
            let mut conn = conn.clone();
            async move {
                let (now, _): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
                let last: i64 = redis::cmd("LASTSAVE").query_async(&mut conn).await.unwrap();
                now > last
            }
        })
        .await;
        let _: String = redis::cmd("BGSAVE").query_async(&mut conn).await.unwrap();
        eventually("the copies are confirmed by the save", || async {
            kept().await == 0.0
        })
        .await;
        assert_eq!(
            persistence_field(&redis, "rdb_last_bgsave_status").await,
            "ok"
        );

        send_acked(&mut c, "s3", json!(3)).await;
        eventually("a send acked after the save is kept", || async {
            kept().await == 1.0
        })
        .await;
    })
    .await;
}
