//! Redis Sentinel (`redis.sentinel_urls`): a primary, two replicas and three real Sentinels
//! ([`Sentinels`]). The replicas find the primary through the Sentinels, follow a promotion
//! without a restart, report 503 while no primary answers and recover by themselves, survive a
//! dead Sentinel, and keep the known primary while every Sentinel is away. The three example
//! backends (Python, Node, Rust) follow a promotion too, without losing an entry they held.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::examples::{Backend, Lang};

/// The longest a test here waits for Sentinel to promote a replica (it takes 3–6 s: 2 s to
/// call the primary down, then an election and the promotion).
const PROMOTION: Duration = Duration::from_secs(20);
/// The bound within which replicas serve again once the primary died, promotion included.
const FOLLOW: Duration = Duration::from_secs(15);

/// Two replicas using `sentinels`, ready.
async fn two_replicas(sentinels: &Sentinels, prefix: &str) -> (Gateway, Gateway) {
    let a = Gateway::spawn(&sentinels.config(prefix), prefix, &[]);
    let b = Gateway::spawn(&sentinels.config(prefix), prefix, &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    (a, b)
}

/// Whether `gw` is ready with its pub/sub link on the node at `port` (its log says so): only
/// then does it hear what other replicas publish on that node.
async fn following(gw: &Gateway, port: u16) -> bool {
    let node = format!("127.0.0.1:{port}");
    gw.readyz().await.0 == 200
        && gw
            .log_text()
            .lines()
            .any(|l| l.contains("pub/sub link up") && l.contains(&node))
}

/// How many times `gw` logged that its command link and its pub/sub link came up.
fn links_up(gw: &Gateway) -> (usize, usize) {
    let log = gw.log_text();
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    (count("Redis command link up"), count("pub/sub link up"))
}

/// Whether `gw` is linked again since `before` ([`links_up`]): its pub/sub link came up again,
/// it is ready, and its command link takes a send. The command link's move does not always show
/// in the logs (a command answered with an error drops it before a health check sees it down),
/// so it is probed; the first command on a cut link fails (a 503), as with a single Redis.
async fn relinked(gw: &Gateway, before: (usize, usize)) -> bool {
    let (_, pubsub) = links_up(gw);
    let probe = json!({"to": {"channel": "room:probe"}, "data": 0});
    pubsub > before.1 && gw.readyz().await.0 == 200 && gw.post("/send", &probe).await.0 == 202
}

/// Both replicas serve: a message POSTed to `b` reaches `on_a` (subscribed to `room:1` on `a`),
/// and a `send` of `sender` is acked and its entry is in the stream on the current primary.
async fn both_serve(
    sentinels: &Sentinels,
    a: &Gateway,
    b: &Gateway,
    on_a: &mut Client,
    sender: &mut Client,
    tag: &str,
) {
    let (status, answer) = b
        .post("/send", &json!({"to": {"channel": "room:1"}, "data": tag}))
        .await;
    assert_eq!(status, 202, "`{tag}` refused: {answer}\n{}", b.log_text());
    let got = match tokio::time::timeout(PATIENCE, on_a.next_frame()).await {
        Ok(Some(Ok(got))) => got,
        other => panic!(
            "`{tag}` not delivered to A's client: {other:?}\nA:\n{}\nB:\n{}",
            a.log_text(),
            b.log_text()
        ),
    };
    assert_eq!(
        (got["type"].as_str(), got["data"].as_str()),
        (Some("message"), Some(tag)),
        "{got}"
    );
    sender
        .send(json!({"type": "send", "stream": "chat", "data": tag, "id": tag}))
        .await;
    let ack = sender.recv().await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some(tag)),
        "{ack}"
    );
    let entry = ack["entry"].as_str().expect("entry id").to_string();
    let primary = sentinels.primary_port().expect("a primary");
    let mut conn = RedisConn::Single(sentinels.node_conn(sentinels.node_index(primary)).await);
    let stored = xrange(&mut conn, &format!("{}:in:chat", b.prefix)).await;
    assert!(
        stored.iter().any(|(id, _)| *id == entry),
        "entry {entry} of `{tag}` is not in the stream on the primary (port {primary})"
    );
}

