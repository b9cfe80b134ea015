//! Joining by token and renewing: the agent's side of proxy-server's `join` module
//! (docs/security.md, "Joining by token").
//!
//! With `--state-dir` the agent keeps its identity there: `identity.pem` (its private key and
//! certificate chain in one file, so a renewal replaces both with one rename and a crash can
//! never leave a key beside another key's certificate) and `server-ca.pem` (the servers' CA),
//! both 0600. A first start with no identity joins: it verifies the server against the pin of
//! its CA (`--server-ca-hash`) before sending anything, makes its key locally, sends a CSR with
//! the token, and writes what it gets. Later starts use the folder. While it runs, the agent
//! renews at a jittered 70–90 % of its certificate's lifetime over its mutual-TLS identity;
//! the new pair is picked up by the TLS configuration's reload, and open tunnels continue.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proxy_common::error::chain;
use proxy_common::reload::Reloadable;
use proxy_proto::{Issued, JoinRequest, RenewRequest};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData as _};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::config::ServerTarget;
use crate::session::{CONNECT_TIMEOUT, ConnectError, tls_to};
pub use crate::state_dir::StateDir;

/// Why the agent has no identity to run with.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "--state-dir {0} holds no certificate yet: start the agent with --join-token and --server-ca-hash (`proxy-server token create` prints both)"
    )]
    NoIdentity(PathBuf),
    #[error(
        "the certificate in --state-dir {dir} expired at {at}: the agent was stopped past its renewal. Join again: start it once with a new --join-token (`proxy-server token create`)"
    )]
    Expired { dir: PathBuf, at: String },
    #[error(transparent)]
    State(#[from] crate::state_dir::StateError),
    #[error(
        "--server-ca-hash {0:?}: expected sha256: and 64 hex digits, as `proxy-server token create` prints it"
    )]
    BadPin(String),
    #[error(
        "--join-token: expected 6 and 16 characters of [a-z0-9] joined by a dot, as `proxy-server token create` prints it"
    )]
    BadToken,
    #[error("could not join through any --server; the last one, {server}, said")]
    Server {
        server: String,
        #[source]
        source: Failure,
    },
}

