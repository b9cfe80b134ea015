//! Flow control: the socket is read only as far as the peer's credit, credit is granted as the
//! local reader takes its bytes, and keeps flowing while a write is blocked or after a `fin`.

use super::*;

#[tokio::test(start_paused = true)]
async fn socket_reads_stop_at_the_peers_credit_until_more_is_granted() {
    let mut conn = start(Role::Agent, ROOMY);
    let upload = pattern(MIN_WINDOW as usize + 10_000, 4);
    conn.client.write_all(&upload).await.unwrap();
    let mut chunks = conn.tunnel.bytes(MIN_WINDOW as usize).await;
    conn.tunnel.expect_silence().await;
    assert_eq!(
        conn.counts.get().0,
        MIN_WINDOW,
        "nothing read from the socket beyond the credit"
    );

    conn.tunnel.send(credit(MIN_WINDOW + 10_000)).await;
    let more = conn.tunnel.bytes(10_000).await;
    assert_eq!(
        more[0].blocked_at, MIN_WINDOW,
        "the first chunk after the wait says where it ran out"
    );
    assert!(more[1..].iter().all(|c| c.blocked_at == 0));
    chunks.extend(more);
    assert!(concat(&chunks) == upload, "the upload arrived altered");
}

#[tokio::test(start_paused = true)]
async fn the_peer_gets_credit_as_the_local_reader_takes_its_bytes() {
    let mut conn = start(Role::Agent, ROOMY);
    let half = MIN_WINDOW as usize / 2;
    conn.tunnel.send(data(&pattern(half - 1, 5))).await;
    let mut got = vec![0; half - 1];
    within("the download", conn.client.read_exact(&mut got))
        .await
        .unwrap();
    conn.tunnel.expect_silence().await;
    assert_eq!(conn.tunnel.granted, 0, "credit is batched");

    conn.tunnel.send(data(b"!")).await;
    within("the download", conn.client.read_exact(&mut got[..1]))
        .await
        .unwrap();
    conn.tunnel.expect_silence().await;
    assert_eq!(
        conn.tunnel.granted,
        half as u64 + MIN_WINDOW,
        "half the window taken: a window's worth past it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_sends_past_its_credit_is_cut_off() {
    let mut conn = start(Role::Server, NARROW);
    // The client reads nothing, so no credit is due: the initial window is all there is.
    for _ in 0..MIN_WINDOW as usize / MAX_CHUNK {
        conn.tunnel.send(data(&[1; MAX_CHUNK])).await;
    }
    conn.tunnel.send(data(b"x")).await;
    match conn.result().await {
        Err(PumpError::Overrun(o)) => {
            assert_eq!((o.received, o.limit), (MIN_WINDOW + 1, MIN_WINDOW));
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.aborted());
    conn.tunnel.expect_end().await;
}

/// The client uploads before it reads: the response (`first`) waits in the pipe, and the
/// upload must still get its credit, as over plain TCP.
async fn upload_gets_credit_behind_an_unread_response(first: Chunk) {
    let mut conn = start(Role::Agent, NARROW);
    conn.tunnel.send(first).await;
    let upload = pattern(MIN_WINDOW as usize + 1_000, 7);
    let (written, _) = tokio::join!(
        within("the upload", conn.client.write_all(&upload)),
        conn.tunnel.bytes(MIN_WINDOW as usize),
    );
    written.unwrap();
    conn.tunnel.send(credit(MIN_WINDOW + 1_000)).await;
    conn.tunnel.bytes(1_000).await;
}

#[tokio::test(start_paused = true)]
async fn credit_reaches_the_sender_while_a_socket_write_is_blocked() {
    upload_gets_credit_behind_an_unread_response(data(&pattern(MAX_CHUNK, 6))).await;
}

/// The same after the peer's `fin`: the stream is still read for our sending half's credit while
/// the bytes before the `fin` wait for the client. (It was not: a client that uploads before it
/// reads a response that has ended stalled for good, where plain TCP does not.)
#[tokio::test(start_paused = true)]
async fn credit_reaches_the_sender_while_the_bytes_before_the_peers_fin_are_blocked() {
    upload_gets_credit_behind_an_unread_response(Chunk {
        fin: true,
        ..data(&pattern(MAX_CHUNK, 6))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn credit_keeps_reaching_the_sender_after_the_peers_fin() {
    let mut conn = start(Role::Agent, ROOMY);
    conn.tunnel.send(fin()).await;
    let mut rest = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut rest))
        .await
        .unwrap();
    conn.client
        .write_all(&pattern(MIN_WINDOW as usize + 1_000, 8))
        .await
        .unwrap();
    conn.tunnel.bytes(MIN_WINDOW as usize).await;
    conn.tunnel.expect_silence().await;
    // More than the rest needs: the socket's EOF is only read with credit to spare.
    conn.tunnel.send(credit(2 * MIN_WINDOW)).await;
    conn.tunnel.bytes(1_000).await;
    conn.client.shutdown().await.unwrap();
    conn.tunnel.expect_fin().await;
    conn.tunnel.expect_end().await;
    conn.tunnel.end();
    conn.result().await.unwrap();
}
