//! The backend API against its OpenAPI document (`docs/openapi.json`): the replica serves the
//! document, every path in it is a route of the replica, and the answers Schemathesis
//! (`tests/schemathesis.sh`) found outside the document are fixed, each reproduced here.

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const KEY: &str = "contract-key";

/// A replica with an API key and presence on `room:*`.
async fn replica(redis: &Redis, prefix: &str) -> Gateway {
    let config = format!(
        "{}\n[api]\nkeys = [\"{KEY}\"]\n\n[[channels]]\npattern = \"room:*\"\npresence = true\n",
        base_config(&redis.url(), prefix)
    );
    let gw = Gateway::spawn(&config, prefix, &[]);
    gw.wait_ready().await;
    gw
}

/// POST with the key; the answer's status and JSON body.
async fn post(gw: &Gateway, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(
        "POST",
        &format!("{}{path}", gw.api_url),
        Some(&body.to_string()),
        Some(KEY),
    )
    .await;
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, value)
}

/// Waits until the channel's presence, which is written to Redis after the join, shows one
/// connection.
async fn one_in_presence(gw: &Gateway, channel: &str) {
    eventually("the client in the channel's presence", || async {
        post(gw, "/presence", &json!({"channel": channel})).await.1["connections"] == 1
    })
    .await;
}

/// Asserts a 400 `bad_request` whose message names `field`.
fn assert_bad_request(answer: &(u16, Value), field: &str, what: &str) {
    let (status, body) = answer;
    assert_eq!(*status, 400, "{what}: {body}");
    assert_eq!(body["error"]["code"], "bad_request", "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("`{field}`")),
        "{what}: the message does not name `{field}`: {message}"
    );
}

/// The raw head of a GET: status line and headers, lower-cased.
async fn get_head(gw: &Gateway, path: &str) -> String {
    let addr = gw.api_url.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut bytes))
        .await
        .expect("the replica answered within PATIENCE")
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    text.split("\r\n\r\n").next().unwrap().to_lowercase()
}

#[tokio::test]
async fn the_replica_serves_its_openapi_document_and_every_path_in_it_is_a_route() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("openapi");
        let gw = replica(&redis, &prefix).await;

        // Open like /metrics (the key is set), as JSON, byte for byte the file in docs/.
        let url = format!("{}/openapi.json", gw.api_url);
        let (status, text) = http("GET", &url, None, None).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(text, include_str!("../../docs/openapi.json"));
        let head = get_head(&gw, "/openapi.json").await;
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{head}"
        );
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

        // Every documented path answers its other method with 405 naming the documented one:
        // the route exists, and takes the method the document says.
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 10, "{:?}", paths.keys());
        for (path, operations) in paths {
            let methods: Vec<&String> = operations.as_object().unwrap().keys().collect();
            assert_eq!(methods.len(), 1, "{path}: {methods:?}");
            let documented = methods[0].to_uppercase();
            let other = if documented == "GET" { "POST" } else { "GET" };
            let (status, body) =
                http(other, &format!("{}{path}", gw.api_url), Some(""), Some(KEY)).await;
            assert_eq!(status, 405, "{other} {path}: {body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"]["code"], "method_not_allowed", "{path}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("use {documented}")),
                "{path}: {body}"
            );
            // Security: the action endpoints need the key, the open ones do not.
            let open = operations[methods[0].as_str()]["security"] == json!([]);
            let action_paths = [
                "/send",
                "/subscribe",
                "/unsubscribe",
                "/disconnect",
                "/presence",
                "/user_status",
            ];
            assert_eq!(open, !action_paths.contains(&path.as_str()), "{path}");
            if !open {
                let (status, _) =
                    http("POST", &format!("{}{path}", gw.api_url), Some("{}"), None).await;
                assert_eq!(status, 401, "POST {path} without the key");
            }
        }
        let (status, _) = http("GET", &format!("{}/openapi.yaml", gw.api_url), None, None).await;
        assert_eq!(status, 404);
    })
    .await;
}

