//! One connected agent as the server sees it: who it is ([`AgentInfo`]), what it understands
//! ([`Features`]), and the handle the rest of the server uses to reach it ([`AgentHandle`]): its
//! control queue, the token that closes what it carries, its draining and ping state, and its
//! warm streams. The handle sends what it is given; the messages themselves are built in
//! [`crate::to_agent`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use proxy_proto::ServerMessage;
use tokio_util::sync::CancellationToken;

/// What the server knows of a connected agent.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Cluster the agent serves (equal to its certificate CN).
    pub cluster: String,
    /// The agent's self-chosen id.
    pub agent_id: String,
    /// The agent's version string.
    pub version: String,
    /// Id of the TLS connection that carries the agent's streams.
    pub conn_id: u64,
    /// The agent's address.
    pub addr: SocketAddr,
    /// When it registered.
    pub connected_at: SystemTime,
    /// The member API server's CA bundle (PEM), as the agent reported it, if valid.
    pub upstream_ca: Option<String>,
    /// The TLS name of the member API server, as the agent reported it, if valid.
    pub upstream_server_name: Option<String>,
    /// Control messages it understands beyond the first protocol version's.
    pub features: Features,
}

/// What an agent said it understands (`Register.features`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `ServerMessage.cancel_dial`.
    pub cancel_dial: bool,
    /// `ServerMessage.ping`, answered with `AgentMessage.pong`.
    pub ping: bool,
    /// A warm stream's response head may wait until the stream is handed out
    /// (`proxy_proto::FEATURE_WARM_HEAD_AT_START`).
    pub warm_head_at_start: bool,
}

impl Features {
    /// From the names an agent listed; unknown names are ignored.
    pub fn from_names(names: &[String]) -> Self {
        let has = |f: &str| names.iter().any(|n| n == f);
        Self {
            cancel_dial: has(proxy_proto::FEATURE_CANCEL_DIAL),
            ping: has(proxy_proto::FEATURE_PING),
            warm_head_at_start: has(proxy_proto::FEATURE_WARM_HEAD_AT_START),
        }
    }
}

/// The queue of control messages towards one agent (see [`super::control`]). Messages are
/// boxed: a waiting message then takes a pointer's room in the queue's buffer, not a whole
/// `ServerMessage`'s.
pub type ControlQueue = super::control::Sender<Box<ServerMessage>>;

/// A connected agent: where to send dial requests, and the token that closes everything it
/// carries.
#[derive(Debug)]
pub struct AgentHandle {
    /// Identity and connection facts.
    pub info: AgentInfo,
    pub(super) control: ControlQueue,
    pub(super) closed: CancellationToken,
    draining: AtomicBool,
    budget: Arc<proxy_common::flow::Budget>,
    /// Since when a ping has gone unanswered too long, if it has (see `tunnel::PONG_LATE`).
    /// Not a `watch`: that allocates its shared state, a third of a KiB per connected agent,
    /// where this lives inline in the handle.
    unresponsive: std::sync::Mutex<Option<Instant>>,
    /// Woken when the agent becomes unresponsive (dials waiting on it fail at once).
    became_unresponsive: tokio::sync::Notify,
    /// Streams the agent opened ahead of demand (see [`super::warm`]).
    pub(super) warm: super::warm::WarmPool,
    /// When the ping now waiting for its pong was sent, if one is, and what had been heard
    /// from the agent by then (bytes heard since prove it alive: see `proxy_common::heard`).
    ping_sent: std::sync::Mutex<Option<PingSent>>,
    /// The shard its connection runs on, where the CONNECTs it carries run too.
    home: Option<crate::shards::Shard>,
}

/// A ping waiting for its pong.
#[derive(Debug)]
pub struct PingSent {
    at: Instant,
    heard: proxy_common::heard::Heard,
    heard_then: u64,
}

