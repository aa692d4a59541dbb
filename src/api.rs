//! The backend API: `/send`, `/subscribe`, `/unsubscribe`, `/disconnect`, health and metrics.
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

use crate::http::{error, json, text, HttpResponse};
use crate::inbound::unix_us;
use crate::metrics::Limit;
use crate::outbound::envelope::{Batch, Item, Op, To};
use crate::state::AppState;

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
                "/subscribe" => vec![membership_item(raw, Op::Subscribe)?],
                "/unsubscribe" => vec![membership_item(raw, Op::Unsubscribe)?],
                _ => vec![disconnect_item(raw)?],
            };
            let accepted = items.len();
            let mut batch = Batch {
                ts: unix_us(),
                items,
            };
            let offsets = state.publisher.publish(&mut batch).await.map_err(|e| {
                ApiError::Unavailable(if e.maybe_applied() {
                    format!("Redis did not confirm the publish ({e}); it may have been delivered")
                } else {
                    format!("not accepted, nothing was sent ({e}); retry")
                })
            })?;
            // Where history is kept, the answer carries each message's offset (null elsewhere).
            let body = if offsets.iter().any(Option::is_some) {
                serde_json::json!({ "accepted": accepted, "offsets": offsets })
            } else {
                serde_json::json!({ "accepted": accepted })
            };
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
    to: To<'a>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// Parses a `/send` body: one message or a non-empty array of them.
fn send_items(raw: &RawValue, max_batch: usize) -> Result<Vec<Item<'_>>, ApiError> {
    let text = raw.get();
    let messages: Vec<SendMessage> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
            .map_err(|e| ApiError::BadRequest(format!("bad message in array: {e}")))?
    } else {
        vec![serde_json::from_str(text)
            .map_err(|e| ApiError::BadRequest(format!("bad message: {e}")))?]
    };
    if messages.is_empty() {
        return Err(ApiError::BadRequest("the array holds no messages".into()));
    }
    if messages.len() > max_batch {
        return Err(ApiError::BatchTooLong(max_batch));
    }
    let many = messages.len() > 1;
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.to.target().map_err(|e| {
                ApiError::BadRequest(if many { format!("message {i}: {e}") } else { e })
            })?;
            Ok(Item {
                op: Op::Send,
                to: m.to,
                channel: None,
                data: Some(m.data),
                code: None,
                reason: None,
                history: false,
            })
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

fn membership_item(raw: &RawValue, op: Op) -> Result<Item<'_>, ApiError> {
    let body: Membership =
        serde_json::from_str(raw.get()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if body.channel.is_empty() {
        return Err(ApiError::BadRequest("`channel` must not be empty".into()));
    }
    let to = who(body.connection, body.user)?;
    Ok(Item {
        op,
        to,
        channel: Some(body.channel),
        data: None,
        code: None,
        reason: None,
        history: false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Disconnect<'a> {
    #[serde(borrow, default)]
    connection: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
}

fn disconnect_item(raw: &RawValue) -> Result<Item<'_>, ApiError> {
    let body: Disconnect =
        serde_json::from_str(raw.get()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let code = body.code.unwrap_or(4000);
    if !(4000..=4999).contains(&code) {
        return Err(ApiError::BadRequest(format!(
            "`code` must be in 4000..=4999 (got {code})"
        )));
    }
    if body.reason.as_ref().is_some_and(|r| r.len() > 120) {
        return Err(ApiError::BadRequest(
            "`reason` must be at most 120 bytes".into(),
        ));
    }
    let to = who(body.connection, body.user)?;
    Ok(Item {
        op: Op::Disconnect,
        to,
        channel: None,
        data: None,
        code: Some(code),
        reason: body.reason,
        history: false,
    })
}

fn who<'a>(
    connection: Option<Cow<'a, str>>,
    user: Option<Cow<'a, str>>,
) -> Result<To<'a>, ApiError> {
    let to = To {
        connection,
        user,
        channel: None,
        all: None,
    };
    match (&to.connection, &to.user) {
        (Some(_), None) | (None, Some(_)) => {
            to.target().map_err(ApiError::BadRequest)?;
            Ok(to)
        }
        _ => Err(ApiError::BadRequest(
            "give exactly one of `connection` or `user`".into(),
        )),
    }
}
