//! The public listener: `GET /ws` upgrades to a WebSocket after origin and token checks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL,
};
use hyper::Request;

use crate::auth::AuthError;
use crate::connection::deflate;
use crate::http::{error, HttpResponse};
use crate::metrics::Limit;
use crate::protocol::{Encoding, MSGPACK_SUBPROTOCOL};
use crate::session;
use crate::state::AppState;

/// Handles one HTTP request on the public listener.
pub async fn handle(
    mut req: Request<Incoming>,
    _peer: SocketAddr,
    state: Arc<AppState>,
) -> Result<HttpResponse, Infallible> {
    if req.uri().path() != "/ws" {
        return Ok(error(404, "not_found", "the WebSocket endpoint is /ws"));
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Ok(error(
            426,
            "upgrade_required",
            "/ws only accepts WebSocket upgrades",
        ));
    }
    if state.stopping.is_cancelled() {
        return Ok(error(
            503,
            "shutting_down",
            "this replica is shutting down; connect to another",
        ));
    }
    let allowed = &state.config.server.allowed_origins;
    if !allowed.is_empty() {
        // Browsers always send Origin; non-browser clients may not, and are not restricted by it.
        if let Some(origin) = req.headers().get(ORIGIN) {
            let ok = origin
                .to_str()
                .map(|o| allowed.iter().any(|a| a == "*" || a == o))
                .unwrap_or(false);
            if !ok {
                return Ok(error(
                    403,
                    "origin_not_allowed",
                    "this Origin is not in server.allowed_origins",
                ));
            }
        }
    }
    // The permit is taken before the upgrade and held by the connection until it ends.
    let Ok(permit) = state.connection_permits.clone().try_acquire_owned() else {
        state.metrics.refused(Limit::Connections).increment(1);
        return Ok(error(
            503,
            "too_many_connections",
            "this replica holds limits.max_connections connections; retry or connect to another",
        ));
    };
    let identity = match state.auth.authenticate(token(&req).as_deref()) {
        Ok(identity) => identity,
        Err(e @ (AuthError::Missing | AuthError::Invalid(_))) => {
            return Ok(error(401, "unauthorized", &e.to_string()));
        }
    };
    let encoding = if wants_msgpack(&req) {
        Encoding::Msgpack
    } else {
        Encoding::Json
    };
    let server = &state.config.server;
    let agreed = server.permessage_deflate.then(|| {
        let offers = req
            .headers()
            .get_all(SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let settings = deflate::DeflateSettings {
            level: server.permessage_deflate_level,
            min_bytes: server.permessage_deflate_min_bytes,
        };
        deflate::negotiate(offers, settings)
    });
    let agreed = agreed.flatten();
    let deflate = agreed.as_ref().map(|a| a.deflate);
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => return Ok(error(400, "bad_upgrade", &e.to_string())),
    };
    let state2 = state.clone();
    // Made here, so the connection's task keeps one pointer, not what the handle is made of.
    let handle = session::open(&state, identity, encoding, deflate);
    state.connections.spawn(async move {
        let ws = match upgrade.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade did not complete");
                return;
            }
        };
        // The upgrade's result is not kept for the connection's life: only what it holds.
        session::serve(ws.into_inner(), state2, handle).await;
        drop(permit);
    });
    let (mut parts, _) = response.into_parts();
    if encoding == Encoding::Msgpack {
        parts.headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(MSGPACK_SUBPROTOCOL),
        );
    }
    if let Some(agreed) = agreed {
        let value = HeaderValue::from_str(&agreed.response).expect("ASCII");
        parts.headers.insert(SEC_WEBSOCKET_EXTENSIONS, value);
    }
    Ok(HttpResponse::from_parts(parts, Default::default()))
}

fn token(req: &Request<Incoming>) -> Option<String> {
    if let Some(query) = req.uri().query() {
        for pair in query.split('&') {
            if let Some(value) = pair.strip_prefix("token=") {
                return Some(value.to_owned());
            }
        }
    }
    let header = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    header.strip_prefix("Bearer ").map(|t| t.trim().to_owned())
}

fn wants_msgpack(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == MSGPACK_SUBPROTOCOL)
}
