//! Process lifecycle and connection policies: SIGTERM drain, config errors, idle timeout,
//! tokens, origins.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn sigterm_closes_clients_with_1012_and_exits_0() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("sigterm");
        let mut gw = Gateway::start(&redis, &prefix).await;
        let mut c1 = Client::connect(&gw).await;
        let mut c2 = Client::connect_msgpack(&gw).await;
        gw.signal("-TERM");
        assert_eq!(c1.closed().await, Some(1012));
        assert_eq!(c2.closed().await, Some(1012));
        let status = gw.wait_exit();
        assert_eq!(status.code(), Some(0), "{}", gw.log_text());
        // Their disconnects were still recorded before exit.
        let mut conn = redis.conn().await;
        let events = xrange(&mut conn, &format!("{prefix}:events")).await;
        let codes: Vec<&str> = events
            .iter()
            .filter(|(_, f)| text(&f["event"]) == "disconnect")
            .map(|(_, f)| text(&f["code"]))
            .collect();
        assert_eq!(codes, ["1012", "1012"]);
    })
    .await;
}

fn start_with_config(config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(unique_prefix("badconfig"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsbridge"));
    cmd.arg("--config").arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_stops_startup_with_one_line_naming_the_key_and_exit_code_2() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            "[server]\nlisten = \"not-an-address\"\n",
            &[],
            "server.listen",
        ),
        ("[server]\nlistn = \"127.0.0.1:1\"\n", &[], "listn"),
        ("[nosuchsection]\nx = 1\n", &[], "nosuchsection"),
        ("[redis]\nurl = \"http://example\"\n", &[], "redis.url"),
        (
            "[outbound]\nqueue_full_policy = \"explode\"\n",
            &[],
            "explode",
        ),
        (
            "[server]\nping_interval_seconds = \"soon\"\n",
            &[],
            "ping_interval_seconds",
        ),
        (
            "",
            &[("WSBRIDGE__SERVER__API_LISTEN", "nowhere")],
            "server.api_listen",
        ),
        ("", &[("WSBRIDGE__REDIS__PREFX", "x")], "prefx"),
        ("this is not toml", &[], "c.toml"),
    ];
    for (config, env, mentions) in cases {
        let (code, stderr) = start_with_config(config, env);
        assert_eq!(code, Some(2), "{config:?} {env:?}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "one line expected: {stderr}"
        );
        assert!(
            stderr.contains(mentions),
            "{config:?} {env:?}: {stderr:?} should name {mentions:?}"
        );
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_wsbridge"))
        .args(["--config", "/nonexistent/wsbridge.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[tokio::test]
async fn silent_peers_are_closed_after_the_idle_timeout() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("idle");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__SERVER__PING_INTERVAL_SECONDS", "1"),
                ("WSBRIDGE__SERVER__IDLE_TIMEOUT_SECONDS", "2"),
            ],
        )
        .await;
        // A raw TCP client that completes the handshake and then never answers pings.
        let addr = gw
            .ws_url
            .trim_start_matches("ws://")
            .trim_end_matches("/ws")
            .to_string();
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        tcp.write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        eventually("connection registered", || async {
            gw.metric("wsbridge_connections").await == 1.0
        })
        .await;
        // A well-behaved client on the same replica keeps reading, so it answers pings, and stays.
        let mut good = Client::connect(&gw).await;
        let id = good.connection.clone();
        // The task hands the client back, so it stays connected until the end of the test.
        let good_reader = tokio::spawn(async move {
            let frame = good.recv().await;
            (frame, good)
        });
        // The silent peer reads what it gets (it never answers a ping): the welcome, pings, then a
        // close frame with 1001.
        assert_eq!(raw_close_outcome(&mut tcp).await, Closed::Code(1001));
        eventually("silent peer closed for idleness", || async {
            gw.metric("wsbridge_connections_closed_total{reason=\"idle_timeout\"}")
                .await
                == 1.0
        })
        .await;
        gw.send(json!({"to": {"connection": id}, "data": "alive"}))
            .await;
        let (frame, good) = good_reader.await.unwrap();
        assert_eq!(frame["data"], "alive");
        assert_eq!(gw.metric("wsbridge_connections").await, 1.0);
        drop((tcp, good));
    })
    .await;
}

