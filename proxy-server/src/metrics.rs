//! The server's Prometheus metrics. Cluster label values come only from registered agents (a
//! CONNECT for an unknown name is counted under `cluster=""`), so clients cannot grow the series.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `{cluster}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    /// Cluster name, or empty when the request named no registered cluster.
    pub cluster: String,
}

/// `{cluster, result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// Cluster name, or empty.
    pub cluster: String,
    /// One of [`Outcome`]'s labels.
    pub result: String,
}

/// `{cluster, direction}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// Cluster name.
    pub cluster: String,
    /// `to_cluster` or `from_cluster`.
    pub direction: String,
}

/// How a CONNECT ended up; the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Tunnel established.
    Ok,
    /// No agent for the cluster.
    NoAgent,
    /// The agent could not reach its upstream (or left mid-dial).
    DialFailed,
    /// The agent did not answer in time.
    DialTimeout,
    /// Missing or bad credentials.
    Unauthenticated,
    /// Identity not granted the cluster.
    Forbidden,
    /// The cluster's agent refused the destination the client named (`Proxy-Destination`).
    DestinationForbidden,
    /// A connection or dial limit was reached.
    Limited,
    /// Malformed, oversized, slow or non-CONNECT request.
    BadRequest,
    /// The client closed or failed before its `200` (its dial was cancelled).
    ClientLeft,
    /// The cluster's agents do not answer pings (their connection may be dead).
    AgentUnresponsive,
}

impl Outcome {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NoAgent => "no_agent",
            Self::DialFailed => "dial_failed",
            Self::DialTimeout => "dial_timeout",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::DestinationForbidden => "destination_forbidden",
            Self::Limited => "limited",
            Self::BadRequest => "bad_request",
            Self::ClientLeft => "client_left",
            Self::AgentUnresponsive => "agent_unresponsive",
        }
    }
}

/// Every metric the server exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    /// Connected agents per cluster.
    pub agents: Family<ClusterLabel, Gauge>,
    /// Open tunneled connections per cluster.
    pub connections_active: Family<ClusterLabel, Gauge>,
    /// CONNECT requests by outcome.
    pub connections_total: Family<ResultLabels, Counter>,
    /// CONNECT received to `200` sent.
    pub dial_duration: Family<ClusterLabel, Histogram, fn() -> Histogram>,
    /// Bytes carried, counted as they flow.
    pub bytes: Family<BytesLabels, Counter>,
    /// CONNECTs waiting for an agent's answer.
    pub pending_dials: Gauge,
    /// Dials whose client left (or timed out) before the agent answered; the agent was told to
    /// cancel them.
    pub dials_cancelled: Counter,
    /// Server replicas the fleet has, as this server tells agents.
    pub server_count: Gauge,
    /// Connections closed before authentication because the handshake gate was full.
    pub handshakes_limited: Family<ListenerLabel, Counter>,
    /// Warm streams held, ready for a CONNECT (see the registry's `warm` module).
    pub warm_streams: Gauge,
    /// Bytes the flow-control windows of all tunneled connections hold (see `--max-buffered`).
    pub buffered: Gauge,
    /// `--max-buffered`.
    pub buffered_limit: Gauge,
    /// CONNECTs answered on a warm stream, without a dial round trip to the agent.
    pub warm_connects: Counter,
    /// How long tunneled connections lasted, `200` to close; server-wide (per cluster it
    /// would cost 15 series a cluster for a figure nobody alerts on).
    pub connection_duration: Histogram,
}

/// Which listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `agent` or `frontend`.
    pub listener: &'static str,
}

fn duration_histogram() -> Histogram {
    // 10 ms to ~5.8 h: from a single request to a long watch.
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

/// Per cluster, so few buckets: 8 plus `+Inf`, `_sum` and `_count` are 11 series a cluster
/// (55,000 at 5,000 clusters; 16 buckets made 95,000 with the connection histogram's 75,000
/// besides). 1 ms to ~16 s by fours: a LAN dial, a WAN one, a slow one, a timeout.
fn dial_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 8))
}

/// Every `result` label value, for dropping a cluster's series.
const OUTCOMES: [Outcome; 11] = [
    Outcome::Ok,
    Outcome::NoAgent,
    Outcome::DialFailed,
    Outcome::DialTimeout,
    Outcome::Unauthenticated,
    Outcome::Forbidden,
    Outcome::DestinationForbidden,
    Outcome::Limited,
    Outcome::BadRequest,
    Outcome::ClientLeft,
    Outcome::AgentUnresponsive,
];

impl Metrics {
    /// Drops every series labelled with `cluster`: it left the down list (`--down-retention`),
    /// so a fleet that churns through cluster names does not grow the scrape without bound.
    pub fn forget_cluster(&self, cluster: &str) {
        let label = ClusterLabel {
            cluster: cluster.to_owned(),
        };
        self.agents.remove(&label);
        self.connections_active.remove(&label);
        self.dial_duration.remove(&label);
        for direction in ["to_cluster", "from_cluster"] {
            self.bytes.remove(&BytesLabels {
                cluster: cluster.to_owned(),
                direction: direction.to_owned(),
            });
        }
        for outcome in OUTCOMES {
            self.connections_total.remove(&ResultLabels {
                cluster: cluster.to_owned(),
                result: outcome.label().to_owned(),
            });
        }
    }

