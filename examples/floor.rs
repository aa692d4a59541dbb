//! The floor of the benchmark: the least a server can do to deliver a published message to N
//! WebSocket clients on this machine. No gateway code, no Redis, no queues: it accepts
//! WebSocket connections, and on a publish writes the frame wsbridge would send to every
//! connected socket, one `write(2)` per socket, from one thread. Its CPU per delivery is the
//! kernel's cost of those writes over loopback plus a loop; bench/run.sh reports every target's
//! CPU per delivery as a multiple of it (`--target floor` of examples/loadgen).
//!
//! ```text
//! cargo run --release --example floor -- --listen 127.0.0.1:9000 --api-listen 127.0.0.1:9001
//! # stdout, once ready:  listening ws=127.0.0.1:9000 api=127.0.0.1:9001
//! ```
//!
//! - `ws://LISTEN/<anything>`: a WebSocket connection (RFC 6455 handshake, no extensions). It
//!   is subscribed to everything from the start; what the client sends is read and dropped.
//! - `POST /pub/<channel>` on API-LISTEN, body: one or more JSON values, one per line. Each
//!   becomes the frame `{"type":"message","channel":<channel>,"data":<value>}` (what wsbridge
//!   sends for a channel without history), the frames of one request are written together
//!   (one write per socket per request, as a gateway that drains its queue into one write
//!   does), and the answer is `200` once every socket took them.
//! - `GET /healthz` → `200`.
//!
//! One tokio thread (`current_thread`): the writes are `try_write` calls, one syscall each; a
//! socket whose buffer is full (not seen at the benchmark's rates) is finished with a wait for
//! writability before the request is answered. A socket is dropped when its client closes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// RFC 6455 1.3: appended to the client's key before hashing.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest request head (handshake or publish) read.
const MAX_HEAD: usize = 16 * 1024;

/// Every connected client socket, by a number of our own.
#[derive(Default)]
struct Clients {
    next: AtomicU64,
    sockets: Mutex<HashMap<u64, Arc<TcpStream>>>,
    /// Serializes publishes, so that two requests never interleave frames on one socket.
    publish: tokio::sync::Mutex<()>,
}

struct Args {
    listen: SocketAddr,
    api_listen: SocketAddr,
}

const USAGE: &str = "usage: floor --listen ADDR:PORT --api-listen ADDR:PORT (port 0: any free one)";

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut api_listen = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let addr = || -> Result<SocketAddr, String> {
            value
                .parse()
                .map_err(|e| format!("{flag} {value:?}: {e} (expected ADDR:PORT)"))
        };
        match flag.as_str() {
            "--listen" => listen = Some(addr()?),
            "--api-listen" => api_listen = Some(addr()?),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?,
        api_listen: api_listen.ok_or_else(|| format!("--api-listen is required\n{USAGE}"))?,
    })
}

