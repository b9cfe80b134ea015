//! The upstream end of a tunneled connection, as dialed and warm connections share it: reaching
//! the upstream (bounded by `--max-buffered` and the dial timeout, socket options set before
//! the dial) and splicing it with its `Data` stream. It sits below both users: the `dial`
//! module, which serves a server's dial request, and the `warm` module, which dials ahead of
//! demand.

use std::time::Instant;

use bytes::Bytes;
use proxy_common::error::chain;
use proxy_common::pump::{self, ByteCounts, DataStream, Role};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// Splices an upstream connection and its data stream until both sides are done, then logs
/// what it carried (dialed and warm connections alike).
pub async fn carry(
    shared: &Shared,
    socket: TcpStream,
    stream: DataStream,
    budget: &std::sync::Arc<proxy_common::flow::Budget>,
    cancel: &CancellationToken,
    started: Instant,
) {
    let (to_upstream, from_upstream) = shared.metrics.byte_counters();
    // The pump's "sent" is what it read from the upstream socket.
    let counts = std::sync::Arc::new(ByteCounts::with_metrics(from_upstream, to_upstream));
    let result = pump::carry(
        socket,
        Bytes::new(),
        stream,
        Role::Agent,
        &counts,
        budget,
        cancel,
    )
    .await;
    let (from_upstream, to_upstream) = counts.get();
    let outcome = match &result {
        Ok(()) => "ok".to_owned(),
        Err(err) => chain(err).to_string(),
    };
    tracing::debug!(
        bytes_to_upstream = to_upstream,
        bytes_from_upstream = from_upstream,
        duration_ms = started.elapsed().as_millis() as u64,
        %outcome,
        "tunneled connection closed"
    );
}

/// A failed upstream dial: a bounded metric label and the reason for the client.
#[derive(Debug)]
pub struct DialFailure {
    /// `refused`, `unreachable`, `timeout`, `buffered` (`--max-buffered` reached) or `other`.
    pub kind: &'static str,
    /// Human-readable, with the address.
    pub reason: String,
}

impl DialFailure {
    /// Whether the upstream itself failed (not the agent's own bound).
    pub fn upstream_down(&self) -> bool {
        self.kind != BUFFERED
    }
}

/// The failure kind of a dial refused because `--max-buffered` is reached.
const BUFFERED: &str = "buffered";

/// Connects to `upstream` within the dial timeout, records the dial time (from `started`) and
/// sets the socket options.
pub async fn dial_upstream(
    shared: &Shared,
    upstream: &str,
    started: Instant,
) -> Result<TcpStream, DialFailure> {
    if !shared.pool.admits() {
        return Err(DialFailure {
            kind: BUFFERED,
            reason: format!(
                "the agent's connections hold all the memory they may ({} MiB, --max-buffered): \
                 upstreams that stopped reading pin it until they read or close",
                shared.pool.limit() >> 20
            ),
        });
    }
    let keepalive = shared.config.tcp_keepalive;
    let dialed =
        tokio::time::timeout(shared.config.dial_timeout, connect(upstream, keepalive)).await;
    let socket = match dialed {
        Ok(Ok(socket)) => socket,
        Ok(Err(err)) => {
            let kind = match err.kind() {
                std::io::ErrorKind::ConnectionRefused => "refused",
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                    "unreachable"
                }
                _ => "other",
            };
            let reason = format!("dial {upstream}: {err}");
            return Err(DialFailure { kind, reason });
        }
        Err(_) => {
            let reason = format!(
                "dial {upstream}: timed out after {:?}",
                shared.config.dial_timeout
            );
            return Err(DialFailure {
                kind: "timeout",
                reason,
            });
        }
    };
    shared
        .metrics
        .upstream_dial_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(socket)
}

/// Connects to `upstream` (`host:port`), trying each address it resolves to in turn as
/// [`TcpStream::connect`] does, each socket with its options set before its dial (see
/// [`proxy_common::net::configure_unconnected`]). The error is the last address's.
async fn connect(
    upstream: &str,
    keepalive: Option<proxy_common::net::Keepalive>,
) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(upstream).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let attempt = match socket {
            Ok(socket) => {
                if let Err(err) = proxy_common::net::configure_unconnected(&socket, keepalive)
                    .and_then(|()| proxy_common::net::upstream_unconnected(&socket))
                {
                    tracing::debug!(%err, "cannot set socket options");
                }
                socket.connect(addr).await
            }
            Err(err) => Err(err),
        };
        match attempt {
            Ok(stream) => {
                if let Err(err) = proxy_common::net::finish_dialed(&stream, keepalive) {
                    tracing::debug!(%err, "cannot set socket options");
                }
                return Ok(stream);
            }
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "could not resolve to any address",
        )
    }))
}
