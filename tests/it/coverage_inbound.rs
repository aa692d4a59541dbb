//! Documented inbound behaviour that no other test covered: the bounded queues' outcomes
//! (`overloaded`, a reply queue closing the client with 1013, the pub/sub buffer dropping and
//! history channels catching up), the dedupe window and its scopes, lifecycle events turned off
//! or failing, frames in the other encoding, and a `send` that "may have been stored" resent
//! and stored once.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

type Entries = Vec<(String, std::collections::HashMap<String, Vec<u8>>)>;

/// The entries of inbound stream `stream`.
async fn inbound_entries(redis: &Redis, prefix: &str, stream: &str) -> Entries {
    let mut conn = redis.conn().await;
    xrange(&mut conn, &format!("{prefix}:in:{stream}")).await
}

/// The dedupe bucket of slice `slice` (`Keys::dedupe_buckets`, `inbound::dedupe`).
fn dedupe_bucket(prefix: &str, stream: &str, slice: u64) -> String {
    format!("{{{prefix}:in:{stream}}}:dedupe:{slice}")
}

/// The hash field remembering frame id `id` of `scope` (`u:<user>` or `c:<connection>`).
fn dedupe_field(scope: &str, id: &str) -> String {
    format!("{}:{scope}:{id}", scope.len())
}

/// The milliseconds part of entry id `entry` (Redis's clock when it was stored).
fn entry_ms(entry: &str) -> u64 {
    entry.split('-').next().unwrap().parse().unwrap()
}

/// Redis's clock, in unix milliseconds.
async fn redis_ms(conn: &mut RedisConn) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// The keys of inbound stream `stream`'s dedupe buckets, on every node.
async fn dedupe_keys(redis: &Redis, prefix: &str, stream: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for mut node in redis.node_conns().await {
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{prefix}:in:{stream}}}:dedupe:*"))
            .query_async(&mut node)
            .await
            .unwrap();
        keys.extend(found);
    }
    keys
}

/// The next data frame as it came off the wire (text or binary), skipping pings and pongs.
async fn raw_frame(c: &mut Client) -> Message {
    let next = async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return message,
                other => panic!("connection ended: {other:?}"),
            }
        }
    };
    tokio::time::timeout(PATIENCE, next)
        .await
        .expect("no frame in time")
}

/// A client connected as `user` on a replica with `auth.jwt_secret = SECRET`.
const SECRET: &str = "coverage-secret";

async fn connect_user(gw: &Gateway, user: &str) -> Client {
    Client::connect_as(gw, SECRET, user, false).await
}

// ---------------------------------------------------------------------------------------------
// Inbound queues
// ---------------------------------------------------------------------------------------------

