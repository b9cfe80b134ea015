//! The measurements. Each function measures one contender once; the caller interleaves
//! contenders and repeats.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::contenders::{Entry, Running};
use crate::entry::Conn;
use crate::sys;
use crate::upstream::{REQUEST, RESPONSE};

/// One measurement: a value in the scenario's unit, plus the machine CPU it cost.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The headline figure (unit depends on the scenario).
    pub value: f64,
    /// Further named figures (percentiles, per-process memory...).
    pub extra: Vec<(String, f64)>,
    /// Machine CPU seconds per GB moved, where bytes moved.
    pub cpu_s_per_gb: Option<f64>,
}

async fn bulk_one(entry: &Entry, up: u64, down: u64) -> anyhow::Result<()> {
    let mut s = entry.open().await?;
    let mut header = vec![b'B'];
    header.extend_from_slice(&up.to_le_bytes());
    header.extend_from_slice(&down.to_le_bytes());
    s.write_all(&header).await?;
    let (mut rd, mut wr) = s.split();
    let write = async {
        let block = vec![0xa5u8; 64 * 1024];
        let mut left = up;
        while left > 0 {
            let n = (left as usize).min(block.len());
            wr.write_all(&block[..n]).await?;
            left -= n as u64;
        }
        Ok::<_, anyhow::Error>(())
    };
    let read = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        while got < down + 1 {
            let n = rd.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "closed after {got} of {down} bytes");
            got += n as u64;
        }
        Ok(())
    };
    tokio::try_join!(write, read)?;
    Ok(())
}

/// Bulk: `conns` connections each moving `up` bytes up and `down` down. Value: Gbit/s of
/// payload (both directions added).
pub async fn bulk(run: &Running, conns: usize, up: u64, down: u64) -> anyhow::Result<Sample> {
    let tunnel_cpu = || -> f64 {
        run.pids
            .iter()
            .flat_map(|(_, pid)| sys::family(*pid))
            .map(|p| sys::process_cpu(p).as_secs_f64())
            .sum()
    };
    let tunnel0 = tunnel_cpu();
    let cpu0 = sys::machine_busy();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let entry = run.entry.clone();
        tasks.push(tokio::spawn(
            async move { bulk_one(&entry, up, down).await },
        ));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = (up + down) as f64 * conns as f64;
    let cpu = (sys::machine_busy() - cpu0).as_secs_f64();
    let tunnel = tunnel_cpu() - tunnel0;
    Ok(Sample {
        value: bytes * 8.0 / secs / 1e9,
        extra: vec![
            ("seconds".into(), secs),
            // The contender's own processes only (zero for direct).
            ("tunnel_cpu_s_per_gb".into(), tunnel / (bytes / 1e9)),
        ],
        cpu_s_per_gb: Some(cpu / (bytes / 1e9)),
    })
}

pub(crate) async fn rr_conn(entry: &Entry) -> anyhow::Result<TcpStream> {
    let mut s = entry.open().await?;
    s.write_all(b"R").await?;
    Ok(s)
}

/// [`rr_conn`] through whatever the entry is (TLS included).
pub(crate) async fn rr_any(entry: &Entry) -> anyhow::Result<Conn> {
    let mut s = entry.connect().await?;
    s.write_all(b"R").await?;
    Ok(s)
}

pub(crate) async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> anyhow::Result<()> {
    s.write_all(&[7u8; REQUEST]).await?;
    let mut resp = [0u8; RESPONSE];
    s.read_exact(&mut resp).await?;
    Ok(())
}

