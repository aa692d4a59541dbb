//! No silent gap after Redis loses its newest writes (#18 item 2): a Redis restarted from an
//! older snapshot, or a replica promoted before it had the newest entries, still holds the
//! history's epoch, but not everything given an offset under it. Every client whose missed
//! range may include a lost entry is told `recovered: false`; none gets a replay past a hole.
//! Acked inbound entries such a Redis lost are appended again by the replica that kept them.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// Resumes `channel` from `since` on a new connection to `gw`; the first frame answered.
async fn resume_on(gw: &Gateway, channel: &str, since: &Value, id: &str) -> (Client, Value) {
    let mut c = Client::connect(gw).await;
    c.send(json!({"type": "subscribe", "channel": channel, "since": since, "id": id}))
        .await;
    let frame = frame_within(&mut c, Duration::from_secs(30), "the resume's answer").await;
    (c, frame)
}

/// Asserts `frame` is the `subscribed` answering `id` with `recovered: false` (no replay came
/// before it: it is the first frame).
fn assert_told(frame: &Value, id: &str, who: &str) {
    assert_eq!(
        (&frame["type"], &frame["id"], &frame["recovered"]),
        (&json!("subscribed"), &json!(id), &json!(false)),
        "{who}: {frame} (a replay here would skip the lost messages)"
    );
}

/// Redis (snapshots only) saves after message 3, takes messages 4..=6 (delivered live, then
/// lost) and is killed; it comes back from the snapshot, with the channel's epoch and messages
/// 1..=3 only. The client that stayed connected is told `recovered: false` (its replica's
/// catch-up), and so is every client resuming from an offset at or after 3 (what it missed
/// includes 4..=6) and before it (3 is kept, 4..=6 are not): a resume from 2 must not replay 3
/// and continue with the messages published after the restart as if nothing were between.
/// Messages published after the restart carry a new epoch, from which resumes recover again.
#[tokio::test]
async fn a_redis_restarted_from_an_older_snapshot_tells_every_affected_client() {
    deadline(Duration::from_secs(90), async {
        let mut redis = Redis::start_single();
        let prefix = unique_prefix("lost-snapshot");
        let gw = Gateway::spawn(&with_history(&redis, &prefix, 100), &prefix, &[]);
        gw.wait_ready().await;
        let mut live = Client::connect(&gw).await;
        live.subscribe("room:snap").await;
        let mut offsets = publish_numbered(&gw, "room:snap", 1, 3).await;
        let mut conn = redis.conn().await;
        let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
        offsets.extend(publish_numbered(&gw, "room:snap", 4, 6).await);
        for n in 1..=6 {
            assert_eq!(live.recv().await["offset"], offsets[n - 1]);
        }

        redis.kill();
        redis.restart();
        gw.wait_ready().await;

        // The connected client: told, before anything newer.
        let notice = frame_within(&mut live, Duration::from_secs(30), "the notice").await;
        assert_eq!(
            (&notice["type"], &notice["recovered"]),
            (&json!("subscribed"), &json!(false)),
            "the live client: {notice}"
        );
        // Clients resuming from before, at and after the last message the snapshot kept.
        let mut resumed = Vec::new();
        for seen in [2, 3, 5, 6] {
            let id = format!("from-{seen}");
            let (c, answer) = resume_on(&gw, "room:snap", &offsets[seen - 1], &id).await;
            assert_told(
                &answer,
                &id,
                &format!("a client resuming after message {seen}"),
            );
            resumed.push(c);
        }

        // New messages: a new epoch; every client gets them live, once, in order.
        let later = publish_numbered(&gw, "room:snap", 7, 8).await;
        assert_ne!(
            later[0].as_str().unwrap().split(':').next(),
            offsets[0].as_str().unwrap().split(':').next(),
            "a new epoch after the loss"
        );
        for c in resumed.iter_mut().chain(std::iter::once(&mut live)) {
            for (i, n) in (7..=8).enumerate() {
                let frame = frame_within(c, Duration::from_secs(30), "a later message").await;
                assert_eq!(
                    (&frame["data"], &frame["offset"]),
                    (&json!(n), &later[i]),
                    "{frame}"
                );
            }
        }
        // A resume from an offset of the new epoch recovers.
        let (mut c, first) = resume_on(&gw, "room:snap", &later[0], "new").await;
        assert_eq!((&first["data"], &first["offset"]), (&json!(8), &later[1]));
        let done = frame_within(&mut c, Duration::from_secs(30), "subscribed").await;
        assert_eq!(
            (&done["id"], &done["recovered"]),
            (&json!("new"), &json!(true))
        );
    })
    .await;
}

