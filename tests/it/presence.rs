//! Presence: who is in a channel across replicas, join and leave events, no ghosts.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::common::*;

const SECRET: &str = "presence-secret";
const CHANNEL: &str = "room:p";

/// Replicas with presence (and join/leave events) on `room:*`, tokens signed with [`SECRET`],
/// and a replica counted dead 2 s after its last heartbeat.
fn presence_config(redis: &Redis, prefix: &str) -> String {
    format!(
        "{}\n[auth]\njwt_secret = \"{SECRET}\"\n\n[presence]\nreplica_ttl_seconds = 2\nheartbeat_interval_ms = 300\nmax_page = 100\n\n[[channels]]\npattern = \"room:*\"\npresence = true\njoin_leave = true\n\n[[channels]]\npattern = \"quiet:*\"\npresence = true\n",
        base_config(&redis.url(), prefix)
    )
}

async fn replica(redis: &Redis, prefix: &str) -> Gateway {
    let gw = Gateway::spawn(&presence_config(redis, prefix), prefix, &[]);
    gw.wait_ready().await;
    gw
}

/// A client with a token for `user` (and `info`, when given).
async fn member(gw: &Gateway, user: &str, info: Option<Value>) -> Client {
    let mut claims = json!({"sub": user, "exp": now_secs() + 3600});
    if let Some(info) = info {
        claims["info"] = info;
    }
    let url = format!("{}?token={}", gw.ws_url, token(SECRET, claims));
    Client::connect_url(&url, false).await.expect("connect")
}

/// Asks `client`'s replica for a presence page and returns the `presence` reply.
async fn presence_of(client: &mut Client, body: Value) -> Value {
    client.send(body).await;
    let reply = client.recv().await;
    assert_eq!(reply["type"], "presence", "{reply}");
    reply
}

/// Every member's connection id, through the API, page by page with `limit`.
async fn all_pages(gw: &Gateway, channel: &str, view: &str, limit: u64) -> (Vec<Value>, u64) {
    let mut members = Vec::new();
    let mut cursor = Value::Null;
    let mut pages = 0;
    loop {
        let (status, page) = gw
            .post(
                "/presence",
                &json!({"channel": channel, "view": view, "cursor": cursor, "limit": limit}),
            )
            .await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        members.extend(page["members"].as_array().unwrap().iter().cloned());
        cursor = page["cursor"].clone();
        if cursor.is_null() {
            return (members, pages);
        }
        assert!(pages < 100, "paging does not end: {page}");
    }
}

