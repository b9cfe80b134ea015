//! gRPC over h2 directly: the framing of the tunnel's streams, on both ends, without tonic's
//! client and server stacks.
//!
//! Why not tonic over hyper: hyper spawns a task for every stream. Its client spawns two per
//! stream the agent opens (one pipes the request body into h2, one waits for the response head)
//! and opens each through its connection task's queue; its server runs each stream's service and
//! response body in a task of its own, so every byte a CONNECT client sent crossed that task on
//! its way to the agent's connection. Here the task that serves a tunneled connection opens or
//! accepts its stream, writes into it ([`pipe`]) and reads from it ([`Inbound`]) itself. The wire
//! format is tonic's: the same requests, 5-byte length-prefixed protobuf messages and
//! `grpc-status` trailers (or a trailers-only response for a refusal), so agents and servers
//! built on tonic interoperate with these.

use std::future::{Future, poll_fn};
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::buf::Chain;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use h2::client::ResponseFuture;
use h2::{RecvStream, SendStream};
use prost::Message;
use proxy_proto::{Chunk, MAX_MESSAGE};
use tonic::{Code, Status};

/// What the agent writes into a stream: a message's head and, for a `Chunk`, its payload behind
/// it, so that a chunk read from the upstream reaches h2 without being copied.
pub type Frame = Chain<Bytes, Bytes>;

/// Length of the gRPC message prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

/// Field number of `Chunk.data` (tunnel.proto).
const CHUNK_DATA_TAG: u32 = 1;

/// `msg` with its gRPC prefix.
pub fn encode<M: Message>(msg: M) -> Frame {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    put_prefix(&mut buf, len);
    msg.encode(&mut buf)
        .expect("the buffer was sized by encoded_len");
    buf.freeze().chain(Bytes::new())
}

/// A chunk with its gRPC prefix; its payload is not copied but follows the encoded rest (protobuf
/// fields may come in any order).
pub fn encode_chunk(mut chunk: Chunk) -> Frame {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let data = std::mem::take(&mut chunk.data);
    let rest = chunk.encoded_len();
    let data_field = if data.is_empty() {
        0
    } else {
        key_len(CHUNK_DATA_TAG) + encoded_len_varint(data.len() as u64)
    };
    let mut head = BytesMut::with_capacity(PREFIX + rest + data_field);
    put_prefix(&mut head, rest + data_field + data.len());
    chunk
        .encode(&mut head)
        .expect("the buffer was sized by encoded_len");
    if !data.is_empty() {
        encode_key(CHUNK_DATA_TAG, WireType::LengthDelimited, &mut head);
        encode_varint(data.len() as u64, &mut head);
    }
    head.freeze().chain(data)
}

fn put_prefix(buf: &mut BytesMut, len: usize) {
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("messages are far below 4 GiB"));
}

/// How the sending half of a stream ends once its messages did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A request (the agent's half): an empty DATA frame with END_STREAM.
    Request,
    /// A response (the server's half): trailers with `grpc-status: 0`.
    Response,
}

