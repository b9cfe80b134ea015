//! What the kernel says about CPU time and memory, from /proc.

use std::time::Duration;

/// Clock ticks per second of /proc times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU time the whole machine spent busy (all cores), from /proc/stat.
pub fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Duration::from_secs_f64(busy as f64 / TICKS)
}

/// CPU time (user + system) a process has used.
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_secs_f64((get(11) + get(12)) as f64 / TICKS)
}

/// (resident, peak resident) memory of a process in KiB.
pub fn process_memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `pid` and all its descendants (sshd serves each connection from a child process).
pub fn family(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            parents.push((p, ppid));
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

/// The kernel's hard limit on TCP memory (tcp_mem[2]), KiB.
pub fn tcp_memory_limit() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")
        .unwrap_or_default()
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(u64::MAX, |pages| pages * 4)
}

/// Kernel TCP memory of the whole machine, KiB: (in use, pressure threshold), from
/// /proc/net/sockstat and tcp_mem (both in pages).
pub fn tcp_memory() -> (u64, u64) {
    let page = 4;
    let used = std::fs::read_to_string("/proc/net/sockstat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|f| *f != "mem")
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0u64);
    let pressure = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX / page);
    (used * page, pressure * page)
}
