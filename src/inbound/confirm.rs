//! When Redis can no longer lose an acked inbound entry: the one rule the keeper
//! ([`super::keeper`]) drops its copies by.
//!
//! Entries are grouped in check rounds: a round's entries were all acked before that round's
//! `INFO` was sent, so Redis had taken them before it answered it. Each round leaves a mark
//! (what that `INFO` said); a later `INFO` confirms every round up to the newest mark it proves:
//!
//! | the primary | a mark is proven when |
//! |---|---|
//! | has replicas, or had one within `repl-backlog-ttl` (`repl_backlog_active:1`) | every online replica's offset passed the mark's `master_repl_offset` |
//! | no replicas, AOF with `appendfsync always` | at once |
//! | no replicas, AOF with `appendfsync everysec` (or `CONFIG` refused) | it is [`FSYNC_WINDOW`] old, no fsync was delayed since (`aof_delayed_fsync`), the last AOF write succeeded and no fsync is running |
//! | no replicas, AOF with `appendfsync no` | never: the OS writes when it likes |
//! | no replicas, no AOF, snapshots | a save succeeded since (`rdb_last_save_time` changed) and none was running at the mark (`rdb_bgsave_in_progress`) |
//! | no replicas, no AOF, no save points and no save since Redis started | at once: a restart loses the whole stream, copies or not |
//!
//! Proving a later mark proves the earlier rounds too: Redis applies, replicates, writes and
//! saves in order. A Redis restarted or replaced (another run id or replication id) is not
//! confirmed by anything: the keeper looks every copy up there instead.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::backplane::durability::Settings;

/// How old a mark must be before an `appendfsync everysec` Redis has surely written and fsynced
/// what was acked before it: Redis fsyncs once a second in the background, and while an fsync
/// runs it holds the next write back for up to two seconds (then writes anyway and counts
/// `aof_delayed_fsync`, which the rule also watches). Redis's own promise for `everysec` is the
/// same: about a second of writes lost, two at worst.
pub const FSYNC_WINDOW: Duration = Duration::from_secs(2);

/// Marks remembered at most; past it every other one is forgotten, so the marks still span the
/// whole time copies wait (a snapshot taken every few minutes) at a coarser grain.
const MAX_MARKS: usize = 64;

/// What one `INFO` (all sections) said about the Redis answering.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Info {
    /// `run_id`.
    pub run_id: String,
    /// `master_replid`.
    pub replid: String,
    /// `role:master`.
    pub is_master: bool,
    /// `master_repl_offset`.
    pub offset: u64,
    /// The replication offsets of the replicas in state `online`.
    pub replica_offsets: Vec<u64>,
    /// A replica is connected, or was within `repl-backlog-ttl` (`repl_backlog_active:1`):
    /// Sentinel may promote it, so only its offset proves anything.
    pub replicated: bool,
    /// `aof_enabled:1`.
    pub aof_enabled: bool,
    /// `aof_last_write_status:ok`.
    pub aof_write_ok: bool,
    /// `aof_pending_bio_fsync` above 0: an fsync is running.
    pub aof_fsync_running: bool,
    /// `aof_delayed_fsync`: writes held back past two seconds by a slow fsync, since start.
    pub aof_delayed_fsyncs: u64,
    /// `rdb_last_save_time`: when the last successful save ended (start time before any).
    pub last_save: i64,
    /// `rdb_bgsave_in_progress:1`.
    pub saving: bool,
    /// `rdb_saves`: saves started (failed ones too) since start.
    pub saves: u64,
}

