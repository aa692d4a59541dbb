//! What travels on pub/sub between replicas.
//!
//! One `POST /send` (or `/subscribe`, `/unsubscribe`, `/disconnect`) call becomes one
//! [`Batch`], published as [`Payload::Batch`]: the call is taken whole or not at all, and every
//! replica sees its items in order. `data` stays raw JSON text from the API body to the client
//! frame; it is never re-parsed for JSON clients.
//!
//! # The wire format
//! A payload is one JSON document that serde reads as [`Payload`], nothing framed around it:
//!
//! ```text
//! {"batch":{"v":1,"offsets":["<epoch>:<id>",...],"ts":<unix us>,"items":[<item>,...]}}
//! {"ack":{"v":1,"token":"<token>"}}
//! {"reach":{"v":1,"token":"<token>","counts":[{"item":0,"count":2},...]}}
//! ```
//!
//! An item is `{"send":{"to":<recipient>,"data":<raw JSON>,"history":true,
//! "reach":{"replica":"r","token":"t","item":0}}}` (`history` only when true, `reach` only when
//! the backend asked for a reach report), `{"subscribe":{"to":<member>,"channel":"c","ack":{"replica":"r","token":"t"}}}`
//! (`ack` only under interest routing), `{"unsubscribe":{"to":<member>,"channel":"c"}}` or
//! `{"disconnect":{"to":<member>,"code":4000,"reason":"r"}}` (`reason` only when given). A
//! recipient is `{"connection":"id"}`, `{"user":"id"}`, `{"channel":"c"}` or `"all"`; a member
//! (who joins, leaves or is closed) only one of the first two.
//!
//! The enums are externally tagged (`{"<variant>":{...}}`): serde reads such a variant straight
//! from the input. An internally tagged enum (`"op"` beside the fields) is first buffered whole,
//! which costs an allocation per item and cannot hand out `data` as a borrowed [`RawValue`].
//!
//! The publisher writes `offsets` empty; the publish script fills it in, writing the offsets it
//! assigned at [`Unpublished::OFFSETS_AT`] (the byte right after `"offsets":[`, which every
//! batch payload starts with). They belong, in order, to the `send` items with `history`.
//!
//! A replica that receives a payload with `reach` requests answers the asking replica with one
//! `reach` payload: per requested item, how many local connections the message was handed to.
//! Both fields are optional, so a replica that predates them delivers such a message and does
//! not answer; the asking replica then reports the counts it got as incomplete.
//!
//! `v` is the format's version. A replica refuses a payload of another version, counting it as
//! dropped (`bad_payload`) with an error naming both versions: during a rolling upgrade that
//! changes the format, replicas of the old and the new version do not deliver each other's
//! messages. The first typed version (1) does not read the hand-framed payloads of the versions
//! before it either (nor they its payloads).

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::registry::Target;

/// The version of the payload format this replica writes and reads.
pub const VERSION: u32 = 1;

/// One API call, as the publisher takes it.
#[derive(Debug)]
pub struct Batch<'a> {
    /// Unix microseconds when the publishing replica accepted the call.
    pub ts: u64,
    /// The items, in call order.
    pub items: Vec<Item<'a>>,
}

