//! kubectl (the machine's, v1.32) through the proxy against real members ([`RealMember`]:
//! kube-apiserver 1.35, etcd and a kwok node each), with TLS end to end between kubectl and the
//! member: every verb an operator uses, and each remote-command verb over both WebSocket
//! (kubectl's default) and SPDY, checked from kubectl's own `-v=6` request log so that a silent
//! fallback from one to the other cannot pass for the protocol under test.
//!
//! What kwok, the fake node, cannot do (found while writing these):
//!
//! * it never closes an exec'd command's stdin, so a command reading stdin to EOF (`cat`) hangs,
//!   and so does the `tar -xmf -` of `kubectl cp` into a pod unless its stream ends on a 10 KiB
//!   record boundary: GNU tar reads stdin in whole records, and waits for the rest of the last
//!   one (seen: kwok's `tar` child blocked in read with all but the last partial record of a
//!   300,000-byte file written). Commands here read a line or a byte count, and the upload is
//!   sized to whole records;
//! * a non-zero exit code comes back as kubectl exit code 1 with `Internal error occurred: ...
//!   exit status 3`, not as exit code 3 (kwok hands the streaming server Go's `*exec.ExitError`,
//!   which it does not recognise as an exit code). The test runs the same command straight to
//!   the member, without the proxy, and requires the same result;
//! * `attach` shows only what is written to the attach file after it attached;
//! * every pod port is forwarded to the one address the member was started with.
//!
//! And what kubectl's SPDY client loses on its own: a command's last output when the streams are
//! reset right behind it at the command's exit. spdystream's `Stream::read` picks at random
//! between data already received and a closed stream, so output not read before the reset is
//! dropped (seen straight to the member too, without the proxy: 1 run in 200 under load, `exec`
//! exiting 0 with no output). Commands whose output is checked linger 0.5 s after it, so the
//! test sees the proxy's faults and not that race.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::Testbed;
use integration_tests::real_member::{MemberOptions, MemberUser, RealMember};
use sha2::{Digest as _, Sha256};

/// How long a one-shot kubectl may take before the test kills it and fails.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// How long a streaming kubectl may take to show what is expected of it.
const SHOW_LIMIT: Duration = Duration::from_secs(20);

/// The idle period a watch must survive: past the proxy's 60 s bound for a vanished peer
/// (`--tcp-keepalive 30s,10s,3`), and past client-go's 30 s HTTP/2 ping interval twice over.
const IDLE: Duration = Duration::from_secs(65);

/// kubectl with one kubeconfig (and context), its discovery cache in the test's folder.
#[derive(Debug, Clone)]
struct Kubectl {
    kubeconfig: PathBuf,
    context: Option<String>,
    cache: PathBuf,
}

impl Kubectl {
    fn new(kubeconfig: &Path, context: Option<&str>, dir: &Path) -> Self {
        Self {
            kubeconfig: kubeconfig.to_owned(),
            context: context.map(str::to_owned),
            cache: dir.join("kube-cache"),
        }
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache);
        if let Some(context) = &self.context {
            cmd.args(["--context", context]);
        }
        cmd.args(args)
            .env_remove("KUBECONFIG")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("KUBECTL_REMOTE_COMMAND_WEBSOCKETS")
            .env_remove("KUBECTL_PORT_FORWARD_WEBSOCKETS")
            .env_remove("DISABLE_HTTP2");
        for (key, value) in env {
            cmd.env(key, value);
        }
        cmd
    }

    /// Runs kubectl to its end with `stdin` (empty: none), killing it and failing after
    /// [`RUN_LIMIT`].
    fn run(&self, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(args, env);
        cmd.stdin(if stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl is installed");
        let writer = child.stdin.take().map(|mut pipe| {
            let data = stdin.to_vec();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            })
        });
        let stdout = drain(child.stdout.take().expect("piped"));
        let stderr = drain(child.stderr.take().expect("piped"));
        let deadline = Instant::now() + RUN_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("polling kubectl") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        let stdout = stdout.join().expect("stdout reader");
        let stderr = stderr.join().expect("stderr reader");
        let Some(status) = status else {
            panic!(
                "kubectl {args:?} did not end within {RUN_LIMIT:?}:\n{}\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        };
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// Runs kubectl, asserts it succeeded and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        stdout_ok(&self.run(args, b"", &[]), args)
    }

    /// Starts a kubectl that streams (`-f`, `-w`, attach, port-forward); killed by PID when
    /// the returned value drops.
    fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Streaming {
        let mut child = self
            .command(args, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("piped"), stdout.clone());
        collect(child.stderr.take().expect("piped"), stderr.clone());
        Streaming {
            what: format!("kubectl {}", args.join(" ")),
            child,
            stdout,
            stderr,
        }
    }
}

