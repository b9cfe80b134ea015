//! The admin listener: `/healthz` (the process answers), `/readyz` (the component's own
//! readiness checks; `?verbose` lists each), `/metrics`, and routes a component adds (the
//! server's status page and kubeconfigs).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Time an admin client has to send its request head.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A readiness check: `Ok(detail)` when ready, otherwise why not.
pub type ReadyCheck = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// A response for the admin listener.
pub type AdminResponse = Response<Full<Bytes>>;

/// Extra routes: given the path and query, a response, or `None` for 404.
pub type Routes = Arc<dyn Fn(&str, Option<&str>) -> Option<AdminResponse> + Send + Sync>;

/// Decides from a request's `Authorization` header whether it may be served.
pub type Authorize = Arc<dyn Fn(Option<&[u8]>) -> bool + Send + Sync>;

/// What the admin listener serves.
#[derive(Clone)]
pub struct Admin {
    /// `/readyz` checks, by name.
    pub checks: Vec<(&'static str, ReadyCheck)>,
    /// `/metrics`.
    pub metrics: Arc<Registry>,
    /// Further GET routes.
    pub routes: Option<Routes>,
    /// TCP keepalive of admin connections.
    pub keepalive: Option<crate::net::Keepalive>,
    /// Host names a request may name in its `Host` header besides IP addresses and `localhost`
    /// (lower case). Anything else is refused: a page a browser loaded from another site's name
    /// that then resolves to us (DNS rebinding) gets nothing.
    pub hosts: Arc<[String]>,
    /// When set, every request must carry an `Authorization` it accepts; others get `401`.
    pub authorize: Option<Authorize>,
}

/// Whether a `Host` header value names this listener acceptably: an IP address (what probes,
/// Prometheus and port-forwards use), `localhost`, or one of `allowed`; with or without a port.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(is_port) => {
                return ip.parse::<std::net::Ipv6Addr>().is_ok();
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// Serves the admin endpoints on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, ready: Admin, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            res = listener.accept() => match res {
                Ok(conn) => conn,
                Err(err) => {
                    // Typically EMFILE: back off instead of spinning on the pending connection.
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = crate::net::configure(&stream, ready.keepalive);
        let ready = ready.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = service_fn(move |req| {
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(route(&req, &ready)) }
            });
            // A client that never finishes its request head is dropped.
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

fn route(req: &Request<Incoming>, admin: &Admin) -> AdminResponse {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok());
    // No Host at all (an HTTP/1.0 health check, as HAProxy's `option httpchk` sends) is served:
    // DNS rebinding needs a browser, and browsers always send one.
    let has_host = req.headers().contains_key(hyper::header::HOST);
    if has_host && !host.is_some_and(|h| host_allowed(h, &admin.hosts)) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "this listener does not answer for that Host (use its IP address, localhost, or a name it was given)\n".into(),
        );
    }
    if let Some(authorize) = &admin.authorize {
        let header = req.headers().get(hyper::header::AUTHORIZATION);
        if !authorize(header.map(hyper::header::HeaderValue::as_bytes)) {
            let mut resp = text(
                StatusCode::UNAUTHORIZED,
                "credentials required: a token of a client with `operator: true` in the auth file (Bearer, or Basic with it as password)\n".into(),
            );
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Basic realm=\"proxy-server operator\""),
            );
            return resp;
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    let verbose = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "verbose" || kv.starts_with("verbose="))
    });
    match req.uri().path() {
        "/healthz" | "/livez" if verbose => {
            text(StatusCode::OK, "[+]ping ok\nhealthz check passed\n".into())
        }
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => readyz(&admin.checks, verbose),
        "/metrics" => {
            let mut body = String::new();
            if let Err(err) = prometheus_client::encoding::text::encode(&mut body, &admin.metrics) {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics: {err}\n"),
                );
            }
            let mut resp = text(StatusCode::OK, body);
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        path => admin
            .routes
            .as_ref()
            .and_then(|routes| routes(path, req.uri().query()))
            .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n".into())),
    }
}

/// Runs every check; the Kubernetes `?verbose` format lists each.
fn readyz(checks: &[(&'static str, ReadyCheck)], verbose: bool) -> AdminResponse {
    let mut report = String::new();
    let mut failures = Vec::new();
    for (name, check) in checks {
        match check() {
            Ok(detail) => report.push_str(&format!("[+]{name} ok: {detail}\n")),
            Err(why) => {
                report.push_str(&format!("[-]{name} failed: {why}\n"));
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    let status = if failures.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = match (verbose, failures.is_empty()) {
        (true, true) => format!("{report}readyz check passed\n"),
        (true, false) => format!("{report}readyz check failed\n"),
        (false, true) => "ok\n".to_owned(),
        (false, false) => format!("not ready: {}\n", failures.join("; ")),
    };
    text(status, body)
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn hosts_are_ip_addresses_localhost_or_named() {
        let named = ["proxy.example.com".to_owned()];
        for ok in [
            "127.0.0.1",
            "10.1.2.3:8095",
            "[::1]",
            "[fd00::1]:8096",
            "localhost:8096",
            "LOCALHOST",
            "proxy.example.com",
            "Proxy.Example.com:443",
        ] {
            assert!(host_allowed(ok, &named), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8095",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "[::1]x",
            "[evil]:80",
            "127.0.0.1:http",
            "",
            ":8095",
        ] {
            assert!(!host_allowed(bad, &named), "{bad}");
        }
    }
}
