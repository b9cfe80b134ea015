//! A userspace delay relay (kernel netem is not available here): forwards TCP to a target and
//! holds every byte back by `one_way` in each direction, without limiting bandwidth: what it has
//! read waits in a queue stamped with its arrival time, and a writer releases it once it is old
//! enough. The queue is bounded in bytes, so TCP flow control still reaches the sender.
//!
//! What this emulates, and what not: each hop's kernel TCP sees a loopback round trip, so TCP's
//! own windows and congestion control never meet the delay; only windows kept by the
//! applications (this proxy's credit, HTTP/2's, ssh's channel windows) do, with the full round
//! trip. The queue bound plays the path's bandwidth × delay limit: [`QUEUE_BYTES`] per direction
//! of one relayed connection, 64 MiB, which allows 64 MiB / one-way delay (21 Gbit/s at 25 ms):
//! never the limit at the speeds these 2 cores reach.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

/// Bytes queued (in flight on the emulated path) per direction of one relayed connection.
const QUEUE_BYTES: usize = 64 << 20;

/// Starts a relay to `target` adding `one_way` latency each way; returns its address.
pub async fn start(target: SocketAddr, one_way: Duration) -> anyhow::Result<SocketAddr> {
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
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(pipe(cr, sw, one_way), pipe(sr, cw, one_way));
            });
        }
    });
    Ok(addr)
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes, OwnedSemaphorePermit)>();
    let room = Arc::new(Semaphore::new(QUEUE_BYTES));
    let reader = async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            buf.reserve(64 * 1024);
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Enters the path once there is room, without reading more meanwhile.
                    let Ok(permit) = room.clone().acquire_many_owned(n as u32).await else {
                        break;
                    };
                    let due = Instant::now() + delay;
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
