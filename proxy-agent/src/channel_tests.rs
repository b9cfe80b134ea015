//! The agent's channel against a real h2 server over an in-memory pipe: what tonic's server sends
//! (trailers-only refusals, messages split across frames, statuses in trailers, resets) must read
//! as tonic's client read it, and the pipe must write what tonic's server reads.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use prost::Message;
use proxy_common::grpc::{Finish, encode, pipe};
use proxy_proto::{AgentMessage, Chunk, agent_message};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::{H2Channel, Settings};

fn chunk(data: &[u8]) -> Chunk {
    Chunk {
        data: Bytes::copy_from_slice(data),
        fin: true,
        credit: 1 << 20,
        blocked_at: 77,
        start: false,
    }
}

fn prefixed(msg: &Chunk) -> Bytes {
    let mut frame = encode(msg.clone());
    let len = bytes::Buf::remaining(&frame);
    bytes::Buf::copy_to_bytes(&mut frame, len)
}

fn settings() -> Settings {
    Settings {
        stream_window: proxy_proto::STREAM_WINDOW,
        connection_window: proxy_proto::CONNECTION_WINDOW,
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
    }
}

/// An h2 server on one end of an in-memory pipe, the agent's channel on the other; the server
/// answers the first stream with `respond`, after checking the request as tonic would route it.
async fn served<F, Fut>(respond: F) -> H2Channel
where
    F: FnOnce(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let mut conn = h2::server::handshake(server_io).await.unwrap();
        let (request, send) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while let Some(Ok(_)) = conn.accept().await {} });
        respond(request, send).await;
    });
    H2Channel::handshake(client_io, settings(), CancellationToken::new())
        .await
        .unwrap()
}

fn grpc_head(status: Option<(&str, &str)>) -> http::Response<()> {
    let mut resp = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    if let Some((code, message)) = status {
        resp = resp
            .header("grpc-status", code)
            .header("grpc-message", message);
    }
    resp.body(()).unwrap()
}

fn trailers(code: &str) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    map.insert("grpc-status", code.parse().unwrap());
    map
}

#[tokio::test]
async fn a_refusal_in_the_response_head_reads_as_its_status() {
    let channel = served(|request, mut send| async move {
        assert_eq!(request.uri().path(), proxy_proto::CONTROL_PATH);
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(request.headers()["content-type"], "application/grpc");
        let head = grpc_head(Some(("7", "cluster%20not%20yours")));
        send.send_response(head, true).unwrap();
    })
    .await;
    let (_send, mut inbound) = channel.open_control().await.unwrap();
    let err = inbound.opened().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "cluster not yours");
    assert!(!inbound.accepted());
    assert!(inbound.refused());
}

#[tokio::test]
async fn messages_across_frames_then_an_ok_status_end_the_stream_cleanly() {
    let a = chunk(&[3u8; 70_000]);
    let b = chunk(b"tail");
    let (a2, b2) = (a.clone(), b.clone());
    let channel = served(move |request, mut send| async move {
        assert_eq!(request.uri().path(), proxy_proto::DATA_PATH);
        assert_eq!(request.headers()[proxy_proto::DIAL_ID_HEADER], "42");
        let mut stream = send.send_response(grpc_head(None), false).unwrap();
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&prefixed(&a2));
        wire.extend_from_slice(&prefixed(&b2));
        let mut wire = wire.freeze();
        // Odd-sized frames: messages and prefixes straddle them.
        while !wire.is_empty() {
            let part = wire.split_to(wire.len().min(9_999));
            stream.send_data(part, false).unwrap();
        }
        stream.send_trailers(trailers("0")).unwrap();
    })
    .await;
    let mut stream = channel
        .open_data((proxy_proto::DIAL_ID_HEADER, 42u64.into()))
        .await
        .unwrap();
    assert_eq!(stream.inbound.message().await.unwrap(), Some(a));
    assert!(stream.inbound.accepted());
    assert_eq!(stream.inbound.message().await.unwrap(), Some(b));
    assert_eq!(stream.inbound.message().await.unwrap(), None);
}

