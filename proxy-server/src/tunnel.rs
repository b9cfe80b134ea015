//! The gRPC `Tunnel` service agents talk to: the control stream (registration, dial failures)
//! and the per-connection data streams. Served on h2 directly by [`crate::agent_conn`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use proxy_common::grpc::{Finish, Inbound, Offered};
use proxy_proto::{
    AgentMessage, DIAL_ID_HEADER, Register, Registered, ServerMessage, agent_message,
    server_message,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

mod halves;

use crate::fleet::Fleet;
use crate::listener::AgentConn;
use crate::registry::{AgentHandle, AgentInfo, Clusters, DialOutcome, Registration};
use crate::to_agent;

/// Control messages queued towards one agent (dial requests); a full queue makes CONNECTs wait,
/// within their dial timeout.
pub const CONTROL_QUEUE: usize = 256;

/// An agent that owes a pong and from which nothing at all has arrived for this long is marked
/// unresponsive: new CONNECTs go to the cluster's other agents, or get `503` at once, and dials
/// waiting on it fail, instead of every CONNECT waiting out `--dial-timeout` until the
/// connection's keepalive drops the agent. Silence, not the pong's delay, decides: a busy agent
/// on a slow, bufferbloated uplink answers seconds late, behind its own data, and every byte
/// of that data proves it alive (see `proxy_common::heard`). A vanished agent sends nothing and
/// is passed over within this (plus a quarter) of the ping.
pub const PONG_LATE: Duration = Duration::from_secs(1);

/// The service implementation.
#[derive(Debug, Clone)]
pub struct TunnelService {
    clusters: Arc<Clusters>,
    fleet: Arc<Fleet>,
    window_budget: u64,
    ping_interval: Duration,
    /// Cancelled when every agent must be closed (the end of the drain).
    close: CancellationToken,
    /// Where each agent's control-stream task runs, so shutdown can wait for them.
    tasks: TaskTracker,
}

impl TunnelService {
    /// A service registering agents into `clusters` on behalf of this server of `fleet`, each
    /// agent connection with a flow-control budget of `window_budget` bytes, agents that
    /// understand it pinged every `ping_interval`; `close` closes every agent, and their
    /// control-stream tasks run in `tasks`.
    pub fn new(
        clusters: Arc<Clusters>,
        fleet: Arc<Fleet>,
        window_budget: u64,
        ping_interval: Duration,
        close: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            clusters,
            fleet,
            window_budget,
            ping_interval,
            close,
            tasks,
        }
    }
}

/// Longest dial-failure reason passed on to clients, logs and the status page, in bytes.
pub const MAX_REASON: usize = 512;

/// Free-form text from an agent (a dial-failure reason, the status its control stream ended
/// with) as the server keeps it: printable, on one line, at most [`MAX_REASON`] bytes. Applied
/// where the text arrives, so logs, the CONNECT client, the status page and its JSON all get
/// the same safe copy.
fn agent_text(text: &str) -> String {
    proxy_common::text::sanitize(text, MAX_REASON)
}

/// Longest agent id, version or server id string accepted.
pub const MAX_AGENT_FIELD: usize = 253;

/// Most server ids an agent may list as already held: far more replicas than a fleet has.
pub const MAX_HELD_SERVERS: usize = 64;

