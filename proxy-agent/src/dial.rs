//! Serving one dial request: check the destination, reach it (see [`crate::upstream`]), open
//! the connection's own `Data` stream tagged with the dial id, and splice bytes until both sides
//! are done; a failure is reported to the server on the control stream.

use std::time::Instant;

use proxy_common::pump::DataStream;
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
        crate::upstream::carry(&env.shared, socket, stream, &env.budget, &cancel, started),
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
        res = crate::upstream::dial_upstream(shared, upstream, started) => match res {
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
