//! Slow consumers: the per-connection queue is bounded and its policy applies and is counted,
//! while other clients keep receiving everything.

use serde_json::json;

use std::time::Duration;

use crate::common::*;

const MESSAGES: usize = 600;
const BATCH: usize = 10;

/// Publishes large messages to `channel` in batches, each batch only after `fast` has read the
/// previous one, so a client that reads keeps up while one that never reads falls ~38 MB behind:
/// more than loopback socket buffers plus its queue can hold.
async fn flood_in_lockstep(gw: &Gateway, channel: &str, fast: &mut Client) {
    let payload = "x".repeat(64 * 1024);
    for chunk in 0..MESSAGES / BATCH {
        let batch: Vec<_> = (0..BATCH)
            .map(|i| json!({"to": {"channel": channel}, "data": {"n": chunk * BATCH + i, "pad": payload}}))
            .collect();
        gw.send(json!(batch)).await;
        for i in 0..BATCH {
            assert_eq!(fast.recv().await["data"]["n"], chunk * BATCH + i);
        }
    }
}

#[tokio::test]
async fn drop_policy_drops_for_the_slow_client_only_and_counts_it() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("droppolicy");
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

        flood_in_lockstep(&gw, "firehose", &mut fast).await;

        let dropped = gw
            .metric("wsbridge_delivery_dropped_total{reason=\"queue_full\"}")
            .await;
        assert!(
            dropped > 0.0 && dropped < MESSAGES as f64,
            "dropped {dropped}"
        );
        // The slow client is still connected and gets, in order, what was not dropped.
        assert_eq!(gw.metric("wsbridge_connections").await, 2.0);
        let mut last = -1;
        let mut received = 0;
        while received + (dropped as usize) < MESSAGES {
            let n = slow.recv().await["data"]["n"].as_i64().unwrap();
            assert!(n > last, "out of order: {n} after {last}");
            last = n;
            received += 1;
        }
        assert_eq!(received + dropped as usize, MESSAGES);
    })
    .await;
}

#[tokio::test]
async fn close_policy_closes_the_slow_client_with_1013() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("closepolicy");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__OUTBOUND__QUEUE_CAPACITY_MESSAGES", "32"),
                ("WSBRIDGE__OUTBOUND__QUEUE_FULL_POLICY", "close"),
            ],
        )
        .await;
        let mut slow = Client::connect(&gw).await;
        slow.subscribe("firehose").await;
        let mut fast = Client::connect(&gw).await;
        fast.subscribe("firehose").await;

        flood_in_lockstep(&gw, "firehose", &mut fast).await;

        // The replica decides to close it; reading now, the slow client finds the messages it
        // had, then close code 1013 (not a reset), and only then is it counted as closed.
        eventually("the slow client's close decided", || async {
            gw.closing_decided(&slow.connection, 1013)
        })
        .await;
        // A slow client is slow: it comes back to its socket seconds later (here 3 s, more than the
        // 2 s close handshake grace and well within the 10 s our close frame may wait). This
        // pause is the scenario itself, not a wait for an event.
        tokio::time::sleep(Duration::from_secs(3)).await;
        slow.expect_close(1013).await;
        eventually("slow client counted as closed", || async {
            gw.metric("wsbridge_connections_closed_total{reason=\"slow_consumer\"}")
                .await
                == 1.0
        })
        .await;
        assert_eq!(gw.metric("wsbridge_connections").await, 1.0);
        assert!(
            gw.metric("wsbridge_delivery_dropped_total{reason=\"queue_full\"}")
                .await
                >= 1.0
        );
    })
    .await;
}
