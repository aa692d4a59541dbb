//! Backend API: keys, bad bodies, wrong methods and paths — each a 4xx with a JSON error.

use serde_json::{json, Value};

use crate::common::*;

async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> (u16, Value) {
    let (status, text) = http(method, &format!("{}{path}", gw.api_url), Some(body), key).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not a JSON error: {v}"))
}

#[tokio::test]
async fn api_keys_are_required_when_configured() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("keys");
        let gw = Gateway::start_with(&redis, &prefix, &[("WSBRIDGE__API__KEYS", "k1,k2")]).await;
        let body = r#"{"to":{"all":true},"data":1}"#;
        let (status, v) = call(&gw, "POST", "/send", body, None).await;
        assert_eq!((status, code(&v)), (401, "unauthorized"));
        let (status, _) = call(&gw, "POST", "/send", body, Some("wrong")).await;
        assert_eq!(status, 401);
        let (status, v) = call(&gw, "POST", "/send", body, Some("k2")).await;
        assert_eq!((status, v), (202, json!({"accepted": 1})));
        // Probes and metrics stay open for orchestrators and Prometheus.
        assert_eq!(gw.readyz().await.0, 200);
        assert_eq!(
            http("GET", &format!("{}/metrics", gw.api_url), None, None)
                .await
                .0,
            200
        );
    })
    .await;
}

#[tokio::test]
async fn bad_requests_are_named() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("badapi");
        let gw = Gateway::start(&redis, &prefix).await;
        let cases: &[(&str, &str, &str, u16, &str, &str)] = &[
            ("POST", "/send", "{nope", 400, "bad_json", "JSON"),
            (
                "POST",
                "/send",
                r#"{"to":{"room":"x"},"data":1}"#,
                400,
                "bad_request",
                "room",
            ),
            (
                "POST",
                "/send",
                r#"{"to":{},"data":1}"#,
                400,
                "bad_request",
                "connection",
            ),
            (
                "POST",
                "/send",
                r#"{"to":{"user":"a","channel":"b"},"data":1}"#,
                400,
                "bad_request",
                "exactly one",
            ),
            (
                "POST",
                "/send",
                r#"{"to":{"all":true}}"#,
                400,
                "bad_request",
                "data",
            ),
            (
                "POST",
                "/send",
                r#"{"to":{"channel":5},"data":1}"#,
                400,
                "bad_request",
                "invalid type",
            ),
            ("POST", "/send", r#"[]"#, 400, "bad_request", "no messages"),
            (
                "POST",
                "/send",
                r#"[{"to":{"all":true},"data":1},{"to":{"all":false},"data":2}]"#,
                400,
                "bad_request",
                "message 1",
            ),
            (
                "POST",
                "/subscribe",
                r#"{"channel":"x"}"#,
                400,
                "bad_request",
                "connection",
            ),
            (
                "POST",
                "/disconnect",
                r#"{"connection":"c","code":1000}"#,
                400,
                "bad_request",
                "4000",
            ),
            ("GET", "/send", "", 405, "method_not_allowed", "POST"),
            ("POST", "/healthz", "", 405, "method_not_allowed", "GET"),
            ("GET", "/nothing", "", 404, "not_found", "/nothing"),
        ];
        for (method, path, body, status, expected, mentions) in cases {
            let (got, v) = call(&gw, method, path, body, None).await;
            assert_eq!(
                (got, code(&v)),
                (*status, *expected),
                "{method} {path} {body}: {v}"
            );
            let message = v["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(mentions),
                "{method} {path} {body}: message {message:?} should mention {mentions:?}"
            );
        }
        // A refused batch sent nothing: a subscriber sees only the next good message.
        let mut c = Client::connect(&gw).await;
        gw.send(json!({"to": {"connection": c.connection}, "data": "good"}))
            .await;
        assert_eq!(c.recv().await["data"], "good");
        assert_eq!(gw.metric("wsbridge_outbound_published_total").await, 1.0);
    })
    .await;
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("big");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__API__MAX_BODY_BYTES", "1000")],
        )
        .await;
        let big = format!(r#"{{"to":{{"all":true}},"data":"{}"}}"#, "x".repeat(2000));
        let (status, v) = call(&gw, "POST", "/send", &big, None).await;
        assert_eq!((status, code(&v)), (413, "payload_too_large"));
    })
    .await;
}

#[tokio::test]
async fn healthz_and_readyz_answer() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("probes");
        let gw = Gateway::start(&redis, &prefix).await;
        assert_eq!(
            http("GET", &format!("{}/healthz", gw.api_url), None, None).await,
            (200, "ok\n".into())
        );
        assert_eq!(gw.readyz().await, (200, "ready\n".into()));
        // The public listener serves only /ws.
        let public = gw
            .ws_url
            .replace("ws://", "http://")
            .replace("/ws", "/other");
        assert_eq!(http("GET", &public, None, None).await.0, 404);
        let ws_plain = gw.ws_url.replace("ws://", "http://");
        assert_eq!(http("GET", &ws_plain, None, None).await.0, 426);
    })
    .await;
}
