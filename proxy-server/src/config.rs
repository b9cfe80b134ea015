//! Command-line flags (each also an environment variable `PROXY_SERVER_<FLAG>`) and the validated
//! configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use proxy_common::reload::Reloadable;
use proxy_common::telemetry::LogFormat;
use proxy_common::tls::{self, CertKeyPaths, TlsError};

use crate::auth::{Policy, PolicyError};

/// Flags of `proxy-server`.
#[derive(Debug, Parser)]
#[command(
    name = "proxy-server",
    version,
    about = "Reverse-tunnel API-server proxy: agents dial in over gRPC/mTLS, controllers CONNECT by cluster name.",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// Without a subcommand the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// gRPC (HTTP/2 over mutual TLS) listener for agents.
    #[arg(long, env = "PROXY_SERVER_AGENT_ADDR", default_value = "0.0.0.0:8091")]
    pub agent_addr: SocketAddr,
    /// The server's certificate (PEM chain) on the agent listener. Reloaded when it changes.
    #[arg(long, env = "PROXY_SERVER_AGENT_TLS_CERT", required = true)]
    pub agent_tls_cert: Option<PathBuf>,
    /// The server's private key (PEM) on the agent listener. Reloaded when it changes.
    #[arg(long, env = "PROXY_SERVER_AGENT_TLS_KEY", required = true)]
    pub agent_tls_key: Option<PathBuf>,
    /// CA (PEM) that signs agent client certificates; agents without one are refused.
    #[arg(long, env = "PROXY_SERVER_AGENT_CA", required = true)]
    pub agent_ca: Option<PathBuf>,
    /// HTTP CONNECT listener for controllers.
    #[arg(
        long,
        env = "PROXY_SERVER_FRONTEND_ADDR",
        default_value = "127.0.0.1:8090"
    )]
    pub frontend_addr: SocketAddr,
    /// Serve the CONNECT listener over TLS with this certificate (PEM chain): an https:// proxy-url.
    #[arg(
        long,
        env = "PROXY_SERVER_FRONTEND_TLS_CERT",
        requires = "frontend_tls_key"
    )]
    pub frontend_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --frontend-tls-cert.
    #[arg(
        long,
        env = "PROXY_SERVER_FRONTEND_TLS_KEY",
        requires = "frontend_tls_cert"
    )]
    pub frontend_tls_key: Option<PathBuf>,
    /// Accept frontend client certificates signed by this CA (PEM); the identity is the Subject
    /// CN. Without --frontend-auth-file a valid client certificate is then required.
    #[arg(long, env = "PROXY_SERVER_FRONTEND_CA", requires = "frontend_tls_cert")]
    pub frontend_ca: Option<PathBuf>,
    /// YAML policy: which identities (token or certificate CN) may reach which clusters.
    /// Re-read when it changes and on SIGHUP.
    #[arg(long, env = "PROXY_SERVER_FRONTEND_AUTH_FILE")]
    pub frontend_auth_file: Option<PathBuf>,
    /// Allow a frontend on a non-loopback address with no authentication at all.
    #[arg(long, env = "PROXY_SERVER_FRONTEND_ALLOW_UNAUTHENTICATED")]
    pub frontend_allow_unauthenticated: bool,
    /// Admin listener for the platform: /healthz, /livez, /readyz, /metrics only. May listen
    /// on the pod IP for probes and Prometheus.
    #[arg(
        long,
        env = "PROXY_SERVER_ADMIN_ADDR",
        default_value = "127.0.0.1:8095"
    )]
    pub admin_addr: SocketAddr,
    /// Operator listener: the status page, /api/v1/clusters and kubeconfigs (the fleet map).
    /// Loopback by default (reach it with `kubectl port-forward`); on any other address it
    /// requires the token of a client with `operator: true` in --frontend-auth-file.
    #[arg(
        long,
        env = "PROXY_SERVER_OPERATOR_ADDR",
        default_value = "127.0.0.1:8096"
    )]
    pub operator_addr: SocketAddr,
    /// Host names the admin and operator listeners answer for, besides IP addresses and
    /// `localhost` (comma-separated). Requests naming any other Host get 421, so a web page
    /// cannot reach them through DNS rebinding.
    #[arg(long, env = "PROXY_SERVER_ADMIN_HOSTS", value_delimiter = ',')]
    pub admin_hosts: Vec<String>,
    /// How long a CONNECT waits for the agent to reach its upstream before answering 504.
    #[arg(long, env = "PROXY_SERVER_DIAL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,
    /// How long a CONNECT waits for an agent of a cluster that was connected moments ago (an
    /// agent reconnecting) before answering 503. Clusters never seen answer 503 at once.
    #[arg(long, env = "PROXY_SERVER_AGENT_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub agent_wait: Duration,
    /// Interval of keepalive pings to agents (HTTP/2 pings, and control-stream pings: an agent
    /// that owes a pong and sends nothing at all for a second is taken out of routing until it
    /// answers; a busy one whose pong waits behind its data is not).
    #[arg(long, env = "PROXY_SERVER_KEEPALIVE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,
    /// An agent that owes a keepalive ping's answer and sends nothing at all for this long is
    /// dropped with every connection it carried.
    #[arg(long, env = "PROXY_SERVER_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,
    /// Time a client or agent has from its connection being accepted to finish its TLS
    /// handshake and, for a client, to send its complete CONNECT head (one deadline for both;
    /// a client that is too slow gets 408). An agent then has as long again for its HTTP/2
    /// preface.
    #[arg(long, env = "PROXY_SERVER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Most connections of each listener (agents', clients') that may be in their TLS handshake
    /// or, for clients, before their CONNECT head is read, at once. When full, a new
    /// connection takes the place of the one that has waited longest once that one has waited
    /// 1 s; until then the listener stops accepting. Bounds what a flood of idle connections
    /// holds.
    #[arg(long, env = "PROXY_SERVER_MAX_HANDSHAKES", default_value_t = proxy_common::gate::DEFAULT_CAP)]
    pub max_handshakes: usize,
    /// Largest CONNECT request head (request line and headers) in bytes; larger gets 431.
    #[arg(long, env = "PROXY_SERVER_MAX_HEAD_BYTES", default_value_t = 16 * 1024)]
    pub max_head_bytes: usize,
    /// Most tunneled connections open at once, in total; more get 503.
    #[arg(long, env = "PROXY_SERVER_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Most tunneled connections open at once to one cluster; more get 503.
    #[arg(
        long,
        env = "PROXY_SERVER_MAX_CONNECTIONS_PER_CLUSTER",
        default_value_t = 5_000
    )]
    pub max_connections_per_cluster: usize,
    /// Most agent connections one cluster may hold on this server at once (its replicas); more
    /// are refused at registration, with a reason the agent logs. Bounds what one member's
    /// certificate can open.
    #[arg(
        long,
        env = "PROXY_SERVER_MAX_AGENTS_PER_CLUSTER",
        default_value_t = 16
    )]
    pub max_agents_per_cluster: usize,
    /// Most CONNECTs waiting for an agent's dial at once; more get 503.
    #[arg(long, env = "PROXY_SERVER_MAX_PENDING_DIALS", default_value_t = 2_048)]
    pub max_pending_dials: usize,
    /// Most bytes all tunneled connections together may hold in their flow-control windows
    /// (bytes, or with KiB/MiB/GiB): what clients that stop reading can make the server pin,
    /// 256 KiB per connection and more for those whose windows grew. Beyond it windows stop
    /// growing and new CONNECTs get 503. Default: half the memory limit of the server's cgroup
    /// (its container's), else half the machine's memory.
    #[arg(long, env = "PROXY_SERVER_MAX_BUFFERED", value_parser = proxy_common::parse_size)]
    pub max_buffered: Option<u64>,
    /// How long a cluster whose agents all left stays listed (status page, /api/v1/clusters)
    /// as `down`, with when it went down.
    #[arg(long, env = "PROXY_SERVER_DOWN_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub down_retention: Duration,
    /// The proxy's address as controllers reach it, written as `proxy-url` into generated
    /// kubeconfigs (default: http:// or https:// and --frontend-addr).
    #[arg(long, env = "PROXY_SERVER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// On SIGTERM, how long the frontend still accepts CONNECTs while `/readyz` already fails,
    /// so load balancers and Kubernetes endpoints stop sending clients here before the listener
    /// closes (a client a load balancer sends to a closed listener is cut, not retried). Set it
    /// longer than the load balancer's health-check interval.
    #[arg(long, env = "PROXY_SERVER_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,
    /// On SIGTERM, how long open tunneled connections may continue before they are closed.
    #[arg(long, env = "PROXY_SERVER_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// CONNECT ports accepted. The port does not choose where the agent dials (always its
    /// upstream, the API server), so a CONNECT to any other port is refused with 400 rather than
    /// silently reaching the API server.
    #[arg(
        long,
        env = "PROXY_SERVER_CONNECT_PORTS",
        value_delimiter = ',',
        default_value = "443,6443"
    )]
    pub connect_ports: Vec<u16>,
    /// Optional suffix stripped from the CONNECT host to get the cluster name
    /// (e.g. `.clusters.local` lets `alpha.clusters.local:443` reach cluster `alpha`).
    #[arg(long, env = "PROXY_SERVER_CLUSTER_SUFFIX")]
    pub cluster_suffix: Option<String>,
    /// This server's id, sent to agents (default: host name and a random suffix). Must differ
    /// between replicas: agents tell replicas apart by it.
    #[arg(long, env = "PROXY_SERVER_SERVER_ID")]
    pub server_id: Option<String>,
    /// How many server replicas serve this fleet. Agents reach the replicas through one
    /// load-balanced address and keep dialing it until they hold a tunnel to this many distinct
    /// servers, so any replica can serve any cluster.
    #[arg(
        long,
        env = "PROXY_SERVER_SERVER_COUNT",
        default_value_t = 1,
        conflicts_with = "server_count_dns"
    )]
    pub server_count: u32,
    /// Count the replicas instead as the distinct addresses of this DNS name, re-read every few
    /// seconds: a Kubernetes headless Service with `publishNotReadyAddresses: true` selecting
    /// the server pods, so scaling the Deployment needs no flag change.
    #[arg(long, env = "PROXY_SERVER_SERVER_COUNT_DNS")]
    pub server_count_dns: Option<String>,
    /// After start, how long agents are given to find this replica. Meanwhile a CONNECT for a
    /// cluster whose agent has not arrived yet waits up to --agent-wait instead of failing, and
    /// with more than one replica /readyz reports not ready, so client load balancers keep
    /// sending CONNECTs to the replicas the agents already hold.
    #[arg(long, env = "PROXY_SERVER_WARMUP", default_value = "10s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Per agent connection, how much tunneled connections' windows may grow above their
    /// 256 KiB minimum in total (bytes, or with KiB/MiB/GiB). Bounds what stalled clients pin:
    /// connections x 256 KiB + this. A connection's window grows while it drains faster than
    /// its window allows (up to 64 MiB, enough for 10 Gbit/s across 50 ms) and shrinks while its
    /// reader is slow.
    #[arg(long, env = "PROXY_SERVER_WINDOW_BUDGET", default_value = "256MiB", value_parser = proxy_common::parse_size)]
    pub window_budget: u64,
    /// TCP keepalive on every connection accepted or dialed: IDLE,INTERVAL,PROBES, or off. A
    /// peer that vanished without a FIN or RST (NAT timeout, a laptop asleep) is noticed after
    /// IDLE + INTERVAL x PROBES, also while data is unacknowledged (TCP_USER_TIMEOUT), and what
    /// it held is freed.
    #[arg(long, env = "PROXY_SERVER_TCP_KEEPALIVE", default_value = "30s,10s,3", value_parser = proxy_common::net::KeepaliveFlag::parse)]
    pub tcp_keepalive: proxy_common::net::KeepaliveFlag,
    /// Log format.
    #[arg(long, env = "PROXY_SERVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Worker threads (default: one per CPU; 1: one thread, no pool). The server carries every
    /// cluster's traffic, so it uses the cores it is given; see docs/operating.md, "Threads".
    #[arg(long, env = "PROXY_SERVER_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Shard threads for agent connections and the CONNECTs they carry (default: one per CPU;
    /// 0: everything on the worker threads). An agent and its tunneled connections share one
    /// thread, so their messages need no thread hand-off; see docs/operating.md, "Threads".
    #[arg(long, env = "PROXY_SERVER_SHARDS", value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub shards: Option<u16>,
    /// Joining by token and renewing agent certificates.
    #[command(flatten)]
    pub join: crate::join::JoinArgs,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write a kubeconfig with a cluster, user and context for every connected cluster (as
    /// reported by a running server's admin listener); fill in the users' credentials.
    Kubeconfig {
        /// Operator listener (--operator-addr) of the running server.
        #[arg(
            long,
            alias = "admin-url",
            env = "PROXY_SERVER_OPERATOR_URL",
            default_value = "http://127.0.0.1:8096"
        )]
        operator_url: String,
        /// Where to write it (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Join tokens: agents join with one instead of a certificate made by hand.
    Token {
        /// What to do.
        #[command(subcommand)]
        command: crate::join::command::TokenCommand,
    },
}

