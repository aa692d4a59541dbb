//! Every metric the gateway exports: names, help texts, buckets and pre-registered handles.
//! Process metrics (`process_*`) are rendered by [`process`].
//!
//! Handles are registered once at start-up and cloned into the places that update them, so the
//! hot path does an atomic add, never a registry lookup or a lock shared between connections.

pub mod process;

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::protocol::ErrorCode;

/// Metric names, in one place so that dashboards and code agree. Each name says what it counts.
#[allow(missing_docs)]
pub mod names {
    pub const CONNECTIONS: &str = "wsbridge_connections";
    pub const CONNECTIONS_OPENED: &str = "wsbridge_connections_opened_total";
    pub const CONNECTIONS_CLOSED: &str = "wsbridge_connections_closed_total";
    pub const INBOUND_MESSAGES: &str = "wsbridge_inbound_messages_total";
    pub const INBOUND_REJECTED: &str = "wsbridge_inbound_rejected_total";
    pub const STREAM_APPEND_SECONDS: &str = "wsbridge_stream_append_seconds";
    pub const OUTBOUND_PUBLISHED: &str = "wsbridge_outbound_published_total";
    pub const PUBSUB_RECEIVED: &str = "wsbridge_pubsub_received_total";
    pub const PUBSUB_FILTERED: &str = "wsbridge_pubsub_filtered_total";
    pub const FANOUT_RECIPIENTS: &str = "wsbridge_fanout_recipients";
    pub const FILTER_SECONDS: &str = "wsbridge_filter_seconds";
    pub const DISPATCH_SECONDS: &str = "wsbridge_dispatch_seconds";
    pub const FANOUT_LANE_SECONDS: &str = "wsbridge_fanout_lane_seconds";
    pub const DELIVERIES: &str = "wsbridge_deliveries_total";
    pub const DELIVERY_DROPPED: &str = "wsbridge_delivery_dropped_total";
    pub const DELIVERY_LATENCY_SECONDS: &str = "wsbridge_delivery_latency_seconds";
    pub const EVENTS_FAILED: &str = "wsbridge_events_failed_total";
    pub const INBOUND_UNCONFIRMED: &str = "wsbridge_inbound_unconfirmed_entries";
    pub const INBOUND_UNCONFIRMED_DROPPED: &str = "wsbridge_inbound_unconfirmed_dropped_total";
    pub const INBOUND_APPENDED_AGAIN: &str = "wsbridge_inbound_appended_again_total";
    pub const MISSED_NOTICES: &str = "wsbridge_missed_notices_total";
    pub const FANOUT_LANE_WAITS: &str = "wsbridge_fanout_lane_waits_total";
    pub const REDIS_PRIMARY_CHANGES: &str = "wsbridge_redis_primary_changes_total";
    pub const REDIS_UP: &str = "wsbridge_redis_up";
    pub const PUBSUB_UP: &str = "wsbridge_pubsub_up";
    pub const PUBSUB_CHANNELS: &str = "wsbridge_pubsub_channels";
    pub const PUBSUB_RECONNECTS: &str = "wsbridge_pubsub_reconnects_total";
    pub const PUBSUB_ROUNDTRIP_AGE_SECONDS: &str = "wsbridge_pubsub_roundtrip_age_seconds";
    pub const REDIS_ERRORS: &str = "wsbridge_redis_errors_total";
    pub const SEND_QUEUE_DEPTH: &str = "wsbridge_send_queue_depth";
    pub const RECEIVED_BYTES: &str = "wsbridge_received_bytes_total";
    pub const SENT_BYTES: &str = "wsbridge_sent_bytes_total";
    pub const BUILD_INFO: &str = "wsbridge_build_info";
    pub const LIMIT_REFUSALS: &str = "wsbridge_limit_refusals_total";
    pub const ACCEPT_ERRORS: &str = "wsbridge_accept_errors_total";
    pub const CONNECTIONS_LIMIT: &str = "wsbridge_connections_limit";
    pub const RESUMES: &str = "wsbridge_resumes_total";
    pub const CATCH_UPS: &str = "wsbridge_catch_ups_total";
    pub const PRESENCE_CHANGES: &str = "wsbridge_presence_changes_total";
    pub const PRESENCE_MEMBERS: &str = "wsbridge_presence_members";
    pub const PRESENCE_DROPPED: &str = "wsbridge_presence_dropped_total";
    pub const PRESENCE_GHOSTS: &str = "wsbridge_presence_ghosts_removed_total";
    pub const PRESENCE_QUERIES: &str = "wsbridge_presence_queries_total";
    pub const REACH_QUERIES: &str = "wsbridge_reach_queries_total";
    pub const REACH_WAIT_SECONDS: &str = "wsbridge_reach_wait_seconds";
    pub const REACH_ANSWERS: &str = "wsbridge_reach_answers_total";
    pub const HEAP_TRIMS: &str = "wsbridge_heap_trims_total";
    pub const HEAP_IN_USE: &str = "wsbridge_heap_in_use_bytes";
    pub const HEAP_HELD: &str = "wsbridge_heap_held_bytes";
    pub const DEFLATE_MESSAGES: &str = "wsbridge_deflate_messages_total";
    pub const CLIENT_PUBLISHES: &str = "wsbridge_client_publishes_total";
    pub const ROUTING_INFO: &str = "wsbridge_routing_info";
    pub const INBOUND_STREAM_LENGTH: &str = "wsbridge_inbound_stream_length";
    pub const INBOUND_GROUP_PENDING: &str = "wsbridge_inbound_group_pending";
    pub const INBOUND_GROUP_LAG: &str = "wsbridge_inbound_group_lag";
    pub const INBOUND_OLDEST_PENDING_AGE_SECONDS: &str =
        "wsbridge_inbound_oldest_pending_age_seconds";
}

