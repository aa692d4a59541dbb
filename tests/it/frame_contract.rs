//! The frame schemas (docs/schema/) against the gateway: the schemas say what the code does, the
//! check every test's reader makes can fail, and what tests/frames_fuzz.py found stays fixed.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use wsbridge::protocol::ErrorCode;

use crate::common::*;

fn schema(name: &str) -> Value {
    let path = format!("{}/docs/schema/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect(&path)
}

/// The `error` frame's `code` enum is exactly the gateway's error codes.
#[test]
fn the_schemas_error_codes_are_the_gateways() {
    let documented: BTreeSet<String> = schema("server-frame.json")["$defs"]["errorCode"]["enum"]
        .as_array()
        .expect("errorCode enum")
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let sent: BTreeSet<String> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_string())
        .collect();
    assert_eq!(documented, sent);
}

/// The check in every test's frame reader fails on a frame the schema does not allow, naming
/// the frame and the fault: a wrong field shape, an extra field, an unknown code or type.
#[test]
fn the_frame_check_refuses_what_the_schema_does_not_allow() {
    for frame in [
        json!({"type": "ack", "id": "c1", "entry": "not-an-entry"}),
        json!({"type": "subscribed", "channel": "room:1", "extra": 1}),
        json!({"type": "error", "id": null, "code": "no_such_code", "message": "m"}),
        json!({"type": "missed", "channel": "room:1"}),
        json!({"type": "dance"}),
        json!({"type": "message", "offset": "0000abcd:1-0", "data": 1}),
    ] {
        let failed = std::panic::catch_unwind(|| assert_server_frame(&frame))
            .expect_err(&format!("{frame} must fail the check"));
        let why = failed.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(why.contains(&frame.to_string()), "{why}");
    }
    for frame in [
        json!({"type": "welcome", "connection": "r1.0000abcd.1f", "user": null}),
        json!({"type": "ack", "id": 7, "entry": "1700000000000-0"}),
        json!({"type": "ack", "id": "p1", "offset": "0000abcd:1700000000000-0"}),
        json!({"type": "ack", "id": null}),
        json!({"type": "message", "channel": "room:1", "offset": "0000abcd:1-0", "data": [1]}),
        json!({"type": "message", "data": {"x": 1}}),
        json!({"type": "missed"}),
    ] {
        assert_server_frame(&frame);
    }
}

/// The README's examples of client frames are valid under the client-frame schema, and a frame
/// missing what the gateway requires is not.
#[test]
fn the_readmes_client_frames_are_valid_client_frames() {
    let client = jsonschema::draft202012::new(&schema("client-frame.json")).expect("schema");
    for frame in [
        json!({"type": "send", "stream": "chat", "data": {"a": 1}, "id": "c1"}),
        json!({"type": "publish", "channel": "cursor:1", "data": null, "id": "p1"}),
        json!({"type": "subscribe", "channel": "room:1", "id": "c2"}),
        json!({"type": "subscribe", "channel": "room:1", "since": "1a2b3c4d:1700000000000-0"}),
        json!({"type": "unsubscribe", "channel": "room:1", "id": 3}),
        json!({"type": "presence", "channel": "room:1", "view": "users", "cursor": "17", "limit": 10}),
        json!({"type": "refresh", "token": "a.b.c", "id": "c5"}),
    ] {
        assert!(client.is_valid(&frame), "{frame}");
    }
    for frame in [
        json!({"type": "send", "data": 1}),
        json!({"type": "subscribe", "channel": ""}),
        json!({"type": "presence", "channel": "room:1", "view": "all"}),
        json!({"type": "dance"}),
        json!({"stream": "chat"}),
    ] {
        assert!(!client.is_valid(&frame), "{frame}");
    }
}

/// A replica whose `room:*` channels keep history and presence.
async fn history_and_presence(redis: &Redis, prefix: &str) -> Gateway {
    let config = format!(
        "{}\n[[channels]]\npattern = \"room:*\"\nhistory_size = 10\nhistory_ttl_seconds = 60\npresence = true\n",
        base_config(&redis.url(), prefix)
    );
    let gw = Gateway::spawn(&config, prefix, &[]);
    gw.wait_ready().await;
    gw
}

/// Asks `frame` and expects an `error` with `code` and id `q` whose message names `says`.
async fn refused(c: &mut Client, frame: Value, code: &str, says: &str) {
    c.send(frame.clone()).await;
    let reply = c.recv().await;
    assert_eq!(
        (
            reply["type"].as_str(),
            reply["code"].as_str(),
            reply["id"].as_str()
        ),
        (Some("error"), Some(code), Some("q")),
        "{frame} -> {reply}"
    );
    assert!(
        reply["message"].as_str().unwrap().contains(says),
        "{frame} -> {reply}"
    );
}

/// Found by tests/frames_fuzz.py: a presence `cursor` that is not a number below 2^64 went to
/// Redis as it was, and the client was told `redis_unavailable` (a retryable error, counted as
/// a Redis failure) with Redis's "invalid cursor" and the script's hash in the message. It is
/// the client's mistake: `bad_request` naming the field. A cursor with leading zeros is the same
/// number and is taken.
#[tokio::test]
async fn a_presence_cursor_that_is_not_a_number_is_a_bad_request() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("fc-cursor");
        let gw = history_and_presence(&redis, &prefix).await;
        for msgpack in [false, true] {
            let mut c = Client::connect_url(&gw.ws_url, msgpack).await.unwrap();
            for cursor in ["abc", "", "-1", "+5", "18446744073709551616", "1e3"] {
                let frame =
                    json!({"type": "presence", "channel": "room:1", "cursor": cursor, "id": "q"});
                refused(&mut c, frame, "bad_request", "`cursor`").await;
            }
            c.send(json!({"type": "presence", "channel": "room:1", "cursor": "000", "id": "p"}))
                .await;
            let page = c.recv().await;
            assert_eq!(
                (page["type"].as_str(), page["id"].as_str()),
                (Some("presence"), Some("p")),
                "{page}"
            );
        }
        let (status, body) = gw.readyz().await;
        assert_eq!(status, 200, "{body}");
    })
    .await;
}

/// Found by tests/frames_fuzz.py: a `since` at the last possible stream id
/// (`<epoch>:18446744073709551615-18446744073709551615`) made the history read fail in Redis
/// ("invalid start ID for the interval"), and the client was told `redis_unavailable` with
/// Redis's message. No offset the gateway gives can be it: `bad_request`, as for any `since`
/// that is not an offset; the id just before it is an offset like any other.
#[tokio::test]
async fn a_since_past_the_last_stream_id_is_a_bad_request() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("fc-since");
        let gw = history_and_presence(&redis, &prefix).await;
        let (status, _) = gw
            .post("/send", &json!({"to": {"channel": "room:1"}, "data": 1}))
            .await;
        assert_eq!(status, 202);
        for msgpack in [false, true] {
            let mut c = Client::connect_url(&gw.ws_url, msgpack).await.unwrap();
            let max = u64::MAX;
            let frame = json!({"type": "subscribe", "channel": "room:1", "since": format!("0000abcd:{max}-{max}"), "id": "q"});
            refused(&mut c, frame, "bad_request", "`since`").await;
            let since = format!("0000abcd:{max}-{}", max - 1);
            c.send(json!({"type": "subscribe", "channel": "room:1", "since": since, "id": "s"}))
                .await;
            let answer = c.recv().await;
            assert_eq!(
                answer,
                json!({"type": "subscribed", "channel": "room:1", "id": "s", "recovered": false})
            );
        }
    })
    .await;
}
