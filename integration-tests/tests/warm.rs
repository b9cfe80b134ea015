//! Warm connections: the agent dials its upstream ahead of demand, and a CONNECT that finds
//! one is answered at once, without a round trip to the agent; a warm connection that died is
//! never handed out, and the server bounds what an agent can make it hold.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use integration_tests::procs::{metric, metric_opt};
use integration_tests::{AgentProc, Bed, ServerProc, Testbed, connect, eventually, relay, rogue};
use proxy_proto::{Chunk, WARM_HEADER, server_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// An echo upstream that counts its connections and can close all it holds.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    close_all: std::sync::Mutex<CancellationToken>,
    /// Cancelled: the listener closes (new connections are refused), open ones stay.
    stop_accepting: CancellationToken,
    /// Cancelled once the listener is closed (see [`Echo::stop`]).
    stopped: CancellationToken,
}

impl Echo {
    async fn start() -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo = Arc::new(Self {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::default(),
            close_all: std::sync::Mutex::new(CancellationToken::new()),
            stop_accepting: CancellationToken::new(),
            stopped: CancellationToken::new(),
        });
        let me = echo.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = me.stop_accepting.cancelled() => break,
                    res = listener.accept() => res,
                };
                let Ok((mut s, _)) = accepted else { break };
                if me.stop_accepting.is_cancelled() {
                    // Accepted from the backlog as the stop came: refused like the rest.
                    break;
                }
                me.accepted.fetch_add(1, Ordering::SeqCst);
                let close = me.close_all.lock().unwrap().clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut r, &mut w) => {}
                        () = close.cancelled() => {}
                    }
                });
            }
            drop(listener);
            me.stopped.cancel();
        });
        echo
    }

    /// Closes the listener and returns once it is closed: from then on a dial is refused (a
    /// dial in between would otherwise land in the listen backlog and look like a success).
    async fn stop(&self) {
        self.stop_accepting.cancel();
        self.stopped.cancelled().await;
    }

    /// Closes every connection accepted so far.
    fn close_all(&self) {
        let mut token = self.close_all.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }
}