/// Error codes a client `publish` can be refused with: the `outcome` label values of
/// `wsbridge_client_publishes_total` besides `accepted`.
const PUBLISH_REFUSALS: [ErrorCode; 6] = [
    ErrorCode::PublishNotAllowed,
    ErrorCode::PublishForbidden,
    ErrorCode::RateLimited,
    ErrorCode::RedisUnavailable,
    ErrorCode::Overloaded,
    ErrorCode::BadRequest,
];

/// Why a connection closed (label `reason` of `wsbridge_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client sent a close frame.
    Client,
    /// The socket failed or the peer vanished without a close frame.
    Error,
    /// The client broke the WebSocket protocol.
    Protocol,
    /// No frame from the client within the idle timeout.
    IdleTimeout,
    /// The send or reply queue was full under the `close` policy.
    SlowConsumer,
    /// A backend asked for it (`POST /disconnect`).
    Backend,
    /// The token expired.
    TokenExpired,
    /// The replica is shutting down.
    Shutdown,
}

impl CloseReason {
    /// Every reason, for pre-registration.
    pub const ALL: [CloseReason; 8] = [
        Self::Client,
        Self::Error,
        Self::Protocol,
        Self::IdleTimeout,
        Self::SlowConsumer,
        Self::Backend,
        Self::TokenExpired,
        Self::Shutdown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Error => "error",
            Self::Protocol => "protocol",
            Self::IdleTimeout => "idle_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::Backend => "backend",
            Self::TokenExpired => "token_expired",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Where permessage-deflate worked on a message (label `path` of
/// `wsbridge_deflate_messages_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeflatePath {
    /// A message compressed once for all of its recipients on this replica.
    Fanout,
    /// A message compressed for one connection (replies, replays).
    Connection,
    /// A client's compressed message inflated.
    Inbound,
}

impl DeflatePath {
    /// Every path, for pre-registration.
    pub const ALL: [DeflatePath; 3] = [Self::Fanout, Self::Connection, Self::Inbound];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fanout => "fanout",
            Self::Connection => "connection",
            Self::Inbound => "inbound",
        }
    }
}

/// Why a delivery was dropped (label `reason` of `wsbridge_delivery_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The connection's send queue was full.
    QueueFull,
    /// The connection went away between lookup and enqueue.
    Closed,
    /// The buffer between Redis pub/sub and the dispatcher was full (whole message lost).
    PubsubBacklog,
    /// A pub/sub payload that could not be decoded.
    BadPayload,
}

impl DropReason {
    /// Every reason, for pre-registration.
    pub const ALL: [DropReason; 4] = [
        Self::QueueFull,
        Self::Closed,
        Self::PubsubBacklog,
        Self::BadPayload,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Closed => "connection_closed",
            Self::PubsubBacklog => "pubsub_backlog",
            Self::BadPayload => "bad_payload",
        }
    }
}

