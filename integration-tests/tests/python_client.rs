//! The official Kubernetes Python client (`pip install kubernetes`) through the proxy, as the
//! README tells its users to set it up: it follows the kubeconfig's `proxy-url`, but drops the
//! credentials written into that URL, so they go in `proxy_headers` instead.

use std::path::Path;

use integration_tests::client::write_kubeconfig;
use integration_tests::{AgentProc, Bed, FakeApiServer, ServerProc};

const POLICY: &str = r#"
clients:
  - name: kubefed
    token: "kubefed-token"
    clusters: ["alpha"]
"#;

/// Runs the client script; returns (success, stdout + stderr). Async: the fake API server runs
/// on this test's runtime and must keep answering meanwhile.
async fn list_namespaces(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/list_namespaces.py"
    );
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(kubeconfig)
        .args(args)
        .output()
        .await
        .expect("python3 (with `pip install kubernetes`; .ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn the_python_client_reaches_a_member_with_credentials_in_proxy_headers() {
    let bed = Bed::new(&["alpha"]);
    let policy = bed.dir.path().join("auth.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let server = ServerProc::start(
        &bed.pki,
        None,
        &["--frontend-auth-file", &policy.display().to_string()],
    )
    .await
    .unwrap();
    let api = FakeApiServer::start(&bed.pki, "alpha").await.unwrap();
    let _agent = AgentProc::start_ready(&bed.pki, &[server.agent_addr], "alpha", api.addr)
        .await
        .unwrap();
    // What works for kubectl: credentials in the proxy URL.
    let proxy_url = format!("http://kubefed:kubefed-token@{}", server.frontend_addr);
    let kubeconfig = write_kubeconfig(bed.dir.path(), &bed.pki, "alpha", &proxy_url).unwrap();

    // The Python client drops them: the proxy asks for credentials.
    let (ok, out) = list_namespaces(&kubeconfig, &["url"]).await;
    assert!(!ok && out.contains("407"), "{out}");

    // In proxy_headers they arrive, and the member answers through its agent.
    let (ok, out) = list_namespaces(&kubeconfig, &["headers", "kubefed", "kubefed-token"]).await;
    assert!(ok, "{out}");
    let want = integration_tests::apiserver::namespaces("alpha").join(" ");
    assert_eq!(out.trim(), format!("namespaces: {want}"));

    // A wrong token in the headers is refused like any other.
    let (ok, out) = list_namespaces(&kubeconfig, &["headers", "kubefed", "wrong"]).await;
    assert!(!ok && out.contains("407"), "{out}");
}
