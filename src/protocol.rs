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
    /// Ask who is in a channel (one page of its presence).
    Presence {
        /// Channel name.
        channel: String,
        /// Which view, and where the page starts.
        query: PresenceQuery,
        /// Client frame id.
        id: Option<FrameId>,
    },
    /// Replace the connection's token with a fresh one of the same user.
    Refresh {
        /// The new token.
        token: String,
        /// Client frame id.
        id: Option<FrameId>,
    },
    /// Publish `data` to a channel's subscribers, through the same path as `POST /send`.
    Publish {
        /// Channel name.
        channel: String,
        /// `data` encoded as the client sent it: JSON text or MessagePack bytes.
        data: Bytes,
        /// The encoding of `data`.
        encoding: Encoding,
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

impl PresenceQuery {
    /// Whether `view` (`connections`, the default, or `users`) asks for the users view.
    ///
    /// # Errors
    /// A sentence naming the field when `view` is something else.
    pub fn users_view(view: Option<&str>) -> Result<bool, String> {
        match view {
            None | Some("connections") => Ok(false),
            Some("users") => Ok(true),
            Some(other) => Err(format!(
                "field `view` must be \"connections\" or \"users\", not `{other}`"
            )),
        }
    }
}

impl PresenceQuery {
    /// The `cursor` of a presence query, as Redis reads it: a page's cursor is a number below
    /// 2^64 (Redis's `HSCAN` cursor), so anything else is the client's mistake, not Redis's.
    ///
    /// # Errors
    /// A sentence naming the field when `cursor` is not such a number.
    pub fn cursor(cursor: Option<String>) -> Result<Option<String>, String> {
        match cursor {
            None => Ok(None),
            Some(text) => match text.parse::<u64>() {
                Ok(n) if text.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n.to_string())),
                _ => Err(format!(
                    "field `cursor` must be the `cursor` of a previous page (a number), not `{text}`"
                )),
            },
        }
    }
}

/// What a presence query asks for: a view, and a page of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceQuery {
    /// Distinct users (with how many connections each) instead of connections.
    pub users: bool,
    /// Where the page starts: the `cursor` of the previous page; `None` for the first.
    pub cursor: Option<String>,
    /// The most entries wanted (capped by `presence.max_page`).
    pub limit: Option<u32>,
}

/// Error codes sent in `error` frames and counted in `wsbridge_inbound_rejected_total{code}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not valid JSON / MessagePack, not an object, or a field has the wrong type.
    BadFrame,
    /// `type` is missing or unknown.
    UnknownType,
    /// A required field is missing or empty, or `since` is not an offset this gateway gave.
    BadRequest,
    /// The stream is not in `inbound.streams`.
    StreamNotAllowed,
    /// The channel does not keep presence (`[[channels]] presence = true`).
    PresenceDisabled,
    /// A `refresh` token did not verify (expired, malformed, bad signature).
    TokenInvalid,
    /// A `refresh` token belongs to another user.
    TokenUserMismatch,
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
    /// The replica is shutting down: a `send` was not taken (not stored).
    ShuttingDown,
    /// A `publish` to a channel whose `[[channels]]` entry does not set `client_publish`.
    PublishNotAllowed,
    /// A `publish` the token's `publish` claim does not cover.
    PublishForbidden,
}

impl ErrorCode {
    /// Every code, for pre-registering counters.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::RateLimited,
        ErrorCode::TooManySubscriptions,
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::BadRequest,
        ErrorCode::StreamNotAllowed,
        ErrorCode::ChannelNotAllowed,
        ErrorCode::Overloaded,
        ErrorCode::RedisUnavailable,
        ErrorCode::ShuttingDown,
        ErrorCode::PresenceDisabled,
        ErrorCode::TokenInvalid,
        ErrorCode::TokenUserMismatch,
        ErrorCode::PublishNotAllowed,
        ErrorCode::PublishForbidden,
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
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::PresenceDisabled => "presence_disabled",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenUserMismatch => "token_user_mismatch",
            ErrorCode::PublishNotAllowed => "publish_not_allowed",
            ErrorCode::PublishForbidden => "publish_forbidden",
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
    view: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
    token: Option<String>,
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
    view: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
    token: Option<String>,
    data: Option<rmpv::Value>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<FrameId>,
}

