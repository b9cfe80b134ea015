//! The queue of control messages towards one agent: bounded, many senders (the agent's handle,
//! dials cancelling themselves), one receiver (the control stream's sending half).
//!
//! Not `tokio::sync::mpsc`: its shared state is cache-padded (half a KiB) and it allocates a
//! first block of 32 slots up front, together 0.8 KiB for every connected agent, for a queue
//! that is almost always empty. This one is one small allocation, and its buffer grows only
//! while messages wait and is given back once they are gone. Room is a `Semaphore` of one permit
//! per free slot, as in tokio's own queue: senders waiting for room are served first come,
//! first served, and a `try_send` cannot take a slot a waiting sender is owed.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use tokio::sync::{Semaphore, TryAcquireError};

/// A buffer that grew beyond this many messages is given back once it is empty again.
const KEEP: usize = 4;

struct Shared<T> {
    state: Mutex<State<T>>,
    /// A permit per free slot; closed when the receiver goes.
    room: Semaphore,
}

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    /// The receiver is gone: nothing more is accepted.
    closed: bool,
    /// The receiver waiting for a message.
    reader: Option<Waker>,
}

/// A bounded queue of `capacity` messages.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    assert!(capacity > 0, "a control queue needs room for a message");
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            closed: false,
            reader: None,
        }),
        room: Semaphore::new(capacity),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing here panics while holding the lock; a poisoned lock still holds a sound queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side; cloned freely.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// The queue holds `capacity` messages.
    Full,
    /// The receiver is gone.
    Closed,
}

impl<T> Sender<T> {
    /// Queues `msg` if there is room.
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError> {
        match self.shared.room.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::NoPermits) => return Err(TrySendError::Full),
            Err(TryAcquireError::Closed) => return Err(TrySendError::Closed),
        }
        self.push(msg).map_err(|_| TrySendError::Closed)
    }

    /// Queues `msg`, waiting while the queue is full; `Err` with the message if the receiver
    /// is gone. Dropped while waiting, it gives up its place in the line and sends nothing.
    pub async fn send(&self, msg: T) -> Result<(), T> {
        match self.shared.room.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_closed) => return Err(msg),
        }
        self.push(msg)
    }

    /// Queues `msg` into the slot whose permit the caller took.
    fn push(&self, msg: T) -> Result<(), T> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(msg);
        }
        state.items.push_back(msg);
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        // The last sender gone ends the receiver's stream once it has taken what is queued.
        let reader = (state.senders == 0).then(|| state.reader.take()).flatten();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("control::Sender").finish_non_exhaustive()
    }
}

/// The receiving side: a stream of the queued messages, ending once every sender is gone.
/// Dropping it refuses further messages and wakes the senders waiting for room.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next queued message, if one is (tests).
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<T> {
        let msg = self.shared.lock().items.pop_front();
        if msg.is_some() {
            self.shared.room.add_permits(1);
        }
        msg
    }
}

