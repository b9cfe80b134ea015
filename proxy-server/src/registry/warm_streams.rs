//! The registry's side of warm streams: finding the agent a new warm stream belongs to (by the
//! connection it came on), and handing one out only while its agent answers pings. The pools
//! themselves are in [`crate::warm`]; this keeps their gauge and the agent lookup in one place.

use super::{AgentHandle, Clusters, TunnelStream};
use crate::warm::{PING_SLACK, WarmRefused};

impl Clusters {
    /// Holds a warm stream the agent on connection `conn_id` opened.
    pub fn add_warm(&self, conn_id: u64, stream: TunnelStream) -> Result<(), WarmRefused> {
        let agent = self
            .agents
            .by_conn
            .get(&conn_id)
            .map(|a| a.clone())
            .ok_or(WarmRefused::Unregistered)?;
        agent.warm.add(stream, &self.metrics.warm_streams)
    }

    /// One of `agent`'s warm streams, already told it is taken; `None` if it has none ready,
    /// or if a ping to it has gone unanswered past [`PING_SLACK`].
    pub fn take_warm(&self, agent: &AgentHandle) -> Option<TunnelStream> {
        if agent.ping_overdue(PING_SLACK) {
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
}