/// Nesting allowed in a MessagePack frame. rmp-serde's default (1024) lets a small frame of
/// nested arrays exhaust a worker thread's stack in an unoptimised build; JSON's parser stops at
/// 128 levels.
const MSGPACK_MAX_DEPTH: usize = 128;

fn from_msgpack<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MSGPACK_MAX_DEPTH);
    T::deserialize(&mut de)
}

/// Decodes a text frame (JSON).
///
/// # Errors
/// A [`FrameError`] with the frame's id when it could be read.
pub fn decode_json(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
    // serde reads a struct from an array of its fields too; the protocol is objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(FrameError::new(
            None,
            ErrorCode::BadFrame,
            "a frame must be a JSON object",
        ));
    }
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
        Fields {
            stream: frame.stream,
            channel: frame.channel,
            since: frame.since,
            view: frame.view,
            cursor: frame.cursor,
            limit: frame.limit,
            token: frame.token,
        },
        data,
        Encoding::Json,
    )
}

/// Decodes a binary frame (MessagePack).
///
/// # Errors
/// A [`FrameError`] with the frame's id when it could be read.
pub fn decode_msgpack(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
    // A map (fixmap, map16, map32): serde would also read a struct from an array.
    if !matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(FrameError::new(
            None,
            ErrorCode::BadFrame,
            "a frame must be a MessagePack map",
        ));
    }
    let frame: MsgpackFrame = from_msgpack(bytes).map_err(|e| {
        let id = from_msgpack::<IdOnly>(bytes).ok().and_then(|f| f.id);
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
        Fields {
            stream: frame.stream,
            channel: frame.channel,
            since: frame.since,
            view: frame.view,
            cursor: frame.cursor,
            limit: frame.limit,
            token: frame.token,
        },
        data,
        Encoding::Msgpack,
    )
}

/// The fields of a client frame besides `type`, `id` and `data`.
struct Fields {
    stream: Option<String>,
    channel: Option<String>,
    since: Option<String>,
    view: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
    token: Option<String>,
}

