//! One tunnel to one proxy server: connect with mTLS, register on the control stream, serve dial
//! requests; on any loss, reconnect with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy_common::error::chain;
use proxy_common::readahead::ReadAhead;
use proxy_proto::{AgentMessage, Drain, REGISTER_TIMEOUT, Register, agent_message, server_message};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;

use crate::Shared;
use crate::backoff::Backoff;
use crate::channel::{H2Channel, Settings};
use crate::config::ServerTarget;
use crate::http_proxy::ProxyError;
use proxy_common::grpc::Inbound;

/// Time allowed for TCP + TLS + HTTP/2 setup to a server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Control messages queued towards a server (dial failures).
const CONTROL_QUEUE: usize = 64;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// TCP, TLS or HTTP/2 setup failed.
    #[error("cannot connect")]
    Connect(#[source] ConnectError),
    /// The server refused the registration; its reason.
    #[error("server refused registration: {0}")]
    Refused(String),
    /// The control stream could not be opened (the connection failed).
    #[error("cannot open the control stream")]
    Open(#[source] h2::Error),
    /// The control stream failed.
    #[error("control stream failed")]
    Stream(#[source] tonic::Status),
    /// The server sent something out of protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Which step of the connection to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Through `--https-proxy`: the proxy's tunnel.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The TCP connection.
    #[error("tcp")]
    Tcp(#[source] std::io::Error),
    /// Setting the socket's options.
    #[error("socket options")]
    SocketOptions(#[source] std::io::Error),
    /// The TLS handshake.
    #[error("tls")]
    Tls(#[source] std::io::Error),
    /// The HTTP/2 handshake.
    #[error("http/2")]
    Http2(#[source] h2::Error),
    /// All of it took longer than [`CONNECT_TIMEOUT`].
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// The agent's two shutdown signals: `drain` (SIGTERM: tell servers, stop reconnecting, keep
/// serving open connections) and `close` (grace over: end everything).
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// Cancelled on the shutdown signal.
    pub drain: CancellationToken,
    /// Cancelled when the agent must close everything.
    pub close: CancellationToken,
}

/// Before holding every server replica: first delay after a connection that landed on a server
/// already held. The load balancer decides where the next one lands; a few tries a second find
/// a missing replica within seconds, and [`SEARCH_MAX`] keeps a large fleet's search cheap.
pub const SEARCH_INITIAL: Duration = Duration::from_millis(500);
/// Largest delay between those tries.
pub const SEARCH_MAX: Duration = Duration::from_secs(2);

/// Keeps tunnels to the servers behind `server` until the agent drains: at least one, and as
/// many distinct servers as the fleet has (see [`crate::fleet`]). Each tunnel runs in its own
/// task; this loop only decides when to dial again.
pub async fn maintain(server: ServerTarget, shared: Arc<Shared>, life: Lifecycle) {
    // Errors (unreachable, TLS, refused): 100 ms growing to 10 s, back to 100 ms after any
    // registration, so a tunnel that worked and then failed is replaced at once.
    let mut failures = Backoff::default();
    // Landings on servers already held, while some are still missing.
    let mut search = Backoff::new(SEARCH_INITIAL, SEARCH_MAX);
    let tunnels = TaskTracker::new();
    let here = Arc::new(AtomicUsize::new(0));
    let fleet = shared.fleet.clone();
    // After a landing on a held server while nothing is missing, wait for the probe interval
    // even if this address holds nothing itself (it leads only to servers held through others).
    let mut probe_next = false;
    // Landings on held servers in a row. A search dials up to twice `target` times back to back
    // before it backs off: under round robin that covers every replica even while other agents'
    // dials interleave, and under random balancing (or round robin shared by a thousand agents)
    // one missing replica of three is missed by a round with odds (2/3)^6 = 9 %, not 30 %.
    let mut burst = 0;
    loop {
        let changed = fleet.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let wanted = fleet.wanted() || here.load(Ordering::Acquire) == 0;
        if probe_next || !wanted {
            let probe = jittered(shared.config.server_probe_interval);
            tokio::select! {
                () = life.drain.cancelled() => break,
                // A tunnel ended or the fleet grew: look again.
                () = &mut changed, if !probe_next => continue,
                () = tokio::time::sleep(probe) => {}
            }
        }
        probe_next = false;
        if life.drain.is_cancelled() {
            break;
        }
        let delay = match establish(&server, &shared, &life).await {
            Ok(Established::Tunnel(tunnel)) => {
                failures.reset();
                search.reset();
                burst = 0;
                let Some(held) = fleet.try_hold(&tunnel.server_id, tunnel.server_count) else {
                    // Another --server address reached the same server (at the same moment, or
                    // an older server that does not decline held ids): close it and search on,
                    // paced like any other landing on a held server.
                    tracing::debug!(server = %server.addr, server.id = %tunnel.server_id, "second tunnel to a held server; closing it");
                    drop(tunnel);
                    tokio::select! {
                        () = life.drain.cancelled() => break,
                        () = tokio::time::sleep(search.next_delay()) => {}
                    }
                    continue;
                };
                here.fetch_add(1, Ordering::AcqRel);
                let (shared, life, here) = (shared.clone(), life.clone(), here.clone());
                tunnels.spawn(async move {
                    tunnel.serve(&held, &shared, &life).await;
                    // Counted down before the server is let go: letting it go wakes this loop,
                    // which must then see this address as holding one tunnel less.
                    here.fetch_sub(1, Ordering::AcqRel);
                    drop(held);
                });
                continue;
            }
            Ok(Established::AlreadyHeld { server_id }) => {
                failures.reset();
                tracing::debug!(server = %server.addr, server.id = %server_id, held = fleet.held(), of = fleet.target(), "landed on a server already held");
                if !fleet.wanted() {
                    probe_next = true;
                    burst = 0;
                    continue;
                }
                burst += 1;
                if burst < 2 * fleet.target() {
                    continue;
                }
                burst = 0;
                search.next_delay()
            }
            Err(SessionError::Refused(reason)) => {
                tracing::error!(server = %server.addr, cluster = %shared.config.cluster, %reason, "server refused this agent's registration");
                failures.next_delay()
            }
            Err(err) => {
                tracing::warn!(server = %server.addr, err = %chain(&err), "cannot reach server");
                failures.next_delay()
            }
        };
        tokio::select! {
            () = life.drain.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    // Draining: open tunnels keep serving their connections until `close`.
    tunnels.close();
    tunnels.wait().await;
}

/// `interval` scaled by a random factor in [0.5, 1], so agents started together spread out.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::random_range(0.5..=1.0))
}

async fn connect(
    server: &ServerTarget,
    shared: &Shared,
    close: CancellationToken,
) -> Result<H2Channel, SessionError> {
    // Read per connection attempt: a rotated certificate is used from the next reconnect on.
    let tls = TlsConnector::from(shared.config.tls.current());
    let settings = Settings {
        stream_window: proxy_proto::STREAM_WINDOW,
        connection_window: proxy_proto::CONNECTION_WINDOW,
        keepalive_interval: shared.config.keepalive_interval,
        keepalive_timeout: shared.config.keepalive_timeout,
    };
    let setup = async {
        let tls = tls_to(server, tls, shared.config.tcp_keepalive).await?;
        H2Channel::handshake(tls, settings, close)
            .await
            .map_err(ConnectError::Http2)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, setup)
        .await
        .unwrap_or_else(|_| Err(ConnectError::Timeout(CONNECT_TIMEOUT)))
        .map_err(SessionError::Connect)
}

/// The TCP connection to `server` (through its HTTP proxy, if any) and the TLS handshake on it:
/// what every connection to a server starts with, tunnels as well as joins and renewals.
pub async fn tls_to(
    server: &ServerTarget,
    tls: TlsConnector,
    keepalive: Option<proxy_common::net::Keepalive>,
) -> Result<tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>, ConnectError> {
    let tcp = match &server.proxy {
        Some(proxy) => proxy.connect(&server.addr, CONNECT_TIMEOUT).await?,
        None => TcpStream::connect(&server.addr)
            .await
            .map_err(ConnectError::Tcp)?,
    };
    proxy_common::net::configure(&tcp, keepalive).map_err(ConnectError::SocketOptions)?;
    tls.connect(server.tls_name.clone(), ReadAhead::new(tcp))
        .await
        .map_err(ConnectError::Tls)
}

/// A new connection's registration, answered.
enum Established {
    /// Registered: a new tunnel.
    Tunnel(Box<Tunnel>),
    /// The connection landed on a server this agent already holds.
    AlreadyHeld {
        /// That server's id.
        server_id: String,
    },
}

/// A registered tunnel to one server, ready to serve dial requests.
struct Tunnel {
    addr: String,
    server_id: String,
    server_count: u32,
    /// The server takes warm streams (`Registered.features`).
    warm: bool,
    channel: H2Channel,
    control: mpsc::Sender<AgentMessage>,
    inbound: Inbound<proxy_proto::ServerMessage>,
    // Closes the HTTP/2 connection when the tunnel is dropped, whichever way it ends.
    _close_connection: tokio_util::sync::DropGuard,
}

/// Connects to `server` and registers, naming the servers already held so that a landing on
/// one of them is declined before anything is registered.
async fn establish(
    server: &ServerTarget,
    shared: &Arc<Shared>,
    life: &Lifecycle,
) -> Result<Established, SessionError> {
    let connection = life.close.child_token();
    let close_connection = connection.clone().drop_guard();
    let channel = connect(server, shared, connection).await?;
    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let register = AgentMessage {
        msg: Some(agent_message::Msg::Register(Register {
            cluster: shared.config.cluster.clone(),
            agent_id: shared.config.agent_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            upstream_ca: shared.config.upstream_ca_pem(),
            upstream_server_name: shared.config.upstream_server_name.clone(),
            held_server_ids: shared.fleet.held_ids(),
            held_for_ms: shared.fleet.held_for().as_millis() as u64,
            features: vec![
                proxy_proto::FEATURE_CANCEL_DIAL.to_owned(),
                proxy_proto::FEATURE_PING.to_owned(),
                proxy_proto::FEATURE_WARM_HEAD_AT_START.to_owned(),
            ],
        })),
    };
    control
        .try_send(register)
        .map_err(|_| SessionError::Protocol("control queue full".into()))?;
    let (send, mut inbound) = channel.open_control().await.map_err(SessionError::Open)?;
    // Writes the control queue into the stream until every sender is gone (the tunnel ended)
    // or the connection fails; bounded by the connection, which the tunnel closes on drop.
    tokio::spawn(async move {
        let messages = ReceiverStream::new(control_rx);
        if let Err(err) = proxy_common::grpc::pipe(
            messages,
            send,
            proxy_common::grpc::encode,
            proxy_common::grpc::Finish::Request,
        )
        .await
        {
            tracing::debug!(%err, "control stream's sending half ended");
        }
    });
    // A server that accepts the stream but never answers must not hold this session forever.
    let opened = tokio::time::timeout(REGISTER_TIMEOUT, inbound.opened())
        .await
        .map_err(|_| SessionError::Protocol("no answer to the registration in time".into()))?;
    match opened {
        Ok(()) => {}
        Err(status)
            if matches!(
                status.code(),
                Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated
            ) =>
        {
            return Err(SessionError::Refused(status.message().to_owned()));
        }
        Err(status) => return Err(SessionError::Stream(status)),
    }
    let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
        .await
        .map_err(|_| SessionError::Protocol("no registration answer in time".into()))?
        .map_err(SessionError::Stream)?;
    match first.and_then(|m| m.msg) {
        Some(server_message::Msg::Registered(r)) => Ok(Established::Tunnel(Box::new(Tunnel {
            addr: server.addr.clone(),
            warm: r.features.iter().any(|f| f == proxy_proto::FEATURE_WARM),
            server_id: r.server_id,
            server_count: r.server_count,
            channel,
            control,
            inbound,
            _close_connection: close_connection,
        }))),
        Some(server_message::Msg::AlreadyHeld(r)) => Ok(Established::AlreadyHeld {
            server_id: r.server_id,
        }),
        _ => Err(SessionError::Protocol(
            "expected a registration answer".into(),
        )),
    }
}

impl Tunnel {
    /// Serves dial requests until the server or the agent ends the tunnel; `held` takes the
    /// count changes the server sends.
    async fn serve(self, held: &crate::fleet::Held, shared: &Arc<Shared>, life: &Lifecycle) {
        let Self {
            addr,
            server_id,
            channel,
            control,
            mut inbound,
            _close_connection,
            warm,
            ..
        } = self;
        tracing::info!(server = %addr, server.id = %server_id, cluster = %shared.config.cluster, held = shared.fleet.held(), of = shared.fleet.target(), "registered with server");
        // Every tunneled connection of this tunnel is a child of this token: losing the server
        // closes them all.
        let session_token = life.close.child_token();
        let _close_all = session_token.clone().drop_guard();
        let budget =
            proxy_common::flow::Budget::within(shared.config.window_budget, shared.pool.clone());
        let tracker = TaskTracker::new();
        let warm = (warm && shared.config.warm_connections > 0).then(|| {
            let target = Arc::new(crate::warm::WarmTarget::new(shared.config.warm_connections));
            let pool = crate::warm::Pool {
                channel: channel.clone(),
                shared: shared.clone(),
                budget: budget.clone(),
                target: target.clone(),
                session: session_token.clone(),
                drain: life.drain.clone(),
            };
            tracker.spawn(pool.run(tracker.clone()));
            target
        });
        let session = Session {
            addr: &addr,
            server_id: &server_id,
            held,
            env: crate::dial::DialEnv {
                channel,
                control,
                shared: shared.clone(),
                budget,
                warm,
            },
            dials: Dials::default(),
            tracker: &tracker,
            token: &session_token,
        };
        let mut draining = false;
        let result = loop {
            let msg = tokio::select! {
                () = life.drain.cancelled(), if !draining => {
                    draining = true;
                    session.announce_drain();
                    continue;
                }
                () = life.close.cancelled() => break Ok(()),
                msg = inbound.message() => msg,
            };
            match msg {
                Ok(Some(m)) => {
                    if let Err(err) = session.handle(m.msg) {
                        break Err(err);
                    }
                }
                Ok(None) => break Ok(()),
                Err(status) => break Err(SessionError::Stream(status)),
            }
        };
        session_token.cancel();
        tracker.close();
        tracker.wait().await;
        match result {
            Ok(()) if life.drain.is_cancelled() => {}
            Ok(()) => {
                tracing::info!(server = %addr, server.id = %server_id, "server closed the tunnel; reconnecting")
            }
            Err(err) => {
                tracing::warn!(server = %addr, server.id = %server_id, err = %chain(&err), "tunnel to server lost")
            }
        }
    }
}

/// One registered tunnel while it serves: what its control messages act on.
struct Session<'a> {
    addr: &'a str,
    server_id: &'a str,
    held: &'a crate::fleet::Held,
    /// What each dial needs, cloned per dial.
    env: crate::dial::DialEnv,
    /// Dials being served, so the server can cancel one whose client left.
    dials: Dials,
    /// Where the dials run; the session waits for them before it ends.
    tracker: &'a TaskTracker,
    /// Parent of every tunneled connection's token.
    token: &'a CancellationToken,
}

impl Session<'_> {
    /// Acts on one control message from the server.
    fn handle(&self, msg: Option<server_message::Msg>) -> Result<(), SessionError> {
        match msg {
            Some(server_message::Msg::Dial(dial)) => self.start_dial(dial),
            Some(server_message::Msg::CancelDial(c)) => {
                if self.dials.cancel(c.dial_id) {
                    tracing::debug!(dial.id = c.dial_id, "dial cancelled: its client left");
                    self.env.shared.metrics.dials_cancelled.inc();
                }
            }
            Some(server_message::Msg::Fleet(fleet)) => {
                tracing::info!(server = %self.addr, server.id = %self.server_id, count = fleet.server_count, "server count changed");
                self.held.set_count(fleet.server_count);
            }
            Some(server_message::Msg::Ping(ping)) => {
                let pong = AgentMessage {
                    msg: Some(agent_message::Msg::Pong(proxy_proto::Pong {
                        seq: ping.seq,
                    })),
                };
                // A full queue means the tunnel is congested: a late pong says so.
                let _ = self.env.control.try_send(pong);
            }
            Some(server_message::Msg::Registered(_) | server_message::Msg::AlreadyHeld(_)) => {
                return Err(SessionError::Protocol("unexpected control message".into()));
            }
            None => {
                // A message type of a newer server this agent does not know: servers send such
                // only to agents that list the feature, so this is skipped.
                tracing::debug!(server = %self.addr, "unknown control message skipped");
            }
        }
        Ok(())
    }

    /// Serves a dial request in its own task, cancellable by the server.
    fn start_dial(&self, dial: proxy_proto::DialRequest) {
        let shared = &self.env.shared;
        if let Some(warm) = &self.env.warm
            && shared.config.destination(&dial.destination) == Ok(shared.config.upstream.as_str())
        {
            // The server found no warm connection for this client.
            warm.missed();
        }
        let env = self.env.clone();
        let cancel = self.token.child_token();
        let entry = self.dials.insert(dial.dial_id, cancel.clone());
        self.tracker.spawn(async move {
            let _entry = entry;
            let dest = dial.destination;
            crate::dial::serve_dial(env, dial.dial_id, &dest, cancel).await;
        });
    }

    /// Tells the server this agent is draining: new connections go to other agents.
    fn announce_drain(&self) {
        let drain = AgentMessage {
            msg: Some(agent_message::Msg::Drain(Drain {})),
        };
        // Best effort: if the queue is full the server learns when the stream ends.
        let _ = self.env.control.try_send(drain);
        tracing::info!(server = %self.addr, server.id = %self.server_id, "draining: told the server to send new connections elsewhere");
    }
}

/// The dials one tunnel is serving, by id, with the token that cancels each.
#[derive(Debug, Default, Clone)]
struct Dials(Arc<std::sync::Mutex<std::collections::HashMap<u64, CancellationToken>>>);

impl Dials {
    /// Records dial `id`; it is forgotten when the returned entry is dropped.
    fn insert(&self, id: u64, cancel: CancellationToken) -> DialEntry {
        self.lock().insert(id, cancel);
        DialEntry {
            dials: self.clone(),
            id,
        }
    }

    /// Cancels dial `id`; false if it is not being served (finished, or never seen).
    fn cancel(&self, id: u64) -> bool {
        let token = self.lock().remove(&id);
        token.map(|t| t.cancel()).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, CancellationToken>> {
        // Never held across an await or a panic-prone call: poisoning cannot leave it torn.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A dial's place in [`Dials`], removed on drop.
#[derive(Debug)]
struct DialEntry {
    dials: Dials,
    id: u64,
}

impl Drop for DialEntry {
    fn drop(&mut self) {
        self.dials.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::error::chain;

    use super::*;
    use crate::http_proxy::HttpProxy;

    #[test]
    fn a_connect_failure_reads_as_one_line_with_its_causes() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let proxy = HttpProxy::parse("http://user:secret@proxy:3128").unwrap();
        let cases = [
            (
                ConnectError::Tcp(refused()),
                "cannot connect: tcp: connection refused",
            ),
            (
                ProxyError::Io {
                    proxy: proxy.clone(),
                    source: refused(),
                }
                .into(),
                "cannot connect: proxy http://proxy:3128 (with credentials): connection refused",
            ),
            (
                ConnectError::Timeout(CONNECT_TIMEOUT),
                "cannot connect: timed out after 10s",
            ),
        ];
        for (err, text) in cases {
            assert_eq!(chain(&SessionError::Connect(err)).to_string(), text);
        }
    }
}
