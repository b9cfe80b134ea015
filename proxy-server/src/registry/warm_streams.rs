//! The registry's side of warm streams: finding the agent a new warm stream belongs to (by the
//! connection it came on), and handing one out only while its agent answers pings. The pools
//! themselves are in [`crate::warm`]; this keeps their gauge and the agent lookup in one place.

use proxy_common::grpc::Offered;

use super::{AgentHandle, Clusters, TunnelStream};
use crate::warm::{PING_SLACK, WarmRefused};

impl Clusters {
    /// Accepts and holds a warm stream the agent on connection `conn_id` opened, or gives it
    /// back with the reason it is refused.
    pub fn add_warm(&self, conn_id: u64, offered: Offered) -> Result<(), (WarmRefused, Offered)> {
        let Some(agent) = self.agents.by_conn.get(&conn_id).map(|a| a.clone()) else {
            return Err((WarmRefused::Unregistered, offered));
        };
        let head_at_start = agent.info.features.warm_head_at_start;
        agent
            .warm
            .add(offered, head_at_start, &self.metrics.warm_streams)
    }

    /// One of `agent`'s warm streams, already told it is taken; `None` if it has none ready,
    /// or if a ping to it has gone unanswered past [`PING_SLACK`] with nothing at all heard from
    /// it meanwhile.
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
