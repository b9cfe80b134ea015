//! `proxy-server token create|list|revoke`: join tokens in the file a running server reads
//! (`--join-tokens`), changed under its lock (see [`super::tokens`]).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::tokens::TokenFile;

/// `proxy-server token …`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a join token for one cluster. Prints the token (shown only now), the pin of the
    /// agent listener's CA and the `proxy-agent` command that joins with them.
    Create {
        /// The server's --join-tokens file (created if missing).
        #[arg(long, env = "PROXY_SERVER_JOIN_TOKENS")]
        tokens_file: PathBuf,
        /// The cluster an agent joining with it becomes.
        #[arg(long)]
        cluster: String,
        /// How long the token may be used.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many agents may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The server's --agent-tls-ca, whose pin agents check.
        #[arg(long, env = "PROXY_SERVER_AGENT_TLS_CA")]
        agent_tls_ca: PathBuf,
        /// The agent address of the server as agents reach it (HOST:PORT), for the printed
        /// command.
        #[arg(long, default_value = "proxy-server:8091")]
        server: String,
    },
    /// List the tokens: id, cluster, expiry, uses left, state. Never the secrets.
    List {
        /// The server's --join-tokens file.
        #[arg(long, env = "PROXY_SERVER_JOIN_TOKENS")]
        tokens_file: PathBuf,
    },
    /// Revoke a token by its id (the part before the dot): agents can no longer join with it.
    Revoke {
        /// The server's --join-tokens file.
        #[arg(long, env = "PROXY_SERVER_JOIN_TOKENS")]
        tokens_file: PathBuf,
        /// The token's id.
        id: String,
    },
}

/// Longest --ttl of a token: kubeadm's tokens default to a day; a week covers a slow rollout.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Runs a `token` subcommand, printing to standard output.
pub fn run(command: &TokenCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        TokenCommand::Create {
            tokens_file,
            cluster,
            ttl,
            uses,
            agent_tls_ca,
            server,
        } => {
            anyhow::ensure!(
                proxy_common::is_valid_cluster_name(cluster),
                "--cluster {cluster:?}: not a valid cluster name (lower-case letters, digits, '-', '.')"
            );
            anyhow::ensure!(
                !ttl.is_zero() && *ttl <= MAX_TOKEN_TTL,
                "--ttl: must be more than 0 and at most 30 days"
            );
            anyhow::ensure!(*uses >= 1, "--uses: must be at least 1");
            let pin = proxy_common::tls::spki_pin_of_file(agent_tls_ca).map_err(|e| {
                anyhow::anyhow!("--agent-tls-ca: {}", proxy_common::error::chain(&e))
            })?;
            let (token, entry) =
                TokenFile::new(tokens_file).create(cluster, *ttl, *uses, SystemTime::now())?;
            writeln!(out, "token: {token}")?;
            writeln!(out, "server-ca-hash: {pin}")?;
            writeln!(
                out,
                "cluster: {cluster} ({uses} use{}, until {})",
                if *uses == 1 { "" } else { "s" },
                entry.expires
            )?;
            writeln!(
                out,
                "join: proxy-agent --server {server} --join-token {token} --server-ca-hash {pin} --state-dir /var/lib/proxy-agent"
            )?;
        }
        TokenCommand::List { tokens_file } => {
            let now = SystemTime::now();
            writeln!(
                out,
                "ID      CLUSTER                          EXPIRES               USES LEFT  STATE"
            )?;
            for e in TokenFile::new(tokens_file).read()? {
                let expired = humantime::parse_rfc3339(&e.expires).is_ok_and(|t| t <= now);
                let state = match (e.revoked, expired, e.uses_left) {
                    (true, _, _) => "revoked",
                    (_, true, _) => "expired",
                    (_, _, 0) => "used up",
                    _ => "valid",
                };
                writeln!(
                    out,
                    "{:<7} {:<32} {:<21} {:<10} {state}",
                    e.id, e.cluster, e.expires, e.uses_left
                )?;
            }
        }
        TokenCommand::Revoke { tokens_file, id } => {
            anyhow::ensure!(
                TokenFile::new(tokens_file).revoke(id)?,
                "no token with id {id:?} in {}",
                tokens_file.display()
            );
            writeln!(out, "revoked {id}")?;
        }
    }
    Ok(())
}