/// One pub/sub payload on a replica's, a channel's or the broadcast pub/sub channel.
///
/// `I` is the item list: owned when read, borrowed (a slice of items or of references to
/// items) when written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload<'a, I = Vec<Item<'a>>> {
    /// Items of one call (or, under interest routing, the run of them for one destination).
    Batch {
        /// Always [`VERSION`].
        v: Version,
        /// The history offsets of the `send` items with `history`, in order. Borrowed from the
        /// payload: offsets (`<hex epoch>:<ms>-<seq>`) hold nothing JSON escapes.
        #[serde(borrow)]
        offsets: Vec<&'a str>,
        /// Unix microseconds when the publishing replica accepted the call.
        ts: u64,
        /// The items, in call order.
        items: I,
    },
    /// Interest routing: a replica reached by a subscribe asking for an acknowledgement
    /// ([`Join::ack`]) has the join in effect; published to the asking replica's channel.
    Ack {
        /// Always [`VERSION`].
        v: Version,
        /// The token of the subscribe.
        #[serde(borrow)]
        token: Cow<'a, str>,
    },
    /// A replica reached by `send` items asking for a reach report ([`Message::reach`]) says,
    /// per item, how many of its connections it handed the message to; published to the asking
    /// replica's channel, once per payload.
    Reach {
        /// Always [`VERSION`].
        v: Version,
        /// The token of the reach requests.
        #[serde(borrow)]
        token: Cow<'a, str>,
        /// One count per requested item of the payload, in item order.
        counts: Vec<ReachCount>,
    },
}

/// Reads one pub/sub payload.
///
/// # Errors
/// When the payload is not a [`Payload`] of this [`VERSION`]; the error says where and why.
pub fn decode(payload: &[u8]) -> Result<Payload<'_>, serde_json::Error> {
    serde_json::from_slice(payload)
}

/// The acknowledgement of the subscribe that carried `token`, serialized.
pub fn ack(token: &str) -> String {
    let payload: Payload<'_, ()> = Payload::Ack {
        v: Version,
        token: token.into(),
    };
    serde_json::to_string(&payload).expect("acknowledgements serialize")
}

/// The reach report of one payload's requested items, serialized.
pub fn reach(token: &str, counts: &[ReachCount]) -> String {
    let payload: Payload<'_, ()> = Payload::Reach {
        v: Version,
        token: token.into(),
        counts: counts.to_vec(),
    };
    serde_json::to_string(&payload).expect("reach reports serialize")
}

/// Pairs each item with its history offset: the `send` items with `history` take the offsets
/// in order (none left: `None`, as if it had no history).
pub fn with_offsets<'p, 'a>(
    items: &'p [Item<'a>],
    offsets: &'p [&'a str],
) -> impl Iterator<Item = (&'p Item<'a>, Option<&'a str>)> {
    let mut offsets = offsets.iter();
    items.iter().map(move |item| {
        let offset = match item {
            Item::Send(message) if message.history => offsets.next().copied(),
            _ => None,
        };
        (item, offset)
    })
}

/// A batch payload as the publisher hands it to the publish script, `offsets` still empty.
#[derive(Debug, Clone)]
pub struct Unpublished {
    /// The payload's JSON.
    pub json: Vec<u8>,
}

impl Unpublished {
    /// Where the publish script writes the offsets: the byte right after `"offsets":[`.
    pub const OFFSETS_AT: usize = BATCH_HEAD.len();

    /// Serializes a batch (`items` a slice of items, or of references to them) once.
    pub fn batch<I: Serialize>(ts: u64, items: I) -> Self {
        let payload = Payload::Batch {
            v: Version,
            offsets: Vec::new(),
            ts,
            items,
        };
        let json = serde_json::to_vec(&payload).expect("batches serialize");
        debug_assert!(json.starts_with(BATCH_HEAD.as_bytes()));
        Self { json }
    }

    /// The payload as the publish script publishes it after assigning `offsets`: each one
    /// quoted, separated by commas, written at [`Unpublished::OFFSETS_AT`]. The script does
    /// this in Lua; this is the same splice, for tests.
    pub fn published(&self, offsets: &[&str]) -> Vec<u8> {
        if offsets.is_empty() {
            return self.json.clone();
        }
        let (head, tail) = self.json.split_at(Self::OFFSETS_AT);
        let mut out = head.to_vec();
        out.push(b'"');
        out.extend_from_slice(offsets.join("\",\"").as_bytes());
        out.push(b'"');
        out.extend_from_slice(tail);
        out
    }
}

