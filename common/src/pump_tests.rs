//! Unit tests of [`splice`]. The local socket is one end of a `tokio::io::duplex` pipe (a loopback
//! TCP pair where a reset or a FIN must be seen on the wire: a pipe has neither); the tunnel is a
//! pair of channels standing in for the two halves of a `Data` stream.
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

#[tokio::test]
async fn bytes_a_layer_above_the_socket_holds_are_flushed_without_waiting_for_more() {
    let (mut client, io) = tokio::io::duplex(ROOMY);
    // Holds what is written until it is flushed, as a TLS stream does when its socket is not
    // writable.
    let socket = Local {
        io: tokio::io::BufWriter::with_capacity(64 * 1024, io),
        aborted: Arc::default(),
    };
    let conn = spawn(socket, (), Arc::default(), Role::Server, b"");
    conn.tunnel.send(data(b"the last event of a burst")).await;
    let mut got = [0u8; 25];
    within("the held bytes", client.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"the last event of a burst");
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

#[tokio::test(start_paused = true)]
async fn bytes_cross_both_ways_intact_and_in_order() {
    let mut conn = start(Role::Agent, ROOMY);
    // One write larger than a chunk, there before splice reads: it must go out split.
    let upload = pattern(200_000, 1);
    conn.client.write_all(&upload).await.unwrap();
    let download = pattern(1 + 5_000 + MAX_CHUNK, 2);
    for piece in [&download[..1], &download[1..5_001], &download[5_001..]] {
        conn.tunnel.send(data(piece)).await;
    }

    let chunks = conn.tunnel.bytes(upload.len()).await;
    assert!(concat(&chunks) == upload, "the upload arrived altered");
    let largest = chunks.iter().map(|c| c.data.len()).max().unwrap();
    assert_eq!(largest, MAX_CHUNK, "reads grow to full chunks, no further");
    let mut got = vec![0; download.len()];
    within("the download", conn.client.read_exact(&mut got))
        .await
        .unwrap();
    assert!(got == download, "the download arrived altered");
    assert_eq!(
        conn.counts.get(),
        (upload.len() as u64, download.len() as u64)
    );

    close_both_ways(&mut conn).await;
    conn.tunnel.end();
    conn.result().await.unwrap();
    assert!(!conn.aborted());
}

#[tokio::test(start_paused = true)]
async fn prefix_bytes_go_into_the_tunnel_before_what_the_socket_reads() {
    let mut conn = start_with_prefix(Role::Server, ROOMY, b"pipelined after the CONNECT head");
    conn.client.write_all(b", then read").await.unwrap();
    let first = conn.tunnel.next().await.unwrap();
    assert_eq!(&first.data[..], b"pipelined after the CONNECT head");
    let rest = conn.tunnel.bytes(11).await;
    assert_eq!(concat(&rest), b", then read");
    assert_eq!(conn.counts.get(), (43, 0), "the prefix counts as sent");
}

#[tokio::test(start_paused = true)]
async fn socket_eof_travels_as_fin_while_the_other_direction_flows() {
    let mut conn = start(Role::Agent, ROOMY);
    conn.client.write_all(b"request").await.unwrap();
    conn.client.shutdown().await.unwrap();
    assert_eq!(concat(&conn.tunnel.bytes(7).await), b"request");
    conn.tunnel.expect_fin().await;

    // Half-closed: the response still flows, for as long as it takes.
    for part in [&b"response, "[..], b"in parts"] {
        conn.tunnel.send(data(part)).await;
        let mut got = vec![0; part.len()];
        within("the response", conn.client.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(got, part);
    }
    conn.tunnel.expect_silence().await;
    assert!(!conn.task.is_finished());

    conn.tunnel.send(fin()).await;
    let mut rest = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    conn.tunnel.expect_end().await;
    conn.tunnel.end();
    conn.result().await.unwrap();
    assert!(!conn.aborted());
    assert_eq!(conn.counts.get(), (7, 18));
}

#[tokio::test(start_paused = true)]
async fn a_received_fin_shuts_the_sockets_write_side_while_the_socket_keeps_sending() {
    let mut conn = start(Role::Server, ROOMY);
    conn.tunnel
        .send(Chunk {
            fin: true,
            ..data(b"last words")
        })
        .await;
    let mut got = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"last words", "the bytes of the fin chunk come first");

    // The client reads EOF but may still send, for as long as it takes.
    for part in [&b"still "[..], b"uploading"] {
        conn.client.write_all(part).await.unwrap();
        assert_eq!(concat(&conn.tunnel.bytes(part.len()).await), part);
    }
    conn.tunnel.expect_silence().await;
    assert!(!conn.task.is_finished());
    conn.client.shutdown().await.unwrap();
    conn.tunnel.expect_fin().await;
    conn.tunnel.end();
    conn.result().await.unwrap();
    assert!(!conn.aborted());
    assert_eq!(conn.counts.get(), (15, 10));
}

#[tokio::test(start_paused = true)]
async fn a_slow_local_reader_gets_every_byte_in_order_and_then_eof() {
    let mut conn = start(Role::Server, 1024);
    // More chunks than pile up zero-copy behind the blocked write, the last one with the fin.
    let download = pattern(10 * 16 * 1024, 3);
    let pieces: Vec<&[u8]> = download.chunks(16 * 1024).collect();
    for (i, piece) in pieces.iter().enumerate() {
        conn.tunnel
            .send(Chunk {
                fin: i == pieces.len() - 1,
                ..data(piece)
            })
            .await;
    }
    let mut got = Vec::new();
    let mut small = [0; 700];
    loop {
        let n = within("the download", conn.client.read(&mut small))
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&small[..n]);
        // A writer that loses its place would repeat bytes forever, never idling the clock.
        assert!(got.len() <= download.len(), "more bytes than were sent");
    }
    assert!(got == download, "the download arrived altered");
    assert_eq!(conn.counts.get(), (0, download.len() as u64));
}

