//! Who may use the CONNECT frontend, and which clusters each identity may reach.
//!
//! The policy file (`--frontend-auth-file`, YAML):
//!
//! ```yaml
//! clients:
//!   - name: kubefed                 # identity; also matches a client certificate CN
//!     token: "s3cret-token"         # or token_sha256: <hex>; Bearer, or Basic with it as password
//!     clusters: ["alpha", "member-*"]
//!     destinations: ["monitoring.svc:9090"]  # Proxy-Destination targets besides the API server
//!   - name: ops
//!     clusters: ["*"]
//!     operator: true                # may read the operator pages when they are not on loopback
//! ```
//!
//! `destinations` (globs over `host:port`, default none) is checked before any agent is asked;
//! the agent's own `--allow-destination` must allow it too.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time; they never reach logs
//! or `Debug` output.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a policy file was refused.
// Variant fields are described by each variant's #[error] message, not by
// one-word doc lines.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read auth file {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid policy YAML.
    #[error("auth file {path}: {reason}")]
    Invalid {
        path: String,
        /// What is wrong (never includes a token).
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    clients: Vec<ClientEntry>,
}

/// The shipped Secret's content until an operator replaces it: `placeholder: <what to do>`.
#[derive(Deserialize)]
struct Placeholder {
    placeholder: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    name: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    clusters: Vec<String>,
    #[serde(default)]
    destinations: Vec<String>,
    #[serde(default)]
    operator: bool,
}

/// One identity's grants.
struct Client {
    name: String,
    token_digest: Option<[u8; 32]>,
    clusters: Vec<String>,
    destinations: Vec<String>,
    operator: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("token", &self.token_digest.map(|_| "<redacted>"))
            .field("clusters", &self.clusters)
            .field("destinations", &self.destinations)
            .field("operator", &self.operator)
            .finish()
    }
}

/// The loaded policy.
#[derive(Debug)]
pub struct Policy {
    clients: Vec<Client>,
}

/// Credentials a CONNECT request presented.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No `Proxy-Authorization` header.
    None,
    /// `Bearer <token>`.
    Bearer(String),
    /// `Basic base64(user:password)`; the password is the token.
    Basic {
        /// The user name (must match the token's client when not empty).
        user: String,
        /// The token.
        password: String,
    },
    /// A header that could not be parsed.
    Malformed,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Self::Basic { user, .. } => write!(f, "Basic({user:?}, <redacted>)"),
            Self::Malformed => f.write_str("Malformed"),
        }
    }
}

impl Credentials {
    /// Parses a `Proxy-Authorization` header value.
    pub fn parse(header: Option<&[u8]>) -> Self {
        let Some(raw) = header else {
            return Self::None;
        };
        let Ok(text) = std::str::from_utf8(raw) else {
            return Self::Malformed;
        };
        let (scheme, rest) = text.trim().split_once(' ').unwrap_or((text, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            return Self::Bearer(rest.to_owned());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64_decode(rest).and_then(|b| String::from_utf8(b).ok());
            if let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
                return Self::Basic {
                    user: user.to_owned(),
                    password: password.to_owned(),
                };
            }
        }
        Self::Malformed
    }
}

