//! Keeps acknowledged inbound entries until Redis cannot lose them any more, and appends again
//! those a failover or a restart lost.
//!
//! Redis replicates asynchronously: an entry the primary took (and the client was acked for) can
//! be missing on the replica Sentinel promotes, or on a Redis restarted from a snapshot. With
//! `redis.wait_replicas = 0` the gateway does not wait for replicas before acking, so it keeps a
//! copy of each acked entry (up to `inbound.keep_unconfirmed_entries`) instead, and drops the
//! copy once Redis can no longer lose it, which `INFO` (every `redis.health_interval_ms`) shows
//! ([`super::confirm`] holds the rule): every online replica's replication offset has passed the
//! primary's offset read after the entry was acked; or, on a Redis that has no replicas, its
//! persistence holds the entry (`appendfsync always` at once, `everysec` two seconds on, a
//! snapshot after the next successful save, and at once if it persists nothing at all).
//!
//! The same check notices a new writer: another run id or replication id (a promoted replica, a
//! restarted Redis). Then every kept entry is looked up on it and appended again where missing
//! (with its original id where the stream allows, and its `send` id remembered again so a resend
//! is not stored twice); entries trimmed since, or already stored again by a resend, are left
//! alone. The copies live in this replica's memory: if the replica dies together with the
//! primary, its unconfirmed entries are lost (README, delivery guarantees).
//!
//! Not used on a Redis Cluster or with `redis.wait_replicas` > 0 (the appends are then acked only
//! when replicas hold them).

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::backplane::durability::Durability;
use crate::backplane::script::{Invocation, Script};
use crate::backplane::{Backplane, RedisFailure};
use crate::inbound::confirm::{Confirmer, Info, Rule};
use crate::inbound::dedupe::DedupeId;
use crate::metrics::Metrics;

/// One acked entry, as it was appended.
#[derive(Debug, Clone)]
pub struct KeptEntry {
    /// Stream key.
    pub key: Arc<str>,
    /// The entry id Redis gave it.
    pub entry: String,
    /// `MAXLEN ~` bound.
    pub max_len: u64,
    /// Entry fields, in order.
    pub fields: Vec<(&'static str, Bytes)>,
    /// The `send` id, remembered with the entry it produced for the window.
    pub dedupe: Option<DedupeId>,
}

struct Kept {
    entry: KeptEntry,
    /// The check round during which it was acked.
    round: u64,
}

/// Kept copies the buffer keeps room for once it is (nearly) empty: ~136 KiB of 136-byte slots.
/// It was 16k slots (2.2 MB, held by every replica at rest once its inbound traffic had ever
/// needed them: heaptrack, bench/soak.sh).
const KEEP_ROOM: usize = 1024;

#[derive(Default)]
struct State {
    entries: VecDeque<Kept>,
    /// The current check round; entries acked now get this number.
    round: u64,
}

impl State {
    /// Drops the copies acked in `confirmed` or before.
    fn confirm(&mut self, confirmed: u64) {
        while self.entries.front().is_some_and(|k| k.round <= confirmed) {
            self.entries.pop_front();
        }
        // A backlog (the limit reached while nothing could be confirmed), or a busy spell, leaves
        // its buffer behind: ~9 MB at the default limit (bench/soak.sh). Give it back once under
        // an eighth full. Under steady load a confirm leaves at least a third of the peak (one
        // round of three), i.e. a sixth of the capacity, so the buffer does not shrink and grow
        // back every round; shrinking to four times what is left leaves room for that again.
        let (len, cap) = (self.entries.len(), self.entries.capacity());
        if cap > KEEP_ROOM && len < cap / 8 {
            self.entries.shrink_to((len * 4).max(KEEP_ROOM));
        }
    }
}

/// The copies of acked entries not yet confirmed, shared by the appender (which adds them) and
/// [`Keeper::watch`] (which confirms them, or appends them again).
#[derive(Clone)]
pub struct Keeper {
    state: Arc<Mutex<State>>,
    capacity: usize,
    metrics: Metrics,
}

/// Appends a kept entry again where it is missing. Returns 0 when nothing was done (the entry
/// is there, was trimmed, or a resend stored it again: a bucket of the window holds its id),
/// else 1. Its id is then remembered again for a window from now ([`super::dedupe`]).
///
/// KEYS: stream. ARGV: entry id, MAXLEN, window ms (0: the entry has no dedupe id), the
/// buckets' key prefix, the dedupe field, then field/value pairs.
static APPEND_AGAIN: LazyLock<Script> = LazyLock::new(|| Script::new(APPEND_AGAIN_LUA));

const APPEND_AGAIN_LUA: &str = concat!(
    super::dedupe::dedupe_lua!(),
    r#"
local function before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) > 0 then
  return 0
end
local window, field = tonumber(ARGV[3]), ARGV[5]
local buckets, expires
if window > 0 then
  buckets, expires = dedupe_buckets(ARGV[4], window)
  for b = 1, #buckets do
    if redis.call('HEXISTS', buckets[b], field) == 1 then
      return 0
    end
  end
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first > 0 and before(ARGV[1], first[1][1]) then
  return 0
end
local id = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], ARGV[1], unpack(ARGV, 6))
if type(id) == 'table' and id.err then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 6))
end
if buckets then
  redis.call('HSET', buckets[1], field, id)
  redis.call('PEXPIREAT', buckets[1], expires)
