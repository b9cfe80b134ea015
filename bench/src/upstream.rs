//! The one upstream every contender forwards to. The first byte of a connection picks its job:
//! `B` bulk (then two u64: bytes to read, bytes to write), `R` request/response (fixed-size
//! requests answered with fixed-size responses until EOF), `S` source (writes until the client
//! goes away), `T` tracked source (then a u64 tag: a source whose bytes written are counted under
//! that tag, with a small fixed send buffer), `U` the same with the kernel's own send buffer (as a
//! real API server's), `Q` query (then a u64 tag: answers four u64, the tag's live tracked connections and
//! the sum, minimum and maximum of their bytes written, then closes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Bytes of one request in `R` mode.
pub const REQUEST: usize = 100;
/// Bytes of one response in `R` mode.
pub const RESPONSE: usize = 200;
/// Size of the writes in `B` and `S` modes.
const BLOCK: usize = 64 * 1024;
/// Send buffer of a tracked source (SO_SNDBUF; the kernel doubles it and stops autotuning):
/// its client stalls, and a thousand 4 MiB autotuned buffers would reach the machine's TCP
/// memory limit, measuring the kernel instead of the tunnel.
const TRACKED_SEND_BUFFER: u32 = 64 * 1024;

/// Bytes written by each live tracked source, by tag, then by connection number.
type Tracked = Mutex<HashMap<u64, HashMap<u64, Arc<AtomicU64>>>>;

static TRACKED: std::sync::LazyLock<Tracked> = std::sync::LazyLock::new(Default::default);
static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// Removes a tracked source from [`TRACKED`] when its connection ends.
struct Registered(u64, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        let mut tracked = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conns) = tracked.get_mut(&self.0) {
            conns.remove(&self.1);
            if conns.is_empty() {
                tracked.remove(&self.0);
            }
        }
    }
}

/// (live connections, sum, min, max of bytes written) of the tracked sources tagged `tag`.
fn tracked_stats(tag: u64) -> [u64; 4] {
    let tracked = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
    let written: Vec<u64> = tracked
        .get(&tag)
        .map(|c| c.values().map(|w| w.load(Ordering::Relaxed)).collect())
        .unwrap_or_default();
    [
        written.len() as u64,
        written.iter().sum(),
        written.iter().copied().min().unwrap_or(0),
        written.iter().copied().max().unwrap_or(0),
    ]
}

/// Starts the upstream on 127.0.0.1; returns its address.
pub async fn start() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    tokio::spawn(async move {
                        let _ = serve(sock).await;
                    });
                }
                // Out of descriptors: keep the listener, try again shortly.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    });
    Ok(addr)
}

async fn serve(mut sock: TcpStream) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    sock.read_exact(&mut mode).await?;
    let mode = mode[0];
    match mode {
        b'B' => {
            let mut header = [0u8; 16];
            sock.read_exact(&mut header).await?;
            let up = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
            let down = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
            let (mut rd, mut wr) = sock.split();
            let read = async {
                let mut buf = vec![0u8; 256 * 1024];
                let mut left = up;
                while left > 0 {
                    let n = rd.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    left = left.saturating_sub(n as u64);
                }
                Ok::<_, std::io::Error>(())
            };
            let write = async {
                let block = vec![0x5au8; BLOCK];
                let mut left = down;
                while left > 0 {
                    let n = (left as usize).min(BLOCK);
                    wr.write_all(&block[..n]).await?;
                    left -= n as u64;
                }
                Ok::<_, std::io::Error>(())
            };
            tokio::try_join!(read, write)?;
            // One byte acknowledges that everything sent up has arrived.
            wr.write_all(b"!").await?;
            wr.shutdown().await
        }
        b'R' => {
            let mut req = [0u8; REQUEST];
            let resp = [0x42u8; RESPONSE];
            loop {
                if sock.read_exact(&mut req).await.is_err() {
                    return Ok(());
                }
                sock.write_all(&resp).await?;
            }
        }
        b'S' => {
            let block = vec![0x33u8; BLOCK];
            loop {
                sock.write_all(&block).await?;
            }
        }
        b'T' | b'U' => {
            let tag = sock.read_u64_le().await?;
            if mode == b'T' {
                let std = sock.into_std()?;
                // SO_SNDBUF belongs to the socket, not the descriptor: set through a duplicate.
                TcpSocket::from_std_stream(std.try_clone()?)
                    .set_send_buffer_size(TRACKED_SEND_BUFFER)?;
                sock = TcpStream::from_std(std)?;
            }
            let written = Arc::new(AtomicU64::new(0));
            let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            TRACKED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(tag)
                .or_default()
                .insert(id, written.clone());
            let _registered = Registered(tag, id);
            let block = vec![0x44u8; BLOCK];
            loop {
                let n = sock.write(&block).await?;
                if n == 0 {
                    return Ok(());
                }
                written.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        b'Q' => {
            let tag = sock.read_u64_le().await?;
            let mut answer = Vec::with_capacity(32);
            for v in tracked_stats(tag) {
                answer.extend_from_slice(&v.to_le_bytes());
            }
            sock.write_all(&answer).await?;
            sock.shutdown().await
        }
        _ => Ok(()),
    }
}
