//! Fan-out lanes: the per-recipient half of the dispatcher, one lane per fan-out shard.
//!
//! The registry splits connections into shards (`seq % shards`). The dispatcher decodes a
//! payload once, keeps every per-message rule (catch-up cursors, reach, joins' bookkeeping) and
//! hands each message's per-recipient work to the shards that have recipients ([`Lanes::spread`]).
//! A shard's work runs in the order it was handed, so a connection (always in the same shard)
//! gets its messages in dispatch order.
//!
//! Where a shard's work runs:
//! - on the shard's own task (its lane), when the message has at least
//!   `outbound.fanout_lane_min_recipients` local recipients (the shards then find and write to their recipients at once, on as many worker
//!   threads as are free), or when the lane still has earlier work (order);
//! - else right away on the dispatcher: a message for a few connections costs no hand-over.
//!
//! A lane's queue is bounded (`outbound.fanout_lane_capacity`); when one is full the dispatcher
//! waits for room, which backs up into the pub/sub buffer and its overflow policy. Each wait is
//! counted (`wsbridge_fanout_lane_waits_total`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::config::OutboundConfig;
use crate::connection::ConnHandle;
use crate::metrics::Metrics;
use crate::registry::{Registry, Target};

/// Per-recipient work for one message, shared by every shard it is handed to.
pub trait Work: Send + Sync {
    /// Does the work for the recipients in `lane.shard`.
    fn run(&self, lane: &mut Lane);
}

/// Work for one connection, handed to its shard.
pub type Once = Box<dyn FnOnce(&mut Lane) + Send>;

enum Job {
    Each(Arc<dyn Work>),
    Once(Once),
}

/// Where one shard's work runs: the state a [`Work`] gets.
pub struct Lane {
    /// The shard.
    pub shard: usize,
    /// This replica's connections.
    pub registry: Arc<Registry>,
    /// Reused for every message, so finding recipients does not allocate.
    pub scratch: Vec<Arc<ConnHandle>>,
    /// Direct writes left for the current payload (see `dispatch::DIRECT_BUDGET`).
    pub direct_budget: usize,
    /// The payload `direct_budget` belongs to.
    pub payload: u64,
    /// More work waits on this lane: writes are better queued (see `dispatch::DIRECT_BUDGET`).
    pub more: bool,
}

impl Lane {
    fn new(shard: usize, registry: Arc<Registry>) -> Self {
        Self {
            shard,
            registry,
            scratch: Vec::new(),
            direct_budget: 0,
            payload: 0,
            more: false,
        }
    }

    /// Appends this shard's recipients of `target` to `self.scratch`.
    pub fn find(&mut self, target: Target<'_>) {
        self.registry
            .recipients_in(target, self.shard, &mut self.scratch);
    }

    /// Runs `f` for each of this shard's recipients of `target`.
    pub fn each(&mut self, target: Target<'_>, mut f: impl FnMut(&Registry, &Arc<ConnHandle>)) {
        self.find(target);
        let mut conns = std::mem::take(&mut self.scratch);
        for conn in conns.drain(..) {
            f(&self.registry, &conn);
        }
        self.scratch = conns;
    }

    /// Direct writes this lane may still make for payload `payload`, which got `budget` per
    /// lane: the budget starts again with each payload.
    pub fn budget_for(&mut self, payload: u64, budget: usize) -> &mut usize {
        if self.payload != payload {
            self.payload = payload;
            self.direct_budget = if self.more { 0 } else { budget };
        }
        &mut self.direct_budget
    }
}

/// One shard's queue and how much of it is not done yet.
struct Queue {
    tx: mpsc::Sender<Job>,
    /// Jobs handed to the lane and not finished. Only the dispatcher adds; the lane subtracts
    /// once a job's effects are done, so a 0 read by the dispatcher means nothing of this shard
    /// is left to run before what it runs itself.
    pending: Arc<AtomicUsize>,
}

/// The dispatcher's side of the lanes.
pub struct Lanes {
    queues: Vec<Queue>,
    /// Runs a shard's work on the dispatcher (when its lane has nothing pending).
    inline: Lane,
    /// Jobs decided but not yet handed (handing may wait: see [`Lanes::flush`]).
    outbox: Vec<(usize, Job)>,
    /// Per shard, the recipients of the message being spread.
    counts: Vec<usize>,
    /// A message's recipients at least this many (on this replica): its shards' work goes to
    /// their lanes, to run in parallel, even when the dispatcher could run it at once.
    spread_at: usize,
    metrics: Metrics,
}

