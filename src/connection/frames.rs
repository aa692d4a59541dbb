//! The WebSocket frame reader (RFC 6455 §5.2, server side).
//!
//! Holds no buffer while the client is quiet: bytes are read into a stack buffer, and only what
//! is not yet a whole frame is kept on the heap, in a buffer freed as soon as every frame in it
//! has been handed out. An idle connection costs no read buffer at all (fastwebsockets keeps
//! 8 KiB per connection for its life; see BENCHMARKS.md).
//!
//! Every rule of the frame layer a server must enforce is checked here, each with the close
//! code it calls for: client frames must be masked, reserved bits must be clear (RSV1 only on
//! the first frame of a compressed message, when permessage-deflate was agreed), opcodes must be known, control frames must be whole and at most 125 bytes,
//! and a frame may not exceed the configured message size.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use fastwebsockets::OpCode;
use tokio::io::{AsyncRead, ReadBuf};

/// Bytes read per `read` call when no frame larger than this is pending.
const CHUNK: usize = 4096;

/// One frame, unmasked, borrowed from the reader until the next call.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The FIN bit: the last frame of its message.
    pub fin: bool,
    /// The RSV1 bit: the message this frame starts is compressed (permessage-deflate).
    pub compressed: bool,
    /// What the frame carries.
    pub opcode: OpCode,
    /// The payload, unmasked.
    pub payload: &'a [u8],
}

