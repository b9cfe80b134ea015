//! Joining by token with the real binaries: `proxy-server token create`, an agent with only a
//! token and the pin of the server's CA, its state folder, renewal under traffic, and every
//! refusal (which must change nothing: the token file byte for byte, the counters, the agent's
//! folder).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::procs::{self, bin, metric_opt};
use integration_tests::{AgentProc, Bed, FakeApiServer, ServerProc, get_via_proxy};
use proxy_proto::{Issued, JoinRequest};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A server that lets agents join with tokens from `dir/tokens.yaml`, certificates living `ttl`.
async fn joining_server(bed: &Bed, ttl: &str) -> (ServerProc, PathBuf) {
    let pki = &bed.pki;
    let tokens = bed.dir.path().join("tokens.yaml");
    let (tokens_s, signer, key, ca) = (
        tokens.display().to_string(),
        pki.agent_signer_cert().display().to_string(),
        pki.agent_signer_key().display().to_string(),
        pki.server_ca().display().to_string(),
    );
    let server = ServerProc::start(
        pki,
        None,
        &[
            "--join-tokens",
            &tokens_s,
            "--agent-signer-cert",
            &signer,
            "--agent-signer-key",
            &key,
            "--agent-tls-ca",
            &ca,
            "--agent-cert-ttl",
            ttl,
        ],
    )
    .await
    .expect("proxy-server with joins");
    (server, tokens)
}

/// What `token create` printed.
#[derive(Debug)]
struct Made {
    token: String,
    pin: String,
    join_line: String,
}

fn token_cli(args: &[&str]) -> std::process::Output {
    Command::new(bin("proxy-server"))
        .arg("token")
        .args(args)
        .env_remove("PROXY_SERVER_JOIN_TOKENS")
        .env_remove("PROXY_SERVER_AGENT_TLS_CA")
        .output()
        .expect("proxy-server token")
}

fn create_token(tokens: &Path, ca: &Path, cluster: &str, extra: &[&str]) -> Made {
    let (tokens, ca) = (tokens.display().to_string(), ca.display().to_string());
    let mut args = vec![
        "create",
        "--tokens-file",
        &tokens,
        "--cluster",
        cluster,
        "--agent-tls-ca",
        &ca,
    ];
    args.extend_from_slice(extra);
    let out = token_cli(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "token create: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
            .to_owned()
    };
    Made {
        token: value("token"),
        pin: value("server-ca-hash"),
        join_line: value("join"),
    }
}

fn joins(admin: SocketAddr, result: &str) -> impl std::future::Future<Output = f64> {
    let series = format!(r#"proxy_server_joins_total{{result="{result}"}}"#);
    async move { metric_opt(admin, &series).await.unwrap_or(0.0) }
}

async fn join_agent(
    dir: &Path,
    server: SocketAddr,
    upstream: SocketAddr,
    state: &Path,
    extra: &[&str],
) -> anyhow::Result<AgentProc> {
    let state = state.display().to_string();
    let mut args = vec!["--state-dir", state.as_str()];
    args.extend_from_slice(extra);
    AgentProc::start_joining(dir, &[server], upstream, &args).await
}

/// A CONNECT to alpha through `frontend`, within 10 s.
async fn tunnel_to_alpha(frontend: SocketAddr) -> tokio::net::TcpStream {
    tokio::time::timeout(
        Duration::from_secs(10),
        integration_tests::connect(frontend, "alpha:443"),
    )
    .await
    .expect("CONNECT answered within 10 s")
    .expect("CONNECT")
    .tunnel()
    .expect("a tunnel")
}

/// An upstream that sends back what it receives.
async fn echo_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .expect("exists")
        .permissions()
        .mode()
        & 0o777
}

