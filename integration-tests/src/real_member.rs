//! [`RealMember`]: a real Kubernetes member cluster for the end-to-end tests, where
//! [`crate::FakeApiServer`] only plays one.
//!
//! A member is three real processes on loopback, built from Go modules by `scripts/build-k8s`
//! (see `integration-tests/k8s/README.md`):
//!
//! * **etcd**, on free ports, its data in the member's temporary folder, `--unsafe-no-fsync`
//!   (a test throws the data away: waiting for the disk would only slow every write);
//! * **kube-apiserver**, serving TLS on a free loopback port with the member's own CA from the
//!   test's [`DevPki`] (a certificate for `kubernetes.default.svc`, `localhost`, `127.0.0.1` and the
//!   cluster name), `Node,RBAC` authorization, a token file with an [`MemberUser::Admin`] in
//!   `system:masters` and a [`MemberUser::Restricted`] user who may only read namespaces, and a
//!   service-account signing key of its own;
//! * **kwok**, one fake node (`<cluster>-node`) whose pods kwok marks running, and whose kubelet
//!   API kwok serves itself: logs and attach from files in the member's folder, exec by running the
//!   command on this machine, port-forward to an address the test chooses.
//!
//! No scheduler or controller manager runs: a test puts its pods on the node itself
//! (`spec.nodeName`), and pods need no service account (the `ServiceAccount` admission plugin,
//! which would wait for the controller manager to create one, is off).
//!
//! Everything runs as a child of the test, is killed by PID when the [`RealMember`] drops, and
//! leaves nothing behind: the folder goes with it.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use proxy_certs::DevPki;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// Environment variable naming a folder with `kube-apiserver`, `etcd` and `kwok` (and
/// `../share/kwok/stages.yaml`) to use instead of running `scripts/build-k8s`.
pub const BIN_DIR_ENV: &str = "MCP_K8S_BIN_DIR";

/// How long a member may take to start, all three processes together. A cold start is a few
/// seconds; two members starting at once on two busy cores take longer.
const START_LIMIT: Duration = Duration::from_secs(60);

/// How often a starting member is polled.
const POLL: Duration = Duration::from_millis(50);

/// The users in a member's token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberUser {
    /// `admin`, in `system:masters`: allowed everything.
    Admin,
    /// `restricted`: may get, list and watch namespaces (a ClusterRole the member is started
    /// with), and nothing else.
    Restricted,
}

impl MemberUser {
    /// The user name the API server knows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Restricted => "restricted",
        }
    }
}

/// What a member is started with beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct MemberOptions {
    /// Where kwok forwards `kubectl port-forward` to any pod of the node (every pod port goes to
    /// this one address). Without it, port-forward fails.
    pub port_forward_to: Option<SocketAddr>,
}

/// The folder holding `kube-apiserver`, `etcd` and `kwok`: [`BIN_DIR_ENV`] if set, otherwise what
/// `scripts/build-k8s` prints on its last line after building them (or finding them in its cache).
/// Panics with the reason when they cannot be had: a test that needs a real member must fail then,
/// not skip.
pub fn k8s_bin_dir() -> PathBuf {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(find_bin_dir)
        .clone()
        .unwrap_or_else(|why| panic!("no real Kubernetes binaries: {why}"))
}

fn find_bin_dir() -> Result<PathBuf, String> {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-k8s");
            let out = std::process::Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                return Err(format!(
                    "{} failed ({}):\n{}",
                    script.display(),
                    out.status,
                    tail(&stderr, 40)
                ));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = stdout.lines().last().unwrap_or_default().trim();
            if last.is_empty() {
                return Err(format!(
                    "{} printed no bin folder:\n{}",
                    script.display(),
                    tail(&stderr, 40)
                ));
            }
            PathBuf::from(last)
        }
    };
    for name in ["kube-apiserver", "etcd", "kwok"] {
        if !dir.join(name).is_file() {
            return Err(format!(
                "{} has no {name} (set {BIN_DIR_ENV} to a folder that has kube-apiserver, etcd and kwok, or unset it to build them with scripts/build-k8s)",
                dir.display()
            ));
        }
    }
    if !stages_file(&dir).is_file() {
        return Err(format!(
            "{} is missing: scripts/build-k8s writes kwok's stages there",
            stages_file(&dir).display()
        ));
    }
    Ok(dir)
}

