//! Command-line flags (each also an environment variable `PROXY_SERVER_<FLAG>`) and the validated
//! configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use proxy_common::reload::Reloadable;
use proxy_common::tls::{self, CertKeyPaths, TlsError};

use crate::auth::{Policy, PolicyError};

mod args;

pub use args::{Args, Command};

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
