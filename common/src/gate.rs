//! Admission before authentication: at most `cap` accepted connections of one listener may be
//! in their TLS handshake or request head at once, so a flood of idle connections cannot make
//! the process hold a task, a socket and buffers for each.
//!
//! When the gate is full, a new connection evicts the one that has waited longest, once that
//! one is older than [`EVICT_AFTER`]: a real client or agent finishes its handshake in
//! milliseconds, so what has sat in the gate for a second is almost always an idle or stalled
//! peer, and the newcomer gets its place. While every holder is younger than that (a burst of
//! real handshakes, e.g. a fleet of agents reconnecting at once), the listener waits instead of
//! evicting work that is about to finish: new connections queue in the kernel's backlog.
//! A flood therefore holds at most `cap` slots, for about a second each, and the handshake and
//! head deadline bounds every slot in any case.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a connection holds its slot before a newcomer may take it.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// Default cap per listener.
pub const DEFAULT_CAP: usize = 1024;

/// The admission gate of one listener.
#[derive(Debug)]
pub struct Gate {
    cap: usize,
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Holders by admission order: (admitted at, cancelled on eviction).
    holders: BTreeMap<u64, (Instant, CancellationToken)>,
    evicted: u64,
}

impl Gate {
    /// A gate letting `cap` (at least 1) connections through at once.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            state: Mutex::new(State::default()),
            freed: Notify::new(),
        })
    }

    /// Waits for a slot: a free one, or the oldest holder's once it is older than
    /// [`EVICT_AFTER`] (that holder's [`Ticket::evicted`] then fires).
    pub async fn admit(self: &Arc<Self>) -> Ticket {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let until = match self.try_admit() {
                Ok(ticket) => return ticket,
                Err(until) => until,
            };
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// A slot now, evicting the oldest holder if it may be; or when the oldest may be evicted.
    fn try_admit(self: &Arc<Self>) -> Result<Ticket, Instant> {
        let mut state = self.lock();
        let now = Instant::now();
        if state.holders.len() >= self.cap {
            let oldest = state
                .holders
                .first_entry()
                .expect("a full gate has holders");
            let since = oldest.get().0;
            if now.duration_since(since) < EVICT_AFTER {
                return Err(since + EVICT_AFTER);
            }
            oldest.remove().1.cancel();
            state.evicted += 1;
        }
        let id = state.next;
        state.next += 1;
        let evicted = CancellationToken::new();
        state.holders.insert(id, (now, evicted.clone()));
        Ok(Ticket {
            gate: self.clone(),
            id,
            evicted,
        })
    }

    /// Connections in the gate now.
    pub fn holders(&self) -> usize {
        self.lock().holders.len()
    }

    /// Connections evicted so far.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Held only for map operations that cannot panic halfway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's slot in the gate, given back on drop (when the connection is authenticated,
/// or ends).
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    evicted: CancellationToken,
}

impl Ticket {
    /// Fires if a newer connection took this slot: the connection should be closed.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }

    /// Starts this slot's clock now: a listener takes its ticket before it waits in `accept`,
    /// which may be long, and the connection it accepts must not inherit that wait as age.
    pub fn renew(&mut self) {
        let mut state = self.gate.lock();
        if let Some(entry) = state.holders.remove(&self.id) {
            self.id = state.next;
            state.next += 1;
            state.holders.insert(self.id, (Instant::now(), entry.1));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.gate.lock().holders.remove(&self.id).is_some() {
            self.gate.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_gate_evicts_the_oldest_holder_only_once_it_is_old_enough() {
        let gate = Gate::new(2);
        let first = gate.admit().await;
        let second = gate.admit().await;
        assert_eq!(gate.holders(), 2);
        let started = Instant::now();
        let third = gate.admit().await;
        assert_eq!(
            started.elapsed(),
            EVICT_AFTER,
            "waited for the oldest to age"
        );
        assert!(first.evicted().is_cancelled());
        assert!(!second.evicted().is_cancelled());
        assert_eq!((gate.holders(), gate.evicted()), (2, 1));
        drop(first);
        assert_eq!(
            gate.holders(),
            2,
            "an evicted ticket's drop frees nothing twice"
        );
        drop((second, third));
        assert_eq!(gate.holders(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_ticket_is_the_youngest() {
        let gate = Gate::new(2);
        let mut waited_in_accept = gate.admit().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let other = gate.admit().await;
        waited_in_accept.renew();
        tokio::time::sleep(EVICT_AFTER).await;
        let _third = gate.admit().await;
        assert!(other.evicted().is_cancelled(), "the oldest by its clock");
        assert!(!waited_in_accept.evicted().is_cancelled());
        drop(waited_in_accept);
        assert_eq!(gate.holders(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_given_back_admits_a_waiter_at_once() {
        let gate = Gate::new(1);
        let first = gate.admit().await;
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        let started = Instant::now();
        drop(first);
        let second = waiter.await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(10));
        assert!(!second.evicted().is_cancelled());
        assert_eq!(gate.evicted(), 0);
    }
}
