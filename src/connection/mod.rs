//! One WebSocket connection's socket: a reader task body and a writer task body joined by a
//! supervisor ([`drive`]). What the client's frames mean is the session's business
//! (`crate::session`); this module reads and writes frames, and holds the connection's shared
//! half ([`ConnHandle`]: its queues, channel set, resume cursors and close request).
//!
//! The reader parses frames itself (`frames.rs`) and the writer frames what it sends
//! (`writer.rs`); fastwebsockets only does the upgrade handshake. permessage-deflate
//! (`deflate.rs`) is agreed in the handshake and holds no state per connection.
//! The reader is only dropped once the connection is closing. The writer owns the write
//! half and everything sent to the client goes through it — messages, replies, pongs, pings and the
//! close frame — so frames are never interleaved.

mod assembler;
pub mod deflate;
mod direct;
mod expiry;
mod frames;
mod handle;
mod lazy_buf;
mod queue;
mod reader;
mod writer;

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{FusedFuture, FutureExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub use direct::server_frame;
pub use expiry::Expiries;
pub(crate) use expiry::Expiry;
pub use handle::{Closing, ConnHandle, Membership, Outgoing, OwedAnswer, Reply};

use reader::EchoSink;
pub(crate) use reader::MessageSink;

use crate::auth::Identity;
use crate::config::LimitsConfig;
use crate::metrics::{CloseReason, DropReason, Metrics};
use crate::protocol::Encoding;

/// How long a closing connection may take to hear the client's close frame once ours is sent.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long our close frame may wait behind what the socket still holds. A slow consumer is
/// closed because it does not read: its socket buffers are full, and the close frame (1013)
/// leaves only as the client reads what is ahead of it. Dropping the socket sooner would end the
/// connection without a close frame (a reset, 1006 in a browser) for a client that is merely
/// slow; a client that reads nothing for this long is reset.
const CLOSE_WRITE_GRACE: Duration = Duration::from_secs(10);

/// Runs the reader and the writer of one connection until it closes, including the closing
/// handshake: the writer sends our close frame (within [`CLOSE_WRITE_GRACE`]), then the reader
/// waits for the client's (within [`CLOSE_GRACE`]).
pub(crate) async fn drive(
    io: TokioIo<Upgraded>,
    handle: &ConnHandle,
    limits: &LimitsConfig,
    metrics: &Metrics,
    sink: &mut impl MessageSink,
) {
    // The listener serves plain TCP (http.rs), so the upgraded connection is a TcpStream: take
    // it back, with whatever hyper read past the handshake, for direct writes (direct.rs).
    let Some((stream, pre)) = take_tcp(io) else {
        tracing::error!("upgraded connection is not a TCP stream; closing it");
        handle.close(1011, "", CloseReason::Error);
        return;
    };
    let (read_half, write_half) = stream.into_split();
    let read_half = std::io::Cursor::new(pre).chain(read_half);
    let write_half = Arc::new(write_half);
    handle.direct.attach(write_half.clone());
    let mut frames = frames::FrameReader::new(
        read_half,
        limits.max_message_bytes,
        handle.deflate.is_some(),
    );
    let mut ws_write =
        lazy_buf::LazyBufWriter::new(direct::SocketWrite::new(write_half, &handle.direct));
    let mut reader = pin!(reader::run(&mut frames, handle, limits, metrics, sink).fuse());
    let mut writer = pin!(writer::run(&mut ws_write, handle, metrics).fuse());

    tokio::select! {
        _ = &mut reader => {}
        _ = &mut writer => {}
        _ = handle.close_requested() => {}
    }
    // Whatever ended first has said why; this only fills in when nothing did.
    handle.close(1000, "", CloseReason::Error);
    // Let the writer send the close frame, then wait for the client's close frame, within reason.
    if !writer.is_terminated() {
        let _ = tokio::time::timeout(CLOSE_WRITE_GRACE, &mut writer).await;
    }
    if !reader.is_terminated() {
        let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
    }
    // The socket closes when the writer (dropped on return) and the handle let go of it.
    handle.direct.detach();
    handle.replies.close();
    // Messages still queued when the connection ended were not delivered: counted as such.
    let undelivered = handle.messages.close();
    metrics
        .dropped(DropReason::Closed)
        .increment(undelivered as u64);
}

/// The TCP stream under an upgraded connection, and a copy of the bytes hyper read past the
/// handshake. A copy, because hyper's `read_buf` shares its whole read buffer (kilobytes) for as
/// long as it lives; hyper's parts are dropped here, not kept for the life of the connection.
fn take_tcp(io: TokioIo<Upgraded>) -> Option<(TcpStream, bytes::Bytes)> {
    let parts = io.into_inner().downcast::<TokioIo<TcpStream>>().ok()?;
    let pre = bytes::Bytes::copy_from_slice(&parts.read_buf);
    Some((parts.io.into_inner(), pre))
}

/// Echoes every message back on an upgraded connection, through the same socket layer the
/// gateway uses (framing, fragment assembly, limits, close handshake; no pings: those come from
/// the replica's keepalive sweep).
///
/// For RFC 6455 and RFC 7692 conformance testing only (`examples/autobahn_echo.rs` runs the
/// Autobahn TestSuite against it); `deflate` is what [`deflate::negotiate`] agreed, if
/// anything. The `wsbridge` binary never routes a request here.
pub async fn echo(io: TokioIo<Upgraded>, limits: LimitsConfig, deflate: Option<deflate::Deflate>) {
    let metrics = Metrics::new(&[]);
    let handle = ConnHandle::new(
        0,
        Arc::from("echo"),
        Identity::default(),
        Encoding::Json,
        deflate,
        16,
        1024,
        crate::config::QueueFullPolicy::Drop,
        metrics.clone(),
    );
    let mut sink = EchoSink { handle: &handle };
    drive(io, &handle, &limits, &metrics, &mut sink).await;
}
