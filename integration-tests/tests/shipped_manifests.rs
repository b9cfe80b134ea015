//! The shipped manifests start: `kubectl kustomize deploy/server` and `deploy/agent` are
//! rendered, each container's exact arguments are run with the files their volumes would mount
//! mapped to a test PKI, and a CONNECT goes through the pair. The auth Secret as shipped holds
//! no credential: the server refuses it, saying it is the placeholder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::Bed;
use integration_tests::client::FrontendClient;
use integration_tests::procs::{Proc, bin, wait_ok};
use integration_tests::upstream::BannerServer;
use serde_json::Value;

/// The cluster the shipped agent manifest's certificate example names.
const CLUSTER: &str = "member-1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every object `kubectl kustomize deploy/<overlay>` renders.
fn render(overlay: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("deploy").join(overlay))
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("\n---\n")
        .map(|doc| serde_yaml_ng::from_str(doc).expect("YAML"))
        .collect()
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// A container as it would run: its arguments, and for every file its volumes provide, which
/// Secret or ConfigMap key it comes from (`secret/<name>/<key>` or `configmap/<name>/<key>`).
struct Container {
    args: Vec<String>,
    files: BTreeMap<String, String>,
}

fn container(deployment: &Value) -> Container {
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let mut files = BTreeMap::new();
    for mount in c["volumeMounts"].as_array().into_iter().flatten() {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("volume of a mount");
        let (source, of) = if volume["secret"].is_object() {
            ("secret", &volume["secret"]["secretName"])
        } else {
            ("configmap", &volume["configMap"]["name"])
        };
        let spec = if source == "secret" {
            &volume["secret"]
        } else {
            &volume["configMap"]
        };
        // Only listed keys are mounted (the manifests list them all: no CA key by accident).
        for item in spec["items"].as_array().expect("volume items") {
            files.insert(
                format!(
                    "{}/{}",
                    mount["mountPath"].as_str().unwrap(),
                    item["path"].as_str().unwrap()
                ),
                format!(
                    "{source}/{}/{}",
                    of.as_str().unwrap(),
                    item["key"].as_str().unwrap()
                ),
            );
        }
    }
    Container { args, files }
}