/// Reads a request head (up to the blank line); returns it and whatever came after it.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<String>, String> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).into_owned();
            buf.drain(..i + 4);
            return Ok(Some(head));
        }
        if buf.len() > MAX_HEAD {
            return Err("request head longer than 16 KiB".into());
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("connection closed inside a request head".into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Answers the upgrade, then keeps the socket in `clients` until the client closes it.
async fn serve_client(mut stream: TcpStream, clients: Arc<Clients>) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let head = read_head(&mut stream, &mut buf)
        .await?
        .ok_or("closed before the handshake")?;
    let Some(key) = header(&head, "sec-websocket-key") else {
        let _ = stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 28\r\n\r\nexpected a WebSocket upgrade")
            .await;
        return Err("a request without Sec-WebSocket-Key".into());
    };
    let accept = base64::engine::general_purpose::STANDARD
        .encode(Sha1::digest(format!("{key}{WS_GUID}").as_bytes()));
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream
        .write_all(response.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let stream = Arc::new(stream);
    let id = clients.next.fetch_add(1, Ordering::Relaxed);
    clients.sockets.lock().unwrap().insert(id, stream.clone());
    // Read and drop whatever the client sends, until it closes (EOF or an error).
    let mut chunk = [0u8; 1024];
    loop {
        if stream.readable().await.is_err() {
            break;
        }
        match stream.try_read(&mut chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    clients.sockets.lock().unwrap().remove(&id);
    Ok(())
}

/// An unmasked server text frame holding `payload`.
fn text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// The frames of one publish: one per line of `body`, each wsbridge's `message` frame.
fn frames(channel: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    let channel_json = serde_json::to_string(channel).expect("strings serialize");
    let mut out = Vec::with_capacity(body.len() + 64);
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        serde_json::from_slice::<serde::de::IgnoredAny>(line).map_err(|e| {
            format!(
                "a body line is not JSON ({e}): {}",
                String::from_utf8_lossy(line)
            )
        })?;
        let mut text = Vec::with_capacity(line.len() + 48);
        text.extend_from_slice(b"{\"type\":\"message\",\"channel\":");
        text.extend_from_slice(channel_json.as_bytes());
        text.extend_from_slice(b",\"data\":");
        text.extend_from_slice(line);
        text.push(b'}');
        text_frame(&mut out, &text);
    }
    if out.is_empty() {
        return Err("an empty body: expected one JSON value per line".into());
    }
    Ok(out)
}

/// Writes `bytes` to every connected socket: one `try_write` each; what a full buffer did not
/// take is written after the loop, waiting for writability. Returns the sockets written to.
async fn fan_out(clients: &Clients, bytes: &[u8]) -> usize {
    let _serial = clients.publish.lock().await;
    let mut unfinished: Vec<(Arc<TcpStream>, usize)> = Vec::new();
    let count;
    {
        let sockets = clients.sockets.lock().unwrap();
        count = sockets.len();
        for socket in sockets.values() {
            match socket.try_write(bytes) {
                Ok(n) if n == bytes.len() => {}
                Ok(n) => unfinished.push((socket.clone(), n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    unfinished.push((socket.clone(), 0))
                }
                // A closed client: its reader removes it.
                Err(_) => {}
            }
        }
    }
    for (socket, mut done) in unfinished {
        while done < bytes.len() {
            if socket.writable().await.is_err() {
                break;
            }
            match socket.try_write(&bytes[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
    }
    count
}

/// One API connection: `POST /pub/<channel>` and `GET /healthz`, keep-alive.
async fn serve_api(mut stream: TcpStream, clients: Arc<Clients>) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buf).await? {
        let mut parts = head.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let length: usize = match header(&head, "content-length") {
            Some(v) => v
                .parse()
                .map_err(|_| format!("content-length {v:?}: not a number"))?,
            None => 0,
        };
        while buf.len() < length {
            let mut chunk = [0u8; 16 * 1024];
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed inside a body".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let (status, text) = match (method, path.strip_prefix("/pub/")) {
            ("GET", _) if path == "/healthz" => ("200 OK", "ok".to_string()),
            ("POST", Some(channel)) if !channel.is_empty() => match frames(channel, &body) {
                Ok(bytes) => {
                    let n = fan_out(&clients, &bytes).await;
                    ("200 OK", format!("{{\"sockets\":{n}}}"))
                }
                Err(e) => ("400 Bad Request", e),
            },
            _ => (
                "404 Not Found",
                "expected POST /pub/<channel> or GET /healthz".to_string(),
            ),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        stream
            .write_all(response.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("floor: {e}");
            return ExitCode::from(2);
        }
    };
    let (ws, api) = match (
        TcpListener::bind(args.listen).await,
        TcpListener::bind(args.api_listen).await,
    ) {
        (Ok(ws), Ok(api)) => (ws, api),
        (Err(e), _) => {
            eprintln!("floor: --listen {}: {e}", args.listen);
            return ExitCode::from(1);
        }
        (_, Err(e)) => {
            eprintln!("floor: --api-listen {}: {e}", args.api_listen);
            return ExitCode::from(1);
        }
    };
    let clients = Arc::new(Clients::default());
    println!(
        "listening ws={} api={}",
        ws.local_addr().expect("bound"),
        api.local_addr().expect("bound")
    );
    let api_clients = clients.clone();
    tokio::spawn(async move {
        loop {
            match api.accept().await {
                Ok((stream, _)) => {
                    let clients = api_clients.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_api(stream, clients).await {
                            eprintln!("floor: api: {e}");
                        }
                    });
                }
                Err(e) => eprintln!("floor: api accept: {e}"),
            }
        }
    });
    loop {
        match ws.accept().await {
            Ok((stream, _)) => {
                let clients = clients.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_client(stream, clients).await {
                        eprintln!("floor: client: {e}");
                    }
                });
            }
            Err(e) => {
                // Out of files, say: say so and back off rather than spin.
                eprintln!("floor: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
