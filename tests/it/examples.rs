//! The example backends (`examples/backends/`: Python, Node, Rust) as real child processes
//! against real replicas: the chat round trip, the echo to a MessagePack client, XACK only
//! after 202, retry while the API is down, XAUTOCLAIM of a dead consumer's entries, SIGTERM, a
//! killed instance's work taken over, dead letters, and the whiteboard; and the minimal
//! consumers (`minimal.py`, `minimal.mjs`, `minimal.rs`): the round trip, XACK only after 202.
//!
//! Each behaviour runs once per language (`examples::python::`, `examples::node::`,
//! `examples::rust::`). Needs `python3` with `pip install -r
//! examples/backends/python/requirements.txt`, `npm ci --prefix examples/backends/node`, and the
//! example binaries: run with `tests/run.sh`, or `cargo build --examples` first.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::common::*;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Lang {
    Python,
    Node,
    Rust,
}

/// The built example `name` (from `examples/<name>.rs`, `examples/<name>/main.rs`, or for the
/// backends `examples/backends/rust/backend.rs` and `minimal.rs`), checked to be newer than its
/// source.
pub(crate) fn rust_example(name: &str) -> PathBuf {
    // Cargo puts examples in `examples/` next to the package's binaries.
    let bin = Path::new(env!("CARGO_BIN_EXE_wsbridge"));
    let path = bin
        .parent()
        .unwrap()
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let single = dir.join(format!("{name}.rs"));
    let source = if name == "backend" {
        dir.join("backends/rust/backend.rs")
    } else if name == "minimal_consumer" {
        dir.join("backends/rust/minimal.rs")
    } else if single.exists() {
        single
    } else {
        dir.join(name).join("main.rs")
    };
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let (built, written) = (modified(&path), modified(&source));
    assert!(
        built.is_some() && built >= written,
        "{} is missing or older than {}: run the tests with `cargo test --all-targets` \
         (or `cargo build --examples` first)",
        path.display(),
        source.display()
    );
    path
}

fn backends_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/backends")
}

fn assert_node_modules() {
    assert!(
        backends_dir().join("node/node_modules").exists(),
        "the Node backend's packages are missing: run the tests with tests/run.sh \
         (or `npm ci --prefix examples/backends/node` first)"
    );
}

/// Clears the settings a test does not give, so that the developer's environment cannot leak in.
fn unset_settings(cmd: &mut Command) {
    for name in ["WSBRIDGE_API_KEY", "GROUP", "CONSUMER", "STREAM"] {
        cmd.env_remove(name);
    }
}

/// A backend example running as a child process, killed on drop; stdout and stderr collected.
pub(crate) struct Backend {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Backend {
    fn spawn(lang: Lang, api_url: &str, redis: &Redis, prefix: &str, args: &[&str]) -> Self {
        let mut cmd = match lang {
            Lang::Python => {
                let mut cmd = Command::new("python3");
                cmd.arg(backends_dir().join("python/backend.py"))
                    .env("PYTHONUNBUFFERED", "1");
                cmd
            }
            Lang::Node => {
                let script = backends_dir().join("node/backend.mjs");
                assert_node_modules();
                let mut cmd = Command::new("node");
                cmd.arg(script);
                cmd
            }
            Lang::Rust => Command::new(rust_example("backend")),
        };
        // On a cluster (the suite's cluster pass), the URL lists its nodes.
        if on_cluster() {
            cmd.env("REDIS_CLUSTER", "1");
        } else {
            cmd.env_remove("REDIS_CLUSTER");
        }
        cmd.args(args);
        unset_settings(&mut cmd);
        Self::run(cmd, lang, api_url, &redis.url(), prefix)
    }

    /// The full backend of `lang` finding the primary through `sentinels`
    /// (`REDIS_URL` lists the Sentinels, `REDIS_SENTINEL` names the master).
    pub(crate) fn spawn_sentinel(
        lang: Lang,
        api_url: &str,
        sentinels: &Sentinels,
        prefix: &str,
        args: &[&str],
    ) -> Self {
        let mut cmd = match lang {
            Lang::Python => {
                let mut cmd = Command::new("python3");
                cmd.arg(backends_dir().join("python/backend.py"));
                cmd
            }
            Lang::Node => {
                assert_node_modules();
                let mut cmd = Command::new("node");
                cmd.arg(backends_dir().join("node/backend.mjs"));
                cmd
            }
            Lang::Rust => Command::new(rust_example("backend")),
        };
        let urls: Vec<String> = sentinels
            .sentinel_ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        cmd.env_remove("REDIS_CLUSTER")
            .env("REDIS_SENTINEL", SENTINEL_MASTER)
            .args(args);
        unset_settings(&mut cmd);
        Self::run(cmd, lang, api_url, &urls.join(","), prefix)
    }

