//! What windows draw from: the [`Budget`] of one agent connection (`--window-budget`: window
//! above the floor, per side) and the process's [`Pool`] (`--max-buffered`: every window byte,
//! floors included). Each counts what it lends and logs once when it runs dry; the windows
//! themselves ([`super::RecvWindow`]) take and give back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::metrics::gauge::Gauge;

use super::MIN_WINDOW;

/// Window bytes, floors included, that every connection of the process may hold together
/// (`--max-buffered`): what stalled readers can make the process pin.
#[derive(Debug)]
pub struct Pool {
    limit: u64,
    used: AtomicU64,
    exhausted: AtomicBool,
    /// Follows `used`, for the metrics.
    gauge: Option<Gauge>,
}

impl Pool {
    /// A pool of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Self::with_gauge(limit, None)
    }

    /// A pool of `limit` bytes whose use `gauge` follows.
    pub fn with_gauge(limit: u64, gauge: Option<Gauge>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            exhausted: AtomicBool::new(false),
            gauge,
        })
    }

    fn moved(&self, n: u64, up: bool) {
        if let Some(gauge) = &self.gauge {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            if up {
                gauge.inc_by(n);
            } else {
                gauge.dec_by(n);
            }
        }
    }

    /// A pool without bound (tests, tools).
    pub fn unbounded() -> Arc<Self> {
        Self::new(u64::MAX)
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The bound.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether a new connection's floor ([`MIN_WINDOW`]) still fits under the bound. Checked
    /// where a connection is admitted; the window takes its floor when it starts, so the bound
    /// can be passed by the floors of connections admitted at the same moment, no more.
    pub fn admits(&self) -> bool {
        self.used().saturating_add(MIN_WINDOW) <= self.limit
    }

    /// A new window's floor: taken whatever the bound, as the peer already holds that credit.
    pub(super) fn take_floor(&self) {
        self.used.fetch_add(MIN_WINDOW, Ordering::AcqRel);
        self.moved(MIN_WINDOW, true);
    }

    pub(super) fn try_take(&self, n: u64) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used.saturating_add(n) <= self.limit).then_some(used + n)
            })
            .is_ok();
        if !taken && !self.exhausted.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                bound = self.limit,
                "buffer bound of this process reached: windows stop growing and new connections \
                 are refused until stalled connections drain (see --max-buffered)"
            );
        }
        if taken {
            self.moved(n, true);
        }
        taken
    }

    pub(super) fn give_back(&self, n: u64) {
        self.moved(n, false);
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        if before - n < self.limit / 2 {
            self.exhausted.store(false, Ordering::Release);
        }
    }
}

/// Window bytes above [`MIN_WINDOW`] that the connections of one agent connection may hold,
/// drawn from the process's [`Pool`] as well.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    exhausted: AtomicBool,
    pool: Arc<Pool>,
}

impl Budget {
    /// A budget of `limit` bytes in an unbounded pool.
    pub fn new(limit: u64) -> Arc<Self> {
        Self::within(limit, Pool::unbounded())
    }

    /// A budget of `limit` bytes, whose windows also count in `pool`.
    pub fn within(limit: u64, pool: Arc<Pool>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            exhausted: AtomicBool::new(false),
            pool,
        })
    }

    /// The process's pool this budget draws from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub(super) fn try_take(&self, n: u64) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= self.limit).then_some(used + n)
            })
            .is_ok();
        if !taken {
            if !self.exhausted.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    budget = self.limit,
                    "flow-control budget of this agent connection spent: windows stop growing \
                     until stalled connections drain (see --window-budget)"
                );
            }
            return false;
        }
        if !self.pool.try_take(n) {
            self.give_back_own(n);
            return false;
        }
        true
    }

    pub(super) fn give_back(&self, n: u64) {
        self.give_back_own(n);
        self.pool.give_back(n);
    }

    fn give_back_own(&self, n: u64) {
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        if before - n < self.limit / 2 {
            self.exhausted.store(false, Ordering::Release);
        }
    }
}