#[tokio::test]
async fn an_error_status_in_the_trailers_or_a_reset_fails_the_stream() {
    let channel = served(|_, mut send| async move {
        let mut stream = send.send_response(grpc_head(None), false).unwrap();
        stream.send_trailers(trailers("13")).unwrap();
    })
    .await;
    let (_send, mut inbound) = channel.open_control().await.unwrap();
    let err = inbound.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(inbound.accepted(), "accepted, then failed");
    assert!(
        !inbound.refused(),
        "failed after it was accepted: not a refusal"
    );

    let channel = served(|_, mut send| async move {
        let mut stream = send.send_response(grpc_head(None), false).unwrap();
        stream.send_reset(h2::Reason::CANCEL);
    })
    .await;
    let (_send, mut inbound) = channel.open_control().await.unwrap();
    let err = inbound.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Cancelled);
}

/// A warm stream the server lets go before it answered it (`FEATURE_WARM_HEAD_AT_START`) is
/// reset with no head: neither accepted nor refused, so the agent does not pace it as a refusal.
#[tokio::test]
async fn a_stream_reset_before_any_answer_is_neither_accepted_nor_refused() {
    let channel = served(|_, mut send| async move {
        send.send_reset(h2::Reason::CANCEL);
    })
    .await;
    let mut stream = channel
        .open_data((
            proxy_proto::WARM_HEADER,
            http::HeaderValue::from_static("1"),
        ))
        .await
        .unwrap();
    let err = stream.inbound.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Cancelled, "{err:?}");
    assert!(!stream.inbound.accepted());
    assert!(!stream.inbound.refused());
}

#[tokio::test]
async fn the_pipe_writes_each_message_then_ends_the_stream() {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let channel = served(move |request, mut send| async move {
        let _stream = send.send_response(grpc_head(None), false).unwrap();
        let mut body = request.into_body();
        let mut wire = BytesMut::new();
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            body.flow_control().release_capacity(data.len()).unwrap();
            wire.extend_from_slice(&data);
        }
        let _ = done_tx.send(wire.freeze());
    })
    .await;
    let (send, _inbound) = channel.open_control().await.unwrap();
    let messages: Vec<AgentMessage> = (0..3)
        .map(|i| AgentMessage {
            msg: Some(agent_message::Msg::Pong(proxy_proto::Pong { seq: i })),
        })
        .collect();
    let stream = futures_util::stream::iter(messages.clone());
    pipe(stream, send, encode, Finish::Request).await.unwrap();
    let mut wire = done_rx.await.expect("the server saw the end of the stream");
    let mut got = Vec::new();
    while !wire.is_empty() {
        let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
        let msg = wire.split_to(5 + len).slice(5..);
        got.push(AgentMessage::decode(msg).unwrap());
    }
    assert_eq!(got, messages);
}

#[tokio::test]
async fn a_stream_reset_by_the_server_ends_the_pipe_even_while_it_has_nothing_to_send() {
    let channel = served(|_, mut send| async move {
        let mut stream = send.send_response(grpc_head(None), false).unwrap();
        stream.send_reset(h2::Reason::CANCEL);
        // Keeps the connection up: the reset, not its end, must stop the pipe.
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let (send, _inbound) = channel.open_control().await.unwrap();
    let idle = futures_util::stream::pending::<AgentMessage>();
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        pipe(idle, send, encode, Finish::Request),
    )
    .await
    .expect("the pipe ends on the reset");
    assert!(res.is_err());
}

#[tokio::test]
async fn a_closed_channel_fails_the_streams_on_it() {
    let close = CancellationToken::new();
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let mut conn = h2::server::handshake(server_io).await.unwrap();
        while let Some(Ok((_req, mut send))) = conn.accept().await {
            let _ = send.send_response(grpc_head(None), false);
        }
    });
    let channel = H2Channel::handshake(client_io, settings(), close.clone())
        .await
        .unwrap();
    let (_send, mut inbound) = channel.open_control().await.unwrap();
    inbound.opened().await.unwrap();
    close.cancel();
    let res = tokio::time::timeout(Duration::from_secs(5), inbound.next())
        .await
        .expect("the stream fails when its connection is closed");
    assert!(matches!(res, Some(Err(_))), "{res:?}");
}
