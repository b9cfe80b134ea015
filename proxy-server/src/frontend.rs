//! The HTTP CONNECT frontend: one task per client connection, which reads the request head under
//! a timeout, finds an agent of the requested cluster, asks it to dial, answers `200` only once
//! the agent reached its upstream, then splices bytes until both sides are done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_common::pump::{self, ByteCounts, PumpError, Role};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::connect::{self, MAX_HEAD_BYTES, RequestError};
use crate::registry::{AgentGone, DialOutcome, Registry, TunnelStream};

/// Time a client has to send its complete request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the frontend needs from the rest of the server.
#[derive(Debug)]
pub struct Frontend {
    /// Where agents are found.
    pub registry: Arc<Registry>,
    /// See `--dial-timeout`.
    pub dial_timeout: Duration,
    /// See `--agent-wait`.
    pub agent_wait: Duration,
    /// See `--cluster-suffix`.
    pub cluster_suffix: Option<String>,
}

/// A CONNECT that did not become a tunnel: the status and one human-readable line for the client.
#[derive(Debug)]
struct Refusal {
    status: u16,
    reason: String,
    outcome: &'static str,
}

impl Refusal {
    fn new(status: u16, outcome: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            outcome,
        }
    }
}

/// The one place request errors become HTTP statuses.
fn refusal_for(err: &RequestError) -> Refusal {
    match err {
        RequestError::Malformed(_) | RequestError::Io(_) | RequestError::Closed => {
            Refusal::new(400, "bad_request", err.to_string())
        }
        RequestError::MethodNotAllowed(_) => Refusal::new(405, "bad_request", err.to_string()),
        RequestError::TooLarge(_) => Refusal::new(431, "bad_request", err.to_string()),
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "Connection established",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

fn error_response(refusal: &Refusal) -> Vec<u8> {
    let body = format!("{}\n", refusal.reason.replace(['\r', '\n'], " "));
    let allow = if refusal.status == 405 {
        "Allow: CONNECT\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {} {}\r\n{allow}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        refusal.status,
        status_text(refusal.status),
        body.len()
    )
    .into_bytes()
}

/// Accepts CONNECT clients until `shutdown`; each connection runs in `tracker`.
pub async fn serve(
    listener: TcpListener,
    frontend: Arc<Frontend>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, addr) = tokio::select! {
            () = shutdown.cancelled() => break,
            res = listener.accept() => match res {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(%err, "frontend accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let frontend = frontend.clone();
        let cancel = shutdown.child_token();
        let span =
            tracing::info_span!("connect", client.addr = %addr, cluster = tracing::field::Empty);
        tracker.spawn(handle(frontend, stream, cancel).instrument(span));
    }
}

async fn handle(frontend: Arc<Frontend>, mut client: TcpStream, cancel: CancellationToken) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let head = tokio::select! {
        () = cancel.cancelled() => return,
        res = tokio::time::timeout(HEAD_TIMEOUT, connect::read_request(&mut client, MAX_HEAD_BYTES)) => res,
    };
    let req = match head {
        Ok(Ok(req)) => req,
        Ok(Err(RequestError::Closed)) => return,
        Ok(Err(err)) => return refuse(client, &refusal_for(&err)).await,
        Err(_) => {
            let r = Refusal::new(
                408,
                "bad_request",
                format!("request head not received within {HEAD_TIMEOUT:?}"),
            );
            return refuse(client, &r).await;
        }
    };
    let cluster = frontend.cluster_of(&req.host);
    tracing::Span::current().record("cluster", cluster.as_str());
    if !proxy_common::is_valid_cluster_name(&cluster) {
        let r = Refusal::new(
            400,
            "bad_request",
            format!("{:?} is not a cluster name", req.host),
        );
        return refuse(client, &r).await;
    }

    let tunnel = tokio::select! {
        () = cancel.cancelled() => return,
        res = frontend.dial(&cluster) => res,
    };
    let (agent_id, agent_closed, stream) = match tunnel {
        Ok(t) => t,
        Err(refusal) => {
            tracing::info!(outcome = refusal.outcome, status = refusal.status, reason = %refusal.reason, "connect refused");
            return refuse(client, &refusal).await;
        }
    };
    let ttfb = started.elapsed();
    if let Err(err) = client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
    {
        tracing::info!(%err, "client left before the tunnel was established");
        return;
    }
    // The connection ends when the agent leaves or the server shuts down, whichever first.
    let conn_cancel = agent_closed.child_token();
    let counts = ByteCounts::default();
    let result = tokio::select! {
        res = pump::splice(client, req.leftover, stream.outbound, stream.inbound, Role::Server, &counts, &conn_cancel) => res,
        () = cancel.cancelled() => Err(PumpError::Cancelled),
    };
    let (to_cluster, from_cluster) = counts.get();
    let outcome = match &result {
        Ok(()) => "ok".to_owned(),
        Err(err) => err.to_string(),
    };
    tracing::info!(
        agent.id = %agent_id,
        bytes_to_cluster = to_cluster,
        bytes_from_cluster = from_cluster,
        connect_ms = ttfb.as_millis() as u64,
        duration_ms = started.elapsed().as_millis() as u64,
        %outcome,
        "tunneled connection closed"
    );
}

async fn refuse(mut client: TcpStream, refusal: &Refusal) {
    let _ = client.write_all(&error_response(refusal)).await;
    let _ = client.shutdown().await;
}

impl Frontend {
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

    /// Finds an agent for `cluster` and has it dial its upstream.
    async fn dial(
        &self,
        cluster: &str,
    ) -> Result<(String, CancellationToken, Box<TunnelStream>), Refusal> {
        let Some(agent) = self.registry.wait_for_agent(cluster, self.agent_wait).await else {
            return Err(Refusal::new(
                503,
                "no_agent",
                format!("no agent connected for cluster {cluster:?}"),
            ));
        };
        let mut pending = self.registry.begin_dial(&agent);
        let dial = async {
            agent.request_dial(pending.id()).await?;
            pending.outcome().await
        };
        match tokio::time::timeout(self.dial_timeout, dial).await {
            Ok(Ok(DialOutcome::Connected(stream))) => {
                Ok((agent.info.agent_id.clone(), agent.closed().clone(), stream))
            }
            Ok(Ok(DialOutcome::Failed(reason))) => Err(Refusal::new(
                502,
                "dial_failed",
                format!(
                    "agent {} of cluster {cluster:?} could not reach its upstream: {reason}",
                    agent.info.agent_id
                ),
            )),
            Ok(Err(AgentGone)) => Err(Refusal::new(
                502,
                "dial_failed",
                format!(
                    "agent {} of cluster {cluster:?} disconnected during the dial",
                    agent.info.agent_id
                ),
            )),
            Err(_) => Err(Refusal::new(
                504,
                "dial_timeout",
                format!(
                    "agent of cluster {cluster:?} did not reach its upstream within {:?}",
                    self.dial_timeout
                ),
            )),
        }
    }
}
