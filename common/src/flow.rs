//! Per-connection flow control above HTTP/2: each direction of each tunneled connection has its
//! own receive window, granted by the receiver as credit and sized by what the connection does.
//!
//! Why not HTTP/2's windows: h2 cannot grow one stream's window past the connection's initial
//! window size, so a fixed stream window either caps a connection on a WAN (window / RTT) or lets
//! a few dozen stalled clients pin the whole connection window and freeze every other tunneled
//! connection of the agent. hyper's adaptive window sizes all streams alike. So the receiver
//! grants credit itself, in `Chunk.credit` (the absolute byte offset the peer may send up to,
//! like QUIC's MAX_STREAM_DATA), and h2's own windows are set large enough never to bind first.
//!
//! The rule, per direction of one tunneled connection (see [`RecvWindow`]):
//! - the window starts at [`MIN_WINDOW`];
//! - it doubles (up to [`MAX_WINDOW`]) when the sender says it used up its credit and waited
//!   (`Chunk.blocked`, like QUIC's STREAM_DATA_BLOCKED) while every write to the local socket
//!   went through at once: the window, not the consumer, was the limit, which is a window below
//!   bandwidth × round trip (TCP autotuning's signal, without a clock);
//! - it halves (down to [`MIN_WINDOW`]) when writes to the local socket waited [`SLOW_READER`]
//!   or more since the last grant: the consumer is the limit, and a stalled consumer should pin
//!   little;
//! - every byte above [`MIN_WINDOW`] is drawn from the agent connection's [`Budget`]. What
//!   stalled connections can pin is therefore at most `connections × MIN_WINDOW + budget` per
//!   agent connection and side; when the budget is spent, windows stop growing (logged), and the
//!   connections that keep draining get the budget back as the stalled ones shrink.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Window every connection starts with and never goes below: enough for a LAN round trip at
/// several Gbit/s, little enough that thousands of stalled connections pin a bounded amount.
pub const MIN_WINDOW: u64 = 128 * 1024;

/// Largest window of one connection: 10 Gbit/s across a 50 ms round trip.
pub const MAX_WINDOW: u64 = 64 * 1024 * 1024;

/// Writes to the local socket that waited less than this in total since the last grant do not
/// count as a slow reader: a busy scheduler makes any socket wait a little now and then.
pub const SLOW_READER: Duration = Duration::from_millis(20);

/// Default budget of window above [`MIN_WINDOW`] per agent connection and side.
pub const DEFAULT_BUDGET: u64 = 512 * 1024 * 1024;

/// Window bytes above [`MIN_WINDOW`] that the connections of one agent connection may hold.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    exhausted: AtomicBool,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            exhausted: AtomicBool::new(false),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn try_take(&self, n: u64) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= self.limit).then_some(used + n)
            })
            .is_ok();
        if !taken && !self.exhausted.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                budget = self.limit,
                "flow-control budget of this agent connection spent: windows stop growing until \
                 stalled connections drain (see --window-budget)"
            );
        }
        taken
    }

    fn give_back(&self, n: u64) {
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        if before - n < self.limit / 2 {
            self.exhausted.store(false, Ordering::Release);
        }
    }
}

/// The peer sent more than its credit.
#[derive(Debug, thiserror::Error)]
#[error("the peer sent {received} bytes against a credit of {limit}")]
pub struct Overrun {
    /// Bytes received.
    pub received: u64,
    /// Credit granted.
    pub limit: u64,
}

/// The receiving side of one direction: counts bytes in and out and decides the credit.
#[derive(Debug)]
pub struct RecvWindow {
    budget: Arc<Budget>,
    window: u64,
    limit: u64,
    received: u64,
    consumed: u64,
    waited: Duration,
    starved: bool,
}

impl RecvWindow {
    /// A window of [`MIN_WINDOW`], growing out of `budget`. The peer knows the initial credit.
    pub fn new(budget: Arc<Budget>) -> Self {
        Self {
            budget,
            window: MIN_WINDOW,
            limit: MIN_WINDOW,
            received: 0,
            consumed: 0,
            waited: Duration::ZERO,
            starved: false,
        }
    }

