//! Client side: CONNECT through the proxy, TLS to a member API server through the tunnel, and
//! kubeconfig files for kubectl.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proxy_certs::DevPki;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// What the proxy answered to a CONNECT.
#[derive(Debug)]
pub enum ConnectReply {
    /// `200`: the socket is now the tunnel.
    Tunnel(TcpStream),
    /// Any other status, with the body (one line).
    Refused {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
}

impl ConnectReply {
    /// The tunnel, or an error naming the refusal.
    pub fn tunnel(self) -> anyhow::Result<TcpStream> {
        match self {
            Self::Tunnel(s) => Ok(s),
            Self::Refused { status, body } => bail!("CONNECT refused: {status} {body}"),
        }
    }
}

/// Sends `CONNECT target` to the proxy and reads its answer. Reads the head byte by byte so that
/// no tunneled byte is consumed.
pub async fn connect(proxy: SocketAddr, target: &str) -> anyhow::Result<ConnectReply> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let (status, _) = read_response_head(&mut s).await?;
    if status == 200 {
        return Ok(ConnectReply::Tunnel(s));
    }
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(ConnectReply::Refused { status, body })
}

/// A tunnel to `target` whose upstream streams to the client (an `upstream::SourceServer`),
/// returned once its first MiB arrived: a connection known to be carrying bytes. Panics on any
/// failure.
pub async fn streaming_tunnel(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut tunnel = connect(proxy, target)
        .await
        .expect("CONNECT")
        .tunnel()
        .expect("a tunnel");
    let mut buf = vec![0u8; 1 << 20];
    tunnel
        .read_exact(&mut buf)
        .await
        .expect("the upstream's first MiB");
    tunnel
}

/// Reads an HTTP/1.1 response head; returns the status and the head's text.
pub async fn read_response_head<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<(u16, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            bail!(
                "proxy closed the connection after {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(byte[0]);
        if head.len() > 64 * 1024 {
            bail!("response head too large");
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {text:?}"))?;
    Ok((status, text.into_owned()))
}

/// How to reach a TLS frontend and what to present to it.
#[derive(Debug, Clone, Default)]
pub struct FrontendClient {
    /// Verify the frontend with this CA (TLS); `None` for plain TCP.
    pub tls_ca: Option<PathBuf>,
    /// Present this client certificate and key.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// A `Proxy-Authorization` header value.
    pub authorization: Option<String>,
}

/// A frontend's answer to a CONNECT: status, response head, body (empty on 200).
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The response head.
    pub head: String,
    /// The body of a refusal.
    pub body: String,
}

/// Trait object for plain or TLS client streams.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl FrontendClient {
    /// Opens a connection to the frontend (TLS if configured).
    pub async fn open(&self, proxy: SocketAddr) -> anyhow::Result<Box<dyn Io>> {
        let tcp = TcpStream::connect(proxy).await?;
        tcp.set_nodelay(true)?;
        let Some(ca) = &self.tls_ca else {
            return Ok(Box::new(tcp));
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in proxy_common::tls::load_certs(ca)? {
            roots.add(cert)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let config = match &self.cert {
            Some((cert, key)) => builder.with_client_auth_cert(
                proxy_common::tls::load_certs(cert)?,
                proxy_common::tls::load_key(key)?,
            )?,
            None => builder.with_no_client_auth(),
        };
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        Ok(Box::new(tls))
    }

    /// Sends `CONNECT target` and returns the answer and, on 200, the tunnel.
    pub async fn connect(
        &self,
        proxy: SocketAddr,
        target: &str,
    ) -> anyhow::Result<(Answer, Option<Box<dyn Io>>)> {
        let mut s = self.open(proxy).await?;
        let auth = self
            .authorization
            .as_ref()
            .map(|a| format!("Proxy-Authorization: {a}\r\n"))
            .unwrap_or_default();
        s.write_all(
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").as_bytes(),
        )
        .await?;
        let (status, head) = read_response_head(&mut s).await?;
        if status == 200 {
            return Ok((
                Answer {
                    status,
                    head,
                    body: String::new(),
                },
                Some(s),
            ));
        }
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok((Answer { status, head, body }, None))
    }
}

/// TLS to `cluster`'s API server through an established tunnel, verifying its certificate for
/// `kubernetes.default.svc` against the cluster's own CA.
pub async fn apiserver_tls(
    pki: &DevPki,
    cluster: &str,
    tunnel: TcpStream,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in proxy_common::tls::load_certs(&pki.apiserver_ca(cluster))? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("kubernetes.default.svc")?;
    Ok(TlsConnector::from(Arc::new(config))
        .connect(name, tunnel)
        .await?)
}

/// `GET path` over HTTPS through the proxy to `cluster`'s API server; returns (status, body).
pub async fn get_via_proxy(
    proxy: SocketAddr,
    pki: &DevPki,
    cluster: &str,
    path: &str,
) -> anyhow::Result<(u16, Bytes)> {
    let tunnel = connect(proxy, &format!("{cluster}:443")).await?.tunnel()?;
    let tls = apiserver_tls(pki, cluster, tunnel).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "kubernetes.default.svc")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Writes a kubeconfig for `cluster` that reaches it through the proxy at `proxy_url`, with full
/// certificate verification against the member's API-server CA.
pub fn write_kubeconfig(
    dir: &Path,
    pki: &DevPki,
    cluster: &str,
    proxy_url: &str,
) -> anyhow::Result<PathBuf> {
    let ca = std::fs::read(pki.apiserver_ca(cluster))?;
    let ca_b64 = base64(&ca);
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: https://{cluster}:443
    tls-server-name: kubernetes.default.svc
    certificate-authority-data: {ca_b64}
    proxy-url: {proxy_url}
users:
- name: controller
  user:
    token: not-checked-by-the-fake-apiserver
contexts:
- name: {cluster}
  context:
    cluster: {cluster}
    user: controller
current-context: {cluster}
"
    );
    let path = dir.join(format!("kubeconfig-{cluster}"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Standard base64 with padding (kubeconfig `*-data` fields).
pub fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Sends `bytes` to `addr` and reads until the server closes (at most 10 s).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut out),
    )
    .await
    .expect("server did not close")
    .expect("read");
    out
}

/// CONNECTs to `cluster` and returns the first line its upstream sends (the banner of a
/// [`crate::upstream::BannerServer`]).
pub async fn banner_via(proxy: SocketAddr, cluster: &str) -> String {
    let tunnel = connect(proxy, &format!("{cluster}:443"))
        .await
        .expect("connect")
        .tunnel()
        .expect("tunnel");
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(tunnel), &mut line)
        .await
        .expect("banner");
    line.trim().to_owned()
}

/// Reads until EOF or error; panics if that takes longer than `limit`. Returns how long it took.
pub async fn read_until_closed<S: AsyncRead + Unpin>(
    mut s: S,
    limit: std::time::Duration,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let res = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(res.is_ok(), "connection still open after {limit:?}");
    started.elapsed()
}

/// Reads exactly `n` bytes from `s` (panicking if it closes first); returns how long it took.
pub async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: u64) -> std::time::Duration {
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < n {
        let want = buf.len().min((n - got) as usize);
        let k = s.read(&mut buf[..want]).await.unwrap();
        assert!(k > 0, "closed after {got} bytes");
        got += k as u64;
    }
    started.elapsed()
}
