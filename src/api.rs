//! The backend API: `/send`, `/subscribe`, `/unsubscribe`, `/disconnect`, presence, health,
//! metrics, and its own OpenAPI document (`docs/openapi.json`, served at `/openapi.json`).
//!
//! Every action is validated whole, then published as one pub/sub batch, so it is accepted
//! (202) or refused (4xx/503) as a unit: a backend that sees 503 may retry without duplicates.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_LENGTH};
use hyper::{Method, Request};
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::clock::unix_us;
use crate::http::{error, json, text, HttpResponse};
use crate::metrics::Limit;
use crate::outbound::envelope::{
    Batch, Close, Item, Join, Leave, Member, Message, ReachRequest, Recipient,
};
use crate::registry::Target;
use crate::state::AppState;

/// The OpenAPI 3.1 document of this API, served at `GET /openapi.json`. It lives in `docs/` so
/// users find it beside the prose; tests/schemathesis.sh checks the replica against it.
pub const OPENAPI_JSON: &str = include_str!("../docs/openapi.json");

/// Why an API call was refused; one mapping to status and code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Unknown path.
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// Wrong method.
    #[error("{0} is not allowed here; use {1}")]
    MethodNotAllowed(Method, &'static str),
    /// Missing or wrong API key.
    #[error("a valid API key is required: Authorization: Bearer <key>")]
    Unauthorized,
    /// Body over `api.max_body_bytes`.
    #[error("request body is larger than api.max_body_bytes ({0} bytes)")]
    TooLarge(usize),
    /// More messages in one call than `limits.max_batch_messages`.
    #[error("the array holds more than limits.max_batch_messages ({0}) messages; split it")]
    BatchTooLong(usize),
    /// Not JSON.
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    /// JSON of the wrong shape.
    #[error("{0}")]
    BadRequest(String),
    /// Redis did not take it (or did not confirm it).
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    fn response(&self) -> HttpResponse {
        let (status, code) = match self {
            ApiError::NotFound(_) => (404, "not_found"),
            ApiError::MethodNotAllowed(..) => (405, "method_not_allowed"),
            ApiError::Unauthorized => (401, "unauthorized"),
            ApiError::TooLarge(_) => (413, "payload_too_large"),
            ApiError::BatchTooLong(_) => (413, "batch_too_long"),
            ApiError::BadJson(_) => (400, "bad_json"),
            ApiError::BadRequest(_) => (400, "bad_request"),
            ApiError::Unavailable(_) => (503, "redis_unavailable"),
        };
        let mut response = error(status, code, &self.to_string());
        if let ApiError::MethodNotAllowed(_, allow) = self {
            response
                .headers_mut()
                .insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
        }
        response
    }
}

/// The body of `POST /presence`.
struct PresenceBody {
    channel: String,
    view: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

/// Reads a `POST /presence` body, naming the field at fault when it is wrong.
fn presence_body(body: &[u8]) -> Result<PresenceBody, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let Some(fields) = value.as_object() else {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object: {\"channel\": ...}".to_owned(),
        ));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !["channel", "view", "cursor", "limit"].contains(&k.as_str()))
    {
        return Err(ApiError::BadRequest(format!(
            "unknown field `{unknown}`; expected channel, view, cursor, limit"
        )));
    }
    let text = |name: &str| -> Result<Option<String>, ApiError> {
        match fields.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ApiError::BadRequest(format!(
                "`{name}` must be a string, not {other}"
            ))),
        }
    };
    let channel =
        text("channel")?.ok_or_else(|| ApiError::BadRequest("`channel` is required".to_owned()))?;
    let limit = match fields.get("limit") {
        None | Some(serde_json::Value::Null) => None,
        Some(n) => Some(
            whole_number(n)
                .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("`limit` must be a positive integer, not {n}"))
                })?,
        ),
    };
    Ok(PresenceBody {
        channel,
        view: text("view")?,
        cursor: text("cursor")?,
        limit,
    })
}

