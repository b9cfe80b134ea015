//! Unit tests of the registry, agents built directly on in-memory control queues. Where time
//! matters the clock is paused, so windows and waits are exact and nothing sleeps for real.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proxy_proto::{DialCancel, ServerMessage, server_message::Msg};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::Limits;
use crate::metrics::Metrics;

const DOWN_RETENTION: Duration = Duration::from_secs(600);

fn limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(10),
        max_head_bytes: 8192,
        max_handshakes: 16,
        max_connections: 3,
        max_connections_per_cluster: 2,
        max_pending_dials: 2,
        max_buffered: u64::MAX,
        max_agents_per_cluster: 16,
        down_retention: DOWN_RETENTION,
    }
}

fn clusters() -> (Arc<Clusters>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(
        &mut prometheus_client::registry::Registry::default(),
    ));
    (Arc::new(Clusters::new(limits(), metrics.clone())), metrics)
}

type ControlRx = super::control::Receiver<Box<ServerMessage>>;

/// Agent `id` of `cluster` on connection `conn_id`, understanding `features`, and the other end
/// of its control queue.
fn agent_with(
    cluster: &str,
    id: &str,
    conn_id: u64,
    features: Features,
) -> (AgentHandle, ControlRx) {
    let (tx, rx) = super::control::channel(8);
    let info = AgentInfo {
        cluster: cluster.to_owned(),
        agent_id: id.to_owned(),
        version: "test".to_owned(),
        conn_id,
        addr: ([127, 0, 0, 1], 1).into(),
        connected_at: SystemTime::now(),
        upstream_ca: None,
        upstream_server_name: None,
        features,
    };
    let budget = proxy_common::flow::Budget::new(1 << 20);
    (
        AgentHandle::new(info, tx, CancellationToken::new(), budget, None),
        rx,
    )
}

fn agent(cluster: &str, id: &str, conn_id: u64) -> AgentHandle {
    agent_with(cluster, id, conn_id, Features::default()).0
}

fn register(clusters: &Arc<Clusters>, cluster: &str, id: &str, conn_id: u64) -> Registration {
    clusters.register(agent(cluster, id, conn_id)).unwrap()
}

fn picked(clusters: &Clusters, cluster: &str) -> Option<String> {
    clusters.pick(cluster).map(|a| a.info.agent_id.clone())
}

