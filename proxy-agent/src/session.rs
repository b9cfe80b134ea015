//! One tunnel to one proxy server: connect with mTLS, register on the control stream, serve dial
//! requests; on any loss, reconnect with backoff.

use std::sync::Arc;
use std::time::Duration;

use proxy_common::readahead::ReadAhead;
use proxy_proto::tunnel_client::TunnelClient;
use proxy_proto::{AgentMessage, Drain, MAX_MESSAGE, Register, agent_message, server_message};
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

/// Time allowed for TCP + TLS + HTTP/2 setup to a server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the server has to answer a registration.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Control messages queued towards a server (dial failures).
const CONTROL_QUEUE: usize = 64;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// TCP, TLS or HTTP/2 setup failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The server refused the registration; its reason.
    #[error("server refused registration: {0}")]
    Refused(String),
    /// The control stream failed.
    #[error("control stream failed: {0}")]
    Stream(String),
    /// The server sent something out of protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
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

/// Keeps a tunnel to `server` until the agent drains.
pub async fn maintain(server: ServerTarget, shared: Arc<Shared>, life: Lifecycle) {
    let mut backoff = Backoff::default();
    let shutdown = &life.drain;
    while !shutdown.is_cancelled() {
        match session(&server, &shared, &life).await {
            Ok(()) => {
                backoff.reset();
                if shutdown.is_cancelled() {
                    break;
                }
                tracing::info!(server = %server.addr, "server closed the tunnel; reconnecting");
            }
            Err(SessionError::Refused(reason)) => {
                tracing::error!(server = %server.addr, cluster = %shared.config.cluster, %reason, "server refused this agent's registration");
            }
            Err(err) => {
                tracing::warn!(server = %server.addr, %err, "tunnel to server lost");
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
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
        let tcp = TcpStream::connect(&server.addr)
            .await
            .map_err(|e| SessionError::Connect(format!("tcp: {e}")))?;
        tcp.set_nodelay(true)
            .map_err(|e| SessionError::Connect(e.to_string()))?;
        let tls = tls
            .connect(server.tls_name.clone(), ReadAhead::new(tcp))
            .await
            .map_err(|e| SessionError::Connect(format!("tls: {}", error_chain(&e))))?;
        H2Channel::handshake(tls, settings, close)
            .await
            .map_err(|e| SessionError::Connect(format!("http/2: {}", error_chain(&e))))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, setup)
        .await
        .map_err(|_| SessionError::Connect(format!("timed out after {CONNECT_TIMEOUT:?}")))?
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One connection's life: `Ok` if it registered and later ended.
async fn session(
    server: &ServerTarget,
    shared: &Arc<Shared>,
    life: &Lifecycle,
) -> Result<(), SessionError> {
    // Closes the HTTP/2 connection when this session is over, whichever way it ends.
    let connection = life.close.child_token();
    let _close_connection = connection.clone().drop_guard();
    let channel = connect(server, shared, connection).await?;
    // The authority is only a label in the request URI: the connection is already made.
    let origin = http::Uri::from_static("https://proxy-server");
    let mut client = TunnelClient::with_origin(channel, origin)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let register = AgentMessage {
        msg: Some(agent_message::Msg::Register(Register {
            cluster: shared.config.cluster.clone(),
            agent_id: shared.config.agent_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            upstream_ca: shared.config.upstream_ca_pem(),
            upstream_server_name: shared.config.upstream_server_name.clone(),
        })),
    };
    control
        .try_send(register)
        .map_err(|_| SessionError::Protocol("control queue full".into()))?;
    // A server that accepts the stream but never answers must not hold this session forever.
    let opened = tokio::time::timeout(
        REGISTER_TIMEOUT,
        client.control(ReceiverStream::new(control_rx)),
    )
    .await
    .map_err(|_| SessionError::Protocol("no answer to the registration in time".into()))?;
    let mut inbound = match opened {
        Ok(resp) => resp.into_inner(),
        Err(status)
            if matches!(
                status.code(),
                Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated
            ) =>
        {
            return Err(SessionError::Refused(status.message().to_owned()));
        }
        Err(status) => return Err(SessionError::Stream(status.to_string())),
    };
    let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
        .await
        .map_err(|_| SessionError::Protocol("no registration answer in time".into()))?
        .map_err(|s| SessionError::Stream(s.to_string()))?;
    let server_id = match first.and_then(|m| m.msg) {
        Some(server_message::Msg::Registered(r)) => r.server_id,
        _ => {
            return Err(SessionError::Protocol(
                "expected a registration answer".into(),
            ));
        }
    };
    let _registered = shared.registered();
    tracing::info!(server = %server.addr, server.id = %server_id, cluster = %shared.config.cluster, "registered with server");

    // Every tunneled connection of this session is a child of this token: losing the server
    // closes them all.
    let session_token = life.close.child_token();
    let _close_all = session_token.clone().drop_guard();
    let tracker = TaskTracker::new();
    let mut draining = false;
    let result = loop {
        let msg = tokio::select! {
            () = life.drain.cancelled(), if !draining => {
                draining = true;
                let drain = AgentMessage { msg: Some(agent_message::Msg::Drain(Drain {})) };
                // Best effort: if the queue is full the server learns when the stream ends.
                let _ = control.try_send(drain);
                tracing::info!(server = %server.addr, "draining: told the server to send new connections elsewhere");
                continue;
            }
            () = life.close.cancelled() => break Ok(()),
            msg = inbound.message() => msg,
        };
        match msg {
            Ok(Some(m)) => match m.msg {
                Some(server_message::Msg::Dial(dial)) => {
                    let (client, control, shared) =
                        (client.clone(), control.clone(), shared.clone());
                    let cancel = session_token.child_token();
                    tracker.spawn(async move {
                        let dest = dial.destination;
                        crate::dial::serve_dial(
                            client,
                            control,
                            dial.dial_id,
                            &dest,
                            &shared,
                            cancel,
                        )
                        .await;
                    });
                }
                Some(server_message::Msg::Registered(_)) | None => {
                    break Err(SessionError::Protocol("unexpected control message".into()));
                }
            },
            Ok(None) => break Ok(()),
            Err(status) => break Err(SessionError::Stream(status.message().to_owned())),
        }
    };
    session_token.cancel();
    tracker.close();
    tracker.wait().await;
    result
}
