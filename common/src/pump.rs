//! The byte pump between a local socket (the CONNECT client on the server, the upstream on the
//! agent) and one `Data` stream of the tunnel.
//!
//! Both directions run concurrently and finish independently, so a half-close travels: socket EOF
//! becomes a `fin` chunk, a received `fin` becomes a write shutdown on the socket. A failure in
//! either direction ends the whole connection: the stream's sending half ends without a `fin`,
//! which the other side reads as an abort. The socket is read (by the stream's body itself, see
//! [`outbound`]) only when the peer has granted credit and HTTP/2 has room, so a slow reader on
//! one end throttles the writer on the other through this connection's own window
//! ([`crate::flow`]), never through its neighbours'.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use proxy_proto::Chunk;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::flow::{Budget, Overrun, RecvWindow};
use crate::grpc::{Finish, Frame, Inbound};

mod outbound;

use outbound::ReaderSlot;
pub use outbound::{Outbound, OutboundBody, outbound};

/// Chunks queued behind a blocked socket write before further ones are copied out of the
/// decoder's buffers (see `tunnel_to_socket`).
const PILE_UP: usize = 4;

/// Smallest read: what an idle connection holds while it waits for bytes.
pub const MIN_READ: usize = 2 * 1024;

/// Bytes moved by one tunneled connection, updated as they flow so that metrics and logs see a
/// long-lived stream before it ends.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// Read from the local socket and sent into the tunnel.
    pub sent: AtomicU64,
    /// Received from the tunnel and written to the local socket.
    pub received: AtomicU64,
    /// Metric counters fed alongside (sent, received).
    metrics: Option<(Counter, Counter)>,
}

impl ByteCounts {
    /// Counts that also feed two Prometheus counters: (sent, received).
    pub fn with_metrics(sent: Counter, received: Counter) -> Self {
        Self {
            metrics: Some((sent, received)),
            ..Self::default()
        }
    }

    fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        if let Some((sent, _)) = &self.metrics {
            sent.inc_by(n as u64);
        }
    }

    fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        if let Some((_, received)) = &self.metrics {
            received.inc_by(n as u64);
        }
    }

    /// (sent, received) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// Why a tunneled connection ended other than by both sides finishing cleanly.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading the local socket failed.
    #[error("reading the local socket failed")]
    LocalRead(#[source] io::Error),
    /// Writing the local socket failed.
    #[error("writing the local socket failed")]
    LocalWrite(#[source] io::Error),
    /// The other end of the tunnel aborted the connection (its stream ended without `fin`).
    #[error("the other end of the tunnel aborted the connection")]
    PeerAborted,
    /// The tunnel stream failed (HTTP/2 reset, connection lost).
    #[error("tunnel stream failed")]
    Stream(#[source] Status),
    /// The tunnel stream's sending half is gone.
    #[error("tunnel stream closed")]
    TunnelClosed,
    /// The connection was cancelled (agent gone, shutdown).
    #[error("cancelled")]
    Cancelled,
    /// The other end sent more than its credit.
    #[error("flow control violated by the other end of the tunnel")]
    Overrun(#[from] Overrun),
    /// The other end sent data after its `fin`.
    #[error("the other end of the tunnel sent data after its end of stream")]
    DataAfterFin,
}

/// What the pump needs of a local socket beyond reading and writing.
pub trait LocalSocket {
    /// Arranges for the next drop to reset the connection (TCP RST) instead of closing it.
    fn abort(&self);

    /// Called once, just before this side's FIN goes out (the writing half is shut down). A
    /// TCP socket bounds from then on how long the FIN may go unacknowledged
    /// ([`crate::net::before_fin`]).
    fn before_fin(&self) {}
}

impl LocalSocket for tokio::net::TcpStream {
    fn abort(&self) {
        // Zero linger: close() sends RST at once and never blocks.
        let _ = self.set_zero_linger();
    }

    fn before_fin(&self) {
        if let Err(err) = crate::net::before_fin(self) {
            tracing::debug!(%err, "cannot bound the FIN's wait");
        }
    }
}

impl<IO: LocalSocket> LocalSocket for tokio_rustls::server::TlsStream<IO> {
    fn abort(&self) {
        self.get_ref().0.abort();
    }

    fn before_fin(&self) {
        self.get_ref().0.before_fin();
    }
}

/// A local socket that calls [`LocalSocket::before_fin`] when its writing half is first shut
/// down (the pump splits the socket, after which only the halves are at hand).
struct FinHook<S> {
    socket: S,
    fin: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for FinHook<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + LocalSocket + Unpin> AsyncWrite for FinHook<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !std::mem::replace(&mut this.fin, true) {
            this.socket.before_fin();
        }
        Pin::new(&mut this.socket).poll_shutdown(cx)
    }
}

impl<S: LocalSocket> LocalSocket for FinHook<S> {
    fn abort(&self) {
        self.socket.abort();
    }

    fn before_fin(&self) {
        self.socket.before_fin();
    }
}

/// Which end of the `Data` stream this is; decides the order of the close handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The gRPC client (proxy-agent): ends its request stream first, then waits for the
    /// server's end of stream.
    Agent,
    /// The gRPC server (proxy-server): waits for the agent's end of stream, then ends its
    /// response.
    Server,
}

/// How long a finished connection waits for the other side to end its half of the stream.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One `Data` stream of the tunnel, both halves, as the end that carries a connection holds it:
/// the pump's handle on the sending half, the body that reads the local socket into it, the h2
/// stream that body is written to, and what the peer sends.
pub struct DataStream {
    /// The pump's hold on the sending half.
    pub tx: Outbound,
    /// The sending half's messages, read from the socket once the pump attaches it.
    pub body: OutboundBody,
    /// Where [`crate::grpc::pipe`] writes them.
    pub send: h2::SendStream<Frame>,
    /// The peer's chunks.
    pub inbound: Inbound<Chunk>,
}

impl DataStream {
    /// A stream whose sending half is `send` and receiving half `inbound`.
    pub fn new(send: h2::SendStream<Frame>, inbound: Inbound<Chunk>) -> Self {
        let (tx, body) = outbound();
        Self {
            tx,
            body,
            send,
            inbound,
        }
    }
}

impl std::fmt::Debug for DataStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataStream").finish_non_exhaustive()
    }
}

