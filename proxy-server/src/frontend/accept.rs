//! The accept step: a place in the handshake gate, then the accept, then the client's own task
//! (see [`super::Client`]) in a span that names it. At shutdown the listener's backlog is served
//! before it closes.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::admit::Admission;
use super::{Client, Frontend};
use crate::shards::Shard;

/// Accepts CONNECT clients until `shutdown` (the listener is then closed, so new clients are
/// refused); each connection runs in `tracker` until it ends or `close` fires. `shard`: the
/// shard this runs on (`None`: the worker threads), where its clients' tasks start.
pub async fn serve(
    listener: TcpListener,
    frontend: Arc<Frontend>,
    shard: Option<Shard>,
    shutdown: CancellationToken,
    close: CancellationToken,
    tracker: TaskTracker,
) {
    // A listener bound with the options passes them on: no six syscalls per client.
    let inherited = proxy_common::net::passes_options(&listener, frontend.keepalive);
    let spawn = |next, frontend: &Arc<Frontend>| {
        spawn_client(next, frontend, inherited, &close, &tracker, &shard);
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

/// Runs one accepted client in `tracker` on `shard` (this task's), until it ends or `close`
/// fires; `configured`: its socket already has its options (inherited from the listener).
fn spawn_client(
    (mut ticket, stream, addr): (proxy_common::gate::Ticket, TcpStream, std::net::SocketAddr),
    frontend: &Arc<Frontend>,
    configured: bool,
    close: &CancellationToken,
    tracker: &TaskTracker,
    shard: &Option<Shard>,
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
        shard: shard.clone(),
    };
    tracker.spawn(client.handle(stream, admission).instrument(span));
}
