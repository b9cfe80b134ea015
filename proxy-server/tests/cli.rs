//! The command line: every flag documented with its environment variable, and bad
//! configuration refused with a message that names the problem.

use std::process::{Command, Output};

fn server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proxy-server"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run proxy-server")
}

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let out = server(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "agent-addr",
        "agent-tls-cert",
        "agent-tls-key",
        "agent-ca",
        "frontend-addr",
        "admin-addr",
        "operator-addr",
        "admin-hosts",
        "max-agents-per-cluster",
        "dial-timeout",
        "agent-wait",
        "keepalive-interval",
        "keepalive-timeout",
        "cluster-suffix",
        "connect-ports",
        "server-id",
        "server-count",
        "server-count-dns",
        "warmup",
        "window-budget",
        "tcp-keepalive",
        "log-format",
    ] {
        assert!(
            help.contains(&format!("--{flag}")),
            "--{flag} missing from help"
        );
        let env = format!("PROXY_SERVER_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&env), "{env} missing from help");
    }
    assert!(help.contains("[default: 0.0.0.0:8091]") && help.contains("[default: 127.0.0.1:8090]"));
}

#[test]
fn missing_or_unreadable_certificates_are_refused_clearly() {
    let out = server(&["--agent-tls-cert", "x.pem", "--agent-tls-key", "x.key"]);
    assert_eq!(out.status.code(), Some(2), "missing --agent-ca accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--agent-ca"));

    let dir = tempfile::tempdir().unwrap();
    let pki = proxy_certs::write_dev_pki(dir.path(), &["alpha"]).unwrap();
    let missing = dir.path().join("nope.pem");
    let out = server(&[
        "--agent-tls-cert",
        missing.to_str().unwrap(),
        "--agent-tls-key",
        pki.server_key().to_str().unwrap(),
        "--agent-ca",
        pki.agent_ca().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope.pem"),
        "error does not name the file: {err}"
    );

    // A key that does not belong to the certificate.
    let out = server(&[
        "--agent-tls-cert",
        pki.server_cert().to_str().unwrap(),
        "--agent-tls-key",
        pki.agent_key("alpha").to_str().unwrap(),
        "--agent-ca",
        pki.agent_ca().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // Both files named, so the operator knows which pair to look at.
    assert!(
        err.contains(&format!(
            "certificate {} and key {} do not go together",
            pki.server_cert().display(),
            pki.agent_key("alpha").display()
        )),
        "{err}"
    );
}

#[test]
fn an_address_in_use_is_reported_with_the_listener_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = proxy_certs::write_dev_pki(dir.path(), &["alpha"]).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = server(&[
        "--agent-tls-cert",
        pki.server_cert().to_str().unwrap(),
        "--agent-tls-key",
        pki.server_key().to_str().unwrap(),
        "--agent-ca",
        pki.agent_ca().to_str().unwrap(),
        "--agent-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--frontend-addr",
        &addr,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr} (frontend)")),
        "{err}"
    );
}

#[test]
fn zero_timeouts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = proxy_certs::write_dev_pki(dir.path(), &["alpha"]).unwrap();
    let out = server(&[
        "--agent-tls-cert",
        pki.server_cert().to_str().unwrap(),
        "--agent-tls-key",
        pki.server_key().to_str().unwrap(),
        "--agent-ca",
        pki.agent_ca().to_str().unwrap(),
        "--dial-timeout",
        "0s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--dial-timeout: must be greater than zero")
    );
    // Durations that would overflow the clock (a panic deep inside) are refused up front.
    for flag in [
        "--dial-timeout",
        "--agent-wait",
        "--warmup",
        "--shutdown-grace",
    ] {
        let out = server(&[
            "--agent-tls-cert",
            pki.server_cert().to_str().unwrap(),
            "--agent-tls-key",
            pki.server_key().to_str().unwrap(),
            "--agent-ca",
            pki.agent_ca().to_str().unwrap(),
            flag,
            "100000000years",
        ]);
        assert_eq!(out.status.code(), Some(1), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{flag}: must be at most 7days")),
            "{err}"
        );
    }
}

#[test]
fn an_open_frontend_on_a_public_address_must_be_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let pki = proxy_certs::write_dev_pki(dir.path(), &["alpha"]).unwrap();
    let (cert, key, ca) = (pki.server_cert(), pki.server_key(), pki.agent_ca());
    let base = [
        "--agent-tls-cert",
        cert.to_str().unwrap(),
        "--agent-tls-key",
        key.to_str().unwrap(),
        "--agent-ca",
        ca.to_str().unwrap(),
        "--agent-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--frontend-addr",
        "0.0.0.0:0",
    ];
    let out = server(&base);
    assert_eq!(out.status.code(), Some(1), "open public frontend accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--frontend-allow-unauthenticated"),
        "{err}"
    );

    // With the explicit flag it starts (and is stopped with SIGTERM).
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxy-server"))
        .args(base)
        .arg("--frontend-allow-unauthenticated")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("proxy-server listening"), "{line}");
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_broken_auth_file_is_refused_at_start_without_echoing_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let pki = proxy_certs::write_dev_pki(dir.path(), &["alpha"]).unwrap();
    let auth = dir.path().join("auth.yaml");
    std::fs::write(&auth, "clients:\n  - name: a\n    tokn: hunter2-secret\n").unwrap();
    let out = server(&[
        "--agent-tls-cert",
        pki.server_cert().to_str().unwrap(),
        "--agent-tls-key",
        pki.server_key().to_str().unwrap(),
        "--agent-ca",
        pki.agent_ca().to_str().unwrap(),
        "--frontend-auth-file",
        auth.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.yaml") && err.contains("line 3"), "{err}");
    assert!(!err.contains("hunter2"), "secret echoed: {err}");
}

#[test]
fn frontend_and_agent_certificates_must_come_from_different_cas() {
    let dir = tempfile::tempdir().unwrap();
    let pki = proxy_certs::write_dev_pki(dir.path(), &["alpha"]).unwrap();
    let out = server(&[
        "--agent-tls-cert",
        pki.server_cert().to_str().unwrap(),
        "--agent-tls-key",
        pki.server_key().to_str().unwrap(),
        "--agent-ca",
        pki.agent_ca().to_str().unwrap(),
        "--frontend-tls-cert",
        pki.server_cert().to_str().unwrap(),
        "--frontend-tls-key",
        pki.server_key().to_str().unwrap(),
        "--frontend-ca",
        pki.agent_ca().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "shared CA accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--agent-ca and --frontend-ca must be separate CAs")
            && err.contains("the same CA certificate is in both"),
        "{err}"
    );
}

#[test]
fn replica_count_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let pki = proxy_certs::write_dev_pki(dir.path(), &["alpha"]).unwrap();
    let (cert, key, ca) = (pki.server_cert(), pki.server_key(), pki.agent_ca());
    let with = |extra: &[&str]| {
        let mut args = vec![
            "--agent-tls-cert",
            cert.to_str().unwrap(),
            "--agent-tls-key",
            key.to_str().unwrap(),
            "--agent-ca",
            ca.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = server(&args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = with(&["--server-count", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--server-count: must be at least 1"), "{err}");
    // A fixed count and a DNS count cannot both apply.
    let (code, err) = with(&["--server-count", "3", "--server-count-dns", "replicas.svc"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, err) = with(&["--server-count-dns", "replicas.svc:8091"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("must be a DNS name (no port)"), "{err}");
}
