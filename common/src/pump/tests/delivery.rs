//! Bytes cross intact and in order, the prefix first, and none is held back: not in a layer
//! above the socket, not from a reader that takes them slowly.

use super::*;

#[tokio::test]
async fn bytes_a_layer_above_the_socket_holds_are_flushed_without_waiting_for_more() {
    let (mut client, io) = tokio::io::duplex(ROOMY);
    // Holds what is written until it is flushed, as a TLS stream does when its socket is not
    // writable.
    let socket = Local {
        io: tokio::io::BufWriter::with_capacity(64 * 1024, io),
        aborted: Arc::default(),
    };
    let conn = spawn(socket, (), Arc::default(), Role::Server, b"");
    conn.tunnel.send(data(b"the last event of a burst")).await;
    let mut got = [0u8; 25];
    within("the held bytes", client.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"the last event of a burst");
}

#[tokio::test(start_paused = true)]
async fn bytes_cross_both_ways_intact_and_in_order() {
    let mut conn = start(Role::Agent, ROOMY);
    // One write larger than a chunk, there before splice reads: it must go out split.
    let upload = pattern(200_000, 1);
    conn.client.write_all(&upload).await.unwrap();
    let download = pattern(1 + 5_000 + MAX_CHUNK, 2);
    for piece in [&download[..1], &download[1..5_001], &download[5_001..]] {
        conn.tunnel.send(data(piece)).await;
    }

    let chunks = conn.tunnel.bytes(upload.len()).await;
    assert!(concat(&chunks) == upload, "the upload arrived altered");
    let largest = chunks.iter().map(|c| c.data.len()).max().unwrap();
    assert_eq!(largest, MAX_CHUNK, "reads grow to full chunks, no further");
    let mut got = vec![0; download.len()];
    within("the download", conn.client.read_exact(&mut got))
        .await
        .unwrap();
    assert!(got == download, "the download arrived altered");
    assert_eq!(
        conn.counts.get(),
        (upload.len() as u64, download.len() as u64)
    );

    close_both_ways(&mut conn).await;
    conn.tunnel.end();
    conn.result().await.unwrap();
    assert!(!conn.aborted());
}

#[tokio::test(start_paused = true)]
async fn prefix_bytes_go_into_the_tunnel_before_what_the_socket_reads() {
    let mut conn = start_with_prefix(Role::Server, ROOMY, b"pipelined after the CONNECT head");
    conn.client.write_all(b", then read").await.unwrap();
    let first = conn.tunnel.next().await.unwrap();
    assert_eq!(&first.data[..], b"pipelined after the CONNECT head");
    let rest = conn.tunnel.bytes(11).await;
    assert_eq!(concat(&rest), b", then read");
    assert_eq!(conn.counts.get(), (43, 0), "the prefix counts as sent");
}

#[tokio::test(start_paused = true)]
async fn a_slow_local_reader_gets_every_byte_in_order_and_then_eof() {
    let mut conn = start(Role::Server, 1024);
    // More chunks than pile up zero-copy behind the blocked write, the last one with the fin.
    let download = pattern(10 * 16 * 1024, 3);
    let pieces: Vec<&[u8]> = download.chunks(16 * 1024).collect();
    for (i, piece) in pieces.iter().enumerate() {
        conn.tunnel
            .send(Chunk {
                fin: i == pieces.len() - 1,
                ..data(piece)
            })
            .await;
    }
    let mut got = Vec::new();
    let mut small = [0; 700];
    loop {
        let n = within("the download", conn.client.read(&mut small))
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&small[..n]);
        // A writer that loses its place would repeat bytes forever, never idling the clock.
        assert!(got.len() <= download.len(), "more bytes than were sent");
    }
    assert!(got == download, "the download arrived altered");
    assert_eq!(conn.counts.get(), (0, download.len() as u64));
}
