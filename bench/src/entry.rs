//! How a client reaches the upstream through a contender.

use std::net::SocketAddr;

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How a client reaches the upstream through a contender.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Plain TCP to this address (direct, or a port the tunnel exposes).
    Tcp(SocketAddr),
    /// TCP to the proxy, then `CONNECT <cluster>:443`.
    Connect {
        /// The proxy's CONNECT listener.
        proxy: SocketAddr,
        /// The cluster to name.
        cluster: String,
    },
}

impl Entry {
    /// Opens one connection to the upstream.
    pub async fn open(&self) -> anyhow::Result<TcpStream> {
        self.open_with(None).await
    }

    /// Opens one connection to the upstream; with `recv_buffer`, the client's socket has that
    /// receive buffer (SO_RCVBUF, which the kernel doubles and no longer autotunes).
    pub async fn open_with(&self, recv_buffer: Option<u32>) -> anyhow::Result<TcpStream> {
        let addr = match self {
            Entry::Tcp(addr) => *addr,
            Entry::Connect { proxy, .. } => *proxy,
        };
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        let mut s = socket.connect(addr).await?;
        s.set_nodelay(true)?;
        match self {
            Entry::Tcp(_) => Ok(s),
            Entry::Connect { cluster, .. } => {
                s.write_all(
                    format!("CONNECT {cluster}:443 HTTP/1.1\r\nHost: {cluster}:443\r\n\r\n")
                        .as_bytes(),
                )
                .await?;
                // Read exactly the head and nothing after it, as a buffered client would, in
                // two reads: peek until the head is in, then take it. (Byte-at-a-time reads cost
                // the proxy ~40 syscalls per connection on the client side of the figures.)
                let mut peeked = [0u8; 512];
                let head = loop {
                    let n = s.peek(&mut peeked).await?;
                    if n == 0 {
                        bail!("proxy closed during CONNECT");
                    }
                    if let Some(end) = peeked[..n].windows(4).position(|w| w == b"\r\n\r\n") {
                        let mut head = vec![0u8; end + 4];
                        s.read_exact(&mut head).await?;
                        break head;
                    }
                    if n == peeked.len() {
                        bail!("CONNECT answer head longer than {} bytes", peeked.len());
                    }
                    // Only part of the head is in (the proxy writes it at once, so rare): peeked
                    // bytes keep the socket readable, so wait a little instead.
                    tokio::time::sleep(std::time::Duration::from_micros(50)).await;
                };
                if !head.starts_with(b"HTTP/1.1 200") {
                    bail!("CONNECT refused: {}", String::from_utf8_lossy(&head));
                }
                Ok(s)
            }
        }
    }
}