/// The flow a user follows: `token create`, the printed command, a registered agent reaching its
/// API server; a restart from the state folder without the token; the token then used up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_with_a_token_and_restarts_from_its_state_folder() {
    let bed = Bed::new(&["alpha"]);
    let (server, tokens) = joining_server(&bed, "1h").await;
    let api = FakeApiServer::start(&bed.pki, "alpha").await.expect("API");
    let started = Instant::now();
    let agent_addr = server.agent_addr.to_string();
    let made = create_token(
        &tokens,
        &bed.pki.server_ca(),
        "alpha",
        &["--server", &agent_addr],
    );
    // The printed command is the one to run, with the values printed above it.
    assert!(
        made.join_line.starts_with(&format!(
            "proxy-agent --server {agent_addr} --join-token {} --server-ca-hash {} --state-dir ",
            made.token, made.pin
        )),
        "{}",
        made.join_line
    );
    assert!(made.pin.starts_with("sha256:") && made.pin.len() == 7 + 64);
    // Only the hash of the secret is kept.
    let secret = made.token.split_once('.').expect("id.secret").1;
    let file = std::fs::read_to_string(&tokens).expect("token file");
    assert!(!file.contains(secret), "{file}");
    assert_eq!(mode(&tokens), 0o600);

    let state = bed.dir.path().join("alpha-state");
    let agent = join_agent(
        bed.dir.path(),
        server.agent_addr,
        api.addr,
        &state,
        &["--join-token", &made.token, "--server-ca-hash", &made.pin],
    )
    .await
    .expect("a joining agent");
    agent
        .wait_registered(Duration::from_secs(10))
        .await
        .expect("registered");
    let took = started.elapsed();
    eprintln!("token create to a registered agent: {took:?}");
    let (status, body) = get_via_proxy(server.frontend_addr, &bed.pki, "alpha", "/version")
        .await
        .expect("through the joined agent");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("+alpha"));
    assert_eq!(joins(server.admin_addr, "joined").await, 1.0);
    // Its identity: the key made on the agent and the certificate, in one file only it reads.
    let identity = state.join("identity.pem");
    assert_eq!(mode(&identity), 0o600);
    assert_eq!(mode(&state.join("server-ca.pem")), 0o600);
    assert_eq!(mode(&state), 0o700);
    assert_eq!(
        proxy_common::tls::common_name_of_file(&identity).expect("CN"),
        "alpha"
    );
    let logs = agent.proc.logs();
    assert!(
        !logs.contains(secret),
        "the agent logged its token's secret"
    );
    assert!(!server.proc.logs().contains(secret), "the server logged it");

    // Restarted without the token: the folder is enough.
    agent.proc.kill().await;
    let again = join_agent(bed.dir.path(), server.agent_addr, api.addr, &state, &[])
        .await
        .expect("restart from the state folder");
    again
        .wait_registered(Duration::from_secs(10))
        .await
        .expect("registered again");
    assert_eq!(joins(server.admin_addr, "joined").await, 1.0);

    // The token had one use: another agent with it is refused, and says why.
    let other = bed.dir.path().join("other-state");
    let refused = join_agent(
        bed.dir.path(),
        server.agent_addr,
        api.addr,
        &other,
        &["--join-token", &made.token, "--server-ca-hash", &made.pin],
    )
    .await
    .expect_err("a used-up token");
    assert!(
        format!("{refused:#}").contains("the join token has been used up"),
        "{refused:#}"
    );
    assert_eq!(joins(server.admin_addr, "used_up_token").await, 1.0);
    assert!(
        !other.join("identity.pem").exists(),
        "a refused join wrote an identity"
    );
    // And `token list` shows it used up, never the secret.
    let listed = token_cli(&["list", "--tokens-file", &tokens.display().to_string()]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains("alpha") && listed.contains("used up"),
        "{listed}"
    );
    assert!(!listed.contains(secret));
}

