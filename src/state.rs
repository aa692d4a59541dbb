//! What every task of a replica shares.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::backplane::interest::Interest;
use crate::backplane::{Backplane, Health, Keys};
use crate::config::Config;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::outbound::dispatch::Control;
use crate::outbound::history::HistoryReader;
use crate::outbound::Publisher;
use crate::presence::Presence;
use crate::registry::Registry;

/// Shared state of one replica.
pub struct AppState {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// This replica's id.
    pub replica_id: String,
    /// Local connections.
    pub registry: Arc<Registry>,
    /// Stream appends.
    pub inbound: Arc<Inbound>,
    /// Pub/sub publishing.
    pub publisher: Publisher,
    /// Readiness.
    pub health: Arc<Health>,
    /// Token checks.
    pub auth: Authenticator,
    /// Metric handles.
    pub metrics: Metrics,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// Every WebSocket connection task, for the drain at shutdown.
    pub connections: TaskTracker,
    /// One permit per open WebSocket connection (`limits.max_connections`).
    pub connection_permits: Arc<tokio::sync::Semaphore>,
    /// The command link.
    pub backplane: Backplane,
    /// Reads channel histories (resumes, catch-ups).
    pub history: HistoryReader,
    /// Key names.
    pub keys: Keys,
    /// Finished history reads go to the dispatcher here.
    pub control_tx: tokio::sync::mpsc::Sender<Control>,
    /// Cancelled when the replica stops accepting.
    pub stopping: CancellationToken,
    /// Interest routing: the channels this replica's pub/sub link must listen to.
    pub interest: Option<Arc<Interest>>,
    /// Presence: who is in the channels that keep it.
    pub presence: Presence,
    /// Token expiries of the connections (one timer task for the replica).
    pub expiries: Arc<crate::connection::Expiries>,
}

impl AppState {
    /// Wraps in an `Arc`.
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}