/// Carries `socket` over `stream` (see [`splice`]) with the stream's sending half in the same
/// task: the body reads the socket when [`crate::grpc::pipe`] asks it for a message, and writes
/// it into the h2 stream, so a chunk crosses no task on its way to the connection. When the
/// sending half fails (the peer reset the stream, the connection is gone) the body is dropped,
/// which the pump learns as a closed tunnel; when the pump ends, the body ends and the stream
/// with it (with trailers on the server's side).
#[allow(clippy::too_many_arguments)]
pub async fn carry<S>(
    socket: S,
    prefix: Bytes,
    stream: DataStream,
    role: Role,
    counts: &Arc<ByteCounts>,
    budget: &Arc<Budget>,
    cancel: &CancellationToken,
) -> Result<(), PumpError>
where
    S: AsyncRead + AsyncWrite + LocalSocket + Send + Unpin + 'static,
{
    let DataStream {
        tx,
        body,
        send,
        inbound,
    } = stream;
    let finish = match role {
        Role::Agent => Finish::Request,
        Role::Server => Finish::Response,
    };
    let spliced = splice(socket, prefix, tx, inbound, role, counts, budget, cancel);
    let sending = async {
        tokio::select! {
            res = crate::grpc::pipe(body, send, crate::grpc::encode_chunk, finish) => {
                if let Err(err) = res {
                    tracing::debug!(%err, "sending half of the tunnel stream failed");
                }
            }
            () = cancel.cancelled() => {}
        }
    };
    let (result, ()) = tokio::join!(spliced, sending);
    result
}