/// Unknown, expired, revoked, other-cluster tokens and a pin that is not the server's: each is
/// refused with its reason, counted, and changes neither the token file nor the agent's folder.
/// With the wrong pin nothing reaches the server at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_or_pin_is_refused_and_changes_nothing() {
    let bed = Bed::new(&["alpha"]);
    let (server, tokens) = joining_server(&bed, "1h").await;
    let api = FakeApiServer::start(&bed.pki, "alpha").await.expect("API");
    let ca = &bed.pki.server_ca();
    let good = create_token(&tokens, ca, "alpha", &[]);
    let short = create_token(&tokens, ca, "alpha", &["--ttl", "1s"]);
    let revoked = create_token(&tokens, ca, "alpha", &[]);
    let revoked_id = revoked.token.split_once('.').unwrap().0.to_owned();
    let out = token_cli(&[
        "revoke",
        "--tokens-file",
        &tokens.display().to_string(),
        &revoked_id,
    ]);
    assert!(out.status.success(), "{out:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (id, _) = good.token.split_once('.').unwrap();
    let wrong_secret = format!("{id}.{}", "x".repeat(16));
    // Another CA's pin: a server holding that CA would be somebody else.
    let other_pin = {
        let other = integration_tests::Bed::new(&[]);
        proxy_common::tls::spki_pin_of_file(&other.pki.server_ca()).unwrap()
    };
    let before = std::fs::read(&tokens).unwrap();
    // What, token, --cluster, the reason the agent reports, the counter's result.
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, Option<&'a str>);
    let cases: [Case<'_>; 5] = [
        (
            "unknown",
            &wrong_secret,
            None,
            "the join token is not valid",
            Some("invalid_token"),
        ),
        (
            "expired",
            &short.token,
            None,
            "the join token has expired",
            Some("expired_token"),
        ),
        (
            "revoked",
            &revoked.token,
            None,
            "the join token has been revoked",
            Some("revoked_token"),
        ),
        (
            "another cluster",
            &good.token,
            Some("beta"),
            "the join token is for another cluster",
            Some("cluster_mismatch"),
        ),
        (
            "wrong pin",
            &good.token,
            None,
            "no certificate the server sent has the pinned public key",
            None,
        ),
    ];
    for (what, token, cluster, reason, result) in cases {
        let state = bed
            .dir
            .path()
            .join(format!("state-{}", what.replace(' ', "-")));
        let pin = if what == "wrong pin" {
            other_pin.as_str()
        } else {
            good.pin.as_str()
        };
        let mut args = vec!["--join-token", token, "--server-ca-hash", pin];
        if let Some(cluster) = cluster {
            args.extend(["--cluster", cluster]);
        }
        let counted_before = match result {
            Some(result) => joins(server.admin_addr, result).await,
            None => 0.0,
        };
        let err = join_agent(bed.dir.path(), server.agent_addr, api.addr, &state, &args)
            .await
            .expect_err(what);
        let err = format!("{err:#}");
        assert!(err.contains(reason), "{what}: {err}");
        assert!(
            !err.contains(token.split_once('.').unwrap().1),
            "{what}: secret in {err}"
        );
        if let Some(result) = result {
            assert_eq!(
                joins(server.admin_addr, result).await,
                counted_before + 1.0,
                "{what}"
            );
        }
        assert!(
            !state.join("identity.pem").exists(),
            "{what}: wrote an identity"
        );
        assert_eq!(
            std::fs::read(&tokens).unwrap(),
            before,
            "{what}: token file changed"
        );
    }
    // The wrong pin sent nothing: the server counted no attempt beyond the four above.
    let mut total = 0.0;
    for result in [
        "invalid_token",
        "expired_token",
        "revoked_token",
        "cluster_mismatch",
        "joined",
    ] {
        total += joins(server.admin_addr, result).await;
    }
    assert_eq!(total, 4.0);
    // The good token still works after all that.
    let state = bed.dir.path().join("state-good");
    let agent = join_agent(
        bed.dir.path(),
        server.agent_addr,
        api.addr,
        &state,
        &["--join-token", &good.token, "--server-ca-hash", &good.pin],
    )
    .await
    .expect("the good token");
    agent
        .wait_registered(Duration::from_secs(10))
        .await
        .expect("registered");
}

