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
