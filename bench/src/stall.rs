//! Stalled readers: one healthy connection beside many connections of the same tunnel whose
//! clients have stopped reading while their upstreams keep writing.
//!
//! On loopback every TCP socket starts with the largest send buffer (tcp_wmem's maximum, 4 MiB:
//! its initial size is ten segments of 64 KiB), so each stalled connection can pin megabytes of
//! kernel memory in the tunnel's own sockets, and a thousand of them would cross the kernel's
//! TCP memory limits (tcp_mem, machine-wide), where every socket of the machine is squeezed and
//! the healthy download measures the kernel. The stall therefore grows only as far as the
//! machine's TCP memory stays under [`TCP_MEMORY_SHARE`] of its pressure threshold, and says how
//! far it got (`stalled`). The harness's own sockets (the stalled clients, the upstream's
//! writers) have small fixed buffers for the same reason ([`Buffers::Small`]).
//!
//! With [`Buffers::Kernel`] the stalled clients and the upstream's writers keep the kernel's own
//! buffers, as real clients and a real API server do, and the stall may grow to
//! [`KERNEL_CEILING`] of the hard limit: what a tunnel adds to the kernel's TCP memory beside
//! what the same stalled readers cost connected directly is then the figure (issue 36), and the
//! direct contender in the same run is its baseline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::contenders::{Entry, Running};
use crate::scenarios::{Sample, read_n, round_trip, rr_conn};
use crate::sys;

/// Bytes each stalled client reads before it stops reading.
const STALL_READ: u64 = 64 * 1024;
/// Receive buffer of a stalled client (see `upstream::TRACKED_SEND_BUFFER`).
const STALL_RECV_BUFFER: u32 = 64 * 1024;
/// Connections opened at once, and the first ones, which measure what one costs the kernel.
const BATCH: usize = 16;
/// Part of the kernel's TCP memory pressure threshold (tcp_mem[1]) the stall may bring the
/// machine to: (numerator, denominator).
const TCP_MEMORY_SHARE: (u64, u64) = (3, 4);
/// With [`Buffers::Kernel`], part of the kernel's hard TCP memory limit (tcp_mem[2]) the stall
/// may bring the machine to: above the pressure threshold, where the kernel squeezes buffers,
/// but short of the limit, where sockets (the harness's own too) fail.
const KERNEL_CEILING: (u64, u64) = (9, 10);
/// Longest wait for the stalled connections' upstream writes to settle.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);
/// Longest the healthy download may take beside the stall (a frozen tunnel counts as zero).
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// Socket buffers of the stalled clients and the upstream's writers to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffers {
    /// Small and fixed (64 KiB), so a thousand stalled connections fit any contender.
    Small,
    /// The kernel's own, autotuned, as real clients and API servers have.
    Kernel,
}

/// Tags this process's tracked sources, so each run counts only its own.
static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

/// Opens a connection on which the upstream writes until the client goes away.
pub async fn source(entry: &Entry) -> anyhow::Result<TcpStream> {
    let mut s = entry.open().await?;
    s.write_all(b"S").await?;
    Ok(s)
}

/// Seconds to read `bytes` from a new source connection.
async fn download(entry: &Entry, bytes: u64) -> anyhow::Result<f64> {
    let mut s = source(entry).await?;
    let t = Instant::now();
    read_n(&mut s, bytes).await?;
    Ok(t.elapsed().as_secs_f64())
}

/// The upstream's counters for `tag`: (live connections, sum, min, max of bytes written).
async fn tracked(run: &Running, tag: u64) -> anyhow::Result<[u64; 4]> {
    let mut s = TcpStream::connect(run.upstream).await?;
    s.write_all(b"Q").await?;
    s.write_all(&tag.to_le_bytes()).await?;
    let mut out = [0u64; 4];
    for v in &mut out {
        *v = s.read_u64_le().await?;
    }
    Ok(out)
}

