//! Command-line flags (each also an environment variable `PROXY_SERVER_<FLAG>`) and the validated
//! configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use proxy_common::telemetry::LogFormat;
use proxy_common::tls::{self, CertKeyPaths, TlsError};

/// Flags of `proxy-server`.
#[derive(Debug, Parser)]
#[command(
    name = "proxy-server",
    version,
    about = "Reverse-tunnel API-server proxy: agents dial in over gRPC/mTLS, controllers CONNECT by cluster name."
)]
pub struct Args {
    /// gRPC (HTTP/2 over mutual TLS) listener for agents.
    #[arg(long, env = "PROXY_SERVER_AGENT_ADDR", default_value = "0.0.0.0:8091")]
    pub agent_addr: SocketAddr,
    /// The server's certificate (PEM chain) on the agent listener.
    #[arg(long, env = "PROXY_SERVER_AGENT_TLS_CERT")]
    pub agent_tls_cert: PathBuf,
    /// The server's private key (PEM) on the agent listener.
    #[arg(long, env = "PROXY_SERVER_AGENT_TLS_KEY")]
    pub agent_tls_key: PathBuf,
    /// CA (PEM) that signs agent client certificates; agents without one are refused.
    #[arg(long, env = "PROXY_SERVER_AGENT_CA")]
    pub agent_ca: PathBuf,
    /// HTTP CONNECT listener for controllers (plain TCP).
    #[arg(
        long,
        env = "PROXY_SERVER_FRONTEND_ADDR",
        default_value = "127.0.0.1:8090"
    )]
    pub frontend_addr: SocketAddr,
    /// Admin listener: /healthz, /readyz.
    #[arg(
        long,
        env = "PROXY_SERVER_ADMIN_ADDR",
        default_value = "127.0.0.1:8095"
    )]
    pub admin_addr: SocketAddr,
    /// How long a CONNECT waits for the agent to reach its upstream before answering 504.
    #[arg(long, env = "PROXY_SERVER_DIAL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,
    /// How long a CONNECT waits for an agent of a cluster that was connected moments ago (an
    /// agent reconnecting) before answering 503. Clusters never seen answer 503 at once.
    #[arg(long, env = "PROXY_SERVER_AGENT_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub agent_wait: Duration,
    /// Interval of HTTP/2 keepalive pings to agents.
    #[arg(long, env = "PROXY_SERVER_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,
    /// An agent that does not answer a keepalive ping within this time is dropped with every
    /// connection it carried.
    #[arg(long, env = "PROXY_SERVER_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,
    /// Optional suffix stripped from the CONNECT host to get the cluster name
    /// (e.g. `.clusters.local` lets `alpha.clusters.local:443` reach cluster `alpha`).
    #[arg(long, env = "PROXY_SERVER_CLUSTER_SUFFIX")]
    pub cluster_suffix: Option<String>,
    /// This server's id, sent to agents (default: host name and a random suffix).
    #[arg(long, env = "PROXY_SERVER_SERVER_ID")]
    pub server_id: Option<String>,
    /// Log format.
    #[arg(long, env = "PROXY_SERVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Why the flags do not make a usable configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// TLS material could not be loaded.
    #[error("agent listener TLS: {0}")]
    AgentTls(#[from] TlsError),
    /// A flag value is out of range.
    #[error("--{flag}: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// Why.
        reason: String,
    },
}

/// The validated configuration `run` works from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen for agents.
    pub agent_addr: SocketAddr,
    /// Where to listen for CONNECT clients.
    pub frontend_addr: SocketAddr,
    /// Where to listen for admin requests.
    pub admin_addr: SocketAddr,
    /// TLS of the agent listener (mutual: agents must present a certificate).
    pub agent_tls: Arc<rustls::ServerConfig>,
    /// See [`Args::dial_timeout`].
    pub dial_timeout: Duration,
    /// See [`Args::agent_wait`].
    pub agent_wait: Duration,
    /// See [`Args::keepalive_interval`].
    pub keepalive_interval: Duration,
    /// See [`Args::keepalive_timeout`].
    pub keepalive_timeout: Duration,
    /// See [`Args::cluster_suffix`].
    pub cluster_suffix: Option<String>,
    /// This server's id.
    pub server_id: String,
}

fn positive(flag: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::Invalid {
            flag,
            reason: "must be greater than zero".into(),
        });
    }
    Ok(d)
}

impl Config {
    /// Checks the flags and loads the TLS material.
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let agent_tls = tls::mtls_server_config(
            &CertKeyPaths {
                cert: args.agent_tls_cert.clone(),
                key: args.agent_tls_key.clone(),
            },
            &args.agent_ca,
        )?;
        let cluster_suffix = match args.cluster_suffix.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.to_ascii_lowercase()),
        };
        Ok(Self {
            agent_addr: args.agent_addr,
            frontend_addr: args.frontend_addr,
            admin_addr: args.admin_addr,
            agent_tls: Arc::new(agent_tls),
            dial_timeout: positive("dial-timeout", args.dial_timeout)?,
            agent_wait: args.agent_wait,
            keepalive_interval: positive("keepalive-interval", args.keepalive_interval)?,
            keepalive_timeout: positive("keepalive-timeout", args.keepalive_timeout)?,
            cluster_suffix,
            server_id: args
                .server_id
                .clone()
                .unwrap_or_else(|| proxy_common::default_instance_id("proxy-server")),
        })
    }
}
