//! Serving one dial request: reach the upstream, open the connection's own `Data` stream tagged
//! with the dial id, and splice bytes until both sides are done.

use std::time::Instant;

use bytes::Bytes;
use proxy_common::error::chain;
use proxy_common::pump::{self, ByteCounts, DataStream, Role};
use proxy_proto::{AgentMessage, DIAL_ID_HEADER, DialFailed, agent_message};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::channel::H2Channel;

/// What serving a dial needs from its tunnel.
#[derive(Clone)]
pub struct DialEnv {
    /// The tunnel's HTTP/2 connection (data streams are opened on it).
    pub channel: H2Channel,
    /// The tunnel's control stream (dial failures).
    pub control: mpsc::Sender<AgentMessage>,
    /// Agent state.
    pub shared: std::sync::Arc<Shared>,
    /// The tunnel's flow-control budget.
    pub budget: std::sync::Arc<proxy_common::flow::Budget>,
    /// The tunnel's warm connections, if it keeps any: a failed dial of the upstream closes them.
    pub warm: Option<std::sync::Arc<crate::warm::WarmTarget>>,
}

/// The failure kind of a destination this agent may not dial (also its metric label).
const NOT_ALLOWED: &str = "not_allowed";

/// Handles dial `dial_id` for `destination` (empty: the upstream) from the tunnel of `env`.
///
/// Opening and carrying run boxed, each made in its own statement, so the connection's task
/// holds only a pointer: a connection idling for hours keeps `carry`'s state alone, not room
/// for the dial and the stream open before it (a future is as large as its largest state).
pub async fn serve_dial(env: DialEnv, dial_id: u64, destination: &str, cancel: CancellationToken) {
    let started = Instant::now();
    // Counted from the moment the dial arrives, so a draining agent waits for dials still
    // being set up, not only for connections already carrying bytes.
    let _active = env.shared.active_connection();
    let open = Box::pin(open(&env, dial_id, destination, &cancel, started));
    let Some((socket, stream)) = open.await else {
        return;
    };
    let span = tracing::debug_span!("dial", dial.id = dial_id);
    let carry = Box::pin(tracing::Instrument::instrument(
        carry(&env.shared, socket, stream, &env.budget, &cancel, started),
        span,
    ));
    carry.await;
}

/// Dials the upstream and opens the connection's `Data` stream; a failure is reported to the
/// server (`None`).
async fn open(
    env: &DialEnv,
    dial_id: u64,
    destination: &str,
    cancel: &CancellationToken,
    started: Instant,
) -> Option<(TcpStream, DataStream)> {
    let DialEnv {
        channel,
        control,
        shared,
        warm,
        ..
    } = env;
    let upstream = match shared.config.destination(destination) {
        Ok(dest) => dest,
        Err(reason) => {
            report_failure(shared, control, cancel, dial_id, NOT_ALLOWED, reason).await;
            return None;
        }
    };
    let socket = tokio::select! {
        () = cancel.cancelled() => return None,
        res = dial_upstream(shared, upstream, started) => match res {
            Ok(socket) => socket,
            Err(failure) => {
                if let Some(warm) = warm
                    .as_ref()
                    .filter(|_| upstream == shared.config.upstream && failure.upstream_down())
                {
                    warm.upstream_failed();
                }
                report_failure(shared, control, cancel, dial_id, failure.kind, failure.reason).await;
                return None;
            }
        },
    };
    let opened = tokio::select! {
        () = cancel.cancelled() => return None,
        res = channel.open_data((DIAL_ID_HEADER, dial_id.into())) => res,
    };
    match opened {
        Ok(stream) => Some((socket, stream)),
        Err(err) => {
            // Reported so the CONNECT fails now with 502, not at its dial timeout.
            let reason = format!("opening the tunnel stream failed: {err}");
            report_failure(shared, control, cancel, dial_id, "other", reason).await;
            None
        }
    }
}

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

async fn report_failure(
    shared: &Shared,
    control: &mpsc::Sender<AgentMessage>,
    cancel: &CancellationToken,
    dial_id: u64,
    kind: &str,
    reason: String,
) {
    tracing::warn!(dial.id = dial_id, %reason, "upstream dial failed");
    shared.metrics.dial_failed(kind);
    let msg = AgentMessage {
        msg: Some(agent_message::Msg::DialFailed(DialFailed {
            dial_id,
            reason,
            not_allowed: kind == NOT_ALLOWED,
        })),
    };
    // If the control stream is gone the server fails the dial itself; a full queue is waited
    // on only while the tunnel lives.
    tokio::select! {
        _ = control.send(msg) => {}
        () = cancel.cancelled() => {}
    }
}