/// Why the flags do not make a usable configuration.
// Variant fields are described by each variant's #[error] message, not by
// one-word doc lines.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// TLS material of the agent listener could not be loaded.
    #[error("agent listener TLS")]
    AgentTls(#[source] TlsError),
    /// TLS material of the frontend could not be loaded.
    #[error("frontend TLS")]
    FrontendTls(#[source] TlsError),
    /// The auth policy could not be loaded.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Joining or renewing cannot be set up.
    #[error(transparent)]
    Join(#[from] crate::join::JoinConfigError),
    /// A flag value is out of range or flags do not fit together.
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

/// How the frontend authenticates clients.
#[derive(Debug, Clone)]
pub enum FrontendAuth {
    /// Anyone may reach any cluster (loopback, or explicitly allowed).
    Open,
    /// A client certificate signed by --frontend-ca is required; it reaches any cluster.
    CertificateRequired,
    /// The policy file decides.
    Policy(Reloadable<Policy>),
}

/// Limits against hostile or runaway clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// See [`Args::handshake_timeout`].
    pub handshake_timeout: Duration,
    /// See [`Args::max_head_bytes`].
    pub max_head_bytes: usize,
    /// See [`Args::max_handshakes`].
    pub max_handshakes: usize,
    /// See [`Args::max_connections`].
    pub max_connections: usize,
    /// See [`Args::max_connections_per_cluster`].
    pub max_connections_per_cluster: usize,
    /// See [`Args::max_pending_dials`].
    pub max_pending_dials: usize,
    /// See [`Args::max_buffered`]; the default resolved.
    pub max_buffered: u64,
    /// See [`Args::max_agents_per_cluster`].
    pub max_agents_per_cluster: usize,
    /// See [`Args::down_retention`].
    pub down_retention: Duration,
}

/// The validated configuration `run` works from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen for agents.
    pub agent_addr: SocketAddr,
    /// Where to listen for CONNECT clients.
    pub frontend_addr: SocketAddr,
    /// Where to listen for admin requests (health, metrics).
    pub admin_addr: SocketAddr,
    /// Where to listen for operator requests (status page, cluster list, kubeconfigs).
    pub operator_addr: SocketAddr,
    /// See [`Args::admin_hosts`]; lower case.
    pub admin_hosts: Vec<String>,
    /// TLS of the agent listener (mutual: agents must present a certificate).
    pub agent_tls: Reloadable<rustls::ServerConfig>,
    /// Expiry of each loaded certificate, set at every (re)load.
    pub cert_expiry: tls::CertExpiry,
    /// TLS of the frontend, if any.
    pub frontend_tls: Option<Reloadable<rustls::ServerConfig>>,
    /// Frontend authentication.
    pub frontend_auth: FrontendAuth,
    /// See [`Args::dial_timeout`].
    pub dial_timeout: Duration,
    /// See [`Args::agent_wait`].
    pub agent_wait: Duration,
    /// See [`Args::keepalive_interval`].
    pub keepalive_interval: Duration,
    /// See [`Args::keepalive_timeout`].
    pub keepalive_timeout: Duration,
    /// Limits.
    pub limits: Limits,
    /// See [`Args::cluster_suffix`].
    pub cluster_suffix: Option<String>,
    /// See [`Args::connect_ports`].
    pub connect_ports: Vec<u16>,
    /// The proxy URL written into kubeconfigs; `None`: derived from the bound frontend address.
    pub public_url: Option<String>,
    /// See [`Args::shutdown_delay`].
    pub shutdown_delay: Duration,
    /// See [`Args::shutdown_grace`].
    pub shutdown_grace: Duration,
    /// This server's id.
    pub server_id: String,
    /// Where the replica count comes from.
    pub server_count: crate::fleet::CountSource,
    /// See [`Args::warmup`].
    pub warmup: Duration,
    /// See [`Args::window_budget`].
    pub window_budget: u64,
    /// See [`Args::tcp_keepalive`].
    pub tcp_keepalive: Option<proxy_common::net::Keepalive>,
    /// See [`Args::shards`]; the default resolved to the CPU count.
    pub shards: usize,
    /// Joining by token and renewing, when a signer is configured.
    pub joins: Option<std::sync::Arc<crate::join::Joins>>,
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// Longest duration any flag accepts: far beyond any sensible setting, and small enough that
/// `Instant::now() + d` can never overflow (which panics).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn positive(flag: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(invalid(flag, "must be greater than zero"));
    }
    bounded(flag, d)
}

