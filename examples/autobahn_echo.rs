//! An echo server on the gateway's own WebSocket layer, for the Autobahn TestSuite.
//!
//! Every upgraded connection runs [`wsbridge::connection::echo`]: the same reader (fragment
//! assembly, size limits, UTF-8 and close-frame validation), writer and closing handshake as a
//! gateway connection, with the gateway protocol replaced by "send every message back". The
//! `wsbridge` binary has no route to it; this example is how conformance is tested
//! (`tests/autobahn.sh`).
//!
//! ```text
//! cargo run --release --example autobahn_echo -- 127.0.0.1:9001
//! ```

use std::convert::Infallible;

use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, SEC_WEBSOCKET_EXTENSIONS};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use wsbridge::config::LimitsConfig;
use wsbridge::connection::deflate::{self, DeflateSettings};

async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, Infallible> {
    // permessage-deflate as the gateway agrees it (the 12.* and 13.* cases), with every
    // message compressed (no minimum size).
    let offers = req
        .headers()
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let settings = DeflateSettings {
        level: 6,
        min_bytes: 0,
    };
    let agreed = deflate::negotiate(offers, settings);
    let deflate = agreed.as_ref().map(|a| a.deflate);
    let Ok((mut response, upgrade)) = fastwebsockets::upgrade::upgrade(&mut req) else {
        return Ok(Response::builder()
            .status(400)
            .body(Empty::new())
            .expect("response"));
    };
    tokio::spawn(async move {
        if let Ok(ws) = upgrade.await {
            // Autobahn's 9.* cases send messages of up to 16 MiB.
            let limits = LimitsConfig {
                max_message_bytes: 64 << 20,
                ..LimitsConfig::default()
            };
            wsbridge::connection::echo(ws.into_inner(), limits, deflate).await;
        }
    });
    if let Some(agreed) = &agreed {
        let value = HeaderValue::from_str(&agreed.response).expect("ASCII");
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_EXTENSIONS, value);
    }
    Ok(response)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("echo listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(upgrade))
                .with_upgrades()
                .await;
        });
    }
}
