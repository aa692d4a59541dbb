//! The open-files limit: a replica raises its soft limit to the hard one, caps
//! `limits.max_connections` below it so that clients past the cap get a clean 503, and, when
//! descriptors do run out, says so once, counts it and recovers. Each replica here runs under
//! `prlimit` (util-linux) with a hard limit of 256 and a soft limit of 64.

use serde_json::json;
use tokio::net::TcpStream;

use crate::common::*;

/// Runs the replica with soft limit 64 and hard limit 256 for open files.
const PRLIMIT: [&str; 3] = ["prlimit", "--nofile=64:256", "--"];

async fn start_limited(redis: &Redis, prefix: &str, env: &[(&str, &str)]) -> Gateway {
    let gw = Gateway::spawn_under(&PRLIMIT, &base_config(&redis.url(), prefix), prefix, env);
    gw.wait_ready().await;
    gw
}

#[tokio::test]
async fn a_small_hard_limit_is_taken_whole_and_caps_connections_with_clean_refusals() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("nofile-cap");
        let gw = start_limited(&redis, &prefix, &[]).await;

        let logs = gw.log_text();
        assert!(
            logs.contains("open files limit raised from 64 to 256"),
            "{logs}"
        );
        // The default limits.max_connections (100000) cannot be held with 256 files: one warning
        // names the key, the limit and the cap (256 less the margin of 128).
        let warning = logs
            .lines()
            .find(|l| l.contains("WARN") && l.contains("limits.max_connections"))
            .unwrap_or_else(|| panic!("no warning about limits.max_connections in {logs}"));
        assert!(
            warning.contains("limits.max_connections (100000)")
                && warning.contains("may open 256")
                && warning.contains("accepting at most 128"),
            "{warning}"
        );
        assert_eq!(gw.metric("process_max_fds").await, 256.0);
        assert_eq!(gw.metric("wsbridge_connections_limit").await, 128.0);

        let mut clients = Vec::new();
        for _ in 0..128 {
            clients.push(Client::connect(&gw).await);
        }
        // One more is refused before the upgrade, with a status and a reason, not left hanging.
        match Client::connect_url(&gw.ws_url, false).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
                let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
                assert!(body.contains("too_many_connections"), "{body}");
            }
            Err(other) => panic!("expected HTTP 503, got {other:?}"),
            Ok(_) => panic!("connection 129 accepted under a cap of 128"),
        }
        assert_eq!(
            gw.metric("wsbridge_limit_refusals_total{limit=\"connections\"}")
                .await,
            1.0
        );
        // The replica stays ready and the connections it holds keep working.
        assert_eq!(gw.readyz().await.0, 200);
        let (first, rest) = clients.split_first_mut().unwrap();
        let last = rest.last_mut().unwrap();
        first.subscribe("room").await;
        last.subscribe("room").await;
        gw.send(json!({"to": {"channel": "room"}, "data": "still here"}))
            .await;
        for c in [first, last] {
            let frame = c.recv().await;
            assert_eq!(
                (frame["type"].as_str(), frame["data"].as_str()),
                (Some("message"), Some("still here")),
                "{frame}"
            );
        }
        assert!(!gw.log_text().contains("accept failed"));
    })
    .await;
}

#[tokio::test]
async fn running_out_of_descriptors_is_logged_once_counted_and_recovered_from() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("nofile-out");
        // Connections that never send a request hold a descriptor each until the handshake
        // timeout; long enough here that only the test lets them go.
        let gw = start_limited(
            &redis,
            &prefix,
            &[("WSBRIDGE__LIMITS__HANDSHAKE_TIMEOUT_SECONDS", "120")],
        )
        .await;
        let public = gw
            .ws_url
            .trim_start_matches("ws://")
            .trim_end_matches("/ws")
            .to_string();
        // More than the 256 descriptors the replica may open; those it cannot accept wait in the
        // listen backlog.
        let mut silent = Vec::new();
        for _ in 0..300 {
            silent.push(TcpStream::connect(&public).await.unwrap());
        }
        let out_of_files = "accept failed: out of file descriptors";
        eventually("the replica reports running out of descriptors", || async {
            gw.log_text().contains(out_of_files)
        })
        .await;
        // It keeps retrying (debug lines) without repeating the report.
        eventually("a retry fails too", || async {
            gw.log_text().contains("accept failed again")
        })
        .await;
        // A descriptor freed for a moment (a client that gave up) lets one waiting client in,
        // and the failures after it are not reported again so soon.
        drop(silent.remove(0));
        eventually("the next failures are not reported again", || async {
            gw.log_text()
                .contains("accept failed again soon after the last report")
        })
        .await;
        let logs = gw.log_text();
        let reports: Vec<&str> = logs.lines().filter(|l| l.contains(out_of_files)).collect();
        assert_eq!(reports.len(), 1, "{reports:#?}");
        assert!(
            reports[0].contains("open_files_limit=256")
                && reports[0].contains("websocket_connections=0")
                && reports[0].contains("limits.max_connections"),
            "{}",
            reports[0]
        );

        // Freed descriptors: the replica accepts again, says so, and counted every failure.
        drop(silent);
        eventually("the replica accepts again", || async {
            gw.log_text().contains("accepting again after")
        })
        .await;
        assert!(
            gw.metric("wsbridge_accept_errors_total{reason=\"open_files\"}")
                .await
                >= 2.0
        );
        assert_eq!(
            gw.metric("wsbridge_accept_errors_total{reason=\"other\"}")
                .await,
            0.0
        );
        assert_eq!(gw.readyz().await.0, 200);
        let mut client = Client::connect(&gw).await;
        client.subscribe("after").await;
    })
    .await;
}
