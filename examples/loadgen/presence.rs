//! The presence scenarios (issue 16): what joins and leaves cost, how fast presence converges
//! in a connection storm, what a watcher sees, and how fast a killed replica's members leave.
//!
//! - `churn`: `--clients` connect and subscribe to `--channel`, then all disconnect. Reports
//!   the gateways' CPU per join (connect + subscribe + disconnect, everything the gateways did
//!   from the first connect until presence is back to where it started and `--settle-ms` more).
//!   Run it against a presence channel and a plain one; the Redis command counts per join come
//!   from `INFO commandstats` around the run (bench/presence.sh).
//! - `storm`: `--watchers` clients subscribe first (spread over `--ws`), then `--clients` connect
//!   and subscribe as fast as `--connect-concurrency` allows. Reports the time until
//!   `POST /presence` counts every connection and until every watcher has seen every storm
//!   client's `join`. With `--probe-rate R`, `--probe-clients` subscribers of `--probe-channel`
//!   (not a presence channel) get R messages/s published during the storm: delivery latency of
//!   ordinary messages while joins flood Redis (`--clients 0` gives the same without a storm).
//! - `kill`: `--clients` members on the first `--ws`, `--watchers` on the others; once presence
//!   counts them all, SIGKILL `--kill-pid` (the first replica) and report the time until every
//!   watcher has seen every member's `leave` and until `POST /presence` (on `--api`, a
//!   surviving replica) counts only the watchers.
//! - `query`: `--messages` calls of `POST /presence` on `--channel` with `--limit` (0: the
//!   server's default), one at a time: latency p50/p99 and what the first page held.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::proto::{self, Incoming, Kind, Ws};
use crate::publish::{Publisher, To};
use crate::{cpu_of, cpu_seconds, log, print_table, token, Args, Scenario, CONNECT_ATTEMPTS};

/// What a connection counts.
#[derive(Clone, Copy)]
enum Role {
    /// Counts `join` and `leave` frames, in slot `usize`.
    Watcher(usize),
    /// Counts frames.
    Member,
    /// Records the latency of published messages.
    Probe,
}

struct Counts {
    started: Instant,
    joins: Vec<AtomicU64>,
    leaves: Vec<AtomicU64>,
    member_frames: AtomicU64,
    /// Connections that ended.
    ended: AtomicUsize,
    probe_got: AtomicU64,
    probe_hist: Mutex<Histogram<u64>>,
}

