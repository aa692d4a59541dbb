//! Which Redis servers persist every write before answering, and how each persists: asked on an
//! interval, read by the scripts that write histories and by the inbound keeper.

use std::sync::Arc;
use std::time::Duration;

use super::{Backplane, RedisFailure};

/// Which Redis servers persist every write before answering (`appendonly yes` and
/// `appendfsync always`): their run ids, comma-separated (every master of a cluster is asked).
/// Checked on an interval ([`Durability::watch`]) and handed to every script that writes a
/// history, which marks its writes durable only when it runs on one of those very processes, so
/// a stale answer (a Redis restarted with other settings meanwhile) only errs towards "not
/// durable". Also keeps each master's persistence [`Settings`], for the inbound keeper.
#[derive(Clone, Default)]
pub struct Durability(Arc<std::sync::RwLock<Held>>);

#[derive(Default)]
struct Held {
    /// The durable run ids, comma-separated.
    durable: String,
    /// Each master's persistence settings, by run id, as last checked.
    settings: Vec<(String, Settings)>,
}

/// A Redis process's persistence settings as `CONFIG GET` told them; `None` where `CONFIG` was
/// refused (renamed or forbidden, as on some managed services). `INFO persistence` does not
/// show them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `appendfsync`: `always`, `everysec` or `no`.
    pub appendfsync: Option<String>,
    /// `save`: the snapshot points, empty for none.
    pub save: Option<String>,
}

impl Durability {
    /// The run ids of the Redis servers known to be durable, comma-separated.
    pub fn run_id(&self) -> String {
        self.0.read().expect("never poisoned").durable.clone()
    }

    /// The persistence settings of the Redis process with this run id; `None` until it was
    /// checked.
    pub fn settings_of(&self, run_id: &str) -> Option<Settings> {
        let held = self.0.read().expect("never poisoned");
        held.settings
            .iter()
            .find(|(run, _)| run == run_id)
            .map(|(_, settings)| settings.clone())
    }

    /// Asks Redis (every master of a cluster) its run id, `appendonly`, `appendfsync` and
    /// `save`, once.
    ///
    /// # Errors
    /// [`RedisFailure`] when Redis did not answer; a refused `CONFIG GET` counts as not durable.
    pub async fn check(&self, backplane: &Backplane) -> Result<(), RedisFailure> {
        let infos: Vec<(String, String)> = backplane
            .query_each_master(redis::cmd("INFO").arg("server"))
            .await?;
        // Two commands: `CONFIG GET` takes one pattern only before Redis 7.
        let appends = config_get(backplane, "append*").await?;
        let saves = config_get(backplane, "save").await?;
        let mut durable: Vec<&str> = Vec::new();
        let mut settings = Vec::new();
        for (node, info) in &infos {
            let Some(run_id) = info.lines().find_map(|l| l.strip_prefix("run_id:")) else {
                continue;
            };
            let run_id = run_id.trim();
            let get = |configs: &[(String, Vec<String>)], name: &str| {
                let (_, pairs) = configs.iter().find(|(n, _)| n == node)?;
                pairs
                    .chunks(2)
                    .find(|kv| kv[0] == name)
                    .and_then(|kv| kv.get(1))
                    .cloned()
            };
            if get(&appends, "appendonly").as_deref() == Some("yes")
                && get(&appends, "appendfsync").as_deref() == Some("always")
            {
                durable.push(run_id);
            }
            let node_settings = Settings {
                appendfsync: get(&appends, "appendfsync"),
                save: get(&saves, "save"),
            };
            settings.push((run_id.to_owned(), node_settings));
        }
        durable.sort_unstable();
        let now = durable.join(",");
        let mut held = self.0.write().expect("never poisoned");
        if held.durable != now {
            tracing::info!(durable_run_ids = %now, "Redis persistence checked: histories written from now on are marked durable only on these run ids");
            held.durable = now;
        }
        held.settings = settings;
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

/// `CONFIG GET pattern` on every master; none where it was refused.
async fn config_get(
    backplane: &Backplane,
    pattern: &str,
) -> Result<Vec<(String, Vec<String>)>, RedisFailure> {
    let mut config = redis::cmd("CONFIG");
    config.arg("GET").arg(pattern);
    match backplane.query_each_master(&config).await {
        Ok(configs) => Ok(configs),
        Err(e) if e.is_transient() => Err(e),
        Err(_) => Ok(Vec::new()),
    }
}
