//! Generated bindings of `proto/tunnel.proto` and the few protocol constants both ends share.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::doc_markdown)]

pub mod codec;

tonic::include_proto!("proxy.tunnel.v1");

/// HTTP/2 path of the `Control` stream, as tonic's generated server routes it (the agent opens
/// its streams on h2 directly).
pub const CONTROL_PATH: &str = "/proxy.tunnel.v1.Tunnel/Control";

/// HTTP/2 path of a `Data` stream.
pub const DATA_PATH: &str = "/proxy.tunnel.v1.Tunnel/Data";

/// HTTP/2 path of `Join.Join`: a bootstrap token and a CSR, on a connection without a client
/// certificate.
pub const JOIN_PATH: &str = "/proxy.tunnel.v1.Join/Join";

/// HTTP/2 path of `Join.Renew`: a CSR, on an agent's mutual-TLS connection.
pub const RENEW_PATH: &str = "/proxy.tunnel.v1.Join/Renew";

/// Largest CSR either method accepts: an ECDSA or Ed25519 request is a few hundred bytes.
pub const MAX_CSR: usize = 4 * 1024;

/// Request metadata key carrying the dial id on a `Data` stream.
pub const DIAL_ID_HEADER: &str = "x-dial-id";

/// Registration, both ways: the time an agent has to send its registration once it opened the
/// control stream, and the time a server has to answer it.
pub const REGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Request metadata key marking a warm `Data` stream (instead of a dial id).
pub const WARM_HEADER: &str = "x-warm";

/// `Registered.features`: the server accepts warm `Data` streams.
pub const FEATURE_WARM: &str = "warm";

/// `Register.features`: the agent understands `ServerMessage.cancel_dial`.
pub const FEATURE_CANCEL_DIAL: &str = "cancel_dial";

/// `Register.features`: the agent answers `ServerMessage.ping` with `AgentMessage.pong`.
pub const FEATURE_PING: &str = "ping";

/// `Register.features`: the agent takes a warm `Data` stream's response head when the stream is
/// handed out, in the same write as its `start`, instead of when the server holds it. That saves
/// the agent one wake-up per warm connection (one per CONNECT, when the pool is refilled). Such
/// an agent tells a refusal (a trailers-only response) from a stream the server let go unused
/// (a reset) by the answer, not by whether a head came. Without it, the head goes out at once.
pub const FEATURE_WARM_HEAD_AT_START: &str = "warm_head_at_start";

/// Largest `Chunk` payload a peer sends. Chunks this size amortise per-message costs while
/// keeping each one well under the gRPC message limit.
pub const MAX_CHUNK: usize = 64 * 1024;

/// gRPC message size limit on both ends: a chunk plus framing, or a control message.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// HTTP/2 receive window of each stream, on both ends: only a safety cap. Each tunneled
/// connection's real window is the credit its receiver grants in `Chunk.credit` (at most
/// `proxy_common::flow::MAX_WINDOW`, 64 MiB of payload); this leaves room for the gRPC framing
/// and the credit messages on top, so h2 never stops a stream before our credit does.
pub const STREAM_WINDOW: u32 = 80 * 1024 * 1024;

/// HTTP/2 receive window of a whole agent connection, on both ends: again only a cap, large
/// enough that the connections' own windows bind first (thousands of stalled connections at
/// their minimum window plus the growth budget), and what a misbehaving peer can make the other
/// side buffer at most.
pub const CONNECTION_WINDOW: u32 = 1024 * 1024 * 1024;

/// Largest HTTP/2 frame either end accepts: a `MAX_CHUNK` chunk plus its gRPC and protobuf
/// framing fits one frame, so a chunk costs one frame header and one vectored write through TLS
/// instead of five (the 16 KiB default).
pub const MAX_FRAME: u32 = 80 * 1024;

/// An agent closes a warm `Data` stream (and its upstream connection) not handed out within
/// this time. Below the TLS handshake timeout of common API servers (kube-apiserver: 32 s, its
/// `ReadHeaderTimeout`), so the upstream never closes one first.
pub const WARM_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(25);

/// A server hands out a warm stream only this long after it arrived: well inside the agent's
/// [`WARM_MAX_AGE`], so a stream is never handed out while the agent is retiring it.
pub const WARM_USABLE: std::time::Duration = std::time::Duration::from_secs(20);
