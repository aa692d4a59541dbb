//! Channel history: offsets, and reading what a resuming client missed.
//!
//! An offset is `<epoch>:<stream entry id>`. The epoch is a random value stored beside a
//! channel's history stream and created with it; when Redis loses the history (a restart without
//! persistence, or expiry), it loses the epoch too, and the next message starts a new one. A
//! client resuming with an offset of another epoch is therefore told that it was not recovered.

use std::cmp::Ordering;

use redis::streams::StreamRangeReply;

use crate::backplane::{Backplane, Keys, RedisFailure};

/// A parsed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offset {
    /// The history's epoch.
    pub epoch: String,
    /// The stream entry id as (milliseconds, sequence).
    pub id: (u64, u64),
}

impl Offset {
    /// Parses `<epoch>:<ms>-<seq>`.
    pub fn parse(text: &str) -> Option<Self> {
        let (epoch, id) = text.rsplit_once(':')?;
        Some(Self {
            epoch: epoch.to_owned(),
            id: parse_id(id)?,
        })
    }

    /// Whether `self` comes after `other` in the same epoch (different epochs never compare).
    pub fn is_after(&self, other: &Offset) -> bool {
        self.epoch == other.epoch && self.id.cmp(&other.id) == Ordering::Greater
    }
}

fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// What a resume found.
#[derive(Debug)]
pub enum Replay {
    /// Everything after the offset is still there: these entries, in order (offset, data).
    Complete(Vec<(String, String)>),
    /// The history no longer holds the offset (trimmed, expired, lost, or another epoch).
    Incomplete,
}

/// How many times a failed history read is tried again (after 0.1, 0.2, ... 0.5 s).
const READ_ATTEMPTS: u64 = 5;

/// Reads, atomically, the entries of `channel`'s history after `since`, at most `limit`.
///
/// # Errors
/// [`RedisFailure`] when Redis did not answer.
pub async fn read_since(
    backplane: &Backplane,
    keys: &Keys,
    channel: &str,
    since: &Offset,
    limit: u64,
) -> Result<Replay, RedisFailure> {
    let stream = keys.history(channel);
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("GET")
        .arg(keys.epoch(channel))
        .cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .cmd("XRANGE")
        .arg(&stream)
        .arg(format!("({}-{}", since.id.0, since.id.1))
        .arg("+")
        .arg("COUNT")
        .arg(limit);
    // A read that fails while Redis (or a cluster shard) is coming back is tried again for a
    // while: giving up means telling clients they were not made whole.
    let mut attempt = 0;
    let (epoch, first, after): (Option<String>, StreamRangeReply, StreamRangeReply) = loop {
        match backplane.query_pipeline(&pipe).await {
            Ok(read) => break read,
            Err(e) if attempt < READ_ATTEMPTS => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, channel, "history read failed; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let Some(epoch) = epoch else {
        return Ok(Replay::Incomplete);
    };
    if epoch != since.epoch {
        return Ok(Replay::Incomplete);
    }
    // Entries are trimmed from the front: if the oldest one kept is newer than `since`, some
    // entries after `since` may be gone.
    if let Some(oldest) = first.ids.first().and_then(|e| parse_id(&e.id)) {
        if oldest > since.id {
            return Ok(Replay::Incomplete);
        }
    }
    let entries = after
        .ids
        .into_iter()
        .map(|entry| {
            let data = entry.get::<String>("data").unwrap_or_else(|| "null".into());
            (format!("{epoch}:{}", entry.id), data)
        })
        .collect();
    Ok(Replay::Complete(entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_and_compare_within_an_epoch() {
        let a = Offset::parse("e1:1700-0").unwrap();
        let b = Offset::parse("e1:1700-1").unwrap();
        let c = Offset::parse("e2:1800-0").unwrap();
        assert!(b.is_after(&a));
        assert!(!a.is_after(&b));
        assert!(!c.is_after(&a));
        assert_eq!(Offset::parse("nonsense"), None);
        assert_eq!(Offset::parse("e:1-x"), None);
    }
}