/// Why one attempt to join or renew through one server failed.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// TCP or TLS (a pin that matches no certificate the server sent fails here, before the
    /// token is sent).
    #[error("cannot connect")]
    Connect(#[source] ConnectError),
    #[error("http/2")]
    Http2(#[source] h2::Error),
    /// The server refused; its reason.
    #[error("the server refused: {}", .0.message())]
    Refused(tonic::Status),
    /// What came back is not a certificate for this agent's key.
    #[error("the server's answer is unusable: {0}")]
    Answer(String),
    #[error("making the key or CSR: {0}")]
    Key(String),
}

/// What the agent joins with, from its flags.
#[derive(Debug, Clone)]
pub struct JoinWith {
    /// `--join-token`.
    pub token: String,
    /// `--server-ca-hash`.
    pub pin: String,
    /// `--cluster`, if given: the CSR names it, and the server refuses a token for another.
    pub cluster: Option<String>,
}

/// With `--state-dir`, makes sure it holds a usable identity (joining if need be, see
/// [`ensure_identity`]); without, nothing.
pub async fn from_args(args: &crate::Args) -> Result<(), JoinError> {
    let Some(dir) = &args.state_dir else {
        return Ok(());
    };
    let join = args.join_token.as_ref().map(|token| JoinWith {
        token: token.trim().to_owned(),
        pin: args.server_ca_hash.clone().unwrap_or_default(),
        cluster: args.cluster.clone(),
    });
    let servers = crate::config::servers(args)?;
    ensure_identity(
        &StateDir::new(dir),
        join.as_ref(),
        &servers,
        args.tcp_keepalive.0,
    )
    .await
}

/// Makes sure `dir` holds a usable identity: joins through `servers` (in order, until one
/// answers) when it holds none or an expired one and a token was given.
pub async fn ensure_identity(
    dir: &StateDir,
    join: Option<&JoinWith>,
    servers: &[ServerTarget],
    keepalive: Option<proxy_common::net::Keepalive>,
) -> Result<(), JoinError> {
    let held = dir.validity()?;
    if let Some((_, not_after)) = held {
        if not_after > SystemTime::now() {
            if join.is_some() {
                tracing::info!(dir = %dir.path().display(), "using the identity in --state-dir; --join-token is not needed any more");
            }
            return Ok(());
        }
        if join.is_none() {
            return Err(JoinError::Expired {
                dir: dir.path().to_owned(),
                at: humantime::format_rfc3339_seconds(not_after).to_string(),
            });
        }
    }
    let Some(join) = join else {
        return Err(JoinError::NoIdentity(dir.path().to_owned()));
    };
    if !proxy_common::tls::is_valid_pin(&join.pin) {
        return Err(JoinError::BadPin(join.pin.clone()));
    }
    if !valid_token(&join.token) {
        return Err(JoinError::BadToken);
    }
    let mut last = None;
    for server in servers {
        let started = std::time::Instant::now();
        match join_through(server, join, keepalive).await {
            Ok((key_pem, issued)) => {
                dir.write(&key_pem, &issued)?;
                tracing::info!(server = %server.addr, elapsed = ?started.elapsed(), dir = %dir.path().display(), "joined: certificate written");
                return Ok(());
            }
            Err(err) => {
                tracing::warn!(server = %server.addr, err = %chain(&err), "join failed");
                last = Some((server.addr.clone(), err));
            }
        }
    }
    let (server, source) = last.expect("at least one --server");
    Err(JoinError::Server { server, source })
}

fn valid_token(token: &str) -> bool {
    let ok = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    token
        .split_once('.')
        .is_some_and(|(id, secret)| ok(id, 6) && ok(secret, 16))
}

/// A new key and a CSR for it naming `cluster` (empty: the token decides).
fn key_and_csr(cluster: &str) -> Result<(KeyPair, Vec<u8>), Failure> {
    let key = KeyPair::generate().map_err(|e| Failure::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if !cluster.is_empty() {
        dn.push(DnType::CommonName, cluster);
    }
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Failure::Key(e.to_string()))?;
    Ok((key, csr.der().to_vec()))
}

/// Checks that `issued` certifies `key` (and, if given, for `cluster`).
fn check_answer(issued: &Issued, key: &KeyPair, cluster: Option<&str>) -> Result<(), Failure> {
    let leaf = CertificateDer::from_pem_slice(&issued.certificate_chain)
        .map_err(|e| Failure::Answer(format!("no certificate: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| Failure::Answer(e.to_string()))?;
    if parsed.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
        return Err(Failure::Answer("the certificate is for another key".into()));
    }
    let cn = proxy_common::tls::common_name(&leaf).unwrap_or_default();
    if cluster.is_some_and(|c| c != cn) || !proxy_common::is_valid_cluster_name(&cn) {
        return Err(Failure::Answer(format!(
            "the certificate names cluster {cn:?}"
        )));
    }
    Ok(())
}

async fn call<Req: prost::Message, Resp: prost::Message + Default>(
    server: &ServerTarget,
    tls: TlsConnector,
    keepalive: Option<proxy_common::net::Keepalive>,
    path: &str,
    req: Req,
) -> Result<Resp, Failure> {
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, tls_to(server, tls, keepalive))
        .await
        .unwrap_or(Err(ConnectError::Timeout(CONNECT_TIMEOUT)))
        .map_err(Failure::Connect)?;
    let (send, conn) = h2::client::Builder::new()
        .enable_push(false)
        .handshake::<_, proxy_common::grpc::Frame>(tls)
        .await
        .map_err(Failure::Http2)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = proxy_common::unary::call(send, path, req, CONNECT_TIMEOUT)
        .await
        .map_err(Failure::Refused);
    driver.abort();
    result
}

async fn join_through(
    server: &ServerTarget,
    join: &JoinWith,
    keepalive: Option<proxy_common::net::Keepalive>,
) -> Result<(String, Issued), Failure> {
    let verifier = proxy_common::tls::PinnedCa::new(&join.pin);
    let config = verifier
        .client_config()
        .map_err(|e| Failure::Key(chain(&e).to_string()))?;
    let (key, csr) = key_and_csr(join.cluster.as_deref().unwrap_or(""))?;
    let req = JoinRequest {
        token: join.token.clone(),
        csr,
    };
    let mut issued: Issued = call(
        server,
        TlsConnector::from(Arc::new(config)),
        keepalive,
        proxy_proto::JOIN_PATH,
        req,
    )
    .await?;
    check_answer(&issued, &key, join.cluster.as_deref())?;
    // The CA is the one the pin verified, whatever the answer says.
    let ca = verifier
        .found()
        .ok_or_else(|| Failure::Answer("the server's CA was not verified".into()))?;
    issued.server_ca = proxy_common::tls::pem_certificate(&ca).into_bytes();
    Ok((key.serialize_pem(), issued))
}

/// When to renew a certificate valid from `not_before` to `not_after`: at `fraction` of its
/// lifetime.
fn renew_at(not_before: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + lifetime.mul_f64(fraction)
}

/// Renews the identity in `dir` at a jittered 70–90 % of its lifetime, through `servers` with
/// the mutual TLS of `tls`, until `shutdown`. A failed renewal is retried (every 5 s at first,
/// backing off to a minute) while the certificate is still valid.
pub async fn renew_forever(
    dir: StateDir,
    cluster: String,
    servers: Vec<ServerTarget>,
    tls: Reloadable<rustls::ClientConfig>,
    keepalive: Option<proxy_common::net::Keepalive>,
    shutdown: CancellationToken,
) {
    loop {
        let (not_before, not_after) = match dir.validity() {
            Ok(Some(validity)) => validity,
            Ok(None) => return,
            Err(err) => {
                tracing::error!(err = %chain(&err), "cannot read the certificate to renew it");
                return;
            }
        };
        let at = renew_at(not_before, not_after, rand::random_range(0.7..=0.9));
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tracing::info!(renew_in = ?wait, expires = %humantime::format_rfc3339_seconds(not_after), "certificate renewal scheduled");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
        loop {
            match renew_once(&dir, &cluster, &servers, &tls, keepalive).await {
                Ok(()) => break,
                Err(err) => {
                    let left = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tracing::warn!(err = %chain(&err), expires_in = ?left, "certificate renewal failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }
}

async fn renew_once(
    dir: &StateDir,
    cluster: &str,
    servers: &[ServerTarget],
    tls: &Reloadable<rustls::ClientConfig>,
    keepalive: Option<proxy_common::net::Keepalive>,
) -> Result<(), JoinError> {
    let mut last = None;
    for server in servers {
        let attempt = async {
            let (key, csr) = key_and_csr(cluster)?;
            let issued: Issued = call(
                server,
                TlsConnector::from(tls.current()),
                keepalive,
                proxy_proto::RENEW_PATH,
                RenewRequest { csr },
            )
            .await?;
            check_answer(&issued, &key, Some(cluster))?;
            Ok::<_, Failure>((key.serialize_pem(), issued))
        };
        match attempt.await {
            Ok((key_pem, issued)) => {
                dir.write(&key_pem, &issued)?;
                // At once rather than at the watcher's next look: the next connection uses it.
                tls.reload();
                tracing::info!(server = %server.addr, "certificate renewed");
                return Ok(());
            }
            Err(err) => last = Some((server.addr.clone(), err)),
        }
    }
    let (server, source) = last.expect("at least one --server");
    Err(JoinError::Server { server, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_falls_in_the_given_share_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let end = start + Duration::from_secs(100);
        assert_eq!(renew_at(start, end, 0.7), start + Duration::from_secs(70));
        assert_eq!(renew_at(start, end, 0.9), start + Duration::from_secs(90));
    }

    #[test]
    fn tokens_are_checked_before_anything_is_sent() {
        assert!(valid_token("abcdef.0123456789abcdef"));
        for bad in [
            "abcdef0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdef",
            "",
        ] {
            assert!(!valid_token(bad), "{bad}");
        }
    }

    #[test]
    fn an_answer_for_another_key_or_cluster_is_refused() {
        let ca = proxy_certs::Ca::new("agent-ca").unwrap();
        let (key, _) = key_and_csr("alpha").unwrap();
        let other = ca.issue("alpha", &[], proxy_certs::Usage::Client).unwrap();
        let issued = Issued {
            certificate_chain: other.cert_pem.into_bytes(),
            server_ca: Vec::new(),
        };
        let err = check_answer(&issued, &key, Some("alpha"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("another key"), "{err}");
    }
}
