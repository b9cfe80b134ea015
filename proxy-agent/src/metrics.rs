//! The agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `{reason}` of a failed upstream dial: a small fixed set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `refused`, `timeout`, `not_allowed`, `unreachable` or `other`.
    pub reason: String,
}

/// `{direction}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `to_upstream` or `from_upstream`.
    pub direction: String,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    /// Servers the agent is registered with.
    pub servers_connected: Gauge,
    /// Servers the fleet has, as the servers report it: the agent holds a tunnel to each.
    pub known_server_count: Gauge,
    /// Open tunneled connections.
    pub connections_active: Gauge,
    /// Time to connect to the upstream.
    pub upstream_dial_duration: Histogram,
    /// Failed upstream dials by reason.
    pub upstream_dial_failures: Family<ReasonLabel, Counter>,
    /// Dials the server cancelled because their client left before the dial was answered.
    pub dials_cancelled: Counter,
    /// Bytes carried, counted as they flow.
    pub bytes: Family<DirectionLabel, Counter>,
    /// Warm upstream connections ready for a server to hand out (see `crate::warm`).
    pub warm_idle: Gauge,
    /// Warm connections a server handed to a client.
    pub warm_claimed: Counter,
    /// Warm connections closed unused, by reason.
    pub warm_retired: Family<ReasonLabel, Counter>,
    /// Bytes the flow-control windows of all tunneled connections hold (`--max-buffered`).
    pub buffered: Gauge,
}

impl Metrics {
    /// Creates every metric and registers it in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        registry.register_collector(Box::new(proxy_common::telemetry::DroppedLines(
            "proxy_agent_log_lines_dropped",
        )));
        let m = Self {
            servers_connected: Gauge::default(),
            known_server_count: Gauge::default(),
            connections_active: Gauge::default(),
            upstream_dial_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            upstream_dial_failures: Family::default(),
            dials_cancelled: Counter::default(),
            bytes: Family::default(),
            warm_idle: Gauge::default(),
            warm_claimed: Counter::default(),
            warm_retired: Family::default(),
            buffered: Gauge::default(),
        };
        registry.register(
            "proxy_agent_buffered_bytes",
            "Bytes the flow-control windows of all tunneled connections may hold now (256 KiB \
             each, more for windows that grew): what upstreams that stop reading can pin. Dials \
             are refused near --max-buffered",
            m.buffered.clone(),
        );
        let start_time = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        start_time.set(proxy_common::unix_now());
        registry.register(
            "proxy_agent_start_time_seconds",
            "When this process started, Unix seconds (restarts show as changes)",
            start_time,
        );
        registry.register(
            "proxy_agent_build",
            "The running build",
            prometheus_client::metrics::info::Info::new(vec![(
                "version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            )]),
        );
        registry.register(
            "proxy_agent_warm_connections",
            "Upstream connections made ahead of demand, each on its own tunnel stream, ready for \
             a server to hand to a new client",
            m.warm_idle.clone(),
        );
        registry.register(
            "proxy_agent_warm_claimed",
            "Warm connections a server handed to a client",
            m.warm_claimed.clone(),
        );
        registry.register(
            "proxy_agent_warm_retired",
            "Warm connections closed unused: expired, upstream_closed, server_ended",
            m.warm_retired.clone(),
        );
        registry.register(
            "proxy_agent_servers_connected",
            "Servers this agent is registered with",
            m.servers_connected.clone(),
        );
        registry.register(
            "proxy_agent_known_server_count",
            "Server replicas in the fleet, as the servers report it (the agent aims to hold a tunnel to each)",
            m.known_server_count.clone(),
        );
        registry.register(
            "proxy_agent_dials_cancelled",
            "Dials the server cancelled because their client left before the dial was answered",
            m.dials_cancelled.clone(),
        );
        registry.register(
            "proxy_agent_connections_active",
            "Open tunneled connections",
            m.connections_active.clone(),
        );
        registry.register(
            "proxy_agent_upstream_dial_duration_seconds",
            "Time to connect to the upstream",
            m.upstream_dial_duration.clone(),
        );
        registry.register(
            "proxy_agent_upstream_dial_failures",
            "Upstream dials that failed, by reason",
            m.upstream_dial_failures.clone(),
        );
        registry.register(
            "proxy_agent_bytes",
            "Bytes carried through tunnels",
            m.bytes.clone(),
        );
        m
    }

    /// Counts a failed dial under a bounded reason.
    pub fn dial_failed(&self, reason: &str) {
        self.upstream_dial_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The byte counters: (to_upstream, from_upstream).
    pub fn byte_counters(&self) -> (Counter, Counter) {
        let get = |d: &str| {
            self.bytes
                .get_or_create(&DirectionLabel {
                    direction: d.to_owned(),
                })
                .clone()
        };
        (get("to_upstream"), get("from_upstream"))
    }
}
