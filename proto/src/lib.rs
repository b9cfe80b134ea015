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
