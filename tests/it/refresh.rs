//! Token refresh on an open connection: told ahead of expiry, refreshed in place, refused
//! without harm.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

const SECRET: &str = "refresh-secret";

/// A replica with tokens on, telling clients 2 s before their token expires.
async fn replica(redis: &Redis, prefix: &str) -> Gateway {
    let config = format!(
        "{}\n[auth]\njwt_secret = \"{SECRET}\"\nrefresh_notice_seconds = 2\n",
        base_config(&redis.url(), prefix)
    );
    let gw = Gateway::spawn(&config, prefix, &[]);
    gw.wait_ready().await;
    gw
}

fn token_for(user: &str, expires_in: u64) -> String {
    token(SECRET, json!({"sub": user, "exp": now_secs() + expires_in}))
}

#[tokio::test]
async fn a_client_told_to_refresh_does_so_in_place_and_is_not_closed() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("refresh-ok");
        let gw = replica(&redis, &prefix).await;
        let url = format!("{}?token={}", gw.ws_url, token_for("ann", 4));
        let mut c = Client::connect_url(&url, false).await.unwrap();
        // Two seconds before the token's exp: the notice, with that exp.
        let notice = c.recv().await;
        assert_eq!(notice["type"], "refresh_required", "{notice}");
        let old_exp = notice["expires_at"].as_u64().unwrap();
        let fresh = token_for("ann", 600);
        c.send(json!({"type": "refresh", "token": fresh, "id": "r1"}))
            .await;
        let refreshed = c.recv().await;
        assert_eq!(refreshed["type"], "refreshed", "{refreshed}");
        assert_eq!(refreshed["id"], "r1");
        assert!(refreshed["expires_at"].as_u64().unwrap() >= old_exp + 590);
        // Past the old expiry the connection still works: nothing but the clock can show that,
        // so wait it out.
        let past = old_exp as f64 - now_secs() as f64 + 1.5;
        tokio::time::sleep(Duration::from_secs_f64(past.max(0.0))).await;
        c.subscribe("room:after").await;
    })
    .await;
}

#[tokio::test]
async fn a_refused_refresh_changes_nothing_and_the_old_expiry_still_closes() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("refresh-refused");
        let gw = replica(&redis, &prefix).await;
        let url = format!("{}?token={}", gw.ws_url, token_for("ann", 5));
        let mut c = Client::connect_url(&url, false).await.unwrap();
        let expired = token(SECRET, json!({"sub": "ann", "exp": now_secs() - 120}));
        let forged = token(
            "another-secret",
            json!({"sub": "ann", "exp": now_secs() + 600}),
        );
        for (token, code, says) in [
            (
                token_for("bob", 600),
                "token_user_mismatch",
                "cannot change user",
            ),
            (expired, "token_invalid", "keeps its current token"),
            (forged, "token_invalid", "keeps its current token"),
            ("not.a.token".to_owned(), "token_invalid", "invalid token"),
        ] {
            c.send(json!({"type": "refresh", "token": token, "id": 7}))
                .await;
            let reply = c.recv().await;
            assert_eq!(reply["type"], "error", "{reply}");
            assert_eq!(reply["code"], code, "{reply}");
            assert_eq!(reply["id"], 7);
            assert!(reply["message"].as_str().unwrap().contains(says), "{reply}");
        }
        c.send(json!({"type": "refresh", "id": 8})).await;
        let reply = c.recv().await;
        assert_eq!(reply["code"], "bad_request", "{reply}");
        // Still the old token: the notice comes, then the close at its expiry.
        assert_eq!(c.recv().await["type"], "refresh_required");
        c.expect_close(1008).await;
        assert_eq!(
            gw.metric("wsbridge_inbound_rejected_total{code=\"token_invalid\"}")
                .await,
            3.0
        );
    })
    .await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The replica follows every connection's token with one timer: each connection is told and
/// closed at its own token's time, not at the earliest one's, and a refresh moves only its own.
#[tokio::test]
async fn each_connection_is_told_and_closed_at_its_own_expiry_and_a_refresh_moves_only_its_own() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("refresh-many");
        let gw = replica(&redis, &prefix).await;
        let base = now_secs();
        let connect = |user: &str, exp: u64| {
            let url = format!(
                "{}?token={}",
                gw.ws_url,
                token(SECRET, json!({"sub": user, "exp": exp}))
            );
            async move { Client::connect_url(&url, false).await.unwrap() }
        };
        // Connected in the reverse order of their expiries.
        let mut expiring = Vec::new();
        for (user, exp) in [("late", base + 7), ("early", base + 4)] {
            let mut c = connect(user, exp).await;
            expiring.push(tokio::spawn(async move {
                let notice = c.recv().await;
                let told = now_ms();
                assert_eq!(notice["type"], "refresh_required", "{notice}");
                assert_eq!(notice["expires_at"], exp, "{notice}");
                c.expect_close(1008).await;
                (exp, told, now_ms())
            }));
        }
        let mut moved = connect("moved", base + 5).await;
        let notice = moved.recv().await;
        assert_eq!(notice["expires_at"], base + 5, "{notice}");
        moved
            .send(json!({"type": "refresh", "token": token_for("moved", 600), "id": "r"}))
            .await;
        assert_eq!(moved.recv().await["type"], "refreshed");

        let mut closes = Vec::new();
        for task in expiring {
            closes.push(task.await.unwrap());
        }
        for &(exp, told, closed) in &closes {
            assert!(
                told >= (exp - 2) * 1000,
                "told at {told} ms, before exp {exp} - 2 s"
            );
            assert!(
                closed >= exp * 1000,
                "closed at {closed} ms, before exp {exp}"
            );
        }
        let (late, early) = (closes[0], closes[1]);
        assert!(
            early.2 < late.0 * 1000,
            "the early token's close waited for the late one: {closes:?}"
        );
        // Its old expiry passed long ago (base + 5 < base + 7): the refreshed one is still open.
        moved.subscribe("room:after").await;
    })
    .await;
}
