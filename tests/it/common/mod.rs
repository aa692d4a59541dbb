//! Test harness: real `redis-server` processes on free loopback ports, real gateway processes
//! (the `wsbridge` binary), real WebSocket clients and a small HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single awaited event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A loopback port nobody listens on, for a server a test starts (Redis, nginx).
///
/// Taken below the kernel's ephemeral range (32768 and up on Linux), not by binding port 0:
/// an ephemeral port is free only until an outgoing connection of this busy test process takes
/// it as its local port, which happened between choosing a Redis port and Redis binding it.
/// Each call tries the next port of a sequence that starts at a point given by the process id,
/// so the tests of one run never get the same port twice.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 22_000; // up to 31999
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7919)));
    loop {
        let port = (FIRST + next.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A key prefix unique to this test.
pub fn unique_prefix(name: &str) -> String {
    format!(
        "t{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        name
    )
}

/// A `send` to `chat` with `id`, answered by an `ack`; returns the entry id.
pub async fn send_acked(c: &mut Client, id: &str, data: Value) -> String {
    c.send(json!({"type": "send", "stream": "chat", "data": data, "id": id}))
        .await;
    let ack = c.recv().await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some(id)),
        "{ack}"
    );
    ack["entry"].as_str().unwrap().to_string()
}

/// A primary and a plain `replicaof` replica, in sync; the replica's connection.
pub async fn primary_and_replica() -> (Redis, Redis, RedisConn) {
    let primary = Redis::start_single();
    let replica = Redis::start_single();
    let mut rconn = replica.conn().await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(primary.port)
        .query_async(&mut rconn)
        .await
        .unwrap();
    eventually("the replica is in sync", || {
        let mut rconn = rconn.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut rconn)
                .await
                .unwrap_or_default();
            info.contains("master_link_status:up")
        }
    })
    .await;
    (primary, replica, rconn)
}

/// A replica config with `room:*` keeping `size` messages of history.
pub fn with_history(redis: &Redis, prefix: &str, size: u64) -> String {
    history_config(&redis.url(), prefix, size)
}

/// As [`with_history`], for a Redis (or cluster, comma-separated) at `redis_url`.
pub fn history_config(redis_url: &str, prefix: &str, size: u64) -> String {
    format!(
        "{}\n[[channels]]\npattern = \"room:*\"\nhistory_size = {size}\nhistory_ttl_seconds = 600\n",
        base_config(redis_url, prefix)
    )
}

