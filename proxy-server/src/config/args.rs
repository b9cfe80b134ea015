//! The flags of `proxy-server` and its subcommands, as clap reads them (each also an
//! environment variable `PROXY_SERVER_<FLAG>`); [`super::Config`] checks them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use proxy_common::telemetry::LogFormat;

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
