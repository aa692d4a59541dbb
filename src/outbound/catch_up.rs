//! The rules of catching up a history channel, in one pure type: which offsets this replica's
//! subscribers of a channel have had (or were never owed), which live messages are held while a
//! catch-up reads the history, and which are dropped as already delivered.
//!
//! The dispatcher owns one [`CatchUps`] and is its only user: it reports joins, offers every live
//! history message before delivering it, reports what it delivered, and asks what to do when
//! the pub/sub link says messages were missed and when a history read lands. Nothing here
//! touches Redis or a connection, so the rules are tested here, exhaustively on small cases.
//!
//! Per channel it keeps:
//! - `from`: the offset the members' stream stands at. Every message at or before it was
//!   delivered to the members, or was published before they joined (so is not owed to them).
//!   It is the last offset delivered, or, before anything was delivered, where the channel's
//!   history stood just before the first member joined (read from Redis by the joining task,
//!   before the join). An empty history gives `<epoch>:0-0` (the joining task creates the epoch
//!   when there is none, so a history lost meanwhile shows as another epoch). `None` means
//!   unknown: a catch-up can then only say `recovered: false`.
//! - `hold`: while a history read is in flight, the live messages that arrived meanwhile (at
//!   most `capacity`), and whether that list is whole (nothing overflowed, no new gap).
//! - `floor`: after a replay up to an offset, live messages not after it were in the replay
//!   (their payload was still on its way) and are dropped, until the first newer one.

use std::collections::HashMap;

use super::history::Offset;

/// What to do with a live history message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// Deliver it now.
    Deliver,
    /// The channel is catching up: it was held (or, past the hold's capacity, left to the next
    /// read of the history, which holds it too).
    Held,
    /// A replay delivered it already.
    Duplicate,
}

/// What a catch-up signal means for one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Read the history after this offset; live messages are held from now on.
    Read(Offset),
    /// Where the members stand is unknown: tell them `recovered: false`.
    Unknown,
    /// A read is in flight already; what it holds may now have a gap, so another read will
    /// follow it.
    Running,
}

/// What to deliver when a history read lands, in this order: the replay (when `recovered`) or
/// a `recovered: false` notice (otherwise), then `held`. Then, when `again` is set, read the
/// history again after that offset: the channel is still held.
#[derive(Debug, PartialEq, Eq)]
pub struct Finish<T> {
    /// The history filled the gap.
    pub recovered: bool,
    /// The replayed entries (offset, data), empty unless `recovered`.
    pub replay: Vec<(String, String)>,
    /// Held live messages to deliver after the replay.
    pub held: Vec<(String, T)>,
    /// Read again from here: the hold overflowed or a new gap opened while this read ran.
    pub again: Option<Offset>,
}

/// The live messages of a channel that is catching up.
struct Hold<T> {
    /// The read in flight started after this offset.
    since: Offset,
    /// In arrival order.
    messages: Vec<(String, T)>,
    /// No message was left out (the hold did not overflow, no new gap was signalled).
    whole: bool,
}

struct Channel<T> {
    from: Option<Offset>,
    hold: Option<Hold<T>>,
    floor: Option<Offset>,
}

impl<T> Default for Channel<T> {
    fn default() -> Self {
        Self {
            from: None,
            hold: None,
            floor: None,
        }
    }
}

/// Per history channel with local members: where its members stand, what is held while it
/// catches up, and which replayed offsets live messages must not repeat. `T` is what the
/// dispatcher keeps of a held message besides its offset.
pub struct CatchUps<T> {
    channels: HashMap<String, Channel<T>>,
    /// The most live messages held per catching-up channel.
    capacity: usize,
}

impl<T> CatchUps<T> {
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
    /// it (it reads only when it saw no member), else `None`.
    ///
    /// A first member starts the channel afresh: an offset left from earlier members (all gone)
    /// would make a catch-up replay messages published before this member joined. But the
    /// dispatcher may have delivered to this member before hearing of its join; a delivered
    /// offset at or after `start` in the same epoch is therefore kept (keeping it is right in
    /// both cases: nothing after it was delivered, and nothing at or before it is owed). A
    /// later member changes nothing: the earlier members' position covers it, and what lies
    /// between that position and its join it simply also gets.
    pub fn joined(&mut self, channel: &str, start: Option<Offset>, first: bool) {
        let known = self.channels.contains_key(channel);
        let ch = self.channels.entry(channel.to_owned()).or_default();
        if first {
            ch.from = match (ch.from.take(), start) {
                (Some(last), Some(start))
                    if last.epoch == start.epoch && !start.is_after(&last) =>
                {
                    Some(last)
                }
                (_, start) => start,
            };
        } else if !known {
            // Members were there without a record (joined by a backend, or their own report
            // is still on its way): `start` is the best there is, and often `None`.
            ch.from = start;
        }
    }

