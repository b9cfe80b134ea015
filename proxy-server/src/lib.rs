//! proxy-server: keeps the agents' gRPC tunnels keyed by cluster name and carries HTTP CONNECT
//! requests through the matching agent.
//!
//! [`run`] takes already-bound listeners and a shutdown token, so tests and embedders bind
//! `127.0.0.1:0` and never race for ports.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod config;
pub mod connect;
pub mod frontend;
pub mod listener;
pub mod metrics;
pub mod registry;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proxy_proto::MAX_MESSAGE;
use proxy_proto::tunnel_server::TunnelServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError};

/// HTTP/2 receive window of each stream (one tunneled connection): the most a stalled client
/// lets pile up per connection, and large enough for full speed on fast links.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// HTTP/2 receive window of a whole agent connection. Bytes buffered for a stalled stream hold
/// part of it, so it is many stream windows wide: dozens of stalled clients still leave the
/// agent's other connections running.
pub const CONNECTION_WINDOW: u32 = 128 * 1024 * 1024;

/// Most concurrent streams (tunneled connections plus the control stream) one agent
/// connection may open. hyper's default of 200 would cap a cluster's connections.
pub const MAX_STREAMS_PER_AGENT: u32 = 16 * 1024;

/// How long open work may take to wind down after the shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The server's three listeners, bound before [`run`].
#[derive(Debug)]
pub struct Listeners {
    /// gRPC/mTLS listener for agents.
    pub agent: TcpListener,
    /// HTTP CONNECT listener.
    pub frontend: TcpListener,
    /// Admin listener.
    pub admin: TcpListener,
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding a listener failed.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Installing the SIGHUP handler failed.
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    /// The gRPC server failed.
    #[error("agent listener failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Listeners {
    /// Binds the addresses of `config`.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { what, addr, source })
        }
        Ok(Self {
            agent: bind("agent", config.agent_addr).await?,
            frontend: bind("frontend", config.frontend_addr).await?,
            admin: bind("admin", config.admin_addr).await?,
        })
    }

    /// One line naming the bound addresses (useful with port 0).
    pub fn describe(&self) -> String {
        let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        format!(
            "proxy-server listening agent={} frontend={} admin={}",
            addr(&self.agent),
            addr(&self.frontend),
            addr(&self.admin)
        )
    }
}

/// Runs the server until `shutdown` is cancelled and open work has wound down.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::Metrics::new(&mut prometheus));
    let registry = Arc::new(registry::Registry::new(config.limits, metrics.clone()));
    let tracker = TaskTracker::new();

    // Certificates, keys, CAs and the policy are re-read when their files change or on SIGHUP.
    let reload = proxy_common::reload::sighup_trigger().map_err(ServerError::Signal)?;
    config
        .agent_tls
        .spawn_watcher(reload.clone(), shutdown.clone());
    if let Some(tls) = &config.frontend_tls {
        tls.spawn_watcher(reload.clone(), shutdown.clone());
    }
    if let config::FrontendAuth::Policy(policy) = &config.frontend_auth {
        policy.spawn_watcher(reload.clone(), shutdown.clone());
    }

    let admin = proxy_common::admin::Admin {
        ready: Arc::new(|| Ok(())),
        metrics: Arc::new(prometheus),
    };
    tracker.spawn(proxy_common::admin::serve(
        listeners.admin,
        admin,
        shutdown.clone(),
    ));

    let frontend = Arc::new(frontend::Frontend {
        registry: registry.clone(),
        metrics: metrics.clone(),
        tls: config.frontend_tls.clone(),
        auth: config.frontend_auth.clone(),
        limits: config.limits,
        dial_timeout: config.dial_timeout,
        agent_wait: config.agent_wait,
        cluster_suffix: config.cluster_suffix.clone(),
    });
    tracker.spawn(frontend::serve(
        listeners.frontend,
        frontend,
        shutdown.clone(),
        tracker.clone(),
    ));

    tracing::info!(server.id = %config.server_id, "proxy-server started");
    let service = tunnel::TunnelService::new(registry, config.server_id.clone(), shutdown.clone());
    let incoming = listener::incoming(
        listeners.agent,
        config.agent_tls.clone(),
        config.limits.handshake_timeout,
        shutdown.clone(),
    );
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS_PER_AGENT)
        .add_service(
            TunnelServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());

    let result = grpc.await;
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within the shutdown grace period");
    }
    tracing::info!("proxy-server stopped");
    Ok(result?)
}
