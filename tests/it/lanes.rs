//! Fan-out lanes (`outbound.fanout_shards`): a replica's connections split into shards whose
//! per-recipient work may run in parallel, while every connection still gets its messages in
//! call order, and reach counts add up over the lanes.

use serde_json::{json, Value};

use crate::common::*;

/// A call mixing messages to a crowd (fanned out on the lanes) with messages to one member of
/// it (few recipients: written at once by the dispatcher unless that member's lane still has
/// work). The member must get them in call order (on a Redis Cluster, each part of the call in
/// order: the parts come from different shards); every crowd member gets every crowd message,
/// in order; the crowd messages' reach counts every member once, over both lanes. With a lane
/// queue of one job the dispatcher must wait for room (counted) without reordering anything.
#[tokio::test]
async fn a_member_gets_crowd_and_own_messages_in_call_order_across_lanes() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("lanes");
        let env = [
            ("WSBRIDGE__OUTBOUND__FANOUT_SHARDS", "2"),
            ("WSBRIDGE__OUTBOUND__FANOUT_LANE_MIN_RECIPIENTS", "4"),
            ("WSBRIDGE__OUTBOUND__FANOUT_LANE_CAPACITY", "1"),
        ];
        let gw = Gateway::start_with(&redis, &prefix, &env).await;
        let mut crowd = Vec::new();
        for _ in 0..6 {
            let mut c = Client::connect(&gw).await;
            c.subscribe("crowd").await;
            crowd.push(c);
        }
        let member = crowd[0].connection.clone();

        // 2n: to the crowd (6 recipients, at least 4: the lanes); 2n+1: to the member alone.
        const PAIRS: u64 = 100;
        let mut call = Vec::new();
        for n in 0..PAIRS {
            call.push(json!({"to": {"channel": "crowd"}, "data": 2 * n, "reach": true}));
            call.push(json!({"to": {"connection": member}, "data": 2 * n + 1}));
        }
        let (status, answer) = gw.post("/send", &Value::Array(call)).await;
        assert_eq!(status, 202, "{answer}");
        let reach = answer["reach"].as_array().expect("reach counts");
        for (i, count) in reach.iter().enumerate() {
            let want = if i % 2 == 0 { json!(6) } else { Value::Null };
            assert_eq!(count, &want, "reach of message {i}: {answer}");
        }

        let mut got = Vec::new();
        for _ in 0..2 * PAIRS {
            got.push(crowd[0].recv().await["data"].as_u64().expect("a number"));
        }
        if on_cluster() {
            // The channel's part and the connection's part of the call come from different
            // shards, each on its own pub/sub connection: no order between the two parts
            // (docs/scaling.md), but each part in order, and every message once.
            let (crowd_part, own): (Vec<u64>, Vec<u64>) = got.iter().partition(|&&n| n % 2 == 0);
            assert_eq!(crowd_part, (0..PAIRS).map(|n| 2 * n).collect::<Vec<_>>());
            assert_eq!(own, (0..PAIRS).map(|n| 2 * n + 1).collect::<Vec<_>>());
        } else {
            assert_eq!(
                got,
                (0..2 * PAIRS).collect::<Vec<_>>(),
                "the member's order"
            );
        }
        for (i, c) in crowd.iter_mut().enumerate().skip(1) {
            let mut got = Vec::new();
            for _ in 0..PAIRS {
                got.push(c.recv().await["data"].as_u64().expect("a number"));
            }
            let want: Vec<u64> = (0..PAIRS).map(|n| 2 * n).collect();
            assert_eq!(got, want, "crowd member {i}'s order");
        }
        assert!(
            gw.metric("wsbridge_fanout_lane_waits_total").await >= 1.0,
            "a lane queue of one job never made the dispatcher wait"
        );
    })
    .await;
}