#[tokio::test]
async fn tokens_are_checked_before_the_upgrade_and_expiry_closes_with_1008() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("jwt");
        let secret = "jwt-secret";
        let gw =
            Gateway::start_with(&redis, &prefix, &[("WSBRIDGE__AUTH__JWT_SECRET", secret)]).await;
        let http_url = gw.ws_url.replace("ws://", "http://");
        let upgrade_headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ];
        let (status, body) = http_raw("GET", &http_url, None, None, &upgrade_headers).await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("token"));
        let wrong = token("other-secret", json!({"sub": "x"}));
        let (status, _) = http_raw(
            "GET",
            &format!("{http_url}?token={wrong}"),
            None,
            None,
            &upgrade_headers,
        )
        .await;
        assert_eq!(status, 401);
        let expired = token(secret, json!({"sub": "x", "exp": now_secs() - 10}));
        let (status, _) = http_raw(
            "GET",
            &format!("{http_url}?token={expired}"),
            None,
            None,
            &upgrade_headers,
        )
        .await;
        assert_eq!(status, 401);

        // The channels claim limits subscriptions.
        let limited = token(secret, json!({"sub": "u", "channels": ["room:*"]}));
        let mut c = Client::connect_url(&format!("{}?token={limited}", gw.ws_url), false)
            .await
            .unwrap();
        c.subscribe("room:5").await;
        c.send(json!({"type": "subscribe", "channel": "admin", "id": "no"}))
            .await;
        let e = c.recv().await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("channel_not_allowed"), Some("no"))
        );

        // Authorization: Bearer works too, and the connection closes with 1008 when the token
        // expires. Its `exp` (whole seconds) leaves at least 4 s to connect, even on a loaded
        // machine, and the close comes well within the PATIENCE that closed() waits.
        let short = token(secret, json!({"sub": "brief", "exp": now_secs() + 5}));
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                gw.ws_url.as_str(),
            )
            .unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {short}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut brief = Client {
            ws,
            msgpack: false,
            connection: String::new(),
            user: serde_json::Value::Null,
            missed: 0,
        };
        assert_eq!(brief.recv().await["user"], "brief");
        brief.expect_close(1008).await;
    })
    .await;
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("origin");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__SERVER__ALLOWED_ORIGINS", "https://app.example")],
        )
        .await;
        let http_url = gw.ws_url.replace("ws://", "http://");
        let headers = |origin: &'static str| {
            [
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("sec-websocket-version", "13"),
                ("origin", origin),
            ]
        };
        assert_eq!(
            http_raw(
                "GET",
                &http_url,
                None,
                None,
                &headers("https://evil.example")
            )
            .await
            .0,
            403
        );
        assert_eq!(
            http_raw(
                "GET",
                &http_url,
                None,
                None,
                &headers("https://app.example")
            )
            .await
            .0,
            101
        );
    })
    .await;
}

