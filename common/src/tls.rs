//! Loading PEM certificates and keys into rustls configurations, and reading a certificate's
//! Subject CN (the identity of agents and frontend clients).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::{BoxError, chain};
use crate::roles::Role;

/// ALPN protocol of the tunnel: gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// Why a certificate, key or CA could not be loaded.
// Variant fields are described by each variant's #[error] message, not by
// one-word doc lines.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read or holds no valid PEM of the expected kind.
    #[error("cannot read {what} from {path}")]
    Read {
        /// What the file should hold ("certificate", "private key", "CA bundle").
        what: &'static str,
        path: PathBuf,
        source: BoxError,
    },
    /// rustls refused the material.
    #[error("invalid TLS material")]
    Rustls(#[from] rustls::Error),
    /// A certificate and a key that rustls will not pair (e.g. the key is not the
    /// certificate's).
    #[error("certificate {cert} and key {key} do not go together")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    /// The CA bundle could not build a client-certificate verifier.
    #[error("invalid CA bundle {path}")]
    Verifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    /// Two roles' CA bundles are related, so a certificate of one could pass as the other.
    #[error(transparent)]
    RolesCross(#[from] crate::roles::RolesCross),
    /// A certificate has no usable Subject CN.
    #[error("certificate {path} has no Subject CN")]
    NoCommonName {
        /// The certificate file.
        path: PathBuf,
    },
}

fn read_err(what: &'static str, path: &Path, source: impl Into<BoxError>) -> TlsError {
    TlsError::Read {
        what,
        path: path.to_owned(),
        source: source.into(),
    }
}

/// Reads every certificate of a PEM file, refusing a file that holds none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err("certificate", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err("certificate", path, e))?;
    if certs.is_empty() {
        return Err(read_err("certificate", path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| read_err("private key", path, e))
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| read_err("CA bundle", path, e))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server certificate with its key, as files.
#[derive(Debug, Clone)]
pub struct CertKeyPaths {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl CertKeyPaths {
    fn pair_err(&self, source: rustls::Error) -> TlsError {
        TlsError::Pair {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        }
    }
}

/// A verifier of client certificates signed by `ca`; `optional`: clients may present none.
fn client_verifier(
    ca: &Path,
    optional: bool,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let roots = Arc::new(load_roots(ca)?);
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    if optional {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|source| TlsError::Verifier {
        path: ca.to_owned(),
        source,
    })
}

/// A verifier of `role` client certificates signed by `ca` that refuses one also verifying under
/// any of `others` (their flag and CA file), after checking each of those CAs is unrelated to
/// `ca` (see [`crate::roles`]). `ca_flag` names `ca` in errors.
fn role_verifier(
    role: Role,
    (ca_flag, ca): (&'static str, &Path),
    optional: bool,
    others: &[(&'static str, &Path)],
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut other_verifiers = Vec::with_capacity(others.len());
    for (flag, path) in others {
        separate_cas((ca_flag, ca), (flag, path))?;
        other_verifiers.push((*flag, client_verifier(path, false)?));
    }
    Ok(Arc::new(crate::roles::RoleVerifier::new(
        role,
        client_verifier(ca, optional)?,
        other_verifiers,
    )))
}

/// TLS for a listener whose clients must present a certificate signed by `client_ca`.
pub fn mtls_server_config(
    identity: &CertKeyPaths,
    client_ca: &Path,
) -> Result<ServerConfig, TlsError> {
    agent_listener_config(identity, client_ca, &[], None)
}

/// TLS of the agent listener: agents must present a certificate signed by `agent_ca` (the flag
/// `--agent-ca`) that verifies under none of `others` (the other roles' CAs, by flag) and claims
/// no other role.
///
/// With `join_ca` (the CA of `identity`, when agents may join by token) a client may also come
/// without a certificate, to join (the server serves such a connection nothing else), and the
/// server sends `join_ca` at the end of its chain, so that a joining agent can find the CA its
/// pin names (see [`PinnedCa`]).
pub fn agent_listener_config(
    identity: &CertKeyPaths,
    agent_ca: &Path,
    others: &[(&'static str, &Path)],
    join_ca: Option<&Path>,
) -> Result<ServerConfig, TlsError> {
    let verifier = role_verifier(
        Role::Agent,
        ("agent-ca", agent_ca),
        join_ca.is_some(),
        others,
    )?;
    let mut chain = load_certs(&identity.cert)?;
    if let Some(ca) = join_ca {
        let ca = load_certs(ca)?.swap_remove(0);
        if !chain.contains(&ca) {
            chain.push(ca);
        }
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, load_key(&identity.key)?)
        .map_err(|e| identity.pair_err(e))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The pin of a CA certificate as kubeadm writes it (`--discovery-token-ca-cert-hash`):
/// `sha256:` and the hex SHA-256 of its DER SubjectPublicKeyInfo. A pin of the key, not of the
/// certificate, survives the CA certificate being re-issued with the same key.
pub fn spki_pin(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    use sha2::Digest as _;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| read_err("certificate", Path::new("(a certificate)"), e))?;
    let digest = sha2::Sha256::digest(parsed.tbs_certificate.subject_pki.raw);
    Ok(format!("sha256:{}", crate::text::hex(&digest)))
}

/// A DER certificate as PEM.
pub fn pem_certificate(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The pin ([`spki_pin`]) of the first certificate of the PEM file at `path`.
pub fn spki_pin_of_file(path: &Path) -> Result<String, TlsError> {
    spki_pin(&load_certs(path)?[0])
}

/// Checks that the certificate chain in `chain` (named by `chain_flag`) verifies under the CA in
/// `ca` (named by `ca_flag`) as a server certificate: what an agent trusting `ca` will check.
pub fn check_issued_by(
    (chain_flag, chain): (&str, &Path),
    (ca_flag, ca): (&str, &Path),
) -> Result<(), TlsError> {
    let certs = load_certs(chain)?;
    let parsed = rustls::server::ParsedCertificate::try_from(&certs[0])?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &load_roots(ca)?,
        &certs[1..],
        rustls::pki_types::UnixTime::now(),
        provider().signature_verification_algorithms.all,
    )
    .map_err(|e| {
        read_err(
            "certificate",
            chain,
            format!(
                "--{chain_flag} does not verify under --{ca_flag} {}: {e}",
                ca.display()
            ),
        )
    })
}

/// Whether `pin` is written as [`spki_pin`] writes one.
pub fn is_valid_pin(pin: &str) -> bool {
    pin.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A server verifier for an agent that knows only the pin of its server's CA (joining by token):
/// it finds the certificate in the server's chain whose public key has the pin, and verifies the
/// chain and the server's name with that certificate as the only root, as a configured CA would
/// be. The CA found is kept for the agent to trust from then on ([`PinnedCa::found`]).
#[derive(Debug)]
pub struct PinnedCa {
    pin: String,
    found: std::sync::Mutex<Option<CertificateDer<'static>>>,
}

impl PinnedCa {
    /// A verifier for the CA with `pin` (lower-case hex compared).
    pub fn new(pin: &str) -> Arc<Self> {
        Arc::new(Self {
            pin: pin.to_ascii_lowercase(),
            found: std::sync::Mutex::new(None),
        })
    }

    /// The CA certificate that had the pin, once a handshake verified with it.
    pub fn found(&self) -> Option<CertificateDer<'static>> {
        self.found.lock().expect("not poisoned").clone()
    }

    /// TLS for a client that verifies its server with this verifier and has no certificate.
    pub fn client_config(self: &Arc<Self>) -> Result<ClientConfig, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| spki_pin(c).is_ok_and(|pin| pin == self.pin))
        else {
            return Err(rustls::Error::General(format!(
                "no certificate the server sent has the pinned public key {}: this is not the server the token was made for, or it does not send its CA (--agent-tls-ca)",
                self.pin
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let rest: Vec<CertificateDer<'_>> =
            intermediates.iter().filter(|c| *c != ca).cloned().collect();
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &rest, server_name, ocsp_response, now)?;
        *self.found.lock().expect("not poisoned") = Some(ca.clone().into_owned());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS for the CONNECT frontend (HTTP/1.1). With `client_ca`, client certificates signed by it
/// are verified; they are required unless `cert_optional` (clients may then use a token). A
/// client certificate that also verifies under one of `others` (the other roles' CAs, by flag)
/// or claims another role is refused.
pub fn frontend_server_config(
    identity: &CertKeyPaths,
    client_ca: Option<&Path>,
    cert_optional: bool,
    others: &[(&'static str, &Path)],
) -> Result<ServerConfig, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(role_verifier(
            Role::Client,
            ("frontend-ca", ca),
            cert_optional,
            others,
        )?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(load_certs(&identity.cert)?, load_key(&identity.key)?)
        .map_err(|e| identity.pair_err(e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS for a client that verifies its server against `server_ca` and authenticates with
/// `identity`.
pub fn mtls_client_config(
    identity: &CertKeyPaths,
    server_ca: &Path,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(load_roots(server_ca)?)
        .with_client_auth_cert(load_certs(&identity.cert)?, load_key(&identity.key)?)
        .map_err(|e| identity.pair_err(e))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

pub use crate::roles::common_name;

/// Checks that the certificates in two files (named by their flags) come from unrelated CAs
/// (see [`crate::roles::separate`]).
pub fn separate_cas(a: (&str, &Path), b: (&str, &Path)) -> Result<(), TlsError> {
    let (left, right) = (load_certs(a.1)?, load_certs(b.1)?);
    Ok(crate::roles::separate((a.0, &left), (b.0, &right))?)
}

/// The Subject CN of the first certificate in a PEM file.
pub fn common_name_of_file(path: &Path) -> Result<String, TlsError> {
    let certs = load_certs(path)?;
    common_name(&certs[0]).ok_or_else(|| TlsError::NoCommonName {
        path: path.to_owned(),
    })
}

/// Parses the TLS name a client verifies (DNS name or IP address).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|e| read_err("server name", Path::new(name), e))
}

/// `{certificate}`: which loaded certificate (or CA bundle) an expiry belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CertLabel {
    /// e.g. `agent-listener`, `agent-ca`, `client`.
    pub certificate: &'static str,
}

/// Expiry (Unix seconds) of each certificate a binary has loaded, set at every (re)load: the
/// `*_certificate_expiry_timestamp_seconds` metric an alert watches.
pub type CertExpiry =
    prometheus_client::metrics::family::Family<CertLabel, prometheus_client::metrics::gauge::Gauge>;

/// The earliest `notAfter` (Unix seconds) of the certificates in the PEM file at `path`: for a
/// certificate chain or a CA bundle, the first one to expire is what breaks it.
pub fn earliest_expiry(path: &Path) -> Result<i64, TlsError> {
    load_certs(path)?
        .iter()
        .map(|cert| {
            x509_parser::parse_x509_certificate(cert.as_ref())
                .map(|(_, parsed)| parsed.validity().not_after.timestamp())
                .map_err(|e| read_err("certificate", path, e))
        })
        .try_fold(i64::MAX, |earliest, t| t.map(|t| earliest.min(t)))
}

/// Records the expiry of the certificates in `path` under `certificate`; one that cannot be
/// read was already refused by the load that calls this, so it is only logged.
pub fn record_expiry(expiry: &CertExpiry, certificate: &'static str, path: &Path) {
    match earliest_expiry(path) {
        Ok(t) => {
            expiry.get_or_create(&CertLabel { certificate }).set(t);
        }
        Err(err) => {
            tracing::warn!(certificate, err = %chain(&err), "cannot read the certificate's expiry")
        }
    }
}