/// Bursts of four CONNECTs at once until the server (admin `admin`) holds `n` warm streams:
/// those that find no warm connection each make the agent want one more. (Only the misses
/// matter: the tunnels are dropped unused. On a loaded machine one burst may be served one by
/// one, hence more than one burst.)
async fn grow_warm_pool(admin: SocketAddr, frontend: SocketAddr, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(admin, "proxy_server_warm_streams").await < n as f64 {
        assert!(Instant::now() < deadline, "never {n} warm streams");
        let burst = tokio::join!(
            connect(frontend, "alpha:443"),
            connect(frontend, "alpha:443"),
            connect(frontend, "alpha:443"),
            connect(frontend, "alpha:443")
        );
        drop(burst);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn echo_once(s: &mut TcpStream) {
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
}

/// A CONNECT and the first echo through it: (time to `200`, time to the first response).
async fn timed_connect(frontend: SocketAddr) -> (Duration, Duration, TcpStream) {
    let started = Instant::now();
    let mut s = connect(frontend, "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let established = started.elapsed();
    echo_once(&mut s).await;
    (established, started.elapsed(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_a_wan_a_warm_connection_saves_the_dial_round_trip() {
    const ONE_WAY: Duration = Duration::from_millis(100);
    const RTT: Duration = Duration::from_millis(200);
    let bed = Bed::new(&["alpha"]);
    let up = Echo::start().await;
    let server = ServerProc::start(&bed.pki, None, &[]).await.unwrap();
    let wan = relay::start(server.agent_addr, ONE_WAY).await.unwrap();
    let agent = AgentProc::start_ready(&bed.pki, &[wan], "alpha", up.addr)
        .await
        .unwrap();
    let (s, a) = (server.admin_addr, agent.admin_addr);
    // An agent nobody has used keeps no upstream connection open.
    assert_eq!(metric(a, "proxy_agent_warm_connections").await, 0.0);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0);

    // The first CONNECT finds nothing warm: `200` waits for the dial, a round trip away.
    let (first_200, first_response, first) = timed_connect(server.frontend_addr).await;
    eprintln!("cold: 200 after {first_200:?}, first response after {first_response:?}");
    assert!(first_200 >= RTT, "{first_200:?}");
    assert!(first_response >= 2 * RTT, "{first_response:?}");
    drop(first);

    // That miss asked the agent for one warm connection.
    eventually(
        "a warm stream reaches the server",
        Duration::from_secs(5),
        || async { metric(s, "proxy_server_warm_streams").await == 1.0 },
    )
    .await;
    assert_eq!(metric(a, "proxy_agent_warm_connections").await, 1.0);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);

    // The next one is answered without a round trip to the agent; its first response takes
    // one round trip, not two.
    let (warm_200, warm_response, mut second) = timed_connect(server.frontend_addr).await;
    eprintln!("warm: 200 after {warm_200:?}, first response after {warm_response:?}");
    assert!(warm_200 < RTT / 2, "{warm_200:?}");
    assert!(warm_response < RTT + RTT / 2, "{warm_response:?}");
    echo_once(&mut second).await;
    assert_eq!(
        metric(s, "proxy_server_warm_connects_total").await,
        1.0,
        "the second CONNECT went through a warm stream"
    );
    assert_eq!(metric(a, "proxy_agent_warm_claimed_total").await, 1.0);
    assert_eq!(
        metric(
            s,
            r#"proxy_server_connections_total{cluster="alpha",result="ok"}"#
        )
        .await,
        2.0
    );
    // It was replaced at once: the next client is served warm too.
    eventually(
        "the warm connection is replaced",
        Duration::from_secs(5),
        || async { metric(s, "proxy_server_warm_streams").await == 1.0 },
    )
    .await;
    drop(second);

    // Draining: the server ends the agent's warm streams, so they neither hold the agent for
    // its grace period (30 s) nor stay open at the upstream.
    let mut agent = agent;
    agent.proc.signal("TERM");
    let exited = agent.proc.wait(Duration::from_secs(10)).await.unwrap();
    assert!(exited.success(), "{exited:?}");
    eventually("warm streams released", Duration::from_secs(5), || async {
        metric(s, "proxy_server_warm_streams").await == 0.0
    })
    .await;
}

/// An upstream that can no longer be dialed: its idle warm connections are closed too, so the
/// next client gets the dial's `502`, not a `200` on a connection made before the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upstream_dial_closes_the_idle_warm_connections() {
    let up = Echo::start().await;
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", up.addr)
        .start()
        .await;
    let (s, a) = (bed.server.admin_addr, bed.agents[0].admin_addr);
    let f = bed.frontend();
    grow_warm_pool(s, f, 2).await;

    // The upstream stops accepting; its open connections stay.
    up.stop().await;
    // The next client takes a warm one, which is still a real connection and works; or, if a
    // ping to the agent is overdue at that moment (a loaded machine), it is dialed for and gets
    // the dial's 502. Either way a dial of the upstream then fails: replacing the warm one, or
    // the client's own.
    match connect(f, "alpha:443").await.unwrap() {
        integration_tests::ConnectReply::Tunnel(mut third) => echo_once(&mut third).await,
        integration_tests::ConnectReply::Refused { status, body } => {
            assert_eq!(status, 502, "{body}")
        }
    }
    // The failed dial closes the other idle ones with it, and the server lets go of their
    // streams (at once when their end arrives, at the latest at its next ping's sweep).
    eventually(
        "the idle ones are flushed",
        Duration::from_secs(15),
        || async {
            metric_opt(
                a,
                r#"proxy_agent_warm_retired_total{reason="upstream_failed"}"#,
            )
            .await
            .is_some_and(|n| n >= 1.0)
                && metric(a, "proxy_agent_warm_connections").await == 0.0
                && metric(s, "proxy_server_warm_streams").await == 0.0
        },
    )
    .await;
    let warm_before = metric(s, "proxy_server_warm_connects_total").await;
    match connect(bed.frontend(), "alpha:443").await.unwrap() {
        integration_tests::ConnectReply::Refused { status, .. } => assert_eq!(status, 502),
        integration_tests::ConnectReply::Tunnel(_) => {
            panic!("a warm connection was handed out after the upstream failed")
        }
    }
    assert_eq!(
        metric(s, "proxy_server_warm_connects_total").await,
        warm_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_connection_the_upstream_closed_is_never_handed_out() {
    let up = Echo::start().await;
    // Pings (which also sweep dead warm streams) every 500 ms.
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--keepalive-interval", "500ms"])
        .agent("alpha", up.addr)
        .start()
        .await;
    let (s, a) = (bed.server.admin_addr, bed.agents[0].admin_addr);
    let (_, _, first) = timed_connect(bed.frontend()).await;
    drop(first);
    eventually(
        "a warm stream reaches the server",
        Duration::from_secs(5),
        || async { metric(s, "proxy_server_warm_streams").await == 1.0 },
    )
    .await;

    // The upstream closes its idle connection (as an API server does after its handshake
    // timeout): the agent notices, and the server stops counting it.
    up.close_all();
    eventually("the agent retires it", Duration::from_secs(5), || async {
        metric_opt(
            a,
            r#"proxy_agent_warm_retired_total{reason="upstream_closed"}"#,
        )
        .await
            == Some(1.0)
    })
    .await;
    eventually("the server drops it", Duration::from_secs(5), || async {
        metric(s, "proxy_server_warm_streams").await == 0.0
    })
    .await;
    // One fewer wanted: the agent does not redial an upstream that closes idle connections.
    assert_eq!(metric(a, "proxy_agent_warm_connections").await, 0.0);
    let accepted = up.accepted.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up.accepted.load(Ordering::SeqCst), accepted);

    // The next client is dialed for, and served.
    let (_, _, mut next) = timed_connect(bed.frontend()).await;
    echo_once(&mut next).await;
    assert_eq!(metric(s, "proxy_server_warm_connects_total").await, 0.0);
}

/// A client that sends its first bytes right behind its CONNECT (they reach the server as the
/// warm stream is handed out) gets every one of them through, on every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pipelined_behind_the_connect_cross_a_warm_connection_intact() {
    let up = Echo::start().await;
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", up.addr)
        .start()
        .await;
    let s = bed.server.admin_addr;
    const CONNECTIONS: usize = 200;
    for i in 0..CONNECTIONS {
        let mut client = TcpStream::connect(bed.frontend()).await.unwrap();
        let payload = format!("request {i}");
        let head = format!("CONNECT alpha:443 HTTP/1.1\r\nHost: alpha:443\r\n\r\n{payload}");
        client.write_all(head.as_bytes()).await.unwrap();
        let expected = format!("HTTP/1.1 200 Connection established\r\n\r\n{payload}");
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got))
            .await
            .unwrap_or_else(|_| {
                panic!("connection {i}: the echo of the pipelined bytes never came")
            })
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&got), expected, "connection {i}");
    }
    let warm = metric(s, "proxy_server_warm_connects_total").await;
    assert!(
        warm >= (CONNECTIONS / 2) as f64,
        "only {warm} of {CONNECTIONS} connections were warm: the test did not test warm ones"
    );
}