#[tokio::test(start_paused = true)]
async fn socket_reads_stop_at_the_peers_credit_until_more_is_granted() {
    let mut conn = start(Role::Agent, ROOMY);
    let upload = pattern(MIN_WINDOW as usize + 10_000, 4);
    conn.client.write_all(&upload).await.unwrap();
    let mut chunks = conn.tunnel.bytes(MIN_WINDOW as usize).await;
    conn.tunnel.expect_silence().await;
    assert_eq!(
        conn.counts.get().0,
        MIN_WINDOW,
        "nothing read from the socket beyond the credit"
    );

    conn.tunnel.send(credit(MIN_WINDOW + 10_000)).await;
    let more = conn.tunnel.bytes(10_000).await;
    assert_eq!(
        more[0].blocked_at, MIN_WINDOW,
        "the first chunk after the wait says where it ran out"
    );
    assert!(more[1..].iter().all(|c| c.blocked_at == 0));
    chunks.extend(more);
    assert!(concat(&chunks) == upload, "the upload arrived altered");
}

#[tokio::test(start_paused = true)]
async fn the_peer_gets_credit_as_the_local_reader_takes_its_bytes() {
    let mut conn = start(Role::Agent, ROOMY);
    let half = MIN_WINDOW as usize / 2;
    conn.tunnel.send(data(&pattern(half - 1, 5))).await;
    let mut got = vec![0; half - 1];
    within("the download", conn.client.read_exact(&mut got))
        .await
        .unwrap();
    conn.tunnel.expect_silence().await;
    assert_eq!(conn.tunnel.granted, 0, "credit is batched");

    conn.tunnel.send(data(b"!")).await;
    within("the download", conn.client.read_exact(&mut got[..1]))
        .await
        .unwrap();
    conn.tunnel.expect_silence().await;
    assert_eq!(
        conn.tunnel.granted,
        half as u64 + MIN_WINDOW,
        "half the window taken: a window's worth past it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_sends_past_its_credit_is_cut_off() {
    let mut conn = start(Role::Server, NARROW);
    // The client reads nothing, so no credit is due: the initial window is all there is.
    for _ in 0..MIN_WINDOW as usize / MAX_CHUNK {
        conn.tunnel.send(data(&[1; MAX_CHUNK])).await;
    }
    conn.tunnel.send(data(b"x")).await;
    match conn.result().await {
        Err(PumpError::Overrun(o)) => {
            assert_eq!((o.received, o.limit), (MIN_WINDOW + 1, MIN_WINDOW));
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.aborted());
    conn.tunnel.expect_end().await;
}

/// The client uploads before it reads: the response (`first`) waits in the pipe, and the
/// upload must still get its credit, as over plain TCP.
async fn upload_gets_credit_behind_an_unread_response(first: Chunk) {
    let mut conn = start(Role::Agent, NARROW);
    conn.tunnel.send(first).await;
    let upload = pattern(MIN_WINDOW as usize + 1_000, 7);
    let (written, _) = tokio::join!(
        within("the upload", conn.client.write_all(&upload)),
        conn.tunnel.bytes(MIN_WINDOW as usize),
    );
    written.unwrap();
    conn.tunnel.send(credit(MIN_WINDOW + 1_000)).await;
    conn.tunnel.bytes(1_000).await;
}

#[tokio::test(start_paused = true)]
async fn credit_reaches_the_sender_while_a_socket_write_is_blocked() {
    upload_gets_credit_behind_an_unread_response(data(&pattern(MAX_CHUNK, 6))).await;
}

/// The same after the peer's `fin`: the stream is still read for our sending half's credit while
/// the bytes before the `fin` wait for the client. (It was not: a client that uploads before it
/// reads a response that has ended stalled for good, where plain TCP does not.)
#[tokio::test(start_paused = true)]
async fn credit_reaches_the_sender_while_the_bytes_before_the_peers_fin_are_blocked() {
    upload_gets_credit_behind_an_unread_response(Chunk {
        fin: true,
        ..data(&pattern(MAX_CHUNK, 6))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn credit_keeps_reaching_the_sender_after_the_peers_fin() {
    let mut conn = start(Role::Agent, ROOMY);
    conn.tunnel.send(fin()).await;
    let mut rest = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut rest))
        .await
        .unwrap();
    conn.client
        .write_all(&pattern(MIN_WINDOW as usize + 1_000, 8))
        .await
        .unwrap();
    conn.tunnel.bytes(MIN_WINDOW as usize).await;
    conn.tunnel.expect_silence().await;
    // More than the rest needs: the socket's EOF is only read with credit to spare.
    conn.tunnel.send(credit(2 * MIN_WINDOW)).await;
    conn.tunnel.bytes(1_000).await;
    conn.client.shutdown().await.unwrap();
    conn.tunnel.expect_fin().await;
    conn.tunnel.expect_end().await;
    conn.tunnel.end();
    conn.result().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_ends_without_fin_aborts_the_connection_at_once() {
    let mut conn = start(Role::Server, ROOMY);
    conn.client.write_all(b"hello").await.unwrap();
    assert_eq!(concat(&conn.tunnel.bytes(5).await), b"hello");
    let t = Instant::now();
    conn.tunnel.end();
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::PeerAborted)), "{res:?}");
    assert_eq!(t.elapsed(), Duration::ZERO, "no close handshake");
    assert!(conn.aborted(), "the local socket is reset");
    conn.tunnel.expect_end().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_stream_aborts_the_connection_with_its_status() {
    let mut conn = start(Role::Agent, ROOMY);
    conn.tunnel.send(data(b"partial")).await;
    let mut got = [0; 7];
    within("the download", conn.client.read_exact(&mut got))
        .await
        .unwrap();
    conn.tunnel
        .fail(Status::unavailable("connection lost"))
        .await;
    match conn.result().await {
        Err(PumpError::Stream(status)) => {
            assert_eq!(status.code(), Code::Unavailable);
            assert_eq!(status.message(), "connection lost");
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.aborted());
    conn.tunnel.expect_end().await;
    assert_eq!(conn.counts.get(), (0, 7));
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_ends_after_the_peers_fin_but_before_ours_is_an_abort() {
    let mut conn = start(Role::Server, ROOMY);
    conn.tunnel.send(fin()).await;
    let mut rest = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut rest))
        .await
        .unwrap();
    // The other end cannot have our fin yet: ending the stream now gives up on our bytes.
    conn.tunnel.end();
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::PeerAborted)), "{res:?}");
    assert!(conn.aborted());
    conn.tunnel.expect_end().await;
}

