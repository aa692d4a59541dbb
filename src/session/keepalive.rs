//! Pings and the idle timeout: one sweep for the replica instead of a ping timer in every
//! connection's writer (a tokio `Interval` and its boxed `Sleep` were ~150 bytes of every
//! connection).
//!
//! What a client sees is unchanged: a ping every `server.ping_interval_seconds` from when it
//! connected, and at a ping that finds nothing (not even a pong) heard from it for longer than
//! `server.idle_timeout_seconds`, a close with 1001 "idle timeout" instead. Each second the sweep
//! visits the connections whose interval ended in that second (counted from the second each
//! opened), so the pings keep each connection's own phase and spread as connections came.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::clock::mono_ms;
use crate::metrics::CloseReason;
use crate::registry::Registry;

/// Pings every connection of `registry` every `ping_every` (whole seconds, at least 1) after it
/// opened, and closes instead those not heard from for longer than `idle`, until `stop`.
pub async fn keepalive(
    registry: Arc<Registry>,
    ping_every: Duration,
    idle: Duration,
    stop: CancellationToken,
) {
    let every_s = ping_every.as_secs().max(1);
    let idle_ms = idle.as_millis() as u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut done_s = mono_ms() / 1000;
    let mut due = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = mono_ms();
        let now_s = now / 1000;
        if now_s <= done_s {
            continue;
        }
        // Every second since the last sweep, so a late tick skips nobody.
        registry.matching(|c| c.ping_due_between(done_s, now_s, every_s), &mut due);
        done_s = now_s;
        for conn in due.drain(..) {
            if conn.silent_ms(now) > idle_ms {
                conn.close(1001, "idle timeout", CloseReason::IdleTimeout);
            } else {
                conn.ping();
            }
        }
        // A connection storm's worth of handles is not kept between sweeps.
        if due.capacity() > 1024 {
            due = Vec::new();
        }
    }
}