/// `inbound.append_queue_capacity`: with Redis frozen the appender holds one request in flight
/// and the queue one more; every further `send` is refused at once with `overloaded` (not
/// stored), counted, and a resend with the same id after Redis is back is stored.
#[tokio::test]
async fn a_full_append_queue_refuses_sends_with_overloaded_and_stores_none_of_them() {
    deadline(TEST_DEADLINE, async {
        const SENDS: usize = 6;
        let redis = Redis::start();
        let prefix = unique_prefix("overloaded");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__INBOUND__APPEND_QUEUE_CAPACITY", "1"),
                ("WSBRIDGE__INBOUND__APPEND_BATCH_MAX", "1"),
                // No lifecycle events in the queue: it holds only these sends.
                ("WSBRIDGE__INBOUND__EVENTS_ENABLED", "false"),
                // The request in flight waits for the thaw rather than timing out.
                ("WSBRIDGE__REDIS__COMMAND_TIMEOUT_MS", "10000"),
            ],
        )
        .await;
        let mut c = Client::connect(&gw).await;
        send_acked(&mut c, "warm", json!(0)).await;

        redis.freeze(true);
        for i in 0..SENDS {
            c.send(json!({"type": "send", "stream": "chat", "data": i, "id": format!("s{i}")}))
                .await;
        }
        // Refusals come at once, Redis frozen or not: at most two sends got into the queue.
        let mut refused = Vec::new();
        for _ in 0..SENDS - 2 {
            let e = c.recv().await;
            assert_eq!(
                (e["type"].as_str(), e["code"].as_str()),
                (Some("error"), Some("overloaded")),
                "{e}"
            );
            assert!(e["message"].as_str().unwrap().contains("not stored"), "{e}");
            refused.push(e["id"].as_str().unwrap().to_string());
        }
        redis.freeze(false);

        // The sends that got in are acked once Redis answers; nothing else is refused.
        let mut acked = Vec::new();
        while refused.len() + acked.len() < SENDS {
            let reply = c.recv().await;
            let id = reply["id"].as_str().unwrap().to_string();
            match reply["type"].as_str() {
                Some("ack") => acked.push(id),
                _ => {
                    assert_eq!(reply["code"], "overloaded", "{reply}");
                    refused.push(id);
                }
            }
        }
        assert!(
            (1..=2).contains(&acked.len()),
            "one request in flight, at most one queued: acked {acked:?}, refused {refused:?}"
        );
        assert_eq!(
            gw.metric("wsbridge_inbound_rejected_total{code=\"overloaded\"}")
                .await,
            refused.len() as f64
        );
        let stored = |entries: &Entries| -> Vec<String> {
            entries
                .iter()
                .map(|(_, f)| text(&f["id"]).to_string())
                .collect()
        };
        let mut expected = vec!["warm".to_string()];
        expected.extend(acked.iter().cloned());
        assert_eq!(
            stored(&inbound_entries(&redis, &prefix, "chat").await),
            expected
        );

        // Refused means not stored: resending them stores each once.
        refused.sort();
        for id in &refused {
            send_acked(&mut c, id, json!("again")).await;
        }
        expected.extend(refused.iter().cloned());
        assert_eq!(
            stored(&inbound_entries(&redis, &prefix, "chat").await),
            expected
        );
    })
    .await;
}

/// `outbound.reply_queue_capacity`: a client that does not read its socket, so that its writer
/// is stuck, and keeps sending frames is closed with 1013 once its replies overflow the queue.
#[tokio::test]
async fn a_client_whose_replies_overflow_the_reply_queue_is_closed_with_1013() {
    deadline(TEST_DEADLINE, async {
        const BIG: usize = 512 * 1024;
        const BIG_MESSAGES: usize = 16;
        let redis = Redis::start();
        let prefix = unique_prefix("replyqueue");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__OUTBOUND__REPLY_QUEUE_CAPACITY", "4")],
        )
        .await;
        let mut slow = Client::connect(&gw).await;
        let mut probe = Client::connect(&gw).await;

        // 8 MiB for a client that does not read: more than the loopback socket buffers hold (4 MiB
        // on the sending side at most; the receiving side grows only while its owner reads), so
        // the writer is stuck in a write with messages still queued.
        let pad = "x".repeat(BIG);
        for n in 0..BIG_MESSAGES {
            gw.send(json!({"to": {"connection": slow.connection}, "data": {"n": n, "pad": pad}}))
                .await;
        }
        // The dispatcher handles payloads in order: once the probe has its message, every big one
        // is in the slow client's queue or socket.
        gw.send(json!({"to": {"connection": probe.connection}, "data": "probe"}))
            .await;
        assert_eq!(probe.recv().await["data"], "probe");

        // Each frame gets an error reply; the writer cannot take any, so the fifth overflows.
        for i in 0..8 {
            slow.send(json!({"type": "dance", "id": i})).await;
        }
        assert_eq!(slow.closed().await, Some(1013));
        eventually("the close counted as slow_consumer", || async {
            gw.metric("wsbridge_connections_closed_total{reason=\"slow_consumer\"}")
                .await
                == 1.0
        })
        .await;
        assert_eq!(gw.metric("wsbridge_connections").await, 1.0);
        // Other clients are not affected.
        gw.send(json!({"to": {"connection": probe.connection}, "data": "still"}))
            .await;
        assert_eq!(probe.recv().await["data"], "still");
    })
    .await;
}