impl Counts {
    fn new(watchers: usize) -> Self {
        Self {
            started: Instant::now(),
            joins: (0..watchers).map(|_| AtomicU64::new(0)).collect(),
            leaves: (0..watchers).map(|_| AtomicU64::new(0)).collect(),
            member_frames: AtomicU64::new(0),
            ended: AtomicUsize::new(0),
            probe_got: AtomicU64::new(0),
            probe_hist: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()),
        }
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn count(&self, role: Role, text: &str) {
        match role {
            Role::Watcher(i) => {
                if text.starts_with(r#"{"type":"join""#) {
                    self.joins[i].fetch_add(1, Ordering::Relaxed);
                } else if text.starts_with(r#"{"type":"leave""#) {
                    self.leaves[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            Role::Member => {
                self.member_frames.fetch_add(1, Ordering::Relaxed);
            }
            Role::Probe => {
                if let Incoming::Message(p) = Kind::Wsbridge.incoming(text) {
                    if p.w == 0 {
                        let us = self.now_us().saturating_sub(p.t).max(1);
                        self.probe_hist.lock().unwrap().saturating_record(us);
                        self.probe_got.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// Connects, subscribes to `channel` and counts what arrives until then (a watcher may see
/// joins before its `subscribed`); the connection is then read by a task of its own, which
/// holds it until `close` is notified.
struct Client {
    close: Arc<tokio::sync::Notify>,
    done: tokio::task::JoinHandle<()>,
}

async fn connect(
    url: &str,
    source: Ipv4Addr,
    channel: &str,
    role: Role,
    counts: &Counts,
) -> Result<Ws, String> {
    let mut ws = proto::open(url, source).await?;
    let welcome = proto::next_text(&mut ws).await?;
    if !welcome.starts_with(r#"{"type":"welcome""#) {
        return Err(format!("expected welcome, got {welcome}"));
    }
    proto::send_text(
        &mut ws,
        format!(r#"{{"type":"subscribe","channel":"{channel}","id":"s"}}"#),
    )
    .await?;
    loop {
        let text = proto::next_text(&mut ws).await?;
        if text.starts_with(r#"{"type":"subscribed""#) {
            return Ok(ws);
        }
        if text.starts_with(r#"{"type":"error""#) {
            return Err(format!("subscribe refused: {text}"));
        }
        counts.count(role, &text);
    }
}

async fn connect_retrying(
    url: String,
    source: Ipv4Addr,
    channel: String,
    role: Role,
    counts: Arc<Counts>,
    retries: Arc<AtomicU64>,
) -> Result<Client, String> {
    let mut attempt = 0;
    let ws = loop {
        match connect(&url, source, &channel, role, &counts).await {
            Ok(ws) => break ws,
            Err(e) if attempt < CONNECT_ATTEMPTS => {
                attempt += 1;
                retries.fetch_add(1, Ordering::Relaxed);
                if attempt == 1 {
                    eprintln!("loadgen: {url} from {source}: {e}; retrying");
                }
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let close = Arc::new(tokio::sync::Notify::new());
    let done = tokio::spawn(hold(ws, role, counts, close.clone()));
    Ok(Client { close, done })
}

/// Reads frames until the connection ends, or closes it when told to.
async fn hold(ws: Ws, role: Role, counts: Arc<Counts>, close: Arc<tokio::sync::Notify>) {
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(t))) => counts.count(role, &t),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            _ = close.notified() => {
                let _ = sink.send(Message::Close(None)).await;
                // Wait for the gateway's close (or the end of the connection).
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Some(Ok(m)) = stream.next().await {
                        if matches!(m, Message::Close(_)) { break; }
                    }
                }).await;
                break;
            }
        }
    }
    counts.ended.fetch_add(1, Ordering::Relaxed);
}

/// Connects `n` clients to `endpoints` (round robin), `concurrency` at a time, from source
/// addresses starting at `*next_source`'s index, each subscribed to `channel`.
#[allow(clippy::too_many_arguments)]
async fn connect_many(
    a: &Args,
    endpoints: &[String],
    n: usize,
    first: usize,
    channel: &str,
    role: impl Fn(usize) -> Role,
    counts: &Arc<Counts>,
    retries: &Arc<AtomicU64>,
) -> Result<Vec<Client>, String> {
    let gate = Arc::new(Semaphore::new(a.connect_concurrency));
    let mut joins = Vec::with_capacity(n);
    for i in 0..n {
        let k = first + i;
        let source = Ipv4Addr::new(127, 0, 0, a.first_source + (k / a.per_source) as u8);
        let endpoint = &endpoints[i % endpoints.len()];
        let url = Kind::Wsbridge.url(
            endpoint,
            channel,
            a.jwt_secret
                .as_ref()
                .map(|s| token(s, &format!("u{k}")))
                .as_deref(),
        );
        let gate = gate.clone();
        let fut = connect_retrying(
            url,
            source,
            channel.to_owned(),
            role(i),
            counts.clone(),
            retries.clone(),
        );
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("gate");
            fut.await
        }));
    }
    let mut clients = Vec::with_capacity(n);
    for (i, j) in joins.into_iter().enumerate() {
        clients.push(
            j.await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("client {i}: {e}"))?,
        );
    }
    Ok(clients)
}

/// `POST /presence` for `channel`: (connections, users, members on the page, cursor given).
async fn ask(
    api: &mut Publisher,
    channel: &str,
    limit: Option<u64>,
) -> Result<(u64, u64, usize, bool), String> {
    let body = match limit {
        Some(l) => json!({"channel": channel, "limit": l}),
        None => json!({"channel": channel}),
    };
    let (status, bytes) = api.request("/presence", body.to_string()).await?;
    if status != 200 {
        return Err(format!(
            "POST /presence: {status} {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    Ok((
        v["connections"].as_u64().unwrap_or(0),
        v["users"].as_u64().unwrap_or(0),
        v["members"].as_array().map_or(0, Vec::len),
        !v["cursor"].is_null(),
    ))
}

/// Whether `channel` keeps presence on this gateway (POST /presence answers 200).
async fn has_presence(api: &mut Publisher, channel: &str) -> Result<bool, String> {
    let (status, _) = api
        .request("/presence", json!({"channel": channel}).to_string())
        .await?;
    Ok(status == 200)
}

/// Polls the presence count every 20 ms until it is `want`; the time it took, or None.
async fn converge(
    api: &mut Publisher,
    channel: &str,
    want: u64,
    since: Instant,
    deadline: Instant,
) -> Result<Option<f64>, String> {
    loop {
        // An overloaded replica answers 503 (its Redis command timed out): ask again.
        let connections = match ask(api, channel, Some(1)).await {
            Ok((connections, ..)) => connections,
            Err(e) if e.contains(": 503 ") && Instant::now() < deadline => {
                eprintln!("loadgen: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if connections == want {
            return Ok(Some(since.elapsed().as_secs_f64()));
        }
        if Instant::now() > deadline {
            eprintln!("loadgen: presence of {channel} stuck at {connections}, want {want}");
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (polling every 10 ms) until `done()`; the time since `since`, or None at the deadline.
async fn until(since: Instant, deadline: Instant, done: impl Fn() -> bool) -> Option<f64> {
    loop {
        if done() {
            return Some(since.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn run(a: Args) -> Result<bool, String> {
    let counts = Arc::new(Counts::new(a.watchers));
    let retries = Arc::new(AtomicU64::new(0));
    let mut api = Publisher::new(Kind::Wsbridge, &a.api, a.api_key.clone())?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let mut report = serde_json::Map::new();
    report.insert(
        "scenario".into(),
        json!(format!("{:?}", a.scenario).to_lowercase()),
    );
    report.insert("channel".into(), json!(a.channel));
    report.insert("clients".into(), json!(a.clients));
    report.insert("watchers".into(), json!(a.watchers));
    report.insert("replicas".into(), json!(a.ws.len()));
    let mut ok = true;

    match a.scenario {
        Scenario::Query => {
            let limit = (a.limit > 0).then_some(a.limit);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
            let mut first = None;
            for _ in 0..a.messages.max(1) {
                let t = Instant::now();
                let page = ask(&mut api, &a.channel, limit).await?;
                hist.saturating_record(t.elapsed().as_micros().max(1) as u64);
                first.get_or_insert(page);
            }
            let (connections, users, members, more) = first.unwrap();
            let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
            report.insert("limit".into(), json!(limit));
            report.insert("calls".into(), json!(a.messages.max(1)));
            report.insert("connections".into(), json!(connections));
            report.insert("users".into(), json!(users));
            report.insert("members_on_first_page".into(), json!(members));
            report.insert("more_pages".into(), json!(more));
            report.insert(
                "latency_ms".into(),
                json!({"p50": q(0.5), "p99": q(0.99), "max": hist.max() as f64 / 1000.0, "mean": hist.mean() / 1000.0}),
            );
        }
        Scenario::Churn => {
            let presence = has_presence(&mut api, &a.channel).await?;
            let before = if presence {
                ask(&mut api, &a.channel, Some(1)).await?.0
            } else {
                0
            };
            let cpu0 = cpu_of(&a.pids);
            let redis0 = a.redis_pid.and_then(cpu_seconds);
            let t0 = Instant::now();
            let clients = connect_many(
                &a,
                &a.ws,
                a.clients,
                0,
                &a.channel,
                |_| Role::Member,
                &counts,
                &retries,
            )
            .await?;
            let connect_s = t0.elapsed().as_secs_f64();
            let joined_s = if presence {
                converge(
                    &mut api,
                    &a.channel,
                    before + a.clients as u64,
                    t0,
                    deadline,
                )
                .await?
            } else {
                None
            };
            let t1 = Instant::now();
            for c in &clients {
                c.close.notify_one();
            }
            for c in clients {
                let _ = c.done.await;
            }
            let closed_s = t1.elapsed().as_secs_f64();
            let left_s = if presence {
                converge(&mut api, &a.channel, before, t1, deadline).await?
            } else {
                None
            };
            tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
            let cpu1 = cpu_of(&a.pids);
            let gateway_cpu: f64 = cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).sum();
            let redis_cpu = a
                .redis_pid
                .and_then(cpu_seconds)
                .zip(redis0)
                .map(|(b, a)| b - a);
            ok = !presence || (joined_s.is_some() && left_s.is_some());
            report.insert("presence".into(), json!(presence));
            report.insert("connect_s".into(), json!(connect_s));
            report.insert("presence_joined_s".into(), json!(joined_s));
            report.insert("close_s".into(), json!(closed_s));
            report.insert("presence_left_s".into(), json!(left_s));
            report.insert("settle_ms".into(), json!(a.settle_ms));
            report.insert("gateway_cpu_s".into(), json!(gateway_cpu));
            report.insert(
                "gateway_cpu_us_per_join".into(),
                json!(gateway_cpu / a.clients as f64 * 1e6),
            );
            report.insert("redis_cpu_s".into(), json!(redis_cpu));
            report.insert(
                "redis_cpu_us_per_join".into(),
                json!(redis_cpu.map(|c| c / a.clients as f64 * 1e6)),
            );
        }
        Scenario::Storm | Scenario::Kill => {
            let kill = a.scenario == Scenario::Kill;
            // Watchers: on every endpoint (storm), or on all but the first (kill).
            let watch_at: Vec<String> = if kill {
                a.ws[1..].to_vec()
            } else {
                a.ws.clone()
            };
            if watch_at.is_empty() {
                return Err("--scenario kill needs two --ws endpoints".into());
            }
            let watchers = connect_many(
                &a,
                &watch_at,
                a.watchers,
                0,
                &a.channel,
                Role::Watcher,
                &counts,
                &retries,
            )
            .await?;
            let probes = connect_many(
                &a,
                &a.ws,
                if a.probe_rate > 0.0 {
                    a.probe_clients
                } else {
                    0
                },
                a.watchers,
                &a.probe_channel,
                |_| Role::Probe,
                &counts,
                &retries,
            )
            .await?;
            let presence = has_presence(&mut api, &a.channel).await?;
            if presence {
                converge(
                    &mut api,
                    &a.channel,
                    a.watchers as u64,
                    Instant::now(),
                    deadline,
                )
                .await?
                .ok_or("watchers never counted")?;
            }
            // Joins of the watchers themselves are not the storm's.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let base: Vec<u64> = counts
                .joins
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
            // The probe publisher, until told to stop.
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let probe = (a.probe_rate > 0.0).then(|| {
                let (stop, counts) = (stop.clone(), counts.clone());
                let (api_url, key, channel, rate) = (
                    a.api.clone(),
                    a.api_key.clone(),
                    a.probe_channel.clone(),
                    a.probe_rate,
                );
                tokio::spawn(async move {
                    let mut p = Publisher::new(Kind::Wsbridge, &api_url, key)?;
                    let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    let (mut seq, mut failed) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        t.tick().await;
                        seq += 1;
                        let data = format!(r#"{{"seq":{seq},"t":{}}}"#, counts.now_us());
                        // An overloaded replica may answer 503: count it and go on.
                        if let Err(e) = p.publish(&[(To::Channel(&channel), data)]).await {
                            if failed == 0 {
                                eprintln!("loadgen: probe publish: {e}");
                            }
                            failed += 1;
                        }
                    }
                    Ok::<(u64, u64), String>((seq, failed))
                })
            });
            let cpu0 = cpu_of(&a.pids);
            let redis0 = a.redis_pid.and_then(cpu_seconds);
            let t0 = Instant::now();
            let storm_at: Vec<String> = if kill {
                a.ws[..1].to_vec()
            } else {
                a.ws.clone()
            };
            let members = connect_many(
                &a,
                &storm_at,
                a.clients,
                a.watchers + a.probe_clients,
                &a.channel,
                |_| Role::Member,
                &counts,
                &retries,
            )
            .await?;
            let connect_s = t0.elapsed().as_secs_f64();
            let want = (a.watchers + a.clients) as u64;
            let converged_s = if presence {
                converge(&mut api, &a.channel, want, t0, deadline).await?
            } else {
                None
            };
            let n = a.clients as u64;
            // A channel without join/leave frames: the watchers saw not even their own joins.
            let events = base.iter().any(|b| *b > 0);
            let joins_s = if !events {
                None
            } else {
                until(t0, deadline, || {
                    counts
                        .joins
                        .iter()
                        .zip(&base)
                        .all(|(c, b)| c.load(Ordering::Relaxed) - b >= n)
                })
                .await
            };
            if a.probe_ms > 0 {
                let left = Duration::from_millis(a.probe_ms).saturating_sub(t0.elapsed());
                tokio::time::sleep(left).await;
            }
            let storm_s = t0.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let published = match probe {
                Some(p) => Some(p.await.map_err(|e| e.to_string())??),
                None => None,
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cpu1 = cpu_of(&a.pids);
            let gateway_cpu: f64 = cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).sum();
            let redis_cpu = a
                .redis_pid
                .and_then(cpu_seconds)
                .zip(redis0)
                .map(|(b, a)| b - a);
            let joins: Vec<u64> = counts
                .joins
                .iter()
                .zip(&base)
                .map(|(c, b)| c.load(Ordering::Relaxed) - b)
                .collect();
            report.insert("presence".into(), json!(presence));
            report.insert("connect_s".into(), json!(connect_s));
            report.insert("presence_converged_s".into(), json!(converged_s));
            report.insert("watchers_saw_all_joins_s".into(), json!(joins_s));
            report.insert("joins_per_watcher_min".into(), json!(joins.iter().min()));
            report.insert("joins_per_watcher_max".into(), json!(joins.iter().max()));
            report.insert("storm_gateway_cpu_s".into(), json!(gateway_cpu));
            report.insert("storm_redis_cpu_s".into(), json!(redis_cpu));
            report.insert(
                "member_frames".into(),
                json!(counts.member_frames.load(Ordering::Relaxed)),
            );
            if let Some((published, failed)) = published {
                report.insert("probe_publish_failed".into(), json!(failed));
                let got = counts.probe_got.load(Ordering::Relaxed);
                let h = counts.probe_hist.lock().unwrap();
                let q = |p: f64| (!h.is_empty()).then(|| h.value_at_quantile(p) as f64 / 1000.0);
                report.insert("probe_window_s".into(), json!(storm_s));
                report.insert("probe_published".into(), json!(published));
                report.insert(
                    "probe_expected".into(),
                    json!(published * a.probe_clients as u64),
                );
                report.insert("probe_delivered".into(), json!(got));
                report.insert(
                    "probe_latency_ms".into(),
                    json!({"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": (!h.is_empty()).then(|| h.max() as f64 / 1000.0)}),
                );
            }
            report.insert("join_leave_frames".into(), json!(events));
            ok = (!presence || converged_s.is_some()) && (!events || joins_s.is_some());
            if kill {
                ok &= run_kill(&a, &mut api, &counts, presence, deadline, &mut report).await?;
            }
            drop(members);
            drop(watchers);
            drop(probes);
        }
        _ => unreachable!("not a presence scenario"),
    }
    report.insert(
        "connect_retries".into(),
        json!(retries.load(Ordering::Relaxed)),
    );
    report.insert("ok".into(), json!(ok));
    let report = Value::Object(report);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap())
            .map_err(|e| format!("--json {path}: {e}"))?;
    }
    print_table(&report);
    log(
        &a,
        if ok {
            "done"
        } else {
            "not everything converged"
        },
    );
    Ok(ok)
}

/// Kills `--kill-pid` and times the leaves the watchers see and the presence count.
async fn run_kill(
    a: &Args,
    api: &mut Publisher,
    counts: &Counts,
    presence: bool,
    deadline: Instant,
    report: &mut serde_json::Map<String, Value>,
) -> Result<bool, String> {
    let pid = a.kill_pid.ok_or("--scenario kill needs --kill-pid")?;
    if !presence {
        return Err("--scenario kill needs a presence channel".into());
    }
    let base: Vec<u64> = counts
        .leaves
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("kill -KILL {pid} failed"));
    }
    let t0 = Instant::now();
    let n = a.clients as u64;
    let deadline = deadline.max(Instant::now() + Duration::from_secs(60));
    let first_leave_s = until(t0, deadline, || {
        counts
            .leaves
            .iter()
            .zip(&base)
            .any(|(c, b)| c.load(Ordering::Relaxed) > *b)
    })
    .await;
    let leaves_s = until(t0, deadline, || {
        counts
            .leaves
            .iter()
            .zip(&base)
            .all(|(c, b)| c.load(Ordering::Relaxed) - b >= n)
    })
    .await;
    let converged_s = converge(api, &a.channel, a.watchers as u64, t0, deadline).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leaves: Vec<u64> = counts
        .leaves
        .iter()
        .zip(&base)
        .map(|(c, b)| c.load(Ordering::Relaxed) - b)
        .collect();
    report.insert("killed_pid".into(), json!(pid));
    report.insert("first_leave_after_kill_s".into(), json!(first_leave_s));
    report.insert("all_leaves_after_kill_s".into(), json!(leaves_s));
    report.insert("presence_after_kill_s".into(), json!(converged_s));
    report.insert("leaves_per_watcher_min".into(), json!(leaves.iter().min()));
    report.insert("leaves_per_watcher_max".into(), json!(leaves.iter().max()));
    Ok(leaves_s.is_some() && converged_s.is_some())
}
