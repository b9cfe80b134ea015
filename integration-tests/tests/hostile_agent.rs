//! Agents that send nonsense lose only that stream or their own registration, never the
//! server, and can never take over another agent's connections.

use std::time::{Duration, Instant};

use bytes::Bytes;
use integration_tests::client::banner_via;
use integration_tests::rogue;
use integration_tests::upstream::BannerServer;
use integration_tests::{ConnectReply, ServerProc, Testbed, connect};
use proxy_proto::{AgentMessage, Chunk, DIAL_ID_HEADER, DialFailed, agent_message, server_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

async fn alpha_still_served(server: &ServerProc) {
    assert_eq!(
        banner_via(server.frontend_addr, "alpha").await,
        "alpha-upstream"
    );
}

fn data_request(dial_id: &str, chunks: Vec<Chunk>) -> tonic::Request<ReceiverStream<Chunk>> {
    let (tx, rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
    for c in chunks {
        tx.try_send(c).unwrap();
    }
    // Keep the stream open so the server's answer, not our end of stream, decides.
    std::mem::forget(tx);
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert(DIAL_ID_HEADER, dial_id.parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_foreign_dial_ids_are_refused_and_cannot_hijack_a_connection() {
    // beta's certificate is the rogue's: it has no agent.
    let bed = Testbed::builder(&["alpha", "beta"])
        .server_args(&["--dial-timeout", "2s"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let alpha = &bed.agents[0];
    let mut rogue = rogue::client(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let (_keep, mut control) = rogue::control(&mut rogue, vec![rogue::register("beta", "rogue")])
        .await
        .unwrap();
    assert!(matches!(
        control.message().await.unwrap().unwrap().msg,
        Some(server_message::Msg::Registered(_))
    ));

    // A dial for alpha stays pending while alpha's agent is frozen; the rogue (beta) tries
    // every plausible dial id for it.
    alpha.proc.signal("STOP");
    let frontend = bed.frontend();
    let victim = tokio::spawn(connect(frontend, "alpha:443"));
    // Until the dial is pending the rogue's guesses would be refused for want of any dial,
    // proving nothing.
    let admin = bed.server.admin_addr;
    integration_tests::eventually(
        "alpha's dial pending",
        Duration::from_secs(2),
        || async move {
            integration_tests::procs::metric(admin, "proxy_server_pending_dials").await >= 1.0
        },
    )
    .await;
    for id in 0..64 {
        let err = rogue
            .data(data_request(&id.to_string(), vec![]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "dial {id}: {err:?}");
    }
    for bad in ["", "x", "-1", "99999999999999999999999"] {
        let err = rogue.data(data_request(bad, vec![])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    match victim.await.unwrap().unwrap() {
        ConnectReply::Refused { status, .. } => assert_eq!(status, 504),
        ConnectReply::Tunnel(_) => panic!("a foreign agent answered alpha's dial"),
    }
    alpha.proc.signal("CONT");
    alpha_still_served(&bed.server).await;

    // The rogue kept its own registration: beta's dials still reach it.
    let beta = tokio::spawn(connect(frontend, "beta:443"));
    let dial = tokio::time::timeout(Duration::from_secs(5), control.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(dial.msg, Some(server_message::Msg::Dial(_))),
        "{dial:?}"
    );
    drop(control);
    drop(_keep);
    let _ = beta.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_control_messages_cost_only_that_registration() {
    let bed = Testbed::builder(&["alpha", "beta"])
        .server_args(&["--agent-wait", "0s"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let mut rogue = rogue::client(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();

    // A dial failure before registering.
    let failed = AgentMessage {
        msg: Some(agent_message::Msg::DialFailed(DialFailed {
            dial_id: 1,
            reason: "x".into(),
            not_allowed: false,
        })),
    };
    let err = rogue::control(&mut rogue, vec![failed.clone()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // An empty message.
    let err = rogue::control(&mut rogue, vec![AgentMessage { msg: None }])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // An oversized registration.
    let err = rogue::control(
        &mut rogue,
        vec![rogue::register("beta", &"x".repeat(1 << 20))],
    )
    .await
    .unwrap_err();
    // Over the 256 KiB message limit: refused by the decoder before any field is looked at.
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("message length too large"),
        "{err:?}"
    );

    // Registered, then registering again: the server drops this registration.
    let (tx, mut control) = rogue::control(&mut rogue, vec![rogue::register("beta", "rogue")])
        .await
        .unwrap();
    control.message().await.unwrap().unwrap();
    tx.send(rogue::register("beta", "again")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let ConnectReply::Refused { status: 503, .. } =
            connect(bed.frontend(), "beta:443").await.unwrap()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "second registration did not end the first"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second control stream on the same connection while the first is registered.
    let (_tx_first, mut first) = rogue::control(&mut rogue, vec![rogue::register("beta", "first")])
        .await
        .unwrap();
    first.message().await.unwrap().unwrap();
    let err = rogue::control(&mut rogue, vec![rogue::register("beta", "second")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    drop(first);
    drop(_tx_first);
    // A dial failure for a dial it was never asked: ignored, nothing else happens. (The
    // server frees the connection's registration once it sees the first stream end, which
    // takes a moment: until then a new one is refused as above.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let (tx, mut control) = loop {
        match rogue::control(&mut rogue, vec![rogue::register("beta", "rogue2")]).await {
            Ok(stream) => break stream,
            Err(err) if err.code() == Code::AlreadyExists && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("the ended stream's registration was not freed: {err:?}"),
        }
    };
    control.message().await.unwrap().unwrap();
    tx.send(failed).await.unwrap();
    alpha_still_served(&bed.server).await;
    let logs = bed.server.proc.logs_with("protocol violation", 1).await;
    assert!(logs.contains("protocol violation"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_data_message_loses_only_its_own_connection() {
    let bed = Testbed::builder(&["alpha", "beta"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let mut rogue = rogue::client(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let (_keep, mut control) = rogue::control(&mut rogue, vec![rogue::register("beta", "rogue")])
        .await
        .unwrap();
    control.message().await.unwrap().unwrap();

    let frontend = bed.frontend();
    let client = tokio::spawn(async move {
        let mut tunnel = connect(frontend, "beta:443")
            .await
            .unwrap()
            .tunnel()
            .unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut got))
            .await
            .expect("tunnel not closed");
        got
    });
    let Some(server_message::Msg::Dial(dial)) = control.message().await.unwrap().unwrap().msg
    else {
        panic!("expected a dial");
    };
    // A first small chunk, then one far over the message limit.
    let chunks = vec![
        Chunk {
            data: Bytes::from_static(b"hello"),
            ..Chunk::default()
        },
        Chunk {
            data: Bytes::from(vec![7u8; 1 << 20]),
            ..Chunk::default()
        },
    ];
    let resp = rogue
        .data(data_request(&dial.dial_id.to_string(), chunks))
        .await
        .unwrap();
    let mut inbound = resp.into_inner();
    // The server kills that stream...
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("stream not closed");
    assert!(!matches!(ended, Ok(Some(_))));
    // ...and its client, which got the bytes before the bad message and nothing after.
    let got = client.await.unwrap();
    assert!(got.len() < 1 << 20, "oversized message delivered");
    // Everyone else is fine, and the rogue's control stream too.
    alpha_still_served(&bed.server).await;
    let again = tokio::spawn(connect(frontend, "beta:443"));
    let next = tokio::time::timeout(Duration::from_secs(5), control.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(next.msg, Some(server_message::Msg::Dial(_))));
    drop(control);
    drop(_keep);
    let _ = again.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unfinished_tls_handshakes_does_not_stop_agents_registering() {
    let up = BannerServer::start("alpha-upstream").await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--handshake-timeout", "3s"])
        .start()
        .await;
    let mut flood = Vec::new();
    for i in 0..300 {
        let mut s = tokio::net::TcpStream::connect(bed.server.agent_addr)
            .await
            .unwrap();
        if i % 2 == 0 {
            // The first bytes of a ClientHello, then silence.
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
        }
        flood.push(s);
    }
    let started = Instant::now();
    let _agent = bed.start_agent("alpha", up.addr).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "registration took {took:?} during the flood"
    );
    alpha_still_served(&bed.server).await;
    // The stalled handshakes are cut off at the timeout.
    let mut closed = 0;
    for mut s in flood {
        let mut b = [0u8; 1];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(6), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 300, "some handshakes were never timed out");
}

/// HTTP/2 frame type GOAWAY and error code FRAME_SIZE_ERROR (RFC 9113).
const GOAWAY: u8 = 0x7;
const FRAME_SIZE_ERROR: u32 = 0x6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_frame_size_limit_is_refused_and_registers_nothing() {
    let bed = Testbed::builder(&["alpha", "beta"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let mut tls = rogue::tls_connect(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    // Client preface, an empty SETTINGS frame, then a DATA frame header announcing one byte more
    // than the largest frame the server accepts, followed by that many bytes.
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    let len = proxy_proto::MAX_FRAME + 1;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[0x0, 0x0, 0, 0, 0, 1]);
    out.extend_from_slice(&vec![0u8; len as usize]);
    // The server may close before reading it all; what it answers is what counts.
    let _ = tls.write_all(&out).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got))
        .await
        .expect("server kept the connection open after an oversized frame");
    // Walk the server's frames and find its GOAWAY.
    let mut rest = &got[..];
    let mut goaway = None;
    while rest.len() >= 9 {
        let flen = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + flen {
            break;
        }
        if rest[3] == GOAWAY && flen >= 8 {
            let p = &rest[9..];
            goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        rest = &rest[9 + flen..];
    }
    assert_eq!(goaway, Some(FRAME_SIZE_ERROR), "frames received: {got:?}");
    // Nothing of it stays behind: beta never registered, alpha still serves.
    match connect(bed.frontend(), "beta:443").await.unwrap() {
        ConnectReply::Refused { status, .. } => assert_eq!(status, 503),
        ConnectReply::Tunnel(_) => panic!("beta must not be reachable"),
    }
    alpha_still_served(&bed.server).await;
}

/// The `grpc-status` a response head carries: a trailers-only refusal.
fn head_status(response: &http::Response<h2::RecvStream>) -> Option<&str> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_are_not_tunnel_calls_are_refused_and_the_connection_serves_on() {
    let bed = Testbed::builder(&["alpha", "beta"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let tls = rogue::tls_connect(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let call = |method: http::Method, path: &str, content_type: &str| {
        http::Request::builder()
            .method(method)
            .uri(format!("https://proxy-server{path}"))
            .header("content-type", content_type)
            .body(())
            .unwrap()
    };
    let requests = [
        // A method the service does not have.
        (
            call(
                http::Method::POST,
                "/proxy.tunnel.v1.Tunnel/Steal",
                "application/grpc",
            ),
            "12",
        ),
        // Not gRPC at all.
        (
            call(
                http::Method::GET,
                proxy_proto::DATA_PATH,
                "application/grpc",
            ),
            "12",
        ),
        (
            call(http::Method::POST, proxy_proto::DATA_PATH, "text/plain"),
            "12",
        ),
        // A data stream that names no dial.
        (
            call(
                http::Method::POST,
                proxy_proto::DATA_PATH,
                "application/grpc",
            ),
            "3",
        ),
    ];
    for (request, want) in requests {
        let what = format!("{} {}", request.method(), request.uri().path());
        let mut send = send.clone().ready().await.unwrap();
        let (response, _body) = send.send_request(request, false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer"))
            .unwrap();
        assert_eq!(response.status(), 200, "{what}");
        assert_eq!(head_status(&response), Some(want), "{what}: {response:?}");
        assert!(response.body().is_end_stream(), "{what}: trailers-only");
    }
    // None of it cost the connection, or anyone else.
    let mut again = send.ready().await.expect("the connection still serves");
    let request = call(http::Method::POST, "/nope", "application/grpc");
    let (response, _body) = again.send_request(request, false).unwrap();
    assert_eq!(head_status(&response.await.unwrap()), Some("12"));
    alpha_still_served(&bed.server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connection_that_never_speaks_http2_or_stops_answering_pings_is_dropped() {
    let bed = Testbed::builder(&["alpha", "beta"])
        .server_args(&[
            "--handshake-timeout",
            "1s",
            "--keepalive-interval",
            "500ms",
            "--keepalive-timeout",
            "500ms",
        ])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    // TLS, then silence: the HTTP/2 preface never comes.
    let mut silent = rogue::tls_connect(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut got))
        .await
        .expect("a connection without an HTTP/2 preface was kept open")
        .ok();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before its deadline"
    );

    // The preface and settings, then nothing read or answered: the server's pings go unanswered.
    let mut deaf = rogue::tls_connect(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    deaf.write_all(&out).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), deaf.read_to_end(&mut got))
        .await
        .expect("a connection that answers no ping was kept open")
        .ok();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before a ping was late"
    );
    // It was pinged: a PING frame (type 6) is among what the server sent.
    let mut rest = &got[..];
    let mut pinged = false;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        pinged |= rest[3] == 0x6;
        rest = &rest[(9 + len).min(rest.len())..];
    }
    assert!(pinged, "no PING in {got:?}");
    // The agent that answers is not affected.
    alpha_still_served(&bed.server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_stream_the_agent_never_lets_the_server_answer_on_is_reset_not_kept() {
    use prost::Message;
    let bed = Testbed::builder(&["alpha", "beta"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let tls = rogue::tls_connect(bed.pki(), "beta", bed.server.agent_addr)
        .await
        .unwrap();
    // A stream window of 0: the server may send headers but not one byte of a message.
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("https://proxy-server{}", proxy_proto::CONTROL_PATH))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let mut send = send.ready().await.unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    let register = rogue::register("beta", "rogue").encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(register.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&register);
    // The registration, then the end of the agent's half: the registration is over at once.
    body.send_data(Bytes::from(framed), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("no answer to the registration")
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(head_status(&response), None, "refused: {response:?}");
    let metric = |cluster: &str| format!("proxy_server_agents{{cluster=\"{cluster}\"}}");
    integration_tests::eventually(
        "beta registered and gone again",
        Duration::from_secs(5),
        || async {
            integration_tests::procs::metric_opt(bed.server.admin_addr, &metric("beta"))
                .await
                .unwrap_or(0.0)
                == 0.0
        },
    )
    .await;
    // The server's half cannot send its answer. It gives up within its close grace (5 s) and
    // resets the stream, instead of holding it (and a task) while the connection lives.
    let started = Instant::now();
    let mut received = response.into_body();
    let end = tokio::time::timeout(Duration::from_secs(15), received.data())
        .await
        .expect("the server kept a control stream it can never answer on");
    match end {
        Some(Err(err)) => assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "{err}"),
        other => panic!("expected a reset, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "reset after {took:?}: the last messages had no time to go out"
    );
    // The connection still serves, and so does everyone else.
    assert!(
        send.ready().await.is_ok(),
        "the connection was lost with the stream"
    );
    alpha_still_served(&bed.server).await;
}