/// `redis.pubsub_buffer_messages`: when payloads arrive faster than the dispatcher takes them,
/// the overflow is dropped and counted as `pubsub_backlog`, and the history channel catches up
/// from its history: its subscriber still gets every message exactly once, in order, with no
/// pub/sub reconnect involved.
#[tokio::test]
async fn a_pubsub_backlog_drop_is_counted_and_history_subscribers_catch_up() {
    deadline(TEST_DEADLINE, async {
        // Per burst: PAYLOADS payloads of one message each, every EVERY-th one on the history
        // channel, the rest on a channel without history that only busy the dispatcher.
        const PAYLOADS: usize = 200;
        const EVERY: usize = 10;
        const ATTEMPTS: usize = 5;
        let redis = Redis::start();
        let prefix = unique_prefix("backlog");
        let config = with_history(&redis, &prefix, 10_000);
        let a = Gateway::spawn(
            &config,
            &prefix,
            &[
                // Also the number of live messages a catching-up channel may hold while its history
                // is read: more than the history channel gets in one burst.
                ("WSBRIDGE__REDIS__PUBSUB_BUFFER_MESSAGES", "32"),
                // Stopping the process below must not look like a dead pub/sub link: the only way
                // back for the dropped messages is then the backlog's own catch-up.
                ("WSBRIDGE__REDIS__HEALTH_INTERVAL_MS", "5000"),
                ("WSBRIDGE__REDIS__UNHEALTHY_AFTER_MS", "60000"),
            ],
        );
        a.wait_ready().await;
        let b = Gateway::spawn(&config, &prefix, &[]);
        b.wait_ready().await;

        let mut c = Client::connect(&a).await;
        c.subscribe("room:1").await;
        // Clients that never read make every noise payload cost the dispatcher more.
        let mut others = Vec::new();
        for _ in 0..4 {
            let mut o = Client::connect(&a).await;
            o.subscribe("noise").await;
            others.push(o);
        }
        // One message delivered first: the catch-up starts from the last offset delivered.
        b.send(json!({"to": {"channel": "room:1"}, "data": 0}))
            .await;
        assert_eq!(c.recv().await["data"], 0);
        let mut next = 1i64;

        let dropped = "wsbridge_delivery_dropped_total{reason=\"pubsub_backlog\"}";
        for _ in 0..ATTEMPTS {
            // Stopped, replica A cannot take payloads; they wait in its socket and then arrive in
            // one burst, far faster than the dispatcher takes them.
            a.signal("-STOP");
            let first = next;
            for k in 0..PAYLOADS {
                if k % EVERY == 0 {
                    b.send(json!({"to": {"channel": "room:1"}, "data": next}))
                        .await;
                    next += 1;
                } else {
                    b.send(json!({"to": {"channel": "noise"}, "data": "noise"}))
                        .await;
                }
            }
            a.signal("-CONT");
            for n in first..next {
                let m = c.recv().await;
                assert_eq!(
                    (m["type"].as_str(), m["data"].as_i64()),
                    (Some("message"), Some(n)),
                    "{m}"
                );
            }
            if a.metric(dropped).await > 0.0 {
                break;
            }
        }
        assert!(a.metric(dropped).await > 0.0, "no payload was ever dropped");
        a.caught_up().await;
        assert_eq!(
            a.metric("wsbridge_catch_ups_total{recovered=\"false\"}")
                .await,
            0.0
        );
        assert_eq!(a.metric("wsbridge_pubsub_reconnects_total").await, 0.0);
        // Nothing twice: the next message is the last one published.
        b.send(json!({"to": {"channel": "room:1"}, "data": "end"}))
            .await;
        assert_eq!(c.recv().await["data"], "end");
        drop(others);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Dedupe
// ---------------------------------------------------------------------------------------------

/// `inbound.dedupe_window_seconds`: the gateway remembers an id for the window and no longer:
/// once the memory is gone, a resend with the same id is stored a second time (with the same
/// `id` field, for backends to dedupe on).
#[tokio::test]
async fn a_resend_after_the_dedupe_window_is_stored_again() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("window");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__AUTH__JWT_SECRET", SECRET),
                ("WSBRIDGE__INBOUND__DEDUPE_WINDOW_SECONDS", "1"),
            ],
        )
        .await;
        let mut c = connect_user(&gw, "alice").await;
        let first = send_acked(&mut c, "w1", json!({"n": 1})).await;

        // Remembered in the bucket of the slice (half the window) it was stored in, which
        // lookups read until the slice two after it ends (at least the window, at most 1.5x
        // it), and which expires a slice later when no append UNLINKs it first.
        let key = dedupe_bucket(&prefix, "chat", entry_ms(&first) / 500);
        let mut conn = redis.conn().await;
        let remembered: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg(dedupe_field("u:alice", "w1"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        // -2: gone already (a slow machine may take that long to ask); -1 would be no expiry.
        assert!(
            ttl == -2 || ((1..=2000).contains(&ttl) && remembered.as_deref() == Some(&*first)),
            "PTTL {ttl} of {key}, holding {remembered:?}"
        );
        eventually("the dedupe window to pass", || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move {
                let exists: i64 = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                exists == 0
            }
        })
        .await;

        let second = send_acked(&mut c, "w1", json!({"n": 1})).await;
        assert_ne!(first, second);
        let entries = inbound_entries(&redis, &prefix, "chat").await;
        let ids: Vec<(&str, &str)> = entries
            .iter()
            .map(|(entry, f)| (entry.as_str(), text(&f["id"])))
            .collect();
        assert_eq!(ids, [(first.as_str(), "w1"), (second.as_str(), "w1")]);
    })
    .await;
}

