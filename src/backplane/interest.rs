//! Interest routing (`outbound.routing = "interest"`): which channels this replica's pub/sub link
//! listens to.
//!
//! The link is subscribed to `<prefix>:ch:<channel>` exactly while the channel is *wanted*: it
//! has a local member (the registry's channel index holds it) or a join is being prepared. The
//! pub/sub task (`pubsub.rs`) is the only one that sends SUBSCRIBE and UNSUBSCRIBE; everyone else
//! reports a change here, and the task re-checks what is wanted when it acts, so changes that
//! cross (a last member leaving while a new one joins) end in the right state whatever order
//! they are taken in.
//!
//! A join waits for the subscription to be confirmed before the connection joins the channel,
//! so a client told `subscribed` gets every message published after that.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// The channels with local members. The registry (`crate::registry`, above this module) is the
/// one implementation; the link asks through this trait, so it never imports the registry.
pub trait LocalChannels: Send + Sync {
    /// Whether `channel` has a local member.
    fn has_channel(&self, channel: &str) -> bool;
    /// Every channel with a local member.
    fn channel_names(&self) -> Vec<Arc<str>>;
}

/// A change the pub/sub task acts on.
pub enum Change {
    /// The channel may be wanted now; the sender (if any) learns when the link listens to it.
    Want(Arc<str>, Option<oneshot::Sender<()>>),
    /// The channel may not be wanted any more.
    Unwant(Arc<str>),
}

/// The wanted set and the link's current subscriptions.
pub struct Interest {
    state: Mutex<State>,
    changes: mpsc::Sender<Change>,
    /// How long a join waits for its subscription (the link may be down).
    wait: Duration,
}

/// Under one lock, so that a join's check of the link and the link's decision to drop a
/// channel cannot interleave.
#[derive(Default)]
struct State {
    /// Joins being prepared, per channel.
    pending: HashMap<Arc<str>, usize>,
    /// Channels the current link is subscribed to (empty while it is down).
    on_link: HashSet<Arc<str>>,
}

/// Holds a channel wanted while a join is being made; dropping it lets go.
pub struct Prepared<'a> {
    interest: &'a Interest,
    channel: Arc<str>,
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        let mut state = self.interest.lock();
        if let Some(n) = state.pending.get_mut(&self.channel) {
            *n -= 1;
            if *n == 0 {
                state.pending.remove(&self.channel);
                drop(state);
                self.interest.unwanted(&self.channel);
            }
        }
    }
}

/// What the link must do after a batch of changes.
#[derive(Default)]
pub struct Plan {
    /// Channels to subscribe to.
    pub add: Vec<Arc<str>>,
    /// Channels to unsubscribe from (already taken off the link's set).
    pub remove: Vec<Arc<str>>,
}

impl Interest {
    /// An empty interest set and the receiving end of its changes, for the pub/sub task.
    /// `capacity` bounds the changes waiting; `wait` bounds how long a join waits.
    pub fn new(capacity: usize, wait: Duration) -> (Arc<Self>, mpsc::Receiver<Change>) {
        let (changes, rx) = mpsc::channel(capacity);
        let interest = Self {
            state: Mutex::new(State::default()),
            changes,
            wait,
        };
        (Arc::new(interest), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("interest lock")
    }

    /// Makes `channel` wanted and waits (within the configured time) until the link listens to
    /// it; the caller joins the channel while holding the returned guard. If the link is down,
    /// returns at once: the link subscribes to every wanted channel when it comes back.
    pub async fn prepare(&self, channel: &str) -> Prepared<'_> {
        let channel: Arc<str> = Arc::from(channel);
        let listening = {
            let mut state = self.lock();
            *state.pending.entry(channel.clone()).or_default() += 1;
            state.on_link.contains(&channel)
        };
        let prepared = Prepared {
            interest: self,
            channel: channel.clone(),
        };
        if !listening {
            let (tx, rx) = oneshot::channel();
            match self
                .changes
                .try_send(Change::Want(channel.clone(), Some(tx)))
            {
                Ok(()) => {
                    let _ = tokio::time::timeout(self.wait, rx).await;
                }
                Err(_) => tracing::warn!(
                    channel = %channel,
                    "interest change queue full: the join goes ahead before its subscription is confirmed"
                ),
            }
        }
        prepared
    }

    /// Whether the link is subscribed to `channel` now.
    pub fn listening(&self, channel: &str) -> bool {
        self.lock().on_link.contains(channel)
    }

    /// The last local member left `channel` (called by the registry).
    pub fn unwanted(&self, channel: &Arc<str>) {
        // A change lost here leaves a subscription that is no longer needed: messages for it are
        // counted as filtered until the link reconnects. Nothing is lost.
        let _ = self.changes.try_send(Change::Unwant(channel.clone()));
    }

    /// Decides, for the channels a batch of changes touched, what the link must subscribe to and
    /// unsubscribe from. Channels to drop leave the link's set here, under the lock a join
    /// checks, so a join from now on asks for a new subscription rather than trust this one.
    pub fn plan(&self, touched: HashSet<Arc<str>>, registry: &dyn LocalChannels) -> Plan {
        let mut state = self.lock();
        let mut plan = Plan::default();
        for channel in touched {
            let wanted = state.pending.contains_key(&channel) || registry.has_channel(&channel);
            let on = state.on_link.contains(&channel);
            if wanted && !on {
                plan.add.push(channel);
            } else if !wanted && on {
                state.on_link.remove(&channel);
                plan.remove.push(channel);
            }
        }
        plan
    }

    /// Records subscriptions the link confirmed.
    pub fn subscribed(&self, added: &[Arc<str>]) {
        self.lock().on_link.extend(added.iter().cloned());
    }

    /// Every wanted channel, for a fresh link.
    pub fn all_wanted(&self, registry: &dyn LocalChannels) -> Vec<Arc<str>> {
        let mut all: HashSet<Arc<str>> = registry.channel_names().into_iter().collect();
        all.extend(self.lock().pending.keys().cloned());
        all.into_iter().collect()
    }

    /// Records what a fresh link is subscribed to (nothing while it is down).
    pub fn set_on_link(&self, channels: impl IntoIterator<Item = Arc<str>>) {
        let mut state = self.lock();
        state.on_link.clear();
        state.on_link.extend(channels);
    }

    /// How many channels the link listens to.
    pub fn on_link_len(&self) -> usize {
        self.lock().on_link.len()
    }
}