/// Which limit refused something (label `limit` of `wsbridge_limit_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `limits.max_message_bytes`.
    MessageSize,
    /// `limits.max_connections`.
    Connections,
    /// `limits.max_subscriptions_per_connection`.
    Subscriptions,
    /// `limits.client_messages_per_second`.
    Rate,
    /// `limits.handshake_timeout_seconds`.
    HandshakeTimeout,
    /// `limits.max_batch_messages`.
    Batch,
    /// `api.max_body_bytes`.
    BodySize,
}

impl Limit {
    /// Every limit, for pre-registration.
    pub const ALL: [Limit; 7] = [
        Self::MessageSize,
        Self::Connections,
        Self::Subscriptions,
        Self::Rate,
        Self::HandshakeTimeout,
        Self::Batch,
        Self::BodySize,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MessageSize => "message_size",
            Self::Connections => "connections",
            Self::Subscriptions => "subscriptions",
            Self::Rate => "rate",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Batch => "batch",
            Self::BodySize => "body_size",
        }
    }
}

/// Why `accept` failed on a listener (label `reason` of `wsbridge_accept_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AcceptFailure {
    /// Out of file descriptors: EMFILE (the process's open-files limit) or ENFILE (the system's).
    OpenFiles,
    /// Any other error.
    Other,
}

impl AcceptFailure {
    /// Every reason, for pre-registration.
    pub const ALL: [AcceptFailure; 2] = [Self::OpenFiles, Self::Other];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenFiles => "open_files",
            Self::Other => "other",
        }
    }
}

/// What kind of Redis failure (label `kind` of `wsbridge_redis_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RedisErrorKind {
    /// No answer in time.
    Timeout,
    /// Connecting failed or the connection broke.
    Connection,
    /// Redis answered with an error reply.
    Server,
}

impl RedisErrorKind {
    /// Every kind, for pre-registration.
    pub const ALL: [RedisErrorKind; 3] = [Self::Timeout, Self::Connection, Self::Server];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::Server => "server",
        }
    }
}

/// Pre-registered handles for everything updated at run time. Cloning shares them: every
/// connection holds one, so a clone is one reference count, not a copy of the handle maps.
#[derive(Clone)]
pub struct Metrics(Arc<MetricsInner>);

impl std::ops::Deref for Metrics {
    type Target = MetricsInner;

    fn deref(&self) -> &MetricsInner {
        &self.0
    }
}