/// Kills the primary and waits for the replicas to notice (503), for Sentinel to promote a
/// replica, and for both replicas to be ready again; returns the index of the dead node and the
/// time from the kill to both replicas being ready.
async fn kill_primary_and_follow(
    sentinels: &mut Sentinels,
    a: &Gateway,
    b: &Gateway,
) -> (usize, Duration) {
    let old = sentinels.primary_port().expect("a primary");
    let old_i = sentinels.node_index(old);
    let killed = Instant::now();
    sentinels.kill_node(old_i);
    eventually("A reports no primary (503)", || async {
        a.readyz().await.0 == 503
    })
    .await;
    let unready = killed.elapsed();
    eventually_within("Sentinel promotes a replica", PROMOTION, || async {
        sentinels.primary_port().is_some_and(|p| p != old)
    })
    .await;
    let promoted = killed.elapsed();
    let new = sentinels.primary_port().expect("a primary");
    eventually_within(
        "A and B ready again, on the new primary",
        FOLLOW,
        || async { following(a, new).await && following(b, new).await },
    )
    .await;
    let ready = killed.elapsed();
    eprintln!(
        "sentinel failover: primary killed; A answered 503 after {unready:?}, Sentinel named the \
         new primary after {promoted:?}, both replicas ready after {ready:?}"
    );
    (old_i, ready)
}

/// The primary dies: the replicas answer 503 while none answers, follow the promotion by
/// themselves, and keep serving the clients they had (a message POSTed to B reaches a client of
/// A; a client `send` is acked and lands in the stream on the new primary). Then the old primary
/// comes back; Sentinel turns it into a replica, and nothing breaks.
#[tokio::test]
async fn replicas_follow_a_promotion_and_the_old_primary_rejoins_as_a_replica() {
    deadline(TEST_DEADLINE, async {
        let mut sentinels = Sentinels::start();
        let prefix = unique_prefix("sentinel-promote");
        let (a, b) = two_replicas(&sentinels, &prefix).await;
        let mut on_a = Client::connect(&a).await;
        on_a.subscribe("room:1").await;
        let mut sender = Client::connect(&b).await;
        both_serve(&sentinels, &a, &b, &mut on_a, &mut sender, "before").await;

        let (old_i, ready) = kill_primary_and_follow(&mut sentinels, &a, &b).await;
        let served_at = Instant::now();
        both_serve(&sentinels, &a, &b, &mut on_a, &mut sender, "after").await;
        eprintln!(
            "sentinel failover: first message and send served {:?} after both were ready",
            served_at.elapsed()
        );
        assert!(ready < FOLLOW, "{ready:?}");
        for gw in [&a, &b] {
            assert_eq!(
                gw.metric("wsbridge_redis_primary_changes_total").await,
                1.0,
                "one promotion followed"
            );
        }

        sentinels.restart_node(old_i);
        eventually_within(
            "Sentinel makes the old primary a replica of the new one",
            PROMOTION,
            || async { sentinels.node_is(old_i, "slave") },
        )
        .await;
        assert_eq!(a.readyz().await.0, 200);
        assert_eq!(b.readyz().await.0, 200);
        both_serve(&sentinels, &a, &b, &mut on_a, &mut sender, "rejoined").await;
    })
    .await;
}

/// Two replicas serve (a message and a `send` across them), the primary is killed, both follow
/// the promotion within [`FOLLOW`] and serve again.
async fn serve_through_a_promotion(sentinels: &mut Sentinels, name: &str) {
    let prefix = unique_prefix(name);
    let (a, b) = two_replicas(sentinels, &prefix).await;
    let mut on_a = Client::connect(&a).await;
    on_a.subscribe("room:1").await;
    let mut sender = Client::connect(&b).await;
    both_serve(sentinels, &a, &b, &mut on_a, &mut sender, "before").await;
    let (_, ready) = kill_primary_and_follow(sentinels, &a, &b).await;
    assert!(ready < FOLLOW, "{ready:?}");
    both_serve(sentinels, &a, &b, &mut on_a, &mut sender, "after").await;
}

