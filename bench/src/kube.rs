//! Real Kubernetes: one real member (etcd, kube-apiserver 1.35.4 and kwok, from
//! `integration_tests::real_member`), reached directly and through this project's proxy-server
//! and proxy-agent, in the same run. The figures users recognise: `kubectl get --raw /version`
//! latency (a new kubectl process each time, as a user runs it), a LIST of many ConfigMaps, a
//! client-go informer's initial sync of them, and how long many concurrent watches take to be established (and to all see one change).
//!
//! The member is started and seeded once for both contenders; each scenario runs its rounds
//! interleaved (direct, proxy, direct, proxy, ...).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use integration_tests::real_member::{MemberUser, RealMember, k8s_bin_dir};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::contenders::{Entry, ServerFiles, start_server};
use crate::report::{Outcome, ScenarioResult};
use crate::scenarios::Sample;

/// `kubectl get --raw /version`, sequential, each a new kubectl: p50 in ms.
pub const VERSION: &str = "kube, kubectl get --raw /version x200";
/// One LIST of every seeded ConfigMap (client-go, no paging): MB/s.
pub const LIST: &str = "kube, LIST 10000 ConfigMaps";
/// A client-go informer's initial sync of every seeded ConfigMap: seconds.
pub const INFORMER: &str = "kube, informer initial sync of 10000 ConfigMaps";
/// Concurrent watches of the seeded namespace: ms until all are established.
pub const WATCHES: &str = "kube, 50 concurrent watches established";
/// Every kube scenario, in the order they run.
pub const NAMES: [&str; 4] = [VERSION, LIST, INFORMER, WATCHES];

/// The member's cluster name (and the proxy's cluster for it).
const CLUSTER: &str = "alpha";
/// Where the ConfigMaps are seeded.
const NAMESPACE: &str = "bulk";
/// Longest one measurement may take.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(300);

/// How much of each.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// `kubectl get --raw /version` runs per round.
    pub versions: usize,
    /// ConfigMaps seeded (1 KiB of data each) and listed.
    pub configmaps: usize,
    /// Concurrent watches.
    pub watches: usize,
}

/// One way to the member: its kubeconfig and how a raw client connects.
struct Target {
    name: &'static str,
    kubeconfig: PathBuf,
    entry: Entry,
}

/// The member, the proxy in front of it (when wanted), and the files both use.
struct Setup {
    member: RealMember,
    /// `push-controller` (seed and list), next to the member's binaries.
    controller: PathBuf,
    /// The member's CA, trusted for `kubernetes.default.svc`.
    tls: Arc<rustls::ClientConfig>,
    /// kubectl's cache (discovery), shared by every run: warm, as a user's is.
    cache: PathBuf,
    targets: Vec<Target>,
    /// proxy-server and proxy-agent; killed (by PID) when dropped.
    _children: Vec<Child>,
    _dir: tempfile::TempDir,
}

/// Runs the wanted kube scenarios for the wanted contenders (`direct`, `proxy`).
pub async fn run(args: &crate::Args, sizes: Sizes, rounds: usize) -> Vec<ScenarioResult> {
    let wanted: Vec<&'static str> = NAMES.into_iter().filter(|n| args.wants(n)).collect();
    let contenders: Vec<&'static str> = ["direct", "proxy"]
        .into_iter()
        .filter(|c| args.runs(c))
        .collect();
    if wanted.is_empty() || contenders.is_empty() {
        return Vec::new();
    }
    eprintln!("== kube: starting a real member");
    let setup = Setup::start(&args.bin_dir, &contenders, sizes).await;
    let mut results = Vec::new();
    for name in wanted {
        eprintln!("== {name}");
        let mut by_contender: Vec<(String, Vec<Outcome>)> = contenders
            .iter()
            .map(|c| ((*c).to_owned(), Vec::new()))
            .collect();
        for round in 0..rounds {
            for (contender, outcomes) in &mut by_contender {
                let outcome = match &setup {
                    Err(e) => Outcome::Failed(format!("no real member: {e:#}")),
                    Ok(setup) => {
                        let measure = setup.measure(name, contender, sizes);
                        match tokio::time::timeout(MEASURE_TIMEOUT, measure).await {
                            Ok(Ok(sample)) => Outcome::Sample(sample),
                            Ok(Err(e)) => Outcome::Failed(format!("{e:#}")),
                            Err(_) => {
                                Outcome::Failed(format!("no result within {MEASURE_TIMEOUT:?}"))
                            }
                        }
                    }
                };
                eprintln!("   round {round} {contender}: {outcome:?}");
                outcomes.push(outcome);
            }
        }
        let (unit, higher_is_better) = match name {
            VERSION => ("ms p50", false),
            LIST => ("MB/s", true),
            INFORMER => ("s", false),
            _ => ("ms", false),
        };
        results.push(ScenarioResult {
            name,
            unit,
            higher_is_better,
            by_contender,
        });
    }
    results
}

