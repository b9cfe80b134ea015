//! Agent connections, served with h2 directly (see [`proxy_common::grpc`] for why not tonic's
//! server): one task per connection accepts its streams and routes them by path, keeps the
//! connection alive with pings, and ends it with a GOAWAY when the server closes.
//!
//! A data stream costs no task of its own: its head is answered here, in the connection's task,
//! and the stream is then carried by the CONNECT that takes it (see [`proxy_common::pump::carry`]).
//! A control stream gets one task, for its registration and control messages.

use std::sync::Arc;
use std::time::Duration;

use proxy_common::grpc::{Frame, Offered};
use proxy_common::shutdown::CLOSE_GRACE;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::join::Joins;
use crate::listener::{AgentConn, AgentIo};
use crate::tunnel::TunnelService;

/// Most concurrent streams (tunneled connections plus the control stream) one agent
/// connection may open. hyper's default of 200 would cap a cluster's connections.
pub const MAX_STREAMS_PER_AGENT: u32 = 16 * 1024;

/// Largest header block accepted from an agent: what hyper's server accepted before.
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// How agent connections are served.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Ping interval.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// Deadline for the agent's HTTP/2 preface and settings, after its TLS handshake.
    pub handshake_timeout: Duration,
}

/// Serves each agent connection `incoming` yields, in a task of `tasks`, until the stream ends
/// (at `close`: see [`crate::listener::incoming`]). The connections end themselves at `close`.
pub async fn serve(
    mut incoming: mpsc::Receiver<AgentIo>,
    service: Arc<TunnelService>,
    joins: Option<(Arc<Joins>, TaskTracker)>,
    settings: Settings,
    close: CancellationToken,
    tasks: TaskTracker,
) {
    while let Some(io) = incoming.recv().await {
        // On the shard its socket was moved to (see `crate::shards`).
        let shard = io.lease.as_ref().map(|lease| lease.shard().clone());
        let conn = serve_connection(io, service.clone(), joins.clone(), settings, close.clone());
        match shard {
            Some(shard) => shard.spawn(&tasks, conn),
            None => drop(tasks.spawn(conn)),
        }
    }
}

/// Serves one agent connection. A function returning an `async move` block rather than an
/// `async fn` (which keeps its arguments twice: as passed and as its body's locals), and the
/// close deadline boxed only once it runs: this future is held for every connected agent.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice (see above)"
)]
fn serve_connection(
    io: AgentIo,
    service: Arc<TunnelService>,
    joins: Option<(Arc<Joins>, TaskTracker)>,
    settings: Settings,
    close: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        // Named so that the block holds it for the connection's life: an async block captures
        // only the places it uses, so an unnamed field would be dropped when this function
        // returns, and the shard would count the agent gone (every agent then went to the
        // first shard).
        let _lease = &io.lease;
        // Borrowed in place, not moved out: a moved field would take room in the future twice.
        let conn = &io.conn;
        let handshake = h2::server::Builder::new()
            .initial_window_size(proxy_proto::STREAM_WINDOW)
            .initial_connection_window_size(proxy_proto::CONNECTION_WINDOW)
            .max_concurrent_streams(MAX_STREAMS_PER_AGENT)
            .max_frame_size(proxy_proto::MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Frame>(proxy_common::heard::Listening::new(
                io.tls,
                conn.heard.clone(),
            ));
        let mut h2 = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
            Ok(Ok(h2)) => h2,
            Ok(Err(err)) => {
                tracing::warn!(agent.addr = %conn.addr, %err, "agent's HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                tracing::warn!(agent.addr = %conn.addr, "agent's HTTP/2 handshake timed out");
                return;
            }
        };
        let keepalive = proxy_common::grpc::keepalive(
            h2.ping_pong(),
            settings.keepalive_interval,
            settings.keepalive_timeout,
            conn.heard.clone(),
        );
        let mut keepalive = std::pin::pin!(keepalive);
        // Set once the server closes: how long streams under way may still finish.
        let mut closing: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let mut goaway_sent = false;
        loop {
            tokio::select! {
                next = h2.accept() => match next {
                    Some(Ok((request, respond))) => route(&service, joins.as_ref(), conn, request, respond),
                    Some(Err(err)) => {
                        tracing::debug!(agent.addr = %conn.addr, %err, "agent connection failed");
                        break;
                    }
                    None => break,
                },
                reason = &mut keepalive => {
                    tracing::info!(agent.addr = %conn.addr, reason, "agent connection dropped");
                    break;
                }
                () = close.cancelled(), if closing.is_none() => {
                    closing = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
                }
                () = async { closing.as_mut().expect("branch enabled while closing").await },
                    if closing.is_some() => {
                    tracing::debug!(agent.addr = %conn.addr, "agent connection did not close in time");
                    break;
                }
            }
            if closing.is_some() && !goaway_sent {
                // Streams under way may finish; the agents' registrations end now anyway.
                h2.graceful_shutdown();
                goaway_sent = true;
            }
        }
    }
}

/// Answers a stream the agent opened, by its path: gRPC's `/package.Service/Method`.
fn route(
    service: &Arc<TunnelService>,
    joins: Option<&(Arc<Joins>, TaskTracker)>,
    conn: &AgentConn,
    request: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Frame>,
) {
    let (head, body) = request.into_parts();
    let offered = Offered::new(body, respond);
    let grpc = head
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if head.method != http::Method::POST || !grpc {
        let status = Status::unimplemented(
            "only gRPC calls (POST, content-type application/grpc) are served here",
        );
        return offered.refuse(&status);
    }
    match head.uri.path() {
        proxy_proto::CONTROL_PATH => service.spawn_control(conn.clone(), offered),
        proxy_proto::DATA_PATH => service.data(conn.id, &head.headers, offered),
        proxy_proto::RENEW_PATH => match joins {
            Some((joins, tasks)) => joins.renew(&conn.cn, conn.addr, offered, tasks),
            None => offered.refuse(&Status::unimplemented(
                "this server does not renew agent certificates (no --agent-signer-cert)",
            )),
        },
        path => {
            let status = Status::unimplemented(format!("no method {path:?}"));
            offered.refuse(&status);
        }
    }
}
