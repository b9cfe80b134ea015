//! The HTTP CONNECT frontend: one task per client connection, which (optionally) runs TLS,
//! reads the request head under a timeout, authenticates and authorizes the client for the
//! cluster, finds an agent, asks it to dial, answers `200` only once the agent reached its
//! upstream, then splices bytes until both sides are done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use http::StatusCode;
use proxy_common::error::chain;
use proxy_common::pump::{self, ByteCounts, LocalSocket, PumpError, Role};
use proxy_common::reload::Reloadable;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod dial;
mod refusal;

use dial::Dialed;
pub use refusal::MAX_REASON_PHRASE;
use refusal::{ESTABLISHED, Refusal, refusal_for, refuse};

use crate::auth::{AuthError, Credentials};
use crate::config::{FrontendAuth, Limits};
use crate::connect::{self, ConnectRequest, RequestError};
use crate::metrics::{ClusterLabel, Metrics, Outcome};
use crate::registry::Clusters;

/// What the frontend needs from the rest of the server.
#[derive(Debug)]
pub struct Frontend {
    /// Where agents are found.
    pub clusters: Arc<Clusters>,
    /// Where outcomes are counted.
    pub metrics: Arc<Metrics>,
    /// TLS of the listener, if any.
    pub tls: Option<Reloadable<rustls::ServerConfig>>,
    /// How clients authenticate.
    pub auth: FrontendAuth,
    /// Size and time limits.
    pub limits: Limits,
    /// See `--dial-timeout`.
    pub dial_timeout: Duration,
    /// See `--agent-wait`.
    pub agent_wait: Duration,
    /// See `--tcp-keepalive`.
    pub keepalive: Option<proxy_common::net::Keepalive>,
    /// The fleet, for its warm-up window (see `--warmup`).
    pub fleet: Arc<crate::fleet::Fleet>,
    /// See `--cluster-suffix`.
    pub cluster_suffix: Option<String>,
    /// See `--connect-ports`.
    pub connect_ports: Vec<u16>,
    /// Clients in their TLS handshake or before their head (see `--max-handshakes`).
    pub gate: Arc<proxy_common::gate::Gate>,
}

/// A client's admission: its place in the gate until its head is read, and the one deadline
/// for its TLS handshake and head.
struct Admission {
    ticket: proxy_common::gate::Ticket,
    deadline: tokio::time::Instant,
}

/// A client's connection over TLS.
type FrontendTls =
    tokio_rustls::server::TlsStream<proxy_common::readahead::ReadAhead<crate::shards::Movable>>;

/// A client whose request was read and authorized, and the agent picked for it.
struct Admitted {
    /// What the client sent after its head: forwarded first.
    early: BytesMut,
    cluster: String,
    /// What the client asked the agent to dial (`Proxy-Destination`); `None`: its upstream.
    destination: Option<String>,
    agent: Arc<crate::registry::AgentHandle>,
    /// When its request began (after TLS).
    started: Instant,
}

/// A client whose tunnel is open (`200` sent): what carrying it needs.
struct Opened<S> {
    client: S,
    /// What the client sent after its head, before its `200`: forwarded first.
    early: BytesMut,
    dialed: Dialed,
    cluster: String,
    /// When its request began (after TLS).
    started: Instant,
    /// How long the tunnel took to open.
    connect_time: Duration,
}

/// Accepts CONNECT clients until `shutdown` (the listener is then closed, so new clients are
/// refused); each connection runs in `tracker` until it ends or `close` fires.
pub async fn serve(
    listener: TcpListener,
    frontend: Arc<Frontend>,
    shutdown: CancellationToken,
    close: CancellationToken,
    tracker: TaskTracker,
) {
    // A listener bound with the options passes them on: no six syscalls per client.
    let inherited = proxy_common::net::passes_options(&listener, frontend.keepalive);
    let spawn = |next, frontend: &Arc<Frontend>| {
        spawn_client(next, frontend, inherited, &close, &tracker);
    };
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            next = next_client(&listener, &frontend.gate) => next,
        };
        spawn(next, &frontend);
    }
    // Closing the listener resets the clients the kernel has already accepted for it, which
    // a TCP load balancer cannot retry (to it they were connected): they are served first,
    // every one, each once it has a place in the gate (which frees one within its eviction age
    // however full it is). Clients arriving after the close are refused, which load balancers
    // do retry elsewhere. The accept is a plain syscall: tokio's would see only readiness its
    // reactor has already been told of.
    let mut drained = 0usize;
    if let Ok(listener) = listener.into_std() {
        // Non-blocking (as tokio left it): `WouldBlock` once the backlog is empty.
        while let Ok((stream, addr)) = listener.accept() {
            let ticket = frontend.gate.admit().await;
            let stream = stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream));
            match stream {
                Ok(stream) => spawn((ticket, stream, addr), &frontend),
                Err(err) => tracing::warn!(%err, "frontend accept failed"),
            }
            drained += 1;
        }
    }
    tracing::info!(drained, "frontend listener closed");
}

