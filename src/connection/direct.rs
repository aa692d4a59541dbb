//! Direct writes: the dispatcher writes a message straight to the client's socket when nothing
//! else is waiting to be written there, instead of queueing it and waking the connection's
//! writer task. One message to one idle client then costs one `write` and no task switch;
//! anything that does not fit that case takes the queue as before.
//!
//! Frames must reach the socket whole and in order. Three rules keep them so:
//! - every write to the socket, by the writer task or by the dispatcher, happens under
//!   [`DirectWrite`]'s lock, so two writes never interleave within a syscall;
//! - `inflight` counts the frames handed to the writer task (queued, buffered, or being
//!   flushed) that are not yet entirely on the socket; the dispatcher writes directly only when
//!   it is 0, so a direct write never overtakes, or lands inside, the writer's frames;
//! - when the socket takes only part of a direct write, the rest is parked in the lock
//!   (`partial`, counted in `inflight`) and the writer task is woken; the writer task writes it
//!   before any byte of its own.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::protocol::Encoding;

/// The shared half of a connection's write path.
#[derive(Default)]
pub struct DirectWrite {
    gate: Mutex<Gate>,
    /// Frames handed to the writer task and not yet entirely written.
    inflight: AtomicUsize,
    /// Wakes the writer task to finish a partial direct write.
    pub kick: Notify,
}

#[derive(Default)]
struct Gate {
    /// The socket, while the connection runs; `None` before and after.
    socket: Option<Arc<OwnedWriteHalf>>,
    /// The unwritten rest of a direct write.
    partial: Option<Bytes>,
}

/// Frames on the books of direct writes, on their way into a queue. Dropped, it takes them off
/// again (the push failed); [`Handed::queued`] leaves them to the writer task, which takes them
/// off once they are written. So no exit path can leave the count unbalanced.
#[must_use = "dropping the guard takes the frames off the books at once"]
pub struct Handed<'a> {
    direct: &'a DirectWrite,
    frames: usize,
}

impl Handed<'_> {
    /// The frames are queued: the writer task accounts for them from now on.
    pub fn queued(mut self) {
        self.frames = 0;
    }
}

impl Drop for Handed<'_> {
    fn drop(&mut self) {
        if self.frames > 0 {
            self.direct.done(self.frames);
        }
    }
}

/// What became of a direct write.
pub enum Direct {
    /// On the socket (or its rest parked for the writer task): delivered.
    Written,
    /// Not attempted, or the socket is full: queue it.
    Busy,
    /// The socket failed.
    Failed(io::Error),
}

impl DirectWrite {
    /// Makes direct writes possible on `socket`.
    pub fn attach(&self, socket: Arc<OwnedWriteHalf>) {
        self.gate.lock().expect("write gate").socket = Some(socket);
    }

    /// Ends direct writes and drops this hold on the socket.
    pub fn detach(&self) {
        let mut gate = self.gate.lock().expect("write gate");
        gate.socket = None;
        gate.partial = None;
    }

    /// Puts `frames` on the books before they are queued for the writer task: direct writes
    /// wait from now on. The guard takes them off again when dropped, unless
    /// [`Handed::queued`] says the writer task has them.
    pub fn hand(&self, frames: usize) -> Handed<'_> {
        self.handed(frames);
        Handed {
            direct: self,
            frames,
        }
    }

    /// Frames the writer task makes itself (pings, the close frame), on the books before it
    /// writes them.
    pub(super) fn handed(&self, frames: usize) {
        self.inflight.fetch_add(frames, Ordering::AcqRel);
    }

    /// Frames the writer task has entirely written.
    pub(super) fn done(&self, frames: usize) {
        self.inflight.fetch_sub(frames, Ordering::AcqRel);
    }

    /// Frames on the books now.
    #[cfg(test)]
    pub(super) fn on_books(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Writes a whole encoded frame now if nothing else is waiting to be written.
    pub fn try_write(&self, frame: &Bytes) -> Direct {
        if self.inflight.load(Ordering::Acquire) != 0 {
            return Direct::Busy;
        }
        let mut gate = self.gate.lock().expect("write gate");
        if gate.partial.is_some() || self.inflight.load(Ordering::Acquire) != 0 {
            return Direct::Busy;
        }
        let Some(socket) = gate.socket.as_ref() else {
            return Direct::Busy;
        };
        match socket.try_write(frame) {
            Ok(n) if n == frame.len() => Direct::Written,
            Ok(n) => {
                gate.partial = Some(frame.slice(n..));
                // The writer task writes the rest, and takes it off the books with its own.
                self.handed(1);
                self.kick.notify_one();
                Direct::Written
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Direct::Busy,
            Err(e) => Direct::Failed(e),
        }
    }
}

/// The writer task's socket: writes under the gate, after any parked rest of a direct write.
pub struct SocketWrite<'a> {
    socket: Arc<OwnedWriteHalf>,
    direct: &'a DirectWrite,
}