/// Sends `sig` (`-STOP`, `-CONT`, ...) to process `pid`; for `-STOP`, returns once every thread
/// of it has stopped. The kernel stops a multi-threaded process thread by thread, starting when
/// the one thread the signal went to runs: on a busy machine the others run on meanwhile, long
/// enough to read and answer a message (a replica "frozen" this way answered a reach report).
pub fn signal_pid(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
    if sig != "-STOP" {
        return;
    }
    let stopped = |task: std::fs::DirEntry| {
        std::fs::read_to_string(task.path().join("status")).is_ok_and(|status| {
            status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains("(stopped)"))
        })
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        if tasks.filter_map(Result::ok).all(stopped) {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        // Polled: /proc is the only way to see a stop; nothing to await.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A fresh directory under the system temp dir.
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "wsbridge-it-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether the suite runs against a Redis Cluster (`WSBRIDGE_TEST_REDIS=cluster`): every
/// [`Redis`] is then a three-master cluster, and replicas use it with interest routing.
pub fn on_cluster() -> bool {
    std::env::var("WSBRIDGE_TEST_REDIS").is_ok_and(|v| v == "cluster")
}

/// A real redis-server (or, [`on_cluster`], a real Redis Cluster), killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    /// Started with an append-only file fsynced on every write: a restart keeps the data.
    aof: bool,
    /// More `redis-server` arguments, after the persistence ones (a later one wins).
    extra: Vec<String>,
    cluster: Option<Cluster>,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_inner(false)
    }

    /// Starts one redis-server even in the cluster pass, for what speaks to a single Redis only
    /// (the minimal example consumers, the local stack of the walk-throughs).
    pub fn start_single() -> Self {
        Self::start_single_with(&[])
    }

    /// Starts one redis-server with more arguments (e.g. its persistence: `--appendonly yes
    /// --appendfsync everysec`), kept for [`Redis::restart`].
    pub fn start_single_with(args: &[&str]) -> Self {
        let mut redis = Redis {
            port: free_port(),
            child: None,
            dir: scratch_dir(),
            aof: false,
            extra: args.iter().map(|a| a.to_string()).collect(),
            cluster: None,
        };
        redis.spawn();
        redis
    }

    fn start_inner(aof: bool) -> Self {
        if on_cluster() {
            let cluster = Cluster::start_with(3, 0, aof);
            return Redis {
                port: cluster.ports[0],
                child: None,
                dir: scratch_dir(),
                aof,
                extra: Vec::new(),
                cluster: Some(cluster),
            };
        }
        let mut redis = Redis {
            port: free_port(),
            child: None,
            dir: scratch_dir(),
            aof,
            extra: Vec::new(),
            cluster: None,
        };
        redis.spawn();
        redis
    }

    /// Starts a redis-server that persists every write before answering it (`--appendonly yes
    /// --appendfsync always`, in its own directory), so that [`Redis::restart`] after a SIGKILL
    /// comes back with everything it acknowledged.
    pub fn start_with_aof() -> Self {
        Self::start_inner(true)
    }

    fn spawn(&mut self) {
        let persistence: &[&str] = if self.aof {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(persistence)
            .args(&self.extra)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        let client = redis::Client::open(self.url()).unwrap();
        loop {
            if let Ok(mut c) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL, or on a cluster every node's URL, comma-separated ([`base_config`] knows).
    pub fn url(&self) -> String {
        match &self.cluster {
            Some(cluster) => cluster.urls(),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// SIGKILL, as an outage (every node of a cluster).
    pub fn kill(&mut self) {
        if let Some(cluster) = &mut self.cluster {
            for i in 0..cluster.ports.len() {
                cluster.kill(i);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port: empty, or with its data when started with
    /// [`Redis::start_with_aof`]. After [`Redis::kill`], starts it again.
    pub fn restart(&mut self) {
        self.kill();
        if let Some(cluster) = &mut self.cluster {
            cluster.restart_all();
            return;
        }
        self.spawn();
    }

    /// Freezes the server (connections stay open, nothing answers) or thaws it.
    pub fn freeze(&self, frozen: bool) {
        let pids: Vec<String> = match &self.cluster {
            Some(cluster) => cluster.pids(),
            None => vec![self.child.as_ref().expect("running").id().to_string()],
        };
        let sig = if frozen { "-STOP" } else { "-CONT" };
        for pid in pids {
            signal_pid(pid.parse().expect("a pid"), sig);
        }
    }

    /// One plain connection per node (one in all without a cluster), for node-level commands.
    pub async fn node_conns(&self) -> Vec<redis::aio::MultiplexedConnection> {
        let ports = match &self.cluster {
            Some(cluster) => cluster.ports.clone(),
            None => vec![self.port],
        };
        let mut conns = Vec::new();
        for port in ports {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
            conns.push(client.get_multiplexed_async_connection().await.unwrap());
        }
        conns
    }

    pub async fn conn(&self) -> RedisConn {
        conn_to(&self.url()).await.unwrap()
    }
}

/// A connection to [`Redis::url`]: a single Redis, or a cluster (comma-separated node URLs).
pub async fn conn_to(url: &str) -> redis::RedisResult<RedisConn> {
    let urls: Vec<&str> = url.split(',').collect();
    if urls.len() > 1 {
        let client = redis::cluster::ClusterClient::new(urls)?;
        return Ok(RedisConn::Cluster(client.get_async_connection().await?));
    }
    let client = redis::Client::open(url)?;
    Ok(RedisConn::Single(
        client.get_multiplexed_async_connection().await?,
    ))
}

/// A connection for tests to look at what the gateway stored: to a single Redis or a cluster.
#[derive(Clone)]
pub enum RedisConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        if let Some(cluster) = &self.cluster {
            for pid in cluster.pids() {
                let _ = Command::new("kill").args(["-CONT", &pid]).status();
            }
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A gateway replica: the real binary, killed on drop.
pub struct Gateway {
    child: Option<Child>,
    pub ws_url: String,
    pub api_url: String,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub prefix: String,
    config_path: PathBuf,
}

/// Settings common to every test replica: fast health checks so outages show within a second.
/// `redis_url` may be a cluster's comma-separated node URLs ([`Redis::url`]).
pub fn base_config(redis_url: &str, prefix: &str) -> String {
    let urls: Vec<&str> = redis_url.split(',').collect();
    let redis = if urls.len() > 1 {
        let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "url = \"{}\"\ncluster_urls = [{}]",
            urls[0],
            list.join(", ")
        )
    } else {
        format!("url = \"{redis_url}\"")
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
api_listen = "127.0.0.1:0"
shutdown_drain_seconds = 5

[redis]
{redis}
prefix = "{prefix}"
connect_timeout_ms = 500
command_timeout_ms = 1000
health_interval_ms = 200
unhealthy_after_ms = 1000
reconnect_max_backoff_ms = 500

[inbound]
streams = ["chat", "orders"]
groups = ["backend"]
"#
    )
}

/// Whether the suite runs under interest routing (`WSBRIDGE__OUTBOUND__ROUTING=interest` in the
/// test's environment, which the replicas inherit); tests that measure filtering expect less of
/// it then.
pub fn interest_routing() -> bool {
    std::env::var("WSBRIDGE__OUTBOUND__ROUTING").is_ok_and(|v| v == "interest")
}

impl Gateway {
    /// Starts a replica and waits until it is ready.
    pub async fn start(redis: &Redis, prefix: &str) -> Self {
        Self::start_with(redis, prefix, &[]).await
    }

    /// Starts a replica with environment overrides (`WSBRIDGE__...`) and waits until ready.
    pub async fn start_with(redis: &Redis, prefix: &str, env: &[(&str, &str)]) -> Self {
        let gw = Self::spawn(&base_config(&redis.url(), prefix), prefix, env);
        gw.wait_ready().await;
        gw
    }

    /// Starts a replica from a config text without waiting for readiness.
    pub fn spawn(config: &str, prefix: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_under(&[], config, prefix, env)
    }

    /// Like [`Gateway::spawn`], with the binary run by a command that execs it (e.g.
    /// `["prlimit", "--nofile=64:256", "--"]`), so that the replica is still this child process.
    pub fn spawn_under(wrapper: &[&str], config: &str, prefix: &str, env: &[(&str, &str)]) -> Self {
        let dir = scratch_dir();
        let config_path = dir.join("wsbridge.toml");
        std::fs::write(&config_path, config).unwrap();
        let binary = env!("CARGO_BIN_EXE_wsbridge");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,wsbridge=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains(" listening ") || line.contains("listening public=") {
                        let _ = tx.send(line.clone());
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let line = rx
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("gateway did not start: {:?}", logs.lock().unwrap()));
        let field = |name: &str| -> String {
            let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            line[start..].split_whitespace().next().unwrap().to_string()
        };
        let public = field("public");
        let api = field("api");
        Gateway {
            child: Some(child),
            ws_url: format!("ws://{public}/ws"),
            api_url: format!("http://{api}"),
            logs,
            prefix: prefix.to_string(),
            config_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        signal_pid(self.pid(), sig);
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "gateway did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.api_url);
        eventually("replica ready", || async {
            http("GET", &url, None, None).await.0 == 200
        })
        .await;
    }

    pub async fn readyz(&self) -> (u16, String) {
        http("GET", &format!("{}/readyz", self.api_url), None, None).await
    }

    /// POST to the backend API.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = http(
            "POST",
            &format!("{}{path}", self.api_url),
            Some(&body.to_string()),
            None,
        )
        .await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `POST /send`, asserting 202.
    pub async fn send(&self, body: Value) {
        let (status, answer) = self.post("/send", &body).await;
        assert_eq!(status, 202, "send refused: {answer}");
    }

    /// The value of one metric sample, e.g. `wsbridge_deliveries_total` or
    /// `wsbridge_delivery_dropped_total{reason="queue_full"}`.
    ///
    /// # Panics
    ///
    /// When the replica does not export that series: a renamed or missing series must fail the
    /// test, not read as 0. The message lists the series of the same metric that do exist. A
    /// test that expects a series to be absent says so with [`Gateway::metric_opt`].
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics_text().await;
        if let Some(value) = sample_value(&text, sample) {
            return value;
        }
        let name = sample.split('{').next().unwrap_or(sample);
        let same_name: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && series_name(l) == name)
            .collect();
        if same_name.is_empty() {
            panic!("metric series {sample} is absent, and no series of {name} exists");
        }
        panic!(
            "metric series {sample} is absent; the series of {name} are:\n{}",
            same_name.join("\n")
        );
    }

    /// The value of one metric sample, or `None` when the replica does not export it.
    pub async fn metric_opt(&self, sample: &str) -> Option<f64> {
        sample_value(&self.metrics_text().await, sample)
    }

    /// The replica's `/metrics` exposition.
    ///
    /// # Panics
    ///
    /// When the API does not answer 200.
    pub async fn metrics_text(&self) -> String {
        let url = format!("{}/metrics", self.api_url);
        let (status, text) = http("GET", &url, None, None).await;
        assert_eq!(status, 200, "GET {url}: {text}");
        text
    }

    /// Whether the replica has decided to close `connection` with `code` (its debug log line).
    /// The decision comes first; the close frame leaves once the client has read what is ahead
    /// of it, and only then is the connection counted as closed.
    pub fn closing_decided(&self, connection: &str, code: u16) -> bool {
        self.logs.lock().unwrap().iter().any(|line| {
            line.contains("closing connection")
                && line.contains(&format!("connection={connection} "))
                && line.contains(&format!("code={code} "))
        })
    }

    /// Waits until the replica has counted a catch-up that recovered everything. The count comes
    /// when a history read lands with nothing left out, which may follow the last message a
    /// client saw (a read again after the hold overflowed or a new gap opened).
    pub async fn caught_up(&self) {
        eventually("a catch-up counted as recovered", || async {
            self.metric("wsbridge_catch_ups_total{recovered=\"true\"}")
                .await
                >= 1.0
        })
        .await;
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.config_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The value of `sample` (a name with its labels, exactly as exported) in an exposition.
fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().unwrap())
    })
}

/// The metric name of an exposition line (`name{labels} value` or `name value`).
fn series_name(line: &str) -> &str {
    line.split(['{', ' ']).next().unwrap_or(line)
}

/// Polls `check` until it holds, failing the test after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, PATIENCE, check).await
}

/// Polls `check` until it holds, failing the test after `limit`. A single `check` that hangs
/// fails it too: each is given only the time left.
pub async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!("timed out waiting for: {what} (a check was still running)"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// How long a test may run before it fails, unless it declares longer with [`deadline`].
pub const TEST_DEADLINE: Duration = Duration::from_secs(60);

/// Runs a test's body, failing the test, by name, when it has not finished within `limit`;
/// the other tests run on. Every `#[tokio::test]` wraps its body in it, so that a hang fails
/// that test rather than stall the run:
///
/// ```ignore
/// #[tokio::test]
/// async fn some_behaviour() {
///     deadline(TEST_DEADLINE, async {
///         // the test
///     })
///     .await;
/// }
/// ```
pub async fn deadline<T>(limit: Duration, body: impl std::future::Future<Output = T>) -> T {
    // libtest runs each test on a thread named after it.
    let name = std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_string();
    match tokio::time::timeout(limit, body).await {
        Ok(out) => out,
        Err(_) => panic!("test {name} did not finish within its deadline of {limit:?}"),
    }
}

/// One HTTP/1.1 request; returns status and body text.
pub async fn http(method: &str, url: &str, body: Option<&str>, key: Option<&str>) -> (u16, String) {
    http_raw(method, url, body.map(|b| b.as_bytes().to_vec()), key, &[]).await
}

/// Reads what the server sends on a raw upgraded socket (`tcp`, after the upgrade request was
/// written; it never answers anything) until the server ends the connection, within
/// [`PATIENCE`], and says how it ended: the first close frame's code, or [`Closed::Reset`] when
/// the bytes end without one.
pub async fn raw_close_outcome(tcp: &mut TcpStream) -> Closed {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    // A reset after some frames is not a timeout: what arrived before it still counts.
    if tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut bytes))
        .await
        .is_err()
    {
        return Closed::Timeout;
    }
    let Some(head) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Closed::Reset;
    };
    let mut rest = &bytes[head + 4..];
    // Server frames are not masked: FIN/opcode, a 7-bit length or 126/127 and 2/8 bytes.
    while rest.len() >= 2 {
        let (len, at) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 if rest.len() >= 10 => (
                u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if rest.len() < at + len {
            break;
        }
        let payload = &rest[at..at + len];
        if rest[0] & 0x0f == 8 {
            return match payload {
                [hi, lo, ..] => Closed::Code(u16::from_be_bytes([*hi, *lo])),
                _ => Closed::NoStatus,
            };
        }
        rest = &rest[at + len..];
    }
    Closed::Reset
}

/// How long [`http_raw`] may take to connect.
pub const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP/1.1 request with extra headers; returns status and body text.
///
/// Every way the request can fail without an answer is status 0, with a body saying what and
/// naming the URL: `connection refused`, `connect timed out` (after [`HTTP_CONNECT_TIMEOUT`]),
/// `request failed`, `body failed` and `no answer` (the whole request took longer than
/// [`PATIENCE`]). Status 0 rather than a panic, so that polling (readiness during an outage)
/// can see it and go on; a test that expects an answer asserts the status and prints the body.
pub async fn http_raw(
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
    key: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    match tokio::time::timeout(
        PATIENCE,
        http_raw_unbounded(method, url, body, key, headers),
    )
    .await
    {
        Ok(answer) => answer,
        Err(_) => (0, format!("no answer within {PATIENCE:?}: {method} {url}")),
    }
}

async fn http_raw_unbounded(
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
    key: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let uri: hyper::Uri = url.parse().unwrap();
    let addr = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap());
    let stream = match tokio::time::timeout(HTTP_CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return (0, format!("connection refused ({e}): {method} {url}")),
        Err(_) => {
            return (
                0,
                format!("connect timed out after {HTTP_CONNECT_TIMEOUT:?}: {method} {url}"),
            )
        }
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(uri.path_and_query().unwrap().as_str())
        .header("host", addr.as_str())
        .header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = match sender.send_request(req).await {
        Ok(resp) => resp,
        Err(e) => return (0, format!("request failed ({e}): {method} {url}")),
    };
    let status = resp.status().as_u16();
    match resp.into_body().collect().await {
        Ok(body) => (
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ),
        Err(e) => (
            0,
            format!("body failed after status {status} ({e}): {method} {url}"),
        ),
    }
}

/// How a WebSocket connection ended, as the client saw it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this status code.
    Code(u16),
    /// A close frame without a status code (RFC 6455 §7.1.5: the code reads as 1005).
    NoStatus,
    /// No close frame: the connection failed, was reset or simply ended (EOF).
    Reset,
    /// The server did not close the connection within [`PATIENCE`].
    Timeout,
}

/// docs/schema/server-frame.json, compiled once: every frame a test reads from the gateway is
/// checked against it ([`conforming`]), so the documented protocol cannot drift from the code.
fn server_frame_schema() -> &'static (Value, jsonschema::Validator) {
    static SCHEMA: OnceLock<(Value, jsonschema::Validator)> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/schema/server-frame.json");
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).expect(path))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let validator = jsonschema::draft202012::new(&schema)
            .unwrap_or_else(|e| panic!("{path} is not a valid JSON Schema: {e}"));
        (schema, validator)
    })
}

