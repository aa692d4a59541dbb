//! The ordering rule of history channels, in one pure type: which offsets a stream of messages
//! has had, which live messages are held while a history read is in flight, how the replay and
//! the held messages merge when the read lands, and when a gap cannot be filled.
//!
//! Two streams follow it:
//! - a connection's resume (`subscribe` with `since`): one [`Cursor`] per resuming channel of
//!   the connection, held by the connection's handle from before the join until the first live
//!   message after the replay;
//! - a replica's catch-up (its pub/sub link lost messages): one [`Cursor`] per history channel
//!   with local members, in [`ChannelCursors`], owned by the dispatcher.
//!
//! Nothing here touches Redis, a socket, a lock or a task, so the rule is tested here: the
//! property tests below drive both streams through generated interleavings of live messages,
//! history reads, duplicates, dropped payloads, trimmed histories and overflowing holds, and
//! check the one promise: every message exactly once, in offset order, or an explicit
//! `recovered: false` — never a silent gap.

use std::collections::HashMap;

/// A history offset, `<epoch>:<ms>-<seq>`: the epoch of the channel's history and a stream
/// entry id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offset {
    /// The history's epoch: a history lost and started again has another one.
    pub epoch: String,
    /// The stream entry id as (milliseconds, sequence).
    pub id: (u64, u64),
}

impl Offset {
    /// Parses `<epoch>:<ms>-<seq>`.
    pub fn parse(text: &str) -> Option<Self> {
        let (epoch, id) = text.rsplit_once(':')?;
        Some(Self {
            epoch: epoch.to_owned(),
            id: parse_id(id)?,
        })
    }

    /// Whether a stream that has had `mark` has had `self` too (or was never owed it): `self`
    /// is at or before `mark` in the same epoch. Offsets of different epochs never cover each
    /// other. This is the only comparison of offsets in the gateway.
    pub fn is_covered_by(&self, mark: &Offset) -> bool {
        self.epoch == mark.epoch && self.id <= mark.id
    }
}

/// Parses a stream entry id, `<ms>-<seq>`.
pub fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// An entry of a channel's history, as a read returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its offset.
    pub offset: String,
    /// The message's `data`, JSON text.
    pub data: String,
}

/// A live message held while a history read is in flight.
#[derive(Debug, PartialEq, Eq)]
pub struct Held<T> {
    /// Its offset; a message without one (its publisher did not write it to the history) is
    /// held and released in order but never compared.
    pub offset: Option<String>,
    /// What the caller keeps of it.
    pub item: T,
}

/// What to do with a live message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// Deliver it now.
    Deliver,
    /// A read is in flight: it was held (or, past the hold's capacity, left out: the cursor
    /// remembers that the hold is no longer whole).
    Held,
    /// A replay delivered it already.
    Duplicate,
}

/// What a sign of missed messages means for a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Read the history after this offset; live messages are held from now on.
    Read(Offset),
    /// Where the stream stands is unknown: its recipients must be told `recovered: false`.
    Unknown,
    /// A read is in flight already; what it holds may now have a gap, so it will be read again.
    Running,
}

/// What a landed history read means, to be delivered in the order given.
#[derive(Debug, PartialEq, Eq)]
pub enum Finish<T> {
    /// The gap is filled: deliver `replay`, then `held` (the held messages the replay did not
    /// already cover).
    Recovered {
        /// The entries read, in order.
        replay: Vec<Entry>,
        /// Held live messages newer than the replay, in arrival order.
        held: Vec<Held<T>>,
    },
    /// The gap is filled up to the end of `replay`, but the hold dropped live messages after
    /// it: deliver `replay`, then read again after `since`. The cursor holds meanwhile.
    ReadAgain {
        /// The entries read, in order.
        replay: Vec<Entry>,
        /// Where the next read starts: the end of `replay`.
        since: Offset,
    },
    /// The history cannot fill the gap: tell the recipients `recovered: false`, then deliver
    /// `held`. Unless `whole`, the hold dropped messages after those (the notice covers them:
    /// they were published before it).
    NotRecovered {
        /// Held live messages, in arrival order.
        held: Vec<Held<T>>,
        /// No held message was dropped.
        whole: bool,
    },
}

