//! Command-line flags (each also an environment variable `PROXY_AGENT_<FLAG>`) and the validated
//! configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use proxy_common::error::chain;
use proxy_common::reload::Reloadable;
use proxy_common::telemetry::LogFormat;
use proxy_common::tls::{self, CertKeyPaths, TlsError};
use rustls::pki_types::ServerName;

/// Flags of `proxy-agent`.
#[derive(Debug, Parser)]
#[command(
    name = "proxy-agent",
    version,
    about = "Dials out to proxy servers and carries their CONNECTs to this cluster's API server."
)]
pub struct Args {
    /// A proxy server's agent address, HOST:PORT. Repeatable: the agent keeps a tunnel to each.
    /// In the environment, separate several with commas.
    #[arg(
        long = "server",
        env = "PROXY_AGENT_SERVER",
        value_delimiter = ',',
        required = true
    )]
    pub servers: Vec<String>,
    /// The agent's client certificate (PEM chain). Its Subject CN is the cluster it may serve.
    /// Instead of the three certificate flags, an agent may join by token (--state-dir).
    #[arg(
        long,
        env = "PROXY_AGENT_TLS_CERT",
        requires_all = ["tls_key", "server_ca"],
        conflicts_with = "state_dir",
        required_unless_present = "state_dir"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The agent's private key (PEM).
    #[arg(long, env = "PROXY_AGENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signs the proxy servers' certificates.
    #[arg(long, env = "PROXY_AGENT_SERVER_CA", requires = "tls_cert")]
    pub server_ca: Option<PathBuf>,
    /// Folder holding the identity the agent got by joining (key, certificate, the servers'
    /// CA; 0600), renewed there while it runs. Empty at first: start with --join-token and
    /// --server-ca-hash; later starts need neither.
    #[arg(long, env = "PROXY_AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Bootstrap token from `proxy-server token create`, used only when --state-dir holds no
    /// valid certificate.
    #[arg(
        long,
        env = "PROXY_AGENT_JOIN_TOKEN",
        hide_env_values = true,
        requires_all = ["state_dir", "server_ca_hash"]
    )]
    pub join_token: Option<String>,
    /// Pin of the servers' CA (sha256:<hex of its public key>, from `proxy-server token
    /// create`): the agent sends its token only to a server whose chain has that CA.
    #[arg(long, env = "PROXY_AGENT_SERVER_CA_HASH", requires = "join_token")]
    pub server_ca_hash: Option<String>,
    /// TLS name to verify on the servers' certificates (default: the host of each --server).
    #[arg(long, env = "PROXY_AGENT_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Cluster to register (default: the certificate's Subject CN; servers refuse any other).
    #[arg(long, env = "PROXY_AGENT_CLUSTER")]
    pub cluster: Option<String>,
    /// This cluster's API server: where the agent dials for every CONNECT to its cluster (with
    /// --allow-destination, the destinations a server may name besides it).
    #[arg(
        long,
        env = "PROXY_AGENT_UPSTREAM",
        default_value = "kubernetes.default.svc:443"
    )]
    pub upstream: String,
    /// A further destination servers may ask for (HOST:PORT, repeatable; in the environment,
    /// separate several with commas): clients name it with a `Proxy-Destination` header on their
    /// CONNECT. Anything that is neither one of these nor --upstream is refused (the client gets
    /// 403) without being resolved or dialed.
    #[arg(
        long = "allow-destination",
        env = "PROXY_AGENT_ALLOW_DESTINATION",
        value_delimiter = ','
    )]
    pub allow_destinations: Vec<String>,
    /// CA (PEM) of this cluster's API server, reported to servers so they can hand out
    /// kubeconfigs that verify it. Default: the in-cluster service-account CA when present.
    #[arg(long, env = "PROXY_AGENT_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// TLS name on this cluster's API-server certificate, for generated kubeconfigs.
    #[arg(
        long,
        env = "PROXY_AGENT_UPSTREAM_SERVER_NAME",
        default_value = "kubernetes.default.svc"
    )]
    pub upstream_server_name: String,
    /// On SIGTERM, how long open connections may continue before the agent exits.
    #[arg(long, env = "PROXY_AGENT_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Admin listener: /healthz, /readyz (ready = registered with at least one server).
    #[arg(long, env = "PROXY_AGENT_ADMIN_ADDR", default_value = "127.0.0.1:8093")]
    pub admin_addr: SocketAddr,
    /// Agent id sent to servers (default: host name and a random suffix).
    #[arg(long, env = "PROXY_AGENT_AGENT_ID")]
    pub agent_id: Option<String>,
    /// How long to try reaching the upstream before reporting the dial as failed.
    #[arg(long, env = "PROXY_AGENT_DIAL_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings to servers.
    #[arg(long, env = "PROXY_AGENT_KEEPALIVE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,
    /// A server that owes a ping's answer and sends nothing at all for this long is
    /// reconnected (a busy server whose answer waits behind its data is not).
    #[arg(long, env = "PROXY_AGENT_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,
    /// Once the agent holds a tunnel to every server replica, how often it still dials each
    /// --server address to look for a replica it does not know (replaced, or added without its
    /// count changing). Jittered; until all replicas are held it dials every few seconds.
    #[arg(long, env = "PROXY_AGENT_SERVER_PROBE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub server_probe_interval: Duration,
    /// Per server connection, how much tunneled connections' windows may grow above their
    /// 256 KiB minimum in total (bytes, or with KiB/MiB/GiB): bounds what upstreams that stop
    /// reading can pin (connections x 256 KiB + this).
    #[arg(long, env = "PROXY_AGENT_WINDOW_BUDGET", default_value = "256MiB", value_parser = proxy_common::parse_size)]
    pub window_budget: u64,
    /// Most bytes all tunneled connections together may hold in their flow-control windows
    /// (bytes, or with KiB/MiB/GiB): what upstreams that stop reading can make the agent pin,
    /// 256 KiB per connection and more for those whose windows grew. Beyond it windows stop
    /// growing and dials are refused. Default: half the memory limit of the agent's cgroup
    /// (its container's), else half the machine's memory.
    #[arg(long, env = "PROXY_AGENT_MAX_BUFFERED", value_parser = proxy_common::parse_size)]
    pub max_buffered: Option<u64>,
    /// Reach the servers through this HTTP proxy (HTTP CONNECT): http://[user:password@]host:port.
    /// Without it, the standard HTTPS_PROXY / https_proxy variables are used, except for servers
    /// NO_PROXY / no_proxy exempts. Credentials are sent as Proxy-Authorization: Basic and
    /// never logged.
    #[arg(long, env = "PROXY_AGENT_HTTPS_PROXY", hide_env_values = true)]
    pub https_proxy: Option<String>,
    /// Per server, most upstream connections kept made ahead of demand ("warm"), each ready for
    /// a new client without a dial round trip (on a WAN, the time to a new connection's first
    /// response halves). The agent keeps as many as recent demand needs: one more after a client
    /// found none, one fewer after one expired unused (25 s), none on an idle cluster. 0 turns
    /// them off. Only for --upstream, never for --allow-destination.
    #[arg(long, env = "PROXY_AGENT_WARM_CONNECTIONS", default_value_t = 8)]
    pub warm_connections: usize,
    /// TCP keepalive on every connection accepted or dialed: IDLE,INTERVAL,PROBES, or off. A
    /// peer that vanished without a FIN or RST (NAT timeout, a laptop asleep) is noticed after
    /// IDLE + INTERVAL x PROBES, also while data is unacknowledged (TCP_USER_TIMEOUT), and what
    /// it held is freed.
    #[arg(long, env = "PROXY_AGENT_TCP_KEEPALIVE", default_value = "30s,10s,3", value_parser = proxy_common::net::KeepaliveFlag::parse)]
    pub tcp_keepalive: proxy_common::net::KeepaliveFlag,
    /// Log format.
    #[arg(long, env = "PROXY_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Threads: 1 (the default) runs everything on one thread; more is a pool of that many
    /// workers. See docs/operating.md, "Threads".
    #[arg(long, env = "PROXY_AGENT_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,
}

