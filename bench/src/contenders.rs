//! The contenders, each forwarding client connections to the same upstream: direct TCP, this
//! project (CONNECT → proxy-server → mTLS gRPC → proxy-agent), rathole (plain TCP, and
//! Noise-encrypted) and ssh -R (aes128-gcm).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::relay::Link;

pub use crate::entry::Entry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A started contender; its processes are killed when it is dropped.
pub struct Running {
    /// Short name used in reports.
    pub name: &'static str,
    /// How clients reach the upstream.
    pub entry: Entry,
    /// Its processes, by role, for CPU and memory accounting.
    pub pids: Vec<(&'static str, u32)>,
    /// The upstream itself (for its counters), not through the contender.
    pub upstream: SocketAddr,
    _children: Vec<Child>,
    _dir: Option<tempfile::TempDir>,
}

/// In front of `addr`, a relay emulating the `wan` path (if any).
async fn via_wan(addr: SocketAddr, wan: Option<Link>) -> anyhow::Result<SocketAddr> {
    match wan {
        Some(path) => integration_tests::relay::start_path(addr, path).await,
        None => Ok(addr),
    }
}

/// The baseline: clients connect straight to the upstream (through the WAN relay, if any).
pub async fn direct(upstream: SocketAddr, wan: Option<Link>) -> anyhow::Result<Running> {
    Ok(Running {
        name: if wan.is_some() {
            "direct+wan"
        } else {
            "direct"
        },
        entry: Entry::Tcp(via_wan(upstream, wan).await?),
        pids: Vec::new(),
        upstream,
        _children: Vec::new(),
        _dir: None,
    })
}

fn spawn(cmd: &mut Command) -> anyhow::Result<Child> {
    Ok(cmd.stdin(Stdio::null()).kill_on_drop(true).spawn()?)
}

/// This project's binaries log at `warn` into nothing, unless `BENCH_LOG` names a filter (e.g.
/// `proxy_common::flow=debug` to watch windows while profiling): then each appends its log to
/// `proxy-server.log` / `proxy-agent.log` in the working directory.
fn ours(cmd: &mut Command, name: &str) -> anyhow::Result<()> {
    match std::env::var("BENCH_LOG") {
        Ok(filter) => {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(format!("{name}.log"))?;
            cmd.env("RUST_LOG", filter).stderr(log);
        }
        Err(_) => {
            cmd.env("RUST_LOG", "warn").stderr(Stdio::null());
        }
    }
    Ok(())
}

async fn wait_until_open(entry: &Entry, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = entry.connect().await {
            // A round trip proves the whole path, not just the entry port.
            s.write_all(b"R").await?;
            s.write_all(&[0u8; crate::upstream::REQUEST]).await?;
            let mut resp = [0u8; crate::upstream::RESPONSE];
            if tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut resp))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{what} did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The proxy server's agent-side PKI files.
pub struct ServerFiles {
    /// CA that signs agent certificates.
    pub ca: PathBuf,
    /// Server certificate for the agent listener.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// Where a started proxy-server listens.
#[derive(Debug, Clone, Copy)]
pub struct ServerAddrs {
    /// Agent (gRPC) listener.
    pub agent: SocketAddr,
    /// CONNECT listener.
    pub frontend: SocketAddr,
    /// Admin (metrics) listener.
    pub admin: SocketAddr,
}

/// `--operator-addr` on a free port for a server that has one (a baseline built before the
/// operator listener existed refuses the flag).
fn operator_flag(bin_dir: &Path) -> Vec<&'static str> {
    let help = std::process::Command::new(bin_dir.join("proxy-server"))
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if help.contains("--operator-addr") {
        vec!["--operator-addr", "127.0.0.1:0"]
    } else {
        Vec::new()
    }
}

/// Starts `bin_dir/proxy-server` on `[agent, frontend, admin]` addresses (port 0: any) with
/// connection limits out of the way and `extra` flags; returns once it printed where it listens.
pub async fn start_server(
    bin_dir: &Path,
    files: &ServerFiles,
    [agent, frontend, admin]: [&str; 3],
    extra: &[&str],
) -> anyhow::Result<(Child, ServerAddrs)> {
    let s = |p: &PathBuf| p.display().to_string();
    let mut cmd = Command::new(bin_dir.join("proxy-server"));
    ours(&mut cmd, "proxy-server")?;
    let mut server = spawn(
        cmd.args(["--agent-addr", agent, "--frontend-addr", frontend])
            .args(["--admin-addr", admin])
            .args(operator_flag(bin_dir))
            .args(["--agent-tls-cert", &s(&files.cert)])
            .args(["--agent-tls-key", &s(&files.key)])
            .args(["--agent-ca", &s(&files.ca)])
            .args([
                "--max-connections",
                "100000",
                "--max-connections-per-cluster",
                "100000",
            ])
            .args(extra)
            .stdout(Stdio::piped()),
    )
    .context("starting proxy-server (build with `cargo build --release`)")?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().context("stdout")?)
        .read_line(&mut line)
        .await?;
    let field = |key: &str| -> anyhow::Result<SocketAddr> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .with_context(|| format!("proxy-server startup line {line:?}"))?
            .parse()
            .context("address")
    };
    let addrs = ServerAddrs {
        agent: field("agent=")?,
        frontend: field("frontend=")?,
        admin: field("admin=")?,
    };
    Ok((server, addrs))
}

