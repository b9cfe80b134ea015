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
pub mod fleet;
pub mod frontend;
pub mod kubeconfig;
pub mod listener;
pub mod metrics;
pub mod registry;
pub mod status;
pub mod tunnel;
pub mod warm;

use std::net::SocketAddr;
use std::sync::Arc;

use proxy_common::error::{BoxError, chain};
use proxy_proto::MAX_MESSAGE;
use proxy_proto::tunnel_server::TunnelServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError};

/// Most concurrent streams (tunneled connections plus the control stream) one agent
/// connection may open. hyper's default of 200 would cap a cluster's connections.
pub const MAX_STREAMS_PER_AGENT: u32 = 16 * 1024;

use proxy_common::shutdown::CLOSE_GRACE as SHUTDOWN_GRACE;

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
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Installing the SIGHUP handler failed.
    #[error("cannot install the SIGHUP handler")]
    Signal(#[source] std::io::Error),
    /// A task of the server panicked.
    #[error("server task failed")]
    Task(#[source] tokio::task::JoinError),
    /// The gRPC server failed.
    #[error("agent listener failed")]
    Transport(#[from] tonic::transport::Error),
    /// A listener stopped serving before shutdown: the process stops rather than run on
    /// half deaf while `/readyz` says all is well.
    #[error("the {which} listener stopped unexpectedly")]
    ListenerStopped {
        /// Which listener.
        which: &'static str,
        /// Why, as far as known.
        source: BoxError,
    },
}

/// What a listener task that ended before shutdown says about itself.
fn listener_stopped<E: std::error::Error + Send + Sync + 'static>(
    which: &'static str,
    res: Result<Result<(), E>, tokio::task::JoinError>,
) -> ServerError {
    let source = match res {
        Ok(Ok(())) => "it ended".into(),
        Ok(Err(err)) => err.into(),
        Err(join) => join.into(),
    };
    ServerError::ListenerStopped { which, source }
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

/// The proxy URL for kubeconfigs: `--public-url`, or the bound frontend address.
fn public_url(config: &Config, frontend: &TcpListener) -> String {
    if let Some(url) = &config.public_url {
        return url.clone();
    }
    let scheme = if config.frontend_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let addr = frontend.local_addr().unwrap_or(config.frontend_addr);
    if addr.ip().is_unspecified() {
        tracing::warn!(%addr, "frontend listens on all addresses: set --public-url so generated kubeconfigs name a reachable proxy");
    }
    format!("{scheme}://{addr}")
}

/// Readiness during the warm-up: with other replicas to serve clients, this one stays out of the
/// client load balancer's rotation until agents have had time to find it. A lone replica is
/// ready at once (CONNECTs it gets meanwhile wait for their agent, see `--warmup`).
fn warmup_check(fleet: &fleet::Fleet) -> Result<String, String> {
    match fleet.warmup_left() {
        Some(left) if fleet.count() > 1 => Err(format!(
            "warming up: agents are still finding this replica ({:.0} s left, {} replica(s))",
            left.as_secs_f64().ceil(),
            fleet.count()
        )),
        _ => Ok(format!(
            "server {} of a fleet of {}",
            fleet.server_id,
            fleet.count()
        )),
    }
}

/// Keeps `proxy_server_server_count` equal to the fleet's count.
fn spawn_count_gauge(
    fleet: &fleet::Fleet,
    metrics: &Arc<metrics::Metrics>,
    close: CancellationToken,
) {
    let mut count = fleet.subscribe();
    let metrics = metrics.clone();
    metrics
        .server_count
        .set(i64::from(*count.borrow_and_update()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = close.cancelled() => return,
                changed = count.changed() => if changed.is_err() { return },
            }
            metrics
                .server_count
                .set(i64::from(*count.borrow_and_update()));
        }
    });
}

