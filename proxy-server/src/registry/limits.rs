//! Connection limits: open tunneled connections counted per cluster and in total, each held by
//! a [`ConnectionSlot`] that gives its place back when dropped. (The bound on pending dials is
//! checked where dials begin, in `dials`; its error is a [`LimitError`] too.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use super::Clusters;
use crate::config::Limits;
use crate::metrics::ClusterLabel;

/// A limit that refused a CONNECT (the client gets `503` with this reason).
// Variant fields are described by each variant's #[error] message, not by
// one-word doc lines.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Too many tunneled connections in total.
    #[error("the proxy is at its limit of {0} open connections")]
    Total(usize),
    /// Too many tunneled connections to this cluster.
    #[error("cluster {cluster:?} is at its limit of {limit} open connections")]
    Cluster { cluster: String, limit: usize },
    /// Too many CONNECTs waiting for agents.
    #[error("the proxy is at its limit of {0} dials in progress")]
    PendingDials(usize),
    /// The windows of open connections hold all the memory they may.
    #[error(
        "the proxy's connections hold all the memory they may ({} MiB, --max-buffered): \
         clients that stopped reading pin it until they read or close",
        .0 >> 20
    )]
    Buffered(u64),
}

/// Open tunneled connections, per cluster (only clusters with some) and in total.
#[derive(Debug, Default)]
pub(super) struct OpenConnections {
    per_cluster: DashMap<String, usize>,
    total: AtomicUsize,
}

impl OpenConnections {
    /// Open connections to `cluster`.
    pub(super) fn of(&self, cluster: &str) -> usize {
        self.per_cluster.get(cluster).map_or(0, |n| *n)
    }

    /// Takes a place for `cluster` within both bounds of `limits`; nothing is taken if
    /// either refuses.
    fn take(&self, cluster: &str, limits: &Limits) -> Result<(), LimitError> {
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        if total > limits.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Total(limits.max_connections));
        }
        let max = limits.max_connections_per_cluster;
        let mut count = self.per_cluster.entry(cluster.to_owned()).or_insert(0);
        if *count >= max {
            drop(count);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Cluster {
                cluster: cluster.to_owned(),
                limit: max,
            });
        }
        *count += 1;
        Ok(())
    }

    fn give_back(&self, cluster: &str) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(mut count) = self.per_cluster.get_mut(cluster) {
            *count -= 1;
        }
        self.per_cluster.remove_if(cluster, |_, n| *n == 0);
    }
}

impl Clusters {
    /// Takes one connection slot for `cluster`; the guard gives it back.
    pub fn open_connection(self: &Arc<Self>, cluster: &str) -> Result<ConnectionSlot, LimitError> {
        if !self.pool.admits() {
            return Err(LimitError::Buffered(self.pool.limit()));
        }
        self.open.take(cluster, &self.limits)?;
        self.active_gauge(cluster).inc();
        Ok(ConnectionSlot {
            clusters: self.clone(),
            cluster: cluster.to_owned(),
        })
    }

    /// Open tunneled connections in total.
    pub fn open_connections(&self) -> usize {
        self.open.total.load(Ordering::Acquire)
    }

    fn active_gauge(&self, cluster: &str) -> prometheus_client::metrics::gauge::Gauge {
        self.metrics
            .connections_active
            .get_or_create(&ClusterLabel {
                cluster: cluster.to_owned(),
            })
            .clone()
    }
}

/// One open tunneled connection's place under the limits; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    clusters: Arc<Clusters>,
    cluster: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.clusters.open.give_back(&self.cluster);
        self.clusters.active_gauge(&self.cluster).dec();
    }
}
