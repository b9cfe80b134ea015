//! Running the real `proxy-server` and `proxy-agent` binaries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proxy_certs::DevPki;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Path of a workspace binary: `$PROXY_BIN_DIR/<name>`, or beside the test executable's
/// `deps` folder (where cargo puts the binaries it builds for the workspace's tests).
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("PROXY_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let deps = exe.parent().expect("exe dir");
            deps.parent().expect("target profile dir").to_owned()
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace binaries first (`cargo build --bins`) or set PROXY_BIN_DIR",
        path.display()
    );
    path
}

/// A running child process whose stderr goes to a log file; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    log: PathBuf,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Starts `bin` with `args`, logging stderr to `log`, and returns it with the first line it
    /// prints on stdout (the bound addresses).
    pub async fn spawn(
        name: &str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<(Self, String)> {
        let log_file = std::fs::File::create(&log)?;
        Self::spawn_to(name, bin, args, log, Stdio::from(log_file)).await
    }

    /// Like [`Proc::spawn`], with stderr going to `stderr` (`log` is then only where
    /// [`Proc::logs`] looks).
    pub async fn spawn_to(
        name: &str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
        stderr: Stdio,
    ) -> anyhow::Result<(Self, String)> {
        let mut child = Command::new(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info,proxy_agent=debug".into()),
            )
            // An error's backtrace would bury its message in the log a failing test prints;
            // panics still get theirs (RUST_BACKTRACE).
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("no startup line within 20 s")??;
        let proc = Self {
            child,
            log,
            name: name.to_owned(),
        };
        let Some(line) = line else {
            bail!("{name} exited before starting:\n{}", proc.logs());
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((proc, line))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once `count` lines contain `needle`, or after 10 s whatever is there. The
    /// binaries write their log from a thread of their own, so a line reaches the file a moment
    /// after the event it reports: a test that saw the event waits here for its line.
    pub async fn logs_with(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if logs.matches(needle).count() >= count || Instant::now() > deadline {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`...).
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// SIGKILL and reap.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(timeout, self.child.wait()).await??)
    }
}

fn field(line: &str, key: &str) -> anyhow::Result<SocketAddr> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .with_context(|| format!("no {key}= in {line:?}"))?
        .parse()
        .with_context(|| format!("bad {key} address in {line:?}"))
}

/// A running proxy-server.
#[derive(Debug)]
pub struct ServerProc {
    /// The process.
    pub proc: Proc,
    /// Agent (gRPC) listener.
    pub agent_addr: SocketAddr,
    /// CONNECT listener.
    pub frontend_addr: SocketAddr,
    /// Admin listener (health, metrics).
    pub admin_addr: SocketAddr,
    /// Operator listener (status page, cluster list, kubeconfigs).
    pub operator_addr: SocketAddr,
}

impl ServerProc {
    /// Starts a server with the certificates of `pki`; `agent_addr` defaults to a free port.
    pub async fn start(
        pki: &DevPki,
        agent_addr: Option<SocketAddr>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let agent = agent_addr.map(|a| a.to_string());
        let mut args: Vec<&str> = Vec::new();
        if let Some(agent) = &agent {
            args.extend(["--agent-addr", agent]);
        }
        args.extend_from_slice(extra);
        Self::start_wrapped(pki, &args, |bin, args| (bin.to_owned(), args.to_vec())).await
    }

    /// Like [`ServerProc::start`], but `wrap` turns the binary and its arguments into the
    /// command actually run (e.g. under `unshare`); it must `exec` the server in the end.
    pub async fn start_wrapped(
        pki: &DevPki,
        extra: &[&str],
        wrap: impl FnOnce(&Path, &[String]) -> (PathBuf, Vec<String>),
    ) -> anyhow::Result<Self> {
        Self::start_inner(pki, extra, wrap, None).await
    }

    /// Like [`ServerProc::start`] (its listeners on free ports), with the server's stderr going
    /// to `stderr` instead of a log file: e.g. a pipe nobody reads.
    pub async fn start_with_stderr(
        pki: &DevPki,
        extra: &[&str],
        stderr: Stdio,
    ) -> anyhow::Result<Self> {
        Self::start_inner(
            pki,
            extra,
            |bin, args| (bin.to_owned(), args.to_vec()),
            Some(stderr),
        )
        .await
    }

    async fn start_inner(
        pki: &DevPki,
        extra: &[&str],
        wrap: impl FnOnce(&Path, &[String]) -> (PathBuf, Vec<String>),
        stderr: Option<Stdio>,
    ) -> anyhow::Result<Self> {
        let agent = "127.0.0.1:0".to_owned();
        let defaults: [(&str, String); 7] = [
            ("--agent-addr", agent),
            ("--frontend-addr", "127.0.0.1:0".into()),
            ("--admin-addr", "127.0.0.1:0".into()),
            ("--operator-addr", "127.0.0.1:0".into()),
            ("--agent-tls-cert", pki.server_cert().display().to_string()),
            ("--agent-tls-key", pki.server_key().display().to_string()),
            ("--agent-ca", pki.agent_ca().display().to_string()),
        ];
        // `extra` may override any default.
        let mut args: Vec<String> = Vec::new();
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag.to_owned(), value]);
            }
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let log = unique_log(&pki.dir, "server");
        let (program, args) = wrap(&bin("proxy-server"), &args);
        let (proc, line) = match stderr {
            Some(stderr) => Proc::spawn_to("proxy-server", &program, &args, log, stderr).await?,
            None => Proc::spawn("proxy-server", &program, &args, log).await?,
        };
        let server = Self {
            agent_addr: field(&line, "agent")?,
            frontend_addr: field(&line, "frontend")?,
            admin_addr: field(&line, "admin")?,
            operator_addr: field(&line, "operator")?,
            proc,
        };
        // Alive, not necessarily ready: a replica of a fleet is not ready during its warm-up.
        wait_ok(server.admin_addr, "/healthz", Duration::from_secs(10)).await?;
        Ok(server)
    }
}

/// Agent flags turning warm connections off, for tests that count the agent's upstream dials
/// or tell its upstream connections apart by their order: a warm connection is dialed ahead of
/// demand, so it adds to the count and can arrive before the dial of the CONNECT at hand. The
/// warm path has its own tests (`tests/warm.rs`).
pub const NO_WARM: [&str; 2] = ["--warm-connections", "0"];

/// A running proxy-agent.
#[derive(Debug)]
pub struct AgentProc {
    /// The process.
    pub proc: Proc,
    /// Admin listener.
    pub admin_addr: SocketAddr,
}

impl AgentProc {
    /// Starts an agent with the certificate of `cert_cluster`, tunnelling to `servers`, dialing
    /// `upstream`. Does not wait for registration (see [`AgentProc::wait_registered`]).
    pub async fn start(
        pki: &DevPki,
        servers: &[SocketAddr],
        cert_cluster: &str,
        upstream: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with_env(pki, servers, cert_cluster, upstream, extra, &[]).await
    }

    /// [`AgentProc::start`] with environment variables `env` set for the agent (run through
    /// `env`, which execs it: the pid is the agent's).
    pub async fn start_with_env(
        pki: &DevPki,
        servers: &[SocketAddr],
        cert_cluster: &str,
        upstream: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        args.push(bin("proxy-agent").display().to_string());
        for s in servers {
            args.extend(["--server".into(), s.to_string()]);
        }
        args.extend([
            "--server-name".into(),
            "localhost".into(),
            "--tls-cert".into(),
            pki.agent_cert(cert_cluster).display().to_string(),
            "--tls-key".into(),
            pki.agent_key(cert_cluster).display().to_string(),
            "--server-ca".into(),
            pki.server_ca().display().to_string(),
            "--upstream".into(),
            upstream.to_string(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
        ]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let log = unique_log(&pki.dir, &format!("agent-{cert_cluster}"));
        let (proc, line) = Proc::spawn("proxy-agent", Path::new("env"), &args, log).await?;
        Ok(Self {
            admin_addr: field(&line, "admin")?,
            proc,
        })
    }

    /// Starts an agent without certificate flags, tunnelling to `servers` (verified as
    /// `localhost`), dialing `upstream`, with `extra` (its `--state-dir`, `--join-token`, ...).
    /// Fails if the agent exits before it prints its admin address (a join refused at start).
    pub async fn start_joining(
        log_dir: &Path,
        servers: &[SocketAddr],
        upstream: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<String> = Vec::new();
        for s in servers {
            args.extend(["--server".into(), s.to_string()]);
        }
        args.extend([
            "--server-name".into(),
            "localhost".into(),
            "--upstream".into(),
            upstream.to_string(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
        ]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let log = unique_log(log_dir, "agent-joining");
        let (proc, line) = Proc::spawn("proxy-agent", &bin("proxy-agent"), &args, log).await?;
        Ok(Self {
            admin_addr: field(&line, "admin")?,
            proc,
        })
    }

    /// Starts an agent and waits until it is registered with every server it was given... at
    /// least one, as its `/readyz` reports.
    pub async fn start_ready(
        pki: &DevPki,
        servers: &[SocketAddr],
        cluster: &str,
        upstream: SocketAddr,
    ) -> anyhow::Result<Self> {
        let agent = Self::start(pki, servers, cluster, upstream, &[]).await?;
        agent.wait_registered(Duration::from_secs(10)).await?;
        Ok(agent)
    }

    /// [`AgentProc::start`] with `extra` flags, then waits until it is registered.
    pub async fn start_ready_with(
        pki: &DevPki,
        servers: &[SocketAddr],
        cluster: &str,
        upstream: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let agent = Self::start(pki, servers, cluster, upstream, extra).await?;
        agent.wait_registered(Duration::from_secs(10)).await?;
        Ok(agent)
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn wait_registered(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_ready(self.admin_addr, timeout)
            .await
            .with_context(|| format!("agent not registered; its log:\n{}", self.proc.logs()))
    }
}

fn unique_log(dir: &Path, stem: &str) -> PathBuf {
    for i in 0.. {
        let p = dir.join(format!("{stem}-{i}.log"));
        if !p.exists() {
            return p;
        }
    }
    unreachable!()
}

/// GETs `path` on an admin listener; returns (status, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    admin_request(addr, path, &addr.to_string(), &[]).await
}

/// GETs `path` on an admin listener naming `host` in its `Host` header, with `headers`
/// (`Name: value` lines); returns (status, body).
pub async fn admin_request(
    addr: SocketAddr,
    path: &str,
    host: &str,
    headers: &[&str],
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("bad admin response")?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body).context("bad chunked body")?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// The body of a `Transfer-Encoding: chunked` response (Prometheus answers so).
fn dechunk(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// The value of one sample in an admin `/metrics` page (`name{labels}` exactly as printed).
/// Panics if the page has no such series: a misspelt name must fail a test, not read as 0.
pub async fn metric(addr: SocketAddr, sample: &str) -> f64 {
    metric_opt(addr, sample)
        .await
        .unwrap_or_else(|| panic!("{addr}/metrics has no series {sample}"))
}

/// The value of one sample, or `None` when the page has no such series.
pub async fn metric_opt(addr: SocketAddr, sample: &str) -> Option<f64> {
    let (_, body) = admin_get(addr, "/metrics").await.expect("metrics");
    body.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `/readyz` until it answers 200 or `timeout` passes.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    wait_ok(addr, "/readyz", timeout).await
}

/// Polls `path` on an admin listener until it answers 200 or `timeout` passes.
pub async fn wait_ok(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match admin_get(addr, path).await {
            Ok((200, _)) => return Ok(()),
            other if Instant::now() >= deadline => {
                bail!("{addr}{path} not 200 after {timeout:?}: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Resident memory of process `pid`, KiB (`VmRSS`; 0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
