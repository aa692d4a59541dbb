//! A tiny command-line WebSocket client for wsbridge.
//!
//! ```text
//! cargo run --example client -- ws://127.0.0.1:8080/ws [--token JWT] [--msgpack]
//! ```
//!
//! Every frame from the gateway is printed on stdout as one JSON line (MessagePack frames are
//! shown as the same JSON; a close is printed as `{"close":{"code":..,"reason":..}}`).
//! Lines read from stdin:
//!
//! - `/sub CHANNEL` subscribes and makes CHANNEL the current channel;
//! - `/unsub CHANNEL` unsubscribes;
//! - `/raw TEXT` sends TEXT as it is, even when it is not valid JSON (with `--msgpack`, TEXT must
//!   be JSON and is sent as the same value in MessagePack);
//! - `/quit` (or end of input) closes the connection;
//! - any other line is a chat message to the current channel:
//!   `{"type":"send","stream":"chat","data":{"channel":CURRENT,"text":LINE},"id":"cN"}`.
//!
//! The client subscribes to `room:lobby` at start. With `examples/backends/python/backend.py` or
//! `cargo run --example backend` running, lines typed in one client appear in every client
//! subscribed to the same channel.

use std::process::ExitCode;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const USAGE: &str = "usage: client [ws://127.0.0.1:8080/ws] [--token JWT] [--msgpack]";

struct Args {
    url: String,
    token: Option<String>,
    msgpack: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        url: "ws://127.0.0.1:8080/ws".into(),
        token: None,
        msgpack: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--token" => args.token = Some(it.next().ok_or("--token needs a value")?),
            "--msgpack" => args.msgpack = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other if other.starts_with("ws://") || other.starts_with("wss://") => {
                args.url = other.into()
            }
            other => return Err(format!("unexpected argument `{other}`\n{USAGE}")),
        }
    }
    Ok(args)
}

/// What one stdin line asks for.
enum Command {
    Frame(Value),
    Raw(String),
    Quit,
    Nothing,
}

/// Builds frames from stdin lines; remembers the current channel and numbers frame ids.
struct Composer {
    current: String,
    next_id: u64,
}

impl Composer {
    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("c{}", self.next_id)
    }

    fn subscribe(&mut self, channel: &str) -> Value {
        self.current = channel.to_string();
        json!({"type": "subscribe", "channel": channel, "id": self.id()})
    }

    fn command(&mut self, line: &str) -> Result<Command, String> {
        let line = line.trim_end_matches(['\r', '\n']);
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        Ok(match word {
            "" if rest.is_empty() => Command::Nothing,
            "/quit" => Command::Quit,
            "/sub" | "/unsub" if rest.is_empty() || rest.contains(' ') => {
                return Err(format!("usage: {word} CHANNEL"))
            }
            "/sub" => Command::Frame(self.subscribe(rest)),
            "/unsub" => {
                Command::Frame(json!({"type": "unsubscribe", "channel": rest, "id": self.id()}))
            }
            "/raw" if rest.is_empty() => return Err("usage: /raw TEXT".into()),
            "/raw" => Command::Raw(rest.to_string()),
            _ => Command::Frame(json!({
                "type": "send",
                "stream": "chat",
                "data": {"channel": self.current, "text": line},
                "id": self.id(),
            })),
        })
    }
}

fn encode(frame: &Value, msgpack: bool) -> Message {
    if msgpack {
        Message::Binary(
            rmp_serde::to_vec_named(frame)
                .expect("JSON values encode")
                .into(),
        )
    } else {
        Message::Text(frame.to_string().into())
    }
}

