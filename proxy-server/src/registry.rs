//! The cluster registry: which agents are connected for which cluster, and the dials waiting for
//! an agent to answer.
//!
//! Cleanup is by ownership: [`Registration`] is held by the agent's control-stream task, and
//! dropping it is the teardown: the agent leaves the registry, its token is cancelled (closing
//! every connection it carried) and its pending dials fail at once. No lock is held across an
//! `.await`: the maps are `DashMap`s touched only in short synchronous sections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use proxy_proto::{Chunk, DialCancel, DialRequest, ServerMessage, server_message};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::config::Limits;
use crate::metrics::{ClusterLabel, Metrics};

/// How long after its last agent left a cluster counts as "reconnecting": CONNECTs for it wait
/// (up to the configured agent wait) instead of failing at once. Longer than the agents' largest
/// reconnect backoff.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(30);

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
}

impl Features {
    /// From the names an agent listed; unknown names are ignored.
    pub fn from_names(names: &[String]) -> Self {
        let has = |f: &str| names.iter().any(|n| n == f);
        Self {
            cancel_dial: has(proxy_proto::FEATURE_CANCEL_DIAL),
            ping: has(proxy_proto::FEATURE_PING),
        }
    }
}

/// A connected agent: where to send dial requests, and the token that closes everything it
/// carries.
#[derive(Debug)]
pub struct AgentHandle {
    /// Identity and connection facts.
    pub info: AgentInfo,
    control: mpsc::Sender<Result<ServerMessage, Status>>,
    closed: CancellationToken,
    draining: AtomicBool,
    budget: Arc<proxy_common::flow::Budget>,
    /// Since when a ping has gone unanswered too long, if it has (see `tunnel::PONG_LATE`).
    unresponsive: tokio::sync::watch::Sender<Option<Instant>>,
    /// Streams the agent opened ahead of demand (see [`crate::warm`]).
    warm: crate::warm::WarmPool,
    /// When the ping now waiting for its pong was sent, if one is.
    ping_sent: std::sync::Mutex<Option<Instant>>,
}

/// The agent's control stream is gone.
#[derive(Debug, thiserror::Error)]
#[error("agent disconnected")]
pub struct AgentGone;

impl AgentHandle {
    /// A handle sending dial requests on `control`; `closed` is cancelled when the agent leaves.
    /// The connections it carries grow their windows out of `budget`.
    pub fn new(
        info: AgentInfo,
        control: mpsc::Sender<Result<ServerMessage, Status>>,
        closed: CancellationToken,
        budget: Arc<proxy_common::flow::Budget>,
    ) -> Self {
        Self {
            info,
            control,
            closed,
            draining: AtomicBool::new(false),
            budget,
            unresponsive: tokio::sync::watch::Sender::new(None),
            warm: crate::warm::WarmPool::default(),
            ping_sent: std::sync::Mutex::new(None),
        }
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
        self.unresponsive.send_if_modified(|now| {
            let changed = now.is_some() != since.is_some();
            *now = since;
            changed
        });
    }

    /// Since when the agent has not answered a ping in time, if so.
    pub fn unresponsive_since(&self) -> Option<Instant> {
        *self.unresponsive.borrow()
    }

    /// Resolves once the agent stops answering pings in time.
    pub async fn until_unresponsive(&self) {
        let mut rx = self.unresponsive.subscribe();
        // The sender lives as long as `self`, so this cannot fail while borrowed.
        let _ = rx.wait_for(Option::is_some).await;
    }

