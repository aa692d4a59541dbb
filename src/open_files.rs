//! The open-files limit (`RLIMIT_NOFILE`): raised to the hard limit at start, and the cap it puts
//! on `limits.max_connections`.
//!
//! Every WebSocket connection is one socket, so a replica holds no more connections than its
//! open-files limit allows. Past that limit `accept` fails (EMFILE) and a new client waits in the
//! listen backlog with no answer at all; below it, a client over `limits.max_connections` gets a
//! clean HTTP 503 it can act on. [`Budget`] therefore keeps the connection cap [`MARGIN`] files
//! below the limit.

use std::sync::Arc;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tokio::sync::Semaphore;

/// Files a replica needs besides its WebSocket connections. About 30 are the process's own:
/// stdio, the epoll instance and its waker, the two listeners, and the Redis links (a command
/// link, the pub/sub link, blocking reads; one of each per node on a cluster). The rest is room
/// for HTTP connections that are not WebSockets: upgrades in flight, clients being answered 503,
/// `/send` calls and metrics scrapes. Each of those holds a socket while it lasts.
pub const MARGIN: u64 = 128;

/// macOS refuses a soft limit above `OPEN_MAX` (`<sys/syslimits.h>`) even when the hard limit
/// is unlimited, which it usually is there.
#[cfg(target_os = "macos")]
const OPEN_MAX: u64 = 10_240;

/// The soft open-files limit of this process; `None` when unlimited.
pub fn soft_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Raises the soft open-files limit to the hard one, as servers commonly do: the soft limit's
/// usual default (1024) is far below what a gateway holds, and the hard limit is what the
/// operator granted. Logs what it did (info), or why it could not (warn); a failure leaves the
/// soft limit as it was and the replica starts anyway.
///
/// Call it once, at start, before the listeners are bound. Returns the soft limit in effect.
pub fn raise() -> Option<u64> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    // `None` is unlimited. Linux never reports an unlimited hard limit for open files (it is
    // bounded by `fs.nr_open`); macOS usually does, and takes at most `OPEN_MAX`.
    #[cfg(target_os = "macos")]
    let target = Some(maximum.map_or(OPEN_MAX, |m| m.min(OPEN_MAX)));
    #[cfg(not(target_os = "macos"))]
    let target = maximum;
    let (Some(from), Some(to)) = (current, target) else {
        tracing::info!(
            soft = ?current,
            hard = ?maximum,
            "open files limit is unlimited; left as it is"
        );
        return current;
    };
    if from >= to {
        tracing::info!(
            limit = from,
            "open files limit is {from}, as high as allowed"
        );
        return current;
    }
    // The hard limit stays as it is: lowering it could not be undone.
    let wanted = Rlimit {
        current: Some(to),
        maximum,
    };
    match setrlimit(Resource::Nofile, wanted) {
        Ok(()) => {
            tracing::info!(from, to, "open files limit raised from {from} to {to}");
            Some(to)
        }
        Err(e) => {
            tracing::warn!(
                limit = from,
                hard = to,
                error = %e,
                "cannot raise the open files limit from {from} to {to}; keeping {from}"
            );
            current
        }
    }
}

/// Whether an `accept` error is a lack of file descriptors: EMFILE (this process's limit) or
/// ENFILE (the system's, `fs.file-max`).
pub fn is_out_of_files(error: &std::io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(error),
        Some(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)
    )
}

/// The WebSocket connections a replica may hold: `max_connections`, or fewer when the open-files
/// `limit` leaves less than [`MARGIN`] files beside them. A limit too small for the margin is
/// shared half and half.
pub fn connection_cap(max_connections: usize, limit: Option<u64>) -> usize {
    let Some(limit) = limit else {
        return max_connections;
    };
    let room = limit.saturating_sub(MARGIN).max(limit / 2);
    max_connections.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// The connection permits of a replica (one per open WebSocket connection, taken before the
/// upgrade), sized by `limits.max_connections` and the open-files limit; and what the accept loop
/// reports when descriptors run out.
#[derive(Debug, Clone)]
pub struct Budget {
    limit: Option<u64>,
    max_connections: usize,
    permits: Arc<Semaphore>,
}

impl Budget {
    /// Sizes the permits with [`connection_cap`]. When the limit caps `limits.max_connections`,
    /// logs one warning naming the key, the limit, the cap and what to do.
    pub fn new(configured: usize, limit: Option<u64>) -> Self {
        let max_connections = connection_cap(configured, limit);
        if let Some(limit) = limit.filter(|_| max_connections < configured) {
            tracing::warn!(
                max_connections = configured,
                open_files_limit = limit,
                margin = MARGIN,
                capped_at = max_connections,
                "limits.max_connections ({configured}) needs {} open files but this process \
                 may open {limit}: accepting at most {max_connections} WebSocket connections \
                 (HTTP 503 too_many_connections beyond). Raise the hard open files limit \
                 (systemd LimitNOFILE=, docker --ulimit nofile=; see docs/deploying.md) or lower \
                 limits.max_connections",
                configured as u64 + MARGIN,
            );
        }
        Self {
            limit,
            max_connections,
            permits: Arc::new(Semaphore::new(max_connections)),
        }
    }

    /// The soft open-files limit the budget was made for; `None` when unlimited.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// The WebSocket connections this replica accepts.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The permits, one per open WebSocket connection.
    pub fn permits(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    /// WebSocket connections open now (permits taken).
    pub fn open(&self) -> usize {
        self.max_connections - self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_with_room_leaves_max_connections_alone() {
        assert_eq!(connection_cap(1000, Some(1000 + MARGIN)), 1000);
        assert_eq!(connection_cap(1000, None), 1000);
    }

    #[test]
    fn a_tight_limit_caps_max_connections_below_it_by_the_margin() {
        assert_eq!(
            connection_cap(100_000, Some(20_000)),
            20_000 - MARGIN as usize
        );
        assert_eq!(connection_cap(1000, Some(1000 + MARGIN - 1)), 999);
    }

    #[test]
    fn a_limit_smaller_than_twice_the_margin_is_shared_half_and_half() {
        assert_eq!(connection_cap(100_000, Some(200)), 100);
        assert_eq!(connection_cap(100_000, Some(256)), 128);
        assert_eq!(connection_cap(100_000, Some(0)), 0);
    }

    #[test]
    fn out_of_files_is_emfile_or_enfile_only() {
        let emfile = std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let enfile = std::io::Error::from_raw_os_error(rustix::io::Errno::NFILE.raw_os_error());
        let reset = std::io::Error::from_raw_os_error(rustix::io::Errno::CONNRESET.raw_os_error());
        assert!(is_out_of_files(&emfile));
        assert!(is_out_of_files(&enfile));
        assert!(!is_out_of_files(&reset));
    }

    #[test]
    fn the_budget_counts_open_connections_by_permits_taken() {
        let budget = Budget::new(100_000, Some(256));
        assert_eq!(budget.max_connections(), 128);
        let held = budget.permits().clone().try_acquire_many_owned(3).unwrap();
        assert_eq!(budget.open(), 3);
        drop(held);
        assert_eq!(budget.open(), 0);
    }
}
