//! Flow-control scenarios: one healthy connection beside many stalled readers of the same
//! tunnel, and several bulk connections sharing one tunnel fairly.

use std::sync::Arc;
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
/// Receive buffer of a stalled client (see `upstream::TRACKED_SEND_BUFFER` for why small).
const STALL_RECV_BUFFER: u32 = 64 * 1024;
/// Longest wait for the stalled connections' upstream writes to settle.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);
/// Longest the healthy download may take beside the stall (a frozen tunnel counts as zero).
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// Tags this process's tracked sources, so each run counts only its own.
static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

/// Opens a connection on which the upstream writes until the client goes away.
async fn source(entry: &Entry) -> anyhow::Result<TcpStream> {
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

/// Stalled readers: `n` connections whose upstream writes without end and whose clients read
/// 64 KiB, then nothing. Once the upstream's writes to them have settled, one more connection
/// reads `bytes`. Value: that download's Gbit/s; extras: the same download alone (before the
/// stall, same processes), its percentage, time to `200` and to the first response byte of
/// `connects` new connections during the stall, resident memory of each process with the stall
/// in place, and the bytes pending (written by the upstream, not read by the client) per
/// stalled connection.
pub async fn stalled_readers(
    run: &Running,
    n: usize,
    bytes: u64,
    connects: usize,
) -> anyhow::Result<Sample> {
    download(&run.entry, bytes.min(16 << 20)).await?; // warm-up
    let alone = download(&run.entry, bytes).await?;
    let before = memory(run);

    let tag = NEXT_TAG.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 32);
    let mut stalled = Vec::with_capacity(n);
    let opening = Instant::now();
    while stalled.len() < n {
        let batch: Vec<_> = (0..(n - stalled.len()).min(32))
            .map(|_| {
                let entry = run.entry.clone();
                tokio::spawn(async move {
                    let mut s = entry.open_with(Some(STALL_RECV_BUFFER)).await?;
                    s.write_all(b"T").await?;
                    s.write_all(&tag.to_le_bytes()).await?;
                    read_n(&mut s, STALL_READ).await?;
                    Ok::<_, anyhow::Error>(s)
                })
            })
            .collect();
        for t in batch {
            stalled.push(t.await??);
        }
        // Past the kernel's TCP memory pressure threshold every socket on the machine (others'
        // too) is squeezed: stop, and say so, rather than measure that.
        let (used, pressure) = sys::tcp_memory();
        anyhow::ensure!(
            used < pressure * 9 / 10,
            "kernel TCP memory {} MiB, near its pressure threshold {} MiB, at {} of {n} stalled \
             connections: stopped",
            used / 1024,
            pressure / 1024,
            stalled.len()
        );
    }
    let open_s = opening.elapsed().as_secs_f64();

    // Settled: every connection counted, and the total grew by under 0.1 % in 500 ms.
    let settling = Instant::now();
    let mut last = tracked(run, tag).await?;
    let settled = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = tracked(run, tag).await?;
        let done = now[0] == n as u64 && now[1].saturating_sub(last[1]) <= now[1] / 1000;
        last = now;
        if done {
            break true;
        }
        if settling.elapsed() > SETTLE_WITHIN {
            break false;
        }
    };
    let settle_s = settling.elapsed().as_secs_f64();
    let [count, sum, min, max] = last;
    anyhow::ensure!(count == n as u64, "upstream sees {count} of {n} stalled");
    let during = memory(run);
    let kernel_tcp = sys::tcp_memory().0;

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
    // Still stalled at the end: the upstream has not been able to write much more.
    let end = tracked(run, tag).await?;
    drop(stalled);

    let gbit = |s: f64| bytes as f64 * 8.0 / s / 1e9;
    let kib = |b: u64| b.saturating_sub(STALL_READ) as f64 / 1024.0;
    let mut extra = vec![
        ("alone_gbit".into(), gbit(alone)),
        ("pct_of_alone".into(), 100.0 * alone / beside),
        (
            "connect_p50_us".into(),
            to_200.value_at_quantile(0.5) as f64,
        ),
        (
            "connect_p99_us".into(),
            to_200.value_at_quantile(0.99) as f64,
        ),
        ("ttfb_p50_us".into(), ttfb.value_at_quantile(0.5) as f64),
        ("ttfb_p99_us".into(), ttfb.value_at_quantile(0.99) as f64),
        ("pending_mean_kib".into(), kib(sum / count.max(1))),
        ("pending_min_kib".into(), kib(min)),
        ("pending_max_kib".into(), kib(max)),
        (
            "pending_growth_during_run_kib".into(),
            end[1].saturating_sub(sum) as f64 / 1024.0 / count.max(1) as f64,
        ),
        ("kernel_tcp_mib".into(), kernel_tcp as f64 / 1024.0),
        ("open_s".into(), open_s),
        ("settle_s".into(), settle_s),
        ("settled".into(), f64::from(u8::from(settled))),
    ];
    for ((role, rss0, _), (_, rss, peak)) in before.iter().zip(&during) {
        extra.push((format!("{role}_rss_kib"), *rss as f64));
        extra.push((format!("{role}_rss_before_kib"), *rss0 as f64));
        extra.push((format!("{role}_peak_kib"), *peak as f64));
    }
    Ok(Sample {
        value: gbit(beside),
        extra,
        cpu_s_per_gb: None,
    })
}

/// Fairness: `conns` connections download at once, each from its own endless source; after
/// `warmup`, each one's bytes over `measure` give its Gbit/s. Value: the largest deviation of
/// one connection from the mean, in % of the mean; extras: each connection, the mean, the total
/// and the slowest as % of the mean.
pub async fn fairness(
    run: &Running,
    conns: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Sample> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(source(&run.entry).await?);
    }
    let counters: Vec<Arc<AtomicU64>> = (0..conns).map(|_| Arc::default()).collect();
    let readers: Vec<_> = streams
        .into_iter()
        .zip(&counters)
        .map(|(mut s, got)| {
            let got = got.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(k @ 1..) = s.read(&mut buf).await {
                    got.fetch_add(k as u64, Ordering::Relaxed);
                }
                Err::<(), _>(anyhow::anyhow!("closed"))
            })
        })
        .collect();
    let snapshot = || -> Vec<u64> { counters.iter().map(|c| c.load(Ordering::Relaxed)).collect() };
    tokio::time::sleep(warmup).await;
    let (t0, from) = (Instant::now(), snapshot());
    tokio::time::sleep(measure).await;
    let (secs, to) = (t0.elapsed().as_secs_f64(), snapshot());
    for r in &readers {
        r.abort();
    }
    for r in readers {
        if let Ok(Err(e)) = r.await {
            return Err(e.context("a fairness connection failed"));
        }
    }
    let rates: Vec<f64> = from
        .iter()
        .zip(&to)
        .map(|(a, b)| (b - a) as f64 * 8.0 / secs / 1e9)
        .collect();
    let mean = rates.iter().sum::<f64>() / conns as f64;
    anyhow::ensure!(mean > 0.0, "nothing moved");
    let worst = rates
        .iter()
        .map(|r| (r - mean).abs() / mean * 100.0)
        .fold(0.0, f64::max);
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let mut extra: Vec<(String, f64)> = rates
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("conn{i}_gbit"), *r))
        .collect();
    extra.push(("mean_gbit".into(), mean));
    extra.push(("total_gbit".into(), mean * conns as f64));
    extra.push(("min_pct_of_mean".into(), 100.0 * slowest / mean));
    Ok(Sample {
        value: worst,
        extra,
        cpu_s_per_gb: None,
    })
}
