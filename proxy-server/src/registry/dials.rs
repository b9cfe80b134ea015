//! Pending dials: a CONNECT asked an agent to dial its upstream and waits for the answer (the
//! agent opening a `Data` stream, or a dial failure). [`DialGuard`] is the CONNECT's hold on its
//! dial; dropping it forgets the dial (and tells the agent to cancel it), and an agent leaving
//! fails every dial asked of it at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use proxy_common::grpc::Offered;
use tokio::sync::oneshot;

use super::agent::ControlQueue;
use super::{AgentGone, AgentHandle, Clusters, LimitError, TunnelStream};

/// How the agent answered a dial request.
#[derive(Debug)]
pub enum DialOutcome {
    /// The agent reached its upstream and opened the data stream (boxed: it is large and
    /// travels through a oneshot).
    Connected(Box<TunnelStream>),
    /// The agent could not reach its upstream; the agent's reason, already made printable,
    /// one line and bounded where it arrived (`proxy_common::text::sanitize`).
    Failed(String),
    /// The agent refused the destination the dial named (see `Proxy-Destination`); its reason
    /// (sanitized as above), which names what the agent may dial: for the server's log only.
    NotAllowed(String),
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

#[derive(Debug)]
struct PendingDial {
    conn_id: u64,
    reply: oneshot::Sender<DialOutcome>,
}

/// Dials waiting for an answer, by dial id.
#[derive(Debug, Default)]
pub(super) struct PendingDials {
    pending: DashMap<u64, PendingDial>,
    next_id: AtomicU64,
}

impl PendingDials {
    /// Fails the dials asked of connection `conn_id`: it can no longer answer them, and
    /// dropping their reply senders ends the waiting CONNECTs now rather than at their timeout.
    pub(super) fn fail_all_of(&self, conn_id: u64) {
        self.pending.retain(|_, p| p.conn_id != conn_id);
    }
}

impl Clusters {
    /// Records a dial to be answered by `agent`'s connection. Dropping the returned guard
    /// forgets it, so an abandoned CONNECT leaves nothing behind.
    pub fn begin_dial(self: &Arc<Self>, agent: &AgentHandle) -> Result<DialGuard, LimitError> {
        // Checked before inserting, so the bound can be overshot only by the number of
        // CONNECTs racing through this line at once.
        if self.dials.pending.len() >= self.limits.max_pending_dials {
            return Err(LimitError::PendingDials(self.limits.max_pending_dials));
        }
        let id = self.dials.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (reply, rx) = oneshot::channel();
        let conn_id = agent.info.conn_id;
        self.dials
            .pending
            .insert(id, PendingDial { conn_id, reply });
        self.metrics.pending_dials.inc();
        Ok(DialGuard {
            clusters: self.clone(),
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
        self.take_dial(dial_id, conn_id)?
            .send(outcome)
            .map_err(|_| DialLookupError::Abandoned(dial_id))
    }

    /// Answers dial `dial_id` with the data stream `offered`, which the agent opened for it on
    /// connection `conn_id`: the stream is accepted (its response head sent) only once the dial
    /// is known to be waiting, so an unknown or abandoned dial's stream is refused with a status
    /// instead of being accepted and then reset.
    pub fn accept_dial(
        &self,
        dial_id: u64,
        conn_id: u64,
        offered: Offered,
    ) -> Result<(), (DialLookupError, Offered)> {
        let reply = match self.take_dial(dial_id, conn_id) {
            Ok(reply) => reply,
            Err(err) => return Err((err, offered)),
        };
        if reply.is_closed() {
            return Err((DialLookupError::Abandoned(dial_id), offered));
        }
        // A stream the agent reset meanwhile is dropped with the reply: the client's dial fails
        // at once, as when the agent leaves.
        if let Some((send, inbound)) = offered.accept() {
            let stream = TunnelStream::new(send, inbound);
            // If the client gave up since, the stream is dropped (reset) with the answer.
            let _ = reply.send(DialOutcome::Connected(Box::new(stream)));
        }
        Ok(())
    }

    fn take_dial(
        &self,
        dial_id: u64,
        conn_id: u64,
    ) -> Result<oneshot::Sender<DialOutcome>, DialLookupError> {
        let (_, pending) = self
            .dials
            .pending
            .remove_if(&dial_id, |_, p| p.conn_id == conn_id)
            .ok_or(DialLookupError::Unknown(dial_id))?;
        Ok(pending.reply)
    }

    /// Number of dials waiting for an agent's answer.
    pub fn pending_dials(&self) -> usize {
        self.dials.pending.len()
    }
}

/// A dial waiting for its agent's answer; dropping it before the answer forgets the dial and
/// tells the agent to cancel it.
#[derive(Debug)]
pub struct DialGuard {
    clusters: Arc<Clusters>,
    id: u64,
    rx: Option<oneshot::Receiver<DialOutcome>>,
    /// The control stream of the agent asked to dial, if it understands `cancel_dial`.
    cancel_to: Option<ControlQueue>,
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
        let unanswered = self.clusters.dials.pending.remove(&self.id).is_some();
        self.clusters.metrics.pending_dials.dec();
        if let (true, Some(agent)) = (unanswered, &self.cancel_to) {
            // Best effort, never waiting in a destructor: with the control queue full the agent
            // still finds out when it opens the data stream and the server refuses it.
            let cancel = crate::to_agent::cancel_dial(self.id);
            if agent.try_send(Box::new(cancel)).is_ok() {
                self.clusters.metrics.dials_cancelled.inc();
            }
        }
    }
}
