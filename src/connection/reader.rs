//! The read side: frames from the client, reassembled within limits, handed to a
//! [`MessageSink`] — the client's session (`crate::session`) or the conformance echo.

use fastwebsockets::OpCode;
use tokio::io::AsyncRead;

use super::assembler::{AssembleError, Assembler};
use super::deflate::{self, InflateError};
use super::frames::{FrameReader, ReadError};
use super::{ConnHandle, Reply};
use crate::config::LimitsConfig;
use crate::metrics::{CloseReason, DeflatePath, Limit, Metrics};

/// What a connection does with each complete message from its client.
pub(crate) trait MessageSink {
    /// Acts on one message (Text or Binary).
    async fn on_message(&mut self, opcode: OpCode, payload: &[u8]);
}

/// Reads until the client closes, the socket fails, or the protocol is broken; records why
/// through [`ConnHandle::close`].
///
/// `frames` is borrowed: an async fn keeps its arguments for its whole life, so a reader moved
/// in would be stored twice in every connection's task.
pub(crate) async fn run<S: AsyncRead + Unpin>(
    frames: &mut FrameReader<S>,
    handle: &ConnHandle,
    limits: &LimitsConfig,
    metrics: &Metrics,
    sink: &mut impl MessageSink,
) {
    // A single frame over the limit fails in the frame reader; the assembler applies the same
    // limit to fragmented messages as a whole.
    let mut assembler = Assembler::new(limits.max_message_bytes);
    loop {
        let frame = match frames.next().await {
            Ok(frame) => frame,
            Err(e) => {
                let (code, why) = match e {
                    ReadError::TooLarge => {
                        metrics.refused(Limit::MessageSize).increment(1);
                        (1009, CloseReason::Protocol)
                    }
                    ReadError::Protocol(_) => (1002, CloseReason::Protocol),
                    ReadError::Eof | ReadError::Io(_) => (1000, CloseReason::Error),
                };
                handle.close(code, &e.to_string(), why);
                return;
            }
        };
        handle.heard();
        if handle.closing().is_some() && frame.opcode != OpCode::Close {
            // Closing: only the client's close frame matters now.
            continue;
        }
        let message = match frame.opcode {
            OpCode::Close => {
                let (code, reason) = close_answer(frame.payload);
                let why = if code == 1002 || code == 1007 {
                    CloseReason::Protocol
                } else {
                    CloseReason::Client
                };
                handle.close(code, reason, why);
                return;
            }
            OpCode::Ping => {
                if !handle.reply_raw(Reply::Pong(frame.payload.to_vec())) {
                    handle.close(1013, "reply queue full", CloseReason::SlowConsumer);
                    return;
                }
                continue;
            }
            OpCode::Pong => continue,
            // An unfragmented message needs no copy (a compressed one is inflated straight from
            // the frame).
            OpCode::Text | OpCode::Binary if frame.fin && !assembler.in_progress() => {
                metrics.received_bytes.increment(frame.payload.len() as u64);
                let whole = (frame.opcode, frame.compressed, frame.payload);
                // Boxed, here and below: the sink's future is as large as the largest frame
                // handling awaits, and inline it would be kept in every connection's task for its
                // whole life; one allocation per message instead.
                if let Err((code, reason)) = Box::pin(take(sink, metrics, limits, whole)).await {
                    handle.close(code, &reason, CloseReason::Protocol);
                    return;
                }
                continue;
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                assembler.push(frame.fin, frame.opcode, frame.compressed, frame.payload)
            }
        };
        let taken = match message {
            Ok(Some(m)) => {
                metrics.received_bytes.increment(m.payload.len() as u64);
                Box::pin(take(
                    sink,
                    metrics,
                    limits,
                    (m.opcode, m.compressed, &m.payload),
                ))
                .await
            }
            Ok(None) => Ok(()),
            Err(e) => Err(match e {
                AssembleError::TooLarge => {
                    metrics.refused(Limit::MessageSize).increment(1);
                    (1009, "message larger than limits.max_message_bytes".into())
                }
                AssembleError::InvalidUtf8 => (1007, "text message is not UTF-8".into()),
                AssembleError::Protocol(what) => (1002, what.into()),
            }),
        };
        if let Err((code, reason)) = taken {
            handle.close(code, &reason, CloseReason::Protocol);
            return;
        }
    }
}

/// Takes one whole message (opcode, compressed, payload): inflates it if compressed, within
/// `limits.max_message_bytes`, then hands it over. `Err` is the close it calls for.
async fn take(
    sink: &mut impl MessageSink,
    metrics: &Metrics,
    limits: &LimitsConfig,
    (opcode, compressed, payload): (OpCode, bool, &[u8]),
) -> Result<(), (u16, String)> {
    if !compressed {
        return hand_over(sink, opcode, payload).await;
    }
    metrics.deflated(DeflatePath::Inbound).increment(1);
    match deflate::inflate(payload, limits.max_message_bytes) {
        Ok(inflated) => hand_over(sink, opcode, &inflated).await,
        Err(e @ InflateError::TooLarge) => {
            metrics.refused(Limit::MessageSize).increment(1);
            Err((1009, e.to_string()))
        }
        Err(e @ InflateError::Invalid) => Err((1007, e.to_string())),
    }
}

/// Hands a whole (inflated) message to the sink once a text message is known to be UTF-8;
/// otherwise the close it calls for.
async fn hand_over(
    sink: &mut impl MessageSink,
    opcode: OpCode,
    payload: &[u8],
) -> Result<(), (u16, String)> {
    if opcode == OpCode::Text && std::str::from_utf8(payload).is_err() {
        return Err((1007, "text message is not UTF-8".into()));
    }
    sink.on_message(opcode, payload).await;
    Ok(())
}

/// The close code to answer a client's close frame with (RFC 6455 §5.5.1, §7.4).
fn close_answer(payload: &[u8]) -> (u16, &'static str) {
    match payload.len() {
        0 => (1000, ""),
        1 => (1002, "close frame with a 1-byte payload"),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !allowed {
                (1002, "invalid close code")
            } else if std::str::from_utf8(&payload[2..]).is_err() {
                (1007, "close reason is not UTF-8")
            } else {
                (code, "")
            }
        }
    }
}

/// The conformance echo: every message goes back unchanged, with backpressure.
pub(crate) struct EchoSink<'a> {
    /// The connection to answer on.
    pub(crate) handle: &'a ConnHandle,
}

impl MessageSink for EchoSink<'_> {
    async fn on_message(&mut self, opcode: OpCode, payload: &[u8]) {
        let bytes = bytes::Bytes::copy_from_slice(payload);
        self.handle.reply_wait(Reply::Data(opcode, bytes)).await;
    }
}
