//! The accept loop both listeners share: HTTP/1.1 with upgrades, stopped by a token.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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

use crate::metrics::{AcceptFailure, Limit, Metrics};
use crate::open_files::{self, Budget};

/// Response type of every handler.
pub type HttpResponse = Response<Full<Bytes>>;

/// Accepts connections until `stop`, serving each with `handler`. In-flight requests finish;
/// idle keep-alive connections are closed when `stop` fires. A client that does not send its
/// request headers within `header_timeout` is disconnected and counted.
///
/// A failed accept is counted (`wsbridge_accept_errors_total{reason}`) and followed by a pause
/// that doubles up to a second, so that a replica out of file descriptors does not spin. Failures
/// in a row are one episode: logged when it starts (with the open-files limit from `budget` and
/// the connections holding descriptors) and when accepts work again.
pub async fn serve<H, F>(
    listener: TcpListener,
    stop: CancellationToken,
    tracker: TaskTracker,
    header_timeout: Duration,
    metrics: Metrics,
    budget: Budget,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<HttpResponse, Infallible>> + Send + 'static,
{
    let mut backoff = Duration::from_millis(5);
    let mut failing: Option<Failing> = None;
    // When the last episode was logged.
    let mut reported: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                if let Some(episode) = failing.take().filter(|e| e.reported) {
                    tracing::info!(
                        failed = episode.count,
                        seconds = episode.since.elapsed().as_secs_f64(),
                        listener = %listener
                            .local_addr()
                            .map_or_else(|_| "unknown".to_string(), |a| a.to_string()),
                        "accepting again after {} failed accepts",
                        episode.count
                    );
                }
                pair
            }
            Err(e) => {
                let reason = if open_files::is_out_of_files(&e) {
                    AcceptFailure::OpenFiles
                } else {
                    AcceptFailure::Other
                };
                metrics.accept_failed(reason).increment(1);
                match &mut failing {
                    Some(episode) => {
                        episode.count += 1;
                        tracing::debug!(error = %e, failed = episode.count, "accept failed again");
                    }
                    None => {
                        // A descriptor another task held for a moment (a Redis reconnect, a
                        // /proc read) lets one accept through and ends the episode; the next
                        // failure starts another, logged only once REPORT_EVERY has passed.
                        let report = reported.map_or(true, |at| at.elapsed() >= REPORT_EVERY);
                        failing = Some(Failing {
                            since: Instant::now(),
                            count: 1,
                            reported: report,
                        });
                        if report {
                            reported = Some(Instant::now());
                            log_failure(&e, reason, &listener, &budget, &tracker);
                        } else {
                            tracing::debug!(error = %e, "accept failed again soon after the last report");
                        }
                    }
                }
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

/// Failed accepts in a row on one listener.
struct Failing {
    since: Instant,
    count: u64,
    /// Logged (its end is logged too); episodes closer than [`REPORT_EVERY`] to the last logged
    /// one are not.
    reported: bool,
}

/// At most one logged episode of failed accepts per listener this often.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The one log line of an episode of failed accepts.
fn log_failure(
    e: &std::io::Error,
    reason: AcceptFailure,
    listener: &TcpListener,
    budget: &Budget,
    http: &TaskTracker,
) {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    match reason {
        AcceptFailure::OpenFiles => tracing::error!(
            error = %e,
            listener = %addr,
            open_files_limit = %budget
                .limit()
                .map_or_else(|| "unlimited".to_string(), |l| l.to_string()),
            websocket_connections = budget.open(),
            http_connections = http.len(),
            max_connections = budget.max_connections(),
            "accept failed: out of file descriptors ({e}); new clients wait unanswered in the \
             listen backlog until descriptors are freed (retrying at most once a second). \
             Raise the open files limit or lower limits.max_connections (docs/operating.md)"
        ),
        AcceptFailure::Other => tracing::warn!(
            error = %e,
            listener = %addr,
            "accept failed: {e} (retrying at most once a second)"
        ),
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