/// Why the flags do not make a usable configuration.
// Variant fields are described by each variant's #[error] message, not by
// one-word doc lines.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// TLS material could not be loaded.
    #[error("TLS")]
    Tls(#[from] TlsError),
    /// A flag value is unusable.
    #[error("--{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        /// Its value.
        value: String,
        reason: String,
    },
}

/// Where Kubernetes mounts the API server's CA into every pod.
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Longest duration any flag accepts: far beyond any sensible setting, and small enough that
/// `Instant::now() + d` can never overflow (which panics).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn duration(flag: &'static str, d: Duration, zero_ok: bool) -> Result<Duration, ConfigError> {
    let text = humantime::format_duration(d).to_string();
    if d.is_zero() && !zero_ok {
        return Err(invalid(flag, &text, "must be greater than zero"));
    }
    if d > MAX_DURATION {
        let max = humantime::format_duration(MAX_DURATION);
        return Err(invalid(flag, &text, format!("must be at most {max}")));
    }
    Ok(d)
}

/// Shortest --server-probe-interval: each probe is a TLS handshake on some server replica.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Largest CA bundle reported to servers.
pub const MAX_UPSTREAM_CA: usize = 64 * 1024;

/// One proxy server to keep a tunnel to.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    /// HOST:PORT to dial.
    pub addr: String,
    /// Name verified on its certificate.
    pub tls_name: ServerName<'static>,
    /// The HTTP proxy it is reached through, if any (`--https-proxy`, `HTTPS_PROXY`).
    pub proxy: Option<crate::http_proxy::HttpProxy>,
}