/// How every batch payload starts (`"offsets"` is the first field after `v`): the publish
/// script writes the offsets right after it.
const BATCH_HEAD: &str = r#"{"batch":{"v":1,"offsets":["#;

/// The format version, written as the number [`VERSION`]; reading any other number fails with
/// an error naming both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Version;

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(VERSION)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(deserializer)?;
        if v == VERSION {
            Ok(Version)
        } else {
            Err(serde::de::Error::custom(format_args!(
                "payload format version {v}, but this replica reads version {VERSION} \
                 (published by a replica of another version?)"
            )))
        }
    }
}

/// One action for the replicas.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Item<'a> {
    /// Deliver a message.
    Send(#[serde(borrow)] Message<'a>),
    /// Join connections to a channel.
    Subscribe(#[serde(borrow)] Join<'a>),
    /// Remove connections from a channel.
    Unsubscribe(#[serde(borrow)] Leave<'a>),
    /// Close connections.
    Disconnect(#[serde(borrow)] Close<'a>),
    /// A member came to or left a channel with `join_leave` (written by the presence scripts).
    Presence(#[serde(borrow)] PresenceEvent<'a>),
}

/// A presence change, for the channel's subscribers.
#[derive(Debug, Serialize, Deserialize)]
pub struct PresenceEvent<'a> {
    /// The channel.
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
    /// Joined or left.
    pub kind: PresenceKind,
    /// Who (`connection`, `user`, `info`), as presence stores it; last, so that the presence
    /// scripts can write it between a prefix and a suffix (see [`presence_event`]).
    #[serde(borrow)]
    pub member: &'a RawValue,
}

/// Which presence change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceKind {
    /// The first connection of a user (or an anonymous connection) joined.
    Join,
    /// The last connection of a user (or an anonymous connection) left.
    Leave,
}

/// A presence event payload without its member: the text before and after where the member's
/// JSON goes. The presence scripts write `before`, the stored member, `after`, so that one
/// script call can announce members it finds in Redis (a dead replica's) without asking them
/// back first.
pub fn presence_event(kind: PresenceKind, channel: &str, ts: u64) -> (String, String) {
    let placeholder = RawValue::from_string("null".into()).expect("null is JSON");
    let items = [Item::Presence(PresenceEvent {
        channel: channel.into(),
        kind,
        member: &placeholder,
    })];
    let json = String::from_utf8(Unpublished::batch(ts, &items[..]).json).expect("JSON is UTF-8");
    // The member is the last value written: after it come only closing brackets.
    let at = json.rfind("null").expect("the placeholder is there");
    (json[..at].to_owned(), json[at + "null".len()..].to_owned())
}

impl Item<'_> {
    /// Whom the item is for.
    pub fn target(&self) -> Target<'_> {
        match self {
            Item::Send(message) => message.to.target(),
            Item::Subscribe(join) => join.to.target(),
            Item::Unsubscribe(leave) => leave.to.target(),
            Item::Disconnect(close) => close.to.target(),
            Item::Presence(event) => Target::Channel(&event.channel),
        }
    }
}

/// A message to deliver.
#[derive(Debug, Serialize, Deserialize)]
pub struct Message<'a> {
    /// Who it is for.
    #[serde(borrow)]
    pub to: Recipient<'a>,
    /// The message (raw JSON, as the backend sent it).
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// Whether it was appended to its channel's history: it then takes the next of the
    /// payload's offsets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub history: bool,
    /// The backend asked for a reach report: each replica that receives the item answers the
    /// publishing replica with the number of its connections the message was handed to
    /// ([`Payload::Reach`]).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<ReachRequest<'a>>,
}

/// Where a message's reach count goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReachRequest<'a> {
    /// The publishing replica's id.
    #[serde(borrow)]
    pub replica: Cow<'a, str>,
    /// What the answer carries back: one token per API call.
    #[serde(borrow)]
    pub token: Cow<'a, str>,
    /// The item's index in the call.
    pub item: u32,
}

