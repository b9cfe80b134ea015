//! Issuing agent certificates from CSRs (`--agent-signer-cert`/`--agent-signer-key`).
//!
//! Of a CSR only two things are taken: its public key (the key was made on the agent and never
//! leaves it) and its Subject CN, which must be the cluster the token (or, to renew, the current
//! certificate) is for, or absent (an agent not told its cluster leaves it to the token).
//! Everything else the certificate says is the server's: CN = the cluster,
//! the agent role URI, client authentication only, `--agent-cert-ttl`. So a CSR cannot ask for a
//! server certificate, another role, a CA, or more names.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// How far back an issued certificate's validity starts: agents whose clocks lag the server's
/// by up to this still accept it. At most a tenth of the lifetime, since agents renew at a share
/// of the whole validity (a 30 s certificate backdated 5 min would be renewed after 4 min).
const BACKDATE: Duration = Duration::from_secs(300);

fn backdate(ttl: Duration) -> Duration {
    BACKDATE.min(ttl / 10)
}

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Larger than [`proxy_proto::MAX_CSR`].
    #[error(
        "the certificate request is larger than {} bytes",
        proxy_proto::MAX_CSR
    )]
    TooLarge,
    /// Not a PKCS#10 request with a valid signature, or with extensions beyond names and usages.
    #[error("the certificate request is not valid: {0}")]
    Malformed(String),
    /// A key type the server does not issue for.
    #[error("the certificate request's key is not ECDSA P-256/P-384 or Ed25519")]
    KeyType,
    /// Its Subject CN is not the cluster it may have.
    #[error("the certificate request names cluster {asked:?}, but it may only be for {allowed:?}")]
    Subject {
        /// The CN asked for (sanitised).
        asked: String,
        /// The cluster of the token or certificate.
        allowed: String,
    },
}

/// Why the signer could not be loaded.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// A file could not be read.
    #[error("--{flag} {path}: cannot read it")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The material is not a usable CA under the agent CA.
    #[error(
        "--agent-signer-cert {cert} and --agent-signer-key {key}: {reason} (the signer must be --agent-ca {agent_ca}, or an intermediate CA under it, with its own key)"
    )]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        agent_ca: PathBuf,
        reason: String,
    },
}

