//! Operations the docs promise that no other test covered: the drain on SIGTERM, start-up
//! failures, the backend API's header timeout and by-user calls, user routes and stream trimming,
//! three metrics, and both kinds of 503 a `POST /send` can answer.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::common::*;

/// `host:port` of a `ws://` or `http://` URL.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap().to_string()
}

/// The next frame, which must be a `message`; returns its `data`.
async fn next_data(c: &mut Client) -> Value {
    let frame = c.recv().await;
    assert_eq!(frame["type"], "message", "expected a message: {frame}");
    frame["data"].clone()
}

/// Closes the client's side with 1000 and waits for the server's answering close frame.
async fn leave(c: &mut Client) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    c.ws.close(Some(frame)).await.unwrap();
    assert_eq!(c.closed().await, Some(1000));
}

/// Reads what the server sends on a raw TCP connection until it closes it (EOF or reset), within
/// [`PATIENCE`]; returns the bytes and when the close was seen.
async fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the server kept the connection open");
    (got, Instant::now())
}

/// Waits until the gateway has accepted the connection from `client_port` to its `port` and read
/// what was sent on it: in /proc/net/tcp the server side of the connection exists and has no
/// unread bytes (`rx_queue`), and the listening socket's accept queue is empty.
async fn wait_read(port: u16, client_port: u16) {
    let rows = || -> Vec<(u16, u16, String, u64)> {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let local = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
                let remote = u16::from_str_radix(f[2].rsplit(':').next()?, 16).ok()?;
                let rx = u64::from_str_radix(f[4].split(':').nth(1)?, 16).ok()?;
                Some((local, remote, f[3].to_string(), rx))
            })
            .collect()
    };
    eventually("the gateway read the request so far", || async {
        let rows = rows();
        let read = rows
            .iter()
            .any(|(l, r, st, rx)| *l == port && *r == client_port && st == "01" && *rx == 0);
        let backlog = rows
            .iter()
            .filter(|(l, _, st, _)| *l == port && st == "0A")
            .map(|(_, _, _, rx)| *rx)
            .sum::<u64>();
        read && backlog == 0
    })
    .await;
}

/// Runs the gateway binary with `config` until it exits (it must within [`PATIENCE`]); returns
/// its exit code and standard error.
fn run_to_exit(config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = scratch_dir();
    let path = dir.join("wsbridge.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsbridge"));
    cmd.arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    (status.code(), stderr)
}

