//! What differs between the gateways under test: how a client connects and joins a channel,
//! how a message reaches it, and how a publisher sends one.

use std::net::{Ipv4Addr, SocketAddr};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// The gateway speaking on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// wsbridge's JSON protocol at `/ws`; `POST /send` on the API listener.
    Wsbridge,
    /// socket.io 4 (Engine.IO v4 over a plain WebSocket) with `bench/peers/socketio/server.mjs`.
    Socketio,
    /// nchan: `/sub/<channel>` WebSocket subscribers, `POST /pub/<channel>` publishers.
    Nchan,
    /// examples/floor.rs: every connection gets everything; `POST /pub/<channel>` with one data
    /// value per line; frames as wsbridge's `message`.
    Floor,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "wsbridge" => Ok(Self::Wsbridge),
            "socketio" => Ok(Self::Socketio),
            "nchan" => Ok(Self::Nchan),
            "floor" => Ok(Self::Floor),
            other => Err(format!(
                "--target {other:?}: expected wsbridge, socketio, nchan or floor"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Wsbridge => "wsbridge",
            Self::Socketio => "socketio",
            Self::Nchan => "nchan",
            Self::Floor => "floor",
        }
    }
}

/// What every published message carries: a sequence number, the publisher's clock (µs since
/// the load generator started) and whether it is a warm-up message (not counted).
#[derive(Debug, Deserialize)]
pub struct Payload {
    pub seq: u64,
    pub t: u64,
    #[serde(default)]
    pub w: u8,
}

#[derive(Deserialize)]
struct WsbridgeFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    data: Option<Payload>,
    #[serde(default)]
    connection: Option<String>,
    #[serde(default)]
    id: Option<Value>,
}

/// A frame a client read, as far as the load generator cares.
pub enum Incoming {
    /// A published message.
    Message(Payload),
    /// An ack of a client `send`.
    Ack,
    /// An error frame (a refused `send`, say), with its text.
    Error,
    /// Something to answer (Engine.IO ping) with this text.
    Answer(&'static str),
    /// Anything else.
    Other,
}

/// A connected client that has joined its channel.
pub struct Joined {
    pub ws: Ws,
    /// The id to address this connection with (wsbridge connection id, socket.io sid).
    pub id: Option<String>,
}

/// Opens a TCP connection from `source` (a loopback address, so that more than ~28k
/// connections fit) and upgrades it.
pub async fn open(url: &str, source: Ipv4Addr) -> Result<Ws, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("{url}: {e} (use an IP address)"))?;
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(source.into(), 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect {addr} from {source}: {e}"))?;
    stream.set_nodelay(true).ok();
    // Small buffers: the load generator holds up to 50k of these.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("upgrade {url}: {e}"))?;
    Ok(ws)
}

pub async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Close(c))) => return Err(format!("closed: {c:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("connection ended".into()),
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| e.to_string())
}

impl Kind {
    /// The WebSocket URL of a client of `endpoint` (what `--ws` gave) joining `channel`.
    pub fn url(self, endpoint: &str, channel: &str, token: Option<&str>) -> String {
        let base = endpoint.trim_end_matches('/');
        match self {
            Self::Wsbridge => match token {
                Some(t) => format!("{base}?token={t}"),
                None => base.to_string(),
            },
            Self::Socketio => format!("{base}/socket.io/?EIO=4&transport=websocket"),
            Self::Nchan => format!("{base}/sub/{channel}"),
            Self::Floor => format!("{base}/"),
        }
    }