fn build(
    kind: Option<&str>,
    id: Option<FrameId>,
    fields: Fields,
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
    let Fields {
        stream,
        channel,
        since,
        view,
        cursor,
        limit,
        token,
    } = fields;
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
        Some("publish") => Ok(ClientFrame::Publish {
            channel: need(channel, "channel", &id)?,
            data,
            encoding,
            id,
        }),
        Some("unsubscribe") => Ok(ClientFrame::Unsubscribe {
            channel: need(channel, "channel", &id)?,
            id,
        }),
        Some("presence") => {
            let users = match PresenceQuery::users_view(view.as_deref()) {
                Ok(users) => users,
                Err(e) => return Err(FrameError::new(id, ErrorCode::BadRequest, e)),
            };
            let cursor = match PresenceQuery::cursor(cursor) {
                Ok(cursor) => cursor,
                Err(e) => return Err(FrameError::new(id, ErrorCode::BadRequest, e)),
            };
            Ok(ClientFrame::Presence {
                channel: need(channel, "channel", &id)?,
                query: PresenceQuery {
                    users,
                    cursor,
                    limit,
                },
                id,
            })
        }
        Some("refresh") => Ok(ClientFrame::Refresh {
            token: need(token, "token", &id)?,
            id,
        }),
        Some(other) => Err(FrameError::new(
            id,
            ErrorCode::UnknownType,
            format!(
                "unknown frame type `{other}`; expected send, publish, subscribe, unsubscribe, presence or refresh"
            ),
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
    /// A `publish` was published (serialized as `ack`, like the answer to a `send`).
    #[serde(rename = "ack")]
    Published {
        /// Client frame id.
        id: Option<&'a FrameId>,
        /// The message's offset in the channel's history; only on channels with history.
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<&'a str>,
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
    /// One page of a channel's presence, in reply to `presence`.
    Presence {
        /// Channel.
        channel: &'a str,
        /// Client frame id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        /// The page, with the channel's counts.
        #[serde(flatten)]
        page: &'a PresencePage,
    },
    /// A user (or an anonymous connection) joined a channel with `join_leave`.
    Join {
        /// Channel.
        channel: &'a str,
        /// Who: `connection`, `user`, `info`.
        member: &'a serde_json::Value,
    },
    /// A user (or an anonymous connection) left a channel with `join_leave`: its last
    /// connection there left.
    Leave {
        /// Channel.
        channel: &'a str,
        /// Who: `connection`, `user`, `info`.
        member: &'a serde_json::Value,
    },
    /// A `refresh` was taken: the connection now lasts until `expires_at`.
    Refreshed {
        /// Client frame id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        /// The new token's `exp` (unix seconds); null when it has none.
        expires_at: Option<u64>,
    },
    /// The token expires at `expires_at` (unix seconds): send `refresh` before, or be closed
    /// with 1008 then.
    RefreshRequired {
        /// The token's `exp`.
        expires_at: u64,
    },
    /// Live messages on their way from Redis to this replica may have been lost (its pub/sub
    /// link dropped, or its buffer overflowed): messages to this connection, its user, everyone,
    /// or its channels without history. Channels with history catch up on their own.
    Missed,
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

/// One page of a channel's presence, as clients and backends get it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PresencePage {
    /// Connections in the channel, across all replicas.
    pub connections: u64,
    /// Distinct users in the channel (an anonymous connection counts as one).
    pub users: u64,
    /// This page: connections (`connection`, `user`, `info`), or, for the users view, users
    /// (`user`, `connections`; an anonymous connection also has `connection`).
    pub members: Vec<serde_json::Value>,
    /// Where the next page starts; `null` on the last page.
    pub cursor: Option<String>,
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

    // Property tests: the decoders are the first code to touch bytes from the network, so they
    // must never panic and must classify every input the way the README's error table says.
    mod props {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 512,
                // Failures are reported in the test output; nothing is written into src/.
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        fn json_leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_filter_map("finite", |f| {
                    serde_json::Number::from_f64(f).map(Value::Number)
                }),
                "\\PC{0,12}".prop_map(Value::String),
            ]
        }

        fn json_value() -> impl Strategy<Value = Value> {
            json_leaf().prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z]{0,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A value for a string field: often a well-formed one, sometimes empty, null or of
        /// another type.
        fn string_field(names: &'static [&'static str]) -> impl Strategy<Value = Option<Value>> {
            prop_oneof![
                2 => Just(None),
                3 => prop::sample::select(names).prop_map(|s| Some(Value::from(s))),
                2 => "\\PC{0,10}".prop_map(|s| Some(Value::String(s))),
                1 => Just(Some(Value::from(""))),
                1 => Just(Some(Value::Null)),
                1 => json_value().prop_map(Some),
            ]
        }

        fn id_field() -> impl Strategy<Value = Option<Value>> {
            prop_oneof![
                2 => Just(None),
                2 => "\\PC{0,10}".prop_map(|s| Some(Value::String(s))),
                2 => any::<i64>().prop_map(|i| Some(Value::from(i))),
                1 => ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(|u| Some(Value::from(u))),
                1 => json_value().prop_map(Some),
            ]
        }

        fn frame_object() -> impl Strategy<Value = Map<String, Value>> {
            (
                string_field(&["send", "publish", "subscribe", "unsubscribe", "dance"]),
                id_field(),
                string_field(&["chat", "orders"]),
                string_field(&["room:1", "a"]),
                string_field(&["0-0", "1700000000000-0"]),
                prop::option::of(json_value()),
                prop::option::of(json_value()),
            )
                .prop_map(|(kind, id, stream, channel, since, data, extra)| {
                    let mut m = Map::new();
                    let fields = [
                        ("type", kind),
                        ("id", id),
                        ("stream", stream),
                        ("channel", channel),
                        ("since", since),
                        ("data", data),
                        ("extra", extra),
                    ];
                    for (k, v) in fields {
                        if let Some(v) = v {
                            m.insert(k.to_string(), v);
                        }
                    }
                    m
                })
        }

        /// What the decoders must answer for a frame object, worked out from the README.
        #[derive(Debug, PartialEq)]
        enum Expected {
            Send {
                stream: String,
            },
            Subscribe {
                channel: String,
                since: Option<String>,
            },
            Unsubscribe {
                channel: String,
            },
            Publish {
                channel: String,
            },
            Error(ErrorCode),
        }

        /// `Ok(None)` for absent or null, `Err` for a value of another type.
        fn opt_str(m: &Map<String, Value>, key: &str) -> Result<Option<String>, ()> {
            match m.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(()),
            }
        }

        fn opt_id(m: &Map<String, Value>) -> Result<Option<FrameId>, ()> {
            match m.get("id") {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(FrameId::Str(s.clone()))),
                Some(Value::Number(n)) => n.as_i64().map(|i| Some(FrameId::Int(i))).ok_or(()),
                Some(_) => Err(()),
            }
        }

        fn expected(m: &Map<String, Value>) -> (Expected, Option<FrameId>) {
            let id = opt_id(m);
            let typed = (
                opt_str(m, "type"),
                &id,
                opt_str(m, "stream"),
                opt_str(m, "channel"),
                opt_str(m, "since"),
            );
            let (Ok(kind), Ok(_), Ok(stream), Ok(channel), Ok(since)) = typed else {
                return (Expected::Error(ErrorCode::BadFrame), id.ok().flatten());
            };
            let id = id.expect("checked above");
            let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
            let e = match kind.as_deref() {
                Some("send") => match nonempty(stream) {
                    Some(stream) => Expected::Send { stream },
                    None => Expected::Error(ErrorCode::BadRequest),
                },
                Some("subscribe") => match nonempty(channel) {
                    Some(channel) => Expected::Subscribe { channel, since },
                    None => Expected::Error(ErrorCode::BadRequest),
                },
                Some("unsubscribe") => match nonempty(channel) {
                    Some(channel) => Expected::Unsubscribe { channel },
                    None => Expected::Error(ErrorCode::BadRequest),
                },
                Some("publish") => match nonempty(channel) {
                    Some(channel) => Expected::Publish { channel },
                    None => Expected::Error(ErrorCode::BadRequest),
                },
                _ => Expected::Error(ErrorCode::UnknownType),
            };
            (e, id)
        }

        /// Checks a decoder's answer against the model; `data` is checked by the caller.
        fn check(
            got: &Result<ClientFrame, FrameError>,
            m: &Map<String, Value>,
        ) -> Result<(), TestCaseError> {
            let (want, want_id) = expected(m);
            match (got, want) {
                (Ok(ClientFrame::Send { stream, id, .. }), Expected::Send { stream: s }) => {
                    prop_assert_eq!(stream, &s);
                    prop_assert_eq!(id, &want_id);
                }
                (
                    Ok(ClientFrame::Subscribe { channel, since, id }),
                    Expected::Subscribe {
                        channel: c,
                        since: s,
                    },
                ) => {
                    prop_assert_eq!(channel, &c);
                    prop_assert_eq!(since, &s);
                    prop_assert_eq!(id, &want_id);
                }
                (
                    Ok(ClientFrame::Unsubscribe { channel, id }),
                    Expected::Unsubscribe { channel: c },
                ) => {
                    prop_assert_eq!(channel, &c);
                    prop_assert_eq!(id, &want_id);
                }
                (
                    Ok(ClientFrame::Publish { channel, id, .. }),
                    Expected::Publish { channel: c },
                ) => {
                    prop_assert_eq!(channel, &c);
                    prop_assert_eq!(id, &want_id);
                }
                (Err(e), Expected::Error(code)) => {
                    prop_assert_eq!(e.code, code, "{}", e.message);
                    // The reply to a refused frame carries the client's id whenever it is a
                    // string or an integer, whatever else is wrong with the frame.
                    prop_assert_eq!(&e.id, &want_id);
                    prop_assert!(!e.message.is_empty());
                }
                (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got, want),
            }
            Ok(())
        }

        /// Bytes worth feeding a decoder: pure noise, and valid frames cut short or bit-flipped
        /// (which reach far deeper into the parsers than noise does).
        fn hostile_bytes(valid: fn(&Value) -> Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..256),
                (frame_object(), any::<prop::sample::Index>()).prop_map(move |(m, cut)| {
                    let bytes = valid(&Value::Object(m));
                    let cut = cut.index(bytes.len() + 1);
                    bytes[..cut].to_vec()
                }),
                (
                    frame_object(),
                    prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)
                )
                    .prop_map(move |(m, flips)| {
                        let mut bytes = valid(&Value::Object(m));
                        if !bytes.is_empty() {
                            for (at, x) in flips {
                                let at = at.index(bytes.len());
                                bytes[at] ^= x;
                            }
                        }
                        bytes
                    }),
            ]
        }

        fn to_json(v: &Value) -> Vec<u8> {
            serde_json::to_vec(v).unwrap()
        }

        fn to_msgpack(v: &Value) -> Vec<u8> {
            rmp_serde::to_vec_named(v).unwrap()
        }

        fn decoder_codes(r: &Result<ClientFrame, FrameError>) -> Result<(), TestCaseError> {
            if let Err(e) = r {
                prop_assert!(
                    matches!(
                        e.code,
                        ErrorCode::BadFrame | ErrorCode::UnknownType | ErrorCode::BadRequest
                    ),
                    "decoders only judge the frame itself: {:?}",
                    e
                );
                prop_assert!(!e.message.is_empty());
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn json_any_bytes_decode_or_fail_typed(bytes in hostile_bytes(to_json)) {
                let r = decode_json(&bytes);
                decoder_codes(&r)?;
                // Text frames reach the decoder only after the socket layer checked UTF-8, and
                // serde_json skips unknown fields without checking theirs; what is passed on
                // (`data`, here) must be UTF-8 all the same.
                if let Ok(ClientFrame::Send { data, .. }) = &r {
                    prop_assert!(std::str::from_utf8(data).is_ok());
                }
            }

            #[test]
            fn msgpack_any_bytes_decode_or_fail_typed(bytes in hostile_bytes(to_msgpack)) {
                decoder_codes(&decode_msgpack(&bytes))?;
            }

            #[test]
            fn json_objects_decode_as_the_readme_says(m in frame_object()) {
                let bytes = to_json(&Value::Object(m.clone()));
                let got = decode_json(&bytes);
                check(&got, &m)?;
                if let Ok(ClientFrame::Send { data, encoding, .. }) = &got {
                    prop_assert_eq!(*encoding, Encoding::Json);
                    // `data` is passed on as the client wrote it, and null when absent.
                    let want = match m.get("data") {
                        None => Value::Null,
                        Some(v) => v.clone(),
                    };
                    prop_assert_eq!(std::str::from_utf8(data).unwrap(), want.to_string());
                }
            }

            #[test]
            fn msgpack_maps_decode_as_the_readme_says(m in frame_object()) {
                let bytes = to_msgpack(&Value::Object(m.clone()));
                let got = decode_msgpack(&bytes);
                check(&got, &m)?;
                if let Ok(ClientFrame::Send { data, encoding, .. }) = &got {
                    prop_assert_eq!(*encoding, Encoding::Msgpack);
                    let back: Value = rmp_serde::from_slice(data).unwrap();
                    prop_assert_eq!(&back, m.get("data").unwrap_or(&Value::Null));
                }
            }

            #[test]
            fn top_level_scalars_are_bad_frames_without_id(v in json_leaf()) {
                let e = decode_json(&to_json(&v)).unwrap_err();
                prop_assert_eq!((e.code, e.id), (ErrorCode::BadFrame, None));
                let e = decode_msgpack(&to_msgpack(&v)).unwrap_err();
                prop_assert_eq!((e.code, e.id), (ErrorCode::BadFrame, None));
            }

            // serde would read a struct from the sequence of its fields: arrays of any length,
            // including the six fields of a frame, are refused, and no `id` is read from them.
            #[test]
            fn top_level_arrays_are_bad_frames(
                v in prop::collection::vec(json_value(), 0..8).prop_map(Value::Array)
            ) {
                let e = decode_json(&to_json(&v)).unwrap_err();
                prop_assert_eq!((e.code, e.id), (ErrorCode::BadFrame, None));
                let e = decode_msgpack(&to_msgpack(&v)).unwrap_err();
                prop_assert_eq!((e.code, e.id), (ErrorCode::BadFrame, None));
            }

            #[test]
            fn a_frame_written_as_an_array_of_its_fields_is_refused(id in "[a-z0-9]{1,8}") {
                let v = serde_json::json!(["send", id, "chat", null, null, {"a": 1}]);
                prop_assert_eq!(decode_json(&to_json(&v)).unwrap_err().code, ErrorCode::BadFrame);
                prop_assert_eq!(decode_msgpack(&to_msgpack(&v)).unwrap_err().code, ErrorCode::BadFrame);
            }
        }

        /// Nesting is bounded by the parsers' depth limits instead of the thread's stack:
        /// a frame of a million `[` must be refused, not crash the replica.
        #[test]
        fn deep_nesting_is_refused_without_exhausting_the_stack() {
            let deep_json = vec![b'['; 1_000_000];
            assert_eq!(
                decode_json(&deep_json).unwrap_err().code,
                ErrorCode::BadFrame
            );
            let mut deep_id = br#"{"type":"send","stream":"chat","id":"#.to_vec();
            deep_id.extend(std::iter::repeat_n(b'[', 100_000));
            assert_eq!(decode_json(&deep_id).unwrap_err().code, ErrorCode::BadFrame);
            let mut deep_data = br#"{"type":"send","stream":"chat","id":"d","data":"#.to_vec();
            deep_data.extend(std::iter::repeat_n(b'[', 100_000));
            assert_eq!(
                decode_json(&deep_data).unwrap_err().code,
                ErrorCode::BadFrame
            );

            // 0x91 is a MessagePack array of one element. Deep nesting inside `data` stops at
            // rmp_serde's depth limit. (A deeply nested `id`, or a top-level array, is not
            // checked here: in an unoptimized build it overflows a 2 MiB stack before that
            // limit is reached, which would abort this test binary.)
            let mut deep_data = to_msgpack(
                &serde_json::json!({"type": "send", "stream": "chat", "id": "d", "data": null}),
            );
            deep_data.pop(); // the nil of `data`
            deep_data.extend(std::iter::repeat_n(0x91, 100_000));
            assert_eq!(
                decode_msgpack(&deep_data).unwrap_err().code,
                ErrorCode::BadFrame
            );
        }

        /// A small MessagePack frame of nested arrays must be refused, not overflow the stack of
        /// an unoptimised build (rmp-serde's own depth limit is 1024).
        #[test]
        fn deeply_nested_msgpack_is_refused() {
            let mut frame = vec![0x82, 0xa4];
            frame.extend_from_slice(b"type");
            frame.extend_from_slice(&[0xa4]);
            frame.extend_from_slice(b"send");
            frame.extend_from_slice(&[0xa2]);
            frame.extend_from_slice(b"id");
            frame.extend(std::iter::repeat_n(0x91u8, 2000));
            frame.push(0xc0);
            assert_eq!(
                decode_msgpack(&frame).unwrap_err().code,
                ErrorCode::BadFrame
            );
        }
    }
}