impl<T> Stream for Receiver<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let shared = &self.shared;
        let mut state = shared.lock();
        match state.items.pop_front() {
            Some(msg) => {
                let freed = (state.items.is_empty() && state.items.capacity() > KEEP)
                    .then(|| std::mem::take(&mut state.items));
                drop(state);
                drop(freed);
                shared.room.add_permits(1);
                Poll::Ready(Some(msg))
            }
            None if state.senders == 0 => Poll::Ready(None),
            None => {
                let stale = match &state.reader {
                    Some(w) if w.will_wake(cx.waker()) => None,
                    _ => state.reader.replace(cx.waker().clone()),
                };
                drop(state);
                drop(stale);
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closed = true;
        // What was queued is never sent: free it now, not when the last sender goes.
        let dropped = std::mem::take(&mut state.items);
        drop(state);
        drop(dropped);
        // Senders waiting for room get `Err` now.
        self.shared.room.close();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn messages_arrive_in_order_and_the_stream_ends_with_the_last_sender() {
        let (tx, mut rx) = channel(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        tx2.send(2).await.unwrap();
        drop(tx);
        assert_eq!(rx.next().await, Some(1));
        assert_eq!(rx.next().await, Some(2));
        // One sender left: the stream waits.
        let waiting = tokio::time::timeout(Duration::from_millis(50), rx.next()).await;
        assert!(waiting.is_err(), "the stream ended with a sender left");
        let reader = tokio::spawn(async move { rx.next().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!reader.is_finished());
        tx2.try_send(3).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), reader).await;
        assert_eq!(got.expect("receiver not woken").unwrap(), Some(3));
    }

    #[tokio::test]
    async fn the_last_sender_leaving_wakes_a_waiting_receiver() {
        let (tx, mut rx) = channel::<u8>(4);
        let reader = tokio::spawn(async move { rx.next().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!reader.is_finished());
        drop(tx);
        let end = tokio::time::timeout(Duration::from_secs(5), reader).await;
        assert_eq!(end.expect("receiver not woken").unwrap(), None);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_try_send_and_makes_send_wait_for_room() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.send(3).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "send did not wait for room");
        assert_eq!(rx.next().await, Some(1));
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(sent.expect("sender not woken").unwrap(), Ok(()));
        assert_eq!(rx.next().await, Some(2));
        assert_eq!(rx.next().await, Some(3));
    }

    #[tokio::test]
    async fn many_waiting_senders_all_get_through() {
        let (tx, mut rx) = channel(1);
        tx.try_send(0).unwrap();
        let senders: Vec<_> = (1..=20)
            .map(|i| {
                let tx = tx.clone();
                tokio::spawn(async move { tx.send(i).await })
            })
            .collect();
        drop(tx);
        let mut got = Vec::new();
        while let Some(msg) = tokio::time::timeout(Duration::from_secs(5), rx.next())
            .await
            .expect("a waiting sender was never woken")
        {
            got.push(msg);
        }
        for sender in senders {
            assert_eq!(sender.await.unwrap(), Ok(()));
        }
        got.sort_unstable();
        assert_eq!(got, (0..=20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn waiting_senders_are_served_in_the_order_they_came_and_try_send_cannot_jump_the_line() {
        let (tx, mut rx) = channel(1);
        tx.try_send(0).unwrap();
        let mut waiting = Vec::new();
        for i in 1..=3 {
            let tx = tx.clone();
            waiting.push(tokio::spawn(async move { tx.send(i).await }));
            // In line before the next one comes.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // One more in line, then gone: its place passes on, nothing of it is sent.
        let quitter = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(100).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        quitter.abort();
        let _ = quitter.await;
        let last = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(4).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(rx.next().await, Some(0));
        // The slot just freed is owed to the first sender in line.
        assert_eq!(tx.try_send(99), Err(TrySendError::Full));
        for expected in 1..=4 {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.next()).await;
            assert_eq!(
                got.expect("a waiting sender was never woken"),
                Some(expected)
            );
        }
        for sender in waiting.into_iter().chain([last]) {
            assert_eq!(sender.await.unwrap(), Ok(()));
        }
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn senders_on_many_threads_get_every_message_through_in_order() {
        const SENDERS: u32 = 8;
        const EACH: u32 = 2_000;
        let (tx, rx) = channel(4);
        for s in 0..SENDERS {
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    if i % 3 == 0 {
                        // Mixed with try_send, retried: both paths under contention.
                        while tx.try_send((s, i)) == Err(TrySendError::Full) {
                            tokio::task::yield_now().await;
                        }
                    } else {
                        tx.send((s, i)).await.unwrap();
                    }
                }
            });
        }
        drop(tx);
        let got: Vec<(u32, u32)> = tokio::time::timeout(Duration::from_secs(30), rx.collect())
            .await
            .expect("the queue stalled");
        assert_eq!(got.len(), (SENDERS * EACH) as usize);
        let mut next = vec![0; SENDERS as usize];
        for (s, i) in got {
            assert_eq!(i, next[s as usize], "sender {s}'s messages out of order");
            next[s as usize] += 1;
        }
    }

    #[tokio::test]
    async fn a_dropped_receiver_refuses_messages_frees_the_queued_and_wakes_waiting_senders() {
        let (tx, rx) = channel(1);
        let queued = Arc::new(());
        tx.try_send(queued.clone()).unwrap();
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.send(Arc::new(())).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(rx);
        assert_eq!(
            Arc::strong_count(&queued),
            1,
            "a queued message outlived the receiver"
        );
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(sent.expect("sender not woken").unwrap().is_err());
        assert_eq!(tx.try_send(queued), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn a_buffer_that_grew_is_given_back_once_empty() {
        let (tx, mut rx) = channel(256);
        for i in 0..100 {
            tx.try_send(i).unwrap();
        }
        assert!(rx.shared.lock().items.capacity() >= 100);
        for _ in 0..100 {
            rx.next().await.unwrap();
        }
        assert_eq!(rx.shared.lock().items.capacity(), 0);
    }
}
