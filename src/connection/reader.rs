//! The read side: frames from the client, decoded and acted on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, WebSocketError, WebSocketRead};
use tokio::io::AsyncRead;

use super::{ConnHandle, Reply};
use crate::inbound::Event;
use crate::metrics::CloseReason;
use crate::protocol::{self, ClientFrame, ErrorCode, FrameError, ServerFrame};
use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
#[error("reply queue full")]
struct ReplyQueueFull;

/// Reads until the client closes, the socket fails, or the protocol is broken; records why
/// through [`ConnHandle::close`].
pub async fn run<S: AsyncRead + Unpin>(
    mut ws: WebSocketRead<S>,
    handle: &Arc<ConnHandle>,
    state: &AppState,
    last_seen: &AtomicU64,
    started: Instant,
) {
    // Close frames are validated and answered here (the writer sends the answer), not by the
    // library, which answers some invalid close frames with 1000.
    ws.set_auto_close(false);
    ws.set_auto_pong(true);
    // A frame over the limit fails the read with FrameTooLarge, answered below with 1009.
    ws.set_max_message_size(state.config.server.max_frame_bytes);
    let mut ws = FragmentCollectorRead::new(ws);
    loop {
        let frame = ws
            .read_frame(&mut |pong: Frame<'_>| {
                // The library answers pings itself; a ping still proves the client is alive.
                last_seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                let queued = handle.reply_raw(Reply::Pong(pong.payload.to_vec()));
                async move {
                    if queued {
                        Ok(())
                    } else {
                        Err(ReplyQueueFull)
                    }
                }
            })
            .await;
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                let (code, why) = match e {
                    WebSocketError::FrameTooLarge => (1009, CloseReason::Protocol),
                    WebSocketError::InvalidUTF8 => (1007, CloseReason::Protocol),
                    WebSocketError::UnexpectedEOF
                    | WebSocketError::IoError(_)
                    | WebSocketError::ConnectionClosed => (1000, CloseReason::Error),
                    WebSocketError::SendError(_) => (1013, CloseReason::SlowConsumer),
                    _ => (1002, CloseReason::Protocol),
                };
                handle.close(code, &e.to_string(), why);
                return;
            }
        };
        last_seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        if handle.closing().is_some() && frame.opcode != OpCode::Close {
            // Closing: only the client's close frame matters now.
            continue;
        }
        if matches!(frame.opcode, OpCode::Text | OpCode::Binary) {
            state
                .metrics
                .received_bytes
                .increment(frame.payload.len() as u64);
        }
        match frame.opcode {
            OpCode::Text => on_frame(protocol::decode_json(&frame.payload), handle, state),
            OpCode::Binary => on_frame(protocol::decode_msgpack(&frame.payload), handle, state),
            OpCode::Close => {
                let (code, reason) = close_answer(&frame.payload);
                handle.close(code, reason, CloseReason::Client);
                return;
            }
            OpCode::Ping | OpCode::Pong | OpCode::Continuation => {}
        }
    }
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

fn on_frame(decoded: Result<ClientFrame, FrameError>, handle: &Arc<ConnHandle>, state: &AppState) {
    let result = match decoded {
        Ok(frame) => act(frame, handle, state),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        state.metrics.rejected(e.code).increment(1);
        handle.reply(&ServerFrame::Error {
            id: e.id.as_ref(),
            code: e.code.as_str(),
            message: &e.message,
        });
    }
}

fn act(frame: ClientFrame, handle: &Arc<ConnHandle>, state: &AppState) -> Result<(), FrameError> {
    match frame {
        ClientFrame::Send {
            stream,
            data,
            encoding,
            id,
        } => state.inbound.send(handle, stream, data, encoding, id),
        ClientFrame::Subscribe { channel, since, id } => {
            if !handle.identity.may_join(&channel) {
                return Err(FrameError::new(
                    id,
                    ErrorCode::ChannelNotAllowed,
                    format!("the token's channels claim does not allow `{channel}`"),
                ));
            }
            if state.registry.subscribe(handle, &channel) {
                state.inbound.event(handle, Event::Subscribe(&channel));
            }
            // No history is kept yet, so a resume request cannot be honoured: say so.
            handle.reply(&ServerFrame::Subscribed {
                channel: &channel,
                id: id.as_ref(),
                recovered: since.map(|_| false),
            });
            Ok(())
        }
        ClientFrame::Unsubscribe { channel, id } => {
            if state.registry.unsubscribe(handle, &channel) {
                state.inbound.event(handle, Event::Unsubscribe(&channel));
            }
            handle.reply(&ServerFrame::Unsubscribed {
                channel: &channel,
                id: id.as_ref(),
            });
            Ok(())
        }
    }
}