    /// The minimal consumer of `lang` (`examples/backends/*/minimal.*`), with `env` set.
    pub(crate) fn minimal(
        lang: Lang,
        api_url: &str,
        redis: &Redis,
        prefix: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = match lang {
            Lang::Python => {
                let mut cmd = Command::new("python3");
                cmd.arg(backends_dir().join("python/minimal.py"));
                cmd
            }
            Lang::Node => {
                assert_node_modules();
                let mut cmd = Command::new("node");
                cmd.arg(backends_dir().join("node/minimal.mjs"));
                cmd
            }
            Lang::Rust => Command::new(rust_example("minimal_consumer")),
        };
        unset_settings(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::run(cmd, lang, api_url, &redis.url(), prefix)
    }

    /// Starts `cmd` against `redis` and the API at `api_url`, collecting its output.
    fn run(mut cmd: Command, lang: Lang, api_url: &str, redis_url: &str, prefix: &str) -> Self {
        cmd.env("REDIS_URL", redis_url)
            .env("WSBRIDGE_API", api_url)
            .env("PREFIX", prefix)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {lang:?} backend: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line);
                }
            });
        }
        Backend {
            child: Some(child),
            log,
        }
    }

    pub(crate) fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub(crate) async fn wait_log(&self, what: &str) {
        eventually(&format!("backend log line containing {what:?}"), || {
            let found = self.log_text().contains(what);
            async move { found }
        })
        .await;
    }

    fn signal(&self, sig: &str) {
        crate::common::signal_pid(self.child.as_ref().unwrap().id(), sig);
    }

    /// Waits for the process to exit on its own.
    async fn exited(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let mut status = None;
        eventually("backend exits", || {
            if status.is_none() {
                status = child.try_wait().unwrap();
            }
            let done = status.is_some();
            async move { done }
        })
        .await;
        self.child = None;
        status.unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads frames until both the ack of `id` and one `message` arrived, in whichever order: the
/// backend's reply may overtake the gateway's ack.
async fn ack_and_message(client: &mut Client, id: &str) -> (Value, Value) {
    let (mut ack, mut message) = (None, None);
    while ack.is_none() || message.is_none() {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("ack") if ack.is_none() => ack = Some(frame),
            Some("message") if message.is_none() => message = Some(frame),
            _ => panic!("unexpected frame while waiting for the ack of {id}: {frame}"),
        }
    }
    let ack = ack.unwrap();
    assert_eq!(ack["id"], id, "{ack}");
    assert!(
        ack["entry"].as_str().is_some_and(|e| e.contains('-')),
        "{ack}"
    );
    (ack, message.unwrap())
}

/// `XPENDING key group` on the chat stream: how many entries the group holds unacknowledged.
async fn pending_count(redis: &Redis, prefix: &str) -> i64 {
    pending_in(redis, prefix, "chat").await
}

/// `XPENDING <prefix>:in:<stream> backend`: the count of unacknowledged entries.
async fn pending_in(redis: &Redis, prefix: &str, stream: &str) -> i64 {
    let mut conn = redis.conn().await;
    let reply: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(format!("{prefix}:in:{stream}"))
        .arg("backend")
        .query_async(&mut conn)
        .await
        .unwrap();
    match &reply[0] {
        redis::Value::Int(n) => *n,
        other => panic!("XPENDING count: {other:?}"),
    }
}

/// Names of the consumers of group `backend`.
async fn consumers(redis: &Redis, prefix: &str) -> Vec<String> {
    let mut conn = redis.conn().await;
    let reply: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(format!("{prefix}:in:chat"))
        .arg("backend")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .iter()
        .map(|c| redis::from_redis_value_ref::<String>(&c["name"]).unwrap())
        .collect()
}