#[tokio::test(start_paused = true)]
async fn a_cluster_whose_last_agent_left_waits_for_the_next_within_the_reconnect_window() {
    let (clusters, metrics) = clusters();
    drop(register(&clusters, "alpha", "a1", 1));
    assert!(!clusters.is_registered("alpha"));
    assert_eq!((clusters.cluster_count(), clusters.agent_count()), (0, 0));
    let label = crate::metrics::ClusterLabel {
        cluster: "alpha".to_owned(),
    };
    assert_eq!(metrics.agents.get_or_create(&label).get(), 0);

    let started = Instant::now();
    let waiter = tokio::spawn({
        let clusters = clusters.clone();
        async move {
            let agent = clusters
                .wait_for_agent("alpha", Duration::from_secs(60), false)
                .await;
            agent.map(|a| a.info.agent_id.clone())
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiter.is_finished(), "gave up within the reconnect window");
    let _back = register(&clusters, "alpha", "a2", 2);
    assert_eq!(waiter.await.unwrap().as_deref(), Some("a2"));
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn the_reconnect_window_ends() {
    let (clusters, _) = clusters();
    drop(register(&clusters, "alpha", "a1", 1));
    // Within the window, with no agent coming back: the whole wait, then nothing.
    let started = Instant::now();
    let wait = Duration::from_secs(10);
    assert!(
        clusters
            .wait_for_agent("alpha", wait, false)
            .await
            .is_none()
    );
    assert_eq!(started.elapsed(), wait);
    // After it: nothing, at once.
    tokio::time::sleep(RECONNECT_WINDOW).await;
    let started = Instant::now();
    assert!(
        clusters
            .wait_for_agent("alpha", wait, false)
            .await
            .is_none()
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_cluster_fails_at_once_unless_agents_are_arriving() {
    let (clusters, _) = clusters();
    let wait = Duration::from_secs(10);
    let started = Instant::now();
    assert!(clusters.wait_for_agent("beta", wait, false).await.is_none());
    assert_eq!(started.elapsed(), Duration::ZERO);
    // While this server warms up, agents are still finding it: it waits for them.
    let waiter = tokio::spawn({
        let clusters = clusters.clone();
        async move { clusters.wait_for_agent("beta", wait, true).await.is_some() }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _beta = register(&clusters, "beta", "b1", 1);
    assert!(waiter.await.unwrap());
}

#[tokio::test]
async fn draining_agents_are_not_picked_while_another_answers() {
    let (clusters, _) = clusters();
    let a1 = register(&clusters, "alpha", "a1", 1);
    let a2 = register(&clusters, "alpha", "a2", 2);
    // Round robin spreads over both.
    let mut seen: Vec<_> = (0..4).filter_map(|_| picked(&clusters, "alpha")).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["a1", "a2"]);
    a1.agent().set_draining();
    for _ in 0..4 {
        assert_eq!(picked(&clusters, "alpha").as_deref(), Some("a2"));
    }
    // An answering but draining agent comes before one that does not answer.
    a2.agent().set_unresponsive(Some(std::time::Instant::now()));
    for _ in 0..4 {
        assert_eq!(picked(&clusters, "alpha").as_deref(), Some("a1"));
    }
    // A draining agent alone still serves.
    drop(a2);
    assert_eq!(picked(&clusters, "alpha").as_deref(), Some("a1"));
}

#[tokio::test(start_paused = true)]
async fn a_dial_waiting_on_an_agent_learns_at_once_when_it_stops_answering() {
    let handle = Arc::new(agent("alpha", "a1", 1));
    let waiting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.until_unresponsive().await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiting.is_finished(), "resolved while the agent answers");
    // Answering again changes nothing for the waiter.
    handle.set_unresponsive(None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished());
    handle.set_unresponsive(Some(std::time::Instant::now()));
    tokio::time::timeout(Duration::from_millis(1), waiting)
        .await
        .expect("woken when the agent stopped answering")
        .unwrap();
    // Already unresponsive: a new waiter does not wait.
    tokio::time::timeout(Duration::from_millis(1), handle.until_unresponsive())
        .await
        .expect("an unresponsive agent is seen at once");
    assert!(handle.unresponsive_since().is_some());
    handle.set_unresponsive(None);
    assert!(handle.unresponsive_since().is_none());
}

#[tokio::test(start_paused = true)]
async fn pending_dials_fail_when_their_agent_leaves() {
    let (clusters, _) = clusters();
    let a1 = register(&clusters, "alpha", "a1", 1);
    let a2 = register(&clusters, "alpha", "a2", 2);
    let mut of_a1 = clusters.begin_dial(a1.agent()).unwrap();
    let mut of_a2 = clusters.begin_dial(a2.agent()).unwrap();
    let closed = a1.agent().closed().clone();
    drop(a1);
    assert!(closed.is_cancelled());
    // At once, not at a timeout (the paused clock would otherwise run it out).
    let gone = tokio::time::timeout(Duration::from_secs(1), of_a1.outcome()).await;
    assert!(matches!(gone, Ok(Err(AgentGone))), "{gone:?}");
    // The other agent's dial is untouched and still answerable.
    assert_eq!(clusters.pending_dials(), 1);
    let reason = DialOutcome::Failed("refused".to_owned());
    clusters.complete_dial(of_a2.id(), 2, reason).unwrap();
    let answer = of_a2.outcome().await;
    assert!(
        matches!(answer, Ok(DialOutcome::Failed(ref r)) if r == "refused"),
        "{answer:?}"
    );
}

#[tokio::test]
async fn only_the_connection_asked_may_answer_a_dial() {
    let (clusters, _) = clusters();
    let a1 = register(&clusters, "alpha", "a1", 1);
    let _b1 = register(&clusters, "beta", "b1", 2);
    let mut dial = clusters.begin_dial(a1.agent()).unwrap();
    let stolen = clusters.complete_dial(dial.id(), 2, DialOutcome::Failed("x".to_owned()));
    assert!(matches!(stolen, Err(DialLookupError::Unknown(id)) if id == dial.id()));
    assert_eq!(clusters.pending_dials(), 1);
    clusters
        .complete_dial(dial.id(), 1, DialOutcome::Failed("y".to_owned()))
        .unwrap();
    assert!(matches!(dial.outcome().await, Ok(DialOutcome::Failed(r)) if r == "y"));
    assert_eq!(clusters.pending_dials(), 0);
}

#[tokio::test]
async fn an_abandoned_dial_is_forgotten_counted_and_cancelled_at_the_agent() {
    let (clusters, metrics) = clusters();
    let features = Features {
        cancel_dial: true,
        ..Features::default()
    };
    let (handle, mut control) = agent_with("alpha", "a1", 1, features);
    let a1 = clusters.register(handle).unwrap();
    let dial = clusters.begin_dial(a1.agent()).unwrap();
    let id = dial.id();
    assert_eq!(
        (clusters.pending_dials(), metrics.pending_dials.get()),
        (1, 1)
    );
    drop(dial);
    assert_eq!(
        (clusters.pending_dials(), metrics.pending_dials.get()),
        (0, 0)
    );
    assert_eq!(metrics.dials_cancelled.get(), 1);
    let sent = control.try_recv().unwrap();
    assert_eq!(sent.msg, Some(Msg::CancelDial(DialCancel { dial_id: id })));
    // A late answer finds nothing.
    let late = clusters.complete_dial(id, 1, DialOutcome::Failed("late".to_owned()));
    assert!(matches!(late, Err(DialLookupError::Unknown(_))));

    // An agent that does not understand `cancel_dial` is not told, and nothing is counted.
    let (handle, mut control) = agent_with("alpha", "a2", 2, Features::default());
    let a2 = clusters.register(handle).unwrap();
    drop(clusters.begin_dial(a2.agent()).unwrap());
    assert_eq!(clusters.pending_dials(), 0);
    assert_eq!(metrics.dials_cancelled.get(), 1);
    assert!(control.try_recv().is_none());
}

#[tokio::test]
async fn pending_dials_are_bounded() {
    let (clusters, _) = clusters();
    let a1 = register(&clusters, "alpha", "a1", 1);
    let first = clusters.begin_dial(a1.agent()).unwrap();
    let _second = clusters.begin_dial(a1.agent()).unwrap();
    let third = clusters.begin_dial(a1.agent());
    assert!(matches!(third, Err(LimitError::PendingDials(2))));
    drop(first);
    assert!(clusters.begin_dial(a1.agent()).is_ok());
}

#[test]
fn connection_limits_per_cluster_and_in_total_hold_until_the_slot_is_dropped() {
    let (clusters, metrics) = clusters();
    let alpha1 = clusters.open_connection("alpha").unwrap();
    let _alpha2 = clusters.open_connection("alpha").unwrap();
    let refused = clusters.open_connection("alpha").unwrap_err();
    assert_eq!(
        refused,
        LimitError::Cluster {
            cluster: "alpha".to_owned(),
            limit: 2
        }
    );
    // A refusal takes nothing: the total still has room for another cluster.
    let _beta = clusters.open_connection("beta").unwrap();
    assert_eq!(clusters.open_connections(), 3);
    assert_eq!(
        clusters.open_connection("gamma").unwrap_err(),
        LimitError::Total(3)
    );
    assert_eq!(clusters.open_connections(), 3);
    let label = crate::metrics::ClusterLabel {
        cluster: "alpha".to_owned(),
    };
    assert_eq!(metrics.connections_active.get_or_create(&label).get(), 2);
    drop(alpha1);
    assert_eq!(clusters.open_connections(), 2);
    assert_eq!(metrics.connections_active.get_or_create(&label).get(), 1);
    let _alpha3 = clusters.open_connection("alpha").unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_down_cluster_is_listed_with_when_it_left_until_the_retention_ends() {
    let (clusters, _) = clusters();
    let alpha = register(&clusters, "alpha", "a1", 1);
    let _beta = register(&clusters, "beta", "b1", 2);
    clusters.record_dial("alpha", Ok(Duration::from_millis(3)));
    let before = SystemTime::now();
    drop(alpha);
    let snapshot = clusters.snapshot();
    let names: Vec<_> = snapshot.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let (alpha, beta) = (&snapshot[0], &snapshot[1]);
    assert!(alpha.down_since.is_some_and(|t| t >= before));
    assert!(alpha.agents.is_empty());
    assert!(
        alpha.dials.recent_ms.is_empty(),
        "a down cluster's dials are forgotten"
    );
    assert!(beta.down_since.is_none());
    assert_eq!(beta.agents.len(), 1);
    tokio::time::sleep(DOWN_RETENTION).await;
    let names: Vec<_> = clusters.snapshot().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["beta"]);
}

#[tokio::test]
async fn a_cluster_that_comes_back_is_listed_once_as_up() {
    let (clusters, _) = clusters();
    drop(register(&clusters, "alpha", "a1", 1));
    let _back = register(&clusters, "alpha", "a2", 2);
    let snapshot = clusters.snapshot();
    assert_eq!(snapshot.len(), 1);
    assert!(snapshot[0].down_since.is_none());
    assert_eq!(snapshot[0].agents[0].0.agent_id, "a2");
}

#[tokio::test]
async fn one_registration_per_connection() {
    let (clusters, _) = clusters();
    let _a1 = register(&clusters, "alpha", "a1", 1);
    assert!(clusters.register(agent("alpha", "again", 1)).is_err());
    assert_eq!(clusters.agent_count(), 1);
    assert_eq!(picked(&clusters, "alpha").as_deref(), Some("a1"));
}

#[tokio::test]
async fn dial_stats_keep_the_latest_dials_and_count_failures() {
    let (clusters, _) = clusters();
    clusters.record_dial("alpha", Err("not registered: not recorded"));
    let _a1 = register(&clusters, "alpha", "a1", 1);
    for ms in 0..RECENT_DIALS as u64 + 6 {
        clusters.record_dial("alpha", Ok(Duration::from_millis(ms)));
    }
    clusters.record_dial("alpha", Err("refused"));
    let stats = clusters.snapshot().remove(0).dials;
    assert_eq!(stats.recent_ms.len(), RECENT_DIALS);
    assert_eq!(stats.recent_ms.front(), Some(&6.0));
    assert_eq!(stats.recent_ms.back(), Some(&(RECENT_DIALS as f64 + 5.0)));
    assert_eq!(stats.failures, 1);
    assert_eq!(
        stats.last_failure.map(|(_, why)| why).as_deref(),
        Some("refused")
    );
}

#[test]
fn a_cluster_holds_at_most_its_agent_cap_and_a_refused_agent_leaves_nothing() {
    let metrics = Arc::new(Metrics::new(
        &mut prometheus_client::registry::Registry::default(),
    ));
    let limits = Limits {
        max_agents_per_cluster: 2,
        ..limits()
    };
    let clusters = Arc::new(Clusters::new(limits, metrics.clone()));
    let first = register(&clusters, "alpha", "a1", 1);
    let _second = register(&clusters, "alpha", "a2", 2);
    let err = clusters.register(agent("alpha", "a3", 3)).unwrap_err();
    assert!(
        matches!(err, super::RegisterError::TooManyAgents { max: 2, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("--max-agents-per-cluster"),
        "{err}"
    );
    // The refused one holds no place: not counted, not routable, its connection id free.
    assert_eq!(clusters.agent_count(), 2);
    let label = crate::metrics::ClusterLabel {
        cluster: "alpha".to_owned(),
    };
    assert_eq!(metrics.agents.get_or_create(&label).get(), 2);
    for _ in 0..4 {
        assert_ne!(picked(&clusters, "alpha").as_deref(), Some("a3"));
    }
    // Other clusters are not limited by alpha's agents, and a place freed is taken again.
    let _beta = register(&clusters, "beta", "b1", 4);
    drop(first);
    let _third = register(&clusters, "alpha", "a3", 3);
    assert_eq!(clusters.agent_count(), 3);
}

#[test]
fn a_cluster_whose_agent_came_back_is_never_left_marked_down() {
    // One agent of alpha comes and goes on one thread while another registers on a second:
    // each time the second is registered, the cluster must not be marked down, whatever the
    // interleaving of the first one's departure.
    let (clusters, _) = clusters();
    let churn = {
        let clusters = clusters.clone();
        std::thread::spawn(move || {
            for i in 0..20_000u64 {
                drop(register(&clusters, "alpha", "a1", 1_000_000 + i));
            }
        })
    };
    let mut stale = 0;
    for i in 0..2_000u64 {
        let back = register(&clusters, "alpha", "a2", 2_000_000 + i);
        // Let the other thread's departures race this registration.
        std::thread::yield_now();
        if clusters.history.is_down("alpha") {
            stale += 1;
        }
        drop(back);
    }
    churn.join().unwrap();
    let last = register(&clusters, "alpha", "a2", 3_000_000);
    assert!(!clusters.history.is_down("alpha"));
    drop(last);
    assert_eq!(stale, 0, "alpha marked down while an agent was registered");
}

#[tokio::test(start_paused = true)]
async fn a_cluster_forgotten_after_its_retention_takes_its_metric_series_along() {
    let (clusters, metrics) = clusters();
    let label = crate::metrics::ClusterLabel {
        cluster: "alpha".to_owned(),
    };
    let series = |metrics: &Metrics| metrics.agents.get(&label).is_some();
    drop(register(&clusters, "alpha", "a1", 1));
    metrics.dial_duration.get_or_create(&label).observe(0.01);
    assert!(series(&metrics), "alpha's series while it is listed down");
    tokio::time::advance(DOWN_RETENTION + Duration::from_secs(1)).await;
    // Forgotten at the next look (the status page, or another cluster leaving).
    assert!(clusters.snapshot().iter().all(|c| c.name != "alpha"));
    assert!(
        !series(&metrics),
        "alpha's agent gauge outlived its retention"
    );
    assert!(metrics.dial_duration.get(&label).is_none());
    // A cluster that came back within its retention keeps its series.
    drop(register(&clusters, "beta", "b1", 2));
    let _back = register(&clusters, "beta", "b2", 3);
    tokio::time::advance(DOWN_RETENTION + Duration::from_secs(1)).await;
    let _ = clusters.snapshot();
    let beta = crate::metrics::ClusterLabel {
        cluster: "beta".to_owned(),
    };
    assert_eq!(metrics.agents.get(&beta).map(|g| g.get()), Some(1));
}

#[tokio::test]
async fn a_ping_is_overdue_only_while_nothing_at_all_is_heard_from_the_agent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (handle, _rx) = agent_with("alpha", "a1", 1, Features::default());
    let (ours, mut theirs) = tokio::io::duplex(64);
    let heard = proxy_common::heard::Heard::default();
    let mut connection = proxy_common::heard::Listening::new(ours, heard.clone());
    let slack = Duration::from_millis(20);
    handle.set_ping_outstanding(Some(super::PingSent::now(heard.clone())));
    assert!(!handle.ping_overdue(slack), "overdue at once");
    tokio::time::sleep(slack * 2).await;
    assert!(handle.ping_overdue(slack), "silent past the slack");
    // Data arrives (the pong waits behind it): alive, so not overdue.
    theirs.write_all(b"bulk").await.unwrap();
    let mut buf = [0u8; 4];
    connection.read_exact(&mut buf).await.unwrap();
    assert!(!handle.ping_overdue(slack), "a busy agent taken for silent");
    handle.set_ping_outstanding(None);
    assert!(!handle.ping_overdue(slack));
}