fn stdout_ok(out: &Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "kubectl {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads `from` to its end on a thread of its own.
fn drain(mut from: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = from.read_to_end(&mut all);
        all
    })
}

/// Appends what `from` yields to `into` as it comes, on a thread of its own.
fn collect(mut from: impl std::io::Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            into.lock().expect("output").extend_from_slice(&buf[..n]);
        }
    });
}

/// A running kubectl whose output is collected as it comes; SIGKILLed by PID and reaped when
/// dropped.
#[derive(Debug)]
struct Streaming {
    what: String,
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Streaming {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().expect("output")).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("output")).into_owned()
    }

    /// Whether kubectl is still running.
    fn running(&mut self) -> bool {
        self.child.try_wait().expect("polling kubectl").is_none()
    }

    /// Waits until stdout satisfies `done` and returns it; fails if kubectl exits first or after
    /// [`SHOW_LIMIT`]. `meanwhile` runs at every poll (say, to write one more line).
    fn wait_for(
        &mut self,
        what: &str,
        mut meanwhile: impl FnMut(),
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + SHOW_LIMIT;
        loop {
            let out = self.stdout();
            if done(&out) {
                return out;
            }
            assert!(
                self.running(),
                "{} exited before {what}:\n{out}\n{}",
                self.what,
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {SHOW_LIMIT:?}:\n{out}\n{}",
                self.what,
                self.stderr()
            );
            meanwhile();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The transport of kubectl's remote-command verbs (exec, attach, cp) and port-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// kubectl's default since 1.30 (port-forward: 1.31): `GET` with `Upgrade: websocket`,
    /// subprotocol `v5.channel.k8s.io` (port-forward: SPDY tunnelled in WebSocket).
    WebSocket,
    /// The older one, still what kubelets speak: `POST` with `Upgrade: SPDY/3.1`.
    Spdy,
}

impl Protocol {
    const BOTH: [Self; 2] = [Self::WebSocket, Self::Spdy];

    /// kubectl's switches for it.
    fn env(self) -> [(&'static str, &'static str); 2] {
        let on = match self {
            Self::WebSocket => "true",
            Self::Spdy => "false",
        };
        [
            ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", on),
            ("KUBECTL_PORT_FORWARD_WEBSOCKETS", on),
        ]
    }

    fn method(self) -> &'static str {
        match self {
            Self::WebSocket => "GET",
            Self::Spdy => "POST",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::WebSocket => "ws",
            Self::Spdy => "spdy",
        }
    }

    /// Asserts, from kubectl's `-v=6` log, that it upgraded `pods/<pod>/<sub>` with this
    /// protocol (`101 Switching Protocols`) and never tried the other (a fallback would).
    fn assert_used(self, stderr: &str, pod: &str, sub: &str) {
        let path = format!("/pods/{pod}/{sub}");
        let requests: Vec<&str> = stderr.lines().filter(|l| l.contains(&path)).collect();
        assert!(
            requests.iter().any(|l| {
                l.contains(&format!("] {} https://", self.method()))
                    && l.contains("101 Switching Protocols")
            }),
            "no {self:?} upgrade of {path} in kubectl's log:\n{stderr}"
        );
        assert!(
            requests
                .iter()
                .all(|l| l.contains(&format!("] {} https://", self.method()))),
            "kubectl did not stay with {self:?} for {path}:\n{}",
            requests.join("\n")
        );
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `len` bytes that differ from run to run (and from test to test).
fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut data))
        .expect("/dev/urandom");
    data
}

/// What kwok forwards every pod port to: for each connection, an 8-byte big-endian length `n`,
/// then `n` bytes, each echoed as it arrives. Once `n` bytes are in, it reports their count and
/// SHA-256 (what reached the "pod"); it keeps echoing until the connection ends.
struct EchoTarget {
    addr: SocketAddr,
    received: mpsc::Receiver<(usize, String)>,
}

