//! wsbridge: a horizontally scalable WebSocket gateway with Redis as the backplane.
//!
//! - Outbound: `POST /send` on any replica → one Redis PUBLISH → every replica's dispatcher →
//!   local recipients → bounded per-connection queues → socket writers.
//! - Inbound: client `send` frames → Redis Streams (XADD) → backends with consumer groups.
//!
//! [`run`] starts a replica and serves until the shutdown future resolves. See `ARCHITECTURE.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod backplane;
pub mod clock;
pub mod config;
pub mod connection;
pub mod cursor;
pub mod heap;
pub mod http;
pub mod ids;
pub mod inbound;
pub mod metrics;
pub mod open_files;
pub mod outbound;
pub mod presence;
pub mod protocol;
pub mod public;
pub mod registry;
pub mod session;
pub mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use backplane::{Backplane, Health, Keys};
use config::Config;

use ids::random_u32;
use inbound::{Appender, Inbound};
use metrics::Metrics;
use outbound::dispatch::Dispatcher;
use outbound::Publisher;
use registry::Registry;
use state::AppState;

/// Interest changes waiting for the pub/sub link; past it, a join goes ahead unconfirmed (logged).
const INTEREST_CHANGES: usize = 65_536;

/// Runs one replica until `shutdown` resolves, then drains and returns.
///
/// On shutdown the replica stops accepting, answers `/readyz` with 503, drains every client
/// (new sends are refused; each send already taken is answered, then the client is closed with
/// 1012: reconnect elsewhere), and returns `Ok`, all within `server.shutdown_drain_seconds`
/// (`ARCHITECTURE.md`, "Shutdown").
///
/// # Errors
/// When a listener cannot be bound or the auth key cannot be loaded.
pub async fn run(
    config: Config,
    prometheus: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let replica_id = if config.server.replica_id.is_empty() {
        format!("r{:08x}", random_u32())
    } else {
        config.server.replica_id.clone()
    };
    let metrics = Metrics::new(&config.inbound_stream_names());
    crate::metrics::record_routing(config.outbound.routing);
    let keys = Keys::new(&config.redis.prefix, &replica_id);
    let backplane =
        Backplane::new(&config.redis, metrics.clone()).context("config key `redis.url`")?;
    let health = Arc::new(Health::new(config.redis.unhealthy_after_ms));
    let registry = Arc::new(Registry::new(
        &replica_id,
        random_u32(),
        fanout_shards(&config),
    ));
    let (interest, interest_changes) = match config.outbound.routing {
        config::Routing::Interest => {
            let (interest, changes) = backplane::interest::Interest::new(
                INTEREST_CHANGES,
                Duration::from_millis(config.redis.command_timeout_ms),
            );
            registry.set_interest(interest.clone());
            (Some(interest), Some(changes))
        }
        config::Routing::Broadcast => (None, None),
    };
    let (presence, presence_changes) = presence::Presence::new(
        config.clone(),
        keys.clone(),
        backplane.clone(),
        metrics.clone(),
        replica_id.clone(),
    );
    registry.set_watch(Arc::new(presence.clone()));
    let (appender, append_rx) = Appender::new(config.inbound.append_queue_capacity);
    let inbound = Arc::new(Inbound::new(
        &config,
        &keys,
        &replica_id,
        appender,
        metrics.clone(),
    ));
    let durability = backplane::durability::Durability::default();
    let publisher = Publisher::new(
        backplane.clone(),
        keys.clone(),
        config.clone(),
        metrics.clone(),
        &replica_id,
        durability.clone(),
    );
    let auth = auth::Authenticator::new(&config.auth)?;
    // Connections past the open-files limit would fail at accept, unanswered; capped below it,
    // they get a clean 503 (`open_files`).
    let budget = open_files::Budget::new(config.limits.max_connections, open_files::soft_limit());
    crate::metrics::record_connections_limit(budget.max_connections());

    let public_listener = TcpListener::bind(config.listen_addr())
        .await
        .with_context(|| format!("cannot listen on server.listen {}", config.server.listen))?;
    let api_listener = TcpListener::bind(config.api_listen_addr())
        .await
        .with_context(|| {
            format!(
                "cannot listen on server.api_listen {}",
                config.server.api_listen
            )
        })?;

    // Finished history reads of resuming subscribes, on their way to the dispatcher. Bounded: a
    // resume task waits for room.
    let (control_tx, control_rx) = mpsc::channel(1024);
    let (resubscribed_tx, resubscribed_rx) = mpsc::channel(1);
    let stopping = CancellationToken::new();
    let background = CancellationToken::new();
    let append_stop = CancellationToken::new();
    let append_give_up = CancellationToken::new();
    let expiries = Arc::new(connection::Expiries::new(
        config.auth.refresh_notice_seconds,
    ));
    let state = AppState {
        config: config.clone(),
        replica_id: replica_id.clone(),
        registry: registry.clone(),
        inbound: inbound.clone(),
        publisher,
        health: health.clone(),
        auth,
        metrics: metrics.clone(),
        prometheus: prometheus.clone(),
        connections: TaskTracker::new(),
        connection_permits: budget.permits().clone(),
        backplane: backplane.clone(),
        history: outbound::history::HistoryReader::new(
            backplane.clone(),
            keys.clone(),
            durability.clone(),
        ),
        keys: keys.clone(),
        control_tx: control_tx.clone(),
        stopping: stopping.clone(),
        interest: interest.clone(),
        presence: presence.clone(),
        expiries: expiries.clone(),
    }
    .shared();

    let tasks = TaskTracker::new();
    tasks.spawn(expiries.run(background.clone()));
    tasks.spawn(session::keepalive(
        registry.clone(),
        Duration::from_secs(config.server.ping_interval_seconds),
        Duration::from_secs(config.server.idle_timeout_seconds),
        background.clone(),
    ));
    // Its last act, once the connections are gone, removes this replica's presence members.
    tasks.spawn(presence::run(
        presence,
        presence_changes,
        registry.clone(),
        background.clone(),
    ));
    let (pubsub_tx, pubsub_rx) = mpsc::channel(config.redis.pubsub_buffer_messages);
    tasks.spawn(backplane::pubsub::run(
        config.redis.clone(),
        keys.clone(),
        pubsub_tx,
        health.clone(),
        metrics.clone(),
        resubscribed_tx,
        interest
            .zip(interest_changes)
            .map(|(interest, changes)| backplane::pubsub::InterestLink {
                interest,
                changes,
                registry: registry.clone(),
            }),
        backplane.primary(),
        background.clone(),
    ));
    if config.outbound.routing == config::Routing::Interest {
        tasks.spawn(outbound::routes::refresh_users(
            backplane.clone(),
            keys.clone(),
            replica_id.clone(),
            registry.clone(),
            Duration::from_secs(config.outbound.user_route_ttl_seconds),
            background.clone(),
        ));
    }
    let dispatcher = Dispatcher::new(outbound::dispatch::Parts {
        registry: registry.clone(),
        inbound: inbound.clone(),
        metrics: metrics.clone(),
        backplane: backplane.clone(),
        keys: keys.clone(),
        history: state.history.clone(),
        config: config.clone(),
        control: control_tx.clone(),
        interest: state.interest.clone(),
        acks: state.publisher.acks().clone(),
        reaches: state.publisher.reaches().clone(),
    });
    tasks.spawn(dispatcher.run(pubsub_rx, control_rx, resubscribed_rx));
    tasks.spawn(durability.clone().watch(
        backplane.clone(),
        Duration::from_millis(config.redis.health_interval_ms),
        background.clone(),
    ));
    tasks.spawn(backplane::health::run(
        backplane.clone(),
        health.clone(),
        config.clone(),
        keys.clone(),
        metrics.clone(),
        background.clone(),
    ));
    // Acks wait for replicas, or copies are kept until replicas hold them (one Redis or
    // Sentinel; not on a cluster).
    let confirmation = if config.redis.wait_replicas > 0 {
        inbound::appender::Confirmation::Wait(inbound::appender::Replicated {
            replicas: config.redis.wait_replicas,
            timeout_ms: config.redis.wait_timeout_ms,
        })
    } else if config.inbound.keep_unconfirmed_entries > 0 && !backplane.is_cluster() {
        let keeper =
            inbound::keeper::Keeper::new(config.inbound.keep_unconfirmed_entries, metrics.clone());
        tasks.spawn(keeper.clone().watch(
            backplane.clone(),
            durability.clone(),
            Duration::from_millis(config.redis.health_interval_ms),
            background.clone(),
        ));
        inbound::appender::Confirmation::Keep(keeper)
    } else {
        inbound::appender::Confirmation::None
    };
    tasks.spawn(inbound::backlog::run(
        backplane.clone(),
        keys.clone(),
        config.inbound_stream_names(),
        Duration::from_millis(config.redis.health_interval_ms),
        background.clone(),
    ));
    let appender_task = tokio::spawn(inbound::appender::run(
        append_rx,
        backplane.clone(),
        metrics.clone(),
        config.inbound.append_batch_max,
        confirmation,
        append_stop.clone(),
        append_give_up.clone(),
    ));
    tasks.spawn({
        let background = background.clone();
        let registry = registry.clone();
        let metrics = metrics.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = background.cancelled() => return,
                    _ = tick.tick() => {}
                }
                prometheus.run_upkeep();
                // The queue-depth distribution is sampled here rather than on every enqueue,
                // which keeps the delivery path free of histogram updates.
                for conn in registry.all() {
                    metrics.send_queue_depth.record(conn.queue_depth() as f64);
                }
            }
        }
    });

    tasks.spawn(heap::trim_loop(
        Duration::from_secs(config.server.heap_trim_interval_seconds),
        metrics.heap_trims.clone(),
        background.clone(),
    ));

    let http_conns = TaskTracker::new();
    tracing::info!(
        public = %public_listener.local_addr()?,
        api = %api_listener.local_addr()?,
        replica = %replica_id,
        redis = %config.redis_url_redacted(),
        "listening"
    );
    let public_state = state.clone();
    let header_timeout = Duration::from_secs(config.limits.handshake_timeout_seconds);
    tasks.spawn(http::serve(
        public_listener,
        stopping.clone(),
        http_conns.clone(),
        header_timeout,
        metrics.clone(),
        budget.clone(),
        move |req, peer| public::handle(req, peer, public_state.clone()),
    ));
    let api_state = state.clone();
    tasks.spawn(http::serve(
        api_listener,
        background.clone(),
        http_conns.clone(),
        header_timeout,
        metrics.clone(),
        budget,
        move |req, peer| api::handle(req, peer, api_state.clone()),
    ));

    shutdown.await;
    // One deadline covers the whole shutdown. Its last part (`CLOSE_GRACE`, at most half of it) is
    // kept for closing handshakes: sends still waiting for Redis when that part begins are
    // answered as not confirmed, so their clients hear about them before the close frame.
    let drain = Duration::from_secs(config.server.shutdown_drain_seconds);
    let deadline = tokio::time::Instant::now() + drain;
    let answers_due = deadline - connection::CLOSE_GRACE.min(drain / 2);
    tracing::info!(
        connections = registry.len(),
        "shutting down: draining clients (sends answered, then 1012)"
    );
    stopping.cancel();
    for conn in registry.all() {
        conn.drain();
    }
    // Only now does /readyz say so: a client that sees it has no send taken afterwards (a
    // connection marked after the flip could still take one, stored after the 503).
    health.set_shutting_down();
    state.connections.close();
    let mut drained = tokio::time::timeout_at(answers_due, state.connections.wait())
        .await
        .is_ok();
    if !drained {
        append_give_up.cancel();
        drained = tokio::time::timeout_at(deadline, state.connections.wait())
            .await
            .is_ok();
    }
    if !drained {
        tracing::warn!(
            left = registry.len(),
            "drain deadline passed; dropping remaining connections"
        );
    }
    // Disconnect events (and anything else still queued) still go out, within the deadline.
    append_stop.cancel();
    if tokio::time::timeout_at(deadline, appender_task)
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed with stream appends still queued");
    }
    background.cancel();
    tasks.close();
    http_conns.close();
    // The background tasks watch `background`; this bound keeps one that is still waiting on
    // Redis (a publish under way for `/send`) from stretching the shutdown past the deadline.
    let background_due = deadline.min(tokio::time::Instant::now() + Duration::from_secs(2));
    let _ = tokio::time::timeout_at(background_due, async {
        tasks.wait().await;
        http_conns.wait().await;
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// The fan-out shards of this replica: `outbound.fanout_shards`, or, when 0, one per worker
/// thread from [`LANES_FROM_WORKERS`] worker threads on, else one (no lanes).
fn fanout_shards(config: &Config) -> usize {
    match config.outbound.fanout_shards {
        0 => match tokio::runtime::Handle::current().metrics().num_workers() {
            workers if workers >= LANES_FROM_WORKERS => workers,
            _ => 1,
        },
        n => n,
    }
}

/// With fewer worker threads, the dispatcher alone plus the connections' writer tasks already
/// keep every core busy in a burst, and cost less per delivery than lanes (`bench/scaling.sh`,
/// 2 workers: 1.05-1.25 µs per delivery without lanes, 2.7 with); the lanes pay off where one
/// dispatcher would be the ceiling (BENCHMARKS.md, "Fan-out over cores").
const LANES_FROM_WORKERS: usize = 4;