/// A primary with a plain `replicaof` replica: the replica has messages 1..=3 when it is
/// detached and promoted by hand (`REPLICAOF NO ONE`), then the old primary takes 4..=6, which
/// the promoted replica never gets. A gateway pointed at the promoted replica tells every client
/// that resumes from an offset of that epoch `recovered: false`, from before or after the hole:
/// nobody can prove that what it missed was all replicated.
#[tokio::test]
async fn a_promoted_replica_without_the_newest_entries_tells_resuming_clients() {
    deadline(Duration::from_secs(90), async {
        let (primary, replica, mut rconn) = primary_and_replica().await;
        let prefix = unique_prefix("lost-promoted");
        let old = Gateway::spawn(&with_history(&primary, &prefix, 100), &prefix, &[]);
        old.wait_ready().await;
        let mut offsets = publish_numbered(&old, "room:pro", 1, 3).await;
        let history = format!("{prefix}:history:{{room:pro}}");
        eventually("the replica has messages 1..=3", || {
            let (mut rconn, history) = (rconn.clone(), history.clone());
            async move {
                let len: u64 = redis::cmd("XLEN")
                    .arg(&history)
                    .query_async(&mut rconn)
                    .await
                    .unwrap_or(0);
                len == 3
            }
        })
        .await;
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut rconn)
            .await
            .unwrap();
        offsets.extend(publish_numbered(&old, "room:pro", 4, 6).await);
        drop(old);

        let new = Gateway::spawn(&with_history(&replica, &prefix, 100), &prefix, &[]);
        new.wait_ready().await;
        for seen in [2, 3, 5] {
            let id = format!("from-{seen}");
            let (_c, answer) = resume_on(&new, "room:pro", &offsets[seen - 1], &id).await;
            assert_told(
                &answer,
                &id,
                &format!("a client resuming after message {seen}"),
            );
        }
        assert_eq!(
            new.metric("wsbridge_resumes_total{recovered=\"true\"}")
                .await,
            0.0
        );
    })
    .await;
}

/// Acked `send`s a snapshot restart lost (`redis.wait_replicas = 0`): the replica kept copies
/// (`inbound.keep_unconfirmed_entries`) of those acked after the last save (on a Redis without
/// replicas only a later save confirms them) and appends them again when it finds a new Redis
/// process behind the link: with their original entry ids, in order, once. A resend of one of
/// them (as a client that never saw its ack would) is acked with that entry, not stored twice.
/// The send acked before the save is in the snapshot: left alone, whether its copy was still
/// kept or not.
#[tokio::test]
async fn acked_sends_a_snapshot_restart_lost_are_appended_again() {
    deadline(Duration::from_secs(60), async {
        let mut redis = Redis::start_single();
        let prefix = unique_prefix("lost-inbound");
        let gw = Gateway::spawn(&base_config(&redis.url(), &prefix), &prefix, &[]);
        gw.wait_ready().await;
        let mut c = Client::connect(&gw).await;
        let mut entries = vec![send_acked(&mut c, "s1", json!(1)).await];
        let mut conn = redis.conn().await;
        let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
        for n in 2..=4 {
            entries.push(send_acked(&mut c, &format!("s{n}"), json!(n)).await);
        }
        // Nothing confirms s2..s4: no replica, no save since. s1's copy is kept too unless a
        // check ran between its ack and the save (this Redis persisted nothing until then, so
        // that check dropped it).
        eventually(
            "the replica keeps a copy of each send acked after the save",
            || async { gw.metric("wsbridge_inbound_unconfirmed_entries").await >= 3.0 },
        )
        .await;

        redis.kill();
        redis.restart();
        gw.wait_ready().await;
        let key = format!("{prefix}:in:chat");
        eventually("the stream holds every acked send again", || async {
            xrange(&mut redis.conn().await, &key).await.len() >= entries.len()
        })
        .await;
        let mut conn = redis.conn().await;
        let held = xrange(&mut conn, &key).await;
        let ids: Vec<&String> = held.iter().map(|(id, _)| id).collect();
        let data: Vec<&str> = held.iter().map(|(_, f)| text(&f["data"])).collect();
        assert_eq!(ids, entries.iter().collect::<Vec<_>>(), "entry ids");
        assert_eq!(data, ["1", "2", "3", "4"]);
        // Counted once the appends' replies are back, which may be after the stream shows them.
        eventually("the three appends again to be counted", || async {
            gw.metric("wsbridge_inbound_appended_again_total").await >= 3.0
        })
        .await;

        assert_eq!(send_acked(&mut c, "s3", json!(3)).await, entries[2]);
        assert_eq!(xrange(&mut conn, &key).await.len(), 4, "stored twice");
        assert_eq!(
            gw.metric("wsbridge_inbound_appended_again_total").await,
            3.0,
            "appended again once each"
        );
    })
    .await;
}
