//! The agent dials only its upstream and the destinations it was explicitly allowed, whatever a
//! (compromised) server asks: driven by a fake server that sends hostile dial requests. And the
//! real path: a client names a destination with `Proxy-Destination`, the real server passes it
//! on, the real agent dials it only if allowed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use integration_tests::upstream::BannerServer;
use integration_tests::{AgentProc, Bed, Testbed};
use proxy_proto::tunnel_server::{Tunnel, TunnelServer};
use proxy_proto::{
    AgentMessage, Chunk, DIAL_ID_HEADER, DialRequest, Registered, ServerMessage, agent_message,
    server_message,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// What the fake server saw.
#[derive(Debug)]
enum Seen {
    /// A `DialFailed`: its id, reason and `not_allowed`.
    Failed(u64, String, bool),
    Data(u64, Vec<u8>),
}

struct FakeServer {
    dials: Vec<DialRequest>,
    seen: mpsc::Sender<Seen>,
}

type Out<T> = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Tunnel for FakeServer {
    type ControlStream = Out<ServerMessage>;
    type DataStream = Out<Chunk>;

    async fn control(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let mut inbound = req.into_inner();
        inbound.message().await?; // the registration
        let mut out = vec![ServerMessage {
            msg: Some(server_message::Msg::Registered(Registered {
                server_id: "fake".into(),
                server_count: 1,
                // No warm streams: this fake server sees only dials.
                features: Vec::new(),
            })),
        }];
        out.extend(self.dials.iter().map(|d| ServerMessage {
            msg: Some(server_message::Msg::Dial(d.clone())),
        }));
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(agent_message::Msg::DialFailed(f)) = m.msg {
                    let _ = seen
                        .send(Seen::Failed(f.dial_id, f.reason, f.not_allowed))
                        .await;
                }
            }
        });
        // Keep the control stream open after the dial requests.
        let stream = futures_util::stream::iter(out.into_iter().map(Ok))
            .chain(futures_util::stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn data(
        &self,
        req: Request<Streaming<Chunk>>,
    ) -> Result<Response<Self::DataStream>, Status> {
        let id: u64 = req
            .metadata()
            .get(DIAL_ID_HEADER)
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut inbound = req.into_inner();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let mut first = Vec::new();
            if let Ok(Some(c)) = inbound.message().await {
                first.extend_from_slice(&c.data);
            }
            let _ = seen.send(Seen::Data(id, first)).await;
        });
        Ok(Response::new(Box::pin(futures_util::stream::pending())))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_destinations_it_was_not_given() {
    let bed = Bed::new(&["alpha"]);
    let upstream = BannerServer::start("upstream").await.unwrap();
    let allowed = BannerServer::start("allowed").await.unwrap();
    // A listener the server will name but the agent must never connect to.
    let forbidden = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forbidden_addr = forbidden.local_addr().unwrap();
    let forbidden_hits = Arc::new(AtomicUsize::new(0));
    let hits = forbidden_hits.clone();
    tokio::spawn(async move {
        while forbidden.accept().await.is_ok() {
            hits.fetch_add(1, Ordering::SeqCst);
        }
    });

    let dial = |dial_id: u64, destination: String| DialRequest {
        dial_id,
        destination,
    };
    let dials = vec![
        dial(1, String::new()),
        dial(2, forbidden_addr.to_string()),
        dial(3, allowed.addr.to_string()),
        dial(4, "kubernetes.default.svc.evil.example:443".into()),
        dial(5, format!("{}.", allowed.addr.ip())), // near-miss spelling
    ];
    let (seen_tx, mut seen_rx) = mpsc::channel(16);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pki = bed.pki.clone();
    let tls = proxy_common::reload::Reloadable::load("fake server TLS", vec![], move || {
        proxy_common::tls::mtls_server_config(
            &proxy_common::tls::CertKeyPaths {
                cert: pki.server_cert(),
                key: pki.server_key(),
            },
            &pki.agent_ca(),
        )
    })
    .unwrap();
    let shutdown = CancellationToken::new();
    let incoming = proxy_server::listener::incoming(
        proxy_server::listener::AgentListener {
            listener,
            tls,
            handshake_timeout: Duration::from_secs(5),
            keepalive: None,
            gate: proxy_common::gate::Gate::new(proxy_common::gate::DEFAULT_CAP),
            limited: || {},
            tasks: tokio_util::task::TaskTracker::new(),
            // Handshakes on this test's runtime: its relays copy the TLS streams here.
            shards: std::sync::Arc::new(proxy_server::shards::Shards::start(0).unwrap()),
            joins: None,
        },
        shutdown.clone(),
        shutdown.clone(),
    );
    let service = FakeServer {
        dials,
        seen: seen_tx,
    };
    // tonic serves in-memory pipes; each is relayed to an agent's TLS connection.
    let incoming = tokio_stream::wrappers::ReceiverStream::new(incoming).map(|io| {
        let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
        let mut tls = io.tls;
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut ours).await;
        });
        Ok::<_, std::io::Error>(theirs)
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TunnelServer::new(service))
            .serve_with_incoming(incoming),
    );

    let allow = format!("--allow-destination={}", allowed.addr);
    let agent = AgentProc::start(&bed.pki, &[addr], "alpha", upstream.addr, &[&allow])
        .await
        .unwrap();
    let mut failed = std::collections::BTreeMap::new();
    let mut data = std::collections::BTreeMap::new();
    while failed.len() + data.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(10), seen_rx.recv()).await {
            Ok(Some(Seen::Failed(id, reason, not_allowed))) => {
                // Told apart from a failed dial, so the server answers 403, not 502.
                assert!(
                    not_allowed,
                    "dial {id} refused without not_allowed: {reason}"
                );
                failed.insert(id, reason);
            }
            Ok(Some(Seen::Data(id, first))) => {
                data.insert(id, String::from_utf8_lossy(&first).into_owned());
            }
            other => panic!(
                "fake server saw {other:?}; failed {failed:?} data {data:?}\n{}",
                agent.proc.logs()
            ),
        }
    }
    assert_eq!(data.get(&1).map(|s| s.trim()), Some("upstream"), "{data:?}");
    assert_eq!(data.get(&3).map(|s| s.trim()), Some("allowed"), "{data:?}");
    for id in [2, 4, 5] {
        let reason = failed
            .get(&id)
            .unwrap_or_else(|| panic!("dial {id} not refused: {failed:?} {data:?}"));
        assert!(reason.contains("is not allowed by this agent"), "{reason}");
    }
    assert_eq!(
        forbidden_hits.load(Ordering::SeqCst),
        0,
        "agent connected to a destination it was not given"
    );
    let logs = agent.proc.logs_with("upstream dial failed", 1).await;
    assert!(logs.contains("upstream dial failed"), "{logs}");
    shutdown.cancel();
}