/// `value` as an unsigned integer when it is a whole number, however written: `4000`, `4000.0`
/// and `4e3` are the same integer to JSON Schema (what the OpenAPI document says) and to every
/// JSON encoder that writes numbers as floats.
fn whole_number(value: &serde_json::Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    })
}

/// Handles one request on the API listener.
pub async fn handle(
    req: Request<Incoming>,
    _peer: SocketAddr,
    state: Arc<AppState>,
) -> Result<HttpResponse, Infallible> {
    Ok(route(req, &state).await.unwrap_or_else(|e| e.response()))
}

async fn route(req: Request<Incoming>, state: &AppState) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/healthz" => {
            only(&req, Method::GET)?;
            Ok(text(200, "ok\n"))
        }
        "/readyz" => {
            only(&req, Method::GET)?;
            Ok(match state.health.readiness() {
                Ok(()) => text(200, "ready\n"),
                Err(reason) => text(503, format!("{reason}\n")),
            })
        }
        "/metrics" => {
            only(&req, Method::GET)?;
            state
                .metrics
                .pubsub_roundtrip_age_seconds
                .set(state.health.pubsub_age_seconds());
            let mut body = state.prometheus.render();
            body.push_str(&crate::metrics::process::render());
            let mut response = text(200, body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(response)
        }
        "/openapi.json" => {
            only(&req, Method::GET)?;
            let mut response = text(200, OPENAPI_JSON);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            Ok(response)
        }
        "/presence" => {
            only(&req, Method::POST)?;
            authorize(&req, state)?;
            let body = read_body(req, state.config.api.max_body_bytes).await?;
            let ask = presence_body(&body)?;
            let channel = ask.channel;
            if channel.is_empty() {
                return Err(ApiError::BadRequest(
                    "`channel` must not be empty".to_owned(),
                ));
            }
            if state.config.presence_for(&channel).is_none() {
                return Err(ApiError::BadRequest(format!(
                    "`{channel}` does not keep presence (no [[channels]] pattern with presence = true matches it)"
                )));
            }
            let users = crate::protocol::PresenceQuery::users_view(ask.view.as_deref())
                .map_err(ApiError::BadRequest)?;
            let cursor =
                crate::protocol::PresenceQuery::cursor(ask.cursor).map_err(ApiError::BadRequest)?;
            let query = crate::protocol::PresenceQuery {
                users,
                cursor,
                limit: ask.limit,
            };
            let page = state.presence.page(&channel, &query).await.map_err(|e| {
                ApiError::Unavailable(format!("presence could not be read ({e}); ask again"))
            })?;
            let mut body = serde_json::to_value(&page).expect("pages serialize");
            body["channel"] = channel.into();
            Ok(json(200, &body))
        }
        "/user_status" => {
            only(&req, Method::POST)?;
            authorize(&req, state)?;
            if !state.config.presence.user_status {
                return Err(ApiError::BadRequest(
                    "user status is off (presence.user_status = false)".to_owned(),
                ));
            }
            let body = read_body(req, state.config.api.max_body_bytes).await?;
            let value: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))?;
            let user = match value.as_object().map(|o| (o.get("user"), o.len())) {
                Some((Some(serde_json::Value::String(user)), 1)) if !user.is_empty() => user,
                _ => return Err(ApiError::BadRequest(
                    "the body must be {\"user\": \"<user id>\"} (a non-empty string, nothing else)"
                        .to_owned(),
                )),
            };
            let status = state.presence.user_status(user).await.map_err(|e| {
                ApiError::Unavailable(format!("user status could not be read ({e}); ask again"))
            })?;
            Ok(json(
                200,
                &serde_json::to_value(&status).expect("statuses serialize"),
            ))
        }
        "/send" | "/subscribe" | "/unsubscribe" | "/disconnect" => {
            only(&req, Method::POST)?;
            authorize(&req, state)?;
            let body = read_body(req, state.config.api.max_body_bytes)
                .await
                .inspect_err(|e| {
                    if matches!(e, ApiError::TooLarge(_)) {
                        state.metrics.refused(Limit::BodySize).increment(1);
                    }
                })?;
            let raw: &RawValue =
                serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))?;
            let items = match path.as_str() {
                "/send" => {
                    send_items(raw, state.config.limits.max_batch_messages).inspect_err(|e| {
                        if matches!(e, ApiError::BatchTooLong(_)) {
                            state.metrics.refused(Limit::Batch).increment(1);
                        }
                    })?
                }
                "/subscribe" => {
                    let (to, channel) = membership(raw)?;
                    vec![Item::Subscribe(Join {
                        to,
                        channel,
                        ack: None,
                    })]
                }
                "/unsubscribe" => {
                    let (to, channel) = membership(raw)?;
                    vec![Item::Unsubscribe(Leave { to, channel })]
                }
                _ => vec![disconnect_item(raw)?],
            };
            let accepted = items.len();
            let mut batch = Batch {
                ts: unix_us(),
                items,
            };
            let sent = state
                .publisher
                .publish_reporting(&mut batch)
                .await
                .map_err(|e| ApiError::Unavailable(e.explain()))?;
            let offsets = sent.offsets;
            // Where history is kept, the answer carries each message's offset (null elsewhere).
            let mut body = if offsets.iter().any(Option::is_some) {
                serde_json::json!({ "accepted": accepted, "offsets": offsets })
            } else {
                serde_json::json!({ "accepted": accepted })
            };
            // Where a message asked, each message's reach (null for those that did not ask).
            if let Some(reach) = sent.reach {
                body["reach"] = serde_json::json!(reach.counts);
                body["reach_complete"] = serde_json::json!(reach.complete);
            }
            Ok(json(202, &body))
        }
        _ => Err(ApiError::NotFound(path)),
    }
}

