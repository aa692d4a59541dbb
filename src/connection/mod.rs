//! One WebSocket connection: a reader task body and a writer task body joined by a supervisor.
//!
//! fastwebsockets reads are not cancel-safe, so the reader is never raced against anything it
//! must survive: it is only dropped once the connection is closing. The writer owns the write
//! half and everything sent to the client goes through it — messages, replies, pongs, pings and the
//! close frame — so frames are never interleaved.

mod assembler;
mod handle;
mod reader;
mod writer;

use std::pin::pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::{FusedFuture, FutureExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

pub use handle::{Closing, ConnHandle, Membership, Outgoing, Queues, Reply};

use crate::auth::Identity;
use crate::inbound::Event;
use crate::metrics::CloseReason;
use crate::protocol::{Encoding, ServerFrame};
use crate::state::AppState;

/// How long a closing connection may take to send its close frame and hear the client's.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Serves an upgraded connection until it closes, then removes every trace of it.
pub async fn serve(
    io: TokioIo<Upgraded>,
    state: Arc<AppState>,
    identity: Identity,
    encoding: Encoding,
) {
    let config = &state.config;
    let (seq, id) = state.registry.next_id();
    let expires_at = identity.expires_at;
    let (handle, queues) = ConnHandle::new(
        seq,
        id,
        identity,
        encoding,
        config.outbound.queue_capacity_messages,
        config.outbound.reply_queue_capacity,
        config.outbound.queue_full_policy,
        state.metrics.clone(),
    );
    // The welcome is queued before the connection is visible to anyone, so it is always first.
    handle.reply(&ServerFrame::Welcome {
        connection: &handle.id,
        user: handle.user.as_deref(),
    });
    state.registry.insert(&handle);
    // Shutdown closes the connections it finds in the registry; one that registered after that
    // snapshot closes itself here.
    if state.stopping.is_cancelled() {
        handle.close(1012, "replica shutting down", CloseReason::Shutdown);
    }
    state.metrics.connections.increment(1.0);
    state.metrics.connections_opened.increment(1);
    state.inbound.event(&handle, Event::Connect);
    tracing::info!(connection = %handle.id, user = ?handle.user, encoding = encoding.as_str(), "connection opened");

    let started = Instant::now();
    let last_seen = AtomicU64::new(0);
    let (read_half, write_half) = tokio::io::split(io);
    let (ws_read, ws_write) = fastwebsockets::after_handshake_split(
        read_half,
        tokio::io::BufWriter::new(write_half),
        fastwebsockets::Role::Server,
    );
    let mut reader = pin!(reader::run(ws_read, &handle, &state, &last_seen, started).fuse());
    let mut writer =
        pin!(writer::run(ws_write, queues, &handle, &state, &last_seen, started).fuse());
    let expiry = until_expiry(expires_at);

    tokio::select! {
        _ = &mut reader => {}
        _ = &mut writer => {}
        _ = handle.closed() => {}
        _ = expiry => handle.close(1008, "token expired", CloseReason::TokenExpired),
    }
    // Whatever ended first has said why; this only fills in when nothing did.
    handle.close(1000, "", CloseReason::Error);
    // Let the writer send the close frame, then wait for the client's close frame, within reason.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if !writer.is_terminated() {
            (&mut writer).await;
        }
        if !reader.is_terminated() {
            (&mut reader).await;
        }
    })
    .await;

    let closing = handle
        .closing()
        .cloned()
        .expect("close was requested above");
    state.registry.remove(&handle);
    state.metrics.connections.decrement(1.0);
    state.metrics.closed(closing.why).increment(1);
    state.inbound.event(
        &handle,
        Event::Disconnect {
            code: closing.code,
            reason: &closing.reason,
        },
    );
    tracing::info!(
        connection = %handle.id,
        code = closing.code,
        reason = closing.why.as_str(),
        "connection closed"
    );
}

async fn until_expiry(expires_at: Option<u64>) {
    match expires_at {
        Some(exp) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let left = (exp as f64 - now).max(0.0);
            tokio::time::sleep(Duration::from_secs_f64(left)).await;
        }
        None => std::future::pending().await,
    }
}