impl EchoTarget {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("echo target");
        let addr = listener.local_addr().expect("echo target address");
        let (tx, received) = mpsc::channel();
        // The thread ends with the test's process: nothing outlives it.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let tx = tx.clone();
                std::thread::spawn(move || Self::serve(conn, &tx));
            }
        });
        Self { addr, received }
    }

    fn serve(mut conn: TcpStream, tx: &mpsc::Sender<(usize, String)>) {
        let mut header = [0u8; 8];
        if conn.read_exact(&mut header).is_err() {
            return;
        }
        let expected = usize::try_from(u64::from_be_bytes(header)).expect("length");
        let mut hasher = Sha256::new();
        let mut count = 0usize;
        let mut reported = false;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            hasher.update(&buf[..n]);
            count += n;
            if conn.write_all(&buf[..n]).is_err() {
                break;
            }
            if !reported && count >= expected {
                reported = true;
                let hash = hasher.clone().finalize();
                let _ = tx.send((count, hash.iter().map(|b| format!("{b:02x}")).collect()));
            }
        }
    }
}

/// Sends `payload` through `local` (a kubectl port-forward) to the [`EchoTarget`] and reads it
/// back; returns what came back.
fn echo_through(local: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let conn = TcpStream::connect(local).expect("connecting to kubectl port-forward");
    conn.set_read_timeout(Some(SHOW_LIMIT)).expect("timeout");
    let mut writer = conn.try_clone().expect("socket");
    let data = payload.to_vec();
    let sender = std::thread::spawn(move || {
        writer.write_all(&(data.len() as u64).to_be_bytes())?;
        writer.write_all(&data)
    });
    let mut back = vec![0u8; payload.len()];
    let mut reader = &conn;
    let read = reader.read_exact(&mut back);
    sender
        .join()
        .expect("sender thread")
        .expect("writing to kubectl port-forward");
    read.expect("reading the echo back through kubectl port-forward");
    back
}

/// A pod on `member`'s kwok node (no scheduler runs: it names its node).
fn pod_manifest(dir: &Path, member: &RealMember, name: &str) -> String {
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": member.node(),
            "containers": [{"name": "main", "image": "registry.invalid/main:1"}],
        },
    });
    let path = dir.join(format!("pod-{}-{name}.json", member.cluster()));
    std::fs::write(&path, pod.to_string()).expect("pod manifest");
    path.display().to_string()
}

/// The generated kubeconfig's entry for `cluster`, as JSON.
fn cluster_entry<'a>(config: &'a serde_json::Value, cluster: &str) -> &'a serde_json::Value {
    config["clusters"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == cluster))
        .map(|c| &c["cluster"])
        .unwrap_or_else(|| panic!("no cluster {cluster} in {config}"))
}

