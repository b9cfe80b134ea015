//! Every frontend limit attacked, and the server still serving others afterwards.

use std::time::{Duration, Instant};

use integration_tests::procs::metric;
use integration_tests::{Bed, ConnectReply, ServerProc, Testbed, connect};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use integration_tests::client::{banner_via, raw_exchange as raw};

/// The server still tunnels to alpha.
async fn still_serving(server: &ServerProc) {
    assert_eq!(
        banner_via(server.frontend_addr, "alpha").await,
        "alpha-upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_slow_heads_are_cut_off() {
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--max-head-bytes", "1024", "--handshake-timeout", "500ms"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let big = format!(
        "CONNECT alpha:443 HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(4096)
    );
    let answer = raw(bed.frontend(), big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    // A head that never ends, sent a byte at a time (slowloris).
    let mut slow = TcpStream::connect(bed.frontend()).await.unwrap();
    let started = Instant::now();
    for b in b"CONNECT alpha:443 HTTP/1.1\r\nX-Slow: " {
        if slow.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        if started.elapsed() > Duration::from_millis(600) {
            break;
        }
    }
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "slow client held on for {:?}",
        started.elapsed()
    );
    let admin = bed.server.admin_addr;
    assert_eq!(
        metric(
            admin,
            r#"proxy_server_connections_total{cluster="",result="bad_request"}"#
        )
        .await,
        2.0
    );
    still_serving(&bed.server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_bytes_after_the_connect_head_reach_the_upstream() {
    let bed = Testbed::builder(&["alpha"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let mut s = TcpStream::connect(bed.frontend()).await.unwrap();
    // Head and first payload in one write, as clients that do not wait for 200 send them.
    s.write_all(b"CONNECT alpha:443 HTTP/1.1\r\n\r\nhello upstream\n")
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    r.read_line(&mut line).await.unwrap(); // blank line ending the head
    line.clear();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "alpha-upstream");
    line.clear();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "hello upstream", "pipelined bytes lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_with_503_and_count_it() {
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--max-connections-per-cluster", "3"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            connect(bed.frontend(), "alpha:443")
                .await
                .unwrap()
                .tunnel()
                .unwrap(),
        );
    }
    match connect(bed.frontend(), "alpha:443").await.unwrap() {
        ConnectReply::Refused { status, body } => {
            assert_eq!(status, 503);
            assert!(body.contains("limit of 3"), "{body}");
        }
        ConnectReply::Tunnel(_) => panic!("per-cluster limit not enforced"),
    }
    let admin = bed.server.admin_addr;
    assert_eq!(
        metric(
            admin,
            r#"proxy_server_connections_total{cluster="alpha",result="limited"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(admin, r#"proxy_server_connections_active{cluster="alpha"}"#).await,
        3.0
    );
    // Closing one frees its slot.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let ConnectReply::Tunnel(t) = connect(bed.frontend(), "alpha:443").await.unwrap() {
            open.push(t);
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(admin, r#"proxy_server_connections_active{cluster="alpha"}"#).await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "connections_active never returned to 0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    still_serving(&bed.server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_connection_limit_spans_clusters() {
    let bed = Testbed::builder(&["alpha", "beta"])
        .server_args(&["--max-connections", "2"])
        .banner_agent("alpha", "alpha-upstream")
        .banner_agent("beta", "beta-upstream")
        .start()
        .await;
    let _one = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let _two = connect(bed.frontend(), "beta:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    match connect(bed.frontend(), "beta:443").await.unwrap() {
        ConnectReply::Refused { status, body } => assert!(
            status == 503 && body.contains("limit of 2 open connections"),
            "{body}"
        ),
        ConnectReply::Tunnel(_) => panic!("total limit not enforced"),
    }
    assert_eq!(
        metric(
            bed.server.admin_addr,
            r#"proxy_server_connections_total{cluster="beta",result="limited"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_are_bounded_and_leave_nothing_behind() {
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--max-pending-dials", "2", "--dial-timeout", "2s"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let agent = &bed.agents[0];
    // A frozen agent never answers: dials pile up until the limit.
    agent.proc.signal("STOP");
    let frontend = bed.frontend();
    let waiting: Vec<_> = (0..2)
        .map(|_| tokio::spawn(connect(frontend, "alpha:443")))
        .collect();
    // Let both register as pending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let third = connect(frontend, "alpha:443").await.unwrap();
    match third {
        ConnectReply::Refused { status, body } => {
            assert_eq!(status, 503);
            assert!(body.contains("dials in progress"), "{body}");
        }
        ConnectReply::Tunnel(_) => panic!("pending dial limit not enforced"),
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(
        metric(bed.server.admin_addr, "proxy_server_pending_dials").await,
        2.0
    );
    for w in waiting {
        match w.await.unwrap().unwrap() {
            ConnectReply::Refused { status, .. } => assert_eq!(status, 504),
            ConnectReply::Tunnel(_) => panic!("frozen agent answered"),
        }
    }
    agent.proc.signal("CONT");
    // Timed-out dials were forgotten: the limit admits new ones again.
    assert_eq!(
        metric(bed.server.admin_addr, "proxy_server_pending_dials").await,
        0.0
    );
    still_serving(&bed.server).await;
    still_serving(&bed.server).await;
    still_serving(&bed.server).await;
}

/// CPU time (user + system) of a process so far, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    // Clock ticks: 100 per second on Linux.
    Duration::from_millis((f[0] + f[1]) * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_admin_listener_backs_off_instead_of_spinning() {
    let bed = Bed::new(&["alpha"]);
    // A server with 64 descriptors, filled up with idle admin connections: accept() then fails
    // with EMFILE while a connection waits in the backlog.
    let server = ServerProc::start_wrapped(&bed.pki, &[], |bin, args| {
        let mut wrapped = vec!["--nofile=64:64".to_owned(), bin.display().to_string()];
        wrapped.extend(args.iter().cloned());
        (std::path::PathBuf::from("prlimit"), wrapped)
    })
    .await
    .unwrap();
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(server.admin_addr),
        )
        .await
        {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = server.proc.pid();
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_time(pid) - before;
    eprintln!("out of descriptors, 2 s: {used:?} of CPU");
    assert!(
        server.proc.logs().contains("admin accept failed"),
        "never ran out of descriptors:\n{}",
        server.proc.logs()
    );
    assert!(
        used < Duration::from_millis(500),
        "spinning: {used:?} of CPU in 2 s"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_certificate_cannot_open_more_agents_than_the_cap() {
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--max-agents-per-cluster", "2"])
        .banner_agent("alpha", "alpha-upstream")
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let upstream = integration_tests::upstream::BannerServer::start("alpha-upstream")
        .await
        .unwrap();
    let third = integration_tests::AgentProc::start(
        bed.pki(),
        &[bed.server.agent_addr],
        "alpha",
        upstream.addr,
        &[],
    )
    .await
    .unwrap();
    // The refusal names the limit, in the agent's own log.
    let logs = third.proc.logs_with("--max-agents-per-cluster", 1).await;
    assert!(
        logs.contains("already has 2 agents connected to this server"),
        "{logs}"
    );
    assert!(
        third
            .wait_registered(std::time::Duration::from_millis(300))
            .await
            .is_err()
    );
    let series = r#"proxy_server_agents{cluster="alpha"}"#;
    assert_eq!(metric(bed.server.admin_addr, series).await, 2.0);
    // The first two still carry the cluster.
    assert_eq!(
        integration_tests::client::banner_via(bed.frontend(), "alpha").await,
        "alpha-upstream"
    );
}
