//! The sending half of a tunneled connection's `Data` stream: an HTTP/2 body that reads the local
//! socket itself.
//!
//! Why not a channel: with a task reading the socket and an `mpsc` queue into the body, every
//! chunk crossed two tasks before reaching HTTP/2 (the reader's, then the one polling the body),
//! and on a small request each crossing is a wake-up and often a context switch. Here the task
//! that writes the stream ([`crate::grpc::pipe`], run by [`super::carry`] in the connection's
//! own task) reads the socket when it polls the body, so a chunk is read, encoded and handed to
//! HTTP/2 in one go. The socket is still read only while the peer has granted credit (and the
//! pipe only polls while HTTP/2 has room), so the connection's window keeps bounding what is
//! read ahead.
//!
//! [`Outbound`] is the pump's hold on the body: it attaches the socket once there is one (a
//! warm stream exists before its client), passes on the credit the peer grants, queues the
//! credit we grant and the `start` of a warm stream (they travel in the next chunk, or alone),
//! and ends the stream when dropped. The body keeps no queue: credit is an absolute offset, so
//! only the latest grant needs to go out.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use proxy_proto::{Chunk, MAX_CHUNK};
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use super::{ByteCounts, MIN_READ, PumpError};
use crate::flow::MIN_WINDOW;

/// A new `Data` stream's sending half: the handle for the pump and the body for the pipe.
pub fn outbound() -> (Outbound, OutboundBody) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            waker: None,
            start: false,
            grant: 0,
            peer_limit: MIN_WINDOW,
            source: None,
            closing: false,
            body_gone: false,
            end_with_fin: false,
            fin_sent: false,
            failure: None,
        }),
        sending_done: CancellationToken::new(),
    });
    let body = OutboundBody {
        shared: shared.clone(),
        source: None,
        buf: BytesMut::new(),
        want: MIN_READ,
        sent: 0,
        blocked_at: 0,
        done: false,
    };
    (Outbound { shared }, body)
}

/// The local socket's reading half, read by the body while the pump holds the writing half.
/// The pump can take it back (to reset the socket when the connection fails), after which the
/// body reads nothing more.
pub(super) trait Source: Send + Sync {
    /// Reads into `buf`; `None` once the pump took the socket back.
    fn poll_read_buf(
        &self,
        cx: &mut Context<'_>,
        buf: &mut bytes::buf::Limit<&mut BytesMut>,
    ) -> Option<Poll<io::Result<usize>>>;
}

/// The reading half in a slot the pump can empty.
pub(super) struct ReaderSlot<R>(Mutex<Option<R>>);

impl<R> ReaderSlot<R> {
    pub(super) fn new(reader: R) -> Arc<Self> {
        Arc::new(Self(Mutex::new(Some(reader))))
    }

    /// Takes the reader back; the body reads nothing more.
    pub(super) fn take(&self) -> Option<R> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl<R: AsyncRead + Send + Unpin> Source for ReaderSlot<R> {
    fn poll_read_buf(
        &self,
        cx: &mut Context<'_>,
        buf: &mut bytes::buf::Limit<&mut BytesMut>,
    ) -> Option<Poll<io::Result<usize>>> {
        let mut reader = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let reader = reader.as_mut()?;
        Some(tokio_util::io::poll_read_buf(Pin::new(reader), cx, buf))
    }
}

struct Shared {
    state: Mutex<State>,
    /// Fired when the body will send nothing more of its own: it sent `fin`, the socket read
    /// failed, or the pipe dropped the body.
    sending_done: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Held only for short synchronous sections that cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the handle and the body share.
struct State {
    /// The task polling the body, woken when there is something to send.
    waker: Option<Waker>,
    /// `Chunk.start` is to go out (a warm stream was handed out).
    start: bool,
    /// Credit we grant the peer, not sent yet; 0 if none.
    grant: u64,
    /// What the peer lets us send: the highest `Chunk.credit` received.
    peer_limit: u64,
    /// The socket and what to send first, until the body takes them.
    source: Option<Attached>,
    /// The handle is gone: send what is queued, then end the stream.
    closing: bool,
    /// The pipe dropped the body (the stream ended or was reset).
    body_gone: bool,
    /// The receiving half is done and this side ends the stream first: `fin` ends it at once.
    end_with_fin: bool,
    fin_sent: bool,
    /// Why reading the socket failed.
    failure: Option<io::Error>,
}

impl State {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

struct Attached {
    reader: Arc<dyn Source>,
    /// Bytes already read from the socket (pipelined after a CONNECT head), sent first.
    prefix: Bytes,
    counts: Arc<ByteCounts>,
}

/// The pump's hold on the sending half. Dropping it ends the stream once what is queued went
/// out: after our `fin` that is a clean end, before it the peer reads an abort.
pub struct Outbound {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").finish_non_exhaustive()
    }
}

impl Outbound {
    /// Tells the agent its warm stream was handed out (`Chunk.start`). False if the stream is
    /// gone.
    pub fn start(&self) -> bool {
        let mut state = self.shared.lock();
        if state.body_gone {
            return false;
        }
        state.start = true;
        state.wake();
        true
    }

