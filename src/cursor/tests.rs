//! The cursor's rule, checked on models of its two streams.
//!
//! Each model is one channel: Redis's history (offsets `e:1-0`, `e:2-0`, ... as they are
//! published, the oldest trimmed away at times), the pub/sub stream that brings each published
//! message to the dispatcher in order (late, or dropped for a catch-up), history reads that run
//! in Redis at one moment and land at the dispatcher at a later one, and what the recipient saw.
//! Property tests generate the interleavings; the check is the promise: every message exactly
//! once, in offset order, or an explicit `recovered: false` that came after the last message
//! before the gap and after the missed message was published — never a silent gap.

use std::collections::VecDeque;

use proptest::prelude::*;

use super::*;

fn o(id: u64) -> String {
    format!("e:{id}-0")
}

fn off(id: u64) -> Offset {
    Offset::parse(&o(id)).unwrap()
}

fn id_of(offset: &str) -> u64 {
    Offset::parse(offset).unwrap().id.0
}

/// Redis's side: the history holds the entries after `trimmed` up to `published`.
#[derive(Debug, Default)]
struct History {
    published: u64,
    trimmed: u64,
}

impl History {
    /// What a read after `since` returns now.
    fn read(&self, since: &Offset) -> Option<Vec<Entry>> {
        (since.id.0 >= self.trimmed).then(|| {
            (since.id.0 + 1..=self.published)
                .map(|id| Entry {
                    offset: o(id),
                    data: id.to_string(),
                })
                .collect()
        })
    }

    fn trim(&mut self) {
        self.trimmed = (self.trimmed + 2).min(self.published);
    }
}

/// What a recipient saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Message(u64),
    /// `recovered: false`, when this many messages were published.
    NotRecovered(u64),
    /// A resume's `subscribed`.
    Subscribed(bool),
    /// A resume closed with 1013: the client resumes again.
    Closed,
}

/// Checks the promise on what a recipient saw, owed every offset in `owed`.
fn check(seen: &[Seen], owed: std::ops::RangeInclusive<u64>) -> Result<(), TestCaseError> {
    let mut last = owed.start() - 1;
    let mut got = std::collections::HashSet::new();
    // (last message before the notice, messages published when it was sent)
    let mut notices = Vec::new();
    for s in seen {
        match *s {
            Seen::Message(id) => {
                prop_assert!(
                    id > last,
                    "{id} after {last}: out of order or twice: {seen:?}"
                );
                last = id;
                got.insert(id);
            }
            Seen::NotRecovered(published) => notices.push((last, published)),
            Seen::Subscribed(_) | Seen::Closed => {}
        }
    }
    for id in owed {
        let told = notices.iter().any(|&(a, p)| a < id && id <= p);
        prop_assert!(got.contains(&id) || told, "{id} silently missing: {seen:?}");
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Step {
    /// A message is published; its payload is on its way.
    Publish,
    /// The oldest payload on its way arrives.
    Arrive,
    /// The oldest payload on its way is dropped (a full buffer, a reconnect): a catch-up signal.
    Drop,
    /// The read in flight runs in Redis: it returns what the history holds now.
    Read,
    /// The read that ran lands.
    Land,
    /// The history's oldest entries are trimmed.
    Trim,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        3 => Just(Step::Publish),
        3 => Just(Step::Arrive),
        1 => Just(Step::Drop),
        2 => Just(Step::Read),
        2 => Just(Step::Land),
        1 => Just(Step::Trim),
    ];
    proptest::collection::vec(step, 0..60)
}

/// A replica's catch-up of one channel with one member, as the dispatcher drives it.
struct CatchUpModel {
    c: ChannelCursors<()>,
    history: History,
    on_the_way: VecDeque<u64>,
    seen: Vec<Seen>,
    /// The read in flight: after which offset, and what it returned once it ran in Redis.
    reading: Option<(Offset, Option<Option<Vec<Entry>>>)>,
}

impl CatchUpModel {
    fn deliver(&mut self, id: u64) {
        self.seen.push(Seen::Message(id));
        self.c.delivered("ch", &o(id));
    }

    fn arrive(&mut self, id: u64) {
        if self.c.offer("ch", &o(id), || ()) == Live::Deliver {
            self.deliver(id);
        }
    }

    fn begin(&mut self) {
        match self.c.begin("ch") {
            Begin::Read(since) => self.reading = Some((since, None)),
            Begin::Running => {}
            Begin::Unknown => self.seen.push(Seen::NotRecovered(self.history.published)),
        }
    }

    fn land(&mut self, read: Option<Vec<Entry>>) {
        self.reading = None;
        match self.c.finish("ch", read).expect("a read was in flight") {
            Finish::Recovered { replay, held } => {
                for entry in replay {
                    self.deliver(id_of(&entry.offset));
                }
                for held in held {
                    self.deliver(id_of(held.offset.as_deref().unwrap()));
                }
            }
            Finish::ReadAgain { replay, since } => {
                for entry in replay {
                    self.deliver(id_of(&entry.offset));
                }
                self.reading = Some((since, None));
            }
            Finish::NotRecovered { held, .. } => {
                self.seen.push(Seen::NotRecovered(self.history.published));
                for held in held {
                    self.deliver(id_of(held.offset.as_deref().unwrap()));
                }
            }
        }
    }

    fn run_read(&mut self) {
        if let Some((since, ran @ None)) = &mut self.reading {
            *ran = Some(self.history.read(since));
        }
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Publish => {
                self.history.published += 1;
                self.on_the_way.push_back(self.history.published);
            }
            Step::Arrive => {
                if let Some(id) = self.on_the_way.pop_front() {
                    self.arrive(id);
                }
            }
            Step::Drop => {
                if self.on_the_way.pop_front().is_some() {
                    self.begin();
                }
            }
            Step::Read => self.run_read(),
            Step::Land => {
                // A read that has not run in Redis yet stays in flight.
                if let Some((_, Some(read))) = &mut self.reading {
                    let read = read.take();
                    self.land(read);
                }
            }
            Step::Trim => self.history.trim(),
        }
    }
}

