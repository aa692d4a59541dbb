//! What travels on pub/sub between replicas.
//!
//! One `POST /send` (or `/subscribe`, `/unsubscribe`, `/disconnect`) call becomes one PUBLISH of
//! one [`Batch`]: the call is taken whole or not at all, and every replica sees its items in order.
//! `data` stays raw JSON text from the API body to the client frame; it is never re-parsed for
//! JSON clients.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::registry::Target;

/// One PUBLISH payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Batch<'a> {
    /// Unix microseconds when the publishing replica accepted the call.
    pub ts: u64,
    /// The items, in call order.
    #[serde(borrow)]
    pub items: Vec<Item<'a>>,
}

/// What an item asks receiving replicas to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Deliver `data`.
    Send,
    /// Join `to` to `channel`.
    Subscribe,
    /// Remove `to` from `channel`.
    Unsubscribe,
    /// Close `to` with `code` and `reason`.
    Disconnect,
}

/// One action for the replicas.
#[derive(Debug, Serialize, Deserialize)]
pub struct Item<'a> {
    /// The action.
    pub op: Op,
    /// Who it is for.
    #[serde(borrow)]
    pub to: To<'a>,
    /// Channel for subscribe / unsubscribe.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Cow<'a, str>>,
    /// Message payload (raw JSON) for send.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    /// Close code for disconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// Close reason for disconnect.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'a, str>>,
    /// Whether this send was appended to its channel's history; such items take, in order, the
    /// offsets that prefix the payload.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub history: bool,
    /// Interest routing, subscribe: `<replica> <token>`. Each replica that receives the item
    /// publishes `!<token>` to that replica's channel once the join is in effect, and the
    /// publishing replica answers the backend after hearing from all of them.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<Cow<'a, str>>,
}

/// Splits a pub/sub payload into the history offsets (`["<offset>",...]` and a newline in
/// front, written by the publish script) and the batch JSON.
///
/// # Errors
/// When the offsets line is not a JSON array of strings.
pub fn split_payload(payload: &[u8]) -> Result<(Vec<String>, &[u8]), serde_json::Error> {
    if payload.first() != Some(&b'[') {
        return Ok((Vec::new(), payload));
    }
    // Compact JSON never holds a raw newline, so the first one ends the offsets.
    let end = payload
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(payload.len());
    let offsets = serde_json::from_slice(&payload[..end])?;
    Ok((offsets, payload.get(end + 1..).unwrap_or_default()))
}

/// A recipient as written in API bodies: exactly one of the fields.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To<'a> {
    /// A connection id.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<Cow<'a, str>>,
    /// A user id.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Cow<'a, str>>,
    /// A channel.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Cow<'a, str>>,
    /// Everyone, when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
}

impl To<'_> {
    /// The registry target.
    ///
    /// # Errors
    /// A sentence naming the problem when not exactly one recipient kind is given.
    pub fn target(&self) -> Result<Target<'_>, String> {
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
}
