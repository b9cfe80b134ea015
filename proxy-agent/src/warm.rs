//! Warm connections: upstream connections made ahead of demand, each with its own `Data` stream
//! opened to the server (tagged `x-warm`). The server hands one to a new CONNECT and answers
//! `200` at once; its first message on the stream (`Chunk.start`) tells the agent, and from
//! there the stream is an ordinary tunneled connection. See `proxy_server::registry`'s
//! `warm` module for the server's half.
//!
//! How many to keep, per server, adapts to demand between 0 and `--warm-connections`:
//! - a dial request for the upstream means a CONNECT found no warm connection: one more;
//! - a warm connection that ended unused (expired after [`WARM_MAX_AGE`], or closed by the
//!   upstream or the server), or one that could not be made: one fewer;
//! - a failed dial of the upstream: none, and the idle ones are closed (they may be as dead as
//!   the upstream: a client must get the dial's `502`/`504`, not a `200`).
//!
//! So an idle cluster keeps none (no idle connections to its API server, no memory), a cluster
//! with steady traffic keeps what its rate of new connections needs.
//!
//! A warm connection ends unused when it expires, when the upstream closes it (watched while it
//! waits), when the server ends its stream (the server's drain or shutdown, or a stale stream),
//! or when the tunnel closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proxy_common::error::chain;
use proxy_common::pump::DataStream;
use proxy_proto::{Chunk, WARM_HEADER, WARM_MAX_AGE};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Shared;
use crate::channel::H2Channel;

/// After a warm connection could not be made (upstream down, stream refused), wait this long
/// before the next try: dial requests still work, and report the failure to the client.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How many warm connections one tunnel keeps, and how many it has.
#[derive(Debug)]
pub struct WarmTarget {
    max: usize,
    target: AtomicUsize,
    idle: AtomicUsize,
    /// Warm connections being made (dialed, their stream not yet open).
    opening: AtomicUsize,
    /// No new ones before this (a warm connection could not be made).
    paused: std::sync::Mutex<Option<tokio::time::Instant>>,
    changed: Notify,
    /// Cancelled (and replaced) when a dial of the upstream fails: the idle warm connections
    /// may be as dead as the upstream, and must not be handed to a client as `200`.
    flush: std::sync::Mutex<CancellationToken>,
}

impl WarmTarget {
    /// None wanted yet, at most `max`.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            target: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            opening: AtomicUsize::new(0),
            paused: std::sync::Mutex::default(),
            changed: Notify::new(),
            flush: std::sync::Mutex::default(),
        }
    }

    fn flush_token(&self) -> std::sync::MutexGuard<'_, CancellationToken> {
        // Held only to clone or swap the token.
        self.flush
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A dial of the upstream failed (refused, unreachable, timed out): close every idle warm
    /// connection and want none, so clients get the dial path's `502`/`504` rather than a `200`
    /// on a connection to an upstream that is gone. Demand rebuilds them once dials succeed.
    pub fn upstream_failed(&self) {
        self.target.store(0, Ordering::Release);
        let mut token = self.flush_token();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// A CONNECT found no warm connection (the server asked for a dial): keep one more.
    pub fn missed(&self) {
        let grew = self
            .target
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t < self.max).then_some(t + 1)
            })
            .is_ok();
        if grew {
            self.changed.notify_one();
        }
    }

    /// A warm connection ended unused (expired, or closed by the upstream or the server): keep
    /// one fewer, so an upstream that closes idle connections at once is not dialed in a loop.
    fn retired(&self) {
        let _ = self
            .target
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1));
    }

    /// Warm connections wanted now.
    pub fn target(&self) -> usize {
        self.target.load(Ordering::Acquire)
    }

    /// Warm connections waiting for a client now.
    pub fn idle(&self) -> usize {
        self.idle.load(Ordering::Acquire)
    }

    /// Warm connections being made now.
    fn opening(&self) -> usize {
        self.opening.load(Ordering::Acquire)
    }

    fn paused_lock(&self) -> std::sync::MutexGuard<'_, Option<tokio::time::Instant>> {
        // Held only to read or replace the instant.
        self.paused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes no new warm connections for `pause`.
    fn pause(&self, pause: Duration) {
        *self.paused_lock() = Some(tokio::time::Instant::now() + pause);
    }

    /// Until when no new warm connections are made, if a pause is still running.
    fn paused_until(&self) -> Option<tokio::time::Instant> {
        let mut paused = self.paused_lock();
        if paused.is_some_and(|until| until <= tokio::time::Instant::now()) {
            *paused = None;
        }
        *paused
    }
}

