//! A userspace delay relay (kernel netem is not available here): forwards TCP to a target and
//! holds every byte back by `one_way` in each direction, optionally behind a bottleneck of a given
//! rate: what it has read waits in a queue stamped with the time it is due, and a writer releases
//! it then. The queue is bounded in bytes, so TCP flow control still reaches the sender.
//!
//! What this emulates, and what not: each hop's kernel TCP sees a loopback round trip, so TCP's
//! own windows and congestion control never meet the delay; only windows kept by the
//! applications (this proxy's credit, HTTP/2's, ssh's channel windows) do, with the full round
//! trip. Without a rate, the queue bound plays the path's bandwidth × delay limit:
//! [`QUEUE_BYTES`] per direction of one relayed connection, 64 MiB, which allows 64 MiB / one-way
//! delay (21 Gbit/s at 25 ms): never the limit at the speeds these 2 cores reach, so the relay's
//! and the contenders' CPU cost decides. With a rate ([`Link::limited`]), the path is a
//! bottleneck link like a real WAN's: bytes leave at that rate, and the queue holds what is in
//! flight plus one round trip's worth of router buffer.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

/// Bytes queued (in flight on the emulated path) per direction of one relayed connection, when
/// the path has no rate.
const QUEUE_BYTES: usize = 64 << 20;

/// Receive buffer of a rate-limited relay's sockets (the kernel doubles it): small beside the
/// emulated queue.
const LINK_SOCKET_BUFFER: usize = 32 * 1024;

/// An emulated network path: delay each way, and optionally a bottleneck rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Latency added each way (half the round trip).
    pub one_way: Duration,
    /// Bytes per second the path carries each way; `None`: as fast as the relay goes.
    pub rate: Option<f64>,
    /// Bytes one direction may hold (in flight plus the bottleneck's buffer); `None`: see
    /// [`Link::queue_bytes`].
    pub queue: Option<usize>,
}

impl Link {
    /// Delay only.
    pub fn delay(one_way: Duration) -> Self {
        Self {
            one_way,
            rate: None,
            queue: None,
        }
    }

    /// Delay and a bottleneck of `gbit_per_s` each way.
    pub fn limited(one_way: Duration, gbit_per_s: f64) -> Self {
        Self {
            one_way,
            rate: Some(gbit_per_s * 1e9 / 8.0),
            queue: None,
        }
    }

    /// The same link with a buffer of `bytes` per direction: a bufferbloated edge uplink (at
    /// 8 Mbit/s, 1 MiB is about a second of queue).
    pub fn with_queue(mut self, bytes: usize) -> Self {
        self.queue = Some(bytes);
        self
    }

    /// Bytes one direction may hold: what is in flight (rate × one way) plus a round trip of
    /// router buffer (the classic rule of thumb), so a sender that overruns the link sees the
    /// queueing delay a real bottleneck adds, and then TCP backpressure.
    fn queue_bytes(&self) -> usize {
        if let Some(bytes) = self.queue {
            return bytes;
        }
        match self.rate {
            None => QUEUE_BYTES,
            Some(rate) => ((rate * 3.0 * self.one_way.as_secs_f64()) as usize).max(1 << 20),
        }
    }
}

/// Starts a relay to `target` adding `one_way` latency each way; returns its address.
pub async fn start(target: SocketAddr, one_way: Duration) -> anyhow::Result<SocketAddr> {
    start_path(target, Link::delay(one_way)).await
}

/// Starts a relay to `target` emulating `path`; returns its address.
pub async fn start_path(target: SocketAddr, path: Link) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if path.rate.is_some() {
                    // The link's buffer is the queue, not the kernel's: left to autotune, each
                    // receiving socket would hold megabytes more (seconds at edge rates) before
                    // TCP backpressure reached the sender, a queue no router has.
                    for s in [&client, &server] {
                        let _ = socket2::SockRef::from(s).set_recv_buffer_size(LINK_SOCKET_BUFFER);
                    }
                }
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(pipe(cr, sw, path), pipe(sr, cw, path));
            });
        }
    });
    Ok(addr)
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, path: Link) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes, OwnedSemaphorePermit)>();
    let room = Arc::new(Semaphore::new(path.queue_bytes()));
    let reader = async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        // When the bottleneck has sent everything queued before.
        let mut link_free = Instant::now();
        loop {
            buf.reserve(64 * 1024);
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Enters the path once there is room, without reading more meanwhile.
                    let Ok(permit) = room.clone().acquire_many_owned(n as u32).await else {
                        break;
                    };
                    let now = Instant::now();
                    let sent = match path.rate {
                        None => now,
                        Some(rate) => {
                            link_free =
                                link_free.max(now) + Duration::from_secs_f64(n as f64 / rate);
                            link_free
                        }
                    };
                    let due = sent + path.one_way;
                    if tx.send((due, buf.split().freeze(), permit)).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk, permit)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            drop(permit);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
