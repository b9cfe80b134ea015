//! proxy-agent: runs inside a member cluster, keeps a gRPC/mTLS tunnel to every proxy server,
//! and carries the servers' dial requests to its one upstream (the cluster's API server).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod config;
pub mod dial;
pub mod metrics;
pub mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError};

/// How long open connections may take to wind down after the shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State shared by the agent's sessions.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// The metrics.
    pub metrics: metrics::Metrics,
    registered: AtomicUsize,
}

/// Counts one registered session or open connection while alive.
#[derive(Debug)]
pub struct CountGuard<'a> {
    count: Option<&'a AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.count {
            count.fetch_sub(1, Ordering::Relaxed);
        }
        self.gauge.dec();
    }
}

impl Shared {
    fn new(config: Config, metrics: metrics::Metrics) -> Self {
        Self {
            config,
            metrics,
            registered: AtomicUsize::new(0),
        }
    }

    /// Marks one more server as registered until the guard drops.
    pub fn registered(&self) -> CountGuard<'_> {
        self.registered.fetch_add(1, Ordering::Relaxed);
        self.metrics.servers_connected.inc();
        CountGuard {
            count: Some(&self.registered),
            gauge: self.metrics.servers_connected.clone(),
        }
    }

    /// Marks one more tunneled connection as active until the guard drops.
    pub fn active_connection(&self) -> CountGuard<'_> {
        self.metrics.connections_active.inc();
        CountGuard {
            count: None,
            gauge: self.metrics.connections_active.clone(),
        }
    }

    /// Servers this agent is registered with.
    pub fn registered_count(&self) -> usize {
        self.registered.load(Ordering::Relaxed)
    }
}

/// Runs the agent until `shutdown`.
pub async fn run(config: Config, admin: TcpListener, shutdown: CancellationToken) {
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut prometheus);
    let shared = Arc::new(Shared::new(config, metrics));
    let tracker = TaskTracker::new();
    match proxy_common::reload::sighup_trigger() {
        Ok(trigger) => shared.config.tls.spawn_watcher(trigger, shutdown.clone()),
        Err(err) => {
            tracing::warn!(%err, "no SIGHUP handler; certificates reload on file change only")
        }
    }
    let ready_state = shared.clone();
    let ready: proxy_common::admin::ReadyCheck = Arc::new(move || {
        if ready_state.registered_count() > 0 {
            Ok(())
        } else {
            Err("not registered with any proxy server".into())
        }
    });
    let admin_state = proxy_common::admin::Admin {
        ready,
        metrics: Arc::new(prometheus),
    };
    tracker.spawn(proxy_common::admin::serve(
        admin,
        admin_state,
        shutdown.clone(),
    ));
    tracing::info!(cluster = %shared.config.cluster, agent.id = %shared.config.agent_id, upstream = %shared.config.upstream, "proxy-agent started");
    for server in shared.config.servers.clone() {
        tracker.spawn(session::maintain(server, shared.clone(), shutdown.clone()));
    }
    shutdown.cancelled().await;
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within the shutdown grace period");
    }
    tracing::info!("proxy-agent stopped");
}
