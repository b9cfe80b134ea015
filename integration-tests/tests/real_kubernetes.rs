//! kubectl through the proxy to real member clusters: kube-apiserver, etcd and a kwok node per
//! member ([`RealMember`]), each with its own CA, reached with a kubeconfig `proxy-url` and
//! verified end to end. The binaries come from `scripts/build-k8s`; without them these tests fail
//! (they do not skip).

use std::path::Path;
use std::process::Output;
use std::time::Instant;

use integration_tests::Testbed;
use integration_tests::real_member::{MemberUser, RealMember};
use serde_json::json;

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--request-timeout", "20s"])
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .expect("kubectl is installed")
}

fn stdout_ok(out: &Output, members: &[&RealMember]) -> String {
    assert!(
        out.status.success(),
        "kubectl failed: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        members.iter().map(|m| m.logs()).collect::<String>()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// Multi-threaded: kubectl runs as a blocking child while the proxy's clients need the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reaches_real_members_through_the_proxy() {
    let builder = Testbed::builder(&["alpha", "beta"]);
    // Both members start at once: each is a few seconds of mostly waiting.
    let started = Instant::now();
    let (alpha, beta) = tokio::join!(
        RealMember::start(builder.pki(), "alpha"),
        RealMember::start(builder.pki(), "beta"),
    );
    let alpha = alpha.expect("real member alpha");
    let beta = beta.expect("real member beta");
    eprintln!("members alpha and beta ready in {:?}", started.elapsed());
    let bed = builder
        .agent("alpha", alpha.addr())
        .agent("beta", beta.addr())
        .start()
        .await;
    let proxy_url = format!("http://{}", bed.frontend());
    let kubeconfig = |member: &RealMember, user: MemberUser| {
        let path = bed
            .dir()
            .join(format!("kubeconfig-{}-{}", member.cluster(), user.name()));
        member
            .write_kubeconfig(&path, user, &proxy_url)
            .expect("kubeconfig");
        path
    };
    let alpha_admin = kubeconfig(&alpha, MemberUser::Admin);
    let beta_admin = kubeconfig(&beta, MemberUser::Admin);
    let alpha_restricted = kubeconfig(&alpha, MemberUser::Restricted);
    let members = [&alpha, &beta];

    // The real API server's version, and its own namespaces.
    let version = stdout_ok(
        &kubectl(&alpha_admin, &["get", "--raw", "/version"]),
        &members,
    );
    assert!(version.contains("\"gitVersion\": \"v1.35."), "{version}");
    let namespaces = stdout_ok(&kubectl(&alpha_admin, &["get", "namespaces"]), &members);
    assert!(
        namespaces.contains("NAME") && namespaces.contains("kube-system"),
        "{namespaces}"
    );

    // Each kubeconfig reaches its own member: a namespace made in beta is not in alpha.
    stdout_ok(
        &kubectl(&beta_admin, &["create", "namespace", "only-in-beta"]),
        &members,
    );
    let in_beta = stdout_ok(
        &kubectl(&beta_admin, &["get", "namespaces", "-o", "name"]),
        &members,
    );
    assert!(in_beta.contains("namespace/only-in-beta"), "{in_beta}");
    let in_alpha = stdout_ok(
        &kubectl(&alpha_admin, &["get", "namespaces", "-o", "name"]),
        &members,
    );
    assert!(!in_alpha.contains("only-in-beta"), "{in_alpha}");
    let nodes = stdout_ok(&kubectl(&beta_admin, &["get", "nodes"]), &members);
    assert!(
        nodes.contains(beta.node()) && nodes.contains("Ready"),
        "{nodes}"
    );

    // A pod on alpha's kwok node (no scheduler runs: it names its node), running once kwok has
    // played it, and its log from the node's kubelet API: kubectl -> proxy -> agent ->
    // kube-apiserver -> kwok.
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "nodeName": alpha.node(),
            "containers": [{"name": "web", "image": "registry.invalid/web:1"}],
        },
    });
    let manifest = bed.dir().join("pod.json");
    std::fs::write(&manifest, pod.to_string()).expect("pod manifest");
    let manifest = manifest.display().to_string();
    stdout_ok(
        &kubectl(&alpha_admin, &["create", "-f", &manifest]),
        &members,
    );
    stdout_ok(
        &kubectl(
            &alpha_admin,
            &["wait", "--for=condition=Ready", "pod/web", "--timeout=20s"],
        ),
        &members,
    );
    alpha
        .append_container_log("hello from a container on alpha")
        .expect("container log");
    let logs = stdout_ok(&kubectl(&alpha_admin, &["logs", "web"]), &members);
    assert_eq!(logs.trim(), "hello from a container on alpha");
    // A graceful delete completes only once the node confirms it (kwok's pod-delete stage).
    stdout_ok(
        &kubectl(&alpha_admin, &["delete", "pod", "web", "--timeout=20s"]),
        &members,
    );

    // RBAC: the restricted user may list namespaces, and the member itself forbids the rest.
    stdout_ok(
        &kubectl(&alpha_restricted, &["get", "namespaces", "-o", "name"]),
        &members,
    );
    let denied = kubectl(&alpha_restricted, &["get", "pods", "-n", "default"]);
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success(), "the restricted user listed pods");
    assert!(
        stderr.contains("Forbidden")
            && stderr.contains("User \"restricted\" cannot list resource \"pods\""),
        "not the member's RBAC denial: {stderr}"
    );
}
