//! Many real agents in this process: the agent's own session code, each with its own
//! certificate, TLS connection and cluster name, without a process per agent. For tests and
//! benchmarks that need a fleet of thousands of clusters (the status page, agent scale).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use clap::Parser;
use proxy_agent::session::{self, Lifecycle};
use proxy_agent::{Args as AgentArgs, Config, Shared};
use proxy_certs::DevPki;
use tokio_util::sync::CancellationToken;

/// Starts one agent in this process with the identity `cert`/`key` (its cluster is the
/// certificate's), trusting `server_ca`, tunnelling to `server` and dialing `upstream`. It runs
/// until the returned lifecycle is cancelled (see [`stop`]).
pub fn spawn_agent(
    cert: &Path,
    key: &Path,
    server_ca: &Path,
    server: &str,
    upstream: &str,
    agent_id: &str,
) -> anyhow::Result<Lifecycle> {
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
        server_ca.as_os_str(),
        "--upstream".as_ref(),
        upstream.as_ref(),
        "--agent-id".as_ref(),
        agent_id.as_ref(),
    ] as [&std::ffi::OsStr; 15])?;
    let config = Config::from_args(&args)?;
    let target = config.servers[0].clone();
    // Each agent's metrics are its own and unread: the server's are what these runs look at.
    let metrics =
        proxy_agent::metrics::Metrics::new(&mut prometheus_client::registry::Registry::default());
    let shared = Arc::new(Shared::new(config, metrics));
    let life = Lifecycle {
        drain: CancellationToken::new(),
        close: CancellationToken::new(),
    };
    tokio::spawn(session::maintain(target, shared, life.clone()));
    Ok(life)
}

/// Stops an agent started by [`spawn_agent`]: it leaves its server at once.
pub fn stop(life: &Lifecycle) {
    life.drain.cancel();
    life.close.cancel();
}

/// The agents of `clusters` (identities from `pki`), one each, tunnelling to `server`; stopped
/// when dropped.
#[derive(Debug)]
pub struct Swarm {
    agents: Vec<(String, Lifecycle)>,
}

impl Swarm {
    /// Starts the agents; they register in the background.
    pub fn start(
        pki: &DevPki,
        clusters: &[String],
        server: SocketAddr,
        upstream: SocketAddr,
    ) -> anyhow::Result<Self> {
        let (server, upstream) = (server.to_string(), upstream.to_string());
        let agents = clusters
            .iter()
            .map(|c| {
                let life = spawn_agent(
                    &pki.agent_cert(c),
                    &pki.agent_key(c),
                    &pki.server_ca(),
                    &server,
                    &upstream,
                    &format!("{c}-agent"),
                )?;
                Ok((c.clone(), life))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { agents })
    }

    /// Stops the agent of `cluster`.
    pub fn stop(&self, cluster: &str) {
        for (c, life) in &self.agents {
            if c == cluster {
                stop(life);
            }
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for (_, life) in &self.agents {
            stop(life);
        }
    }
}
