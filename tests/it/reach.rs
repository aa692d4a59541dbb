//! `POST /send` with `"reach": true`: the answer says, per message, how many connections it was
//! written to or queued for across every replica, within `redis.command_timeout_ms` (1 s in the
//! tests); an incomplete report says so. Without the option the answer is what it always was.

use serde_json::{json, Value};

use crate::common::*;

const SECRET: &str = "reach-secret";

/// Two replicas that take signed-in users (with `room:*` keeping history when `history`).
async fn two_replicas(redis: &Redis, prefix: &str, history: bool) -> (Gateway, Gateway) {
    let config = if history {
        with_history(redis, prefix, 100)
    } else {
        base_config(&redis.url(), prefix)
    };
    let env = [("WSBRIDGE__AUTH__JWT_SECRET", SECRET)];
    let a = Gateway::spawn(&config, prefix, &env);
    let b = Gateway::spawn(&config, prefix, &env);
    a.wait_ready().await;
    b.wait_ready().await;
    (a, b)
}

/// `POST /send` of `body`, asserting 202; the answer.
async fn send(gw: &Gateway, body: Value) -> Value {
    let (status, answer) = gw.post("/send", &body).await;
    assert_eq!(status, 202, "{body} was refused: {answer}");
    answer
}

/// The answer's reach report: the counts and whether it is complete.
fn report(answer: &Value) -> (Value, bool) {
    let complete = answer["reach_complete"]
        .as_bool()
        .unwrap_or_else(|| panic!("no reach_complete in {answer}"));
    (answer["reach"].clone(), complete)
}

#[tokio::test]
async fn a_channel_message_reports_its_subscribers_on_every_replica() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("reach-channel");
        let (a, b) = two_replicas(&redis, &prefix, false).await;
        let mut members = Vec::new();
        for gw in [&a, &a, &b] {
            let mut c = Client::connect_as(gw, SECRET, "guest", false).await;
            c.subscribe("room:r").await;
            members.push(c);
        }
        // Elsewhere on both replicas: not counted.
        let mut other = Client::connect_as(&b, SECRET, "guest", false).await;
        other.subscribe("room:other").await;
        let _idle = Client::connect_as(&a, SECRET, "guest", false).await;

        let answer = send(
            &b,
            json!({"to": {"channel": "room:r"}, "data": "hi", "reach": true}),
        )
        .await;
        assert_eq!(answer["accepted"], 1, "{answer}");
        assert_eq!(report(&answer), (json!([3]), true), "{answer}");
        for c in &mut members {
            assert_eq!(c.recv().await["data"], "hi");
        }
        assert_eq!(
            b.metric("wsbridge_reach_queries_total{complete=\"true\"}")
                .await,
            1.0
        );
        // A channel nobody is in reaches nobody.
        let answer = send(
            &a,
            json!({"to": {"channel": "room:empty"}, "data": 1, "reach": true}),
        )
        .await;
        assert_eq!(report(&answer), (json!([0]), true), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn a_user_with_a_connection_on_each_replica_reports_2() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("reach-user");
        let (a, b) = two_replicas(&redis, &prefix, false).await;
        let mut alice_a = Client::connect_as(&a, SECRET, "alice", false).await;
        let mut alice_b = Client::connect_as(&b, SECRET, "alice", true).await;
        let _bob = Client::connect_as(&b, SECRET, "bob", false).await;

        let answer = send(
            &a,
            json!({"to": {"user": "alice"}, "data": "both", "reach": true}),
        )
        .await;
        assert_eq!(report(&answer), (json!([2]), true), "{answer}");
        assert_eq!(alice_a.recv().await["data"], "both");
        assert_eq!(alice_b.recv().await["data"], "both");
        // One connection, named by its id, on the other replica.
        let answer = send(
            &a,
            json!({"to": {"connection": alice_b.connection.clone()}, "data": "one", "reach": true}),
        )
        .await;
        assert_eq!(report(&answer), (json!([1]), true), "{answer}");
        assert_eq!(alice_b.recv().await["data"], "one");
    })
    .await;
}

