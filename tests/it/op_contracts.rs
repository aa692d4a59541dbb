//! What operators' tools read: the inbound backlog gauges the consumer-lag alert fires on.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn backlog_gauges_show_stream_length_pending_lag_and_oldest_pending_age() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("backlog");
        let gw = Gateway::start(&redis, &prefix).await;
        let key = format!("{prefix}:in:chat");
        let mut client = Client::connect(&gw).await;
        for i in 0..3 {
            client
                .send(json!({"type": "send", "stream": "chat", "data": i, "id": i}))
                .await;
            assert_eq!(client.recv().await["type"], "ack");
        }
        let mut conn = redis.conn().await;
        // A second group, as a backend would create it, that has read nothing yet.
        let () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("audit")
            .arg("0")
            .query_async(&mut conn)
            .await
            .unwrap();
        // The configured group reads two entries and acknowledges neither.
        let read = read_group(&mut conn, &key, "backend", 2).await;
        assert_eq!(read.len(), 2);

        let series =
            |name: &str, group: &str| format!("{name}{{stream=\"chat\",group=\"{group}\"}}");
        eventually("the backlog of `chat` sampled", || async {
            let text = gw.metrics_text().await;
            let value = |sample: &str| metric_in(&text, sample);
            value("wsbridge_inbound_stream_length{stream=\"chat\"}") == Some(3.0)
                && value(&series("wsbridge_inbound_group_pending", "backend")) == Some(2.0)
                && value(&series("wsbridge_inbound_group_lag", "backend")) == Some(1.0)
                && value(&series(
                    "wsbridge_inbound_oldest_pending_age_seconds",
                    "backend",
                ))
                .is_some_and(|age| age > 0.0)
                && value(&series("wsbridge_inbound_group_pending", "audit")) == Some(0.0)
                && value(&series("wsbridge_inbound_group_lag", "audit")) == Some(3.0)
                && value(&series(
                    "wsbridge_inbound_oldest_pending_age_seconds",
                    "audit",
                )) == Some(0.0)
        })
        .await;
        assert_eq!(
            gw.metric("wsbridge_inbound_stream_length{stream=\"orders\"}")
                .await,
            0.0,
            "a stream nobody sent to has length 0"
        );

        // Acknowledged: nothing pending, no age. Destroyed: its series fall to 0.
        let ids: Vec<&str> = read.iter().map(|(id, _)| id.as_str()).collect();
        let acked: u64 = redis::cmd("XACK")
            .arg(&key)
            .arg("backend")
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(acked, 2);
        let destroyed: u64 = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(&key)
            .arg("audit")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(destroyed, 1);
        eventually("acknowledged and destroyed groups sampled", || async {
            let text = gw.metrics_text().await;
            let value = |sample: &str| metric_in(&text, sample);
            value(&series("wsbridge_inbound_group_pending", "backend")) == Some(0.0)
                && value(&series(
                    "wsbridge_inbound_oldest_pending_age_seconds",
                    "backend",
                )) == Some(0.0)
                && value(&series("wsbridge_inbound_group_lag", "audit")) == Some(0.0)
        })
        .await;
        assert_eq!(
            gw.metric("wsbridge_redis_errors_total{kind=\"server\"}")
                .await,
            0.0,
            "sampling a stream without groups must not fail a command"
        );
    })
    .await;
}

/// The value of `sample` in an exposition text.
fn metric_in(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
