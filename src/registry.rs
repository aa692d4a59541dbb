//! This replica's connections, indexed by connection, user and channel.
//!
//! Finding the recipients of a message costs one hash lookup plus the recipients themselves,
//! whatever the number of other local connections (except `all`, which is everyone). The maps are
//! sharded ([`DashMap`]), so connections do not queue behind one lock; no lock is held across an
//! `.await`.
//!
//! Connections are also split into *fan-out shards* by sequence number (`seq % shards`): every
//! index entry keeps one member map per shard, so each fan-out lane (`outbound/shards.rs`) finds
//! its own recipients of a message without walking the others'.

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

/// A channel's or a user's local connections, one map per fan-out shard.
struct Members(Box<[HashMap<u64, Arc<ConnHandle>>]>);

impl Members {
    fn new(shards: usize) -> Self {
        Self((0..shards).map(|_| HashMap::new()).collect())
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(HashMap::is_empty)
    }

    fn len(&self) -> usize {
        self.0.iter().map(HashMap::len).sum()
    }
}

type Index = DashMap<Arc<str>, Members>;

/// The connection registry of one replica.
pub struct Registry {
    /// `<replica>.<incarnation>.`: every local connection id starts with it.
    id_prefix: String,
    next_seq: AtomicU64,
    /// Per fan-out shard, its connections by sequence number.
    conns: Box<[DashMap<u64, Arc<ConnHandle>>]>,
    users: Index,
    channels: Index,
    /// Told when a channel loses its last local member (interest routing only).
    interest: OnceLock<Arc<Interest>>,
    /// Told of every join and leave (presence).
    watch: OnceLock<Arc<dyn MembershipWatch>>,
}