    /// Creates every metric and registers it in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        registry.register_collector(Box::new(proxy_common::telemetry::DroppedLines(
            "proxy_server_log_lines_dropped",
        )));
        let agents = Family::<ClusterLabel, Gauge>::default();
        registry.register("proxy_server_agents", "Connected agents", agents.clone());
        let connections_active = Family::<ClusterLabel, Gauge>::default();
        registry.register(
            "proxy_server_connections_active",
            "Open tunneled connections",
            connections_active.clone(),
        );
        let connections_total = Family::<ResultLabels, Counter>::default();
        registry.register(
            "proxy_server_connections",
            "CONNECT requests by result",
            connections_total.clone(),
        );
        let dial_duration =
            Family::<ClusterLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                dial_histogram,
            );
        registry.register(
            "proxy_server_dial_duration_seconds",
            "Time from CONNECT received to 200 sent",
            dial_duration.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "proxy_server_bytes",
            "Bytes carried through tunnels",
            bytes.clone(),
        );
        let pending_dials = Gauge::default();
        registry.register(
            "proxy_server_pending_dials",
            "CONNECTs waiting for an agent's answer",
            pending_dials.clone(),
        );
        let dials_cancelled = Counter::default();
        registry.register(
            "proxy_server_dials_cancelled",
            "Dials whose client left or timed out before the agent answered; the agent was told \
             to cancel them",
            dials_cancelled.clone(),
        );
        let server_count = Gauge::default();
        registry.register(
            "proxy_server_server_count",
            "Server replicas in the fleet, as told to agents (--server-count or its DNS name)",
            server_count.clone(),
        );
        let handshakes_limited = Family::<ListenerLabel, Counter>::default();
        // Both series exist from the start, at 0, so dashboards and rate() see them.
        for listener in ["agent", "frontend"] {
            let _ = handshakes_limited.get_or_create(&ListenerLabel { listener });
        }
        registry.register(
            "proxy_server_handshakes_limited",
            "Connections closed before authentication because the listener's handshake gate \
             was full (--max-handshakes): a newer connection took the place of one that had \
             waited 1 s",
            handshakes_limited.clone(),
        );
        let warm_streams = Gauge::default();
        registry.register(
            "proxy_server_warm_streams",
            "Warm streams held: upstream connections agents made ahead of demand, each ready \
             to carry a CONNECT without a dial round trip",
            warm_streams.clone(),
        );
        let buffered = Gauge::default();
        registry.register(
            "proxy_server_buffered_bytes",
            "Bytes the flow-control windows of all tunneled connections may hold now (256 KiB \
             each, more for windows that grew): what stalled clients can pin. New CONNECTs get \
             503 near proxy_server_buffered_limit_bytes",
            buffered.clone(),
        );
        let buffered_limit = Gauge::default();
        registry.register(
            "proxy_server_buffered_limit_bytes",
            "The bound on proxy_server_buffered_bytes (--max-buffered)",
            buffered_limit.clone(),
        );
        let warm_connects = Counter::default();
        registry.register(
            "proxy_server_warm_connects",
            "CONNECTs answered on a warm stream (a subset of result=\"ok\")",
            warm_connects.clone(),
        );
        let connection_duration = duration_histogram();
        registry.register(
            "proxy_server_connection_duration_seconds",
            "How long tunneled connections lasted, from 200 sent to closed",
            connection_duration.clone(),
        );
        let start_time = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        start_time.set(proxy_common::unix_now());
        registry.register(
            "proxy_server_start_time_seconds",
            "When this process started, Unix seconds (restarts show as changes)",
            start_time,
        );
        registry.register(
            "proxy_server_build",
            "The running build",
            prometheus_client::metrics::info::Info::new(vec![(
                "version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            )]),
        );
        Self {
            connection_duration,
            warm_streams,
            buffered,
            buffered_limit,
            warm_connects,
            handshakes_limited,
            server_count,
            pending_dials,
            dials_cancelled,
            agents,
            connections_active,
            connections_total,
            dial_duration,
            bytes,
        }
    }

    /// Counts a connection of `listener` closed because the handshake gate was full.
    pub fn handshake_limited(&self, listener: &'static str) {
        self.handshakes_limited
            .get_or_create(&ListenerLabel { listener })
            .inc();
    }

    /// Counts one CONNECT outcome.
    pub fn count(&self, cluster: &str, outcome: Outcome) {
        self.connections_total
            .get_or_create(&ResultLabels {
                cluster: cluster.to_owned(),
                result: outcome.label().to_owned(),
            })
            .inc();
    }

    /// The byte counters of `cluster`: (to_cluster, from_cluster).
    pub fn byte_counters(&self, cluster: &str) -> (Counter, Counter) {
        let get = |direction: &str| {
            self.bytes
                .get_or_create(&BytesLabels {
                    cluster: cluster.to_owned(),
                    direction: direction.to_owned(),
                })
                .clone()
        };
        (get("to_cluster"), get("from_cluster"))
    }
}
