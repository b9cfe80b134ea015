//! Cluster names that YAML reads as something else when written bare (`1e3` a number, `null`
//! nothing, `true` and, to kubectl's YAML 1.1, `yes` and `on` booleans, `0x1f` a hex number)
//! are valid DNS labels, so real clusters can carry them. The server's fleet kubeconfig must
//! keep every one a string: kubectl rejects the whole file over a single such value.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use integration_tests::procs::admin_get;
use integration_tests::{ServerProc, Testbed};

/// The names issue 35 measured, and two only YAML 1.1 (kubectl) reads as booleans.
const NAMES: [&str; 6] = ["1e3", "null", "true", "0x1f", "yes", "on"];

/// The listener serving the status pages and kubeconfigs.
fn ops_addr(server: &ServerProc) -> SocketAddr {
    server.operator_addr
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl")
}

/// The names kubectl lists at `jsonpath` (space-separated), sorted.
fn listed(kubeconfig: &Path, jsonpath: &str) -> Vec<String> {
    let out = kubectl(
        kubeconfig,
        &["config", "view", "-o", &format!("jsonpath={jsonpath}")],
    );
    assert!(
        out.status.success(),
        "kubectl config view: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reads_a_fleet_kubeconfig_of_clusters_named_like_yaml_values() {
    let mut bed = Testbed::builder(&NAMES);
    let cas: Vec<String> = NAMES
        .iter()
        .map(|n| bed.pki().apiserver_ca(n).display().to_string())
        .collect();
    for (name, ca) in NAMES.iter().zip(&cas) {
        // The agents report their API servers' CAs, without which no kubeconfig is written.
        bed = bed.member(name).agent_args(&["--upstream-ca", ca]);
    }
    let bed = bed.start().await;

    let (status, text) = admin_get(ops_addr(&bed.server), "/api/v1/kubeconfig")
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let path = bed.dir().join("fleet.kubeconfig");
    std::fs::write(&path, &text).unwrap();

    let mut expected: Vec<String> = NAMES.iter().map(|n| (*n).to_owned()).collect();
    expected.sort();
    for list in ["clusters", "users", "contexts"] {
        assert_eq!(
            listed(&path, &format!("{{.{list}[*].name}}")),
            expected,
            "{list} in\n{text}"
        );
    }
    // Each context points at its own cluster and user, by the same string.
    assert_eq!(
        listed(&path, "{.contexts[*].context.cluster}"),
        expected,
        "{text}"
    );
    assert_eq!(
        listed(&path, "{.contexts[*].context.user}"),
        expected,
        "{text}"
    );

    // And the kubeconfig works: kubectl reaches each member's API server through the proxy,
    // verifying it with the CA its agent reported.
    for name in ["1e3", "yes"] {
        let out = kubectl(
            &path,
            &[
                "--context",
                name,
                "--token",
                "t",
                "--request-timeout",
                "10s",
                "get",
                "--raw",
                "/version",
            ],
        );
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(version.contains(&format!("+{name}")), "{name}: {version}");
    }
}