/// Request latency over `conns` persistent connections at a fixed total `rate` per second for
/// `duration`. Each connection is paced by its own OS thread (tokio's timer has millisecond
/// granularity, too coarse for sub-millisecond schedules). Coordinated omission is corrected: a
/// request held back because the previous response came late is charged from its scheduled time.
/// Value: p50 in µs; extras p90/p99/p99.9.
pub async fn latency(
    run: &Running,
    conns: usize,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Sample> {
    let per_conn = (rate as f64 / conns as f64).max(1.0);
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let count = (duration.as_secs_f64() * per_conn) as u64;
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut s = rr_any(&run.entry).await?;
        round_trip(&mut s).await?; // warm
        streams.push(s.into_blocking()?);
    }
    let base = Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        tasks.push(tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let start = base + interval.mul_f64(i as f64 / conns as f64);
            let mut prev_done = Instant::now();
            let mut resp = [0u8; RESPONSE];
            for k in 0..count {
                let scheduled = start + interval.mul_f64(k as f64);
                if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let from = if prev_done > scheduled {
                    scheduled
                } else {
                    Instant::now()
                };
                s.write_all(&[7u8; REQUEST])?;
                s.read_exact(&mut resp)?;
                prev_done = Instant::now();
                hist.record((from.elapsed().as_micros() as u64).clamp(1, 60_000_000))?;
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        all.add(t.await??)?;
    }
    let q = |p: f64| all.value_at_quantile(p) as f64;
    Ok(Sample {
        value: q(0.5),
        extra: vec![
            ("p90_us".into(), q(0.9)),
            ("p99_us".into(), q(0.99)),
            ("p99.9_us".into(), q(0.999)),
            ("requests".into(), all.len() as f64),
        ],
        cpu_s_per_gb: None,
    })
}

/// Connection setup: `concurrency` workers each open a connection, do one request, close, for
/// `duration`. Value: connections per second; extras time-to-first-byte p50/p99 in µs.
pub async fn setup(
    run: &Running,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Sample> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let entry = run.entry.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            while Instant::now() < deadline {
                let t = Instant::now();
                let mut s = rr_any(&entry).await?;
                round_trip(&mut s).await?;
                hist.record((t.elapsed().as_micros() as u64).clamp(1, 60_000_000))?;
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    let started = Instant::now();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        all.add(t.await??)?;
    }
    let secs = started.elapsed().as_secs_f64().max(duration.as_secs_f64());
    Ok(Sample {
        value: all.len() as f64 / secs,
        extra: vec![
            ("ttfb_p50_us".into(), all.value_at_quantile(0.5) as f64),
            ("ttfb_p99_us".into(), all.value_at_quantile(0.99) as f64),
        ],
        cpu_s_per_gb: None,
    })
}

pub(crate) async fn read_n(s: &mut TcpStream, n: u64) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < n {
        let want = (n - got).min(buf.len() as u64) as usize;
        let k = s.read(&mut buf[..want]).await?;
        anyhow::ensure!(k > 0, "closed");
        got += k as u64;
    }
    Ok(())
}

/// Isolation: Gbit/s of one connection reading `bytes` while another connection of the same
/// tunnel has stopped reading with data pending, as a percentage of the same read alone.
pub async fn isolation(run: &Running, bytes: u64) -> anyhow::Result<Sample> {
    let source = |e: Entry| async move {
        let mut s = e.open().await?;
        s.write_all(b"S").await?;
        Ok::<_, anyhow::Error>(s)
    };
    let mut alone = source(run.entry.clone()).await?;
    let t = Instant::now();
    read_n(&mut alone, bytes).await?;
    let alone_secs = t.elapsed().as_secs_f64();
    drop(alone);
    let mut stalled = source(run.entry.clone()).await?;
    read_n(&mut stalled, 64 * 1024).await?;
    // Let the stalled connection fill every buffer on its path.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut other = source(run.entry.clone()).await?;
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(60), read_n(&mut other, bytes)).await;
    let with_secs = match res {
        Ok(r) => {
            r?;
            t.elapsed().as_secs_f64()
        }
        // Shares a window with the stalled connection: report zero throughput.
        Err(_) => f64::INFINITY,
    };
    drop(stalled);
    let gbit = |s: f64| bytes as f64 * 8.0 / s / 1e9;
    Ok(Sample {
        value: 100.0 * alone_secs / with_secs,
        extra: vec![
            ("alone_gbit".into(), gbit(alone_secs)),
            ("beside_stalled_gbit".into(), gbit(with_secs)),
        ],
        cpu_s_per_gb: None,
    })
}

/// Idle scale: hold `n` connections (each proven with one round trip); value: KiB of resident
/// memory per connection, summed over the contender's processes; extras per process and peak.
/// Spot-checks that held connections still answer.
pub async fn idle(run: &Running, n: usize) -> anyhow::Result<Sample> {
    let memory = |pids: &[(&'static str, u32)]| -> Vec<(String, u64, u64)> {
        pids.iter()
            .map(|(role, pid)| {
                let (rss, peak) = sys::family(*pid)
                    .iter()
                    .map(|p| sys::process_memory(*p))
                    .fold((0, 0), |(a, b), (r, h)| (a + r, b + h));
                ((*role).to_owned(), rss, peak)
            })
            .collect()
    };
    let before = memory(&run.pids);
    // Opened 32 at a time: some contenders set up connections slowly (ssh -R ~30/s serially).
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let batch = (n - held.len()).min(32);
        let opening: Vec<_> = (0..batch)
            .map(|_| {
                let entry = run.entry.clone();
                tokio::spawn(async move {
                    let mut s = rr_conn(&entry).await?;
                    round_trip(&mut s).await?;
                    Ok::<_, anyhow::Error>(s)
                })
            })
            .collect();
        for t in opening {
            held.push(t.await??);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = memory(&run.pids);
    for i in (0..n).step_by((n / 10).max(1)) {
        round_trip(&mut held[i]).await?;
    }
    drop(held);
    let mut extra = Vec::new();
    let mut total = 0.0;
    for ((role, rss0, _), (_, rss1, peak)) in before.iter().zip(&after) {
        let per = (*rss1 as f64 - *rss0 as f64) / n as f64;
        total += per;
        extra.push((format!("{role}_kib_per_conn"), per));
        extra.push((format!("{role}_peak_mib"), *peak as f64 / 1024.0));
    }
    Ok(Sample {
        value: total,
        extra,
        cpu_s_per_gb: None,
    })
}