/// The validated configuration `run` works from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Servers to keep tunnels to.
    pub servers: Vec<ServerTarget>,
    /// mTLS client configuration; reloaded when the certificate, key or CA files change.
    pub tls: Reloadable<rustls::ClientConfig>,
    /// Cluster this agent serves.
    pub cluster: String,
    /// This agent's id.
    pub agent_id: String,
    /// The default destination.
    pub upstream: String,
    /// Further destinations a server may name.
    pub allow_destinations: Vec<String>,
    /// The member API server's CA file, if any (re-read at each registration).
    pub upstream_ca: Option<PathBuf>,
    /// See [`Args::upstream_server_name`].
    pub upstream_server_name: String,
    /// See [`Args::shutdown_grace`].
    pub shutdown_grace: Duration,
    /// Where the admin listener binds.
    pub admin_addr: SocketAddr,
    /// See [`Args::dial_timeout`].
    pub dial_timeout: Duration,
    /// See [`Args::keepalive_interval`].
    pub keepalive_interval: Duration,
    /// See [`Args::keepalive_timeout`].
    pub keepalive_timeout: Duration,
    /// See [`Args::server_probe_interval`].
    pub server_probe_interval: Duration,
    /// See [`Args::window_budget`].
    pub window_budget: u64,
    /// See [`Args::max_buffered`]; the default resolved.
    pub max_buffered: u64,
    /// See [`Args::tcp_keepalive`].
    pub tcp_keepalive: Option<proxy_common::net::Keepalive>,
    /// See [`Args::warm_connections`].
    pub warm_connections: usize,
    /// Expiry of each loaded certificate, set at every (re)load.
    pub cert_expiry: tls::CertExpiry,
    /// Where a joined agent keeps (and renews) its identity.
    pub state_dir: Option<crate::state_dir::StateDir>,
}

/// Most warm connections per server: what a server holds per agent.
pub const MAX_WARM_CONNECTIONS: usize = 64;

/// See [`proxy_common::memory::max_buffered`].
fn max_buffered(flag: Option<u64>) -> Result<u64, ConfigError> {
    proxy_common::memory::max_buffered(flag).map_err(|reason| {
        let value = flag.map_or_else(String::new, |v| v.to_string());
        invalid("max-buffered", &value, reason)
    })
}

fn invalid(flag: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Splits HOST:PORT, accepting `[v6]:port`.
fn split_host_port(flag: &'static str, value: &str) -> Result<(String, u16), ConfigError> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| invalid(flag, value, "expected HOST:PORT"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(flag, value, "port must be 1 to 65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid(flag, value, "empty host"));
    }
    Ok((host.to_owned(), port))
}