/// Waits until the upstream counts `n` connections under `tag` and their total written grew by
/// under 0.1 % in 500 ms; returns whether it did within [`SETTLE_WITHIN`], and the counters.
async fn settle(run: &Running, tag: u64, n: usize) -> anyhow::Result<(bool, [u64; 4])> {
    let started = Instant::now();
    let mut last = tracked(run, tag).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = tracked(run, tag).await?;
        let done = now[0] == n as u64 && now[1].saturating_sub(last[1]) <= now[1] / 1000;
        last = now;
        if done || started.elapsed() > SETTLE_WITHIN {
            return Ok((done, last));
        }
    }
}

/// Opens `count` more stalled connections in batches of [`BATCH`], stopping early (with what it
/// has) if the machine's TCP memory reaches `ceiling` KiB.
async fn open_stalled(
    run: &Running,
    tag: u64,
    buffers: Buffers,
    stalled: &mut Vec<TcpStream>,
    count: usize,
    ceiling: u64,
) -> anyhow::Result<()> {
    let (recv_buffer, mode) = match buffers {
        Buffers::Small => (Some(STALL_RECV_BUFFER), b"T"),
        Buffers::Kernel => (None, b"U"),
    };
    let target = stalled.len() + count;
    while stalled.len() < target && sys::tcp_memory().0 < ceiling {
        let batch: Vec<_> = (0..(target - stalled.len()).min(BATCH))
            .map(|_| {
                let entry = run.entry.clone();
                tokio::spawn(async move {
                    let mut s = entry.open_with(recv_buffer).await?;
                    s.write_all(mode).await?;
                    s.write_all(&tag.to_le_bytes()).await?;
                    read_n(&mut s, STALL_READ).await?;
                    Ok::<_, anyhow::Error>(s)
                })
            })
            .collect();
        for t in batch {
            stalled.push(t.await??);
        }
    }
    Ok(())
}

/// (role, resident KiB, peak resident KiB) of each of the contender's processes.
fn memory(run: &Running) -> Vec<(&'static str, u64, u64)> {
    run.pids
        .iter()
        .map(|(role, pid)| {
            let (rss, peak) = sys::family(*pid)
                .iter()
                .map(|p| sys::process_memory(*p))
                .fold((0, 0), |(a, b), (r, h)| (a + r, b + h));
            (*role, rss, peak)
        })
        .collect()
}

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

