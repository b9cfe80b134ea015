//! The development and test PKI, made with rcgen:
//!
//! * three CAs, one per role, never shared: the server CA signs the server certificate (agent
//!   listener, frontend), the agent CA every agent's client certificate (Subject CN = the cluster
//!   name the agent may register), the frontend CA the frontend clients' certificates;
//! * the role in every leaf certificate too, as a URI SAN ([`role_uri`]), which the server checks
//!   at every connection;
//! * per member cluster, an API-server CA and an API-server certificate for
//!   `kubernetes.default.svc`, standing in for the member's real kube-apiserver.
//!
//! Production deployments use their own CA (cert-manager, see `deploy/`); this crate exists so the
//! demo and the tests need no `openssl` incantations.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate authority that can issue leaf certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// What made it, so the same CA (subject and key) can be signed again by another.
    params: CertificateParams,
    key_pem: String,
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 private key.
    pub key_pem: String,
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server (serverAuth).
    Server,
    /// TLS client (clientAuth).
    Client,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// What every CA certificate here carries.
fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Ca {
    /// A new self-signed CA named `cn`.
    pub fn new(cn: &str) -> anyhow::Result<Self> {
        Self::make(ca_params(cn), None)
    }

    /// A CA with `params`, signed by `by` (self-signed without).
    fn make(params: CertificateParams, by: Option<&Ca>) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let issuer = match by {
            Some(by) => CertifiedIssuer::signed_by(params.clone(), key, &by.issuer)?,
            None => CertifiedIssuer::self_signed(params.clone(), key)?,
        };
        Ok(Self {
            issuer,
            params,
            key_pem,
        })
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key as PEM (PKCS#8): for a signer that issues certificates itself, as
    /// the proxy server's `--agent-signer-key`.
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// An intermediate CA named `cn`, signed by this one.
    pub fn intermediate(&self, cn: &str) -> anyhow::Result<Self> {
        let mut params = ca_params(cn);
        params.use_authority_key_identifier_extension = true;
        Self::make(params, Some(self))
    }

    /// This CA (same subject, same key) as signed by `other` instead: a cross-certificate, PEM.
    /// A chain through it makes this CA's certificates verify under `other` too.
    pub fn cross_signed_by(&self, other: &Ca) -> anyhow::Result<String> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(self.params.clone().signed_by(&key, &other.issuer)?.pem())
    }

    /// Issues a leaf certificate with Subject CN `cn` and the given DNS names / IP addresses /
    /// URIs (anything with `://`).
    pub fn issue(&self, cn: &str, names: &[&str], usage: Usage) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn);
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) if name.contains("://") => Ok(SanType::URI((*name).try_into()?)),
                Err(_) => Ok(SanType::DnsName((*name).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The URI SAN that puts a role into a leaf certificate: `spiffe://multicluster-proxy/agent/<cluster>`,
/// `…/client/<name>`, or `…/server` (`name` empty).
pub fn role_uri(role: &str, name: &str) -> String {
    if name.is_empty() {
        format!("spiffe://multicluster-proxy/{role}")
    } else {
        format!("spiffe://multicluster-proxy/{role}/{name}")
    }
}

/// Names the proxy server's certificate is valid for in development.
pub const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1", "proxy-server"];

/// Names a member cluster's API-server certificate carries, besides the cluster name itself.
pub const APISERVER_NAMES: &[&str] = &[
    "kubernetes.default.svc",
    "kubernetes.default",
    "kubernetes",
    "localhost",
    "127.0.0.1",
];

/// Frontend client identities a development PKI includes (certificates signed by the frontend
/// client CA, CN = name), for trying `--frontend-ca` and the auth policy.
pub const DEV_CLIENTS: &[&str] = &["kubefed", "ops", "stranger"];

/// Paths of a PKI written by [`write_dev_pki`].
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The folder holding everything.
    pub dir: PathBuf,
}

impl DevPki {
    /// CA that signs the server's certificate: what agents pass as `--server-ca`.
    pub fn server_ca(&self) -> PathBuf {
        self.dir.join("server-ca.pem")
    }
    /// CA that signs the agents' client certificates: the server's `--agent-ca`.
    pub fn agent_ca(&self) -> PathBuf {
        self.dir.join("agent-ca.pem")
    }
    /// The proxy server's certificate (agent listener).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// The proxy server's key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    /// Client certificate of the agent for `cluster` (CN = cluster).
    pub fn agent_cert(&self, cluster: &str) -> PathBuf {
        self.dir.join(format!("agent-{cluster}.pem"))
    }
    /// Key of the agent for `cluster`.
    pub fn agent_key(&self, cluster: &str) -> PathBuf {
        self.dir.join(format!("agent-{cluster}.key"))
    }
    /// An intermediate CA under the agent CA, with its key beside it
    /// ([`DevPki::agent_signer_key`]): the server's `--agent-signer-cert` for agents that join
    /// by token.
    pub fn agent_signer_cert(&self) -> PathBuf {
        self.dir.join("agent-signer.pem")
    }
    /// Key of [`DevPki::agent_signer_cert`].
    pub fn agent_signer_key(&self) -> PathBuf {
        self.dir.join("agent-signer.key")
    }
    /// CA that signs the frontend clients' certificates (`--frontend-ca`).
    pub fn frontend_ca(&self) -> PathBuf {
        self.dir.join("frontend-ca.pem")
    }
    /// Frontend client certificate of `name` (CN = name).
    pub fn client_cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("client-{name}.pem"))
    }
    /// Key of the frontend client `name`.
    pub fn client_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("client-{name}.key"))
    }
    /// CA of the member cluster's API server.
    pub fn apiserver_ca(&self, cluster: &str) -> PathBuf {
        self.dir.join(format!("apiserver-{cluster}-ca.pem"))
    }
    /// The member cluster's API-server certificate.
    pub fn apiserver_cert(&self, cluster: &str) -> PathBuf {
        self.dir.join(format!("apiserver-{cluster}.pem"))
    }
    /// The member cluster's API-server key.
    pub fn apiserver_key(&self, cluster: &str) -> PathBuf {
        self.dir.join(format!("apiserver-{cluster}.key"))
    }
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> anyhow::Result<()> {
    write(&dir.join(format!("{stem}.pem")), &issued.cert_pem)?;
    let key = dir.join(format!("{stem}.key"));
    write(&key, &issued.key_pem)?;
    restrict(&key)
}