/// How many local connections one item reached on one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReachCount {
    /// The item's index in the call ([`ReachRequest::item`]).
    pub item: u32,
    /// Connections the message was written to or queued for.
    pub count: u32,
}

/// A backend's subscribe.
#[derive(Debug, Serialize, Deserialize)]
pub struct Join<'a> {
    /// Who joins.
    #[serde(borrow)]
    pub to: Member<'a>,
    /// The channel.
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
    /// Interest routing: each replica that receives the item publishes [`Payload::Ack`] to
    /// the publishing replica's channel once the join is in effect, and the publishing replica
    /// answers the backend after hearing from all of them.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<AckRequest<'a>>,
}

/// Where a subscribe's acknowledgement goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AckRequest<'a> {
    /// The publishing replica's id.
    #[serde(borrow)]
    pub replica: Cow<'a, str>,
    /// What the acknowledgement carries back.
    #[serde(borrow)]
    pub token: Cow<'a, str>,
}

/// A backend's unsubscribe.
#[derive(Debug, Serialize, Deserialize)]
pub struct Leave<'a> {
    /// Who leaves.
    #[serde(borrow)]
    pub to: Member<'a>,
    /// The channel.
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
}

/// A backend's disconnect.
#[derive(Debug, Serialize, Deserialize)]
pub struct Close<'a> {
    /// Who is closed.
    #[serde(borrow)]
    pub to: Member<'a>,
    /// The WebSocket close code.
    pub code: u16,
    /// The close reason; a default one when not given.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'a, str>>,
}

/// Whom a message is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipient<'a> {
    /// One connection, by id.
    Connection(#[serde(borrow)] Cow<'a, str>),
    /// Every connection of a user.
    User(#[serde(borrow)] Cow<'a, str>),
    /// Every member of a channel.
    Channel(#[serde(borrow)] Cow<'a, str>),
    /// Everyone.
    All,
}

impl Recipient<'_> {
    /// The registry target.
    pub fn target(&self) -> Target<'_> {
        match self {
            Recipient::Connection(id) => Target::Connection(id),
            Recipient::User(id) => Target::User(id),
            Recipient::Channel(channel) => Target::Channel(channel),
            Recipient::All => Target::All,
        }
    }
}

