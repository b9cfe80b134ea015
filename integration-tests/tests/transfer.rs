//! Moving bytes: a gigabyte each way, many connections at once, and per-connection flow control.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use integration_tests::client::read_n;
use integration_tests::data::Pattern;
use integration_tests::upstream::{BulkServer, SourceServer};
use integration_tests::{Testbed, client, connect};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GIB: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_arrives_byte_identical_and_half_close_travels() {
    let bulk = BulkServer::start(GIB).await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", bulk.addr)
        .start()
        .await;

    let started = Instant::now();
    let tunnel = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let ttfb = started.elapsed();
    let (mut rd, mut wr) = tunnel.into_split();
    let writer = tokio::spawn(async move {
        let mut p = Pattern::new(GIB);
        while let Some(block) = p.next_block() {
            wr.write_all(&block).await.unwrap();
        }
        // Half-close: we are done sending but keep reading.
        wr.shutdown().await.unwrap();
        wr
    });
    let mut hash = Sha256::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    while received < GIB {
        let want = buf.len().min((GIB - received) as usize);
        let n = rd.read(&mut buf[..want]).await.unwrap();
        assert!(n > 0, "tunnel closed after {received} bytes");
        hash.update(&buf[..n]);
        received += n as u64;
    }
    let down = started.elapsed();
    // The upstream sends the digest of what it received only after it saw our FIN.
    let mut peer_digest = [0u8; 32];
    tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut peer_digest))
        .await
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    rd.read_to_end(&mut rest).await.unwrap();
    let _wr = writer.await.unwrap();
    let elapsed = started.elapsed();

    let expected: [u8; 32] = Pattern::digest(GIB);
    assert_eq!(
        <[u8; 32]>::from(hash.finalize()),
        expected,
        "download corrupted"
    );
    assert_eq!(peer_digest, expected, "upload corrupted");
    assert!(
        rest.is_empty(),
        "{} stray bytes after the digest",
        rest.len()
    );
    // Both ends saw an orderly close (fin both ways, then the stream ends), not an abort.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bed
        .server
        .proc
        .logs()
        .contains("tunneled connection closed")
    {
        assert!(Instant::now() < deadline, "no access log line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = bed.server.proc.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("tunneled connection closed"))
        .unwrap();
    assert!(line.contains("outcome=ok"), "{line}");
    assert!(
        line.contains(&format!("bytes_to_cluster={GIB}"))
            && line.contains(&format!("bytes_from_cluster={}", GIB + 32)),
        "{line}"
    );
    let gbit = |d: Duration| (GIB * 8) as f64 / d.as_secs_f64() / 1e9;
    eprintln!(
        "1 GiB each way: connect {ttfb:?}, download done {down:?}, total {elapsed:?} ({:.2} Gbit/s each way, {:.2} Gbit/s combined)",
        gbit(elapsed),
        2.0 * gbit(elapsed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_through_one_agent_are_all_correct() {
    const N: usize = 200;
    const BODY: u64 = 256 * 1024;
    let bed = Testbed::builder(&["alpha"]).member("alpha").start().await;
    let pki = Arc::new(bed.pki().clone());
    // Every connection is established and answered once before any of them moves on, so all
    // 200 are open at the same time.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let expected = Pattern::digest(BODY);
    let mut tasks = Vec::new();
    for _ in 0..N {
        let (pki, barrier, frontend) = (pki.clone(), barrier.clone(), bed.frontend());
        tasks.push(tokio::spawn(async move {
            let tunnel = connect(frontend, "alpha:443").await?.tunnel()?;
            let tls = client::apiserver_tls(&pki, "alpha", tunnel).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let get = |path: &str| {
                hyper::Request::get(path)
                    .header("host", "kubernetes.default.svc")
                    .body(Empty::<Bytes>::new())
            };
            let version = sender
                .send_request(get("/version")?)
                .await?
                .into_body()
                .collect()
                .await?
                .to_bytes();
            anyhow::ensure!(String::from_utf8_lossy(&version).contains("+alpha"));
            barrier.wait().await;
            let body = sender
                .send_request(get(&format!("/large?bytes={BODY}"))?)
                .await?
                .into_body()
                .collect()
                .await?
                .to_bytes();
            anyhow::ensure!(body.len() as u64 == BODY, "short body {}", body.len());
            Ok::<_, anyhow::Error>(<[u8; 32]>::from(Sha256::digest(&body)))
        }));
    }
    for task in tasks {
        let digest = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("stuck")
            .unwrap()
            .unwrap();
        assert_eq!(digest, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_slow_another_connection_of_the_same_agent() {
    const MOVE: u64 = 256 << 20;
    let source = SourceServer::start().await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", source.addr)
        // No warm connections: the upstream's second connection is the stalled client's.
        .agent_args(&integration_tests::procs::NO_WARM)
        .start()
        .await;

    // Baseline: one connection alone.
    let mut alone = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let baseline = read_n(&mut alone, MOVE).await;
    drop(alone);

    // A connection that reads a little, then stops reading.
    let mut stalled = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    read_n(&mut stalled, 64 * 1024).await;
    // Wait until its upstream is blocked: megabytes written that the client never read.
    let stalled_conn = source.conns()[1].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = stalled_conn
            .written
            .load(std::sync::atomic::Ordering::Relaxed);
        if now == last && now > 0 {
            break;
        }
        last = now;
        assert!(
            Instant::now() < deadline,
            "stalled connection never filled up"
        );
    }
    assert!(
        last >= 2 << 20,
        "only {last} bytes pending behind the stalled reader"
    );

    let mut other = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let with_stall = tokio::time::timeout(Duration::from_secs(60), read_n(&mut other, MOVE))
        .await
        .expect("the other connection stalled too: they share a flow-control window");
    let still_pending = stalled_conn
        .written
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        still_pending, last,
        "the stalled connection was drained meanwhile"
    );
    eprintln!(
        "isolation: 256 MiB alone {baseline:?}, beside a stalled connection with {:.1} MiB pending {with_stall:?}",
        last as f64 / (1 << 20) as f64
    );
    assert!(
        with_stall <= baseline * 4 + Duration::from_secs(2),
        "256 MiB took {with_stall:?} beside a stalled connection vs {baseline:?} alone"
    );
    drop(stalled);
}
