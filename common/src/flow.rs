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
//!   (`Chunk.blocked_at`, like QUIC's STREAM_DATA_BLOCKED) while every write to the local socket
//!   went through at once, and the window is still below about twice what the connection moves
//!   in one round trip (Linux's receive-buffer autotuning rule): the window, not the consumer, was
//!   the limit. The round trip is timed from the grant that released a waiting sender to its
//!   next chunk (the smallest sample counts); what moves in one is measured between two such
//!   waits. So windows stay a few hundred KiB on a LAN, where a connection that later stalls
//!   should pin little, and grow to bandwidth × delay across a WAN;
//! - it halves (down to [`MIN_WINDOW`]) when writes to the local socket waited [`SLOW_READER`]
//!   or more since the last grant: the consumer is the limit, and a stalled consumer should pin
//!   little;
//! - every byte above [`MIN_WINDOW`] is drawn from the agent connection's [`Budget`]. What
//!   stalled connections can pin is therefore at most `connections × MIN_WINDOW + budget` per
//!   agent connection and side; when the budget is spent, windows stop growing (logged), and the
//!   connections that keep draining get the budget back as the stalled ones shrink;
//! - every window byte, the [`MIN_WINDOW`] floors included, is also counted in the process's
//!   [`Pool`] (`--max-buffered`): beyond its bound windows stop growing, and new connections are
//!   refused before they start (each binary checks [`Pool::admits`] where it admits one), so what
//!   all connections of the process can pin stays under the bound whatever `--max-connections`
//!   says.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

mod budget;

pub use budget::{Budget, Pool};

/// Window every connection starts with and never goes below: measured, a connection at this
/// window alone moves as fast across loopback as one whose window grows, so connections that
/// stall and spend the budget never slow a healthy one on a LAN; and little enough that
/// thousands of stalled connections pin a bounded amount.
pub const MIN_WINDOW: u64 = 256 * 1024;

/// Largest window of one connection: 10 Gbit/s across a 50 ms round trip.
pub const MAX_WINDOW: u64 = 64 * 1024 * 1024;

/// Writes to the local socket that waited less than this in total since the last grant do not
/// count as a slow reader: a busy scheduler makes any socket wait a little now and then.
pub const SLOW_READER: Duration = Duration::from_millis(20);

/// Default budget of window above [`MIN_WINDOW`] per agent connection and side.
pub const DEFAULT_BUDGET: u64 = 256 * 1024 * 1024;

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
    /// Recent grants (limit, when), to time the one that releases a waiting sender.
    grants: std::collections::VecDeque<(u64, Instant)>,
    /// Smallest round trip seen.
    min_rtt: Option<Duration>,
    /// When the sender last reported a wait, and what had been consumed then.
    round_start: Option<(Instant, u64)>,
    /// Bytes the connection moves in one round trip, measured between two waits.
    per_rtt: Option<u64>,
}

/// Grants remembered for round-trip timing: more than are ever in flight at once.
const GRANT_HISTORY: usize = 16;

impl RecvWindow {
    /// A window of [`MIN_WINDOW`], growing out of `budget`. The peer knows the initial credit.
    pub fn new(budget: Arc<Budget>) -> Self {
        budget.pool().take_floor();
        Self {
            budget,
            window: MIN_WINDOW,
            limit: MIN_WINDOW,
            received: 0,
            consumed: 0,
            waited: Duration::ZERO,
            starved: false,
            // Allocated at the first grant: an idle connection never makes one.
            grants: std::collections::VecDeque::new(),
            min_rtt: None,
            round_start: None,
            per_rtt: None,
        }
    }

    /// The window now.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// `n` bytes arrived; `blocked_at` nonzero if the peer had run out of credit at that offset
    /// and waited before sending them. Refused if the peer had no credit for them.
    pub fn on_data(&mut self, n: u64, blocked_at: u64) -> Result<(), Overrun> {
        if blocked_at > 0 {
            self.on_sender_waited(blocked_at);
        }
        self.received += n;
        if self.received > self.limit {
            return Err(Overrun {
                received: self.received,
                limit: self.limit,
            });
        }
        Ok(())
    }