/// The next client: a place in the gate first (while it is full of young handshakes, new
/// clients wait in the kernel's backlog), then the accept.
async fn next_client(
    listener: &TcpListener,
    gate: &Arc<proxy_common::gate::Gate>,
) -> (proxy_common::gate::Ticket, TcpStream, std::net::SocketAddr) {
    let ticket = gate.admit().await;
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => return (ticket, stream, addr),
            Err(err) => {
                tracing::warn!(%err, "frontend accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs one accepted client in `tracker`, until it ends or `close` fires; `configured`: its
/// socket already has its options (inherited from the listener).
fn spawn_client(
    (mut ticket, stream, addr): (proxy_common::gate::Ticket, TcpStream, std::net::SocketAddr),
    frontend: &Arc<Frontend>,
    configured: bool,
    close: &CancellationToken,
    tracker: &TaskTracker,
) {
    let span = tracing::info_span!(
        "connect",
        client.addr = %addr,
        cluster = tracing::field::Empty,
        destination = tracing::field::Empty,
        identity = tracing::field::Empty,
    );
    ticket.renew();
    let admission = Admission {
        ticket,
        deadline: tokio::time::Instant::now() + frontend.limits.handshake_timeout,
    };
    let client = Client {
        frontend: frontend.clone(),
        cancel: close.child_token(),
        tracker: tracker.clone(),
        configured,
    };
    tracker.spawn(client.handle(stream, admission).instrument(span));
}

/// What a client's task needs to go on elsewhere: on its agent's shard.
struct Client {
    frontend: Arc<Frontend>,
    /// Ends the connection (the server closes).
    cancel: CancellationToken,
    /// Where the connection is tracked, on whichever thread it runs.
    tracker: TaskTracker,
    /// The socket has its options already (inherited from the listener).
    configured: bool,
}

impl Client {
    /// One client, in its own task: TLS (when configured) under the admission deadline, the
    /// request admitted, then on its agent's shard (see [`crate::shards`]) the tunnel opened and
    /// carried until both sides are done.
    ///
    /// The task itself stays small: each step runs boxed, and only a pointer lives in the task.
    /// A future is as large as its largest state, so without the boxes a tunneled connection
    /// idling for hours would keep room for its TLS handshake, head and dial steps too
    /// (measured: 10 of an idle connection's 16 KiB on the server). The tunnel step is boxed
    /// too: inline, the TLS arm's stream (rustls' state, over 4 KB) would size the task of
    /// every plain client as well (measured: 9.9 instead of 5.4 KiB per idle connection).
    async fn handle(self, mut tcp: TcpStream, admission: Admission) {
        if !self.configured
            && let Err(err) = proxy_common::net::configure(&tcp, self.frontend.keepalive)
        {
            tracing::debug!(%err, "cannot set socket options");
        }
        // Each box is made in its own statement: a temporary lives to the end of its
        // statement, so `Box::pin(future).await` in one would keep room for the unboxed future
        // in this one.
        match self.frontend.tls.clone() {
            None => {
                let admit = Box::pin(self.frontend.admit(&mut tcp, None, admission));
                let Some(admitted) = self.until_closed(admit).await.flatten() else {
                    return;
                };
                match admitted.agent.home().cloned() {
                    // The socket moves too: its readiness then wakes the shard's thread.
                    Some(home) if !home.is_current() => {
                        let tracker = self.tracker.clone();
                        let span = tracing::Span::current();
                        home.spawn_moved(&tracker, tcp, move |tcp| {
                            self.tunnel(tcp, admitted).instrument(span)
                        });
                    }
                    _ => {
                        let tunnel = Box::pin(self.tunnel(tcp, admitted));
                        tunnel.await;
                    }
                }
            }
            Some(tls) => {
                let admit = Box::pin(async {
                    let (mut stream, cn) = self.frontend.handshake(&tls, tcp, &admission).await?;
                    let admitted = self.frontend.admit(&mut stream, cn, admission).await?;
                    Some((stream, admitted))
                });
                let Some((stream, admitted)) = self.until_closed(admit).await.flatten() else {
                    return;
                };
                match admitted.agent.home().cloned() {
                    // The socket moves under the TLS state, which stays as it is.
                    Some(home) if !home.is_current() => {
                        let mut stream = stream;
                        let shard = home.index();
                        let socket = match stream.get_mut().0.get_mut().detach() {
                            Ok(socket) => socket,
                            Err(err) => {
                                tracing::warn!(%err, shard, "cannot move a connection to its shard");
                                return;
                            }
                        };
                        let tracker = self.tracker.clone();
                        let moved = async move {
                            if let Err(err) = stream.get_mut().0.get_mut().attach(socket) {
                                tracing::warn!(%err, shard, "cannot move a connection to its shard");
                                return;
                            }
                            self.tunnel(stream, admitted).await;
                        };
                        home.spawn(&tracker, moved.instrument(tracing::Span::current()));
                    }
                    _ => {
                        let tunnel = Box::pin(self.tunnel(stream, admitted));
                        tunnel.await;
                    }
                }
            }
        }
    }

    /// Opens the tunnel of an admitted client and carries it, until it ends or the server
    /// closes.
    async fn tunnel<S>(self, client: S, admitted: Admitted)
    where
        S: AsyncRead + AsyncWrite + LocalSocket + Unpin + Send + 'static,
    {
        let work = async {
            let open = Box::pin(self.frontend.connect(client, admitted));
            let Some(opened) = open.await else { return };
            let carry = Box::pin(self.frontend.carry(opened));
            carry.await;
        };
        self.until_closed(work).await;
    }

    /// `work`, unless the server closes first (`None`). The work is polled first: at close the
    /// agent's tokens fire with the server's, and a tunnel that ends of them then still logs
    /// and counts its end; work that does not end at once is dropped.
    async fn until_closed<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            out = work => Some(out),
            () = self.cancel.cancelled() => None,
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

impl Frontend {
    /// The TLS handshake, under the admission deadline: the stream and the client
    /// certificate's common name. `None`: it failed, timed out, or the client was evicted
    /// (logged).
    async fn handshake(
        &self,
        tls: &Reloadable<rustls::ServerConfig>,
        tcp: TcpStream,
        admission: &Admission,
    ) -> Option<(FrontendTls, Option<String>)> {
        let acceptor = TlsAcceptor::from(tls.current());
        let accept = acceptor.accept(proxy_common::readahead::ReadAhead::new(
            crate::shards::Movable::new(tcp),
        ));
        let accepted = tokio::select! {
            res = tokio::time::timeout_at(admission.deadline, accept) => res,
            () = admission.ticket.evicted().cancelled() => {
                self.evicted();
                return None;
            }
        };
        match accepted {
            Ok(Ok(stream)) => {
                let cn = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(proxy_common::tls::common_name);
                Some((stream, cn))
            }
            Ok(Err(err)) => {
                tracing::info!(%err, "frontend TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::info!("frontend TLS handshake timed out");
                None
            }
        }
    }

    /// Reads the client's head, the cluster it names and who it is, and picks an agent of the
    /// cluster (waiting for one, see `--agent-wait`). Each step that ends the connection counts
    /// and logs its outcome once. `None`: the connection ended.
    async fn admit<S>(
        &self,
        client: &mut S,
        cert_cn: Option<String>,
        admission: Admission,
    ) -> Option<Admitted>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // After the TLS handshake, as the tunnel's open time counts from the request.
        let started = Instant::now();
        let req = match self.read_head(client, admission).await {
            Ok(Some(req)) => req,
            Ok(None) => return None,
            Err(refusal) => {
                self.refuse(client, "", refusal).await;
                return None;
            }
        };
        let cluster = self.cluster_of(&req.host);
        tracing::Span::current().record("cluster", cluster.as_str());
        if let Some(destination) = &req.destination {
            tracing::Span::current().record("destination", destination.as_str());
        }
        if let Err(refusal) = self.check_target(&req, &cluster) {
            self.refuse(client, "", refusal).await;
            return None;
        }
        let label = self.metric_label(&cluster);
        let identity = match self.authorize(&req, cert_cn.as_deref(), &cluster) {
            Ok(identity) => identity,
            Err(refusal) => {
                self.refuse(client, label, refusal).await;
                return None;
            }
        };
        tracing::Span::current().record("identity", identity.as_str());
        let mut early = BytesMut::from(&req.leftover[..]);
        let destination = req.destination;
        let picked = self
            .watching(client, &mut early, label, self.pick_agent(&cluster))
            .await?;
        match picked {
            Ok(agent) => Some(Admitted {
                early,
                cluster,
                destination,
                agent,
                started,
            }),
            Err(refusal) => {
                // Read again, not reused: the pick may have waited for the cluster's first
                // agent.
                self.refuse(client, self.metric_label(&cluster), refusal)
                    .await;
                None
            }
        }
    }

    /// Has the admitted client's agent dial (or hand over a warm stream), and answers `200`.
    /// `None`: the connection ended (counted and logged).
    async fn connect<S>(&self, mut client: S, admitted: Admitted) -> Option<Opened<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Admitted {
            mut early,
            cluster,
            destination,
            agent,
            started,
        } = admitted;
        let label = self.metric_label(&cluster);
        let dial = self.dial(agent, &cluster, destination.as_deref());
        let dialed = match self.watching(&mut client, &mut early, label, dial).await? {
            Ok(dialed) => dialed,
            Err(refusal) => {
                if matches!(refusal.outcome, Outcome::DialFailed | Outcome::DialTimeout) {
                    self.clusters.record_dial(&cluster, Err(&refusal.reason));
                }
                // Read again, not reused: the dial may have seen the cluster's last agent
                // leave.
                self.refuse(client, self.metric_label(&cluster), refusal)
                    .await;
                return None;
            }
        };
        let connect_time = started.elapsed();
        self.reply_established(&mut client, &cluster, dialed.warm, connect_time)
            .await
            .then_some(Opened {
                client,
                early,
                dialed,
                cluster,
                started,
                connect_time,
            })
    }

    /// Reads the request head within the admission's deadline, then lets the admission go:
    /// what follows is bounded by the connection limits. `Ok(None)`: there is no one to answer
    /// (the client closed first, or a newer client took its place in the gate).
    async fn read_head<S: AsyncRead + Unpin>(
        &self,
        client: &mut S,
        admission: Admission,
    ) -> Result<Option<ConnectRequest>, Refusal> {
        let read = connect::read_request(client, self.limits.max_head_bytes);
        let head = tokio::select! {
            head = tokio::time::timeout_at(admission.deadline, read) => head,
            () = admission.ticket.evicted().cancelled() => {
                self.evicted();
                return Ok(None);
            }
        };
        match head {
            Ok(Ok(req)) => Ok(Some(req)),
            Ok(Err(RequestError::Closed)) => Ok(None),
            Ok(Err(err)) => Err(refusal_for(&err)),
            Err(_) => Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                Outcome::BadRequest,
                format!(
                    "request head not received within {:?}",
                    self.limits.handshake_timeout
                ),
            )),
        }
    }

    /// Whether the CONNECT names a valid cluster, at a port this server serves.
    fn check_target(&self, req: &ConnectRequest, cluster: &str) -> Result<(), Refusal> {
        if !proxy_common::is_valid_cluster_name(cluster) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest,
                format!("{:?} is not a cluster name", req.host),
            ));
        }
        if !self.connect_ports.contains(&req.port) {
            let served: Vec<String> = self.connect_ports.iter().map(u16::to_string).collect();
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest,
                format!(
                    "port {} is not served: a cluster is reached at its API server, CONNECT {cluster}:{} (ports served: {})",
                    req.port,
                    self.connect_ports[0],
                    served.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// The `cluster` label of a refused connection's metrics: `cluster` if it is registered now,
    /// else empty. Metric labels only ever carry names of registered clusters.
    fn metric_label<'a>(&self, cluster: &'a str) -> &'a str {
        if self.clusters.is_registered(cluster) {
            cluster
        } else {
            ""
        }
    }

    /// Runs `step` (the agent's pick, or its dial) while watching the client: one that leaves
    /// cancels the step (a dial here and at the agent), so no upstream connection is made for a
    /// client that is gone. What it sends meanwhile is kept in `early`. `None`: it left
    /// (counted under `label`, and logged).
    async fn watching<S: AsyncRead + Unpin, T>(
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

    /// Tells the client its tunnel is open, and counts the connection: only once the `200` is
    /// out, as a tunnel the client never got is not an `ok`. False if the client left first
    /// (counted and logged). The dial itself succeeded either way, so its time is recorded
    /// first: a client that reads the status page right after its `200` sees its dial.
    async fn reply_established<S: AsyncWrite + Unpin>(
        &self,
        client: &mut S,
        cluster: &str,
        warm: bool,
        connect_time: Duration,
    ) -> bool {
        self.clusters.record_dial(cluster, Ok(connect_time));
        self.metrics
            .dial_duration
            .get_or_create(&ClusterLabel {
                cluster: cluster.to_owned(),
            })
            .observe(connect_time.as_secs_f64());
        // Flushed: over TLS the record may otherwise wait in rustls for a socket that was not
        // writable yet (one just moved to its shard's reactor is not, until its first event).
        let sent = async {
            client.write_all(ESTABLISHED).await?;
            client.flush().await
        };
        if let Err(err) = sent.await {
            self.metrics.count(cluster, Outcome::ClientLeft);
            tracing::info!(
                outcome = Outcome::ClientLeft.label(),
                %err,
                "client left before the tunnel was established"
            );
            return false;
        }
        self.metrics.count(cluster, Outcome::Ok);
        if warm {
            self.metrics.warm_connects.inc();
        }
        true
    }

    /// Splices the client and its tunnel stream until both sides are done, the agent leaves or
    /// the server shuts down, then logs the connection.
    async fn carry<S>(&self, opened: Opened<S>)
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

    /// A newer client took this one's place in the gate before it sent its head.
    fn evicted(&self) {
        self.metrics.handshake_limited("frontend");
        tracing::debug!(
            "closed before its request head: the handshake gate was full (see --max-handshakes)"
        );
    }

    async fn refuse<S: AsyncWrite + Unpin>(&self, client: S, label: &str, refusal: Refusal) {
        self.metrics.count(label, refusal.outcome);
        tracing::info!(
            outcome = refusal.outcome.label(),
            status = refusal.status.as_u16(),
            reason = %refusal.reason,
            "connect refused"
        );
        refuse(client, &refusal).await;
    }

    /// Who the client is, and whether it may reach `cluster`. Logs each decision once.
    fn authorize(
        &self,
        req: &ConnectRequest,
        cert_cn: Option<&str>,
        cluster: &str,
    ) -> Result<String, Refusal> {
        let policy = match &self.auth {
            // Open on purpose (loopback, or --frontend-allow-unauthenticated): the agent's
            // --allow-destination alone decides destinations.
            FrontendAuth::Open => {
                return Ok(cert_cn.map_or_else(|| "anonymous".to_owned(), str::to_owned));
            }
            FrontendAuth::CertificateRequired => {
                // The TLS handshake already required and verified the certificate.
                let identity = cert_cn.map(str::to_owned).ok_or_else(|| {
                    Refusal::new(
                        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                        Outcome::Unauthenticated,
                        "a client certificate is required",
                    )
                })?;
                // Destinations are granted per client in the auth file; without one, none.
                if let Some(destination) = &req.destination {
                    return Err(destination_refused(&identity, cluster, destination));
                }
                return Ok(identity);
            }
            FrontendAuth::Policy(policy) => policy.current(),
        };
        let identity = match policy.authenticate(&req.credentials, cert_cn) {
            Ok(identity) => identity.to_owned(),
            Err(err) => {
                let presented = match (&req.credentials, cert_cn) {
                    (Credentials::None, None) => "nothing",
                    (Credentials::None, Some(_)) => "an unknown client certificate",
                    _ => "a token",
                };
                tracing::info!(
                    identity = "",
                    cluster,
                    decision = "unauthenticated",
                    presented,
                    "access decision"
                );
                let reason = match err {
                    AuthError::Missing => format!(
                        "{err}: send Proxy-Authorization (Bearer token, or Basic with the token as password) or a client certificate"
                    ),
                    AuthError::Invalid => err.to_string(),
                };
                return Err(Refusal::new(
                    StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                    Outcome::Unauthenticated,
                    reason,
                ));
            }
        };
        if !policy.allows(&identity, cluster) {
            tracing::info!(identity, cluster, decision = "forbidden", "access decision");
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                Outcome::Forbidden,
                format!("{identity:?} is not allowed to reach cluster {cluster:?}"),
            ));
        }
        if let Some(destination) = &req.destination
            && !policy.allows_destination(&identity, destination)
        {
            return Err(destination_refused(&identity, cluster, destination));
        }
        tracing::info!(identity, cluster, decision = "allowed", "access decision");
        Ok(identity)
    }

    /// The cluster a CONNECT host names: the host, minus the configured suffix.
    fn cluster_of(&self, host: &str) -> String {
        match &self.cluster_suffix {
            Some(suffix) => host
                .strip_suffix(suffix.as_str())
                .unwrap_or(host)
                .to_owned(),
            None => host.to_owned(),
        }
    }
}

/// A `Proxy-Destination` the client's grants do not cover: checked before any agent is asked,
/// answered with a body that names no list or configuration (those go to the log only).
fn destination_refused(identity: &str, cluster: &str, destination: &str) -> Refusal {
    tracing::info!(
        identity,
        cluster,
        destination,
        decision = "destination_forbidden",
        "access decision: the client's `destinations` in the auth file do not cover it"
    );
    Refusal::new(
        StatusCode::FORBIDDEN,
        Outcome::DestinationForbidden,
        format!("destination not allowed for cluster {cluster:?}"),
    )
}
