//! The write side: everything the client receives, in one place.
//!
//! Frames go into a buffered writer and are flushed once per wake-up, so a burst of queued
//! messages costs one socket write rather than one per frame. A message for a connection with
//! nothing waiting skips this task: the dispatcher writes it directly (`direct.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketWrite};
use tokio::io::AsyncWrite;

use super::Timing;
use super::{ConnHandle, Outgoing, Reply};
use crate::clock::unix_us;
use crate::metrics::{CloseReason, Metrics};
use crate::protocol::Encoding;

/// Frames written per wake-up before flushing, so one busy connection cannot starve the flush.
const BURST: usize = 64;

/// Writes until the connection is closing (after sending the close frame) or the socket fails.
pub async fn run<S: AsyncWrite + Unpin>(
    mut ws: WebSocketWrite<S>,
    handle: &ConnHandle,
    timing: Timing,
    metrics: &Metrics,
    last_seen: &AtomicU64,
    started: Instant,
) {
    let ping_every = timing.ping_every;
    let idle_ms = timing.idle.as_millis() as u64;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let opcode = match handle.encoding {
        Encoding::Json => OpCode::Text,
        Encoding::Msgpack => OpCode::Binary,
    };
    // Grows on the first burst; an idle connection never allocates it.
    let mut accepted = Vec::new();
    // Created once: a fresh `cancelled()` future per wake-up would lock the token and register
    // a waiter every time.
    let mut closed = std::pin::pin!(handle.close_requested());
    let mut sent_bytes = 0usize;
    // Frames taken for writing since the last flush: once flushed, they are off the books of
    // direct writes (`direct.rs`), which wait while any is pending. Frames this task makes itself
    // (pings, the close frame) are put on the books before they are written.
    let mut taken = 0usize;
    loop {
        let result = tokio::select! {
            biased;
            _ = &mut closed => {
                let closing = handle.closing().expect("closed implies a reason");
                if closing.replies_first {
                    // A drained connection: the answers it owed were queued before the close was
                    // asked for, so they are all here. Only those: what arrives later is not
                    // waited for.
                    for _ in 0..handle.replies.len() {
                        let Some(reply) = handle.replies.try_pop() else { break };
                        metrics.sent_bytes.increment(reply.len() as u64);
                        if write_reply(&mut ws, opcode, reply).await.is_err() {
                            break;
                        }
                    }
                }
                handle.direct.handed(1);
                let _ = ws.write_frame(Frame::close(closing.code, closing.reason.as_bytes())).await;
                let _ = ws.flush().await;
                return;
            }
            Some(reply) = handle.replies.pop() => {
                taken += 1;
                sent_bytes += reply.len();
                write_reply(&mut ws, opcode, reply).await
            }
            Some(out) = handle.messages.pop() => {
                taken += 1;
                accepted.push(out.accepted_us);
                sent_bytes += out.frame.len();
                write_message(&mut ws, opcode, &out).await
            }
            // The rest of a direct write waits: the flush below writes it.
            _ = handle.direct.kick.notified() => Ok(()),
            _ = ping.tick() => {
                let seen = last_seen.load(Ordering::Relaxed);
                let now = started.elapsed().as_millis() as u64;
                if now.saturating_sub(seen) > idle_ms {
                    handle.close(1001, "idle timeout", CloseReason::IdleTimeout);
                    continue;
                }
                handle.direct.handed(1);
                taken += 1;
                ws.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await
            }
        };
        // Take what else is already waiting, without waiting, then flush once.
        let mut result = result;
        for _ in 0..BURST {
            if result.is_err() || handle.closing().is_some() {
                break;
            }
            if let Some(reply) = handle.replies.try_pop() {
                taken += 1;
                sent_bytes += reply.len();
                result = write_reply(&mut ws, opcode, reply).await;
            } else if let Some(out) = handle.messages.try_pop() {
                taken += 1;
                accepted.push(out.accepted_us);
                sent_bytes += out.frame.len();
                result = write_message(&mut ws, opcode, &out).await;
            } else {
                break;
            }
        }
        if result.is_ok() {
            result = ws.flush().await;
        }
        if let Err(e) = result {
            handle.close(1000, &e.to_string(), CloseReason::Error);
            return;
        }
        handle.direct.done(taken);
        taken = 0;
        metrics.sent_bytes.increment(sent_bytes as u64);
        sent_bytes = 0;
        if !accepted.is_empty() {
            metrics.deliveries.increment(accepted.len() as u64);
            let now = unix_us();
            for at in accepted.drain(..) {
                metrics.delivered_after(at, now);
            }
        }
    }
}

async fn write_message<S: AsyncWrite + Unpin>(
    ws: &mut WebSocketWrite<S>,
    opcode: OpCode,
    out: &Outgoing,
) -> Result<(), WebSocketError> {
    ws.write_frame(Frame::new(
        true,
        opcode,
        None,
        Payload::Borrowed(&out.frame),
    ))
    .await
}

async fn write_reply<S: AsyncWrite + Unpin>(
    ws: &mut WebSocketWrite<S>,
    opcode: OpCode,
    reply: Reply,
) -> Result<(), WebSocketError> {
    match reply {
        Reply::Frame(bytes) => {
            ws.write_frame(Frame::new(true, opcode, None, Payload::Borrowed(&bytes)))
                .await
        }
        Reply::Pong(payload) => ws.write_frame(Frame::pong(Payload::Owned(payload))).await,
        Reply::Data(opcode, bytes) => {
            ws.write_frame(Frame::new(true, opcode, None, Payload::Borrowed(&bytes)))
                .await
        }
    }
}