    /// A live message of `channel` at `offset` arrived. `keep` gives what to hold of it.
    pub fn offer(&mut self, channel: &str, offset: &str, keep: impl FnOnce() -> T) -> Live {
        let Some(ch) = self.channels.get_mut(channel) else {
            return Live::Deliver;
        };
        if let Some(floor) = &ch.floor {
            match Offset::parse(offset) {
                Some(o) if o.epoch == floor.epoch && !o.is_after(floor) => return Live::Duplicate,
                _ => ch.floor = None,
            }
        }
        if let Some(hold) = &mut ch.hold {
            if hold.messages.len() < self.capacity {
                hold.messages.push((offset.to_owned(), keep()));
            } else {
                // The history has it too (history writes are atomic with the PUBLISH): the
                // next read fetches it.
                hold.whole = false;
            }
            return Live::Held;
        }
        Live::Deliver
    }

    /// A message of `channel` at `offset` reached its local members.
    pub fn delivered(&mut self, channel: &str, offset: &str) {
        let Some(offset) = Offset::parse(offset) else {
            return;
        };
        match self.channels.get_mut(channel) {
            Some(ch) => ch.from = Some(offset),
            None => {
                let ch = self.channels.entry(channel.to_owned()).or_default();
                ch.from = Some(offset);
            }
        }
    }

    /// Messages may have been missed on `channel` (a pub/sub reconnect, or a dropped payload).
    pub fn begin(&mut self, channel: &str) -> Begin {
        let ch = self.channels.entry(channel.to_owned()).or_default();
        if let Some(hold) = &mut ch.hold {
            hold.whole = false;
            return Begin::Running;
        }
        match &ch.from {
            Some(since) => {
                ch.hold = Some(Hold {
                    since: since.clone(),
                    messages: Vec::new(),
                    whole: true,
                });
                Begin::Read(since.clone())
            }
            None => Begin::Unknown,
        }
    }

    /// The history read of `channel` landed: `Some(entries)` after the read's offset, or `None`
    /// when the history cannot fill the gap (or could not be read). `None` when no read was
    /// expected.
    pub fn finish(
        &mut self,
        channel: &str,
        replay: Option<Vec<(String, String)>>,
    ) -> Option<Finish<T>> {
        let ch = self.channels.get_mut(channel)?;
        let hold = ch.hold.take()?;
        let Some(replay) = replay else {
            // The members are told; from now on they follow live messages, and where they
            // stand is known again with the next one delivered.
            ch.from = None;
            ch.floor = None;
            return Some(Finish {
                recovered: false,
                replay: Vec::new(),
                held: hold.messages,
                again: None,
            });
        };
        let mut last = hold.since;
        for (offset, _) in &replay {
            if let Some(parsed) = Offset::parse(offset) {
                last = parsed;
            }
        }
        ch.from = Some(last.clone());
        ch.floor = Some(last.clone());
        if !hold.whole {
            // Some live messages after the replay were not held: read again after it, holding
            // from now on. What was held is in that read too.
            ch.hold = Some(Hold {
                since: last.clone(),
                messages: Vec::new(),
                whole: true,
            });
            return Some(Finish {
                recovered: true,
                replay,
                held: Vec::new(),
                again: Some(last),
            });
        }
        let held = hold
            .messages
            .into_iter()
            .filter(|(offset, _)| match Offset::parse(offset) {
                Some(o) => o.epoch != last.epoch || o.is_after(&last),
                None => true,
            })
            .collect();
        Some(Finish {
            recovered: true,
            replay,
            held,
            again: None,
        })
    }

    /// Forgets channels `keep` says no (no local member left), unless a read is in flight.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.channels
            .retain(|channel, ch| ch.hold.is_some() || keep(channel));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(id: u64) -> String {
        format!("e:{id}-0")
    }

    fn off(id: u64) -> Offset {
        Offset::parse(&o(id)).unwrap()
    }