impl Config {
    /// The API server CA bundle to report, read now so a rotated CA is reported on the next
    /// registration. Empty when none is configured or it cannot be read (logged).
    pub fn upstream_ca_pem(&self) -> Vec<u8> {
        let Some(path) = &self.upstream_ca else {
            return Vec::new();
        };
        match std::fs::read(path) {
            Ok(pem) if pem.len() <= MAX_UPSTREAM_CA => pem,
            Ok(_) => {
                tracing::warn!(path = %path.display(), "upstream CA larger than {MAX_UPSTREAM_CA} bytes; not reported");
                Vec::new()
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot read upstream CA; not reported");
                Vec::new()
            }
        }
    }

    /// The address to dial for a server's request, or why it is refused. An empty request means
    /// the upstream; others must match an allowed destination exactly, as text: nothing the
    /// server sends is resolved unless the operator listed it.
    pub fn destination<'a>(&'a self, requested: &'a str) -> Result<&'a str, String> {
        if requested.is_empty() || requested == self.upstream {
            return Ok(&self.upstream);
        }
        if self.allow_destinations.iter().any(|d| d == requested) {
            return Ok(requested);
        }
        Err(format!(
            "destination {requested:?} is not allowed by this agent (allowed: its upstream {:?}{})",
            self.upstream,
            if self.allow_destinations.is_empty() {
                String::new()
            } else {
                format!(" and {:?}", self.allow_destinations)
            }
        ))
    }

    /// Checks the flags and loads the TLS material.
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let cert_expiry = tls::CertExpiry::default();
        let identity = Identity::of(args);
        let tls = client_tls(&identity, &cert_expiry)?;
        let cluster = cluster(args, &identity.cert)?;
        let servers = servers(args)?;
        let upstream_ca = upstream_ca(args)?;
        Ok(Self {
            upstream_ca,
            upstream_server_name: args.upstream_server_name.clone(),
            shutdown_grace: duration("shutdown-grace", args.shutdown_grace, true)?,
            servers,
            tls,
            cluster,
            agent_id: args
                .agent_id
                .clone()
                .unwrap_or_else(|| proxy_common::default_instance_id("proxy-agent")),
            upstream: args.upstream.clone(),
            allow_destinations: args.allow_destinations.clone(),
            admin_addr: args.admin_addr,
            dial_timeout: duration("dial-timeout", args.dial_timeout, false)?,
            keepalive_interval: duration("keepalive-interval", args.keepalive_interval, false)?,
            keepalive_timeout: duration("keepalive-timeout", args.keepalive_timeout, false)?,
            window_budget: args.window_budget,
            max_buffered: max_buffered(args.max_buffered)?,
            tcp_keepalive: args.tcp_keepalive.0,
            cert_expiry,
            state_dir: args
                .state_dir
                .as_deref()
                .map(crate::state_dir::StateDir::new),
            warm_connections: if args.warm_connections > MAX_WARM_CONNECTIONS {
                return Err(invalid(
                    "warm-connections",
                    &args.warm_connections.to_string(),
                    format!("at most {MAX_WARM_CONNECTIONS} (what a server holds per agent)"),
                ));
            } else {
                args.warm_connections
            },
            server_probe_interval: if args.server_probe_interval < MIN_PROBE_INTERVAL
                || args.server_probe_interval > MAX_DURATION
            {
                return Err(invalid(
                    "server-probe-interval",
                    &humantime::format_duration(args.server_probe_interval).to_string(),
                    format!("must be at least {MIN_PROBE_INTERVAL:?} and at most a week"),
                ));
            } else {
                args.server_probe_interval
            },
        })
    }
}

/// Where the agent's certificate, key and servers' CA are: the flags, or the state folder.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
    server_ca: PathBuf,
}

