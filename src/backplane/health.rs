//! The command link's health loop: PING on an interval (under Sentinel, ROLE: the node must
//! still be the primary), consumer groups (re)created whenever Redis comes back (a Redis
//! restarted without persistence, or a newly promoted replica of one, may lack them).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Backplane, Health, Keys};
use crate::config::Config;
use crate::metrics::Metrics;

/// Runs until `shutdown`.
pub async fn run(
    backplane: Backplane,
    health: Arc<Health>,
    config: Arc<Config>,
    keys: Keys,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(config.redis.health_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Groups are created on the first successful PING and again after every outage.
    let mut groups_ready = false;
    let mut up = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A Redis that does not answer must not hold up shutdown: the PING (and the group
        // creation below) waits up to `redis.command_timeout_ms`, so it is cancelled with the loop.
        let pinged = tokio::select! {
            _ = shutdown.cancelled() => return,
            pinged = backplane.ping() => pinged,
        };
        match pinged {
            Ok(_) => {
                if up != Some(true) {
                    let primary = backplane.primary().and_then(|p| p.known_addr());
                    tracing::info!(url = %config.redis_url_redacted(), primary = ?primary, "Redis command link up");
                }
                up = Some(true);
                metrics.redis_up.set(1.0);
                if !groups_ready {
                    let ensured = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ensured = backplane.ensure_groups(&config, &keys) => ensured,
                    };
                    match ensured {
                        Ok(()) => groups_ready = true,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not create consumer groups; retrying");
                            health.failed(format!("creating consumer groups: {e}"));
                            continue;
                        }
                    }
                }
                health.command_ok();
            }
            Err(e) => {
                if up != Some(false) {
                    tracing::warn!(error = %e, url = %config.redis_url_redacted(), "Redis command link down; reconnecting");
                }
                up = Some(false);
                groups_ready = false;
                metrics.redis_up.set(0.0);
                health.failed(e.to_string());
            }
        }
    }
}