fn decode_base64(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

// Multi-threaded: kubectl runs as a blocking child while the proxy's clients need the runtime.
/// Every verb but the long watch, against two members sharing one proxy-server, all through the
/// kubeconfig the proxy-server generates (used as the docs say: fetched from the operator
/// listener, credentials added with `kubectl config set-credentials`, nothing else changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_verbs_through_the_proxy() {
    let started = Instant::now();
    let target = EchoTarget::start();
    let builder = Testbed::builder(&["alpha", "beta"]);
    let options = MemberOptions {
        port_forward_to: Some(target.addr),
    };
    let (alpha, beta) = tokio::join!(
        RealMember::start_with(builder.pki(), "alpha", options),
        RealMember::start(builder.pki(), "beta"),
    );
    let alpha = alpha.expect("real member alpha");
    let beta = beta.expect("real member beta");
    eprintln!("members ready in {:?}", started.elapsed());
    // The agents report their API server's CA, for the generated kubeconfigs.
    let alpha_ca = builder.pki().apiserver_ca("alpha").display().to_string();
    let beta_ca = builder.pki().apiserver_ca("beta").display().to_string();
    let bed = builder
        .agent("alpha", alpha.addr())
        .agent_args(&["--upstream-ca", &alpha_ca])
        .agent("beta", beta.addr())
        .agent_args(&["--upstream-ca", &beta_ca])
        .start()
        .await;
    let dir = bed.dir().to_owned();

    // --- The generated kubeconfig, used as-is. ---
    let (status, fleet) =
        integration_tests::procs::admin_get(bed.server.operator_addr, "/api/v1/kubeconfig")
            .await
            .expect("the fleet's kubeconfig");
    assert_eq!(status, 200, "{fleet}");
    let parsed: serde_json::Value = serde_json::from_str(&fleet).expect("a JSON kubeconfig");
    for member in [&alpha, &beta] {
        let entry = cluster_entry(&parsed, member.cluster());
        assert_eq!(entry["server"], format!("https://{}:443", member.cluster()));
        assert_eq!(entry["proxy-url"], format!("http://{}", bed.frontend()));
        assert_eq!(entry["tls-server-name"], "kubernetes.default.svc");
        assert_eq!(
            decode_base64(entry["certificate-authority-data"].as_str().expect("CA")),
            member.ca_pem(),
            "the generated kubeconfig's CA is not {}'s",
            member.cluster()
        );
    }
    let fleet_path = dir.join("fleet.kubeconfig");
    std::fs::write(&fleet_path, &fleet).expect("kubeconfig");
    let unnamed = Kubectl::new(&fleet_path, None, &dir);
    for member in [&alpha, &beta] {
        let token = format!("--token={}", member.token(MemberUser::Admin));
        unnamed.ok(&["config", "set-credentials", member.cluster(), &token]);
    }
    let a = Kubectl::new(&fleet_path, Some("alpha"), &dir);
    let b = Kubectl::new(&fleet_path, Some("beta"), &dir);
    // The restricted user: the cluster's own kubeconfig, with the restricted token.
    let (status, alpha_only) = integration_tests::procs::admin_get(
        bed.server.operator_addr,
        "/api/v1/clusters/alpha/kubeconfig",
    )
    .await
    .expect("alpha's kubeconfig");
    assert_eq!(status, 200, "{alpha_only}");
    let restricted_path = dir.join("alpha-restricted.kubeconfig");
    std::fs::write(&restricted_path, &alpha_only).expect("kubeconfig");
    let restricted = Kubectl::new(&restricted_path, None, &dir);
    let token = format!("--token={}", alpha.token(MemberUser::Restricted));
    restricted.ok(&["config", "set-credentials", "alpha", &token]);
    // TLS is kubectl's with the member, verified: alpha's entry with beta's CA fails, in kubectl.
    let mut wrong = parsed.clone();
    wrong["clusters"]
        .as_array_mut()
        .expect("clusters")
        .iter_mut()
        .find(|c| c["name"] == "alpha")
        .expect("alpha")["cluster"]["certificate-authority-data"] =
        cluster_entry(&parsed, "beta")["certificate-authority-data"].clone();
    let wrong_path = dir.join("wrong-ca.kubeconfig");
    std::fs::write(&wrong_path, wrong.to_string()).expect("kubeconfig");
    let wrong = Kubectl::new(&wrong_path, Some("alpha"), &dir);
    let token = format!("--token={}", alpha.token(MemberUser::Admin));
    wrong.ok(&["config", "set-credentials", "alpha", &token]);
    let refused = wrong.run(&["get", "namespaces"], b"", &[]);
    let refused_err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && refused_err.contains("x509: certificate signed by unknown authority"),
        "{refused_err}"
    );
    // And kubectl straight to alpha, not through the proxy: the reference.
    let direct_path = dir.join("alpha-direct.kubeconfig");
    alpha
        .write_direct_kubeconfig(&direct_path, MemberUser::Admin)
        .expect("kubeconfig");
    let direct = Kubectl::new(&direct_path, None, &dir);

    // --- get: each context reaches its own member. ---
    let version = a.ok(&["get", "--raw", "/version"]);
    assert!(version.contains("\"gitVersion\": \"v1.35."), "{version}");
    assert_eq!(
        a.ok(&["get", "nodes", "-o", "name"]).trim(),
        "node/alpha-node"
    );
    assert_eq!(
        b.ok(&["get", "nodes", "-o", "name"]).trim(),
        "node/beta-node"
    );

    // --- Server-side apply, a conflict between field managers, delete. ---
    let cm = |owner: &str| {
        let path = dir.join(format!("cm-{owner}.yaml"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: default\ndata:\n  owner: {owner}\n"
            ),
        )
        .expect("manifest");
        path.display().to_string()
    };
    let (mine, theirs) = (cm("kubectl"), cm("other"));
    assert_eq!(
        a.ok(&["apply", "--server-side", "-f", &mine]).trim(),
        "configmap/applied serverside-applied"
    );
    // Another manager changing the field kubectl owns: the member's 409 Conflict, intact.
    let conflict = a.run(
        &[
            "apply",
            "--server-side",
            "--field-manager=other",
            "-f",
            &theirs,
        ],
        b"",
        &[],
    );
    let conflict_err = String::from_utf8_lossy(&conflict.stderr);
    assert!(
        !conflict.status.success()
            && conflict_err
                .contains("Apply failed with 1 conflict: conflict with \"kubectl\": .data.owner"),
        "{conflict_err}"
    );
    a.ok(&[
        "apply",
        "--server-side",
        "--field-manager=other",
        "--force-conflicts",
        "-f",
        &theirs,
    ]);
    let managed = a.ok(&[
        "get",
        "configmap",
        "applied",
        "-o",
        "jsonpath={.data.owner} {.metadata.managedFields[*].manager} {.metadata.managedFields[*].operation}",
    ]);
    assert_eq!(managed, "other other Apply", "the takeover did not happen");
    // Not in beta: each context reaches its own member.
    assert_eq!(
        b.run(&["get", "configmap", "applied"], b"", &[])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        a.ok(&["delete", "-f", &mine]).trim(),
        "configmap \"applied\" deleted"
    );
    let gone = a.run(&["get", "configmap", "applied"], b"", &[]);
    assert!(
        String::from_utf8_lossy(&gone.stderr)
            .contains("Error from server (NotFound): configmaps \"applied\" not found"),
        "{gone:?}"
    );

    // --- Pods on each node. ---
    a.ok(&["create", "-f", &pod_manifest(&dir, &alpha, "web")]);
    b.ok(&["create", "-f", &pod_manifest(&dir, &beta, "web")]);
    for k in [&a, &b] {
        k.ok(&["wait", "--for=condition=Ready", "pod/web", "--timeout=20s"]);
    }
    // kwok runs exec'd commands in the member's exec folder: each context reaches its own.
    assert_eq!(
        b.ok(&["exec", "web", "--", "pwd"]).trim(),
        beta.exec_dir().display().to_string()
    );

    // --- logs -f: follows lines appended after it started. ---
    let t = Instant::now();
    alpha.append_container_log("before following").expect("log");
    let mut follow = a.spawn(&["logs", "-f", "web"], &[]);
    follow.wait_for(
        "the existing line",
        || {},
        |o| o.contains("before following\n"),
    );
    for i in 1..=3 {
        let line = format!("appended while following {i}");
        alpha.append_container_log(&line).expect("log");
        follow.wait_for(&line, || {}, |o| o.contains(&format!("{line}\n")));
    }
    assert_eq!(
        follow.stdout(),
        "before following\nappended while following 1\nappended while following 2\nappended while following 3\n"
    );
    assert!(follow.running(), "logs -f ended");
    drop(follow);
    eprintln!("logs -f: {:?}", t.elapsed());

    for protocol in Protocol::BOTH {
        let t = Instant::now();
        let env = protocol.env();
        let tag = protocol.tag();

        // --- exec -i: a line of stdin in, a line out. ---
        let out = a.run(
            &[
                "-v=6",
                "exec",
                "-i",
                "web",
                "--",
                "sh",
                "-c",
                "read x; echo got $x; sleep 0.5",
            ],
            format!("hello over {tag}\n").as_bytes(),
            &env,
        );
        assert_eq!(
            stdout_ok(&out, &["exec"]),
            format!("got hello over {tag}\n")
        );
        protocol.assert_used(&String::from_utf8_lossy(&out.stderr), "web", "exec");

        // stdin by hash: 1 MiB in, its SHA-256 computed on the "node".
        let upload = random_bytes(1 << 20);
        let out = a.run(
            &[
                "exec",
                "-i",
                "web",
                "--",
                "sh",
                "-c",
                "head -c 1048576 | sha256sum; sleep 0.5",
            ],
            &upload,
            &env,
        );
        assert_eq!(
            stdout_ok(&out, &["exec"]).split_whitespace().next(),
            Some(sha256_hex(&upload).as_str()),
            "stdin did not reach the command intact over {protocol:?}"
        );
        // stdout by hash: 1 MiB out.
        let download = random_bytes(1 << 20);
        let name = format!("stdout-{tag}.bin");
        std::fs::write(alpha.exec_dir().join(&name), &download).expect("file");
        let cat = format!("cat {name}; sleep 0.5");
        let out = a.run(&["exec", "web", "--", "sh", "-c", &cat], b"", &env);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            sha256_hex(&out.stdout),
            sha256_hex(&download),
            "stdout did not reach kubectl intact over {protocol:?}"
        );

        // A non-zero exit: through the proxy exactly as straight to the member. kwok reports
        // exit status 3 as an internal error, so kubectl exits 1 (see the module's doc).
        let failing = [
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; sleep 0.5; exit 3",
        ];
        let proxied = a.run(&failing, b"", &env);
        let reference = direct.run(&failing, b"", &env);
        let error_line = |out: &Output| {
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .find(|l| l.starts_with("error: "))
                .map(str::to_owned)
        };
        assert_eq!(proxied.status.code(), Some(1), "{proxied:?}");
        assert_eq!(proxied.stdout, b"out\n");
        assert!(
            String::from_utf8_lossy(&proxied.stderr).starts_with("err\n"),
            "{proxied:?}"
        );
        let proxied_error = error_line(&proxied).expect("kubectl's error");
        assert!(proxied_error.ends_with("exit status 3"), "{proxied_error}");
        assert_eq!(
            (proxied.status.code(), &proxied.stdout, Some(proxied_error)),
            (
                reference.status.code(),
                &reference.stdout,
                error_line(&reference)
            ),
            "the proxy changed how a failing command is reported"
        );

        // --- cp: up into the "pod" and back down, by hash. ---
        // kwok never closes the command's stdin, and the `tar -xmf -` an upload runs reads whole
        // 10 KiB records: the file is sized so that its tar stream (a 512-byte header, the data,
        // two 512-byte end blocks) is exactly 100 records (see the module's doc).
        let file = random_bytes(100 * 10240 - 3 * 512);
        let name = format!("cp-{tag}.bin");
        let local = dir.join(&name);
        std::fs::write(&local, &file).expect("file");
        let remote = format!("web:{name}");
        let out = a.run(
            &["-v=6", "cp", &local.display().to_string(), &remote],
            b"",
            &env,
        );
        stdout_ok(&out, &["cp", "up"]);
        protocol.assert_used(&String::from_utf8_lossy(&out.stderr), "web", "exec");
        let landed = std::fs::read(alpha.exec_dir().join(&name)).expect("the uploaded file");
        assert_eq!(
            sha256_hex(&landed),
            sha256_hex(&file),
            "cp up over {protocol:?}"
        );
        let back = dir.join(format!("back-{name}"));
        let out = a.run(
            &["-v=6", "cp", &remote, &back.display().to_string()],
            b"",
            &env,
        );
        stdout_ok(&out, &["cp", "down"]);
        protocol.assert_used(&String::from_utf8_lossy(&out.stderr), "web", "exec");
        assert_eq!(
            sha256_hex(&std::fs::read(&back).expect("the downloaded file")),
            sha256_hex(&file),
            "cp down over {protocol:?}"
        );

        // --- attach: lines written after it attached. ---
        let mut attach = a.spawn(&["-v=6", "attach", "web"], &env);
        let mut tick = 0;
        attach.wait_for(
            "a tick",
            || {
                tick += 1;
                alpha
                    .append_attach_output(&format!("tick {tick}"))
                    .expect("attach output");
            },
            |o| o.contains("tick "),
        );
        let marker = format!("attached over {tag}");
        alpha.append_attach_output(&marker).expect("attach output");
        let shown = attach.wait_for(&marker, || {}, |o| o.contains(&format!("{marker}\n")));
        assert!(
            shown.lines().all(|l| l == marker || l.starts_with("tick ")),
            "{shown}"
        );
        assert!(attach.running(), "attach ended");
        protocol.assert_used(&attach.stderr(), "web", "attach");
        drop(attach);

        // --- port-forward: two connections, 4 MiB each way, by hash at both ends. ---
        let mut forward = a.spawn(
            &[
                "-v=6",
                "port-forward",
                "pod/web",
                ":8080",
                "--address=127.0.0.1",
            ],
            &env,
        );
        let shown = forward.wait_for(
            "the local port",
            || {},
            |o| o.contains("Forwarding from 127.0.0.1:"),
        );
        let port: u16 = shown
            .split("Forwarding from 127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {shown}"));
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..2 {
            let payload = random_bytes(4 << 20);
            let back = echo_through(local, &payload);
            let (count, at_target) = target
                .received
                .recv_timeout(SHOW_LIMIT)
                .expect("the target's report");
            assert_eq!(count, payload.len());
            assert_eq!(
                at_target,
                sha256_hex(&payload),
                "bytes reached the target changed over {protocol:?}"
            );
            assert_eq!(
                sha256_hex(&back),
                sha256_hex(&payload),
                "bytes came back changed over {protocol:?}"
            );
        }
        assert!(forward.running(), "port-forward ended");
        protocol.assert_used(&forward.stderr(), "web", "portforward");
        drop(forward);
        eprintln!(
            "exec, cp, attach, port-forward over {protocol:?}: {:?}",
            t.elapsed()
        );
    }

    // --- RBAC: the member's own denial, unchanged. ---
    assert!(
        restricted
            .ok(&["get", "namespaces", "-o", "name"])
            .contains("namespace/default")
    );
    for (args, expected) in [
        (
            &["get", "pods", "-n", "default"][..],
            "Error from server (Forbidden): pods is forbidden: User \"restricted\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\"",
        ),
        (
            &["create", "configmap", "nope", "-n", "default"][..],
            "error: failed to create configmap: configmaps is forbidden: User \"restricted\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"default\"",
        ),
    ] {
        let denied = restricted.run(args, b"", &[]);
        assert!(!denied.status.success(), "the restricted user may {args:?}");
        assert_eq!(
            String::from_utf8_lossy(&denied.stderr).trim(),
            expected,
            "not the member's RBAC denial"
        );
    }
    eprintln!("whole test: {:?}", started.elapsed());
}

