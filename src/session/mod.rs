//! One client's session: what a connection is to the gateway once the handshake is done. It
//! registers the connection (welcome first), runs its socket (`crate::connection::drive`) with
//! the client's frames handed to [`client::ClientFrames`], and, once the socket is gone, removes
//! every trace of it and reports the disconnect to the backends.

mod client;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use crate::auth::Identity;
use crate::connection::deflate::Deflate;
use crate::connection::{drive, ConnHandle, Timing};
use crate::inbound::Event;
use crate::protocol::{Encoding, ServerFrame};
use crate::state::AppState;

use client::ClientFrames;

/// Serves an upgraded connection until it closes, then removes every trace of it.
pub async fn serve(
    io: TokioIo<Upgraded>,
    state: Arc<AppState>,
    identity: Identity,
    encoding: Encoding,
    deflate: Option<Deflate>,
) {
    let config = &state.config;
    // Interest routing: messages to this user must reach this replica from the welcome on.
    if let (Some(_), Some(user)) = (&state.interest, identity.user.as_deref()) {
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
    let (seq, id) = state.registry.next_id();
    // Moved by the client's `refresh`.
    let expiry = Expiry::new(identity.expires_at);
    let handle = ConnHandle::new(
        seq,
        id,
        identity,
        encoding,
        deflate,
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
    // Shutdown drains the connections it finds in the registry; one that registered after that
    // snapshot drains itself here (it owes nothing yet, so it closes with 1012 at once).
    if state.stopping.is_cancelled() {
        handle.drain();
    }
    state.metrics.connections.increment(1.0);
    state.metrics.connections_opened.increment(1);
    state.inbound.event(&handle, Event::Connect);
    tracing::info!(connection = %handle.id, user = ?handle.user, encoding = encoding.as_str(), deflate = deflate.is_some(), "connection opened");

    let timing = Timing {
        ping_every: Duration::from_secs(config.server.ping_interval_seconds),
        idle: Duration::from_secs(config.server.idle_timeout_seconds),
    };
    let mut sink = ClientFrames::new(&handle, &state, &expiry);
    let expires = std::pin::pin!(until_expiry(
        &handle,
        &expiry,
        config.auth.refresh_notice_seconds
    ));
    drive(
        io,
        &handle,
        &config.limits,
        timing,
        &state.metrics,
        &mut sink,
        expires,
    )
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

/// The token's expiry (unix seconds), as a client's `refresh` moves it: set by the client's
/// frames, waited on by [`until_expiry`]. A tokio watch channel would do the same with ~350 bytes
/// of waker slots per connection.
pub(crate) struct Expiry {
    at: Mutex<Option<u64>>,
    moved: Notify,
}

impl Expiry {
    fn new(at: Option<u64>) -> Self {
        Self {
            at: Mutex::new(at),
            moved: Notify::new(),
        }
    }

    /// Moves the expiry and wakes the timer.
    pub(crate) fn set(&self, at: Option<u64>) {
        *self.at.lock().expect("expiry lock") = at;
        // One waiter: a move made while the timer is not waiting is kept as a permit, so the
        // timer reads the new expiry when it next waits.
        self.moved.notify_one();
    }

    fn get(&self) -> Option<u64> {
        *self.at.lock().expect("expiry lock")
    }
}

/// Resolves when the connection's token expires. `expiry` is the token's `exp` (unix
/// seconds), moved by a `refresh`; `notice` seconds before it the client is sent
/// `refresh_required` (once per token; 0 sends none).
async fn until_expiry(handle: &ConnHandle, expiry: &Expiry, notice: u64) {
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let until = |at: f64| tokio::time::sleep(Duration::from_secs_f64((at - now()).max(0.0)));
    loop {
        let Some(exp) = expiry.get() else {
            // No expiry (yet): wait for a refresh that brings one.
            expiry.moved.notified().await;
            continue;
        };
        // A refresh moves the expiry: start over with the new one. Once nobody can refresh
        // (the client's frames are done), only the clock is left.
        let changed = expiry.moved.notified();
        tokio::pin!(changed);
        if notice > 0 {
            tokio::select! {
                _ = until(exp as f64 - notice as f64) => {
                    handle.reply(&ServerFrame::RefreshRequired { expires_at: exp });
                }
                _ = &mut changed => continue,
            }
        }
        tokio::select! {
            _ = until(exp as f64) => return,
            _ = &mut changed => continue,
        }
    }
}
