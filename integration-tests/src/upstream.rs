//! Plain TCP upstreams standing in for an API server in the transfer tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::data::Pattern;

/// Per connection: reads until EOF while writing `send_len` pattern bytes; once it has seen EOF
/// (the client's half-close) and finished writing, it appends the SHA-256 of what it received
/// and closes. A client therefore gets `send_len + 32` bytes only if its FIN arrived as a
/// half-close and every byte it sent arrived intact.
#[derive(Debug)]
pub struct BulkServer {
    /// Listening address.
    pub addr: SocketAddr,
}

impl BulkServer {
    /// Starts the server.
    pub async fn start(send_len: u64) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = bulk_conn(sock, send_len).await;
                });
            }
        });
        Ok(Self { addr })
    }
}

async fn bulk_conn(sock: TcpStream, send_len: u64) -> std::io::Result<()> {
    let (mut rd, mut wr) = sock.into_split();
    let reader = async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok::<_, std::io::Error>(<[u8; 32]>::from(h.finalize()))
    };
    let writer = async {
        let mut p = Pattern::new(send_len);
        while let Some(block) = p.next_block() {
            wr.write_all(&block).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let (digest, ()) = tokio::try_join!(reader, writer)?;
    wr.write_all(&digest).await?;
    wr.shutdown().await
}

/// Writes pattern bytes to every connection until it fails, counting per connection how many
/// bytes the kernel accepted. Used to show a stalled client really has data piling up.
#[derive(Debug)]
pub struct SourceServer {
    /// Listening address.
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<SourceConn>>>>,
}

/// What a [`SourceServer`] knows of one connection.
#[derive(Debug, Default)]
pub struct SourceConn {
    /// Bytes the kernel accepted so far.
    pub written: AtomicU64,
    /// When a write failed (the tunnel closed the upstream connection).
    pub closed_at: Mutex<Option<std::time::Instant>>,
}

/// Upper bound on what a source connection writes, so no test can run away.
pub const SOURCE_LIMIT: u64 = 8 << 30;

impl SourceServer {
    /// Starts the server.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let conns: Arc<Mutex<Vec<Arc<SourceConn>>>> = Arc::default();
        let list = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let conn = Arc::new(SourceConn::default());
                list.lock().unwrap().push(conn.clone());
                tokio::spawn(async move {
                    let mut p = Pattern::new(SOURCE_LIMIT);
                    while let Some(block) = p.next_block() {
                        if sock.write_all(&block).await.is_err() {
                            break;
                        }
                        conn.written
                            .fetch_add(block.len() as u64, Ordering::Relaxed);
                    }
                    *conn.closed_at.lock().unwrap() = Some(std::time::Instant::now());
                });
            }
        });
        Ok(Self { addr, conns })
    }

    /// The accepted connections, in accept order.
    pub fn conns(&self) -> Vec<Arc<SourceConn>> {
        self.conns.lock().unwrap().clone()
    }
}

/// Writes `banner` and a newline to every connection, then echoes what it reads. Tells a test
/// which of several upstreams a tunnel reached.
#[derive(Debug)]
pub struct BannerServer {
    /// Listening address.
    pub addr: SocketAddr,
}

impl BannerServer {
    /// Starts the server.
    pub async fn start(banner: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let banner = format!("{banner}\n");
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let banner = banner.clone();
                tokio::spawn(async move {
                    if sock.write_all(banner.as_bytes()).await.is_ok() {
                        let (mut rd, mut wr) = sock.split();
                        let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    }
                });
            }
        });
        Ok(Self { addr })
    }
}
