//! What the status page (`crate::status`) shows of the clusters: recent dials per cluster, the
//! clusters whose agents all left (kept for `--down-retention`), and the [`ClusterSnapshot`]
//! that puts them together with the agents and open connections.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::time::Instant;

use super::{AgentInfo, Clusters};

/// Dial latencies kept per cluster for the status page.
pub const RECENT_DIALS: usize = 64;

/// Recent dials of one cluster, for the status page.
#[derive(Debug, Clone, Default)]
pub struct DialStats {
    /// Latencies (CONNECT to 200) of the most recent successful dials, newest last.
    pub recent_ms: VecDeque<f64>,
    /// Dials that failed (502/504) since the cluster registered.
    pub failures: u64,
    /// The latest failure: when, and why (the refusal's reason; any agent text in it was
    /// sanitized where it arrived).
    pub last_failure: Option<(SystemTime, String)>,
}

impl DialStats {
    fn record(&mut self, result: Result<Duration, &str>) {
        match result {
            Ok(latency) => {
                if self.recent_ms.len() == RECENT_DIALS {
                    self.recent_ms.pop_front();
                }
                self.recent_ms.push_back(latency.as_secs_f64() * 1e3);
            }
            Err(reason) => {
                self.failures += 1;
                self.last_failure = Some((SystemTime::now(), reason.to_owned()));
            }
        }
    }
}

/// What the status page shows of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    /// Cluster name.
    pub name: String,
    /// Its agents, and whether each is draining.
    pub agents: Vec<(AgentInfo, bool)>,
    /// Open tunneled connections.
    pub open_connections: usize,
    /// Recent dials.
    pub dials: DialStats,
    /// When its last agent left, for a cluster that has none now (kept `--down-retention`).
    pub down_since: Option<SystemTime>,
}

/// Dial statistics of registered clusters, and the clusters down within the retention window.
#[derive(Debug, Default)]
pub(super) struct History {
    dials: DashMap<String, DialStats>,
    /// Clusters whose agents all left, with when, kept for `--down-retention`.
    down: DashMap<String, (SystemTime, Instant)>,
}

impl History {
    /// Forgets the dial statistics of `cluster` (it has no agent any more).
    pub(super) fn forget_dials(&self, cluster: &str) {
        self.dials.remove(cluster);
    }

    /// Lists `cluster` as down from now (until [`History::forget_down`] drops it).
    pub(super) fn mark_down(&self, cluster: &str) {
        self.down
            .insert(cluster.to_owned(), (SystemTime::now(), Instant::now()));
    }

    /// Whether `cluster` is listed as down.
    #[cfg(test)]
    pub(super) fn is_down(&self, cluster: &str) -> bool {
        self.down.contains_key(cluster)
    }

    /// `cluster` has an agent again.
    pub(super) fn back_up(&self, cluster: &str) {
        self.down.remove(cluster);
    }

    /// Drops the clusters down longer than `retention`; returns them.
    pub(super) fn forget_down(&self, retention: Duration) -> Vec<String> {
        let mut expired = Vec::new();
        self.down.retain(|name, (_, at)| {
            let keep = at.elapsed() < retention;
            if !keep {
                expired.push(name.clone());
            }
            keep
        });
        expired
    }
}

impl Clusters {
    /// Records a dial's result for the status page (registered clusters only).
    pub fn record_dial(&self, cluster: &str, result: Result<Duration, &str>) {
        if !self.is_registered(cluster) {
            return;
        }
        let mut stats = self.history.dials.entry(cluster.to_owned()).or_default();
        stats.record(result);
    }

    /// Every cluster with its agents and open connections, and those down within the retention
    /// window, sorted by name.
    pub fn snapshot(&self) -> Vec<ClusterSnapshot> {
        // Collected first: no guard of one map is held while the other is read.
        let down = self.down_snapshots();
        let mut out = self.up_snapshots();
        // A cluster that came back between the two looks is listed once, as up.
        out.extend(
            down.into_iter()
                .filter(|d| !self.agents.by_cluster.contains_key(&d.name)),
        );
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Forgets the clusters down longer than `--down-retention`, and their metric series
    /// (unless an agent registered meanwhile: its series are live again).
    pub(super) fn forget_expired(&self) {
        for cluster in self.history.forget_down(self.limits.down_retention) {
            if !self.is_registered(&cluster) {
                self.metrics.forget_cluster(&cluster);
            }
        }
    }

    fn down_snapshots(&self) -> Vec<ClusterSnapshot> {
        self.forget_expired();
        self.history
            .down
            .iter()
            .map(|entry| ClusterSnapshot {
                name: entry.key().clone(),
                agents: Vec::new(),
                open_connections: self.open.of(entry.key()),
                dials: DialStats::default(),
                down_since: Some(entry.value().0),
            })
            .collect()
    }

    fn up_snapshots(&self) -> Vec<ClusterSnapshot> {
        self.agents
            .by_cluster
            .iter()
            .map(|entry| ClusterSnapshot {
                name: entry.key().clone(),
                agents: entry
                    .value()
                    .iter()
                    .map(|a| (a.info.clone(), a.is_draining()))
                    .collect(),
                open_connections: self.open.of(entry.key()),
                dials: self
                    .history
                    .dials
                    .get(entry.key())
                    .map(|d| d.clone())
                    .unwrap_or_default(),
                down_since: None,
            })
            .collect()
    }
}
