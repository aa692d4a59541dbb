//! The memory allocator's own figures, and giving free memory back to the system.
//!
//! After a burst (a connection storm, a Redis outage that queues sends), glibc keeps the freed
//! memory for reuse: the heap in use falls back, the process's RSS does not. A replica that
//! weathered one outage would carry its peak for the rest of its life. Every
//! `server.heap_trim_interval_seconds`, when the allocator holds at least [`TRIM_FROM`] more than
//! it has handed out, the replica asks it to give the free pages back (`malloc_trim`).
//!
//! Reading the figures and trimming are foreign calls, which this crate does not make (it forbids
//! unsafe code): the binary, which knows its allocator, hands them in ([`set_allocator`]).
//! Without them the heap metrics are left out and nothing is trimmed.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::Counter;
use tokio_util::sync::CancellationToken;

/// What the allocator reports: RSS minus `in_use` is code, stacks and memory the allocator keeps.
#[derive(Debug, Clone, Copy)]
pub struct Heap {
    /// Bytes handed out and not yet freed.
    pub in_use: u64,
    /// Bytes the allocator holds from the operating system, in use or free.
    pub held: u64,
}

/// The allocator's two calls.
#[derive(Debug, Clone, Copy)]
pub struct Allocator {
    /// Reads the figures.
    pub stats: fn() -> Heap,
    /// Gives free pages back to the system.
    pub trim: fn(),
}

/// Free memory worth giving back: below this, a trim would cost more than it returns.
pub const TRIM_FROM: u64 = 4 << 20;

static ALLOCATOR: OnceLock<Allocator> = OnceLock::new();

/// Sets the allocator's calls; the first call wins.
pub fn set_allocator(allocator: Allocator) {
    let _ = ALLOCATOR.set(allocator);
}

/// The allocator's figures, when the binary said how to read them.
pub fn stats() -> Option<Heap> {
    ALLOCATOR.get().map(|a| (a.stats)())
}

/// Whether memory held but not in use is worth giving back.
fn worth_trimming(heap: Heap) -> bool {
    heap.held.saturating_sub(heap.in_use) >= TRIM_FROM
}

/// Every `every`, gives the allocator's free memory back when it is worth it; counted in
/// `trims` (`wsbridge_heap_trims_total`). Returns at once without an allocator or with `every`
/// zero.
pub async fn trim_loop(every: Duration, trims: Counter, stop: CancellationToken) {
    let Some(allocator) = ALLOCATOR.get().copied() else {
        return;
    };
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if worth_trimming((allocator.stats)()) {
            // It walks the allocator's free lists under its locks: milliseconds on a large heap,
            // so not on a worker thread.
            let _ = tokio::task::spawn_blocking(allocator.trim).await;
            trims.increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_worthwhile_surplus_is_trimmed() {
        let heap = |in_use, held| Heap { in_use, held };
        assert!(!worth_trimming(heap(10 << 20, 10 << 20)));
        assert!(!worth_trimming(heap(10 << 20, (14 << 20) - 1)));
        assert!(worth_trimming(heap(10 << 20, 14 << 20)));
        // Figures read while another thread allocates may cross: no surplus, not an overflow.
        assert!(!worth_trimming(heap(12 << 20, 10 << 20)));
    }
}
