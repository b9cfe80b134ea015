//! The frontend as the single door into every member cluster: TLS, authentication,
//! per-cluster authorization, revocation without restart, and certificate rotation.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::client::{FrontendClient, base64, write_kubeconfig};
use integration_tests::procs::metric;
use integration_tests::upstream::BannerServer;
use integration_tests::{AgentProc, Bed, ServerProc, Testbed};
use tokio::io::{AsyncBufReadExt, BufReader};

const POLICY: &str = r#"
clients:
  - name: kubefed
    token: "kubefed-token"
    clusters: ["alpha"]
  - name: ops
    clusters: ["beta", "gamma-*"]
"#;

fn write_policy(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("auth.yaml");
    // Write then rename, as a config-management tool would, so the server never reads half a file.
    let tmp = dir.join("auth.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A TLS frontend with a client CA and the policy above; agents for alpha (`agents[0]`) and beta
/// in front of banner upstreams, or fake API servers with `apis`.
async fn door() -> Testbed {
    door_with(false).await
}

async fn door_with(apis: bool) -> Testbed {
    let bed = Testbed::builder(&["alpha", "beta"]);
    let policy = s(&write_policy(bed.dir(), POLICY));
    let pki = bed.pki();
    let (cert, key, ca) = (
        s(&pki.server_cert()),
        s(&pki.server_key()),
        s(&pki.frontend_ca()),
    );
    let bed = bed.server_args(&[
        "--frontend-tls-cert",
        &cert,
        "--frontend-tls-key",
        &key,
        "--frontend-ca",
        &ca,
        "--frontend-auth-file",
        &policy,
    ]);
    // alpha's agent counts its upstream dials: none ahead of demand.
    let no_warm = &integration_tests::procs::NO_WARM;
    let bed = if apis {
        bed.member("alpha").agent_args(no_warm).member("beta")
    } else {
        bed.banner_agent("alpha", "alpha-upstream")
            .agent_args(no_warm)
            .banner_agent("beta", "beta-upstream")
    };
    bed.start().await
}

fn client(bed: &Bed, cert: Option<&str>, authorization: Option<String>) -> FrontendClient {
    FrontendClient {
        tls_ca: Some(bed.pki.server_ca()),
        cert: cert.map(|n| (bed.pki.client_cert(n), bed.pki.client_key(n))),
        authorization,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_and_denied_matrix_over_the_tls_frontend() {
    let d = door().await;
    let basic = |user: &str, pass: &str| {
        Some(format!(
            "Basic {}",
            base64(format!("{user}:{pass}").as_bytes())
        ))
    };
    let cases: Vec<(&str, FrontendClient, u16, u16)> = vec![
        // (who, client, status for alpha, status for beta)
        (
            "bearer token",
            client(&d.bed, None, Some("Bearer kubefed-token".into())),
            200,
            403,
        ),
        (
            "basic token",
            client(&d.bed, None, basic("kubefed", "kubefed-token")),
            200,
            403,
        ),
        (
            "basic, other user",
            client(&d.bed, None, basic("ops", "kubefed-token")),
            407,
            407,
        ),
        (
            "wrong token",
            client(&d.bed, None, Some("Bearer guess".into())),
            407,
            407,
        ),
        (
            "client cert ops",
            client(&d.bed, Some("ops"), None),
            403,
            200,
        ),
        (
            "client cert not in policy",
            client(&d.bed, Some("stranger"), None),
            407,
            407,
        ),
        ("nothing", client(&d.bed, None, None), 407, 407),
        // A token decides over a certificate, and a wrong one is not rescued by it.
        (
            "cert ops + wrong token",
            client(&d.bed, Some("ops"), Some("Bearer guess".into())),
            407,
            407,
        ),
    ];
    let dials_before = metric(
        d.agents[0].admin_addr,
        "proxy_agent_upstream_dial_duration_seconds_count",
    )
    .await;
    let mut alpha_ok = 0.0;
    for (who, c, want_alpha, want_beta) in &cases {
        for (cluster, want) in [("alpha", want_alpha), ("beta", want_beta)] {
            let (answer, tunnel) = c
                .connect(d.server.frontend_addr, &format!("{cluster}:443"))
                .await
                .unwrap();
            assert_eq!(answer.status, *want, "{who} -> {cluster}: {answer:?}");
            match answer.status {
                200 => {
                    let mut line = String::new();
                    BufReader::new(tunnel.unwrap())
                        .read_line(&mut line)
                        .await
                        .unwrap();
                    assert_eq!(line.trim(), format!("{cluster}-upstream"));
                    if cluster == "alpha" {
                        alpha_ok += 1.0;
                    }
                }
                407 => {
                    assert!(
                        answer.head.contains("Proxy-Authenticate: Basic"),
                        "{answer:?}"
                    );
                    assert!(!answer.body.contains("kubefed-token"), "{answer:?}");
                }
                403 => assert!(answer.body.contains(cluster), "{answer:?}"),
                _ => {}
            }
        }
    }
    // Refused requests never reached the agent: it dialed exactly once per allowed CONNECT.
    let dials = metric(
        d.agents[0].admin_addr,
        "proxy_agent_upstream_dial_duration_seconds_count",
    )
    .await;
    assert_eq!(
        dials - dials_before,
        alpha_ok,
        "agent asked to dial for refused requests"
    );
    let admin = d.server.admin_addr;
    assert_eq!(
        metric(
            admin,
            r#"proxy_server_connections_total{cluster="alpha",result="forbidden"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            admin,
            r#"proxy_server_connections_total{cluster="beta",result="forbidden"}"#
        )
        .await,
        2.0
    );
    assert!(
        metric(
            admin,
            r#"proxy_server_connections_total{cluster="alpha",result="unauthenticated"}"#
        )
        .await
            >= 5.0
    );
    let logs = d.server.proc.logs_with("decision=\"forbidden\"", 1).await;
    assert!(
        logs.contains("decision=\"forbidden\"") || logs.contains("decision=forbidden"),
        "decisions not logged"
    );
    assert!(!logs.contains("kubefed-token"), "a token reached the logs");
}

/// Clients of the TLS frontend move to their agent's shard after their head; a burst of them,
/// eight at a time, each gets its `200` at once from a warm connection. The upstream is an API
/// server, which waits for the client to speak first, so nothing but the `200` itself can bring
/// it out. (A socket that has just moved is not writable until its first event: unflushed, the
/// `200` waited in rustls, and some clients of each burst were never answered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_of_a_burst_over_the_tls_frontend_gets_its_200() {
    let d = door_with(true).await;
    let c = std::sync::Arc::new(client(&d.bed, Some("ops"), None));
    let frontend = d.server.frontend_addr;
    for burst in 0..10 {
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    tokio::time::timeout(Duration::from_secs(10), c.connect(frontend, "beta:443"))
                        .await
                })
            })
            .collect();
        for client in clients {
            let (answer, _tunnel) = client
                .await
                .unwrap()
                .unwrap_or_else(|_| panic!("burst {burst}: a client was never answered"))
                .unwrap();
            assert_eq!(answer.status, 200, "{answer:?}");
        }
    }
    assert!(
        metric(d.server.admin_addr, "proxy_server_warm_connects_total").await > 0.0,
        "some came from warm connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_with_a_token_in_proxy_url_works_and_without_it_is_refused() {
    let bed = Testbed::builder(&["alpha"]);
    let policy = s(&write_policy(bed.dir(), POLICY));
    let bed = bed
        .server_args(&["--frontend-auth-file", &policy])
        .member("alpha")
        .start()
        .await;
    let kubectl = |url: String| {
        let cfg = write_kubeconfig(bed.dir(), bed.pki(), "alpha", &url).unwrap();
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(cfg)
            .args(["--request-timeout", "10s", "get", "--raw", "/version"])
            .output()
            .unwrap()
    };
    let ok = kubectl(format!("http://kubefed:kubefed-token@{}", bed.frontend()));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("+alpha"));
    let refused = kubectl(format!("http://{}", bed.frontend()));
    assert!(
        !refused.status.success(),
        "kubectl got through without a token"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("proxy authentication required: send Proxy-Authorization"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_shows_the_proxys_reason_for_every_refusal() {
    // kubectl prints only the status line of a refused CONNECT ("Unable to connect to the
    // server: <reason phrase>"), so the reason must be there, not only in the body.
    let bed = Testbed::builder(&["alpha", "beta", "gamma"]);
    let policy = s(&write_policy(
        bed.dir(),
        "clients:\n  - name: kubefed\n    token: \"kubefed-token\"\n    clusters: [\"alpha\", \"gamma\"]\n",
    ));
    // alpha's agent dials a port where nothing listens: its dials fail (502).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_upstream = closed.local_addr().unwrap();
    drop(closed);
    let bed = bed
        .server_args(&["--frontend-auth-file", &policy, "--warmup", "0s"])
        .agent("alpha", dead_upstream)
        .start()
        .await;
    let kubectl = |cluster: &str, credentials: &str| {
        let url = format!("http://{credentials}{}", bed.frontend());
        let dir = bed
            .dir()
            .join(format!("kc-{cluster}-{}", credentials.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = write_kubeconfig(&dir, bed.pki(), cluster, &url).unwrap();
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(cfg)
            .args(["--request-timeout", "10s", "get", "--raw", "/version"])
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        assert!(!out.status.success(), "kubectl got through to {cluster}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let token = "kubefed:kubefed-token@";
    for (cluster, credentials, reason) in [
        (
            "alpha",
            "",
            "proxy authentication required: send Proxy-Authorization",
        ),
        ("alpha", "kubefed:wrong@", "invalid proxy credentials"),
        (
            "beta",
            token,
            "\"kubefed\" is not allowed to reach cluster \"beta\"",
        ),
        ("gamma", token, "no agent connected for cluster \"gamma\""),
        (
            "alpha",
            token,
            "of cluster \"alpha\" could not reach its upstream: dial 127.0.0.1:",
        ),
    ] {
        let err = kubectl(cluster, credentials);
        assert!(
            err.contains(reason),
            "{cluster}: expected {reason:?} in:\n{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_https_frontend_with_a_token_and_with_a_client_certificate() {
    let d = door_with(true).await;
    let proxy = format!("https://localhost:{}", d.server.frontend_addr.port());
    let curl = |extra: &[&str], cluster: &str| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--proxy",
                &proxy,
                "--proxy-cacert",
            ])
            .arg(d.bed.pki.server_ca())
            .arg("--cacert")
            .arg(d.bed.pki.apiserver_ca(cluster))
            .args(extra)
            .arg(format!("https://{cluster}:443/version"))
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (out, err) = curl(&["--proxy-user", "kubefed:kubefed-token"], "alpha");
    assert!(out.contains("v1.32.0+alpha"), "token: {out} {err}");
    let (cert, key) = (
        s(&d.bed.pki.client_cert("ops")),
        s(&d.bed.pki.client_key("ops")),
    );
    let (out, err) = curl(&["--proxy-cert", &cert, "--proxy-key", &key], "beta");
    assert!(out.contains("v1.32.0+beta"), "client cert: {out} {err}");
    let (out, err) = curl(&[], "alpha");
    assert!(
        !out.contains("alpha") && err.contains("407"),
        "no credentials: {out} {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_working_within_two_seconds_and_a_broken_file_keeps_the_last_policy()
{
    let d = door().await;
    let kubefed = client(&d.bed, None, Some("Bearer kubefed-token".into()));
    let (answer, open) = kubefed
        .connect(d.server.frontend_addr, "alpha:443")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let mut open = BufReader::new(open.unwrap());

    // A broken file: the last good policy stays in force.
    write_policy(d.bed.dir.path(), "clients: [ this is not: valid");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.server.proc.logs().contains("reload failed") {
        assert!(Instant::now() < deadline, "bad policy not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        kubefed
            .connect(d.server.frontend_addr, "alpha:443")
            .await
            .unwrap()
            .0
            .status,
        200
    );

    // Revoke kubefed.
    write_policy(
        d.bed.dir.path(),
        "clients:\n  - name: ops\n    clusters: [beta]\n",
    );
    let revoked = Instant::now();
    loop {
        let status = kubefed
            .connect(d.server.frontend_addr, "alpha:443")
            .await
            .unwrap()
            .0
            .status;
        if status == 407 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "token still accepted {:?} after revocation",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("revocation took effect after {:?}", revoked.elapsed());
    // The connection opened before the revocation is not cut.
    let mut line = String::new();
    open.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "alpha-upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_restart_old_connections_keep_working() {
    // Two PKIs: the server starts with A's certificates and is switched to B's by rewriting the
    // files it was started with.
    let a = Bed::new(&["alpha"]);
    let b = Bed::new(&["alpha"]);
    let live = a.dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    let install = |from: &proxy_certs::DevPki| {
        for (src, name) in [
            (from.server_cert(), "server.pem"),
            (from.server_key(), "server.key"),
            (from.agent_ca(), "ca.pem"),
        ] {
            let tmp = live.join(format!("{name}.tmp"));
            std::fs::copy(src, &tmp).unwrap();
            std::fs::rename(&tmp, live.join(name)).unwrap();
        }
    };
    install(&a.pki);
    let (cert, key, ca) = (
        s(&live.join("server.pem")),
        s(&live.join("server.key")),
        s(&live.join("ca.pem")),
    );
    let upstream = BannerServer::start("alpha-upstream").await.unwrap();
    let mut server = ServerProc::start(
        &a.pki,
        None,
        &[
            "--agent-tls-cert",
            &cert,
            "--agent-tls-key",
            &key,
            "--agent-ca",
            &ca,
            "--frontend-tls-cert",
            &cert,
            "--frontend-tls-key",
            &key,
        ],
    )
    .await
    .unwrap();
    let old_agent = AgentProc::start_ready(&a.pki, &[server.agent_addr], "alpha", upstream.addr)
        .await
        .unwrap();
    let via = |bed: &Bed| FrontendClient {
        tls_ca: Some(bed.pki.server_ca()),
        ..Default::default()
    };
    let (answer, before) = via(&a)
        .connect(server.frontend_addr, "alpha:443")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);

    install(&b.pki);
    // New frontend connections get B's certificate: A's CA stops verifying it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while via(&b)
        .connect(server.frontend_addr, "alpha:443")
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "frontend certificate not rotated:\n{}",
            server.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        via(&a)
            .connect(server.frontend_addr, "alpha:443")
            .await
            .is_err(),
        "old certificate still served"
    );
    // The old agent's tunnel and the connection opened before rotation keep working.
    let mut line = String::new();
    BufReader::new(before.unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    assert_eq!(line.trim(), "alpha-upstream");
    assert_eq!(
        via(&b)
            .connect(server.frontend_addr, "alpha:443")
            .await
            .unwrap()
            .0
            .status,
        200
    );
    // New agents must now present B's certificates: A's are refused, B's accepted.
    let stale = AgentProc::start(&a.pki, &[server.agent_addr], "alpha", upstream.addr, &[])
        .await
        .unwrap();
    assert!(
        stale.wait_registered(Duration::from_secs(2)).await.is_err(),
        "agent with the old CA registered"
    );
    let fresh = AgentProc::start(&b.pki, &[server.agent_addr], "alpha", upstream.addr, &[])
        .await
        .unwrap();
    fresh
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap();
    drop(old_agent);
    // A bad certificate file keeps the current one.
    std::fs::write(live.join("server.pem"), "garbage").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.proc.logs().contains("reload failed") {
        assert!(Instant::now() < deadline, "bad certificate not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        via(&b)
            .connect(server.frontend_addr, "alpha:443")
            .await
            .unwrap()
            .0
            .status,
        200
    );
    server.proc.signal("TERM");
    let _ = server.proc.wait(Duration::from_secs(10)).await;
}

/// SIGHUP re-reads the policy at once, also a change the file watcher cannot see: rewritten in
/// place with the same length and its old modification time (what the watcher compares).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_change_the_file_watcher_cannot_see() {
    let d = door().await;
    let kubefed = client(&d.bed, None, Some("Bearer kubefed-token".into()));
    let status = || async {
        kubefed
            .connect(d.server.frontend_addr, "alpha:443")
            .await
            .unwrap()
            .0
            .status
    };
    assert_eq!(status().await, 200);

    let path = d.bed.dir.path().join("auth.yaml");
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    let changed = POLICY.replace("\"kubefed-token\"", "\"kubefed-TOKEN\"");
    assert_eq!(changed.len(), POLICY.len());
    {
        use std::io::{Seek, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        file.write_all(changed.as_bytes()).unwrap();
        file.set_modified(before).unwrap();
    }
    // Three of the watcher's checks later the old policy is still in force: it saw nothing.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(status().await, 200, "the watcher saw the change after all");

    d.server.proc.signal("HUP");
    let sent = Instant::now();
    while status().await != 407 {
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "SIGHUP did not reload the policy:\n{}",
            d.server.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("reloaded {:?} after SIGHUP", sent.elapsed());
}