/// Who joins, leaves or is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Member<'a> {
    /// One connection, by id.
    Connection(#[serde(borrow)] Cow<'a, str>),
    /// Every connection of a user.
    User(#[serde(borrow)] Cow<'a, str>),
}

impl Member<'_> {
    /// The registry target.
    pub fn target(&self) -> Target<'_> {
        match self {
            Member::Connection(id) => Target::Connection(id),
            Member::User(id) => Target::User(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> &RawValue {
        serde_json::from_str(json).unwrap()
    }

    /// One item of every kind, with every optional field both given and left out.
    fn every_item() -> Vec<Item<'static>> {
        let data = |json: &str| -> &'static RawValue {
            Box::leak(RawValue::from_string(json.to_owned()).unwrap())
        };
        vec![
            Item::Send(Message {
                to: Recipient::Connection("r1.c1".into()),
                data: data(r#"{"text":"hi \"you\"","n":[1,2.5e3]}"#),
                history: false,
                reach: None,
            }),
            Item::Send(Message {
                to: Recipient::Channel("room:1".into()),
                data: data(r#""with history""#),
                history: true,
                reach: None,
            }),
            Item::Send(Message {
                to: Recipient::User("alice".into()),
                data: data("null"),
                history: false,
                reach: None,
            }),
            Item::Send(Message {
                to: Recipient::All,
                data: data("42"),
                history: false,
                reach: None,
            }),
            Item::Send(Message {
                to: Recipient::User("carol".into()),
                data: data("[]"),
                history: false,
                reach: Some(ReachRequest {
                    replica: "r1".into(),
                    token: "00c0ffee00c0ffee".into(),
                    item: 4,
                }),
            }),
            Item::Subscribe(Join {
                to: Member::User("bob".into()),
                channel: "room:1".into(),
                ack: None,
            }),
            Item::Subscribe(Join {
                to: Member::Connection("r2.c9".into()),
                channel: "room:2".into(),
                ack: Some(AckRequest {
                    replica: "r1".into(),
                    token: "00c0ffee00c0ffee".into(),
                }),
            }),
            Item::Presence(PresenceEvent {
                channel: "room:\"x\"".into(),
                kind: PresenceKind::Leave,
                member: data(r#"{"connection":"r1.c1","user":null,"info":{"name":"A"}}"#),
            }),
            Item::Unsubscribe(Leave {
                to: Member::Connection("r2.c9".into()),
                channel: "room:1".into(),
            }),
            Item::Disconnect(Close {
                to: Member::User("mallory".into()),
                code: 4001,
                reason: Some("banned".into()),
            }),
            Item::Disconnect(Close {
                to: Member::Connection("r1.c1".into()),
                code: 4000,
                reason: None,
            }),
        ]
    }

    /// Equality by what the receiving side uses (`RawValue` has no `PartialEq`).
    fn same(a: &Item<'_>, b: &Item<'_>) -> bool {
        match (a, b) {
            (Item::Send(a), Item::Send(b)) => {
                let reach = |m: &Message<'_>| {
                    m.reach
                        .as_ref()
                        .map(|r| (r.replica.to_string(), r.token.to_string(), r.item))
                };
                a.to == b.to
                    && a.data.get() == b.data.get()
                    && a.history == b.history
                    && reach(a) == reach(b)
            }
            (Item::Subscribe(a), Item::Subscribe(b)) => {
                let ack = |j: &Join<'_>| {
                    j.ack
                        .as_ref()
                        .map(|a| (a.replica.to_string(), a.token.to_string()))
                };
                a.to == b.to && a.channel == b.channel && ack(a) == ack(b)
            }
            (Item::Unsubscribe(a), Item::Unsubscribe(b)) => a.to == b.to && a.channel == b.channel,
            (Item::Disconnect(a), Item::Disconnect(b)) => {
                a.to == b.to && a.code == b.code && a.reason == b.reason
            }
            (Item::Presence(a), Item::Presence(b)) => {
                a.channel == b.channel && a.kind == b.kind && a.member.get() == b.member.get()
            }
            _ => false,
        }
    }

    #[test]
    fn every_item_round_trips_through_a_published_payload() {
        let items = every_item();
        let refs: Vec<&Item<'_>> = items.iter().collect();
        // Written as routes.rs writes a part (references) and as the broadcast path does (a
        // slice): the same bytes.
        let unpublished = Unpublished::batch(1_700_000_000_000_000, &refs);
        assert_eq!(
            unpublished.json,
            Unpublished::batch(1_700_000_000_000_000, &items[..]).json
        );
        let published = unpublished.published(&["0a1b2c3d:1700000000000-0"]);
        let Payload::Batch {
            offsets,
            ts,
            items: back,
            ..
        } = decode(&published).unwrap()
        else {
            panic!("not a batch");
        };
        assert_eq!(ts, 1_700_000_000_000_000);
        assert_eq!(offsets, ["0a1b2c3d:1700000000000-0"]);
        assert_eq!(back.len(), items.len());
        for (a, b) in items.iter().zip(&back) {
            assert!(same(a, b), "{a:?} came back as {b:?}");
        }
    }

    #[test]
    fn data_and_ids_are_borrowed_from_the_payload() {
        let unpublished = Unpublished::batch(1, &every_item()[..2]);
        let published = unpublished.published(&["e:1-0"]);
        let Payload::Batch { offsets, items, .. } = decode(&published).unwrap() else {
            panic!("not a batch");
        };
        let Item::Send(message) = &items[0] else {
            panic!("not a send");
        };
        let inside = |s: &str| published.as_ptr_range().contains(&s.as_ptr());
        assert!(inside(offsets[0]) && inside(message.data.get()));
        assert!(matches!(
            message.to,
            Recipient::Connection(Cow::Borrowed(_))
        ));
        // `data` is the text the publisher was given, byte for byte.
        assert_eq!(message.data.get(), r#"{"text":"hi \"you\"","n":[1,2.5e3]}"#);
    }

    #[test]
    fn an_ack_round_trips() {
        let payload = ack("00c0ffee00c0ffee");
        let Payload::Ack { token, .. } = decode(payload.as_bytes()).unwrap() else {
            panic!("not an ack");
        };
        assert_eq!(token, "00c0ffee00c0ffee");
    }

    #[test]
    fn a_reach_report_round_trips_and_is_as_documented() {
        let counts = [
            ReachCount { item: 0, count: 2 },
            ReachCount { item: 3, count: 0 },
        ];
        let payload = reach("t1", &counts);
        assert_eq!(
            payload,
            r#"{"reach":{"v":1,"token":"t1","counts":[{"item":0,"count":2},{"item":3,"count":0}]}}"#
        );
        let Payload::Reach {
            token,
            counts: back,
            ..
        } = decode(payload.as_bytes()).unwrap()
        else {
            panic!("not a reach report");
        };
        assert_eq!((&*token, &back[..]), ("t1", &counts[..]));
        let asking = [Item::Send(Message {
            to: Recipient::User("u".into()),
            data: raw("1"),
            history: false,
            reach: Some(ReachRequest {
                replica: "r1".into(),
                token: "t1".into(),
                item: 0,
            }),
        })];
        assert!(String::from_utf8(Unpublished::batch(1, &asking[..]).json)
            .unwrap()
            .contains(
                r#"{"send":{"to":{"user":"u"},"data":1,"reach":{"replica":"r1","token":"t1","item":0}}}"#
            ));
    }

    #[test]
    fn the_script_splices_offsets_where_serde_reads_them() {
        let data = raw(r#"{"offsets":["not","these"]}"#);
        let message = |history| {
            Item::Send(Message {
                to: Recipient::Channel("c".into()),
                data,
                history,
                reach: None,
            })
        };
        let items = [message(true), message(false), message(true)];
        let unpublished = Unpublished::batch(7, &items[..]);
        assert!(unpublished.json.starts_with(BATCH_HEAD.as_bytes()));
        assert_eq!(&unpublished.json[Unpublished::OFFSETS_AT..][..1], b"]");
        // The exact bytes the Lua script writes for two offsets.
        let published = unpublished.published(&["00000001:5-0", "00000001:5-1"]);
        let expected = format!(
            r#"{{"batch":{{"v":1,"offsets":["00000001:5-0","00000001:5-1"],"ts":7,"items":[{0},{1},{0}]}}}}"#,
            r#"{"send":{"to":{"channel":"c"},"data":{"offsets":["not","these"]},"history":true}}"#,
            r#"{"send":{"to":{"channel":"c"},"data":{"offsets":["not","these"]}}}"#,
        );
        assert_eq!(String::from_utf8(published.clone()).unwrap(), expected);
        let Payload::Batch { offsets, items, .. } = decode(&published).unwrap() else {
            panic!("not a batch");
        };
        let joined: Vec<Option<&str>> = with_offsets(&items, &offsets).map(|(_, o)| o).collect();
        assert_eq!(joined, [Some("00000001:5-0"), None, Some("00000001:5-1")]);
        // Nothing assigned (no history item): published as written.
        assert_eq!(unpublished.published(&[]), unpublished.json);
        let Payload::Batch { offsets, .. } = decode(&unpublished.json).unwrap() else {
            panic!("not a batch");
        };
        assert!(offsets.is_empty());
    }

    #[test]
    fn the_ack_and_subscribe_formats_are_as_documented() {
        assert_eq!(ack("t1"), r#"{"ack":{"v":1,"token":"t1"}}"#);
        let items = [Item::Subscribe(Join {
            to: Member::User("u".into()),
            channel: "c".into(),
            ack: Some(AckRequest {
                replica: "r1".into(),
                token: "t1".into(),
            }),
        })];
        assert_eq!(
            String::from_utf8(Unpublished::batch(1, &items[..]).json).unwrap(),
            r#"{"batch":{"v":1,"offsets":[],"ts":1,"items":[{"subscribe":{"to":{"user":"u"},"channel":"c","ack":{"replica":"r1","token":"t1"}}}]}}"#
        );
        let all = [Item::Send(Message {
            to: Recipient::All,
            data: raw("1"),
            history: false,
            reach: None,
        })];
        assert!(String::from_utf8(Unpublished::batch(1, &all[..]).json)
            .unwrap()
            .contains(r#"{"send":{"to":"all","data":1}}"#));
    }

    #[test]
    fn malformed_payloads_are_refused_with_a_reason() {
        let refused = |payload: &[u8]| match decode(payload) {
            Ok(decoded) => panic!(
                "{} was read as {decoded:?}",
                String::from_utf8_lossy(payload)
            ),
            Err(e) => e.to_string(),
        };
        // Another format version.
        let e = refused(br#"{"batch":{"v":2,"offsets":[],"ts":1,"items":[]}}"#);
        assert!(e.contains("version 2") && e.contains("version 1"), "{e}");
        // The hand-framed payloads of the versions before the typed one.
        let e = refused(b"[\"0a:1-0\"]\n{\"ts\":1,\"items\":[]}");
        assert!(e.contains("expected"), "{e}");
        refused(br#"{"ts":1,"items":[]}"#);
        refused(b"!00c0ffee00c0ffee");
        // An unknown kind of payload or item, a missing field, a member that cannot be one.
        let e = refused(br#"{"presence":{"v":1}}"#);
        assert!(e.contains("unknown variant `presence`"), "{e}");
        let e = refused(br#"{"batch":{"v":1,"offsets":[],"ts":1,"items":[{"publish":{}}]}}"#);
        assert!(e.contains("unknown variant `publish`"), "{e}");
        let e = refused(br#"{"batch":{"v":1,"offsets":[],"items":[]}}"#);
        assert!(e.contains("missing field `ts`"), "{e}");
        let e =
            refused(br#"{"batch":{"v":1,"offsets":[],"ts":1,"items":[{"send":{"to":"all"}}]}}"#);
        assert!(e.contains("missing field `data`"), "{e}");
        refused(
            br#"{"batch":{"v":1,"offsets":[],"ts":1,"items":[{"subscribe":{"to":"all","channel":"c"}}]}}"#,
        );
        // Cut short, and not JSON at all.
        let whole = Unpublished::batch(1, &every_item()[..]).json;
        refused(&whole[..whole.len() - 1]);
        refused(b"");
        refused(&[0xff, 0xfe]);
    }

    #[test]
    fn a_presence_event_written_around_a_stored_member_is_a_payload() {
        let member = r#"{"connection":"r1.c1","user":"ann","info":null}"#;
        let (before, after) = presence_event(PresenceKind::Join, "room:\"q\"", 7);
        let json = format!("{before}{member}{after}");
        let Payload::Batch { ts, items, .. } = decode(json.as_bytes()).unwrap() else {
            panic!("{json}");
        };
        assert_eq!(ts, 7);
        match &items[..] {
            [Item::Presence(event)] => {
                assert_eq!(event.channel, "room:\"q\"");
                assert_eq!(event.kind, PresenceKind::Join);
                assert_eq!(event.member.get(), member);
            }
            other => panic!("{other:?}"),
        }
    }
}