/// Up to `n` connections whose upstream writes without end and whose clients read 64 KiB, then
/// nothing (as many as the kernel's TCP memory allows, see the module). Once the upstream's
/// writes to them have settled, one more connection reads `bytes`. Value: that download's
/// Gbit/s. Extras: the same download alone (before the stall, same processes) and the ratio,
/// time to `200` and to the first response byte of `connects` new connections during the
/// stall, resident memory of each process with the stall in place, bytes pending per stalled
/// connection (written by the upstream, not read by its client), kernel TCP memory.
pub async fn stalled_readers(
    run: &Running,
    n: usize,
    bytes: u64,
    connects: usize,
    buffers: Buffers,
) -> anyhow::Result<Sample> {
    download(&run.entry, bytes.min(16 << 20)).await?; // warm-up
    let alone = download(&run.entry, bytes).await?;
    let before = memory(run);

    let tag = NEXT_TAG.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 32);
    let (tcp0, pressure) = sys::tcp_memory();
    let ceiling = match buffers {
        Buffers::Small => pressure / TCP_MEMORY_SHARE.1 * TCP_MEMORY_SHARE.0,
        Buffers::Kernel => sys::tcp_memory_limit() / KERNEL_CEILING.1 * KERNEL_CEILING.0,
    };
    let mut stalled = Vec::with_capacity(n);
    let opening = Instant::now();
    // A first batch, settled, tells what one stalled connection costs the kernel; the rest is
    // opened only as far as that leaves the machine under the ceiling.
    open_stalled(run, tag, buffers, &mut stalled, n.min(BATCH), u64::MAX).await?;
    settle(run, tag, stalled.len()).await?;
    let tcp1 = sys::tcp_memory().0;
    let per_conn = (tcp1.saturating_sub(tcp0) / stalled.len() as u64).max(1);
    let fits = (ceiling.saturating_sub(tcp1) / per_conn) as usize;
    let more = (n - stalled.len()).min(fits);
    open_stalled(run, tag, buffers, &mut stalled, more, ceiling).await?;
    let open_s = opening.elapsed().as_secs_f64();
    let (settled, [count, sum, min, max]) = settle(run, tag, stalled.len()).await?;
    let settle_s = opening.elapsed().as_secs_f64() - open_s;
    anyhow::ensure!(
        count == stalled.len() as u64,
        "the upstream sees {count} of {} stalled",
        stalled.len()
    );
    let during = memory(run);
    let tcp = sys::tcp_memory().0;

    let mut other = source(&run.entry).await?;
    let t = Instant::now();
    let beside = match tokio::time::timeout(HEALTHY_WITHIN, read_n(&mut other, bytes)).await {
        Ok(r) => {
            r?;
            t.elapsed().as_secs_f64()
        }
        Err(_) => f64::INFINITY,
    };
    drop(other);

    let mut to_200 = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut ttfb = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..connects {
        let t = Instant::now();
        let mut s = rr_conn(&run.entry).await?;
        to_200.record((t.elapsed().as_micros() as u64).clamp(1, 60_000_000))?;
        round_trip(&mut s).await?;
        ttfb.record((t.elapsed().as_micros() as u64).clamp(1, 60_000_000))?;
    }
    // Still stalled at the end: the upstream cannot have written much more.
    let end = tracked(run, tag).await?;
    drop(stalled);

    let k = count.max(1) as f64;
    let gbit = |s: f64| bytes as f64 * 8.0 / s / 1e9;
    let kib = |b: u64| b.saturating_sub(STALL_READ) as f64 / 1024.0;
    let mut extra = vec![
        ("stalled".into(), count as f64),
        ("alone_gbit".into(), gbit(alone)),
        ("pct_of_alone".into(), 100.0 * alone / beside),
        ("connect_p50_us".into(), micros(&to_200, 0.5)),
        ("connect_p99_us".into(), micros(&to_200, 0.99)),
        ("ttfb_p50_us".into(), micros(&ttfb, 0.5)),
        ("ttfb_p99_us".into(), micros(&ttfb, 0.99)),
        ("pending_mean_kib".into(), kib(sum / count.max(1))),
        ("pending_min_kib".into(), kib(min)),
        ("pending_max_kib".into(), kib(max)),
        (
            "pending_growth_kib".into(),
            end[1].saturating_sub(sum) as f64 / 1024.0 / k,
        ),
        (
            "kernel_tcp_kib_per_stalled".into(),
            tcp.saturating_sub(tcp0) as f64 / k,
        ),
        ("kernel_tcp_mib".into(), tcp as f64 / 1024.0),
        ("kernel_tcp_pressure_mib".into(), pressure as f64 / 1024.0),
        ("open_s".into(), open_s),
        ("settle_s".into(), settle_s),
        ("settled".into(), f64::from(u8::from(settled))),
    ];
    for ((role, rss0, _), (_, rss, peak)) in before.iter().zip(&during) {
        extra.push((format!("{role}_rss_kib"), *rss as f64));
        extra.push((format!("{role}_rss_before_kib"), *rss0 as f64));
        extra.push((
            format!("{role}_kib_per_stalled"),
            (*rss as f64 - *rss0 as f64) / k,
        ));
        extra.push((format!("{role}_peak_kib"), *peak as f64));
    }
    Ok(Sample {
        value: gbit(beside),
        extra,
        cpu_s_per_gb: None,
    })
}