/// Chat across replicas (client on A sends, the backend replies through B's API, subscribers on
/// both replicas receive it) and an echo to a MessagePack client; then `--max 2` ends the
/// backend, with everything acknowledged and its consumer removed from the group.
async fn chat_round_trip(lang: Lang) {
    let redis = Redis::start();
    let prefix = unique_prefix("example-chat");
    let a = Gateway::start(&redis, &prefix).await;
    let b = Gateway::start(&redis, &prefix).await;
    let mut backend = Backend::spawn(
        lang,
        &b.api_url,
        &redis,
        &prefix,
        &["--max", "2", "--block-ms", "500"],
    );
    let mut on_a = Client::connect(&a).await;
    let mut on_b = Client::connect(&b).await;
    on_a.subscribe("room:1").await;
    on_b.subscribe("room:1").await;

    on_a.send(json!({"type": "send", "stream": "chat",
                     "data": {"channel": "room:1", "text": "hello"}, "id": "x1"}))
        .await;
    let expected = json!({"type": "message", "channel": "room:1",
                          "data": {"from": on_a.connection, "text": "hello"}});
    let (ack, message) = ack_and_message(&mut on_a, "x1").await;
    assert_eq!(message, expected, "backend log:\n{}", backend.log_text());
    assert_eq!(on_b.recv().await, expected);

    // Anything that is not a chat message is echoed to its sender, here a MessagePack client.
    let mut packed = Client::connect_msgpack(&b).await;
    packed
        .send(json!({"type": "send", "stream": "chat", "data": {"n": [1, 2.5, null]}, "id": "x2"}))
        .await;
    let (_, echo) = ack_and_message(&mut packed, "x2").await;
    assert_eq!(
        echo,
        json!({"type": "message", "data": {"echo": {"n": [1, 2.5, null]}}}),
        "backend log:\n{}",
        backend.log_text()
    );

    let status = backend.exited().await;
    let log = backend.log_text();
    assert!(status.success(), "{lang:?} backend failed: {status}\n{log}");
    let entry = ack["entry"].as_str().unwrap();
    assert!(
        log.contains(&format!(
            "{entry} chat room:1 from {}: sent, acknowledged",
            on_a.connection
        )),
        "{log}"
    );
    assert!(log.contains("stopped after handling 2 entries"), "{log}");
    assert_eq!(pending_count(&redis, &prefix).await, 0);
    assert_eq!(consumers(&redis, &prefix).await, Vec::<String>::new());
}

/// A backend whose API is unreachable keeps the entry pending (no XACK without a 202) and
/// retries; on SIGTERM it exits 0 and keeps its consumer, which still holds the entry. A second
/// backend reclaims it with XAUTOCLAIM and delivers it.
async fn retry_and_reclaim(lang: Lang) {
    let redis = Redis::start();
    let prefix = unique_prefix("example-retry");
    let a = Gateway::start(&redis, &prefix).await;
    let dead_api = format!("http://127.0.0.1:{}", free_port());
    let mut failing = Backend::spawn(lang, &dead_api, &redis, &prefix, &["--block-ms", "500"]);
    let mut client = Client::connect(&a).await;
    client.subscribe("room:r").await;
    client
        .send(json!({"type": "send", "stream": "chat",
                     "data": {"channel": "room:r", "text": "later"}, "id": "y1"}))
        .await;
    let ack = client.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let entry = ack["entry"].as_str().unwrap().to_string();

    failing.wait_log(&format!("{entry} chat room:r")).await;
    // Two attempts, so the retry happened and the entry is still pending.
    eventually("a retry", || {
        let attempts = failing.log_text().matches("left pending").count();
        async move { attempts >= 2 }
    })
    .await;
    assert_eq!(pending_count(&redis, &prefix).await, 1);
    failing.signal("-TERM");
    let status = failing.exited().await;
    let log = failing.log_text();
    assert!(status.success(), "SIGTERM: {status}\n{log}");
    assert!(!log.contains("sent, acknowledged"), "{log}");
    assert_eq!(pending_count(&redis, &prefix).await, 1);
    assert_eq!(consumers(&redis, &prefix).await.len(), 1, "{log}");

    let mut rescuer = Backend::spawn(
        lang,
        &a.api_url,
        &redis,
        &prefix,
        &[
            "--max",
            "1",
            "--claim-idle-ms",
            "0",
            "--consumer",
            "rescuer",
        ],
    );
    let message = client.recv().await;
    assert_eq!(
        message,
        json!({"type": "message", "channel": "room:r",
               "data": {"from": client.connection, "text": "later"}}),
        "{}",
        rescuer.log_text()
    );
    let status = rescuer.exited().await;
    let log = rescuer.log_text();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("reclaimed 1 entries"), "{log}");
    assert!(log.contains(&format!("{entry} chat room:r")), "{log}");
    assert_eq!(pending_count(&redis, &prefix).await, 0);
}