/// A bucket no lookup reads any more is deleted by the next append with `UNLINK` (off Redis's
/// main thread), before its own expiry would delete it inline: a big one blocked Redis 0.4 s.
#[tokio::test]
async fn a_dedupe_bucket_past_the_window_is_unlinked_by_the_next_append() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("unlink");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__AUTH__JWT_SECRET", SECRET),
                ("WSBRIDGE__INBOUND__DEDUPE_WINDOW_SECONDS", "2"),
            ],
        )
        .await;
        let mut c = connect_user(&gw, "alice").await;
        let first = send_acked(&mut c, "u1", json!({"n": 1})).await;
        // Slices of 1 s: bucket k is read through slice k + 2 and expires at the end of k + 3.
        let k = entry_ms(&first) / 1000;
        let key = dedupe_bucket(&prefix, "chat", k);
        let mut conn = redis.conn().await;
        eventually("Redis's clock to reach slice k + 3", || {
            let mut conn = conn.clone();
            async move { redis_ms(&mut conn).await >= (k + 3) * 1000 }
        })
        .await;
        send_acked(&mut c, "u2", json!({"n": 2})).await;
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let now = redis_ms(&mut conn).await;
        assert!(
            now < (k + 4) * 1000,
            "the append took a second: the bucket may have expired by itself"
        );
        assert_eq!(exists, 0, "{key} still there before its expiry");
    })
    .await;
}

/// ... and for the whole window: a resend three quarters of the window after the first `send`
/// (by Redis's clock) is still acked with the original entry and not stored again.
#[tokio::test]
async fn a_resend_late_in_the_dedupe_window_is_stored_once() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("latewindow");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__AUTH__JWT_SECRET", SECRET),
                ("WSBRIDGE__INBOUND__DEDUPE_WINDOW_SECONDS", "2"),
            ],
        )
        .await;
        let mut c = connect_user(&gw, "carol").await;
        let conn = redis.conn().await;
        // Sent late in a slice (1 s, half the window), so that 1.5 s on is two slices later: a
        // lookup of fewer than three buckets would miss it.
        eventually("Redis's clock to be late in a slice", || {
            let mut conn = conn.clone();
            async move { (700..850).contains(&(redis_ms(&mut conn).await % 1000)) }
        })
        .await;
        let first = send_acked(&mut c, "late", json!({"n": 1})).await;
        let late = entry_ms(&first) + 1500;
        eventually("Redis's clock to pass 1.5 s after the first send", || {
            let mut conn = conn.clone();
            async move { redis_ms(&mut conn).await >= late }
        })
        .await;
        let again = send_acked(&mut c, "late", json!({"n": 1})).await;
        assert_eq!(again, first);
        let entries = inbound_entries(&redis, &prefix, "chat").await;
        assert_eq!(entries.len(), 1, "{entries:?}");
    })
    .await;
}

