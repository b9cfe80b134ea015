//! Code shared by `proxy-server` and `proxy-agent`, kept in one place rather than copied.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod error;
pub mod flow;
pub mod gate;
pub mod grpc;
pub mod heard;
pub mod memory;
pub mod net;
pub mod pump;
pub mod readahead;
pub mod reload;
pub mod roles;
pub mod shutdown;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod unary;

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

/// Parses a byte size for a flag: a number of bytes, or a number with `KiB`, `MiB` or `GiB`
/// (`512MiB`). For clap's `value_parser`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 536870912, 512MiB, 1GiB)"))?;
    let unit: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (use B, KiB, MiB or GiB)")),
    };
    number
        .checked_mul(unit)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Now, in Unix seconds (0 before 1970).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The Tokio runtime of a binary: `workers` worker threads (`None`: one per CPU); `Some(1)` is a
/// current-thread runtime, where every task and the I/O driver share the calling thread.
///
/// Every hop of a tunneled byte (socket → pump → HTTP/2 → TLS) is a task wake-up; with more
/// than one worker, a task woken on one thread also unparks an idle one to steal it, and on a
/// busy host those futex wake-ups and context switches are most of the kernel time of a
/// request. A multi-thread runtime of one worker still hands every task the main future
/// spawns to that worker; a current-thread runtime hands nothing over (see docs/operating.md, "Threads").
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert_eq!(super::parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(super::parse_size("1 GiB"), Ok(1 << 30));
        assert!(
            super::parse_size("1GB")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(super::parse_size("lots").is_err());
        assert!(super::parse_size("99999999999999GiB").is_err());
    }
}
