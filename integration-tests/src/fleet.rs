//! Several proxy-server replicas behind real load balancers (Debian's HAProxy), as a platform
//! team runs them: agents and clients are given only the load balancers' addresses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use proxy_certs::DevPki;
use tokio::process::{Child, Command};

use crate::procs::{ServerProc, admin_get};

/// Longest a replica takes to see a changed `--server-count-dns` name: its refresh interval
/// plus slack for a loaded machine.
pub const DNS_REFRESH_BOUND: Duration =
    Duration::from_secs(proxy_server::fleet::DNS_REFRESH.as_secs() + 3);

/// A free TCP port on 127.0.0.1 (bound, read and released: the caller binds it next).
///
/// The port is taken below the kernel's ephemeral range, not from it (`bind(:0)` would): a port
/// reserved now and bound later (a replica that starts or restarts at a fixed address) must not
/// be taken meanwhile as the source port of some outgoing connection, which on a busy loopback
/// happens within seconds and makes the later bind fail with "address in use".
pub fn free_port() -> u16 {
    let (ephemeral_low, _) = ephemeral_range();
    // Below the ephemeral range and above the well-known and commonly configured ports.
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(1).max(10_001));
    let span = u32::from(high - low) + 1;
    // Start at a different place in each process, so concurrent tests rarely probe the same port.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for i in 0..span {
        let port = low + ((seed.wrapping_add(i.wrapping_mul(7_919))) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..={high}");
}

/// The kernel's ephemeral port range (`ip_local_port_range`), or Linux's default.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(str::parse::<u16>);
            Some((parts.next()?.ok()?, parts.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The fixed addresses of one replica, so a restarted replica is where the load balancers
/// expect it.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaAddrs {
    /// gRPC listener for agents.
    pub agent: SocketAddr,
    /// CONNECT listener.
    pub frontend: SocketAddr,
    /// Admin listener (health, metrics).
    pub admin: SocketAddr,
    /// Operator listener (status page, cluster list).
    pub operator: SocketAddr,
}

impl ReplicaAddrs {
    /// Four free ports on 127.0.0.1.
    pub fn free() -> Self {
        Self {
            agent: local(free_port()),
            frontend: local(free_port()),
            admin: local(free_port()),
            operator: local(free_port()),
        }
    }
}

/// One server replica: its addresses and, while it runs, its process.
#[derive(Debug)]
pub struct Replica {
    /// Where it listens.
    pub addrs: ReplicaAddrs,
    /// The running process, if any.
    pub server: Option<ServerProc>,
}

/// HAProxy in TCP mode: one listener for agents (round robin over the replicas' agent ports,
/// health-checked on `/healthz`: a warming-up replica must still get its agents) and one for
/// clients (round robin over the frontends, health-checked on `/readyz`).
#[derive(Debug)]
pub struct Haproxy {
    child: Child,
    /// Where agents dial.
    pub agents: SocketAddr,
    /// Where clients send CONNECTs.
    pub clients: SocketAddr,
    log: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy in front of `replicas` (which need not be running yet).
    pub async fn start(dir: &Path, replicas: &[ReplicaAddrs]) -> anyhow::Result<Self> {
        let agents = local(free_port());
        let clients = local(free_port());
        let mut agent_servers = String::new();
        let mut client_servers = String::new();
        for (i, r) in replicas.iter().enumerate() {
            agent_servers.push_str(&format!(
                "  server r{i} {} check port {} inter 300ms fall 2 rise 1\n",
                r.agent,
                r.admin.port()
            ));
            client_servers.push_str(&format!(
                "  server r{i} {} check port {} inter 300ms fall 1 rise 1\n",
                r.frontend,
                r.admin.port()
            ));
        }
        // `retries` + `redispatch`: a connection refused by a replica that just died is sent to
        // another, as a production load balancer would.
        let config = format!(
            "global\n  maxconn 4000\n\
defaults\n  log stdout format raw local0\n  option tcplog\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  retries 3\n  option redispatch 1\n\
frontend agents\n  bind {agents}\n  default_backend agents\n\
backend agents\n  balance roundrobin\n  option httpchk GET /healthz\n{agent_servers}\
frontend clients\n  bind {clients}\n  default_backend clients\n\
backend clients\n  balance roundrobin\n  option httpchk GET /readyz\n{client_servers}"
        );
        let cfg = dir.join(format!("haproxy-{}.cfg", agents.port()));
        std::fs::write(&cfg, config)?;
        let log = dir.join(format!("haproxy-{}.log", agents.port()));
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::File::create(
                log.with_extension("err"),
            )?))
            .kill_on_drop(true)
            .spawn()
            .context("starting haproxy (Debian package `haproxy`)")?;
        let lb = Self {
            child,
            agents,
            clients,
            log,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(agents).await.is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "haproxy did not start: {}",
                lb.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(lb)
    }

    /// What HAProxy printed.
    pub fn logs(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let err = std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        format!("{out}{err}")
    }

    /// Stops HAProxy.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Starts (or restarts) a replica at `addrs` with `extra` flags. With `hosts`, the server runs
/// in its own mount namespace where that file is `/etc/hosts` (for `--server-count-dns`
/// without a DNS server; needs root, as CI has).
pub async fn start_replica(
    pki: &DevPki,
    addrs: ReplicaAddrs,
    extra: &[&str],
    hosts: Option<&Path>,
) -> anyhow::Result<ServerProc> {
    let (agent, frontend, admin, operator) = (
        addrs.agent.to_string(),
        addrs.frontend.to_string(),
        addrs.admin.to_string(),
        addrs.operator.to_string(),
    );
    let mut args: Vec<&str> = vec![
        "--agent-addr",
        &agent,
        "--frontend-addr",
        &frontend,
        "--admin-addr",
        &admin,
        "--operator-addr",
        &operator,
    ];
    args.extend_from_slice(extra);
    match hosts {
        None => ServerProc::start(pki, None, &args).await,
        Some(hosts) => {
            ServerProc::start_wrapped(pki, &args, |bin, args| {
                // `unshare --mount` makes the bind mount private to this process; `exec` keeps the
                // pid, so signals reach the server itself.
                let mut wrapped = vec![
                    "--mount".to_owned(),
                    "sh".to_owned(),
                    "-c".to_owned(),
                    "mount --bind \"$0\" /etc/hosts && exec \"$@\"".to_owned(),
                    hosts.display().to_string(),
                    bin.display().to_string(),
                ];
                wrapped.extend(args.iter().cloned());
                (PathBuf::from("unshare"), wrapped)
            })
            .await
        }
    }
}

/// The cluster → agent ids a replica lists in `/api/v1/clusters` (on its operator listener).
pub async fn clusters_of(admin: SocketAddr) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let (status, body) = admin_get(admin, "/api/v1/clusters").await?;
    anyhow::ensure!(status == 200, "status {status}: {body}");
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    let mut out = Vec::new();
    for c in doc["clusters"].as_array().context("clusters")? {
        let mut ids: Vec<String> = c["agents"]
            .as_array()
            .context("agents")?
            .iter()
            .map(|a| a["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        ids.sort();
        out.push((c["name"].as_str().unwrap_or_default().to_owned(), ids));
    }
    Ok(out)
}

/// Stops a replica: SIGTERM (drain) and wait for it to exit.
pub async fn stop_gracefully(mut server: ServerProc, limit: Duration) -> anyhow::Result<()> {
    server.proc.signal("TERM");
    let status = server.proc.wait(limit).await?;
    anyhow::ensure!(status.success(), "replica exited with {status}");
    Ok(())
}