/// A Sentinel is dead from the start (the first one listed): the others name the primary, and
/// a failover decided by the remaining two is followed.
#[tokio::test]
async fn a_dead_sentinel_is_not_missed() {
    deadline(TEST_DEADLINE, async {
        let mut sentinels = Sentinels::start();
        sentinels.kill_sentinel(0);
        serve_through_a_promotion(&mut sentinels, "sentinel-one-dead").await;
    })
    .await;
}

/// Every Sentinel is away: the replicas keep using the primary they know, even to reconnect
/// (the primary drops their connections meanwhile). When the Sentinels return, a failover is
/// followed as usual.
#[tokio::test]
async fn with_every_sentinel_away_the_known_primary_keeps_serving() {
    deadline(TEST_DEADLINE, async {
        let mut sentinels = Sentinels::start();
        let prefix = unique_prefix("sentinel-all-away");
        let (a, b) = two_replicas(&sentinels, &prefix).await;
        let mut on_a = Client::connect(&a).await;
        on_a.subscribe("room:1").await;
        let mut sender = Client::connect(&b).await;
        both_serve(&sentinels, &a, &b, &mut on_a, &mut sender, "before").await;

        let primary = sentinels.primary_port().expect("a primary");
        let primary_i = sentinels.node_index(primary);
        for i in 0..3 {
            sentinels.kill_sentinel(i);
        }
        // Cut the replicas' links: they must reconnect without any Sentinel. Like any Redis
        // client, a replica learns that its command link was cut from the next command's error
        // (its health check's, here), and connects anew for the one after.
        let before = (links_up(&a), links_up(&b));
        let mut conn = sentinels.node_conn(primary_i).await;
        for kind in ["pubsub", "normal"] {
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg(kind)
                .arg("SKIPME")
                .arg("yes")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        eventually("A and B linked again to the known primary", || async {
            relinked(&a, before.0).await && relinked(&b, before.1).await
        })
        .await;
        both_serve_without_sentinels(primary_i, &sentinels, &b, &mut on_a, &mut sender).await;
        for gw in [&a, &b] {
            assert!(
                gw.log_text().contains("keeping the known primary"),
                "the replica reconnected without asking the Sentinels?"
            );
        }

        for i in 0..3 {
            sentinels.restart_sentinel(i);
        }
        let (_, ready) = kill_primary_and_follow(&mut sentinels, &a, &b).await;
        assert!(ready < FOLLOW, "{ready:?}");
        both_serve(&sentinels, &a, &b, &mut on_a, &mut sender, "after").await;
    })
    .await;
}

/// [`both_serve`] while no Sentinel can say which node is the primary: the stream is read on
/// node `primary_i`.
async fn both_serve_without_sentinels(
    primary_i: usize,
    sentinels: &Sentinels,
    b: &Gateway,
    on_a: &mut Client,
    sender: &mut Client,
) {
    let tag = "sentinels-away";
    b.send(json!({"to": {"channel": "room:1"}, "data": tag}))
        .await;
    let got = on_a.recv().await;
    assert_eq!(got["data"].as_str(), Some(tag), "{got}");
    sender
        .send(json!({"type": "send", "stream": "chat", "data": tag, "id": tag}))
        .await;
    let ack = sender.recv().await;
    assert_eq!(ack["type"].as_str(), Some("ack"), "{ack}");
    let entry = ack["entry"].as_str().expect("entry id").to_string();
    let mut conn = RedisConn::Single(sentinels.node_conn(primary_i).await);
    let stored = xrange(&mut conn, &format!("{}:in:chat", b.prefix)).await;
    assert!(stored.iter().any(|(id, _)| *id == entry));
}

/// A failover while the old primary stays up (`SENTINEL FAILOVER`): it turns into a replica
/// under the replicas' feet, and they leave it (ROLE says `slave`) for the new primary.
#[tokio::test]
async fn a_primary_demoted_while_running_is_left_for_the_new_one() {
    deadline(TEST_DEADLINE, async {
        let sentinels = Sentinels::start();
        let prefix = unique_prefix("sentinel-demoted");
        let (a, b) = two_replicas(&sentinels, &prefix).await;
        let mut on_a = Client::connect(&a).await;
        on_a.subscribe("room:1").await;
        let mut sender = Client::connect(&b).await;
        both_serve(&sentinels, &a, &b, &mut on_a, &mut sender, "before").await;

        let old = sentinels.primary_port().expect("a primary");
        let old_i = sentinels.node_index(old);
        let mut conn =
            redis::Client::open(format!("redis://127.0.0.1:{}", sentinels.sentinel_ports[0]))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
        let _: () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(SENTINEL_MASTER)
            .query_async(&mut conn)
            .await
            .unwrap();
        eventually_within("the old primary is a replica", PROMOTION, || async {
            sentinels.primary_port().is_some_and(|p| p != old) && sentinels.node_is(old_i, "slave")
        })
        .await;
        let new = sentinels.primary_port().expect("a primary");
        // The demoted node drops its clients, or answers ROLE with `slave`: either way each
        // replica's pub/sub link comes up on the new primary. The command link may move without
        // ever being seen down (a command answered READONLY drops it before a health check
        // fails), so the logs cannot show it; `both_serve` below shows it on the new primary.
        eventually_within("A and B on the new primary", FOLLOW, || async {
            following(&a, new).await && following(&b, new).await
        })
        .await;
        // As with a single Redis whose connection was cut, the first command on the dead
        // command link fails (a 503 that says so) and the next one goes to the new primary.
        for gw in [&a, &b] {
            eventually_within("a send accepted", FOLLOW, || async {
                let probe = json!({"to": {"channel": "room:probe"}, "data": 0});
                gw.post("/send", &probe).await.0 == 202
            })
            .await;
        }
        both_serve(&sentinels, &a, &b, &mut on_a, &mut sender, "after").await;
    })
    .await;
}

/// With an ACL user on the Sentinels (`redis.sentinel_username` and its password, which is not
/// the `default` user's): the replicas sign in as it, find the primary, follow a promotion and
/// serve. A replica that gave only the password would sign in as `default` and be refused.
#[tokio::test]
async fn a_sentinel_user_is_signed_in_as() {
    deadline(TEST_DEADLINE, async {
        let mut sentinels = Sentinels::start_with_sentinel_user(
            "data-secret",
            "sentinel-secret",
            "wsbridge",
            "user-secret",
        );
        serve_through_a_promotion(&mut sentinels, "sentinel-user").await;
    })
    .await;
}

/// With passwords: the Sentinels require one (`redis.sentinel_password`), the data nodes another
/// (given in `redis.url`); the replicas find the primary, follow a promotion and serve.
#[tokio::test]
async fn passwords_of_the_sentinels_and_of_the_data_nodes_are_used() {
    deadline(TEST_DEADLINE, async {
        let mut sentinels =
            Sentinels::start_with_auth(Some("data-secret"), Some("sentinel-secret"));
        serve_through_a_promotion(&mut sentinels, "sentinel-auth").await;
    })
    .await;
}

/// `on` sends a chat message `text` (frame id `id`) to `room:1`: the gateway acks it and the
/// example backend's answer comes back on the channel.
async fn chat_answered(on: &mut Client, id: &str, text: &str, backend: &Backend) {
    on.send(json!({"type": "send", "stream": "chat",
                   "data": {"channel": "room:1", "text": text}, "id": id}))
        .await;
    let (mut acked, mut answered) = (false, false);
    while !(acked && answered) {
        let frame = match tokio::time::timeout(PATIENCE, on.next_frame()).await {
            Ok(Some(Ok(frame))) => frame,
            other => panic!(
                "`{text}` not answered: {other:?}\nbackend:\n{}",
                backend.log_text()
            ),
        };
        match frame["type"].as_str() {
            Some("ack") if frame["id"] == id => acked = true,
            Some("message") if frame["data"]["text"] == text => answered = true,
            _ => panic!("unexpected {frame}\nbackend:\n{}", backend.log_text()),
        }
    }
}

/// The ids of the entries pending in the `backend` group on stream `key`, as node `i` sees them.
async fn pending_on(sentinels: &Sentinels, i: usize, key: &str) -> Vec<String> {
    let mut conn = sentinels.node_conn(i).await;
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(key)
        .arg("backend")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(&mut conn)
        .await
        .unwrap();
    pending.into_iter().map(|(id, ..)| id).collect()
}

/// #18 item 5: the example backend of `lang` finds the primary through the Sentinels
/// (`REDIS_SENTINEL`) and follows a promotion by itself, keeping its at-least-once promise: a
/// chat message it is working on (`--work-ms`) when the primary dies is answered (once or more),
/// as is one sent after the promotion, and nothing stays pending on the new primary.
async fn backend_follows_a_promotion(lang: Lang) {
    let mut sentinels = Sentinels::start();
    let prefix = unique_prefix("sentinel-backend");
    let key = format!("{prefix}:in:chat");
    let (a, b) = two_replicas(&sentinels, &prefix).await;
    let backend = Backend::spawn_sentinel(
        lang,
        &b.api_url,
        &sentinels,
        &prefix,
        &["--block-ms", "500", "--work-ms", "1500"],
    );
    let mut on_a = Client::connect(&a).await;
    on_a.subscribe("room:1").await;
    chat_answered(&mut on_a, "x1", "before", &backend).await;

    // A message the backend holds (read, pending, its reply not sent yet) when the primary dies;
    // the replicas have the entry and its delivery.
    on_a.send(json!({"type": "send", "stream": "chat",
                     "data": {"channel": "room:1", "text": "in flight"}, "id": "x2"}))
        .await;
    let ack = on_a.recv().await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some("x2")),
        "{ack}"
    );
    let held = vec![ack["entry"].as_str().expect("entry id").to_string()];
    eventually(
        "the backend holds the entry (and only it), on every node",
        || async {
            let mut all = true;
            for i in 0..3 {
                all &= pending_on(&sentinels, i, &key).await == held;
            }
            all
        },
    )
    .await;
    kill_primary_and_follow(&mut sentinels, &a, &b).await;

    on_a.send(json!({"type": "send", "stream": "chat",
                     "data": {"channel": "room:1", "text": "after"}, "id": "x3"}))
        .await;
    let (mut acks, mut in_flight, mut after) = (0, 0, 0);
    while acks < 1 || in_flight == 0 || after == 0 {
        let frame = match tokio::time::timeout(PATIENCE, on_a.next_frame()).await {
            Ok(Some(Ok(frame))) => frame,
            other => panic!(
                "acks {acks}, `in flight` {in_flight}, `after` {after}; then {other:?}\nbackend:\n{}",
                backend.log_text()
            ),
        };
        match (frame["type"].as_str(), frame["data"]["text"].as_str()) {
            (Some("ack"), _) => acks += 1,
            (Some("message"), Some("in flight")) => in_flight += 1,
            (Some("message"), Some("after")) => after += 1,
            _ => panic!("unexpected {frame}\nbackend:\n{}", backend.log_text()),
        }
    }
    let new = sentinels.node_index(sentinels.primary_port().expect("a primary"));
    let until = Instant::now() + PATIENCE;
    loop {
        let pending = pending_on(&sentinels, new, &key).await;
        if pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "{pending:?} still pending on the new primary\nbackend:\n{}",
            backend.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        backend.log_text().contains("Redis: "),
        "the backend never noticed the failover?\n{}",
        backend.log_text()
    );
}

#[tokio::test]
async fn the_python_backend_follows_a_promotion() {
    deadline(TEST_DEADLINE, backend_follows_a_promotion(Lang::Python)).await;
}

#[tokio::test]
async fn the_node_backend_follows_a_promotion() {
    deadline(TEST_DEADLINE, backend_follows_a_promotion(Lang::Node)).await;
}

#[tokio::test]
async fn the_rust_backend_follows_a_promotion() {
    deadline(TEST_DEADLINE, backend_follows_a_promotion(Lang::Rust)).await;
}