/// This project, from the binaries in `bin_dir`, with a PKI made for the run. With `wan`, the
/// agent reaches the server through the delay relay. `baseline`: an older build to compare with
/// (`--baseline-bin-dir`), reported as `baseline`.
pub async fn proxy(
    bin_dir: &Path,
    upstream: SocketAddr,
    wan: Option<Link>,
    baseline: bool,
) -> anyhow::Result<Running> {
    proxy_with(bin_dir, upstream, wan, baseline, false).await
}

/// [`proxy`] with a TLS frontend (the server's certificate, which the run's proxy CA signed):
/// clients speak TLS to it, then CONNECT inside. Reported as `proxy+tls` / `baseline+tls`.
pub async fn proxy_tls(
    bin_dir: &Path,
    upstream: SocketAddr,
    baseline: bool,
) -> anyhow::Result<Running> {
    proxy_with(bin_dir, upstream, None, baseline, true).await
}

async fn proxy_with(
    bin_dir: &Path,
    upstream: SocketAddr,
    wan: Option<Link>,
    baseline: bool,
    tls: bool,
) -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let pki = proxy_certs::write_dev_pki(dir.path(), &["bench"])?;
    let s = |p: PathBuf| p.display().to_string();
    let (server, addrs) = start_server(
        bin_dir,
        &ServerFiles {
            ca: pki.agent_ca(),
            cert: pki.server_cert(),
            key: pki.server_key(),
        },
        ["127.0.0.1:0"; 3],
        &if tls {
            vec![
                "--frontend-tls-cert".to_owned(),
                s(pki.server_cert()),
                "--frontend-tls-key".to_owned(),
                s(pki.server_key()),
            ]
        } else {
            Vec::new()
        }
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    )
    .await?;
    let (agent_addr, frontend) = (via_wan(addrs.agent, wan).await?, addrs.frontend);
    let mut cmd = Command::new(bin_dir.join("proxy-agent"));
    ours(&mut cmd, "proxy-agent")?;
    let agent = spawn(
        cmd.args([
            "--server",
            &agent_addr.to_string(),
            "--server-name",
            "localhost",
        ])
        .args([
            "--tls-cert",
            &s(pki.agent_cert("bench")),
            "--tls-key",
            &s(pki.agent_key("bench")),
        ])
        .args([
            "--server-ca",
            &s(pki.server_ca()),
            "--upstream",
            &upstream.to_string(),
        ])
        .args(["--admin-addr", "127.0.0.1:0"])
        .stdout(Stdio::null()),
    )?;
    let entry = if tls {
        Entry::ConnectTls {
            proxy: frontend,
            cluster: "bench".into(),
            tls: crate::entry::trusting(&pki.server_ca())?,
        }
    } else {
        Entry::Connect {
            proxy: frontend,
            cluster: "bench".into(),
        }
    };
    wait_until_open(&entry, "proxy").await?;
    Ok(Running {
        name: match (baseline, wan.is_some(), tls) {
            (false, _, true) => "proxy+tls",
            (true, _, true) => "baseline+tls",
            (false, false, false) => "proxy",
            (false, true, false) => "proxy+wan",
            (true, false, false) => "baseline",
            (true, true, false) => "baseline+wan",
        },
        entry,
        pids: vec![
            ("server", server.id().unwrap_or(0)),
            ("agent", agent.id().unwrap_or(0)),
        ],
        upstream,
        _children: vec![server, agent],
        _dir: Some(dir),
    })
}

/// A port for a contender to bind later: outside the ephemeral range, so no outgoing
/// connection takes it meanwhile (see `integration_tests::fleet::free_port`).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(integration_tests::fleet::free_port())
}

/// How rathole's client and server talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatholeTransport {
    /// Plain TCP: no encryption, no authentication of the server (rathole's default).
    Tcp,
    /// The Noise protocol (`Noise_NK_25519_ChaChaPoly_BLAKE2s`, rathole's default pattern):
    /// every byte encrypted and the server authenticated by its key, as our mTLS tunnel does
    /// (with certificates, and the agent authenticated too). The like-for-like peer: what an
    /// encrypted tunnel costs, where `Tcp` shows what no encryption costs.
    Noise,
}

