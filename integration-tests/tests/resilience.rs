//! Agents and servers coming and going: nothing is left half-open, and service comes back by
//! itself.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use integration_tests::upstream::SourceServer;
use integration_tests::{
    AgentProc, Bed, ConnectReply, FakeApiServer, ServerProc, Testbed, connect, get_via_proxy,
};
use tokio::io::AsyncReadExt;

use integration_tests::client::read_until_closed as until_closed;

async fn wait_closed(conn: &integration_tests::upstream::SourceConn, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if conn.closed_at.lock().unwrap().is_some() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "upstream connection still open after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_agent_closes_its_connections_on_both_sides_and_a_new_one_serves() {
    let source = SourceServer::start().await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--agent-wait", "0s"])
        .start()
        .await;
    // Owned by the test, which kills it.
    let agent = bed.start_agent("alpha", source.addr).await;

    let tunnel = integration_tests::client::streaming_tunnel(bed.frontend(), "alpha:443").await;
    let upstream = source.conns()[0].clone();
    assert!(upstream.written.load(Ordering::Relaxed) > 0);

    agent.proc.kill().await;
    let client_closed = until_closed(tunnel, Duration::from_secs(5)).await;
    let upstream_closed = wait_closed(&upstream, Duration::from_secs(5)).await;
    eprintln!(
        "agent killed: client side closed after {client_closed:?}, upstream side after {upstream_closed:?}"
    );

    // Nothing for alpha until a new agent comes.
    match connect(bed.frontend(), "alpha:443").await.unwrap() {
        ConnectReply::Refused { status, .. } => assert_eq!(status, 503),
        ConnectReply::Tunnel(_) => panic!("served by a dead agent"),
    }
    let _again = bed.start_agent("alpha", source.addr).await;
    integration_tests::client::streaming_tunnel(bed.frontend(), "alpha:443").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_re_registers_by_itself_after_a_server_restart() {
    let bed = Bed::new(&["alpha"]);
    let api = FakeApiServer::start(&bed.pki, "alpha").await.unwrap();
    let server = ServerProc::start(&bed.pki, None, &[]).await.unwrap();
    let agent_addr = server.agent_addr;
    let agent = AgentProc::start_ready(&bed.pki, &[agent_addr], "alpha", api.addr)
        .await
        .unwrap();
    // Kill the server, wait until the agent noticed, start a new one on the same port, and time
    // how long until a CONNECT works again.
    server.proc.kill().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while integration_tests::procs::admin_get(agent.admin_addr, "/readyz")
        .await
        .unwrap()
        .0
        == 200
    {
        assert!(
            Instant::now() < deadline,
            "agent still claims to be registered with a dead server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the agent's backoff grow a little, as in a real restart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = ServerProc::start(&bed.pki, Some(agent_addr), &[])
        .await
        .unwrap();
    let back = Instant::now();
    loop {
        if let Ok((200, _)) =
            get_via_proxy(server.frontend_addr, &bed.pki, "alpha", "/version").await
        {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "agent never re-registered:\n{}",
            agent.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = back.elapsed();
    eprintln!("agent serving again {took:?} after the server came back");
    assert!(
        took < Duration::from_secs(2),
        "re-registration took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_answering_pings_is_dropped_with_its_connections() {
    let source = SourceServer::start().await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .server_args(&[
            "--keepalive-interval",
            "300ms",
            "--keepalive-timeout",
            "300ms",
            "--agent-wait",
            "0s",
        ])
        .agent("alpha", source.addr)
        .start()
        .await;
    let agent = &bed.agents[0];
    let tunnel = integration_tests::client::streaming_tunnel(bed.frontend(), "alpha:443").await;

    // A frozen agent keeps its TCP connection open but answers nothing.
    agent.proc.signal("STOP");
    let closed = until_closed(tunnel, Duration::from_secs(5)).await;
    let mut refused_after = None;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if let ConnectReply::Refused { status: 503, .. } =
            connect(bed.frontend(), "alpha:443").await.unwrap()
        {
            refused_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.proc.signal("CONT");
    eprintln!(
        "frozen agent: its connection closed after {closed:?}, cluster unserved after a further {refused_after:?}"
    );
    assert!(
        refused_after.is_some(),
        "frozen agent still in the registry"
    );
    let logs = bed.server.proc.logs_with("agent disconnected", 1).await;
    assert!(logs.contains("agent disconnected"), "{logs}");

    // Thawed, it notices and comes back by itself.
    agent
        .wait_registered(Duration::from_secs(15))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let ConnectReply::Tunnel(mut t) = connect(bed.frontend(), "alpha:443").await.unwrap() {
            t.read_exact(&mut vec![0u8; 1 << 20]).await.unwrap();
            break;
        }
        assert!(
            Instant::now() < deadline,
            "thawed agent did not come back:\n{}",
            agent.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_reaches_the_client_as_a_reset_not_a_clean_close() {
    // An upstream that sends a little, then resets the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(b"partial").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", upstream)
        .start()
        .await;
    let mut tunnel = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let mut got = Vec::new();
    let res = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"partial");
    let err = res.expect_err("a reset upstream looked like a complete response");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_backoff_starts_over_after_every_tunnel_that_worked() {
    // Six crashes in a row, each down for half a second: the agent's backoff grows while the
    // server is down and must start over once it registered again, or each comeback takes
    // longer than the last (it did: 0.9, 1.3, 4.5, 7.5 s...).
    let bed = Bed::new(&["alpha"]);
    let api = FakeApiServer::start(&bed.pki, "alpha").await.unwrap();
    let mut server = ServerProc::start(&bed.pki, None, &[]).await.unwrap();
    let agent_addr = server.agent_addr;
    let agent = AgentProc::start_ready(&bed.pki, &[agent_addr], "alpha", api.addr)
        .await
        .unwrap();
    let mut took = Vec::new();
    for _ in 0..6 {
        server.proc.kill().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        server = ServerProc::start(&bed.pki, Some(agent_addr), &[])
            .await
            .unwrap();
        let back = Instant::now();
        agent
            .wait_registered(Duration::from_secs(15))
            .await
            .unwrap();
        took.push(back.elapsed());
    }
    eprintln!("re-registered after each of 6 restarts: {took:?}");
    assert!(
        took.iter().all(|t| *t < Duration::from_millis(1500)),
        "re-registration times {took:?}:\n{}",
        agent.proc.logs()
    );
}

/// An agent that goes silent (frozen: its TCP connection open, nothing answered) is passed over
/// within a ping interval and a second: CONNECTs go to the cluster's other agent, and once no
/// agent answers they get `503` at once rather than `504` after the dial timeout. It is routed
/// to again as soon as it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_passed_over_fast_and_without_another_the_answer_is_503_at_once() {
    let up = integration_tests::upstream::BannerServer::start("alpha-upstream")
        .await
        .unwrap();
    // Pings every 500 ms; the connection itself is dropped only after a minute, so what this
    // test sees is the ping rule, not the HTTP/2 keepalive dropping the agent.
    let flags = [
        "--keepalive-interval",
        "500ms",
        "--keepalive-timeout",
        "60s",
        "--dial-timeout",
        "10s",
    ];
    // Two agents in front of the same upstream.
    let bed = Testbed::builder(&["alpha"])
        .server_args(&flags)
        .agent("alpha", up.addr)
        .agent("alpha", up.addr)
        .start()
        .await;
    let banner = integration_tests::client::banner_via;
    let (first, second) = (&bed.agents[0], &bed.agents[1]);

    first.proc.signal("STOP");
    // Interval + 1 s, with slack.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..10 {
        let started = Instant::now();
        assert_eq!(banner(bed.frontend(), "alpha").await, "alpha-upstream");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a CONNECT waited {:?}: sent to the silent agent?",
            started.elapsed()
        );
    }

    second.proc.signal("STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let reply = connect(bed.frontend(), "alpha:443").await.unwrap();
    let took = started.elapsed();
    let ConnectReply::Refused { status, body } = reply else {
        panic!("a tunnel through frozen agents")
    };
    eprintln!("no agent answering: {status} {body} after {took:?}");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("has not answered"), "{body}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(
        integration_tests::procs::metric(
            bed.server.admin_addr,
            r#"proxy_server_connections_total{cluster="alpha",result="agent_unresponsive"}"#
        )
        .await,
        1.0
    );

    first.proc.signal("CONT");
    second.proc.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let ConnectReply::Tunnel(_) = connect(bed.frontend(), "alpha:443").await.unwrap() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "thawed agents not routed to again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server that freezes (its TCP connection stays open, nothing is answered) is noticed by the
/// agent's own HTTP/2 pings: within the keepalive interval and timeout the agent drops that
/// tunnel, closes the upstream connections it carried, stops reporting ready, and registers
/// again once the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_drops_the_tunnel_of_a_server_that_stopped_answering() {
    let source = SourceServer::start().await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", source.addr)
        .agent_args(&[
            "--keepalive-interval",
            "300ms",
            "--keepalive-timeout",
            "300ms",
        ])
        .start()
        .await;
    let agent = bed.agents[0].admin_addr;
    let ready = || async move {
        integration_tests::procs::admin_get(agent, "/readyz")
            .await
            .is_ok_and(|(status, _)| status == 200)
    };
    let tunnel = integration_tests::client::streaming_tunnel(bed.frontend(), "alpha:443").await;
    let upstream = source.conns()[0].clone();

    bed.server.proc.signal("STOP");
    let frozen = Instant::now();
    let upstream_closed = wait_closed(&upstream, Duration::from_secs(5)).await;
    integration_tests::eventually(
        "the agent stops reporting ready",
        Duration::from_secs(5),
        || async move { !ready().await },
    )
    .await;
    let noticed = frozen.elapsed();
    eprintln!(
        "frozen server: upstream closed after {upstream_closed:?}, not ready after {noticed:?}"
    );
    // Interval + timeout is 0.6 s; TCP's own keepalive would take a minute.
    assert!(
        noticed < Duration::from_secs(3),
        "noticed after {noticed:?}"
    );

    bed.server.proc.signal("CONT");
    integration_tests::eventually("the agent registers again", Duration::from_secs(10), ready)
        .await;
    drop(tunnel);
}
