//! The agent swarm: thousands of real proxy-agents (the agent's own session code, each with its
//! own certificate, TLS connection and cluster name) in one process, for the agent-scale
//! scenario. It runs as a child of the harness so its descriptors and CPU are its own.

use std::path::Path;

/// Cluster name of swarm agent `i`.
pub fn cluster(i: usize) -> String {
    format!("swarm-{i:05}")
}

/// Certificate and key file of swarm agent `i` in `dir`.
pub fn identity(dir: &Path, i: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        dir.join(format!("{}.pem", cluster(i))),
        dir.join(format!("{}-key.pem", cluster(i))),
    )
}

/// Runs `count` agents against `server` until the process is killed. Identities are in `dir`
/// (see [`identity`]), the server's CA is `dir/server-ca.pem`.
pub async fn run(dir: &Path, count: usize, server: &str, upstream: &str) -> anyhow::Result<()> {
    let ca = dir.join("server-ca.pem");
    // Kept: dropping a lifecycle does not stop its agent, but holding them says they live on.
    let mut agents = Vec::with_capacity(count);
    for i in 0..count {
        let (cert, key) = identity(dir, i);
        let id = format!("swarm-agent-{i}");
        agents.push(integration_tests::swarm::spawn_agent(
            &cert, &key, &ca, server, upstream, &id,
        )?);
    }
    println!("swarm started {count}");
    std::future::pending::<()>().await;
    Ok(())
}
