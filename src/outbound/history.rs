//! Channel history: offsets, and reading what a resuming client or a catching-up replica missed.
//!
//! An offset is `<epoch>:<stream entry id>`. The epoch is a random value stored beside a
//! channel's history stream and created with it; when Redis loses the history (a restart without
//! persistence, or expiry), it loses the epoch too, and the next message starts a new one. A
//! client resuming with an offset of another epoch is therefore told that it was not recovered.
//!
//! A read distinguishes "gone" from "cannot tell yet". [`Replay::Incomplete`] is an answer from
//! Redis: the offset is no longer covered. A read that Redis did not answer (a timeout, a lost
//! connection, a cluster failing over) is tried again, with backoff, for as long as the caller's
//! `keep_trying` allows; only then does it return the failure, which callers must not report as
//! "gone". Reads are paged and few run at once ([`MAX_CONCURRENT_READS`]), so that many clients
//! resuming together queue here instead of timing out together on the shared command link.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::streams::StreamRangeReply;
use tokio::sync::Semaphore;

use crate::backplane::durability::Durability;
use crate::backplane::script::Script;
use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::cursor::{parse_id, Entry, Offset};

/// Lua deciding whether a channel's epoch still holds on the Redis that runs the script.
///
/// An epoch promises that the history under it has every entry it ever gave an offset for. A
/// Redis that restarted from a snapshot or an `appendfsync everysec` file, or a replica promoted
/// to primary, may lack the newest entries while still holding the epoch, and nothing in its data
/// can show that (what was lost took its own traces with it). So each write stamps the history's
/// writer key with the incarnation that made it: `<run id> <replication id> <unix s> <durable>`,
/// where durable says that this Redis persists every write before answering ([`Durability`]).
/// On a Redis other than the writer (another run id), the epoch holds only when the data cannot
/// have lost anything:
/// - this Redis took over from the writer (its previous replication id is the writer's: a
///   replica promoted): not proven, the epoch ends;
/// - this Redis started after the write (a restart, loading from disk; to the second, erring on
///   "after"): the epoch holds only if the writer was durable;
/// - otherwise (it was running before the write and did not take over: the keys moved to it
///   whole, as a slot migration moves them) it holds.
///
/// `history_epoch(epoch_key, writer_key)` returns the epoch, or `false` when there is none or it
/// no longer holds (the caller starts a new one: offsets of the old one then answer "not
/// recovered"). A history without a writer stamp (written before stamps existed) keeps its
/// epoch. `stamp_writer(writer_key, durable_run_ids, ttl)` records this Redis as the writer.
macro_rules! lua_continuity {
    () => {
        r"
local incarnation
local function whoami()
  if not incarnation then
    local info = redis.call('INFO', 'server') .. redis.call('INFO', 'replication')
    local t = redis.call('TIME')
    local now = tonumber(t[1])
    incarnation = {
      run = string.match(info, 'run_id:(%x+)'),
      replid = string.match(info, 'master_replid:(%x+)'),
      replid2 = string.match(info, 'master_replid2:(%x+)'),
      now = now,
      started = now - tonumber(string.match(info, 'uptime_in_seconds:(%d+)')),
    }
  end
  return incarnation
end
local function history_epoch(epoch_key, writer_key)
  local epoch = redis.call('GET', epoch_key)
  local writer = redis.call('GET', writer_key)
  if not (epoch and writer) then
    return epoch
  end
  local run, replid, at, durable = string.match(writer, '^(%x+) (%x+) (%d+) ([01])$')
  local me = whoami()
  if not run or run == me.run then
    return epoch
  end
  if replid == me.replid2 then
    return false
  end
  if me.started + 1 >= tonumber(at) and durable ~= '1' then
    return false
  end
  return epoch
end
local function stamp_writer(writer_key, durable_runs, ttl)
  local me = whoami()
  local durable = '0'
  if string.find(',' .. durable_runs .. ',', ',' .. me.run .. ',', 1, true) then
    durable = '1'
  end
  redis.call('SET', writer_key, me.run .. ' ' .. me.replid .. ' ' .. me.now .. ' ' .. durable,
    'EX', ttl)
end
"
    };
}