impl Identity {
    fn of(args: &Args) -> Self {
        match (
            &args.state_dir,
            &args.tls_cert,
            &args.tls_key,
            &args.server_ca,
        ) {
            (Some(dir), ..) => {
                let dir = crate::state_dir::StateDir::new(dir);
                Self {
                    cert: dir.identity(),
                    key: dir.identity(),
                    server_ca: dir.server_ca(),
                }
            }
            // clap requires the three flags together when there is no state folder.
            (None, cert, key, ca) => Self {
                cert: cert.clone().unwrap_or_default(),
                key: key.clone().unwrap_or_default(),
                server_ca: ca.clone().unwrap_or_default(),
            },
        }
    }
}

/// The client TLS towards the servers, re-read when its files change.
fn client_tls(
    identity: &Identity,
    cert_expiry: &tls::CertExpiry,
) -> Result<Reloadable<rustls::ClientConfig>, ConfigError> {
    let server_ca = identity.server_ca.clone();
    let identity = CertKeyPaths {
        cert: identity.cert.clone(),
        key: identity.key.clone(),
    };
    let files = vec![
        identity.cert.clone(),
        identity.key.clone(),
        server_ca.clone(),
    ];
    let expiry = cert_expiry.clone();
    Ok(Reloadable::load("agent TLS", files, move || {
        // Three roots: a server CA that also signs agents would let anyone holding an agent's
        // issuer mint a server this agent trusts (docs/security.md).
        tls::separate_cas(("tls-cert", &identity.cert), ("server-ca", &server_ca))?;
        let config = tls::mtls_client_config(&identity, &server_ca)?;
        tls::record_expiry(&expiry, "client", &identity.cert);
        tls::record_expiry(&expiry, "server-ca", &server_ca);
        Ok::<_, tls::TlsError>(config)
    })?)
}

/// The cluster to register: the flag, or the certificate's CN.
fn cluster(args: &Args, cert: &std::path::Path) -> Result<String, ConfigError> {
    let cluster = match &args.cluster {
        Some(c) => c.clone(),
        None => tls::common_name_of_file(cert)?,
    };
    if !proxy_common::is_valid_cluster_name(&cluster) {
        return Err(invalid(
            "cluster",
            &cluster,
            "not a valid cluster name (lower-case letters, digits, '-', '.')",
        ));
    }
    Ok(cluster)
}

/// Each `--server` with its TLS name and the HTTP proxy (if any) that reaches it.
pub fn servers(args: &Args) -> Result<Vec<ServerTarget>, ConfigError> {
    let flag_proxy = match &args.https_proxy {
        Some(url) => Some(
            crate::http_proxy::HttpProxy::parse(url)
                // The URL may hold credentials: not echoed back.
                .map_err(|e| invalid("https-proxy", "(the given URL)", e.to_string()))?,
        ),
        None => None,
    };
    let mut servers = Vec::new();
    for addr in &args.servers {
        let (host, _) = split_host_port("server", addr)?;
        let name = args.server_name.as_deref().unwrap_or(&host);
        let tls_name = tls::server_name(name)
            .map_err(|e| invalid("server-name", name, chain(&e).to_string()))?;
        let proxy = crate::http_proxy::HttpProxy::for_server(flag_proxy.as_ref(), addr, |k| {
            std::env::var(k).ok()
        })
        .map_err(|e| invalid("https-proxy", "(HTTPS_PROXY)", e.to_string()))?;
        servers.push(ServerTarget {
            addr: addr.clone(),
            tls_name,
            proxy,
        });
    }
    Ok(servers)
}

/// Checks the destinations, and finds the upstream's CA to report (the flag, else the
/// in-cluster service-account CA when present).
fn upstream_ca(args: &Args) -> Result<Option<PathBuf>, ConfigError> {
    split_host_port("upstream", &args.upstream)?;
    for dest in &args.allow_destinations {
        split_host_port("allow-destination", dest)?;
    }
    let upstream_ca = match &args.upstream_ca {
        Some(path) => {
            tls::load_certs(path)?;
            Some(path.clone())
        }
        None => Some(PathBuf::from(IN_CLUSTER_CA)).filter(|p| p.exists()),
    };
    if tls::server_name(&args.upstream_server_name).is_err() {
        return Err(invalid(
            "upstream-server-name",
            &args.upstream_server_name,
            "not a DNS name or IP address",
        ));
    }
    Ok(upstream_ca)
}