    /// Whether the pipe dropped the body: the stream ended or was reset.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().body_gone
    }

    /// Starts reading `reader` into the stream, `prefix` first.
    pub(super) fn attach(&self, reader: Arc<dyn Source>, prefix: Bytes, counts: Arc<ByteCounts>) {
        let mut state = self.shared.lock();
        state.source = Some(Attached {
            reader,
            prefix,
            counts,
        });
        state.wake();
    }

    /// Queues our credit for the peer (an absolute offset: a later grant replaces an unsent
    /// one).
    pub(super) fn grant(&self, limit: u64) -> Result<(), PumpError> {
        let mut state = self.shared.lock();
        if state.body_gone {
            return Err(PumpError::TunnelClosed);
        }
        state.grant = state.grant.max(limit);
        state.wake();
        Ok(())
    }

    /// The peer lets us send up to `limit` (credit only grows).
    pub(super) fn credit(&self, limit: u64) {
        let mut state = self.shared.lock();
        if limit > state.peer_limit {
            state.peer_limit = limit;
            state.wake();
        }
    }

    /// The receiving half is done (its bytes written, the socket's sending side shut) on the
    /// side that ends the stream first: no credit will be granted any more, so the stream may
    /// end with our `fin`, queued to h2 in the same poll, rather than when the pump lets go.
    pub(super) fn receiving_finished(&self) {
        self.shared.lock().end_with_fin = true;
    }

    /// Fires once the body will send nothing more of its own.
    pub(super) fn sending_done(&self) -> &CancellationToken {
        &self.shared.sending_done
    }