/// Moves bytes between `socket` and the tunnel until both directions have finished, one fails,
/// or `cancel` fires. `prefix` holds bytes already read from the socket (pipelined after a
/// CONNECT head); they are sent first.
///
/// The sending direction runs in `tx`'s body, which [`carry`] polls beside this (see
/// [`outbound`]); this future runs the receiving direction and waits for both.
///
/// After both directions finished, the stream halves are closed in a fixed order (agent's end
/// first, then the server's), never dropped while the other side may still be sending: an HTTP/2
/// stream dropped early is reset, and a reset discards frames still queued, which would lose
/// the connection's last bytes. On failure both halves are dropped at once, which the other
/// side sees as an abort.
///
/// `rx` is the stream's inbound half, an [`Inbound`] in both binaries. It is taken as any stream
/// of chunks so that the unit tests can feed it from a channel.
#[allow(clippy::too_many_arguments)]
pub async fn splice<S, I>(
    socket: S,
    prefix: Bytes,
    tx: Outbound,
    mut rx: I,
    role: Role,
    counts: &Arc<ByteCounts>,
    budget: &Arc<Budget>,
    cancel: &CancellationToken,
) -> Result<(), PumpError>
where
    S: AsyncRead + AsyncWrite + LocalSocket + Send + Unpin + 'static,
    I: Stream<Item = Result<Chunk, Status>> + Unpin,
{
    let (reader, mut writer) = tokio::io::split(FinHook { socket, fin: false });
    let reader = ReaderSlot::new(reader);
    tx.attach(reader.clone(), prefix, counts.clone());
    // What we let the peer send.
    let mut window = RecvWindow::new(budget.clone());
    let both = async {
        tokio::try_join!(
            tx.sent(),
            tunnel_to_socket(
                &mut rx,
                &mut writer,
                counts,
                Grants {
                    tx: &tx,
                    window: &mut window,
                    ends_first: role == Role::Agent,
                }
            )
        )
    };
    let outcome = tokio::select! {
        res = both => res.map(|_| ()),
        () = cancel.cancelled() => Err(PumpError::Cancelled),
    };
    if let Err(err) = outcome {
        // An aborted connection is reset, not closed: the local peer must not mistake a
        // truncated stream for a complete one. Taking the reader back also stops the body
        // reading it.
        if let Some(reader) = reader.take() {
            reader.unsplit(writer).abort();
        }
        return Err(err);
    }
    let tx = match role {
        Role::Agent => {
            drop(tx);
            None
        }
        Role::Server => Some(tx),
    };
    // Both directions are done; the only thing left to read is the end of the stream (and
    // credit the peer may still send, which no one needs any more).
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(Some(_)) = next_message(&mut rx).await {}
    })
    .await;
    drop(tx);
    Ok(())
}

/// The next chunk of the inbound half, as `tonic::Streaming::message` returns it: `Ok(None)` at
/// the end of the stream. Cancel-safe, as the `select!`s below need.
async fn next_message<I>(rx: &mut I) -> Result<Option<Chunk>, Status>
where
    I: Stream<Item = Result<Chunk, Status>> + Unpin,
{
    rx.next().await.transpose()
}

/// What the receiving half needs to grant credit and to pass on the credit it receives.
struct Grants<'a> {
    tx: &'a Outbound,
    window: &'a mut RecvWindow,
    /// This side ends the stream first (the agent, see [`Role`]): once the receiving half is
    /// done, the sending half may end the stream with its `fin`.
    ends_first: bool,
}

