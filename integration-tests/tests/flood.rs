//! A flood of idle connections on both listeners, none of which ever sends a byte: the server
//! holds at most `--max-handshakes` of them per listener, and a real client and a new agent are
//! still served while the flood lasts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::Testbed;
use integration_tests::procs::metric;
use integration_tests::upstream::BannerServer;
use tokio::net::TcpStream;

use integration_tests::client::banner_via;

/// Idle connections per listener: 10,000 in all.
const FLOOD: usize = 5_000;

/// Opens `n` connections to `addr` that never send anything; returns those that connected
/// (the rest wait in, or were turned away by, a full backlog).
async fn flood(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    let mut held = Vec::new();
    while let Some(res) = tasks.join_next().await {
        held.extend(res.unwrap());
    }
    held
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_leave_clients_and_agents_served() {
    // The flood itself needs 10,000 descriptors in this process.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    // beta's agent comes during the flood.
    let bed = Testbed::builder(&["alpha", "beta"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;

    let started = Instant::now();
    let (frontend, agents) = tokio::join!(
        flood(bed.frontend(), FLOOD),
        flood(bed.server.agent_addr, FLOOD)
    );
    eprintln!(
        "flood: {} + {} idle connections open after {:?}",
        frontend.len(),
        agents.len(),
        started.elapsed()
    );
    assert!(
        frontend.len() + agents.len() >= FLOOD,
        "the flood did not get through"
    );

    // While the flood holds its sockets: a real client is served...
    let started = Instant::now();
    assert_eq!(banner_via(bed.frontend(), "alpha").await, "alpha-upstream");
    let client_took = started.elapsed();
    // ...and a new agent registers.
    let started = Instant::now();
    let beta_up = BannerServer::start("beta-upstream").await.unwrap();
    let _beta = bed.start_agent("beta", beta_up.addr).await;
    let agent_took = started.elapsed();
    assert_eq!(banner_via(bed.frontend(), "beta").await, "beta-upstream");
    eprintln!(
        "during the flood: a client served in {client_took:?}, a new agent registered in {agent_took:?}"
    );
    assert!(client_took < Duration::from_secs(5), "{client_took:?}");

    // The server holds at most the default cap (1,024) per listener, not the flood.
    let fds = open_files(bed.server.proc.pid());
    eprintln!("server descriptors during the flood: {fds}");
    assert!(
        fds < 2 * 1024 + 200,
        "{fds} descriptors: the flood is not capped"
    );
    let limited = |listener: &str| {
        let sample = format!("proxy_server_handshakes_limited_total{{listener=\"{listener}\"}}");
        let admin = bed.server.admin_addr;
        async move { metric(admin, &sample).await }
    };
    let (f, a) = (limited("frontend").await, limited("agent").await);
    eprintln!("evicted: frontend {f}, agent {a}");
    assert!(f > 0.0 && a > 0.0, "frontend {f}, agent {a}");
    drop((frontend, agents));
}