    /// Handshake and join: returns once the client is in `channel` (or, with `subscribe`
    /// false, once connected).
    pub async fn join(self, mut ws: Ws, channel: &str, subscribe: bool) -> Result<Joined, String> {
        match self {
            Self::Wsbridge => {
                let welcome = next_text(&mut ws).await?;
                let frame: WsbridgeFrame = serde_json::from_str(&welcome)
                    .map_err(|e| format!("welcome {welcome}: {e}"))?;
                if frame.kind != "welcome" {
                    return Err(format!("expected welcome, got {welcome}"));
                }
                let id = frame.connection;
                if subscribe {
                    send_text(
                        &mut ws,
                        format!(r#"{{"type":"subscribe","channel":"{channel}","id":"s"}}"#),
                    )
                    .await?;
                    let reply = next_text(&mut ws).await?;
                    if !reply.contains(r#""type":"subscribed""#) {
                        return Err(format!("subscribe refused: {reply}"));
                    }
                }
                Ok(Joined { ws, id })
            }
            Self::Socketio => {
                let open = next_text(&mut ws).await?;
                if !open.starts_with('0') {
                    return Err(format!("expected an Engine.IO open packet, got {open}"));
                }
                send_text(&mut ws, "40".into()).await?;
                let connected = loop {
                    let t = next_text(&mut ws).await?;
                    if t == "2" {
                        send_text(&mut ws, "3".into()).await?;
                    } else {
                        break t;
                    }
                };
                let sid = connected
                    .strip_prefix("40")
                    .and_then(|rest| serde_json::from_str::<Value>(rest).ok())
                    .and_then(|v| v["sid"].as_str().map(str::to_owned))
                    .ok_or_else(|| format!("expected 40{{sid}}, got {connected}"))?;
                if subscribe {
                    send_text(&mut ws, format!(r#"42["subscribe","{channel}"]"#)).await?;
                    loop {
                        let t = next_text(&mut ws).await?;
                        if t == "2" {
                            send_text(&mut ws, "3".into()).await?;
                        } else if t.starts_with(r#"42["subscribed""#) {
                            break;
                        } else {
                            return Err(format!("expected subscribed, got {t}"));
                        }
                    }
                }
                Ok(Joined { ws, id: Some(sid) })
            }
            // The subscription is the connection itself.
            Self::Nchan | Self::Floor => Ok(Joined { ws, id: None }),
        }
    }

    /// Reads what a text frame means.
    pub fn incoming(self, text: &str) -> Incoming {
        match self {
            // The floor sends wsbridge's `message` frame, byte for byte.
            Self::Wsbridge | Self::Floor => match serde_json::from_str::<WsbridgeFrame>(text) {
                Ok(f) if f.kind == "message" => f.data.map_or(Incoming::Other, Incoming::Message),
                Ok(f) if f.kind == "ack" && f.id.is_some() => Incoming::Ack,
                Ok(f) if f.kind == "error" => Incoming::Error,
                _ => Incoming::Other,
            },
            Self::Socketio => {
                if text == "2" {
                    return Incoming::Answer("3");
                }
                // An ack callback's answer: 43<ack id>[{"entry":...}] or [{"error":...}].
                if let Some(rest) = text.strip_prefix("43") {
                    let args = rest.trim_start_matches(|c: char| c.is_ascii_digit());
                    return match serde_json::from_str::<(Value,)>(args) {
                        Ok((answer,)) if answer.get("entry").is_some() => Incoming::Ack,
                        Ok((answer,)) if answer.get("error").is_some() => Incoming::Error,
                        _ => Incoming::Other,
                    };
                }
                let Some(rest) = text.strip_prefix("42") else {
                    return Incoming::Other;
                };
                match serde_json::from_str::<(String, Value)>(rest) {
                    Ok((event, data)) if event == "message" => {
                        serde_json::from_value(data).map_or(Incoming::Other, Incoming::Message)
                    }
                    Ok((event, _)) if event == "ack" => Incoming::Ack,
                    _ => Incoming::Other,
                }
            }
            Self::Nchan => serde_json::from_str(text).map_or(Incoming::Other, Incoming::Message),
        }
    }

    /// The text a client sends to put `data` into the inbound stream. socket.io: an emit with
    /// an ack callback (ack id = `id`), whose handler in the benchmark server XADDs it to the
    /// same stream as wsbridge would, then acks with the entry id.
    pub fn client_send(self, stream: &str, id: u64, data: &str) -> Option<String> {
        match self {
            Self::Wsbridge => Some(format!(
                r#"{{"type":"send","stream":"{stream}","id":"{id}","data":{data}}}"#
            )),
            Self::Socketio => Some(format!(
                r#"42{id}["send",{{"stream":"{stream}","id":{id},"data":{data}}}]"#
            )),
            Self::Nchan | Self::Floor => None,
        }
    }
}
