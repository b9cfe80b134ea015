//! The carry step: the client and its tunnel stream spliced (see [`proxy_common::pump::carry`])
//! until both sides are done, the agent leaves or the server shuts down; then the connection's
//! one access line.

use std::sync::Arc;

use proxy_common::error::chain;
use proxy_common::pump::{self, ByteCounts, LocalSocket, PumpError, Role};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Frontend;
use super::dial::Dialed;
use super::open::Opened;

impl Frontend {
    /// Splices the client and its tunnel stream until both sides are done, the agent leaves or
    /// the server shuts down, then logs the connection.
    pub(super) async fn carry<S>(&self, opened: Opened<S>)
    where
        S: AsyncRead + AsyncWrite + LocalSocket + Unpin + Send + 'static,
    {
        let Opened {
            client,
            early,
            dialed,
            cluster,
            started,
            connect_time,
        } = opened;
        let cluster = cluster.as_str();
        let Dialed {
            slot,
            agent,
            stream,
            warm,
        } = dialed;
        // The connection ends when the agent leaves or the server shuts down, whichever first.
        let conn_cancel = agent.closed().child_token();
        let (to_cluster, from_cluster) = self.metrics.byte_counters(cluster);
        let counts = Arc::new(ByteCounts::with_metrics(to_cluster, from_cluster));
        let result = pump::carry(
            client,
            early.freeze(),
            *stream,
            Role::Server,
            &counts,
            agent.budget(),
            &conn_cancel,
        )
        .await;
        drop(slot);
        self.metrics
            .connection_duration
            .observe(started.elapsed().saturating_sub(connect_time).as_secs_f64());
        let (to_cluster, from_cluster) = counts.get();
        let outcome = match &result {
            Ok(()) => "ok".to_owned(),
            Err(PumpError::Cancelled) => "closed: agent left or server shutting down".to_owned(),
            Err(err) => chain(err).to_string(),
        };
        tracing::info!(
            agent.id = %agent.info.agent_id,
            bytes_to_cluster = to_cluster,
            bytes_from_cluster = from_cluster,
            connect_ms = connect_time.as_millis() as u64,
            warm,
            duration_ms = started.elapsed().as_millis() as u64,
            %outcome,
            "tunneled connection closed"
        );
    }
}
