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