/// Validates the first message of a control stream from a connection whose certificate CN is
/// `cn`: it must be a registration for exactly that cluster, with sane fields. Pure, so the fuzz
/// target can drive it with arbitrary decoded messages.
pub fn registration(first: Option<AgentMessage>, cn: &str) -> Result<Register, Status> {
    let Some(AgentMessage {
        msg: Some(agent_message::Msg::Register(reg)),
    }) = first
    else {
        return Err(Status::invalid_argument(
            "the first message on the control stream must be a registration",
        ));
    };
    if !proxy_common::is_valid_cluster_name(&reg.cluster) {
        return Err(Status::invalid_argument(format!(
            "cluster name {:?} is not a valid DNS name (lower-case letters, digits, '-', '.')",
            reg.cluster.chars().take(64).collect::<String>()
        )));
    }
    if reg.cluster != cn {
        return Err(Status::permission_denied(format!(
            "certificate CN {cn:?} may not register cluster {:?}: an agent serves only the cluster named by its certificate",
            reg.cluster
        )));
    }
    // Shown as they are in logs and on the status page, so refused rather than rewritten: an
    // id must read as what it is (no U+202E reversing it, no U+2028 breaking its line).
    let unprintable = |field: &str| field.chars().any(proxy_common::text::is_unprintable);
    if reg.agent_id.is_empty() || reg.agent_id.len() > MAX_AGENT_FIELD || unprintable(&reg.agent_id)
    {
        return Err(Status::invalid_argument(format!(
            "agent id must be 1 to {MAX_AGENT_FIELD} bytes without control, format or line-separator characters"
        )));
    }
    if reg.version.len() > MAX_AGENT_FIELD || unprintable(&reg.version) {
        return Err(Status::invalid_argument(format!(
            "version must be at most {MAX_AGENT_FIELD} bytes without control, format or line-separator characters"
        )));
    }
    if reg.held_server_ids.len() > MAX_HELD_SERVERS
        || reg
            .held_server_ids
            .iter()
            .any(|id| id.len() > MAX_AGENT_FIELD)
    {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_HELD_SERVERS} held server ids of at most {MAX_AGENT_FIELD} bytes each"
        )));
    }
    Ok(reg)
}

/// The API-server CA and TLS name an agent reported, kept only if they are valid: a broken CA
/// costs the cluster its generated kubeconfig, not its registration.
fn kubeconfig_facts(reg: &Register) -> (Option<String>, Option<String>) {
    let ca = if reg.upstream_ca.is_empty() {
        None
    } else {
        let parsed = std::str::from_utf8(&reg.upstream_ca).ok().filter(|pem| {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
            !certs.is_empty() && certs.iter().all(Result::is_ok)
        });
        if parsed.is_none() {
            tracing::warn!(cluster = %reg.cluster, agent.id = %reg.agent_id, "agent reported an API-server CA that is not PEM certificates; no kubeconfig for it");
        }
        parsed.map(str::to_owned)
    };
    let name = Some(reg.upstream_server_name.clone())
        .filter(|n| !n.is_empty() && n.len() <= 253 && proxy_common::tls::server_name(n).is_ok());
    (ca, name)
}

impl TunnelService {
    /// Serves a `Control` stream the agent on `conn` opened: its registration, then its control
    /// messages both ways until the stream or the agent's registration ends. Runs in a task of
    /// its own (it waits for the registration), the one task a connected agent costs besides its
    /// connection's.
    ///
    /// The task is held for every connected agent, so its future is kept small: the admission
    /// and the serving are two futures one after the other (`then`), and the serving is built
    /// from combinators rather than `async` blocks, each of which would keep a second copy of
    /// what it captured beside the future it awaits.
    pub fn spawn_control(self: &Arc<Self>, conn: AgentConn, offered: Offered) {
        use futures_util::FutureExt;
        // The connection's shard is the agent's home.
        let home = conn.shard.clone();
        let task = self.clone().admit(conn, home, offered).then(serve);
        self.tasks.clone().spawn(task);
    }

