//! The HTTP CONNECT frontend. Each client connection runs in a task of its own ([`Client`]),
//! through one step after another, each in its own file:
//!
//! 1. `accept`: a place in the handshake gate, the accept, the client's task and its span;
//! 2. `admit`: TLS (when configured) and the request head under one deadline, the cluster the
//!    head names, who the client is and whether it may reach that cluster (`authorize`), and
//!    an agent of the cluster picked;
//! 3. `relocate`: the client moves to the shard its agent lives on (see [`crate::shards`]);
//! 4. `open`: the agent dials its upstream, or hands over a warm stream (`dial`), and `200` is
//!    answered only once the upstream connection exists;
//! 5. `carry`: bytes spliced until both sides are done, then one access line.
//!
//! A step that ends the connection answers it if it still can (`refusal`), and counts and logs
//! its outcome once.

use std::sync::Arc;
use std::time::Duration;

use proxy_common::pump::LocalSocket;
use proxy_common::reload::Reloadable;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod accept;
mod admit;
mod authorize;
mod carry;
mod dial;
mod open;
mod refusal;
mod relocate;

pub use accept::serve;
use admit::{Admission, Admitted};
pub use refusal::MAX_REASON_PHRASE;

use crate::config::{FrontendAuth, Limits};
use crate::metrics::Metrics;
use crate::registry::Clusters;
use crate::shards::Shard;

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

/// One client's task: what it needs to run its steps, on whichever thread it runs (the one it
/// was accepted on, then its agent's shard).
struct Client {
    frontend: Arc<Frontend>,
    /// Ends the connection (the server closes).
    cancel: CancellationToken,
    /// Where the connection is tracked, on whichever thread it runs.
    tracker: TaskTracker,
    /// The socket has its options already (inherited from the listener).
    configured: bool,
    /// The shard this task runs on (`None`: the worker threads).
    shard: Option<Shard>,
}

impl Client {
    /// One client, in its own task: TLS (when configured) under the admission deadline, the
    /// request admitted, then on its agent's shard the tunnel opened and carried until both
    /// sides are done.
    ///
    /// The task itself stays small: each step runs boxed, and only a pointer lives in the task.
    /// A future is as large as its largest state, so without the boxes a tunneled connection
    /// idling for hours would keep room for its TLS handshake, head and dial steps too
    /// (measured: 10 of an idle connection's 16 KiB on the server). The tunnel step is boxed
    /// too (see [`Client::relocate`]).
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
                if let Some(tunnel) = self.relocate(tcp, admitted) {
                    tunnel.await;
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
                if let Some(tunnel) = self.relocate(stream, admitted) {
                    tunnel.await;
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
            let open = Box::pin(self.frontend.open(client, admitted));
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
