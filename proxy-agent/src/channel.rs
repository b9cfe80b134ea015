//! The agent's HTTP/2 connection to a server, as a tower service tonic's generated client can
//! use.
//!
//! tonic's own `Channel` puts a `tower::Buffer` in front of the connection: every new stream (one
//! per tunneled connection) is handed to a worker task first, one more task hop on the path of
//! every CONNECT. It also does not expose HTTP/2 `max_frame_size`, which leaves the server's
//! bytes in 16 KiB frames. This is a thin `Service` over hyper's HTTP/2 client connection instead:
//! the caller's task opens the stream itself.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;

/// HTTP/2 settings of the agent's side of a tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Receive window per stream.
    pub stream_window: u32,
    /// Receive window of the connection.
    pub connection_window: u32,
    /// Ping interval.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
}

/// A cloneable handle that opens streams on one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct H2Channel {
    send: SendRequest<Body>,
}

impl H2Channel {
    /// Runs the HTTP/2 handshake over `io`; the connection is driven by a task that ends when
    /// the connection does or when `close` fires.
    pub async fn handshake<IO>(
        io: IO,
        settings: Settings,
        close: CancellationToken,
    ) -> Result<Self, hyper::Error>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_frame_size(proxy_proto::MAX_FRAME)
            .keep_alive_interval(settings.keepalive_interval)
            .keep_alive_timeout(settings.keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(async move {
            tokio::select! {
                res = conn => {
                    if let Err(err) = res {
                        tracing::debug!(%err, "tunnel connection ended");
                    }
                }
                () = close.cancelled() => {}
            }
        });
        Ok(Self { send })
    }
}

impl tower::Service<http::Request<Body>> for H2Channel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}