    /// A small model of one channel: Redis's history (offsets 1..), the pub/sub stream that
    /// brings each published message to the dispatcher in order, late or dropped, and what the
    /// member got. Driven through every sequence of a few steps, it checks the rule the type
    /// exists for: the member gets every offset published after its join exactly once, in
    /// order.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// A message is published; its payload is on its way.
        Publish,
        /// The oldest payload on its way arrives.
        Arrive,
        /// The oldest payload on its way is dropped (the buffer was full): a catch-up signal.
        Drop,
        /// The history read in flight (if any) runs in Redis: it will return everything
        /// published so far.
        Read,
        /// The history read that ran (if any) lands at the dispatcher.
        Land,
    }

    fn run(steps: &[Step], capacity: usize, published_before_join: u64) {
        let mut c: CatchUps<()> = CatchUps::new(capacity);
        // The start is read before the join: the history's last entry then.
        let start = Offset::parse(&format!("e:{published_before_join}-0")).unwrap();
        c.joined("ch", Some(start), true);
        let mut published = published_before_join;
        let mut on_the_way = std::collections::VecDeque::new();
        let mut got = Vec::new();
        // The read in flight: after which offset, and up to which one once it ran in Redis.
        let mut reading: Option<(Offset, Option<u64>)> = None;
        fn deliver(c: &mut CatchUps<()>, got: &mut Vec<u64>, id: u64) {
            got.push(id);
            c.delivered("ch", &o(id));
        }
        fn arrive(c: &mut CatchUps<()>, got: &mut Vec<u64>, id: u64) {
            if c.offer("ch", &o(id), || ()) == Live::Deliver {
                deliver(c, got, id);
            }
        }
        fn land(
            c: &mut CatchUps<()>,
            got: &mut Vec<u64>,
            since: Offset,
            upto: u64,
        ) -> Option<Offset> {
            let entries: Vec<_> = (since.id.0 + 1..=upto)
                .map(|id| (o(id), String::new()))
                .collect();
            let f = c.finish("ch", Some(entries)).expect("a read was in flight");
            assert!(f.recovered);
            let replayed = f.replay.iter().map(|(offset, _)| offset);
            let held = f.held.iter().map(|(offset, ())| offset);
            for offset in replayed.chain(held) {
                deliver(c, got, Offset::parse(offset).unwrap().id.0);
            }
            f.again
        }
        let begin = |c: &mut CatchUps<()>, reading: &mut Option<(Offset, Option<u64>)>| match c
            .begin("ch")
        {
            Begin::Read(since) => *reading = Some((since, None)),
            Begin::Running => {}
            Begin::Unknown => panic!("the start was known"),
        };
        for step in steps {
            match step {
                Step::Publish => {
                    published += 1;
                    on_the_way.push_back(published);
                }
                Step::Arrive => {
                    if let Some(id) = on_the_way.pop_front() {
                        arrive(&mut c, &mut got, id);
                    }
                }
                Step::Drop => {
                    if on_the_way.pop_front().is_some() {
                        begin(&mut c, &mut reading);
                    }
                }
                Step::Read => {
                    if let Some((_, upto @ None)) = &mut reading {
                        *upto = Some(published);
                    }
                }
                Step::Land => {
                    // A read that has not run in Redis yet stays in flight.
                    if let Some((since, Some(upto))) = reading.clone() {
                        reading = land(&mut c, &mut got, since, upto).map(|since| (since, None));
                    }
                }
            }
        }
        // Everything on its way arrives, reads land, and one last message shows whether the
        // member's stream is whole.
        loop {
            if let Some((since, upto)) = reading.take() {
                let upto = upto.unwrap_or(published);
                reading = land(&mut c, &mut got, since, upto).map(|since| (since, None));
            } else if let Some(id) = on_the_way.pop_front() {
                arrive(&mut c, &mut got, id);
            } else {
                break;
            }
        }
        published += 1;
        arrive(&mut c, &mut got, published);
        assert_eq!(
            got,
            (published_before_join + 1..=published).collect::<Vec<_>>(),
            "steps {steps:?}, capacity {capacity}"
        );
    }

    fn all_sequences(len: usize) -> Vec<Vec<Step>> {
        let mut out = vec![Vec::new()];
        for _ in 0..len {
            out = out
                .into_iter()
                .flat_map(|seq| {
                    [
                        Step::Publish,
                        Step::Arrive,
                        Step::Drop,
                        Step::Read,
                        Step::Land,
                    ]
                    .map(|s| {
                        let mut seq = seq.clone();
                        seq.push(s);
                        seq
                    })
                })
                .collect();
        }
        out
    }

    #[test]
    fn every_sequence_of_gaps_reads_and_late_messages_gives_each_offset_once_in_order() {
        for len in 0..=7 {
            for steps in all_sequences(len) {
                for capacity in 0..=2 {
                    for before in [0, 2] {
                        run(&steps, capacity, before);
                    }
                }
            }
        }
    }

    #[test]
    fn a_hold_that_overflows_reads_again_from_the_replay_and_keeps_holding() {
        let mut c: CatchUps<u8> = CatchUps::new(1);
        c.delivered("ch", &o(1));
        assert_eq!(c.begin("ch"), Begin::Read(off(1)));
        assert_eq!(c.offer("ch", &o(3), || 3), Live::Held);
        assert_eq!(c.offer("ch", &o(4), || 4), Live::Held);
        let f = c
            .finish("ch", Some(vec![(o(2), "2".into()), (o(3), "3".into())]))
            .unwrap();
        assert_eq!(
            f,
            Finish {
                recovered: true,
                replay: vec![(o(2), "2".into()), (o(3), "3".into())],
                held: vec![],
                again: Some(off(3)),
            }
        );
        // Still holding; a late duplicate of the replay is dropped.
        assert_eq!(c.offer("ch", &o(3), || 3), Live::Duplicate);
        assert_eq!(c.offer("ch", &o(5), || 5), Live::Held);
        let f = c
            .finish("ch", Some(vec![(o(4), "4".into()), (o(5), "5".into())]))
            .unwrap();
        assert_eq!(f.again, None);
        assert!(f.held.is_empty(), "5 was replayed: {:?}", f.held);
        assert_eq!(c.offer("ch", &o(6), || 6), Live::Deliver);
    }

    #[test]
    fn a_channel_nobody_knows_the_start_of_is_told_not_recovered() {
        let mut c: CatchUps<()> = CatchUps::new(4);
        c.joined("ch", None, true);
        assert_eq!(c.begin("ch"), Begin::Unknown);
        // A member that joined without any record (a backend's join) is no better.
        assert_eq!(c.begin("other"), Begin::Unknown);
        c.delivered("ch", &o(7));
        assert_eq!(c.begin("ch"), Begin::Read(off(7)));
    }

    #[test]
    fn a_first_member_replaces_a_stale_position_but_not_one_delivered_since_its_start() {
        let mut c: CatchUps<()> = CatchUps::new(4);
        // Earlier members had 3; they left; history moved to 10 before the new member joined.
        c.delivered("ch", &o(3));
        c.joined("ch", Some(off(10)), true);
        assert_eq!(c.begin("ch"), Begin::Read(off(10)));
        c.finish("ch", Some(vec![])).unwrap();
        // Delivered 12 to the new member before its join report arrived: 12 stays.
        c.delivered("ch", &o(12));
        c.joined("ch", Some(off(11)), true);
        assert_eq!(c.begin("ch"), Begin::Read(off(12)));
        c.finish("ch", Some(vec![])).unwrap();
        // Another epoch at the join: the start wins.
        c.joined("ch", Some(Offset::parse("f:0-0").unwrap()), true);
        assert_eq!(c.begin("ch"), Begin::Read(Offset::parse("f:0-0").unwrap()));
        c.finish("ch", Some(vec![])).unwrap();
        // A later member changes nothing.
        c.joined("ch", Some(off(99)), false);
        assert_eq!(c.begin("ch"), Begin::Read(Offset::parse("f:0-0").unwrap()));
    }

    #[test]
    fn a_history_that_cannot_fill_the_gap_gives_the_held_messages_after_the_notice() {
        let mut c: CatchUps<u8> = CatchUps::new(4);
        c.delivered("ch", &o(1));
        c.begin("ch");
        c.offer("ch", &o(5), || 5);
        let f = c.finish("ch", None).unwrap();
        assert!(!f.recovered);
        assert_eq!(f.held, vec![(o(5), 5)]);
        assert_eq!(c.begin("ch"), Begin::Unknown);
    }

    #[test]
    fn retain_keeps_channels_being_read() {
        let mut c: CatchUps<()> = CatchUps::new(4);
        c.delivered("a", &o(1));
        c.delivered("b", &o(1));
        c.begin("b");
        c.retain(|_| false);
        assert_eq!(c.len(), 1);
        assert!(c.finish("b", Some(vec![])).is_some());
    }
}
