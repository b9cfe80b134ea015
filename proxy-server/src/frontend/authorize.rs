//! Authorization, within the admit step: who the client is (its certificate, or its
//! `Proxy-Authorization` token) and whether it may reach the cluster, and the destination, it
//! asked for. Each decision is logged once.

use http::StatusCode;

use super::Frontend;
use super::refusal::{Refusal, destination_forbidden};
use crate::auth::{AuthError, Credentials};
use crate::config::FrontendAuth;
use crate::connect::ConnectRequest;
use crate::metrics::Outcome;

impl Frontend {
    /// Who the client is, and whether it may reach `cluster`. Logs each decision once.
    pub(super) fn authorize(
        &self,
        req: &ConnectRequest,
        cert_cn: Option<&str>,
        cluster: &str,
    ) -> Result<String, Refusal> {
        let policy = match &self.auth {
            // Open on purpose (loopback, or --frontend-allow-unauthenticated): the agent's
            // --allow-destination alone decides destinations.
            FrontendAuth::Open => {
                return Ok(cert_cn.map_or_else(|| "anonymous".to_owned(), str::to_owned));
            }
            FrontendAuth::CertificateRequired => {
                // The TLS handshake already required and verified the certificate.
                let identity = cert_cn.map(str::to_owned).ok_or_else(|| {
                    Refusal::new(
                        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                        Outcome::Unauthenticated,
                        "a client certificate is required",
                    )
                })?;
                // Destinations are granted per client in the auth file; without one, none.
                if let Some(destination) = &req.destination {
                    return Err(destination_refused(&identity, cluster, destination));
                }
                return Ok(identity);
            }
            FrontendAuth::Policy(policy) => policy.current(),
        };
        let identity = match policy.authenticate(&req.credentials, cert_cn) {
            Ok(identity) => identity.to_owned(),
            Err(err) => {
                let presented = match (&req.credentials, cert_cn) {
                    (Credentials::None, None) => "nothing",
                    (Credentials::None, Some(_)) => "an unknown client certificate",
                    _ => "a token",
                };
                tracing::info!(
                    identity = "",
                    cluster,
                    decision = "unauthenticated",
                    presented,
                    "access decision"
                );
                let reason = match err {
                    AuthError::Missing => format!(
                        "{err}: send Proxy-Authorization (Bearer token, or Basic with the token as password) or a client certificate"
                    ),
                    AuthError::Invalid => err.to_string(),
                };
                return Err(Refusal::new(
                    StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                    Outcome::Unauthenticated,
                    reason,
                ));
            }
        };
        if !policy.allows(&identity, cluster) {
            tracing::info!(identity, cluster, decision = "forbidden", "access decision");
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                Outcome::Forbidden,
                format!("{identity:?} is not allowed to reach cluster {cluster:?}"),
            ));
        }
        if let Some(destination) = &req.destination
            && !policy.allows_destination(&identity, destination)
        {
            return Err(destination_refused(&identity, cluster, destination));
        }
        tracing::info!(identity, cluster, decision = "allowed", "access decision");
        Ok(identity)
    }
}

/// A `Proxy-Destination` the client's grants do not cover: checked before any agent is asked,
/// answered with a body that names no list or configuration (those go to the log only).
fn destination_refused(identity: &str, cluster: &str, destination: &str) -> Refusal {
    tracing::info!(
        identity,
        cluster,
        destination,
        decision = "destination_forbidden",
        "access decision: the client's `destinations` in the auth file do not cover it"
    );
    destination_forbidden(cluster)
}
