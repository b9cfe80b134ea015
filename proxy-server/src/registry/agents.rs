//! The agent set: which agents serve which cluster, picking one for a CONNECT, and the
//! reconnect window during which a CONNECT for a cluster whose agents just left waits for one
//! to come back. [`Registration`] is an agent's place in the set; dropping it is the teardown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{AgentHandle, Clusters};
use crate::metrics::ClusterLabel;

/// How long after its last agent left a cluster counts as "reconnecting": CONNECTs for it wait
/// (up to the configured agent wait) instead of failing at once. Longer than the agents' largest
/// reconnect backoff.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(30);

/// Why an agent was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The connection already carries a registration.
    #[error("this connection already carries a registration")]
    AlreadyRegistered,
    /// The cluster already has as many agents on this server as it may.
    #[error(
        "cluster {cluster:?} already has {max} agents connected to this server (--max-agents-per-cluster): stop the extra agent replicas"
    )]
    TooManyAgents {
        /// The cluster.
        cluster: String,
        /// The limit.
        max: usize,
    },
}

/// Registered agents, by cluster and by connection, and the clusters that just lost their last.
#[derive(Debug, Default)]
pub(super) struct Agents {
    /// Clusters with at least one agent (an emptied list is removed at once).
    pub(super) by_cluster: DashMap<String, Vec<Arc<AgentHandle>>>,
    /// Registered agents by the id of the connection carrying them: where warm streams go.
    pub(super) by_conn: DashMap<u64, Arc<AgentHandle>>,
    /// Clusters whose last agent left, with when (kept for [`RECONNECT_WINDOW`]).
    departed: DashMap<String, Instant>,
    round_robin: AtomicUsize,
    /// Woken when an agent registers or leaves.
    pub(super) changed: Notify,
}

impl Agents {
    /// Takes `agent` out of its cluster's list; `true` if that left the list empty.
    pub(super) fn leave(&self, agent: &Arc<AgentHandle>) -> bool {
        match self.by_cluster.get_mut(&agent.info.cluster) {
            Some(mut agents) => {
                agents.retain(|a| !Arc::ptr_eq(a, agent));
                agents.is_empty()
            }
            None => false,
        }
    }

    /// Opens `cluster`'s reconnect window now.
    pub(super) fn mark_departed(&self, cluster: &str) {
        self.departed
            .retain(|_, left| left.elapsed() < RECONNECT_WINDOW);
        self.departed.insert(cluster.to_owned(), Instant::now());
    }

    fn recently_departed(&self, cluster: &str) -> bool {
        self.departed
            .get(cluster)
            .is_some_and(|left| left.elapsed() < RECONNECT_WINDOW)
    }
}

impl Clusters {
    /// Adds an agent. It stays registered until the returned guard is dropped.
    /// One registration per TLS connection: dial answers are matched by connection, so a
    /// second control stream on the same connection could otherwise answer the first's dials.
    pub fn register(self: &Arc<Self>, agent: AgentHandle) -> Result<Registration, RegisterError> {
        let agent = Arc::new(agent);
        match self.agents.by_conn.entry(agent.info.conn_id) {
            dashmap::Entry::Occupied(_) => return Err(RegisterError::AlreadyRegistered),
            dashmap::Entry::Vacant(slot) => {
                slot.insert(agent.clone());
            }
        }
        {
            // Checked and joined under the cluster's entry lock, so racing registrations
            // cannot both take the last place.
            let mut list = self
                .agents
                .by_cluster
                .entry(agent.info.cluster.clone())
                .or_default();
            let max = self.limits.max_agents_per_cluster;
            if list.len() >= max {
                drop(list);
                self.agents.by_conn.remove(&agent.info.conn_id);
                return Err(RegisterError::TooManyAgents {
                    cluster: agent.info.cluster.clone(),
                    max,
                });
            }
            list.push(agent.clone());
        }
        self.metrics
            .agents
            .get_or_create(&ClusterLabel {
                cluster: agent.info.cluster.clone(),
            })
            .inc();
        self.agents.departed.remove(&agent.info.cluster);
        self.history.back_up(&agent.info.cluster);
        self.agents.changed.notify_waiters();
        Ok(Registration {
            clusters: self.clone(),
            agent,
        })
    }

    /// An agent of `cluster`, spreading successive calls across the cluster's agents.
    /// Draining agents are passed over while the cluster has others.
    pub fn pick(&self, cluster: &str) -> Option<Arc<AgentHandle>> {
        let agents = self.agents.by_cluster.get(cluster)?;
        if agents.is_empty() {
            return None;
        }
        let start = self.agents.round_robin.fetch_add(1, Ordering::Relaxed);
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

    /// An agent of `cluster`; if the cluster's last agent left within [`RECONNECT_WINDOW`], or
    /// `arriving` (this server is warming up: agents are still finding it), waits up to `wait`
    /// for one to come. Other clusters not seen recently fail at once.
    pub async fn wait_for_agent(
        &self,
        cluster: &str,
        wait: Duration,
        arriving: bool,
    ) -> Option<Arc<AgentHandle>> {
        // Most CONNECTs find their agent at once, without the wait list's lock.
        if let Some(agent) = self.pick(cluster) {
            return Some(agent);
        }
        let deadline = Instant::now() + wait;
        loop {
            // Register interest before looking, so a registration between the look and the
            // wait is not missed.
            let changed = self.agents.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(agent) = self.pick(cluster) {
                return Some(agent);
            }
            if !arriving && !self.agents.recently_departed(cluster) {
                return None;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// Whether `cluster` has an agent now (used to keep metric labels to known clusters).
    pub fn is_registered(&self, cluster: &str) -> bool {
        self.agents.by_cluster.contains_key(cluster)
    }

    /// Number of clusters with at least one agent.
    pub fn cluster_count(&self) -> usize {
        self.agents.by_cluster.len()
    }

    /// Number of connected agents.
    pub fn agent_count(&self) -> usize {
        self.agents.by_cluster.iter().map(|e| e.value().len()).sum()
    }
}

/// An agent's place in the registry; dropping it removes the agent and closes everything it
/// carried.
#[derive(Debug)]
pub struct Registration {
    clusters: Arc<Clusters>,
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
        self.clusters.remove(&self.agent);
        self.agent.closed.cancel();
    }
}
