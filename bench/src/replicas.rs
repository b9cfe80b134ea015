//! Agent scale with server replicas: three proxy-servers (`--server-count 3`) behind one
//! load-balanced address ([`crate::balancer`]), the swarm's agents given only that address. Each
//! agent keeps dialing it until it holds a tunnel to every replica. Measures how long until
//! every replica has every agent, each replica's memory per agent, and, after one replica is
//! killed (-9, a crash) and started again on the same ports under a new server id, how long
//! until every replica has every agent again.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Child;

use crate::agents::{fixed_addrs, spawn_swarm, wait_for_agents, write_pki};
use crate::contenders::{ServerAddrs, ServerFiles, start_server};
use crate::scenarios::Sample;
use crate::{balancer, sys};

/// Server replicas in the fleet.
pub const REPLICAS: usize = 3;

/// Starts the fleet's replica `id` on its fixed `ports` (agent, frontend, admin).
async fn start_replica(
    bin_dir: &Path,
    files: &ServerFiles,
    ports: &[String; 3],
    id: &str,
) -> anyhow::Result<(Child, ServerAddrs)> {
    let count = REPLICAS.to_string();
    start_server(
        bin_dir,
        files,
        [ports[0].as_str(), ports[1].as_str(), ports[2].as_str()],
        // A short warm-up: it only holds back /readyz and CONNECTs, and none are sent here.
        &[
            "--server-count",
            &count,
            "--warmup",
            "1s",
            "--server-id",
            id,
        ],
    )
    .await
}

/// One run with `n` agents and [`REPLICAS`] servers. Value: server memory per agent in KiB, per
/// replica (the mean over the replicas).
pub async fn agent_scale(bin_dir: &Path, upstream: SocketAddr, n: usize) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir()?;
    let files = write_pki(dir.path(), n)?;
    // Fixed ports per replica, so the restarted one is where the balancer sends agents.
    let ports = (0..REPLICAS)
        .map(|_| fixed_addrs())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut servers = Vec::new();
    let (mut admins, mut backends) = (Vec::new(), Vec::new());
    for (i, p) in ports.iter().enumerate() {
        let (server, addrs) = start_replica(bin_dir, &files, p, &format!("replica-{i}")).await?;
        servers.push(server);
        admins.push(addrs.admin);
        backends.push(addrs.agent);
    }
    let balancer = balancer::start(backends).await?;
    // Settle, then the baseline of empty servers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pids = servers
        .iter()
        .map(|s| s.id().context("replica pid"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let empty: Vec<u64> = pids.iter().map(|&p| sys::process_memory(p).0).collect();

    let mut swarm = spawn_swarm(dir.path(), n, balancer.addr, upstream).await?;
    let full_mesh = wait_for_agents(&admins, n as u64).await?;

    // Let allocations settle (registration bursts leave freed buffers), then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_agent_kib: Vec<f64> = pids
        .iter()
        .zip(&empty)
        .map(|(&pid, &rss_empty)| {
            sys::process_memory(pid).0.saturating_sub(rss_empty) as f64 / n as f64
        })
        .collect();
    let mean_kib = per_agent_kib.iter().sum::<f64>() / REPLICAS as f64;
    let max_kib = per_agent_kib.iter().copied().fold(0.0, f64::max);

    // Crash one replica and start it again on the same ports; its id is new, as a new pod's
    // would be. Timed from when it listens again, like the single-server reregistration.
    servers[0].kill().await?;
    let (restarted, _) = start_replica(bin_dir, &files, &ports[0], "replica-0-restarted").await?;
    servers[0] = restarted;
    let after_restart = wait_for_agents(&admins, n as u64).await?;
    let _ = swarm.kill().await;

    Ok(Sample {
        value: mean_kib,
        extra: vec![
            ("agents".into(), n as f64),
            ("full_mesh_s".into(), full_mesh.as_secs_f64()),
            ("after_restart_s".into(), after_restart.as_secs_f64()),
            ("max_replica_kib_per_agent".into(), max_kib),
        ],
        cpu_s_per_gb: None,
    })
}
