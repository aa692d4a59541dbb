//! The load generator's small mode, as CI runs it: a few hundred real clients on two replicas,
//! and every count exact (never a timing). Fan-out to a channel, messages to each connection and
//! to each user, client sends into a stream, and two load generators sharing one fan-out.

use serde_json::Value;

use crate::common::*;
use crate::examples::rust_example;

const CLIENTS: usize = 300;

/// Runs `examples/loadgen` with `args` against replicas `a` (clients on both) publishing through
/// `b`; returns its JSON report after checking it exited 0.
async fn loadgen(a: &Gateway, b: &Gateway, args: &[&str]) -> Value {
    let json = scratch_dir().join("report.json");
    let ws = format!("{},{}", a.ws_url, b.ws_url);
    let pids = format!("{},{}", a.pid(), b.pid());
    let clients = CLIENTS.to_string();
    let out = tokio::process::Command::new(rust_example("loadgen"))
        .args(["--target", "wsbridge", "--ws", &ws, "--api", &b.api_url])
        .args(["--clients", &clients, "--pids", &pids, "--timeout-s", "60"])
        .args(["--json", json.to_str().unwrap(), "--quiet"])
        .args(args)
        .output()
        .await
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadgen {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn assert_exact(report: &Value, per_client: u64) {
    assert_eq!(report["exact"], true, "{report:#}");
    assert_eq!(report["expected_per_client"], per_client, "{report:#}");
    assert_eq!(
        report["delivered_total"],
        per_client * CLIENTS as u64,
        "{report:#}"
    );
    assert_eq!(report["clients_short"], 0);
    assert_eq!(report["clients_over"], 0);
    assert_eq!(report["out_of_order"], 0);
    assert_eq!(report["connections_lost"], 0);
}

#[tokio::test]
async fn every_client_gets_every_fanout_and_direct_message() {
    // The load generator runs twice, each run bounded by its own --timeout-s 60.
    deadline(TEST_DEADLINE * 3, async {
        let redis = Redis::start();
        let prefix = unique_prefix("loadgen");
        let a = Gateway::start(&redis, &prefix).await;
        let b = Gateway::start(&redis, &prefix).await;

        // A burst of 200 channel messages in calls of 20, then 30 at a steady 100/s one per call.
        let burst = loadgen(
            &a,
            &b,
            &["--scenario", "fanout", "--messages", "200", "--batch", "20"],
        )
        .await;
        assert_exact(&burst, 200);
        let paced = loadgen(
            &a,
            &b,
            &["--scenario", "fanout", "--messages", "30", "--rate", "100"],
        )
        .await;
        assert_exact(&paced, 30);
        assert!(paced["latency_ms"]["p99"].is_number(), "{paced:#}");
        // Each round one message to every connection by its id.
        let direct = loadgen(
            &a,
            &b,
            &["--scenario", "direct", "--messages", "5", "--batch", "100"],
        )
        .await;
        assert_exact(&direct, 5);
        // The gateways' own count agrees: every delivery went through one of them.
        let deliveries = a.metric("wsbridge_deliveries_total").await
            + b.metric("wsbridge_deliveries_total").await;
        assert!(deliveries >= (235 * CLIENTS) as f64, "{deliveries}");
    })
    .await;
}

#[tokio::test]
async fn every_user_gets_its_messages_and_every_client_send_is_stored() {
    // The load generator runs twice, each run bounded by its own --timeout-s 60.
    deadline(TEST_DEADLINE * 3, async {
        let redis = Redis::start();
        let prefix = unique_prefix("loadgen-users");
        let secret = [("WSBRIDGE__AUTH__JWT_SECRET", "loadgen-secret")];
        let a = Gateway::start_with(&redis, &prefix, &secret).await;
        let b = Gateway::start_with(&redis, &prefix, &secret).await;

        let users = loadgen(
            &a,
            &b,
            &[
                "--scenario",
                "user",
                "--jwt-secret",
                "loadgen-secret",
                "--messages",
                "5",
                "--batch",
                "100",
            ],
        )
        .await;
        assert_exact(&users, 5);

        let inbound = loadgen(
            &a,
            &b,
            &[
                "--scenario",
                "inbound",
                "--messages",
                "20",
                "--window",
                "8",
                "--jwt-secret",
                "loadgen-secret",
            ],
        )
        .await;
        assert_exact(&inbound, 20);
        let mut conn = redis.conn().await;
        let len: u64 = redis::cmd("XLEN")
            .arg(format!("{prefix}:in:chat"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            len,
            20 * CLIENTS as u64,
            "every acked send is one stream entry"
        );
    })
    .await;
}

/// Two load generators share one fan-out, as `bench/growth.sh` runs six (one process may open
/// only so many sockets): each holds the clients of one replica, both wait for the go file once
/// theirs have joined, and only the first publishes; the other counts the same messages exactly,
/// and times them by the same clock.
#[tokio::test]
async fn two_load_generators_share_one_fanout() {
    deadline(TEST_DEADLINE * 2, async {
        let redis = Redis::start();
        let prefix = unique_prefix("loadgen-shared");
        let a = Gateway::start(&redis, &prefix).await;
        let b = Gateway::start(&redis, &prefix).await;
        let dir = scratch_dir();
        let go = dir.join("go");
        let clients = CLIENTS.to_string();
        let spawn = |gw: &Gateway, name: &str, extra: &[&str]| {
            tokio::process::Command::new(rust_example("loadgen"))
                .args(["--target", "wsbridge", "--scenario", "fanout"])
                .args(["--ws", &gw.ws_url, "--api", &gw.api_url])
                .args(["--clients", &clients, "--messages", "30", "--rate", "100"])
                .args(["--pids", &gw.pid().to_string(), "--timeout-s", "60"])
                .arg("--ready-file")
                .arg(dir.join(format!("{name}.ready")))
                .arg("--go-file")
                .arg(&go)
                .arg("--json")
                .arg(dir.join(format!("{name}.json")))
                .arg("--quiet")
                .args(extra)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("run loadgen")
        };
        let publisher = spawn(&a, "publisher", &["--first-source", "1"]);
        let receiver = spawn(&b, "receiver", &["--first-source", "11", "--receive-only"]);

        eventually_within("both load generators joined", PATIENCE * 3, || async {
            dir.join("publisher.ready").exists() && dir.join("receiver.ready").exists()
        })
        .await;
        // Ready, but nothing measured before the go file: no report yet.
        assert!(!dir.join("publisher.json").exists());
        assert!(!dir.join("receiver.json").exists());
        std::fs::write(&go, "").unwrap();

        for (name, child) in [("publisher", publisher), ("receiver", receiver)] {
            let out = child.wait_with_output().await.unwrap();
            assert!(
                out.status.success(),
                "{name} failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let read = |name: &str| -> Value {
            serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap())
                .unwrap()
        };
        let (published, received) = (read("publisher"), read("receiver"));
        assert_exact(&published, 30);
        assert_exact(&received, 30);
        assert_eq!(received["publish_calls"], 0, "{received:#}");
        assert_eq!(published["publish_calls"], 30, "{published:#}");
        // The receiver's latency is from the publisher's stamp: on another clock it would be
        // clamped to 1 µs or to the histogram's top (600 s).
        let p50 = received["latency_ms"]["p50"].as_f64().unwrap();
        assert!(p50 > 0.005 && p50 < 5_000.0, "{received:#}");
    })
    .await;
}