/// Runs the server until `shutdown` is cancelled, then drains: the listeners stop accepting
/// (new CONNECTs and agents are refused), `/readyz` fails, open tunneled connections continue
/// until they end or `--shutdown-grace` runs out, then everything still open is closed.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    // `shutdown` stops intake; `close` ends what is still open once the drain is over. Agents'
    // tokens and every tunneled connection's token are children of `close`.
    let close = CancellationToken::new();
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::Metrics::new(&mut prometheus));
    prometheus.register(
        "proxy_server_certificate_expiry_timestamp_seconds",
        "When each loaded certificate (or the first of a CA bundle) expires, in Unix seconds; \
         set at every reload",
        config.cert_expiry.clone(),
    );
    let clusters = Arc::new(registry::Clusters::new(config.limits, metrics.clone()));
    let connections = TaskTracker::new();
    let background = TaskTracker::new();

    // Certificates, keys, CAs and the policy are re-read when their files change or on SIGHUP.
    let reload = proxy_common::reload::sighup_trigger().map_err(ServerError::Signal)?;
    config
        .agent_tls
        .spawn_watcher(reload.clone(), close.clone());
    if let Some(tls) = &config.frontend_tls {
        tls.spawn_watcher(reload.clone(), close.clone());
    }
    if let config::FrontendAuth::Policy(policy) = &config.frontend_auth {
        policy.spawn_watcher(reload.clone(), close.clone());
    }

    let fleet = Arc::new(fleet::Fleet::new(
        config.server_id.clone(),
        config.server_count.clone(),
        config.warmup,
    ));
    fleet.start(close.clone()).await;
    spawn_count_gauge(&fleet, &metrics, close.clone());

    let status = Arc::new(status::Status {
        clusters: clusters.clone(),
        metrics: metrics.clone(),
        fleet: fleet.clone(),
        public_url: public_url(&config, &listeners.frontend),
        started: std::time::SystemTime::now(),
    });
    let draining = shutdown.clone();
    // Cancelled when a listener stops before shutdown: readiness fails at once.
    let listener_lost = CancellationToken::new();
    let lost = listener_lost.clone();
    let warming = fleet.clone();
    let admin = proxy_common::admin::Admin {
        checks: vec![
            (
                "listeners",
                Arc::new(move || {
                    if lost.is_cancelled() {
                        Err("a listener stopped; shutting down".into())
                    } else if draining.is_cancelled() {
                        Err("draining for shutdown: not accepting connections".into())
                    } else {
                        Ok("agent, frontend and admin listeners serving".into())
                    }
                }),
            ),
            ("warmup", Arc::new(move || warmup_check(&warming))),
        ],
        metrics: Arc::new(prometheus),
        routes: Some(status.routes()),
        keepalive: config.tcp_keepalive,
    };
    // The admin listener answers through the drain, so probes see it fail readiness.
    let mut admin_task = tokio::spawn(proxy_common::admin::serve(
        listeners.admin,
        admin,
        close.clone(),
    ));

    let frontend = Arc::new(frontend::Frontend {
        clusters: clusters.clone(),
        metrics: metrics.clone(),
        tls: config.frontend_tls.clone(),
        auth: config.frontend_auth.clone(),
        limits: config.limits,
        dial_timeout: config.dial_timeout,
        agent_wait: config.agent_wait,
        keepalive: config.tcp_keepalive,
        fleet: fleet.clone(),
        cluster_suffix: config.cluster_suffix.clone(),
        connect_ports: config.connect_ports.clone(),
        gate: proxy_common::gate::Gate::new(config.limits.max_handshakes),
    });
    let mut frontend_task = tokio::spawn(frontend::serve(
        listeners.frontend,
        frontend,
        shutdown.clone(),
        close.clone(),
        connections.clone(),
    ));

    tracing::info!(server.id = %config.server_id, "proxy-server started");
    let service = tunnel::TunnelService::new(
        clusters,
        fleet,
        config.window_budget,
        config.keepalive_interval,
        close.clone(),
    );
    let limited = {
        let metrics = metrics.clone();
        move || metrics.handshake_limited("agent")
    };
    let incoming = listener::incoming(
        listener::AgentListener {
            listener: listeners.agent,
            tls: config.agent_tls.clone(),
            handshake_timeout: config.limits.handshake_timeout,
            keepalive: config.tcp_keepalive,
            gate: proxy_common::gate::Gate::new(config.limits.max_handshakes),
            limited,
        },
        shutdown.clone(),
        close.clone(),
    );
    // The gRPC server keeps serving its agent connections through the drain (new dials of
    // CONNECTs accepted before the signal still need data streams); at `close` it sends GOAWAY
    // and the control streams end.
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .initial_stream_window_size(proxy_proto::STREAM_WINDOW)
        .initial_connection_window_size(proxy_proto::CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS_PER_AGENT)
        .max_frame_size(Some(proxy_proto::MAX_FRAME))
        .add_service(
            TunnelServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, close.clone().cancelled_owned());
    let mut grpc = tokio::spawn(grpc);

    // Run until shutdown, or until a listener stops serving on its own (an error, a panic):
    // then readiness fails, everything drains as on SIGTERM, and `run` returns the error.
    let (mut grpc, mut frontend_task, mut admin_task) = (
        Some(&mut grpc),
        Some(&mut frontend_task),
        Some(&mut admin_task),
    );
    let failure = tokio::select! {
        // First: on shutdown the frontend task ends by itself, which is no failure.
        biased;
        () = shutdown.cancelled() => None,
        res = grpc.as_mut().expect("not yet polled") => {
            grpc = None;
            Some(listener_stopped("agent", res))
        }
        res = frontend_task.as_mut().expect("not yet polled") => {
            frontend_task = None;
            Some(listener_stopped::<std::convert::Infallible>("frontend", res.map(Ok)))
        }
        res = admin_task.as_mut().expect("not yet polled") => {
            admin_task = None;
            Some(listener_stopped::<std::convert::Infallible>("admin", res.map(Ok)))
        }
    };
    // A listener that ended because shutdown began (it may win the race above) is no failure.
    let failure = failure.filter(|_| !shutdown.is_cancelled());
    if let Some(err) = &failure {
        tracing::error!(err = %chain(err), "shutting down");
        listener_lost.cancel();
        shutdown.cancel();
    }
    connections.close();
    let open = connections.len();
    tracing::info!(open, grace = ?config.shutdown_grace, "draining");
    if tokio::time::timeout(config.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "grace period over; closing the remaining connections"
        );
    }
    close.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connections.wait()).await;
    let mut result = match grpc {
        None => Ok(()),
        Some(grpc) => match tokio::time::timeout(SHUTDOWN_GRACE, grpc).await {
            Ok(Ok(res)) => res.map_err(ServerError::from),
            Ok(Err(join)) => Err(ServerError::Task(join)),
            Err(_) => {
                tracing::warn!("agent connections did not close in time");
                Ok(())
            }
        },
    };
    for task in [frontend_task, admin_task].into_iter().flatten() {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, task).await;
    }
    background.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, background.wait()).await;
    if let Some(err) = failure {
        result = Err(err);
    }
    tracing::info!("proxy-server stopped");
    result
}