/// Makes every hash use the encoding whose HSCAN honours COUNT, so that a handful of members
/// spans several pages (a small hash is otherwise scanned whole in one page).
async fn small_pages(redis: &Redis) {
    for mut conn in redis.node_conns().await {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("hash-max-listpack-entries")
            .arg(0)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Waits for the next `join` or `leave` on `client`, failing on anything else.
async fn next_event(client: &mut Client) -> Value {
    let frame = client.recv().await;
    assert!(
        frame["type"] == "join" || frame["type"] == "leave",
        "expected a join or leave: {frame}"
    );
    frame
}

#[tokio::test]
async fn members_on_every_replica_are_counted_and_listed_page_by_page() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        small_pages(&redis).await;
        let prefix = unique_prefix("presence-list");
        let (a, b) = (
            replica(&redis, &prefix).await,
            replica(&redis, &prefix).await,
        );
        let mut ann_1 = member(&a, "ann", Some(json!({"name": "Ann"}))).await;
        let mut ann_2 = member(&b, "ann", Some(json!({"name": "Ann"}))).await;
        let mut bob = member(&b, "bob", None).await;
        let mut eve = member(&a, "eve", None).await;
        for c in [&mut ann_1, &mut ann_2, &mut bob, &mut eve] {
            c.subscribe("quiet:list").await;
        }
        // Written by each replica's presence task: wait until all four are there.
        eventually("four members", || async {
            let (_, page) = a.post("/presence", &json!({"channel": "quiet:list"})).await;
            page["connections"] == 4
        })
        .await;
        let members = a.metric("wsbridge_presence_members").await
            + b.metric("wsbridge_presence_members").await;
        assert_eq!(members, 4.0, "each replica counts its own members");
        let page = presence_of(
            &mut bob,
            json!({"type": "presence", "channel": "quiet:list", "id": "p1"}),
        )
        .await;
        assert_eq!(page["id"], "p1");
        assert_eq!(page["channel"], "quiet:list");
        assert_eq!(page["connections"], 4);
        assert_eq!(page["users"], 3, "ann's two tabs are one user: {page}");
        let ann: Vec<&Value> = page["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["user"] == "ann")
            .collect();
        assert_eq!(ann.len(), 2, "{page}");
        assert_eq!(
            ann[0]["info"],
            json!({"name": "Ann"}),
            "info from the token"
        );
        // Page by page, one asked at a time (Redis stops scanning at the first bucket that
        // holds a member): every connection exactly once.
        let (members, pages) = all_pages(&a, "quiet:list", "connections", 1).await;
        let ids: Vec<&str> = members
            .iter()
            .map(|m| m["connection"].as_str().unwrap())
            .collect();
        let unique: BTreeSet<&str> = ids.iter().copied().collect();
        let expected: BTreeSet<&str> = [&ann_1, &ann_2, &bob, &eve]
            .iter()
            .map(|c| c.connection.as_str())
            .collect();
        assert_eq!(unique, expected, "{members:?}");
        assert_eq!(ids.len(), 4, "no member twice: {members:?}");
        assert!(pages >= 2, "a limit of 1 takes more than one page");
        // The users view: distinct users with their connection counts.
        let (users, _) = all_pages(&b, "quiet:list", "users", 100).await;
        let mut counts: Vec<(String, u64)> = users
            .iter()
            .map(|u| {
                (
                    u["user"].as_str().unwrap().to_owned(),
                    u["connections"].as_u64().unwrap(),
                )
            })
            .collect();
        counts.sort();
        assert_eq!(
            counts,
            [("ann".into(), 2), ("bob".into(), 1), ("eve".into(), 1)]
        );
        // Leaving shows at once in the count.
        eve.send(json!({"type": "unsubscribe", "channel": "quiet:list"}))
            .await;
        assert_eq!(eve.recv().await["type"], "unsubscribed");
        eventually("eve gone", || async {
            let (_, page) = b.post("/presence", &json!({"channel": "quiet:list"})).await;
            page["connections"] == 3 && page["users"] == 2
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_user_joins_once_and_leaves_with_the_last_tab_in_order_with_messages() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("presence-events");
        let (a, b) = (
            replica(&redis, &prefix).await,
            replica(&redis, &prefix).await,
        );
        let mut watcher = member(&a, "watcher", None).await;
        watcher.subscribe(CHANNEL).await;
        let own = next_event(&mut watcher).await;
        assert_eq!(own["type"], "join");
        assert_eq!(own["member"]["user"], "watcher", "{own}");

        let mut tab_1 = member(&b, "ann", Some(json!({"name": "Ann"}))).await;
        tab_1.subscribe(CHANNEL).await;
        // A subscriber hears of its own arrival too.
        assert_eq!(next_event(&mut tab_1).await["member"]["user"], "ann");
        let joined = next_event(&mut watcher).await;
        assert_eq!(joined["type"], "join");
        assert_eq!(joined["channel"], CHANNEL);
        assert_eq!(joined["member"]["user"], "ann");
        assert_eq!(joined["member"]["info"], json!({"name": "Ann"}));
        assert_eq!(joined["member"]["connection"], tab_1.connection.as_str());

        // A second tab of the same user: no join. The message published after it comes next.
        let mut tab_2 = member(&a, "ann", None).await;
        tab_2.subscribe(CHANNEL).await;
        eventually("ann's second tab in presence", || async {
            let (_, page) = a.post("/presence", &json!({"channel": CHANNEL})).await;
            page["connections"] == 3
        })
        .await;
        b.send(json!({"to": {"channel": CHANNEL}, "data": "after the second tab"}))
            .await;
        let next = watcher.recv().await;
        assert_eq!(next["type"], "message", "no second join: {next}");
        assert_eq!(next["data"], "after the second tab");

        // The first tab leaves: ann is still there. The last one closes: ann leaves, before the
        // message published after it.
        assert_eq!(tab_1.recv().await["data"], "after the second tab");
        tab_1
            .send(json!({"type": "unsubscribe", "channel": CHANNEL}))
            .await;
        assert_eq!(tab_1.recv().await["type"], "unsubscribed");
        drop(tab_2);
        eventually("ann gone", || async {
            let (_, page) = b.post("/presence", &json!({"channel": CHANNEL})).await;
            page["connections"] == 1
        })
        .await;
        b.send(json!({"to": {"channel": CHANNEL}, "data": "after ann left"}))
            .await;
        let left = watcher.recv().await;
        assert_eq!(left["type"], "leave", "{left}");
        assert_eq!(left["member"]["user"], "ann");
        assert_eq!(watcher.recv().await["data"], "after ann left");
        assert_eq!(
            a.metric("wsbridge_presence_changes_total{change=\"join\"}")
                .await,
            2.0,
            "the watcher and ann's second tab joined on this replica"
        );
    })
    .await;
}

#[tokio::test]
async fn a_killed_replicas_members_are_removed_by_the_others_with_their_leave() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("presence-ghost");
        let a = replica(&redis, &prefix).await;
        let b = replica(&redis, &prefix).await;
        let mut watcher = member(&a, "watcher", None).await;
        watcher.subscribe(CHANNEL).await;
        assert_eq!(next_event(&mut watcher).await["member"]["user"], "watcher");
        let mut carol = member(&b, "carol", None).await;
        carol.subscribe(CHANNEL).await;
        assert_eq!(next_event(&mut watcher).await["member"]["user"], "carol");
        // SIGKILL: B says no goodbye. A removes carol once B's heartbeat runs out.
        drop(b);
        let left = watcher.recv().await;
        assert_eq!(left["type"], "leave", "{left}");
        assert_eq!(left["member"]["user"], "carol");
        let (_, page) = a.post("/presence", &json!({"channel": CHANNEL})).await;
        assert_eq!(page["connections"], 1, "{page}");
        eventually("carol counted as a dead replica's member", || async {
            a.metric("wsbridge_presence_ghosts_removed_total").await == 1.0
        })
        .await;
        // Her connection went with the replica: she is offline, seen when it was swept.
        eventually("carol offline", || async {
            let (_, status) = a.post("/user_status", &json!({"user": "carol"})).await;
            status["online"] == false && status["last_seen_ms"].is_u64()
        })
        .await;
        drop(carol);
    })
    .await;
}