/// Why a request was not authenticated (the client gets `407`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Nothing presented.
    #[error("proxy authentication required")]
    Missing,
    /// A token or certificate that matches no client.
    #[error("invalid proxy credentials")]
    Invalid,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| PolicyError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses policy YAML. Errors never quote a token.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(Placeholder { placeholder }) = serde_yaml_ng::from_str::<Placeholder>(text) {
            return Err(format!(
                "is the shipped placeholder, not a policy: {}",
                placeholder.chars().take(200).collect::<String>()
            ));
        }
        let file: FileFormat = serde_yaml_ng::from_str(text).map_err(|e| {
            // serde's messages can quote the offending value; keep only where it is.
            match e.location() {
                Some(loc) => format!(
                    "invalid YAML or unknown field at line {} column {}",
                    loc.line(),
                    loc.column()
                ),
                None => "invalid YAML: expected `clients:` with name/token/token_sha256/clusters"
                    .to_owned(),
            }
        })?;
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        let mut clients = Vec::with_capacity(file.clients.len());
        for (i, entry) in file.clients.into_iter().enumerate() {
            let at = format!("client #{} ({:?})", i + 1, entry.name);
            if entry.name.is_empty() {
                return Err(format!("client #{}: empty name", i + 1));
            }
            if !names.insert(entry.name.clone()) {
                return Err(format!("{at}: duplicate name"));
            }
            let token_digest = match (entry.token, entry.token_sha256) {
                (Some(_), Some(_)) => {
                    return Err(format!("{at}: give token or token_sha256, not both"));
                }
                (Some(t), None) if t.is_empty() => return Err(format!("{at}: empty token")),
                (Some(t), None) => Some(digest(&t)),
                (None, Some(h)) => Some(
                    parse_hex_digest(&h)
                        .ok_or_else(|| format!("{at}: token_sha256 must be 64 hex digits"))?,
                ),
                (None, None) => None,
            };
            if let Some(d) = token_digest
                && !digests.insert(d)
            {
                return Err(format!("{at}: token shared with another client"));
            }
            for pattern in &entry.clusters {
                if pattern.is_empty() {
                    return Err(format!("{at}: empty cluster pattern"));
                }
            }
            for pattern in &entry.destinations {
                if pattern.is_empty() || !pattern.contains(':') {
                    return Err(format!(
                        "{at}: destination pattern {pattern:?} must be host:port (globs allowed)"
                    ));
                }
            }
            clients.push(Client {
                name: entry.name,
                token_digest,
                clusters: entry.clusters,
                destinations: entry.destinations,
                operator: entry.operator,
            });
        }
        Ok(Self { clients })
    }

    /// The identity presenting `creds` and/or a verified client certificate with CN `cert_cn`.
    /// A token, when given, decides; otherwise the certificate does.
    pub fn authenticate(
        &self,
        creds: &Credentials,
        cert_cn: Option<&str>,
    ) -> Result<&str, AuthError> {
        let (user, token) = match creds {
            Credentials::Bearer(t) => (None, Some(t.as_str())),
            Credentials::Basic { user, password } => (Some(user.as_str()), Some(password.as_str())),
            Credentials::Malformed => return Err(AuthError::Invalid),
            Credentials::None => (None, None),
        };
        if let Some(token) = token {
            let presented = digest(token);
            // Every entry is compared so the time taken does not depend on which one matches.
            let mut found = None;
            for client in &self.clients {
                if let Some(d) = &client.token_digest
                    && bool::from(d.ct_eq(&presented))
                {
                    found = Some(client);
                }
            }
            let client = found.ok_or(AuthError::Invalid)?;
            if user.is_some_and(|u| !u.is_empty() && u != client.name) {
                return Err(AuthError::Invalid);
            }
            return Ok(&client.name);
        }
        match cert_cn {
            Some(cn) => self
                .clients
                .iter()
                .find(|c| c.name == cn)
                .map(|c| c.name.as_str())
                .ok_or(AuthError::Invalid),
            None => Err(AuthError::Missing),
        }
    }

    /// Whether `identity` may ask an agent of a cluster it may reach for `destination`
    /// (`host:port`, as the `Proxy-Destination` header named it).
    pub fn allows_destination(&self, identity: &str, destination: &str) -> bool {
        let destination = destination.to_ascii_lowercase();
        self.clients
            .iter()
            .find(|c| c.name == identity)
            .is_some_and(|c| {
                c.destinations
                    .iter()
                    .any(|p| glob_match(&p.to_ascii_lowercase(), &destination))
            })
    }

    /// Whether the holder of `authorization` (an `Authorization` header value: Bearer, or
    /// Basic with the token as password) is a client marked `operator: true`.
    pub fn operator(&self, authorization: Option<&[u8]>) -> bool {
        let creds = Credentials::parse(authorization);
        if matches!(creds, Credentials::None) {
            return false;
        }
        self.authenticate(&creds, None)
            .is_ok_and(|name| self.clients.iter().any(|c| c.name == name && c.operator))
    }

    /// Whether `identity` may reach `cluster`.
    pub fn allows(&self, identity: &str, cluster: &str) -> bool {
        self.clients
            .iter()
            .find(|c| c.name == identity)
            .is_some_and(|c| c.clusters.iter().any(|p| glob_match(p, cluster)))
    }
}