/// The handles behind [`Metrics`].
pub struct MetricsInner {
    /// Open connections.
    pub connections: Gauge,
    /// Connections opened.
    pub connections_opened: Counter,
    closed: HashMap<CloseReason, Counter>,
    inbound: HashMap<String, Counter>,
    inbound_other: Counter,
    rejected: HashMap<ErrorCode, Counter>,
    /// Stream append latency, from the client frame read to Redis' answer.
    pub stream_append_seconds: Histogram,
    /// Messages published by `/send` on this replica.
    pub outbound_published: Counter,
    /// Messages received from pub/sub.
    pub pubsub_received: Counter,
    /// Messages received from pub/sub with no local recipient.
    pub pubsub_filtered: Counter,
    /// Local recipients per received message.
    pub fanout_recipients: Histogram,
    /// Time to find the local recipients of one message.
    pub filter_seconds: Histogram,
    /// Time the dispatcher spends on one pub/sub payload (with the per-recipient work it runs
    /// itself).
    pub dispatch_seconds: Histogram,
    /// Time a fan-out lane spends on one message's recipients in its shard.
    pub fanout_lane_seconds: Histogram,
    /// Frames written to clients.
    pub deliveries: Counter,
    dropped: HashMap<DropReason, Counter>,
    /// `/send` accepted → frame written.
    pub delivery_latency_seconds: Histogram,
    /// Lifecycle events that Redis did not take.
    pub events_failed: Counter,
    /// Acked inbound entries kept until Redis cannot lose them (`inbound::keeper`).
    pub inbound_unconfirmed_entries: Gauge,
    /// Kept copies dropped unconfirmed because `inbound.keep_unconfirmed_entries` was full.
    pub inbound_unconfirmed_dropped: Counter,
    /// Kept entries appended again because a new Redis writer lacked them.
    pub inbound_appended_again: Counter,
    /// `missed` frames queued to connections (pub/sub link dropped or its buffer overflowed).
    pub missed_notices: Counter,
    /// Times the dispatcher waited for room in a full fan-out lane.
    pub fanout_lane_waits: Counter,
    /// 1 while the command link answers.
    pub redis_up: Gauge,
    /// 1 while pub/sub round trips succeed.
    pub pubsub_up: Gauge,
    /// Interest routing: channels the pub/sub link listens to.
    pub pubsub_channels: Gauge,
    /// Pub/sub link reconnections.
    pub pubsub_reconnects: Counter,
    /// Seconds since the last pub/sub round trip (set at scrape time).
    pub pubsub_roundtrip_age_seconds: Gauge,
    redis_errors: HashMap<RedisErrorKind, Counter>,
    /// Per-connection send-queue depth, sampled periodically for every connection.
    pub send_queue_depth: Histogram,
    /// Payload bytes of client frames read.
    pub received_bytes: Counter,
    /// Payload bytes of frames written to clients.
    pub sent_bytes: Counter,
    limit_refusals: HashMap<Limit, Counter>,
    accept_errors: HashMap<AcceptFailure, Counter>,
    resumes_recovered: Counter,
    resumes_not_recovered: Counter,
    catch_ups_recovered: Counter,
    catch_ups_not_recovered: Counter,
    presence_joins: Counter,
    presence_leaves: Counter,
    /// This replica's connections in channels with presence (summed over replicas: every member).
    pub presence_members: Gauge,
    /// Presence joins and leaves dropped because the presence queue was full.
    pub presence_dropped: Counter,
    /// Members of dead replicas this replica removed from presence.
    pub presence_ghosts: Counter,
    /// Presence queries answered (clients and backends).
    pub presence_queries: Counter,
    reach_complete: Counter,
    reach_incomplete: Counter,
    /// `POST /send` with a reach report: publish returned → every answer in (or the wait over).
    pub reach_wait_seconds: Histogram,
    /// Reach answers received from replicas (this one included) for calls published here.
    pub reach_answers: Counter,
    /// Times the allocator was asked to give free memory back (`crate::heap`).
    pub heap_trims: Counter,
    deflate: HashMap<DeflatePath, Counter>,
    /// Client `publish` frames published.
    pub publishes_accepted: Counter,
    publishes_refused: HashMap<ErrorCode, Counter>,
}

/// One counter of `name` per value of a label (`label` = `as_str(value)`), registered up front.
fn by_label<K: Copy + Eq + std::hash::Hash>(
    name: &'static str,
    label: &'static str,
    all: &[K],
    as_str: fn(K) -> &'static str,
) -> HashMap<K, Counter> {
    all.iter()
        .map(|k| (*k, metrics::counter!(name, label => as_str(*k))))
        .collect()
}

impl Metrics {
    /// Records the latency of a frame written at `now_us` whose message `/send` accepted at
    /// `accepted_us` (unix microseconds); 0 means the frame had no such moment (a replay).
    pub fn delivered_after(&self, accepted_us: u64, now_us: u64) {
        if accepted_us != 0 {
            let seconds = now_us.saturating_sub(accepted_us) as f64 / 1e6;
            self.delivery_latency_seconds.record(seconds);
        }
    }