/// Why no frame could be read; each maps to how the connection ends.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client broke the frame layer (close 1002).
    #[error("{0}")]
    Protocol(&'static str),
    /// A frame larger than the limit (close 1009).
    #[error("frame larger than limits.max_message_bytes")]
    TooLarge,
    /// The connection ended, cleanly between frames or not.
    #[error("connection ended")]
    Eof,
    /// The socket failed.
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// What a frame header says, once all of it has arrived.
struct Header {
    fin: bool,
    compressed: bool,
    opcode: OpCode,
    mask: [u8; 4],
    /// Header bytes, mask key included.
    len: usize,
    payload: usize,
}

/// Reads frames from a client's byte stream. Cancel-safe: bytes read are kept in `self`
/// before any await point can be abandoned.
pub struct FrameReader<R> {
    io: R,
    /// Bytes received and not yet handed out; empty (and unallocated) between bursts.
    buf: Vec<u8>,
    /// How many bytes of `buf` the frame handed out last occupies; dropped on the next call.
    handed: usize,
    max_payload: usize,
    /// Whether permessage-deflate was agreed: RSV1 may then start a compressed message.
    deflate: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader refusing frames whose payload exceeds `max_payload` bytes; `deflate` when
    /// permessage-deflate was agreed.
    pub fn new(io: R, max_payload: usize, deflate: bool) -> Self {
        Self {
            io,
            buf: Vec::new(),
            handed: 0,
            max_payload,
            deflate,
        }
    }

    /// The next frame, unmasked.
    ///
    /// # Errors
    /// [`ReadError`]: the connection is over once one is returned.
    pub async fn next(&mut self) -> Result<Frame<'_>, ReadError> {
        self.buf.drain(..self.handed);
        self.handed = 0;
        if self.buf.is_empty() {
            // Frees the allocation: a quiet connection holds no read buffer.
            self.buf = Vec::new();
        }
        let header = loop {
            match parse(&self.buf, self.max_payload, self.deflate)? {
                Some(h) if self.buf.len() >= h.len + h.payload => break h,
                Some(h) => {
                    let missing = h.len + h.payload - self.buf.len();
                    poll_fn(|cx| self.poll_fill(cx, missing)).await?;
                }
                None => {
                    poll_fn(|cx| self.poll_fill(cx, 1)).await?;
                }
            }
        };
        let end = header.len + header.payload;
        let payload = &mut self.buf[header.len..end];
        fastwebsockets::unmask(payload, header.mask);
        self.handed = end;
        Ok(Frame {
            fin: header.fin,
            compressed: header.compressed,
            opcode: header.opcode,
            payload: &self.buf[header.len..end],
        })
    }

    /// Reads once. Frames larger than [`CHUNK`] are read straight into `buf`; anything smaller
    /// goes through a stack buffer so that `buf` grows only by what arrived.
    fn poll_fill(&mut self, cx: &mut Context<'_>, missing: usize) -> Poll<Result<(), ReadError>> {
        let read = if missing > CHUNK {
            let filled = self.buf.len();
            self.buf.resize(filled + missing, 0);
            let mut rb = ReadBuf::new(&mut self.buf[filled..]);
            let polled = Pin::new(&mut self.io).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            self.buf.truncate(filled + n);
            match polled {
                Poll::Ready(Ok(())) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        } else {
            let mut stack = [MaybeUninit::<u8>::uninit(); CHUNK];
            let mut rb = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    self.buf.extend_from_slice(rb.filled());
                    rb.filled().len()
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        };
        Poll::Ready(if read == 0 {
            Err(ReadError::Eof)
        } else {
            Ok(())
        })
    }
}

/// Parses the frame header at the start of `buf`: `None` until all of it has arrived.
fn parse(buf: &[u8], max_payload: usize, deflate: bool) -> Result<Option<Header>, ReadError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let compressed = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (compressed && !deflate) {
        return Err(ReadError::Protocol(
            "reserved bits set: no extension was agreed",
        ));
    }
    let opcode = match b0 & 0x0f {
        0 => OpCode::Continuation,
        1 => OpCode::Text,
        2 => OpCode::Binary,
        8 => OpCode::Close,
        9 => OpCode::Ping,
        10 => OpCode::Pong,
        _ => return Err(ReadError::Protocol("unknown opcode")),
    };
    // RFC 7692 §6.1: RSV1 marks the first frame of a compressed data message, nothing else.
    if compressed && !matches!(opcode, OpCode::Text | OpCode::Binary) {
        return Err(ReadError::Protocol(
            "RSV1 set on a control or continuation frame",
        ));
    }
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("client frames must be masked"));
    }
    let control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
    if control && !fin {
        return Err(ReadError::Protocol("control frame fragmented"));
    }
    let (extended, short) = match b1 & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let len = 2 + extended + 4;
    if buf.len() < len {
        return Ok(None);
    }
    let payload = match short {
        Some(n) => n,
        None => buf[2..2 + extended]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
    };
    if control && payload > 125 {
        return Err(ReadError::Protocol("control frame longer than 125 bytes"));
    }
    // A length with its top bit set (forbidden by §5.2) is over any limit too: refused as such.
    let payload = usize::try_from(payload).map_err(|_| ReadError::TooLarge)?;
    if payload > max_payload {
        return Err(ReadError::TooLarge);
    }
    let mut mask = [0; 4];
    mask.copy_from_slice(&buf[2 + extended..len]);
    Ok(Some(Header {
        fin,
        compressed,
        opcode,
        mask,
        len,
        payload,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        let len = payload.len();
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        let mask = [7, 0x55, 0xaa, 200];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Feeds `bytes` in `chunk`-sized reads and collects (fin, opcode, payload) until the end.
    async fn read_all(
        bytes: Vec<u8>,
        chunk: usize,
        max: usize,
    ) -> (Vec<(bool, u8, Vec<u8>)>, ReadError) {
        read_frames(bytes, chunk, max, false)
            .await
            .map_frames(|(fin, _, op, p)| (fin, op, p))
    }

    trait MapFrames<T> {
        fn map_frames<U>(self, f: impl FnMut(T) -> U) -> (Vec<U>, ReadError);
    }

    impl<T> MapFrames<T> for (Vec<T>, ReadError) {
        fn map_frames<U>(self, f: impl FnMut(T) -> U) -> (Vec<U>, ReadError) {
            (self.0.into_iter().map(f).collect(), self.1)
        }
    }

    /// Like `read_all`, with the RSV1 bit of each frame, on a connection that agreed on
    /// permessage-deflate or not.
    async fn read_frames(
        bytes: Vec<u8>,
        chunk: usize,
        max: usize,
        deflate: bool,
    ) -> (Vec<(bool, bool, u8, Vec<u8>)>, ReadError) {
        let (mut tx, rx) = tokio::io::duplex(chunk);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in bytes.chunks(chunk) {
                if tx.write_all(part).await.is_err() {
                    return;
                }
            }
        });
        let mut reader = FrameReader::new(rx, max, deflate);
        let mut frames = Vec::new();
        let end = loop {
            match reader.next().await {
                Ok(f) => frames.push((f.fin, f.compressed, f.opcode as u8, f.payload.to_vec())),
                Err(e) => break e,
            }
        };
        writer.abort();
        (frames, end)
    }

    #[tokio::test]
    async fn frames_of_every_length_class_arrive_whole_in_any_chunking() {
        let big = vec![0x42u8; 70_000];
        // Byte-by-byte reads of the 70 kB frame would take the test minutes in a debug build.
        for (chunk, big_len) in [(1, 1_000), (3, 1_000), (997, 70_000), (100_000, 70_000)] {
            let mut stream = Vec::new();
            stream.extend(frame(0x81, b"hello"));
            stream.extend(frame(0x02, &big[..300]));
            stream.extend(frame(0x80, &big[..big_len]));
            stream.extend(frame(0x89, b""));
            let (frames, end) = read_all(stream, chunk, 1 << 20).await;
            assert!(matches!(end, ReadError::Eof), "chunk {chunk}: {end}");
            let got: Vec<_> = frames
                .iter()
                .map(|(fin, op, p)| (*fin, *op, p.len()))
                .collect();
            assert_eq!(
                got,
                [
                    (true, 1, 5),
                    (false, 2, 300),
                    (true, 0, big_len),
                    (true, 9, 0)
                ],
                "chunk {chunk}"
            );
            assert_eq!(frames[0].2, b"hello");
            assert!(frames[2].2.iter().all(|&b| b == 0x42));
        }
    }

    #[tokio::test]
    async fn each_broken_rule_is_named() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        let cases: [(Vec<u8>, &str); 6] = [
            (unmasked, "client frames must be masked"),
            (
                frame(0xc1, b"x"),
                "reserved bits set: no extension was agreed",
            ),
            (frame(0x83, b"x"), "unknown opcode"),
            (frame(0x09, b"x"), "control frame fragmented"),
            (
                frame(0x89, &[0; 126]),
                "control frame longer than 125 bytes",
            ),
            (
                frame(0x82, &[0; 200]),
                "frame larger than limits.max_message_bytes",
            ),
        ];
        for (bytes, why) in cases {
            let mut stream = frame(0x81, b"ok");
            stream.extend(bytes);
            let (frames, end) = read_all(stream, 4096, 150).await;
            assert_eq!(frames.len(), 1, "{why}: the good frame before it is read");
            assert_eq!(end.to_string(), why);
        }
    }

    #[tokio::test]
    async fn rsv1_starts_a_compressed_message_only_where_deflate_was_agreed() {
        let mut stream = frame(0xc1, b"x");
        stream.extend(frame(0x42, b"y"));
        stream.extend(frame(0x80, b"z"));
        let (frames, end) = read_frames(stream, 4096, 150, true).await;
        assert!(matches!(end, ReadError::Eof));
        let bits: Vec<_> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(bits, [(true, true, 1), (false, true, 2), (true, false, 0)]);
        for (bytes, why) in [
            (
                frame(0xc0, b"x"),
                "RSV1 set on a control or continuation frame",
            ),
            (
                frame(0xc9, b"x"),
                "RSV1 set on a control or continuation frame",
            ),
            (
                frame(0xa1, b"x"),
                "reserved bits set: no extension was agreed",
            ),
        ] {
            let (frames, end) = read_frames(bytes, 4096, 150, true).await;
            assert!(frames.is_empty());
            assert_eq!(end.to_string(), why);
        }
    }

    #[tokio::test]
    async fn a_frame_of_exactly_the_limit_is_taken() {
        let (frames, end) = read_all(frame(0x82, &[1; 150]), 4096, 150).await;
        assert!(matches!(end, ReadError::Eof));
        assert_eq!(frames[0].2.len(), 150);
    }
}
