//! One-message gRPC calls on h2 directly (`Join.Join`, `Join.Renew`), beside the streams of
//! [`crate::grpc`], in the same wire format: the agent calls ([`call`]), the server reads the
//! request ([`request`]) and answers ([`answer`]).

use std::time::Duration;

use h2::RecvStream;
use h2::client::SendRequest;
use prost::Message;
use tonic::Status;

use crate::grpc::{Frame, Inbound, accepted_head, encode, refuse};

/// Calls `path` with `req` on the HTTP/2 connection of `send` and waits for the one answer, at
/// most `timeout`.
pub async fn call<Req, Resp>(
    send: SendRequest<Frame>,
    path: &str,
    req: Req,
    timeout: Duration,
) -> Result<Resp, Status>
where
    Req: Message,
    Resp: Message + Default,
{
    let exchange = async {
        let mut send = send.ready().await.map_err(from_h2)?;
        // The authority is only a label: the connection is already made.
        let request = http::Request::post(format!("https://proxy-server{path}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .map_err(|e| Status::internal(format!("request for {path}: {e}")))?;
        let (response, mut body) = send.send_request(request, false).map_err(from_h2)?;
        // A few hundred bytes, far below any window: h2 sends them as capacity comes.
        body.send_data(encode(req), true).map_err(from_h2)?;
        let mut inbound = Inbound::<Resp>::new(response);
        match inbound.message().await? {
            Some(resp) => Ok(resp),
            None => Err(Status::internal(format!("{path} ended without an answer"))),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            )))
        })
}

/// The one request message of a stream the server was offered, at most `timeout` away.
pub async fn request<M: Message + Default>(
    body: RecvStream,
    timeout: Duration,
) -> Result<M, Status> {
    let mut inbound = Inbound::<M>::from_request(body);
    match tokio::time::timeout(timeout, inbound.message()).await {
        Ok(Ok(Some(msg))) => Ok(msg),
        Ok(Ok(None)) => Err(Status::invalid_argument("the request held no message")),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no request within {timeout:?}"
        ))),
    }
}

/// Answers a stream with `result`: the message and `grpc-status: 0`, or a trailers-only refusal.
pub fn answer<M: Message>(mut respond: h2::server::SendResponse<Frame>, result: Result<M, Status>) {
    let msg = match result {
        Ok(msg) => msg,
        Err(status) => return refuse(respond, &status),
    };
    // A stream the peer already reset needs no answer.
    let Ok(mut send) = respond.send_response(accepted_head(), false) else {
        return;
    };
    if send.send_data(encode(msg), false).is_ok() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let _ = send.send_trailers(trailers);
    }
}

fn from_h2(err: h2::Error) -> Status {
    Status::unavailable(format!("HTTP/2: {err}"))
}
