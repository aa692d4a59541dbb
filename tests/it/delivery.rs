//! Outbound delivery across replicas: every target kind, both encodings, order within a call.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn channel_message_reaches_subscribers_on_both_replicas() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("chan");
        let a = Gateway::start(&redis, &prefix).await;
        let b = Gateway::start(&redis, &prefix).await;
        let mut on_a = Client::connect(&a).await;
        let mut on_b = Client::connect_msgpack(&b).await;
        let mut bystander = Client::connect(&a).await;
        on_a.subscribe("room:1").await;
        on_b.subscribe("room:1").await;
        bystander.subscribe("room:2").await;

        b.send(json!({"to": {"channel": "room:1"}, "data": {"text": "hi", "n": [1, 2.5, null]}}))
            .await;

        for client in [&mut on_a, &mut on_b] {
            let m = client.recv().await;
            assert_eq!(
                m,
                json!({"type": "message", "channel": "room:1", "data": {"text": "hi", "n": [1, 2.5, null]}})
            );
        }
        // The bystander on room:2 gets the next message sent there, not the room:1 one.
        a.send(json!({"to": {"channel": "room:2"}, "data": "second"}))
            .await;
        assert_eq!(bystander.recv().await["data"], "second");
    })
    .await;
}

#[tokio::test]
async fn connection_user_and_all_targets_work_across_replicas() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("targets");
        let secret = "test-secret";
        let env = [("WSBRIDGE__AUTH__JWT_SECRET", secret)];
        let a = Gateway::start_with(&redis, &prefix, &env).await;
        let b = Gateway::start_with(&redis, &prefix, &env).await;
        let alice = token(secret, json!({"sub": "alice"}));
        let bob = token(secret, json!({"sub": "bob"}));
        let mut alice_a = Client::connect_url(&format!("{}?token={alice}", a.ws_url), false)
            .await
            .unwrap();
        let mut alice_b = Client::connect_url(&format!("{}?token={alice}", b.ws_url), true)
            .await
            .unwrap();
        let mut bob_b = Client::connect_url(&format!("{}?token={bob}", b.ws_url), false)
            .await
            .unwrap();
        assert_eq!(alice_a.user, "alice");
        assert_ne!(alice_a.connection, alice_b.connection);

        // To one connection, published through the other replica.
        a.send(json!({"to": {"connection": bob_b.connection}, "data": {"for": "bob"}}))
            .await;
        assert_eq!(
            bob_b.recv().await,
            json!({"type": "message", "data": {"for": "bob"}})
        );

        // To a user: both of alice's connections, on both replicas; not bob.
        b.send(json!({"to": {"user": "alice"}, "data": "to alice"}))
            .await;
        assert_eq!(alice_a.recv().await["data"], "to alice");
        assert_eq!(alice_b.recv().await["data"], "to alice");

        // To everyone.
        a.send(json!({"to": {"all": true}, "data": "to all"})).await;
        for c in [&mut alice_a, &mut alice_b, &mut bob_b] {
            assert_eq!(c.recv().await["data"], "to all");
        }
        // bob's first frame after his direct message was "to all": the user message never reached him.
        let filtered = b.metric("wsbridge_pubsub_filtered_total").await
            + a.metric("wsbridge_pubsub_filtered_total").await;
        if interest_routing() {
            // Each message went only to the replicas holding its recipients.
            assert_eq!(filtered, 0.0);
        } else {
            // Every replica saw every message, and some were for nobody there.
            assert!(filtered >= 1.0);
        }
    })
    .await;
}

#[tokio::test]
async fn messages_of_one_call_arrive_in_order() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("order");
        let a = Gateway::start(&redis, &prefix).await;
        let b = Gateway::start(&redis, &prefix).await;
        let mut client = Client::connect(&a).await;
        let batch: Vec<_> = (0..500)
            .map(|i| json!({"to": {"connection": client.connection}, "data": i}))
            .collect();
        let (status, answer) = b.post("/send", &json!(batch)).await;
        assert_eq!((status, answer), (202, json!({"accepted": 500})));
        for i in 0..500 {
            assert_eq!(client.recv().await["data"], i);
        }
        assert_eq!(a.metric("wsbridge_deliveries_total").await, 500.0);
    })
    .await;
}