pub(crate) use lua_continuity;

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Replay {
    /// Everything after the offset is still there: these entries, in order.
    Complete(Vec<Entry>),
    /// The history no longer holds the offset (trimmed, expired, lost, or another epoch).
    Incomplete,
}

/// Entries read per round trip. A page is small enough to come back well within the command
/// timeout even in a debug build with other reads queued behind it on the same link.
const PAGE: u64 = 500;

/// History reads that may be in flight at once on one replica; the others wait their turn.
pub const MAX_CONCURRENT_READS: usize = 8;

/// The longest wait between two attempts of a read Redis did not answer.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Reads a page of a channel's history: its epoch, its oldest entry (to tell whether anything
/// after the cursor was trimmed), the entries after the cursor and the stream's length (a read
/// from `0-0` is complete only while the stream was never trimmed). One script rather than a
/// MULTI: a script is one command routed by its keys, so on a cluster a MOVED reply (a slot that
/// moved) is followed like any command's, where a MULTI would fail until the client refreshed its
/// slot map on its own.
///
/// The epoch is `false` where it no longer holds ([`lua_continuity`]). KEYS: the stream, the
/// epoch, the writer; ARGV: `(<cursor>`, the count, `<cursor>`. The last value says whether the
/// cursor's own entry is there: one that was neither trimmed nor kept was lost.
static READ_PAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_continuity!(),
        r"
local epoch = history_epoch(KEYS[2], KEYS[3])
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local after = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
local held = #redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3]) > 0
return {epoch, oldest, after, redis.call('XLEN', KEYS[1]), held and 1 or 0}
",
    ))
});

/// Where a channel's history stands: creates its epoch if missing or no longer holding (KEYS:
/// the stream, the epoch, the writer; ARGV: a new epoch, the TTL in seconds, the durable run id
/// ([`Durability`])), then returns the epoch and the last entry. A script for the same reason
/// as [`READ_PAGE`].
static READ_START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_continuity!(),
        r"
local epoch = history_epoch(KEYS[2], KEYS[3])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch, 'EX', ARGV[2])
  stamp_writer(KEYS[3], ARGV[3], ARGV[2])
end
return {epoch, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)}
",
    ))
});

/// A page as [`READ_PAGE`] returns it: the epoch (`None`: none, or it no longer holds), the
/// oldest entry, the entries after the cursor, the stream's length, whether the cursor's entry
/// is there.
type Page = (
    Option<String>,
    StreamRangeReply,
    StreamRangeReply,
    u64,
    bool,
);

/// Reads channel histories for resumes and catch-ups; cheap to clone.
#[derive(Clone)]
pub struct HistoryReader {
    backplane: Backplane,
    keys: Keys,
    permits: Arc<Semaphore>,
    durability: Durability,
}

impl HistoryReader {
    /// A reader over the command link.
    pub fn new(backplane: Backplane, keys: Keys, durability: Durability) -> Self {
        Self {
            backplane,
            keys,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
            durability,
        }
    }