    /// Reads and checks the registration, answers it and enters the agent into the registry,
    /// at home on `home`; `None` if the stream ended meanwhile (answered with a refusal where it is still open).
    async fn admit(
        self: Arc<Self>,
        conn: AgentConn,
        home: Option<crate::shards::Shard>,
        offered: Offered,
    ) -> Option<Admitted> {
        // Read before it is answered: a refusal goes in the response head (trailers-only), as
        // tonic's server sent it, so a client sees it as the call's own failure.
        let (body, mut respond) = offered.into_parts();
        let mut inbound = Inbound::<AgentMessage>::from_request(body);
        let refuse = |respond, status: Status| proxy_common::grpc::refuse(respond, &status);
        let first = match tokio::time::timeout(proxy_proto::REGISTER_TIMEOUT, inbound.message())
            .await
        {
            Ok(Ok(first)) => first,
            Ok(Err(status)) => {
                tracing::debug!(agent.addr = %conn.addr, reason = status.message(), "control stream failed before its registration");
                refuse(respond, status);
                return None;
            }
            Err(_) => {
                refuse(
                    respond,
                    Status::deadline_exceeded("no registration received in time"),
                );
                return None;
            }
        };
        let reg = match registration(first, &conn.cn) {
            Ok(reg) => reg,
            Err(status) => {
                tracing::warn!(agent.addr = %conn.addr, cn = %conn.cn, reason = status.message(), "agent registration refused");
                refuse(respond, status);
                return None;
            }
        };
        let (tx, rx) = crate::registry::control::channel(CONTROL_QUEUE);
        let answer = Registered {
            server_id: self.fleet.server_id.clone(),
            server_count: self.fleet.count(),
            features: vec![proxy_proto::FEATURE_WARM.to_owned()],
        };
        if reg.held_server_ids.contains(&self.fleet.server_id) {
            // The load balancer sent an agent to a replica it already holds: nothing to do but
            // say so. Not registered, so no churn in the registry, metrics or logs.
            tracing::debug!(cluster = %reg.cluster, agent.id = %reg.agent_id, agent.addr = %conn.addr, "agent already holds this server; declined politely");
            let declined = ServerMessage {
                msg: Some(server_message::Msg::AlreadyHeld(answer)),
            };
            let _ = tx.try_send(Box::new(declined));
            drop(tx);
            let send = respond
                .send_response(proxy_common::grpc::accepted_head(), false)
                .ok()?;
            let _ = proxy_common::grpc::pipe(rx, send, UNBOX_ENCODE, Finish::Response).await;
            return None;
        }
        let registered = ServerMessage {
            msg: Some(server_message::Msg::Registered(answer)),
        };
        let _ = tx.try_send(Box::new(registered));
        let (upstream_ca, upstream_server_name) = kubeconfig_facts(&reg);
        let reg_held_for_ms = reg.held_for_ms;
        let info = AgentInfo {
            cluster: reg.cluster,
            agent_id: reg.agent_id,
            version: reg.version,
            conn_id: conn.id,
            addr: conn.addr,
            connected_at: SystemTime::now(),
            upstream_ca,
            upstream_server_name,
            features: crate::registry::Features::from_names(&reg.features),
        };
        let closed = self.close.child_token();
        let registration = match self.clusters.register(AgentHandle::new(
            info,
            tx,
            closed.clone(),
            self.clusters.budget(self.window_budget),
            home,
        )) {
            Ok(registration) => registration,
            Err(err) => {
                // The registration answer queued above is not sent: the refusal is all.
                let status = match &err {
                    crate::registry::RegisterError::AlreadyRegistered => {
                        Status::already_exists(err.to_string())
                    }
                    crate::registry::RegisterError::TooManyAgents { .. } => {
                        tracing::warn!(%err, agent.addr = %conn.addr, "agent refused");
                        Status::resource_exhausted(err.to_string())
                    }
                };
                refuse(respond, status);
                return None;
            }
        };
        // An agent that reset the stream meanwhile leaves the registry as `registration` drops.
        let send = respond
            .send_response(proxy_common::grpc::accepted_head(), false)
            .ok()?;
        let info = &registration.agent().info;
        tracing::info!(cluster = %info.cluster, agent.id = %info.agent_id, agent.addr = %info.addr, agent.version = %info.version, "agent registered");
        self.fleet
            .registered(Duration::from_millis(reg_held_for_ms));
        Some(Admitted {
            send,
            queue: rx,
            inbound,
            registration,
            clusters: self.clusters.clone(),
            fleet: self.fleet.subscribe(),
            ping_interval: self.ping_interval,
            closed,
            heard: conn.heard.clone(),
        })
    }

