//! The dial of a CONNECT: an agent of the cluster, a connection slot, and the agent's data
//! stream to its upstream (a warm one when it has one ready). While the agent is picked and
//! while it dials, the client is watched: one that leaves cancels the step.

use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::Frontend;
use super::refusal::{Refusal, destination_forbidden, limited, unavailable, unresponsive};
use crate::metrics::Outcome;
use crate::registry::{AgentHandle, ConnectionSlot, DialOutcome, TunnelStream};

/// Why a dial ended without the agent's answer.
enum Ended {
    /// The agent disconnected.
    Gone,
    /// The agent stopped answering pings.
    Unresponsive,
}

/// A dial the agent answered: the connection's slot under the limits, the agent carrying it,
/// and its data stream.
pub(super) struct Dialed {
    pub(super) slot: ConnectionSlot,
    pub(super) agent: Arc<AgentHandle>,
    pub(super) stream: Box<TunnelStream>,
    /// Carried on a warm stream: the agent dialed before the CONNECT came.
    pub(super) warm: bool,
}

impl Frontend {
    /// Takes a connection slot for `cluster`, and has `agent` (picked for it) dial
    /// `destination` (`None`: its upstream, or one of its warm streams is handed over). The slot
    /// is taken only once the cluster is known to be registered, so metric labels never carry a
    /// name a client made up.
    pub(super) async fn dial(
        &self,
        agent: Arc<AgentHandle>,
        cluster: &str,
        destination: Option<&str>,
    ) -> Result<Dialed, Refusal> {
        let slot = self.clusters.open_connection(cluster).map_err(limited)?;
        // A warm stream, if the agent has one ready: its upstream connection is already made.
        // Not from a draining agent (its pool is closed): that one still serves dials. Warm
        // streams reach the upstream only, never another destination.
        if destination.is_none()
            && let Some(stream) = self.clusters.take_warm(&agent)
        {
            return Ok(Dialed {
                slot,
                agent,
                stream: Box::new(stream),
                warm: true,
            });
        }
        let stream = self.ask_agent(&agent, cluster, destination).await?;
        Ok(Dialed {
            slot,
            agent,
            stream,
            warm: false,
        })
    }

    /// An agent of `cluster` that answers the server, waited for (see `--agent-wait`) while
    /// none is connected.
    pub(super) async fn pick_agent(&self, cluster: &str) -> Result<Arc<AgentHandle>, Refusal> {
        let arriving = self.fleet.warmup_left().is_some();
        let wait = self
            .clusters
            .wait_for_agent(cluster, self.agent_wait, arriving);
        let Some(agent) = wait.await else {
            return Err(unavailable(
                Outcome::NoAgent,
                format!("no agent connected for cluster {cluster:?}"),
            ));
        };
        // The pick prefers agents that answer; if this one does not, none does.
        match agent.unresponsive_since() {
            Some(since) => Err(unresponsive(&agent, cluster, since)),
            None => Ok(agent),
        }
    }

    /// Asks `agent` to dial `destination` (`None`: its upstream) and waits, at most
    /// `--dial-timeout`, for the data stream of the connection it made.
    async fn ask_agent(
        &self,
        agent: &AgentHandle,
        cluster: &str,
        destination: Option<&str>,
    ) -> Result<Box<TunnelStream>, Refusal> {
        let mut pending = self.clusters.begin_dial(agent).map_err(limited)?;
        let answer = async {
            // An agent that leaves between being picked and the dial being recorded could never
            // answer; its closing ends the wait at once. One that stops answering pings ends it
            // too, long before the dial timeout. Both also end a wait for room in its control
            // queue, which a stuck agent stops draining.
            tokio::select! {
                sent = agent.send(crate::to_agent::dial(pending.id(), destination)) => {
                    sent.map_err(|_| Ended::Gone)?;
                }
                () = agent.closed().cancelled() => return Err(Ended::Gone),
                () = agent.until_unresponsive() => return Err(Ended::Unresponsive),
            }
            tokio::select! {
                outcome = pending.outcome() => outcome.map_err(|_| Ended::Gone),
                () = agent.closed().cancelled() => Err(Ended::Gone),
                () = agent.until_unresponsive() => Err(Ended::Unresponsive),
            }
        };
        let agent_id = &agent.info.agent_id;
        let target = destination.map_or_else(|| "its upstream".to_owned(), |d| format!("{d:?}"));
        match tokio::time::timeout(self.dial_timeout, answer).await {
            Ok(Ok(DialOutcome::Connected(stream))) => Ok(stream),
            Ok(Ok(DialOutcome::Failed(reason))) => Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                Outcome::DialFailed,
                format!(
                    "agent {agent_id} of cluster {cluster:?} could not reach {target}: {reason}"
                ),
            )),
            Ok(Ok(DialOutcome::NotAllowed(reason))) => {
                // The agent's reason names what it may dial (its --allow-destination list): for
                // the server's log only. The client learns no more than that the answer is no.
                tracing::info!(
                    agent.id = %agent_id,
                    destination = destination.unwrap_or_default(),
                    agent.reason = %reason,
                    "agent refused the destination"
                );
                Err(destination_forbidden(cluster))
            }
            Ok(Err(Ended::Gone)) => Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                Outcome::DialFailed,
                format!("agent {agent_id} of cluster {cluster:?} disconnected during the dial"),
            )),
            Ok(Err(Ended::Unresponsive)) => Err(unresponsive(
                agent,
                cluster,
                agent.unresponsive_since().unwrap_or_else(Instant::now),
            )),
            Err(_) => Err(Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                Outcome::DialTimeout,
                format!(
                    "agent of cluster {cluster:?} did not reach {target} within {:?}",
                    self.dial_timeout
                ),
            )),
        }
    }

    /// Runs `step` (the agent's pick, or its dial) while watching the client: one that leaves
    /// cancels the step (a dial here and at the agent), so no upstream connection is made for a
    /// client that is gone. What it sends meanwhile is kept in `early`. `None`: it left
    /// (counted under `label`, and logged).
    pub(super) async fn watching<S: AsyncRead + Unpin, T>(
        &self,
        client: &mut S,
        early: &mut BytesMut,
        label: &str,
        step: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::select! {
            done = step => Some(done),
            left = client_left(client, early) => {
                self.metrics.count(label, Outcome::ClientLeft);
                let how = left.map_or_else(|err| err.to_string(), |()| "closed".to_owned());
                tracing::info!(
                    outcome = Outcome::ClientLeft.label(),
                    how,
                    "client left while its dial was under way: dial cancelled"
                );
                None
            }
        }
    }
}

/// What a client may send after its CONNECT before the `200` (e.g. a TLS ClientHello sent
/// without waiting) that is read and kept while its dial is under way; past it, the client is
/// no longer watched for leaving.
const EARLY_BYTES: usize = 64 * 1024;

/// Reads what `client` sends during its dial into `early` (up to [`EARLY_BYTES`]) and returns
/// when the client is gone: it closed (a client that half-closes before its `200` cannot use a
/// tunnel; curl, kubectl and the Kubernetes clients never do), or its connection failed.
async fn client_left<S: AsyncRead + Unpin>(
    client: &mut S,
    early: &mut BytesMut,
) -> std::io::Result<()> {
    loop {
        let room = EARLY_BYTES.saturating_sub(early.len());
        if room == 0 {
            return std::future::pending().await;
        }
        // Cancel-safe: bytes are either in `early` or still in the socket.
        if client.read_buf(&mut (&mut *early).limit(room)).await? == 0 {
            return Ok(());
        }
    }
}