impl Registry {
    /// A registry whose connection ids start with `<replica_id>.<incarnation>.`, its
    /// connections split into `shards` fan-out shards (at least one).
    ///
    /// The incarnation differs for each process, so a restarted replica with a configured id never
    /// hands out the id of a connection that a backend may still remember.
    pub fn new(replica_id: &str, incarnation: u32, shards: usize) -> Self {
        Self {
            id_prefix: format!("{replica_id}.{incarnation:08x}."),
            next_seq: AtomicU64::new(1),
            conns: (0..shards.max(1)).map(|_| DashMap::new()).collect(),
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
        self.conns.iter().map(DashMap::len).sum()
    }

    /// Whether there are no local connections.
    pub fn is_empty(&self) -> bool {
        self.conns.iter().all(DashMap::is_empty)
    }

    /// How many fan-out shards the connections are split into.
    pub fn shards(&self) -> usize {
        self.conns.len()
    }

    /// The fan-out shard of connection `seq`.
    pub fn shard_of(&self, seq: u64) -> usize {
        // The remainder is below the shard count, a usize.
        (seq % self.conns.len() as u64) as usize
    }

    /// Adds a connection.
    pub fn insert(&self, handle: &Arc<ConnHandle>) {
        if let Some(watch) = self.watch.get() {
            watch.connected(handle);
        }
        let shard = self.shard_of(handle.seq);
        self.conns[shard].insert(handle.seq, handle.clone());
        if let Some(user) = &handle.user {
            self.users
                .entry(user.clone())
                .or_insert_with(|| Members::new(self.shards()))
                .0[shard]
                .insert(handle.seq, handle.clone());
        }
    }

    /// Removes a connection from every index.
    pub fn remove(&self, handle: &ConnHandle) {
        self.conns[self.shard_of(handle.seq)].remove(&handle.seq);
        if let Some(user) = &handle.user {
            remove_from(&self.users, user, handle.seq, self.shard_of(handle.seq));
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
            let mut members = self
                .channels
                .entry(channel.clone())
                .or_insert_with(|| Members::new(self.shards()));
            let first = members.is_empty();
            members.0[self.shard_of(handle.seq)].insert(handle.seq, handle.clone());
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
        let seq = self.seq_of(id)?;
        self.conns[self.shard_of(seq)].get(&seq).map(|h| h.clone())
    }

    /// The sequence number in a local connection id.
    fn seq_of(&self, id: &str) -> Option<u64> {
        let seq = id.strip_prefix(self.id_prefix.as_str())?;
        u64::from_str_radix(seq, 16).ok()
    }

    /// Appends the local recipients of `target` to `out` (which the caller reuses).
    pub fn recipients(&self, target: Target<'_>, out: &mut Vec<Arc<ConnHandle>>) {
        for shard in 0..self.shards() {
            self.recipients_in(target, shard, out);
        }
    }

    /// Appends the local recipients of `target` in fan-out shard `shard` to `out`.
    pub fn recipients_in(&self, target: Target<'_>, shard: usize, out: &mut Vec<Arc<ConnHandle>>) {
        match target {
            Target::Connection(id) => {
                if let Some(seq) = self.seq_of(id).filter(|&s| self.shard_of(s) == shard) {
                    out.extend(self.conns[shard].get(&seq).map(|h| h.clone()));
                }
            }
            Target::User(user) => {
                if let Some(set) = self.users.get(user) {
                    out.extend(set.0[shard].values().cloned());
                }
            }
            Target::Channel(channel) => {
                if let Some(set) = self.channels.get(channel) {
                    out.extend(set.0[shard].values().cloned());
                }
            }
            Target::All => out.extend(self.conns[shard].iter().map(|e| e.value().clone())),
        }
    }

    /// How many local recipients `target` has in each fan-out shard (`counts` gets one number
    /// per shard); one index lookup.
    pub fn counts(&self, target: Target<'_>, counts: &mut Vec<usize>) {
        counts.clear();
        counts.resize(self.shards(), 0);
        match target {
            Target::Connection(id) => {
                if let Some(seq) = self.seq_of(id) {
                    let shard = self.shard_of(seq);
                    counts[shard] = usize::from(self.conns[shard].contains_key(&seq));
                }
            }
            Target::User(user) => {
                if let Some(set) = self.users.get(user) {
                    counts
                        .iter_mut()
                        .zip(set.0.iter())
                        .for_each(|(c, m)| *c = m.len());
                }
            }
            Target::Channel(channel) => {
                if let Some(set) = self.channels.get(channel) {
                    counts
                        .iter_mut()
                        .zip(set.0.iter())
                        .for_each(|(c, m)| *c = m.len());
                }
            }
            Target::All => {
                counts
                    .iter_mut()
                    .zip(self.conns.iter())
                    .for_each(|(c, m)| *c = m.len());
            }
        }
    }

    /// How many local connections are in `channel`.
    pub fn members(&self, channel: &str) -> usize {
        self.channels.get(channel).map_or(0, |set| set.len())
    }

    /// Appends the local connections for which `keep` holds to `out` (the keepalive sweep's
    /// connections with a ping due).
    pub fn matching(&self, keep: impl Fn(&ConnHandle) -> bool, out: &mut Vec<Arc<ConnHandle>>) {
        for shard in self.conns.iter() {
            out.extend(
                shard
                    .iter()
                    .filter(|e| keep(e.value()))
                    .map(|e| e.value().clone()),
            );
        }
    }

    /// Every local connection (for shutdown).
    pub fn all(&self) -> Vec<Arc<ConnHandle>> {
        let mut all = Vec::with_capacity(self.len());
        self.recipients(Target::All, &mut all);
        all
    }
}

impl Registry {
    /// Takes connection `seq` out of `channel`'s index entry, and reports the channel when the
    /// entry goes.
    fn leave(&self, channel: &str, seq: u64) {
        if let Some(name) = remove_from(&self.channels, channel, seq, self.shard_of(seq)) {
            if let Some(interest) = self.interest.get() {
                interest.unwanted(&name);
            }
        }
    }
}

/// Takes `seq` (of fan-out shard `shard`) out of `key`'s entry; returns the key when that
/// emptied and removed the entry.
fn remove_from(index: &Index, key: &str, seq: u64, shard: usize) -> Option<Arc<str>> {
    let now_empty = match index.get_mut(key) {
        Some(mut set) => {
            set.0[shard].remove(&seq);
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