/// A frame id sent twice in a burst (the appender takes both in one batch, one script call):
/// both are acked with one entry, stored once.
#[tokio::test]
async fn an_id_sent_twice_in_a_burst_is_stored_once() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("burst");
        let gw =
            Gateway::start_with(&redis, &prefix, &[("WSBRIDGE__AUTH__JWT_SECRET", SECRET)]).await;
        let mut c = connect_user(&gw, "dave").await;
        // Written in one go: each id twice in a row.
        for n in 0..50 {
            for _ in 0..2 {
                let frame =
                    json!({"type": "send", "stream": "chat", "data": n, "id": format!("b{n}")});
                c.ws.feed(Message::Text(frame.to_string().into()))
                    .await
                    .unwrap();
            }
        }
        c.ws.flush().await.unwrap();
        let mut acks = Vec::new();
        for _ in 0..100 {
            let ack = c.recv().await;
            assert_eq!(ack["type"], "ack", "{ack}");
            acks.push((
                ack["id"].as_str().unwrap().to_owned(),
                ack["entry"].as_str().unwrap().to_owned(),
            ));
        }
        for pair in acks.chunks(2) {
            assert_eq!(pair[0], pair[1], "a resend acked with another entry");
        }
        let entries = inbound_entries(&redis, &prefix, "chat").await;
        let stored: Vec<(String, String)> = entries
            .iter()
            .map(|(entry, f)| (text(&f["id"]).to_owned(), entry.clone()))
            .collect();
        let once: Vec<(String, String)> = acks.into_iter().step_by(2).collect();
        assert_eq!(stored, once);
    })
    .await;
}

/// `inbound.dedupe_window_seconds = 0` turns deduplication off: every resend is stored, and the
/// gateway keeps no dedupe keys.
#[tokio::test]
async fn a_dedupe_window_of_zero_stores_every_resend() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("nodedupe");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__AUTH__JWT_SECRET", SECRET),
                ("WSBRIDGE__INBOUND__DEDUPE_WINDOW_SECONDS", "0"),
            ],
        )
        .await;
        let mut c = connect_user(&gw, "bob").await;
        let first = send_acked(&mut c, "z1", json!("a")).await;
        let second = send_acked(&mut c, "z1", json!("a")).await;
        let mut again = connect_user(&gw, "bob").await;
        let third = send_acked(&mut again, "z1", json!("a")).await;
        assert!(first != second && second != third && first != third);
        let entries = inbound_entries(&redis, &prefix, "chat").await;
        assert_eq!(entries.len(), 3);
        assert!(entries.iter().all(|(_, f)| text(&f["id"]) == "z1"));
        let kept = dedupe_keys(&redis, &prefix, "chat").await;
        assert!(kept.is_empty(), "{kept:?} kept with the window off");
    })
    .await;
}

/// An anonymous client's ids are scoped to its connection: a resend on the same connection is
/// acked with the original entry and not stored again.
#[tokio::test]
async fn an_anonymous_resend_on_the_same_connection_is_stored_once() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("anonsame");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect(&gw).await;
        let first = send_acked(&mut c, "a1", json!({"text": "hi"})).await;
        let second = send_acked(&mut c, "a1", json!({"text": "hi"})).await;
        assert_eq!(first, second);
        // Another id is another entry.
        let other = send_acked(&mut c, "a2", json!({"text": "hi"})).await;
        assert_ne!(other, first);
        let entries = inbound_entries(&redis, &prefix, "chat").await;
        let ids: Vec<&str> = entries.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(ids, [first.as_str(), other.as_str()]);
    })
    .await;
}