/// Fails the test unless `frame` (a decoded JSON or MessagePack frame the gateway sent) is valid
/// under docs/schema/server-frame.json; the failure names the frame and what is wrong with it.
pub fn assert_server_frame(frame: &Value) {
    let (schema, validator) = server_frame_schema();
    if validator.is_valid(frame) {
        return;
    }
    // `oneOf` only says that no branch matched: name the faults of the branches of this type.
    let mut why: Vec<String> = validator
        .iter_errors(frame)
        .map(|e| e.to_string())
        .collect();
    for (name, branch) in schema["$defs"].as_object().into_iter().flatten() {
        if branch["properties"]["type"]["const"] != frame["type"] {
            continue;
        }
        let mut branch = branch.clone();
        branch["$defs"] = schema["$defs"].clone();
        if let Ok(v) = jsonschema::draft202012::new(&branch) {
            why.extend(
                v.iter_errors(frame)
                    .map(|e| format!("as `{name}`: {e} at {}", e.instance_path)),
            );
        }
    }
    panic!(
        "the gateway sent a frame that docs/schema/server-frame.json does not allow: {frame}\n{}",
        why.join("\n")
    );
}

/// Decodes a text frame from the gateway and checks it against the server-frame schema.
pub fn server_frame_json(text: &str) -> Value {
    let frame = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("the gateway sent a text frame that is not JSON ({e}): {text}"));
    assert_server_frame(&frame);
    frame
}

