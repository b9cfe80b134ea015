//! Unit tests of the body on its own, polled by hand as hyper would poll it. The pump's tests
//! (`pump_tests.rs`) cover it inside `splice`.

use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use proxy_proto::Chunk;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf};

use super::{OutboundBody, ReaderSlot, outbound};
use crate::flow::MIN_WINDOW;
use crate::pump::{ByteCounts, PumpError};

/// What the body has to send right now: `None` if it would wait.
fn poll(body: &mut OutboundBody) -> Option<Option<Chunk>> {
    body.next().now_or_never()
}

fn ready(body: &mut OutboundBody) -> Chunk {
    poll(body)
        .expect("the body should have a chunk ready")
        .expect("the body should not have ended")
}

/// A local socket whose other end the test writes to, in a slot the body reads from.
fn socket() -> (DuplexStream, Arc<ReaderSlot<ReadHalf<DuplexStream>>>) {
    let (client, local) = tokio::io::duplex(1 << 20);
    let (reader, _writer) = tokio::io::split(local);
    (client, ReaderSlot::new(reader))
}

#[tokio::test]
async fn before_a_socket_is_attached_only_control_goes_out() {
    let (tx, mut body) = outbound();
    assert!(poll(&mut body).is_none(), "nothing to send yet");
    tx.grant(1_000).unwrap();
    tx.grant(2_000).unwrap();
    let chunk = ready(&mut body);
    assert_eq!(chunk.credit, 2_000, "a later grant replaces an unsent one");
    assert!(chunk.data.is_empty() && !chunk.fin && !chunk.start);
    assert!(poll(&mut body).is_none(), "one grant, one chunk");
    assert!(tx.start());
    assert!(ready(&mut body).start);
}

#[tokio::test]
async fn the_prefix_goes_first_then_socket_bytes_with_the_credit_we_grant() {
    let (tx, mut body) = outbound();
    let (mut client, slot) = socket();
    let counts = Arc::new(ByteCounts::default());
    tx.attach(slot, bytes::Bytes::from_static(b"early"), counts.clone());
    assert_eq!(&ready(&mut body).data[..], b"early");
    assert!(poll(&mut body).is_none(), "the socket has nothing yet");
    assert_eq!(
        body.buf.capacity(),
        0,
        "an idle connection holds no read buffer"
    );
    client.write_all(b"hello").await.unwrap();
    tx.grant(MIN_WINDOW + 5).unwrap();
    let chunk = ready(&mut body);
    assert_eq!(
        (&chunk.data[..], chunk.credit),
        (&b"hello"[..], MIN_WINDOW + 5)
    );
    assert_eq!(counts.get(), (10, 0));
}

#[tokio::test]
async fn reads_stop_at_the_peers_credit_and_the_wait_is_reported() {
    let (tx, mut body) = outbound();
    let (mut client, slot) = socket();
    tx.attach(slot, bytes::Bytes::new(), Arc::default());
    let total = MIN_WINDOW as usize + 100;
    client.write_all(&vec![7; total]).await.unwrap();
    let mut got = 0;
    while let Some(Some(chunk)) = poll(&mut body) {
        assert_eq!(chunk.blocked_at, 0);
        got += chunk.data.len();
    }
    assert_eq!(got as u64, MIN_WINDOW, "exactly the initial credit");
    tx.credit(MIN_WINDOW - 1);
    assert!(poll(&mut body).is_none(), "credit never shrinks");
    tx.credit(MIN_WINDOW + 100);
    let chunk = ready(&mut body);
    assert_eq!(chunk.data.len(), 100);
    assert_eq!(chunk.blocked_at, MIN_WINDOW, "where it ran out");
}

#[tokio::test]
async fn eof_is_a_fin_and_completes_the_sending_half() {
    let (tx, mut body) = outbound();
    let (client, slot) = socket();
    tx.attach(slot, bytes::Bytes::new(), Arc::default());
    drop(client);
    assert!(ready(&mut body).fin);
    tx.sent().now_or_never().expect("done").unwrap();
    tx.grant(MIN_WINDOW * 2).unwrap();
    assert_eq!(
        ready(&mut body).credit,
        MIN_WINDOW * 2,
        "credit still flows after fin"
    );
    drop(tx);
    assert!(poll(&mut body).expect("ends at once").is_none());
}

/// On the side that ends the stream first, once nothing more is received no credit will be
/// granted: the stream ends right after the fin, while the pump still holds its handle, so h2
/// writes both in one flush.
#[tokio::test]
async fn after_the_receiving_half_is_done_the_fin_ends_the_stream() {
    let (tx, mut body) = outbound();
    let (client, slot) = socket();
    tx.attach(slot, bytes::Bytes::new(), Arc::default());
    tx.receiving_finished();
    assert!(poll(&mut body).is_none(), "nothing to send before the fin");
    drop(client);
    assert!(ready(&mut body).fin);
    assert!(
        poll(&mut body).expect("ends at once").is_none(),
        "the stream ends with the fin"
    );
    tx.sent().now_or_never().expect("done").unwrap();
}

#[tokio::test]
async fn dropping_the_handle_sends_what_is_queued_then_ends_without_fin() {
    let (tx, mut body) = outbound();
    let (mut client, slot) = socket();
    tx.attach(slot.clone(), bytes::Bytes::new(), Arc::default());
    client.write_all(b"unread").await.unwrap();
    tx.grant(MIN_WINDOW + 1).unwrap();
    // The pump takes the socket back before it drops the handle (to reset it).
    assert!(slot.take().is_some());
    drop(tx);
    let chunk = ready(&mut body);
    assert_eq!(chunk.credit, MIN_WINDOW + 1);
    assert!(
        chunk.data.is_empty() && !chunk.fin,
        "nothing read after the take"
    );
    assert!(poll(&mut body).expect("ends at once").is_none());
}

#[tokio::test]
async fn a_body_gone_before_fin_is_a_closed_tunnel() {
    let (tx, body) = outbound();
    assert!(!tx.is_closed());
    drop(body);
    assert!(tx.is_closed());
    assert!(
        !tx.start(),
        "a warm stream that went away is not handed out"
    );
    assert!(matches!(tx.grant(1), Err(PumpError::TunnelClosed)));
    let sent = tx.sent().now_or_never().expect("done at once");
    assert!(matches!(sent, Err(PumpError::TunnelClosed)), "{sent:?}");
}

#[tokio::test]
async fn a_warm_streams_start_goes_out_alone_before_queued_credit_and_bytes() {
    let (tx, mut body) = outbound();
    assert!(poll(&mut body).is_none());
    let (mut client, slot) = socket();
    client.write_all(b"request").await.unwrap();
    // As the server hands out a warm stream: start, then the client's socket and first grant.
    assert!(tx.start());
    tx.attach(slot, bytes::Bytes::new(), Arc::default());
    tx.grant(MIN_WINDOW + 1).unwrap();
    let start = ready(&mut body);
    assert!(start.start, "{start:?}");
    assert!(
        start.data.is_empty() && start.credit == 0 && !start.fin,
        "the agent reads this chunk for start only: {start:?}"
    );
    let next = ready(&mut body);
    assert_eq!(
        (&next.data[..], next.credit),
        (&b"request"[..], MIN_WINDOW + 1)
    );
    assert!(!next.start);
}
