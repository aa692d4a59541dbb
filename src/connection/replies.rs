//! A connection's reply queue: bounded, one consumer (the writer), and no memory until it is
//! used. A tokio channel allocates a block of slots when it is created; every connection has a
//! reply queue, most of them idle, so this one holds a `VecDeque` that grows on demand.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::Reply;

/// Why a reply was not queued; the reply comes back.
pub enum PushError {
    /// The queue holds `capacity` replies.
    Full(Reply),
    /// The writer is gone.
    Closed(Reply),
}

/// Bounded FIFO of replies.
pub struct ReplyQueue {
    state: Mutex<State>,
    capacity: usize,
    /// A reply arrived (one consumer: a stored permit is never lost).
    ready: Notify,
    /// A reply left, or the queue closed.
    room: Notify,
}

#[derive(Default)]
struct State {
    items: VecDeque<Reply>,
    closed: bool,
}

impl ReplyQueue {
    /// An empty queue of `capacity` replies; allocates nothing yet.
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity,
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    /// Queues `reply` unless the queue is full or closed.
    pub fn try_push(&self, reply: Reply) -> Result<(), PushError> {
        let mut state = self.state.lock().expect("reply queue");
        if state.closed {
            return Err(PushError::Closed(reply));
        }
        if state.items.len() >= self.capacity {
            return Err(PushError::Full(reply));
        }
        state.items.push_back(reply);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Queues `reply`, waiting for room; gives it back when the queue closes.
    pub async fn push(&self, mut reply: Reply) -> Result<(), Reply> {
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            match self.try_push(reply) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(back)) => return Err(back),
                Err(PushError::Full(back)) => reply = back,
            }
            room.await;
        }
    }

    /// The oldest reply, if any.
    pub fn try_pop(&self) -> Option<Reply> {
        let reply = self.state.lock().expect("reply queue").items.pop_front();
        if reply.is_some() {
            self.room.notify_one();
        }
        reply
    }

    /// Waits for the oldest reply; `None` once closed and empty. Cancel-safe: a reply is taken
    /// only by the poll that returns it.
    pub async fn pop(&self) -> Option<Reply> {
        loop {
            let mut ready = pin!(self.ready.notified());
            ready.as_mut().enable();
            if let Some(reply) = self.try_pop() {
                return Some(reply);
            }
            if self.state.lock().expect("reply queue").closed {
                return None;
            }
            ready.await;
        }
    }

    /// Refuses further replies and drops those waiting: the writer has ended.
    pub fn close(&self) {
        let mut state = self.state.lock().expect("reply queue");
        state.closed = true;
        state.items = VecDeque::new();
        drop(state);
        self.room.notify_waiters();
        self.ready.notify_one();
    }

    /// Replies waiting.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.state.lock().expect("reply queue").items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reply(n: u8) -> Reply {
        Reply::Frame(Bytes::from(vec![n]))
    }

    fn byte(r: Reply) -> u8 {
        match r {
            Reply::Frame(b) => b[0],
            _ => unreachable!(),
        }
    }

    #[tokio::test]
    async fn fifo_bounded_waits_for_room_and_closes() {
        let q = std::sync::Arc::new(ReplyQueue::new(2));
        assert!(q.try_push(reply(1)).is_ok());
        assert!(q.try_push(reply(2)).is_ok());
        assert!(matches!(q.try_push(reply(3)), Err(PushError::Full(_))));
        // A waiting push completes once the consumer takes one.
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.push(reply(3)).await.is_ok() })
        };
        tokio::task::yield_now().await;
        assert_eq!(byte(q.pop().await.unwrap()), 1);
        assert!(waiter.await.unwrap());
        assert_eq!(byte(q.pop().await.unwrap()), 2);
        assert_eq!(byte(q.try_pop().unwrap()), 3);
        assert_eq!(q.len(), 0);
        // A pop waiting on an empty queue wakes up on a push, and ends on close.
        let popper = {
            let q = q.clone();
            tokio::spawn(async move { q.pop().await.map(byte) })
        };
        tokio::task::yield_now().await;
        q.try_push(reply(4)).ok().unwrap();
        assert_eq!(popper.await.unwrap(), Some(4));
        q.close();
        assert!(q.pop().await.is_none());
        assert!(matches!(q.try_push(reply(5)), Err(PushError::Closed(_))));
    }
}
