//! Code shared by `proxy-server` and `proxy-agent`, kept in one place rather than copied.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod pump;
pub mod readahead;
pub mod reload;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// A default id for a server or agent process: the host name (as Kubernetes sets it, the pod
/// name) and a random suffix, so restarts and replicas are told apart in logs.
pub fn default_instance_id(fallback: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_owned());
    let suffix: u32 = std::process::id()
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0));
    format!("{host}-{:06x}", suffix & 0xff_ffff)
}

/// Whether `name` is a valid cluster name: a DNS subdomain (lower-case letters, digits, `-` and
/// `.`, at most 253 characters, starting and ending with a letter or digit). Cluster names are
/// also the CONNECT host, so they must be valid host names.
pub fn is_valid_cluster_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
}