    /// Takes a `Data` stream the agent on connection `conn_id` opened: a warm one into its pool,
    /// or the answer to a dial. Synchronous, run by the connection's own task: a data stream
    /// costs no task on the server until a CONNECT carries it.
    pub fn data(&self, conn_id: u64, headers: &http::HeaderMap, offered: Offered) {
        if headers.contains_key(proxy_proto::WARM_HEADER) {
            if let Err((err, offered)) = self.clusters.add_warm(conn_id, offered) {
                use crate::registry::WarmRefused;
                let status = match err {
                    WarmRefused::Full => Status::resource_exhausted(err.to_string()),
                    WarmRefused::Closed => Status::unavailable(err.to_string()),
                    WarmRefused::Unregistered => Status::failed_precondition(err.to_string()),
                };
                offered.refuse(&status);
            }
            return;
        }
        let Some(dial_id) = headers
            .get(DIAL_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            let status = Status::invalid_argument(format!("missing or invalid {DIAL_ID_HEADER}"));
            return offered.refuse(&status);
        };
        if let Err((err, offered)) = self.clusters.accept_dial(dial_id, conn_id, offered) {
            offered.refuse(&Status::not_found(err.to_string()));
        }
    }
}

/// Encodes a queued control message (boxed in the queue: see `CONTROL_QUEUE`'s users).
const UNBOX_ENCODE: fn(Box<ServerMessage>) -> proxy_common::grpc::Frame =
    |msg| proxy_common::grpc::encode(*msg);

/// A registered agent's control stream, and what serving it needs.
struct Admitted {
    send: h2::SendStream<proxy_common::grpc::Frame>,
    /// The agent's control queue (its senders are in the agent's handle).
    queue: crate::registry::control::Receiver<Box<ServerMessage>>,
    inbound: Inbound<AgentMessage>,
    registration: Registration,
    clusters: Arc<Clusters>,
    fleet: tokio::sync::watch::Receiver<u32>,
    ping_interval: Duration,
    /// Cancelled when this agent must go (shutdown, or replaced).
    closed: CancellationToken,
    /// What arrives from the agent's connection: its proof of life.
    heard: proxy_common::heard::Heard,
}

/// Carries a registered agent's control messages both ways until its stream or its
/// registration ends; nothing for an agent not admitted.
fn serve(admitted: Option<Admitted>) -> impl std::future::Future<Output = ()> + Send {
    use futures_util::future::Either;
    let Some(Admitted {
        send,
        queue,
        inbound,
        registration,
        clusters,
        fleet,
        ping_interval,
        closed,
        heard,
    }) = admitted
    else {
        return Either::Left(std::future::ready(()));
    };
    // The queue's senders live as long as the agent's handle, which dials may still hold after
    // the agent left: its messages go out until the control stream ends, told by `ended`.
    let (ended, end) = tokio::sync::oneshot::channel::<std::convert::Infallible>();
    let messages = queue.take_until(end);
    let sending = proxy_common::grpc::pipe(messages, send, UNBOX_ENCODE, Finish::Response);
    let serving = serve_control(
        inbound,
        registration,
        clusters,
        fleet,
        (ping_interval, heard),
        closed,
        ended,
    );
    Either::Right(halves::Halves::new(sending, serving))
}