    fn on_sender_waited(&mut self, blocked_at: u64) {
        self.starved = true;
        let now = Instant::now();
        // The first grant past where it stopped is the one that let it go on.
        if let Some(&(_, at)) = self.grants.iter().find(|(limit, _)| *limit > blocked_at) {
            let rtt = now.duration_since(at);
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        if let (Some((start, consumed)), Some(rtt)) = (self.round_start, self.min_rtt) {
            let round = now.duration_since(start).max(rtt);
            let moved = self.consumed - consumed;
            self.per_rtt = Some((moved as f64 * rtt.as_secs_f64() / round.as_secs_f64()) as u64);
        }
        self.round_start = Some((now, self.consumed));
    }

    /// A write to the local socket had to wait this long: the consumer may be slower than the
    /// tunnel.
    pub fn on_write_waited(&mut self, wait: Duration) {
        self.waited += wait;
    }

    /// `n` bytes were written to the local socket. Returns the new credit to send, if any.
    ///
    /// The window is resized only where credit is due (half the window free, or the sender
    /// waiting), once per such point: what the writes waited is judged per grant, so one slow
    /// stretch halves the window once, not once per chunk written after it.
    pub fn on_consumed(&mut self, n: u64) -> Option<u64> {
        self.consumed += n;
        // Grant when half the window is free (batched, like h2's WINDOW_UPDATE threshold), or
        // at once when the peer is waiting for it.
        if !self.starved && self.limit - self.consumed > self.window / 2 {
            return None;
        }
        if self.waited >= SLOW_READER {
            self.resize((self.window / 2).max(self.floor()));
        } else if self.starved && self.window < self.needed() {
            self.resize(self.window.saturating_mul(2));
        }
        self.waited = Duration::ZERO;
        self.starved = false;
        let limit = self.consumed + self.window;
        if limit <= self.limit {
            return None;
        }
        if self.grants.len() == GRANT_HISTORY {
            self.grants.pop_front();
        }
        self.grants.push_back((limit, Instant::now()));
        self.limit = limit;
        Some(limit)
    }

    /// Four times what this connection moves in one round trip, measured between waits (which
    /// underestimates it by up to half while the window is the limit, so four leaves the
    /// window about twice bandwidth × delay, as Linux's autotuning does; measured across 20 ms,
    /// 1.55-1.93 Gbit/s against 1.37-1.58 with a factor of two). Unbounded until measured: the
    /// first rounds are slow start.
    fn needed(&self) -> u64 {
        self.per_rtt.map_or(u64::MAX, |b| b.saturating_mul(4))
    }

    /// How far a slow reader's window shrinks at most: twice what it moved per round trip when
    /// last measured. A reader that is only a little slower than the tunnel (a busy client, a
    /// short pause) keeps a window that still covers the path's delay; one that really slowed
    /// down or stopped moved little in its last rounds and shrinks towards [`MIN_WINDOW`].
    fn floor(&self) -> u64 {
        self.per_rtt.map_or(MIN_WINDOW, |b| b.saturating_mul(2))
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
        tracing::debug!(
            window = self.window,
            per_rtt = self.per_rtt,
            min_rtt_us = self.min_rtt.map(|r| r.as_micros() as u64),
            consumed = self.consumed,
            waited_us = self.waited.as_micros() as u64,
            "window resized"
        );
    }
}

impl Drop for RecvWindow {
    fn drop(&mut self) {
        self.budget.give_back(self.window - MIN_WINDOW);
        self.budget.pool().give_back(MIN_WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bulk transfer for `total` over a link of `rtt` and `capacity` bytes/s, simulated
    /// event by event: the sender sends 64 KiB chunks while it has credit (flagging the first
    /// after a wait), each arrives half a round trip later and is written out at once, and
    /// each grant reaches the sender half a round trip after it is made.
    async fn transfer(w: &mut RecvWindow, rtt: Duration, capacity: f64, total: Duration) {
        use std::collections::VecDeque;
        let one_way = rtt / 2;
        let end = Instant::now() + total;
        let (mut known, mut sent, mut blocked) = (w.limit, 0u64, false);
        let mut link_free = Instant::now();
        let mut data: VecDeque<(Instant, u64, u64)> = VecDeque::new();
        let mut grants: VecDeque<(Instant, u64)> = VecDeque::new();
        loop {
            let now = Instant::now();
            if now >= end {
                return;
            }
            while let Some(&(_, limit)) = grants.front().filter(|(t, _)| *t <= now) {
                known = known.max(limit);
                grants.pop_front();
            }
            if sent < known && link_free <= now {
                let n = (known - sent).min(64 * 1024);
                link_free = now + Duration::from_secs_f64(n as f64 / capacity);
                let at = if std::mem::take(&mut blocked) {
                    sent
                } else {
                    0
                };
                data.push_back((link_free + one_way, n, at));
                sent += n;
                continue;
            }
            blocked |= sent >= known;
            if let Some(&(_, n, b)) = data.front().filter(|(t, _, _)| *t <= now) {
                data.pop_front();
                w.on_data(n, b).unwrap();
                if let Some(limit) = w.on_consumed(n) {
                    grants.push_back((now + one_way, limit));
                }
                continue;
            }
            let next = [
                data.front().map(|d| d.0),
                grants.front().map(|g| g.0),
                (sent < known).then_some(link_free),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end);
            let step = next.saturating_duration_since(now);
            tokio::time::advance(step.max(Duration::from_micros(1))).await;
        }
    }

    const WAN: Duration = Duration::from_millis(20);
    const LAN: Duration = Duration::from_micros(200);
    const TEN_GBIT: f64 = 1.25e9;

    #[tokio::test(start_paused = true)]
    async fn a_window_limited_connection_doubles_up_to_the_maximum() {
        let budget = Budget::new(DEFAULT_BUDGET);
        let mut w = RecvWindow::new(budget.clone());
        transfer(&mut w, WAN, TEN_GBIT, Duration::from_secs(2)).await;
        // 10 Gbit/s x 20 ms = 25 MB in flight.
        assert!(w.window() >= 32 << 20, "{}", w.window());
        assert_eq!(budget.used(), w.window() - MIN_WINDOW);
        drop(w);
        assert_eq!(
            budget.used(),
            0,
            "a closed connection gives its window back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn on_a_lan_the_window_stops_at_twice_bandwidth_times_delay() {
        let mut w = RecvWindow::new(Budget::new(DEFAULT_BUDGET));
        transfer(&mut w, LAN, TEN_GBIT, Duration::from_secs(1)).await;
        // 10 Gbit/s x 200 us = 250 KB: a window of 1 MiB at most, not 64 MiB.
        assert!(w.window() <= 8 * MIN_WINDOW, "{}", w.window());
        assert!(w.window() >= 2 * MIN_WINDOW, "{}", w.window());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_consumer_shrinks_and_never_grows() {
        let budget = Budget::new(DEFAULT_BUDGET);
        let mut w = RecvWindow::new(budget.clone());
        // Slow start: a doubling every other round trip.
        transfer(&mut w, WAN, TEN_GBIT, Duration::from_millis(150)).await;
        assert!(w.window() >= 8 * MIN_WINDOW, "{}", w.window());
        // The client reads slowly: each window takes a second to write out, and the peer
        // runs out of credit meanwhile.
        for _ in 0..10 {
            let credit = w.limit - w.received;
            tokio::time::advance(WAN).await;
            w.on_data(credit, w.limit - credit).unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
            w.on_write_waited(Duration::from_secs(1));
            w.on_consumed(credit);
        }
        assert_eq!(w.window(), MIN_WINDOW);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn one_slow_stretch_halves_the_window_once_and_not_below_what_it_moves() {
        let mut w = RecvWindow::new(Budget::new(DEFAULT_BUDGET));
        transfer(&mut w, WAN, TEN_GBIT, Duration::from_secs(1)).await;
        let grown = w.window();
        assert!(grown >= 32 << 20, "{grown}");
        // A busy client: its writes waited 30 ms in all, then it keeps up again. Every chunk
        // written after that is a point where the window could be judged; it is judged once.
        w.on_write_waited(Duration::from_millis(30));
        for _ in 0..1000 {
            let n = 64 * 1024;
            w.on_data(n, 0).unwrap();
            w.on_consumed(n);
        }
        assert_eq!(w.window(), grown / 2, "halved once, not once per chunk");
        // Still slow: it shrinks again, but not below twice what it moved per round trip.
        for _ in 0..10 {
            w.on_write_waited(Duration::from_millis(30));
            let n = w.limit - w.received;
            w.on_data(n, 0).unwrap();
            w.on_consumed(n);
        }
        let floor = 2 * w.per_rtt.unwrap();
        assert_eq!(w.window(), floor.clamp(MIN_WINDOW, grown / 2));
        assert!(w.window() > MIN_WINDOW, "{}", w.window());
    }

    #[tokio::test(start_paused = true)]
    async fn credit_is_granted_at_half_window_and_overruns_are_refused() {
        let mut w = RecvWindow::new(Budget::new(DEFAULT_BUDGET));
        w.on_data(1000, 0).unwrap();
        assert_eq!(w.on_consumed(1000), None, "batched");
        let half = MIN_WINDOW / 2;
        w.on_data(half - 1000, 0).unwrap();
        assert_eq!(w.on_consumed(half - 1000), Some(half + MIN_WINDOW));
        assert_eq!(w.window(), MIN_WINDOW, "the sender never waited: no growth");
        let err = w.on_data(MIN_WINDOW + 1, 0).unwrap_err();
        assert_eq!(err.limit, half + MIN_WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_that_keeps_up_never_grows_the_window() {
        let mut w = RecvWindow::new(Budget::new(DEFAULT_BUDGET));
        // Lots of traffic, but credit always arrives before the sender runs out.
        for _ in 0..100 {
            tokio::time::advance(Duration::from_micros(50)).await;
            w.on_data(16 * 1024, 0).unwrap();
            w.on_consumed(16 * 1024);
        }
        assert_eq!(w.window(), MIN_WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_growth_across_connections() {
        let budget = Budget::new(4 * MIN_WINDOW);
        let mut a = RecvWindow::new(budget.clone());
        let mut b = RecvWindow::new(budget.clone());
        transfer(&mut a, WAN, TEN_GBIT, Duration::from_secs(1)).await;
        assert_eq!(a.window(), 4 * MIN_WINDOW, "as far as the budget goes");
        transfer(&mut b, WAN, TEN_GBIT, Duration::from_secs(1)).await;
        assert_eq!(b.window(), 2 * MIN_WINDOW, "only what the budget had left");
        assert_eq!(budget.used(), budget.limit());
        drop(a);
        transfer(&mut b, WAN, TEN_GBIT, Duration::from_secs(1)).await;
        assert_eq!(
            b.window(),
            4 * MIN_WINDOW,
            "given back, then taken by the other"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_counts_floors_caps_growth_across_budgets_and_refuses_new_connections() {
        let pool = Pool::new(5 * MIN_WINDOW);
        // Two agent connections with ample budgets of their own: the pool binds first.
        let one = Budget::within(DEFAULT_BUDGET, pool.clone());
        let two = Budget::within(DEFAULT_BUDGET, pool.clone());
        let mut a = RecvWindow::new(one.clone());
        let mut b = RecvWindow::new(two.clone());
        assert_eq!(pool.used(), 2 * MIN_WINDOW, "floors count");
        transfer(&mut a, WAN, TEN_GBIT, Duration::from_secs(1)).await;
        assert_eq!(a.window(), 4 * MIN_WINDOW, "as far as the pool goes");
        transfer(&mut b, WAN, TEN_GBIT, Duration::from_secs(1)).await;
        assert_eq!(b.window(), MIN_WINDOW, "the pool is spent: no growth");
        assert_eq!(pool.used(), pool.limit());
        assert!(!pool.admits(), "a new connection's floor does not fit");
        assert_eq!(
            two.used(),
            0,
            "a refused growth leaves the budget as it was"
        );
        // A connection that ends gives its floor and growth back to both.
        drop(a);
        assert!(pool.admits());
        transfer(&mut b, WAN, TEN_GBIT, Duration::from_secs(1)).await;
        assert_eq!(
            b.window(),
            4 * MIN_WINDOW,
            "given back, then taken by the other"
        );
        drop(b);
        assert_eq!(pool.used(), 0, "every byte given back");
        assert_eq!((one.used(), two.used()), (0, 0));
    }
}
