//! The Grafana dashboard (`grafana/wsbridge.json`) against a real Prometheus scraping two real
//! replicas under load: every panel query and every variable query must return data, and no
//! panel may reference a metric the gateway does not export.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::common::*;

/// How long Prometheus may take to scrape the replicas, and then the queries to have data.
const DEADLINE: Duration = Duration::from_secs(60);
/// The Debian package's binary; `PROMETHEUS` overrides it.
const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// What Grafana's variables become. The rate window covers ten 1 s scrapes.
const SUBSTITUTIONS: [(&str, &str); 10] = [
    ("${__rate_interval}", "10s"),
    ("$__rate_interval", "10s"),
    ("${__interval}", "5s"),
    ("$__interval", "5s"),
    ("${__range}", "1m"),
    ("$__range", "1m"),
    ("${instance}", ".*"),
    ("$instance", ".*"),
    ("[[instance]]", ".*"),
    ("${datasource}", "prometheus"),
];

/// A real Prometheus server scraping the given targets every second, killed on drop.
struct Prometheus {
    child: Option<Child>,
    url: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(targets: &[String]) -> Self {
        let bin = std::env::var("PROMETHEUS").unwrap_or_else(|_| PROMETHEUS_BIN.to_string());
        assert!(
            Path::new(&bin).is_file(),
            "{bin} not found: the dashboard test runs a real Prometheus server. The README's test \
             command (tests/run.sh) installs it; by hand: `sudo apt-get install -y prometheus` \
             (Debian/Ubuntu), or point the PROMETHEUS environment variable at the binary."
        );
        let dir = std::env::temp_dir().join(format!(
            "wsbridge-it-prometheus-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: wsbridge\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        Prometheus {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    /// Fails the test at once when Prometheus has exited (bad flags, port taken, ...).
    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("Prometheus exited ({status}):\n{}", self.log_tail());
        }
    }

    /// The last lines Prometheus logged, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `GET` an API path; the `data` of a "success" answer, else Prometheus' error.
    async fn api(&self, path_and_query: &str) -> Result<Value, String> {
        let (status, body) =
            http("GET", &format!("{}{path_and_query}", self.url), None, None).await;
        if status == 0 {
            return Err(format!("Prometheus not answering: {body}"));
        }
        let answer: Value =
            serde_json::from_str(&body).map_err(|_| format!("HTTP {status}, not JSON: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!(
                "HTTP {status}, {}: {}",
                answer["errorType"].as_str().unwrap_or("?"),
                answer["error"].as_str().unwrap_or(&body)
            ));
        }
        Ok(answer["data"].clone())
    }

    /// Evaluates an instant query: the samples with a numeric (not NaN) value.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(expr)))
            .await?;
        let samples = match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![json!({"metric": {}, "value": data["result"]})],
            other => return Err(format!("unexpected result type {other:?}")),
        };
        if samples.is_empty() {
            return Err("no series".into());
        }
        let numeric: Vec<Value> = samples
            .into_iter()
            .filter(|s| s["value"][1].as_str().is_some_and(|v| v != "NaN"))
            .collect();
        if numeric.is_empty() {
            return Err("only NaN (nothing happened in the rate window)".into());
        }
        Ok(numeric)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query-string value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Replaces Grafana's variables; fails on any variable left over.
fn substitute(expr: &str) -> Result<String, String> {
    let mut out = expr.to_string();
    for (var, value) in SUBSTITUTIONS {
        out = out.replace(var, value);
    }
    match out.find('$') {
        Some(at) => Err(format!("unknown Grafana variable at `{}`", &out[at..])),
        None => Ok(out),
    }
}

/// One thing the dashboard asks Prometheus.
#[derive(Debug, Clone)]
enum Check {
    /// A panel target's PromQL.
    Expr { panel: String, expr: String },
    /// A variable's `label_values([metric,] label)`.
    LabelValues {
        variable: String,
        metric: Option<String>,
        label: String,
    },
}

