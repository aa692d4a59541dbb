//! A buffered writer that holds memory only while it has something to write.
//!
//! The writer task batches every frame waiting in a connection's queues into one flush (one
//! syscall). `tokio::io::BufWriter` would do that with an 8 KiB buffer allocated up front and
//! kept for the life of the connection, which is most of an idle connection's memory. This one
//! allocates on the first write of a batch, grows to what the batch needs, and frees the buffer
//! once a flush has written it all: an idle connection holds no write buffer.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

/// Writes above this size flush what is buffered and go straight to the socket.
const MAX_BUFFERED: usize = 64 * 1024;

/// Buffers writes until [`AsyncWrite::poll_flush`].
pub struct LazyBufWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// How much of `buf` the socket has taken during the current flush.
    written: usize,
}

impl<W: AsyncWrite + Unpin> LazyBufWriter<W> {
    /// Wraps `inner`; nothing is allocated until something is written.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
        }
    }

    /// Appends a frame (its header and payload) to the buffer without writing anything; false,
    /// and nothing appended, when that would take the buffer past `MAX_BUFFERED`: the caller
    /// writes it through [`AsyncWrite`] instead.
    pub fn buffer_frame(&mut self, header: &[u8], payload: &[u8]) -> bool {
        if self.buf.len() + header.len() + payload.len() > MAX_BUFFERED {
            return false;
        }
        self.buf.reserve(header.len() + payload.len());
        self.buf.extend_from_slice(header);
        self.buf.extend_from_slice(payload);
        true
    }

    /// Writes out the buffer; frees it when all of it went.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for LazyBufWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() + data.len() > MAX_BUFFERED {
            ready!(this.poll_drain(cx))?;
            if data.len() > MAX_BUFFERED {
                return Pin::new(&mut this.inner).poll_write(cx, data);
            }
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.buf.len() + total > MAX_BUFFERED {
            ready!(this.poll_drain(cx))?;
            if total > MAX_BUFFERED {
                return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
            }
        }
        this.buf.reserve(total);
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_arrive_in_order_only_after_flush_and_the_buffer_is_freed() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = LazyBufWriter::new(a);
        assert_eq!(w.buf.capacity(), 0);
        w.write_all(b"hello ").await.unwrap();
        let n = w
            .write_vectored(&[io::IoSlice::new(b"wor"), io::IoSlice::new(b"ld")])
            .await
            .unwrap();
        assert_eq!(n, 5, "a vectored write is taken whole");
        assert!(w.buf.capacity() > 0);
        // Nothing reached the peer before the flush; the duplex buffer is smaller than what
        // follows, so the flush has to wait for the reader in between.
        let big = vec![7u8; 3000];
        w.write_all(&big).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 11 + 3000];
            b.read_exact(&mut got).await.unwrap();
            got
        });
        w.flush().await.unwrap();
        assert_eq!(w.buf.capacity(), 0, "freed after the flush");
        let got = reader.await.unwrap();
        assert_eq!(&got[..11], b"hello world");
        assert!(got[11..].iter().all(|b| *b == 7));
    }
}
