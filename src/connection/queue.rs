//! A connection's queues (messages and replies): bounded, one consumer (the writer), and no
//! memory while empty. A tokio channel allocates a block of slots when it is created and keeps
//! it; every connection has two queues, most of them idle, so these hold a `VecDeque` that grows
//! on demand and is freed when a burst has drained (a large one at once, a small one once the
//! consumer waits again).

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::Mutex;

use tokio::sync::Notify;

/// A drained queue whose buffer grew past this many items gives the buffer back.
const KEEP: usize = 16;

/// Why an item was not queued; the item comes back.
pub enum PushError<T> {
    /// The queue holds `capacity` items.
    Full(T),
    /// The consumer is gone.
    Closed(T),
}

/// Bounded FIFO with one consumer. It wakes nobody when an item arrives: the connection's
/// handle wakes its writer task, which waits on one wake-up for everything (`writer.rs`).
pub struct Queue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// An item left, or the queue closed.
    room: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> Queue<T> {
    /// An empty queue of `capacity` items; allocates nothing yet.
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            capacity,
            room: Notify::new(),
        }
    }

    /// Queues `item` unless the queue is full or closed.
    pub fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        let mut state = self.state.lock().expect("queue lock");
        if state.closed {
            return Err(PushError::Closed(item));
        }
        if state.items.len() >= self.capacity {
            return Err(PushError::Full(item));
        }
        state.items.push_back(item);
        Ok(())
    }

    /// Queues all of `items` in order if they all fit; otherwise none, and they come back.
    pub fn try_push_all(&self, items: Vec<T>) -> Result<(), Vec<T>> {
        let mut state = self.state.lock().expect("queue lock");
        if state.closed || state.items.len() + items.len() > self.capacity {
            return Err(items);
        }
        state.items.extend(items);
        Ok(())
    }

    /// Queues `item`, waiting for room; gives it back when the queue closes.
    pub async fn push(&self, mut item: T) -> Result<(), T> {
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(back)) => return Err(back),
                Err(PushError::Full(back)) => item = back,
            }
            room.await;
        }
    }

    /// The oldest item, if any.
    pub fn try_pop(&self) -> Option<T> {
        let mut state = self.state.lock().expect("queue lock");
        let item = state.items.pop_front();
        if state.items.is_empty() && state.items.capacity() > KEEP {
            state.items = VecDeque::new();
        }
        drop(state);
        if item.is_some() {
            self.room.notify_one();
        }
        item
    }

    /// Frees the buffer of an empty queue: called when the consumer is about to wait (a burst
    /// keeps its buffer while it lasts; a small one would otherwise stay for the connection's
    /// life).
    pub fn release_idle(&self) {
        let mut state = self.state.lock().expect("queue lock");
        if state.items.is_empty() && state.items.capacity() > 0 {
            state.items = VecDeque::new();
        }
    }

    /// Refuses further items and drops those waiting (the consumer has ended); returns how
    /// many were dropped.
    pub fn close(&self) -> usize {
        let mut state = self.state.lock().expect("queue lock");
        state.closed = true;
        let dropped = std::mem::take(&mut state.items).len();
        drop(state);
        self.room.notify_waiters();
        dropped
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.state.lock().expect("queue lock").items.len()
    }

    /// The most items it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fifo_bounded_waits_for_room_and_closes() {
        let q = std::sync::Arc::new(Queue::new(2));
        assert!(q.try_push(1).is_ok());
        assert!(q.try_push(2).is_ok());
        assert!(matches!(q.try_push(3), Err(PushError::Full(3))));
        // A waiting push completes once the consumer takes one.
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.push(3).await.is_ok() })
        };
        tokio::task::yield_now().await;
        assert_eq!(q.try_pop(), Some(1));
        assert!(waiter.await.unwrap());
        assert_eq!(q.try_pop(), Some(2));
        assert_eq!(q.try_pop(), Some(3));
        assert_eq!(q.len(), 0);
        q.try_push(5).ok().unwrap();
        assert_eq!(q.close(), 1, "the waiting item is dropped and counted");
        assert!(q.try_pop().is_none());
        assert!(matches!(q.try_push(6), Err(PushError::Closed(6))));
    }

    #[test]
    fn an_idle_queue_gives_its_buffer_back() {
        let q = Queue::new(8);
        q.try_push(1).ok().unwrap();
        assert_eq!(q.try_pop(), Some(1));
        assert!(q.state.lock().unwrap().items.capacity() > 0);
        q.release_idle();
        let held = q.state.lock().unwrap().items.capacity();
        assert_eq!(
            held, 0,
            "the welcome's buffer would stay for the connection's life"
        );
        q.try_push(2).ok().unwrap();
        q.release_idle();
        assert_eq!(q.try_pop(), Some(2), "a queue holding items keeps them");
    }

    #[test]
    fn push_all_takes_all_or_nothing() {
        let q = Queue::new(3);
        q.try_push(0).ok().unwrap();
        assert_eq!(q.try_push_all(vec![1, 2, 3]), Err(vec![1, 2, 3]));
        assert_eq!(q.len(), 1);
        assert_eq!(q.try_push_all(vec![1, 2]), Ok(()));
        assert_eq!(
            (0..3).map(|_| q.try_pop().unwrap()).collect::<Vec<_>>(),
            [0, 1, 2]
        );
    }
}