/// Counts one warm connection being made while alive; its end wakes the refill loop.
struct Opening {
    target: Arc<WarmTarget>,
}

impl Opening {
    fn new(target: Arc<WarmTarget>) -> Self {
        target.opening.fetch_add(1, Ordering::AcqRel);
        Self { target }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        self.target.opening.fetch_sub(1, Ordering::AcqRel);
        self.target.changed.notify_one();
    }
}

/// Counts one idle warm connection while alive; its end wakes the refill loop (and, through
/// its count, a draining agent).
struct Idle {
    target: Arc<WarmTarget>,
    _count: crate::CountGuard,
}

impl Idle {
    fn new(target: Arc<WarmTarget>, shared: &Shared) -> Self {
        target.idle.fetch_add(1, Ordering::AcqRel);
        Self {
            _count: shared.count(&shared.metrics.warm_idle),
            target,
        }
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.target.idle.fetch_sub(1, Ordering::AcqRel);
        self.target.changed.notify_one();
    }
}

/// What one tunnel's warm connections need.
pub struct Pool {
    /// The tunnel's HTTP/2 connection (warm streams are opened on it).
    pub channel: H2Channel,
    /// Agent state.
    pub shared: Arc<Shared>,
    /// The tunnel's flow-control budget.
    pub budget: Arc<proxy_common::flow::Budget>,
    /// How many to keep.
    pub target: Arc<WarmTarget>,
    /// Cancelled when the tunnel closes: every warm connection, idle or handed out, ends.
    pub session: CancellationToken,
    /// Cancelled when the agent drains: no new warm connections are made (the server ends the
    /// idle ones once it hears of the drain).
    pub drain: CancellationToken,
}

impl Pool {
    /// Keeps the target number of warm connections until the agent drains or the tunnel
    /// closes; each runs in `tracker`.
    ///
    /// The missing ones are dialed side by side, each in its own task. One after another, a
    /// refill took a dial's time per connection, and a burst of CONNECTs drained the pool
    /// faster than that: with 16 warm connections wanted and 16 clients connecting at once,
    /// 5.5 % of them found none and took the dial round trip, side by side 0.5 %.
    pub async fn run(self, tracker: TaskTracker) {
        let this = Arc::new(self);
        loop {
            let changed = this.target.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let paused = this.target.paused_until();
            if paused.is_none() {
                while this.target.idle() + this.target.opening() < this.target.target() {
                    if this.drain.is_cancelled() || this.session.is_cancelled() {
                        return;
                    }
                    let opening = Opening::new(this.target.clone());
                    let pool = this.clone();
                    tracker.spawn(async move { pool.make(opening).await });
                }
            }
            tokio::select! {
                () = this.drain.cancelled() => return,
                () = this.session.cancelled() => return,
                () = &mut changed => {}
                () = tokio::time::sleep_until(paused.unwrap_or_else(tokio::time::Instant::now)),
                    if paused.is_some() => {}
            }
        }
    }

    /// Makes one warm connection and holds it (see [`Pool::hold`]); `opening` counts it until
    /// it is idle or failed.
    async fn make(&self, opening: Opening) {
        // Taken before the dial: a dial that fails meanwhile (this connection's own data stream
        // may already be at the server) flushes this one too.
        let flushed = self.target.flush_token().clone();
        // Boxed: the task then keeps no room for the dial while the connection is held.
        let open = Box::pin(self.open());
        let opened = tokio::select! {
            () = self.session.cancelled() => return,
            // Draining: the server takes no more (and holding a refused one would keep the
            // drain waiting a second).
            () = self.drain.cancelled() => return,
            res = open => res,
        };
        match opened {
            Ok(warm) => {
                // Idle before it stops counting as opening, so the pool never sees it missing.
                let idle = Idle::new(self.target.clone(), &self.shared);
                drop(opening);
                self.hold(warm, idle, flushed).await;
            }
            Err(err) => {
                // One fewer wanted, and a pause: an upstream that is down, or a server that
                // refuses warm streams, is not retried in a loop; the next miss tries again.
                self.target.retired();
                self.target.pause(RETRY_AFTER);
                tracing::debug!(reason = %chain(&err), "cannot make a warm connection");
            }
        }
    }