/// A WebSocket upgrade request for `/ws` on `host`.
fn upgrade_request(host: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Drain
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_drains_readyz_503_refuses_upgrades_and_new_sends_acks_taken_sends_before_1012_exits_0(
) {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("drain");
        let secret = "s";
        // Appends sent while Redis is frozen must wait for the thaw rather than time out.
        let mut gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__REDIS__COMMAND_TIMEOUT_MS", "30000"),
                ("WSBRIDGE__SERVER__SHUTDOWN_DRAIN_SECONDS", "30"),
                ("WSBRIDGE__AUTH__JWT_SECRET", secret),
            ],
        )
        .await;
        // The replica the client moves to.
        let other =
            Gateway::start_with(&redis, &prefix, &[("WSBRIDGE__AUTH__JWT_SECRET", secret)]).await;
        assert_eq!(gw.readyz().await, (200, "ready\n".to_string()));
        let mut c = Client::connect_as(&gw, secret, "dana", false).await;
        // A connection whose upgrade request is under way when the signal comes: half of it was
        // read before, the rest arrives after.
        let public = host_port(&gw.ws_url);
        let request = upgrade_request(&public);
        let (head, tail) = request.split_at(request.len() / 2);
        let mut late = TcpStream::connect(&public).await.unwrap();
        late.write_all(head.as_bytes()).await.unwrap();
        let public_port: u16 = public.rsplit(':').next().unwrap().parse().unwrap();
        wait_read(public_port, late.local_addr().unwrap().port()).await;

        // Sends taken before the signal: Redis does not answer them until the thaw.
        redis.freeze(true);
        for i in 0..5 {
            c.send(json!({"type": "send", "stream": "chat", "data": i, "id": format!("d{i}")}))
                .await;
        }
        // The reader handles frames in order: once this refusal (no Redis needed) is back, the five
        // sends are in the append queue.
        c.send(json!({"type": "send", "stream": "not-configured", "data": 0, "id": "fence"}))
            .await;
        let fence = c.recv().await;
        assert_eq!(
            (fence["id"].as_str(), fence["code"].as_str()),
            (Some("fence"), Some("stream_not_allowed")),
            "{fence}"
        );

        gw.signal("-TERM");
        // /readyz says why it is not ready: the drain, not the frozen Redis.
        eventually("readyz 503 shutting down", || async {
            gw.readyz().await == (503, "shutting down\n".to_string())
        })
        .await;
        // The connection stays open while its sends wait for Redis, but takes no new send: this
        // one is refused, saying it was not stored.
        c.send(json!({"type": "send", "stream": "chat", "data": "late", "id": "late"}))
            .await;
        let refused = c.recv().await;
        assert_eq!(
            (
                refused["type"].as_str(),
                refused["id"].as_str(),
                refused["code"].as_str()
            ),
            (Some("error"), Some("late"), Some("shutting_down")),
            "{refused}"
        );
        assert!(
            refused["message"].as_str().unwrap().contains("not stored"),
            "{refused}"
        );
        // The accepted connection's upgrade is refused with 503 ...
        late.write_all(tail.as_bytes()).await.unwrap();
        let (answer, _) = read_until_closed(&mut late).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("\"shutting_down\""), "{answer}");
        // ... and a new connection is not even accepted: the listener is closed.
        let refused = TcpStream::connect(&public).await;
        assert_eq!(
            refused.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        // Still waiting for Redis: the replica still runs, the client is still connected.
        assert_eq!(gw.readyz().await, (503, "shutting down\n".to_string()));
        assert!(
            !gw.log_text()
                .contains(&format!("connection closed connection={}", c.connection)),
            "{}",
            gw.log_text()
        );

        // Redis answers within the drain: every send taken is acked with its entry, in order,
        // and only then does the 1012 close frame come.
        redis.freeze(false);
        let (frames, closed) = c.frames_until_close().await;
        assert_eq!(closed, Closed::Code(1012), "after {frames:?}");
        let acked: Vec<(&str, &str)> = frames
            .iter()
            .map(|f| {
                assert_eq!(f["type"], "ack", "{f}");
                (f["id"].as_str().unwrap(), f["entry"].as_str().unwrap())
            })
            .collect();
        let status = gw.wait_exit();
        assert_eq!(status.code(), Some(0), "{}", gw.log_text());
        // Stored once each, and those are the entries the acks named.
        let mut conn = redis.conn().await;
        let stored = xrange(&mut conn, &format!("{prefix}:in:chat")).await;
        let stored: Vec<(&str, &str)> = stored
            .iter()
            .map(|(entry, f)| (text(&f["id"]), entry.as_str()))
            .collect();
        assert_eq!(acked, stored);
        let ids: Vec<&str> = stored.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, ["d0", "d1", "d2", "d3", "d4"]);
        let events = xrange(&mut conn, &format!("{prefix}:events")).await;
        let disconnect = events
            .iter()
            .find(|(_, f)| text(&f["event"]) == "disconnect")
            .expect("a disconnect event");
        assert_eq!(text(&disconnect.1["code"]), "1012");
        assert_eq!(text(&disconnect.1["connection"]), c.connection);

        // The refused send, resent on another replica, is stored there (once).
        let mut moved = Client::connect_as(&other, secret, "dana", false).await;
        moved
            .send(json!({"type": "send", "stream": "chat", "data": "late", "id": "late"}))
            .await;
        let ack = moved.recv().await;
        assert_eq!(
            (ack["type"].as_str(), ack["id"].as_str()),
            (Some("ack"), Some("late")),
            "{ack}"
        );
        let stored = xrange(&mut conn, &format!("{prefix}:in:chat")).await;
        assert_eq!(stored.len(), 6);
        assert_eq!(stored[5].0, ack["entry"].as_str().unwrap());
    })
    .await;
}