/// The live messages of a stream whose history read is in flight.
#[derive(Debug)]
struct Hold<T> {
    /// The read started after this offset.
    since: Offset,
    /// In arrival order.
    messages: Vec<Held<T>>,
    /// No message was left out (the hold did not overflow, no new gap was signalled).
    whole: bool,
}

/// The order of one stream of a history channel's messages towards its recipients.
///
/// It keeps:
/// - `at`: where the stream stands. Every message at or before it was delivered, or was
///   published before the recipients joined (so is not owed to them); `None` is unknown.
/// - `hold`: while a history read is in flight, the live messages that arrived meanwhile (at
///   most `capacity`) and whether that list is whole.
/// - `floor`: after a replay up to an offset, live messages covered by it were in the replay
///   (their payload was still on its way) and are dropped, until the first newer one.
#[derive(Debug)]
pub struct Cursor<T> {
    at: Option<Offset>,
    hold: Option<Hold<T>>,
    floor: Option<Offset>,
    capacity: usize,
}

impl<T> Cursor<T> {
    /// A stream standing at `at` (`None`: unknown) that holds at most `capacity` live messages
    /// while a read is in flight.
    pub fn new(at: Option<Offset>, capacity: usize) -> Self {
        Self {
            at,
            hold: None,
            floor: None,
            capacity,
        }
    }

    /// A resume: the stream stands at `since` and a read after it is in flight from now on.
    pub fn resuming(since: Offset, capacity: usize) -> Self {
        let mut cursor = Self::new(Some(since), capacity);
        cursor.begin();
        cursor
    }

    /// A live message at `offset` arrived. `keep` gives what to hold of it.
    pub fn offer(&mut self, offset: Option<&str>, keep: impl FnOnce() -> T) -> Live {
        if let Some(floor) = &self.floor {
            match offset.and_then(Offset::parse) {
                Some(o) if o.is_covered_by(floor) => return Live::Duplicate,
                Some(_) => self.floor = None,
                // Not a history message (a presence event): never a replayed one, and no sign
                // that the replayed ones are all through.
                None => {}
            }
        }
        if let Some(hold) = &mut self.hold {
            if hold.messages.len() < self.capacity {
                hold.messages.push(Held {
                    offset: offset.map(str::to_owned),
                    item: keep(),
                });
            } else {
                // The history has it too (history writes are atomic with the PUBLISH): the
                // next read fetches it.
                hold.whole = false;
            }
            return Live::Held;
        }
        Live::Deliver
    }

    /// A message at `offset` reached the recipients.
    pub fn delivered(&mut self, offset: &str) {
        if let Some(offset) = Offset::parse(offset) {
            self.at = Some(offset);
        }
    }

    /// Messages may have been missed (a pub/sub reconnect, or a dropped payload).
    pub fn begin(&mut self) -> Begin {
        if let Some(hold) = &mut self.hold {
            hold.whole = false;
            return Begin::Running;
        }
        match &self.at {
            Some(since) => {
                self.hold = Some(Hold {
                    since: since.clone(),
                    messages: Vec::new(),
                    whole: true,
                });
                Begin::Read(since.clone())
            }
            None => Begin::Unknown,
        }
    }

    /// The read landed: `Some(entries)` after the read's offset, or `None` when the history
    /// cannot fill the gap. `None` when no read was in flight.
    pub fn finish(&mut self, replay: Option<Vec<Entry>>) -> Option<Finish<T>> {
        let hold = self.hold.take()?;
        let Some(replay) = replay else {
            // The recipients are told; from now on they follow live messages, and where they
            // stand is known again with the next one delivered. A floor left by an earlier
            // replay stays: what it covers was delivered, however late its live copy comes.
            self.at = None;
            return Some(Finish::NotRecovered {
                held: hold.messages,
                whole: hold.whole,
            });
        };
        let mut last = hold.since;
        for entry in &replay {
            if let Some(parsed) = Offset::parse(&entry.offset) {
                last = parsed;
            }
        }
        self.at = Some(last.clone());
        self.floor = Some(last.clone());
        if !hold.whole {
            // Some live messages after the replay were not held: read again after it, holding
            // from now on. What was held is in that read too.
            self.hold = Some(Hold {
                since: last.clone(),
                messages: Vec::new(),
                whole: true,
            });
            return Some(Finish::ReadAgain {
                replay,
                since: last,
            });
        }
        let held = hold
            .messages
            .into_iter()
            .filter(
                |held| match held.offset.as_deref().and_then(Offset::parse) {
                    Some(o) => !o.is_covered_by(&last),
                    None => true,
                },
            )
            .collect();
        Some(Finish::Recovered { replay, held })
    }