/// ... and only to it: after a reconnect the same id is a new message, stored again, as the
/// README says (backends dedupe such resends on the `id` field).
#[tokio::test]
async fn an_anonymous_resend_after_a_reconnect_is_stored_again() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("anonreconnect");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect(&gw).await;
        let first = send_acked(&mut c, "a1", json!(1)).await;
        let first_connection = c.connection.clone();
        c.ws.close(None).await.unwrap();
        assert_eq!(c.closed().await, Some(1000));

        let mut c = Client::connect(&gw).await;
        let second = send_acked(&mut c, "a1", json!(1)).await;
        assert_ne!(first, second);
        let entries = inbound_entries(&redis, &prefix, "chat").await;
        let stored: Vec<(&str, &str, &str)> = entries
            .iter()
            .map(|(e, f)| (e.as_str(), text(&f["id"]), text(&f["connection"])))
            .collect();
        assert_eq!(
            stored,
            [
                (first.as_str(), "a1", first_connection.as_str()),
                (second.as_str(), "a1", c.connection.as_str())
            ]
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Lifecycle events
// ---------------------------------------------------------------------------------------------

/// `inbound.events_enabled = false`: connect, subscribe, unsubscribe and disconnect write
/// nothing to `<prefix>:events`, while client sends are still stored.
#[tokio::test]
async fn with_events_disabled_nothing_is_written_to_the_events_stream() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("noevents");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__INBOUND__EVENTS_ENABLED", "false")],
        )
        .await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("room:1").await;
        c.send(json!({"type": "unsubscribe", "channel": "room:1", "id": "u"}))
            .await;
        assert_eq!(c.recv().await["type"], "unsubscribed");
        c.ws.close(None).await.unwrap();
        assert_eq!(c.closed().await, Some(1000));
        eventually("the disconnect handled", || async {
            gw.metric("wsbridge_connections_closed_total{reason=\"client\"}")
                .await
                == 1.0
        })
        .await;

        // Events and sends share one FIFO append queue: once a send queued after the disconnect
        // is acked, and one more after that (on a cluster, streams are appended side by side), any
        // event queued before them has been written.
        let mut other = Client::connect(&gw).await;
        send_acked(&mut other, "b1", json!(1)).await;
        send_acked(&mut other, "b2", json!(2)).await;
        let mut conn = redis.conn().await;
        let exists: i64 = redis::cmd("EXISTS")
            .arg(format!("{prefix}:events"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 0, "events were written although disabled");
        assert_eq!(inbound_entries(&redis, &prefix, "chat").await.len(), 2);
    })
    .await;
}

