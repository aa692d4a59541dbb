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

/// Bounded FIFO with one consumer.
pub struct Queue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// An item arrived (one consumer: a stored permit is never lost).
    ready: Notify,
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
            ready: Notify::new(),
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
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Queues all of `items` in order if they all fit; otherwise none, and they come back.
    pub fn try_push_all(&self, items: Vec<T>) -> Result<(), Vec<T>> {
        let mut state = self.state.lock().expect("queue lock");
        if state.closed || state.items.len() + items.len() > self.capacity {
            return Err(items);
        }
        state.items.extend(items);
        drop(state);
        self.ready.notify_one();
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

    /// Waits for the oldest item; `None` once closed and empty. Cancel-safe: an item is taken
    /// only by the poll that returns it.
    pub async fn pop(&self) -> Option<T> {
        loop {
            let mut ready = pin!(self.ready.notified());
            ready.as_mut().enable();
            if let Some(item) = self.try_pop() {
                return Some(item);
            }
            {
                let mut state = self.state.lock().expect("queue lock");
                if state.closed {
                    return None;
                }
                // About to wait: an idle queue holds no buffer (a burst keeps its buffer while
                // it lasts; a small one would otherwise stay for the connection's life).
                if state.items.is_empty() && state.items.capacity() > 0 {
                    state.items = VecDeque::new();
                }
            }
            ready.await;
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
        self.ready.notify_one();
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
        assert_eq!(q.pop().await, Some(1));
        assert!(waiter.await.unwrap());
        assert_eq!(q.pop().await, Some(2));
        assert_eq!(q.try_pop(), Some(3));
        assert_eq!(q.len(), 0);
        // A pop waiting on an empty queue wakes up on a push, and ends on close.
        let popper = {
            let q = q.clone();
            tokio::spawn(async move { q.pop().await })
        };
        tokio::task::yield_now().await;
        q.try_push(4).ok().unwrap();
        assert_eq!(popper.await.unwrap(), Some(4));
        q.try_push(5).ok().unwrap();
        assert_eq!(q.close(), 1, "the waiting item is dropped and counted");
        assert!(q.pop().await.is_none());
        assert!(matches!(q.try_push(6), Err(PushError::Closed(6))));
    }

    #[tokio::test]
    async fn a_consumer_waiting_on_an_empty_queue_holds_no_buffer() {
        let q = std::sync::Arc::new(Queue::new(8));
        q.try_push(1).ok().unwrap();
        assert_eq!(q.pop().await, Some(1));
        let popper = {
            let q = q.clone();
            tokio::spawn(async move { q.pop().await })
        };
        tokio::task::yield_now().await;
        let held = q.state.lock().unwrap().items.capacity();
        assert_eq!(
            held, 0,
            "the welcome's buffer would stay for the connection's life"
        );
        q.try_push(2).ok().unwrap();
        assert_eq!(popper.await.unwrap(), Some(2));
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