    fn ping_sent(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // Held only to read or write the instant.
        self.ping_sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The ping sent at `at` was answered (`None`), or one was sent now (`Some`).
    pub fn set_ping_outstanding(&self, at: Option<Instant>) {
        *self.ping_sent() = at;
    }

    /// Whether a ping has waited for its pong longer than `slack`.
    pub fn ping_overdue(&self, slack: Duration) -> bool {
        self.ping_sent().is_some_and(|sent| sent.elapsed() > slack)
    }

    /// Pings the agent (if it understands pings). Best effort: a full control queue is itself
    /// a sign the agent is behind.
    pub fn send_ping(&self, seq: u64) {
        let msg = ServerMessage {
            msg: Some(server_message::Msg::Ping(proxy_proto::Ping { seq })),
        };
        let _ = self.control.try_send(Ok(msg));
    }

    /// Cancelled when the agent leaves the registry (or the server shuts down).
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// Tells the agent the fleet now has `count` servers. Best effort: an agent whose control
    /// queue is full learns the count from its next registration.
    pub fn send_fleet(&self, count: u32) {
        let msg = ServerMessage {
            msg: Some(server_message::Msg::Fleet(proxy_proto::Fleet {
                server_count: count,
            })),
        };
        if self.control.try_send(Ok(msg)).is_err() {
            tracing::debug!(cluster = %self.info.cluster, agent.id = %self.info.agent_id, "control queue full: fleet update not sent");
        }
    }

    /// Asks the agent to dial its upstream. Waits while the agent's control queue is full.
    pub async fn request_dial(&self, dial_id: u64) -> Result<(), AgentGone> {
        let msg = ServerMessage {
            msg: Some(server_message::Msg::Dial(DialRequest {
                dial_id,
                destination: String::new(),
            })),
        };
        self.control.send(Ok(msg)).await.map_err(|_| AgentGone)
    }
}

/// Both directions of one tunneled connection's `Data` stream, as the server sees them.
#[derive(Debug)]
pub struct TunnelStream {
    /// Chunks from the agent (its upstream's bytes).
    pub inbound: Streaming<Chunk>,
    /// Chunks to the agent (the client's bytes).
    pub outbound: mpsc::Sender<Chunk>,
}

/// How the agent answered a dial request.
#[derive(Debug)]
pub enum DialOutcome {
    /// The agent reached its upstream and opened the data stream (boxed: it is large and
    /// travels through a oneshot).
    Connected(Box<TunnelStream>),
    /// The agent could not reach its upstream; the agent's reason.
    Failed(String),
}

#[derive(Debug)]
struct PendingDial {
    conn_id: u64,
    reply: oneshot::Sender<DialOutcome>,
}

/// Why a dial answer could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum DialLookupError {
    /// No dial with that id is pending for this agent connection (unknown, answered already,
    /// timed out, or asked of another agent).
    #[error("no pending dial {0} for this agent")]
    Unknown(u64),
    /// The CONNECT client gave up before the answer arrived.
    #[error("dial {0} was abandoned by its client")]
    Abandoned(u64),
}

/// Clusters, their agents, pending dials and open connections.
#[derive(Debug)]
pub struct Registry {
    clusters: DashMap<String, Vec<Arc<AgentHandle>>>,
    departed: DashMap<String, Instant>,
    /// Clusters whose agents all left, with when, kept for `--down-retention`.
    down: DashMap<String, (SystemTime, Instant)>,
    pending: DashMap<u64, PendingDial>,
    open: DashMap<String, usize>,
    open_total: AtomicUsize,
    next_dial: AtomicU64,
    round_robin: AtomicUsize,
    changed: Notify,
    limits: Limits,
    metrics: Arc<Metrics>,
    dial_stats: DashMap<String, DialStats>,
    /// Registered agents by the id of the connection carrying them: where warm streams go.
    registered_conns: DashMap<u64, Arc<AgentHandle>>,
}

/// The connection already carries a registration.
#[derive(Debug, thiserror::Error)]
#[error("this connection already carries a registration")]
pub struct AlreadyRegistered;

/// Recent dials of one cluster, for the status page.
#[derive(Debug, Clone, Default)]
pub struct DialStats {
    /// Latencies (CONNECT to 200) of the most recent successful dials, newest last.
    pub recent_ms: std::collections::VecDeque<f64>,
    /// Dials that failed (502/504) since the cluster registered.
    pub failures: u64,
    /// The latest failure: when, and why.
    pub last_failure: Option<(SystemTime, String)>,
}

/// Dial latencies kept per cluster for the status page.
pub const RECENT_DIALS: usize = 64;

/// What the status page shows of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    /// Cluster name.
    pub name: String,
    /// Its agents, and whether each is draining.
    pub agents: Vec<(AgentInfo, bool)>,
    /// Open tunneled connections.
    pub open_connections: usize,
    /// Recent dials.
    pub dials: DialStats,
    /// When its last agent left, for a cluster that has none now (kept `--down-retention`).
    pub down_since: Option<SystemTime>,
}

/// A limit that refused a CONNECT (the client gets `503` with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Too many tunneled connections in total.
    #[error("the proxy is at its limit of {0} open connections")]
    Total(usize),
    /// Too many tunneled connections to this cluster.
    #[error("cluster {cluster:?} is at its limit of {limit} open connections")]
    Cluster {
        /// The cluster.
        cluster: String,
        /// The limit.
        limit: usize,
    },
    /// Too many CONNECTs waiting for agents.
    #[error("the proxy is at its limit of {0} dials in progress")]
    PendingDials(usize),
}

