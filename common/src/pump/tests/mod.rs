//! Unit tests of the pump's [`splice`], one file per topic: `delivery` (bytes intact, in order,
//! nothing held back), `half_close` (a `fin` each way and the close that follows), `credit`
//! (flow control), `aborts` (resets, failed streams, cancel) and `tcp` (what only a real
//! socket shows). This file is their harness.
//!
//! The local socket is one end of a `tokio::io::duplex` pipe (a loopback TCP pair where a reset
//! or a FIN must be seen on the wire: a pipe has neither); the tunnel is a pair of channels
//! standing in for the two halves of a `Data` stream.
//!
//! Most tests run on a paused clock: nothing in them waits for real time, a step that hangs fails
//! after [`HANG`] of virtual time (at once), and "nothing more happens" is asserted by letting
//! [`HANG`] pass with every task idle.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use proxy_proto::{Chunk, MAX_CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use super::{
    ByteCounts, CLOSE_TIMEOUT, LocalSocket, OutboundBody, PumpError, Role, outbound, splice,
};
use crate::flow::{Budget, DEFAULT_BUDGET, MIN_WINDOW};

mod aborts;
mod credit;
mod delivery;
mod half_close;
mod tcp;

/// How long any step may take before the test calls it a hang. Below [`CLOSE_TIMEOUT`], so a
/// close that only ends because that timeout ran out fails the test instead of passing late.
const HANG: Duration = Duration::from_secs(1);

/// A pipe roomy enough that neither side ever waits for the other.
const ROOMY: usize = 1 << 20;

/// A pipe that fills at once: writes to the local socket block until the client reads.
const NARROW: usize = 4 * 1024;

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match timeout(HANG, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after {HANG:?}"),
    }
}

/// `n` bytes that differ from their neighbours, so a lost, doubled or reordered piece shows.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(17))
        .collect()
}

fn data(bytes: &[u8]) -> Chunk {
    Chunk {
        data: Bytes::copy_from_slice(bytes),
        ..Chunk::default()
    }
}

fn fin() -> Chunk {
    Chunk {
        fin: true,
        ..Chunk::default()
    }
}

fn credit(limit: u64) -> Chunk {
    Chunk {
        credit: limit,
        ..Chunk::default()
    }
}

fn concat(chunks: &[Chunk]) -> Vec<u8> {
    chunks.iter().flat_map(|c| c.data.iter().copied()).collect()
}

/// The local socket handed to `splice`: one end of a pipe that records whether `splice` asked
/// for a reset (a pipe cannot show one; the TCP tests check the reset itself).
struct Local<IO = DuplexStream> {
    io: IO,
    aborted: Arc<AtomicBool>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Local<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Local<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO> LocalSocket for Local<IO> {
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
}

/// The other end of the tunnel, as `splice` sees it.
struct Tunnel {
    /// What `splice` sends into the tunnel, as HTTP/2 would take it from the body.
    out: mpsc::Receiver<Chunk>,
    /// What the other end sends; `None` once it ended its half of the stream.
    inbound: Option<mpsc::Sender<Result<Chunk, Status>>>,
    /// The highest credit `splice` granted the other end so far.
    granted: u64,
}

impl Tunnel {
    async fn send(&self, chunk: Chunk) {
        let inbound = self.inbound.as_ref().expect("the stream was ended");
        within("the other end's send", inbound.send(Ok(chunk)))
            .await
            .expect("splice dropped the inbound half");
    }

    /// The other end's half of the stream fails (an HTTP/2 reset, a lost connection).
    async fn fail(&mut self, status: Status) {
        let inbound = self.inbound.take().expect("the stream was ended");
        within("the other end's send", inbound.send(Err(status)))
            .await
            .expect("splice dropped the inbound half");
    }

    /// The other end ends its half of the stream.
    fn end(&mut self) {
        self.inbound = None;
    }

    /// The next chunk `splice` sends that carries bytes or a `fin`, noting the credit it grants
    /// on the way; `None` once `splice` dropped its sending half.
    async fn next(&mut self) -> Option<Chunk> {
        loop {
            let chunk = within("splice's next chunk", self.out.recv()).await?;
            self.granted = self.granted.max(chunk.credit);
            if !chunk.data.is_empty() || chunk.fin {
                return Some(chunk);
            }
        }
    }

    /// The chunks carrying the next `n` bytes `splice` sends; no `fin` or end may come first.
    async fn bytes(&mut self, n: usize) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        let mut got = 0;
        while got < n {
            let chunk = self.next().await.expect("the stream ended early");
            assert!(!chunk.fin, "fin after {got} of {n} bytes");
            got += chunk.data.len();
            chunks.push(chunk);
        }
        assert_eq!(got, n, "more bytes than expected");
        chunks
    }