/// Matches `name` against a pattern where `*` is any run of characters and `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    // Bounded before decoding: a header is at most --max-head-bytes anyway.
    if text.len() > 8 * 1024 {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
clients:
  - name: kubefed
    token: "s3cret-token"
    clusters: ["alpha", "member-*"]
  - name: hashed
    token_sha256: "0b8d2a8d5a3e3a5f3c4a0c5f7f1b5b3e6c9f1d2e3a4b5c6d7e8f9a0b1c2d3e4f"
    clusters: ["beta"]
  - name: ops
    clusters: ["*"]
"#;

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("member-*", "member-1"));
        assert!(!glob_match("member-*", "member"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*-prod-*", "eu-prod-3"));
        assert!(!glob_match("alpha", "alphabet"));
        assert!(glob_match("**a", "bba"));
    }

    #[test]
    fn tokens_basic_bearer_and_certificates() {
        let p = Policy::parse(POLICY).unwrap();
        let bearer = Credentials::Bearer("s3cret-token".into());
        assert_eq!(p.authenticate(&bearer, None), Ok("kubefed"));
        let basic = Credentials::parse(Some(b"Basic a3ViZWZlZDpzM2NyZXQtdG9rZW4=")); // kubefed:s3cret-token
        assert_eq!(p.authenticate(&basic, None), Ok("kubefed"));
        let wrong_user = Credentials::Basic {
            user: "ops".into(),
            password: "s3cret-token".into(),
        };
        assert_eq!(p.authenticate(&wrong_user, None), Err(AuthError::Invalid));
        let wrong = Credentials::Bearer("nope".into());
        assert_eq!(
            p.authenticate(&wrong, Some("ops")),
            Err(AuthError::Invalid),
            "a bad token must not fall back to the certificate"
        );
        assert_eq!(p.authenticate(&Credentials::None, Some("ops")), Ok("ops"));
        assert_eq!(
            p.authenticate(&Credentials::None, Some("stranger")),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            p.authenticate(&Credentials::None, None),
            Err(AuthError::Missing)
        );
        assert!(p.allows("kubefed", "member-7") && p.allows("kubefed", "alpha"));
        assert!(!p.allows("kubefed", "beta") && !p.allows("nobody", "alpha"));
        assert!(p.allows("ops", "beta"));
    }

    #[test]
    fn hashed_tokens_match_their_sha256() {
        let hex: String = digest("hashed-secret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let p = Policy::parse(&format!(
            "clients:\n  - name: h\n    token_sha256: {hex}\n    clusters: [beta]\n"
        ))
        .unwrap();
        assert_eq!(
            p.authenticate(&Credentials::Bearer("hashed-secret".into()), None),
            Ok("h")
        );
    }

    #[test]
    fn invalid_files_are_refused_without_quoting_tokens() {
        for bad in [
            "clients:\n  - name: a\n    token: x\n    token_sha256: 00\n",
            "clients:\n  - name: a\n  - name: a\n",
            "clients:\n  - name: a\n    token: same\n  - name: b\n    token: same\n",
            "clients:\n  - name: a\n    token_sha256: zz\n",
            "clients:\n  - name: ''\n",
            "clients:\n  - name: a\n    tokn: super-secret-value\n",
            "not yaml: [",
        ] {
            let err = Policy::parse(bad).unwrap_err();
            assert!(
                !err.contains("super-secret-value") && !err.contains("same"),
                "{err}"
            );
        }
        let p = Policy::parse(POLICY).unwrap();
        assert!(!format!("{p:?}").contains("s3cret"));
        assert!(!format!("{:?}", Credentials::Bearer("s3cret".into())).contains("s3cret"));
    }

    #[test]
    fn destinations_are_granted_per_client_and_default_to_none() {
        let p = Policy::parse(
            "clients:\n  - name: mon\n    token: t1\n    clusters: ['*']\n    destinations: ['prometheus.monitoring.svc:9090', '*.logging.svc:*']\n  - name: plain\n    token: t2\n    clusters: ['*']\n",
        )
        .unwrap();
        assert!(p.allows_destination("mon", "prometheus.monitoring.svc:9090"));
        assert!(p.allows_destination("mon", "Loki.Logging.svc:3100"));
        assert!(!p.allows_destination("mon", "prometheus.monitoring.svc:9091"));
        assert!(!p.allows_destination("plain", "prometheus.monitoring.svc:9090"));
        assert!(!p.allows_destination("nobody", "prometheus.monitoring.svc:9090"));
        assert!(Policy::parse("clients:\n  - name: a\n    destinations: ['nohost']\n").is_err());
    }

    #[test]
    fn operators_are_marked_clients_with_a_token() {
        let p = Policy::parse(
            "clients:\n  - name: ops\n    token: op-token\n    operator: true\n  - name: kubefed\n    token: kf-token\n",
        )
        .unwrap();
        assert!(p.operator(Some(b"Bearer op-token")));
        // Basic, as a browser sends it: ops:op-token
        assert!(p.operator(Some(b"Basic b3BzOm9wLXRva2Vu")));
        assert!(!p.operator(Some(b"Bearer kf-token")), "not an operator");
        assert!(!p.operator(Some(b"Bearer wrong")));
        assert!(!p.operator(None));
    }

    #[test]
    fn the_shipped_placeholder_is_refused_and_says_so() {
        let err = Policy::parse(
            "placeholder: \"replace this Secret with your auth policy: see docs/deploying.md\"\n",
        )
        .unwrap_err();
        assert!(err.contains("shipped placeholder"), "{err}");
        assert!(err.contains("docs/deploying.md"), "{err}");
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(
            Credentials::parse(Some(b"Basic !!!")),
            Credentials::Malformed
        );
        assert_eq!(
            Credentials::parse(Some(b"Digest x")),
            Credentials::Malformed
        );
        assert_eq!(Credentials::parse(Some(b"\xff")), Credentials::Malformed);
        assert_eq!(Credentials::parse(None), Credentials::None);
        assert_eq!(
            Credentials::parse(Some(b"bearer  tok ")),
            Credentials::Bearer("tok".into())
        );
    }
}
