//! The smallest wsbridge backend worth copying: read the chat stream as one consumer of a group,
//! answer each message on its channel with `POST /send`, and acknowledge it (XACK) only after the
//! gateway accepted the answer (202). An entry whose answer was refused, or that a crash left
//! unacknowledged, stays pending and is read again from this consumer's pending list (`0`) before
//! new entries (`>`). `backend.rs` beside it adds the rest: reclaiming a dead consumer's entries,
//! dead letters, MessagePack, Redis Cluster, the whiteboard. Run: `cargo run --example minimal_consumer`.

use std::{env, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use serde_json::{json, Value};

fn setting(name: &str, default: &str) -> String {
    env::var(name).unwrap_or_else(|_| default.to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = setting("WSBRIDGE_API", "http://127.0.0.1:8081");
    let stream = format!(
        "{}:in:{}",
        setting("PREFIX", "wsbridge"),
        setting("STREAM", "chat")
    );
    let group = setting("GROUP", "backend");
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "minimal".into());
    let consumer = setting(
        "CONSUMER",
        &format!("{}-{}", host.trim(), std::process::id()),
    );
    let redis = redis::Client::open(setting("REDIS_URL", "redis://127.0.0.1:6379"))?;
    // The blocking read below waits up to 5 s for an entry: give it longer than that to answer.
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(15)));
    let mut r = redis
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    // The gateway creates its groups too; this one starts at the stream's beginning as theirs do.
    if let Err(e) = r
        .xgroup_create_mkstream::<_, _, _, ()>(&stream, &group, "0")
        .await
    {
        if e.code() != Some("BUSYGROUP") {
            return Err(e.into());
        }
    }
    // One pooled client: POST /send reuses kept-alive connections.
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    println!("reading {stream} as {consumer} in group {group}");
    let mut start = "0"; // first our own pending entries, then new ones
    loop {
        let options = StreamReadOptions::default()
            .group(&group, &consumer)
            .count(10)
            .block(5000);
        let reply: Option<StreamReadReply> =
            r.xread_options(&[&stream], &[start], &options).await?;
        let entries: Vec<_> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        if start == "0" && entries.is_empty() {
            start = ">";
        }
        for entry in entries {
            let data: Option<Value> = match entry.get::<String>("encoding").as_deref() {
                Some("json") => entry
                    .get::<String>("data")
                    .and_then(|d| serde_json::from_str(&d).ok()),
                _ => None,
            };
            let channel = data
                .as_ref()
                .filter(|d| d.get("text").is_some())
                .and_then(|d| d["channel"].as_str())
                .filter(|c| !c.is_empty());
            let (Some(data), Some(channel)) = (data.as_ref(), channel) else {
                r.xack::<_, _, _, ()>(&stream, &group, &[&entry.id]).await?;
                println!("{} not a chat message: acknowledged", entry.id);
                continue;
            };
            let user = entry.get::<String>("user").filter(|u| !u.is_empty());
            let who = user.or_else(|| entry.get("connection")).unwrap_or_default();
            let body =
                json!({"to": {"channel": channel}, "data": {"from": who, "text": data["text"]}});
            let request = hyper::Request::post(format!("{api}/send"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))?;
            // Reading the answer to its end hands the connection back to the pool.
            let status = match http.request(request).await {
                Ok(answer) => {
                    let status = answer.status().as_u16();
                    let _ = answer.into_body().collect().await;
                    status
                }
                Err(_) => 0, // the gateway could not be reached
            };
            if status != 202 {
                println!(
                    "{} chat {channel}: the gateway answered {status}, left pending",
                    entry.id
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                start = "0";
                break;
            }
            r.xack::<_, _, _, ()>(&stream, &group, &[&entry.id]).await?;
            println!("{} chat {channel} from {who}: sent, acknowledged", entry.id);
        }
    }
}