#[tokio::test]
async fn an_offline_user_reports_0_at_once() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("reach-offline");
        let (a, b) = two_replicas(&redis, &prefix, false).await;
        let _someone = Client::connect_as(&b, SECRET, "someone", false).await;
        let answers = || a.metric("wsbridge_reach_answers_total");
        let before = answers().await;

        let answer = send(
            &a,
            json!({"to": {"user": "nobody"}, "data": 1, "reach": true}),
        )
        .await;
        assert_eq!(report(&answer), (json!([0]), true), "{answer}");
        // Under interest routing no replica is listed for the user: nothing was published and
        // no answer awaited. Under broadcast routing both replicas received the message and
        // each answered 0 (the report is complete, so it did not wait for the deadline).
        let round_trips = if interest_routing() { 0.0 } else { 2.0 };
        assert_eq!(answers().await - before, round_trips);
        // A connection id naming no replica that exists: 0, complete, too.
        let answer = send(
            &a,
            json!({"to": {"connection": "gone.00000000.1"}, "data": 1, "reach": true}),
        )
        .await;
        assert_eq!(report(&answer), (json!([0]), true), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn a_batch_reports_per_message() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("reach-batch");
        let (a, b) = two_replicas(&redis, &prefix, true).await;
        let mut alice_a = Client::connect_as(&a, SECRET, "alice", false).await;
        let mut alice_b = Client::connect_as(&b, SECRET, "alice", false).await;
        let mut member = Client::connect_as(&b, SECRET, "guest", false).await;
        member.subscribe("room:h").await;
        let mut plain = Client::connect_as(&a, SECRET, "guest", false).await;
        plain.subscribe("lobby").await;
        member.subscribe("lobby").await;

        let answer = send(
            &a,
            json!([
                {"to": {"channel": "room:h"}, "data": 0, "reach": true},
                {"to": {"user": "alice"}, "data": 1, "reach": true},
                {"to": {"channel": "lobby"}, "data": 2},
                {"to": {"user": "nobody"}, "data": 3, "reach": true},
                {"to": {"channel": "lobby"}, "data": 4, "reach": true},
                {"to": {"all": true}, "data": 5, "reach": true},
                {"to": {"user": "alice"}, "data": 6, "reach": false},
            ]),
        )
        .await;
        assert_eq!(answer["accepted"], 7, "{answer}");
        // Null where a message did not ask; everyone is four connections.
        assert_eq!(
            report(&answer),
            (json!([1, 2, null, 0, 2, 4, null]), true),
            "{answer}"
        );
        // The history offset of the first message is reported as before, beside the reach.
        let offsets = answer["offsets"].as_array().expect("offsets");
        assert!(offsets[0].is_string() && offsets[1..].iter().all(Value::is_null));
        // Every message arrived as the report says; on a single Redis in call order. On a
        // cluster the parts of one call come from different shards, in no set order
        // (docs/scaling.md).
        for (c, expected) in [
            (&mut alice_a, vec![1, 5, 6]),
            (&mut alice_b, vec![1, 5, 6]),
            (&mut member, vec![0, 2, 4, 5]),
            (&mut plain, vec![2, 4, 5]),
        ] {
            let mut got = Vec::new();
            for _ in 0..expected.len() {
                got.push(c.recv().await["data"].as_u64().unwrap());
            }
            if on_cluster() {
                got.sort_unstable();
            }
            assert_eq!(got, expected);
        }
    })
    .await;
}