#[tokio::test]
async fn a_frame_over_the_size_limit_closes_with_1009_and_others_are_unaffected() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("toobig");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__MAX_MESSAGE_BYTES", "1024")],
        )
        .await;
        let mut big = Client::connect(&gw).await;
        let mut other = Client::connect(&gw).await;
        big.send(json!({"type": "send", "stream": "chat", "data": "y".repeat(2000), "id": "big"}))
            .await;
        assert_eq!(big.closed().await, Some(1009));
        gw.send(json!({"to": {"connection": other.connection}, "data": "fine"}))
            .await;
        assert_eq!(other.recv().await["data"], "fine");
        eventually("closed as a protocol violation", || async {
            gw.metric("wsbridge_connections_closed_total{reason=\"protocol\"}")
                .await
                == 1.0
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn every_contract_metric_is_exported_with_its_type() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("metricnames");
        let gw = Gateway::start(&redis, &prefix).await;
        // Exercise every path once so that histograms have samples.
        let mut c = Client::connect(&gw).await;
        c.subscribe("m").await;
        gw.send(json!({"to": {"channel": "m"}, "data": 1})).await;
        assert_eq!(c.recv().await["data"], 1);
        c.send(json!({"type": "send", "stream": "chat", "data": 1, "id": "a"}))
            .await;
        assert_eq!(c.recv().await["type"], "ack");
        eventually("delivery counted", || async {
            gw.metric("wsbridge_deliveries_total").await >= 1.0
        })
        .await;
        let (_, text) = http("GET", &format!("{}/metrics", gw.api_url), None, None).await;
        let expected = [
            ("wsbridge_connections", "gauge"),
            ("wsbridge_connections_opened_total", "counter"),
            ("wsbridge_connections_closed_total", "counter"),
            ("wsbridge_inbound_messages_total", "counter"),
            ("wsbridge_inbound_rejected_total", "counter"),
            ("wsbridge_stream_append_seconds", "histogram"),
            ("wsbridge_outbound_published_total", "counter"),
            ("wsbridge_pubsub_received_total", "counter"),
            ("wsbridge_pubsub_filtered_total", "counter"),
            ("wsbridge_fanout_recipients", "histogram"),
            ("wsbridge_filter_seconds", "histogram"),
            ("wsbridge_deliveries_total", "counter"),
            ("wsbridge_delivery_dropped_total", "counter"),
            ("wsbridge_delivery_latency_seconds", "histogram"),
            // Beyond the contract, for operators.
            ("wsbridge_redis_up", "gauge"),
            ("wsbridge_pubsub_up", "gauge"),
            ("wsbridge_pubsub_roundtrip_age_seconds", "gauge"),
            ("wsbridge_pubsub_reconnects_total", "counter"),
            ("wsbridge_redis_errors_total", "counter"),
            ("wsbridge_events_failed_total", "counter"),
            ("wsbridge_send_queue_depth", "histogram"),
            ("wsbridge_received_bytes_total", "counter"),
            ("wsbridge_sent_bytes_total", "counter"),
            ("wsbridge_build_info", "gauge"),
            ("process_cpu_seconds_total", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_max_fds", "gauge"),
            ("process_threads", "gauge"),
            ("process_start_time_seconds", "gauge"),
            ("wsbridge_heap_in_use_bytes", "gauge"),
            ("wsbridge_heap_held_bytes", "gauge"),
        ];
        for (name, kind) in expected {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}")),
                "{name} as {kind} missing:\n{text}"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no help text"
            );
        }
        for labelled in [
            "wsbridge_connections_closed_total{reason=",
            "wsbridge_inbound_messages_total{stream=\"chat\"}",
            "wsbridge_inbound_rejected_total{code=",
            "wsbridge_delivery_dropped_total{reason=",
        ] {
            assert!(text.contains(labelled), "{labelled} missing");
        }
        assert!(gw.metric("wsbridge_stream_append_seconds_count").await >= 1.0);
        assert!(text.contains(&format!(
            "wsbridge_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(gw.metric("wsbridge_received_bytes_total").await > 0.0);
        assert!(gw.metric("wsbridge_sent_bytes_total").await > 0.0);
        let rss = gw.metric("process_resident_memory_bytes").await;
        assert!(rss > 1e6);
        // The allocator's own figures: what it handed out fits in what it holds, which is part
        // of what is resident (the binary's code and stacks are the rest).
        let in_use = gw.metric("wsbridge_heap_in_use_bytes").await;
        let held = gw.metric("wsbridge_heap_held_bytes").await;
        assert!(
            0.0 < in_use && in_use <= held && held < rss * 2.0,
            "heap in use {in_use}, held {held}, RSS {rss}"
        );
        let age = gw.metric("wsbridge_pubsub_roundtrip_age_seconds").await;
        assert!((0.0..2.0).contains(&age), "round trip age {age}");
        assert!(gw.metric("wsbridge_filter_seconds_count").await >= 1.0);
        assert!(gw.metric("wsbridge_delivery_latency_seconds_count").await >= 1.0);
    })
    .await;
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    use std::sync::mpsc::RecvTimeoutError;
    let empty = std::env::temp_dir().join(format!("{}.toml", unique_prefix("empty")));
    std::fs::write(&empty, "").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsbridge"))
        .arg("--config")
        .arg(&empty)
        .env("WSBRIDGE__LOG__FORMAT", "json")
        .env("WSBRIDGE__SERVER__LISTEN", "127.0.0.1:0")
        .env("WSBRIDGE__SERVER__API_LISTEN", "127.0.0.1:0")
        .env(
            "WSBRIDGE__REDIS__URL",
            format!("redis://127.0.0.1:{}", free_port()),
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Every line is a JSON object; the Redis link may log before the listening line does. The
    // lines are read on a thread, so that a replica that stops logging fails the test after
    // PATIENCE instead of blocking it.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut events = Vec::new();
    let listening = loop {
        let line = match rx.recv_timeout(PATIENCE) {
            Ok(line) => line.unwrap(),
            Err(RecvTimeoutError::Timeout) => {
                break Err(format!("no log line within {PATIENCE:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => break Err("the replica exited".into()),
        };
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if event["message"] == "listening" {
            break Ok(event);
        }
        events.push(event);
        if events.len() >= 20 {
            break Err("20 lines".into());
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&empty);
    let event = listening.unwrap_or_else(|why| panic!("no listening line ({why}): {events:?}"));
    assert_eq!(event["level"], "INFO");
    assert!(event["public"].as_str().unwrap().starts_with("127.0.0.1:"));
}

/// The replica's keepalive sweep pings every connection once per `ping_interval_seconds`,
/// counted from when it connected: not at once, and not more often.
#[tokio::test]
async fn every_connection_is_pinged_once_per_interval_from_when_it_connected() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("pings");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__SERVER__PING_INTERVAL_SECONDS", "2")],
        )
        .await;
        let mut readers = Vec::new();
        // Connected at different moments: each keeps its own phase.
        for n in 0..4u64 {
            tokio::time::sleep(Duration::from_millis(300 * n)).await;
            let mut c = Client::connect(&gw).await;
            let connected = std::time::Instant::now();
            readers.push(tokio::spawn(async move {
                use futures_util::StreamExt;
                let mut pings = vec![connected];
                while pings.len() < 4 {
                    match c.ws.next().await {
                        Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => {
                            pings.push(std::time::Instant::now())
                        }
                        Some(Ok(_)) => {}
                        other => panic!("connection ended before its pings: {other:?}"),
                    }
                }
                pings
            }));
        }
        for reader in readers {
            let pings = reader.await.unwrap();
            // The first gap is from the connect (whole seconds: at least 1 s after it).
            for (i, pair) in pings.windows(2).enumerate() {
                let gap = pair[1] - pair[0];
                let least = if i == 0 { 500 } else { 1200 };
                assert!(
                    gap > Duration::from_millis(least) && gap < Duration::from_secs(5),
                    "ping {i} {gap:?} after the one before (or the connect) with a 2 s interval"
                );
            }
        }
    })
    .await;
}