    /// Registers every metric with the installed recorder (streams are pre-registered by name).
    pub fn new(streams: &[String]) -> Self {
        describe();
        metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Self(Arc::new(MetricsInner {
            connections: metrics::gauge!(names::CONNECTIONS),
            connections_opened: metrics::counter!(names::CONNECTIONS_OPENED),
            closed: by_label(
                names::CONNECTIONS_CLOSED,
                "reason",
                &CloseReason::ALL,
                CloseReason::as_str,
            ),
            inbound: streams
                .iter()
                .map(|s| {
                    (
                        s.clone(),
                        metrics::counter!(names::INBOUND_MESSAGES, "stream" => s.clone()),
                    )
                })
                .collect(),
            inbound_other: metrics::counter!(names::INBOUND_MESSAGES, "stream" => "other"),
            rejected: by_label(
                names::INBOUND_REJECTED,
                "code",
                &ErrorCode::ALL,
                ErrorCode::as_str,
            ),
            stream_append_seconds: metrics::histogram!(names::STREAM_APPEND_SECONDS),
            outbound_published: metrics::counter!(names::OUTBOUND_PUBLISHED),
            pubsub_received: metrics::counter!(names::PUBSUB_RECEIVED),
            pubsub_filtered: metrics::counter!(names::PUBSUB_FILTERED),
            fanout_recipients: metrics::histogram!(names::FANOUT_RECIPIENTS),
            filter_seconds: metrics::histogram!(names::FILTER_SECONDS),
            dispatch_seconds: metrics::histogram!(names::DISPATCH_SECONDS),
            fanout_lane_seconds: metrics::histogram!(names::FANOUT_LANE_SECONDS),
            deliveries: metrics::counter!(names::DELIVERIES),
            dropped: by_label(
                names::DELIVERY_DROPPED,
                "reason",
                &DropReason::ALL,
                DropReason::as_str,
            ),
            delivery_latency_seconds: metrics::histogram!(names::DELIVERY_LATENCY_SECONDS),
            events_failed: metrics::counter!(names::EVENTS_FAILED),
            inbound_unconfirmed_entries: metrics::gauge!(names::INBOUND_UNCONFIRMED),
            inbound_unconfirmed_dropped: metrics::counter!(names::INBOUND_UNCONFIRMED_DROPPED),
            inbound_appended_again: metrics::counter!(names::INBOUND_APPENDED_AGAIN),
            missed_notices: metrics::counter!(names::MISSED_NOTICES),
            fanout_lane_waits: metrics::counter!(names::FANOUT_LANE_WAITS),
            redis_up: metrics::gauge!(names::REDIS_UP),
            pubsub_up: metrics::gauge!(names::PUBSUB_UP),
            pubsub_channels: metrics::gauge!(names::PUBSUB_CHANNELS),
            pubsub_reconnects: metrics::counter!(names::PUBSUB_RECONNECTS),
            pubsub_roundtrip_age_seconds: metrics::gauge!(names::PUBSUB_ROUNDTRIP_AGE_SECONDS),
            redis_errors: by_label(
                names::REDIS_ERRORS,
                "kind",
                &RedisErrorKind::ALL,
                RedisErrorKind::as_str,
            ),
            send_queue_depth: metrics::histogram!(names::SEND_QUEUE_DEPTH),
            received_bytes: metrics::counter!(names::RECEIVED_BYTES),
            sent_bytes: metrics::counter!(names::SENT_BYTES),
            resumes_recovered: metrics::counter!(names::RESUMES, "recovered" => "true"),
            resumes_not_recovered: metrics::counter!(names::RESUMES, "recovered" => "false"),
            catch_ups_recovered: metrics::counter!(names::CATCH_UPS, "recovered" => "true"),
            catch_ups_not_recovered: metrics::counter!(names::CATCH_UPS, "recovered" => "false"),
            limit_refusals: by_label(names::LIMIT_REFUSALS, "limit", &Limit::ALL, Limit::as_str),
            accept_errors: by_label(
                names::ACCEPT_ERRORS,
                "reason",
                &AcceptFailure::ALL,
                AcceptFailure::as_str,
            ),
            presence_joins: metrics::counter!(names::PRESENCE_CHANGES, "change" => "join"),
            presence_leaves: metrics::counter!(names::PRESENCE_CHANGES, "change" => "leave"),
            presence_members: metrics::gauge!(names::PRESENCE_MEMBERS),
            presence_dropped: metrics::counter!(names::PRESENCE_DROPPED),
            presence_ghosts: metrics::counter!(names::PRESENCE_GHOSTS),
            presence_queries: metrics::counter!(names::PRESENCE_QUERIES),
            reach_complete: metrics::counter!(names::REACH_QUERIES, "complete" => "true"),
            reach_incomplete: metrics::counter!(names::REACH_QUERIES, "complete" => "false"),
            reach_wait_seconds: metrics::histogram!(names::REACH_WAIT_SECONDS),
            reach_answers: metrics::counter!(names::REACH_ANSWERS),
            heap_trims: metrics::counter!(names::HEAP_TRIMS),
            deflate: by_label(
                names::DEFLATE_MESSAGES,
                "path",
                &DeflatePath::ALL,
                DeflatePath::as_str,
            ),
            publishes_accepted: metrics::counter!(names::CLIENT_PUBLISHES, "outcome" => "accepted"),
            publishes_refused: by_label(
                names::CLIENT_PUBLISHES,
                "outcome",
                &PUBLISH_REFUSALS,
                ErrorCode::as_str,
            ),
        }))
    }

