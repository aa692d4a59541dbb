//! The accept loop both listeners share: HTTP/1.1 with upgrades, stopped by a token.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{Limit, Metrics};

/// Response type of every handler.
pub type HttpResponse = Response<Full<Bytes>>;

/// Accepts connections until `stop`, serving each with `handler`. In-flight requests finish;
/// idle keep-alive connections are closed when `stop` fires. A client that does not send its
/// request headers within `header_timeout` is disconnected and counted.
pub async fn serve<H, F>(
    listener: TcpListener,
    stop: CancellationToken,
    tracker: TaskTracker,
    header_timeout: Duration,
    metrics: Metrics,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<HttpResponse, Infallible>> + Send + 'static,
{
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(e) => {
                // Usually out of file descriptors: wait instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        tracker.spawn(async move {
            let service = service_fn(move |req| handler(req, peer));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    metrics.refused(Limit::HandshakeTimeout).increment(1);
                }
                tracing::debug!(error = %e, %peer, "HTTP connection ended with an error");
            }
        });
    }
}

/// A plain-text response.
pub fn text(status: u16, body: impl Into<Bytes>) -> HttpResponse {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// A JSON response.
pub fn json(status: u16, body: &serde_json::Value) -> HttpResponse {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

/// The JSON error body every endpoint uses: `{"error":{"code":...,"message":...}}`.
pub fn error(status: u16, code: &str, message: &str) -> HttpResponse {
    json(
        status,
        &serde_json::json!({ "error": { "code": code, "message": message } }),
    )
}