    /// Reads the entries of `channel`'s history after `since`, at most `limit`, page by page;
    /// each page checks the epoch and that nothing between `since` and it was trimmed, so the
    /// pages add up to what one atomic read would have returned.
    ///
    /// A page Redis did not answer is tried again (after 0.1 s, doubling up to 1 s) as long as
    /// `keep_trying()` says so; it is asked after each failure only, so waiting for a turn
    /// does not count against the caller's patience.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis answered with an error that retrying cannot cure, or did not
    /// answer and `keep_trying()` said to stop: the caller cannot tell what the history holds.
    pub async fn read_since(
        &self,
        channel: &str,
        since: &Offset,
        limit: u64,
        mut keep_trying: impl FnMut() -> bool,
    ) -> Result<Replay, RedisFailure> {
        if limit == 0 {
            return Ok(Replay::Complete(Vec::new()));
        }
        let _turn = self.permits.acquire().await.expect("never closed");
        let mut entries = Vec::new();
        let mut cursor = since.id;
        loop {
            let want = PAGE.min(limit - entries.len() as u64);
            let page = self.page(channel, cursor, want, &mut keep_trying).await?;
            let (epoch, oldest, after, len, held) = page;
            let Some(epoch) = epoch else {
                return Ok(Replay::Incomplete);
            };
            if epoch != since.epoch {
                return Ok(Replay::Incomplete);
            }
            // Entries are trimmed from the front: if the oldest one kept is newer than the
            // cursor, some entries after it may be gone. From `0-0` (the history was empty when
            // the offset was taken: see `read_start`) nothing is gone if nothing was ever
            // trimmed, which `MAXLEN` (exact) leaves the stream shorter than its limit.
            let trimmed = if cursor == (0, 0) {
                len >= limit
            } else {
                oldest.ids.first().and_then(|e| parse_id(&e.id)) > Some(cursor)
            };
            // Not trimmed, yet not there: lost (Redis came back without its newest writes, and
            // the epoch did not show it). Never replay past it.
            if trimmed || (cursor != (0, 0) && !held) {
                return Ok(Replay::Incomplete);
            }
            let got = after.ids.len() as u64;
            for entry in after.ids {
                if let Some(id) = parse_id(&entry.id) {
                    cursor = id;
                }
                let data = entry.get::<String>("data").unwrap_or_else(|| "null".into());
                entries.push(Entry {
                    offset: format!("{epoch}:{}", entry.id),
                    data,
                });
            }
            if got < want || entries.len() as u64 >= limit {
                return Ok(Replay::Complete(entries));
            }
        }
    }

    /// Where `channel`'s history stands now: its epoch and last entry, or `<epoch>:0-0` when it
    /// has no entry. A history without an epoch gets one here (with the history's TTL), which
    /// the next publish then uses: so "empty now" is tied to an epoch, and a history lost
    /// before the next read shows as another epoch rather than as a short replay. One attempt:
    /// a joining client does not wait out an outage for this (see `crate::cursor::ChannelCursors`).
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis did not answer.
    pub async fn read_start(
        &self,
        channel: &str,
        ttl_seconds: u64,
    ) -> Result<Offset, RedisFailure> {
        let mut call = READ_START.call();
        call.key(self.keys.history(channel))
            .key(self.keys.epoch(channel))
            .key(self.keys.writer(channel))
            .arg(format!("{:08x}", crate::ids::random_u32()).into_bytes())
            .number(ttl_seconds.max(1))
            .arg(self.durability.run_id().into_bytes());
        let (epoch, last): (Option<String>, StreamRangeReply) =
            self.backplane.invoke(&call).await?;
        // Set just before, in the same script: absent only if it expired in between.
        let epoch = epoch.unwrap_or_default();
        let id = last
            .ids
            .first()
            .and_then(|e| parse_id(&e.id))
            .unwrap_or((0, 0));
        Ok(Offset { epoch, id })
    }

    /// One page: the epoch, the oldest entry, up to `count` entries after `cursor`, and the
    /// stream's length, read atomically by one script ([`READ_PAGE`]); tried again while Redis
    /// does not answer and
    /// `keep_trying()` allows.
    async fn page(
        &self,
        channel: &str,
        cursor: (u64, u64),
        count: u64,
        keep_trying: &mut impl FnMut() -> bool,
    ) -> Result<Page, RedisFailure> {
        let mut call = READ_PAGE.call();
        call.key(self.keys.history(channel))
            .key(self.keys.epoch(channel))
            .key(self.keys.writer(channel))
            .arg(format!("({}-{}", cursor.0, cursor.1).into_bytes())
            .number(count)
            .arg(format!("{}-{}", cursor.0, cursor.1).into_bytes());
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0u32;
        loop {
            match self.backplane.invoke(&call).await {
                Ok(page) => return Ok(page),
                Err(e) if e.is_transient() && keep_trying() => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, channel, "history read failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }
}
