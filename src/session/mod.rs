//! One client's session: what a connection is to the gateway once the handshake is done. It
//! registers the connection (welcome first), runs its socket (`crate::connection::drive`) with
//! the client's frames handed to [`client::ClientFrames`], and, once the socket is gone, removes
//! every trace of it and reports the disconnect to the backends.

mod client;
mod keepalive;

pub use keepalive::keepalive;

use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use crate::auth::Identity;
use crate::connection::deflate::Deflate;
use crate::connection::{drive, ConnHandle};
use crate::inbound::Event;
use crate::protocol::{Encoding, ServerFrame};
use crate::state::AppState;

use client::ClientFrames;

/// The handle of a connection whose upgrade was accepted: made before the upgrade completes, so
/// the connection's task keeps one pointer rather than the identity and terms it is made of (an
/// async fn keeps its arguments for its whole life). Nobody can reach it until [`serve`]
/// registers it.
pub fn open(
    state: &AppState,
    identity: Identity,
    encoding: Encoding,
    deflate: Option<Deflate>,
) -> Arc<ConnHandle> {
    let outbound = &state.config.outbound;
    let (seq, id) = state.registry.next_id();
    ConnHandle::new(
        seq,
        id,
        identity,
        encoding,
        deflate,
        outbound.queue_capacity_messages,
        outbound.reply_queue_capacity,
        outbound.queue_full_policy,
        state.metrics.clone(),
    )
}

/// Serves an upgraded connection until it closes, then removes every trace of it.
pub async fn serve(io: TokioIo<Upgraded>, state: Arc<AppState>, handle: Arc<ConnHandle>) {
    let config = &state.config;
    // Interest routing: messages to this user must reach this replica from the welcome on.
    if let (Some(_), Some(user)) = (&state.interest, handle.user.as_deref()) {
        let ttl = Duration::from_secs(config.outbound.user_route_ttl_seconds);
        let listed = crate::outbound::routes::list_user(
            &state.backplane,
            &state.keys,
            &state.replica_id,
            user,
            ttl,
        );
        // Boxed: awaited inline, this Redis call's future would be kept in every connection's
        // task for its whole life (a future is as large as the largest thing it awaits).
        if let Err(e) = Box::pin(listed).await {
            tracing::warn!(error = %e, user, "could not list this replica for the user; the periodic refresh will");
        }
    }
    // The welcome is queued before the connection is visible to anyone, so it is always first.
    handle.reply(&ServerFrame::Welcome {
        connection: &handle.id,
        user: handle.user.as_deref(),
    });
    state.registry.insert(&handle);
    // Shutdown drains the connections it finds in the registry; one that registered after that
    // snapshot drains itself here (it owes nothing yet, so it closes with 1012 at once).
    if state.stopping.is_cancelled() {
        handle.drain();
    }
    state.metrics.connections.increment(1.0);
    state.metrics.connections_opened.increment(1);
    state.inbound.event(&handle, Event::Connect);
    tracing::info!(connection = %handle.id, user = ?handle.user, encoding = handle.encoding.as_str(), deflate = handle.deflate.is_some(), "connection opened");

    // The replica's expiry task sends `refresh_required` and closes with 1008 when the token
    // expires; the client's `refresh` moves it.
    let expiry = state.expiries.watch(&handle, handle.identity.expires_at);
    let mut sink = ClientFrames::new(&handle, &state, &expiry);
    // Pings and the idle timeout come from the replica's keepalive sweep (`keepalive.rs`).
    drive(io, &handle, &config.limits, &state.metrics, &mut sink).await;
    // The token is no longer followed once the connection is closed.
    drop(expiry);

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
