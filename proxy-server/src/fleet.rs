//! This server's place in a fleet of replicas: its id, how many replicas there are (from a flag,
//! or counted from a DNS name such as a Kubernetes headless Service and re-read periodically),
//! and the warm-up window after start while agents are still arriving.
//!
//! No peering between replicas: agents reach every replica through one load-balanced address and
//! keep dialing until they hold `count` distinct server ids. The servers only have to say how
//! many there are; Kubernetes already knows that.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often `--server-count-dns` is re-read. Short enough that a scaled Deployment is noticed
/// within seconds, long enough to be no load on the cluster DNS.
pub const DNS_REFRESH: Duration = Duration::from_secs(5);

/// Where the replica count comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountSource {
    /// A fixed number (`--server-count`).
    Fixed(u32),
    /// The number of distinct addresses a DNS name resolves to (`--server-count-dns`): the ready
    /// and not-ready pods of a headless Service with `publishNotReadyAddresses`.
    Dns(String),
}

/// The fleet as this server sees it.
#[derive(Debug)]
pub struct Fleet {
    /// This server's id, sent to agents.
    pub server_id: String,
    count: watch::Sender<u32>,
    source: CountSource,
    started: Instant,
    warmup: Duration,
}

impl Fleet {
    /// A fleet whose count starts from `source` (a DNS source starts at 1 until first read).
    pub fn new(server_id: String, source: CountSource, warmup: Duration) -> Self {
        let initial = match &source {
            CountSource::Fixed(n) => (*n).max(1),
            CountSource::Dns(_) => 1,
        };
        Self {
            server_id,
            count: watch::Sender::new(initial),
            source,
            started: Instant::now(),
            warmup,
        }
    }

    /// How many replicas serve the fleet now (at least 1).
    pub fn count(&self) -> u32 {
        *self.count.borrow()
    }

    /// Notified whenever the count changes.
    pub fn subscribe(&self) -> watch::Receiver<u32> {
        self.count.subscribe()
    }

    /// Time left of the warm-up window, if it is not over: agents are still finding this
    /// replica, so a cluster it has not seen yet may well be connected elsewhere.
    pub fn warmup_left(&self) -> Option<Duration> {
        let left = self.warmup.saturating_sub(self.started.elapsed());
        (!left.is_zero()).then_some(left)
    }

    /// Reads the count once now (so the first registrations already see it), then keeps it up
    /// to date until `shutdown` when it comes from DNS, in a task of `tasks`.
    pub async fn start(
        self: &std::sync::Arc<Self>,
        shutdown: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        let CountSource::Dns(name) = &self.source else {
            return;
        };
        self.refresh(name).await;
        let fleet = self.clone();
        let name = name.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(DNS_REFRESH) => {}
                }
                fleet.refresh(&name).await;
            }
        });
    }

    async fn refresh(&self, name: &str) {
        match count_addresses(name).await {
            Ok(0) => tracing::warn!(
                dns = name,
                "server-count DNS name has no addresses; keeping the last count"
            ),
            Ok(n) => {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                let old = self.count.send_replace(n);
                if old != n {
                    tracing::info!(dns = name, from = old, to = n, "server count changed");
                }
            }
            Err(err) => {
                tracing::warn!(dns = name, %err, "cannot resolve the server-count DNS name; keeping the last count")
            }
        }
    }
}

/// Distinct addresses `name` resolves to.
async fn count_addresses(name: &str) -> std::io::Result<usize> {
    let addrs = tokio::net::lookup_host((name, 0)).await?;
    let distinct: HashSet<IpAddr> = addrs.map(|a| a.ip()).collect();
    Ok(distinct.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn warmup_ends() {
        let fleet = Fleet::new("s".into(), CountSource::Fixed(3), Duration::from_secs(10));
        assert_eq!(fleet.count(), 3);
        assert!(fleet.warmup_left().is_some());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(fleet.warmup_left(), None);
    }

    #[tokio::test]
    async fn counts_distinct_addresses_of_a_name() {
        // "localhost" resolves to 127.0.0.1 and perhaps ::1: at least one, at most two.
        let n = count_addresses("localhost").await.unwrap();
        assert!((1..=2).contains(&n), "{n}");
        let fleet = Fleet::new(
            "s".into(),
            CountSource::Dns("localhost".into()),
            Duration::ZERO,
        );
        assert_eq!(fleet.count(), 1);
        fleet.refresh("localhost").await;
        assert_eq!(fleet.count() as usize, n);
        // A name that does not resolve keeps the last count.
        fleet.refresh("no-such-name.invalid").await;
        assert_eq!(fleet.count() as usize, n);
    }
}