fn warm_request(
    chunks: Vec<Chunk>,
) -> (
    tonic::Request<ReceiverStream<Chunk>>,
    tokio::sync::mpsc::Sender<Chunk>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for c in chunks {
        tx.try_send(c).unwrap();
    }
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert(
        WARM_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    (req, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_make_the_server_hold_more_warm_streams_than_the_bound() {
    let bed = Testbed::builder(&["alpha", "beta"]).start().await;
    let s = bed.server.admin_addr;

    // Not registered on this connection: refused.
    let mut stranger = rogue::client(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let (req, _keep) = warm_request(vec![]);
    let err = stranger.data(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let mut rogue = rogue::client(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let (keep_control, mut control) =
        rogue::control(&mut rogue, vec![rogue::register("beta", "rogue")])
            .await
            .unwrap();
    let registered = control.message().await.unwrap().unwrap();
    match registered.msg {
        Some(server_message::Msg::Registered(r)) => {
            assert!(r.features.iter().any(|f| f == proxy_proto::FEATURE_WARM));
        }
        other => panic!("{other:?}"),
    }
    let bound = proxy_server::registry::MAX_WARM_PER_AGENT;
    let mut held = Vec::new();
    for _ in 0..bound {
        let (req, tx) = warm_request(vec![]);
        let resp = rogue.data(req).await.unwrap();
        held.push((tx, resp.into_inner()));
    }
    assert_eq!(metric(s, "proxy_server_warm_streams").await, bound as f64);
    let (req, _tx) = warm_request(vec![]);
    let err = rogue.data(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(metric(s, "proxy_server_warm_streams").await, bound as f64);

    // The agent leaves: nothing of its warm streams stays behind.
    drop(held);
    drop(keep_control);
    drop(control);
    drop(rogue);
    eventually("warm streams released", Duration::from_secs(5), || async {
        metric(s, "proxy_server_warm_streams").await == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_stream_that_speaks_before_it_is_handed_out_is_never_used() {
    let bed = Testbed::builder(&["beta"])
        .server_args(&["--dial-timeout", "2s"])
        .start()
        .await;
    let mut rogue = rogue::client(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let (_keep, mut control) = rogue::control(&mut rogue, vec![rogue::register("beta", "rogue")])
        .await
        .unwrap();
    control.message().await.unwrap().unwrap();
    // Bytes the client never asked for, sent before the stream was handed out.
    let early = Chunk {
        data: bytes::Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\nforged"),
        ..Chunk::default()
    };
    let (req, _tx) = warm_request(vec![early]);
    let _warm = rogue.data(req).await.unwrap().into_inner();
    eventually(
        "the warm stream is held",
        Duration::from_secs(5),
        || async { metric(bed.server.admin_addr, "proxy_server_warm_streams").await == 1.0 },
    )
    .await;
    // Give the forged bytes time to arrive before the CONNECT looks at the stream.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The CONNECT is sent to the dial path: the rogue gets a dial request, not the client's
    // connection, and the client gets the dial's verdict (a timeout), not the forged bytes.
    let client = tokio::spawn(connect(bed.frontend(), "beta:443"));
    let dial = tokio::time::timeout(Duration::from_secs(5), control.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(dial.msg, Some(server_message::Msg::Dial(_))),
        "{dial:?}"
    );
    match client.await.unwrap().unwrap() {
        integration_tests::ConnectReply::Refused { status, .. } => assert_eq!(status, 504),
        integration_tests::ConnectReply::Tunnel(_) => panic!("a warm stream that spoke was used"),
    }
    assert_eq!(
        metric(bed.server.admin_addr, "proxy_server_warm_connects_total").await,
        0.0
    );
}

/// Sockets on this machine still dialing `to` (TCP state SYN-SENT), from `/proc/net/tcp`.
fn dialing(to: SocketAddr) -> usize {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    // The kernel writes the address as the hex of its bytes in memory, the port as hex.
    let remote = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(to.ip().octets()),
        to.port()
    );
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&"02")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_connections_handed_out_together_are_replaced_side_by_side() {
    let up = Echo::start().await;
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", up.addr)
        .start()
        .await;
    let s = bed.server.admin_addr;
    let f = bed.frontend();
    grow_warm_pool(s, f, 4).await;
    // Every refill is done (a dial under way now would hang below and count).
    eventually("no dial under way", Duration::from_secs(5), || async {
        dialing(up.addr) == 0
    })
    .await;
    // From now on a dial of the upstream hangs in SYN-SENT, so each one under way is seen.
    let _hole = integration_tests::blackhole::Blackhole::to(up.addr);
    let warm_before = metric(s, "proxy_server_warm_connects_total").await;
    // Four clients at once, each given a warm connection (answered at once: a client sent down
    // the dial path would hang, and make the count below prove nothing).
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(tokio::time::timeout(
                Duration::from_secs(30),
                connect(f, "alpha:443"),
            ))
        })
        .collect();
    eventually(
        "all four clients served from the warm pool",
        Duration::from_secs(10),
        || async { metric(s, "proxy_server_warm_connects_total").await >= warm_before + 4.0 },
    )
    .await;
    // Their replacements: one after another, one dial would be under way; side by side, four.
    eventually(
        "four dials of the upstream under way at once",
        Duration::from_secs(10),
        || async { dialing(up.addr) >= 4 },
    )
    .await;
    drop(clients);
}

/// An agent with `warm_head_at_start` gets no answer to a warm stream while the server holds
/// it: the head comes when a CONNECT takes the stream, followed by `start` (one write to the
/// agent instead of two); a refusal still comes at once, as a head with its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_streams_head_comes_with_its_start_for_an_agent_that_asks() {
    let bed = Testbed::builder(&["beta"]).start().await;
    let s = bed.server.admin_addr;

    // Unregistered on this connection, feature or not: refused in the head, at once.
    let mut stranger = rogue::client(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let (req, _keep) = warm_request(vec![]);
    let err = tokio::time::timeout(Duration::from_secs(5), stranger.data(req))
        .await
        .expect("a refusal waits for nothing")
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let mut rogue = rogue::client(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let mut register = rogue::register("beta", "rogue");
    if let Some(proxy_proto::agent_message::Msg::Register(r)) = &mut register.msg {
        r.features = vec![proxy_proto::FEATURE_WARM_HEAD_AT_START.to_owned()];
    }
    let (_keep_control, mut control) = rogue::control(&mut rogue, vec![register]).await.unwrap();
    control.message().await.unwrap().unwrap();

    let (req, tx) = warm_request(vec![]);
    let mut offer = {
        let mut rogue = rogue.clone();
        tokio::spawn(async move { rogue.data(req).await })
    };
    eventually(
        "the warm stream is held",
        Duration::from_secs(5),
        || async { metric(s, "proxy_server_warm_streams").await == 1.0 },
    )
    .await;
    // Held, and not answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !offer.is_finished(),
        "the head came before the stream was handed out"
    );

    // A CONNECT takes it: the head arrives, then `start`, and bytes flow both ways.
    let frontend = bed.frontend();
    let client = tokio::spawn(async move {
        let mut t = connect(frontend, "beta:443")
            .await
            .unwrap()
            .tunnel()
            .unwrap();
        t.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 5];
        t.read_exact(&mut back).await.unwrap();
        back
    });
    let mut inbound = tokio::time::timeout(Duration::from_secs(5), &mut offer)
        .await
        .expect("the head comes once the stream is handed out")
        .unwrap()
        .expect("accepted")
        .into_inner();
    let first = inbound.message().await.unwrap().unwrap();
    assert!(first.start, "the first message is start: {first:?}");
    let mut got = Vec::new();
    while got.len() < 4 {
        let chunk = inbound.message().await.unwrap().unwrap();
        got.extend_from_slice(&chunk.data);
    }
    assert_eq!(got, b"ping");
    tx.send(Chunk {
        data: bytes::Bytes::from_static(b"hello"),
        ..Chunk::default()
    })
    .await
    .unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), client)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"hello");
    assert_eq!(metric(s, "proxy_server_warm_connects_total").await, 1.0);
}

/// When an agent drains, the server lets go of its warm streams unanswered (the real agent takes
/// the head with `start`): the agent reads that as the server ending them, not as a refusal, and
/// closes its idle warm connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agents_idle_warm_connections_end_as_the_server_lets_go() {
    let up = Echo::start().await;
    let mut bed = Testbed::builder(&["alpha"])
        .agent("alpha", up.addr)
        .start()
        .await;
    let (s, a, f) = (
        bed.server.admin_addr,
        bed.agents[0].admin_addr,
        bed.frontend(),
    );
    grow_warm_pool(s, f, 2).await;
    let idle = metric(s, "proxy_server_warm_streams").await;
    // An open connection keeps the draining agent (and its metrics) up.
    let mut held = connect(f, "alpha:443").await.unwrap().tunnel().unwrap();
    echo_once(&mut held).await;
    eventually("the pool is refilled", Duration::from_secs(5), || async {
        metric(s, "proxy_server_warm_streams").await >= idle
    })
    .await;
    let idle = metric(s, "proxy_server_warm_streams").await;

    bed.agents[0].proc.signal("TERM");
    eventually(
        "the idle warm connections end as ended by the server",
        Duration::from_secs(5),
        || async {
            metric_opt(
                a,
                r#"proxy_agent_warm_retired_total{reason="server_ended"}"#,
            )
            .await
            .is_some_and(|n| n >= idle)
                && metric(a, "proxy_agent_warm_connections").await == 0.0
        },
    )
    .await;
    assert_eq!(metric(s, "proxy_server_warm_streams").await, 0.0);
    // The held connection still works, and once it ends the agent exits.
    echo_once(&mut held).await;
    drop(held);
    let status = bed.agents[0]
        .proc
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(status.success(), "agent exit status {status}");
}
