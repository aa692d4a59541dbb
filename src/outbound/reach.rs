//! Reach reports: how many connections, across every replica, the messages of one `/send` call
//! were handed to.
//!
//! The publishing replica marks the messages that ask ([`Message::reach`]) with its id, one
//! token for the call and each message's index, and starts a [`Waiting`] before publishing
//! (answers may arrive before the publish call returns). Every replica that receives a payload
//! with such messages answers once per payload, after fanning it out, with a count per requested
//! message ([`Payload::Reach`]). The publish tells how many replicas received those payloads;
//! the report is complete once that many answers arrived, and is given with the counts that
//! arrived, as incomplete, when the wait runs out first.
//!
//! [`Message::reach`]: super::envelope::Message::reach
//! [`Payload::Reach`]: super::envelope::Payload::Reach

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::envelope::ReachCount;

/// The reach reports this replica waits for, by token.
#[derive(Default)]
pub struct Reaches {
    waiting: Mutex<HashMap<String, Tally>>,
}

/// The counts of one call so far: the one rule of what is summed and when a report is complete.
#[derive(Debug)]
struct Tally {
    /// Per item of the call, the connections reached so far.
    counts: Vec<u64>,
    /// Answers arrived.
    answered: usize,
    /// Answers due; unknown until the publish returned.
    due: Option<usize>,
    /// Told when the last due answer arrives.
    done: Option<oneshot::Sender<()>>,
}

impl Tally {
    fn new(items: usize, done: oneshot::Sender<()>) -> Self {
        Self {
            counts: vec![0; items],
            answered: 0,
            due: None,
            done: Some(done),
        }
    }

    /// Adds one replica's answer. A count for an item the call does not have is ignored.
    fn add(&mut self, counts: &[ReachCount]) {
        self.answered += 1;
        for c in counts {
            if let Some(sum) = self.counts.get_mut(c.item as usize) {
                *sum += u64::from(c.count);
            }
        }
        self.settle();
    }

    /// Sets how many answers are due (as many as replicas received the call's asking payloads).
    fn due(&mut self, due: usize) {
        self.due = Some(due);
        self.settle();
    }

    fn complete(&self) -> bool {
        self.due.is_some_and(|due| self.answered >= due)
    }

    fn settle(&mut self) {
        if self.complete() {
            if let Some(done) = self.done.take() {
                let _ = done.send(());
            }
        }
    }
}

/// What one call's messages reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Per item of the call, the connections it was written to or queued for, summed over the
    /// replicas that answered.
    pub counts: Vec<u64>,
    /// Every replica that received the call answered in time.
    pub complete: bool,
    /// Answers that arrived in time.
    pub answered: usize,
}

impl Reaches {
    /// Starts waiting for the answers of `token`, a call of `items` items (before publishing).
    pub fn expect(self: &Arc<Self>, token: &str, items: usize) -> Waiting {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(token.to_owned(), Tally::new(items, tx));
        Waiting {
            reaches: self.clone(),
            token: token.to_owned(),
            done: rx,
        }
    }

    /// A replica's answer for `token` arrived; ignored when nobody waits for it any more (it came
    /// after the wait ran out).
    pub fn arrived(&self, token: &str, counts: &[ReachCount]) {
        if let Some(tally) = self.lock().get_mut(token) {
            tally.add(counts);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Tally>> {
        self.waiting.lock().expect("reaches lock")
    }
}

/// One call's wait for its answers. Dropping it stops waiting (the publish failed, or the
/// request was abandoned): its entry never outlives it.
pub struct Waiting {
    reaches: Arc<Reaches>,
    token: String,
    done: oneshot::Receiver<()>,
}

impl Waiting {
    /// Waits until `due` answers arrived, or `within` ran out, and reports what arrived.
    pub async fn report(mut self, due: usize, within: Duration) -> Report {
        if let Some(tally) = self.reaches.lock().get_mut(&self.token) {
            tally.due(due);
        }
        // The sender lives in the entry, which only this guard removes: the wait ends by the
        // last answer or by the deadline.
        let _ = tokio::time::timeout(within, &mut self.done).await;
        let tally = self.reaches.lock().remove(&self.token);
        match tally {
            Some(tally) => Report {
                complete: tally.complete(),
                answered: tally.answered,
                counts: tally.counts,
            },
            None => Report {
                counts: Vec::new(),
                complete: false,
                answered: 0,
            },
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.reaches.lock().remove(&self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(item: u32, count: u32) -> ReachCount {
        ReachCount { item, count }
    }

    #[tokio::test]
    async fn answers_are_summed_per_item_and_complete_when_all_due_arrived() {
        let reaches = Arc::new(Reaches::default());
        let waiting = reaches.expect("t", 3);
        // An answer may come before the publish returned and said how many are due.
        reaches.arrived("t", &[count(0, 2), count(2, 1)]);
        reaches.arrived("other", &[count(0, 100)]);
        reaches.arrived("t", &[count(0, 1), count(2, 0), count(9, 5)]);
        let report = waiting.report(2, Duration::from_secs(60)).await;
        assert_eq!(
            report,
            Report {
                counts: vec![3, 0, 1],
                complete: true,
                answered: 2,
            }
        );
        assert!(reaches.lock().is_empty());
    }

    #[tokio::test]
    async fn nothing_due_is_complete_at_once() {
        let reaches = Arc::new(Reaches::default());
        let report = reaches
            .expect("t", 2)
            .report(0, Duration::from_secs(60))
            .await;
        assert_eq!(report.counts, [0, 0]);
        assert!(report.complete);
    }

    #[tokio::test]
    async fn a_missing_answer_gives_what_arrived_as_incomplete() {
        let reaches = Arc::new(Reaches::default());
        let waiting = reaches.expect("t", 1);
        reaches.arrived("t", &[count(0, 4)]);
        let report = waiting.report(2, Duration::from_millis(20)).await;
        assert_eq!(
            report,
            Report {
                counts: vec![4],
                complete: false,
                answered: 1,
            }
        );
        // The late answer finds nobody waiting.
        reaches.arrived("t", &[count(0, 1)]);
        assert!(reaches.lock().is_empty());
    }

    #[test]
    fn an_abandoned_wait_leaves_nothing_behind() {
        let reaches = Arc::new(Reaches::default());
        drop(reaches.expect("t", 1));
        assert!(reaches.lock().is_empty());
    }
}
