//! What operators' tools read: the inbound backlog gauges the consumer-lag alert fires on, and
//! `wsbridge --check-config`, which CI pipelines and Kubernetes init steps run.

use std::process::{Command, Output};

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn backlog_gauges_show_stream_length_pending_lag_and_oldest_pending_age() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("backlog");
        let gw = Gateway::start(&redis, &prefix).await;
        let key = format!("{prefix}:in:chat");
        let mut client = Client::connect(&gw).await;
        for i in 0..3 {
            client
                .send(json!({"type": "send", "stream": "chat", "data": i, "id": i}))
                .await;
            assert_eq!(client.recv().await["type"], "ack");
        }
        let mut conn = redis.conn().await;
        // A second group, as a backend would create it, that has read nothing yet.
        let () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("audit")
            .arg("0")
            .query_async(&mut conn)
            .await
            .unwrap();
        // The configured group reads two entries and acknowledges neither.
        let read = read_group(&mut conn, &key, "backend", 2).await;
        assert_eq!(read.len(), 2);

        let series =
            |name: &str, group: &str| format!("{name}{{stream=\"chat\",group=\"{group}\"}}");
        eventually("the backlog of `chat` sampled", || async {
            let text = gw.metrics_text().await;
            let value = |sample: &str| metric_in(&text, sample);
            value("wsbridge_inbound_stream_length{stream=\"chat\"}") == Some(3.0)
                && value(&series("wsbridge_inbound_group_pending", "backend")) == Some(2.0)
                && value(&series("wsbridge_inbound_group_lag", "backend")) == Some(1.0)
                && value(&series(
                    "wsbridge_inbound_oldest_pending_age_seconds",
                    "backend",
                ))
                .is_some_and(|age| age > 0.0)
                && value(&series("wsbridge_inbound_group_pending", "audit")) == Some(0.0)
                && value(&series("wsbridge_inbound_group_lag", "audit")) == Some(3.0)
                && value(&series(
                    "wsbridge_inbound_oldest_pending_age_seconds",
                    "audit",
                )) == Some(0.0)
        })
        .await;
        // The filtered-share alert judges the share by the routing in use.
        let routing = if interest_routing() {
            "interest"
        } else {
            "broadcast"
        };
        assert_eq!(
            gw.metric(&format!("wsbridge_routing_info{{routing=\"{routing}\"}}"))
                .await,
            1.0
        );
        assert_eq!(
            gw.metric("wsbridge_inbound_stream_length{stream=\"orders\"}")
                .await,
            0.0,
            "a stream nobody sent to has length 0"
        );

        // Acknowledged: nothing pending, no age. Destroyed: its series fall to 0.
        let ids: Vec<&str> = read.iter().map(|(id, _)| id.as_str()).collect();
        let acked: u64 = redis::cmd("XACK")
            .arg(&key)
            .arg("backend")
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(acked, 2);
        let destroyed: u64 = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(&key)
            .arg("audit")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(destroyed, 1);
        eventually("acknowledged and destroyed groups sampled", || async {
            let text = gw.metrics_text().await;
            let value = |sample: &str| metric_in(&text, sample);
            value(&series("wsbridge_inbound_group_pending", "backend")) == Some(0.0)
                && value(&series(
                    "wsbridge_inbound_oldest_pending_age_seconds",
                    "backend",
                )) == Some(0.0)
                && value(&series("wsbridge_inbound_group_lag", "audit")) == Some(0.0)
        })
        .await;
        assert_eq!(
            gw.metric("wsbridge_redis_errors_total{kind=\"server\"}")
                .await,
            0.0,
            "sampling a stream without groups must not fail a command"
        );
    })
    .await;
}

/// The value of `sample` in an exposition text.
fn metric_in(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Runs `wsbridge --check-config` on `config` with environment overrides.
fn check_config(config: &str, env: &[(&str, &str)]) -> Output {
    let path = scratch_dir().join("wsbridge.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsbridge"));
    // As the image's entrypoint runs it: `--config` of the baked-in file first, which the
    // checked file overrides.
    cmd.args(["--config", "/nonexistent/wsbridge.toml", "--check-config"])
        .arg(&path);
    // Overrides from the test's own environment (the interest-routing pass) would be checked
    // too; these tests decide theirs.
    for (var, _) in std::env::vars().filter(|(v, _)| v.starts_with("WSBRIDGE__")) {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).output().unwrap()
}

#[test]
fn check_config_accepts_a_valid_file_without_binding_or_connecting() {
    // The listen port is taken and nothing listens at the Redis URL: starting would fail on
    // both, a check must not notice either.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "[server]\nlisten = \"{}\"\n[redis]\nurl = \"redis://127.0.0.1:{}\"\n[inbound]\nstreams = [\"chat\"]\n",
        taken.local_addr().unwrap(),
        free_port()
    );
    let out = check_config(&config, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    assert!(out.stderr.is_empty(), "{out:?}");
}

/// A config text, environment overrides, and what the error must say.
type BadConfig<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn check_config_fails_naming_the_key_of_a_bad_file_or_override() {
    let cases: [BadConfig; 4] = [
        // An unknown key: the section and the key.
        ("[server]\nlisten_port = 8080\n", &[], "`listen_port`"),
        // A wrong type.
        (
            "[redis]\nhealth_interval_ms = \"fast\"\n",
            &[],
            "key `redis.health_interval_ms`",
        ),
        // A value the type allows but the gateway cannot use.
        (
            "[server]\nlisten = \"nowhere\"\n",
            &[],
            "config key `server.listen`",
        ),
        // Environment overrides apply, as at start.
        (
            "[server]\nlisten = \"127.0.0.1:8080\"\n",
            &[("WSBRIDGE__LIMITS__MAX_CONNECTIONS", "lots")],
            "key `limits.max_connections` in the environment",
        ),
    ];
    for (config, env, expected) in cases {
        let out = check_config(config, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{config}: {out:?}");
        assert!(out.stdout.is_empty(), "{config}: {out:?}");
        assert!(stderr.contains(expected), "{config}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}
