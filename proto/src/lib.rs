//! Generated bindings of `proto/tunnel.proto` and the few protocol constants both ends share.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::doc_markdown)]

pub mod codec;

tonic::include_proto!("proxy.tunnel.v1");

/// Request metadata key carrying the dial id on a `Data` stream.
pub const DIAL_ID_HEADER: &str = "x-dial-id";

/// Largest `Chunk` payload a peer sends. Chunks this size amortise per-message costs while
/// keeping each one well under the gRPC message limit.
pub const MAX_CHUNK: usize = 64 * 1024;

/// gRPC message size limit on both ends: a chunk plus framing, or a control message.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// HTTP/2 receive window of each stream (one tunneled connection), on both ends: the most a
/// stalled peer lets pile up per connection. One window per round trip is a stream's top speed,
/// so 4 MiB is 1.6 Gbit/s at 20 ms between agent and server. Fixed, not hyper's adaptive window:
/// that one also shrinks the connection window to the stream window, so one stalled client would
/// stop every other connection of the agent.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// HTTP/2 receive window of a whole agent connection, on both ends. Bytes buffered for a stalled
/// stream hold part of it, so it is many stream windows wide: dozens of stalled clients still
/// leave the agent's other connections running.
pub const CONNECTION_WINDOW: u32 = 256 * 1024 * 1024;

/// Largest HTTP/2 frame either end accepts: a `MAX_CHUNK` chunk plus its gRPC and protobuf
/// framing fits one frame, so a chunk costs one frame header and one vectored write through TLS
/// instead of five (the 16 KiB default).
pub const MAX_FRAME: u32 = 80 * 1024;
