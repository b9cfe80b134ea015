//! Generates the tonic/prost bindings with protox, a pure-Rust protobuf compiler, so building
//! needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tunnel.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Data chunks become `bytes::Bytes`: decoding slices the received buffer instead of
        // copying into a Vec.
        .bytes(".proxy.tunnel.v1.Chunk.data")
        // tonic's default codec starts every stream with two 8 KiB buffers; ours start small.
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