fn only(req: &Request<Incoming>, method: Method) -> Result<(), ApiError> {
    if req.method() == method {
        Ok(())
    } else {
        let allow = if method == Method::GET { "GET" } else { "POST" };
        Err(ApiError::MethodNotAllowed(req.method().clone(), allow))
    }
}

fn authorize(req: &Request<Incoming>, state: &AppState) -> Result<(), ApiError> {
    let keys = &state.config.api.keys;
    if keys.is_empty() {
        return Ok(());
    }
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    // Compare against every key in constant time, so timing tells nothing about any key.
    let mut ok = subtle::Choice::from(0);
    for key in keys {
        ok |= key.as_bytes().ct_eq(given.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(ApiError::TooLarge(max));
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::TooLarge(max)),
        Err(e) => Err(ApiError::BadRequest(format!(
            "could not read the body: {e}"
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMessage<'a> {
    #[serde(borrow)]
    to: &'a RawValue,
    #[serde(borrow)]
    data: &'a RawValue,
    /// Read as raw JSON, so that a value that is not a boolean is refused naming the field.
    #[serde(borrow, default)]
    reach: Option<&'a RawValue>,
}

/// Whether a message asks for a reach report: `reach` is `true`; `false`, `null` or absent
/// mean no.
///
/// # Errors
/// A sentence naming the field when it is not a boolean.
fn wants_reach(reach: Option<&RawValue>) -> Result<bool, String> {
    match reach.map(RawValue::get) {
        None | Some("false" | "null") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(format!(
            "`reach` must be a boolean (true or false), not {other}"
        )),
    }
}

/// Parses `raw` as `T` if it is a JSON object: serde would also read a struct from an array of
/// its fields, which the API does not accept.
fn object<'a, T: Deserialize<'a>>(raw: &'a RawValue, what: &str) -> Result<T, String> {
    if !raw.get().trim_start().starts_with('{') {
        return Err(format!("{what} must be a JSON object"));
    }
    serde_json::from_str(raw.get()).map_err(|e| format!("{what}: {e}"))
}

/// Parses a `/send` body: one message or a non-empty array of them. Errors in an array name
/// the index of the first bad message.
fn send_items(raw: &RawValue, max_batch: usize) -> Result<Vec<Item<'_>>, ApiError> {
    let text = raw.get();
    let array = text.trim_start().starts_with('[');
    let elements: Vec<&RawValue> = if array {
        serde_json::from_str(text).map_err(|e| ApiError::BadRequest(format!("bad array: {e}")))?
    } else {
        vec![raw]
    };
    if elements.is_empty() {
        return Err(ApiError::BadRequest("the array holds no messages".into()));
    }
    if elements.len() > max_batch {
        return Err(ApiError::BatchTooLong(max_batch));
    }
    elements
        .into_iter()
        .enumerate()
        .map(|(i, element)| {
            let at = |e: String| {
                ApiError::BadRequest(if array {
                    format!("message {i}: {e}")
                } else {
                    e
                })
            };
            let message: SendMessage = object(element, "a message").map_err(at)?;
            let to: To = object(message.to, "`to`").map_err(at)?;
            // The publisher fills in where the reach answers go.
            let reach = wants_reach(message.reach)
                .map_err(at)?
                .then(ReachRequest::default);
            Ok(Item::Send(Message {
                to: to.into_recipient().map_err(at)?,
                data: message.data,
                history: false,
                reach,
            }))
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Membership<'a> {
    #[serde(borrow, default)]
    connection: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Cow<'a, str>,
}

/// Who joins or leaves, and the channel, from a `/subscribe` or `/unsubscribe` body.
fn membership(raw: &RawValue) -> Result<(Member<'_>, Cow<'_, str>), ApiError> {
    let body: Membership = object(raw, "the body").map_err(ApiError::BadRequest)?;
    if body.channel.is_empty() {
        return Err(ApiError::BadRequest("`channel` must not be empty".into()));
    }
    let to = who(body.connection, body.user)?;
    Ok((to, body.channel))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Disconnect<'a> {
    #[serde(borrow, default)]
    connection: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    /// Read as any JSON value, so that `4000.0` is taken and anything else is refused naming
    /// the field.
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
}

fn disconnect_item(raw: &RawValue) -> Result<Item<'_>, ApiError> {
    let body: Disconnect = object(raw, "the body").map_err(ApiError::BadRequest)?;
    let code = match &body.code {
        None | Some(serde_json::Value::Null) => 4000,
        Some(given) => whole_number(given)
            .filter(|c| (4000..=4999).contains(c))
            .map(|c| c as u16)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "`code` must be an integer in 4000..=4999 (got {given})"
                ))
            })?,
    };
    if body.reason.as_ref().is_some_and(|r| r.len() > 120) {
        return Err(ApiError::BadRequest(
            "`reason` must be at most 120 bytes".into(),
        ));
    }
    let to = who(body.connection, body.user)?;
    Ok(Item::Disconnect(Close {
        to,
        code,
        reason: body.reason,
    }))
}

