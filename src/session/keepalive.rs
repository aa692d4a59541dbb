//! Pings and the idle timeout: one sweep for the replica instead of a ping timer in every
//! connection's writer (a tokio `Interval` and its boxed `Sleep` were ~150 bytes of every
//! connection).
//!
//! What a client sees is unchanged: a ping every `server.ping_interval_seconds`, and a close
//! with 1001 "idle timeout" once nothing (not even a pong) was heard from it for
//! `server.idle_timeout_seconds` — checked at its pings, as before, so the close comes at most
//! one ping interval after that. Each second the sweep visits the connections of one slot
//! (sequence number modulo the interval's seconds), so every connection is visited once per
//! interval and the pings spread over it rather than all leaving at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::clock::mono_ms;
use crate::metrics::CloseReason;
use crate::registry::Registry;

/// Pings every connection of `registry` every `ping_every` (whole seconds, at least 1), and
/// closes those not heard from for longer than `idle`, until `stop`.
pub async fn keepalive(
    registry: Arc<Registry>,
    ping_every: Duration,
    idle: Duration,
    stop: CancellationToken,
) {
    let slots = ping_every.as_secs().max(1);
    let idle_ms = idle.as_millis() as u64;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut due = Vec::new();
    for slot in (0..slots).cycle() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        registry.in_slot(slots, slot, &mut due);
        let now = mono_ms();
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