end
return 1
"#
);

/// What [`Keeper::watch`] remembers between rounds.
#[derive(Default)]
struct Watched {
    /// The marks of the rounds not yet confirmed.
    confirmer: Confirmer,
    /// The primary the kept entries were last checked against: (run id, replication id).
    writer: Option<(String, String)>,
    /// The rule that confirmed them last (logged when it changes).
    rule: Option<Rule>,
}

/// Kept entries looked up (and appended again) per pipeline.
const AGAIN_BATCH: usize = 256;

impl Keeper {
    /// Keeps at most `capacity` entries; past it the oldest copy is dropped and counted in
    /// `wsbridge_inbound_unconfirmed_dropped_total`.
    pub fn new(capacity: usize, metrics: Metrics) -> Self {
        Self {
            state: Arc::default(),
            capacity,
            metrics,
        }
    }

    /// Keeps copies of entries just acked.
    pub fn keep(&self, entries: impl IntoIterator<Item = KeptEntry>) {
        let mut state = self.state.lock().expect("never poisoned");
        let round = state.round;
        let mut dropped = 0;
        for entry in entries {
            if state.entries.len() == self.capacity {
                state.entries.pop_front();
                dropped += 1;
            }
            state.entries.push_back(Kept { entry, round });
        }
        if dropped > 0 {
            self.metrics.inbound_unconfirmed_dropped.increment(dropped);
        }
    }

    /// How many copies are kept now.
    pub fn len(&self) -> usize {
        self.state.lock().expect("never poisoned").entries.len()
    }

