//! A read-ahead buffer under TLS.
//!
//! rustls pulls ciphertext in 4 KiB reads, so a bulk transfer over a tunnel costs four or five
//! `recv` calls per 16 KiB record; on a 2-core machine those system calls (and the softirq work
//! each one triggers) were a large share of the tunnel's CPU. [`ReadAhead`] reads the socket in
//! large pieces and serves rustls's small reads from memory.
//!
//! The buffer adapts like the pump's read size: it starts small, doubles while reads fill it, and
//! is released whenever it has been drained after a short read, so the thousands of idle
//! connections a server holds keep no read buffer at all.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pump::LocalSocket;

/// Smallest read from the socket once the buffer is in use.
pub const MIN_READ_AHEAD: usize = 4 * 1024;
/// Largest read from the socket.
pub const MAX_READ_AHEAD: usize = 64 * 1024;

/// An I/O object whose reads go through an adaptive buffer; writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<IO> {
    io: IO,
    buf: BytesMut,
    want: usize,
}

impl<IO> ReadAhead<IO> {
    /// Wraps `io`; nothing is allocated until the first read.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            want: MIN_READ_AHEAD,
        }
    }

    /// The wrapped I/O object.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The wrapped I/O object, to change it under whatever sits on top (see the server's
    /// `shards::Movable`); buffered bytes stay.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// Bytes read from the socket but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Copies buffered bytes into `out`; frees the buffer once drained if the connection is
    /// not streaming (the last socket read was the smallest size).
    fn serve(&mut self, out: &mut ReadBuf<'_>) {
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        if self.buf.is_empty() && self.want == MIN_READ_AHEAD {
            self.buf = BytesMut::new();
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            this.serve(out);
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= this.want {
            // The caller asks for at least a buffer's worth: no reason to copy.
            return Pin::new(&mut this.io).poll_read(cx, out);
        }
        if this.buf.capacity() < this.want {
            // Reuses the allocation: the buffer is empty here, so `reserve` reclaims it.
            this.buf.reserve(this.want);
        }
        let want = this.want;
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut this.io),
            cx,
            &mut (&mut this.buf).limit(want),
        ))?;
        this.want = if n == want {
            (want * 2).min(MAX_READ_AHEAD)
        } else {
            (want / 2).max(MIN_READ_AHEAD)
        };
        this.serve(out);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: LocalSocket> LocalSocket for ReadAhead<IO> {
    fn abort(&self) {
        self.io.abort();
    }

    fn before_fin(&self) {
        self.io.before_fin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_the_buffer_grows_while_streaming() {
        let (mut peer, io) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            peer.write_all(&sent).await.unwrap();
            peer.shutdown().await.unwrap();
        });
        let mut reader = ReadAhead::new(io);
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        let mut grew = false;
        loop {
            let n = reader.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            grew |= reader.want > MIN_READ_AHEAD;
            got.extend_from_slice(&small[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
        assert!(grew, "a bulk stream must grow the read size");
    }

    #[tokio::test]
    async fn an_idle_connection_keeps_no_buffer() {
        let (mut peer, io) = tokio::io::duplex(1 << 16);
        let mut reader = ReadAhead::new(io);
        peer.write_all(b"hello").await.unwrap();
        let mut small = [0u8; 16];
        let n = reader.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"hello");
        assert_eq!(reader.buffered(), 0);
        assert_eq!(
            reader.buf.capacity(),
            0,
            "drained after a short read: released"
        );
    }

    #[tokio::test]
    async fn large_reads_bypass_the_buffer_and_writes_pass_through() {
        let (mut peer, io) = tokio::io::duplex(1 << 16);
        let mut reader = ReadAhead::new(io);
        peer.write_all(&[7u8; 100]).await.unwrap();
        let mut big = vec![0u8; MAX_READ_AHEAD];
        let n = reader.read(&mut big).await.unwrap();
        assert_eq!(n, 100);
        assert_eq!(reader.buf.capacity(), 0);
        reader.write_all(b"pong").await.unwrap();
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong");
    }
}
