//! The client protocol: frames a client sends, frames the gateway sends, and their two encodings
//! (JSON text frames, MessagePack binary frames under the `wsbridge.msgpack` subprotocol).
//!
//! Decoding never panics: any byte string yields a [`ClientFrame`] or a [`FrameError`] that keeps
//! the frame's `id` whenever the bytes allowed reading it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The subprotocol a client asks for to get MessagePack frames.
pub const MSGPACK_SUBPROTOCOL: &str = "wsbridge.msgpack";

/// How a connection's frames are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JSON in text frames.
    Json,
    /// MessagePack in binary frames.
    Msgpack,
}

impl Encoding {
    /// The value of the `encoding` field of stream entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Msgpack => "msgpack",
        }
    }
}

/// A client's own frame id, echoed in every reply: a string or an integer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FrameId {
    /// `"id":"c1"`
    Str(String),
    /// `"id":7`
    Int(i64),
}

impl FrameId {
    /// The id as stream entries store it (`id` field).
    pub fn to_field(&self) -> String {
        match self {
            FrameId::Str(s) => s.clone(),
            FrameId::Int(i) => i.to_string(),
        }
    }
}

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// Append `data` to the inbound stream `stream`.
    Send {
        /// Stream name (not the key).
        stream: String,
        /// `data` encoded as the client sent it: JSON text or MessagePack bytes.
        data: Bytes,
        /// The encoding of `data`.
        encoding: Encoding,
        /// Client frame id.
        id: Option<FrameId>,
    },
    /// Join a channel.
    Subscribe {
        /// Channel name.
        channel: String,
        /// Offset to resume from.
        since: Option<String>,
        /// Client frame id.
        id: Option<FrameId>,
    },
    /// Leave a channel.
    Unsubscribe {
        /// Channel name.
        channel: String,
        /// Client frame id.
        id: Option<FrameId>,
    },
}

/// Error codes sent in `error` frames and counted in `wsbridge_inbound_rejected_total{code}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not valid JSON / MessagePack, or not an object.
    BadFrame,
    /// `type` is missing or unknown.
    UnknownType,
    /// A required field is missing or has the wrong type.
    BadRequest,
    /// The stream is not in `inbound.streams`.
    StreamNotAllowed,
    /// The token's `channels` claim does not allow this channel.
    ChannelNotAllowed,
    /// The gateway's append queue is full.
    Overloaded,
    /// Redis did not store the entry.
    RedisUnavailable,
    /// The connection sends faster than `limits.client_messages_per_second`.
    RateLimited,
    /// The connection is in `limits.max_subscriptions_per_connection` channels already.
    TooManySubscriptions,
}

impl ErrorCode {
    /// Every code, for pre-registering counters.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::RateLimited,
        ErrorCode::TooManySubscriptions,
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::BadRequest,
        ErrorCode::StreamNotAllowed,
        ErrorCode::ChannelNotAllowed,
        ErrorCode::Overloaded,
        ErrorCode::RedisUnavailable,
    ];

    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::StreamNotAllowed => "stream_not_allowed",
            ErrorCode::ChannelNotAllowed => "channel_not_allowed",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RedisUnavailable => "redis_unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
        }
    }
}

/// A frame that cannot be taken, with what the client needs to know.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct FrameError {
    /// The frame id, when it could be read.
    pub id: Option<FrameId>,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human sentence.
    pub message: String,
}