    /// Whether no copy is kept now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the primary every `interval` until `shutdown`: confirms what its replicas or its
    /// persistence hold, and appends again what a new primary lacks.
    pub async fn watch(
        self,
        backplane: Backplane,
        durability: Durability,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watched = Watched::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let round = {
                let mut state = self.state.lock().expect("never poisoned");
                state.round += 1;
                state.round - 1
            };
            let checked = tokio::select! {
                _ = shutdown.cancelled() => return,
                checked = self.check(&backplane, &durability, round, &mut watched) => checked,
            };
            if let Err(e) = checked {
                tracing::debug!(error = %e, "kept inbound entries not checked");
            }
            self.metrics
                .inbound_unconfirmed_entries
                .set(self.len() as f64);
        }
    }

    /// One round: entries acked before `round` began are confirmed once the primary proves it
    /// holds them for good ([`Confirmer::observe`]).
    async fn check(
        &self,
        backplane: &Backplane,
        durability: &Durability,
        round: u64,
        watched: &mut Watched,
    ) -> Result<(), RedisFailure> {
        let at = Instant::now();
        let info: String = backplane.query(&redis::cmd("INFO")).await?;
        let info = Info::parse(&info);
        if !info.is_master {
            return Ok(());
        }
        let now = (info.run_id.clone(), info.replid.clone());
        if watched.writer.as_ref().is_some_and(|w| *w != now) {
            // Another Redis answers now: what the old one took may be missing here.
            watched.confirmer.clear();
            let again = self.append_missing(backplane).await?;
            tracing::warn!(
                run_id = %info.run_id,
                appended_again = again,
                kept = self.len(),
                "Redis writer changed: kept inbound entries checked on the new one"
            );
            watched.writer = Some(now);
            return Ok(());
        }
        watched.writer = Some(now);
        let settings = durability.settings_of(&info.run_id);
        let (rule, confirmed) = watched
            .confirmer
            .observe(round, at, &info, settings.as_ref());
        if watched.rule != Some(rule) {
            tracing::info!(
                run_id = %info.run_id,
                confirmed_by = rule.as_str(),
                "kept inbound entries: the rule that confirms them changed"
            );
            watched.rule = Some(rule);
        }
        if let Some(confirmed) = confirmed {
            self.state
                .lock()
                .expect("never poisoned")
                .confirm(confirmed);
        }
        Ok(())
    }

    /// Looks every kept entry up on the primary and appends again those missing. Returns how
    /// many were appended again.
    async fn append_missing(&self, backplane: &Backplane) -> Result<u64, RedisFailure> {
        // A chunk at a time, copied out under the lock: copying every kept entry at once held
        // a second copy of all of them (~50 MB at the default limit) at the peak, which the
        // allocator kept (bench/soak.sh: RSS +55% at a Redis restart). Copies dropped from the
        // front meanwhile (the limit reached) shift what follows: a few may be looked up twice
        // (harmless: found, left alone) or not at all (they were being dropped, and counted).
        let total = self.len();
        let mut again = 0;
        let mut at = 0;
        while at < total {
            let chunk: Vec<KeptEntry> = {
                let state = self.state.lock().expect("never poisoned");
                state
                    .entries
                    .iter()
                    .skip(at)
                    .take(AGAIN_BATCH)
                    .map(|k| k.entry.clone())
                    .collect()
            };
            if chunk.is_empty() {
                break;
            }
            at += chunk.len();
            // By SHA: a pipeline of EVALs carried the script's 1.8 KB once per entry, and the
            // Redis link's write buffer keeps the size of the largest pipeline (heaptrack:
            // +0.4 MB held after a Redis restart, bench/soak.sh).
            let calls: Vec<Invocation<'_>> = chunk
                .iter()
                .map(|kept| {
                    let mut call = APPEND_AGAIN.call();
                    call.key(&*kept.key)
                        .arg(kept.entry.as_bytes())
                        .number(kept.max_len);
                    match &kept.dedupe {
                        Some(dedupe) => call
                            .number(dedupe.window_ms())
                            .arg(dedupe.buckets.as_bytes())
                            .arg(dedupe.field.as_bytes()),
                        None => call.number(0).arg(&b""[..]).arg(&b""[..]),
                    };
                    for (name, value) in &kept.fields {
                        call.arg(name.as_bytes()).arg(&value[..]);
                    }
                    call
                })
                .collect();
            let done: Vec<u64> = backplane.invoke_pipeline(&calls).await?;
            again += done.iter().sum::<u64>();
        }
        self.metrics.inbound_appended_again.increment(again);
        Ok(again)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(round: u64) -> Kept {
        Kept {
            entry: KeptEntry {
                key: Arc::from("s"),
                entry: "1-1".into(),
                max_len: 10,
                fields: Vec::new(),
                dedupe: None,
            },
            round,
        }
    }

    #[test]
    fn a_confirmed_backlog_gives_its_buffer_back_and_keeps_the_rest() {
        let mut state = State::default();
        state.entries.extend((0..100_000).map(|_| kept(1)));
        state.entries.extend((0..10).map(|_| kept(2)));
        state.confirm(1);
        assert_eq!(state.entries.len(), 10);
        assert!(
            state.entries.capacity() < 2 * KEEP_ROOM,
            "capacity {} kept after the backlog",
            state.entries.capacity()
        );
        assert!(state.entries.iter().all(|k| k.round == 2));
        // Steady load (three rounds held at the peak, one left after a confirm) keeps its room:
        // no shrinking and growing back every round.
        let mut usual = State::default();
        for round in 1..=3 {
            usual.entries.extend((0..5_000).map(|_| kept(round)));
        }
        let room = usual.entries.capacity();
        usual.confirm(2);
        assert_eq!(usual.entries.len(), 5_000);
        assert_eq!(usual.entries.capacity(), room);
        // At rest, little is held.
        usual.confirm(3);
        assert!(
            usual.entries.capacity() < 2 * KEEP_ROOM,
            "{}",
            usual.entries.capacity()
        );
    }
}