    /// Dials the upstream and opens a warm stream for it.
    async fn open(&self) -> Result<Warm, OpenError> {
        let upstream = &self.shared.config.upstream;
        let socket =
            match crate::upstream::dial_upstream(&self.shared, upstream, Instant::now()).await {
                Ok(socket) => socket,
                Err(failure) => {
                    // The upstream cannot be reached: the idle ones may be as dead.
                    if failure.upstream_down() {
                        self.target.upstream_failed();
                    }
                    return Err(OpenError::Upstream(failure.reason));
                }
            };
        // Only the request goes out: the server's acceptance is awaited by `hold`, so a warm
        // connection is ready without waiting a round trip to the server.
        let stream = self
            .channel
            .open_data((WARM_HEADER, http::HeaderValue::from_static("1")))
            .await
            .map_err(OpenError::Stream)?;
        Ok(Warm { socket, stream })
    }

    /// Waits, idle, until the server hands the connection to a client, then carries it;
    /// closes it unused when `flushed` (the flush token as it was before its dial) fires.
    async fn hold(&self, warm: Warm, idle: Idle, flushed: CancellationToken) {
        let Warm { socket, mut stream } = warm;
        let made = Instant::now();
        let expires = tokio::time::sleep(WARM_MAX_AGE);
        tokio::pin!(expires);
        // The upstream is watched for a close while the connection waits. An upstream that
        // speaks first cannot be watched further without reading it: its bytes stay in the
        // socket for the client.
        let mut watching = true;
        let mut byte = [0u8; 1];
        let retired = loop {
            tokio::select! {
                // A flush that came first wins over a `start`, as over everything else.
                biased;
                () = self.session.cancelled() => return,
                () = flushed.cancelled() => break "upstream_failed",
                () = &mut expires => break "expired",
                peeked = socket.peek(&mut byte), if watching => match peeked {
                    Ok(0) | Err(_) => break "upstream_closed",
                    Ok(_) => watching = false,
                },
                msg = stream.inbound.message() => match msg {
                    Ok(Some(Chunk { start: true, .. })) => {
                        // Counted as active before it stops counting as idle, so a draining
                        // agent never sees both at zero in between.
                        let active = self.shared.active_connection();
                        drop(idle);
                        // Boxed, in its own statement: the task keeps room only for the state
                        // it is in (see `crate::dial::serve_dial`).
                        let carry = Box::pin(self.carry(socket, stream, active));
                        return carry.await;
                    }
                    Err(status) if stream.inbound.refused() => {
                        // Refused (e.g. the server's limit of warm streams): still counted as
                        // idle for a while, so the pool does not dial the upstream again and
                        // again for streams the server will refuse. Told by the answer, not by
                        // a missing head: this agent takes the head with `start`
                        // (`FEATURE_WARM_HEAD_AT_START`), so a stream the server lets go unused
                        // (drain, expiry) is reset before any head came, and is not a refusal.
                        tracing::debug!(reason = %chain(&status), "the server refused a warm stream");
                        drop((socket, stream));
                        self.target.retired();
                        tokio::select! {
                            () = self.session.cancelled() => {}
                            () = tokio::time::sleep(RETRY_AFTER) => {}
                        }
                        return;
                    }
                    // The server drops the ones it would no longer hand out: that is expiry.
                    _ if made.elapsed() >= proxy_proto::WARM_USABLE => break "expired",
                    // Ended (drain, shutdown) or out of protocol: not usable.
                    _ => break "server_ended",
                },
            }
        };
        self.target.retired();
        tracing::debug!(reason = retired, "warm connection closed unused");
        self.shared
            .metrics
            .warm_retired
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: retired.to_owned(),
            })
            .inc();
    }

    /// The handed-out connection, spliced like a dialed one.
    async fn carry(&self, socket: TcpStream, stream: DataStream, _active: crate::CountGuard) {
        let started = Instant::now();
        self.shared.metrics.warm_claimed.inc();
        let cancel = self.session.child_token();
        let span = tracing::debug_span!("warm");
        tracing::Instrument::instrument(
            crate::upstream::carry(&self.shared, socket, stream, &self.budget, &cancel, started),
            span,
        )
        .await;
    }
}

/// Why a warm connection could not be made.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    /// The upstream could not be reached; the dial's reason.
    #[error("{0}")]
    Upstream(String),
    /// The stream could not be opened (the connection is gone).
    #[error("opening a warm stream failed")]
    Stream(#[source] h2::Error),
}

/// A warm connection: the upstream socket and its stream.
struct Warm {
    socket: TcpStream,
    stream: DataStream,
}