impl PingSent {
    /// A ping sent now to an agent whose connection counts what arrives in `heard`.
    pub fn now(heard: proxy_common::heard::Heard) -> Self {
        let heard_then = heard.count();
        Self {
            at: Instant::now(),
            heard,
            heard_then,
        }
    }
}

/// The agent's control stream is gone.
#[derive(Debug, thiserror::Error)]
#[error("agent disconnected")]
pub struct AgentGone;

impl AgentHandle {
    /// A handle sending control messages on `control`; `closed` is cancelled when the agent
    /// leaves. The connections it carries grow their windows out of `budget`; `home` is the
    /// shard its connection runs on (`None` without shards).
    pub fn new(
        info: AgentInfo,
        control: ControlQueue,
        closed: CancellationToken,
        budget: Arc<proxy_common::flow::Budget>,
        home: Option<crate::shards::Shard>,
    ) -> Self {
        Self {
            info,
            control,
            closed,
            draining: AtomicBool::new(false),
            budget,
            unresponsive: std::sync::Mutex::new(None),
            became_unresponsive: tokio::sync::Notify::new(),
            warm: super::warm::WarmPool::default(),
            ping_sent: std::sync::Mutex::new(None),
            home,
        }
    }

    /// The shard the agent's connection runs on (`None` without shards), where the CONNECTs it
    /// carries move.
    pub fn home(&self) -> Option<&crate::shards::Shard> {
        self.home.as_ref()
    }

    /// The flow-control budget of this agent's connection.
    pub fn budget(&self) -> &Arc<proxy_common::flow::Budget> {
        &self.budget
    }

    /// Marks the agent as shutting down: new dials go to its cluster's other agents.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether the agent said it is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Marks the agent as not answering pings since `since` (`None`: it answers again).
    pub fn set_unresponsive(&self, since: Option<Instant>) {
        let became = {
            let mut now = self.unresponsive_lock();
            let became = now.is_none() && since.is_some();
            *now = since;
            became
        };
        if became {
            self.became_unresponsive.notify_waiters();
        }
    }

    /// Since when the agent has not answered a ping in time, if so.
    pub fn unresponsive_since(&self) -> Option<Instant> {
        *self.unresponsive_lock()
    }

    /// Resolves once the agent stops answering pings in time.
    pub async fn until_unresponsive(&self) {
        loop {
            // Registered before the check, so a change between the two is not missed.
            let became = self.became_unresponsive.notified();
            tokio::pin!(became);
            became.as_mut().enable();
            if self.unresponsive_since().is_some() {
                return;
            }
            became.await;
        }
    }

    fn unresponsive_lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // Held only to read or write the instant.
        self.unresponsive
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ping_sent(&self) -> std::sync::MutexGuard<'_, Option<PingSent>> {
        // Held only to read or write the instant.
        self.ping_sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The ping sent was answered (`None`), or one was sent now (`Some`).
    pub fn set_ping_outstanding(&self, sent: Option<PingSent>) {
        *self.ping_sent() = sent;
    }

    /// Whether a ping has waited for its pong longer than `slack` with nothing at all heard
    /// from the agent since it was sent: a busy agent whose pong waits behind its own data on a
    /// slow link is not overdue.
    pub fn ping_overdue(&self, slack: Duration) -> bool {
        self.ping_sent()
            .as_ref()
            .is_some_and(|sent| sent.at.elapsed() > slack && sent.heard.count() == sent.heard_then)
    }

    /// Cancelled when the agent leaves the registry (or the server shuts down).
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// Queues `msg` for the agent without waiting; `false` if its control queue is full (or
    /// the agent is gone). For best-effort messages (pings, fleet updates).
    pub fn try_send(&self, msg: ServerMessage) -> bool {
        self.control.try_send(Box::new(msg)).is_ok()
    }

    /// Queues `msg` for the agent, waiting while its control queue is full (dial requests).
    pub async fn send(&self, msg: ServerMessage) -> Result<(), AgentGone> {
        self.control
            .send(Box::new(msg))
            .await
            .map_err(|_| AgentGone)
    }
}