/// The entries of group `backend` pending for `consumer`: (entry id, times delivered).
async fn pending_of(redis: &Redis, prefix: &str, consumer: &str) -> Vec<(String, i64)> {
    let mut conn = redis.conn().await;
    let reply: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(format!("{prefix}:in:chat"))
        .arg("backend")
        .arg("-")
        .arg("+")
        .arg(10_000)
        .arg(consumer)
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .into_iter()
        .map(|(id, _, _, deliveries)| (id, deliveries))
        .collect()
}

/// The chat text of stream entry `id` of `<prefix>:in:chat`.
async fn entry_text(redis: &Redis, prefix: &str, id: &str) -> String {
    let mut conn = redis.conn().await;
    let entries = xrange(&mut conn, &format!("{prefix}:in:chat")).await;
    let (_, fields) = entries
        .iter()
        .find(|(entry, _)| entry == id)
        .unwrap_or_else(|| panic!("no entry {id}"));
    let data: Value = serde_json::from_slice(&fields["data"]).unwrap();
    data["text"].as_str().unwrap().to_string()
}

/// Two backends (consumers b1 and b2 of one group, each taking over entries idle for
/// 500 ms) handle a stream of 200 chat messages from clients on two replicas. b1 is killed with
/// SIGKILL while it holds entries it has read but not acknowledged; b2 takes them over by
/// itself (its periodic XAUTOCLAIM, not a restart) and every message is answered on the channel,
/// on both replicas. Only an entry b1 held may be answered twice (b1 may have replied before
/// dying unacknowledged); nothing is left pending and nothing is dead-lettered.
async fn take_over_from_a_killed_instance(lang: Lang) {
    const PER_SENDER: usize = 100;
    let redis = Redis::start();
    let prefix = unique_prefix("example-crash");
    let a = Gateway::start(&redis, &prefix).await;
    let b = Gateway::start(&redis, &prefix).await;
    let flags = |name: &'static str| {
        [
            "--consumer",
            name,
            "--claim-idle-ms",
            "500",
            "--work-ms",
            "10",
            "--block-ms",
            "500",
        ]
    };
    let b1 = Backend::spawn(lang, &a.api_url, &redis, &prefix, &flags("b1"));
    let b2 = Backend::spawn(lang, &b.api_url, &redis, &prefix, &flags("b2"));
    let mut listeners = Vec::new();
    for gw in [&a, &b] {
        let mut c = Client::connect(gw).await;
        c.subscribe("room:crash").await;
        listeners.push(c);
    }
    // Two senders, one per replica, spread over about 2.5 s.
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for (name, gw) in [("a", &a), ("b", &b)] {
        let mut c = Client::connect(gw).await;
        let sent = sent.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..PER_SENDER {
                c.send(
                    json!({"type": "send", "stream": "chat", "id": format!("{name}{i}"),
                              "data": {"channel": "room:crash", "text": format!("{name}{i}")}}),
                )
                .await;
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            for i in 0..PER_SENDER {
                let ack = c.recv().await;
                assert_eq!(
                    (ack["type"].as_str(), ack["id"].as_str()),
                    (Some("ack"), Some(format!("{name}{i}").as_str())),
                    "{ack}"
                );
            }
        }));
    }

    // Mid-stream, freeze b1 while it holds work, look at what it holds, and kill it: what Redis
    // says b1 held is then exactly what it held when it died.
    let mut held = Vec::new();
    while held.is_empty() {
        eventually("b1 holding unacknowledged entries mid-stream", || async {
            sent.load(std::sync::atomic::Ordering::Relaxed) >= 40
                && !pending_of(&redis, &prefix, "b1").await.is_empty()
        })
        .await;
        b1.signal("-STOP");
        held = pending_of(&redis, &prefix, "b1").await;
        if held.is_empty() {
            b1.signal("-CONT"); // it acknowledged in between: try again
        }
    }
    b1.signal("-KILL");
    assert!(
        sent.load(std::sync::atomic::Ordering::Relaxed) < 2 * PER_SENDER,
        "b1 must die mid-stream"
    );
    let mut held_texts = std::collections::HashSet::new();
    for (id, _) in &held {
        held_texts.insert(entry_text(&redis, &prefix, id).await);
    }
    for sender in senders {
        sender.await.unwrap();
    }

    // Every message is answered on the channel, on both replicas.
    for (replica, listener) in listeners.iter_mut().enumerate() {
        let mut seen = std::collections::HashSet::new();
        let mut twice = Vec::new();
        while seen.len() < 2 * PER_SENDER {
            let frame = listener.recv().await;
            assert_eq!(frame["type"], "message", "{frame}");
            let text = frame["data"]["text"].as_str().unwrap().to_string();
            if !seen.insert(text.clone()) {
                twice.push(text);
            }
        }
        for text in &twice {
            assert!(
                held_texts.contains(text),
                "replica {replica}: {text} answered twice but b1 did not hold it ({held_texts:?})"
            );
        }
    }
    eventually("nothing left pending", || async {
        pending_count(&redis, &prefix).await == 0
    })
    .await;
    let log = b2.log_text();
    assert!(log.contains("reclaimed "), "{log}");
    for (id, _) in &held {
        assert!(
            log.contains(&format!("{id} chat room:crash from ")),
            "b2 did not handle {id}, which b1 held:\n{log}"
        );
    }
    let mut conn = redis.conn().await;
    assert!(xrange(&mut conn, &format!("{{{prefix}:in:chat}}:dead"))
        .await
        .is_empty());
}