impl<'a> SocketWrite<'a> {
    pub fn new(socket: Arc<OwnedWriteHalf>, direct: &'a DirectWrite) -> Self {
        Self { socket, direct }
    }

    /// Writes `data` (or, with `None`, only the parked rest) under the gate.
    fn poll_gated(&self, cx: &mut Context<'_>, data: Option<&[u8]>) -> Poll<io::Result<usize>> {
        loop {
            let mut gate = self.direct.gate.lock().expect("write gate");
            let blocked = loop {
                let Some(rest) = gate.partial.as_mut() else {
                    break false;
                };
                match self.socket.try_write(rest) {
                    Ok(n) => {
                        rest.advance(n);
                        if rest.is_empty() {
                            gate.partial = None;
                            self.direct.done(1);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            };
            if !blocked {
                let Some(data) = data else {
                    return Poll::Ready(Ok(0));
                };
                match self.socket.try_write(data) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            drop(gate);
            // WouldBlock cleared the readiness: this waits for the socket to drain.
            ready!(AsRef::<tokio::net::TcpStream>::as_ref(&*self.socket).poll_write_ready(cx))?;
        }
    }
}

impl AsyncWrite for SocketWrite<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_gated(cx, Some(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_gated(cx, None).map_ok(|_| ())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The write side shuts down when the connection ends and the socket is dropped.
        self.poll_flush(cx)
    }
}

/// The header of an unmasked server frame with FIN set (RFC 6455 §5.2): the first `.1` bytes of
/// `.0`. `rsv1` marks a compressed message (RFC 7692 §6).
pub fn frame_header(opcode: u8, rsv1: bool, len: usize) -> ([u8; 10], usize) {
    let mut header = [0u8; 10];
    header[0] = 0x80 | if rsv1 { 0x40 } else { 0 } | opcode;
    let used = match len {
        n if n < 126 => {
            header[1] = n as u8;
            2
        }
        n if n <= 0xFFFF => {
            header[1] = 126;
            header[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            4
        }
        n => {
            header[1] = 127;
            header[2..10].copy_from_slice(&(n as u64).to_be_bytes());
            10
        }
    };
    (header, used)
}

/// Encodes a whole unmasked server frame (FIN set) in the frame type of `encoding` (text for
/// JSON, binary for MessagePack; RFC 6455 §5.2): header, then `payload`; with RSV1 when
/// `compressed` (permessage-deflate).
pub fn server_frame(encoding: Encoding, payload: &[u8], compressed: bool) -> Bytes {
    let opcode = match encoding {
        Encoding::Json => 0x1,
        Encoding::Msgpack => 0x2,
    };
    let (header, len) = frame_header(opcode, compressed, payload.len());
    let mut out = Vec::with_capacity(payload.len() + len);
    out.extend_from_slice(&header[..len]);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_have_the_rfc_6455_header() {
        assert_eq!(
            &server_frame(Encoding::Json, b"hi", false)[..],
            b"\x81\x02hi"
        );
        assert_eq!(
            &server_frame(Encoding::Json, b"hi", true)[..],
            b"\xc1\x02hi"
        );
        let f = server_frame(Encoding::Msgpack, &[0u8; 300], false);
        assert_eq!(&f[..4], &[0x82, 126, 1, 44]);
        assert_eq!(f.len(), 304);
        let f = server_frame(Encoding::Json, &vec![b'x'; 70_000], false);
        assert_eq!(&f[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn a_handed_frame_is_off_the_books_when_its_guard_drops_unless_queued() {
        let direct = DirectWrite::default();
        let books = |d: &DirectWrite| d.inflight.load(Ordering::Acquire);
        drop(direct.hand(2));
        assert_eq!(
            books(&direct),
            0,
            "a push that failed leaves nothing on the books"
        );
        direct.hand(3).queued();
        assert_eq!(books(&direct), 3, "queued frames wait for the writer task");
        direct.done(3);
        assert_eq!(books(&direct), 0);
    }
}