#[tokio::test]
async fn a_frozen_replica_makes_the_report_incomplete_after_the_bounded_wait() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("reach-frozen");
        let (a, b) = two_replicas(&redis, &prefix, false).await;
        let mut on_a = Client::connect_as(&a, SECRET, "guest", false).await;
        on_a.subscribe("room:f").await;
        let mut on_b = Client::connect_as(&b, SECRET, "guest", false).await;
        on_b.subscribe("room:f").await;

        // b still holds its pub/sub subscription, so Redis counts it as a receiver, but it
        // cannot answer: a waits redis.command_timeout_ms, then reports what it has.
        b.signal("-STOP");
        let answer = send(
            &a,
            json!({"to": {"channel": "room:f"}, "data": "frozen", "reach": true}),
        )
        .await;
        b.signal("-CONT");
        assert_eq!(answer["accepted"], 1, "{answer}");
        assert_eq!(report(&answer), (json!([1]), false), "{answer}");
        assert_eq!(on_a.recv().await["data"], "frozen");
        // Thawed, b delivers what it received meanwhile; its late answer changes nothing.
        assert_eq!(on_b.recv().await["data"], "frozen");
        assert_eq!(
            a.metric("wsbridge_reach_queries_total{complete=\"false\"}")
                .await,
            1.0
        );
        assert_eq!(
            a.metric("wsbridge_reach_wait_seconds_count").await,
            1.0,
            "the wait is recorded"
        );
        let answer = send(
            &a,
            json!({"to": {"channel": "room:f"}, "data": "thawed", "reach": true}),
        )
        .await;
        assert_eq!(report(&answer), (json!([2]), true), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn without_reach_the_answer_is_as_before() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("reach-none");
        let (a, b) = two_replicas(&redis, &prefix, true).await;
        let mut c = Client::connect_as(&b, SECRET, "guest", false).await;
        c.subscribe("lobby").await;
        let post = |body: &str| {
            let url = format!("{}/send", a.api_url);
            let body = body.to_owned();
            async move { http("POST", &url, Some(&body), None).await }
        };

        // Byte for byte what /send has always answered, with `reach` absent, false or null.
        for body in [
            r#"{"to":{"channel":"lobby"},"data":1}"#,
            r#"{"to":{"channel":"lobby"},"data":2,"reach":false}"#,
            r#"[{"to":{"channel":"lobby"},"data":3,"reach":null},{"to":{"user":"u"},"data":4}]"#,
        ] {
            let (status, text) = post(body).await;
            assert_eq!(status, 202, "{text}");
            let accepted = if body.starts_with('[') { 2 } else { 1 };
            assert_eq!(text, format!(r#"{{"accepted":{accepted}}}"#));
        }
        let (status, text) = post(r#"{"to":{"channel":"room:1"},"data":5}"#).await;
        assert_eq!(status, 202, "{text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(answer.as_object().unwrap().len(), 2, "{answer}");
        assert!(answer["offsets"][0].is_string(), "{answer}");
        for n in 1..=3 {
            assert_eq!(c.recv().await["data"], n);
        }
        // No report was asked for: nobody counted, answered or waited.
        for gw in [&a, &b] {
            assert_eq!(
                gw.metric("wsbridge_reach_queries_total{complete=\"true\"}")
                    .await,
                0.0
            );
            assert_eq!(gw.metric("wsbridge_reach_answers_total").await, 0.0);
        }

        // `reach` that is not a boolean is a bad request naming the field (and the index).
        for (body, starts) in [
            (
                json!({"to": {"channel": "lobby"}, "data": 1, "reach": "yes"}),
                "`reach` must be a boolean",
            ),
            (
                json!([{"to": {"all": true}, "data": 1}, {"to": {"all": true}, "data": 2, "reach": 1}]),
                "message 1: `reach` must be a boolean",
            ),
        ] {
            let (status, answer) = a.post("/send", &body).await;
            assert_eq!(status, 400, "{answer}");
            assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.starts_with(starts), "{message}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_message_dropped_for_a_full_queue_is_not_counted() {
    deadline(TEST_DEADLINE, async {
        // As in queue.rs: a client that never reads falls behind until its queue (32 messages,
        // drop policy) overflows, while one that reads keeps up. Every message asks for its
        // reach: the counts add up to what was handed to the two, drops left out.
        const MESSAGES: usize = 600;
        const BATCH: usize = 10;
        let redis = Redis::start();
        let prefix = unique_prefix("reach-drop");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__OUTBOUND__QUEUE_CAPACITY_MESSAGES", "32")],
        )
        .await;
        let mut slow = Client::connect(&gw).await;
        slow.subscribe("firehose").await;
        let mut fast = Client::connect(&gw).await;
        fast.subscribe("firehose").await;
        let payload = "x".repeat(64 * 1024);
        let mut reached = 0;
        for chunk in 0..MESSAGES / BATCH {
            let batch: Vec<_> = (0..BATCH)
                .map(|i| json!({"to": {"channel": "firehose"}, "data": {"n": chunk * BATCH + i, "pad": payload}, "reach": true}))
                .collect();
            let answer = send(&gw, json!(batch)).await;
            let (counts, complete) = report(&answer);
            assert!(complete, "{answer}");
            for count in counts.as_array().unwrap() {
                let count = count.as_u64().unwrap();
                assert!((1..=2).contains(&count), "{answer}");
                reached += count;
            }
            for i in 0..BATCH {
                assert_eq!(fast.recv().await["data"]["n"], chunk * BATCH + i);
            }
        }
        let dropped = gw
            .metric("wsbridge_delivery_dropped_total{reason=\"queue_full\"}")
            .await as u64;
        assert!(dropped > 0, "the slow client's queue never overflowed");
        assert_eq!(reached, 2 * MESSAGES as u64 - dropped);
    })
    .await;
}