/// An entry the handler can never take (`--fail-on`, the backend's test hook: its handler raises
/// for that text) is delivered `--max-deliveries` times, then moved to `{<prefix>:in:chat}:dead` with
/// every original field plus `original_id`, `deliveries` and `reason`, and acknowledged; the
/// message behind it, held up meanwhile (entries are handled in order), then goes through.
async fn dead_letter_an_entry_it_can_never_handle(lang: Lang) {
    let redis = Redis::start();
    let prefix = unique_prefix("example-dead");
    let gw = Gateway::start(&redis, &prefix).await;
    let backend = Backend::spawn(
        lang,
        &gw.api_url,
        &redis,
        &prefix,
        &[
            "--fail-on",
            "poison",
            "--max-deliveries",
            "3",
            "--block-ms",
            "500",
        ],
    );
    let mut c = Client::connect(&gw).await;
    c.subscribe("room:d").await;
    c.send(json!({"type": "send", "stream": "chat", "id": "p1",
                  "data": {"channel": "room:d", "text": "poison"}}))
        .await;
    c.send(json!({"type": "send", "stream": "chat", "id": "f1",
                  "data": {"channel": "room:d", "text": "fine"}}))
        .await;
    let mut acks = std::collections::HashMap::new();
    loop {
        let frame = c.recv().await;
        match frame["type"].as_str() {
            Some("ack") => {
                acks.insert(
                    frame["id"].as_str().unwrap().to_string(),
                    frame["entry"].clone(),
                );
            }
            Some("message") => {
                assert_eq!(
                    frame["data"]["text"], "fine",
                    "only the good message is answered: {frame}"
                );
                break;
            }
            _ => panic!("{frame}"),
        }
    }
    while acks.len() < 2 {
        let ack = c.recv().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acks.insert(
            ack["id"].as_str().unwrap().to_string(),
            ack["entry"].clone(),
        );
    }
    let poison = acks["p1"].as_str().unwrap().to_string();

    // In the stream's hash slot (the braces), so that the move is atomic on a cluster too.
    let dead_key = format!("{{{prefix}:in:chat}}:dead");
    // Logged before the message behind it was answered, but read from the backend's output by
    // a thread of the test: awaited, not read once (a loaded machine failed that once).
    backend
        .wait_log(&format!("{poison} moved to {dead_key} after 3 deliveries"))
        .await;
    let log = backend.log_text();
    assert_eq!(
        log.matches(&format!(
            "{poison} chat room:d from {}: handler failed",
            c.connection
        ))
        .count(),
        3,
        "three deliveries, each failing:\n{log}"
    );
    assert!(
        log.contains(&format!("{poison} moved to {dead_key} after 3 deliveries")),
        "{log}"
    );
    let mut conn = redis.conn().await;
    let dead = xrange(&mut conn, &dead_key).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let original = xrange(&mut conn, &format!("{prefix}:in:chat"))
        .await
        .into_iter()
        .find(|(id, _)| *id == poison)
        .expect("the original entry stays in the stream")
        .1;
    let (_, fields) = &dead[0];
    for (name, value) in &original {
        assert_eq!(fields.get(name), Some(value), "field {name} changed");
    }
    assert_eq!(text(&fields["original_id"]), poison);
    assert_eq!(text(&fields["deliveries"]), "3");
    assert!(
        text(&fields["reason"]).contains("handler failed")
            && text(&fields["reason"]).contains("--fail-on"),
        "{}",
        text(&fields["reason"])
    );
    assert_eq!(fields.len(), original.len() + 3, "{fields:?}");
    assert_eq!(text(&original["id"]), "p1");
    assert_eq!(text(&original["connection"]), c.connection);
    let data: Value = serde_json::from_slice(&original["data"]).unwrap();
    assert_eq!(data, json!({"channel": "room:d", "text": "poison"}));
    eventually("nothing left pending", || async {
        pending_count(&redis, &prefix).await == 0
    })
    .await;
}