impl Info {
    /// Reads the fields above; missing ones keep their defaults (which prove nothing).
    pub fn parse(info: &str) -> Self {
        let mut parsed = Info::default();
        for line in info.lines() {
            let Some((name, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            let number = || value.parse::<u64>().unwrap_or(0);
            match name {
                "run_id" => parsed.run_id = value.to_owned(),
                "master_replid" => parsed.replid = value.to_owned(),
                "master_repl_offset" => parsed.offset = number(),
                "role" => parsed.is_master = value == "master",
                "connected_slaves" => parsed.replicated |= number() > 0,
                "repl_backlog_active" => parsed.replicated |= value == "1",
                "aof_enabled" => parsed.aof_enabled = value == "1",
                "aof_last_write_status" => parsed.aof_write_ok = value == "ok",
                "aof_pending_bio_fsync" => parsed.aof_fsync_running = number() > 0,
                "aof_delayed_fsync" => parsed.aof_delayed_fsyncs = number(),
                "rdb_last_save_time" => parsed.last_save = value.parse().unwrap_or(0),
                "rdb_bgsave_in_progress" => parsed.saving = value == "1",
                "rdb_saves" => parsed.saves = number(),
                _ if name.starts_with("slave") && name[5..].parse::<u32>().is_ok() => {
                    // slave0:ip=…,port=…,state=online,offset=123,lag=0
                    let field = |f: &str| {
                        value
                            .split(',')
                            .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                    };
                    if field("state") == Some("online") {
                        if let Some(offset) = field("offset").and_then(|o| o.parse().ok()) {
                            parsed.replica_offsets.push(offset);
                        }
                    }
                }
                _ => {}
            }
        }
        parsed
    }
}

/// Which line of the table in the module doc confirms copies now (logged when it changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Replicas' offsets.
    Replicas,
    /// `appendfsync always`.
    FsyncAlways,
    /// `appendfsync everysec`, or `CONFIG` refused with AOF on.
    FsyncWindow,
    /// `appendfsync no`: nothing confirms.
    FsyncNo,
    /// Snapshots only.
    Snapshots,
    /// No persistence: nothing to wait for.
    NothingPersisted,
    /// The persistence settings of this Redis process are not known yet.
    NotChecked,
}

impl Rule {
    /// The name logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Replicas => "replica offsets",
            Rule::FsyncAlways => "appendfsync always: at once",
            Rule::FsyncWindow => "appendfsync everysec: 2 s after the ack",
            Rule::FsyncNo => "appendfsync no: never (copies kept up to the limit)",
            Rule::Snapshots => "the next successful save",
            Rule::NothingPersisted => "no persistence: at once",
            Rule::NotChecked => "not yet (persistence settings not checked)",
        }
    }
}

#[derive(Debug, Clone)]
struct Mark {
    round: u64,
    at: Instant,
    offset: u64,
    delayed_fsyncs: u64,
    last_save: i64,
    saving: bool,
}

/// The marks of the rounds not yet confirmed, and the rule that confirms them.
#[derive(Debug, Default)]
pub struct Confirmer {
    marks: VecDeque<Mark>,
}

impl Confirmer {
    /// Forgets every mark: another Redis answers now.
    pub fn clear(&mut self) {
        self.marks.clear();
    }

    /// Round `round` began: its `INFO` was sent at `at` and answered `info` (a master, the same
    /// process as the previous rounds'); `settings` are that process's, if checked. Returns the
    /// rule applied and the newest round now confirmed, if any (with every round before it).
    pub fn observe(
        &mut self,
        round: u64,
        at: Instant,
        info: &Info,
        settings: Option<&Settings>,
    ) -> (Rule, Option<u64>) {
        if self.marks.len() == MAX_MARKS {
            // Forgetting a mark only makes its round wait for a later one.
            let mut i = 0;
            self.marks.retain(|_| {
                i += 1;
                i % 2 == 0
            });
        }
        self.marks.push_back(Mark {
            round,
            at,
            offset: info.offset,
            delayed_fsyncs: info.aof_delayed_fsyncs,
            last_save: info.last_save,
            saving: info.saving,
        });
        let rule = rule(info, settings);
        let proven = |mark: &Mark| match rule {
            Rule::Replicas => info
                .replica_offsets
                .iter()
                .min()
                .is_some_and(|slowest| mark.offset <= *slowest),
            Rule::FsyncAlways | Rule::NothingPersisted => true,
            Rule::FsyncWindow => {
                info.aof_write_ok
                    && !info.aof_fsync_running
                    && mark.delayed_fsyncs == info.aof_delayed_fsyncs
                    && at.saturating_duration_since(mark.at) >= FSYNC_WINDOW
            }
            Rule::Snapshots => !mark.saving && mark.last_save != info.last_save,
            Rule::FsyncNo | Rule::NotChecked => false,
        };
        let Some(newest) = self.marks.iter().rposition(proven) else {
            return (rule, None);
        };
        let confirmed = self.marks[newest].round;
        self.marks.drain(..=newest);
        (rule, Some(confirmed))
    }
}

fn rule(info: &Info, settings: Option<&Settings>) -> Rule {
    if info.replicated {
        return Rule::Replicas;
    }
    let Some(settings) = settings else {
        return Rule::NotChecked;
    };
    if info.aof_enabled {
        return match settings.appendfsync.as_deref() {
            Some("always") => Rule::FsyncAlways,
            Some("no") => Rule::FsyncNo,
            // everysec, Redis's default, or CONFIG refused (managed services that offer AOF
            // run everysec).
            _ => Rule::FsyncWindow,
        };
    }
    if settings.save.as_deref() == Some("") && info.saves == 0 {
        return Rule::NothingPersisted;
    }
    Rule::Snapshots
}

#[cfg(test)]
mod tests;