fn bounded(flag: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d > MAX_DURATION {
        return Err(invalid(
            flag,
            format!(
                "must be at most {}",
                humantime::format_duration(MAX_DURATION)
            ),
        ));
    }
    Ok(d)
}

fn at_least_one(flag: &'static str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(invalid(flag, "must be at least 1"));
    }
    Ok(n)
}

impl Config {
    /// Checks the flags and loads the TLS material and policy.
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let cert_expiry = tls::CertExpiry::default();
        let agent_tls = agent_tls(args, &cert_expiry)?;
        let policy = policy(args)?;
        let frontend_tls = frontend_tls(args, &cert_expiry, policy.is_some())?;
        let frontend_auth = frontend_auth(args, policy)?;
        let joins = crate::join::Joins::from_args(
            &args.join,
            &required("agent-ca", &args.agent_ca)?,
            args.handshake_timeout,
        )?;
        if args.max_head_bytes < 256 {
            return Err(invalid("max-head-bytes", "must be at least 256"));
        }
        Ok(Self {
            agent_addr: args.agent_addr,
            frontend_addr: args.frontend_addr,
            admin_addr: args.admin_addr,
            operator_addr: operator_addr(args)?,
            admin_hosts: args
                .admin_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            agent_tls,
            cert_expiry,
            frontend_tls,
            frontend_auth,
            dial_timeout: positive("dial-timeout", args.dial_timeout)?,
            agent_wait: bounded("agent-wait", args.agent_wait)?,
            keepalive_interval: positive("keepalive-interval", args.keepalive_interval)?,
            keepalive_timeout: positive("keepalive-timeout", args.keepalive_timeout)?,
            limits: limits(args)?,
            cluster_suffix: match args.cluster_suffix.as_deref() {
                None | Some("") => None,
                Some(s) => Some(s.to_ascii_lowercase()),
            },
            connect_ports: if args.connect_ports.is_empty() || args.connect_ports.contains(&0) {
                return Err(invalid("connect-ports", "list ports from 1 to 65535"));
            } else {
                args.connect_ports.clone()
            },
            public_url: public_url(args)?,
            shutdown_delay: bounded("shutdown-delay", args.shutdown_delay)?,
            shutdown_grace: bounded("shutdown-grace", args.shutdown_grace)?,
            server_count: server_count(args)?,
            warmup: bounded("warmup", args.warmup)?,
            window_budget: args.window_budget,
            tcp_keepalive: args.tcp_keepalive.0,
            shards: args.shards.map_or_else(
                || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                usize::from,
            ),
            joins,
            server_id: args
                .server_id
                .clone()
                .unwrap_or_else(|| proxy_common::default_instance_id("proxy-server")),
        })
    }
}

