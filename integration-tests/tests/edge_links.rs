//! A busy agent on a slow, bufferbloated edge uplink stays reachable: its pongs wait behind its
//! own data, but every byte it sends proves it alive, and new connections get `200` within the
//! link's queueing delay plus a second while downloads keep the link busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use integration_tests::client::{ConnectReply, connect};
use integration_tests::relay::{self, Link};
use integration_tests::upstream::BulkServer;
use integration_tests::{AgentProc, Bed, ServerProc};
use tokio::io::AsyncReadExt;

/// Downloads running through the tunnel meanwhile (a few `kubectl logs -f` / `kubectl cp`).
const DOWNLOADS: usize = 4;
/// New CONNECTs made during the downloads, one a second.
const PROBES: usize = 12;

/// What one edge link showed: the slowest `200`, the refusals, and the link's use.
struct Seen {
    slowest: Duration,
    refused: Vec<String>,
    utilisation: f64,
}

async fn busy_uplink(mbit: f64, queue: usize, agent_args: &[&str]) -> Seen {
    let bed = Bed::new(&["edge"]);
    // Every connection downloads far more than the test lasts.
    let upstream = BulkServer::start(1 << 30).await.unwrap();
    let server = ServerProc::start(&bed.pki, None, &[]).await.unwrap();
    let link = Link::limited(Duration::from_millis(10), mbit / 1000.0).with_queue(queue);
    let via = relay::start_path(server.agent_addr, link).await.unwrap();
    let _agent = AgentProc::start_ready_with(&bed.pki, &[via], "edge", upstream.addr, agent_args)
        .await
        .unwrap();
    let frontend = server.frontend_addr;
    let received = Arc::new(AtomicU64::new(0));
    let mut downloads = Vec::new();
    for _ in 0..DOWNLOADS {
        let mut tunnel = connect(frontend, "edge:443")
            .await
            .unwrap()
            .tunnel()
            .unwrap();
        let received = received.clone();
        downloads.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = tunnel.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        }));
    }
    // Let the link's queue fill: the state the field reports.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (start_bytes, started) = (received.load(Ordering::Relaxed), Instant::now());
    let mut slowest = Duration::ZERO;
    let mut refused = Vec::new();
    for _ in 0..PROBES {
        let asked = Instant::now();
        match connect(frontend, "edge:443").await.unwrap() {
            ConnectReply::Tunnel(_) => slowest = slowest.max(asked.elapsed()),
            ConnectReply::Refused { status, body } => {
                refused.push(format!("{status} {}", body.trim()));
            }
        }
        tokio::time::sleep_until((asked + Duration::from_secs(1)).into()).await;
    }
    let bytes = received.load(Ordering::Relaxed) - start_bytes;
    let utilisation = bytes as f64 / (mbit * 1e6 / 8.0 * started.elapsed().as_secs_f64());
    for d in downloads {
        d.abort();
    }
    Seen {
        slowest,
        refused,
        utilisation,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_slow_uplink_keeps_its_cluster_reachable() {
    // 8 Mbit/s with a 1 MiB queue (about 1 s), and 2 Mbit/s with a 2 s queue, side by side.
    let (fast, slow) = tokio::join!(
        busy_uplink(8.0, 1 << 20, &[]),
        busy_uplink(2.0, 500 * 1024, &[])
    );
    // HTTP/2 sends one frame of every busy stream before a new stream's head (h2 schedules
    // streams round robin, and has no priorities); a download's frame is a 64 KiB chunk. That
    // wait is link time we do not remove: 0.26 s per busy stream at 2 Mbit/s, 0.07 s at 8.
    let frames_ahead =
        |mbit: f64| Duration::from_secs_f64((DOWNLOADS * 64 * 1024) as f64 / (mbit * 1e6 / 8.0));
    for (name, seen, queue_delay, frames) in [
        (
            "8 Mbit/s, 1 s queue",
            fast,
            Duration::from_secs(1),
            Duration::ZERO,
        ),
        (
            "2 Mbit/s, 2 s queue",
            slow,
            Duration::from_secs(2),
            frames_ahead(2.0),
        ),
    ] {
        eprintln!(
            "{name}: slowest 200 after {:?}, refused {:?}, link used {:.0} %",
            seen.slowest,
            seen.refused,
            seen.utilisation * 100.0
        );
        assert!(seen.refused.is_empty(), "{name}: {:?}", seen.refused);
        assert!(
            seen.slowest <= queue_delay + Duration::from_secs(1) + frames,
            "{name}: a CONNECT took {:?}",
            seen.slowest
        );
        assert!(
            seen.utilisation >= 0.8,
            "{name}: the downloads kept only {:.0} % of the link",
            seen.utilisation * 100.0
        );
    }
}
