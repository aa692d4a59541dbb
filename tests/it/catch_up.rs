//! Catch-ups: a replica that missed pub/sub payloads of a history channel (its link dropped, or
//! its pub/sub buffer overflowed) fills the gap from the history, so a subscriber gets every
//! message exactly once, in order — also when it has not been sent anything yet, and also when
//! more live messages arrive during the catch-up than the replica holds.

use serde_json::{json, Value};

use crate::common::*;
use crate::history::{cut_pubsub_links, restore_connections};

/// A replica whose pub/sub buffer (and so its catch-up hold) takes 32 payloads, and whose
/// health checks do not notice a SIGSTOP: the backlog's own catch-up is the only way back for
/// what was dropped.
async fn small_buffer_replica(redis: &Redis, prefix: &str) -> Gateway {
    let gw = Gateway::spawn(
        &with_history(redis, prefix, 10_000),
        prefix,
        &[
            ("WSBRIDGE__REDIS__PUBSUB_BUFFER_MESSAGES", "32"),
            ("WSBRIDGE__REDIS__HEALTH_INTERVAL_MS", "5000"),
            ("WSBRIDGE__REDIS__UNHEALTHY_AFTER_MS", "60000"),
        ],
    );
    gw.wait_ready().await;
    gw
}

async fn replica(redis: &Redis, prefix: &str) -> Gateway {
    let gw = Gateway::spawn(&with_history(redis, prefix, 10_000), prefix, &[]);
    gw.wait_ready().await;
    gw
}

/// Reads until the message whose data is `"end"`: the data of every message before it. Any
/// other frame (a `subscribed` with `recovered: false` above all) fails the test.
async fn read_until_end(c: &mut Client) -> Vec<i64> {
    let mut seen = Vec::new();
    loop {
        let m: Value = c.recv().await;
        assert_eq!(
            m["type"],
            "message",
            "unexpected frame after {} messages: {m}",
            seen.len()
        );
        if m["data"] == "end" {
            return seen;
        }
        seen.push(m["data"].as_i64().unwrap_or_else(|| panic!("{m}")));
    }
}

/// Subscribes `c` to `channel` and waits until replica `gw` has recorded where the channel's
/// history stood (its dispatcher hears of the join just after `subscribed` is queued; a gap
/// provoked in between would be announced as `recovered: false`, a narrow window this test
/// file is not about).
async fn subscribe_recorded(gw: &Gateway, c: &mut Client, channel: &str) {
    c.subscribe(channel).await;
    let line = format!("history channel joined channel={channel} ");
    eventually("the replica recorded the join", || async {
        gw.log_text().contains(&line)
    })
    .await;
}

async fn publish(gw: &Gateway, channel: &str, range: std::ops::Range<i64>) {
    for n in range {
        gw.send(json!({"to": {"channel": channel}, "data": n}))
            .await;
    }
}

/// Bug: a subscriber that had not been sent anything gave the replica no offset to catch up
/// from, and the messages its pub/sub buffer dropped were lost without a word (it got the 32
/// the buffer held, then nothing). The replica now records where the channel's history stood
/// when the subscriber joined, and catches up from there.
#[tokio::test]
async fn a_backlog_before_any_delivery_is_caught_up() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("cu-backlog-first");
        let a = small_buffer_replica(&redis, &prefix).await;
        let b = replica(&redis, &prefix).await;
        // History from before the join must not be replayed to the subscriber.
        publish(&b, "room:1", -5..0).await;
        let mut c = Client::connect(&a).await;
        subscribe_recorded(&a, &mut c, "room:1").await;
        a.signal("-STOP");
        // 300 payloads against a buffer of 32: the burst after SIGCONT overflows it even when
        // the dispatcher drains it concurrently.
        publish(&b, "room:1", 0..300).await;
        a.signal("-CONT");
        b.send(json!({"to": {"channel": "room:1"}, "data": "end"}))
            .await;
        let seen = read_until_end(&mut c).await;
        assert_eq!(seen, (0..300).collect::<Vec<_>>(), "each once, in order");
        assert!(
            a.metric("wsbridge_delivery_dropped_total{reason=\"pubsub_backlog\"}")
                .await
                > 0.0,
            "the buffer never overflowed: the test did not test anything"
        );
        a.caught_up().await;
        assert_eq!(
            a.metric("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await,
            0.0
        );
    })
    .await;
}

/// A subscriber joins `channel` on replica A (after `before` was published to it), nothing is
/// sent to it, A's pub/sub link is cut while 20 messages are published, then restored: the
/// subscriber must get exactly those 20, in order, and never `recovered: false`.
async fn a_reconnect_gap_is_caught_up(name: &str, channel: &str, before: std::ops::Range<i64>) {
    let redis = Redis::start();
    let prefix = unique_prefix(name);
    let a = replica(&redis, &prefix).await;
    let b = replica(&redis, &prefix).await;
    publish(&b, channel, before).await;
    let mut c = Client::connect(&a).await;
    subscribe_recorded(&a, &mut c, channel).await;
    let mut nodes = cut_pubsub_links(&redis).await;
    publish(&b, channel, 0..20).await;
    restore_connections(&mut nodes).await;
    a.caught_up().await;
    b.send(json!({"to": {"channel": channel}, "data": "end"}))
        .await;
    assert_eq!(read_until_end(&mut c).await, (0..20).collect::<Vec<_>>());
    assert_eq!(
        a.metric("wsbridge_catch_ups_total{recovered=\"false\"}")
            .await,
        0.0
    );
}