/// One stdout line for a frame from the gateway; `None` for frames that carry nothing to show.
fn show(message: &Message) -> Option<String> {
    Some(match message {
        Message::Text(text) => match serde_json::from_str::<Value>(text) {
            Ok(v) => v.to_string(),
            Err(_) => json!({"unparsable_text": text.as_str()}).to_string(),
        },
        Message::Binary(bytes) => match rmp_serde::from_slice::<Value>(bytes) {
            Ok(v) => v.to_string(),
            Err(e) => json!({"unparsable_binary": e.to_string()}).to_string(),
        },
        Message::Close(frame) => {
            let (code, reason) = frame
                .as_ref()
                .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                .unwrap_or((None, String::new()));
            json!({"close": {"code": code, "reason": reason}}).to_string()
        }
        _ => return None,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut request = match args.url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bad URL {}: {e}", args.url);
            return ExitCode::from(2);
        }
    };
    if args.msgpack {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("wsbridge.msgpack"),
        );
    }
    if let Some(token) = &args.token {
        let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else {
            eprintln!("the token holds characters a header cannot carry");
            return ExitCode::from(2);
        };
        request.headers_mut().insert("authorization", value);
    }
    let (ws, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("cannot connect to {}: {e}", args.url);
            return ExitCode::from(1);
        }
    };
    eprintln!(
        "connected to {} ({}); /sub CH, /unsub CH, /raw JSON, /quit, or text to chat",
        args.url,
        if args.msgpack { "msgpack" } else { "json" }
    );
    let (mut sink, mut stream) = ws.split();

    // Stdin is read on a plain thread: a blocking read must not hold up the runtime at exit.
    let (lines_tx, mut lines) = mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });

    let mut composer = Composer {
        current: String::new(),
        next_id: 0,
    };
    let first = composer.subscribe("room:lobby");
    if let Err(e) = sink.send(encode(&first, args.msgpack)).await {
        eprintln!("send failed: {e}");
        return ExitCode::from(1);
    }

    let mut closing = false;
    loop {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(message)) => {
                    if let Some(line) = show(&message) {
                        println!("{line}");
                    }
                    if message.is_close() && !closing {
                        // tungstenite answers the close; keep reading until the stream ends.
                        closing = true;
                    }
                }
                Some(Err(e)) => {
                    if !closing {
                        eprintln!("connection error: {e}");
                        return ExitCode::from(1);
                    }
                    break;
                }
                None => break,
            },
            line = lines.recv(), if !closing => {
                let command = match line {
                    None => Command::Quit,
                    Some(line) => match composer.command(&line) {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("{e}");
                            continue;
                        }
                    },
                };
                let sent = match command {
                    Command::Nothing => continue,
                    Command::Frame(frame) => sink.send(encode(&frame, args.msgpack)).await,
                    Command::Raw(text) if !args.msgpack => {
                        sink.send(Message::Text(text.into())).await
                    }
                    Command::Raw(text) => match serde_json::from_str::<Value>(&text) {
                        Ok(frame) => sink.send(encode(&frame, true)).await,
                        Err(e) => {
                            eprintln!("with --msgpack, /raw needs JSON to convert: {e}");
                            continue;
                        }
                    },
                    Command::Quit => {
                        closing = true;
                        sink.send(Message::Close(None)).await
                    }
                };
                if let Err(e) = sent {
                    eprintln!("send failed: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_frames() {
        let mut c = Composer {
            current: String::new(),
            next_id: 0,
        };
        let Command::Frame(f) = c.command("/sub room:9").unwrap() else {
            panic!()
        };
        assert_eq!(
            f,
            json!({"type": "subscribe", "channel": "room:9", "id": "c1"})
        );
        let Command::Frame(f) = c.command("hello there").unwrap() else {
            panic!()
        };
        assert_eq!(
            f,
            json!({"type": "send", "stream": "chat",
                   "data": {"channel": "room:9", "text": "hello there"}, "id": "c2"})
        );
        let Command::Raw(t) = c.command(r#"/raw {"type": "x"}"#).unwrap() else {
            panic!()
        };
        assert_eq!(t, r#"{"type": "x"}"#);
        assert!(c.command("/raw").is_err());
        assert!(c.command("/unsub").is_err());
        assert!(matches!(c.command("").unwrap(), Command::Nothing));
        assert!(matches!(c.command("/quit").unwrap(), Command::Quit));
    }
}