/// The container's arguments with each file a volume provides replaced by the test file standing
/// for its source (`sources`), and listen addresses by free loopback ports. Panics on a file
/// argument no volume provides, or a source the test does not know.
fn mapped(c: &Container, sources: &BTreeMap<&str, PathBuf>, addrs: &[(&str, &str)]) -> Vec<String> {
    c.args
        .iter()
        .map(|arg| {
            let Some((flag, value)) = arg.split_once('=') else {
                return arg.clone();
            };
            if let Some((_, to)) = addrs.iter().find(|(f, _)| *f == flag) {
                return format!("{flag}={to}");
            }
            if value.starts_with('/') {
                let source = c
                    .files
                    .get(value)
                    .unwrap_or_else(|| panic!("{flag} names {value}, which no volume mounts"));
                let file = sources
                    .get(source.as_str())
                    .unwrap_or_else(|| panic!("{flag}: no test file stands for {source}"));
                return format!("{flag}={}", file.display());
            }
            arg.clone()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_server_and_agent_start_and_carry_a_connect() {
    let server_objects = render("server");
    let agent_objects = render("agent");
    let bed = Bed::new(&[CLUSTER]);
    let pki = &bed.pki;
    let dir = bed.dir.path();

    // The auth Secret as shipped: a placeholder the server refuses to start with.
    let secret = object(&server_objects, "Secret", "proxy-server-auth");
    let shipped = secret["stringData"]["auth.yaml"]
        .as_str()
        .expect("auth.yaml");
    let shipped_auth = dir.join("shipped-auth.yaml");
    std::fs::write(&shipped_auth, shipped).unwrap();
    let token = "a-token-the-operator-made";
    let auth = dir.join("auth.yaml");
    std::fs::write(
        &auth,
        format!("clients:\n  - name: kubefed\n    token: {token}\n    clusters: ['member-*']\n"),
    )
    .unwrap();
    let server_ca_copy = dir.join("server-ca-of-secret.pem");
    std::fs::copy(pki.server_ca(), &server_ca_copy).unwrap();
    let mut sources: BTreeMap<&str, PathBuf> = BTreeMap::from([
        (
            "secret/proxy-server-agent-listener-tls/tls.crt",
            pki.server_cert(),
        ),
        (
            "secret/proxy-server-agent-listener-tls/tls.key",
            pki.server_key(),
        ),
        ("secret/proxy-agent-ca/tls.crt", pki.agent_ca()),
        (
            "secret/proxy-server-frontend-tls/tls.crt",
            pki.server_cert(),
        ),
        ("secret/proxy-server-frontend-tls/tls.key", pki.server_key()),
        ("secret/proxy-client-ca/tls.crt", pki.frontend_ca()),
        ("secret/proxy-server-auth/auth.yaml", shipped_auth.clone()),
        ("secret/proxy-agent-tls/tls.crt", pki.agent_cert(CLUSTER)),
        ("secret/proxy-agent-tls/tls.key", pki.agent_key(CLUSTER)),
        ("secret/proxy-agent-tls/server-ca.crt", server_ca_copy),
        (
            "configmap/kube-root-ca.crt/ca.crt",
            pki.apiserver_ca(CLUSTER),
        ),
    ]);
    let server = container(object(&server_objects, "Deployment", "proxy-server"));
    let loopback = [
        ("--agent-addr", "127.0.0.1:0"),
        ("--frontend-addr", "127.0.0.1:0"),
        ("--admin-addr", "127.0.0.1:0"),
        ("--operator-addr", "127.0.0.1:0"),
    ];
    let run = |args: &[String]| {
        Command::new(bin("proxy-server"))
            .args(args)
            .env("PROXY_SERVER_SERVER_ID", "proxy-server-0")
            .output()
            .unwrap()
    };
    let out = run(&mapped(&server, &sources, &loopback));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "started with the shipped auth: {err}"
    );
    assert!(
        err.contains("is the shipped placeholder") && err.contains("docs/deploying.md"),
        "{err}"
    );

    // Replaced by the operator's policy: it starts and serves, exactly as rendered.
    sources.insert("secret/proxy-server-auth/auth.yaml", auth);
    let args = mapped(&server, &sources, &loopback);
    let (server_proc, line) = Proc::spawn(
        "proxy-server",
        &bin("proxy-server"),
        &args,
        dir.join("server.log"),
    )
    .await
    .expect("the rendered server starts");
    let field = |key: &str| -> std::net::SocketAddr {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {line}"))
            .parse()
            .unwrap()
    };
    let (agent_addr, frontend, admin) = (field("agent="), field("frontend="), field("admin="));
    wait_ok(admin, "/healthz", Duration::from_secs(10))
        .await
        .unwrap();

    let upstream = BannerServer::start("member-1-apiserver").await.unwrap();
    let agent = container(object(&agent_objects, "Deployment", "proxy-agent"));
    let (server_flag, upstream_flag) = (agent_addr.to_string(), upstream.addr.to_string());
    let agent_args = mapped(
        &agent,
        &sources,
        &[
            ("--server", &server_flag),
            ("--upstream", &upstream_flag),
            ("--admin-addr", "127.0.0.1:0"),
        ],
    );
    let (agent_proc, agent_line) = Proc::spawn(
        "proxy-agent",
        &bin("proxy-agent"),
        &agent_args,
        dir.join("agent.log"),
    )
    .await
    .expect("the rendered agent starts");
    let agent_admin: std::net::SocketAddr = agent_line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("admin="))
        .expect("agent admin")
        .parse()
        .unwrap();
    integration_tests::procs::wait_ready(agent_admin, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", agent_proc.logs(), server_proc.logs()));

    // A controller with the token, over the TLS frontend, verifying it with the server CA.
    let client = FrontendClient {
        tls_ca: Some(pki.server_ca()),
        cert: None,
        authorization: Some(format!("Bearer {token}")),
    };
    let (answer, tunnel) = client
        .connect(frontend, &format!("{CLUSTER}:443"))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}\n{}", server_proc.logs());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(
        &mut tokio::io::BufReader::new(tunnel.unwrap()),
        &mut line,
    )
    .await
    .unwrap();
    assert_eq!(line.trim(), "member-1-apiserver");
}