/// Decodes a binary (MessagePack) frame from the gateway and checks it against the server-frame
/// schema.
pub fn server_frame_msgpack(bytes: &[u8]) -> Value {
    let frame = rmp_serde::from_slice(bytes).unwrap_or_else(|e| {
        panic!("the gateway sent a binary frame that is not MessagePack ({e}): {bytes:?}")
    });
    assert_server_frame(&frame);
    frame
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A real WebSocket client.
pub struct Client {
    pub ws: Ws,
    pub msgpack: bool,
    pub connection: String,
    pub user: Value,
    /// `missed` notices received (the replica's pub/sub link dropped or overflowed). They can
    /// come at any time after Redis trouble, so the readers skip them and count them here;
    /// tests about them read this.
    pub missed: usize,
}

impl Client {
    /// Connects as a JSON client and reads the welcome.
    pub async fn connect(gw: &Gateway) -> Self {
        Self::connect_url(&gw.ws_url, false).await.expect("connect")
    }

    /// Connects as a MessagePack client and reads the welcome.
    pub async fn connect_msgpack(gw: &Gateway) -> Self {
        Self::connect_url(&gw.ws_url, true).await.expect("connect")
    }

    /// Connects as `user`, with an HS256 token signed with `secret`.
    pub async fn connect_as(gw: &Gateway, secret: &str, user: &str, msgpack: bool) -> Self {
        let token = token(secret, json!({"sub": user}));
        Self::connect_url(&format!("{}?token={token}", gw.ws_url), msgpack)
            .await
            .expect("connect")
    }

    /// Connects to a URL (which may carry `?token=`).
    pub async fn connect_url(
        url: &str,
        msgpack: bool,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let mut request = url.into_client_request()?;
        if msgpack {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                "wsbridge.msgpack".parse().unwrap(),
            );
        }
        let (ws, response) = tokio_tungstenite::connect_async(request).await?;
        if msgpack {
            assert_eq!(
                response
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap()),
                Some("wsbridge.msgpack")
            );
        }
        let mut client = Client {
            ws,
            msgpack,
            connection: String::new(),
            user: Value::Null,
            missed: 0,
        };
        let welcome = client.recv().await;
        assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
        client.connection = welcome["connection"].as_str().unwrap().to_string();
        client.user = welcome["user"].clone();
        Ok(client)
    }

    /// Sends a frame in this client's encoding.
    pub async fn send(&mut self, frame: Value) {
        let message = if self.msgpack {
            Message::Binary(rmp_serde::to_vec_named(&frame).unwrap().into())
        } else {
            Message::Text(frame.to_string().into())
        };
        self.ws.send(message).await.unwrap();
    }

    /// The next data frame, decoded; fails after [`PATIENCE`].
    pub async fn recv(&mut self) -> Value {
        match tokio::time::timeout(PATIENCE, self.next_frame()).await {
            Ok(Some(Ok(v))) => v,
            Ok(Some(Err(close))) => panic!("connection closed: {close:?}"),
            Ok(None) => panic!("connection ended"),
            Err(_) => panic!("no frame within {PATIENCE:?}"),
        }
    }

    /// Next data frame, or the close frame (Err) / end (None). `None` covers every way the
    /// connection can fail without a close frame (reset, EOF, protocol error): a test that
    /// promises a close code reads it with [`Client::expect_close`] or
    /// [`Client::close_outcome`], which tell those apart.
    pub async fn next_frame(&mut self) -> Option<Result<Value, Option<CloseFrame>>> {
        loop {
            let frame: Value = match self.ws.next().await? {
                Ok(Message::Text(t)) => server_frame_json(&t),
                Ok(Message::Binary(b)) => {
                    assert!(self.msgpack, "binary frame on a JSON connection");
                    server_frame_msgpack(&b)
                }
                Ok(Message::Close(frame)) => return Some(Err(frame)),
                Ok(_) => continue,
                Err(_) => return None,
            };
            if frame["type"] == "missed" {
                assert_eq!(frame, json!({"type": "missed"}), "a missed notice");
                self.missed += 1;
                continue;
            }
            return Some(Ok(frame));
        }
    }

    /// Reads until the server closes, within [`PATIENCE`], skipping data frames; says how the
    /// connection ended.
    pub async fn close_outcome(&mut self) -> Closed {
        self.read_until_close(|_| {}).await.0
    }

    /// Reads until the server closes, within [`PATIENCE`]: the data frames received before,
    /// and how the connection ended.
    pub async fn frames_until_close(&mut self) -> (Vec<Value>, Closed) {
        let mut frames = Vec::new();
        let (closed, _) = self.read_until_close(|frame| frames.push(frame)).await;
        (frames, closed)
    }

    /// Reads until the server closes and returns the close frame's code; `None` only for a close
    /// frame without a status code.
    ///
    /// # Panics
    ///
    /// When the connection ends without a close frame (a reset, EOF or protocol error), or the
    /// server does not close it within [`PATIENCE`].
    pub async fn closed(&mut self) -> Option<u16> {
        match self.read_until_close(|_| {}).await {
            (Closed::Code(code), _) => Some(code),
            (Closed::NoStatus, _) => None,
            (Closed::Reset, why) => panic!("connection reset without a close frame {why}"),
            (Closed::Timeout, _) => panic!("server did not close within {PATIENCE:?}"),
        }
    }

    /// Reads until the server closes and asserts that its close frame carries `code`.
    pub async fn expect_close(&mut self, code: u16) {
        let (closed, why) = self.read_until_close(|_| {}).await;
        assert_eq!(
            closed,
            Closed::Code(code),
            "expected close code {code}{why}"
        );
    }

    /// Reads frames until the connection ends, handing each data frame to `each`; returns how
    /// it ended, and what went wrong when it ended without a close frame.
    async fn read_until_close(&mut self, mut each: impl FnMut(Value)) -> (Closed, String) {
        let msgpack = self.msgpack;
        let ws = &mut self.ws;
        let read = async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => each(server_frame_json(&t)),
                    Some(Ok(Message::Binary(b))) => {
                        assert!(msgpack, "binary frame on a JSON connection");
                        each(server_frame_msgpack(&b));
                    }
                    Some(Ok(Message::Close(Some(frame)))) => {
                        return (Closed::Code(u16::from(frame.code)), String::new())
                    }
                    Some(Ok(Message::Close(None))) => return (Closed::NoStatus, String::new()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return (Closed::Reset, format!(" ({e})")),
                    None => return (Closed::Reset, " (the stream ended)".to_string()),
                }
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .unwrap_or_else(|_| (Closed::Timeout, format!(" (nothing within {PATIENCE:?})")))
    }

    /// Subscribes and waits for `subscribed`.
    pub async fn subscribe(&mut self, channel: &str) {
        self.send(json!({"type": "subscribe", "channel": channel, "id": format!("sub-{channel}")}))
            .await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["channel"], channel);
        assert_eq!(reply["id"], format!("sub-{channel}"));
    }
}

