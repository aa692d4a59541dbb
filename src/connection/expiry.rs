//! Token expiries: one timer task for the whole replica ([`Expiries::run`]) instead of a timer in
//! every connection's task. A tokio `Sleep` and the `select!` around it were ~380 bytes of every
//! connection's task; here a connection with a token that expires costs one map entry.
//!
//! What a connection sees is unchanged: `auth.refresh_notice_seconds` before its token's `exp` it
//! is sent `refresh_required` (once per token; 0 sends none), and at `exp` it is closed with 1008
//! "token expired"; a `refresh` moves both.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::ConnHandle;
use crate::clock::unix_ms;
use crate::metrics::CloseReason;
use crate::protocol::ServerFrame;

/// What is due for a connection at its key's second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Send `refresh_required`, then wait for `exp`.
    Notice,
    /// Close with 1008.
    Expire,
}

struct Due {
    conn: Weak<ConnHandle>,
    /// The token's `exp` (unix seconds).
    exp: u64,
    stage: Stage,
}

/// The expiries of this replica's connections, by due second and connection.
///
/// Every entry of a connection is keyed by its current `exp` (one entry: the notice's second,
/// then `exp`), and entries move only under the lock: a `refresh` and the timer task cannot
/// interleave, so a moved token never leaves an entry of the old one behind.
pub struct Expiries {
    due: Mutex<BTreeMap<(u64, u64), Due>>,
    /// Woken when an entry becomes the earliest: the task's sleep may be too long.
    sooner: Notify,
    /// `auth.refresh_notice_seconds`.
    notice: u64,
}

/// No expiry (a token without `exp`, or no token).
const NONE: u64 = u64::MAX;

impl Expiries {
    /// No expiries yet; `notice` is `auth.refresh_notice_seconds`.
    pub fn new(notice: u64) -> Self {
        Self {
            due: Mutex::new(BTreeMap::new()),
            sooner: Notify::new(),
            notice,
        }
    }

    /// Follows `conn`'s token, expiring at `at` (unix seconds; `None`: never), until the returned
    /// guard is dropped.
    pub(crate) fn watch(&self, conn: &Arc<ConnHandle>, at: Option<u64>) -> Expiry<'_> {
        let expiry = Expiry {
            expiries: self,
            seq: conn.seq,
            at: AtomicU64::new(NONE),
        };
        expiry.set(conn, at);
        expiry
    }

    /// The first entry of a token expiring at `exp`.
    fn first_stage(&self, exp: u64) -> (u64, Stage) {
        if self.notice > 0 {
            (exp.saturating_sub(self.notice), Stage::Notice)
        } else {
            (exp, Stage::Expire)
        }
    }

    /// Removes the entry of connection `seq`'s token expiring at `exp`, whichever stage it is in.
    fn remove(&self, due: &mut BTreeMap<(u64, u64), Due>, seq: u64, exp: u64) {
        if due.remove(&(exp, seq)).is_none() {
            due.remove(&(exp.saturating_sub(self.notice), seq));
        }
    }

    fn insert(&self, due: &mut BTreeMap<(u64, u64), Due>, key: (u64, u64), entry: Due) {
        due.insert(key, entry);
        if due.first_key_value().map(|(first, _)| *first) == Some(key) {
            self.sooner.notify_one();
        }
    }

    /// Sends the notices and closes the connections that are due at `now_ms` (unix
    /// milliseconds); returns the second of the next entry, if any.
    fn fire(&self, now_ms: u64) -> Option<u64> {
        let mut due = self.due.lock().expect("expiries lock");
        loop {
            let (&(at, seq), _) = due.first_key_value()?;
            if at.saturating_mul(1000) > now_ms {
                return Some(at);
            }
            let entry = due.remove(&(at, seq)).expect("first entry");
            // A connection that is gone removed its entry on the way out (its guard); one whose
            // task was dropped mid-way is skipped here.
            let Some(conn) = entry.conn.upgrade() else {
                continue;
            };
            match entry.stage {
                // Queued under the lock: a `refresh` that moves the token waits for it, so the
                // notice never names a token the client has already replaced.
                Stage::Notice => {
                    conn.reply(&ServerFrame::RefreshRequired {
                        expires_at: entry.exp,
                    });
                    let next = Due {
                        stage: Stage::Expire,
                        ..entry
                    };
                    due.insert((next.exp, seq), next);
                }
                Stage::Expire => conn.close(1008, "token expired", CloseReason::TokenExpired),
            }
        }
    }

    /// Sends every connection's notice and closes every connection whose token expired, each at
    /// its time, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let sooner = self.sooner.notified();
            tokio::pin!(sooner);
            sooner.as_mut().enable();
            let now_ms = unix_ms();
            let wait = match self.fire(now_ms) {
                Some(at) => Duration::from_millis(at.saturating_mul(1000) - now_ms),
                // Nothing to wait for but a new entry.
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut sooner => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// One connection's token expiry, as a client's `refresh` moves it. Dropping it forgets the
/// connection.
pub(crate) struct Expiry<'a> {
    expiries: &'a Expiries,
    seq: u64,
    /// The token's `exp` (unix seconds), or [`NONE`].
    at: AtomicU64,
}

impl Expiry<'_> {
    /// Moves the expiry to `at` (`None`: never); a notice still due is due for the new token.
    pub(crate) fn set(&self, conn: &Arc<ConnHandle>, at: Option<u64>) {
        let expiries = self.expiries;
        let mut due = expiries.due.lock().expect("expiries lock");
        let old = self.at.swap(at.unwrap_or(NONE), Ordering::Relaxed);
        if old != NONE {
            expiries.remove(&mut due, self.seq, old);
        }
        if let Some(exp) = at {
            let (second, stage) = expiries.first_stage(exp);
            let entry = Due {
                conn: Arc::downgrade(conn),
                exp,
                stage,
            };
            expiries.insert(&mut due, (second, self.seq), entry);
        }
    }
}

impl Drop for Expiry<'_> {
    fn drop(&mut self) {
        let at = *self.at.get_mut();
        if at != NONE {
            let mut due = self.expiries.due.lock().expect("expiries lock");
            self.expiries.remove(&mut due, self.seq, at);
        }
    }
}