    /// The closed-connections counter for `reason`.
    pub fn closed(&self, reason: CloseReason) -> &Counter {
        &self.closed[&reason]
    }

    /// Messages compressed (fan-out, connection) or inflated (inbound) by permessage-deflate.
    pub fn deflated(&self, path: DeflatePath) -> &Counter {
        &self.deflate[&path]
    }

    /// The dropped-deliveries counter for `reason`.
    pub fn dropped(&self, reason: DropReason) -> &Counter {
        &self.dropped[&reason]
    }

    /// The resumes counter, by whether the client was made whole.
    pub fn resumes(&self, recovered: bool) -> &Counter {
        if recovered {
            &self.resumes_recovered
        } else {
            &self.resumes_not_recovered
        }
    }

    /// Connections this replica added to (`true`) or removed from (`false`) presence.
    pub fn presence_changes(&self, joined: bool) -> &Counter {
        if joined {
            &self.presence_joins
        } else {
            &self.presence_leaves
        }
    }

    /// The catch-ups counter (history channels replayed after a pub/sub reconnect), by whether
    /// the gap could be filled.
    pub fn catch_ups(&self, recovered: bool) -> &Counter {
        if recovered {
            &self.catch_ups_recovered
        } else {
            &self.catch_ups_not_recovered
        }
    }

    /// The reach-queries counter (`POST /send` calls with a reach report), by whether every
    /// replica answered in time.
    pub fn reach_queries(&self, complete: bool) -> &Counter {
        if complete {
            &self.reach_complete
        } else {
            &self.reach_incomplete
        }
    }

    /// The refusals counter for `limit`.
    pub fn refused(&self, limit: Limit) -> &Counter {
        &self.limit_refusals[&limit]
    }

    /// The failed-accepts counter for `reason`.
    pub fn accept_failed(&self, reason: AcceptFailure) -> &Counter {
        &self.accept_errors[&reason]
    }

    /// The Redis-errors counter for `kind`.
    pub fn redis_error(&self, kind: RedisErrorKind) -> &Counter {
        &self.redis_errors[&kind]
    }

    /// The inbound counter for a configured stream.
    pub fn inbound(&self, stream: &str) -> &Counter {
        self.inbound.get(stream).unwrap_or(&self.inbound_other)
    }

    /// Counts a refused client `publish` in `wsbridge_client_publishes_total`, with the error
    /// code as `outcome`. A code no publish is refused with counts nowhere.
    pub fn publish_refused(&self, code: ErrorCode) {
        if let Some(counter) = self.publishes_refused.get(&code) {
            counter.increment(1);
        }
    }

    /// The refused-frames counter for an error code.
    pub fn rejected(&self, code: ErrorCode) -> &Counter {
        &self.rejected[&code]
    }
}

/// Exports `wsbridge_routing_info{routing}` = 1, so that alerts and dashboards can judge the
/// filtered share by the routing in use (`outbound.routing`).
pub fn record_routing(routing: crate::config::Routing) {
    let routing = match routing {
        crate::config::Routing::Broadcast => "broadcast",
        crate::config::Routing::Interest => "interest",
    };
    metrics::gauge!(names::ROUTING_INFO, "routing" => routing).set(1.0);
}

/// Exports `wsbridge_connections_limit`: the WebSocket connections this replica accepts,
/// `limits.max_connections` or less when the open-files limit caps it.
pub fn record_connections_limit(max_connections: usize) {
    metrics::gauge!(names::CONNECTIONS_LIMIT).set(max_connections as f64);
}

/// Installs the Prometheus recorder with buckets that fit what each histogram measures.
///
/// # Errors
/// When a recorder is already installed in this process.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let micro_to_second = [
        0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5,
        0.005, 0.01, 0.025, 0.05, 0.1,
    ];
    let latency = [
        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5,
    ];
    let fanout = [
        0.0, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0,
    ];
    let depth = [0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::FILTER_SECONDS.into()),
            &micro_to_second,
        )?
        .set_buckets_for_metric(
            Matcher::Full(names::DISPATCH_SECONDS.into()),
            &micro_to_second,
        )?
        .set_buckets_for_metric(
            Matcher::Full(names::FANOUT_LANE_SECONDS.into()),
            &micro_to_second,
        )?
        .set_buckets_for_metric(Matcher::Full(names::STREAM_APPEND_SECONDS.into()), &latency)?
        .set_buckets_for_metric(
            Matcher::Full(names::DELIVERY_LATENCY_SECONDS.into()),
            &latency,
        )?
        .set_buckets_for_metric(Matcher::Full(names::FANOUT_RECIPIENTS.into()), &fanout)?
        .set_buckets_for_metric(Matcher::Full(names::SEND_QUEUE_DEPTH.into()), &depth)?
        .set_buckets_for_metric(Matcher::Full(names::REACH_WAIT_SECONDS.into()), &latency)?
        .install_recorder()?;
    Ok(handle)
}

