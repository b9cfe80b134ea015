//! The servers this agent holds a tunnel to, by server id, and how many it should hold.
//!
//! Server replicas sit behind one load-balanced address, so where a new connection lands is up
//! to the load balancer. Each server says its id and how many replicas the fleet has; the agent
//! keeps dialing until it holds that many distinct ids (the largest count any held server
//! reports), declines duplicates, and watches for tunnels that end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

/// The held servers. Locked only for short synchronous sections, never across `.await`.
#[derive(Debug)]
pub struct Fleet {
    /// Server id → the replica count it last reported, and since when it is held.
    held: Mutex<HashMap<String, (u32, std::time::Instant)>>,
    changed: Notify,
    connected: Gauge,
    known: Gauge,
}

impl Fleet {
    /// An empty fleet reporting to the `proxy_agent_servers_connected` and
    /// `proxy_agent_known_server_count` gauges.
    pub fn new(connected: Gauge, known: Gauge) -> Self {
        known.set(1);
        Self {
            held: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            connected,
            known,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, std::time::Instant)>> {
        // A panic while holding this lock cannot leave the map inconsistent: every section is
        // a single insert, update or remove.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ids of the servers held now, for the registration (so a duplicate is declined).
    pub fn held_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// How long the oldest held tunnel has been held (zero if none), for the registration.
    pub fn held_for(&self) -> std::time::Duration {
        self.lock()
            .values()
            .map(|(_, since)| since.elapsed())
            .max()
            .unwrap_or_default()
    }

    /// Servers held now.
    pub fn held(&self) -> usize {
        self.lock().len()
    }

    /// Servers the agent should hold: the largest count a held server reports, at least 1.
    pub fn target(&self) -> usize {
        target_of(&self.lock())
    }

    /// Whether fewer servers are held than the fleet has.
    pub fn wanted(&self) -> bool {
        let held = self.lock();
        held.len() < target_of(&held)
    }

    /// Takes `server_id` as held until the returned guard drops; `None` if it already is.
    pub fn try_hold(self: &Arc<Self>, server_id: &str, count: u32) -> Option<Held> {
        {
            let mut held = self.lock();
            if held.contains_key(server_id) {
                return None;
            }
            held.insert(server_id.to_owned(), (count, std::time::Instant::now()));
            self.publish(&held);
        }
        self.changed.notify_waiters();
        Some(Held {
            fleet: self.clone(),
            server_id: server_id.to_owned(),
        })
    }

    /// Resolves when something changed: a server was taken or let go, or a count changed.
    /// Create it before checking [`Fleet::wanted`], so a change in between is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn publish(&self, held: &HashMap<String, (u32, std::time::Instant)>) {
        self.connected.set(held.len() as i64);
        self.known.set(target_of(held) as i64);
    }

    fn set_count(&self, server_id: &str, count: u32) {
        {
            let mut held = self.lock();
            match held.get_mut(server_id) {
                Some((c, _)) if *c != count => *c = count,
                _ => return,
            }
            self.publish(&held);
        }
        self.changed.notify_waiters();
    }

    fn release(&self, server_id: &str) {
        {
            let mut held = self.lock();
            held.remove(server_id);
            self.publish(&held);
        }
        self.changed.notify_waiters();
    }
}

fn target_of(held: &HashMap<String, (u32, std::time::Instant)>) -> usize {
    held.values().map(|(c, _)| *c).max().unwrap_or(1).max(1) as usize
}

/// One held server; dropping it lets the server go (the tunnel ended).
#[derive(Debug)]
pub struct Held {
    fleet: Arc<Fleet>,
    server_id: String,
}

impl Held {
    /// The server reported a new replica count.
    pub fn set_count(&self, count: u32) {
        self.fleet.set_count(&self.server_id, count);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.fleet.release(&self.server_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Arc<Fleet> {
        Arc::new(Fleet::new(Gauge::default(), Gauge::default()))
    }

    #[test]
    fn holds_each_server_once_and_follows_the_largest_count() {
        let f = fleet();
        assert!(f.wanted(), "nothing held yet");
        let a = f.try_hold("a", 3).unwrap();
        assert!(f.try_hold("a", 3).is_none(), "a duplicate is refused");
        assert_eq!((f.held(), f.target()), (1, 3));
        let b = f.try_hold("b", 3).unwrap();
        let c = f.try_hold("c", 3).unwrap();
        assert!(!f.wanted());
        assert_eq!(f.connected.get(), 3);
        assert_eq!(f.known.get(), 3);
        // Scaled up: one server says 4.
        b.set_count(4);
        assert!(f.wanted());
        assert_eq!(f.known.get(), 4);
        // A server going away is missed again; scaling down is followed too.
        drop(a);
        assert_eq!(f.held(), 2);
        b.set_count(2);
        assert!(f.wanted(), "c still says 3");
        c.set_count(2);
        assert!(!f.wanted());
        let mut ids = f.held_ids();
        ids.sort();
        assert_eq!(ids, ["b", "c"]);
    }

    #[test]
    fn count_zero_from_an_older_server_means_one() {
        let f = fleet();
        let _a = f.try_hold("a", 0).unwrap();
        assert_eq!(f.target(), 1);
        assert!(!f.wanted());
    }

    #[tokio::test]
    async fn changes_wake_waiters() {
        let f = fleet();
        let changed = f.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let held = f.try_hold("a", 2).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), changed)
            .await
            .expect("woken by the new server");
        let changed = f.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(1), changed)
            .await
            .expect("woken by the server going away");
    }
}