fn required(flag: &'static str, v: &Option<PathBuf>) -> Result<PathBuf, ConfigError> {
    v.clone().ok_or_else(|| invalid(flag, "required"))
}

/// The agent listener's mutual TLS, re-read when its files change. Every (re)load checks the
/// roles stay apart: the server's certificate and the frontend client CA unrelated to the agent
/// CA, and (per connection) no agent certificate that also verifies as a frontend client. So the
/// frontend CA file is watched too: a reload of either re-checks both.
fn agent_tls(
    args: &Args,
    cert_expiry: &tls::CertExpiry,
) -> Result<Reloadable<rustls::ServerConfig>, ConfigError> {
    let agent_identity = CertKeyPaths {
        cert: required("agent-tls-cert", &args.agent_tls_cert)?,
        key: required("agent-tls-key", &args.agent_tls_key)?,
    };
    let agent_ca = required("agent-ca", &args.agent_ca)?;
    let frontend_ca = args.frontend_ca.clone();
    // Sent at the end of the chain while agents may join (see `crate::join`).
    let join_ca = args
        .join
        .join_tokens
        .as_ref()
        .and(args.join.agent_tls_ca.clone());
    let mut files = vec![
        agent_identity.cert.clone(),
        agent_identity.key.clone(),
        agent_ca.clone(),
    ];
    files.extend(frontend_ca.iter().cloned());
    files.extend(join_ca.iter().cloned());
    let expiry = cert_expiry.clone();
    Reloadable::load("agent listener TLS", files, move || {
        tls::separate_cas(
            ("agent-tls-cert", &agent_identity.cert),
            ("agent-ca", &agent_ca),
        )?;
        let others: Vec<(&'static str, &std::path::Path)> = frontend_ca
            .iter()
            .map(|ca| ("frontend-ca", ca.as_path()))
            .collect();
        if let Some(ca) = &join_ca {
            tls::check_issued_by(
                ("agent-tls-cert", &agent_identity.cert),
                ("agent-tls-ca", ca),
            )?;
        }
        let config =
            tls::agent_listener_config(&agent_identity, &agent_ca, &others, join_ca.as_deref())?;
        tls::record_expiry(&expiry, "agent-listener", &agent_identity.cert);
        tls::record_expiry(&expiry, "agent-ca", &agent_ca);
        Ok::<_, tls::TlsError>(config)
    })
    .map_err(ConfigError::AgentTls)
}

/// The frontend's authorization policy, re-read when its file changes.
fn policy(args: &Args) -> Result<Option<Reloadable<Policy>>, ConfigError> {
    let Some(path) = &args.frontend_auth_file else {
        return Ok(None);
    };
    let file = path.clone();
    Ok(Some(Reloadable::load(
        "frontend auth policy",
        vec![path.clone()],
        move || Policy::load(&file),
    )?))
}

/// The frontend's TLS, when it has a certificate; with a policy (`cert_optional`), clients may
/// authenticate by token instead of certificate.
fn frontend_tls(
    args: &Args,
    cert_expiry: &tls::CertExpiry,
    cert_optional: bool,
) -> Result<Option<Reloadable<rustls::ServerConfig>>, ConfigError> {
    let (Some(cert), Some(key)) = (&args.frontend_tls_cert, &args.frontend_tls_key) else {
        return Ok(None);
    };
    let identity = CertKeyPaths {
        cert: cert.clone(),
        key: key.clone(),
    };
    let mut files = vec![cert.clone(), key.clone()];
    files.extend(args.frontend_ca.iter().cloned());
    // Watched too, so a frontend CA reload is checked against the agent CA in force.
    let agent_ca = required("agent-ca", &args.agent_ca)?;
    files.push(agent_ca.clone());
    let ca = args.frontend_ca.clone();
    let expiry = cert_expiry.clone();
    let tls = Reloadable::load("frontend TLS", files, move || {
        let config = tls::frontend_server_config(
            &identity,
            ca.as_deref(),
            cert_optional,
            &[("agent-ca", &agent_ca)],
        )?;
        tls::record_expiry(&expiry, "frontend", &identity.cert);
        if let Some(ca) = &ca {
            tls::record_expiry(&expiry, "frontend-ca", ca);
        }
        Ok::<_, tls::TlsError>(config)
    })
    .map_err(ConfigError::FrontendTls)?;
    Ok(Some(tls))
}

/// How frontend clients authenticate (the client CA was checked against the agent CA where it
/// was loaded); refuses an open frontend on a non-loopback address unless explicitly allowed.
fn frontend_auth(
    args: &Args,
    policy: Option<Reloadable<Policy>>,
) -> Result<FrontendAuth, ConfigError> {
    let frontend_auth = match (policy, &args.frontend_ca) {
        (Some(policy), _) => FrontendAuth::Policy(policy),
        (None, Some(_)) => FrontendAuth::CertificateRequired,
        (None, None) => FrontendAuth::Open,
    };
    if matches!(frontend_auth, FrontendAuth::Open)
        && !args.frontend_addr.ip().is_loopback()
        && !args.frontend_allow_unauthenticated
    {
        return Err(invalid(
            "frontend-addr",
            format!(
                "{} is not a loopback address and no authentication is configured: anyone who can reach it could reach every cluster. \
                 Set --frontend-auth-file or --frontend-ca, or pass --frontend-allow-unauthenticated if that is really intended",
                args.frontend_addr
            ),
        ));
    }
    Ok(frontend_auth)
}

/// The operator listener holds the fleet map: off loopback it needs the auth file, whose
/// `operator: true` clients may read it.
fn operator_addr(args: &Args) -> Result<SocketAddr, ConfigError> {
    if !args.operator_addr.ip().is_loopback() && args.frontend_auth_file.is_none() {
        return Err(invalid(
            "operator-addr",
            format!(
                "{} is not a loopback address: the status page and kubeconfigs would be open to anyone who reaches it. \
                 Keep it on 127.0.0.1 (and use kubectl port-forward), or set --frontend-auth-file with a client marked `operator: true`",
                args.operator_addr
            ),
        ));
    }
    Ok(args.operator_addr)
}

fn limits(args: &Args) -> Result<Limits, ConfigError> {
    Ok(Limits {
        handshake_timeout: positive("handshake-timeout", args.handshake_timeout)?,
        max_head_bytes: args.max_head_bytes,
        max_handshakes: at_least_one("max-handshakes", args.max_handshakes)?,
        max_connections: at_least_one("max-connections", args.max_connections)?,
        max_connections_per_cluster: at_least_one(
            "max-connections-per-cluster",
            args.max_connections_per_cluster,
        )?,
        max_pending_dials: at_least_one("max-pending-dials", args.max_pending_dials)?,
        max_buffered: max_buffered(args.max_buffered)?,
        max_agents_per_cluster: at_least_one(
            "max-agents-per-cluster",
            args.max_agents_per_cluster,
        )?,
        down_retention: positive("down-retention", args.down_retention)?,
    })
}

/// See [`proxy_common::memory::max_buffered`].
fn max_buffered(flag: Option<u64>) -> Result<u64, ConfigError> {
    proxy_common::memory::max_buffered(flag).map_err(|reason| invalid("max-buffered", reason))
}

fn public_url(args: &Args) -> Result<Option<String>, ConfigError> {
    match &args.public_url {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
            Ok(Some(url.clone()))
        }
        Some(url) => Err(invalid(
            "public-url",
            format!("{url:?} must start with http:// or https://"),
        )),
        None => Ok(None),
    }
}

fn server_count(args: &Args) -> Result<crate::fleet::CountSource, ConfigError> {
    match &args.server_count_dns {
        Some(name) if name.is_empty() || name.contains(':') => Err(invalid(
            "server-count-dns",
            format!("{name:?} must be a DNS name (no port)"),
        )),
        Some(name) => Ok(crate::fleet::CountSource::Dns(name.clone())),
        None => Ok(crate::fleet::CountSource::Fixed(at_least_one(
            "server-count",
            args.server_count as usize,
        )? as u32)),
    }
}