/// An HS256 token for tests.
pub fn token(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Reads every entry of a stream through a consumer group, as a backend would.
pub async fn read_group(
    conn: &mut RedisConn,
    key: &str,
    group: &str,
    count: usize,
) -> Vec<(String, std::collections::HashMap<String, Vec<u8>>)> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("test-consumer")
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(key)
        .arg(">")
        .query_async(conn)
        .await
        .unwrap();
    parse_entries(reply)
}

/// Reads a whole stream with XRANGE.
pub async fn xrange(
    conn: &mut RedisConn,
    key: &str,
) -> Vec<(String, std::collections::HashMap<String, Vec<u8>>)> {
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    parse_entries(redis::Value::Array(vec![redis::Value::Array(vec![
        redis::Value::BulkString(key.as_bytes().to_vec()),
        reply,
    ])]))
}

fn parse_entries(reply: redis::Value) -> Vec<(String, std::collections::HashMap<String, Vec<u8>>)> {
    use redis::Value as V;
    let mut out = Vec::new();
    let streams = match reply {
        V::Array(s) => s,
        V::Nil => return out,
        other => panic!("unexpected reply {other:?}"),
    };
    for stream in streams {
        let V::Array(parts) = stream else { panic!() };
        let V::Array(entries) = &parts[1] else {
            panic!("{:?}", parts[1])
        };
        for entry in entries {
            let V::Array(e) = entry else { panic!() };
            let id = match &e[0] {
                V::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
                other => panic!("{other:?}"),
            };
            let V::Array(fields) = &e[1] else { panic!() };
            let mut map = std::collections::HashMap::new();
            for pair in fields.chunks(2) {
                let (V::BulkString(k), V::BulkString(v)) = (&pair[0], &pair[1]) else {
                    panic!()
                };
                map.insert(String::from_utf8(k.clone()).unwrap(), v.clone());
            }
            out.push((id, map));
        }
    }
    out
}

