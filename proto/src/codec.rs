//! The protobuf codec of every tunnel stream: tonic's prost codec with small starting buffers.
//!
//! tonic gives each stream an 8 KiB encode buffer and an 8 KiB decode buffer up front. A server
//! holds one stream per tunneled connection and a control stream per agent, most of them idle
//! (a `watch`, a kept-alive client), so those 16 KiB per stream were most of an idle connection's
//! memory. Buffers still grow to the message being encoded or decoded (one reallocation for a
//! 64 KiB chunk); busy streams lose nothing.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Starting size of a stream's encode and decode buffers: a control message or a credit grant
/// fits. Not zero: tonic divides by it when compression is on (it is off).
pub const START_BUFFER: usize = 64;

/// Encoded bytes gathered before tonic hands them to HTTP/2 (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// A prost codec whose buffers start at [`START_BUFFER`].
#[derive(Debug)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(START_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