impl Registry {
    /// An empty registry enforcing `limits` and reporting to `metrics`.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            clusters: DashMap::new(),
            departed: DashMap::new(),
            down: DashMap::new(),
            pending: DashMap::new(),
            open: DashMap::new(),
            open_total: AtomicUsize::new(0),
            next_dial: AtomicU64::new(0),
            round_robin: AtomicUsize::new(0),
            changed: Notify::new(),
            limits,
            metrics,
            dial_stats: DashMap::new(),
            registered_conns: DashMap::new(),
        }
    }

    /// Records a dial's result for the status page (registered clusters only).
    pub fn record_dial(&self, cluster: &str, result: Result<Duration, &str>) {
        if !self.is_registered(cluster) {
            return;
        }
        let mut stats = self.dial_stats.entry(cluster.to_owned()).or_default();
        match result {
            Ok(latency) => {
                if stats.recent_ms.len() == RECENT_DIALS {
                    stats.recent_ms.pop_front();
                }
                stats.recent_ms.push_back(latency.as_secs_f64() * 1e3);
            }
            Err(reason) => {
                stats.failures += 1;
                stats.last_failure = Some((SystemTime::now(), reason.to_owned()));
            }
        }
    }

    /// Whether `cluster` has an agent now (used to keep metric labels to known clusters).
    pub fn is_registered(&self, cluster: &str) -> bool {
        self.clusters.contains_key(cluster)
    }

    /// Takes one connection slot for `cluster`; the guard gives it back.
    pub fn open_connection(self: &Arc<Self>, cluster: &str) -> Result<ConnectionSlot, LimitError> {
        let total = self.open_total.fetch_add(1, Ordering::AcqRel) + 1;
        if total > self.limits.max_connections {
            self.open_total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Total(self.limits.max_connections));
        }
        {
            let mut count = self.open.entry(cluster.to_owned()).or_insert(0);
            if *count >= self.limits.max_connections_per_cluster {
                drop(count);
                self.open_total.fetch_sub(1, Ordering::AcqRel);
                return Err(LimitError::Cluster {
                    cluster: cluster.to_owned(),
                    limit: self.limits.max_connections_per_cluster,
                });
            }
            *count += 1;
        }
        self.metrics
            .connections_active
            .get_or_create(&ClusterLabel {
                cluster: cluster.to_owned(),
            })
            .inc();
        Ok(ConnectionSlot {
            registry: self.clone(),
            cluster: cluster.to_owned(),
        })
    }

    /// Open tunneled connections in total.
    pub fn open_connections(&self) -> usize {
        self.open_total.load(Ordering::Acquire)
    }

    /// Adds an agent. It stays registered until the returned guard is dropped.
    /// One registration per TLS connection: dial answers are matched by connection, so a
    /// second control stream on the same connection could otherwise answer the first's dials.
    pub fn register(
        self: &Arc<Self>,
        agent: AgentHandle,
    ) -> Result<Registration, AlreadyRegistered> {
        let agent = Arc::new(agent);
        match self.registered_conns.entry(agent.info.conn_id) {
            dashmap::Entry::Occupied(_) => return Err(AlreadyRegistered),
            dashmap::Entry::Vacant(slot) => {
                slot.insert(agent.clone());
            }
        }
        self.metrics
            .agents
            .get_or_create(&ClusterLabel {
                cluster: agent.info.cluster.clone(),
            })
            .inc();
        self.clusters
            .entry(agent.info.cluster.clone())
            .or_default()
            .push(agent.clone());
        self.departed.remove(&agent.info.cluster);
        self.down.remove(&agent.info.cluster);
        self.changed.notify_waiters();
        Ok(Registration {
            registry: self.clone(),
            agent,
        })
    }

    /// An agent of `cluster`, spreading successive calls across the cluster's agents.
    /// Draining agents are passed over while the cluster has others.
    pub fn pick(&self, cluster: &str) -> Option<Arc<AgentHandle>> {
        let agents = self.clusters.get(cluster)?;
        if agents.is_empty() {
            return None;
        }
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
        let n = agents.len();
        let in_turn = || (0..n).map(|k| &agents[(start + k) % n]);
        // Answering and staying first, then answering but draining, then whoever is there
        // (the frontend refuses a dial to an agent that is not answering at once).
        let answering = |a: &&Arc<AgentHandle>| a.unresponsive_since().is_none();
        in_turn()
            .filter(answering)
            .find(|a| !a.is_draining())
            .or_else(|| in_turn().find(answering))
            .or_else(|| agents.get(start % n))
            .cloned()
    }

    /// Every cluster with its agents and open connections, and those down within the retention
    /// window, sorted by name.
    pub fn snapshot(&self) -> Vec<ClusterSnapshot> {
        self.forget_down();
        let down = self.down.iter().map(|entry| ClusterSnapshot {
            name: entry.key().clone(),
            agents: Vec::new(),
            open_connections: self.open.get(entry.key()).map_or(0, |n| *n),
            dials: DialStats::default(),
            down_since: Some(entry.value().0),
        });
        // Collected first: no guard of one map is held while the other is read.
        let down: Vec<ClusterSnapshot> = down.collect();
        let mut out: Vec<ClusterSnapshot> = self
            .clusters
            .iter()
            .map(|entry| ClusterSnapshot {
                name: entry.key().clone(),
                agents: entry
                    .value()
                    .iter()
                    .map(|a| (a.info.clone(), a.is_draining()))
                    .collect(),
                open_connections: self.open.get(entry.key()).map_or(0, |n| *n),
                dials: self
                    .dial_stats
                    .get(entry.key())
                    .map(|d| d.clone())
                    .unwrap_or_default(),
                down_since: None,
            })
            .collect();
        // A cluster that came back between the two looks is listed once, as up.
        out.extend(
            down.into_iter()
                .filter(|d| !self.clusters.contains_key(&d.name)),
        );
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// An agent of `cluster`; if the cluster's last agent left within [`RECONNECT_WINDOW`], or
    /// `arriving` (this server is warming up: agents are still finding it), waits up to `wait`
    /// for one to come. Other clusters not seen recently fail at once.
    pub async fn wait_for_agent(
        &self,
        cluster: &str,
        wait: Duration,
        arriving: bool,
    ) -> Option<Arc<AgentHandle>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so a registration between the look and the
            // wait is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(agent) = self.pick(cluster) {
                return Some(agent);
            }
            if !arriving && !self.recently_departed(cluster) {
                return None;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// Drops down clusters older than the retention window.
    fn forget_down(&self) {
        let keep = self.limits.down_retention;
        self.down.retain(|_, (_, at)| at.elapsed() < keep);
    }

    fn recently_departed(&self, cluster: &str) -> bool {
        self.departed
            .get(cluster)
            .is_some_and(|left| left.elapsed() < RECONNECT_WINDOW)
    }

    /// Records a dial to be answered by `agent`'s connection. Dropping the returned guard
    /// forgets it, so an abandoned CONNECT leaves nothing behind.
    pub fn begin_dial(self: &Arc<Self>, agent: &AgentHandle) -> Result<DialGuard, LimitError> {
        // Checked before inserting, so the bound can be overshot only by the number of
        // CONNECTs racing through this line at once.
        if self.pending.len() >= self.limits.max_pending_dials {
            return Err(LimitError::PendingDials(self.limits.max_pending_dials));
        }
        let id = self.next_dial.fetch_add(1, Ordering::Relaxed) + 1;
        let (reply, rx) = oneshot::channel();
        self.pending.insert(
            id,
            PendingDial {
                conn_id: agent.info.conn_id,
                reply,
            },
        );
        self.metrics.pending_dials.inc();
        Ok(DialGuard {
            registry: self.clone(),
            id,
            rx: Some(rx),
            cancel_to: agent
                .info
                .features
                .cancel_dial
                .then(|| agent.control.clone()),
        })
    }

    /// Delivers an agent's answer to dial `dial_id`. Only the connection the dial was sent on
    /// may answer it, so one agent cannot take over another's connections.
    pub fn complete_dial(
        &self,
        dial_id: u64,
        conn_id: u64,
        outcome: DialOutcome,
    ) -> Result<(), DialLookupError> {
        let (_, pending) = self
            .pending
            .remove_if(&dial_id, |_, p| p.conn_id == conn_id)
            .ok_or(DialLookupError::Unknown(dial_id))?;
        pending
            .reply
            .send(outcome)
            .map_err(|_| DialLookupError::Abandoned(dial_id))
    }

    /// Number of clusters with at least one agent.
    pub fn cluster_count(&self) -> usize {
        self.clusters.len()
    }

    /// Number of connected agents.
    pub fn agent_count(&self) -> usize {
        self.clusters.iter().map(|e| e.value().len()).sum()
    }

    /// Number of dials waiting for an agent's answer.
    pub fn pending_dials(&self) -> usize {
        self.pending.len()
    }

    /// Holds a warm stream the agent on connection `conn_id` opened.
    pub fn add_warm(
        &self,
        conn_id: u64,
        stream: TunnelStream,
    ) -> Result<(), crate::warm::WarmRefused> {
        let agent = self
            .registered_conns
            .get(&conn_id)
            .map(|a| a.clone())
            .ok_or(crate::warm::WarmRefused::Unregistered)?;
        agent.warm.add(stream, &self.metrics.warm_streams)
    }

    /// One of `agent`'s warm streams, already told it is taken; `None` if it has none ready,
    /// or if a ping to it has gone unanswered past [`crate::warm::PING_SLACK`].
    pub fn take_warm(&self, agent: &AgentHandle) -> Option<TunnelStream> {
        if agent.ping_overdue(crate::warm::PING_SLACK) {
            return None;
        }
        agent.warm.take(&self.metrics.warm_streams)
    }

    /// Drops those of `agent`'s warm streams that ended or went stale.
    pub fn purge_warm(&self, agent: &AgentHandle) {
        agent.warm.purge(&self.metrics.warm_streams);
    }

    /// Drops `agent`'s warm streams and takes no more (it drains).
    pub fn close_warm(&self, agent: &AgentHandle) {
        agent.warm.close(&self.metrics.warm_streams);
    }

    fn remove(&self, agent: &Arc<AgentHandle>) {
        self.registered_conns.remove(&agent.info.conn_id);
        self.close_warm(agent);
        let cluster = &agent.info.cluster;
        self.metrics
            .agents
            .get_or_create(&ClusterLabel {
                cluster: cluster.clone(),
            })
            .dec();
        let emptied = match self.clusters.get_mut(cluster) {
            Some(mut agents) => {
                agents.retain(|a| !Arc::ptr_eq(a, agent));
                agents.is_empty()
            }
            None => false,
        };
        if emptied {
            // Re-checked under the map's lock: an agent may have registered in between.
            if self
                .clusters
                .remove_if(cluster, |_, agents| agents.is_empty())
                .is_some()
            {
                self.dial_stats.remove(cluster);
            }
            self.departed
                .retain(|_, left| left.elapsed() < RECONNECT_WINDOW);
            self.departed.insert(cluster.clone(), Instant::now());
            self.forget_down();
            self.down
                .insert(cluster.clone(), (SystemTime::now(), Instant::now()));
        }
        // Dials asked of this connection can no longer be answered: dropping their reply
        // senders fails the waiting CONNECTs now rather than at their timeout.
        let conn_id = agent.info.conn_id;
        self.pending.retain(|_, p| p.conn_id != conn_id);
        self.changed.notify_waiters();
    }
}

