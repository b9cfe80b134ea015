//! Fairness: several bulk connections of one tunnel at once, each one's share.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::contenders::Running;
use crate::scenarios::Sample;
use crate::stall::source;

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
