//! The folder a joined agent keeps its identity in (`--state-dir`): `identity.pem`, its private
//! key and certificate chain in one file, so a renewal replaces both with one rename and a crash
//! can never leave a key beside another key's certificate; and `server-ca.pem`, the servers' CA.
//! Both 0600, the folder 0700. Written by [`crate::join`], read by the TLS configuration.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use proxy_proto::Issued;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// The key and certificate chain, in one PEM file.
pub const IDENTITY_FILE: &str = "identity.pem";

/// The servers' CA.
pub const SERVER_CA_FILE: &str = "server-ca.pem";

/// Why the folder cannot be read or written.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("--state-dir {dir}: {what}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("--state-dir {dir}: {reason}")]
    Unreadable { dir: PathBuf, reason: String },
}

/// The agent's state folder.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The folder at `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The key and certificate chain.
    pub fn identity(&self) -> PathBuf {
        self.dir.join(IDENTITY_FILE)
    }

    /// The servers' CA.
    pub fn server_ca(&self) -> PathBuf {
        self.dir.join(SERVER_CA_FILE)
    }

    fn state_err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> StateError + '_ {
        move |source| StateError::Io {
            dir: self.dir.clone(),
            what,
            source,
        }
    }

    /// The validity (not before, not after) of the certificate held, `None` if there is none.
    pub fn validity(&self) -> Result<Option<(SystemTime, SystemTime)>, StateError> {
        if !self.identity().exists() || !self.server_ca().exists() {
            return Ok(None);
        }
        let pem = std::fs::read(self.identity()).map_err(self.state_err("reading identity.pem"))?;
        let cert = CertificateDer::from_pem_slice(&pem).map_err(|e| StateError::Unreadable {
            dir: self.dir.clone(),
            reason: format!("identity.pem holds no certificate: {e}"),
        })?;
        validity(&cert)
            .map(Some)
            .map_err(|reason| StateError::Unreadable {
                dir: self.dir.clone(),
                reason,
            })
    }

    /// Writes a new identity (and the server CA when one came): each to a temporary file, then
    /// renamed into place, 0600.
    pub(crate) fn write(&self, key_pem: &str, issued: &Issued) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.dir).map_err(self.state_err("creating the folder"))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(self.state_err("restricting the folder"))?;
        }
        if !issued.server_ca.is_empty() {
            self.replace(SERVER_CA_FILE, &issued.server_ca)?;
        }
        let mut identity = key_pem.as_bytes().to_vec();
        identity.extend_from_slice(&issued.certificate_chain);
        self.replace(IDENTITY_FILE, &identity)
    }

    fn replace(&self, name: &str, contents: &[u8]) -> Result<(), StateError> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(true).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let result = (|| {
            let mut file = options.open(&tmp)?;
            file.write_all(contents)?;
            file.sync_all()?;
            std::fs::rename(&tmp, self.dir.join(name))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(self.state_err("writing"))
    }
}

/// A certificate's (not before, not after).
fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not a certificate: {e}"))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok((
        at(parsed.validity().not_before.timestamp()),
        at(parsed.validity().not_after.timestamp()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_written_in_one_file_readable_only_by_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(&dir.path().join("state"));
        assert!(state.validity().unwrap().is_none());
        let ca = proxy_certs::Ca::new("agent-ca").unwrap();
        let issued_pair = ca.issue("alpha", &[], proxy_certs::Usage::Client).unwrap();
        let issued = Issued {
            certificate_chain: issued_pair.cert_pem.into_bytes(),
            server_ca: ca.cert_pem().into_bytes(),
        };
        state.write(&issued_pair.key_pem, &issued).unwrap();
        let (before, after) = state.validity().unwrap().expect("held");
        assert!(before < after);
        let text = std::fs::read_to_string(state.identity()).unwrap();
        assert!(text.contains("PRIVATE KEY") && text.contains("CERTIFICATE"));
        // rustls reads the key and the chain from the one file.
        proxy_common::tls::load_key(&state.identity()).unwrap();
        proxy_common::tls::load_certs(&state.identity()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for path in [state.identity(), state.server_ca()] {
                let mode = std::fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", path.display());
            }
            let mode = std::fs::metadata(&state.dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }
}