impl Lanes {
    /// One lane per shard of `registry`, each a task of its own; with one shard there is no
    /// lane task: everything runs on the dispatcher.
    pub fn start(registry: Arc<Registry>, config: &OutboundConfig, metrics: Metrics) -> Self {
        let shards = registry.shards();
        let mut queues = Vec::new();
        if shards > 1 {
            for shard in 0..shards {
                let (tx, rx) = mpsc::channel(config.fanout_lane_capacity.max(1));
                let pending = Arc::new(AtomicUsize::new(0));
                let lane = Lane::new(shard, registry.clone());
                tokio::spawn(run(lane, rx, pending.clone(), metrics.clone()));
                queues.push(Queue { tx, pending });
            }
        }
        Self {
            queues,
            inline: Lane::new(0, registry),
            outbox: Vec::new(),
            counts: Vec::new(),
            spread_at: config.fanout_lane_min_recipients,
            metrics,
        }
    }

    /// The local recipients of `target` per shard, as last counted by [`Lanes::count`].
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// Counts `target`'s local recipients per shard; returns the total.
    pub fn count(&mut self, target: Target<'_>) -> usize {
        self.inline.registry.counts(target, &mut self.counts);
        self.counts.iter().sum()
    }

    /// Runs `work` for every shard with recipients of the target last [`Lanes::count`]ed: on
    /// the shard's lane, or at once (see the module doc).
    pub fn spread(&mut self, work: Arc<dyn Work>) {
        let total: usize = self.counts.iter().sum();
        for shard in 0..self.counts.len() {
            if self.counts[shard] == 0 {
                continue;
            }
            if self.queues.is_empty() || (total < self.spread_at && self.idle(shard)) {
                self.inline.shard = shard;
                work.run(&mut self.inline);
            } else {
                self.hand(shard, Job::Each(work.clone()));
            }
        }
    }

    /// Counts `target` and runs `work` for it: [`Lanes::count`] then [`Lanes::spread`].
    pub fn spread_to(&mut self, target: Target<'_>, work: Arc<dyn Work>) -> usize {
        let total = self.count(target);
        self.spread(work);
        total
    }

    /// Whether [`Lanes::spread`] would run every shard's work for the target last counted at
    /// once, on the dispatcher (then the work may borrow: see [`Lanes::run_here`]).
    pub fn all_here(&self) -> bool {
        let total: usize = self.counts.iter().sum();
        self.queues.is_empty()
            || (total < self.spread_at
                && (0..self.counts.len()).all(|s| self.counts[s] == 0 || self.idle(s)))
    }

    /// Runs `work` at once for every shard with recipients of the target last counted; only
    /// when [`Lanes::all_here`].
    pub fn run_here(&mut self, work: &dyn Work) {
        for shard in 0..self.counts.len() {
            if self.counts[shard] > 0 {
                self.inline.shard = shard;
                work.run(&mut self.inline);
            }
        }
        self.inline.scratch.clear();
    }

    /// Runs `once` for connection `conn`, in order with the work its shard has pending.
    pub fn for_conn(&mut self, conn: &ConnHandle, once: Once) {
        let shard = self.inline.registry.shard_of(conn.seq);
        if self.queues.is_empty() || self.idle(shard) {
            self.inline.shard = shard;
            once(&mut self.inline);
        } else {
            self.hand(shard, Job::Once(once));
        }
    }

    /// Whether no lane has anything pending.
    pub fn all_idle(&self) -> bool {
        (0..self.queues.len()).all(|shard| self.idle(shard))
    }

    /// Whether shard `shard` has nothing pending on its lane (what waits in the outbox is
    /// pending too).
    fn idle(&self, shard: usize) -> bool {
        self.queues[shard].pending.load(Ordering::Acquire) == 0
    }

    fn hand(&mut self, shard: usize, job: Job) {
        self.queues[shard].pending.fetch_add(1, Ordering::AcqRel);
        // Behind a job of the same shard that waits in the outbox: wait too, in order.
        if self.outbox.iter().any(|(s, _)| *s == shard) {
            self.outbox.push((shard, job));
            return;
        }
        match self.queues[shard].tx.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => self.outbox.push((shard, job)),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The lane is gone only when the runtime shuts down.
                self.queues[shard].pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Hands over what did not fit a lane's queue, waiting for room, in order.
    pub async fn flush(&mut self) {
        for (shard, job) in self.outbox.drain(..) {
            self.metrics.fanout_lane_waits.increment(1);
            if self.queues[shard].tx.send(job).await.is_err() {
                self.queues[shard].pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether [`Lanes::flush`] has anything to hand over.
    pub fn must_flush(&self) -> bool {
        !self.outbox.is_empty()
    }
}

/// A lane's task: runs its shard's jobs in order.
async fn run(
    mut lane: Lane,
    mut rx: mpsc::Receiver<Job>,
    pending: Arc<AtomicUsize>,
    metrics: Metrics,
) {
    while let Some(job) = rx.recv().await {
        let started = Instant::now();
        lane.more = !rx.is_empty();
        match job {
            Job::Each(work) => work.run(&mut lane),
            Job::Once(once) => once(&mut lane),
        }
        lane.scratch.clear();
        pending.fetch_sub(1, Ordering::AcqRel);
        metrics
            .fanout_lane_seconds
            .record(started.elapsed().as_secs_f64());
    }
}