/// Writes `messages` into `send` until the stream of messages ends (then ends the HTTP/2
/// stream as `finish` says) or the stream fails.
///
/// Like hyper's body pipe: a message is taken only when the last one was handed to h2, and
/// handed over only once the stream has send capacity, so h2 buffers at most one message per
/// stream beyond its window. Watching for a reset while waiting ends the pipe promptly when
/// the server drops the stream.
pub async fn pipe<S, M>(
    mut messages: S,
    mut send: SendStream<Frame>,
    encode: fn(M) -> Frame,
    finish: Finish,
) -> Result<(), h2::Error>
where
    S: Stream<Item = M> + Unpin,
{
    let mut waiting: Option<Frame> = None;
    poll_fn(|cx| {
        loop {
            if let Poll::Ready(reason) = send.poll_reset(cx)? {
                return Poll::Ready(Err(h2::Error::from(reason)));
            }
            if let Some(frame) = waiting.take() {
                if let Err(pending) = wait_capacity(&mut send, cx) {
                    waiting = Some(frame);
                    return pending.map(Err);
                }
                send.send_data(frame, false)?;
                continue;
            }
            match ready!(messages.poll_next_unpin(cx)) {
                Some(msg) => {
                    // A minimal claim, as hyper makes: h2 raises it to the frame's length in
                    // `send_data`, and claiming more up front would pin connection window for
                    // a stream that may not need it yet.
                    send.reserve_capacity(1);
                    waiting = Some(encode(msg));
                }
                None => {
                    match finish {
                        Finish::Request => {
                            send.send_data(Bytes::new().chain(Bytes::new()), true)?
                        }
                        Finish::Response => send.send_trailers(trailers(&Status::ok("")))?,
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    })
    .await
}

/// `Ok` once `send` has capacity; `Err(Pending)` to wait, `Err(Ready(err))` if the stream failed.
fn wait_capacity(
    send: &mut SendStream<Frame>,
    cx: &mut Context<'_>,
) -> Result<(), Poll<h2::Error>> {
    while send.capacity() == 0 {
        match send.poll_capacity(cx) {
            Poll::Pending => return Err(Poll::Pending),
            Poll::Ready(Some(Ok(_))) => {}
            Poll::Ready(Some(Err(err))) => return Err(Poll::Ready(err)),
            Poll::Ready(None) => {
                return Err(Poll::Ready(h2::Error::from(h2::Reason::STREAM_CLOSED)));
            }
        }
    }
    Ok(())
}

/// The receiving half of a stream: the peer's messages, decoded, as `tonic::Streaming` yields
/// them (`Err` with the status the peer or the connection ended the stream with). On the agent
/// it starts with the response head ([`Inbound::new`]), on the server with the request's body
/// ([`Inbound::from_request`]).
pub struct Inbound<M> {
    state: State,
    received: Received,
    /// The response head arrived and accepted the stream.
    accepted: bool,
    /// The response head arrived and refused the stream (a trailers-only response).
    refused: bool,
    _message: PhantomData<fn() -> M>,
}

/// What was received and not decoded yet.
#[derive(Default)]
struct Received {
    /// A DATA frame. A message that arrives whole in one frame (the usual case) is decoded from
    /// it in place, its payload a slice of the frame.
    frame: Bytes,
    /// A message that spans frames, gathered.
    gather: BytesMut,
}

enum State {
    /// Waiting for the response head.
    Opening(ResponseFuture),
    /// Reading messages.
    Body(RecvStream),
    /// The body ended; the trailers say how.
    Trailers(RecvStream),
    Done,
}

impl<M> std::fmt::Debug for Inbound<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").finish_non_exhaustive()
    }
}

impl<M: Message + Default> Inbound<M> {
    /// The stream whose response `response` will be.
    pub fn new(response: ResponseFuture) -> Self {
        Self {
            state: State::Opening(response),
            received: Received::default(),
            accepted: false,
            refused: false,
            _message: PhantomData,
        }
    }

    /// The request body of a stream the server accepted.
    pub fn from_request(body: RecvStream) -> Self {
        Self {
            state: State::Body(body),
            received: Received::default(),
            accepted: true,
            refused: false,
            _message: PhantomData,
        }
    }

    /// Waits for the response head: `Err` with the server's status if it refused the stream.
    pub async fn opened(&mut self) -> Result<(), Status> {
        poll_fn(|cx| self.poll_opened(cx)).await
    }

    /// Whether the server accepted the stream (its response head arrived, without an error):
    /// tells a refusal from a stream that failed later.
    pub fn accepted(&self) -> bool {
        self.accepted
    }

    /// Whether the server answered the stream with a refusal: its response head came, with an
    /// error status. Tells a refusal from a stream that was reset or lost before any answer.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// The next message; `Ok(None)` once the server ended the stream cleanly. Cancel-safe.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        self.next().await.transpose()
    }

    fn poll_opened(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        let State::Opening(response) = &mut self.state else {
            return Poll::Ready(Ok(()));
        };
        let response = match ready!(Pin::new(response).poll(cx)) {
            Ok(response) => response,
            Err(err) => {
                self.state = State::Done;
                return Poll::Ready(Err(status_of(err)));
            }
        };
        if response.status() != http::StatusCode::OK {
            self.state = State::Done;
            self.refused = true;
            return Poll::Ready(Err(Status::unknown(format!(
                "the server answered HTTP {}",
                response.status()
            ))));
        }
        // A refusal comes as a response with no body ("trailers-only"): its status is in the
        // head.
        if let Some(status) = Status::from_header_map(response.headers()) {
            self.state = State::Done;
            return Poll::Ready(if status.code() == Code::Ok {
                self.accepted = true;
                Ok(())
            } else {
                self.refused = true;
                Err(status)
            });
        }
        self.state = State::Body(response.into_body());
        self.accepted = true;
        Poll::Ready(Ok(()))
    }
}

impl Received {
    /// A whole message at the front of what was received, if there is one.
    fn decode<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        if self.gather.is_empty() {
            if let Some(len) = message_len(&self.frame)? {
                if self.frame.len() >= PREFIX + len {
                    let mut msg = self.frame.split_to(PREFIX + len);
                    msg.advance(PREFIX);
                    return decode_message(msg).map(Some);
                }
                self.gather.reserve(PREFIX + len);
            }
            // Part of a message: gathered with what follows.
            self.gather.extend_from_slice(&self.frame);
            self.frame = Bytes::new();
            return Ok(None);
        }
        let Some(len) = message_len(&self.gather)? else {
            return Ok(None);
        };
        if self.gather.len() < PREFIX + len {
            return Ok(None);
        }
        let mut msg = self.gather.split_to(PREFIX + len).freeze();
        if self.gather.is_empty() {
            // Not kept: it would hold the gathered message's allocation.
            self.gather = BytesMut::new();
        }
        msg.advance(PREFIX);
        decode_message(msg).map(Some)
    }

    fn push(&mut self, data: Bytes) {
        if self.gather.is_empty() {
            self.frame = data;
        } else {
            self.gather.extend_from_slice(&data);
        }
    }

    fn is_empty(&self) -> bool {
        self.frame.is_empty() && self.gather.is_empty()
    }
}

