//! proxy-agent: runs inside a member cluster, keeps a gRPC/mTLS tunnel to every proxy server,
//! and carries the servers' dial requests to its one upstream (the cluster's API server).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod channel;
pub mod config;
pub mod dial;
pub mod fleet;
pub mod http_proxy;
pub mod join;
pub mod metrics;
pub mod session;
pub mod state_dir;
pub mod upstream;
pub mod warm;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Args, Config, ConfigError};

use proxy_common::shutdown::CLOSE_GRACE as SHUTDOWN_GRACE;

/// State shared by the agent's sessions.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// The metrics.
    pub metrics: metrics::Metrics,
    /// The servers held, and how many there are.
    pub fleet: Arc<fleet::Fleet>,
    /// Woken whenever a tunneled or warm connection ends: a draining agent waits on it.
    ended: Arc<tokio::sync::Notify>,
    /// What every tunneled connection's window draws from (`--max-buffered`).
    pub pool: Arc<proxy_common::flow::Pool>,
}

/// Counts one open connection while alive; its end wakes a draining agent.
#[derive(Debug)]
pub struct CountGuard {
    gauge: prometheus_client::metrics::gauge::Gauge,
    ended: Arc<tokio::sync::Notify>,
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        self.ended.notify_waiters();
    }
}

impl Shared {
    /// State for one agent identity. Public so a benchmark can run thousands of agents, each
    /// with its own certificate, from one process (`proxy-bench`'s agent-scale scenario).
    pub fn new(config: Config, metrics: metrics::Metrics) -> Self {
        let fleet = Arc::new(fleet::Fleet::new(
            metrics.servers_connected.clone(),
            metrics.known_server_count.clone(),
        ));
        let pool = proxy_common::flow::Pool::with_gauge(
            config.max_buffered,
            Some(metrics.buffered.clone()),
        );
        Self {
            config,
            metrics,
            fleet,
            ended: Arc::default(),
            pool,
        }
    }

    /// Marks one more tunneled connection as active until the guard drops.
    pub fn active_connection(&self) -> CountGuard {
        self.count(&self.metrics.connections_active)
    }

    /// Counts one more in `gauge` until the guard drops.
    pub(crate) fn count(&self, gauge: &prometheus_client::metrics::gauge::Gauge) -> CountGuard {
        gauge.inc();
        CountGuard {
            gauge: gauge.clone(),
            ended: self.ended.clone(),
        }
    }

    /// Tunneled connections plus idle warm ones: what a draining agent waits for.
    fn busy(&self) -> bool {
        self.metrics.connections_active.get() + self.metrics.warm_idle.get() > 0
    }

    /// Waits until nothing is [`Shared::busy`] or `deadline` passes; false if it passed.
    async fn until_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            // Interest first, then the look, so an end in between is not missed.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.busy() {
                return true;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return !self.busy();
            }
        }
    }

    /// Servers this agent is registered with.
    pub fn registered_count(&self) -> usize {
        self.fleet.held()
    }
}

/// Runs the agent until `shutdown`, then drains: servers are told to send new connections to
/// other agents, open connections continue until they end or the grace period runs out.
///
/// If the admin listener or the tunnel task of a server ends on its own (an error, a panic),
/// the agent drains as on SIGTERM (readiness fails at once) and returns the error, so the
/// process exits non-zero and is restarted rather than looking alive while serving nothing.
pub async fn run(
    config: Config,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), proxy_common::shutdown::Stopped> {
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut prometheus);
    prometheus.register(
        "proxy_agent_certificate_expiry_timestamp_seconds",
        "When each loaded certificate (or the first of a CA bundle) expires, in Unix seconds; \
         set at every reload",
        config.cert_expiry.clone(),
    );
    let shared = Arc::new(Shared::new(config, metrics));
    let life = session::Lifecycle {
        drain: shutdown.clone(),
        close: CancellationToken::new(),
    };
    match proxy_common::reload::sighup_trigger() {
        Ok(trigger) => shared.config.tls.spawn_watcher(trigger, life.close.clone()),
        Err(err) => {
            tracing::warn!(%err, "no SIGHUP handler; certificates reload on file change only")
        }
    }
    let registered = shared.clone();
    let draining = shutdown.clone();
    let admin_state = proxy_common::admin::Admin {
        checks: vec![
            (
                "registered",
                Arc::new(move || {
                    let (held, target) = (registered.fleet.held(), registered.fleet.target());
                    match held {
                        0 => Err(format!(
                            "not registered with any proxy server (the fleet has {target})"
                        )),
                        _ => Ok(format!("connected to {held} of {target} servers")),
                    }
                }),
            ),
            (
                "not-draining",
                Arc::new(move || match draining.is_cancelled() {
                    true => Err("draining for shutdown".into()),
                    false => Ok("serving".into()),
                }),
            ),
        ],
        metrics: Arc::new(prometheus),
        routes: None,
        keepalive: shared.config.tcp_keepalive,
        // Probes and Prometheus name the pod by its IP address.
        hosts: Arc::new([]),
        authorize: None,
    };
    let mut vital = proxy_common::shutdown::Vital::default();
    vital.spawn(
        "admin listener",
        proxy_common::admin::serve(admin, admin_state, life.close.clone()),
    );
    tracing::info!(cluster = %shared.config.cluster, agent.id = %shared.config.agent_id, upstream = %shared.config.upstream, "proxy-agent started");
    for server in &shared.config.servers {
        if let Some(proxy) = &server.proxy {
            // Display shows the proxy's address only, never its credentials.
            tracing::info!(server = %server.addr, %proxy, "reaching this server through an HTTP proxy");
        }
    }
    if let Some(dir) = shared.config.state_dir.clone() {
        // Not vital: a renewal that keeps failing is logged, and the certificate in force
        // serves until it expires.
        tokio::spawn(join::renew_forever(
            dir,
            shared.config.cluster.clone(),
            shared.config.servers.clone(),
            shared.config.tls.clone(),
            shared.config.tcp_keepalive,
            life.close.clone(),
        ));
    }
    for server in shared.config.servers.clone() {
        vital.spawn(
            "a server's tunnel task",
            session::maintain(server, shared.clone(), life.clone()),
        );
    }
    let outcome = vital.watch(&shutdown).await;
    if let Err(err) = &outcome {
        tracing::error!(%err, "draining and exiting");
        shutdown.cancel();
    }
    let grace = shared.config.shutdown_grace;
    tracing::info!(
        open = shared.metrics.connections_active.get(),
        ?grace,
        "draining"
    );
    let deadline = tokio::time::Instant::now() + grace;
    // Idle warm connections count too: the servers end them when they hear of the drain, and a
    // server may hand one to a client until then.
    shared.until_idle(deadline).await;
    let left = shared.metrics.connections_active.get();
    if left > 0 {
        tracing::warn!(
            open = left,
            "grace period over; closing the remaining connections"
        );
    }
    life.close.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, vital.join_all())
        .await
        .is_err()
    {
        tracing::warn!("tasks did not finish after closing");
    }
    tracing::info!("proxy-agent stopped");
    outcome
}