fn describe() {
    use names::*;
    describe_gauge!(CONNECTIONS, "Open WebSocket connections on this replica.");
    describe_counter!(CONNECTIONS_OPENED, "WebSocket connections accepted.");
    describe_counter!(
        CONNECTIONS_CLOSED,
        "WebSocket connections closed, by reason."
    );
    describe_counter!(
        INBOUND_MESSAGES,
        "Client frames stored in an inbound stream, by stream."
    );
    describe_counter!(
        INBOUND_REJECTED,
        "Client frames refused with an error frame, by error code."
    );
    describe_histogram!(
        STREAM_APPEND_SECONDS,
        Unit::Seconds,
        "Time from a client send frame to Redis storing the stream entry."
    );
    describe_counter!(
        OUTBOUND_PUBLISHED,
        "Messages published to pub/sub by POST /send (and client publish frames) on this replica."
    );
    describe_counter!(PUBSUB_RECEIVED, "Messages received from pub/sub.");
    describe_counter!(
        PUBSUB_FILTERED,
        "Messages received from pub/sub with no recipient on this replica (the cost of broadcast)."
    );
    describe_histogram!(
        FANOUT_RECIPIENTS,
        "Local recipients per message received from pub/sub."
    );
    describe_histogram!(
        FILTER_SECONDS,
        Unit::Seconds,
        "Time to count the local recipients of one message received from pub/sub (per fan-out shard: one index lookup)."
    );
    describe_histogram!(
        DISPATCH_SECONDS,
        Unit::Seconds,
        "Time the dispatcher spends on one pub/sub payload, with the writes it makes itself (messages below outbound.fanout_lane_min_recipients); its rate is the dispatcher's busy share of one core."
    );
    describe_histogram!(
        FANOUT_LANE_SECONDS,
        Unit::Seconds,
        "Time a fan-out lane spends on one message's recipients in its shard; its rate is the lanes' busy cores."
    );
    describe_counter!(DELIVERIES, "Message frames written to client sockets.");
    describe_counter!(DELIVERY_DROPPED, "Deliveries dropped, by reason.");
    describe_histogram!(
        DELIVERY_LATENCY_SECONDS,
        Unit::Seconds,
        "Time from POST /send accepted to the frame written to the client socket."
    );
    describe_counter!(
        EVENTS_FAILED,
        "Lifecycle events that could not be appended to the events stream."
    );
    describe_gauge!(
        INBOUND_UNCONFIRMED,
        "Acked inbound entries this replica keeps a copy of until Redis's replicas, or without replicas its persistence, hold them (redis.wait_replicas = 0)."
    );
    describe_counter!(
        INBOUND_UNCONFIRMED_DROPPED,
        "Kept copies of acked inbound entries dropped before Redis confirmed them: inbound.keep_unconfirmed_entries was full."
    );
    describe_counter!(
        REDIS_PRIMARY_CHANGES,
        "Under Sentinel: times the Sentinels named another node as the primary (a failover followed)."
    );
    describe_counter!(
        FANOUT_LANE_WAITS,
        "Times the dispatcher waited for room in a full fan-out lane (outbound.fanout_lane_capacity); the pub/sub buffer holds what arrives meanwhile."
    );
    describe_counter!(
        MISSED_NOTICES,
        "`missed` frames sent to connections: live messages may have been lost on the way from Redis (pub/sub link dropped, or its buffer overflowed)."
    );
    describe_counter!(
        INBOUND_APPENDED_AGAIN,
        "Acked inbound entries appended again because a new Redis primary (promoted or restarted) lacked them."
    );
    describe_gauge!(
        REDIS_UP,
        "1 while the Redis command link answers PING, else 0."
    );
    describe_gauge!(
        PUBSUB_UP,
        "1 while pub/sub round trips through Redis succeed, else 0."
    );
    describe_gauge!(
        PUBSUB_CHANNELS,
        "Interest routing: channels this replica's pub/sub link is subscribed to (0 under broadcast)."
    );
    describe_counter!(PUBSUB_RECONNECTS, "Reconnections of the pub/sub link.");
    describe_gauge!(
        PUBSUB_ROUNDTRIP_AGE_SECONDS,
        Unit::Seconds,
        "Seconds since the last health token came back through pub/sub (since start if none yet)."
    );
    describe_counter!(
        REDIS_ERRORS,
        "Failed Redis commands, by kind: timeout, connection, server."
    );
    describe_histogram!(
        SEND_QUEUE_DEPTH,
        "Messages waiting in a connection's send queue, sampled every 5 s for every connection."
    );
    describe_counter!(
        RECEIVED_BYTES,
        Unit::Bytes,
        "Payload bytes of data frames read from clients."
    );
    describe_counter!(
        SENT_BYTES,
        Unit::Bytes,
        "Payload bytes of frames written to clients."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label tells which build runs."
    );
    describe_counter!(
        LIMIT_REFUSALS,
        "Requests, frames and connections refused by a configured limit."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "Failed accepts on the listeners, by reason (open_files: out of file descriptors)."
    );
    describe_gauge!(
        CONNECTIONS_LIMIT,
        "WebSocket connections this replica accepts: limits.max_connections, capped by the open files limit."
    );
    describe_counter!(
        RESUMES,
        "Subscribes with `since` on channels with history, by whether the replay was complete."
    );
    describe_counter!(
        CATCH_UPS,
        "History channels caught up after a pub/sub reconnect, by whether the gap could be filled."
    );
    describe_counter!(
        PRESENCE_CHANGES,
        "Connections this replica wrote into presence (change=join) or removed from it (change=leave, a dead replica's included)."
    );
    describe_gauge!(
        PRESENCE_MEMBERS,
        "This replica's connections in channels with presence; summed over replicas, every member."
    );
    describe_counter!(
        PRESENCE_DROPPED,
        "Presence joins and leaves dropped because presence.queue_capacity was reached (the next heartbeat puts presence right)."
    );
    describe_counter!(
        PRESENCE_GHOSTS,
        "Members of replicas that stopped without saying goodbye, removed from presence by this replica."
    );
    describe_counter!(
        PRESENCE_QUERIES,
        "Presence pages answered, to clients and backends."
    );
    describe_counter!(
        REACH_QUERIES,
        "POST /send calls with a reach report, by whether every replica reached answered in time."
    );
    describe_histogram!(
        REACH_WAIT_SECONDS,
        Unit::Seconds,
        "Time a POST /send with a reach report waited for the replicas' answers after publishing."
    );
    describe_counter!(
        CLIENT_PUBLISHES,
        "Client publish frames, by outcome: accepted (published), or the error code it was refused with."
    );
    describe_counter!(
        HEAP_TRIMS,
        "Times the memory allocator was asked to give free memory back to the system (server.heap_trim_interval_seconds)."
    );
    describe_counter!(
        REACH_ANSWERS,
        "Reach answers received from replicas for POST /send calls published on this replica."
    );
    describe_gauge!(
        ROUTING_INFO,
        "Always 1; the routing label tells outbound.routing: broadcast or interest."
    );
    describe_gauge!(
        INBOUND_STREAM_LENGTH,
        "Entries in an inbound stream (XLEN), by stream; sampled every redis.health_interval_ms."
    );
    describe_gauge!(
        INBOUND_GROUP_PENDING,
        "Entries delivered to a consumer group and not yet acknowledged (XINFO GROUPS pending), by stream and group."
    );
    describe_gauge!(
        INBOUND_GROUP_LAG,
        "Entries of an inbound stream not yet delivered to a consumer group (XINFO GROUPS lag), by stream and group; NaN when Redis cannot tell."
    );
    describe_gauge!(
        INBOUND_OLDEST_PENDING_AGE_SECONDS,
        Unit::Seconds,
        "Age of a consumer group's oldest unacknowledged entry (0 when none), by stream and group."
    );
    describe_counter!(
        DEFLATE_MESSAGES,
        "permessage-deflate work: messages compressed once for all their recipients (fanout) or for one connection (connection), client messages inflated (inbound)."
    );
}
