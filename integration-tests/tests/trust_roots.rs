//! Three trust roots that cannot stand in for each other: at start, at reload, and at every
//! connection (docs/security.md). Each test builds the attack on a real server and real agents.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::client::FrontendClient;
use integration_tests::procs::bin;
use integration_tests::upstream::BannerServer;
use integration_tests::{AgentProc, Bed, ServerProc};
use proxy_certs::{Ca, Usage, role_uri};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Replaces `path` the way a config tool or the kubelet would: write beside it, then rename.
fn install(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes an agent identity for `cluster` issued by `ca` over the dev PKI's, with `extra` PEM
/// appended to its chain.
fn agent_identity(bed: &Bed, cluster: &str, ca: &Ca, uris: &[&str], extra: &str) {
    let issued = ca.issue(cluster, uris, Usage::Client).unwrap();
    install(
        &bed.pki.agent_cert(cluster),
        &format!("{}{extra}", issued.cert_pem),
    );
    install(&bed.pki.agent_key(cluster), &issued.key_pem);
}

fn start_refused(args: &[&str]) -> String {
    let out = Command::new(bin("proxy-server"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "started: {err}");
    err
}

#[test]
fn an_intermediate_of_the_agent_ca_as_frontend_ca_is_refused_at_start() {
    // The attack: agent CA = root R, frontend CA = intermediate I signed by R. An agent
    // certificate issued by I, sent with I, verifies under R: it would register a cluster.
    let bed = Bed::new(&["alpha"]);
    let root = Ca::new("corp root").unwrap();
    let intermediate = root.intermediate("frontend clients").unwrap();
    let (agent_ca, frontend_ca) = (bed.dir.path().join("r.pem"), bed.dir.path().join("i.pem"));
    std::fs::write(&agent_ca, root.cert_pem()).unwrap();
    std::fs::write(&frontend_ca, intermediate.cert_pem()).unwrap();
    let pki = &bed.pki;
    let mut args = vec![
        "--agent-addr".to_owned(),
        "127.0.0.1:0".into(),
        "--admin-addr".into(),
        "127.0.0.1:0".into(),
        "--operator-addr".into(),
        "127.0.0.1:0".into(),
        "--frontend-addr".into(),
        "127.0.0.1:0".into(),
        "--agent-tls-cert".into(),
        s(&pki.server_cert()),
        "--agent-tls-key".into(),
        s(&pki.server_key()),
        "--agent-ca".into(),
        s(&agent_ca),
        "--frontend-tls-cert".into(),
        s(&pki.server_cert()),
        "--frontend-tls-key".into(),
        s(&pki.server_key()),
        "--frontend-ca".into(),
        s(&frontend_ca),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = start_refused(&argv);
    assert!(
        err.contains("--agent-ca and --frontend-ca must be separate CAs")
            && err.contains("issued by the other"),
        "{err}"
    );
    // The same CA for both, and a server certificate issued by the agent CA: refused too.
    args[19] = s(&agent_ca);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = start_refused(&argv);
    assert!(err.contains("the same CA certificate is in both"), "{err}");
    let server = root
        .issue("proxy-server", &["localhost"], Usage::Server)
        .unwrap();
    let (cert, key) = (bed.dir.path().join("s.pem"), bed.dir.path().join("s.key"));
    std::fs::write(&cert, &server.cert_pem).unwrap();
    std::fs::write(&key, &server.key_pem).unwrap();
    let err = start_refused(&[
        "--agent-addr",
        "127.0.0.1:0",
        "--agent-tls-cert",
        &s(&cert),
        "--agent-tls-key",
        &s(&key),
        "--agent-ca",
        &s(&agent_ca),
    ]);
    assert!(
        err.contains("--agent-tls-cert and --agent-ca must be separate CAs"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_would_make_agents_frontend_clients_is_refused_and_the_old_ca_kept() {
    let bed = Bed::new(&["alpha"]);
    let pki = &bed.pki;
    // The policy lets an identity named like the agent's CN in: only TLS keeps it out.
    let policy = bed.dir.path().join("auth.yaml");
    std::fs::write(
        &policy,
        "clients:\n  - name: alpha\n    clusters: ['*']\n  - name: ops\n    clusters: ['*']\n",
    )
    .unwrap();
    let live_ca = bed.dir.path().join("frontend-ca-live.pem");
    std::fs::copy(pki.frontend_ca(), &live_ca).unwrap();
    let upstream = BannerServer::start("alpha-upstream").await.unwrap();
    let server = ServerProc::start(
        pki,
        None,
        &[
            "--frontend-tls-cert",
            &s(&pki.server_cert()),
            "--frontend-tls-key",
            &s(&pki.server_key()),
            "--frontend-ca",
            &s(&live_ca),
            "--frontend-auth-file",
            &s(&policy),
        ],
    )
    .await
    .unwrap();
    let _agent = AgentProc::start_ready(pki, &[server.agent_addr], "alpha", upstream.addr)
        .await
        .unwrap();
    let as_client = |cert: (std::path::PathBuf, std::path::PathBuf)| FrontendClient {
        tls_ca: Some(pki.server_ca()),
        cert: Some(cert),
        authorization: None,
    };
    let agent_cert = (pki.agent_cert("alpha"), pki.agent_key("alpha"));
    let ops_cert = (pki.client_cert("ops"), pki.client_key("ops"));
    let tunnel_works = |cert: (std::path::PathBuf, std::path::PathBuf)| {
        let client = as_client(cert);
        async move {
            matches!(
                client.connect(server.frontend_addr, "alpha:443").await,
                Ok((answer, Some(_))) if answer.status == 200
            )
        }
    };
    assert!(tunnel_works(ops_cert.clone()).await);
    assert!(!tunnel_works(agent_cert.clone()).await);

    // The attack: the agent CA written into the frontend-CA file.
    install(&live_ca, &std::fs::read_to_string(pki.agent_ca()).unwrap());
    // Both listeners watch the file: each refuses it, naming the two flags.
    let frontend = "--frontend-ca and --agent-ca must be separate CAs";
    let agents = "--agent-ca and --frontend-ca must be separate CAs";
    let logs = server.proc.logs_with(frontend, 1).await;
    assert!(logs.contains(frontend), "{logs}");
    let logs = server.proc.logs_with(agents, 1).await;
    assert!(logs.contains(agents), "{logs}");
    // The old material is kept: clients still get in, agent certificates still do not.
    for _ in 0..3 {
        assert!(
            !tunnel_works(agent_cert.clone()).await,
            "an agent certificate passed as a frontend client after the reload:\n{}",
            server.proc.logs()
        );
        assert!(tunnel_works(ops_cert.clone()).await);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

/// An agent that must not register: its `/readyz` stays failing while the server logs why.
async fn refused_at_the_agent_listener(bed: &Bed, server_args: &[&str], server_log: &str) {
    let upstream = BannerServer::start("alpha-upstream").await.unwrap();
    let server = ServerProc::start(&bed.pki, None, server_args)
        .await
        .unwrap();
    let agent = AgentProc::start(&bed.pki, &[server.agent_addr], "alpha", upstream.addr, &[])
        .await
        .unwrap();
    let logs = server.proc.logs_with(server_log, 1).await;
    assert!(logs.contains(server_log), "{logs}");
    assert!(
        agent
            .wait_registered(Duration::from_millis(500))
            .await
            .is_err(),
        "the agent registered"
    );
    let (_, clusters) =
        integration_tests::procs::admin_get(server.operator_addr, "/api/v1/clusters")
            .await
            .unwrap();
    assert!(!clusters.contains("\"alpha\""), "{clusters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_that_also_verifies_as_a_frontend_client_is_refused_per_connection() {
    // Two unrelated roots pass the file check; a cross-certificate makes the agent's issuing
    // intermediate X chain to the frontend root too. Only the per-connection check sees it.
    let bed = Bed::new(&["alpha"]);
    let agent_root = Ca::new("agent root").unwrap();
    let client_root = Ca::new("client root").unwrap();
    let x = agent_root.intermediate("agents x").unwrap();
    let x_by_client_root = x.cross_signed_by(&client_root).unwrap();
    install(&bed.pki.agent_ca(), &agent_root.cert_pem());
    install(&bed.pki.frontend_ca(), &client_root.cert_pem());
    agent_identity(
        &bed,
        "alpha",
        &x,
        &[&role_uri("agent", "alpha")],
        &format!("{}{x_by_client_root}", x.cert_pem()),
    );
    let pki = &bed.pki;
    refused_at_the_agent_listener(
        &bed,
        &[
            "--frontend-tls-cert",
            &s(&pki.server_cert()),
            "--frontend-tls-key",
            &s(&pki.server_key()),
            "--frontend-ca",
            &s(&pki.frontend_ca()),
        ],
        "also verifies under another role's CA",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_naming_another_role_or_cluster_is_refused() {
    for (uri, log) in [
        (
            role_uri("client", "alpha"),
            "refused a client certificate of another role",
        ),
        (
            role_uri("agent", "beta"),
            "refused a client certificate of another role",
        ),
    ] {
        let bed = Bed::new(&["alpha"]);
        let agent_ca = Ca::new("agent ca").unwrap();
        install(&bed.pki.agent_ca(), &agent_ca.cert_pem());
        agent_identity(&bed, "alpha", &agent_ca, &[&uri], "");
        refused_at_the_agent_listener(&bed, &[], log).await;
    }
}
