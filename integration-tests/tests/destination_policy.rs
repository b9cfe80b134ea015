//! `Proxy-Destination` is granted per client on the hub (`destinations:` in the auth file) and
//! allowed per agent in the member: both must agree. The hub decides first, so an agent is never
//! asked for a destination the client may not have, and a refusal describes neither list.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use integration_tests::Testbed;
use integration_tests::client::raw_exchange;
use integration_tests::procs::metric;
use tokio::io::AsyncWriteExt;

/// A listener that answers every connection with `banner` and counts them.
async fn counted(banner: &'static str) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(format!("{banner}\n").as_bytes()).await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_are_granted_per_client_before_the_agent_is_asked() {
    let (upstream, _) = counted("upstream").await;
    let (metrics, metrics_hits) = counted("metrics").await;
    let (secret, secret_hits) = counted("secret").await;
    let bed = Testbed::builder(&["alpha"]);
    let policy = bed.dir().join("auth.yaml");
    std::fs::write(
        &policy,
        format!(
            "clients:\n  - name: mon\n    token: mon-token\n    clusters: [alpha]\n    destinations: ['{metrics}']\n  - name: kubefed\n    token: kf-token\n    clusters: [alpha]\n"
        ),
    )
    .unwrap();
    // The agent allows both destinations: only the hub's grants tell the clients apart.
    let allow = format!("--allow-destination={metrics},{secret}");
    let bed = bed
        .server_args(&["--frontend-auth-file", policy.to_str().unwrap()])
        .agent("alpha", upstream)
        .agent_args(&[&allow])
        .agent_args(&integration_tests::procs::NO_WARM)
        .start()
        .await;
    let connect = |token: &str, destination: Option<String>| {
        let header = destination
            .map(|d| format!("Proxy-Destination: {d}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "CONNECT alpha:443 HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n{header}\r\n"
        );
        let frontend = bed.frontend();
        async move { raw_exchange(frontend, request.as_bytes()).await }
    };

    for (token, destination) in [
        ("kf-token", metrics.to_string()),
        ("kf-token", secret.to_string()),
        ("mon-token", secret.to_string()),
    ] {
        let answer = connect(token, Some(destination.clone())).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert_eq!(body, "destination not allowed for cluster \"alpha\"\n");
        // Neither list, nor any configured address, nor the flag reaches the client.
        for leak in [
            metrics.to_string(),
            secret.to_string(),
            "allow-destination".into(),
            "destinations".into(),
        ] {
            assert!(!answer.contains(&leak), "{leak} in {answer}");
        }
    }
    assert_eq!(
        metric(
            bed.server.admin_addr,
            r#"proxy_server_connections_total{cluster="alpha",result="destination_forbidden"}"#
        )
        .await,
        3.0
    );
    // The agent was never asked: it would have dialed both.
    assert_eq!(metrics_hits.load(Ordering::SeqCst), 0);
    assert_eq!(secret_hits.load(Ordering::SeqCst), 0);

    // What is granted on both sides goes through; the API server needs no grant.
    let answer = connect("mon-token", Some(metrics.to_string())).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("metrics\n"), "{answer}");
    let answer = connect("kf-token", None).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("upstream\n"), "{answer}");
}