    /// The window now.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// `n` bytes arrived, `blocked` if the peer had waited for credit before sending them;
    /// refused if the peer had no credit for them.
    pub fn on_data(&mut self, n: u64, blocked: bool) -> Result<(), Overrun> {
        self.starved |= blocked;
        self.received += n;
        if self.received > self.limit {
            return Err(Overrun {
                received: self.received,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// A write to the local socket had to wait this long: the consumer may be slower than the
    /// tunnel.
    pub fn on_write_waited(&mut self, wait: Duration) {
        self.waited += wait;
    }

    /// `n` bytes were written to the local socket. Returns the new credit to send, if any.
    pub fn on_consumed(&mut self, n: u64) -> Option<u64> {
        self.consumed += n;
        let half_free = self.limit - self.consumed <= self.window / 2;
        let slow_reader = self.waited >= SLOW_READER;
        if self.starved && !slow_reader {
            self.resize(self.window.saturating_mul(2));
        } else if slow_reader && (self.starved || half_free) {
            self.resize(self.window / 2);
        }
        // Grant when half the window is free (batched, like h2's WINDOW_UPDATE threshold), or
        // at once when the peer is waiting for it.
        if self.starved || self.limit - self.consumed <= self.window / 2 {
            self.waited = Duration::ZERO;
            self.starved = false;
            let limit = self.consumed + self.window;
            if limit > self.limit {
                self.limit = limit;
                return Some(limit);
            }
        }
        None
    }

    fn resize(&mut self, want: u64) {
        let want = want.clamp(MIN_WINDOW, MAX_WINDOW);
        if want > self.window {
            if self.budget.try_take(want - self.window) {
                self.window = want;
            }
        } else if want < self.window {
            self.budget.give_back(self.window - want);
            self.window = want;
        }
    }
}

impl Drop for RecvWindow {
    fn drop(&mut self) {
        self.budget.give_back(self.window - MIN_WINDOW);
    }
}

/// The sending side of one direction: the credit the peer granted, shared between the half that
/// receives credit and the half that sends bytes.
#[derive(Debug)]
pub struct SendCredit {
    limit: AtomicU64,
    changed: Notify,
}

impl Default for SendCredit {
    fn default() -> Self {
        Self {
            limit: AtomicU64::new(MIN_WINDOW),
            changed: Notify::new(),
        }
    }
}

impl SendCredit {
    /// The peer granted credit up to `limit` (credit only grows).
    pub fn grant(&self, limit: u64) {
        if self.limit.fetch_max(limit, Ordering::AcqRel) < limit {
            self.changed.notify_one();
        }
    }

    /// Waits until more than `sent` bytes may be sent; returns how many, and whether it had to
    /// wait (the peer is told: it is the signal that grows the window).
    pub async fn available(&self, sent: u64) -> (u64, bool) {
        let mut waited = false;
        loop {
            let notified = self.changed.notified();
            let limit = self.limit.load(Ordering::Acquire);
            if limit > sent {
                return (limit - sent, waited);
            }
            waited = true;
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a window as a fast consumer across a long round trip would: the peer sends its
    /// whole credit, then waits for more (and says so); we write it all without waiting.
    fn fast_rounds(w: &mut RecvWindow, rounds: usize) {
        for _ in 0..rounds {
            let credit = w.limit - w.received;
            w.on_data(credit, true).unwrap();
            w.on_consumed(credit);
        }
    }

    #[test]
    fn a_window_limited_connection_doubles_up_to_the_maximum() {
        let budget = Budget::new(DEFAULT_BUDGET);
        let mut w = RecvWindow::new(budget.clone());
        fast_rounds(&mut w, 1);
        assert_eq!(w.window(), 2 * MIN_WINDOW);
        fast_rounds(&mut w, 20);
        assert_eq!(w.window(), MAX_WINDOW);
        assert_eq!(budget.used(), MAX_WINDOW - MIN_WINDOW);
        drop(w);
        assert_eq!(
            budget.used(),
            0,
            "a closed connection gives its window back"
        );
    }

    #[test]
    fn a_stalled_consumer_shrinks_and_never_grows() {
        let budget = Budget::new(DEFAULT_BUDGET);
        let mut w = RecvWindow::new(budget.clone());
        fast_rounds(&mut w, 6);
        let grown = w.window();
        assert_eq!(grown, 64 * MIN_WINDOW);
        // The client stops reading: writes wait, the peer runs out of credit.
        for _ in 0..10 {
            let credit = w.limit - w.received;
            w.on_data(credit, true).unwrap();
            w.on_write_waited(Duration::from_secs(1));
            w.on_consumed(credit);
        }
        assert_eq!(w.window(), MIN_WINDOW);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn credit_is_granted_at_half_window_and_overruns_are_refused() {
        let mut w = RecvWindow::new(Budget::new(DEFAULT_BUDGET));
        w.on_data(1000, false).unwrap();
        assert_eq!(w.on_consumed(1000), None, "batched");
        let half = MIN_WINDOW / 2;
        w.on_data(half - 1000, false).unwrap();
        assert_eq!(w.on_consumed(half - 1000), Some(half + MIN_WINDOW));
        assert_eq!(w.window(), MIN_WINDOW, "the sender never waited: no growth");
        let err = w.on_data(MIN_WINDOW + 1, false).unwrap_err();
        assert_eq!(err.limit, half + MIN_WINDOW);
    }

    #[test]
    fn the_budget_caps_growth_across_connections() {
        let budget = Budget::new(4 * MIN_WINDOW);
        let mut a = RecvWindow::new(budget.clone());
        let mut b = RecvWindow::new(budget.clone());
        fast_rounds(&mut a, 2);
        assert_eq!(a.window(), 4 * MIN_WINDOW);
        fast_rounds(&mut b, 5);
        assert_eq!(b.window(), 2 * MIN_WINDOW, "only what the budget had left");
        assert_eq!(budget.used(), budget.limit());
        drop(a);
        fast_rounds(&mut b, 2);
        assert_eq!(
            b.window(),
            4 * MIN_WINDOW,
            "given back, then taken by the other"
        );
    }

    #[test]
    fn a_sender_that_keeps_up_never_grows_the_window() {
        let mut w = RecvWindow::new(Budget::new(DEFAULT_BUDGET));
        // Lots of traffic, but credit always arrives before the sender runs out.
        for _ in 0..100 {
            w.on_data(16 * 1024, false).unwrap();
            w.on_consumed(16 * 1024);
        }
        assert_eq!(w.window(), MIN_WINDOW);
    }

    #[tokio::test]
    async fn send_credit_wakes_the_sender() {
        let credit = Arc::new(SendCredit::default());
        assert_eq!(credit.available(0).await, (MIN_WINDOW, false));
        let waiter = {
            let credit = credit.clone();
            tokio::spawn(async move { credit.available(MIN_WINDOW).await })
        };
        tokio::task::yield_now().await;
        credit.grant(MIN_WINDOW + 10);
        assert_eq!(waiter.await.unwrap(), (10, true), "it waited");
        credit.grant(5);
        assert_eq!(
            credit.available(0).await,
            (MIN_WINDOW + 10, false),
            "credit never shrinks"
        );
    }
}