    /// Waits until the body sent `fin` (`Ok`), the socket read failed, or the stream went away
    /// before `fin`.
    pub(super) async fn sent(&self) -> Result<(), PumpError> {
        self.shared.sending_done.cancelled().await;
        let mut state = self.shared.lock();
        if let Some(err) = state.failure.take() {
            return Err(PumpError::LocalRead(err));
        }
        if state.fin_sent {
            Ok(())
        } else {
            Err(PumpError::TunnelClosed)
        }
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closing = true;
        state.wake();
    }
}

/// The body sent on the `Data` stream: control first, then bytes read from the socket.
pub struct OutboundBody {
    shared: Arc<Shared>,
    source: Option<Attached>,
    buf: BytesMut,
    /// The next read's size: an idle or chatty connection (a watch, small API calls) holds a
    /// small buffer while it waits, a bulk transfer grows to full chunks after a few reads.
    want: usize,
    /// Bytes sent, against the peer's credit.
    sent: u64,
    /// Where we last ran out of credit, told to the peer with the next chunk (the signal that
    /// grows its window for us); 0 if we did not wait.
    blocked_at: u64,
    /// Nothing more is read: `fin` went out, or the read failed.
    done: bool,
}

impl std::fmt::Debug for OutboundBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundBody")
            .field("sent", &self.sent)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl OutboundBody {
    /// Reads the socket into `chunk` if the peer's credit allows. Returns `Err` with the read's
    /// failure.
    fn read(
        &mut self,
        cx: &mut Context<'_>,
        peer_limit: u64,
        chunk: &mut Chunk,
    ) -> Result<(), io::Error> {
        let Some(source) = &mut self.source else {
            return Ok(());
        };
        if !source.prefix.is_empty() {
            // At most a CONNECT head's size: always within the initial credit.
            let prefix = std::mem::take(&mut source.prefix);
            source.counts.add_sent(prefix.len());
            self.sent += prefix.len() as u64;
            chunk.data = prefix;
            return Ok(());
        }
        if self.sent >= peer_limit {
            // Out of credit: a grant wakes us.
            if self.blocked_at == 0 {
                self.blocked_at = self.sent;
            }
            return Ok(());
        }
        let now = self
            .want
            .min(usize::try_from(peer_limit - self.sent).unwrap_or(usize::MAX));
        if self.buf.capacity() < now {
            // Reuses the allocation once earlier chunks have been sent and dropped.
            self.buf.reserve(now);
        }
        let n = match source
            .reader
            .poll_read_buf(cx, &mut (&mut self.buf).limit(now))
        {
            Some(Poll::Pending) => {
                if self.buf.is_empty() && self.want == MIN_READ {
                    // An idle connection holds no buffer while it waits: the next poll comes
                    // when the socket is readable, and allocates then. (A bulk transfer, whose
                    // reads are larger, keeps its buffer: freeing and faulting back 64 KiB at
                    // every drained socket would cost more than it saves.)
                    self.buf = BytesMut::new();
                }
                return Ok(());
            }
            // The pump took the socket back (it is ending the stream).
            None => return Ok(()),
            Some(Poll::Ready(res)) => res?,
        };
        self.want = if n == now {
            (self.want * 2).min(MAX_CHUNK)
        } else {
            (self.want / 2).max(MIN_READ)
        };
        chunk.blocked_at = std::mem::take(&mut self.blocked_at);
        if n == 0 {
            chunk.fin = true;
            self.done = true;
            // Nothing more is read: the buffer goes now, not with the stream.
            self.buf = BytesMut::new();
            return Ok(());
        }
        source.counts.add_sent(n);
        self.sent += n as u64;
        chunk.data = self.buf.split().freeze();
        Ok(())
    }
}

fn is_empty(chunk: &Chunk) -> bool {
    chunk.data.is_empty() && !chunk.fin && chunk.credit == 0
}

impl Stream for OutboundBody {
    type Item = Chunk;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        let this = self.get_mut();
        let mut chunk = Chunk::default();
        let peer_limit = {
            let mut state = this.shared.lock();
            if std::mem::take(&mut state.start) {
                // Alone: an agent waiting for its warm stream to be handed out reads this chunk
                // for `start` only, so bytes or credit riding with it would be lost.
                return Poll::Ready(Some(Chunk {
                    start: true,
                    ..Chunk::default()
                }));
            }
            chunk.credit = std::mem::take(&mut state.grant);
            if state.closing {
                return Poll::Ready((!is_empty(&chunk)).then_some(chunk));
            }
            if this.source.is_none() {
                this.source = state.source.take();
            }
            if !state
                .waker
                .as_ref()
                .is_some_and(|waker| waker.will_wake(cx.waker()))
            {
                state.waker = Some(cx.waker().clone());
            }
            state.peer_limit
        };
        if !this.done {
            let res = this.read(cx, peer_limit, &mut chunk);
            let mut state = this.shared.lock();
            match res {
                Ok(()) if chunk.fin => {
                    state.fin_sent = true;
                    // The next poll, which the pipe makes right after queuing this chunk, ends
                    // the stream.
                    state.closing |= state.end_with_fin;
                    this.shared.sending_done.cancel();
                }
                Ok(()) => {}
                Err(err) => {
                    // The pump ends the connection (and with it this stream) when it learns.
                    state.failure = Some(err);
                    this.done = true;
                    this.source = None;
                    this.shared.sending_done.cancel();
                }
            }
        }
        if is_empty(&chunk) {
            Poll::Pending
        } else {
            Poll::Ready(Some(chunk))
        }
    }
}

impl Drop for OutboundBody {
    fn drop(&mut self) {
        self.shared.lock().body_gone = true;
        self.shared.sending_done.cancel();
    }
}

#[cfg(test)]
#[path = "outbound_tests.rs"]
mod tests;
