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

use bytes::Bytes;
use fastwebsockets::OpCode;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::deflate::Deflate;
use super::direct::frame_header;
use super::lazy_buf::LazyBufWriter;
use super::{ConnHandle, Outgoing, Reply};
use crate::clock::unix_us;
use crate::metrics::{DeflatePath, Metrics};
use crate::protocol::Encoding;

/// Frames written per wake-up before flushing, so one busy connection cannot starve the flush.
const BURST: usize = 64;

/// Writes until the connection is closing (after sending the close frame) or the socket fails.
///
/// The task waits on one thing, the connection's wake-up (`DirectWrite::kick`): a queued reply
/// or message, a ping asked for by the replica's keepalive sweep, a close request and the rest
/// of a direct write all notify it. Frames are framed into the buffer without awaiting; only the
/// flush (and a frame too large to buffer, boxed) awaits, so the task stays small while it
/// waits. `ws` is borrowed: an async fn keeps its arguments for its whole life, so a writer moved
/// in would be stored twice in every connection's task.
pub async fn run<W: AsyncWrite + Unpin>(
    ws: &mut LazyBufWriter<W>,
    handle: &ConnHandle,
    metrics: &Metrics,
) {
    let frames = Frames {
        opcode: match handle.encoding {
            Encoding::Json => OpCode::Text,
            Encoding::Msgpack => OpCode::Binary,
        },
        deflate: handle.deflate,
        metrics,
    };
    // Grows on the first burst; an idle connection never allocates it.
    let mut accepted = Vec::new();
    loop {
        if handle.closing().is_some() {
            // Once per connection: boxed, so its awaits take no room in every connection's task.
            Box::pin(close(ws, handle, &frames)).await;
            return;
        }
        // Frames taken for writing since the last flush: once flushed, they are off the books
        // of direct writes (`direct.rs`), which wait while any is pending. Frames this task makes
        // itself (pings, the close frame) are put on the books before they are written.
        let mut taken = 0usize;
        let mut sent_bytes = 0usize;
        let mut result = Ok(());
        // Take what is waiting, replies before messages, then flush once.
        while taken <= BURST && handle.closing().is_none() {
            let (opcode, rsv1, payload, counted) = if let Some(reply) = handle.replies.try_pop() {
                frames.reply(reply)
            } else if let Some(out) = handle.messages.try_pop() {
                accepted.push(out.accepted_us);
                frames.message(out)
            } else if handle.take_ping() {
                handle.direct.handed(1);
                (OpCode::Ping, false, Bytes::new(), false)
            } else {
                break;
            };
            taken += 1;
            if counted {
                sent_bytes += payload.len();
            }
            let (header, len) = frame_header(opcode as u8, rsv1, payload.len());
            if !ws.buffer_frame(&header[..len], &payload) {
                // Too large to buffer: written through, after what is buffered. Rare, so boxed.
                result = Box::pin(write_through(ws, opcode, rsv1, payload)).await;
                if result.is_err() {
                    break;
                }
            }
        }
        if result.is_ok() {
            // Also writes the rest of a direct write, when that is what woke the task.
            result = ws.flush().await;
        }
        if let Err(e) = result {
            handle.close(1000, &e.to_string(), crate::metrics::CloseReason::Error);
            return;
        }
        handle.direct.done(taken);
        metrics.sent_bytes.increment(sent_bytes as u64);
        if !accepted.is_empty() {
            metrics.deliveries.increment(accepted.len() as u64);
            let now = unix_us();
            for at in accepted.drain(..) {
                metrics.delivered_after(at, now);
            }
        }
        if taken == 0 {
            // About to wait: idle queues hold no buffer, nor does the batch list.
            handle.replies.release_idle();
            handle.messages.release_idle();
            accepted = Vec::new();
            handle.direct.kick.notified().await;
        }
    }
}

/// Writes a frame too large for the buffer: what is buffered first, then the frame.
async fn write_through<W: AsyncWrite + Unpin>(
    ws: &mut LazyBufWriter<W>,
    opcode: OpCode,
    rsv1: bool,
    payload: Bytes,
) -> io::Result<()> {
    let (header, len) = frame_header(opcode as u8, rsv1, payload.len());
    ws.write_all(&header[..len]).await?;
    ws.write_all(&payload).await
}

/// The closing handshake's first half: a drained connection's owed replies, then the close
/// frame: the code, then as much of the reason as a control frame holds.
async fn close<W: AsyncWrite + Unpin>(
    ws: &mut LazyBufWriter<W>,
    handle: &ConnHandle,
    frames: &Frames<'_>,
) {
    let closing = handle.closing().expect("closed implies a reason");
    if closing.replies_first {
        // A drained connection: the answers it owed were queued before the close was asked
        // for, so they are all here. Only those: what arrives later is not waited for.
        for _ in 0..handle.replies.len() {
            let Some(reply) = handle.replies.try_pop() else {
                break;
            };
            let (opcode, rsv1, payload, _) = frames.reply(reply);
            match write_through(ws, opcode, rsv1, payload.clone()).await {
                Ok(()) => frames.metrics.sent_bytes.increment(payload.len() as u64),
                Err(_) => break,
            }
        }
    }
    handle.direct.handed(1);
    let reason = &closing.reason;
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&closing.code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    let _ = write_through(ws, OpCode::Close, false, Bytes::from(payload)).await;
    let _ = ws.flush().await;
}

/// The connection's frame terms: its opcode for data and its compression terms.
struct Frames<'a> {
    opcode: OpCode,
    deflate: Option<Deflate>,
    metrics: &'a Metrics,
}

/// A frame to write: opcode, RSV1, payload, and whether the payload counts as sent bytes.
type Frame = (OpCode, bool, Bytes, bool);

impl Frames<'_> {
    /// A data message, compressed here when the connection agreed on it, the message is large
    /// enough and nobody compressed it before.
    fn data(&self, opcode: OpCode, deflated: bool, payload: Bytes) -> Frame {
        if deflated {
            return (opcode, true, payload, true);
        }
        let Some(deflate) = self.deflate.filter(|d| d.wants(payload.len())) else {
            return (opcode, false, payload, true);
        };
        self.metrics.deflated(DeflatePath::Connection).increment(1);
        match deflate.compress(&payload) {
            Some(compressed) => (opcode, true, compressed, true),
            None => (opcode, false, payload, true),
        }
    }

    fn message(&self, out: Outgoing) -> Frame {
        self.data(self.opcode, out.deflated, out.frame)
    }

    fn reply(&self, reply: Reply) -> Frame {
        match reply {
            Reply::Frame(bytes) => self.data(self.opcode, false, bytes),
            Reply::Pong(payload) => (OpCode::Pong, false, Bytes::from(payload), true),
            Reply::Data(opcode, bytes) => self.data(opcode, false, bytes),
        }
    }
}