fn who<'a>(
    connection: Option<Cow<'a, str>>,
    user: Option<Cow<'a, str>>,
) -> Result<Member<'a>, ApiError> {
    let to = To {
        connection,
        user,
        channel: None,
        all: None,
    };
    match (&to.connection, &to.user) {
        (Some(_), None) | (None, Some(_)) => {
            to.target().map_err(ApiError::BadRequest)?;
            Ok(match to {
                To {
                    connection: Some(id),
                    ..
                } => Member::Connection(id),
                To { user: Some(id), .. } => Member::User(id),
                _ => unreachable!("exactly one of them was given"),
            })
        }
        _ => Err(ApiError::BadRequest(
            "give exactly one of `connection` or `user`".into(),
        )),
    }
}

/// A recipient as written in API bodies: exactly one of the fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct To<'a> {
    /// A connection id.
    #[serde(borrow, default)]
    connection: Option<Cow<'a, str>>,
    /// A user id.
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    /// A channel.
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    /// Everyone, when true.
    #[serde(default)]
    all: Option<bool>,
}

impl<'a> To<'a> {
    /// The registry target.
    ///
    /// # Errors
    /// A sentence naming the problem when not exactly one recipient kind is given.
    fn target(&self) -> Result<Target<'_>, String> {
        let mut found = Vec::with_capacity(1);
        if let Some(c) = &self.connection {
            found.push(Target::Connection(c));
        }
        if let Some(u) = &self.user {
            found.push(Target::User(u));
        }
        if let Some(c) = &self.channel {
            found.push(Target::Channel(c));
        }
        match self.all {
            Some(true) => found.push(Target::All),
            Some(false) => return Err("`all` must be true when given".into()),
            None => {}
        }
        match found.as_slice() {
            [one] => {
                let empty = match one {
                    Target::Connection(s) | Target::User(s) | Target::Channel(s) => s.is_empty(),
                    Target::All => false,
                };
                if empty {
                    return Err("the recipient id must not be empty".into());
                }
                Ok(*one)
            }
            [] => Err("`to` needs one of `connection`, `user`, `channel` or `all`".into()),
            _ => {
                Err("`to` must name exactly one of `connection`, `user`, `channel` or `all`".into())
            }
        }
    }

    /// The recipient, once [`To::target`] found exactly one.
    ///
    /// # Errors
    /// [`To::target`]'s.
    fn into_recipient(self) -> Result<Recipient<'a>, String> {
        self.target()?;
        Ok(match self {
            To {
                connection: Some(id),
                ..
            } => Recipient::Connection(id),
            To { user: Some(id), .. } => Recipient::User(id),
            To {
                channel: Some(channel),
                ..
            } => Recipient::Channel(channel),
            _ => Recipient::All,
        })
    }
}