/// An HTTP upstream that answers every request `200` with its `name` and the request head it
/// received, so a test sees which upstream a tunnel reached and exactly what arrived there.
async fn head_echo(name: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("{name}\n{}", String::from_utf8_lossy(&head));
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// A client names a destination other than the API server with `Proxy-Destination`; the real
/// server passes it to the cluster's agent, which dials it only if it was allowed. curl reaches
/// the allowed one (never through a warm stream, which leads to the upstream) and nothing of
/// the header reaches it; a destination the agent refuses is a `403` whose body names neither
/// the agent's allow-list nor its configuration (the agent's reason goes to the server's log),
/// counted by both; a malformed one is the server's `400`, never sent to the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reach_the_destinations_their_cluster_agent_was_allowed() {
    let upstream = head_echo("upstream").await;
    let metrics = head_echo("metrics").await;
    let forbidden = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forbidden_addr = forbidden.local_addr().unwrap();
    let forbidden_hits = Arc::new(AtomicUsize::new(0));
    let hits = forbidden_hits.clone();
    tokio::spawn(async move {
        while forbidden.accept().await.is_ok() {
            hits.fetch_add(1, Ordering::SeqCst);
        }
    });
    let allow = format!("--allow-destination={metrics}");
    // Warm connections on (the default): once a client found none, the agent keeps an upstream
    // connection ready, and a CONNECT naming a destination must not be handed it.
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", upstream)
        .agent_args(&[&allow])
        .start()
        .await;
    let admin = bed.server.admin_addr;
    let proxy = format!("http://{}", bed.frontend());
    let curl = |destination: Option<&str>| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "10",
            "--proxytunnel",
            "--proxy",
            &proxy,
        ]);
        if let Some(d) = destination {
            cmd.args(["--proxy-header", &format!("Proxy-Destination: {d}")]);
        }
        let out = cmd.arg("http://alpha:443/metrics").output().expect("curl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = curl(None);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("upstream\n"), "{out}");
    integration_tests::eventually("a warm stream ready", Duration::from_secs(10), || async {
        integration_tests::procs::metric(admin, "proxy_server_warm_streams").await > 0.0
    })
    .await;
    for _ in 0..3 {
        let (code, out, err) = curl(Some(&metrics.to_string()));
        assert_eq!(code, Some(0), "{err}");
        assert!(
            out.starts_with("metrics\nGET /metrics HTTP/1.1\r\n"),
            "{out}"
        );
        assert!(
            !out.to_ascii_lowercase().contains("proxy-"),
            "a proxy header reached the destination: {out}"
        );
    }
    // curl reports a refused CONNECT as exit 56 with the status.
    let (code, out, err) = curl(Some(&forbidden_addr.to_string()));
    assert_eq!(code, Some(56), "{out} {err}");
    assert!(err.contains("403"), "{err}");
    // The body, which curl does not show: generic. The agent's reason names what it may dial
    // (its allow-list), which the client must not learn; it is in the server's log instead.
    let answer = integration_tests::client::raw_exchange(
        bed.frontend(),
        format!("CONNECT alpha:443 HTTP/1.1\r\nProxy-Destination: {forbidden_addr}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\ndestination not allowed for cluster \"alpha\"\n"),
        "{answer}"
    );
    for leak in [
        metrics.to_string(),
        metrics.port().to_string(),
        "agent".to_owned(),
        "--allow-destination".to_owned(),
    ] {
        assert!(!answer.contains(&leak), "{leak:?} in {answer}");
    }
    let logs = bed
        .server
        .proc
        .logs_with("agent refused the destination", 2)
        .await;
    assert!(
        logs.lines()
            .any(|l| l.contains("agent refused the destination")
                && l.contains(&format!(
                    "\"{forbidden_addr}\" is not allowed by this agent"
                ))),
        "{logs}"
    );
    let series =
        r#"proxy_server_connections_total{cluster="alpha",result="destination_forbidden"}"#;
    assert_eq!(integration_tests::procs::metric(admin, series).await, 2.0);
    let agent_admin = bed.agents[0].admin_addr;
    let refused = r#"proxy_agent_upstream_dial_failures_total{reason="not_allowed"}"#;
    assert_eq!(
        integration_tests::procs::metric(agent_admin, refused).await,
        2.0
    );

    // Malformed: refused by the server itself, naming the header; the agent never hears of it.
    for bad in ["nope", "a/b:80", "host:0"] {
        let answer = integration_tests::client::raw_exchange(
            bed.frontend(),
            format!("CONNECT alpha:443 HTTP/1.1\r\nProxy-Destination: {bad}\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad}: {answer}");
        assert!(answer.contains("Proxy-Destination"), "{bad}: {answer}");
    }
    assert_eq!(
        integration_tests::procs::metric(agent_admin, refused).await,
        2.0
    );
    assert_eq!(
        forbidden_hits.load(Ordering::SeqCst),
        0,
        "the agent connected to a destination it was not given"
    );
    // And the cluster still reaches its API server by default.
    let (code, out, err) = curl(None);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("upstream\n"), "{out}");
}
