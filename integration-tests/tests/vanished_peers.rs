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

/// Keepalive for the FIN tests: gone after 4 s + 2 x 2 s = 8 s (the documented bound); a FIN
/// may go unacknowledged for one 2 s interval.
const FIN_KEEPALIVE: [&str; 2] = ["--tcp-keepalive", "4s,2s,2"];
const FIN_BOUND: Duration = Duration::from_secs(8);

/// A member that writes a line, closes its side after `close_after` (if any), and reads until
/// the tunnel ends its side. Reports each connection's peer address (the agent's end) and the
/// bytes it read.
struct Member {
    addr: SocketAddr,
    peers: tokio::sync::mpsc::UnboundedReceiver<SocketAddr>,
    read: tokio::sync::mpsc::UnboundedReceiver<u64>,
}

impl Member {
    async fn start(close_after: Option<Duration>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (peer_tx, peers) = tokio::sync::mpsc::unbounded_channel();
        let (read_tx, read) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut sock, peer)) = listener.accept().await {
                let _ = peer_tx.send(peer);
                let read_tx = read_tx.clone();
                tokio::spawn(async move {
                    sock.write_all(b"hello\n").await.unwrap();
                    let (mut rd, mut wr) = sock.into_split();
                    let closing = async move {
                        if let Some(after) = close_after {
                            tokio::time::sleep(after).await;
                            let _ = wr.shutdown().await;
                        }
                        // Holds the writing half (open, or closed) until the reading ends.
                        std::future::pending::<()>().await;
                    };
                    let reading = async move {
                        let mut n = 0u64;
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(k) = rd.read(&mut buf).await {
                            if k == 0 {
                                break;
                            }
                            n += k as u64;
                        }
                        let _ = read_tx.send(n);
                    };
                    tokio::select! {
                        () = closing => {}
                        () = reading => {}
                    }
                });
            }
        });
        Self { addr, peers, read }
    }
}

/// A proxy with [`FIN_KEEPALIVE`] on both sides in front of `member`, and a tunnel to it whose
/// first line has arrived.
async fn fin_tunnel(member: &Member) -> (Testbed, TcpStream) {
    let bed = Testbed::builder(&["alpha"])
        .server_args(&FIN_KEEPALIVE)
        .agent("alpha", member.addr)
        .agent_args(&["--tcp-keepalive", "4s,2s,2", "--warm-connections", "0"])
        .start()
        .await;
    let mut tunnel = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let mut line = [0u8; 6];
    tunnel.read_exact(&mut line).await.unwrap();
    (bed, tunnel)
}

/// The member closes its side while the client is gone: the server's FIN to the client is
/// never acknowledged. The tunnel is still freed within the keepalive bound (before, the FIN's
/// retransmissions held it for the whole bound again, counted from the FIN: issue 40).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_clients_tunnel_is_freed_within_the_bound_when_the_member_closes_first() {
    let member = Member::start(Some(Duration::from_secs(5))).await;
    let (bed, tunnel) = fin_tunnel(&member).await;
    let _gone = Blackhole::between(tunnel.local_addr().unwrap(), bed.frontend());
    let freed = until_zero(
        "server",
        bed.server.admin_addr,
        "proxy_server_connections_active{cluster=\"alpha\"}",
        Duration::from_secs(30),
    )
    .await;
    eprintln!("member closed at 5 s, the vanished client's tunnel freed after {freed:?}");
    assert!(
        freed <= FIN_BOUND + Duration::from_secs(1),
        "freed after {freed:?}: the bound is {FIN_BOUND:?}"
    );
    drop(tunnel);
}

/// The same on the agent's side: the member vanishes, the client then closes its side, and
/// the agent's FIN to the member is never acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_members_connection_is_freed_within_the_bound_when_the_client_closes_first() {
    let mut member = Member::start(None).await;
    let (bed, mut tunnel) = fin_tunnel(&member).await;
    let agent = &bed.agents[0];
    let agent_end = member.peers.recv().await.unwrap();
    // The member vanishes: nothing it sends reaches the agent, its ACKs included.
    let _gone = Blackhole::between(member.addr, agent_end);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    tunnel.shutdown().await.unwrap();
    let freed = started.elapsed()
        + until_zero(
            "agent",
            agent.admin_addr,
            "proxy_agent_connections_active",
            Duration::from_secs(30),
        )
        .await;
    eprintln!("client closed at 5 s, the vanished member's connection freed after {freed:?}");
    assert!(
        freed <= FIN_BOUND + Duration::from_secs(1),
        "freed after {freed:?}: the bound is {FIN_BOUND:?}"
    );
    drop(tunnel);
}

/// A legitimate half-closed connection outlives the FIN's bound: the member ends its response
/// at once, and the client goes on uploading for several keepalive intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_after_the_members_response_ended_goes_on_past_the_fin_bound() {
    let mut member = Member::start(Some(Duration::ZERO)).await;
    let bed = Testbed::builder(&["alpha"])
        .server_args(&KEEPALIVE)
        .agent("alpha", member.addr)
        .agent_args(&AGENT_KEEPALIVE)
        .start()
        .await;
    let mut tunnel = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let mut got = Vec::new();
    tunnel.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello\n", "the response, then the member's FIN");
    // 4 s of upload in small pieces: four times the 1 s a FIN may wait.
    let piece = vec![0x77u8; 10 * 1024];
    for _ in 0..40 {
        tunnel.write_all(&piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tunnel.shutdown().await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), member.read.recv())
        .await
        .expect("the member's connection ended")
        .unwrap();
    assert_eq!(
        read,
        40 * 10 * 1024,
        "every byte of the upload reached the member"
    );
}
