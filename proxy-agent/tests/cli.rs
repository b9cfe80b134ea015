//! The command line: every flag documented with its environment variable, the cluster taken
//! from the certificate, and bad configuration refused clearly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run proxy-agent")
}

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let out = agent(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "server",
        "tls-cert",
        "tls-key",
        "server-ca",
        "server-name",
        "cluster",
        "upstream",
        "admin-addr",
        "agent-id",
        "dial-timeout",
        "keepalive-interval",
        "keepalive-timeout",
        "server-probe-interval",
        "window-budget",
        "tcp-keepalive",
        "log-format",
    ] {
        assert!(
            help.contains(&format!("--{flag}")),
            "--{flag} missing from help"
        );
        let env = format!("PROXY_AGENT_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&env), "{env} missing from help");
    }
    assert!(help.contains("[default: kubernetes.default.svc:443]"));
}

#[test]
fn bad_flags_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pki = proxy_certs::write_dev_pki(dir.path(), &["alpha"]).unwrap();
    let base = |server: &'static str, extra: &'static [&'static str]| {
        let mut args = vec![
            "--server".to_owned(),
            server.to_owned(),
            "--tls-cert".to_owned(),
            pki.agent_cert("alpha").display().to_string(),
            "--tls-key".to_owned(),
            pki.agent_key("alpha").display().to_string(),
            "--server-ca".to_owned(),
            pki.server_ca().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = agent(&refs);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(base("no-port", &[]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--server \"no-port\": expected HOST:PORT"),
        "{err}"
    );
    let (code, err) = run(base("localhost:8091", &["--cluster", "Not_A_Name"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("not a valid cluster name"), "{err}");
    let (code, err) = run(base("localhost:8091", &["--upstream", "kubernetes"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("--upstream"), "{err}");
    // A server holds at most 64 warm streams per agent connection: more would only be refused.
    let (code, err) = run(base("localhost:8091", &["--warm-connections", "65"]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--warm-connections \"65\": at most 64"),
        "{err}"
    );
    // Each probe is a TLS handshake on some server: a fleet of agents must not hammer it.
    let (code, err) = run(base("localhost:8091", &["--server-probe-interval", "10ms"]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--server-probe-interval \"10ms\": must be at least 500ms"),
        "{err}"
    );
    // Durations that would overflow the clock (a panic deep inside) are refused up front.
    let (code, err) = run(base(
        "localhost:8091",
        &["--dial-timeout", "100000000years"],
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--dial-timeout") && err.contains("must be at most 7days"),
        "{err}"
    );
}

#[test]
fn cluster_defaults_to_the_certificate_cn() {
    let dir = tempfile::tempdir().unwrap();
    let pki = proxy_certs::write_dev_pki(dir.path(), &["alpha"]).unwrap();
    // No server listens there: the agent starts, names its cluster, and keeps retrying.
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
        .args(["--server", "127.0.0.1:9", "--admin-addr", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(pki.agent_cert("alpha"))
        .arg("--tls-key")
        .arg(pki.agent_key("alpha"))
        .arg("--server-ca")
        .arg(pki.server_ca())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found = false;
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if line.contains("proxy-agent started") {
            found = line.contains("cluster=alpha");
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        found,
        "agent did not take its cluster from the certificate CN"
    );
}