impl<M: Message + Default> Stream for Inbound<M> {
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Opening(_) => {
                    if let Err(status) = ready!(this.poll_opened(cx)) {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                State::Body(body) => {
                    if !this.received.is_empty() {
                        match this.received.decode() {
                            Ok(Some(msg)) => return Poll::Ready(Some(Ok(msg))),
                            Ok(None) => {}
                            Err(status) => {
                                this.state = State::Done;
                                return Poll::Ready(Some(Err(status)));
                            }
                        }
                    }
                    match ready!(body.poll_data(cx)) {
                        Some(Ok(data)) => {
                            // HTTP/2's window is only a cap here (the tunnel's own credit
                            // bounds each connection), so it is handed back at once, as
                            // hyper does when a body is read.
                            let _ = body.flow_control().release_capacity(data.len());
                            this.received.push(data);
                        }
                        Some(Err(err)) => {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(status_of(err))));
                        }
                        None if !this.received.is_empty() => {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(Status::internal(
                                "the stream ended inside a message",
                            ))));
                        }
                        None => {
                            let State::Body(body) = std::mem::replace(&mut this.state, State::Done)
                            else {
                                unreachable!("matched above");
                            };
                            this.state = State::Trailers(body);
                        }
                    }
                }
                State::Trailers(body) => {
                    let trailers = ready!(body.poll_trailers(cx));
                    this.state = State::Done;
                    let status = match trailers {
                        Ok(Some(trailers)) => Status::from_header_map(&trailers),
                        // A stream that ends without trailers is taken as a clean end.
                        Ok(None) => None,
                        Err(err) => Some(status_of(err)),
                    };
                    return Poll::Ready(status.filter(|s| s.code() != Code::Ok).map(Err));
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }
}

