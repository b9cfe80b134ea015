//! Half-close: a `fin` each way while the other direction flows, and the close that follows
//! (the agent ends its half first; the server waits for it, within `CLOSE_TIMEOUT`).

use super::*;

#[tokio::test(start_paused = true)]
async fn socket_eof_travels_as_fin_while_the_other_direction_flows() {
    let mut conn = start(Role::Agent, ROOMY);
    conn.client.write_all(b"request").await.unwrap();
    conn.client.shutdown().await.unwrap();
    assert_eq!(concat(&conn.tunnel.bytes(7).await), b"request");
    conn.tunnel.expect_fin().await;

    // Half-closed: the response still flows, for as long as it takes.
    for part in [&b"response, "[..], b"in parts"] {
        conn.tunnel.send(data(part)).await;
        let mut got = vec![0; part.len()];
        within("the response", conn.client.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(got, part);
    }
    conn.tunnel.expect_silence().await;
    assert!(!conn.task.is_finished());

    conn.tunnel.send(fin()).await;
    let mut rest = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    conn.tunnel.expect_end().await;
    conn.tunnel.end();
    conn.result().await.unwrap();
    assert!(!conn.aborted());
    assert_eq!(conn.counts.get(), (7, 18));
}

#[tokio::test(start_paused = true)]
async fn a_received_fin_shuts_the_sockets_write_side_while_the_socket_keeps_sending() {
    let mut conn = start(Role::Server, ROOMY);
    conn.tunnel
        .send(Chunk {
            fin: true,
            ..data(b"last words")
        })
        .await;
    let mut got = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"last words", "the bytes of the fin chunk come first");

    // The client reads EOF but may still send, for as long as it takes.
    for part in [&b"still "[..], b"uploading"] {
        conn.client.write_all(part).await.unwrap();
        assert_eq!(concat(&conn.tunnel.bytes(part.len()).await), part);
    }
    conn.tunnel.expect_silence().await;
    assert!(!conn.task.is_finished());
    conn.client.shutdown().await.unwrap();
    conn.tunnel.expect_fin().await;
    conn.tunnel.end();
    conn.result().await.unwrap();
    assert!(!conn.aborted());
    assert_eq!(conn.counts.get(), (15, 10));
}

#[tokio::test(start_paused = true)]
async fn the_agent_ends_its_half_first_then_waits_for_the_servers_end() {
    let mut conn = start(Role::Agent, ROOMY);
    close_both_ways(&mut conn).await;
    conn.tunnel.expect_end().await;
    // Dropping the response half now would reset the stream and lose what the server still
    // has queued: its end of stream is awaited.
    assert!(
        timeout(HANG, &mut conn.task).await.is_err(),
        "returned before the server ended its half"
    );
    // Late credit is read and ignored; only the end of stream ends the wait.
    conn.tunnel.send(credit(1 << 30)).await;
    assert!(timeout(HANG, &mut conn.task).await.is_err());
    conn.tunnel.end();
    conn.result().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_server_keeps_its_half_open_until_the_agent_has_ended_its_own() {
    let mut conn = start(Role::Server, ROOMY);
    close_both_ways(&mut conn).await;
    conn.tunnel.expect_silence().await;
    assert!(!conn.task.is_finished());
    conn.tunnel.end();
    conn.tunnel.expect_end().await;
    conn.result().await.unwrap();
    assert!(!conn.aborted());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_ends_its_half_is_given_up_after_the_close_timeout() {
    let mut conn = start(Role::Server, ROOMY);
    close_both_ways(&mut conn).await;
    let t = Instant::now();
    let res = timeout(2 * CLOSE_TIMEOUT, &mut conn.task)
        .await
        .expect("splice still waiting")
        .unwrap();
    res.unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= CLOSE_TIMEOUT - Duration::from_millis(10)
            && waited <= CLOSE_TIMEOUT + Duration::from_millis(10),
        "{waited:?}"
    );
    assert!(!conn.aborted(), "a late close is still a close");
    conn.tunnel.expect_end().await;
}