/// kwok's node and pod stages, which `scripts/build-k8s` copies from the kwok module it builds.
fn stages_file(bin: &Path) -> PathBuf {
    bin.join("../share/kwok/stages.yaml")
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One child process of a member, its stdout and stderr in a log file; killed by PID and reaped
/// when dropped.
#[derive(Debug)]
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        env: &[(&str, &Path)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (key, value) in env {
            cmd.env(key, value);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self { name, child, log })
    }

    /// Fails, with the end of the log, if the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited ({status}):\n{}", self.name, self.log_tail()),
            Err(e) => bail!("{}: cannot poll the process: {e}", self.name),
        }
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }

    /// SIGKILL by PID and reap. Nothing of a member outlives its test, so there is no state to
    /// shut down cleanly for.
    fn stop(&mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `n` distinct free loopback ports, held together until all are picked so none repeats.
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// 32 random hex digits (a bearer token).
fn random_token() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// A running real member cluster. Dropping it kills kwok, kube-apiserver and etcd (in that
/// order, by PID) and removes its folder.
#[derive(Debug)]
pub struct RealMember {
    cluster: String,
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    admin_token: String,
    restricted_token: String,
    node: String,
    // Stopped in this order by `Drop`: the clients of a server before the server.
    kwok: Daemon,
    apiserver: Daemon,
    etcd: Daemon,
    /// Dropped last (fields drop in declaration order, after `Drop::drop`).
    dir: tempfile::TempDir,
}

impl Drop for RealMember {
    fn drop(&mut self) {
        self.kwok.stop();
        self.apiserver.stop();
        self.etcd.stop();
    }
}

impl RealMember {
    /// Starts the member `cluster` with its API-server certificate and CA from `pki`, with
    /// default [`MemberOptions`].
    pub async fn start(pki: &DevPki, cluster: &str) -> anyhow::Result<Self> {
        Self::start_with(pki, cluster, MemberOptions::default()).await
    }

    /// Starts the member `cluster` and returns once its API server is ready (`/readyz`) and its
    /// node is `Ready`. Fails with the end of the failing process's log.
    pub async fn start_with(
        pki: &DevPki,
        cluster: &str,
        options: MemberOptions,
    ) -> anyhow::Result<Self> {
        let bin = k8s_bin_dir();
        // Free ports are picked, then released for the processes to bind: another test can take
        // one in between. That shows as an exit naming the address; start afresh then.
        let mut attempt = 1;
        loop {
            match Self::try_start(&bin, pki, cluster, &options).await {
                Err(err)
                    if attempt < 3 && format!("{err:#}").contains("address already in use") =>
                {
                    attempt += 1;
                }
                other => {
                    return other.with_context(|| format!("starting real member {cluster}"));
                }
            }
        }
    }

    async fn try_start(
        bin: &Path,
        pki: &DevPki,
        cluster: &str,
        options: &MemberOptions,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("member-{cluster}-"))
            .tempdir()?;
        let path = |name: &str| dir.path().join(name);

        // The member's own copies: the test's PKI folder may go first.
        let ca_pem = std::fs::read(pki.apiserver_ca(cluster))
            .with_context(|| format!("no API-server CA for {cluster} in the PKI"))?;
        std::fs::write(path("ca.pem"), &ca_pem)?;
        std::fs::copy(pki.apiserver_cert(cluster), path("apiserver.pem"))?;
        std::fs::copy(pki.apiserver_key(cluster), path("apiserver.key"))?;
        // The key that signs service-account tokens: an ECDSA key of the member's own. The API
        // server verifies tokens with public keys and reads no PKCS#8 private key for that, but a
        // certificate carrying the public key does.
        let signer = proxy_certs::Ca::new(&format!("{cluster}-service-accounts"))?.issue(
            "service-account-signer",
            &[],
            proxy_certs::Usage::Client,
        )?;
        std::fs::write(path("service-account.key"), &signer.key_pem)?;
        std::fs::write(path("service-account.pem"), &signer.cert_pem)?;

        let admin_token = random_token()?;
        let restricted_token = random_token()?;
        // token,user,uid,"groups"
        std::fs::write(
            path("tokens.csv"),
            format!(
                "{admin_token},admin,admin,\"system:masters\"\n{restricted_token},restricted,restricted\n"
            ),
        )?;

        let [etcd_client, etcd_peer, api_port, kwok_port] = free_ports::<4>()?;

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd_args: Vec<String> = vec![
            format!("--name={cluster}"),
            format!("--data-dir={}", path("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={cluster}={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        let mut etcd = Daemon::spawn("etcd", &bin.join("etcd"), &etcd_args, &[], path("etcd.log"))?;
        let etcd_addr = SocketAddr::from(([127, 0, 0, 1], etcd_client));
        loop {
            etcd.check_alive()?;
            if let Ok((200, _)) = crate::procs::admin_get(etcd_addr, "/health").await {
                break;
            }
            give_up_after(started, "etcd /health")
                .with_context(|| format!("etcd's log:\n{}", etcd.log_tail()))?;
            tokio::time::sleep(POLL).await;
        }

        let apiserver_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", path("apiserver.pem").display()),
            format!("--tls-private-key-file={}", path("apiserver.key").display()),
            // Where it would write a self-signed certificate (it does not: it has one), instead of
            // /var/run/kubernetes.
            format!("--cert-dir={}", path("apiserver-certs").display()),
            "--authorization-mode=Node,RBAC".into(),
            format!("--token-auth-file={}", path("tokens.csv").display()),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!(
                "--service-account-key-file={}",
                path("service-account.pem").display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                path("service-account.key").display()
            ),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            // No controller manager creates the `default` service account, which the plugin would
            // wait for on every pod.
            "--disable-admission-plugins=ServiceAccount".into(),
            // To the fake node's kubelet API (kwok) for logs, exec, attach and port-forward: at its
            // InternalIP (127.0.0.1), verifying kwok's certificate, which is the API server's own.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!(
                "--kubelet-certificate-authority={}",
                path("ca.pem").display()
            ),
            "--profiling=false".into(),
        ];
        let mut apiserver = Daemon::spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &apiserver_args,
            &[],
            path("kube-apiserver.log"),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], api_port));
        let api = Api {
            addr,
            ca: path("ca.pem"),
            token: admin_token.clone(),
        };
        loop {
            etcd.check_alive()?;
            apiserver.check_alive()?;
            if let Ok((200, _)) = api.request("GET", "/readyz", None).await {
                break;
            }
            give_up_after(started, "kube-apiserver /readyz")
                .with_context(|| format!("kube-apiserver's log:\n{}", apiserver.log_tail()))?;
            tokio::time::sleep(POLL).await;
        }

        // The restricted user may read namespaces, so that its denials elsewhere come from RBAC
        // deciding, not from a user nobody configured.
        api.expect_created(
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "namespace-reader"},
                "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}],
            }),
        )
        .await?;
        api.expect_created(
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "restricted-namespace-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "namespace-reader"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "restricted"}],
            }),
        )
        .await?;

        // The fake node: kwok manages the nodes carrying this annotation (it creates none).
        let node = format!("{cluster}-node");
        api.expect_created(
            "/api/v1/nodes",
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": node,
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                    "labels": {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux", "type": "kwok"},
                },
            }),
        )
        .await?;

        std::fs::create_dir_all(path("kwok/exec"))?;
        std::fs::write(path("kwok/containers.log"), "")?;
        std::fs::write(path("kwok/attach.log"), "")?;
        std::fs::write(
            path("kwok/kubeconfig"),
            direct_kubeconfig(
                cluster,
                addr,
                &ca_pem,
                MemberUser::Admin.name(),
                &admin_token,
            ),
        )?;
        std::fs::write(
            path("kwok/kubelet.yaml"),
            kubelet_config(dir.path(), options.port_forward_to),
        )?;
        let kwok_args: Vec<String> = vec![
            format!("--kubeconfig={}", path("kwok/kubeconfig").display()),
            format!("--config={}", stages_file(bin).display()),
            format!("--config={}", path("kwok/kubelet.yaml").display()),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            // What the node-initialize stage writes into the node's status: the API server dials
            // InternalIP:kubeletEndpoint for logs, exec and port-forward.
            "--node-ip=127.0.0.1".into(),
            format!("--node-name={node}"),
            format!("--node-port={kwok_port}"),
            format!("--server-address=127.0.0.1:{kwok_port}"),
            // kwok's kubelet API presents the member's API-server certificate (valid for
            // 127.0.0.1), so the API server verifies the hop to the node too.
            format!("--tls-cert-file={}", path("apiserver.pem").display()),
            format!("--tls-private-key-file={}", path("apiserver.key").display()),
        ];
        // HOME: kwok also loads ~/.kwok/kwok.yaml when there is one; the member's is empty.
        let mut kwok = Daemon::spawn(
            "kwok",
            &bin.join("kwok"),
            &kwok_args,
            &[("HOME", dir.path())],
            path("kwok.log"),
        )?;
        let node_path = format!("/api/v1/nodes/{node}");
        loop {
            etcd.check_alive()?;
            apiserver.check_alive()?;
            kwok.check_alive()?;
            if let (200, body) = api.request("GET", &node_path, None).await?
                && node_ready(&body)
            {
                break;
            }
            give_up_after(started, &format!("node {node} Ready"))
                .with_context(|| format!("kwok's log:\n{}", kwok.log_tail()))?;
            tokio::time::sleep(POLL).await;
        }

        Ok(Self {
            cluster: cluster.to_owned(),
            addr,
            ca_pem,
            admin_token,
            restricted_token,
            node,
            kwok,
            apiserver,
            etcd,
            dir,
        })
    }

    /// The cluster name (what a CONNECT through the proxy names, and the agent's certificate).
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The API server's secure address on loopback: the agent's `--upstream`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The member's API-server CA, PEM.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// The bearer token of `user`.
    pub fn token(&self, user: MemberUser) -> &str {
        match user {
            MemberUser::Admin => &self.admin_token,
            MemberUser::Restricted => &self.restricted_token,
        }
    }

    /// The name of the fake node, for a pod's `spec.nodeName` (no scheduler runs).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The member's temporary folder (its processes' logs are there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a kubeconfig at `path` that reaches this member as `user` through the proxy at
    /// `proxy_url` (the kubeconfig's `proxy-url`), verifying the API server's certificate end to
    /// end with the member's CA, as [`crate::client::write_kubeconfig`] does for a fake member.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        user: MemberUser,
        proxy_url: &str,
    ) -> anyhow::Result<()> {
        let cluster = &self.cluster;
        let ca = crate::client::base64(&self.ca_pem);
        let name = user.name();
        let token = self.token(user);
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: https://{cluster}:443
    tls-server-name: kubernetes.default.svc
    certificate-authority-data: {ca}
    proxy-url: {proxy_url}
users:
- name: {name}
  user:
    token: {token}
contexts:
- name: {cluster}
  context:
    cluster: {cluster}
    user: {name}
current-context: {cluster}
"
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Writes a kubeconfig at `path` that reaches this member's API server as `user` directly,
    /// not through the proxy (`server: https://127.0.0.1:<port>`, verified with the member's CA):
    /// the reference a test compares the proxy's behaviour with.
    pub fn write_direct_kubeconfig(&self, path: &Path, user: MemberUser) -> anyhow::Result<()> {
        let text = direct_kubeconfig(
            &self.cluster,
            self.addr,
            &self.ca_pem,
            user.name(),
            self.token(user),
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Appends `line` to the log every container of the node shows (`kubectl logs`, and
    /// `logs -f` while it follows), in the CRI log format kwok reads.
    pub fn append_container_log(&self, line: &str) -> anyhow::Result<()> {
        append_cri_line(&self.dir.path().join("kwok/containers.log"), line)
    }

    /// Appends `line` to what `kubectl attach` to any container of the node shows.
    pub fn append_attach_output(&self, line: &str) -> anyhow::Result<()> {
        append_cri_line(&self.dir.path().join("kwok/attach.log"), line)
    }

    /// The folder where `kubectl exec` runs its command (on this machine: kwok executes it
    /// locally).
    pub fn exec_dir(&self) -> PathBuf {
        self.dir.path().join("kwok/exec")
    }

    /// The end of every process's log, for a failing test's message.
    pub fn logs(&self) -> String {
        [&self.etcd, &self.apiserver, &self.kwok]
            .iter()
            .map(|d| format!("--- {} ({}):\n{}\n", d.name, self.cluster, d.log_tail()))
            .collect()
    }

    /// A request to the API server directly (not through the proxy) as admin; returns the status
    /// and the body. For a test's setup and checks.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Bytes)> {
        Api {
            addr: self.addr,
            ca: self.dir.path().join("ca.pem"),
            token: self.admin_token.clone(),
        }
        .request(method, path, body)
        .await
    }
}

/// Fails naming `what` once [`START_LIMIT`] has passed since `started`.
fn give_up_after(started: Instant, what: &str) -> anyhow::Result<()> {
    if started.elapsed() > START_LIMIT {
        bail!("{what}: not within {START_LIMIT:?}");
    }
    Ok(())
}

/// Whether a Node object's `Ready` condition is `True`.
fn node_ready(body: &[u8]) -> bool {
    let Ok(node) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    node["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn append_cri_line(path: &Path, line: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    // RFC 3339 with nanoseconds, UTC: `2026-01-02T03:04:05.000000000Z stdout F text`.
    writeln!(file, "{} stdout F {line}", rfc3339(now))?;
    Ok(())
}

/// `since_epoch` as an RFC 3339 UTC timestamp with nanoseconds.
fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_nanos()
    )
}

/// A kubeconfig straight to the member's API server (not through the proxy) as `user` with
/// `token`: kwok's, and a test's reference to compare the proxy with.
fn direct_kubeconfig(
    cluster: &str,
    addr: SocketAddr,
    ca_pem: &[u8],
    user: &str,
    token: &str,
) -> String {
    let ca = crate::client::base64(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: https://{addr}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: {cluster}
  context:
    cluster: {cluster}
    user: {user}
current-context: {cluster}
"
    )
}

/// kwok's kubelet-API rules for every pod of the node: logs and attach from files in the member's
/// folder, exec on this machine in `kwok/exec`, port-forward to `port_forward_to`. kwok reads them
/// from its `--config` (the alternative, `--enable-crds`, would need kwok's CRDs in the member).
fn kubelet_config(dir: &Path, port_forward_to: Option<SocketAddr>) -> String {
    let dir = dir.display();
    let mut text = format!(
        "apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterLogs
metadata:
  name: containers
spec:
  logs:
  - logsFile: {dir}/kwok/containers.log
    follow: true
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterAttach
metadata:
  name: containers
spec:
  attaches:
  - logsFile: {dir}/kwok/attach.log
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterExec
metadata:
  name: containers
spec:
  execs:
  - local:
      workDir: {dir}/kwok/exec
"
    );
    if let Some(target) = port_forward_to {
        let _ = write!(
            text,
            "---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterPortForward
metadata:
  name: containers
spec:
  forwards:
  - target:
      address: {}
      port: {}
",
            target.ip(),
            target.port()
        );
    }
    text
}

/// HTTPS to one member's API server with a bearer token, verifying its certificate for
/// `kubernetes.default.svc` against its CA.
#[derive(Debug)]
struct Api {
    addr: SocketAddr,
    /// The member's CA, PEM.
    ca: PathBuf,
    token: String,
}

impl Api {
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let tcp = TcpStream::connect(self.addr).await?;
        let tls = tls_to(&self.ca, tcp).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kubernetes.default.svc")
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", "application/json");
        let body = match body {
            Some(body) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(&body)?)
            }
            None => Bytes::new(),
        };
        let resp = sender.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// POSTs `object` to `collection`; fails unless the API server answers 201 Created.
    async fn expect_created(&self, collection: &str, object: Value) -> anyhow::Result<()> {
        let (status, body) = self.request("POST", collection, Some(object)).await?;
        if status != 201 {
            bail!(
                "POST {collection}: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }
}

async fn tls_to(
    ca: &Path,
    tcp: TcpStream,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in proxy_common::tls::load_certs(ca)? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("kubernetes.default.svc")?;
    Ok(
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await?,
    )
}
