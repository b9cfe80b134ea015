//! Peers that vanish without a FIN or RST (a NAT entry expired, a laptop went to sleep, a cable
//! was pulled): TCP keepalive and TCP_USER_TIMEOUT free what they held, idle or mid-transfer.
//! The disappearance is made real with an iptables rule that drops every packet the client
//! sends (its ACKs included), on loopback only; the rule is removed when the test ends.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::blackhole::Blackhole;
use integration_tests::procs::metric;
use integration_tests::upstream::{BannerServer, SourceServer};
use integration_tests::{Testbed, connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Short keepalive so the test takes seconds: gone after 2 s + 2 x 1 s.
const KEEPALIVE: [&str; 2] = ["--tcp-keepalive", "2s,1s,2"];
/// Agent flags: [`KEEPALIVE`], and no warm connections (the tests tell the upstream's
/// connections apart by their order, or count them).
const AGENT_KEEPALIVE: [&str; 4] = ["--tcp-keepalive", "2s,1s,2", "--warm-connections", "0"];

async fn until_zero(what: &str, admin: SocketAddr, sample: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while metric(admin, sample).await != 0.0 {
        assert!(
            started.elapsed() < limit,
            "{what}: {sample} not 0 after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_of_a_vanished_client_is_freed_on_both_sides() {
    let upstream = BannerServer::start("alpha").await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .server_args(&KEEPALIVE)
        .agent("alpha", upstream.addr)
        .agent_args(&KEEPALIVE)
        .start()
        .await;
    let agent = &bed.agents[0];

    let mut tunnel = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let mut banner = [0u8; 6];
    tunnel.read_exact(&mut banner).await.unwrap();
    let active = "proxy_server_connections_active{cluster=\"alpha\"}";
    assert_eq!(metric(bed.server.admin_addr, active).await, 1.0);

    // The client vanishes: from now on nothing it sends arrives, not even ACKs.
    let _gone = Blackhole::between(tunnel.local_addr().unwrap(), bed.frontend());
    let freed = until_zero(
        "server",
        bed.server.admin_addr,
        active,
        Duration::from_secs(20),
    )
    .await;
    let agent_freed = until_zero(
        "agent",
        agent.admin_addr,
        "proxy_agent_connections_active",
        Duration::from_secs(5),
    )
    .await;
    eprintln!(
        "idle tunnel of a vanished client freed after {freed:?} (agent {agent_freed:?} later)"
    );
    // 2 s idle + 2 probes 1 s apart, plus the probe timing slack.
    assert!(freed <= Duration::from_secs(8), "{freed:?}");
    drop(tunnel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_client_vanished_mid_download_is_freed() {
    let source = SourceServer::start().await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .server_args(&KEEPALIVE)
        .agent("alpha", source.addr)
        .agent_args(&AGENT_KEEPALIVE)
        .start()
        .await;

    let tunnel = integration_tests::client::streaming_tunnel(bed.frontend(), "alpha:443").await;
    // Vanishes while the server is sending: its data is never acknowledged, so keepalive
    // (which waits for an idle connection) never starts; TCP_USER_TIMEOUT ends it.
    let _gone = Blackhole::between(tunnel.local_addr().unwrap(), bed.frontend());
    let started = Instant::now();
    let conn = source.conns()[0].clone();
    while conn.closed_at.lock().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the upstream connection of a vanished client is still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let freed = started.elapsed();
    eprintln!("streaming tunnel of a vanished client freed after {freed:?}");
    assert!(freed <= Duration::from_secs(8), "{freed:?}");
    assert_eq!(
        metric(
            bed.server.admin_addr,
            "proxy_server_connections_active{cluster=\"alpha\"}"
        )
        .await,
        0.0
    );
    drop(tunnel);
}

/// A client that gives up while its dial is under way (here the upstream does not answer SYNs,
/// so the agent's connect hangs) cancels the dial at the agent too: no upstream connection is
/// made for a client that is gone, even once the upstream answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_its_dial_cancels_it_at_the_agent() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    // Long dial timeouts, so only the cancellation can end the dial within the test.
    let slow = ["--dial-timeout", "30s"];
    let bed = Testbed::builder(&["alpha"])
        .server_args(&slow)
        .agent("alpha", upstream_addr)
        .agent_args(&slow)
        .agent_args(&integration_tests::procs::NO_WARM)
        .start()
        .await;
    let agent = &bed.agents[0];
    let unreachable = Blackhole::to(upstream_addr);

    let mut client = TcpStream::connect(bed.frontend()).await.unwrap();
    client
        .write_all(b"CONNECT alpha:443 HTTP/1.1\r\nHost: alpha:443\r\n\r\n")
        .await
        .unwrap();
    let active = "proxy_agent_connections_active";
    let started = Instant::now();
    while metric(agent.admin_addr, active).await != 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the dial never reached the agent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(bed.server.admin_addr, "proxy_server_pending_dials").await,
        1.0
    );

    drop(client);
    let freed = until_zero("agent", agent.admin_addr, active, Duration::from_secs(3)).await;
    eprintln!("dial cancelled at the agent {freed:?} after its client left");
    assert_eq!(
        metric(bed.server.admin_addr, "proxy_server_pending_dials").await,
        0.0
    );
    assert_eq!(
        metric(bed.server.admin_addr, "proxy_server_dials_cancelled_total").await,
        1.0
    );
    assert_eq!(
        metric(agent.admin_addr, "proxy_agent_dials_cancelled_total").await,
        1.0
    );
    assert_eq!(
        metric(
            bed.server.admin_addr,
            r#"proxy_server_connections_total{cluster="alpha",result="client_left"}"#
        )
        .await,
        1.0
    );

    // The upstream answers again: a dial still retrying its SYN (every 1, 2, 4 s) would now
    // connect.
    drop(unreachable);
    let late = tokio::time::timeout(Duration::from_secs(4), upstream.accept()).await;
    assert!(
        late.is_err(),
        "the agent connected to the upstream for a client that had left: {late:?}"
    );
}