#[cfg(unix)]
fn restrict(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))
}

/// Writes a complete development PKI for `clusters` into `dir` (created if missing).
pub fn write_dev_pki(dir: &Path, clusters: &[&str]) -> anyhow::Result<DevPki> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pki = DevPki {
        dir: dir.to_owned(),
    };
    // Three roots, one per role: whoever can sign agents must not be able to mint a server the
    // agents trust or a frontend client, and the reverse (docs/security.md).
    let server_ca = Ca::new("proxy-dev-server-ca")?;
    write(&pki.server_ca(), &server_ca.cert_pem())?;
    let server_role = role_uri("server", "");
    let mut server_names = SERVER_NAMES.to_vec();
    server_names.push(&server_role);
    write_pair(
        dir,
        "server",
        &server_ca.issue("proxy-server", &server_names, Usage::Server)?,
    )?;
    let frontend_ca = Ca::new("proxy-dev-frontend-client-ca")?;
    write(&pki.frontend_ca(), &frontend_ca.cert_pem())?;
    for name in DEV_CLIENTS {
        write_pair(
            dir,
            &format!("client-{name}"),
            &frontend_ca.issue(name, &[&role_uri("client", name)], Usage::Client)?,
        )?;
    }
    let agent_ca = Ca::new("proxy-dev-agent-ca")?;
    write(&pki.agent_ca(), &agent_ca.cert_pem())?;
    // An intermediate signs joining agents: the agent CA's own key stays offline.
    let signer = agent_ca.intermediate("proxy-dev-agent-signer")?;
    write_pair(
        dir,
        "agent-signer",
        &Issued {
            cert_pem: signer.cert_pem(),
            key_pem: signer.key_pem(),
        },
    )?;
    for cluster in clusters {
        write_pair(
            dir,
            &format!("agent-{cluster}"),
            &agent_ca.issue(cluster, &[&role_uri("agent", cluster)], Usage::Client)?,
        )?;
        let api_ca = Ca::new(&format!("{cluster}-apiserver-ca"))?;
        write(&pki.apiserver_ca(cluster), &api_ca.cert_pem())?;
        let mut names = APISERVER_NAMES.to_vec();
        names.push(cluster);
        write_pair(
            dir,
            &format!("apiserver-{cluster}"),
            &api_ca.issue("kube-apiserver", &names, Usage::Server)?,
        )?;
    }
    Ok(pki)
}
