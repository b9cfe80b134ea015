//! The cluster registry ([`Clusters`]): which agents are connected for which cluster, the dials
//! waiting for an agent to answer, the open connections counted against the limits, and what
//! the status page shows. One file per role: `agent` (one agent's handle), `agents` (the set,
//! picking, the reconnect window), `control` (the queue towards one agent), `dials`, `limits`,
//! `stats`, `warm` (streams agents opened ahead of demand).
//!
//! Cleanup is by ownership: [`Registration`] is held by the agent's control-stream task, and
//! dropping it is the teardown: the agent leaves the registry, its token is cancelled (closing
//! every connection it carried) and its pending dials fail at once. No lock is held across an
//! `.await`: the maps are `DashMap`s touched only in short synchronous sections.

mod agent;
mod agents;
pub mod control;
mod dials;
mod limits;
mod stats;
mod warm;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use agent::{AgentGone, AgentHandle, AgentInfo, Features, PingSent};
pub use agents::{RECONNECT_WINDOW, RegisterError, Registration};
pub use dials::{DialGuard, DialLookupError, DialOutcome};
pub use limits::{ConnectionSlot, LimitError};
pub use stats::{ClusterSnapshot, DialStats, RECENT_DIALS};
pub use warm::{MAX_WARM_PER_AGENT, PING_SLACK, WarmRefused};

/// A tunneled connection's `Data` stream as the server holds it: delivered to a dial, or held
/// warm until a CONNECT takes it.
pub use proxy_common::pump::DataStream as TunnelStream;

use crate::config::Limits;
use crate::metrics::{ClusterLabel, Metrics};

/// The clusters this server serves: their agents, pending dials, open connections and recent
/// history. (Named for what it holds; `Registry` is prometheus-client's.)
#[derive(Debug)]
pub struct Clusters {
    agents: agents::Agents,
    dials: dials::PendingDials,
    open: limits::OpenConnections,
    history: stats::History,
    limits: Limits,
    /// What every tunneled connection's window draws from (`--max-buffered`).
    pool: Arc<proxy_common::flow::Pool>,
    metrics: Arc<Metrics>,
}

impl Clusters {
    /// No clusters yet, enforcing `limits` and reporting to `metrics`.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            agents: agents::Agents::default(),
            dials: dials::PendingDials::default(),
            open: limits::OpenConnections::default(),
            history: stats::History::default(),
            pool: {
                metrics
                    .buffered_limit
                    .set(i64::try_from(limits.max_buffered).unwrap_or(i64::MAX));
                proxy_common::flow::Pool::with_gauge(
                    limits.max_buffered,
                    Some(metrics.buffered.clone()),
                )
            },
            limits,
            metrics,
        }
    }

    /// A flow-control budget of `limit` bytes for a new agent connection, in this server's pool.
    pub fn budget(&self, limit: u64) -> Arc<proxy_common::flow::Budget> {
        proxy_common::flow::Budget::within(limit, self.pool.clone())
    }

    /// Bytes the windows of all tunneled connections hold now (floors included).
    pub fn buffered(&self) -> u64 {
        self.pool.used()
    }

    /// Takes `agent` out of every part of the registry (its [`Registration`] was dropped).
    fn remove(&self, agent: &Arc<AgentHandle>) {
        self.agents.by_conn.remove(&agent.info.conn_id);
        self.close_warm(agent);
        let cluster = &agent.info.cluster;
        self.metrics
            .agents
            .get_or_create(&ClusterLabel {
                cluster: cluster.clone(),
            })
            .dec();
        if self.agents.leave(agent) {
            // Marked down under the cluster's entry lock, only if it is really empty: an agent
            // registering meanwhile either joins the entry first (then nothing is marked) or
            // makes a new one after the mark, and clears it (`back_up`). Marked outside, the
            // mark could land after such a registration and stay.
            let gone = self.agents.by_cluster.remove_if(cluster, |_, agents| {
                if agents.is_empty() {
                    self.agents.mark_departed(cluster);
                    self.history.mark_down(cluster);
                }
                agents.is_empty()
            });
            if gone.is_some() {
                self.history.forget_dials(cluster);
            }
            // Outside the entry lock: it looks clusters up again.
            self.forget_expired();
        }
        self.dials.fail_all_of(agent.info.conn_id);
        self.agents.changed.notify_waiters();
    }
}
