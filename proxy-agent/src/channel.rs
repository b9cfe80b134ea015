//! The agent's HTTP/2 connection to a server, on h2 directly (see [`proxy_common::grpc`] for
//! why).
//!
//! The connection is driven by one task, which also keeps it alive with pings; streams are
//! opened by the tasks that use them.

use std::time::Duration;

use h2::client::{self, SendRequest};
use proxy_common::grpc::{Frame, Inbound};
use proxy_common::pump::DataStream;
use proxy_proto::ServerMessage;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

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

/// Largest header block accepted from the server (hyper's default, which the agent used before).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A cloneable handle that opens streams on one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct H2Channel {
    send: SendRequest<Frame>,
}

impl H2Channel {
    /// Runs the HTTP/2 handshake over `io`; the connection is driven by a task that ends when
    /// the connection does, when a ping goes unanswered while nothing at all arrived from the
    /// server for `keepalive_timeout`, or when
    /// `close` fires. Every stream on it fails then.
    pub async fn handshake<IO>(
        io: IO,
        settings: Settings,
        close: CancellationToken,
    ) -> Result<Self, h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // Every byte from the server counts as its answer to our pings (see `heard`).
        let heard = proxy_common::heard::Heard::default();
        let io = proxy_common::heard::Listening::new(io, heard.clone());
        let (send, mut conn) = client::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_frame_size(proxy_proto::MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            // No HPACK dynamic table for the server's headers: they are a status, a content
            // type and a `grpc-status` per stream, a few dozen bytes as literals, and the table
            // cost the server about 0.4 KiB of encoder state per connected agent.
            .header_table_size(0)
            .enable_push(false)
            .handshake::<_, Frame>(io)
            .await?;
        let ping = conn.ping_pong();
        tokio::spawn(async move {
            tokio::select! {
                res = &mut conn => {
                    if let Err(err) = res {
                        tracing::debug!(%err, "tunnel connection ended");
                    }
                }
                reason = proxy_common::grpc::keepalive(ping, settings.keepalive_interval, settings.keepalive_timeout, heard) => {
                    tracing::debug!(reason, "tunnel connection dropped");
                }
                () = close.cancelled() => {}
            }
        });
        Ok(Self { send })
    }

    /// Opens the `Control` stream.
    pub async fn open_control(
        &self,
    ) -> Result<(h2::SendStream<Frame>, Inbound<ServerMessage>), h2::Error> {
        let (send, response) = self.open(proxy_proto::CONTROL_PATH, None).await?;
        Ok((send, Inbound::new(response)))
    }

    /// Opens a `Data` stream carrying `header` (the dial id, or the warm mark). Only the request
    /// goes out: the server's answer is awaited by reading the stream.
    pub async fn open_data(
        &self,
        header: (&'static str, http::HeaderValue),
    ) -> Result<DataStream, h2::Error> {
        let (send, response) = self.open(proxy_proto::DATA_PATH, Some(header)).await?;
        Ok(DataStream::new(send, Inbound::new(response)))
    }

    async fn open(
        &self,
        path: &'static str,
        header: Option<(&'static str, http::HeaderValue)>,
    ) -> Result<(h2::SendStream<Frame>, client::ResponseFuture), h2::Error> {
        // Waits while the server's stream limit is reached.
        let mut send = self.send.clone().ready().await?;
        // The authority is only a label: the connection is already made.
        let mut request = http::Request::post(format!("https://proxy-server{path}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .expect("a valid request");
        if let Some((name, value)) = header {
            request.headers_mut().insert(name, value);
        }
        let (response, send) = send.send_request(request, false)?;
        Ok((send, response))
    }
}

#[cfg(test)]
#[path = "channel_tests.rs"]
mod tests;