pub fn text(field: &[u8]) -> &str {
    std::str::from_utf8(field).unwrap()
}

/// A real Redis Cluster of `masters` redis-server processes (each with `replicas` replicas),
/// created with `redis-cli --cluster create`; killed on drop.
pub struct Cluster {
    pub ports: Vec<u16>,
    /// Each node's cluster bus port. Given explicitly: Redis's default (port + 10000) does not
    /// exist for ports above 55535, and may be taken.
    bus_ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
    aof: bool,
}

impl Cluster {
    pub fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with(masters, replicas, false)
    }

    /// As [`Cluster::start`]; with `aof`, every node fsyncs every write to its append-only file.
    pub fn start_with(masters: usize, replicas: usize, aof: bool) -> Self {
        let count = masters * (1 + replicas);
        let dir = scratch_dir();
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let mut cluster = Cluster {
            ports: ports.clone(),
            bus_ports: (0..count).map(|_| free_port()).collect(),
            children: Vec::new(),
            dir,
            aof,
        };
        for i in 0..count {
            let child = cluster.spawn(i);
            cluster.children.push(Some(child));
        }
        for &port in &ports {
            wait_for_ping(port);
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli must be installed (it comes with redis-server)");
        assert!(created.success(), "redis-cli --cluster create failed");
        // Every node must see every slot served before clients start.
        let deadline = Instant::now() + PATIENCE;
        for &port in &ports {
            loop {
                let info = redis_cli(port, &["cluster", "info"]);
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster did not become ok: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            // A replica can take over only once it has synced with its master.
            loop {
                let info = redis_cli(port, &["info", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(Instant::now() < deadline, "replica did not sync: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    fn spawn(&self, i: usize) -> Child {
        let port = self.ports[i].to_string();
        let persistence: &[&str] = if self.aof {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let node_dir = self.dir.join(&port);
        std::fs::create_dir_all(&node_dir).unwrap();
        Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(persistence)
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-port", &self.bus_ports[i].to_string()])
            .args(["--cluster-node-timeout", "1000"])
            // Replicas sync at once and may always take over: a test kills masters early.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--cluster-replica-validity-factor", "0"])
            .arg("--cluster-config-file")
            .arg(node_dir.join("nodes.conf"))
            .arg("--dir")
            .arg(&node_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)")
    }

    /// The seed list for `redis.cluster_urls`.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node (index) serving `key` as master, if one does (not during a failover).
    pub fn master_of(&self, key: &str) -> Option<usize> {
        let port = self.ports[self.children.iter().position(Option::is_some).unwrap()];
        let slot = redis_cli(port, &["cluster", "keyslot", key]);
        let slot: u16 = slot.trim().parse().unwrap();
        let nodes = redis_cli(port, &["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                let port: u16 = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
                return self.ports.iter().position(|p| *p == port);
            }
        }
        None
    }

    /// Starts every stopped node again on its port, with its cluster config (and its data when
    /// started with an append-only file), and waits until the cluster serves every slot.
    pub fn restart_all(&mut self) {
        for i in 0..self.ports.len() {
            if self.children[i].is_none() {
                self.children[i] = Some(self.spawn(i));
            }
        }
        let deadline = Instant::now() + PATIENCE;
        for &port in &self.ports {
            wait_for_ping(port);
            while !redis_cli(port, &["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not come back");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Moves the slot of `key` from node `from` to node `to` (both masters), keys included, the
    /// way `redis-cli --cluster reshard` does, and waits until every node agrees.
    pub fn move_slot_of(&self, key: &str, from: usize, to: usize) {
        let (src, dst) = (self.ports[from], self.ports[to]);
        let slot = redis_cli(src, &["cluster", "keyslot", key])
            .trim()
            .to_string();
        let id = |port: u16| redis_cli(port, &["cluster", "myid"]).trim().to_string();
        let (src_id, dst_id) = (id(src), id(dst));
        redis_cli(dst, &["cluster", "setslot", &slot, "importing", &src_id]);
        redis_cli(src, &["cluster", "setslot", &slot, "migrating", &dst_id]);
        loop {
            let keys = redis_cli(src, &["cluster", "getkeysinslot", &slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["migrate", "127.0.0.1"];
            let dst_port = dst.to_string();
            args.extend([dst_port.as_str(), "", "0", "5000", "KEYS"]);
            args.extend(keys.iter().copied());
            let out = redis_cli(src, &args);
            assert!(out.contains("OK"), "MIGRATE failed: {out}");
        }
        for &port in &self.ports {
            redis_cli(port, &["cluster", "setslot", &slot, "node", &dst_id]);
        }
        let deadline = Instant::now() + PATIENCE;
        for &port in &self.ports {
            loop {
                let nodes = redis_cli(port, &["cluster", "nodes"]);
                let owner = nodes.lines().find(|l| {
                    l.starts_with(&dst_id)
                        && l.split_whitespace().skip(8).any(|r| {
                            let (lo, hi) = r.split_once('-').unwrap_or((r, r));
                            let s: u16 = slot.parse().unwrap();
                            lo.parse::<u16>().is_ok_and(|lo| lo <= s)
                                && hi.parse::<u16>().is_ok_and(|hi| s <= hi)
                        })
                });
                if owner.is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "slot {slot} did not move: {nodes}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The running nodes' process ids.
    pub fn pids(&self) -> Vec<String> {
        self.children
            .iter()
            .flatten()
            .map(|c| c.id().to_string())
            .collect()
    }

    /// SIGKILL one node, as a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether `port`'s node reports the cluster as serving every slot.
    pub fn ok_on(&self, i: usize) -> bool {
        redis_cli(self.ports[i], &["cluster", "info"]).contains("cluster_state:ok")
    }

    pub async fn conn(&self) -> RedisConn {
        conn_to(&self.urls()).await.unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for_ping(port: u16) {
    let deadline = Instant::now() + PATIENCE;
    while !redis_cli(port, &["ping"]).contains("PONG") {
        assert!(
            Instant::now() < deadline,
            "redis-server did not start on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Redis with Sentinel: a primary, two replicas (`replicaof`) and three Sentinels (quorum 2,
/// a node counts as down after 2 s), every process on a free loopback port and killed on drop.
/// A failover completes a few seconds after the primary dies.
pub struct Sentinels {
    /// The data nodes' ports; the first started as the primary.
    pub node_ports: Vec<u16>,
    /// The Sentinels' ports.
    pub sentinel_ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
    sentinels: Vec<Option<Child>>,
    dir: PathBuf,
    /// The data nodes' password (`requirepass`, `masterauth`, Sentinel's `auth-pass`), if any.
    data_password: Option<String>,
    /// The Sentinels' own password (`requirepass`, `sentinel-pass`), if any.
    sentinel_password: Option<String>,
    /// An ACL user on every Sentinel besides `default` (name, password): the replicas then
    /// sign in to the Sentinels as it (`redis.sentinel_username`), not as `default`.
    sentinel_user: Option<(String, String)>,
}

/// The master name the test Sentinels monitor.
pub const SENTINEL_MASTER: &str = "wsbridge-test";

impl Sentinels {
    pub fn start() -> Self {
        Self::start_with_auth(None, None)
    }

    /// As [`Sentinels::start`], with passwords on the data nodes and on the Sentinels.
    pub fn start_with_auth(data_password: Option<&str>, sentinel_password: Option<&str>) -> Self {
        Self::start_inner(data_password, sentinel_password, None)
    }

    /// As [`Sentinels::start_with_auth`], with an ACL user `name` on every Sentinel as which the
    /// replicas sign in to them (the `default` user keeps `sentinel_password`).
    pub fn start_with_sentinel_user(
        data_password: &str,
        sentinel_password: &str,
        name: &str,
        password: &str,
    ) -> Self {
        Self::start_inner(
            Some(data_password),
            Some(sentinel_password),
            Some((name.to_owned(), password.to_owned())),
        )
    }

    fn start_inner(
        data_password: Option<&str>,
        sentinel_password: Option<&str>,
        sentinel_user: Option<(String, String)>,
    ) -> Self {
        let dir = scratch_dir();
        let node_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let sentinel_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut fixture = Sentinels {
            node_ports: node_ports.clone(),
            sentinel_ports: sentinel_ports.clone(),
            nodes: Vec::new(),
            sentinels: Vec::new(),
            dir,
            data_password: data_password.map(str::to_owned),
            sentinel_password: sentinel_password.map(str::to_owned),
            sentinel_user,
        };
        for i in 0..3 {
            let replica_of = (i > 0).then_some(node_ports[0]);
            let child = fixture.spawn_node(i, replica_of);
            fixture.nodes.push(Some(child));
        }
        for &port in &node_ports {
            fixture.wait_ping(port);
        }
        let deadline = Instant::now() + PATIENCE;
        for &port in &node_ports[1..] {
            while !fixture
                .cli(port, &["info", "replication"])
                .contains("master_link_status:up")
            {
                assert!(Instant::now() < deadline, "replica {port} did not sync");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // down-after-milliseconds is 2000, not 1000: a Sentinel pings every min(down-after, 1 s),
        // so with 1000 the link to a just promoted primary, still being made, sometimes looked
        // down for a moment, and a second, needless failover followed, losing what had been
        // written to the first new primary (seen on a loaded 2-core machine).
        for (i, port) in sentinel_ports.iter().enumerate() {
            let conf = fixture.dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel-{i}.log\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 2000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 2\n{auth}",
                    dir = fixture.dir.display(),
                    primary = node_ports[0],
                    auth = fixture.sentinel_auth_lines(),
                ),
            )
            .unwrap();
            let child = fixture.spawn_sentinel(i);
            fixture.sentinels.push(Some(child));
        }
        // A failover needs the Sentinels to know each other (they meet through the primary's
        // hello channel, every 2 s) and the replicas.
        for &port in &sentinel_ports {
            fixture.wait_ping(port);
            loop {
                let master = fixture.cli(port, &["sentinel", "master", SENTINEL_MASTER]);
                let field = |name: &str| {
                    let lines: Vec<&str> = master.lines().collect();
                    lines
                        .iter()
                        .position(|l| *l == name)
                        .and_then(|i| lines.get(i + 1))
                        .map(|v| v.to_string())
                };
                if field("num-other-sentinels").as_deref() == Some("2")
                    && field("num-slaves").as_deref() == Some("2")
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline + PATIENCE,
                    "Sentinel {port} did not meet the others: {master}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        fixture
    }

    /// The lines of a Sentinel's config file for the passwords.
    fn sentinel_auth_lines(&self) -> String {
        let mut lines = String::new();
        if let Some(password) = &self.data_password {
            lines += &format!("sentinel auth-pass {SENTINEL_MASTER} {password}\n");
        }
        if let Some(password) = &self.sentinel_password {
            lines += &format!("requirepass {password}\nsentinel sentinel-pass {password}\n");
        }
        if let Some((name, password)) = &self.sentinel_user {
            lines += &format!("user {name} on >{password} allchannels +@all\n");
        }
        lines
    }

    /// `redis-cli` against `port` (a data node or a Sentinel), with its password.
    fn cli(&self, port: u16, args: &[&str]) -> String {
        let password = if self.sentinel_ports.contains(&port) {
            &self.sentinel_password
        } else {
            &self.data_password
        };
        match password {
            Some(password) => {
                let mut all = vec!["-a", password.as_str(), "--no-auth-warning"];
                all.extend_from_slice(args);
                redis_cli(port, &all)
            }
            None => redis_cli(port, args),
        }
    }

    fn wait_ping(&self, port: u16) {
        let deadline = Instant::now() + PATIENCE;
        while !self.cli(port, &["ping"]).contains("PONG") {
            assert!(Instant::now() < deadline, "no PONG from {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn_node(&self, i: usize, replica_of: Option<u16>) -> Child {
        let port = self.node_ports[i].to_string();
        let node_dir = self.dir.join(&port);
        std::fs::create_dir_all(&node_dir).unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&node_dir);
        if let Some(primary) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        if let Some(password) = &self.data_password {
            cmd.args(["--requirepass", password, "--masterauth", password]);
        }
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)")
    }

    /// Debian's `redis-sentinel` when installed, else `redis-server --sentinel` (the same
    /// program). The Sentinel rewrites its config file, so a restart resumes what it knew.
    fn spawn_sentinel(&self, i: usize) -> Child {
        let conf = self.dir.join(format!("sentinel-{i}.conf"));
        let mut cmd = if Command::new("sh")
            .args(["-c", "command -v redis-sentinel"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            let mut cmd = Command::new("redis-sentinel");
            cmd.arg(&conf);
            cmd
        } else {
            let mut cmd = Command::new("redis-server");
            cmd.arg(&conf).arg("--sentinel");
            cmd
        };
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-sentinel (or redis-server) must be installed")
    }

    /// The `[redis]` keys of a replica using these Sentinels.
    pub fn redis_keys(&self) -> String {
        let urls: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("\"redis://127.0.0.1:{p}\""))
            .collect();
        let mut keys = format!(
            "sentinel_urls = [{}]\nsentinel_master = \"{SENTINEL_MASTER}\"\n",
            urls.join(", ")
        );
        match (&self.sentinel_user, &self.sentinel_password) {
            (Some((name, password)), _) => {
                keys += &format!(
                    "sentinel_username = \"{name}\"\nsentinel_password = \"{password}\"\n"
                );
            }
            (None, Some(password)) => keys += &format!("sentinel_password = \"{password}\"\n"),
            (None, None) => {}
        }
        keys
    }

    /// A replica config ([`base_config`]) that finds the primary through these Sentinels.
    /// Health is checked every 100 ms and a link is down after 600 ms without an answer, so
    /// that the replicas notice a dead primary well before Sentinel has promoted another.
    pub fn config(&self, prefix: &str) -> String {
        base_config(&self.data_url(6379), prefix)
            .replacen("[redis]\n", &format!("[redis]\n{}", self.redis_keys()), 1)
            .replacen("health_interval_ms = 200", "health_interval_ms = 100", 1)
            .replacen("unhealthy_after_ms = 1000", "unhealthy_after_ms = 600", 1)
    }

    /// A data node's URL, with its password.
    fn data_url(&self, port: u16) -> String {
        match &self.data_password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{port}"),
            None => format!("redis://127.0.0.1:{port}"),
        }
    }

    /// The primary's port as the first answering Sentinel names it.
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinel_ports.iter().find_map(|&port| {
            let out = self.cli(
                port,
                &["sentinel", "get-master-addr-by-name", SENTINEL_MASTER],
            );
            out.lines().nth(1)?.trim().parse().ok()
        })
    }

    /// The index of the node with port `port`.
    pub fn node_index(&self, port: u16) -> usize {
        self.node_ports.iter().position(|&p| p == port).unwrap()
    }

    /// Whether node `i` answers ROLE with `role` (`master`, `slave`) and, as a replica, is
    /// synced with its primary.
    pub fn node_is(&self, i: usize, role: &str) -> bool {
        let port = self.node_ports[i];
        let info = self.cli(port, &["info", "replication"]);
        info.contains(&format!("role:{role}"))
            && (role == "master" || info.contains("master_link_status:up"))
    }

    /// SIGKILL data node `i`.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes data node `i` (SIGSTOP: its connections stay open, nothing answers) or thaws it.
    pub fn freeze_node(&self, i: usize, frozen: bool) {
        let pid = self.nodes[i].as_ref().expect("running").id();
        signal_pid(pid, if frozen { "-STOP" } else { "-CONT" });
    }

    /// Starts data node `i` again, empty and as a primary of its own: Sentinel must turn it into
    /// a replica of the current primary.
    pub fn restart_node(&mut self, i: usize) {
        self.kill_node(i);
        let child = self.spawn_node(i, None);
        self.nodes[i] = Some(child);
        self.wait_ping(self.node_ports[i]);
    }

    /// SIGKILL Sentinel `i`.
    pub fn kill_sentinel(&mut self, i: usize) {
        if let Some(mut child) = self.sentinels[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Sentinel `i` again from its (rewritten) config file.
    pub fn restart_sentinel(&mut self, i: usize) {
        self.kill_sentinel(i);
        let child = self.spawn_sentinel(i);
        self.sentinels[i] = Some(child);
        self.wait_ping(self.sentinel_ports[i]);
    }

    /// A connection to node `i`.
    pub async fn node_conn(&self, i: usize) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.data_url(self.node_ports[i]))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for i in 0..self.sentinels.len() {
            self.kill_sentinel(i);
        }
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        if std::thread::panicking() {
            eprintln!("Sentinel logs kept in {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client's next data frame within `wait`.
pub async fn frame_within(client: &mut Client, wait: Duration, what: &str) -> Value {
    tokio::time::timeout(wait, client.next_frame())
        .await
        .unwrap_or_else(|_| panic!("no frame within {wait:?}: {what}"))
        .expect("the connection stays open")
        .expect("a data frame, not a close")
}

/// Messages `from..=to` to `channel` through `gw`, one call each; their offsets.
pub async fn publish_numbered(gw: &Gateway, channel: &str, from: u64, to: u64) -> Vec<Value> {
    let mut offsets = Vec::new();
    for n in from..=to {
        let (status, answer) = gw
            .post("/send", &json!({"to": {"channel": channel}, "data": n}))
            .await;
        assert_eq!(status, 202, "{answer}");
        offsets.push(answer["offsets"][0].clone());
    }
    offsets
}