/// Found by Schemathesis: a presence `cursor` that is not one Redis handed out was either a 503
/// `redis_unavailable` ("invalid cursor" from HSCAN, answered "ask again", so a backend retried it
/// forever) or taken as another position (`""`, `"-1"`). Now it is a 400 naming `cursor`, on the
/// API and in a client's `presence` frame alike.
#[tokio::test]
async fn a_presence_cursor_that_no_page_gave_is_a_bad_request() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("cursor");
        let gw = replica(&redis, &prefix).await;
        let mut client = Client::connect(&gw).await;
        client.subscribe("room:1").await;
        one_in_presence(&gw, "room:1").await;

        for cursor in [
            "abc",
            "",
            "-1",
            "+1",
            "1.5",
            "99999999999999999999999",
            " 1",
        ] {
            let answer = post(
                &gw,
                "/presence",
                &json!({"channel": "room:1", "cursor": cursor}),
            )
            .await;
            assert_bad_request(&answer, "cursor", &format!("cursor {cursor:?}"));

            client
                .send(json!({"type": "presence", "id": 7, "channel": "room:1", "cursor": cursor}))
                .await;
            let reply = client.recv().await;
            assert_eq!(
                (&reply["type"], &reply["id"], &reply["code"]),
                (&json!("error"), &json!(7), &json!("bad_request")),
                "client cursor {cursor:?}: {reply}"
            );
            assert!(
                reply["message"].as_str().unwrap().contains("`cursor`"),
                "{reply}"
            );
        }

        // The cursors a page can give still work: "0" (the start) and none.
        for cursor in [json!("0"), Value::Null] {
            let (status, page) = post(
                &gw,
                "/presence",
                &json!({"channel": "room:1", "cursor": cursor}),
            )
            .await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(page["connections"], 1, "{page}");
        }
        // And the connection that asked is still usable.
        let reply = {
            client
                .send(json!({"type": "presence", "id": 8, "channel": "room:1"}))
                .await;
            client.recv().await
        };
        assert_eq!(
            (&reply["type"], &reply["connections"]),
            (&json!("presence"), &json!(1)),
            "{reply}"
        );
    })
    .await;
}

/// Found by Schemathesis: an integer written with a fraction of zero (`4001.0`, `1e1`), which is
/// an integer to JSON Schema and what encoders that keep numbers as floats write, was a 400 for
/// `/disconnect`'s `code` and `/presence`'s `limit`. Now it is taken; a real fraction is still a
/// 400 naming the field.
#[tokio::test]
async fn integers_written_with_a_zero_fraction_are_taken() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("wholenum");
        let gw = replica(&redis, &prefix).await;
        let mut client = Client::connect(&gw).await;
        client.subscribe("room:1").await;
        one_in_presence(&gw, "room:1").await;

        for limit in [
            json!(1.5),
            json!(0.0),
            json!(-1.0),
            json!(4294967296.0),
            json!("2"),
        ] {
            let answer = post(
                &gw,
                "/presence",
                &json!({"channel": "room:1", "limit": limit}),
            )
            .await;
            assert_bad_request(&answer, "limit", &format!("limit {limit}"));
        }
        for limit in [json!(2.0), json!(1e1)] {
            let (status, page) = post(
                &gw,
                "/presence",
                &json!({"channel": "room:1", "limit": limit}),
            )
            .await;
            assert_eq!(
                (status, &page["connections"]),
                (200, &json!(1)),
                "limit {limit}: {page}"
            );
        }

        let connection = client.connection.clone();
        for code in [
            json!(4001.5),
            json!(3999.0),
            json!(5000.0),
            json!("4001"),
            json!(true),
        ] {
            let answer = post(
                &gw,
                "/disconnect",
                &json!({"connection": connection, "code": code}),
            )
            .await;
            assert_bad_request(&answer, "code", &format!("code {code}"));
        }
        let (status, body) = post(
            &gw,
            "/disconnect",
            &json!({"connection": connection, "code": 4001.0, "reason": "bye"}),
        )
        .await;
        assert_eq!((status, body), (202, json!({"accepted": 1})));
        client.expect_close(4001).await;
    })
    .await;
}