#[tokio::test]
async fn a_replica_that_shuts_down_removes_its_own_members() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("presence-sigterm");
        let a = replica(&redis, &prefix).await;
        let mut b = replica(&redis, &prefix).await;
        let mut watcher = member(&a, "watcher", None).await;
        watcher.subscribe(CHANNEL).await;
        next_event(&mut watcher).await;
        let mut dan = member(&b, "dan", None).await;
        dan.subscribe(CHANNEL).await;
        assert_eq!(next_event(&mut watcher).await["member"]["user"], "dan");
        b.signal("-TERM");
        let left = watcher.recv().await;
        assert_eq!(left["type"], "leave", "{left}");
        assert_eq!(left["member"]["user"], "dan");
        assert!(b.wait_exit().success());
        // Removed by B itself, not swept by A as a dead replica's.
        assert_eq!(
            a.metric("wsbridge_presence_ghosts_removed_total").await,
            0.0
        );
        let (_, page) = a.post("/presence", &json!({"channel": CHANNEL})).await;
        assert_eq!(page["connections"], 1, "{page}");
    })
    .await;
}

#[tokio::test]
async fn presence_comes_back_by_itself_after_redis_restarts_empty() {
    deadline(TEST_DEADLINE, async {
        // On a cluster every node restarts empty, keeping its slots.
        let mut redis = Redis::start();
        let prefix = unique_prefix("presence-restart");
        let (a, b) = (
            replica(&redis, &prefix).await,
            replica(&redis, &prefix).await,
        );
        let mut clients = Vec::new();
        for (gw, user) in [(&a, "u1"), (&b, "u2"), (&b, "u3")] {
            let mut c = member(gw, user, None).await;
            c.subscribe("quiet:restart").await;
            clients.push(c);
        }
        eventually("three members", || async {
            let (_, page) = a
                .post("/presence", &json!({"channel": "quiet:restart"}))
                .await;
            page["connections"] == 3
        })
        .await;
        redis.kill();
        let (status, body) = a
            .post("/presence", &json!({"channel": "quiet:restart"}))
            .await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "redis_unavailable", "{body}");
        clients[0]
            .send(json!({"type": "presence", "channel": "quiet:restart", "id": 9}))
            .await;
        let refused = clients[0].recv().await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["code"], "redis_unavailable");
        assert_eq!(refused["id"], 9);
        redis.restart();
        eventually("members put back by their replicas", || async {
            let (status, page) = b
                .post("/presence", &json!({"channel": "quiet:restart"}))
                .await;
            status == 200 && page["connections"] == 3 && page["users"] == 3
        })
        .await;
        eventually("user status put back too", || async {
            let (_, status) = a.post("/user_status", &json!({"user": "u2"})).await;
            status["online"] == true && status["connections"] == 1
        })
        .await;
        // The clients stayed connected throughout.
        let page = presence_of(
            &mut clients[2],
            json!({"type": "presence", "channel": "quiet:restart"}),
        )
        .await;
        assert_eq!(page["connections"], 3);
    })
    .await;
}