async fn tunnel_to_socket<I, W>(
    rx: &mut I,
    writer: W,
    counts: &ByteCounts,
    grants: Grants<'_>,
) -> Result<(), PumpError>
where
    I: Stream<Item = Result<Chunk, Status>> + Unpin,
    W: AsyncWrite,
{
    tokio::pin!(writer);
    let sending_done = grants.tx.sending_done();
    // The stream is read while a write to the socket is pending: it also carries the peer's
    // credit for our sending half, which must not wait behind bytes our local reader has not
    // taken yet (a client that uploads before it reads a response would stall, where plain TCP
    // would not). What is read meanwhile waits here, bounded by the window we granted.
    let mut queued: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    // The chunk being written, and how much of it is out.
    let mut current: Option<(Bytes, usize)> = None;
    let mut waiting_since: Option<std::time::Instant> = None;
    // Bytes written may still sit in a layer above the socket: a TLS stream whose socket was
    // not writable keeps the record it made, and sends it only when written to or flushed
    // again. So once nothing is left to write, the writer is flushed (for a plain socket a
    // no-op), or the last bytes of a burst could wait for the next one.
    let mut unflushed = false;
    let mut fin = false;
    // Whether the stream may still carry something for us. After the peer's fin it carries only
    // credit for our sending half, which is read even while the bytes before the fin wait for
    // the local reader: a client that uploads before it reads a response that has ended must not
    // stall. Reading stops once our sending half is done, or the stream ends after both fins.
    let mut reading = true;
    loop {
        if current.is_none() {
            current = queued.pop_front().map(|data| (data, 0));
        }
        if current.is_none() && fin {
            writer.shutdown().await.map_err(PumpError::LocalWrite)?;
            if grants.ends_first {
                // Nothing more is received, so no credit is granted: our `fin`, when it comes,
                // may end the stream in the same write (one TLS record and one wake-up of the
                // peer fewer than ending it after the pump learns of the `fin`).
                grants.tx.receiving_finished();
            }
            break;
        }
        tokio::select! {
            biased;
            res = write_current(writer.as_mut(), &mut current, &mut waiting_since, &mut unflushed),
                if current.is_some() || unflushed =>
            {
                let n = res.map_err(PumpError::LocalWrite)?;
                if n == 0 {
                    // Flushed.
                    continue;
                }
                if let Some(wait) = waiting_since.take() {
                    grants.window.on_write_waited(wait.elapsed());
                }
                counts.add_received(n);
                if let Some(limit) = grants.window.on_consumed(n as u64) {
                    // After our own fin the peer still needs credit if it has not finished.
                    grants.tx.grant(limit)?;
                }
            }
            () = sending_done.cancelled(), if fin && reading => reading = false,
            msg = next_message(rx), if reading => {
                let chunk = match msg {
                    Ok(Some(chunk)) => chunk,
                    // Both fins were sent: the peer's stream may end while we still write.
                    Ok(None) if fin && sending_done.is_cancelled() => {
                        reading = false;
                        continue;
                    }
                    Ok(None) => return Err(PumpError::PeerAborted),
                    Err(status) => return Err(PumpError::Stream(status)),
                };
                if fin {
                    after_fin(&chunk, &grants)?;
                    continue;
                }
                if chunk.credit > 0 {
                    grants.tx.credit(chunk.credit);
                }
                if !chunk.data.is_empty() {
                    grants.window.on_data(chunk.data.len() as u64, chunk.blocked_at)?;
                    // Bytes piling up behind a blocked write are copied out: as slices they
                    // would keep the decoder's whole receive buffers alive while the reader is
                    // stalled. A chunk or two behind a write that waits briefly (bulk traffic)
                    // stays zero-copy.
                    let data = if queued.len() >= PILE_UP {
                        Bytes::copy_from_slice(&chunk.data)
                    } else {
                        chunk.data
                    };
                    queued.push_back(data);
                }
                fin = chunk.fin;
            }
        }
    }
    if !reading {
        return Ok(());
    }
    // The peer will send no more bytes, but our sending half may still be waiting for its
    // credit: keep reading until it is done or the peer ends the stream.
    loop {
        let msg = tokio::select! {
            biased;
            () = sending_done.cancelled() => return Ok(()),
            msg = next_message(rx) => msg,
        };
        match msg {
            Ok(Some(chunk)) => after_fin(&chunk, &grants)?,
            // Our sending half is not done (checked first, above), so the peer cannot have our
            // fin: a stream that ends now was aborted, and no credit will ever come.
            Ok(None) => return Err(PumpError::PeerAborted),
            Err(status) => return Err(PumpError::Stream(status)),
        }
    }
}

/// A chunk after the peer's fin: credit for our sending half is all it may carry.
fn after_fin(chunk: &Chunk, grants: &Grants<'_>) -> Result<(), PumpError> {
    if !chunk.data.is_empty() || chunk.fin {
        return Err(PumpError::DataAfterFin);
    }
    grants.tx.credit(chunk.credit);
    Ok(())
}

/// Writes the rest of `current` to `writer`; resolves with its length once all of it is out
/// (and clears `current`). Progress survives being dropped in a `select!`: it lives in
/// `current`. Notes in `waiting_since` when the socket first made us wait (its reader is
/// slower than we are: the signal that shrinks this connection's window).
///
/// A complete write leaves the writer `unflushed`; called with nothing to write, it flushes an
/// `unflushed` writer and returns 0.
async fn write_current<W: AsyncWrite>(
    mut writer: Pin<&mut W>,
    current: &mut Option<(Bytes, usize)>,
    waiting_since: &mut Option<std::time::Instant>,
    unflushed: &mut bool,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let Some((data, written)) = current.as_mut() else {
            if *unflushed {
                std::task::ready!(writer.as_mut().poll_flush(cx))?;
                *unflushed = false;
            }
            return Poll::Ready(Ok(0));
        };
        while *written < data.len() {
            match writer.as_mut().poll_write(cx, &data[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    waiting_since.get_or_insert_with(std::time::Instant::now);
                    return Poll::Pending;
                }
            }
        }
        let n = data.len();
        *current = None;
        *unflushed = true;
        Poll::Ready(Ok(n))
    })
    .await
}

#[cfg(test)]
mod tests;
