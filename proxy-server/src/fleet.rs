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
    /// What the registrations so far say about the warm-up (see [`Fleet::registered`]).
    arrivals: std::sync::Mutex<Arrivals>,
}

/// How long registrations must have paused before a fleet that started together counts as
/// found: agents of such a fleet reach every replica within a fraction of a second of each
/// other (one connection attempt each), so a second without a new one means they are all here.
pub const SETTLE: Duration = Duration::from_secs(1);

/// How much older than this replica an agent's other tunnels may be and still belong to a fleet
/// that started together (replicas never start at exactly the same instant).
pub const START_SKEW: Duration = Duration::from_secs(1);

/// The registrations seen during the warm-up.
#[derive(Debug, Default)]
struct Arrivals {
    /// When the last agent registered.
    last: Option<Instant>,
    /// An agent arrived holding tunnels older than this replica: the fleet was running before
    /// it started, and agents find it only as they probe, so its warm-up runs its full length.
    running_fleet: bool,
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
            arrivals: std::sync::Mutex::default(),
        }
    }

    /// An agent registered, having held its oldest other tunnel for `held_for`.
    pub fn registered(&self, held_for: Duration) {
        let mut arrivals = self.arrivals_lock();
        arrivals.last = Some(Instant::now());
        if held_for > self.started.elapsed() + START_SKEW {
            arrivals.running_fleet = true;
        }
    }

    fn arrivals_lock(&self) -> std::sync::MutexGuard<'_, Arrivals> {
        // Held only to read or write two fields.
        self.arrivals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    /// replica, so a cluster it has not seen yet may well be connected elsewhere. It ends early
    /// for a fleet that started together once its agents' registrations have paused for
    /// [`SETTLE`]: they have all found this replica (its load balancer's clients need not wait
    /// the whole window with no replica ready).
    pub fn warmup_left(&self) -> Option<Duration> {
        let left = self.warmup.saturating_sub(self.started.elapsed());
        if left.is_zero() {
            return None;
        }
        let arrivals = self.arrivals_lock();
        let settled = arrivals
            .last
            .is_some_and(|last| !arrivals.running_fleet && last.elapsed() >= SETTLE);
        (!settled).then_some(left)
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

    #[tokio::test(start_paused = true)]
    async fn a_fleet_that_started_together_is_ready_once_its_agents_settled() {
        let fleet = Fleet::new("s".into(), CountSource::Fixed(3), Duration::from_secs(10));
        // No agent yet: the whole window.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(fleet.warmup_left().is_some());
        // Agents arrive holding tunnels no older than this replica: a cold start.
        fleet.registered(Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(300)).await;
        fleet.registered(Duration::from_millis(2_500));
        tokio::time::sleep(SETTLE - Duration::from_millis(1)).await;
        assert!(
            fleet.warmup_left().is_some(),
            "ended before the arrivals paused"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fleet.warmup_left(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_joining_a_running_fleet_waits_its_whole_warmup() {
        let fleet = Fleet::new("s".into(), CountSource::Fixed(3), Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(500)).await;
        // An agent that has held the other replicas for an hour: they ran before this one.
        fleet.registered(Duration::from_secs(3600));
        fleet.registered(Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(fleet.warmup_left().is_some());
        tokio::time::sleep(Duration::from_secs(5)).await;
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
