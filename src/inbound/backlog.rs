//! How far the backends are behind on the inbound streams: each stream's length and, per
//! consumer group, its pending entries, its lag and the age of its oldest pending entry,
//! sampled from Redis once per `redis.health_interval_ms` and exported as gauges.
//!
//! Every replica samples (there is no leader to pick one): a round costs one `XLEN` per inbound
//! stream, one `XINFO GROUPS` per stream that exists and one `XPENDING` summary per group with
//! pending entries, so it is bounded by the configured streams and their groups and never runs
//! on a client's or a backend's path. A failed command ends the round (it is counted in
//! `wsbridge_redis_errors_total` like every command; the health loop reports the outage), and the
//! gauges keep their last values until the next round that succeeds.

use std::collections::HashSet;
use std::time::Duration;

use redis::streams::{StreamInfoGroupsReply, StreamPendingReply};
use tokio_util::sync::CancellationToken;

use crate::backplane::{Backplane, Keys, RedisFailure};
use crate::clock::unix_ms;
use crate::metrics::names;

/// Groups sampled per stream, at most: group names become label values, and a stream that
/// somehow has hundreds of groups must not turn into hundreds of series per replica.
pub const MAX_GROUPS_PER_STREAM: usize = 20;

/// Samples `streams` (names as in `inbound.streams`) every `every` until `shutdown`.
pub async fn run(
    backplane: Backplane,
    keys: Keys,
    streams: Vec<String>,
    every: Duration,
    shutdown: CancellationToken,
) {
    // The first round one interval after start, not at once: start-up's own commands (the
    // first PING, creating the groups) go first.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Series of groups seen in the last round, so that a destroyed group's gauges fall to 0
    // instead of repeating its last values forever.
    let mut seen: HashSet<(String, String)> = HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let round = tokio::select! {
            _ = shutdown.cancelled() => return,
            round = sample(&backplane, &keys, &streams) => round,
        };
        match round {
            Ok(groups) => {
                let now: HashSet<(String, String)> = groups.into_iter().collect();
                for (stream, group) in seen.difference(&now) {
                    for name in [
                        names::INBOUND_GROUP_PENDING,
                        names::INBOUND_GROUP_LAG,
                        names::INBOUND_OLDEST_PENDING_AGE_SECONDS,
                    ] {
                        metrics::gauge!(name, "stream" => stream.clone(), "group" => group.clone())
                            .set(0.0);
                    }
                }
                seen = now;
            }
            Err(e) => tracing::debug!(error = %e, "inbound backlog not sampled this round"),
        }
    }
}

/// One round over every stream; returns the (stream, group) pairs it set.
async fn sample(
    backplane: &Backplane,
    keys: &Keys,
    streams: &[String],
) -> Result<Vec<(String, String)>, RedisFailure> {
    let mut sampled = Vec::new();
    for stream in streams {
        let key = keys.inbound(stream);
        let length: u64 = backplane.query(redis::cmd("XLEN").arg(&key)).await?;
        metrics::gauge!(names::INBOUND_STREAM_LENGTH, "stream" => stream.clone())
            .set(length as f64);
        // XINFO GROUPS fails on a missing key, which would count as a Redis error; a stream
        // nobody sent to and with no group yet has nothing to report.
        if length == 0 {
            let exists: bool = backplane.query(redis::cmd("EXISTS").arg(&key)).await?;
            if !exists {
                continue;
            }
        }
        let info: StreamInfoGroupsReply = backplane
            .query(redis::cmd("XINFO").arg("GROUPS").arg(&key))
            .await?;
        for group in info.groups.iter().take(MAX_GROUPS_PER_STREAM) {
            let labels = [("stream", stream.clone()), ("group", group.name.clone())];
            metrics::gauge!(names::INBOUND_GROUP_PENDING, &labels).set(group.pending as f64);
            // Redis 7 cannot tell the lag after entries were deleted in the middle (XDEL);
            // NaN says "unknown", which no threshold fires on, rather than a made-up number.
            let lag = group.lag.map_or(f64::NAN, |lag| lag as f64);
            metrics::gauge!(names::INBOUND_GROUP_LAG, &labels).set(lag);
            let age = if group.pending == 0 {
                0.0
            } else {
                let summary: StreamPendingReply = backplane
                    .query(redis::cmd("XPENDING").arg(&key).arg(&group.name))
                    .await?;
                match summary {
                    StreamPendingReply::Data(data) => oldest_age_seconds(&data.start_id, unix_ms()),
                    _ => 0.0,
                }
            };
            metrics::gauge!(names::INBOUND_OLDEST_PENDING_AGE_SECONDS, &labels).set(age);
            sampled.push((stream.clone(), group.name.clone()));
        }
    }
    Ok(sampled)
}

/// Seconds from the time in a stream entry id (`<unix ms>-<seq>`, Redis's clock when the entry
/// was added) to `now_ms`; 0 for an id that is not one or lies in the future (clock skew between
/// Redis's host and this one).
fn oldest_age_seconds(id: &str, now_ms: u64) -> f64 {
    let ms = id.split('-').next().and_then(|ms| ms.parse::<u64>().ok());
    ms.map_or(0.0, |ms| now_ms.saturating_sub(ms) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::oldest_age_seconds;

    #[test]
    fn the_age_is_read_from_the_ms_part_of_the_id() {
        assert_eq!(oldest_age_seconds("1700000000000-3", 1700000002500), 2.5);
        assert_eq!(oldest_age_seconds("1700000009000-0", 1700000002500), 0.0);
        assert_eq!(oldest_age_seconds("not-an-id", 1700000002500), 0.0);
    }
}
