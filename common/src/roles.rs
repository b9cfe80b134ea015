//! Three trust roots, never shared: server certificates, agent client certificates and frontend
//! client certificates each come from their own CA, and each certificate names its role.
//!
//! A CA file check alone cannot keep the roles apart: an intermediate of the agent CA used as the
//! frontend CA, a CA re-issued under another name, or a reload that writes one role's CA into the
//! other's file would each let a certificate of one role stand in for the other. So the roles are
//! held apart three times:
//!
//! * at load and at every reload, the CA bundles of two roles must be unrelated ([`separate`]:
//!   no shared certificate, key or subject, and neither issued by the other);
//! * at every connection, a client certificate that verifies under its own role's CA must NOT
//!   also verify under the other role's CA ([`RoleVerifier`]);
//! * a certificate may carry its role as a URI SAN whose path ends in `/agent/<cluster>`,
//!   `/client/<name>` or `/server` (e.g. `spiffe://multicluster-proxy/agent/alpha`); one that
//!   claims another role, or another name than its Subject CN, is refused ([`check_claims`]).
//!   Certificates without such a URI are judged by their CA alone.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A proxy server (agent listener, TLS frontend).
    Server,
    /// An agent; its name is the cluster it serves.
    Agent,
    /// A frontend client (a controller, a person).
    Client,
}

impl Role {
    fn segment(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Agent => "agent",
            Self::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

/// The URI SAN an agent certificate for `cluster` carries (what [`check_claims`] reads).
pub fn agent_uri(cluster: &str) -> String {
    format!("spiffe://multicluster-proxy/agent/{cluster}")
}

/// The role (and name) a role URI claims: the last path segments `/agent/<name>`,
/// `/client/<name>` or `/server`, whatever the scheme and trust domain.
fn claim_of(uri: &str) -> Option<(Role, Option<&str>)> {
    let (_, rest) = uri.split_once("://")?;
    // Skip the authority (trust domain); what is left is the path.
    let path = rest.split_once('/').map_or("", |(_, p)| p);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        [.., "server"] => Some((Role::Server, None)),
        [.., "agent", name] => Some((Role::Agent, Some(*name))),
        [.., "client", name] => Some((Role::Client, Some(*name))),
        _ => None,
    }
}

/// The roles a DER certificate claims by its URI SANs.
fn claims(cert: &CertificateDer<'_>) -> Result<Vec<(Role, Option<String>)>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("unparsable subjectAltName: {e}"))?;
    Ok(san
        .into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => claim_of(uri),
            _ => None,
        })
        .map(|(role, name)| (role, name.map(str::to_owned)))
        .collect())
}

