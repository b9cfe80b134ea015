//! Reading and parsing the CONNECT request head. The frontend speaks only CONNECT, so a small
//! parser over `httparse` gives exact control over limits and hands any bytes the client
//! pipelined after the head to the tunnel untouched.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::auth::Credentials;

/// Most header lines accepted in a CONNECT request.
pub const MAX_HEADERS: usize = 64;

/// The header that names a destination in the cluster other than its API server
/// (`Proxy-Destination: HOST:PORT`); the cluster's agent dials it only if it was allowed to
/// (`--allow-destination`). A header, not the request target, because the target's host names
/// the cluster, and a kubeconfig's `proxy-url` gives no other place for one.
pub const DESTINATION_HEADER: &str = "proxy-destination";

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Host of the request target, lower-cased.
    pub host: String,
    /// Port of the request target.
    pub port: u16,
    /// Bytes the client sent after the head (to be forwarded first).
    pub leftover: Bytes,
    /// What the `Proxy-Authorization` header presented.
    pub credentials: Credentials,
    /// The destination a `Proxy-Destination` header named (`None`: the cluster's API server),
    /// as sent: agents compare it as text.
    pub destination: Option<String>,
}

/// Why a request head was refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not valid HTTP/1.x, or a bad request target.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A method other than CONNECT.
    #[error("method {0} not allowed: this proxy only accepts CONNECT")]
    MethodNotAllowed(String),
    /// The head exceeded the size limit or had too many headers.
    #[error("request head larger than {0} bytes or with too many headers")]
    TooLarge(usize),
    /// The client closed the connection before completing the head.
    #[error("client closed the connection before sending a request")]
    Closed,
    /// Reading from the client failed.
    #[error("reading the request failed")]
    Io(#[source] std::io::Error),
}

/// Reads from `reader` until a complete head is parsed or a limit is hit.
pub async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_head: usize,
) -> Result<ConnectRequest, RequestError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let n = reader.read_buf(&mut buf).await.map_err(RequestError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                RequestError::Closed
            } else {
                RequestError::Malformed("connection closed inside the request head".into())
            });
        }
        if let Some((req, head_len)) = parse(&buf, max_head)? {
            let mut buf = buf;
            let _ = buf.split_to(head_len);
            return Ok(ConnectRequest {
                leftover: buf.freeze(),
                ..req
            });
        }
        if buf.len() >= max_head {
            return Err(RequestError::TooLarge(max_head));
        }
    }
}

/// Parses a request head from the start of `buf`. `Ok(None)` means more bytes are needed.
/// On success returns the request (with empty `leftover`) and the head's length.
pub fn parse(buf: &[u8], max_head: usize) -> Result<Option<(ConnectRequest, usize)>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooLarge(max_head)),
        Err(err) => return Err(RequestError::Malformed(err.to_string())),
    };
    if head_len > max_head {
        return Err(RequestError::TooLarge(max_head));
    }
    let method = req.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(RequestError::MethodNotAllowed(method.to_owned()));
    }
    let target = req.path.unwrap_or_default();
    let (host, port) = parse_authority(target)?;
    let mut auth = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("proxy-authorization"));
    let credentials = match (auth.next(), auth.next()) {
        (None, _) => Credentials::None,
        (Some(h), None) => Credentials::parse(Some(h.value)),
        (Some(_), Some(_)) => Credentials::Malformed,
    };
    let mut dest = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(DESTINATION_HEADER));
    let destination = match (dest.next(), dest.next()) {
        (None, _) => None,
        (Some(h), None) => Some(parse_destination(h.value)?),
        (Some(_), Some(_)) => {
            return Err(RequestError::Malformed(
                "more than one Proxy-Destination header".into(),
            ));
        }
    };
    Ok(Some((
        ConnectRequest {
            host,
            port,
            leftover: Bytes::new(),
            credentials,
            destination,
        },
        head_len,
    )))
}

