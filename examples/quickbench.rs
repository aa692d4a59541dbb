//! A quick fan-out measurement (the full load generator is a later piece of work).
//!
//! Opens `--clients` WebSocket clients spread over the given replicas, subscribes them all to one
//! channel, publishes `--messages` messages through `--api` in batches of `--batch`, waits until
//! every client has every message, and prints deliveries per second plus, when `--pids` names
//! the replica processes, their CPU time per delivery read from /proc.
//!
//! ```text
//! cargo run --release --example quickbench -- --ws ws://127.0.0.1:8080/ws,ws://127.0.0.1:8090/ws \
//!     --api http://127.0.0.1:8091 --clients 1000 --messages 200 --batch 10 --pids 1234,1235
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use tokio_tungstenite::tungstenite::Message;

struct Args {
    ws: Vec<String>,
    api: String,
    clients: usize,
    messages: usize,
    batch: usize,
    pids: Vec<u32>,
}

fn args() -> Args {
    let mut a = Args {
        ws: vec!["ws://127.0.0.1:8080/ws".into()],
        api: "http://127.0.0.1:8081".into(),
        clients: 200,
        messages: 100,
        batch: 10,
        pids: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--ws" => a.ws = value.split(',').map(str::to_owned).collect(),
            "--api" => a.api = value,
            "--clients" => a.clients = value.parse().unwrap(),
            "--messages" => a.messages = value.parse().unwrap(),
            "--batch" => a.batch = value.parse().unwrap(),
            "--pids" => a.pids = value.split(',').map(|p| p.parse().unwrap()).collect(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

async fn post(api: &str, body: String) -> u16 {
    let uri: hyper::Uri = format!("{api}/send").parse().unwrap();
    let addr = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap());
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/send")
        .header("host", addr)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

#[tokio::main]
async fn main() {
    let a = args();
    let mut ready = Vec::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<(usize, Duration)>(a.clients);
    let start_gate = std::sync::Arc::new(tokio::sync::Notify::new());
    for i in 0..a.clients {
        let url = a.ws[i % a.ws.len()].clone();
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        ws.next().await.unwrap().unwrap(); // welcome
        ws.send(Message::Text(
            r#"{"type":"subscribe","channel":"bench","id":"s"}"#.into(),
        ))
        .await
        .unwrap();
        ws.next().await.unwrap().unwrap(); // subscribed
        let expected = a.messages;
        let done_tx = done_tx.clone();
        let started = Instant::now();
        ready.push(tokio::spawn(async move {
            let mut got = 0;
            while got < expected {
                match ws.next().await {
                    Some(Ok(Message::Text(_))) => got += 1,
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            let _ = done_tx.send((got, started.elapsed())).await;
        }));
    }
    drop(start_gate);
    let cpu0: Vec<f64> = a.pids.iter().map(|p| cpu_seconds(*p)).collect();
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < a.messages {
        let n = a.batch.min(a.messages - sent);
        let items: Vec<String> = (sent..sent + n)
            .map(|i| format!(r#"{{"to":{{"channel":"bench"}},"data":{{"n":{i},"text":"a typical chat message of some length"}}}}"#))
            .collect();
        assert_eq!(post(&a.api, format!("[{}]", items.join(","))).await, 202);
        sent += n;
    }
    let mut delivered = 0;
    for _ in 0..a.clients {
        let (got, _) = done_rx.recv().await.unwrap();
        delivered += got;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu: f64 = a
        .pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| cpu_seconds(*p) - c0)
        .sum();
    let expected = a.clients * a.messages;
    println!(
        "clients={} messages={} batch={} delivered={delivered}/{expected} elapsed={elapsed:.3}s deliveries_per_s={:.0}",
        a.clients,
        a.messages,
        a.batch,
        delivered as f64 / elapsed
    );
    if !a.pids.is_empty() {
        println!(
            "gateway_cpu={cpu:.3}s cpu_per_delivery_us={:.2} (all replicas, 10 ms tick resolution)",
            cpu / delivered as f64 * 1e6
        );
    }
}