/// Runs `steps` on a member that joined when `before` messages were published (the history's
/// start read before the join), then lets everything land and arrive and publishes one more.
fn catch_up(steps: &[Step], capacity: usize, before: u64) -> Result<(), TestCaseError> {
    let mut m = CatchUpModel {
        c: ChannelCursors::new(capacity),
        history: History {
            published: before,
            trimmed: 0,
        },
        on_the_way: VecDeque::new(),
        seen: Vec::new(),
        reading: None,
    };
    m.c.joined("ch", Some(off(before)), true);
    for &step in steps {
        m.step(step);
    }
    loop {
        if m.reading.is_some() {
            m.run_read();
            m.step(Step::Land);
        } else if let Some(id) = m.on_the_way.pop_front() {
            m.arrive(id);
        } else {
            break;
        }
    }
    m.step(Step::Publish);
    m.step(Step::Arrive);
    check(&m.seen, before + 1..=m.history.published)?;
    // With nothing trimmed, every gap can be filled: no notice at all.
    if m.history.trimmed == 0 {
        prop_assert!(
            !m.seen.iter().any(|s| matches!(s, Seen::NotRecovered(_))),
            "told recovered: false with the whole history there: {:?}",
            m.seen
        );
    }
    Ok(())
}

/// A connection's resume from `since`, as the reader and the dispatcher drive it: the hold
/// starts before the join; payloads after `dispatched` were still on their way then.
fn resume(
    steps: &[Step],
    capacity: usize,
    published: u64,
    since: u64,
    dispatched: u64,
    trimmed: u64,
) -> Result<(), TestCaseError> {
    let mut history = History { published, trimmed };
    let mut cursor: Cursor<u64> = Cursor::resuming(off(since), capacity);
    let mut on_the_way: VecDeque<u64> = (dispatched + 1..=published).collect();
    let mut seen = Vec::new();
    let mut read: Option<Option<Vec<Entry>>> = None;
    let mut landed = false;
    let arrive =
        |id: u64, cursor: &mut Cursor<u64>, seen: &mut Vec<Seen>, landed: bool| match cursor
            .offer(Some(&o(id)), || id)
        {
            Live::Deliver => {
                assert!(landed, "delivered {id} before the replay");
                seen.push(Seen::Message(id));
            }
            Live::Held => assert!(!landed, "held {id} after the replay"),
            Live::Duplicate => {}
        };
    let land =
        |read: Option<Vec<Entry>>, cursor: &mut Cursor<u64>, seen: &mut Vec<Seen>| match cursor
            .finish(read)
            .expect("the resume's read")
        {
            Finish::ReadAgain { .. } | Finish::NotRecovered { whole: false, .. } => {
                seen.push(Seen::Closed);
            }
            Finish::Recovered { replay, held } => {
                seen.extend(replay.iter().map(|e| Seen::Message(id_of(&e.offset))));
                seen.push(Seen::Subscribed(true));
                seen.extend(held.into_iter().map(|h| Seen::Message(h.item)));
            }
            Finish::NotRecovered { held, whole: true } => {
                seen.push(Seen::Subscribed(false));
                seen.extend(held.into_iter().map(|h| Seen::Message(h.item)));
            }
        };
    for &step in steps {
        match step {
            Step::Publish => {
                history.published += 1;
                on_the_way.push_back(history.published);
            }
            Step::Arrive => {
                if let Some(id) = on_the_way.pop_front() {
                    arrive(id, &mut cursor, &mut seen, landed);
                }
            }
            // A connection's messages are not dropped: a full queue closes it.
            Step::Drop => {}
            Step::Read => {
                if read.is_none() && !landed {
                    read = Some(history.read(&off(since)));
                }
            }
            Step::Land => {
                if let Some(read) = read.take() {
                    land(read, &mut cursor, &mut seen);
                    landed = true;
                }
            }
            Step::Trim => history.trim(),
        }
        if seen.last() == Some(&Seen::Closed) {
            break;
        }
    }
    if !landed && seen.last() != Some(&Seen::Closed) {
        let read = read.take().unwrap_or_else(|| history.read(&off(since)));
        land(read, &mut cursor, &mut seen);
        landed = true;
    }
    if seen.last() == Some(&Seen::Closed) {
        prop_assert_eq!(
            &seen,
            &vec![Seen::Closed],
            "nothing goes out before the close"
        );
        return Ok(());
    }
    while let Some(id) = on_the_way.pop_front() {
        arrive(id, &mut cursor, &mut seen, landed);
    }
    history.published += 1;
    arrive(history.published, &mut cursor, &mut seen, landed);
    prop_assert!(
        cursor.is_settled(),
        "the cursor lets go after the first newer message"
    );
    let at = seen
        .iter()
        .position(|s| matches!(s, Seen::Subscribed(_)))
        .expect("subscribed is sent");
    let messages = |seen: &[Seen]| -> Vec<u64> {
        seen.iter()
            .filter_map(|s| match s {
                Seen::Message(id) => Some(*id),
                _ => None,
            })
            .collect()
    };
    match seen[at] {
        Seen::Subscribed(true) => {
            prop_assert_eq!(
                messages(&seen),
                (since + 1..=history.published).collect::<Vec<_>>(),
                "recovered: every offset after since, once, in order: {:?}",
                &seen
            );
        }
        _ => {
            prop_assert!(
                since < history.trimmed,
                "told recovered: false with the history there"
            );
            prop_assert!(messages(&seen[..at]).is_empty());
            // After the notice: what was held, then live, without a gap.
            let after = messages(&seen[at..]);
            prop_assert!(
                after.windows(2).all(|w| w[1] == w[0] + 1),
                "a gap after recovered: false: {:?}",
                &seen
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn a_catch_up_gives_every_offset_once_in_order_or_says_recovered_false(
        steps in steps(),
        capacity in 0usize..4,
        before in 0u64..4,
    ) {
        catch_up(&steps, capacity, before)?;
    }

    #[test]
    fn a_resume_gives_every_offset_after_since_once_in_order_or_says_recovered_false(
        steps in steps(),
        capacity in 0usize..4,
        (published, since, dispatched, trimmed) in (0u64..6).prop_flat_map(|p| {
            (Just(p), 0..=p, 0..=p, 0..=p)
        }),
    ) {
        resume(&steps, capacity, published, since, dispatched, trimmed)?;
    }
}

/// Every sequence of up to seven steps, for the small cases a generator may not reach.
#[test]
fn every_short_sequence_of_gaps_reads_and_late_messages_keeps_the_promise() {
    let all = [
        Step::Publish,
        Step::Arrive,
        Step::Drop,
        Step::Read,
        Step::Land,
        Step::Trim,
    ];
    let mut sequences = vec![Vec::new()];
    let mut longest: Vec<Vec<Step>> = vec![Vec::new()];
    for _ in 0..5 {
        longest = longest
            .iter()
            .flat_map(|seq| {
                all.map(|s| {
                    let mut seq = seq.clone();
                    seq.push(s);
                    seq
                })
            })
            .collect();
        sequences.extend(longest.iter().cloned());
    }
    for steps in &sequences {
        for capacity in 0..=2 {
            for before in [0, 2] {
                catch_up(steps, capacity, before).unwrap();
            }
            resume(steps, capacity, 2, 1, 0, 0).unwrap();
            resume(steps, capacity, 3, 0, 2, 1).unwrap();
        }
    }
}

#[test]
fn offsets_cover_what_is_at_or_before_them_in_their_epoch_only() {
    let a = Offset::parse("e1:1700-0").unwrap();
    let b = Offset::parse("e1:1700-1").unwrap();
    let c = Offset::parse("e2:1800-0").unwrap();
    assert!(a.is_covered_by(&b));
    assert!(a.is_covered_by(&a));
    assert!(!b.is_covered_by(&a));
    assert!(!a.is_covered_by(&c) && !c.is_covered_by(&a));
    assert_eq!(Offset::parse("nonsense"), None);
    assert_eq!(Offset::parse("e:1-x"), None);
    // An epoch may itself hold a colon: the id is after the last one.
    assert_eq!(Offset::parse("a:b:3-4").unwrap().epoch, "a:b");
}

#[test]
fn a_hold_that_overflows_reads_again_from_the_replay_and_keeps_holding() {
    let mut c: ChannelCursors<u8> = ChannelCursors::new(1);
    c.delivered("ch", &o(1));
    assert_eq!(c.begin("ch"), Begin::Read(off(1)));
    assert_eq!(c.offer("ch", &o(3), || 3), Live::Held);
    assert_eq!(c.offer("ch", &o(4), || 4), Live::Held);
    let replay = vec![
        Entry {
            offset: o(2),
            data: "2".into(),
        },
        Entry {
            offset: o(3),
            data: "3".into(),
        },
    ];
    let f = c.finish("ch", Some(replay.clone())).unwrap();
    assert_eq!(
        f,
        Finish::ReadAgain {
            replay,
            since: off(3)
        }
    );
    // Still holding; a late duplicate of the replay is dropped.
    assert_eq!(c.offer("ch", &o(3), || 3), Live::Duplicate);
    assert_eq!(c.offer("ch", &o(5), || 5), Live::Held);
    let replay = (4..=5)
        .map(|id| Entry {
            offset: o(id),
            data: id.to_string(),
        })
        .collect();
    match c.finish("ch", Some(replay)).unwrap() {
        Finish::Recovered { held, .. } => assert!(held.is_empty(), "5 was replayed: {held:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.offer("ch", &o(6), || 6), Live::Deliver);
}

#[test]
fn a_channel_nobody_knows_the_start_of_is_told_not_recovered() {
    let mut c: ChannelCursors<()> = ChannelCursors::new(4);
    c.joined("ch", None, true);
    assert_eq!(c.begin("ch"), Begin::Unknown);
    // A member that joined without any record (a backend's join) is no better.
    assert_eq!(c.begin("other"), Begin::Unknown);
    c.delivered("ch", &o(7));
    assert_eq!(c.begin("ch"), Begin::Read(off(7)));
}

#[test]
fn a_first_member_replaces_a_stale_position_but_not_one_delivered_since_its_start() {
    let mut c: ChannelCursors<()> = ChannelCursors::new(4);
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
    let mut c: ChannelCursors<u8> = ChannelCursors::new(4);
    c.delivered("ch", &o(1));
    c.begin("ch");
    c.offer("ch", &o(5), || 5);
    let f = c.finish("ch", None).unwrap();
    assert_eq!(
        f,
        Finish::NotRecovered {
            held: vec![Held {
                offset: Some(o(5)),
                item: 5
            }],
            whole: true
        }
    );
    assert_eq!(c.begin("ch"), Begin::Unknown);
}

#[test]
fn retain_keeps_channels_being_read() {
    let mut c: ChannelCursors<()> = ChannelCursors::new(4);
    c.delivered("a", &o(1));
    c.delivered("b", &o(1));
    c.begin("b");
    c.retain(|_| false);
    assert_eq!(c.len(), 1);
    assert!(c.finish("b", Some(vec![])).is_some());
}