/// Splits an authority-form request target `host:port`.
fn parse_authority(target: &str) -> Result<(String, u16), RequestError> {
    let bad = |why: &str| RequestError::Malformed(format!("request target {target:?}: {why}"));
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if host.starts_with('[') || host.contains(['/', '@', '?', '#', ':']) {
        return Err(bad("host must be a cluster name"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("port must be a number from 1 to 65535"))?;
    Ok((host.to_ascii_lowercase(), port))
}

/// Longest `Proxy-Destination`: a 253-character name, brackets, colon and port.
const MAX_DESTINATION: usize = 253 + 2 + 6;

/// Checks a `Proxy-Destination` value: `HOST:PORT`, the host a DNS name, an IPv4 address or a
/// bracketed IPv6 address. Checked here so an agent is only ever sent something it could
/// dial, and a typo is a `400` naming it rather than an agent's refusal.
fn parse_destination(value: &[u8]) -> Result<String, RequestError> {
    let bad = |why: &str| {
        RequestError::Malformed(format!(
            "Proxy-Destination {:?}: {why}",
            String::from_utf8_lossy(&value[..value.len().min(80)])
        ))
    };
    let text = std::str::from_utf8(value)
        .map_err(|_| bad("expected HOST:PORT"))?
        .trim();
    if text.len() > MAX_DESTINATION {
        return Err(bad("too long"));
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0 && !port.starts_with('+'))
        .ok_or_else(|| bad("port must be a number from 1 to 65535"))?;
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        }
    };
    if !host_ok {
        return Err(bad(
            "host must be a DNS name, an IPv4 address or a bracketed IPv6 address",
        ));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> (ConnectRequest, usize) {
        parse(raw.as_bytes(), 16 * 1024).unwrap().unwrap()
    }

    #[test]
    fn parses_connect_with_headers() {
        let raw = "CONNECT Alpha:443 HTTP/1.1\r\nHost: alpha:443\r\nProxy-Authorization: Basic eA==\r\n\r\nxyz";
        let (req, len) = ok(raw);
        assert_eq!(req.host, "alpha");
        assert_eq!(req.port, 443);
        assert_eq!(&raw[len..], "xyz");
    }

    #[test]
    fn reads_the_destination_header() {
        let (req, _) = ok("CONNECT alpha:443 HTTP/1.1\r\n\r\n");
        assert_eq!(req.destination, None);
        for dest in [
            "prometheus.monitoring.svc:9090",
            "Metrics_1.kube-system:443",
            "10.0.0.1:80",
            "[fd00::1]:8443",
        ] {
            let (req, _) = ok(&format!(
                "CONNECT alpha:443 HTTP/1.1\r\nproxy-DESTINATION:  {dest} \r\n\r\n"
            ));
            assert_eq!(req.destination.as_deref(), Some(dest));
        }
    }

    #[test]
    fn refuses_bad_destinations() {
        let long = format!("{}:443", "a".repeat(254));
        for dest in [
            "",
            "host",
            "host:",
            ":443",
            "host:0",
            "host:+80",
            "host:65536",
            "a/b:80",
            "user@host:80",
            "fd00::1:80",
            "[fd00::1:80",
            "[not-v6]:80",
            "h\u{e9}te:80",
            long.as_str(),
        ] {
            let raw = format!("CONNECT alpha:443 HTTP/1.1\r\nProxy-Destination: {dest}\r\n\r\n");
            let err = parse(raw.as_bytes(), 4096).unwrap_err();
            assert!(
                matches!(&err, RequestError::Malformed(m) if m.contains("Proxy-Destination")),
                "{dest:?}: {err:?}"
            );
        }
        let twice = "CONNECT alpha:443 HTTP/1.1\r\nProxy-Destination: a:1\r\nProxy-Destination: b:2\r\n\r\n";
        assert!(matches!(
            parse(twice.as_bytes(), 4096),
            Err(RequestError::Malformed(m)) if m.contains("more than one")
        ));
    }

    #[test]
    fn partial_head_needs_more() {
        assert!(matches!(
            parse(b"CONNECT alpha:443 HTTP/1.1\r\nHost: a", 1024),
            Ok(None)
        ));
    }

    #[test]
    fn refuses_other_methods() {
        let err = parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1024).unwrap_err();
        assert!(
            matches!(&err, RequestError::MethodNotAllowed(m) if m == "GET"),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_bad_targets() {
        for target in [
            "alpha",
            "alpha:",
            ":443",
            "alpha:0",
            "alpha:99999",
            "[::1]:443",
            "a/b:443",
            "alpha:http",
        ] {
            let raw = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
            assert!(
                matches!(parse(raw.as_bytes(), 1024), Err(RequestError::Malformed(_))),
                "{target} accepted"
            );
        }
    }

    #[test]
    fn refuses_garbage_and_oversize() {
        assert!(matches!(
            parse(b"\x00\x01\x02 junk\r\n\r\n", 1024),
            Err(RequestError::Malformed(_))
        ));
        let mut raw = String::from("CONNECT alpha:443 HTTP/1.1\r\n");
        for i in 0..(MAX_HEADERS + 1) {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        assert!(matches!(
            parse(raw.as_bytes(), 1 << 20),
            Err(RequestError::TooLarge(l)) if l == 1 << 20
        ));
        let long = format!(
            "CONNECT alpha:443 HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(2000)
        );
        assert!(matches!(
            parse(long.as_bytes(), 1000),
            Err(RequestError::TooLarge(1000))
        ));
    }

    #[tokio::test]
    async fn read_request_keeps_pipelined_bytes_and_limits_size() {
        let mut input: &[u8] = b"CONNECT alpha:443 HTTP/1.1\r\n\r\n\x16\x03\x01hello";
        let req = read_request(&mut input, 1024).await.unwrap();
        assert_eq!(&req.leftover[..], b"\x16\x03\x01hello");

        let big = format!("CONNECT alpha:443 HTTP/1.1\r\nX: {}", "a".repeat(4096));
        let mut input = big.as_bytes();
        assert!(matches!(
            read_request(&mut input, 1024).await,
            Err(RequestError::TooLarge(1024))
        ));

        let mut empty: &[u8] = b"";
        assert!(matches!(
            read_request(&mut empty, 1024).await,
            Err(RequestError::Closed)
        ));
    }
}