impl FrameError {
    /// Builds an error.
    pub fn new(id: Option<FrameId>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id,
            code,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct JsonFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    id: Option<FrameId>,
    stream: Option<String>,
    channel: Option<String>,
    since: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MsgpackFrame {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<FrameId>,
    stream: Option<String>,
    channel: Option<String>,
    since: Option<String>,
    data: Option<rmpv::Value>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<FrameId>,
}

/// Decodes a text frame (JSON).
///
/// # Errors
/// A [`FrameError`] with the frame's id when it could be read.
pub fn decode_json(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
    let frame: JsonFrame = serde_json::from_slice(bytes).map_err(|e| {
        let id = serde_json::from_slice::<IdOnly>(bytes)
            .ok()
            .and_then(|f| f.id);
        FrameError::new(
            id,
            ErrorCode::BadFrame,
            format!("frame is not a valid JSON object: {e}"),
        )
    })?;
    let data = frame
        .data
        .map(|raw| Bytes::copy_from_slice(raw.get().as_bytes()))
        .unwrap_or_else(|| Bytes::from_static(b"null"));
    build(
        frame.kind.as_deref(),
        frame.id,
        frame.stream,
        frame.channel,
        frame.since,
        data,
        Encoding::Json,
    )
}

/// Decodes a binary frame (MessagePack).
///
/// # Errors
/// A [`FrameError`] with the frame's id when it could be read.
pub fn decode_msgpack(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
    let frame: MsgpackFrame = rmp_serde::from_slice(bytes).map_err(|e| {
        let id = rmp_serde::from_slice::<IdOnly>(bytes)
            .ok()
            .and_then(|f| f.id);
        FrameError::new(
            id,
            ErrorCode::BadFrame,
            format!("frame is not a valid MessagePack map: {e}"),
        )
    })?;
    let data = match frame.data {
        Some(value) => {
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, &value).map_err(|e| {
                FrameError::new(frame.id.clone(), ErrorCode::BadFrame, format!("data: {e}"))
            })?;
            Bytes::from(buf)
        }
        None => Bytes::from_static(&[0xc0]), // nil
    };
    build(
        frame.kind.as_deref(),
        frame.id,
        frame.stream,
        frame.channel,
        frame.since,
        data,
        Encoding::Msgpack,
    )
}

fn build(
    kind: Option<&str>,
    id: Option<FrameId>,
    stream: Option<String>,
    channel: Option<String>,
    since: Option<String>,
    data: Bytes,
    encoding: Encoding,
) -> Result<ClientFrame, FrameError> {
    let need = |field: Option<String>, name: &str, id: &Option<FrameId>| match field {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(FrameError::new(
            id.clone(),
            ErrorCode::BadRequest,
            format!("field `{name}` is required and must be a non-empty string"),
        )),
    };
    match kind {
        Some("send") => Ok(ClientFrame::Send {
            stream: need(stream, "stream", &id)?,
            data,
            encoding,
            id,
        }),
        Some("subscribe") => Ok(ClientFrame::Subscribe {
            channel: need(channel, "channel", &id)?,
            since,
            id,
        }),
        Some("unsubscribe") => Ok(ClientFrame::Unsubscribe {
            channel: need(channel, "channel", &id)?,
            id,
        }),
        Some(other) => Err(FrameError::new(
            id,
            ErrorCode::UnknownType,
            format!("unknown frame type `{other}`; expected send, subscribe or unsubscribe"),
        )),
        None => Err(FrameError::new(
            id,
            ErrorCode::UnknownType,
            "field `type` is missing",
        )),
    }
}

/// A frame the gateway sends in reply to the client or on its own.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame on every connection.
    Welcome {
        /// Connection id, unique in the cluster.
        connection: &'a str,
        /// User id from the token, null when anonymous.
        user: Option<&'a str>,
    },
    /// A `send` was stored.
    Ack {
        /// Client frame id.
        id: Option<&'a FrameId>,
        /// Stream entry id.
        entry: &'a str,
    },
    /// Joined a channel (in reply to `subscribe`, or pushed when a backend subscribed us).
    Subscribed {
        /// Channel.
        channel: &'a str,
        /// Client frame id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        /// Whether a `since` replay was complete; present only when `since` was given.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// Left a channel.
    Unsubscribed {
        /// Channel.
        channel: &'a str,
        /// Client frame id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
    },
    /// A frame could not be taken.
    Error {
        /// Client frame id (null when it could not be read).
        id: Option<&'a FrameId>,
        /// snake_case code.
        code: &'static str,
        /// Human sentence.
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    /// Encodes the frame for a connection.
    pub fn encode(&self, encoding: Encoding) -> Bytes {
        match encoding {
            Encoding::Json => {
                Bytes::from(serde_json::to_vec(self).expect("server frames serialize"))
            }
            Encoding::Msgpack => {
                Bytes::from(rmp_serde::to_vec_named(self).expect("server frames serialize"))
            }
        }
    }
}

/// Encodes a `message` frame as JSON without re-parsing `data`: `data` is already JSON text.
/// `offset` is present for channels that keep history.
pub fn message_json(channel: Option<&str>, offset: Option<&str>, data: &RawValue) -> Bytes {
    let mut out = Vec::with_capacity(data.get().len() + 96);
    out.extend_from_slice(b"{\"type\":\"message\",");
    if let Some(channel) = channel {
        out.extend_from_slice(b"\"channel\":");
        serde_json::to_writer(&mut out, channel).expect("strings serialize");
        out.push(b',');
    }
    if let Some(offset) = offset {
        out.extend_from_slice(b"\"offset\":");
        serde_json::to_writer(&mut out, offset).expect("strings serialize");
        out.push(b',');
    }
    out.extend_from_slice(b"\"data\":");
    out.extend_from_slice(data.get().as_bytes());
    out.push(b'}');
    Bytes::from(out)
}

/// Encodes a `message` frame as MessagePack, converting `data` from JSON.
pub fn message_msgpack(channel: Option<&str>, offset: Option<&str>, data: &RawValue) -> Bytes {
    #[derive(Serialize)]
    struct Message<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<&'a str>,
        data: serde_json::Value,
    }
    let data: serde_json::Value =
        serde_json::from_str(data.get()).unwrap_or(serde_json::Value::Null);
    let frame = Message {
        kind: "message",
        channel,
        offset,
        data,
    };
    Bytes::from(rmp_serde::to_vec_named(&frame).expect("messages serialize"))
}

/// Encodes a `message` frame in `encoding`.
pub fn message(
    encoding: Encoding,
    channel: Option<&str>,
    offset: Option<&str>,
    data: &RawValue,
) -> Bytes {
    match encoding {
        Encoding::Json => message_json(channel, offset, data),
        Encoding::Msgpack => message_msgpack(channel, offset, data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_send() {
        let f = decode_json(br#"{"type":"send","stream":"chat","data":{"a":[1,2]},"id":"c1"}"#)
            .unwrap();
        assert_eq!(
            f,
            ClientFrame::Send {
                stream: "chat".into(),
                data: Bytes::from_static(br#"{"a":[1,2]}"#),
                encoding: Encoding::Json,
                id: Some(FrameId::Str("c1".into())),
            }
        );
    }

    #[test]
    fn bad_json_keeps_no_id_but_wrong_field_type_keeps_id() {
        let e = decode_json(b"{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        let e = decode_json(br#"{"type":"subscribe","channel":5,"id":"x"}"#).unwrap_err();
        assert_eq!(e.id, Some(FrameId::Str("x".into())));
    }

    #[test]
    fn unknown_type() {
        let e = decode_json(br#"{"type":"dance","id":3}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownType);
        assert_eq!(e.id, Some(FrameId::Int(3)));
    }

    #[test]
    fn msgpack_roundtrip() {
        #[derive(Serialize)]
        struct F<'a> {
            #[serde(rename = "type")]
            t: &'a str,
            stream: &'a str,
            data: (u8, &'a str),
            id: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&F {
            t: "send",
            stream: "chat",
            data: (1, "x"),
            id: "m1",
        })
        .unwrap();
        match decode_msgpack(&bytes).unwrap() {
            ClientFrame::Send { data, encoding, .. } => {
                assert_eq!(encoding, Encoding::Msgpack);
                let v: (u8, String) = rmp_serde::from_slice(&data).unwrap();
                assert_eq!(v, (1, "x".to_string()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn message_json_is_valid() {
        let raw = RawValue::from_string("{\"x\":\"\\\"q\"}".into()).unwrap();
        let b = message_json(Some("room:\"1"), None, &raw);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["channel"], "room:\"1");
        assert_eq!(v["data"]["x"], "\"q");
    }
}