/// The pin protects the token from a server in the middle: an agent given the real server's pin
/// but the address of another proxy-server (its own CA, also taking joins) refuses in the TLS
/// handshake, before its token leaves it; the impostor never sees an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_server_never_receives_the_token() {
    let bed = Bed::new(&["alpha"]);
    let (server, tokens) = joining_server(&bed, "1h").await;
    let made = create_token(&tokens, &bed.pki.server_ca(), "alpha", &[]);
    let impostor_bed = Bed::new(&["alpha"]);
    let (impostor, _) = joining_server(&impostor_bed, "1h").await;
    let api = FakeApiServer::start(&bed.pki, "alpha").await.expect("API");
    let state = bed.dir.path().join("state");
    let err = join_agent(
        bed.dir.path(),
        impostor.agent_addr,
        api.addr,
        &state,
        &["--join-token", &made.token, "--server-ca-hash", &made.pin],
    )
    .await
    .expect_err("the impostor's CA is not the pinned one");
    let err = format!("{err:#}");
    assert!(
        err.contains("not the server the token was made for"),
        "{err}"
    );
    let logs = impostor.proc.logs();
    assert!(
        !logs.contains("join refused") && !logs.contains("joined"),
        "the impostor saw a join attempt:\n{logs}"
    );
    let body = procs::admin_get(impostor.admin_addr, "/metrics")
        .await
        .unwrap()
        .1;
    assert!(!body.contains("proxy_server_joins_total{"), "{body}");
    drop(server);
}

/// Talks `Join.Join` directly: the agent binary cannot send what a hostile client sends.
async fn raw_join(
    server: SocketAddr,
    pin: &str,
    req: JoinRequest,
) -> Result<Issued, tonic::Status> {
    let verifier = proxy_common::tls::PinnedCa::new(pin);
    let config = verifier.client_config().expect("TLS");
    let tcp = tokio::net::TcpStream::connect(server).await.expect("tcp");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("TLS with the pinned CA");
    let (send, conn) = h2::client::Builder::new()
        .handshake::<_, proxy_common::grpc::Frame>(tls)
        .await
        .expect("h2");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    proxy_common::unary::call(send, proxy_proto::JOIN_PATH, req, Duration::from_secs(5)).await
}

fn csr(cluster: &str, key: &rcgen::KeyPair) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cluster);
    params.distinguished_name = dn;
    params.serialize_request(key).unwrap().der().to_vec()
}

/// Hostile requests: a CSR that is not one, a CSR with an unaccepted key type, a flood of
/// attempts from one address (answered RESOURCE_EXHAUSTED). None costs the token a use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_csrs_and_a_flood_are_refused_without_spending_the_token() {
    let bed = Bed::new(&["alpha"]);
    let (server, tokens) = joining_server(&bed, "1h").await;
    let made = create_token(&tokens, &bed.pki.server_ca(), "alpha", &[]);
    let before = std::fs::read(&tokens).unwrap();
    let garbage = raw_join(
        server.agent_addr,
        &made.pin,
        JoinRequest {
            token: made.token.clone(),
            csr: b"not a certificate request".to_vec(),
        },
    )
    .await
    .expect_err("garbage");
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument, "{garbage:?}");
    let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256);
    // ring cannot make RSA keys: an Ed448-less world leaves P-521 as the key type to refuse.
    let key = match rsa {
        Ok(key) => key,
        Err(_) => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
    };
    if key.algorithm() == &rcgen::PKCS_RSA_SHA256 {
        let refused = raw_join(
            server.agent_addr,
            &made.pin,
            JoinRequest {
                token: made.token.clone(),
                csr: csr("alpha", &key),
            },
        )
        .await
        .expect_err("an RSA key");
        assert!(refused.message().contains("key"), "{refused:?}");
    }
    let huge = raw_join(
        server.agent_addr,
        &made.pin,
        JoinRequest {
            token: made.token.clone(),
            csr: vec![0x30; proxy_proto::MAX_CSR + 1],
        },
    )
    .await
    .expect_err("too large");
    assert_eq!(huge.code(), tonic::Code::InvalidArgument, "{huge:?}");
    assert_eq!(
        std::fs::read(&tokens).unwrap(),
        before,
        "a refused CSR spent the token"
    );
    // A flood from one address: five at once, then one every two seconds.
    let mut limited = 0;
    for _ in 0..8 {
        let status = raw_join(
            server.agent_addr,
            &made.pin,
            JoinRequest {
                token: "abcdef.0123456789abcdef".into(),
                csr: csr("alpha", &rcgen::KeyPair::generate().unwrap()),
            },
        )
        .await
        .expect_err("a bogus token");
        if status.code() == tonic::Code::ResourceExhausted {
            limited += 1;
        }
    }
    assert!(limited >= 4, "only {limited} of 8 were rate limited");
    assert!(joins(server.admin_addr, "rate_limited").await >= 4.0);
    assert_eq!(std::fs::read(&tokens).unwrap(), before);
}

