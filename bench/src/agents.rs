//! Agent scale: one proxy-server with thousands of agents (real TLS connections, each its own
//! cluster and certificate, run by the swarm child process). Measures the server's memory per
//! agent, its idle CPU from keepalives, CONNECT time to random clusters, and how long all agents
//! take to re-register after the server is killed and started again on the same ports.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Child;

use crate::contenders::{Entry, ServerFiles, free_port, start_server};
use crate::scenarios::{Sample, round_trip, rr_conn};
use crate::swarm;
use crate::sys;

/// Longest wait for all agents to register.
const REGISTER_WITHIN: Duration = Duration::from_secs(120);

/// The server's `/metrics` page (with the response head).
async fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(admin).await?;
    // The admin listener answers only for an IP address, localhost or a name it was given.
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

/// Agents the server's admin endpoint reports as connected (sum of `proxy_server_agents`).
async fn agents_connected(admin: SocketAddr) -> anyhow::Result<u64> {
    Ok(scrape(admin)
        .await?
        .lines()
        .filter(|l| l.starts_with("proxy_server_agents{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// Polls until every server in `admins` reports exactly `n` agents connected; returns how long
/// that took.
pub async fn wait_for_agents(admins: &[SocketAddr], n: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < REGISTER_WITHIN {
        last.clear();
        for admin in admins {
            // A server may still be starting after a restart.
            last.push(agents_connected(*admin).await.unwrap_or(0));
        }
        if last.iter().all(|&c| c == n) {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("agents registered per server {last:?}, not {n} each, within {REGISTER_WITHIN:?}")
}

/// Writes the CA, the server identity and `n` agent identities into `dir`.
pub fn write_pki(dir: &Path, n: usize) -> anyhow::Result<ServerFiles> {
    use proxy_certs::{Ca, SERVER_NAMES, Usage};
    let ca = Ca::new("proxy-bench agent CA")?;
    let files = ServerFiles {
        ca: dir.join("proxy-ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    std::fs::write(&files.ca, ca.cert_pem())?;
    // The server's certificate comes from a CA of its own, as the server requires.
    let server_ca = Ca::new("proxy-bench server CA")?;
    std::fs::write(dir.join("server-ca.pem"), server_ca.cert_pem())?;
    let server = server_ca.issue("proxy-server", SERVER_NAMES, Usage::Server)?;
    std::fs::write(&files.cert, &server.cert_pem)?;
    std::fs::write(&files.key, &server.key_pem)?;
    for i in 0..n {
        let issued = ca.issue(&swarm::cluster(i), &[], Usage::Client)?;
        let (cert, key) = swarm::identity(dir, i);
        std::fs::write(cert, &issued.cert_pem)?;
        std::fs::write(key, &issued.key_pem)?;
    }
    Ok(files)
}

/// Fixed loopback addresses (agent, frontend, admin) for a server, so a restarted one is where
/// the agents and the harness look for it.
pub fn fixed_addrs() -> anyhow::Result<[String; 3]> {
    Ok([free_port()?, free_port()?, free_port()?].map(|p| format!("127.0.0.1:{p}")))
}

/// Starts the swarm child process: `n` agents (identities in `dir`, see [`write_pki`]) dialing
/// `server`; returns once they are all started.
pub async fn spawn_swarm(
    dir: &Path,
    n: usize,
    server: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<Child> {
    let mut swarm = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--agent-swarm".as_ref(), dir.as_os_str()])
        .args(["--swarm-count", &n.to_string()])
        .args(["--swarm-server", &server.to_string()])
        .args(["--swarm-upstream", &upstream.to_string()])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    BufReader::new(swarm.stdout.take().context("swarm stdout")?)
        .read_line(&mut line)
        .await?;
    anyhow::ensure!(line.starts_with("swarm started"), "swarm: {line:?}");
    Ok(swarm)
}

/// One run with `n` agents; `idle` is how long idle CPU is sampled, `connects` how many CONNECTs
/// go to random clusters. Value: server memory per agent in KiB.
pub async fn agent_scale(
    bin_dir: &Path,
    upstream: SocketAddr,
    n: usize,
    idle: Duration,
    connects: usize,
) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir()?;
    let files = write_pki(dir.path(), n)?;
    // Fixed ports so the restarted server is where the agents look for it.
    let ports = fixed_addrs()?;
    let ports = [ports[0].as_str(), ports[1].as_str(), ports[2].as_str()];
    let (mut server, addrs) = start_server(bin_dir, &files, ports, &[]).await?;
    // Settle, then the baseline of an empty server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_empty, _) = sys::process_memory(server.id().context("server pid")?);

    let mut swarm = spawn_swarm(dir.path(), n, addrs.agent, upstream).await?;
    let first_registration = wait_for_agents(&[addrs.admin], n as u64).await?;

    // Let allocations settle (registration bursts leave freed buffers), then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server_pid = server.id().context("server pid")?;
    let swarm_pid = swarm.id().context("swarm pid")?;
    let (rss_full, _) = sys::process_memory(server_pid);
    let per_agent_kib = rss_full.saturating_sub(rss_empty) as f64 / n as f64;

    // Idle: only keepalives flow.
    let (server_cpu, swarm_cpu) = (sys::process_cpu(server_pid), sys::process_cpu(swarm_pid));
    tokio::time::sleep(idle).await;
    let secs = idle.as_secs_f64();
    let server_idle = (sys::process_cpu(server_pid) - server_cpu).as_secs_f64() / secs;
    let swarm_idle = (sys::process_cpu(swarm_pid) - swarm_cpu).as_secs_f64() / secs;

    // A CONNECT to a random cluster among thousands, and one request through it.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..connects {
        // xorshift: spread over the clusters without a dependency.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let entry = Entry::Connect {
            proxy: addrs.frontend,
            cluster: swarm::cluster((x % n as u64) as usize),
        };
        let t = Instant::now();
        let mut s = rr_conn(&entry).await?;
        round_trip(&mut s).await?;
        hist.record((t.elapsed().as_micros() as u64).clamp(1, 60_000_000))?;
    }

    // Every cluster dialed once, so each has all its per-cluster series: what Prometheus
    // scrapes from a server with this many clusters at most.
    for i in 0..n {
        let entry = Entry::Connect {
            proxy: addrs.frontend,
            cluster: swarm::cluster(i),
        };
        let mut s = rr_conn(&entry).await?;
        round_trip(&mut s).await?;
    }
    let page = scrape(addrs.admin).await?;
    let body = page
        .split_once("\r\n\r\n")
        .map_or(page.as_str(), |(_, b)| b);
    let series = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();

    // Restart: kill the server (a crash, no drain) and start a new one on the same ports.
    server.kill().await?;
    let (_server, addrs) = start_server(bin_dir, &files, ports, &[]).await?;
    let reregistration = wait_for_agents(&[addrs.admin], n as u64).await?;
    let _ = swarm.kill().await;

    Ok(Sample {
        value: per_agent_kib,
        extra: vec![
            ("agents".into(), n as f64),
            (
                "first_registration_s".into(),
                first_registration.as_secs_f64(),
            ),
            ("reregistration_s".into(), reregistration.as_secs_f64()),
            ("metric_series".into(), series as f64),
            ("metric_series_per_cluster".into(), series as f64 / n as f64),
            ("metrics_page_kib".into(), body.len() as f64 / 1024.0),
            ("server_idle_cpu_pct".into(), server_idle * 100.0),
            ("agents_idle_cpu_pct".into(), swarm_idle * 100.0),
            (
                "connect_random_p50_us".into(),
                hist.value_at_quantile(0.5) as f64,
            ),
            (
                "connect_random_p99_us".into(),
                hist.value_at_quantile(0.99) as f64,
            ),
        ],
        cpu_s_per_gb: None,
    })
}
