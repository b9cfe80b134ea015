//! The agent listener: accepts TCP, runs each mutual-TLS handshake in its own task under a
//! timeout (a peer that never finishes its handshake holds up nobody), and hands finished
//! connections, tagged with the agent's certificate CN, to [`crate::agent_conn`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proxy_common::gate::Gate;
use proxy_common::readahead::ReadAhead;
use proxy_common::reload::Reloadable;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Finished handshakes waiting for [`crate::agent_conn::serve`] to pick them up.
const ACCEPTED_QUEUE: usize = 64;

/// Facts about an agent's TLS connection, attached to every request it makes.
#[derive(Debug, Clone)]
pub struct AgentConn {
    /// Unique per connection for the life of the process.
    pub id: u64,
    /// The agent's address.
    pub addr: SocketAddr,
    /// Subject CN of the agent's verified client certificate: the only cluster it may serve.
    pub cn: String,
    /// Reads that brought bytes from the agent: its proof of life (see `proxy_common::heard`).
    pub heard: proxy_common::heard::Heard,
    /// The shard the connection lives on (`None` without shards): the agent's home, where its
    /// registration and the CONNECTs it carries run.
    pub shard: Option<crate::shards::Shard>,
}

/// A TLS connection from an agent, and what is known of it.
///
/// The TLS stream is boxed: the connection's task then holds a pointer while it waits for the
/// HTTP/2 handshake, rather than a second copy of rustls' state (about 1.2 KiB) beside the one
/// inside the HTTP/2 connection (a future does not reuse the room of what it captured).
pub struct AgentIo {
    /// The verified TLS stream.
    pub tls: Box<TlsStream<ReadAhead<TcpStream>>>,
    /// Who is on it.
    pub conn: AgentConn,
    /// The shard it runs on (`None` without shards: the main runtime).
    pub lease: Option<crate::shards::Lease>,
}

/// Accepts agents on `listener` until `shutdown`; yields their verified TLS connections.
/// The TLS configuration is read anew for every connection, so a reloaded certificate applies to
/// the next agent that connects.
///
/// The queue itself stays open until `close`, like the agent connections (which end with a
/// GOAWAY only then): a GOAWAY during the drain would make agents fail the data streams of
/// dials still in flight.
///
/// The agent listener and what its handshakes need.
pub struct AgentListener<L> {
    /// The bound socket.
    pub listener: TcpListener,
    /// Its TLS (mutual), re-read per handshake.
    pub tls: Reloadable<rustls::ServerConfig>,
    /// One deadline for the TLS handshake.
    pub handshake_timeout: Duration,
    /// TCP keepalive of accepted connections.
    pub keepalive: Option<proxy_common::net::Keepalive>,
    /// Bounds the handshakes under way.
    pub gate: Arc<Gate>,
    /// Called for each connection closed because the gate was full.
    pub limited: L,
    /// Where the accept loop and each handshake run, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Where each connection lives from its handshake on.
    pub shards: Arc<crate::shards::Shards>,
    /// Joining by token: a connection without a client certificate is served there (the TLS
    /// configuration admits one only while agents may join).
    pub joins: Option<Arc<crate::join::Joins>>,
}

/// At most `gate`'s cap of handshakes run at once (see [`proxy_common::gate`]); `limited` is
/// called for each connection closed because a newer one took its place.
pub fn incoming<L>(
    agents: AgentListener<L>,
    shutdown: CancellationToken,
    close: CancellationToken,
) -> mpsc::Receiver<AgentIo>
where
    L: Fn() + Clone + Send + 'static,
{
    let AgentListener {
        listener,
        tls,
        handshake_timeout,
        keepalive,
        gate,
        limited,
        tasks,
        shards,
        joins,
    } = agents;
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    let next_id = Arc::new(AtomicU64::new(1));
    let handshakes = tasks.clone();
    tasks.spawn(async move {
        loop {
            let mut ticket = tokio::select! {
                () = shutdown.cancelled() => break,
                ticket = gate.admit() => ticket,
            };
            let (tcp, addr) = tokio::select! {
                () = shutdown.cancelled() => break,
                res = listener.accept() => match res {
                    Ok(conn) => conn,
                    Err(err) => {
                        // Typically EMFILE; back off briefly instead of spinning.
                        tracing::warn!(%err, "agent accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = TlsAcceptor::from(tls.current());
            ticket.renew();
            let tx = tx.clone();
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            let shutdown = shutdown.clone();
            let limited = limited.clone();
            let joins = joins.clone();
            let lease = shards.assign();
            let shard = lease.as_ref().map(|lease| lease.shard().clone());
            let handshake = move |tcp: TcpStream| async move {
                let handshake = tokio::time::timeout(
                    handshake_timeout,
                    handshake(acceptor, tcp, addr, id, keepalive),
                );
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = ticket.evicted().cancelled() => {
                        tracing::debug!(agent.addr = %addr, "closed in its TLS handshake: the handshake gate was full (see --max-handshakes)");
                        return limited();
                    }
                    res = handshake => match res {
                        Ok(Ok(io)) => io,
                        Ok(Err(err)) => {
                            tracing::warn!(agent.addr = %addr, %err, "agent TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(agent.addr = %addr, "agent TLS handshake timed out");
                            return;
                        }
                    },
                };
                let mut io = match accepted {
                    Accepted::Agent(io) => io,
                    Accepted::Joiner(tls) => {
                        // Holding its ticket: a join is still a connection not yet
                        // authenticated.
                        if let Some(joins) = joins.filter(|j| j.accepts_joins()) {
                            joins.serve_joiner(tls, addr).await;
                        }
                        return;
                    }
                };
                drop(ticket);
                io.conn.shard = lease.as_ref().map(|lease| lease.shard().clone());
                io.lease = lease;
                let _ = tx.send(io).await;
            };
            match shard {
                Some(shard) => shard.spawn_moved(&handshakes, tcp, handshake),
                None => drop(handshakes.spawn(handshake(tcp))),
            }
        }
        // New agents are refused from here on (the listener is closed).
        drop(listener);
        close.cancelled().await;
        drop(tx);
    });
    rx
}

/// A connection whose TLS handshake succeeded.
enum Accepted {
    /// An agent with its verified certificate.
    Agent(AgentIo),
    /// A connection without a client certificate: an agent joining by token (admitted by the
    /// TLS configuration only while joins are on).
    Joiner(Box<TlsStream<ReadAhead<TcpStream>>>),
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    id: u64,
    keepalive: Option<proxy_common::net::Keepalive>,
) -> io::Result<Accepted> {
    proxy_common::net::configure(&tcp, keepalive)?;
    let tls = acceptor.accept(ReadAhead::new(tcp)).await?;
    if tls.get_ref().1.peer_certificates().is_none() {
        return Ok(Accepted::Joiner(Box::new(tls)));
    }
    let cn = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(proxy_common::tls::common_name)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "agent certificate has no Subject CN",
            )
        })?;
    Ok(Accepted::Agent(AgentIo {
        tls: Box::new(tls),
        conn: AgentConn {
            id,
            addr,
            cn,
            heard: proxy_common::heard::Heard::default(),
            shard: None,
        },
        lease: None,
    }))
}