/// rathole with `transport`, if `rathole` is installed (with the `noise` feature for
/// [`RatholeTransport::Noise`]; bench/setup.sh builds it so). With `wan`, its client reaches its
/// server through the delay relay.
pub async fn rathole(
    upstream: SocketAddr,
    wan: Option<Link>,
    transport: RatholeTransport,
) -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let (control, exposed) = (free_port()?, free_port()?);
    let remote = via_wan(SocketAddr::from(([127, 0, 0, 1], control)), wan).await?;
    let server_cfg = dir.path().join("server.toml");
    let client_cfg = dir.path().join("client.toml");
    let (server_transport, client_transport) = match transport {
        RatholeTransport::Tcp => (String::new(), String::new()),
        RatholeTransport::Noise => {
            let (private, public) = rathole_keypair().await?;
            (
                format!(
                    "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"
                ),
                format!(
                    "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n"
                ),
            )
        }
    };
    std::fs::write(
        &server_cfg,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n{server_transport}[server.services.up]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{exposed}\"\n"
        ),
    )?;
    std::fs::write(
        &client_cfg,
        format!(
            "[client]\nremote_addr = \"{remote}\"\n{client_transport}[client.services.up]\ntoken = \"bench\"\nlocal_addr = \"{upstream}\"\n"
        ),
    )?;
    let quiet = |c: &mut Command| {
        c.env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut cmd = Command::new("rathole");
    cmd.arg("--server").arg(&server_cfg);
    quiet(&mut cmd);
    let server = spawn(&mut cmd).context("rathole is not installed (bench/setup.sh)")?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut cmd = Command::new("rathole");
    cmd.arg("--client").arg(&client_cfg);
    quiet(&mut cmd);
    let client = spawn(&mut cmd)?;
    let entry = Entry::Tcp(SocketAddr::from(([127, 0, 0, 1], exposed)));
    wait_until_open(&entry, "rathole").await?;
    Ok(Running {
        name: match (transport, wan.is_some()) {
            (RatholeTransport::Tcp, false) => "rathole",
            (RatholeTransport::Tcp, true) => "rathole+wan",
            (RatholeTransport::Noise, false) => "rathole-noise",
            (RatholeTransport::Noise, true) => "rathole-noise+wan",
        },
        entry,
        pids: vec![
            ("server", server.id().unwrap_or(0)),
            ("client", client.id().unwrap_or(0)),
        ],
        upstream,
        _children: vec![server, client],
        _dir: Some(dir),
    })
}

/// A Noise key pair from `rathole --genkey`: (private, public), base64. Fails with rathole's
/// own message when it was built without the `noise` feature.
async fn rathole_keypair() -> anyhow::Result<(String, String)> {
    let out = Command::new("rathole")
        .arg("--genkey")
        .output()
        .await
        .context("rathole is not installed (bench/setup.sh)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let key = |label: &str| {
        let mut lines = text.lines().skip_while(|l| !l.starts_with(label)).skip(1);
        lines
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
    };
    match (out.status.success(), key("Private Key"), key("Public Key")) {
        (true, Some(private), Some(public)) => Ok((private, public)),
        _ => {
            // rathole reports a missing feature as a panic: keep its message, not the panic's
            // location and backtrace hint around it.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let message: Vec<&str> = stderr
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("thread ") && !l.starts_with("note:"))
                .collect();
            bail!(
                "rathole --genkey failed (bench/setup.sh builds it with the noise feature): {}",
                message.join(" ")
            )
        }
    }
}

/// `ssh -R` to a private sshd on loopback, cipher aes128-gcm@openssh.com, if OpenSSH is
/// installed. With `wan`, ssh reaches sshd through the delay relay.
pub async fn ssh(upstream: SocketAddr, wan: Option<Link>) -> anyhow::Result<Running> {
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("sshd is not installed (bench/setup.sh)")?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for (key, args) in [("host", "-q"), ("client", "-q")] {
        let status = std::process::Command::new("ssh-keygen")
            .args([args, "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(key))
            .status()
            .context("ssh-keygen")?;
        anyhow::ensure!(status.success(), "ssh-keygen failed");
    }
    std::fs::copy(d.join("client.pub"), d.join("authorized_keys"))?;
    let (sshd_port, exposed) = (free_port()?, free_port()?);
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin yes\nAllowTcpForwarding yes\nCiphers aes128-gcm@openssh.com\nLogLevel ERROR\n",
            d.join("host").display(),
            d.join("authorized_keys").display(),
            d.join("sshd.pid").display(),
        ),
    )?;
    std::fs::create_dir_all("/run/sshd").ok();
    let server = spawn(
        Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sshd_addr = via_wan(SocketAddr::from(([127, 0, 0, 1], sshd_port)), wan).await?;
    let client = spawn(
        Command::new("ssh")
            .args([
                "-N",
                "-T",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
            ])
            .args([
                "-o",
                "ExitOnForwardFailure=yes",
                "-c",
                "aes128-gcm@openssh.com",
                "-i",
            ])
            .arg(d.join("client"))
            .args([
                "-p",
                &sshd_addr.port().to_string(),
                "-R",
                &format!("127.0.0.1:{exposed}:{upstream}"),
            ])
            .arg(format!("{user}@127.0.0.1"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let entry = Entry::Tcp(SocketAddr::from(([127, 0, 0, 1], exposed)));
    wait_until_open(&entry, "ssh -R").await?;
    Ok(Running {
        name: if wan.is_some() { "ssh-R+wan" } else { "ssh-R" },
        entry,
        pids: vec![
            ("sshd", server.id().unwrap_or(0)),
            ("ssh", client.id().unwrap_or(0)),
        ],
        upstream,
        _children: vec![server, client],
        _dir: Some(dir),
    })
}