/// The next `message` frame's `data`; acks on the way are skipped (a backend's reply may overtake
/// the gateway's ack).
async fn next_message(client: &mut Client) -> Value {
    loop {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("ack") => continue,
            Some("message") => return frame,
            _ => panic!("unexpected frame: {frame}"),
        }
    }
}

fn stroke(id: &str, x: f64) -> Value {
    json!({"id": id, "color": "#1e90ff", "width": 4, "points": [[x, 0.25], [x, 0.5], [0.75, 0.5]]})
}

/// The whiteboard (examples/whiteboard's backend side), on two replicas: a stroke sent on the
/// `board` stream is stored in `<prefix>:whiteboard:<board>` with `seq` = its entry id and
/// published to `board:<board>` (with an offset: the channel keeps history), to pages on both
/// replicas; a stroke sent again is stored once; malformed strokes and board names come back to
/// the sender as errors naming what was wrong, and are acknowledged; a page that opens late and
/// asks for the board gets every stroke, in `seq` order, in snapshots of at most 100.
async fn whiteboard(lang: Lang) {
    let redis = Redis::start();
    let prefix = unique_prefix("example-board");
    let config = format!(
        "{}\n[[channels]]\npattern = \"board:*\"\nhistory_size = 1000\nhistory_ttl_seconds = 600\n",
        base_config(&redis.url(), &prefix)
    )
    .replace(
        r#"streams = ["chat", "orders"]"#,
        r#"streams = ["chat", "board"]"#,
    );
    let a = Gateway::spawn(&config, &prefix, &[]);
    let b = Gateway::spawn(&config, &prefix, &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    let backend = Backend::spawn(
        lang,
        &b.api_url,
        &redis,
        &prefix,
        &["--stream", "board", "--block-ms", "500"],
    );
    let mut drawer = Client::connect(&a).await;
    let mut watcher = Client::connect(&b).await;
    drawer.subscribe("board:t").await;
    watcher.subscribe("board:t").await;

    drawer
        .send(json!({"type": "send", "stream": "board", "id": "s1",
                     "data": {"board": "t", "stroke": stroke("s1", 0.1)}}))
        .await;
    let (ack, message) = ack_and_message(&mut drawer, "s1").await;
    let entry = ack["entry"].as_str().unwrap();
    let mut expected = stroke("s1", 0.1);
    expected["seq"] = json!(entry);
    assert_eq!(
        message["data"],
        json!({"type": "stroke", "board": "t", "stroke": expected}),
        "{message}\n{}",
        backend.log_text()
    );
    assert_eq!(message["channel"], "board:t");
    assert!(message["offset"].is_string(), "history offset: {message}");
    assert_eq!(next_message(&mut watcher).await, message);

    // The same stroke again (a page resending after the gateway's dedupe window): published
    // again, stored once.
    drawer
        .send(json!({"type": "send", "stream": "board", "id": "s1-again",
                     "data": {"board": "t", "stroke": stroke("s1", 0.1)}}))
        .await;
    assert_eq!(
        next_message(&mut drawer).await["data"]["stroke"]["id"],
        "s1"
    );
    assert_eq!(
        next_message(&mut watcher).await["data"]["stroke"]["id"],
        "s1"
    );

    // Bad input: the sender is told what was wrong; the watcher sees nothing of it.
    for (data, what) in [
        (
            json!({"board": "t", "stroke": {"id": "x", "color": "red", "width": 4,
                                           "points": [[0.1, 0.1]]}}),
            "stroke.color",
        ),
        (
            json!({"board": "t", "stroke": {"id": "x", "color": "#000000", "width": 4,
                                           "points": [[0.1, 7]]}}),
            "point",
        ),
        (json!({"board": "no spaces", "load": true}), "board"),
        (json!({"board": "t"}), "load"),
    ] {
        drawer
            .send(json!({"type": "send", "stream": "board", "data": data}))
            .await;
        let error = next_message(&mut drawer).await;
        assert_eq!(error["data"]["type"], "error", "{error}");
        assert!(
            error.get("channel").is_none(),
            "to the sender only: {error}"
        );
        assert!(
            error["data"]["error"].as_str().unwrap().contains(what),
            "{data} must be refused naming {what:?}: {error}"
        );
    }

    // 150 more strokes from the watcher's side.
    for i in 0..150 {
        watcher
            .send(
                json!({"type": "send", "stream": "board", "id": format!("w{i}"),
                         "data": {"board": "t", "stroke": stroke(&format!("w{i}"), 0.5)}}),
            )
            .await;
    }
    for i in 0..150 {
        let m = next_message(&mut drawer).await;
        assert_eq!(m["data"]["stroke"]["id"], format!("w{i}"), "{m}");
    }

    // A page that opens late loads the board: every stroke once, in seq order, in two parts.
    let mut late = Client::connect(&a).await;
    late.send(json!({"type": "send", "stream": "board", "data": {"board": "t", "load": true}}))
        .await;
    let mut strokes = Vec::new();
    let mut parts = Vec::new();
    loop {
        let m = next_message(&mut late).await;
        assert_eq!(m["data"]["type"], "snapshot", "{m}");
        assert_eq!(m["data"]["board"], "t");
        let part = m["data"]["strokes"].as_array().unwrap().clone();
        parts.push(part.len());
        strokes.extend(part);
        if m["data"]["last"] == json!(true) {
            break;
        }
        assert_eq!(m["data"]["last"], json!(false), "{m}");
    }
    assert_eq!(parts, [100, 51]);
    let ids: Vec<&str> = strokes.iter().map(|s| s["id"].as_str().unwrap()).collect();
    let mut want = vec!["s1".to_string()];
    want.extend((0..150).map(|i| format!("w{i}")));
    assert_eq!(ids, want);
    let seqs: Vec<(u64, u64)> = strokes
        .iter()
        .map(|s| {
            let (ms, n) = s["seq"].as_str().unwrap().split_once('-').unwrap();
            (ms.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    let mut conn = redis.conn().await;
    let stored: i64 = redis::cmd("HLEN")
        .arg(format!("{prefix}:whiteboard:t"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, 151);
    eventually("every board entry acknowledged", || async {
        pending_in(&redis, &prefix, "board").await == 0
    })
    .await;
}

/// The minimal consumer (`examples/backends/*/minimal.*`) on two replicas and a single Redis
/// (it speaks to no cluster, so this runs one in the cluster pass too): a chat message stored
/// before it starts and one sent after are each answered on the channel, to clients on both
/// replicas, and acknowledged; anything else is acknowledged without an answer. Nothing is left
/// pending.
async fn minimal_round_trip(lang: Lang) {
    let redis = Redis::start_single();
    let prefix = unique_prefix("example-minimal");
    let a = Gateway::start(&redis, &prefix).await;
    let b = Gateway::start(&redis, &prefix).await;
    let mut on_a = Client::connect(&a).await;
    let mut on_b = Client::connect(&b).await;
    on_a.subscribe("room:m").await;
    on_b.subscribe("room:m").await;

    // Stored before the consumer runs: the gateway's group starts at the stream's beginning.
    on_a.send(json!({"type": "send", "stream": "chat",
                     "data": {"channel": "room:m", "text": "early"}, "id": "m1"}))
        .await;
    let early = on_a.recv().await;
    assert_eq!(early["type"], "ack", "{early}");
    let consumer = Backend::minimal(lang, &b.api_url, &redis, &prefix, &[]);
    let expected = |from: &str, text: &str| json!({"type": "message", "channel": "room:m", "data": {"from": from, "text": text}});
    assert_eq!(
        on_a.recv().await,
        expected(&on_a.connection, "early"),
        "consumer log:\n{}",
        consumer.log_text()
    );
    assert_eq!(on_b.recv().await, expected(&on_a.connection, "early"));

    on_b.send(json!({"type": "send", "stream": "chat",
                     "data": {"channel": "room:m", "text": "late"}, "id": "m2"}))
        .await;
    let (late, message) = ack_and_message(&mut on_b, "m2").await;
    assert_eq!(message, expected(&on_b.connection, "late"));
    assert_eq!(on_a.recv().await, expected(&on_b.connection, "late"));

    on_a.send(json!({"type": "send", "stream": "chat", "data": {"n": 1}, "id": "m3"}))
        .await;
    let other = on_a.recv().await;
    assert_eq!(other["type"], "ack", "{other}");

    for (ack, from, channel) in [
        (&early, &on_a.connection, " chat room:m from "),
        (&late, &on_b.connection, " chat room:m from "),
    ] {
        let entry = ack["entry"].as_str().unwrap();
        consumer
            .wait_log(&format!("{entry}{channel}{from}: sent, acknowledged"))
            .await;
    }
    let entry = other["entry"].as_str().unwrap();
    consumer
        .wait_log(&format!("{entry} not a chat message: acknowledged"))
        .await;
    assert_eq!(pending_count(&redis, &prefix).await, 0);
}

/// XACK only after a 202: a minimal consumer whose gateway cannot be reached leaves the entry
/// pending (and says so); killed and started again under the same consumer name with a gateway
/// that answers, it reads its own pending entry first and delivers it.
async fn minimal_acknowledges_only_after_202(lang: Lang) {
    let redis = Redis::start_single();
    let prefix = unique_prefix("example-minimal-pending");
    let gw = Gateway::start(&redis, &prefix).await;
    let mut client = Client::connect(&gw).await;
    client.subscribe("room:p").await;
    client
        .send(json!({"type": "send", "stream": "chat",
                     "data": {"channel": "room:p", "text": "kept"}, "id": "k1"}))
        .await;
    let ack = client.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let entry = ack["entry"].as_str().unwrap();

    let dead_api = format!("http://127.0.0.1:{}", free_port());
    let env = [("CONSUMER", "worker-1")];
    let failing = Backend::minimal(lang, &dead_api, &redis, &prefix, &env);
    failing
        .wait_log(&format!(
            "{entry} chat room:p: the gateway answered 0, left pending"
        ))
        .await;
    assert_eq!(pending_count(&redis, &prefix).await, 1);
    drop(failing); // killed

    let consumer = Backend::minimal(lang, &gw.api_url, &redis, &prefix, &env);
    assert_eq!(
        client.recv().await,
        json!({"type": "message", "channel": "room:p",
               "data": {"from": client.connection, "text": "kept"}}),
        "consumer log:\n{}",
        consumer.log_text()
    );
    consumer
        .wait_log(&format!("{entry} chat room:p from "))
        .await;
    eventually("nothing left pending", || async {
        pending_count(&redis, &prefix).await == 0
    })
    .await;
}

/// How long one example test may take: it starts Redis, replicas and a backend process (Python,
/// Node or Rust) and waits for the backend's claim timers. The Rust ones take ~10 s; the Python
/// and Node ones start interpreters and were given twice the usual deadline without a measure.
const EXAMPLE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Every test above, for each backend.
macro_rules! backend_tests {
    ($($module:ident => $lang:expr),* $(,)?) => {$(
        mod $module {
            use super::*;

            #[tokio::test]
            async fn chat_round_trip() {
                deadline(EXAMPLE_DEADLINE, super::chat_round_trip($lang)).await;
            }

            #[tokio::test]
            async fn retries_and_is_reclaimed() {
                deadline(EXAMPLE_DEADLINE, super::retry_and_reclaim($lang)).await;
            }

            #[tokio::test]
            async fn instances_take_over_from_a_killed_one() {
                deadline(EXAMPLE_DEADLINE, super::take_over_from_a_killed_instance($lang)).await;
            }

            #[tokio::test]
            async fn dead_letters_an_entry_it_can_never_handle() {
                deadline(EXAMPLE_DEADLINE, super::dead_letter_an_entry_it_can_never_handle($lang)).await;
            }

            #[tokio::test]
            async fn whiteboard() {
                deadline(EXAMPLE_DEADLINE, super::whiteboard($lang)).await;
            }

            #[tokio::test]
            async fn minimal_consumer_round_trip() {
                deadline(EXAMPLE_DEADLINE, super::minimal_round_trip($lang)).await;
            }

            #[tokio::test]
            async fn minimal_consumer_acknowledges_only_after_202() {
                deadline(EXAMPLE_DEADLINE, super::minimal_acknowledges_only_after_202($lang)).await;
            }
        }
    )*};
}

backend_tests!(python => Lang::Python, node => Lang::Node, rust => Lang::Rust);
