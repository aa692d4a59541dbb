//! Which Redis servers persist every write before answering: asked on an interval, read by the
//! scripts that write histories and by the inbound keeper.

use std::sync::Arc;
use std::time::Duration;

use super::{Backplane, RedisFailure};

/// Which Redis servers persist every write before answering (`appendonly yes` and
/// `appendfsync always`): their run ids, comma-separated (every master of a cluster is asked).
/// Checked on an interval ([`Durability::watch`]) and handed to every script that writes a
/// history, which marks its writes durable only when it runs on one of those very processes, so
/// a stale answer (a Redis restarted with other settings meanwhile) only errs towards "not
/// durable".
#[derive(Clone, Default)]
pub struct Durability(Arc<std::sync::RwLock<String>>);

impl Durability {
    /// The run ids of the Redis servers known to be durable, comma-separated.
    pub fn run_id(&self) -> String {
        self.0.read().expect("never poisoned").clone()
    }

    /// Asks Redis (every master of a cluster) its run id, `appendonly` and `appendfsync`, once.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis did not answer; a refused `CONFIG GET` counts as not durable.
    pub async fn check(&self, backplane: &Backplane) -> Result<(), RedisFailure> {
        let infos: Vec<(String, String)> = backplane
            .query_each_master(redis::cmd("INFO").arg("server"))
            .await?;
        let mut config = redis::cmd("CONFIG");
        config.arg("GET").arg("append*");
        let configs: Vec<(String, Vec<String>)> = match backplane.query_each_master(&config).await {
            Ok(configs) => configs,
            Err(e) if e.is_transient() => return Err(e),
            Err(_) => Vec::new(),
        };
        let mut durable: Vec<&str> = Vec::new();
        for (node, info) in &infos {
            let Some((_, pairs)) = configs.iter().find(|(n, _)| n == node) else {
                continue;
            };
            let get = |name: &str| {
                pairs
                    .chunks(2)
                    .find(|kv| kv[0] == name)
                    .and_then(|kv| kv.get(1))
                    .map(String::as_str)
            };
            let run_id = info.lines().find_map(|l| l.strip_prefix("run_id:"));
            if let Some(run_id) = run_id.filter(|_| {
                get("appendonly") == Some("yes") && get("appendfsync") == Some("always")
            }) {
                durable.push(run_id.trim());
            }
        }
        durable.sort_unstable();
        let now = durable.join(",");
        let mut held = self.0.write().expect("never poisoned");
        if *held != now {
            tracing::info!(durable_run_ids = %now, "Redis persistence checked: histories written from now on are marked durable only on these run ids");
            *held = now;
        }
        Ok(())
    }

    /// Checks every `interval` until `shutdown`.
    pub async fn watch(
        self,
        backplane: Backplane,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                checked = self.check(&backplane) => {
                    if let Err(e) = checked {
                        tracing::debug!(error = %e, "Redis persistence not checked");
                    }
                }
            }
        }
    }
}
