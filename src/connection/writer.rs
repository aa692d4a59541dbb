//! The write side: everything the client receives, in one place.
//!
//! Frames go into a buffered writer and are flushed once per wake-up, so a burst of queued
//! messages costs one socket write rather than one per frame. A message for a connection with
//! nothing waiting skips this task: the dispatcher writes it directly (`direct.rs`).
//!
//! The frames are the gateway's own (RFC 6455 §5.2; fastwebsockets' writer cannot set RSV1):
//! on a connection that agreed on permessage-deflate, a message of at least the configured size
//! that is not compressed yet (the fan-out compresses shared messages once, `deflate.rs`) is
//! compressed here and written with RSV1.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fastwebsockets::OpCode;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::deflate::Deflate;
use super::direct::frame_header;
use super::Timing;
use super::{ConnHandle, Outgoing, Reply};
use crate::clock::unix_us;
use crate::metrics::{CloseReason, DeflatePath, Metrics};
use crate::protocol::Encoding;

/// Frames written per wake-up before flushing, so one busy connection cannot starve the flush.
const BURST: usize = 64;

/// Writes until the connection is closing (after sending the close frame) or the socket fails.
///
/// `ws` is borrowed: an async fn keeps its arguments for its whole life, so a writer moved in
/// would be stored twice in every connection's task.
pub async fn run<S: AsyncWrite + Unpin>(
    ws: &mut S,
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
    let mut ws = Frames {
        io: ws,
        deflate: handle.deflate,
        metrics,
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
                        match ws.reply(opcode, reply).await {
                            Ok(n) => metrics.sent_bytes.increment(n as u64),
                            Err(_) => break,
                        }
                    }
                }
                handle.direct.handed(1);
                let _ = ws.close(closing.code, &closing.reason).await;
                let _ = ws.io.flush().await;
                return;
            }
            Some(reply) = handle.replies.pop() => {
                taken += 1;
                ws.reply(opcode, reply).await.map(|n| sent_bytes += n)
            }
            Some(out) = handle.messages.pop() => {
                taken += 1;
                accepted.push(out.accepted_us);
                ws.message(opcode, &out).await.map(|n| sent_bytes += n)
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
                ws.write(OpCode::Ping, false, b"").await.map(drop)
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
                result = ws.reply(opcode, reply).await.map(|n| sent_bytes += n);
            } else if let Some(out) = handle.messages.try_pop() {
                taken += 1;
                accepted.push(out.accepted_us);
                result = ws.message(opcode, &out).await.map(|n| sent_bytes += n);
            } else {
                break;
            }
        }
        if result.is_ok() {
            result = ws.io.flush().await;
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

/// The write half with the connection's compression terms: frames the payloads it is given.
struct Frames<'a, S> {
    io: S,
    deflate: Option<Deflate>,
    metrics: &'a Metrics,
}

impl<S: AsyncWrite + Unpin> Frames<'_, S> {
    /// Writes one whole frame; returns the payload bytes written.
    async fn write(&mut self, opcode: OpCode, rsv1: bool, payload: &[u8]) -> io::Result<usize> {
        let (header, len) = frame_header(opcode as u8, rsv1, payload.len());
        self.io.write_all(&header[..len]).await?;
        self.io.write_all(payload).await?;
        Ok(payload.len())
    }

    /// Writes a data message, compressed here when the connection agreed on it, the message is
    /// large enough and nobody compressed it before.
    async fn data(&mut self, opcode: OpCode, deflated: bool, payload: &[u8]) -> io::Result<usize> {
        if deflated {
            return self.write(opcode, true, payload).await;
        }
        let compressed = self
            .deflate
            .filter(|d| d.wants(payload.len()))
            .and_then(|d| d.compress(payload));
        if self.deflate.is_some_and(|d| d.wants(payload.len())) {
            self.metrics.deflated(DeflatePath::Connection).increment(1);
        }
        match compressed {
            Some(compressed) => self.write(opcode, true, &compressed).await,
            None => self.write(opcode, false, payload).await,
        }
    }

    async fn message(&mut self, opcode: OpCode, out: &Outgoing) -> io::Result<usize> {
        self.data(opcode, out.deflated, &out.frame).await
    }

    async fn reply(&mut self, opcode: OpCode, reply: Reply) -> io::Result<usize> {
        match reply {
            Reply::Frame(bytes) => self.data(opcode, false, &bytes).await,
            Reply::Pong(payload) => self.write(OpCode::Pong, false, &payload).await,
            Reply::Data(opcode, bytes) => self.data(opcode, false, &bytes).await,
        }
    }

    /// The close frame: the code, then as much of the reason as a control frame holds.
    async fn close(&mut self, code: u16, reason: &str) -> io::Result<usize> {
        let mut cut = reason.len().min(123);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut payload = Vec::with_capacity(2 + cut);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..cut]);
        self.write(OpCode::Close, false, &payload).await
    }
}
