//! Refused CONNECTs: which HTTP status each failure becomes, and the response that says why
//! (the reason is the body and, bounded and printable, the status line's reason phrase).

use http::StatusCode;
use proxy_common::error::chain;
use std::time::Instant;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Frontend;
use crate::connect::RequestError;
use crate::metrics::Outcome;
use crate::registry::{AgentHandle, LimitError};

/// A CONNECT that did not become a tunnel: the status and one human-readable line.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) reason: String,
    pub(super) outcome: Outcome,
}

impl Refusal {
    pub(super) fn new(status: StatusCode, outcome: Outcome, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            outcome,
        }
    }
}

/// The one place request errors become HTTP statuses.
pub(super) fn refusal_for(err: &RequestError) -> Refusal {
    let status = match err {
        RequestError::Malformed(_) | RequestError::Io(_) | RequestError::Closed => {
            StatusCode::BAD_REQUEST
        }
        RequestError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        RequestError::TooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    };
    Refusal::new(status, Outcome::BadRequest, chain(err).to_string())
}

/// A refusal that is no fault of the client's: the agent, the limits or the fleet.
pub(super) fn unavailable(outcome: Outcome, reason: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::SERVICE_UNAVAILABLE, outcome, reason)
}

/// The answer that opens a tunnel. "Connection established" is what proxies customarily say
/// to a CONNECT, not the canonical "OK".
pub(super) const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Longest reason phrase in a status line; the body carries the whole reason.
pub const MAX_REASON_PHRASE: usize = 200;

/// The reason as an HTTP reason phrase: clients such as kubectl (Go) and the Python client
/// print the status line of a refused CONNECT, not its body, so the reason goes there too.
/// Printable ASCII only (RFC 9112 allows little else and clients choke on more), bounded.
fn reason_phrase(refusal: &Refusal) -> String {
    let mut phrase: String = refusal
        .reason
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(MAX_REASON_PHRASE)
        .collect();
    if phrase.trim().is_empty() {
        phrase = refusal
            .status
            .canonical_reason()
            .unwrap_or("Error")
            .to_owned();
    }
    phrase
}

fn error_response(refusal: &Refusal) -> Vec<u8> {
    let body = format!("{}\n", refusal.reason.replace(['\r', '\n'], " "));
    let extra = match refusal.status {
        StatusCode::METHOD_NOT_ALLOWED => "Allow: CONNECT\r\n",
        StatusCode::PROXY_AUTHENTICATION_REQUIRED => {
            "Proxy-Authenticate: Basic realm=\"multicluster-proxy\"\r\nProxy-Authenticate: Bearer realm=\"multicluster-proxy\"\r\n"
        }
        _ => "",
    };
    format!(
        "HTTP/1.1 {} {}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        refusal.status.as_u16(),
        reason_phrase(refusal),
        body.len()
    )
    .into_bytes()
}

/// Writes the refusal and closes the client's side.
async fn refuse<S: AsyncWrite + Unpin>(mut client: S, refusal: &Refusal) {
    let _ = client.write_all(&error_response(refusal)).await;
    let _ = client.shutdown().await;
}

impl Frontend {
    /// Counts `refusal` under `label` and logs it, then answers the client with it.
    pub(super) async fn refuse<S: AsyncWrite + Unpin>(
        &self,
        client: S,
        label: &str,
        refusal: Refusal,
    ) {
        self.metrics.count(label, refusal.outcome);
        tracing::info!(
            outcome = refusal.outcome.label(),
            status = refusal.status.as_u16(),
            reason = %refusal.reason,
            "connect refused"
        );
        refuse(client, &refusal).await;
    }

    /// The `cluster` label of a refused connection's metrics: `cluster` if it is registered now,
    /// else empty. Metric labels only ever carry names of registered clusters.
    pub(super) fn metric_label<'a>(&self, cluster: &'a str) -> &'a str {
        if self.clusters.is_registered(cluster) {
            cluster
        } else {
            ""
        }
    }
}

/// The refusal when `agent`, the best `cluster` has, has not answered the server since `since`.
pub(super) fn unresponsive(agent: &AgentHandle, cluster: &str, since: Instant) -> Refusal {
    unavailable(
        Outcome::AgentUnresponsive,
        format!(
            "agent {} of cluster {cluster:?} has not answered the server for {:.1?} (no other agent of the cluster answers)",
            agent.info.agent_id,
            since.elapsed()
        ),
    )
}

/// The refusal of a `Proxy-Destination` the cluster's agent will not dial. Generic on purpose:
/// the agent's reason lists what it may dial, and a client allowed one destination must not
/// learn the cluster's others from a refusal (the reason goes to the server's log instead).
pub(super) fn destination_forbidden(cluster: &str) -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        Outcome::DestinationForbidden,
        format!("destination not allowed for cluster {cluster:?}"),
    )
}

/// The refusal when a limit of the server is reached.
pub(super) fn limited(limit: LimitError) -> Refusal {
    unavailable(Outcome::Limited, limit.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_failure_is_refused_with_its_cause() {
        let err = RequestError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let r = refusal_for(&err);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.reason, "reading the request failed: connection reset");
    }

    #[test]
    fn a_refused_destination_says_only_that() {
        let r = destination_forbidden("alpha");
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let text = String::from_utf8(error_response(&r)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 403 destination not allowed for cluster \"alpha\"\r\n")
                && text.ends_with("\r\n\r\ndestination not allowed for cluster \"alpha\"\n"),
            "{text}"
        );
    }

    #[test]
    fn a_blank_reason_gives_the_canonical_phrase() {
        for (status, phrase) in [
            (400, "Bad Request"),
            (403, "Forbidden"),
            (405, "Method Not Allowed"),
            (407, "Proxy Authentication Required"),
            (408, "Request Timeout"),
            (431, "Request Header Fields Too Large"),
            (502, "Bad Gateway"),
            (503, "Service Unavailable"),
            (504, "Gateway Timeout"),
        ] {
            let r = Refusal::new(
                StatusCode::from_u16(status).unwrap(),
                Outcome::BadRequest,
                " ",
            );
            let text = String::from_utf8(error_response(&r)).unwrap();
            let line = format!("HTTP/1.1 {status} {phrase}\r\n");
            assert!(text.starts_with(&line), "{text}");
        }
    }

    #[test]
    fn the_reason_is_the_reason_phrase_printable_and_bounded() {
        let r = Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Outcome::NoAgent,
            "no agent connected for cluster \"gamma\"",
        );
        let text = String::from_utf8(error_response(&r)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 no agent connected for cluster \"gamma\"\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\nno agent connected for cluster \"gamma\"\n"));
        // An agent's reason may hold anything: no CR, LF or non-ASCII reaches the status line.
        let r = Refusal::new(
            StatusCode::BAD_GATEWAY,
            Outcome::DialFailed,
            format!("bad\r\nX-Injected: 1 \u{e9}{}", "x".repeat(500)),
        );
        let text = String::from_utf8(error_response(&r)).unwrap();
        let status = text.split("\r\n").next().unwrap();
        assert!(
            status.starts_with("HTTP/1.1 502 bad??X-Injected: 1 ?x"),
            "{status}"
        );
        assert_eq!(status.len(), "HTTP/1.1 502 ".len() + MAX_REASON_PHRASE);
        assert!(!text.contains("\r\nX-Injected"));
        let r = Refusal::new(StatusCode::BAD_REQUEST, Outcome::BadRequest, "");
        assert!(
            String::from_utf8(error_response(&r))
                .unwrap()
                .starts_with("HTTP/1.1 400 Bad Request\r\n")
        );
    }
}