/// The length a gRPC prefix at the front of `buf` announces, once the prefix is there.
fn message_len(buf: &[u8]) -> Result<Option<usize>, Status> {
    let Some(prefix) = buf.get(..PREFIX) else {
        return Ok(None);
    };
    if prefix[0] != 0 {
        return Err(Status::unimplemented(
            "compressed messages are not supported",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > MAX_MESSAGE {
        // tonic's code and words, which clients of the server have seen until now.
        return Err(Status::out_of_range(format!(
            "message length too large: found {len} bytes, the limit is: {MAX_MESSAGE} bytes"
        )));
    }
    Ok(Some(len))
}

fn decode_message<M: Message + Default>(msg: Bytes) -> Result<M, Status> {
    M::decode(msg).map_err(|err| Status::internal(format!("undecodable message: {err}")))
}

/// A stream the agent opened on the server, not answered yet: accepting it sends the response
/// head, refusing it a trailers-only response.
pub struct Offered {
    respond: h2::server::SendResponse<Frame>,
    body: RecvStream,
}

impl std::fmt::Debug for Offered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offered")
            .field("stream", &self.respond.stream_id())
            .finish_non_exhaustive()
    }
}

impl Offered {
    /// The stream whose request body is `body`, answered through `respond`.
    pub fn new(body: RecvStream, respond: h2::server::SendResponse<Frame>) -> Self {
        Self { respond, body }
    }

    /// Sends the response head: the stream's halves, or `None` if the peer already reset it.
    pub fn accept<M: Message + Default>(mut self) -> Option<(SendStream<Frame>, Inbound<M>)> {
        let send = self.respond.send_response(accepted_head(), false).ok()?;
        Some((send, Inbound::from_request(self.body)))
    }

    /// The request body and the handle the response goes through, for a stream read before it
    /// is answered (a control stream's registration).
    pub fn into_parts(self) -> (RecvStream, h2::server::SendResponse<Frame>) {
        (self.body, self.respond)
    }

    /// Refuses the stream with `status`.
    pub fn refuse(self, status: &Status) {
        refuse(self.respond, status);
    }
}

/// The head of a response that accepts a stream; its messages follow.
pub fn accepted_head() -> http::Response<()> {
    let mut head = http::Response::new(());
    head.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    head
}

/// Refuses a stream with `status` in a trailers-only response, as tonic's server does: the
/// status travels in the head, and the stream ends with it.
pub fn refuse<B: Buf>(mut respond: h2::server::SendResponse<B>, status: &Status) {
    let mut head = accepted_head();
    if status.add_header(head.headers_mut()).is_err() {
        head.headers_mut()
            .insert(GRPC_STATUS, http::HeaderValue::from(Code::Internal as i32));
    }
    // A stream the peer already reset needs no answer.
    let _ = respond.send_response(head, true);
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        map.insert(GRPC_STATUS, http::HeaderValue::from(Code::Internal as i32));
    }
    map
}

/// Pings the peer every `interval`; returns why the connection should be dropped: a ping
/// unanswered while nothing at all arrived from the peer for `timeout` (see [`crate::heard`]: a
/// busy peer on a slow link answers late but is alive), or the connection gone. Never returns
/// without `ping` (it was taken already).
pub async fn keepalive(
    ping: Option<h2::PingPong>,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    heard: crate::heard::Heard,
) -> &'static str {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        if ping.send_ping(h2::Ping::opaque()).is_err() {
            return "ping failed";
        }
        let mut silence = crate::heard::Silence::new(heard.clone(), timeout);
        let mut pong = std::pin::pin!(poll_fn(|cx| ping.poll_pong(cx)));
        loop {
            tokio::select! {
                res = &mut pong => match res {
                    Ok(_) => break,
                    Err(_) => return "ping failed",
                },
                () = tokio::time::sleep_until(silence.next_check()) => {
                    if silence.silent() {
                        return "ping unanswered and nothing heard from the peer";
                    }
                }
            }
        }
    }
}

/// The gRPC status of an HTTP/2 failure (a reset, a lost connection), as tonic maps it.
fn status_of(err: h2::Error) -> Status {
    Status::from_error(Box::new(err))
}

#[cfg(test)]
#[path = "grpc_tests.rs"]
mod tests;