/// A 30 s certificate is renewed at 70–90 % of its life over the agent's own identity, while
/// a tunneled connection carries data the whole time: the connection never breaks, the agent
/// never re-registers, and after the first certificate has expired new connections work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_under_traffic_without_dropping_a_tunnel() {
    let bed = Bed::new(&["alpha"]);
    let (server, tokens) = joining_server(&bed, "30s").await;
    let echo = echo_server().await;
    let made = create_token(&tokens, &bed.pki.server_ca(), "alpha", &[]);
    let state = bed.dir.path().join("state");
    let agent = join_agent(
        bed.dir.path(),
        server.agent_addr,
        echo,
        &state,
        &["--join-token", &made.token, "--server-ca-hash", &made.pin],
    )
    .await
    .expect("joined");
    agent
        .wait_registered(Duration::from_secs(10))
        .await
        .expect("registered");
    let first = std::fs::read(state.join("identity.pem")).unwrap();
    let first_expiry = Instant::now() + Duration::from_secs(30);
    let mut tunnel = tunnel_to_alpha(server.frontend_addr).await;
    let mut round = 0u64;
    let mut renewed_at = None;
    while Instant::now() < first_expiry + Duration::from_secs(3) {
        round += 1;
        let line = format!("round {round}\n");
        tunnel
            .write_all(line.as_bytes())
            .await
            .expect("the tunnel still takes data");
        let mut back = vec![0; line.len()];
        tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut back))
            .await
            .expect("echo within 5 s")
            .expect("the tunnel still carries data");
        assert_eq!(back, line.as_bytes());
        if renewed_at.is_none() && std::fs::read(state.join("identity.pem")).unwrap() != first {
            renewed_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let renewed_at = renewed_at.expect("the certificate was not renewed before it expired");
    assert!(
        renewed_at + Duration::from_secs(3) < first_expiry,
        "renewed too late"
    );
    assert_eq!(joins(server.admin_addr, "renewed").await, 1.0);
    // Registered once, never again: the tunnel to the server is the first one.
    let logs = server.proc.logs();
    assert_eq!(logs.matches("agent registered").count(), 1, "{logs}");
    // The first certificate has expired; a new connection through the agent works.
    let mut fresh = tunnel_to_alpha(server.frontend_addr).await;
    fresh.write_all(b"after expiry\n").await.unwrap();
    let mut back = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(5), fresh.read_exact(&mut back))
        .await
        .expect("echo within 5 s")
        .expect("echo");
    assert_eq!(&back, b"after expiry\n");
    // And a restart now uses the renewed certificate (the first one would be refused).
    agent.proc.kill().await;
    let again = join_agent(bed.dir.path(), server.agent_addr, echo, &state, &[])
        .await
        .expect("restart with the renewed certificate");
    again
        .wait_registered(Duration::from_secs(10))
        .await
        .expect("registered with the renewed certificate");
}
