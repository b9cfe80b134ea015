//! SIGTERM serves every client the kernel already accepted: a load balancer counts those as
//! connected and cannot retry them elsewhere, so none may be reset, even while the handshake
//! gate is full.

use std::time::Duration;

use integration_tests::Testbed;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_waiting_in_the_backlog_at_sigterm_are_served() {
    let mut bed = Testbed::builder(&["alpha"])
        .server_args(&["--max-handshakes", "1", "--shutdown-grace", "10s"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let frontend = bed.frontend();
    // The gate's one place, held by a client that says nothing.
    let _idle = TcpStream::connect(frontend).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // These wait in the kernel's backlog, their requests sent, until the gate frees a place
    // (it evicts the idle one after a second).
    let mut queued = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(frontend).await.unwrap();
        s.write_all(b"CONNECT alpha:443 HTTP/1.1\r\nHost: alpha:443\r\n\r\n")
            .await
            .unwrap();
        queued.push(s);
    }
    bed.server.proc.signal("TERM");
    for (i, mut s) in queued.into_iter().enumerate() {
        // Its 200 and the upstream's banner (the tunnel then stays open: the upstream echoes).
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&answer).contains("alpha-upstream\n") {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) => panic!(
                    "client {i}: closed after {:?}",
                    String::from_utf8_lossy(&answer)
                ),
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Ok(Err(err)) => panic!("client {i}: {err} (reset) after {answer:?}"),
                Err(_) => panic!("client {i}: no answer within 10 s: {answer:?}"),
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "client {i}: {answer:?}");
    }
    let logs = bed
        .server
        .proc
        .logs_with("frontend listener closed", 1)
        .await;
    assert!(logs.contains("drained=4"), "{logs}");
    // Served: the tunnels stay open until the grace ends; then the server exits cleanly.
    let status = bed.server.proc.wait(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}");
}