    async fn expect_fin(&mut self) {
        let chunk = self.next().await.expect("the stream ended without fin");
        assert!(chunk.fin && chunk.data.is_empty(), "{chunk:?}");
    }

    /// `splice` drops its sending half, with no `fin` or bytes before.
    async fn expect_end(&mut self) {
        if let Some(chunk) = self.next().await {
            panic!("expected the end of the stream, got {chunk:?}");
        }
    }

    /// Nothing but credit comes out of `splice` while every task waits for [`HANG`]: no bytes,
    /// no `fin`, and the stream stays open. Paused clock only (it lets [`HANG`] pass).
    async fn expect_silence(&mut self) {
        let deadline = Instant::now() + HANG;
        loop {
            match timeout_at(deadline, self.out.recv()).await {
                Err(_) => return,
                Ok(Some(chunk)) if chunk.data.is_empty() && !chunk.fin => {
                    self.granted = self.granted.max(chunk.credit);
                }
                Ok(other) => panic!("expected nothing, got {other:?}"),
            }
        }
    }
}

/// One spliced connection, from both of its ends.
struct Conn<C = DuplexStream> {
    /// The local peer: the CONNECT client on the server, the upstream on the agent.
    client: C,
    tunnel: Tunnel,
    /// Whether `splice` asked for a reset (pipes only).
    aborted: Arc<AtomicBool>,
    counts: Arc<ByteCounts>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), PumpError>>,
}

impl<C> Conn<C> {
    async fn result(&mut self) -> Result<(), PumpError> {
        within("splice's return", &mut self.task)
            .await
            .expect("splice panicked")
    }

    fn aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

fn spawn<S, C>(
    socket: S,
    client: C,
    aborted: Arc<AtomicBool>,
    role: Role,
    prefix: &'static [u8],
) -> Conn<C>
where
    S: AsyncRead + AsyncWrite + LocalSocket + Send + Unpin + 'static,
{
    let (tx, body) = outbound();
    let out = poll_like_hyper(body);
    let (inbound, mut rx) = mpsc::channel(16);
    let rx = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let counts = Arc::new(ByteCounts::default());
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let (counts, cancel) = (counts.clone(), cancel.clone());
        async move {
            let budget = Budget::new(DEFAULT_BUDGET);
            let prefix = Bytes::from_static(prefix);
            splice(socket, prefix, tx, rx, role, &counts, &budget, &cancel).await
        }
    });
    Conn {
        client,
        tunnel: Tunnel {
            out,
            inbound: Some(inbound),
            granted: 0,
        },
        aborted,
        counts,
        cancel,
        task,
    }
}

/// Polls the body the way hyper's stream task does: whenever it is woken and HTTP/2 has room
/// (here: a small queue), so the body reads the socket without the test asking for each chunk.
/// The body is dropped once the test stops reading, as hyper drops it with a reset stream.
fn poll_like_hyper(mut body: OutboundBody) -> mpsc::Receiver<Chunk> {
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                chunk = body.next() => match chunk {
                    Some(chunk) => {
                        if tx.send(chunk).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                () = tx.closed() => return,
            }
        }
    });
    out
}

/// A connection over a pipe holding `pipe` bytes each way.
fn start(role: Role, pipe: usize) -> Conn {
    start_with_prefix(role, pipe, b"")
}

fn start_with_prefix(role: Role, pipe: usize, prefix: &'static [u8]) -> Conn {
    let (client, io) = tokio::io::duplex(pipe);
    let aborted = Arc::new(AtomicBool::new(false));
    let socket = Local {
        io,
        aborted: aborted.clone(),
    };
    spawn(socket, client, aborted, role, prefix)
}

/// A connection over loopback TCP.
async fn start_tcp(role: Role) -> Conn<TcpStream> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, (socket, _)) = within("loopback connect", async {
        tokio::try_join!(TcpStream::connect(addr), listener.accept())
    })
    .await
    .unwrap();
    spawn(socket, client, Arc::default(), role, b"")
}

/// Both directions finish: the client's bytes and EOF go out, the other end's `fin` comes in.
async fn close_both_ways(conn: &mut Conn) {
    conn.client.shutdown().await.unwrap();
    conn.tunnel.expect_fin().await;
    conn.tunnel.send(fin()).await;
    let mut rest = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "{} bytes left", rest.len());
}
