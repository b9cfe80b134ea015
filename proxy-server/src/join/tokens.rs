//! The join-token file (`--join-tokens`): bootstrap tokens in kubeadm's format, `<id>.<secret>`
//! (`[a-z0-9]{6}.[a-z0-9]{16}`), each for one cluster, with an expiry and a number of uses.
//!
//! The file keeps a token's id, the SHA-256 of its secret (never the secret), its cluster, expiry
//! and remaining uses. It is state, not only configuration: the server counts uses down in it,
//! and `proxy-server token create|revoke` change it while the server runs. Every change is made
//! under an exclusive lock on a sidecar file (`<file>.lock`), read, modify, write to a temporary
//! file and rename: a token can never be used more often than it allows, even by two joins at
//! once or a join beside a `token create`. The server reads the file at every join rather than
//! caching it, so an edit (or a revocation) applies to the next join without a reload.
//!
//! Replicas that share one file need a file system with working `flock` (a local volume or a
//! `ReadWriteOnce` volume shared by co-located pods; docs/deploying.md).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Characters of token ids and secrets (kubeadm's).
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Length of a token id.
pub const ID_LEN: usize = 6;

/// Length of a token secret.
pub const SECRET_LEN: usize = 16;

/// How long an expired, used-up or revoked token stays in the file (to answer a late attempt
/// with why, rather than "unknown") before a write drops it.
const KEEP_SPENT: Duration = Duration::from_secs(7 * 24 * 3600);

/// One token, as the file holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The public half: `[a-z0-9]{6}`.
    pub id: String,
    /// Lower-case hex SHA-256 of the secret half.
    pub secret_sha256: String,
    /// The cluster an agent joining with it becomes.
    pub cluster: String,
    /// When it stops working, RFC 3339 (UTC).
    pub expires: String,
    /// Joins it still allows.
    pub uses_left: u32,
    /// Revoked by `token revoke`: kept so a late attempt is told so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    tokens: Vec<Entry>,
}

