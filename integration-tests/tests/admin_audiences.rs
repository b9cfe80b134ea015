//! Admin by audience: health and metrics for the platform on `--admin-addr`; the status page,
//! cluster list and kubeconfigs for operators on `--operator-addr` (loopback, or a credential);
//! every response checks `Host` (DNS rebinding).

use std::process::Command;

use integration_tests::Testbed;
use integration_tests::procs::{ServerProc, admin_request, bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_map_is_on_the_operator_listener_and_foreign_hosts_get_nothing() {
    let bed = Testbed::builder(&["alpha"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let (admin, operator) = (bed.server.admin_addr, bed.server.operator_addr);
    let get = |addr, path: &'static str, host: String| async move {
        admin_request(addr, path, &host, &[]).await.unwrap()
    };
    // The platform's listener: health and metrics, and nothing that maps the fleet.
    assert_eq!(get(admin, "/healthz", admin.to_string()).await.0, 200);
    assert_eq!(get(admin, "/metrics", admin.to_string()).await.0, 200);
    for path in ["/", "/api/v1/clusters", "/api/v1/kubeconfig"] {
        let (status, body) = get(admin, path, admin.to_string()).await;
        assert_eq!(status, 404, "{path} on the admin listener: {body}");
    }
    // The operator's: the fleet map, by IP address or localhost.
    let (status, body) = get(operator, "/api/v1/clusters", operator.to_string()).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"alpha\""), "{body}");
    let localhost = format!("localhost:{}", operator.port());
    assert_eq!(get(operator, "/", localhost).await.0, 200);
    // DNS rebinding: a page from evil.example whose name now resolves to us gets nothing.
    for (addr, path) in [
        (operator, "/api/v1/clusters"),
        (operator, "/api/v1/kubeconfig"),
        (operator, "/"),
        (admin, "/metrics"),
        (admin, "/healthz"),
    ] {
        let (status, body) = get(addr, path, "evil.example".into()).await;
        assert_eq!(status, 421, "{path}: {body}");
        assert!(!body.contains("alpha"), "{body}");
        let (status, _) = get(addr, path, format!("evil.example:{}", addr.port())).await;
        assert_eq!(status, 421, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_operator_listener_needs_an_operator_token() {
    let bed = integration_tests::Bed::new(&["alpha"]);
    let pki = &bed.pki;
    // Off loopback without an auth file: refused at start, naming the flag.
    let out = Command::new(bin("proxy-server"))
        .args([
            "--operator-addr",
            "0.0.0.0:0",
            "--agent-addr",
            "127.0.0.1:0",
        ])
        .arg("--agent-tls-cert")
        .arg(pki.server_cert())
        .arg("--agent-tls-key")
        .arg(pki.server_key())
        .arg("--agent-ca")
        .arg(pki.agent_ca())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--operator-addr") && err.contains("operator: true"),
        "{err}"
    );

    let policy = bed.dir.path().join("auth.yaml");
    std::fs::write(
        &policy,
        "clients:\n  - name: ops\n    token: ops-token\n    operator: true\n  - name: kubefed\n    token: kf-token\n    clusters: ['*']\n",
    )
    .unwrap();
    let server = ServerProc::start(
        pki,
        None,
        &[
            "--operator-addr",
            "0.0.0.0:0",
            "--frontend-auth-file",
            policy.to_str().unwrap(),
            "--admin-hosts",
            "proxy.example.com",
        ],
    )
    .await
    .unwrap();
    // Bound on every address; the test only talks to loopback.
    let operator = std::net::SocketAddr::from(([127, 0, 0, 1], server.operator_addr.port()));
    let host = "proxy.example.com";
    let ask = |headers: &'static [&'static str]| async move {
        admin_request(operator, "/api/v1/clusters", host, headers)
            .await
            .unwrap()
    };
    let (status, body) = ask(&[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("operator: true"), "{body}");
    assert_eq!(ask(&["Authorization: Bearer kf-token"]).await.0, 401);
    assert_eq!(ask(&["Authorization: Bearer wrong"]).await.0, 401);
    assert_eq!(ask(&["Authorization: Bearer ops-token"]).await.0, 200);
    // What a browser sends after the Basic prompt: ops:ops-token.
    assert_eq!(
        ask(&["Authorization: Basic b3BzOm9wcy10b2tlbg=="]).await.0,
        200
    );
    // A name it was not given is refused before credentials are even looked at.
    let (status, _) = admin_request(
        operator,
        "/api/v1/clusters",
        "evil.example",
        &["Authorization: Bearer ops-token"],
    )
    .await
    .unwrap();
    assert_eq!(status, 421);
}