/// `kubectl get -w` through the proxy stays open through a minute and more with nothing to say,
/// and then shows an update made after that minute: once over HTTP/2 (kubectl's default; client-go
/// pings an idle connection every 30 s) and once over HTTP/1.1 (`DISABLE_HTTP2`: no byte at all
/// crosses the tunnel while idle). kubectl's watch does not reconnect: a closed watch ends it
/// (`get -w` runs `watchtools.UntilWithoutRetry`, which returns when the watch closes), so a
/// proxy that dropped the idle stream fails the "still running" check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_an_idle_minute() {
    let started = Instant::now();
    let builder = Testbed::builder(&["alpha"]);
    let alpha = RealMember::start(builder.pki(), "alpha")
        .await
        .expect("real member alpha");
    let bed = builder.agent("alpha", alpha.addr()).start().await;
    let path = bed.dir().join("kubeconfig");
    alpha
        .write_kubeconfig(
            &path,
            MemberUser::Admin,
            &format!("http://{}", bed.frontend()),
        )
        .expect("kubeconfig");
    let k = Kubectl::new(&path, None, bed.dir());
    k.ok(&["create", "configmap", "watched", "--from-literal=v=before"]);
    let watch = [
        "get",
        "configmap",
        "watched",
        "-w",
        "-o",
        "jsonpath={.data.v}{\"\\n\"}",
    ];
    let mut http2 = k.spawn(&watch, &[]);
    let mut http1 = k.spawn(&watch, &[("DISABLE_HTTP2", "1")]);
    for w in [&mut http2, &mut http1] {
        w.wait_for("the object", || {}, |o| o == "before\n");
    }
    let idle_from = Instant::now();
    std::thread::sleep(IDLE);
    for w in [&mut http2, &mut http1] {
        assert!(
            w.running(),
            "{} ended while idle:\n{}\n{}",
            w.what,
            w.stdout(),
            w.stderr()
        );
        assert_eq!(
            w.stdout(),
            "before\n",
            "{} showed something while idle",
            w.what
        );
    }
    k.ok(&[
        "patch",
        "configmap",
        "watched",
        "-p",
        r#"{"data":{"v":"after"}}"#,
    ]);
    for w in [&mut http2, &mut http1] {
        w.wait_for("the update", || {}, |o| o == "before\nafter\n");
    }
    eprintln!(
        "update seen {:?} after the watches went idle",
        idle_from.elapsed()
    );
    assert!(
        http1
            .stderr()
            .contains("HTTP2 has been explicitly disabled"),
        "the HTTP/1.1 watch was not: {}",
        http1.stderr()
    );
    assert!(
        !http2
            .stderr()
            .contains("HTTP2 has been explicitly disabled"),
        "{}",
        http2.stderr()
    );
    eprintln!("whole test: {:?}", started.elapsed());
}