/// Why the file could not be used.
// Variant fields are described by each variant's #[error] message.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// Reading, locking or writing failed.
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a token file. Never quotes a value (it could hold a hash).
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Why a token was refused; each is one `result` of `proxy_server_joins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Malformed, no such id, or the secret does not match (not told apart to the caller: that
    /// would confirm which ids exist).
    #[error("the join token is not valid")]
    Unknown,
    /// Past its expiry.
    #[error("the join token has expired; create a new one with `proxy-server token create`")]
    Expired,
    /// No uses left (a replay after its last use lands here too).
    #[error("the join token has been used up; create a new one with `proxy-server token create`")]
    UsedUp,
    /// Revoked by `token revoke`.
    #[error("the join token has been revoked")]
    Revoked,
    /// Made for another cluster than the one the CSR asks for.
    #[error("the join token is for another cluster than the certificate request names")]
    OtherCluster,
}

impl Refusal {
    /// The metric's `result` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unknown => "invalid_token",
            Self::Expired => "expired_token",
            Self::UsedUp => "used_up_token",
            Self::Revoked => "revoked_token",
            Self::OtherCluster => "cluster_mismatch",
        }
    }
}

/// A token split into its halves, if it has kubeadm's format.
pub fn split(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let valid = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (valid(id, ID_LEN) && valid(secret, SECRET_LEN)).then_some((id, secret))
}

fn secret_digest(secret: &str) -> String {
    proxy_common::text::hex(&Sha256::digest(secret.as_bytes()))
}

fn random_text(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn parse_time(path: &Path, at: &str, value: &str) -> Result<SystemTime, TokenFileError> {
    humantime::parse_rfc3339(value).map_err(|_| TokenFileError::Invalid {
        path: path.to_owned(),
        reason: format!("{at}: `expires` is not an RFC 3339 time"),
    })
}

/// The token file at a path, read and changed only under its lock.
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
}

/// The file's entries, locked until dropped.
struct Locked {
    _lock: File,
    entries: Vec<Entry>,
}

impl TokenFile {
    /// The file at `path` (which need not exist yet: no tokens).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> TokenFileError + '_ {
        move |source| TokenFileError::Io {
            what,
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> Result<Locked, TokenFileError> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(self.io("opening the lock of"))?;
        lock.lock().map_err(self.io("locking"))?;
        let entries = self.read()?;
        Ok(Locked {
            _lock: lock,
            entries,
        })
    }

    /// Reads and checks the file; a missing file holds no tokens.
    pub fn read(&self) -> Result<Vec<Entry>, TokenFileError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(self.io("reading")(err)),
        };
        let invalid = |reason: String| TokenFileError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let file: FileFormat = if text.trim().is_empty() {
            FileFormat::default()
        } else {
            serde_yaml_ng::from_str(&text).map_err(|e| {
                invalid(match e.location() {
                    Some(loc) => format!(
                        "invalid YAML or unknown field at line {} column {}",
                        loc.line(),
                        loc.column()
                    ),
                    None => "invalid YAML: expected `tokens:` with id/secret_sha256/cluster/expires/uses_left".into(),
                })
            })?
        };
        let mut ids = std::collections::HashSet::new();
        for (i, entry) in file.tokens.iter().enumerate() {
            let at = format!("token #{} ({:?})", i + 1, entry.id);
            if entry.id.len() != ID_LEN || !entry.id.bytes().all(|b| ALPHABET.contains(&b)) {
                return Err(invalid(format!("{at}: an id is 6 of [a-z0-9]")));
            }
            if !ids.insert(entry.id.clone()) {
                return Err(invalid(format!("{at}: duplicate id")));
            }
            if entry.secret_sha256.len() != 64
                || !entry.secret_sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(invalid(format!(
                    "{at}: secret_sha256 must be 64 hex digits"
                )));
            }
            if !proxy_common::is_valid_cluster_name(&entry.cluster) {
                return Err(invalid(format!("{at}: not a valid cluster name")));
            }
            parse_time(&self.path, &at, &entry.expires)?;
        }
        Ok(file.tokens)
    }

    fn write(&self, entries: &[Entry]) -> Result<(), TokenFileError> {
        let text = serde_yaml_ng::to_string(&FileFormat {
            tokens: entries.to_vec(),
        })
        .map_err(|e| TokenFileError::Invalid {
            path: self.path.clone(),
            reason: format!("cannot serialise: {e}"),
        })?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let mut options = OpenOptions::new();
        options.create(true).truncate(true).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let result = (|| {
            let mut file = options.open(&tmp)?;
            file.write_all(
                b"# Join tokens of proxy-server (`proxy-server token create|list|revoke`).\n\
                  # Secrets are kept only as SHA-256; the server counts uses down here.\n",
            )?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(self.io("writing"))
    }

    /// Adds a new token for `cluster`; returns it (`id.secret`: shown once, never stored).
    pub fn create(
        &self,
        cluster: &str,
        ttl: Duration,
        uses: u32,
        now: SystemTime,
    ) -> Result<(String, Entry), TokenFileError> {
        let mut locked = self.lock()?;
        prune(&mut locked.entries, now);
        let id = loop {
            let id = random_text(ID_LEN);
            if !locked.entries.iter().any(|e| e.id == id) {
                break id;
            }
        };
        let secret = random_text(SECRET_LEN);
        let entry = Entry {
            id: id.clone(),
            secret_sha256: secret_digest(&secret),
            cluster: cluster.to_owned(),
            expires: humantime::format_rfc3339_seconds(now + ttl).to_string(),
            uses_left: uses,
            revoked: false,
        };
        locked.entries.push(entry.clone());
        self.write(&locked.entries)?;
        Ok((format!("{id}.{secret}"), entry))
    }

    /// Marks the token `id` revoked; `false` if there is none.
    pub fn revoke(&self, id: &str) -> Result<bool, TokenFileError> {
        let mut locked = self.lock()?;
        let Some(entry) = locked.entries.iter_mut().find(|e| e.id == id) else {
            return Ok(false);
        };
        entry.revoked = true;
        self.write(&locked.entries)?;
        Ok(true)
    }

    /// Spends one use of `token` for an agent asking to join `cluster` (`None`: whichever the
    /// token is for): the token's cluster, or why not. Nothing changes unless it is accepted.
    /// The secret is compared in constant time.
    pub fn redeem(
        &self,
        token: &str,
        cluster: Option<&str>,
        now: SystemTime,
    ) -> Result<Result<String, Refusal>, TokenFileError> {
        let Some((id, secret)) = split(token) else {
            return Ok(Err(Refusal::Unknown));
        };
        let mut locked = self.lock()?;
        let Some(entry) = locked.entries.iter_mut().find(|e| e.id == id) else {
            return Ok(Err(Refusal::Unknown));
        };
        let digest = secret_digest(secret);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            digest.as_bytes(),
            entry.secret_sha256.to_ascii_lowercase().as_bytes(),
        )) {
            return Ok(Err(Refusal::Unknown));
        }
        let refusal = if entry.revoked {
            Some(Refusal::Revoked)
        } else if parse_time(&self.path, id, &entry.expires)? <= now {
            Some(Refusal::Expired)
        } else if entry.uses_left == 0 {
            Some(Refusal::UsedUp)
        } else if cluster.is_some_and(|c| c != entry.cluster) {
            Some(Refusal::OtherCluster)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return Ok(Err(refusal));
        }
        entry.uses_left -= 1;
        let cluster = entry.cluster.clone();
        self.write(&locked.entries)?;
        Ok(Ok(cluster))
    }
}

/// Drops tokens spent (expired, used up or revoked) longer than [`KEEP_SPENT`] ago. A used-up
/// or revoked token counts from its expiry, which bounds it anyway.
fn prune(entries: &mut Vec<Entry>, now: SystemTime) {
    entries.retain(|e| {
        humantime::parse_rfc3339(&e.expires).map_or(true, |expires| expires + KEEP_SPENT > now)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> (tempfile::TempDir, TokenFile) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = TokenFile::new(&dir.path().join("tokens.yaml"));
        (dir, file)
    }

    #[test]
    fn a_token_has_kubeadms_format_and_only_its_hash_is_kept() {
        let (_dir, file) = file();
        let now = SystemTime::now();
        let (token, entry) = file
            .create("alpha", Duration::from_secs(60), 1, now)
            .expect("create");
        let (id, secret) = split(&token).expect("kubeadm's format");
        assert_eq!(id, entry.id);
        let text = std::fs::read_to_string(file.path()).expect("file");
        assert!(!text.contains(secret), "the secret was written: {text}");
        assert!(text.contains(&secret_digest(secret)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(file.path())
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn uses_are_counted_down_and_a_replay_is_refused() {
        let (_dir, file) = file();
        let now = SystemTime::now();
        let (token, _) = file
            .create("alpha", Duration::from_secs(60), 2, now)
            .expect("create");
        assert_eq!(
            file.redeem(&token, Some("alpha"), now).unwrap(),
            Ok("alpha".into())
        );
        assert_eq!(
            file.redeem(&token, Some("alpha"), now).unwrap(),
            Ok("alpha".into())
        );
        assert_eq!(
            file.redeem(&token, Some("alpha"), now).unwrap(),
            Err(Refusal::UsedUp)
        );
        assert_eq!(file.read().unwrap()[0].uses_left, 0);
        // An agent not told its cluster takes the token's.
        let (token, _) = file
            .create("beta", Duration::from_secs(60), 1, now)
            .expect("create");
        assert_eq!(file.redeem(&token, None, now).unwrap(), Ok("beta".into()));
    }

    #[test]
    fn every_refusal_changes_nothing() {
        let (_dir, file) = file();
        let now = SystemTime::now();
        let (token, _) = file
            .create("alpha", Duration::from_secs(60), 1, now)
            .expect("create");
        let before = std::fs::read(file.path()).unwrap();
        let (id, _) = split(&token).unwrap();
        let wrong_secret = format!("{id}.{}", "0".repeat(SECRET_LEN));
        for (attempt, cluster, at, refusal) in [
            (wrong_secret.as_str(), "alpha", now, Refusal::Unknown),
            ("abcdef.0123456789abcdef", "alpha", now, Refusal::Unknown),
            ("not-a-token", "alpha", now, Refusal::Unknown),
            (token.as_str(), "beta", now, Refusal::OtherCluster),
            (
                token.as_str(),
                "alpha",
                now + Duration::from_secs(61),
                Refusal::Expired,
            ),
        ] {
            assert_eq!(
                file.redeem(attempt, Some(cluster), at).unwrap(),
                Err(refusal),
                "{attempt} for {cluster}"
            );
        }
        assert_eq!(std::fs::read(file.path()).unwrap(), before);
        assert!(file.revoke(id).unwrap());
        assert_eq!(
            file.redeem(&token, Some("alpha"), now).unwrap(),
            Err(Refusal::Revoked)
        );
        assert!(!file.revoke("zzzzzz").unwrap());
    }

    #[test]
    fn a_broken_file_is_refused_without_quoting_it() {
        let (_dir, file) = file();
        std::fs::write(
            file.path(),
            "tokens:\n- id: abcdef\n  secret_sha256: 5ecre7\n  cluster: a\n  expires: x\n  uses_left: 1\n",
        )
        .unwrap();
        let err = file.read().unwrap_err().to_string();
        assert!(err.contains("secret_sha256 must be 64 hex digits"), "{err}");
        assert!(!err.contains("5ecre7"), "{err}");
        std::fs::write(file.path(), "tokens: [\n").unwrap();
        assert!(file.read().is_err());
    }

    #[test]
    fn spent_tokens_are_dropped_a_week_after_they_expire() {
        let (_dir, file) = file();
        let now = SystemTime::now();
        file.create("alpha", Duration::from_secs(60), 1, now)
            .unwrap();
        file.create(
            "beta",
            Duration::from_secs(60),
            1,
            now + KEEP_SPENT + Duration::from_secs(120),
        )
        .unwrap();
        let left: Vec<String> = file
            .read()
            .unwrap()
            .into_iter()
            .map(|e| e.cluster)
            .collect();
        assert_eq!(left, ["beta"]);
    }
}
