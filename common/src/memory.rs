//! The default bound on what a process's connections may buffer (`--max-buffered`): half the
//! memory the process may use, so windows, socket-side queues and the rest of the process fit
//! under a container's limit together.

use std::path::Path;

/// Where a default bound came from, for the startup log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The cgroup's memory limit (a container's, or a systemd unit's `MemoryMax`).
    Cgroup(u64),
    /// The machine's memory (no cgroup limit).
    Machine(u64),
    /// Neither could be read.
    Unknown,
}

/// Bound used when neither a cgroup limit nor the machine's memory can be read: what the
/// default `--max-connections` (20,000) pins at their 256 KiB floors.
const FALLBACK: u64 = 5 << 30;

/// Half of what this process may use: its cgroup's memory limit if it has one, else the
/// machine's memory.
pub fn default_max_buffered() -> (u64, Source) {
    default_from(Path::new("/"))
}

/// `--max-buffered` as given, or its default (logged with where it came from). Refused (with
/// the reason, for the binary's config error) below one connection's floor: no connection
/// could ever be admitted.
pub fn max_buffered(flag: Option<u64>) -> Result<u64, String> {
    let bound = flag.unwrap_or_else(|| {
        let (bound, source) = default_max_buffered();
        tracing::info!(
            bound,
            ?source,
            "--max-buffered not set: half the memory this process may use"
        );
        bound
    });
    if bound < crate::flow::MIN_WINDOW {
        return Err(format!(
            "{bound} bytes is less than one connection's window ({} bytes)",
            crate::flow::MIN_WINDOW
        ));
    }
    Ok(bound)
}

/// [`default_max_buffered`] reading the files under `root` (tests).
fn default_from(root: &Path) -> (u64, Source) {
    if let Some(limit) = cgroup_limit(root) {
        return (limit / 2, Source::Cgroup(limit));
    }
    match machine_memory(root) {
        Some(total) => (total / 2, Source::Machine(total)),
        None => (FALLBACK, Source::Unknown),
    }
}

/// The memory limit of this process's cgroup: v2's `memory.max`, else v1's
/// `memory.limit_in_bytes` (which says "no limit" with a huge number).
fn cgroup_limit(root: &Path) -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    let v2 = read("proc/self/cgroup")
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_owned()))
        })
        .and_then(|path| {
            read(&format!(
                "sys/fs/cgroup{}/memory.max",
                if path == "/" { String::new() } else { path }
            ))
        })
        .or_else(|| read("sys/fs/cgroup/memory.max"));
    if let Some(max) = v2 {
        // "max": no limit.
        return max.trim().parse().ok();
    }
    read("sys/fs/cgroup/memory/memory.limit_in_bytes")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|v| *v < 1 << 60)
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn machine_memory(root: &Path) -> Option<u64> {
    std::fs::read_to_string(root.join("proc/meminfo"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn half_the_cgroup_limit_then_half_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(default_from(root), (FALLBACK, Source::Unknown));
        write(
            root,
            "proc/meminfo",
            "MemTotal:       24000000 kB\nMemFree: 1 kB\n",
        );
        assert_eq!(
            default_from(root),
            (12_000_000 * 1024, Source::Machine(24_000_000 * 1024))
        );
        // cgroup v2 without a limit: the machine's.
        write(root, "proc/self/cgroup", "0::/kubepods/pod1/c1\n");
        write(root, "sys/fs/cgroup/kubepods/pod1/c1/memory.max", "max\n");
        assert_eq!(default_from(root).1, Source::Machine(24_000_000 * 1024));
        write(
            root,
            "sys/fs/cgroup/kubepods/pod1/c1/memory.max",
            "1073741824\n",
        );
        assert_eq!(default_from(root), (512 << 20, Source::Cgroup(1 << 30)));
    }

    #[test]
    fn a_bound_below_one_window_is_refused() {
        assert_eq!(max_buffered(Some(64 << 20)), Ok(64 << 20));
        let err = max_buffered(Some(1024)).unwrap_err();
        assert!(err.contains("less than one connection's window"), "{err}");
        assert!(max_buffered(None).unwrap() >= crate::flow::MIN_WINDOW);
    }

    #[test]
    fn cgroup_v1_says_no_limit_with_a_huge_number() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "proc/meminfo", "MemTotal: 1000 kB\n");
        write(
            root,
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(default_from(root).1, Source::Machine(1_024_000));
        write(
            root,
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "268435456\n",
        );
        assert_eq!(default_from(root), (128 << 20, Source::Cgroup(256 << 20)));
    }
}