#[tokio::test]
async fn server_side_subscribe_unsubscribe_and_disconnect() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("serverside");
        let a = Gateway::start(&redis, &prefix).await;
        let b = Gateway::start(&redis, &prefix).await;
        let mut client = Client::connect(&a).await;

        let (status, _) = b
            .post(
                "/subscribe",
                &json!({"connection": client.connection, "channel": "news"}),
            )
            .await;
        assert_eq!(status, 202);
        assert_eq!(
            client.recv().await,
            json!({"type": "subscribed", "channel": "news"})
        );
        b.send(json!({"to": {"channel": "news"}, "data": 1})).await;
        assert_eq!(client.recv().await["data"], 1);

        let (status, _) = b
            .post(
                "/unsubscribe",
                &json!({"connection": client.connection, "channel": "news"}),
            )
            .await;
        assert_eq!(status, 202);
        assert_eq!(
            client.recv().await,
            json!({"type": "unsubscribed", "channel": "news"})
        );

        let (status, _) = b
            .post(
                "/disconnect",
                &json!({"connection": client.connection, "code": 4001, "reason": "bye"}),
            )
            .await;
        assert_eq!(status, 202);
        assert_eq!(client.closed().await, Some(4001));
    })
    .await;
}

/// Messages sent one per call are written straight to an idle client's socket (a direct write,
/// skipping its writer task). When the client stops reading, its socket fills in the middle of
/// such a write; the rest must follow before anything else. Here a reader that pauses gets
/// 48 large messages (12 MB, far more than the socket buffers) one call each, interleaved with
/// replies to its own frames and messages to another connection; when it reads again, every
/// frame is whole and in order, and the other connection got everything meanwhile.
#[tokio::test]
async fn large_messages_to_a_paused_reader_arrive_whole_and_in_order() {
    deadline(TEST_DEADLINE, async {
        const MESSAGES: usize = 48;
        const PAD: usize = 256 * 1024;
        let redis = Redis::start();
        let prefix = unique_prefix("direct-partial");
        let a = Gateway::start(&redis, &prefix).await;
        let mut paused = Client::connect(&a).await;
        paused.subscribe("big").await;
        let mut other = Client::connect(&a).await;
        other.subscribe("small").await;

        let pad = "p".repeat(PAD);
        for n in 0..MESSAGES {
            a.send(json!({"to": {"channel": "big"}, "data": {"n": n, "pad": pad}}))
                .await;
            a.send(json!({"to": {"channel": "small"}, "data": {"n": n}}))
                .await;
            assert_eq!(other.recv().await["data"]["n"], n);
            if n % 8 == 0 {
                // A reply queued for the paused client while its socket is full.
                paused
                    .send(
                        json!({"type": "subscribe", "channel": format!("c{n}"), "id": format!("s{n}")}),
                    )
                    .await;
            }
        }
        let mut replies = 0;
        let mut next = 0;
        while next < MESSAGES || replies < MESSAGES / 8 {
            let frame = paused.recv().await;
            match frame["type"].as_str() {
                Some("message") => {
                    assert_eq!(frame["data"]["n"], next, "in order");
                    assert_eq!(
                        frame["data"]["pad"].as_str().map(str::len),
                        Some(PAD),
                        "whole"
                    );
                    next += 1;
                }
                Some("subscribed") => replies += 1,
                _ => panic!("unexpected frame {frame}"),
            }
        }
        assert_eq!(
            a.metric("wsbridge_delivery_dropped_total{reason=\"queue_full\"}")
                .await,
            0.0
        );
    })
    .await;
}
