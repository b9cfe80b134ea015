//! A fake member-cluster API server: HTTPS with the member's own CA, answering enough of the
//! Kubernetes API for kubectl (discovery, `/version`, namespaces as a table, a chunked watch)
//! plus `/large?bytes=N` for big bodies. Every answer names the cluster, so a test can tell which
//! member it reached.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use proxy_certs::DevPki;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

type Body = BoxBody<Bytes, Infallible>;

/// Events a watch sends, and the pause between them.
pub const WATCH_EVENTS: usize = 5;
/// Pause between watch events.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(300);

/// A running fake API server; it stops when the test's runtime ends.
#[derive(Debug, Clone)]
pub struct FakeApiServer {
    /// Its address (the agent's `--upstream`).
    pub addr: SocketAddr,
    /// The cluster it plays.
    pub cluster: String,
}

impl FakeApiServer {
    /// Starts the API server of `cluster` with the certificate from `pki`.
    pub async fn start(pki: &DevPki, cluster: &str) -> anyhow::Result<Self> {
        let identity = proxy_common::tls::CertKeyPaths {
            cert: pki.apiserver_cert(cluster),
            key: pki.apiserver_key(cluster),
        };
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            proxy_common::tls::load_certs(&identity.cert)?,
            proxy_common::tls::load_key(&identity.key)?,
        )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let name: Arc<str> = cluster.into();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let name = name.clone();
                        async move { Ok::<_, Infallible>(route(&name, req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            cluster: cluster.to_owned(),
        })
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn json_response(value: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The namespaces of `cluster`: two common ones and one only it has.
pub fn namespaces(cluster: &str) -> Vec<String> {
    vec![
        "default".into(),
        "kube-system".into(),
        format!("{cluster}-only"),
    ]
}

fn namespace_object(name: &str) -> serde_json::Value {
    json!({
        "kind": "Namespace", "apiVersion": "v1",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

fn namespace_table(cluster: &str) -> serde_json::Value {
    let rows: Vec<_> = namespaces(cluster)
        .iter()
        .map(|n| {
            json!({"cells": [n, "Active", "300d"], "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"name": n, "creationTimestamp": "2026-01-01T00:00:00Z"}}})
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": "1"},
        "columnDefinitions": [
            {"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0},
            {"name": "Status", "type": "string", "format": "", "description": "Phase", "priority": 0},
            {"name": "Age", "type": "string", "format": "", "description": "Age", "priority": 0}
        ],
        "rows": rows
    })
}

async fn route(cluster: &str, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    match path.as_str() {
        "/version" => json_response(json!({
            "major": "1", "minor": "32", "gitVersion": format!("v1.32.0+{cluster}"),
            "gitCommit": cluster, "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"
        })),
        "/api" => json_response(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:443"}]
        })),
        "/apis" => json_response(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})),
        "/api/v1" => json_response(json!({
            "kind": "APIResourceList", "groupVersion": "v1",
            "resources": [{"name": "namespaces", "singularName": "namespace", "namespaced": false,
                           "kind": "Namespace", "verbs": ["get", "list", "watch"], "shortNames": ["ns"]}]
        })),
        "/api/v1/namespaces" if query.contains("watch=true") || query.contains("watch=1") => {
            watch(cluster)
        }
        "/api/v1/namespaces" if accept.contains("as=Table") => {
            json_response(namespace_table(cluster))
        }
        "/api/v1/namespaces" => json_response(json!({
            "kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
            "items": namespaces(cluster).iter().map(|n| namespace_object(n)).collect::<Vec<_>>()
        })),
        "/large" => large(&query),
        _ => {
            let mut resp = json_response(json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("{path} not found in {cluster}"), "reason": "NotFound", "code": 404
            }));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp
        }
    }
}

/// A chunked watch: one event per [`WATCH_INTERVAL`], [`WATCH_EVENTS`] in all.
fn watch(cluster: &str) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let cluster = cluster.to_owned();
    tokio::spawn(async move {
        for i in 0..WATCH_EVENTS {
            let mut object = namespace_object(&format!("{cluster}-watch-{i}"));
            object["metadata"]["resourceVersion"] = json!((i + 2).to_string());
            let event = json!({"type": "ADDED", "object": object});
            let line = format!("{event}\n");
            if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                return;
            }
            tokio::time::sleep(WATCH_INTERVAL).await;
        }
    });
    let body = StreamBody::new(ReceiverStream::new(rx)).boxed();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `N` bytes of [`crate::data::pattern`], streamed in 64 KiB frames.
fn large(query: &str) -> Response<Body> {
    let n: u64 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("bytes="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        let mut pattern = crate::data::Pattern::new(n);
        while let Some(block) = pattern.next_block() {
            if tx.send(Ok(Frame::data(block))).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_LENGTH,
        hyper::header::HeaderValue::from(n),
    );
    resp
}
