//! Warm streams: `Data` streams an agent opened ahead of demand, each on an upstream connection
//! it has already made. A CONNECT that finds one is answered `200` at once, with no round trip
//! to the agent for a dial: on a WAN that halves the time to a new connection's first response,
//! and on a LAN it takes the dial off the critical path. The `200` keeps its meaning: the
//! upstream connection behind it exists; only when it was made differs.
//!
//! The agent decides how many to keep (more after CONNECTs that found none, fewer after warm
//! streams that expired unused; see `proxy_agent::warm`); the server only holds them, checks
//! each is still alive and fresh when handing it out, and refuses more than
//! [`MAX_WARM_PER_AGENT`].
//!
//! Each agent's pool ([`WarmPool`]) lives in its handle; the registry finds the agent a new warm
//! stream belongs to by the connection it came on, and hands one out only while its agent
//! answers pings (the `impl Clusters` below). A part of the registry: a warm stream's life is its
//! agent's.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use futures_util::FutureExt;
use prometheus_client::metrics::gauge::Gauge;
use proxy_common::grpc::{Frame, Inbound, Offered, accepted_head};
use proxy_proto::{Chunk, WARM_USABLE};

use super::{AgentHandle, Clusters, TunnelStream};

/// A warm stream is handed out only while no ping to its agent has waited longer than this for
/// its pong. A dial to an agent that vanished fails with `503` within `tunnel::PONG_LATE`; a
/// warm stream of that agent would give its client a `200` and then silence. An agent answers a
/// ping within its round trip, so this costs warm streams only on links slower than this, and
/// only while a ping is out.
pub const PING_SLACK: std::time::Duration = std::time::Duration::from_millis(250);

/// Most warm streams held per agent connection: a bound on what an agent can make the server
/// hold (the agent's own default keeps at most 8).
pub const MAX_WARM_PER_AGENT: usize = 64;

/// Why a warm stream was not taken.
#[derive(Debug, thiserror::Error)]
pub enum WarmRefused {
    /// The agent already has the most warm streams allowed.
    #[error("at most {MAX_WARM_PER_AGENT} warm streams per agent")]
    Full,
    /// The agent is draining or gone: no new connections go to it.
    #[error("the agent is draining")]
    Closed,
    /// No registered agent on this connection.
    #[error("no agent registered on this connection")]
    Unregistered,
}

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

/// One agent's warm streams, oldest first.
#[derive(Debug, Default)]
pub struct WarmPool {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    streams: VecDeque<(Instant, Held)>,
    closed: bool,
}

/// A warm stream while it waits for a CONNECT.
#[derive(Debug)]
enum Held {
    /// Answered when it was held (an agent without `warm_head_at_start`): the stream's halves.
    Answered(TunnelStream),
    /// Answered when it is handed out, the head in the same write as `start`: one write to the
    /// agent, and one wake-up of it, fewer per warm connection. Nothing is built for its
    /// sending half until then either.
    Unanswered {
        respond: h2::server::SendResponse<Frame>,
        inbound: Inbound<Chunk>,
    },
}

impl Held {
    /// The stream's halves, answered now if they were not; `None` if the agent reset it.
    fn answer(self) -> Option<TunnelStream> {
        match self {
            Self::Answered(stream) => Some(stream),
            Self::Unanswered {
                mut respond,
                inbound,
            } => {
                let send = respond.send_response(accepted_head(), false).ok()?;
                Some(TunnelStream::new(send, inbound))
            }
        }
    }
}

impl WarmPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Held only for short synchronous sections that cannot leave it torn.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Accepts `offered` and holds it for a future CONNECT, or gives it back with the reason it
    /// is refused; `held` counts warm streams across agents. Accepted under the pool's lock, so
    /// a stream is never accepted and then refused: the agent reads a refusal in the response
    /// head, and paces its retries by it. With `head_at_start` (the agent's feature) the
    /// accepting head waits until the stream is handed out.
    pub fn add(
        &self,
        offered: Offered,
        head_at_start: bool,
        held: &Gauge,
    ) -> Result<(), (WarmRefused, Offered)> {
        let mut inner = self.lock();
        if inner.closed {
            return Err((WarmRefused::Closed, offered));
        }
        // Dead and stale ones go first, so they never count against the bound.
        inner.purge(held);
        if inner.streams.len() >= MAX_WARM_PER_AGENT {
            return Err((WarmRefused::Full, offered));
        }
        let stream = if head_at_start {
            let (body, respond) = offered.into_parts();
            Held::Unanswered {
                respond,
                inbound: Inbound::from_request(body),
            }
        } else {
            // One the agent reset meanwhile is not held.
            let Some((send, inbound)) = offered.accept() else {
                return Ok(());
            };
            Held::Answered(TunnelStream::new(send, inbound))
        };
        inner.streams.push_back((Instant::now(), stream));
        held.inc();
        Ok(())
    }

    /// A live, fresh warm stream, told it was handed out (`Chunk.start`); `None` if there is
    /// none. Stale and dead ones met on the way are dropped.
    pub fn take(&self, held: &Gauge) -> Option<TunnelStream> {
        let mut inner = self.lock();
        while let Some((at, mut stream)) = inner.streams.pop_front() {
            held.dec();
            if at.elapsed() >= WARM_USABLE || !alive(&mut stream) {
                continue;
            }
            // Only a stream that went away refuses.
            if let Some(stream) = stream.answer()
                && stream.tx.start()
            {
                return Some(stream);
            }
        }
        None
    }

    /// Drops the streams the agent ended and the stale ones, so `held` counts live ones (run
    /// on every ping: a stream the agent ended is otherwise seen only when next looked at).
    pub fn purge(&self, held: &Gauge) {
        self.lock().purge(held);
    }

    /// Drops every warm stream and refuses new ones (the agent drains or left). The agent sees
    /// its streams end and closes their upstream connections.
    pub fn close(&self, held: &Gauge) {
        let mut inner = self.lock();
        inner.closed = true;
        held.dec_by(inner.streams.len() as i64);
        inner.streams.clear();
    }
}

impl Inner {
    fn purge(&mut self, held: &Gauge) {
        let before = self.streams.len();
        self.streams
            .retain_mut(|(at, s)| at.elapsed() < WARM_USABLE && alive(s));
        held.dec_by((before - self.streams.len()) as i64);
    }
}

/// Whether the agent still holds the stream open and has sent nothing on it: it may not send
/// before `start`, and a stream it ended (the upstream closed, or it retired the stream) is
/// seen as ended here without waiting.
fn alive(stream: &mut Held) -> bool {
    let (reset, inbound) = match stream {
        Held::Answered(stream) => (
            std::future::poll_fn(|cx| stream.send.poll_reset(cx)).now_or_never(),
            &mut stream.inbound,
        ),
        Held::Unanswered { respond, inbound } => (
            std::future::poll_fn(|cx| respond.poll_reset(cx)).now_or_never(),
            inbound,
        ),
    };
    reset.is_none() && inbound.message().now_or_never().is_none()
}
