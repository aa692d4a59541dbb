//! Watches the bytes a client sends for unmasked frames, which RFC 6455 §5.1 requires a server
//! to refuse (close with 1002). fastwebsockets unmasks frames but does not tell whether a frame
//! was masked, so this reader follows the frame headers in the byte stream on its way to the
//! parser and records the first unmasked one.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Where the parser of the header stream is.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Reading the 2 fixed header bytes (how many seen so far).
    Fixed(u8),
    /// Reading the extended length (bytes left) of a frame masked or not.
    Length { left: u8, len: u64, masked: bool },
    /// Skipping the 4-byte mask key.
    Key { left: u8, len: u64 },
    /// Skipping the payload.
    Payload(u64),
}

/// An `AsyncRead` that passes bytes through unchanged and flags unmasked frames.
pub struct MaskCheck<R> {
    inner: R,
    state: State,
    unmasked: Arc<AtomicBool>,
}

impl<R> MaskCheck<R> {
    /// Wraps `inner`; `unmasked` becomes true at the first unmasked frame header.
    pub fn new(inner: R, unmasked: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            state: State::Fixed(0),
            unmasked,
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Fixed(0) => {
                    self.state = State::Fixed(1);
                    bytes = &bytes[1..];
                }
                State::Fixed(_) => {
                    let second = bytes[0];
                    bytes = &bytes[1..];
                    let masked = second & 0x80 != 0;
                    if !masked {
                        self.unmasked.store(true, Ordering::Release);
                    }
                    self.state = match second & 0x7f {
                        126 => State::Length {
                            left: 2,
                            len: 0,
                            masked,
                        },
                        127 => State::Length {
                            left: 8,
                            len: 0,
                            masked,
                        },
                        n => Self::after_length(u64::from(n), masked),
                    };
                }
                State::Length { left, len, masked } => {
                    let len = (len << 8) | u64::from(bytes[0]);
                    bytes = &bytes[1..];
                    self.state = if left > 1 {
                        State::Length {
                            left: left - 1,
                            len,
                            masked,
                        }
                    } else {
                        Self::after_length(len, masked)
                    };
                }
                State::Key { left, len } => {
                    let take = usize::from(left).min(bytes.len());
                    bytes = &bytes[take..];
                    let left = left - take as u8;
                    self.state = if left > 0 {
                        State::Key { left, len }
                    } else {
                        Self::payload(len)
                    };
                }
                State::Payload(left) => {
                    let take = (left.min(bytes.len() as u64)) as usize;
                    bytes = &bytes[take..];
                    self.state = Self::payload(left - take as u64);
                }
            }
        }
    }

    fn after_length(len: u64, masked: bool) -> State {
        if masked {
            State::Key { left: 4, len }
        } else {
            Self::payload(len)
        }
    }

    fn payload(len: u64) -> State {
        if len == 0 {
            State::Fixed(0)
        } else {
            State::Payload(len)
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for MaskCheck<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if result.is_ready() {
            this.observe(&buf.filled()[before..]);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(stream: &[u8], chunk: usize) -> bool {
        let flag = Arc::new(AtomicBool::new(false));
        let mut m = MaskCheck::new((), flag.clone());
        for part in stream.chunks(chunk) {
            m.observe(part);
        }
        flag.load(Ordering::Acquire)
    }

    fn frame(masked: bool, len: usize) -> Vec<u8> {
        let mut f = vec![0x81];
        let bit = if masked { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(bit | len as u8),
            126..=65535 => {
                f.push(bit | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(bit | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0x80u8, len));
        f
    }

    #[test]
    fn masked_streams_pass_and_an_unmasked_frame_is_seen_in_any_chunking() {
        let mut masked = Vec::new();
        for len in [0, 5, 125, 126, 300, 70_000] {
            masked.extend(frame(true, len));
        }
        for chunk in [1, 3, 7, 4096] {
            assert!(!check(&masked, chunk), "chunk {chunk}");
            let mut bad = masked.clone();
            bad.extend(frame(false, 10));
            assert!(check(&bad, chunk), "chunk {chunk}");
        }
    }
}