    /// A first recipient joined a stream with none; `start` is where the history stood just
    /// before the join, when the joining task read it.
    ///
    /// The stream starts afresh: a position left from earlier recipients (all gone) would make
    /// a catch-up replay messages published before this one joined. But a message may have been
    /// delivered to the new recipient before its join was reported; a position at or after
    /// `start` is therefore kept (keeping it is right in both cases: nothing after it was
    /// delivered, and nothing at or before it is owed).
    pub fn first_joined(&mut self, start: Option<Offset>) {
        self.at = match (self.at.take(), start) {
            (Some(last), Some(start)) if start.is_covered_by(&last) => Some(last),
            (_, start) => start,
        };
    }

    /// Whether a read is in flight.
    pub fn is_reading(&self) -> bool {
        self.hold.is_some()
    }

    /// Whether the cursor has nothing left to do for a stream that follows live messages: no
    /// read in flight and no replayed offsets to drop.
    pub fn is_settled(&self) -> bool {
        self.hold.is_none() && self.floor.is_none()
    }
}

/// A replica's catch-up cursors: one per history channel with local members.
pub struct ChannelCursors<T> {
    channels: HashMap<String, Cursor<T>>,
    /// The most live messages held per catching-up channel.
    capacity: usize,
}

impl<T> ChannelCursors<T> {
    /// Holds at most `capacity` live messages per catching-up channel.
    pub fn new(capacity: usize) -> Self {
        Self {
            channels: HashMap::new(),
            capacity,
        }
    }

    /// Channels tracked.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// Whether no channel is tracked.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// A connection joined `channel`. `first`: the channel had no local member just before.
    /// `start`: where the channel's history stood before the join, when the joining task read
    /// it (it reads only when it saw no member), else `None`. A later member changes nothing:
    /// the earlier members' position covers it, and what lies between that position and its
    /// join it simply also gets.
    pub fn joined(&mut self, channel: &str, start: Option<Offset>, first: bool) {
        let capacity = self.capacity;
        match self.channels.get_mut(channel) {
            Some(cursor) if first => cursor.first_joined(start),
            Some(_) => {}
            // Members were there without a record (joined by a backend, or their own report is
            // still on its way): `start` is the best there is, and often `None`.
            None => {
                self.channels
                    .insert(channel.to_owned(), Cursor::new(start, capacity));
            }
        }
    }

    /// A live message of `channel` at `offset` arrived (see [`Cursor::offer`]).
    pub fn offer(&mut self, channel: &str, offset: &str, keep: impl FnOnce() -> T) -> Live {
        match self.channels.get_mut(channel) {
            Some(cursor) => cursor.offer(Some(offset), keep),
            None => Live::Deliver,
        }
    }

    /// A message of `channel` at `offset` reached its local members.
    pub fn delivered(&mut self, channel: &str, offset: &str) {
        match self.channels.get_mut(channel) {
            Some(cursor) => cursor.delivered(offset),
            None => {
                let mut cursor = Cursor::new(None, self.capacity);
                cursor.delivered(offset);
                self.channels.insert(channel.to_owned(), cursor);
            }
        }
    }

    /// Messages may have been missed on `channel` (see [`Cursor::begin`]).
    pub fn begin(&mut self, channel: &str) -> Begin {
        let capacity = self.capacity;
        self.channels
            .entry(channel.to_owned())
            .or_insert_with(|| Cursor::new(None, capacity))
            .begin()
    }

    /// The history read of `channel` landed (see [`Cursor::finish`]).
    pub fn finish(&mut self, channel: &str, replay: Option<Vec<Entry>>) -> Option<Finish<T>> {
        self.channels.get_mut(channel)?.finish(replay)
    }

    /// Forgets channels `keep` says no (no local member left), unless a read is in flight.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.channels
            .retain(|channel, cursor| cursor.is_reading() || keep(channel));
    }
}

#[cfg(test)]
mod tests;
