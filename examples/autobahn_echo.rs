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
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use wsbridge::config::LimitsConfig;

async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, Infallible> {
    let Ok((response, upgrade)) = fastwebsockets::upgrade::upgrade(&mut req) else {
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
            wsbridge::connection::echo(ws.into_inner(), limits).await;
        }
    });
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
