//! `proxy-server kubeconfig`: fetches the kubeconfig of every connected cluster from a running
//! server's operator listener and writes it to a file or standard output, as the server wrote
//! it (JSON, which kubectl reads as the YAML it also is; see `crate::status`).

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proxy_common::error::BoxError;
use tokio::net::TcpStream;

/// Why the kubeconfig could not be written.
// Variant fields are described by each variant's #[error] message, not by
// one-word doc lines.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    /// The operator URL is not `http://HOST:PORT`.
    #[error("--operator-url {0:?}: expected http://HOST:PORT")]
    Url(String),
    /// The operator listener could not be reached or answered badly.
    #[error("fetching {url}")]
    Fetch { url: String, source: BoxError },
    /// The server answered with an error (e.g. no cluster reported its CA).
    #[error("{url} answered {status}: {body}")]
    Refused {
        url: String,
        /// HTTP status.
        status: u16,
        /// The server's reason.
        body: String,
    },
    /// Writing the file failed.
    #[error("writing {path}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Fetches `/api/v1/kubeconfig` from `operator_url` and writes it to `out` (stdout if `None`).
pub async fn write(operator_url: &str, out: Option<&Path>) -> Result<(), KubeconfigError> {
    let authority = operator_url
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| KubeconfigError::Url(operator_url.to_owned()))?;
    let url = format!("http://{authority}/api/v1/kubeconfig");
    let fetch_err = |source: BoxError| KubeconfigError::Fetch {
        url: url.clone(),
        source,
    };
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|e| fetch_err(e.into()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| fetch_err(e.into()))?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/api/v1/kubeconfig")
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| fetch_err(e.into()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fetch_err(e.into()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fetch_err(e.into()))?
        .to_bytes();
    if status != 200 {
        return Err(KubeconfigError::Refused {
            url,
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    match out {
        Some(path) => std::fs::write(path, &body).map_err(|source| KubeconfigError::Write {
            path: path.display().to_string(),
            source,
        }),
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(&body)
                .map_err(|source| KubeconfigError::Write {
                    path: "standard output".into(),
                    source,
                })
        }
    }
}