#[tokio::test(start_paused = true)]
async fn bytes_after_the_peers_fin_are_refused() {
    let mut conn = start(Role::Agent, ROOMY);
    conn.tunnel.send(fin()).await;
    conn.tunnel.send(data(b"too late")).await;
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::DataAfterFin)), "{res:?}");
    assert!(conn.aborted());
    let mut got = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(got.is_empty(), "nothing after the fin reaches the client");
}

#[tokio::test(start_paused = true)]
async fn cancel_ends_both_directions_at_once_even_when_both_wait() {
    let mut conn = start(Role::Server, NARROW);
    // The socket write waits for a client that does not read, the socket read for credit.
    conn.tunnel.send(data(&pattern(MAX_CHUNK, 9))).await;
    let upload = pattern(MIN_WINDOW as usize + 1_000, 10);
    let (written, _) = tokio::join!(
        within("the upload", conn.client.write_all(&upload)),
        conn.tunnel.bytes(MIN_WINDOW as usize),
    );
    written.unwrap();
    conn.tunnel.expect_silence().await;

    let t = Instant::now();
    conn.cancel.cancel();
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::Cancelled)), "{res:?}");
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert!(conn.aborted());
    conn.tunnel.expect_end().await;
}

#[tokio::test(start_paused = true)]
async fn the_agent_ends_its_half_first_then_waits_for_the_servers_end() {
    let mut conn = start(Role::Agent, ROOMY);
    close_both_ways(&mut conn).await;
    conn.tunnel.expect_end().await;
    // Dropping the response half now would reset the stream and lose what the server still
    // has queued: its end of stream is awaited.
    assert!(
        timeout(HANG, &mut conn.task).await.is_err(),
        "returned before the server ended its half"
    );
    // Late credit is read and ignored; only the end of stream ends the wait.
    conn.tunnel.send(credit(1 << 30)).await;
    assert!(timeout(HANG, &mut conn.task).await.is_err());
    conn.tunnel.end();
    conn.result().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_server_keeps_its_half_open_until_the_agent_has_ended_its_own() {
    let mut conn = start(Role::Server, ROOMY);
    close_both_ways(&mut conn).await;
    conn.tunnel.expect_silence().await;
    assert!(!conn.task.is_finished());
    conn.tunnel.end();
    conn.tunnel.expect_end().await;
    conn.result().await.unwrap();
    assert!(!conn.aborted());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_ends_its_half_is_given_up_after_the_close_timeout() {
    let mut conn = start(Role::Server, ROOMY);
    close_both_ways(&mut conn).await;
    let t = Instant::now();
    let res = timeout(2 * CLOSE_TIMEOUT, &mut conn.task)
        .await
        .expect("splice still waiting")
        .unwrap();
    res.unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= CLOSE_TIMEOUT - Duration::from_millis(10)
            && waited <= CLOSE_TIMEOUT + Duration::from_millis(10),
        "{waited:?}"
    );
    assert!(!conn.aborted(), "a late close is still a close");
    conn.tunnel.expect_end().await;
}

#[tokio::test]
async fn an_abort_resets_the_local_tcp_connection() {
    let mut conn = start_tcp(Role::Server).await;
    conn.tunnel.send(data(b"partial")).await;
    let mut got = [0; 7];
    within("the download", conn.client.read_exact(&mut got))
        .await
        .unwrap();
    conn.tunnel.end();
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::PeerAborted)), "{res:?}");
    let err = within("the client's read", conn.client.read(&mut got))
        .await
        .expect_err("a truncated connection must not read as a clean EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn a_received_fin_is_a_tcp_fin_not_a_reset() {
    let mut conn = start_tcp(Role::Server).await;
    conn.tunnel
        .send(Chunk {
            fin: true,
            ..data(b"complete")
        })
        .await;
    let mut got = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"complete");
    conn.client.write_all(b"ack").await.unwrap();
    conn.client.shutdown().await.unwrap();
    assert_eq!(concat(&conn.tunnel.bytes(3).await), b"ack");
    conn.tunnel.expect_fin().await;
    conn.tunnel.end();
    conn.result().await.unwrap();
}

#[tokio::test]
async fn a_reset_from_the_local_peer_travels_as_an_abort_without_fin() {
    let mut conn = start_tcp(Role::Agent).await;
    conn.client.write_all(b"hello").await.unwrap();
    assert_eq!(concat(&conn.tunnel.bytes(5).await), b"hello");
    conn.client.set_zero_linger().unwrap();
    let Conn {
        client,
        mut tunnel,
        task,
        ..
    } = conn;
    drop(client);
    let res = within("splice's return", task).await.unwrap();
    match res {
        Err(PumpError::LocalRead(err)) => {
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        }
        other => panic!("{other:?}"),
    }
    tunnel.expect_end().await;
}