/// An agent's place in the registry; dropping it removes the agent and closes everything it
/// carried.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    agent: Arc<AgentHandle>,
}

impl Registration {
    /// The registered agent.
    pub fn agent(&self) -> &Arc<AgentHandle> {
        &self.agent
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove(&self.agent);
        self.agent.closed.cancel();
    }
}

/// One open tunneled connection's place under the limits; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    registry: Arc<Registry>,
    cluster: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let r = &self.registry;
        r.open_total.fetch_sub(1, Ordering::AcqRel);
        if let Some(mut count) = r.open.get_mut(&self.cluster) {
            *count -= 1;
        }
        r.open.remove_if(&self.cluster, |_, n| *n == 0);
        r.metrics
            .connections_active
            .get_or_create(&ClusterLabel {
                cluster: self.cluster.clone(),
            })
            .dec();
    }
}

/// A dial waiting for its agent's answer; dropping it before the answer forgets the dial and
/// tells the agent to cancel it.
#[derive(Debug)]
pub struct DialGuard {
    registry: Arc<Registry>,
    id: u64,
    rx: Option<oneshot::Receiver<DialOutcome>>,
    /// The control stream of the agent asked to dial, if it understands `cancel_dial`.
    cancel_to: Option<mpsc::Sender<Result<ServerMessage, Status>>>,
}

impl DialGuard {
    /// The dial id sent to the agent.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the agent's answer; `Err` when the agent left without answering.
    pub async fn outcome(&mut self) -> Result<DialOutcome, AgentGone> {
        match self.rx.as_mut() {
            Some(rx) => {
                let res = rx.await.map_err(|_| AgentGone);
                self.rx = None;
                res
            }
            None => Err(AgentGone),
        }
    }
}

impl Drop for DialGuard {
    fn drop(&mut self) {
        let unanswered = self.registry.pending.remove(&self.id).is_some();
        self.registry.metrics.pending_dials.dec();
        if let (true, Some(agent)) = (unanswered, &self.cancel_to) {
            // Best effort, never waiting in a destructor: with the control queue full the agent
            // still finds out when it opens the data stream and the server refuses it.
            let cancel = ServerMessage {
                msg: Some(server_message::Msg::CancelDial(DialCancel {
                    dial_id: self.id,
                })),
            };
            if agent.try_send(Ok(cancel)).is_ok() {
                self.registry.metrics.dials_cancelled.inc();
            }
        }
    }
}