#[cfg(test)]
mod tests {
    //! Property tests of the `/send` body parser: whatever a backend posts is either taken
    //! whole or refused with a typed error, never a panic.

    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    const MAX_BATCH: usize = 8;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 512,
            // Failures are reported in the test output; nothing is written into src/.
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// What the API does with a body, from the outside: `raw` is what hyper handed over.
    fn parse(body: &[u8]) -> Result<usize, ApiError> {
        let raw: &RawValue =
            serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))?;
        send_items(raw, MAX_BATCH).map(|items| items.len())
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| {
                serde_json::Number::from_f64(f).map(Value::Number)
            }),
            "\\PC{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,5}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// One recipient key of `to`, well typed: absent, null, empty, or a name.
    fn name_field() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            4 => Just(None),
            1 => Just(Some(Value::Null)),
            1 => Just(Some(Value::from(""))),
            3 => "\\PC{1,8}".prop_map(|s| Some(Value::String(s))),
        ]
    }

    fn all_field() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            4 => Just(None),
            1 => Just(Some(Value::Null)),
            3 => Just(Some(Value::Bool(true))),
            1 => Just(Some(Value::Bool(false))),
        ]
    }

    /// A `to` object with a random, well-typed subset of the recipient keys.
    fn to_object() -> impl Strategy<Value = Map<String, Value>> {
        (name_field(), name_field(), name_field(), all_field()).prop_map(|(c, u, ch, all)| {
            let mut m = Map::new();
            for (k, v) in [
                ("connection", c),
                ("user", u),
                ("channel", ch),
                ("all", all),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            m
        })
    }

    /// A `to` object naming exactly one recipient, sometimes with other keys set to null.
    fn valid_to() -> impl Strategy<Value = Map<String, Value>> {
        (
            prop::sample::select(&["connection", "user", "channel", "all"][..]),
            "\\PC{1,8}",
            prop::sample::subsequence(&["connection", "user", "channel", "all"][..], 0..=2),
        )
            .prop_map(|(key, name, nulls)| {
                let mut m = Map::new();
                for k in nulls {
                    m.insert(k.to_string(), Value::Null);
                }
                let v = if key == "all" {
                    Value::Bool(true)
                } else {
                    Value::String(name)
                };
                m.insert(key.to_string(), v);
                m
            })
    }

    /// The target a `to` object names when it names exactly one recipient, as the README says.
    fn expected_target(to: &Map<String, Value>) -> Option<Target<'_>> {
        let given: Vec<(&String, &Value)> = to.iter().filter(|(_, v)| !v.is_null()).collect();
        match given.as_slice() {
            [(k, Value::String(s))] if !s.is_empty() => Some(match k.as_str() {
                "connection" => Target::Connection(s),
                "user" => Target::User(s),
                _ => Target::Channel(s),
            }),
            [(k, Value::Bool(true))] if k.as_str() == "all" => Some(Target::All),
            _ => None,
        }
    }

    fn bad_request(r: Result<usize, ApiError>) -> Result<String, TestCaseError> {
        match r {
            Err(ApiError::BadRequest(message)) => {
                prop_assert!(!message.is_empty());
                Ok(message)
            }
            other => Err(TestCaseError::fail(format!(
                "expected BadRequest, got {other:?}"
            ))),
        }
    }

    /// Bodies worth posting: noise, and valid bodies cut short or with bytes flipped.
    fn valid_body() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec((to_object(), json_value()), 1..4).prop_map(|ms| {
            let ms: Vec<Value> = ms
                .into_iter()
                .map(|(to, data)| json!({"to": to, "data": data}))
                .collect();
            serde_json::to_vec(&ms).unwrap()
        })
    }

    fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            (valid_body(), any::<prop::sample::Index>())
                .prop_map(|(body, cut)| body[..cut.index(body.len() + 1)].to_vec()),
            (
                valid_body(),
                prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)
            )
                .prop_map(|(mut body, flips)| {
                    for (at, x) in flips {
                        let at = at.index(body.len());
                        body[at] ^= x;
                    }
                    body
                }),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_body_is_taken_or_refused_with_a_typed_error(body in hostile_body()) {
            match parse(&body) {
                Ok(n) => prop_assert!((1..=MAX_BATCH).contains(&n)),
                Err(ApiError::BadJson(_) | ApiError::BadRequest(_) | ApiError::BatchTooLong(_)) => {}
                Err(other) => prop_assert!(false, "parsing alone answered {:?}", other),
            }
        }

        #[test]
        fn one_message_is_taken_when_it_names_exactly_one_recipient(
            to in prop_oneof![valid_to(), to_object()],
            data in json_value(),
        ) {
            let body = json!({"to": to, "data": data}).to_string();
            let raw: &RawValue = serde_json::from_str(&body).unwrap();
            let result = send_items(raw, MAX_BATCH);
            match (expected_target(&to), result) {
                (Some(target), Ok(items)) => {
                    prop_assert_eq!(items.len(), 1);
                    let Item::Send(message) = &items[0] else {
                        return Err(TestCaseError::fail("not a send"));
                    };
                    prop_assert_eq!(message.to.target(), target);
                    prop_assert_eq!(message.data.get(), data.to_string());
                }
                (None, Err(ApiError::BadRequest(message))) => {
                    prop_assert!(!message.contains("message 0"), "{}", message);
                }
                (want, got) => prop_assert!(
                    false,
                    "{}: expected {:?}, got {:?}",
                    body,
                    want,
                    got.map(|items| items.len())
                ),
            }
        }

        #[test]
        fn arrays_are_taken_whole_or_refused_naming_the_first_bad_index(
            messages in prop::collection::vec(
                (prop_oneof![3 => valid_to(), 1 => to_object()], json_value()),
                0..12,
            ),
        ) {
            let body: Vec<Value> = messages
                .iter()
                .map(|(to, data)| json!({"to": to, "data": data}))
                .collect();
            let body = serde_json::to_string(&body).unwrap();
            let raw: &RawValue = serde_json::from_str(&body).unwrap();
            let result = send_items(raw, MAX_BATCH);
            let first_bad = messages.iter().position(|(to, _)| expected_target(to).is_none());
            if messages.is_empty() {
                bad_request(result.map(|items| items.len()))?;
            } else if messages.len() > MAX_BATCH {
                prop_assert!(
                    matches!(result, Err(ApiError::BatchTooLong(MAX_BATCH))),
                    "{:?}",
                    result.map(|items| items.len())
                );
            } else if let Some(i) = first_bad {
                let message = bad_request(result.map(|items| items.len()))?;
                prop_assert!(
                    message.starts_with(&format!("message {i}: ")),
                    "{}: {}",
                    body,
                    message
                );
            } else {
                let items = result.map_err(|e| TestCaseError::fail(format!("{body}: {e:?}")))?;
                prop_assert_eq!(items.len(), messages.len());
                for (item, (to, data)) in items.iter().zip(&messages) {
                    let Item::Send(message) = item else {
                        return Err(TestCaseError::fail("not a send"));
                    };
                    prop_assert_eq!(message.to.target(), expected_target(to).unwrap());
                    prop_assert_eq!(message.data.get(), data.to_string());
                }
            }
        }

        #[test]
        fn malformed_messages_in_an_array_are_bad_requests(
            good in prop::collection::vec(Just(json!({"to": {"all": true}, "data": 1})), 0..4),
            bad in prop_oneof![
                json_value().prop_filter("not null", |v| !v.is_null())
                    .prop_map(|v| json!({"to": {"connection": v}, "data": 1})),
                json_value().prop_map(|v| json!({"to": {"all": true, "extra": v}, "data": 1})),
                json_value().prop_map(|v| json!({"to": {"all": true}, "data": 1, "extra": v})),
                Just(json!({"to": {"user": "u"}})),
                json_value().prop_filter("not an object", |v| !v.is_object())
                    .prop_map(|v| json!({"to": v, "data": 1})),
            ],
            at in any::<prop::sample::Index>(),
        ) {
            // A string is a valid `connection`, so that case is not malformed.
            prop_assume!(!bad["to"]["connection"].is_string());
            let mut messages = good;
            let at = at.index(messages.len() + 1);
            messages.insert(at, bad);
            let body = serde_json::to_vec(&messages).unwrap();
            let message = bad_request(parse(&body))?;
            prop_assert!(message.starts_with(&format!("message {at}: ")), "{}", message);
        }
    }

    #[test]
    fn reach_is_a_boolean_per_message() {
        let asked = |body: &str| -> Result<Vec<bool>, ApiError> {
            let raw: &RawValue = serde_json::from_str(body).unwrap();
            send_items(raw, MAX_BATCH).map(|items| {
                items
                    .iter()
                    .map(|item| matches!(item, Item::Send(m) if m.reach.is_some()))
                    .collect()
            })
        };
        assert_eq!(
            asked(r#"{"to":{"all":true},"data":1,"reach":true}"#).unwrap(),
            [true]
        );
        let batch = r#"[{"to":{"all":true},"data":1,"reach":false},
            {"to":{"all":true},"data":2,"reach":null},{"to":{"all":true},"data":3},
            {"to":{"all":true},"data":4,"reach":true}]"#;
        assert_eq!(asked(batch).unwrap(), [false, false, false, true]);
        for bad in [r#""yes""#, "1", "[]", "{}"] {
            let one = format!(r#"{{"to":{{"all":true}},"data":1,"reach":{bad}}}"#);
            match asked(&one) {
                Err(ApiError::BadRequest(m)) => {
                    assert!(m.starts_with("`reach` must be a boolean"), "{m}")
                }
                other => panic!("{one}: {:?}", other.map(|v| v.len())),
            }
            let array = format!(r#"[{{"to":{{"all":true}},"data":1}},{one}]"#);
            match asked(&array) {
                Err(ApiError::BadRequest(m)) => {
                    assert!(m.starts_with("message 1: `reach` must be a boolean"), "{m}")
                }
                other => panic!("{array}: {:?}", other.map(|v| v.len())),
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        let deep = vec![b'['; 1_000_000];
        assert!(matches!(parse(&deep), Err(ApiError::BadJson(_))));
        let mut deep_data = br#"{"to":{"all":true},"data":"#.to_vec();
        deep_data.extend(std::iter::repeat_n(b'[', 100_000));
        assert!(matches!(parse(&deep_data), Err(ApiError::BadJson(_))));
    }

    #[test]
    fn the_batch_limit_is_checked_before_the_messages() {
        let body: Vec<Value> = (0..=MAX_BATCH)
            .map(|_| json!({"to": {}, "data": 1}))
            .collect();
        let body = serde_json::to_vec(&body).unwrap();
        assert!(matches!(
            parse(&body),
            Err(ApiError::BatchTooLong(MAX_BATCH))
        ));
    }
}
