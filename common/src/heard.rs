//! "A busy peer is alive": proof of life that does not wait behind the peer's own data.
//!
//! A member on a slow, bufferbloated uplink that is busy sending (a few `kubectl logs -f`) queues
//! its answer to our ping behind seconds of data in its socket buffers and the link's queue. A
//! fixed pong deadline then takes a healthy, busy agent for dead. Every byte that arrives on the
//! connection is the same proof of life as a pong, so [`Listening`] counts the reads that bring
//! bytes, and [`Silence`] judges a peer by how long nothing at all has arrived, not by when the
//! pong came. A peer that really vanished sends nothing, and is noticed as fast as before.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How many reads brought bytes from the peer of one connection. Cloned to whoever judges the
/// peer's liveness.
#[derive(Debug, Clone, Default)]
pub struct Heard(Arc<AtomicU64>);

impl Heard {
    /// The count so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// An IO that counts into a [`Heard`] every read that returned bytes.
#[derive(Debug)]
pub struct Listening<T> {
    io: T,
    heard: Heard,
}

impl<T> Listening<T> {
    /// Wraps `io`, counting into `heard`.
    pub fn new(io: T, heard: Heard) -> Self {
        Self { io, heard }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Listening<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            // Relaxed: a count, read by a judge that only compares it with an earlier reading.
            self.heard.0.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Listening<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Judges a peer that owes an answer (a pong) by its silence: it is silent once nothing has
/// arrived for `limit` since the question was asked. Checked at a quarter of `limit`, so a peer
/// is judged at most `limit` + `limit` / 4 after the last bytes it sent (or after the question).
#[derive(Debug)]
pub struct Silence {
    heard: Heard,
    limit: Duration,
    last_count: u64,
    last_heard: Instant,
}

impl Silence {
    /// Starts listening for `limit` of silence, from now.
    pub fn new(heard: Heard, limit: Duration) -> Self {
        let last_count = heard.count();
        Self {
            heard,
            limit,
            last_count,
            last_heard: Instant::now(),
        }
    }

    /// When to look again.
    pub fn next_check(&self) -> Instant {
        Instant::now() + self.limit / 4
    }

    /// Looks at the count now: `true` if nothing arrived for `limit`.
    pub fn silent(&mut self) -> bool {
        let count = self.heard.count();
        if count != self.last_count {
            self.last_count = count;
            self.last_heard = Instant::now();
        }
        self.last_heard.elapsed() >= self.limit
    }

    /// How long nothing has arrived, as of the last look.
    pub fn quiet_for(&self) -> Duration {
        self.last_heard.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_that_bring_bytes_are_counted() {
        let (a, mut b) = tokio::io::duplex(64);
        let heard = Heard::default();
        let mut listening = Listening::new(a, heard.clone());
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        listening.read_exact(&mut buf).await.unwrap();
        assert!(heard.count() >= 1);
        let before = heard.count();
        listening.write_all(b"out").await.unwrap();
        drop(b);
        assert_eq!(listening.read(&mut buf).await.unwrap(), 0);
        assert_eq!(heard.count(), before, "writes and EOF are no sign of life");
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_peer_is_not_silent_and_a_quiet_one_is() {
        let heard = Heard::default();
        let mut silence = Silence::new(heard.clone(), Duration::from_secs(1));
        // Bytes keep arriving every 300 ms for 5 s: never silent, however late the pong.
        for _ in 0..16 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            heard.0.fetch_add(1, Ordering::Relaxed);
            assert!(!silent_at_next_check(&mut silence).await);
        }
        // Then nothing: silent within limit + limit / 4 of the last bytes.
        let last = Instant::now();
        while !silent_at_next_check(&mut silence).await {}
        let judged = last.elapsed();
        assert!(
            judged >= Duration::from_secs(1) && judged <= Duration::from_millis(1250),
            "{judged:?}"
        );
    }

    async fn silent_at_next_check(silence: &mut Silence) -> bool {
        tokio::time::sleep_until(silence.next_check()).await;
        silence.silent()
    }
}
