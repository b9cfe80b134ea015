//! How a client reaches the upstream through a contender.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::bail;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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
    /// TLS to the proxy's frontend (server name `localhost`), then `CONNECT <cluster>:443`.
    ConnectTls {
        /// The proxy's CONNECT listener.
        proxy: SocketAddr,
        /// The cluster to name.
        cluster: String,
        /// Trusts the frontend's certificate.
        tls: Arc<rustls::ClientConfig>,
    },
}

/// One connection to the upstream, over TCP or through a TLS frontend.
pub enum Conn {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A blocking connection (the latency scenario paces each from its own thread).
pub trait Blocking: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> Blocking for T {}

impl Conn {
    /// The same connection, blocking: TLS keeps its session (rustls' state moves over).
    pub fn into_blocking(self) -> anyhow::Result<Box<dyn Blocking>> {
        let blocking = |s: TcpStream| -> anyhow::Result<std::net::TcpStream> {
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            Ok(s)
        };
        Ok(match self {
            Conn::Tcp(s) => Box::new(blocking(s)?),
            Conn::Tls(s) => {
                let (tcp, session) = s.into_inner();
                Box::new(rustls::StreamOwned::new(session, blocking(tcp)?))
            }
        })
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A client configuration trusting the CA in `ca` (PEM).
pub fn trusting(ca: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in proxy_common::tls::load_certs(ca)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    ))
}

/// Sends `CONNECT cluster:443` on `s` and reads the answer's head, one byte at a time (no
/// syscall each: rustls serves them from the record it decrypted); fails unless it is `200`.
async fn connect_over<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cluster: &str,
) -> anyhow::Result<()> {
    s.write_all(
        format!("CONNECT {cluster}:443 HTTP/1.1\r\nHost: {cluster}:443\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut head = Vec::with_capacity(64);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 512 {
            bail!("CONNECT answer head longer than 512 bytes");
        }
        head.push(s.read_u8().await?);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        bail!("CONNECT refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(())
}

impl Entry {
    /// Opens one connection to the upstream (a plain TCP entry only).
    pub async fn open(&self) -> anyhow::Result<TcpStream> {
        self.open_with(None).await
    }

    /// Opens one connection to the upstream, through TLS if the entry has it.
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        match self {
            Entry::ConnectTls {
                proxy,
                cluster,
                tls,
            } => {
                let tcp = TcpStream::connect(proxy).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                let mut s = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await?;
                connect_over(&mut s, cluster).await?;
                Ok(Conn::Tls(Box::new(s)))
            }
            _ => Ok(Conn::Tcp(self.open().await?)),
        }
    }

    /// Opens one connection to the upstream; with `recv_buffer`, the client's socket has that
    /// receive buffer (SO_RCVBUF, which the kernel doubles and no longer autotunes).
    pub async fn open_with(&self, recv_buffer: Option<u32>) -> anyhow::Result<TcpStream> {
        let addr = match self {
            Entry::Tcp(addr) => *addr,
            Entry::Connect { proxy, .. } => *proxy,
            Entry::ConnectTls { .. } => bail!("a TLS entry has no plain TCP connection"),
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
            Entry::Tcp(_) | Entry::ConnectTls { .. } => Ok(s),
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