impl Check {
    fn describe(&self) -> String {
        match self {
            Check::Expr { panel, expr } => format!("panel \"{panel}\": {expr}"),
            Check::LabelValues {
                variable,
                metric,
                label,
            } => format!(
                "variable ${variable}: label_values({}{label})",
                metric
                    .as_deref()
                    .map(|m| format!("{m}, "))
                    .unwrap_or_default()
            ),
        }
    }
}

fn all_panels(panels: &[Value]) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in panels {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(all_panels(nested));
        }
    }
    out
}

/// Every panel target and variable query, after checking the dashboard's conventions.
fn dashboard_checks(dashboard: &Value) -> Vec<Check> {
    let datasource = json!({"type": "prometheus", "uid": "${datasource}"});
    let mut checks = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in all_panels(dashboard["panels"].as_array().expect("panels")) {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id in \"{title}\""
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], datasource, "panel \"{title}\"");
        assert!(
            panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "panel \"{title}\" has no description"
        );
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel \"{title}\" has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr").to_string();
            assert_eq!(target["datasource"], datasource, "target of \"{title}\"");
            assert!(
                expr.contains("instance=~\"$instance\""),
                "\"{title}\" does not filter on $instance: {expr}"
            );
            checks.push(Check::Expr {
                panel: title.clone(),
                expr,
            });
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        let name = variable["name"].as_str().unwrap_or("?").to_string();
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]
            .as_str()
            .or(variable["query"]["query"].as_str())
            .unwrap_or_else(|| panic!("variable ${name} has no query"));
        let args = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable ${name}: only label_values() is checked: {query}"));
        let (metric, label) = match args.rsplit_once(',') {
            Some((metric, label)) => (Some(metric.trim().to_string()), label.trim().to_string()),
            None => (None, args.trim().to_string()),
        };
        checks.push(Check::LabelValues {
            variable: name,
            metric,
            label,
        });
    }
    let names: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap_or(""))
        .collect();
    assert!(names.contains(&"datasource") && names.contains(&"instance"));
    checks
}

/// Runs one check: Ok when Prometheus has data for it on every replica it is broken down by.
async fn run_check(
    prometheus: &Prometheus,
    check: &Check,
    replicas: &[String],
) -> Result<(), String> {
    match check {
        Check::Expr { expr, .. } => {
            let samples = prometheus.query(&substitute(expr)?).await?;
            let instances: BTreeSet<&str> = samples
                .iter()
                .filter_map(|s| s["metric"]["instance"].as_str())
                .collect();
            if !instances.is_empty() {
                let missing: Vec<&String> = replicas
                    .iter()
                    .filter(|r| !instances.contains(r.as_str()))
                    .collect();
                if !missing.is_empty() {
                    return Err(format!("no data for replica(s) {missing:?}"));
                }
            }
            Ok(())
        }
        Check::LabelValues { metric, label, .. } => {
            let mut path = format!("/api/v1/label/{label}/values");
            if let Some(metric) = metric {
                path.push_str(&format!(
                    "?{}={}",
                    encode("match[]"),
                    encode(&substitute(metric)?)
                ));
            }
            let values = prometheus.api(&path).await?;
            let values: Vec<&str> = values
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if values.is_empty() {
                return Err("no series".into());
            }
            if label == "instance" {
                let missing: Vec<&String> = replicas
                    .iter()
                    .filter(|r| !values.contains(&r.as_str()))
                    .collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "replica(s) {missing:?} not offered, got {values:?}"
                    ));
                }
            }
            Ok(())
        }
    }
}

/// Every string in a JSON document.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| {
            out.push(k.clone());
            strings(v, out);
        }),
        _ => {}
    }
}

