//! The agent swarm: thousands of real proxy-agents (the agent's own session code, each with its
//! own certificate, TLS connection and cluster name) in one process, for the agent-scale
//! scenario. It runs as a child of the harness so its descriptors and CPU are its own.

use std::path::Path;
use std::sync::Arc;

use clap::Parser;
use proxy_agent::session::{self, Lifecycle};
use proxy_agent::{Args as AgentArgs, Config, Shared};
use tokio_util::sync::CancellationToken;

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
/// (see [`identity`]), the server's CA is `dir/proxy-ca.pem`.
pub async fn run(dir: &Path, count: usize, server: &str, upstream: &str) -> anyhow::Result<()> {
    let life = Lifecycle {
        drain: CancellationToken::new(),
        close: CancellationToken::new(),
    };
    let ca = dir.join("proxy-ca.pem");
    for i in 0..count {
        let (cert, key) = identity(dir, i);
        let args = AgentArgs::try_parse_from([
            "proxy-agent".as_ref(),
            "--server".as_ref(),
            server.as_ref(),
            "--server-name".as_ref(),
            "localhost".as_ref(),
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
            "--server-ca".as_ref(),
            ca.as_os_str(),
            "--upstream".as_ref(),
            upstream.as_ref(),
            "--agent-id".as_ref(),
            format!("swarm-agent-{i}").as_ref(),
        ] as [&std::ffi::OsStr; 15])?;
        let config = Config::from_args(&args)?;
        let target = config.servers[0].clone();
        let metrics = proxy_agent::metrics::Metrics::new(
            &mut prometheus_client::registry::Registry::default(),
        );
        let shared = Arc::new(Shared::new(config, metrics));
        tokio::spawn(session::maintain(target, shared, life.clone()));
    }
    println!("swarm started {count}");
    std::future::pending::<()>().await;
    Ok(())
}