#[tokio::test]
async fn a_drain_whose_appends_cannot_finish_answers_them_unconfirmed_before_1012_within_the_deadline(
) {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("drain-deadline");
        // Redis stays frozen and commands would wait 60 s: only the drain deadline ends the wait.
        let mut gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__REDIS__COMMAND_TIMEOUT_MS", "60000"),
                ("WSBRIDGE__SERVER__SHUTDOWN_DRAIN_SECONDS", "2"),
            ],
        )
        .await;
        let mut c = Client::connect(&gw).await;
        // The appender is idle (the connect event stored) before Redis freezes, so the send goes
        // out at once and the usual answer is "may have been stored".
        let mut conn = redis.conn().await;
        let events = format!("{prefix}:events");
        eventually("the connect event stored", || {
            let (mut conn, events) = (conn.clone(), events.clone());
            async move { !xrange(&mut conn, &events).await.is_empty() }
        })
        .await;
        redis.freeze(true);
        c.send(json!({"type": "send", "stream": "chat", "data": 1, "id": "stuck"}))
            .await;
        c.send(json!({"type": "send", "stream": "not-configured", "data": 0, "id": "fence"}))
            .await;
        assert_eq!(c.recv().await["id"], "fence");

        let signalled = Instant::now();
        gw.signal("-TERM");
        // The send Redis never answered is answered before the close frame: not confirmed, may
        // have been stored (the XADD went out), resend with the same id.
        let (frames, closed) = c.frames_until_close().await;
        let closed_after = signalled.elapsed();
        assert_eq!(closed, Closed::Code(1012), "after {frames:?}");
        assert_eq!(frames.len(), 1, "{frames:?}");
        let answer = &frames[0];
        assert_eq!(
            (
                answer["type"].as_str(),
                answer["id"].as_str(),
                answer["code"].as_str()
            ),
            (Some("error"), Some("stuck"), Some("redis_unavailable")),
            "{answer}"
        );
        // "May have been stored" when the XADD went out; "not stored" when the append was still
        // queued behind another one when the drain gave up (then it must truly not be there).
        let message = answer["message"].as_str().unwrap();
        let not_stored = message.contains("not stored");
        assert!(
            not_stored || message.contains("may have been stored"),
            "{answer}"
        );
        let status = gw.wait_exit();
        let took = signalled.elapsed();
        redis.freeze(false);
        if not_stored {
            let chat = xrange(&mut conn, &format!("{prefix}:in:chat")).await;
            assert!(
                chat.iter()
                    .all(|(_, f)| f.get("id").map(|v| text(v)) != Some("stuck")),
                "told not stored, but it is in the stream"
            );
        }
        assert_eq!(status.code(), Some(0), "{}", gw.log_text());
        // The client was closed within the deadline, and the whole shutdown honoured it too: the
        // Redis health check and the background tasks get no time beyond it.
        assert!(
            closed_after < Duration::from_secs(2),
            "closed after {closed_after:?}"
        );
        assert!(took >= Duration::from_millis(900), "exited after {took:?}");
        assert!(took < Duration::from_millis(2800), "exited after {took:?}");
        assert!(
            gw.log_text().contains("answered as not confirmed"),
            "{}",
            gw.log_text()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_listener_that_cannot_bind_exits_1_naming_the_key_and_address() {
    deadline(TEST_DEADLINE, async {
        // No Redis is needed: the listeners are bound before Redis is first used.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let config = base_config("redis://127.0.0.1:1", &unique_prefix("bind"));
        for key in ["LISTEN", "API_LISTEN"] {
            let var = format!("WSBRIDGE__SERVER__{key}");
            let (code, stderr) = run_to_exit(&config, &[(&var, &addr)]);
            assert_eq!(code, Some(1), "{stderr}");
            let named = format!("server.{} {addr}", key.to_lowercase());
            assert!(stderr.contains(&named), "no `{named}` in: {stderr}");
            assert!(stderr.contains("in use"), "{stderr}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_bad_replica_id_is_refused_at_start_naming_the_key() {
    deadline(TEST_DEADLINE, async {
        let config = base_config("redis://127.0.0.1:1", &unique_prefix("replica-id"));
        let too_long = "r".repeat(65);
        for bad in ["has space", "dots.are.separators", "é", too_long.as_str()] {
            let (code, stderr) = run_to_exit(&config, &[("WSBRIDGE__SERVER__REPLICA_ID", bad)]);
            assert_eq!(code, Some(2), "`{bad}`: {stderr}");
            assert!(stderr.contains("server.replica_id"), "`{bad}`: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        }
        // The longest valid id (64 letters, digits, `-`, `_`) starts and names the connections.
        let good = format!("a-b_{}", "9".repeat(60));
        let prefix = unique_prefix("replica-id-ok");
        let gw = Gateway::spawn(
            &base_config("redis://127.0.0.1:1", &prefix),
            &prefix,
            &[("WSBRIDGE__SERVER__REPLICA_ID", &good)],
        );
        let c = Client::connect(&gw).await;
        assert!(
            c.connection.starts_with(&format!("{good}.")),
            "{}",
            c.connection
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Backend API
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_api_listener_cuts_a_client_that_sends_no_or_half_a_request_header() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("api-slowloris");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__HANDSHAKE_TIMEOUT_SECONDS", "1")],
        )
        .await;
        let counted = "wsbridge_limit_refusals_total{limit=\"handshake_timeout\"}";
        assert_eq!(gw.metric(counted).await, 0.0);
        let api = host_port(&gw.api_url);
        let half: &[u8] = b"POST /send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
        for (n, sent) in [&b""[..], half].into_iter().enumerate() {
            let opened = Instant::now();
            let mut slow = TcpStream::connect(&api).await.unwrap();
            slow.write_all(sent).await.unwrap();
            let (answer, at) = read_until_closed(&mut slow).await;
            // Cut after the timeout, not before, and without an answer to a request never made.
            let waited = at - opened;
            assert!(waited >= Duration::from_millis(950), "cut after {waited:?}");
            assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
            eventually("the cut is counted", || async {
                gw.metric(counted).await == (n + 1) as f64
            })
            .await;
        }
        // A backend that sends its request in time is served as usual.
        let (status, _) = gw
            .post("/send", &json!({"to": {"all": true}, "data": 1}))
            .await;
        assert_eq!(status, 202);
        assert_eq!(gw.metric(counted).await, 2.0);
    })
    .await;
}

/// Two replicas with authentication on, as `a` and `b`.
async fn two_replicas_with_auth(redis: &Redis, prefix: &str, secret: &str) -> (Gateway, Gateway) {
    let env = [("WSBRIDGE__AUTH__JWT_SECRET", secret)];
    let a = Gateway::start_with(redis, prefix, &env).await;
    let b = Gateway::start_with(redis, prefix, &env).await;
    (a, b)
}

/// Alice twice on `a` (once in MessagePack) and once on `b`; bob once on each.
async fn alice_and_bob(a: &Gateway, b: &Gateway, secret: &str) -> (Vec<Client>, Client, Client) {
    let alice = vec![
        Client::connect_as(a, secret, "alice", false).await,
        Client::connect_as(a, secret, "alice", true).await,
        Client::connect_as(b, secret, "alice", false).await,
    ];
    let bob_a = Client::connect_as(a, secret, "bob", false).await;
    let bob_b = Client::connect_as(b, secret, "bob", false).await;
    (alice, bob_a, bob_b)
}

#[tokio::test]
async fn disconnect_by_user_closes_each_of_their_connections_on_every_replica_with_4000() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("disconnect-user");
        let secret = "s";
        let (a, b) = two_replicas_with_auth(&redis, &prefix, secret).await;
        let (mut alice, mut bob_a, mut bob_b) = alice_and_bob(&a, &b, secret).await;

        // No code given: the documented default, 4000.
        let (status, answer) = b.post("/disconnect", &json!({"user": "alice"})).await;
        assert_eq!((status, answer), (202, json!({"accepted": 1})));
        for c in &mut alice {
            assert_eq!(c.closed().await, Some(4000));
            let _ = c.ws.flush().await; // our answer to the close frame: the replica need not wait
        }
        let backend = "wsbridge_connections_closed_total{reason=\"backend\"}";
        eventually("two closes by a backend on a, one on b", || async {
            (a.metric(backend).await, b.metric(backend).await) == (2.0, 1.0)
        })
        .await;
        // Another user's connections on the same replicas stay open.
        a.send(json!({"to": {"user": "bob"}, "data": "still here"}))
            .await;
        assert_eq!(next_data(&mut bob_a).await, "still here");
        assert_eq!(next_data(&mut bob_b).await, "still here");
    })
    .await;
}

#[tokio::test]
async fn unsubscribe_by_user_takes_each_of_their_connections_out_of_the_channel_everywhere() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("unsubscribe-user");
        let secret = "s";
        let (a, b) = two_replicas_with_auth(&redis, &prefix, secret).await;
        let (mut alice, mut bob_a, mut bob_b) = alice_and_bob(&a, &b, secret).await;
        for c in alice.iter_mut().chain([&mut bob_a, &mut bob_b]) {
            c.subscribe("news").await;
        }

        let (status, answer) = a
            .post("/unsubscribe", &json!({"user": "alice", "channel": "news"}))
            .await;
        assert_eq!((status, answer), (202, json!({"accepted": 1})));
        for c in &mut alice {
            let left = c.recv().await;
            assert_eq!(left["type"], "unsubscribed", "{left}");
            assert_eq!(left["channel"], "news", "{left}");
            assert!(
                left["id"].is_null(),
                "a backend's unsubscribe has no id: {left}"
            );
        }
        // A message to the channel reaches bob on both replicas ...
        b.send(json!({"to": {"channel": "news"}, "data": "headline"}))
            .await;
        assert_eq!(next_data(&mut bob_a).await, "headline");
        assert_eq!(next_data(&mut bob_b).await, "headline");
        // ... and by then each replica has handled it for alice too: a message to her sent after it
        // is her next frame, so the headline never came.
        b.send(json!({"to": {"user": "alice"}, "data": "after"}))
            .await;
        for c in &mut alice {
            assert_eq!(next_data(c).await, "after");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Routing and trimming
// ---------------------------------------------------------------------------------------------

/// Redis time (ms) and the replicas listed for a user with their scores (expiry, ms), read in
/// one step so they agree.
async fn user_routes(conn: &mut RedisConn, key: &str) -> (u64, Vec<(String, u64)>) {
    let script = "local t = redis.call('TIME')\n\
                  return {t[1] * 1000 + math.floor(t[2] / 1000), \
                  redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}";
    let (now, listed): (u64, Vec<(String, u64)>) = redis::cmd("EVAL")
        .arg(script)
        .arg(1)
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    (now, listed)
}

fn score(listed: &[(String, u64)], replica: &str) -> Option<u64> {
    listed.iter().find(|(r, _)| r == replica).map(|(_, s)| *s)
}

#[tokio::test]
async fn a_user_route_is_refreshed_while_connected_and_expires_once_not_refreshed() {
    deadline(TEST_DEADLINE, async {
        // Interest routing keeps these routes; the test sets it in every pass.
        let redis = Redis::start();
        let prefix = unique_prefix("user-route");
        let secret = "s";
        let env = |id: &'static str| {
            [
                ("WSBRIDGE__OUTBOUND__ROUTING", "interest"),
                ("WSBRIDGE__OUTBOUND__USER_ROUTE_TTL_SECONDS", "3"),
                ("WSBRIDGE__AUTH__JWT_SECRET", secret),
                ("WSBRIDGE__SERVER__REPLICA_ID", id),
            ]
        };
        let a = Gateway::start_with(&redis, &prefix, &env("ra")).await;
        let b = Gateway::start_with(&redis, &prefix, &env("rb")).await;
        // Alice on both replicas; carol on a only.
        let mut alice_a = Client::connect_as(&a, secret, "alice", false).await;
        let _alice_b = Client::connect_as(&b, secret, "alice", false).await;
        let mut carol = Client::connect_as(&a, secret, "carol", false).await;
        let alice = format!("{prefix}:user-replicas:alice");
        let carols = format!("{prefix}:user-replicas:carol");
        let mut conn = redis.conn().await;

        // Each replica listed itself before the welcome, for the TTL.
        let (now, listed) = user_routes(&mut conn, &alice).await;
        let first_a = score(&listed, "ra").expect("ra listed");
        assert!(score(&listed, "rb").is_some(), "{listed:?}");
        assert!(first_a > now && first_a <= now + 3_000, "{now} {listed:?}");
        let (_, listed) = user_routes(&mut conn, &carols).await;
        let mut last_carol = score(&listed, "ra").expect("ra listed for carol");

        // b dies, so nothing refreshes its entry for alice any more; carol leaves a, so nothing
        // refreshes a's entry for her.
        drop(b);
        leave(&mut carol).await;
        let (_, listed) = user_routes(&mut conn, &alice).await;
        let last_b = score(&listed, "rb").expect("rb still listed right after the crash");
        // b stays listed for alice until its expiry (a's next refresh then removes it), while a's
        // entry is refreshed past its first expiry; carol's routes (the whole key) expire with the
        // TTL of a's last refresh for her, not before.
        let mut last_a = first_a;
        let (mut b_gone, mut carol_gone) = (false, false);
        let deadline = Instant::now() + PATIENCE;
        while !(b_gone && carol_gone) {
            let (now, listed) = user_routes(&mut conn, &alice).await;
            let a_score = score(&listed, "ra").expect("ra stays listed while alice is connected");
            assert!(
                a_score > now,
                "ra expired while connected: {now} {listed:?}"
            );
            last_a = last_a.max(a_score);
            if !b_gone && score(&listed, "rb").is_none() {
                assert!(
                    now >= last_b,
                    "rb dropped before its expiry: {now} < {last_b}"
                );
                b_gone = true;
            }
            let (now, listed) = user_routes(&mut conn, &carols).await;
            match score(&listed, "ra") {
                Some(s) => last_carol = last_carol.max(s),
                None if !carol_gone => {
                    assert!(listed.is_empty(), "{listed:?}");
                    // Key expiry and the score come from the same Redis clock, a moment apart.
                    assert!(
                        now + 5 >= last_carol,
                        "gone before expiry: {now} < {last_carol}"
                    );
                    carol_gone = true;
                }
                None => {}
            }
            assert!(
                Instant::now() < deadline,
                "routes did not expire: rb {b_gone}, carol {carol_gone}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(last_a > first_a, "ra was never refreshed for alice");
        // Messages to alice now go to a only, and reach her.
        a.send(json!({"to": {"user": "alice"}, "data": "hi"})).await;
        assert_eq!(next_data(&mut alice_a).await, "hi");
    })
    .await;
}

/// Redis' `stream-node-max-entries`: `MAXLEN ~ N` trims whole nodes of this many entries.
async fn node_max_entries(redis: &Redis) -> u64 {
    let mut conn = redis.node_conns().await.remove(0);
    let (_, value): (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("stream-node-max-entries")
        .query_async(&mut conn)
        .await
        .unwrap();
    value.parse().unwrap()
}

async fn xlen(conn: &mut RedisConn, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test]
async fn inbound_and_events_streams_are_trimmed_to_near_their_max_len() {
    deadline(TEST_DEADLINE, async {
        const MAX: u64 = 10;
        const SENDS: u64 = 250;
        let redis = Redis::start();
        let prefix = unique_prefix("trim");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__INBOUND__STREAM_MAX_LEN", "10"),
                ("WSBRIDGE__INBOUND__EVENTS_MAX_LEN", "10"),
                ("WSBRIDGE__LIMITS__CLIENT_MESSAGES_PER_SECOND", "100000"),
                ("WSBRIDGE__LIMITS__CLIENT_BURST_MESSAGES", "100000"),
            ],
        )
        .await;
        // `MAXLEN ~ N` removes whole nodes only: a stream keeps at least N entries and fewer than
        // N + one node's worth. Without trimming it would keep everything.
        let node = node_max_entries(&redis).await;
        assert!(
            SENDS > MAX + node,
            "the test must send more than one node beyond the bound"
        );
        let mut conn = redis.conn().await;

        let mut c = Client::connect(&gw).await;
        // Half the sends carry an id (appended by the once-per-id script), half not (plain XADD).
        let id = |i: u64| (i % 2 == 0).then(|| format!("s{i}"));
        for i in 0..SENDS {
            let mut frame = json!({"type": "send", "stream": "chat", "data": i});
            if let Some(id) = id(i) {
                frame["id"] = json!(id);
            }
            c.send(frame).await;
        }
        for i in 0..SENDS {
            let ack = c.recv().await;
            assert_eq!(
                (ack["type"].as_str(), ack["id"].as_str()),
                (Some("ack"), id(i).as_deref()),
                "{ack}"
            );
        }
        let key = format!("{prefix}:in:chat");
        let len = xlen(&mut conn, &key).await;
        assert!((MAX..MAX + node).contains(&len), "{key} holds {len}");
        // What is kept is the newest entries, in order.
        let kept: Vec<u64> = xrange(&mut conn, &key)
            .await
            .iter()
            .map(|(_, f)| text(&f["data"]).parse().unwrap())
            .collect();
        assert_eq!(kept, (SENDS - len..SENDS).collect::<Vec<_>>());

        // Lifecycle events: a subscribe and an unsubscribe each, then the disconnect, last.
        for i in 0..SENDS / 2 {
            let channel = format!("ch{i}");
            c.send(json!({"type": "subscribe", "channel": channel}))
                .await;
            c.send(json!({"type": "unsubscribe", "channel": channel}))
                .await;
        }
        for _ in 0..SENDS {
            let reply = c.recv().await;
            assert!(
                reply["type"] == "subscribed" || reply["type"] == "unsubscribed",
                "{reply}"
            );
        }
        let connection = c.connection.clone();
        leave(&mut c).await;
        let events = format!("{prefix}:events");
        // Appends keep their order, so once the disconnect is the last entry every event is in.
        eventually("the disconnect event is stored", || async {
            let mut conn = conn.clone();
            let entries = xrange(&mut conn, &events).await;
            entries.last().is_some_and(|(_, f)| {
                text(&f["event"]) == "disconnect" && text(&f["connection"]) == connection
            })
        })
        .await;
        let len = xlen(&mut conn, &events).await;
        assert!((MAX..MAX + node).contains(&len), "{events} holds {len}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_command_that_times_out_on_a_frozen_redis_is_counted_as_a_timeout() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("timeouts");
        // Health checks only at start, so that the one command the test sends while Redis is
        // frozen is the only one that can fail.
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__REDIS__HEALTH_INTERVAL_MS", "600000"),
                ("WSBRIDGE__REDIS__UNHEALTHY_AFTER_MS", "1200000"),
            ],
        )
        .await;
        let errors = |kind: &str| format!("wsbridge_redis_errors_total{{kind=\"{kind}\"}}");
        for kind in ["timeout", "connection", "server"] {
            assert_eq!(gw.metric(&errors(kind)).await, 0.0, "{kind}");
        }

        redis.freeze(true);
        let (status, answer) = gw
            .post("/send", &json!({"to": {"all": true}, "data": 1}))
            .await;
        redis.freeze(false);
        assert_eq!(status, 503, "{answer}");
        assert_eq!(gw.metric(&errors("timeout")).await, 1.0);
        assert_eq!(gw.metric(&errors("connection")).await, 0.0);
        assert_eq!(gw.metric(&errors("server")).await, 0.0);
    })
    .await;
}

#[tokio::test]
async fn an_undecodable_pubsub_payload_is_dropped_as_bad_payload() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("bad-payload");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect(&gw).await;
        let bad = "wsbridge_delivery_dropped_total{reason=\"bad_payload\"}";
        assert_eq!(gw.metric(bad).await, 0.0);

        // Someone else publishes on the gateway's broadcast channel: not a batch; a batch whose
        // item names no recipient; a batch of another format version; a payload in the hand
        // framing of the versions before the typed envelope (offsets line, then the batch).
        let publish = if on_cluster() { "SPUBLISH" } else { "PUBLISH" };
        let mut conn = redis.conn().await;
        let batch = |v: u32, to: Value| {
            json!({"batch": {"v": v, "offsets": [], "ts": 1, "items": [
                {"send": {"to": to, "data": 1}}
            ]}})
            .to_string()
        };
        let junk = [
            "not json at all".to_string(),
            batch(1, json!({})),
            batch(2, json!("all")),
            "[]\n{\"ts\":1,\"items\":[{\"op\":\"send\",\"to\":{\"all\":true},\"data\":1}]}"
                .to_string(),
        ];
        for (n, payload) in junk.iter().enumerate() {
            let receivers: i64 = redis::cmd(publish)
                .arg(format!("{prefix}:broadcast"))
                .arg(payload)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(receivers, 1, "the replica listens on the broadcast channel");
            eventually("the payload is counted as bad", || async {
                gw.metric(bad).await == (n + 1) as f64
            })
            .await;
        }
        // The replica carries on; the client got nothing from the junk.
        gw.send(json!({"to": {"all": true}, "data": "fine"})).await;
        assert_eq!(next_data(&mut c).await, "fine");
        assert_eq!(gw.metric(bad).await, junk.len() as f64);
    })
    .await;
}

#[tokio::test]
async fn messages_still_queued_when_a_connection_ends_are_counted_as_connection_closed() {
    deadline(TEST_DEADLINE, async {
        const MESSAGES: usize = 96;
        const PER_CALL: usize = 8;
        let redis = Redis::start();
        let prefix = unique_prefix("closed-drop");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__API__MAX_BODY_BYTES", "8388608")],
        )
        .await;
        let closed = "wsbridge_delivery_dropped_total{reason=\"connection_closed\"}";
        let full = "wsbridge_delivery_dropped_total{reason=\"queue_full\"}";
        assert_eq!(gw.metric(closed).await, 0.0);
        // A client that stops reading, and one that reads.
        let stalled = Client::connect(&gw).await;
        let mut reader = Client::connect(&gw).await;
        // 24 MB for the stalled client: far more than loopback socket buffers hold, so most of it
        // waits in its send queue (4096 messages: nothing is dropped as queue_full).
        let big = "x".repeat(250_000);
        for _ in 0..MESSAGES / PER_CALL {
            let batch: Vec<Value> = (0..PER_CALL)
                .map(|_| json!({"to": {"connection": stalled.connection}, "data": big}))
                .collect();
            gw.send(json!(batch)).await;
        }
        // Payloads reach the replica in order: once this arrives, every big message was queued.
        gw.send(json!({"to": {"connection": reader.connection}, "data": "fence"}))
            .await;
        assert_eq!(next_data(&mut reader).await, "fence");
        let delivered_before = gw.metric("wsbridge_deliveries_total").await;

        // The stalled client goes away with unread data (a reset): what it never got is counted.
        drop(stalled);
        eventually("undelivered messages counted", || async {
            gw.metric(closed).await > 0.0
        })
        .await;
        eventually("the connection is gone", || async {
            gw.metric("wsbridge_connections").await == 1.0
        })
        .await;
        let dropped = gw.metric(closed).await;
        let delivered = gw.metric("wsbridge_deliveries_total").await;
        assert_eq!(gw.metric(full).await, 0.0);
        // Each message was written (counted once its burst is flushed), counted as dropped, or
        // lost with a burst the failed socket never took; never counted twice (+1: the fence).
        assert!(
        delivered + dropped <= (MESSAGES + 1) as f64,
        "delivered {delivered} (of which {delivered_before} before the reset) + dropped {dropped}"
    );
        // Socket buffers took a few MB at most (the kernel caps the send buffer at 4 MiB, and a
        // receive buffer does not grow while nothing reads it): most of the 24 MB was still queued.
        assert!(dropped >= (MESSAGES / 2) as f64, "only {dropped} counted");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The two 503s of POST /send
// ---------------------------------------------------------------------------------------------

/// A channel's history as a backend reads it: each entry's `data`, parsed, in order.
async fn history_data(redis: &Redis, prefix: &str, channel: &str) -> Vec<Value> {
    let mut conn = redis.conn().await;
    xrange(&mut conn, &format!("{prefix}:history:{{{channel}}}"))
        .await
        .iter()
        .map(|(_, f)| serde_json::from_slice(&f["data"]).unwrap())
        .collect()
}

/// Freezes Redis around one `POST /send` so that Redis gets the call but the answer times out;
/// returns the 503's message.
async fn send_into_frozen_redis(redis: &Redis, gw: &Gateway, body: &Value) -> String {
    redis.freeze(true);
    let (status, answer) = gw.post("/send", body).await;
    redis.freeze(false);
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "redis_unavailable", "{answer}");
    answer["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_send_that_may_have_been_delivered_arrives_and_its_blind_retry_is_detectable() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("maybe-delivered");
        let gw = Gateway::spawn(&with_history(&redis, &prefix, 100), &prefix, &[]);
        gw.wait_ready().await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("room:amb").await;
        let send = |id: &str| json!({"to": {"channel": "room:amb"}, "data": {"id": id}});
        // A first message gives the replica an offset to catch up from should its pub/sub link
        // drop while Redis is frozen (a channel it never delivered on is not caught up).
        gw.send(send("0")).await;
        assert_eq!(next_data(&mut c).await, json!({"id": "0"}));

        // Redis takes the call but answers after the gateway gave up on it.
        let message = send_into_frozen_redis(&redis, &gw, &send("a")).await;
        assert!(message.contains("may have been delivered"), "{message}");
        // After the thaw Redis runs it: the client gets the message.
        let first = c.recv().await;
        assert_eq!(
            (first["type"].as_str(), &first["data"]),
            (Some("message"), &json!({"id": "a"})),
            "{first}"
        );
        // A backend that retries blindly sends it twice, and that shows: a second offset, and two
        // entries in the history.
        gw.wait_ready().await;
        let (status, answer) = gw.post("/send", &send("a")).await;
        assert_eq!(status, 202, "{answer}");
        let second = c.recv().await;
        assert_eq!(second["data"], json!({"id": "a"}), "{second}");
        assert_eq!(answer["offsets"][0], second["offset"]);
        assert_ne!(first["offset"], second["offset"]);
        assert_eq!(
            history_data(&redis, &prefix, "room:amb").await,
            [json!({"id": "0"}), json!({"id": "a"}), json!({"id": "a"})]
        );

        // A backend that looks the message up in the history before retrying sends it once.
        let message = send_into_frozen_redis(&redis, &gw, &send("b")).await;
        assert!(message.contains("may have been delivered"), "{message}");
        let got = c.recv().await;
        assert_eq!(got["data"], json!({"id": "b"}), "{got}");
        gw.wait_ready().await;
        let history = history_data(&redis, &prefix, "room:amb").await;
        assert!(history.contains(&json!({"id": "b"})), "{history:?}");
        // (found: no retry) The next message is the next send, not a copy of "b".
        gw.send(send("c")).await;
        assert_eq!(next_data(&mut c).await, json!({"id": "c"}));
        assert_eq!(
            history_data(&redis, &prefix, "room:amb").await,
            [
                json!({"id": "0"}),
                json!({"id": "a"}),
                json!({"id": "a"}),
                json!({"id": "b"}),
                json!({"id": "c"})
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn a_send_answered_nothing_was_sent_is_never_delivered() {
    deadline(TEST_DEADLINE, async {
        let mut redis = Redis::start();
        let prefix = unique_prefix("nothing-sent");
        let gw = Gateway::start(&redis, &prefix).await;
        let mut c = Client::connect(&gw).await;
        c.subscribe("plain").await;

        redis.kill();
        eventually("readyz 503 once Redis is gone", || async {
            gw.readyz().await.0 == 503
        })
        .await;
        let (status, answer) = gw
            .post(
                "/send",
                &json!({"to": {"channel": "plain"}, "data": "lost"}),
            )
            .await;
        assert_eq!(status, 503, "{answer}");
        assert_eq!(answer["error"]["code"], "redis_unavailable", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("nothing was sent"), "{answer}");

        // Redis returns; nothing sends the refused call by itself: the next message is a new one.
        redis.restart();
        gw.wait_ready().await;
        gw.send(json!({"to": {"channel": "plain"}, "data": "after"}))
            .await;
        assert_eq!(next_data(&mut c).await, "after");
    })
    .await;
}
