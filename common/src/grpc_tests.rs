//! The gRPC framing on its own: messages encoded as prost encodes them, decoded whole however
//! they are split. The framing against real h2 peers is tested where each end uses it
//! (`proxy-agent`'s channel, `proxy-server`'s agent connections).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use proxy_proto::{Chunk, MAX_MESSAGE};
use tonic::Code;

use super::{Frame, Received, encode, encode_chunk};

fn flat(frame: Frame) -> Bytes {
    let mut frame = frame;
    frame.copy_to_bytes(frame.remaining())
}

fn chunk(data: &[u8]) -> Chunk {
    Chunk {
        data: Bytes::copy_from_slice(data),
        fin: true,
        credit: 1 << 20,
        blocked_at: 77,
        start: false,
    }
}

/// The message behind a gRPC prefix, checked.
fn unprefix(bytes: &Bytes) -> Bytes {
    assert_eq!(bytes[0], 0, "not compressed");
    let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
    assert_eq!(
        bytes.len(),
        5 + len,
        "the prefix announces the message's length"
    );
    bytes.slice(5..)
}

#[test]
fn a_chunk_encoded_without_copying_its_payload_decodes_as_prost_encodes_it() {
    for data in [&b""[..], b"x", &[7u8; 300], &vec![1u8; 64 * 1024]] {
        let original = chunk(data);
        let frame = encode_chunk(original.clone());
        // The payload is the second part, the very same bytes.
        assert_eq!(frame.last_ref().len(), data.len());
        let decoded = Chunk::decode(unprefix(&flat(frame))).unwrap();
        assert_eq!(decoded, original);
        assert_eq!(
            flat(encode(original.clone())).len(),
            flat(encode_chunk(original)).len(),
            "same size as prost's own encoding"
        );
    }
}

fn prefixed(msg: &Chunk) -> Bytes {
    flat(encode(msg.clone()))
}

#[test]
fn messages_split_anywhere_or_sharing_a_frame_decode_whole() {
    let a = chunk(&[1u8; 1000]);
    let b = chunk(b"second");
    let mut wire = BytesMut::new();
    wire.extend_from_slice(&prefixed(&a));
    wire.extend_from_slice(&prefixed(&b));
    let wire = wire.freeze();
    // Every split point, including inside the prefix.
    for cut in 0..wire.len() {
        let mut received = Received::default();
        let mut got = Vec::new();
        for part in [wire.slice(..cut), wire.slice(cut..)] {
            if part.is_empty() {
                continue;
            }
            received.push(part);
            while let Some(msg) = received.decode::<Chunk>().unwrap() {
                got.push(msg);
            }
        }
        assert_eq!(got, vec![a.clone(), b.clone()], "cut at {cut}");
        assert!(
            received.is_empty(),
            "nothing left over after a cut at {cut}"
        );
    }
}

#[test]
fn a_whole_message_in_one_frame_is_decoded_in_place() {
    let a = chunk(&[9u8; 4096]);
    let frame = prefixed(&a);
    let start = frame.as_ptr() as usize;
    let mut received = Received::default();
    received.push(frame.clone());
    let got = received.decode::<Chunk>().unwrap().unwrap();
    let at = got.data.as_ptr() as usize;
    assert!(
        (start..start + frame.len()).contains(&at),
        "the payload is a slice of the received frame"
    );
}

#[test]
fn an_oversized_or_compressed_message_is_refused_before_it_is_gathered() {
    let mut received = Received::default();
    let mut head = BytesMut::new();
    head.put_u8(0);
    head.put_u32(MAX_MESSAGE as u32 + 1);
    received.push(head.freeze());
    let err = received.decode::<Chunk>().unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);

    let mut received = Received::default();
    received.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
    let err = received.decode::<Chunk>().unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}