impl Setup {
    async fn start(bin_dir: &Path, contenders: &[&str], sizes: Sizes) -> anyhow::Result<Self> {
        // The lookup panics (with the reason) when the binaries cannot be had, and may run
        // scripts/build-k8s: off the runtime, and a panic becomes an error.
        let k8s = tokio::task::spawn_blocking(k8s_bin_dir)
            .await
            .map_err(|e| anyhow::anyhow!("finding the Kubernetes binaries: {e}"))?;
        let controller = k8s.join("push-controller");
        anyhow::ensure!(
            controller.is_file(),
            "{} is missing (scripts/build-k8s builds it)",
            controller.display()
        );
        let dir = tempfile::tempdir()?;
        let pki = proxy_certs::write_dev_pki(dir.path(), &[CLUSTER])?;
        let started = Instant::now();
        let member = RealMember::start(&pki, CLUSTER).await?;
        eprintln!("   member ready in {:.1?}", started.elapsed());
        let ca = dir.path().join("member-ca.pem");
        std::fs::write(&ca, member.ca_pem())?;
        let tls = crate::entry::trusting(&ca)?;

        let mut targets = Vec::new();
        let mut children = Vec::new();
        let direct_kubeconfig = dir.path().join("kubeconfig-direct");
        member.write_direct_kubeconfig(&direct_kubeconfig, MemberUser::Admin)?;
        if contenders.contains(&"direct") {
            targets.push(Target {
                name: "direct",
                kubeconfig: direct_kubeconfig.clone(),
                entry: Entry::Tcp(member.addr()),
            });
        }
        if contenders.contains(&"proxy") {
            let (server, addrs) = start_server(
                bin_dir,
                &ServerFiles {
                    ca: pki.agent_ca(),
                    cert: pki.server_cert(),
                    key: pki.server_key(),
                },
                ["127.0.0.1:0"; 3],
                &[],
            )
            .await?;
            children.push(server);
            let s = |p: PathBuf| p.display().to_string();
            let agent = Command::new(bin_dir.join("proxy-agent"))
                .args(["--server", &addrs.agent.to_string()])
                .args(["--server-name", "localhost"])
                .args(["--tls-cert", &s(pki.agent_cert(CLUSTER))])
                .args(["--tls-key", &s(pki.agent_key(CLUSTER))])
                .args(["--server-ca", &s(pki.server_ca())])
                .args(["--upstream", &member.addr().to_string()])
                .args(["--admin-addr", "127.0.0.1:0"])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting proxy-agent")?;
            children.push(agent);
            let kubeconfig = dir.path().join("kubeconfig-proxy");
            member.write_kubeconfig(
                &kubeconfig,
                MemberUser::Admin,
                &format!("http://{}", addrs.frontend),
            )?;
            targets.push(Target {
                name: "proxy",
                kubeconfig,
                entry: Entry::Connect {
                    proxy: addrs.frontend,
                    cluster: CLUSTER.into(),
                },
            });
        }
        let setup = Self {
            controller,
            tls,
            cache: dir.path().join("kubectl-cache"),
            targets,
            _children: children,
            _dir: dir,
            member,
        };
        // Every way in answers (the agent has registered) before anything is measured.
        for target in &setup.targets {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match setup.get(&target.entry, "/version").await {
                    Ok(body) if body.contains("v1.35") => break,
                    Ok(body) if Instant::now() > deadline => {
                        bail!("{}: /version answered {body:?}", target.name)
                    }
                    Err(e) if Instant::now() > deadline => {
                        return Err(e.context(format!("{}: /version", target.name)));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        // Seeded once, straight to the member: both contenders list the same objects.
        let started = Instant::now();
        let out = Command::new(&setup.controller)
            .args(["seed", "--kubeconfig"])
            .arg(&direct_kubeconfig)
            .args(["--namespace", NAMESPACE])
            .args(["--count", &sizes.configmaps.to_string()])
            .kill_on_drop(true)
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "push-controller seed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "   seeded {} ConfigMaps in {:.1?}",
            sizes.configmaps,
            started.elapsed()
        );
        Ok(setup)
    }

    fn target(&self, name: &str) -> anyhow::Result<&Target> {
        self.targets
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("no contender {name}"))
    }

    async fn measure(
        &self,
        scenario: &str,
        contender: &str,
        sizes: Sizes,
    ) -> anyhow::Result<Sample> {
        let target = self.target(contender)?;
        match scenario {
            VERSION => self.version(target, sizes.versions).await,
            LIST => self.list(target, sizes.configmaps).await,
            INFORMER => self.informer(target, sizes.configmaps).await,
            _ => self.watches(target, sizes.watches).await,
        }
    }

    /// Runs kubectl on `target`'s kubeconfig; its stdout, or an error with its stderr.
    async fn kubectl(&self, target: &Target, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&target.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(["--request-timeout", "60s"])
            .args(args)
            .env_remove("KUBECONFIG")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {args:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    }

    /// `n` sequential `kubectl get --raw /version`, after one unmeasured.
    async fn version(&self, target: &Target, n: usize) -> anyhow::Result<Sample> {
        self.kubectl(target, &["get", "--raw", "/version"]).await?;
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let mut total = Duration::ZERO;
        for _ in 0..n {
            let t = Instant::now();
            let out = self.kubectl(target, &["get", "--raw", "/version"]).await?;
            let took = t.elapsed();
            anyhow::ensure!(
                String::from_utf8_lossy(&out).contains("gitVersion"),
                "/version answered {:?}",
                String::from_utf8_lossy(&out)
            );
            total += took;
            hist.record((took.as_micros() as u64).clamp(1, 600_000_000))?;
        }
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Ok(Sample {
            value: ms(0.5),
            extra: vec![
                ("requests".into(), n as f64),
                ("p99_ms".into(), ms(0.99)),
                ("max_ms".into(), hist.max() as f64 / 1000.0),
                (
                    "mean_ms".into(),
                    total.as_secs_f64() * 1000.0 / n.max(1) as f64,
                ),
            ],
            cpu_s_per_gb: None,
        })
    }

    /// Runs `push-controller COMMAND` on the seeded namespace through `target`, and returns the
    /// last JSON line it printed that `wanted` accepts.
    async fn controller_json(
        &self,
        target: &Target,
        command: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&self.controller)
            .args([command, "--kubeconfig"])
            .arg(&target.kubeconfig)
            .args(["--namespace", NAMESPACE])
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .kill_on_drop(true)
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "push-controller {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| wanted(v))
            .last()
            .with_context(|| format!("push-controller {command} printed no result: {stdout:.500}"))
    }

    /// One LIST of every ConfigMap by client-go (`push-controller list`, no paging): the
    /// headline is MB/s of response body; also `kubectl get configmaps -o json` (which pages by
    /// 500) wall time.
    async fn list(&self, target: &Target, n: usize) -> anyhow::Result<Sample> {
        let listed = self.controller_json(target, "list", |_| true).await?;
        let field = |k: &str| {
            listed[k]
                .as_f64()
                .with_context(|| format!("list printed {listed}"))
        };
        let (items, bytes, seconds) = (field("items")?, field("bytes")?, field("seconds")?);
        anyhow::ensure!(items as usize == n, "listed {items} ConfigMaps, not {n}");

        let t = Instant::now();
        let json = self
            .kubectl(
                target,
                &["get", "configmaps", "-n", NAMESPACE, "-o", "json"],
            )
            .await?;
        let kubectl_s = t.elapsed().as_secs_f64();
        Ok(Sample {
            value: bytes / seconds / 1e6,
            extra: vec![
                ("items".into(), items),
                ("list_s".into(), seconds),
                ("list_mb".into(), bytes / 1e6),
                ("kubectl_get_o_json_s".into(), kubectl_s),
                ("kubectl_output_mb".into(), json.len() as f64 / 1e6),
            ],
            cpu_s_per_gb: None,
        })
    }

    /// A ConfigMap informer on the seeded namespace (`push-controller sync`: client-go's own
    /// reflector, LIST then WATCH or a streaming watch-list, whichever it chooses): seconds until
    /// `HasSynced`.
    async fn informer(&self, target: &Target, n: usize) -> anyhow::Result<Sample> {
        let synced = self
            .controller_json(target, "sync", |v| v["event"] == "synced")
            .await?;
        let field = |k: &str| {
            synced[k]
                .as_f64()
                .with_context(|| format!("sync printed {synced}"))
        };
        let items = field("items")?;
        anyhow::ensure!(
            items as usize == n,
            "the informer holds {items} ConfigMaps, not {n}"
        );
        Ok(Sample {
            value: field("seconds")?,
            extra: vec![
                ("items".into(), items),
                ("lists".into(), field("lists")?),
                ("watches".into(), field("watches")?),
            ],
            cpu_s_per_gb: None,
        })
    }

    /// `n` watches of the seeded namespace opened at once (each its own connection: TLS to the
    /// API server, through the proxy for `proxy`): ms until every one has its response head.
    /// Then one ConfigMap is created, and the time until every watch has seen it is an extra.
    async fn watches(&self, target: &Target, n: usize) -> anyhow::Result<Sample> {
        // From the current resourceVersion: no initial events for the objects already there.
        let page = self
            .get(
                &target.entry,
                &format!("/api/v1/namespaces/{NAMESPACE}/configmaps?limit=1"),
            )
            .await?;
        let rv = page
            .split("\"resourceVersion\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .with_context(|| format!("no resourceVersion in {page:.200}"))?
            .to_owned();
        let path = format!(
            "/api/v1/namespaces/{NAMESPACE}/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=120"
        );
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let (entry, tls, token, path) = (
                target.entry.clone(),
                self.tls.clone(),
                self.token(),
                path.clone(),
            );
            set.spawn(async move {
                let mut s = open_tls(&entry, tls).await?;
                let head = request(&mut s, "GET", &path, &token, None, true).await?;
                anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "watch: {head}");
                Ok::<_, anyhow::Error>((i, s, started.elapsed()))
            });
        }
        let mut streams = Vec::with_capacity(n);
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        while let Some(done) = set.join_next().await {
            let (_, s, took) = done??;
            hist.record((took.as_micros() as u64).clamp(1, 600_000_000))?;
            streams.push(s);
        }
        let all = started.elapsed();

        // One change, which every watch must deliver.
        let name = format!(
            "watched-{}",
            std::process::id() ^ started.elapsed().as_nanos() as u32
        );
        let t = Instant::now();
        self.member
            .request(
                "POST",
                &format!("/api/v1/namespaces/{NAMESPACE}/configmaps"),
                Some(serde_json::json!({"metadata": {"name": name}, "data": {"k": "v"}})),
            )
            .await
            .and_then(|(status, body)| {
                anyhow::ensure!(
                    status == 201,
                    "create: {status} {}",
                    String::from_utf8_lossy(&body)
                );
                Ok(())
            })?;
        for mut s in streams {
            let name = name.clone();
            set.spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !contains(&seen, name.as_bytes()) {
                    let read = s.read(&mut buf).await?;
                    anyhow::ensure!(read > 0, "watch ended before the change");
                    seen.extend_from_slice(&buf[..read]);
                }
                Ok((0, s, Duration::ZERO))
            });
        }
        while let Some(done) = set.join_next().await {
            done??;
        }
        let delivered = t.elapsed();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Ok(Sample {
            value: ms(all),
            extra: vec![
                ("watches".into(), n as f64),
                (
                    "established_p50_ms".into(),
                    hist.value_at_quantile(0.5) as f64 / 1000.0,
                ),
                ("event_to_all_ms".into(), ms(delivered)),
            ],
            cpu_s_per_gb: None,
        })
    }

    fn token(&self) -> String {
        self.member.token(MemberUser::Admin).to_owned()
    }

    /// A GET over a fresh connection by `entry`; the body as text.
    async fn get(&self, entry: &Entry, path: &str) -> anyhow::Result<String> {
        let mut s = open_tls(entry, self.tls.clone()).await?;
        request(&mut s, "GET", path, &self.token(), None, false).await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.or_else(|e| {
            // The API server may close without a TLS close_notify.
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(0)
            } else {
                Err(e)
            }
        })?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// TCP by `entry` (through CONNECT for the proxy), then TLS to the API server.
async fn open_tls(entry: &Entry, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<Tls> {
    let tcp = entry.open().await?;
    let name = rustls::pki_types::ServerName::try_from("kubernetes.default.svc")?;
    Ok(tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?)
}

/// Sends a request (HTTP/1.0 unless `keep` asks for a streaming HTTP/1.1 one) and, for `keep`,
/// reads and returns the response head; otherwise returns nothing and leaves the whole answer
/// unread.
async fn request(
    s: &mut Tls,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
    keep: bool,
) -> anyhow::Result<String> {
    let version = if keep { "HTTP/1.1" } else { "HTTP/1.0" };
    let body = body.unwrap_or_default();
    s.write_all(
        format!(
            "{method} {path} {version}\r\nHost: kubernetes.default.svc\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    s.flush().await?;
    if !keep {
        return Ok(String::new());
    }
    read_head(s).await
}

/// Reads up to the end of a response head, a byte at a time (rustls serves them from its
/// buffer).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await?);
        anyhow::ensure!(head.len() < 16 * 1024, "response head too long");
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
