//! The container image and the Kubernetes manifests stay in step with the binaries: Docker is
//! not available here, so what can be checked without it is checked against the real binaries.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use integration_tests::procs::bin;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The `--flags` a binary's help lists.
fn flags_of(binary: &str) -> BTreeSet<String> {
    let out = Command::new(bin(binary)).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '<')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn dockerfile_builds_locked_and_ships_both_binaries_as_non_root() {
    let docker = read("Dockerfile");
    assert!(
        docker.contains("cargo build --locked --release"),
        "not a locked release build"
    );
    for binary in ["proxy-server", "proxy-agent"] {
        // The binary exists in the workspace...
        assert!(
            repo().join(binary).join("src/main.rs").exists(),
            "{binary} is not a workspace binary"
        );
        assert!(
            docker.contains(&format!("-p {binary}")),
            "{binary} not built"
        );
        // ...and is copied from where cargo puts it.
        assert!(
            docker.contains(&format!(
                "COPY --from=build /src/target/release/{binary} /usr/local/bin/{binary}"
            )),
            "{binary} not copied into the runtime image"
        );
    }
    let runtime = docker.rsplit("FROM ").next().unwrap();
    assert!(
        runtime.contains("USER 65532:65532") || runtime.contains(":nonroot"),
        "runtime image runs as root"
    );
    let entry = runtime
        .lines()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .expect("ENTRYPOINT");
    assert!(
        entry.contains("[\"/usr/local/bin/proxy-server\"]"),
        "ENTRYPOINT must be exec form (no shell): {entry}"
    );
    let ignore = read(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "target/ would be sent to the build context"
    );
}

#[test]
fn manifests_use_only_flags_and_variables_the_binaries_have() {
    for (manifest, binary) in [
        ("deploy/server/deployment.yaml", "proxy-server"),
        ("deploy/agent/deployment.yaml", "proxy-agent"),
    ] {
        let text = read(manifest);
        let known = flags_of(binary);
        let used: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- --"))
            .map(|f| f.split('=').next().unwrap())
            .collect();
        assert!(!used.is_empty(), "{manifest} passes no flags");
        for flag in used {
            assert!(
                known.contains(&format!("--{flag}")),
                "{manifest}: --{flag} is not a flag of {binary}"
            );
        }
        assert!(
            text.contains(&format!("/usr/local/bin/{binary}")),
            "{manifest} does not run {binary}"
        );
        let prefix = if binary == "proxy-server" {
            "PROXY_SERVER_"
        } else {
            "PROXY_AGENT_"
        };
        let help = String::from_utf8_lossy(
            &Command::new(bin(binary))
                .arg("--help")
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        for var in text.split_whitespace().filter(|w| w.starts_with(prefix)) {
            assert!(
                help.contains(var),
                "{manifest}: {var} is not read by {binary}"
            );
        }
        for probe in ["path: /healthz", "path: /readyz"] {
            assert!(text.contains(probe), "{manifest} lacks a {probe} probe");
        }
    }
}

#[test]
fn manifests_keep_every_replica_reachable_by_every_agent() {
    let deployment = read("deploy/server/deployment.yaml");
    let services = read("deploy/server/services.yaml");
    // The count follows the Deployment: a headless Service over the server pods, counting
    // not-ready ones (a warming-up replica is not ready because its agents are arriving).
    let dns = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("- --server-count-dns="))
        .expect("deploy/server counts its replicas from DNS");
    let service = dns.split('.').next().unwrap();
    let headless = services
        .split("\n---\n")
        .find(|doc| doc.contains(&format!("name: {service}\n")))
        .unwrap_or_else(|| panic!("no Service {service} in services.yaml"));
    assert!(
        headless.contains("clusterIP: None") && headless.contains("publishNotReadyAddresses: true"),
        "{headless}"
    );
    assert!(dns.contains(".multicluster-proxy.svc"), "{dns}");
    // Agents must reach a replica during its warm-up, when it is not ready.
    let agents = services
        .split("\n---\n")
        .find(|doc| doc.contains("name: proxy-server-agents\n"))
        .expect("agents' Service");
    assert!(
        agents.contains("publishNotReadyAddresses: true"),
        "{agents}"
    );
    // Unique ids per pod, and at most one replica away at a time.
    assert!(deployment.contains("fieldPath: metadata.name"));
    assert!(deployment.contains("maxUnavailable: 0"));
    let pdb = read("deploy/server/pdb.yaml");
    assert!(pdb.contains("kind: PodDisruptionBudget") && pdb.contains("maxUnavailable: 1"));
    assert!(read("deploy/server/kustomization.yaml").contains("- pdb.yaml"));
}