/// `wsbridge_events_failed_total`: an event Redis does not take is counted, and not written
/// (lifecycle events are at most once).
#[tokio::test]
async fn an_event_redis_does_not_take_is_counted_in_events_failed() {
    deadline(TEST_DEADLINE, async {
        let mut redis = Redis::start_with_aof();
        let prefix = unique_prefix("eventsfailed");
        let gw = Gateway::start(&redis, &prefix).await;
        let key = format!("{prefix}:events");
        let mut c = Client::connect(&gw).await;
        {
            let conn = redis.conn().await;
            eventually("the connect event", || {
                let mut conn = conn.clone();
                let key = key.clone();
                async move { xrange(&mut conn, &key).await.len() == 1 }
            })
            .await;
        }
        assert_eq!(gw.metric("wsbridge_events_failed_total").await, 0.0);

        redis.kill();
        c.ws.close(None).await.unwrap();
        assert_eq!(c.closed().await, Some(1000));
        eventually("the disconnect event counted as failed", || async {
            gw.metric("wsbridge_events_failed_total").await == 1.0
        })
        .await;

        // Redis comes back with everything it stored: the connect event, and no disconnect.
        redis.restart();
        let mut conn = redis.conn().await;
        let events = xrange(&mut conn, &key).await;
        let kinds: Vec<&str> = events.iter().map(|(_, f)| text(&f["event"])).collect();
        assert_eq!(kinds, ["connect"]);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Encodings
// ---------------------------------------------------------------------------------------------

/// A binary frame is read as MessagePack whatever was negotiated, and answered in the
/// connection's encoding: a JSON client's binary `send` is stored as MessagePack and acked in a
/// JSON text frame; a binary frame that is not MessagePack gets `bad_frame`, and the
/// connection stays open.
#[tokio::test]
async fn a_binary_frame_on_a_json_connection_is_read_as_msgpack_and_answered_in_json() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("binonjson");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect(&gw).await;

        let frame = json!({"type": "send", "stream": "chat", "data": [1, "two"], "id": "b1"});
        c.ws.send(Message::Binary(
            rmp_serde::to_vec_named(&frame).unwrap().into(),
        ))
        .await
        .unwrap();
        let Message::Text(reply) = raw_frame(&mut c).await else {
            panic!("a JSON connection must be answered in text frames")
        };
        let ack: Value = server_frame_json(&reply);
        assert_eq!(
            (ack["type"].as_str(), ack["id"].as_str()),
            (Some("ack"), Some("b1")),
            "{ack}"
        );

        c.ws.send(Message::Binary(vec![0xc1, 0x00].into()))
            .await
            .unwrap();
        let Message::Text(reply) = raw_frame(&mut c).await else {
            panic!("a JSON connection must be answered in text frames")
        };
        let error: Value = server_frame_json(&reply);
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some("bad_frame")),
            "{error}"
        );

        // Still open, and still JSON.
        send_acked(&mut c, "j1", json!({"k": "v"})).await;
        let entries = inbound_entries(&redis, &prefix, "chat").await;
        assert_eq!(entries.len(), 2);
        let (entry, f) = &entries[0];
        assert_eq!(entry.as_str(), ack["entry"].as_str().unwrap());
        assert_eq!(text(&f["encoding"]), "msgpack");
        let data: (u8, String) = rmp_serde::from_slice(&f["data"]).unwrap();
        assert_eq!(data, (1, "two".to_string()));
        assert_eq!(text(&entries[1].1["encoding"]), "json");
    })
    .await;
}

/// The reverse: a text frame on a MessagePack connection is read as JSON, stored as JSON and
/// answered in a MessagePack binary frame; text that is not JSON gets `bad_frame`, in
/// MessagePack, and the connection stays open.
#[tokio::test]
async fn a_text_frame_on_a_msgpack_connection_is_read_as_json_and_answered_in_msgpack() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("textonmp");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect_msgpack(&gw).await;

        let frame = json!({"type": "send", "stream": "chat", "data": {"text": "hé"}, "id": "t1"});
        c.ws.send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        let Message::Binary(reply) = raw_frame(&mut c).await else {
            panic!("a MessagePack connection must be answered in binary frames")
        };
        let ack: Value = server_frame_msgpack(&reply);
        assert_eq!(
            (ack["type"].as_str(), ack["id"].as_str()),
            (Some("ack"), Some("t1")),
            "{ack}"
        );

        c.ws.send(Message::Text("{not json".into())).await.unwrap();
        let Message::Binary(reply) = raw_frame(&mut c).await else {
            panic!("a MessagePack connection must be answered in binary frames")
        };
        let error: Value = server_frame_msgpack(&reply);
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some("bad_frame")),
            "{error}"
        );

        // Still open, and still MessagePack.
        c.send(json!({"type": "send", "stream": "chat", "data": 5, "id": "m1"}))
            .await;
        let Message::Binary(reply) = raw_frame(&mut c).await else {
            panic!("a MessagePack connection must be answered in binary frames")
        };
        let ack2: Value = server_frame_msgpack(&reply);
        assert_eq!(
            (ack2["type"].as_str(), ack2["id"].as_str()),
            (Some("ack"), Some("m1")),
            "{ack2}"
        );
        let entries = inbound_entries(&redis, &prefix, "chat").await;
        assert_eq!(entries.len(), 2);
        let (entry, f) = &entries[0];
        assert_eq!(entry.as_str(), ack["entry"].as_str().unwrap());
        assert_eq!(text(&f["encoding"]), "json");
        let data: Value = serde_json::from_slice(&f["data"]).unwrap();
        assert_eq!(data, json!({"text": "hé"}));
        assert_eq!(text(&entries[1].1["encoding"]), "msgpack");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// "May have been stored"