/// Checks the role URIs of `cert`, presented for `role`: none may claim another role, and a
/// claim of `role` with a name must name the certificate's Subject CN.
pub fn check_claims(cert: &CertificateDer<'_>, role: Role) -> Result<(), String> {
    let cn = common_name(cert);
    for (claimed, name) in claims(cert)? {
        if claimed != role {
            return Err(format!(
                "a {claimed} certificate was presented as {role}: its role URI says {claimed}"
            ));
        }
        if let Some(name) = name
            && cn.as_deref() != Some(name.as_str())
        {
            return Err(format!(
                "its role URI names {name:?} but its Subject CN is {:?}",
                cn.unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// The Subject CN of a DER certificate, if it has one that is valid UTF-8: the identity of agents
/// (their cluster) and frontend clients.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Two roles' CA bundles are related, so a certificate of one could pass as the other.
#[derive(Debug, thiserror::Error)]
#[error(
    "--{flag} and --{other} must be separate CAs ({why}): a certificate of one role could then pass as the other; give each role its own CA (docs/security.md)"
)]
pub struct RolesCross {
    /// The flag of the first bundle.
    pub flag: String,
    /// The flag of the second.
    pub other: String,
    /// How they are related.
    pub why: &'static str,
}

/// Checks that two roles' CA bundles (by flag, and their certificates) are unrelated: no
/// certificate, public key or subject in common, and none issued by a certificate of the other
/// (a shared root or an intermediate of the other role's CA). A certificate that does not parse
/// is left to the verifier, which refuses it.
pub fn separate(
    a: (&str, &[CertificateDer<'_>]),
    b: (&str, &[CertificateDer<'_>]),
) -> Result<(), RolesCross> {
    let names = |certs: &[CertificateDer<'_>]| {
        certs
            .iter()
            .filter_map(|c| {
                let (_, p) = x509_parser::parse_x509_certificate(c.as_ref()).ok()?;
                Some((
                    p.subject().as_raw().to_vec(),
                    p.issuer().as_raw().to_vec(),
                    p.public_key().raw.to_vec(),
                    c.as_ref().to_vec(),
                ))
            })
            .collect::<Vec<_>>()
    };
    let (l, r) = (names(a.1), names(b.1));
    for (ls, li, lk, ld) in &l {
        for (rs, ri, rk, rd) in &r {
            let why = if ld == rd {
                Some("the same CA certificate is in both")
            } else if lk == rk {
                Some("a CA key is in both (a re-issued CA)")
            } else if ls == rs {
                Some("a CA subject is in both (a re-issued CA)")
            } else if li == rs || ri == ls {
                Some("one holds a CA issued by the other's (an intermediate or a cross-signed CA)")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(RolesCross {
                    flag: a.0.to_owned(),
                    other: b.0.to_owned(),
                    why,
                });
            }
        }
    }
    Ok(())
}

/// A client-certificate verifier for one role that also refuses a certificate verifying under
/// another role's CA, or claiming another role.
pub struct RoleVerifier {
    role: Role,
    inner: Arc<dyn ClientCertVerifier>,
    /// The other roles' verifiers, with the flag that names their CA.
    others: Vec<(&'static str, Arc<dyn ClientCertVerifier>)>,
}

impl fmt::Debug for RoleVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoleVerifier")
            .field("role", &self.role)
            .field(
                "others",
                &self.others.iter().map(|o| o.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl RoleVerifier {
    /// Verifies `role` certificates with `inner`; one that `others` would also accept is refused.
    pub fn new(
        role: Role,
        inner: Arc<dyn ClientCertVerifier>,
        others: Vec<(&'static str, Arc<dyn ClientCertVerifier>)>,
    ) -> Self {
        Self {
            role,
            inner,
            others,
        }
    }
}

impl ClientCertVerifier for RoleVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        for (flag, other) in &self.others {
            if other
                .verify_client_cert(end_entity, intermediates, now)
                .is_ok()
            {
                tracing::warn!(role = %self.role, other_ca = flag, "refused a client certificate that also verifies under another role's CA");
                return Err(rustls::Error::General(format!(
                    "certificate refused: it also verifies under {flag}, and one certificate may not hold two roles"
                )));
            }
        }
        check_claims(end_entity, self.role).map_err(|why| {
            tracing::warn!(role = %self.role, %why, "refused a client certificate of another role");
            rustls::Error::General(format!("certificate refused: {why}"))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_uris_are_read_from_their_last_segments() {
        assert_eq!(
            claim_of("spiffe://multicluster-proxy/agent/alpha"),
            Some((Role::Agent, Some("alpha")))
        );
        assert_eq!(
            claim_of("spiffe://corp.example/ns/x/client/ops"),
            Some((Role::Client, Some("ops")))
        );
        assert_eq!(
            claim_of("spiffe://multicluster-proxy/server"),
            Some((Role::Server, None))
        );
        assert_eq!(claim_of("https://example.com/"), None);
        assert_eq!(
            claim_of("spiffe://agent/alpha"),
            None,
            "authority, not path"
        );
        assert_eq!(claim_of("no-scheme/agent/x"), None);
    }
}