/// The CSR's Subject CN, if it has one.
pub fn subject_cn(csr: &CertificateSigningRequestParams) -> Option<String> {
    match csr.params.distinguished_name.get(&DnType::CommonName)? {
        DnValue::Utf8String(s) => Some(s.clone()),
        DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Parses and checks a CSR: its size, signature and key type. Its subject is checked by
/// [`Signer::issue`] against what the caller may have.
pub fn parse_csr(der: &[u8]) -> Result<CertificateSigningRequestParams, CsrError> {
    if der.len() > proxy_proto::MAX_CSR {
        return Err(CsrError::TooLarge);
    }
    let csr = CertificateSigningRequestParams::from_der(&der.into())
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let alg = csr.public_key.algorithm();
    let accepted = [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ];
    if !accepted.contains(&alg) {
        return Err(CsrError::KeyType);
    }
    Ok(csr)
}

/// Signs agent certificates.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The signer's certificate as PEM when it is an intermediate (sent after each leaf, so
    /// the agent listener can build the path to --agent-ca); empty when it is the agent CA.
    chain_pem: String,
    ttl: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the signer and proves it: a certificate it issues must verify under `agent_ca`.
    pub fn load(
        cert: &Path,
        key: &Path,
        agent_ca: &Path,
        ttl: Duration,
    ) -> Result<Self, SignerError> {
        let read = |flag: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|e| SignerError::Read {
                flag,
                path: path.to_owned(),
                source: e.into(),
            })
        };
        let unusable = |reason: String| SignerError::Unusable {
            cert: cert.to_owned(),
            key: key.to_owned(),
            agent_ca: agent_ca.to_owned(),
            reason,
        };
        let cert_pem = read("agent-signer-cert", cert)?;
        let key_pem = read("agent-signer-key", key)?;
        let signer_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| SignerError::Read {
                flag: "agent-signer-cert",
                path: cert.to_owned(),
                source: e.into(),
            })?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| SignerError::Read {
            flag: "agent-signer-key",
            path: key.to_owned(),
            source: e.into(),
        })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(signer_der.as_ref())
            .map_err(|e| unusable(format!("not a certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(unusable("the certificate is not a CA".into()));
        }
        let self_signed = parsed.subject() == parsed.issuer();
        let issuer =
            Issuer::from_ca_cert_der(&signer_der, key_pair).map_err(|e| unusable(e.to_string()))?;
        let signer = Self {
            issuer,
            chain_pem: if self_signed {
                String::new()
            } else {
                proxy_common::tls::pem_certificate(&signer_der)
            },
            ttl,
        };
        signer.prove(agent_ca).map_err(unusable)?;
        Ok(signer)
    }

    /// Issues a throwaway certificate and verifies it as the agent listener would.
    fn prove(&self, agent_ca: &Path) -> Result<(), String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let leaf = self
            .params("signer-check", SystemTime::now())
            .and_then(|params| params.signed_by(&key, &self.issuer))
            .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in proxy_common::tls::load_certs(agent_ca).map_err(|e| e.to_string())? {
            roots.add(ca).map_err(|e| e.to_string())?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let intermediates: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
        verifier
            .verify_client_cert(
                leaf.der(),
                &intermediates,
                rustls::pki_types::UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| format!("a certificate it issues does not verify under --agent-ca: {e}"))
    }

    fn params(&self, cluster: &str, now: SystemTime) -> Result<CertificateParams, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cluster);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            proxy_common::roles::agent_uri(cluster).try_into()?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = (now - backdate(self.ttl)).into();
        params.not_after = (now + self.ttl).into();
        let serial: [u8; 16] = rand::random();
        // Positive: the top bit clear.
        let mut serial = serial.to_vec();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// A certificate for `cluster` with the key of `csr`, whose Subject CN must be `cluster` or
    /// absent:
    /// PEM, the leaf then the signer when it is an intermediate.
    pub fn issue(
        &self,
        csr: &CertificateSigningRequestParams,
        cluster: &str,
    ) -> Result<String, CsrError> {
        // No CN: the agent left the cluster to its token (it was not told one).
        let asked = subject_cn(csr).unwrap_or_default();
        if !asked.is_empty() && asked != cluster {
            return Err(CsrError::Subject {
                asked: proxy_common::text::sanitize(&asked, 100),
                allowed: cluster.to_owned(),
            });
        }
        let cert = self
            .params(cluster, SystemTime::now())
            .and_then(|params| params.signed_by(&csr.public_key, &self.issuer))
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        Ok(format!("{}{}", cert.pem(), self.chain_pem))
    }

    /// How long issued certificates live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(cn: &str) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn signer(dir: &Path, intermediate: bool) -> (Signer, PathBuf) {
        let root = proxy_certs::Ca::new("agent-ca").unwrap();
        let ca_path = dir.join("agent-ca.pem");
        std::fs::write(&ca_path, root.cert_pem()).unwrap();
        let (cert, key) = if intermediate {
            let inter = root.intermediate("agent-signer").unwrap();
            (inter.cert_pem(), inter.key_pem())
        } else {
            (root.cert_pem(), root.key_pem())
        };
        std::fs::write(dir.join("signer.pem"), cert).unwrap();
        std::fs::write(dir.join("signer.key"), key).unwrap();
        let signer = Signer::load(
            &dir.join("signer.pem"),
            &dir.join("signer.key"),
            &ca_path,
            Duration::from_secs(3600),
        )
        .expect("signer");
        (signer, ca_path)
    }

    #[test]
    fn an_issued_certificate_is_an_agents_for_the_cluster_and_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        for intermediate in [false, true] {
            let (signer, _) = signer(dir.path(), intermediate);
            let csr = parse_csr(&csr_for("alpha")).unwrap();
            let pem = signer.issue(&csr, "alpha").unwrap();
            let chain: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(chain.len(), if intermediate { 2 } else { 1 });
            assert_eq!(
                proxy_common::tls::common_name(&chain[0]).as_deref(),
                Some("alpha")
            );
            proxy_common::roles::check_claims(&chain[0], proxy_common::roles::Role::Agent)
                .expect("an agent's role URI");
            let (_, cert) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
            assert!(!cert.is_ca());
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
            let lifetime =
                cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
            assert_eq!(lifetime, 3600 + 300);
        }
    }

    #[test]
    fn a_csr_for_another_cluster_or_malformed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (signer, _) = signer(dir.path(), false);
        let csr = parse_csr(&csr_for("beta")).unwrap();
        assert!(matches!(
            signer.issue(&csr, "alpha"),
            Err(CsrError::Subject { .. })
        ));
        assert!(matches!(
            parse_csr(b"not a csr"),
            Err(CsrError::Malformed(_))
        ));
        assert_eq!(
            parse_csr(&vec![0; proxy_proto::MAX_CSR + 1]).unwrap_err(),
            CsrError::TooLarge
        );
        // A valid request whose signature was tampered with.
        let mut der = csr_for("alpha");
        let last = der.len() - 1;
        der[last] ^= 1;
        assert!(matches!(parse_csr(&der), Err(CsrError::Malformed(_))));
    }

    #[test]
    fn a_signer_outside_the_agent_ca_or_with_the_wrong_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, ca_path) = signer(dir.path(), false);
        let other = proxy_certs::Ca::new("other").unwrap();
        std::fs::write(dir.path().join("other.pem"), other.cert_pem()).unwrap();
        std::fs::write(dir.path().join("other.key"), other.key_pem()).unwrap();
        let err = Signer::load(
            &dir.path().join("other.pem"),
            &dir.path().join("other.key"),
            &ca_path,
            Duration::from_secs(60),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not verify under --agent-ca"), "{err}");
        let err = Signer::load(
            &dir.path().join("signer.pem"),
            &dir.path().join("other.key"),
            &ca_path,
            Duration::from_secs(60),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--agent-signer-key"), "{err}");
    }
}
