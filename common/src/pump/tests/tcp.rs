//! What only a real socket shows: an abort is a TCP reset, a `fin` a TCP FIN, and a reset
//! from the local peer travels as an abort.

use super::*;

#[tokio::test]
async fn an_abort_resets_the_local_tcp_connection() {
    let mut conn = start_tcp(Role::Server).await;
    conn.tunnel.send(data(b"partial")).await;
    let mut got = [0; 7];
    within("the download", conn.client.read_exact(&mut got))
        .await
        .unwrap();
    conn.tunnel.end();
    let res = conn.result().await;
    assert!(matches!(res, Err(PumpError::PeerAborted)), "{res:?}");
    let err = within("the client's read", conn.client.read(&mut got))
        .await
        .expect_err("a truncated connection must not read as a clean EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn a_received_fin_is_a_tcp_fin_not_a_reset() {
    let mut conn = start_tcp(Role::Server).await;
    conn.tunnel
        .send(Chunk {
            fin: true,
            ..data(b"complete")
        })
        .await;
    let mut got = Vec::new();
    within("the client's EOF", conn.client.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"complete");
    conn.client.write_all(b"ack").await.unwrap();
    conn.client.shutdown().await.unwrap();
    assert_eq!(concat(&conn.tunnel.bytes(3).await), b"ack");
    conn.tunnel.expect_fin().await;
    conn.tunnel.end();
    conn.result().await.unwrap();
}

#[tokio::test]
async fn a_reset_from_the_local_peer_travels_as_an_abort_without_fin() {
    let mut conn = start_tcp(Role::Agent).await;
    conn.client.write_all(b"hello").await.unwrap();
    assert_eq!(concat(&conn.tunnel.bytes(5).await), b"hello");
    conn.client.set_zero_linger().unwrap();
    let Conn {
        client,
        mut tunnel,
        task,
        ..
    } = conn;
    drop(client);
    let res = within("splice's return", task).await.unwrap();
    match res {
        Err(PumpError::LocalRead(err)) => {
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        }
        other => panic!("{other:?}"),
    }
    tunnel.expect_end().await;
}
