//! This replica's connections, indexed by connection, user and channel.
//!
//! Finding the recipients of a message costs one hash lookup plus the recipients themselves,
//! whatever the number of other local connections (except `all`, which is everyone). The maps are
//! sharded ([`DashMap`]), so connections do not queue behind one lock; no lock is held across an
//! `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;

use crate::backplane::interest::{Interest, LocalChannels};
use crate::connection::ConnHandle;

/// Who a message or an action is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// One connection, by cluster-unique id.
    Connection(&'a str),
    /// Every connection of a user.
    User(&'a str),
    /// Every subscriber of a channel.
    Channel(&'a str),
    /// Everyone.
    All,
}

/// Told of every change of channel membership (presence). For one connection the calls come in
/// the order the changes happen: they are made under its channel-set lock, or after it was
/// removed for good. They must not block.
pub trait MembershipWatch: Send + Sync {
    /// `handle` joined `channel`.
    fn joined(&self, handle: &ConnHandle, channel: &str);
    /// `handle` left `channel` (or was removed while in it).
    fn left(&self, handle: &ConnHandle, channel: &str);
    /// `handle` was added to the registry (before any join).
    fn connected(&self, handle: &ConnHandle);
    /// `handle` was removed from the registry (after its leaves).
    fn disconnected(&self, handle: &ConnHandle);
}

/// A connection is in as many channels as it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyChannels;

type Index = DashMap<Arc<str>, HashMap<u64, Arc<ConnHandle>>>;

/// The connection registry of one replica.
pub struct Registry {
    /// `<replica>.<incarnation>.`: every local connection id starts with it.
    id_prefix: String,
    next_seq: AtomicU64,
    conns: DashMap<u64, Arc<ConnHandle>>,
    users: Index,
    channels: Index,
    /// Told when a channel loses its last local member (interest routing only).
    interest: OnceLock<Arc<Interest>>,
    /// Told of every join and leave (presence).
    watch: OnceLock<Arc<dyn MembershipWatch>>,
}

impl Registry {
    /// A registry whose connection ids start with `<replica_id>.<incarnation>.`.
    ///
    /// The incarnation differs for each process, so a restarted replica with a configured id never
    /// hands out the id of a connection that a backend may still remember.
    pub fn new(replica_id: &str, incarnation: u32) -> Self {
        Self {
            id_prefix: format!("{replica_id}.{incarnation:08x}."),
            next_seq: AtomicU64::new(1),
            conns: DashMap::new(),
            users: DashMap::new(),
            channels: DashMap::new(),
            interest: OnceLock::new(),
            watch: OnceLock::new(),
        }
    }

    /// Reports every join and leave to `watch` from now on.
    pub fn set_watch(&self, watch: Arc<dyn MembershipWatch>) {
        let _ = self.watch.set(watch);
    }

    /// Reports channels that lose their last local member to `interest` from now on.
    pub fn set_interest(&self, interest: Arc<Interest>) {
        let _ = self.interest.set(interest);
    }

    /// The channels with local members.
    pub fn channel_names(&self) -> Vec<Arc<str>> {
        self.channels.iter().map(|e| e.key().clone()).collect()
    }

    /// The users with local connections.
    pub fn user_names(&self) -> Vec<Arc<str>> {
        self.users.iter().map(|e| e.key().clone()).collect()
    }

    /// Allocates a local sequence number and the cluster-unique id that goes with it.
    pub fn next_id(&self) -> (u64, Arc<str>) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        (seq, Arc::from(format!("{}{seq:x}", self.id_prefix)))
    }

    /// Number of local connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether there are no local connections.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Adds a connection.
    pub fn insert(&self, handle: &Arc<ConnHandle>) {
        if let Some(watch) = self.watch.get() {
            watch.connected(handle);
        }
        self.conns.insert(handle.seq, handle.clone());
        if let Some(user) = &handle.user {
            self.users
                .entry(user.clone())
                .or_default()
                .insert(handle.seq, handle.clone());
        }
    }

    /// Removes a connection from every index.
    pub fn remove(&self, handle: &ConnHandle) {
        self.conns.remove(&handle.seq);
        if let Some(user) = &handle.user {
            remove_from(&self.users, user, handle.seq);
        }
        let joined: Vec<Arc<str>> = {
            let mut membership = handle.channels.lock().expect("channel set lock");
            membership.removed = true;
            membership.joined.drain().collect()
        };
        for channel in joined {
            self.leave(&channel, handle.seq);
            if let Some(watch) = self.watch.get() {
                watch.left(handle, &channel);
            }
        }
        if let Some(watch) = self.watch.get() {
            watch.disconnected(handle);
        }
    }

    /// Joins `channel`. Returns `Ok(false)` when the connection was already in it or has been
    /// removed.
    ///
    /// # Errors
    /// [`TooManyChannels`] when the connection is in `max` channels already.
    pub fn subscribe(
        &self,
        handle: &Arc<ConnHandle>,
        channel: &str,
        max: usize,
    ) -> Result<bool, TooManyChannels> {
        self.subscribe_announced(handle, channel, max, || {})
            .map(|joined| joined.is_some())
    }

    /// As [`Registry::subscribe`], saying whether the connection is the channel's first local
    /// member: `Ok(Some(first))` when it joined, `Ok(None)` when it was in already or removed.
    ///
    /// # Errors
    /// [`TooManyChannels`] when the connection is in `max` channels already.
    pub fn join(
        &self,
        handle: &Arc<ConnHandle>,
        channel: &str,
        max: usize,
    ) -> Result<Option<bool>, TooManyChannels> {
        self.subscribe_announced(handle, channel, max, || {})
    }

    /// As [`Registry::join`]; `announce` runs when the connection does join, before any
    /// message of the channel can reach it (the client's `subscribed` goes first that way).
    ///
    /// # Errors
    /// [`TooManyChannels`] when the connection is in `max` channels already.
    pub fn subscribe_announced(
        &self,
        handle: &Arc<ConnHandle>,
        channel: &str,
        max: usize,
        announce: impl FnOnce(),
    ) -> Result<Option<bool>, TooManyChannels> {
        let mut membership = handle.channels.lock().expect("channel set lock");
        if membership.removed || membership.joined.contains(channel) {
            return Ok(None);
        }
        if membership.joined.len() >= max {
            return Err(TooManyChannels);
        }
        announce();
        let channel: Arc<str> = Arc::from(channel);
        membership.joined.insert(channel.clone());
        // Under the shard's lock: of two connections joining at once, one is first.
        let first = {
            let mut members = self.channels.entry(channel.clone()).or_default();
            let first = members.is_empty();
            members.insert(handle.seq, handle.clone());
            first
        };
        if let Some(watch) = self.watch.get() {
            watch.joined(handle, &channel);
        }
        Ok(Some(first))
    }

    /// Leaves `channel`. Returns false when the connection was not in it.
    pub fn unsubscribe(&self, handle: &ConnHandle, channel: &str) -> bool {
        let mut membership = handle.channels.lock().expect("channel set lock");
        if !membership.joined.remove(channel) {
            return false;
        }
        self.leave(channel, handle.seq);
        if let Some(watch) = self.watch.get() {
            watch.left(handle, channel);
        }
        true
    }

    /// Whether any local connection is in `channel`.
    pub fn has_channel(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    /// Looks up one local connection by its cluster-unique id.
    pub fn get(&self, id: &str) -> Option<Arc<ConnHandle>> {
        let seq = id.strip_prefix(self.id_prefix.as_str())?;
        let seq = u64::from_str_radix(seq, 16).ok()?;
        self.conns.get(&seq).map(|h| h.clone())
    }

    /// Appends the local recipients of `target` to `out` (which the caller reuses).
    pub fn recipients(&self, target: Target<'_>, out: &mut Vec<Arc<ConnHandle>>) {
        match target {
            Target::Connection(id) => out.extend(self.get(id)),
            Target::User(user) => {
                if let Some(set) = self.users.get(user) {
                    out.extend(set.values().cloned());
                }
            }
            Target::Channel(channel) => {
                if let Some(set) = self.channels.get(channel) {
                    out.extend(set.values().cloned());
                }
            }
            Target::All => out.extend(self.conns.iter().map(|e| e.value().clone())),
        }
    }

    /// Every local connection (for shutdown).
    pub fn all(&self) -> Vec<Arc<ConnHandle>> {
        self.conns.iter().map(|e| e.value().clone()).collect()
    }
}

impl Registry {
    /// Takes connection `seq` out of `channel`'s index entry, and reports the channel when the
    /// entry goes.
    fn leave(&self, channel: &str, seq: u64) {
        if let Some(name) = remove_from(&self.channels, channel, seq) {
            if let Some(interest) = self.interest.get() {
                interest.unwanted(&name);
            }
        }
    }
}

/// Takes `seq` out of `key`'s entry; returns the key when that emptied and removed the entry.
fn remove_from(index: &Index, key: &str, seq: u64) -> Option<Arc<str>> {
    let now_empty = match index.get_mut(key) {
        Some(mut set) => {
            set.remove(&seq);
            set.is_empty()
        }
        None => false,
    };
    if now_empty {
        index
            .remove_if(key, |_, set| set.is_empty())
            .map(|(k, _)| k)
    } else {
        None
    }
}

impl LocalChannels for Registry {
    fn has_channel(&self, channel: &str) -> bool {
        Registry::has_channel(self, channel)
    }

    fn channel_names(&self) -> Vec<Arc<str>> {
        Registry::channel_names(self)
    }
}
