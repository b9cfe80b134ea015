//! Aborts: a stream that ends without `fin`, fails, or breaks the protocol resets the local
//! connection at once, and so does cancel.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_stream_that_ends_without_fin_aborts_the_connection_at_once() {
    let mut conn = start(Role::Server, ROOMY);
    conn.client.write_all(b"hello").await.unwrap();
    assert_eq!(concat(&conn.tunnel.bytes(5).await), b"hello");
    let t = Instant::now();
    conn.tunnel.end();
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::PeerAborted)), "{res:?}");
    assert_eq!(t.elapsed(), Duration::ZERO, "no close handshake");
    assert!(conn.aborted(), "the local socket is reset");
    conn.tunnel.expect_end().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_stream_aborts_the_connection_with_its_status() {
    let mut conn = start(Role::Agent, ROOMY);
    conn.tunnel.send(data(b"partial")).await;
    let mut got = [0; 7];
    within("the download", conn.client.read_exact(&mut got))
        .await
        .unwrap();
    conn.tunnel
        .fail(Status::unavailable("connection lost"))
        .await;
    match conn.result().await {
        Err(PumpError::Stream(status)) => {
            assert_eq!(status.code(), Code::Unavailable);
            assert_eq!(status.message(), "connection lost");
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.aborted());
    conn.tunnel.expect_end().await;
    assert_eq!(conn.counts.get(), (0, 7));
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_ends_after_the_peers_fin_but_before_ours_is_an_abort() {
    let mut conn = start(Role::Server, ROOMY);
    conn.tunnel.send(fin()).await;
    let mut rest = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut rest))
        .await
        .unwrap();
    // The other end cannot have our fin yet: ending the stream now gives up on our bytes.
    conn.tunnel.end();
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::PeerAborted)), "{res:?}");
    assert!(conn.aborted());
    conn.tunnel.expect_end().await;
}

#[tokio::test(start_paused = true)]
async fn bytes_after_the_peers_fin_are_refused() {
    let mut conn = start(Role::Agent, ROOMY);
    conn.tunnel.send(fin()).await;
    conn.tunnel.send(data(b"too late")).await;
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::DataAfterFin)), "{res:?}");
    assert!(conn.aborted());
    let mut got = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(got.is_empty(), "nothing after the fin reaches the client");
}

#[tokio::test(start_paused = true)]
async fn cancel_ends_both_directions_at_once_even_when_both_wait() {
    let mut conn = start(Role::Server, NARROW);
    // The socket write waits for a client that does not read, the socket read for credit.
    conn.tunnel.send(data(&pattern(MAX_CHUNK, 9))).await;
    let upload = pattern(MIN_WINDOW as usize + 1_000, 10);
    let (written, _) = tokio::join!(
        within("the upload", conn.client.write_all(&upload)),
        conn.tunnel.bytes(MIN_WINDOW as usize),
    );
    written.unwrap();
    conn.tunnel.expect_silence().await;

    let t = Instant::now();
    conn.cancel.cancel();
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::Cancelled)), "{res:?}");
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert!(conn.aborted());
    conn.tunnel.expect_end().await;
}