/// Metric names in a text: `\b(wsbridge|process)_[a-z_]+`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["wsbridge_", "process_"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(prefix).map(|i| i + from) {
            from = at + prefix.len();
            let boundary =
                at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            if !boundary {
                continue;
            }
            let end = text[from..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .map_or(text.len(), |i| i + from);
            if end > from {
                names.insert(text[at..end].to_string());
            }
        }
    }
    names
}

/// Names exported in a Prometheus text exposition: sample and `# TYPE` names, and separately
/// the names declared as histograms.
fn exported_names(exposition: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut names, mut histograms) = (BTreeSet::new(), BTreeSet::new());
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                names.insert(name.to_string());
                if kind == "histogram" {
                    histograms.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    (names, histograms)
}

/// Spawns a client that drains its frames and, when `sends`, sends a `chat` frame every tick
/// (and now and then one to a stream that is not allowed). Closes cleanly on stop.
fn spawn_client(
    mut client: Client,
    sends: bool,
    mut stop: watch::Receiver<bool>,
    errors: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    let _ = client.ws.close(None).await;
                    return;
                }
                _ = tick.tick(), if sends => {
                    n += 1;
                    client
                        .send(json!({"type": "send", "stream": "chat", "data": {"n": n}, "id": format!("c{n}")}))
                        .await;
                    if n % 10 == 0 {
                        client
                            .send(json!({"type": "send", "stream": "not-configured", "data": n, "id": format!("r{n}")}))
                            .await;
                    }
                }
                frame = client.next_frame() => match frame {
                    Some(Ok(frame)) => {
                        let expected = match frame["type"].as_str() {
                            Some("message" | "ack") => true,
                            Some("error") => frame["code"] == "stream_not_allowed",
                            _ => false,
                        };
                        if !expected {
                            errors.lock().unwrap().push(format!("unexpected frame {frame}"));
                        }
                    }
                    other => {
                        errors.lock().unwrap().push(format!("client ended early: {other:?}"));
                        return;
                    }
                },
            }
        }
    })
}

/// Backend load: every ~100 ms, single and batched `POST /send` to both replicas, including
/// channels with subscribers on one replica only (so the other one filters), and now and then
/// a client that connects and closes.
fn spawn_backend(
    api: [String; 2],
    ws: [String; 2],
    mut stop: watch::Receiver<bool>,
    errors: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            n += 1;
            let calls = [
                (
                    &api[0],
                    json!([
                        {"to": {"channel": "room:shared"}, "data": {"n": n}},
                        {"to": {"channel": "room:only-b"}, "data": n},
                    ]),
                ),
                (
                    &api[1],
                    json!({"to": {"channel": "room:only-a"}, "data": {"n": n}}),
                ),
                (
                    &api[1],
                    json!({"to": {"channel": "room:shared"}, "data": "x".repeat(64)}),
                ),
            ];
            for (url, body) in calls {
                let (status, answer) = http(
                    "POST",
                    &format!("{url}/send"),
                    Some(&body.to_string()),
                    None,
                )
                .await;
                if status != 202 {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("POST /send: {status} {answer}"));
                }
            }
            if n % 10 == 0 {
                match Client::connect_url(&ws[(n / 10 % 2) as usize], false).await {
                    Ok(mut c) => {
                        let _ = c.ws.close(None).await;
                    }
                    Err(e) => errors.lock().unwrap().push(format!("connect: {e}")),
                }
            }
        }
    })
}