#[tokio::test]
async fn bad_presence_questions_get_errors_naming_what_was_wrong() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("presence-bad");
        let gw = replica(&redis, &prefix).await;
        let url = format!(
            "{}?token={}",
            gw.ws_url,
            token(
                SECRET,
                json!({"sub": "ann", "exp": now_secs() + 3600, "channels": ["room:*", "lobby"]})
            )
        );
        let mut c = Client::connect_url(&url, false).await.unwrap();
        let ask = |channel: &str, extra: Value| {
            let mut frame = json!({"type": "presence", "channel": channel, "id": "q"});
            for (k, v) in extra.as_object().unwrap() {
                frame[k] = v.clone();
            }
            frame
        };
        for (frame, code, says) in [
            (
                ask("lobby", json!({})),
                "presence_disabled",
                "does not keep presence",
            ),
            (
                ask("quiet:x", json!({})),
                "channel_not_allowed",
                "does not allow",
            ),
            (
                ask("room:1", json!({"view": "everyone"})),
                "bad_request",
                "`view`",
            ),
            (
                json!({"type": "presence", "id": "q"}),
                "bad_request",
                "`channel`",
            ),
        ] {
            c.send(frame.clone()).await;
            let reply = c.recv().await;
            assert_eq!(reply["type"], "error", "{frame} -> {reply}");
            assert_eq!(reply["code"], code, "{frame} -> {reply}");
            assert_eq!(reply["id"], "q");
            assert!(reply["message"].as_str().unwrap().contains(says), "{reply}");
        }
        // The connection still works.
        let page = presence_of(&mut c, ask("room:1", json!({}))).await;
        assert_eq!(page["connections"], 0);
        assert_eq!(page["members"], json!([]));
        assert_eq!(page["cursor"], Value::Null);
        for (body, says) in [
            (json!({"channel": "lobby"}), "does not keep presence"),
            (json!({"channel": ""}), "must not be empty"),
            (
                json!({"channel": "room:1", "view": 3}),
                "`view` must be a string",
            ),
            (
                json!({"channel": "room:1", "limit": 0}),
                "`limit` must be a positive integer",
            ),
            (json!({"channel": "room:1", "extra": 1}), "extra"),
            (json!({}), "`channel` is required"),
            (json!(["room:1"]), "must be a JSON object"),
        ] {
            let (status, reply) = gw.post("/presence", &body).await;
            assert_eq!(status, 400, "{body} -> {reply}");
            assert!(
                reply["error"]["message"].as_str().unwrap().contains(says),
                "{body} -> {reply}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_users_status_counts_its_connections_everywhere_and_when_it_was_last_seen() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("user-status");
        let (a, b) = (
            replica(&redis, &prefix).await,
            replica(&redis, &prefix).await,
        );
        let status = |gw: &Gateway, user: &str| {
            let body = json!({ "user": user });
            let api = gw.api_url.clone();
            async move {
                let (code, text) = http(
                    "POST",
                    &format!("{api}/user_status"),
                    Some(&body.to_string()),
                    None,
                )
                .await;
                assert_eq!(code, 200, "{text}");
                serde_json::from_str::<Value>(&text).unwrap()
            }
        };
        let never = status(&a, "nobody").await;
        assert_eq!(
            never,
            json!({"user": "nobody", "online": false, "connections": 0, "last_seen_ms": null})
        );
        let tab_1 = member(&a, "ann", None).await;
        let tab_2 = member(&b, "ann", None).await;
        eventually("ann on two replicas", || async {
            status(&b, "ann").await["connections"] == 2
        })
        .await;
        let online = status(&a, "ann").await;
        assert_eq!(online["online"], true);
        assert!(
            online["last_seen_ms"].as_u64().unwrap() > 1_700_000_000_000,
            "{online}"
        );
        drop(tab_1);
        eventually("one tab left", || async {
            status(&a, "ann").await["connections"] == 1
        })
        .await;
        assert_eq!(status(&a, "ann").await["online"], true);
        drop(tab_2);
        eventually("ann offline", || async {
            status(&a, "ann").await["online"] == false
        })
        .await;
        let gone = status(&b, "ann").await;
        assert_eq!(gone["connections"], 0);
        let seen = gone["last_seen_ms"].as_u64().expect("last seen is kept");
        assert!(
            seen >= online["last_seen_ms"].as_u64().unwrap(),
            "{gone} {online}"
        );
        for body in [
            json!({}),
            json!({"user": ""}),
            json!({"user": 7}),
            json!({"user": "a", "x": 1}),
        ] {
            let (code, reply) = a.post("/user_status", &body).await;
            assert_eq!(code, 400, "{body} -> {reply}");
            assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
        }
    })
    .await;
}