/// Reads the agent's control messages until its stream ends, then drops its registration and
/// `ended` (which ends the sending half).
///
/// A function returning an `async move` block rather than an `async fn`: an async fn's future
/// keeps its arguments twice (as passed, and as the locals its body uses), and this one is held
/// for every connected agent.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice (see above)"
)]
fn serve_control(
    mut inbound: Inbound<AgentMessage>,
    registration: Registration,
    clusters: Arc<Clusters>,
    mut fleet: tokio::sync::watch::Receiver<u32>,
    (ping_interval, heard): (Duration, proxy_common::heard::Heard),
    closed: CancellationToken,
    ended: tokio::sync::oneshot::Sender<std::convert::Infallible>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let agent = registration.agent().clone();
        // Read through the handle rather than cloned: the future is smaller.
        let info = &agent.info;
        // The count sent with the registration is the one seen now.
        fleet.borrow_and_update();
        let mut pings = tokio::time::interval(ping_interval);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The ping waiting for its pong (sequence number), and how long the agent has been
        // silent since it was sent.
        let mut waiting: Option<(u64, proxy_common::heard::Silence)> = None;
        let mut seq = 0;
        let reason = loop {
            let check = waiting.as_ref().map(|(_, silence)| silence.next_check());
            let msg = tokio::select! {
                () = closed.cancelled() => break "server shutting down".to_owned(),
                Ok(()) = fleet.changed() => {
                    let count = *fleet.borrow_and_update();
                    // Best effort: an agent whose control queue is full learns the count from its
                    // next registration.
                    if !agent.try_send(to_agent::fleet(count)) {
                        tracing::debug!(cluster = %info.cluster, agent.id = %info.agent_id, "control queue full: fleet update not sent");
                    }
                    continue;
                }
                _ = pings.tick(), if info.features.ping && waiting.is_none() => {
                    seq += 1;
                    waiting = Some((seq, proxy_common::heard::Silence::new(heard.clone(), PONG_LATE)));
                    agent.set_ping_outstanding(Some(crate::registry::PingSent::now(heard.clone())));
                    // Best effort: a full control queue is itself a sign the agent is behind.
                    agent.try_send(to_agent::ping(seq));
                    clusters.purge_warm(&agent);
                    continue;
                }
                () = tokio::time::sleep_until(check.unwrap_or_else(tokio::time::Instant::now)),
                    if check.is_some() && agent.unresponsive_since().is_none() => {
                    let Some((_, silence)) = waiting.as_mut() else { continue };
                    if silence.silent() {
                        let quiet = silence.quiet_for();
                        tracing::warn!(cluster = %info.cluster, agent.id = %info.agent_id, quiet_ms = quiet.as_millis() as u64, "agent owes a pong and sent nothing at all meanwhile: new connections avoid it until it answers");
                        agent.set_unresponsive(Some(std::time::Instant::now() - quiet));
                    }
                    continue;
                }
                msg = inbound.message() => msg,
            };
            match msg {
                Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::Pong(pong)),
                })) => {
                    if waiting.as_ref().is_some_and(|(s, _)| *s == pong.seq) {
                        waiting = None;
                        agent.set_ping_outstanding(None);
                        if agent.unresponsive_since().is_some() {
                            tracing::info!(cluster = %info.cluster, agent.id = %info.agent_id, "agent answers pings again");
                            agent.set_unresponsive(None);
                        }
                    }
                }
                Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::DialFailed(failed)),
                })) => {
                    let reason = agent_text(&failed.reason);
                    let outcome = if failed.not_allowed {
                        DialOutcome::NotAllowed(reason)
                    } else {
                        DialOutcome::Failed(reason)
                    };
                    if let Err(err) = clusters.complete_dial(failed.dial_id, info.conn_id, outcome)
                    {
                        tracing::debug!(cluster = %info.cluster, %err, "dial failure for no pending dial");
                    }
                }
                Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::Drain(_)),
                })) => {
                    agent.set_draining();
                    // Its warm streams end now, so the agent closes their upstream connections and
                    // is not kept waiting for them while it drains.
                    clusters.close_warm(&agent);
                    tracing::info!(cluster = %info.cluster, agent.id = %info.agent_id, "agent draining: new connections go to other agents of the cluster");
                }
                Ok(Some(_)) => break "protocol violation: unexpected control message".to_owned(),
                Ok(None) => break "control stream closed by agent".to_owned(),
                Err(status) => {
                    // The message may be the agent's own (its trailers' grpc-message).
                    break format!("control stream failed: {}", agent_text(status.message()));
                }
            }
        };
        drop(registration);
        drop(ended);
        tracing::info!(cluster = %info.cluster, agent.id = %info.agent_id, agent.addr = %info.addr, %reason, "agent disconnected");
    }
}