/// `host:port` of a replica's API listener, as Prometheus labels it (`instance`).
fn host_port(api_url: &str) -> String {
    api_url.trim_start_matches("http://").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_has_data_in_a_real_prometheus() {
    // Two phases wait up to DEADLINE (60 s) each for Prometheus.
    deadline(TEST_DEADLINE * 3, async {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/wsbridge.json");
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).expect(path))
            .expect("dashboard JSON");
        let checks = dashboard_checks(&dashboard);

        let redis = Redis::start();
        let prefix = unique_prefix("dashboard");
        let a = Gateway::start(&redis, &prefix).await;
        let b = Gateway::start(&redis, &prefix).await;
        let replicas = [host_port(&a.api_url), host_port(&b.api_url)];
        let mut prometheus = Prometheus::start(&replicas);

        // Clients in batches on both replicas: room:shared everywhere, room:only-a / room:only-b
        // on one replica each, so the other replica receives those messages and throws them away.
        let (stop_tx, stop) = watch::channel(false);
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (gw, own) in [(&a, "room:only-a"), (&b, "room:only-b")] {
            let batch = futures_util::future::join_all((0..4).map(|i| async move {
                if i == 3 {
                    Client::connect_msgpack(gw).await
                } else {
                    Client::connect(gw).await
                }
            }))
            .await;
            for (i, mut client) in batch.into_iter().enumerate() {
                client.subscribe("room:shared").await;
                if i == 0 {
                    client.subscribe(own).await;
                }
                tasks.push(spawn_client(client, i < 2, stop.clone(), errors.clone()));
            }
        }
        // One client that connects and closes right away.
        let mut once = Client::connect(&a).await;
        once.ws.close(None).await.unwrap();
        tasks.push(spawn_backend(
            [a.api_url.clone(), b.api_url.clone()],
            [a.ws_url.clone(), b.ws_url.clone()],
            stop.clone(),
            errors.clone(),
        ));

        // Prometheus scrapes both replicas.
        let deadline = Instant::now() + DEADLINE;
        loop {
            prometheus.assert_running();
            let up = prometheus.query("up{job=\"wsbridge\"} == 1").await;
            if matches!(&up, Ok(samples) if samples.len() == replicas.len()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus does not see both replicas up within {DEADLINE:?}: {up:?}\n\
             Prometheus log:\n{}",
                prometheus.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        // Every query has data, while the load runs.
        let deadline = Instant::now() + DEADLINE;
        let mut pending: Vec<(Check, String)> =
            checks.iter().map(|c| (c.clone(), String::new())).collect();
        loop {
            let mut failing = Vec::new();
            for (check, _) in pending {
                if let Err(e) = run_check(&prometheus, &check, &replicas).await {
                    failing.push((check, e));
                }
            }
            pending = failing;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let report: Vec<String> = pending
                    .iter()
                    .map(|(check, e)| format!("  {}\n    -> {e}", check.describe()))
                    .collect();
                panic!(
                    "{} of {} dashboard queries have no data after {DEADLINE:?}:\n{}\n\
                 load errors: {:?}\nPrometheus log:\n{}",
                    pending.len(),
                    checks.len(),
                    report.join("\n"),
                    errors.lock().unwrap(),
                    prometheus.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        stop_tx.send(true).unwrap();
        for task in tasks {
            task.await.unwrap();
        }
        let errors = errors.lock().unwrap().clone();
        assert!(errors.is_empty(), "load generation failed: {errors:?}");

        // No panel may reference a metric the gateway does not export.
        let mut texts = Vec::new();
        strings(&dashboard, &mut texts);
        let referenced: BTreeSet<String> = texts.iter().flat_map(|t| metric_names(t)).collect();
        assert!(
            referenced.len() > 20,
            "metric names not found: {referenced:?}"
        );
        let (mut exported, mut histograms) = (BTreeSet::new(), BTreeSet::new());
        for gw in [&a, &b] {
            let (status, text) = http("GET", &format!("{}/metrics", gw.api_url), None, None).await;
            assert_eq!(status, 200);
            let (names, hist) = exported_names(&text);
            exported.extend(names);
            histograms.extend(hist);
        }
        let missing: Vec<&String> = referenced
            .iter()
            .filter(|name| {
                let histogram = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s))
                    .any(|base| histograms.contains(base));
                !exported.contains(name.as_str()) && !histogram
            })
            .collect();
        assert!(
            missing.is_empty(),
            "the dashboard references metrics the gateway does not export: {missing:?}"
        );
    })
    .await;
}
