//! proxy-server: keeps the agents' gRPC tunnels keyed by cluster name and carries HTTP CONNECT
//! requests through the matching agent.
//!
//! [`run`] takes already-bound listeners and a shutdown token, so tests and embedders bind
//! `127.0.0.1:0` and never race for ports.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
pub mod agent_conn;
pub mod auth;
pub mod config;
pub mod connect;
pub mod fleet;
pub mod frontend;
pub mod join;
pub mod kubeconfig_command;
pub mod listener;
pub mod metrics;
pub mod registry;
pub mod shards;
pub mod status;
pub mod to_agent;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proxy_common::error::{BoxError, chain};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError};

pub use agent_conn::MAX_STREAMS_PER_AGENT;

use proxy_common::shutdown::CLOSE_GRACE as SHUTDOWN_GRACE;

/// The server's listeners, bound before [`run`].
#[derive(Debug)]
pub struct Listeners {
    /// gRPC/mTLS listener for agents.
    pub agent: TcpListener,
    /// HTTP CONNECT listener.
    pub frontend: TcpListener,
    /// Admin listener (health, metrics).
    pub admin: TcpListener,
    /// Operator listener (status page, cluster list, kubeconfigs).
    pub operator: TcpListener,
}

/// Why the server could not start or stopped with an error.
// Variant fields are described by each variant's #[error] message, not by
// one-word doc lines.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding a listener failed.
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Starting the shard threads failed.
    #[error("cannot start the shard threads")]
    Shards(#[source] std::io::Error),
    /// Installing the SIGHUP handler failed.
    #[error("cannot install the SIGHUP handler")]
    Signal(#[source] std::io::Error),
    /// A task of the server panicked.
    #[error("server task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A listener stopped serving before shutdown: the process stops rather than run on
    /// half deaf while `/readyz` says all is well.
    #[error("the {which} listener stopped unexpectedly")]
    ListenerStopped {
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
        let addr = config.frontend_addr;
        // With its clients' socket options set before it listens (see `net::bind_listener`).
        let frontend =
            proxy_common::net::bind_listener(addr, config.tcp_keepalive).map_err(|source| {
                ServerError::Bind {
                    what: "frontend",
                    addr,
                    source,
                }
            })?;
        Ok(Self {
            agent: bind("agent", config.agent_addr).await?,
            frontend,
            admin: bind("admin", config.admin_addr).await?,
            operator: bind("operator", config.operator_addr).await?,
        })
    }

    /// One line naming the bound addresses (useful with port 0).
    pub fn describe(&self) -> String {
        let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        format!(
            "proxy-server listening agent={} frontend={} admin={} operator={}",
            addr(&self.agent),
            addr(&self.frontend),
            addr(&self.admin),
            addr(&self.operator)
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

/// Keeps `proxy_server_server_count` equal to the fleet's count.
fn spawn_count_gauge(
    fleet: &fleet::Fleet,
    metrics: &Arc<metrics::Metrics>,
    close: CancellationToken,
    tasks: &TaskTracker,
) {
    let mut count = fleet.subscribe();
    let metrics = metrics.clone();
    metrics
        .server_count
        .set(i64::from(*count.borrow_and_update()));
    tasks.spawn(async move {
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

/// The server's parts every listener shares.
struct Core {
    clusters: Arc<registry::Clusters>,
    metrics: Arc<metrics::Metrics>,
    fleet: Arc<fleet::Fleet>,
    prometheus: prometheus_client::registry::Registry,
}

/// The tokens and trackers of the one shutdown tree: `shutdown` stops intake; `close` ends what
/// is still open once the drain is over (agents' tokens and every tunneled connection's token
/// are its children). `connections` holds the tunneled connections the drain waits for,
/// `tasks` everything else the server spawned (handshakes, control streams, watchers).
struct Lifecycle {
    shutdown: CancellationToken,
    close: CancellationToken,
    connections: TaskTracker,
    tasks: TaskTracker,
}

/// The running listener tasks; each is `None` once it has been awaited.
struct Tasks {
    grpc: Option<JoinHandle<()>>,
    frontend: Option<JoinHandle<()>>,
    admin: Option<JoinHandle<()>>,
}

/// Runs the server until `shutdown` is cancelled, then drains: the listeners stop accepting
/// (new CONNECTs and agents are refused), `/readyz` fails, open tunneled connections continue
/// until they end or `--shutdown-grace` runs out, then everything still open is closed.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let life = Lifecycle {
        shutdown,
        close: CancellationToken::new(),
        connections: TaskTracker::new(),
        tasks: TaskTracker::new(),
    };
    // Until every listener task runs, an error returns early: the watchers and tasks started
    // so far then stop with it instead of running on without a server.
    let stop_on_error = life.close.clone().drop_guard();
    let core = build_core(&config, &life).await?;
    // Stopped after the drain, when the last clone goes.
    let shards = Arc::new(shards::Shards::start(config.shards).map_err(ServerError::Shards)?);
    // Cancelled when a listener stops before shutdown: readiness fails at once.
    let listener_lost = CancellationToken::new();
    let status = Arc::new(status::Status {
        clusters: core.clusters.clone(),
        metrics: core.metrics.clone(),
        fleet: core.fleet.clone(),
        public_url: public_url(&config, &listeners.frontend),
        started: std::time::SystemTime::now(),
    });
    let Core {
        clusters,
        metrics,
        fleet,
        mut prometheus,
    } = core;
    prometheus.register_collector(Box::new(shards.agents_gauge()));
    let admin = admin::routes(&config, &life.shutdown, &fleet, prometheus, &listener_lost);
    // The operator listener: the same health and metrics, plus the pages that map the fleet.
    // Not a vital listener: losing it costs people a page, not clients their tunnels.
    life.tasks.spawn(proxy_common::admin::serve(
        listeners.operator,
        admin::operator_routes(&config, admin.clone(), status),
        life.close.clone(),
    ));
    let mut tasks = Tasks {
        // The admin listener answers through the drain, so probes see it fail readiness.
        admin: Some(tokio::spawn(proxy_common::admin::serve(
            listeners.admin,
            admin,
            life.close.clone(),
        ))),
        frontend: Some(spawn_frontend(
            &shards,
            listeners.frontend,
            Arc::new(frontend_of(&config, &clusters, &metrics, &fleet)),
            frontend_intake(&life, config.shutdown_delay),
            &life,
        )?),
        grpc: Some(tokio::spawn(serve_agents(
            &config,
            listeners.agent,
            &life,
            clusters,
            fleet,
            &metrics,
            shards.clone(),
        ))),
    };
    stop_on_error.disarm();
    tracing::info!(server.id = %config.server_id, "proxy-server started");
    let failure = until_stopped(&life, &mut tasks).await;
    if let Some(err) = &failure {
        tracing::error!(err = %chain(err), "shutting down");
        listener_lost.cancel();
        life.shutdown.cancel();
    }
    let result = drain(&config, &life, tasks).await;
    // Only now: what runs on the shards has ended (or had its grace).
    drop(shards);
    tracing::info!("proxy-server stopped");
    failure.map_or(result, Err)
}

/// Runs the CONNECT frontend: on the first shard when there are shards and the frontend has no
/// TLS. Its clients' tasks start there, so a client whose agent lives there too (with one agent
/// per server, every client) goes from accept to close on one thread; others move to their
/// agent's shard once (see [`shards`]). Waking a sleeping thread costs more than the work it is
/// handed: shards with the accept on the first one took a new connection, one at a time, from
/// 327 to 250 µs (BENCHMARKS.md, "Shards").
fn spawn_frontend(
    shards: &shards::Shards,
    listener: TcpListener,
    frontend: Arc<frontend::Frontend>,
    intake: CancellationToken,
    life: &Lifecycle,
) -> Result<JoinHandle<()>, ServerError> {
    let (close, connections) = (life.close.clone(), life.connections.clone());
    // TLS handshakes stay on the worker threads, where they run in parallel: on one shard a
    // storm of them would queue on one core. After its head a client's socket moves to its
    // agent's shard under its TLS stream (see `shards::Movable`).
    let tls = frontend.tls.is_some();
    let shard = shards.first().filter(|_| !tls).cloned();
    let here = shard.clone();
    let serve =
        move |listener| frontend::serve(listener, frontend, here, intake, close, connections);
    match shard {
        Some(shard) => shard
            .spawn_listening(listener, serve)
            .map_err(ServerError::Shards),
        None => Ok(tokio::spawn(serve(listener))),
    }
}

/// The token that closes the frontend listener: `--shutdown-delay` after shutdown begins.
/// Readiness fails at once, but a load balancer notices only at its next health check and
/// sends clients here until then; a listener closed under it resets them (TCP load balancers
/// retry only refused connects, not connections the kernel had already accepted).
fn frontend_intake(life: &Lifecycle, delay: Duration) -> CancellationToken {
    let intake = CancellationToken::new();
    let (shutdown, close, stop) = (life.shutdown.clone(), life.close.clone(), intake.clone());
    life.tasks.spawn(async move {
        shutdown.cancelled().await;
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "draining: still accepting CONNECTs until load balancers see /readyz fail"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = close.cancelled() => {}
        }
        stop.cancel();
    });
    intake
}

/// Metrics, the cluster registry, the fleet, and the watchers that re-read certificates, keys,
/// CAs and the policy when their files change or on SIGHUP.
async fn build_core(config: &Config, life: &Lifecycle) -> Result<Core, ServerError> {
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::Metrics::new(&mut prometheus));
    prometheus.register(
        "proxy_server_certificate_expiry_timestamp_seconds",
        "When each loaded certificate (or the first of a CA bundle) expires, in Unix seconds; \
         set at every reload",
        config.cert_expiry.clone(),
    );
    let clusters = Arc::new(registry::Clusters::new(config.limits, metrics.clone()));
    let reload = proxy_common::reload::sighup_trigger().map_err(ServerError::Signal)?;
    config
        .agent_tls
        .spawn_watcher(reload.clone(), life.close.clone());
    if let Some(tls) = &config.frontend_tls {
        tls.spawn_watcher(reload.clone(), life.close.clone());
    }
    if let Some(joins) = &config.joins {
        joins
            .signer()
            .spawn_watcher(reload.clone(), life.close.clone());
        prometheus.register(
            "proxy_server_joins",
            "Agent joins (by token) and certificate renewals, by result",
            joins.results(),
        );
    }
    if let config::FrontendAuth::Policy(policy) = &config.frontend_auth {
        policy.spawn_watcher(reload, life.close.clone());
    }
    let fleet = Arc::new(fleet::Fleet::new(
        config.server_id.clone(),
        config.server_count.clone(),
        config.warmup,
    ));
    fleet.start(life.close.clone(), &life.tasks).await;
    spawn_count_gauge(&fleet, &metrics, life.close.clone(), &life.tasks);
    Ok(Core {
        clusters,
        metrics,
        fleet,
        prometheus,
    })
}

/// The CONNECT frontend.
fn frontend_of(
    config: &Config,
    clusters: &Arc<registry::Clusters>,
    metrics: &Arc<metrics::Metrics>,
    fleet: &Arc<fleet::Fleet>,
) -> frontend::Frontend {
    frontend::Frontend {
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
    }
}

/// The gRPC server for agents. It keeps serving its agent connections through the drain (new
/// dials of CONNECTs accepted before the signal still need data streams); at `close` it sends
/// GOAWAY and the control streams end.
fn serve_agents(
    config: &Config,
    listener: TcpListener,
    life: &Lifecycle,
    clusters: Arc<registry::Clusters>,
    fleet: Arc<fleet::Fleet>,
    metrics: &Arc<metrics::Metrics>,
    shards: Arc<shards::Shards>,
) -> impl std::future::Future<Output = ()> + use<> {
    let service = Arc::new(tunnel::TunnelService::new(
        clusters,
        fleet,
        config.window_budget,
        config.keepalive_interval,
        life.close.clone(),
        life.tasks.clone(),
    ));
    let limited = {
        let metrics = metrics.clone();
        move || metrics.handshake_limited("agent")
    };
    let incoming = listener::incoming(
        listener::AgentListener {
            listener,
            tls: config.agent_tls.clone(),
            handshake_timeout: config.limits.handshake_timeout,
            keepalive: config.tcp_keepalive,
            gate: proxy_common::gate::Gate::new(config.limits.max_handshakes),
            limited,
            tasks: life.tasks.clone(),
            shards,
            joins: config.joins.clone(),
        },
        life.shutdown.clone(),
        life.close.clone(),
    );
    let settings = agent_conn::Settings {
        keepalive_interval: config.keepalive_interval,
        keepalive_timeout: config.keepalive_timeout,
        handshake_timeout: config.limits.handshake_timeout,
    };
    agent_conn::serve(
        incoming,
        service,
        config
            .joins
            .clone()
            .map(|joins| (joins, life.tasks.clone())),
        settings,
        life.close.clone(),
        life.tasks.clone(),
    )
}

/// Waits for shutdown, or for a listener to stop serving on its own (an error, a panic): then
/// readiness fails, everything drains as on SIGTERM, and `run` returns the error.
async fn until_stopped(life: &Lifecycle, tasks: &mut Tasks) -> Option<ServerError> {
    let (Some(grpc), Some(frontend), Some(admin)) =
        (&mut tasks.grpc, &mut tasks.frontend, &mut tasks.admin)
    else {
        unreachable!("every listener task is running");
    };
    let failure = tokio::select! {
        // First: on shutdown the frontend task ends by itself, which is no failure.
        biased;
        () = life.shutdown.cancelled() => None,
        res = grpc => {
            tasks.grpc = None;
            Some(listener_stopped::<std::convert::Infallible>("agent", res.map(Ok)))
        }
        res = frontend => {
            tasks.frontend = None;
            Some(listener_stopped::<std::convert::Infallible>("frontend", res.map(Ok)))
        }
        res = admin => {
            tasks.admin = None;
            Some(listener_stopped::<std::convert::Infallible>("admin", res.map(Ok)))
        }
    };
    // A listener that ended because shutdown began (it may win the race above) is no failure.
    failure.filter(|_| !life.shutdown.is_cancelled())
}

/// The drain: open connections get `--shutdown-grace`, then `close` ends everything, and each
/// task gets [`SHUTDOWN_GRACE`] to finish. The gRPC server's own error, if any, is the result.
async fn drain(config: &Config, life: &Lifecycle, mut tasks: Tasks) -> Result<(), ServerError> {
    // The grace starts once the frontend stopped accepting (after `--shutdown-delay`): what it
    // accepted meanwhile is tracked in `connections` too.
    if let Some(frontend) = tasks.frontend.take() {
        let _ = tokio::time::timeout(config.shutdown_delay + SHUTDOWN_GRACE, frontend).await;
    }
    life.connections.close();
    let open = life.connections.len();
    tracing::info!(open, grace = ?config.shutdown_grace, "draining");
    if tokio::time::timeout(config.shutdown_grace, life.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = life.connections.len(),
            "grace period over; closing the remaining connections"
        );
    }
    life.close.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, life.connections.wait()).await;
    let result = match tasks.grpc {
        None => Ok(()),
        Some(grpc) => match tokio::time::timeout(SHUTDOWN_GRACE, grpc).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(join)) => Err(ServerError::Task(join)),
            Err(_) => {
                tracing::warn!("the agent listener did not stop in time");
                Ok(())
            }
        },
    };
    if let Some(admin) = tasks.admin {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, admin).await;
    }
    life.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, life.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(left = life.tasks.len(), "server tasks did not end in time");
    }
    result
}