// ---------------------------------------------------------------------------------------------

/// A `send` whose append Redis does not answer in time gets `redis_unavailable` saying it may
/// have been stored. It was (Redis runs it once thawed); the client's resend with the same id is
/// acked with that entry, and the stream holds it once.
#[tokio::test]
async fn a_send_that_may_have_been_stored_is_resent_and_stored_once() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("maybestored");
        let gw =
            Gateway::start_with(&redis, &prefix, &[("WSBRIDGE__AUTH__JWT_SECRET", SECRET)]).await;
        let mut c = connect_user(&gw, "carol").await;
        send_acked(&mut c, "warm", json!(0)).await;

        // Frozen, Redis takes the append into its socket and answers nothing: the gateway gives up
        // after redis.command_timeout_ms, not knowing whether it was stored.
        redis.freeze(true);
        c.send(json!({"type": "send", "stream": "chat", "data": {"n": 1}, "id": "m1"}))
            .await;
        let e = c.recv().await;
        redis.freeze(false);
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
            (Some("error"), Some("redis_unavailable"), Some("m1")),
            "{e}"
        );
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("may have been stored"),
            "{e}"
        );

        // Thawed, Redis runs the append it had received: the message was stored after all.
        let conn = redis.conn().await;
        eventually("the timed-out append stored", || {
            let mut conn = conn.clone();
            let key = format!("{prefix}:in:chat");
            async move { xrange(&mut conn, &key).await.len() == 2 }
        })
        .await;
        let stored = inbound_entries(&redis, &prefix, "chat").await;
        assert_eq!(text(&stored[1].1["id"]), "m1");

        // The resend is acked with that entry and stored no second time.
        let resent = send_acked(&mut c, "m1", json!({"n": 1})).await;
        assert_eq!(resent, stored[1].0);
        let entries = inbound_entries(&redis, &prefix, "chat").await;
        let ids: Vec<&str> = entries.iter().map(|(_, f)| text(&f["id"])).collect();
        assert_eq!(ids, ["warm", "m1"]);
    })
    .await;
}

/// Sends with and without a frame id, to two streams, one connection, all sent before any
/// answer is read (so they share pipelines, where entries with an id go through the
/// once-per-id script in runs and the others are plain XADDs): each stream holds them in the
/// order they were sent, each once, and every one was acked.
#[tokio::test]
async fn sends_with_and_without_ids_keep_their_order_in_each_stream() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("mixed-ids");
        let gw = Gateway::start_with(&redis, &prefix, &[]).await;
        let mut c = Client::connect(&gw).await;
        const SENDS: usize = 60;
        for n in 0..SENDS {
            let stream = if n % 5 == 4 { "orders" } else { "chat" };
            let frame = if n % 3 == 0 {
                json!({"type": "send", "stream": stream, "data": n})
            } else {
                json!({"type": "send", "stream": stream, "data": n, "id": format!("m{n}")})
            };
            c.send(frame).await;
        }
        for _ in 0..SENDS {
            let ack = c.recv().await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        for (stream, expected) in [
            (
                "chat",
                (0..SENDS).filter(|n| n % 5 != 4).collect::<Vec<_>>(),
            ),
            ("orders", (0..SENDS).filter(|n| n % 5 == 4).collect()),
        ] {
            let data: Vec<usize> = inbound_entries(&redis, &prefix, stream)
                .await
                .iter()
                .map(|(_, fields)| text(&fields["data"]).parse().unwrap())
                .collect();
            assert_eq!(data, expected, "{stream}");
        }
    })
    .await;
}