/// The same gap through a pub/sub reconnect: the subscriber joined, nothing was sent to it,
/// the replica's link was cut while messages were published. Before the fix the catch-up
/// skipped the channel and the subscriber never got them.
#[tokio::test]
async fn a_reconnect_before_any_delivery_is_caught_up() {
    deadline(TEST_DEADLINE, async {
        // Three messages from before the join must not be replayed to the subscriber.
        a_reconnect_gap_is_caught_up("cu-reconnect-first", "room:2", -3..0).await;
    })
    .await;
}

/// The same on a channel whose history did not exist when the subscriber joined: the catch-up
/// replays the history from its beginning, which is all after the join.
#[tokio::test]
async fn a_reconnect_on_a_channel_without_history_yet_is_caught_up() {
    deadline(TEST_DEADLINE, async {
        a_reconnect_gap_is_caught_up("cu-reconnect-empty", "room:3", 0..0).await;
    })
    .await;
}

/// Bug: while a catch-up read the history, the channel's live messages were held, at most
/// `redis.pubsub_buffer_messages` of them, and when more came the subscribers were told
/// `recovered: false` although the history held everything. Here every payload is one `/send`
/// of 16 messages to the channel: the stopped replica's 32-payload buffer overflows when it
/// resumes, the catch-up starts holding, and the payloads still buffered hold far more than
/// 32 messages. The subscriber must still get every message once, in order, and never
/// `recovered: false`.
#[tokio::test]
async fn a_catch_up_whose_hold_overflows_catches_up_again() {
    // 2,400 messages in all: fewer than a send queue holds (4,096), so that a catch-up that
    // queues them in one go does not close the subscriber as a slow consumer.
    const PAYLOADS: i64 = 150;
    const PER_PAYLOAD: i64 = 16;
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("cu-hold-overflow");
        let a = small_buffer_replica(&redis, &prefix).await;
        let b = replica(&redis, &prefix).await;
        let mut c = Client::connect(&a).await;
        subscribe_recorded(&a, &mut c, "room:4").await;
        // Delivered first, so this replica knows where the channel stood before the gap (the
        // old code's catch-up needs it).
        publish(&b, "room:4", 0..1).await;
        assert_eq!(c.recv().await["data"], 0);
        a.signal("-STOP");
        for p in 0..PAYLOADS {
            let first = 1 + p * PER_PAYLOAD;
            let batch: Vec<Value> = (first..first + PER_PAYLOAD)
                .map(|n| json!({"to": {"channel": "room:4"}, "data": n}))
                .collect();
            b.send(Value::Array(batch)).await;
        }
        a.signal("-CONT");
        // Only once the catch-up let go of the channel is "end" published: it must come live
        // (a catch-up that never lets go would keep it).
        a.caught_up().await;
        b.send(json!({"to": {"channel": "room:4"}, "data": "end"}))
            .await;
        let seen = read_until_end(&mut c).await;
        assert!(
            seen == (1..1 + PAYLOADS * PER_PAYLOAD).collect::<Vec<_>>(),
            "not every message once, in order: {} messages, first {:?}, last {:?}",
            seen.len(),
            seen.first(),
            seen.last()
        );
        assert!(
            a.metric("wsbridge_delivery_dropped_total{reason=\"pubsub_backlog\"}")
                .await
                > 0.0,
            "the buffer never overflowed: the test did not test anything"
        );
        assert_eq!(
            a.metric("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await,
            0.0
        );
    })
    .await;
}

/// A backend's `POST /subscribe` joins a connection without the start read a client's own
/// subscribe makes, so the replica does not know where that member stands. When its pub/sub
/// link then misses messages before anything was delivered, it cannot fill the gap and must
/// say so: `subscribed` with `recovered: false`, never silence.
#[tokio::test]
async fn a_gap_before_any_delivery_to_a_backend_joined_member_is_announced() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("cu-backend-join");
        let a = replica(&redis, &prefix).await;
        let b = replica(&redis, &prefix).await;
        let mut c = Client::connect(&a).await;
        let (status, answer) = b
            .post(
                "/subscribe",
                &json!({"connection": c.connection, "channel": "room:9"}),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        let joined = c.recv().await;
        assert_eq!(
            (&joined["type"], &joined["channel"]),
            (&json!("subscribed"), &json!("room:9")),
            "{joined}"
        );

        // Published while replica A cannot hear pub/sub at all; nothing was delivered before.
        let mut nodes = cut_pubsub_links(&redis).await;
        publish(&b, "room:9", 0..20).await;
        restore_connections(&mut nodes).await;
        let notice = c.recv().await;
        assert_eq!(
            (&notice["type"], &notice["channel"], &notice["recovered"]),
            (&json!("subscribed"), &json!("room:9"), &json!(false)),
            "the gap must be announced: {notice}"
        );
        assert_eq!(
            a.metric("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await,
            1.0
        );
        // And the channel delivers again.
        b.send(json!({"to": {"channel": "room:9"}, "data": "after"}))
            .await;
        let after = c.recv().await;
        assert_eq!(after["data"], "after", "{after}");
    })
    .await;
}
