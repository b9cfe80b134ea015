//! Routing by cluster name, agent identity, and the CONNECT error answers.

use std::time::{Duration, Instant};

use integration_tests::client::{banner_via, raw_exchange};
use integration_tests::{AgentProc, ConnectReply, FakeApiServer, Testbed, connect, get_via_proxy};

fn refused(reply: ConnectReply) -> (u16, String) {
    match reply {
        ConnectReply::Refused { status, body } => (status, body),
        ConnectReply::Tunnel(_) => panic!("expected a refusal, got a tunnel"),
    }
}

/// With agents on every shard and CONNECTs accepted on the first, a client moves to its agent's
/// shard once its head names the cluster; with `--shards 0` everything stays on the worker
/// threads. Both binaries' thread models are covered: agents on one thread (their default) or on
/// a pool, the server's worker threads a pool (its default) or one thread. Either way every
/// cluster answers with its own API server, under concurrent clients, and the agents are spread
/// one per shard (as `proxy_server_shard_agents` reports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reach_agents_on_every_shard_and_without_shards() {
    let clusters = ["alpha", "beta", "gamma"];
    for (shards, server_threads, agent_threads) in [("3", "2", "1"), ("0", "1", "3")] {
        let bed = Testbed::builder(&clusters)
            .server_args(&["--shards", shards, "--worker-threads", server_threads])
            .member("alpha")
            .agent_args(&["--worker-threads", agent_threads])
            .member("beta")
            .agent_args(&["--worker-threads", agent_threads])
            .member("gamma")
            .agent_args(&["--worker-threads", agent_threads])
            .start()
            .await;
        // One agent per shard: placed by count. Without shards there is no such series.
        let admin = bed.server.admin_addr;
        for shard in 0..3 {
            let series = format!(r#"proxy_server_shard_agents{{shard="{shard}"}}"#);
            let agents = integration_tests::procs::metric_opt(admin, &series).await;
            let expected = (shards == "3").then_some(1.0);
            assert_eq!(agents, expected, "{series} with --shards {shards}");
        }
        let gets = clusters.iter().cycle().take(30).map(|cluster| {
            let bed = &bed;
            async move {
                let got = get_via_proxy(bed.frontend(), bed.pki(), cluster, "/version").await;
                (*cluster, got)
            }
        });
        for (cluster, got) in futures_util::future::join_all(gets).await {
            let case = format!("{cluster}, --shards {shards}, agent threads {agent_threads}");
            let (status, body) = got.unwrap_or_else(|err| panic!("{case}: {err:#}"));
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, 200, "{case}: {body}");
            assert!(
                body.contains(&format!("+{cluster}")),
                "{cluster} answered {body}"
            );
        }
        if shards == "3" {
            // An agent that leaves is no longer counted on its shard.
            let mut bed = bed;
            for agent in bed.agents.drain(..) {
                agent.proc.kill().await;
            }
            integration_tests::eventually(
                "every shard's agent count back to 0",
                Duration::from_secs(10),
                || async {
                    let mut total = 0.0;
                    for shard in 0..3 {
                        let series = format!(r#"proxy_server_shard_agents{{shard="{shard}"}}"#);
                        total += integration_tests::procs::metric(admin, &series).await;
                    }
                    total == 0.0
                },
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cluster_reaches_its_own_api_server_and_never_the_other() {
    let bed = Testbed::builder(&["alpha", "beta"])
        .member("alpha")
        .member("beta")
        .start()
        .await;

    for _ in 0..3 {
        for (cluster, other) in [("alpha", "beta"), ("beta", "alpha")] {
            let (status, body) = get_via_proxy(bed.frontend(), bed.pki(), cluster, "/version")
                .await
                .unwrap();
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, 200, "{body}");
            assert!(
                body.contains(&format!("+{cluster}")),
                "{cluster} answered {body}"
            );
            assert!(
                !body.contains(other),
                "{cluster} request reached {other}: {body}"
            );
            let (_, ns) = get_via_proxy(bed.frontend(), bed.pki(), cluster, "/api/v1/namespaces")
                .await
                .unwrap();
            let ns = String::from_utf8_lossy(&ns);
            assert!(
                ns.contains(&format!("{cluster}-only")) && !ns.contains(&format!("{other}-only")),
                "{ns}"
            );
        }
    }

    // curl, a real client, through the proxy: verifies beta's certificate with beta's CA, and
    // fails with alpha's CA, so the bytes really came from beta's API server.
    let proxy = format!("http://{}", bed.frontend());
    let curl = |cluster: &str, ca_of: &str| {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--proxy", &proxy, "--cacert"])
            .arg(bed.pki().apiserver_ca(ca_of))
            .arg(format!("https://{cluster}:443/version"))
            .output()
            .expect("curl")
    };
    let ok = curl("beta", "beta");
    assert!(
        ok.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("v1.32.0+beta"));
    let wrong_ca = curl("beta", "alpha");
    assert!(
        !wrong_ca.status.success(),
        "beta's certificate verified with alpha's CA"
    );
}

#[tokio::test]
async fn unknown_cluster_is_503_naming_it_within_100ms() {
    // Once the warm-up is over (during it, CONNECTs wait for agents that may still be arriving:
    // see high_availability.rs), a cluster never seen is answered at once.
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--warmup", "300ms"])
        .start()
        .await;
    integration_tests::eventually("warm-up over", Duration::from_secs(5), || async {
        let (_, body) =
            integration_tests::procs::admin_get(bed.server.operator_addr, "/api/v1/clusters")
                .await
                .unwrap();
        body.contains("\"warming_up\":false")
    })
    .await;
    let started = Instant::now();
    let (status, body) = refused(connect(bed.frontend(), "gamma:443").await.unwrap());
    let elapsed = started.elapsed();
    assert_eq!(status, 503);
    assert!(
        body.contains("\"gamma\""),
        "body does not name the cluster: {body}"
    );
    assert_eq!(body.lines().count(), 1, "body is not one line: {body:?}");
    assert!(elapsed < Duration::from_millis(100), "503 took {elapsed:?}");
}

#[tokio::test]
async fn agent_cannot_register_a_cluster_other_than_its_certificate_cn() {
    let bed = Testbed::builder(&["alpha", "beta"]).start().await;
    let alpha_api = FakeApiServer::start(bed.pki(), "alpha").await.unwrap();
    // beta's certificate, claiming alpha.
    let impostor = AgentProc::start(
        bed.pki(),
        &[bed.server.agent_addr],
        "beta",
        alpha_api.addr,
        &["--cluster", "alpha"],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !impostor
        .proc
        .logs()
        .contains("refused this agent's registration")
    {
        assert!(
            Instant::now() < deadline,
            "agent never logged the refusal:\n{}",
            impostor.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = impostor.proc.logs();
    assert!(
        logs.contains(r#"certificate CN "beta" may not register cluster "alpha""#),
        "reason not logged plainly:\n{logs}"
    );
    let logs = bed
        .server
        .proc
        .logs_with("agent registration refused", 1)
        .await;
    assert!(logs.contains("agent registration refused"), "{logs}");
    let (status, _) = integration_tests::procs::admin_get(impostor.admin_addr, "/readyz")
        .await
        .unwrap();
    assert_eq!(status, 503, "refused agent reports ready");
    let (status, body) = refused(connect(bed.frontend(), "alpha:443").await.unwrap());
    assert_eq!(status, 503, "alpha served by an impostor: {body}");
}

#[tokio::test]
async fn bad_requests_get_400_and_405() {
    let bed = Testbed::builder(&["alpha"]).start().await;
    let send = |raw: &'static [u8]| raw_exchange(bed.frontend(), raw);
    let get = send(b"GET http://alpha/ HTTP/1.1\r\nHost: alpha\r\n\r\n").await;
    assert!(get.starts_with("HTTP/1.1 405 "), "{get}");
    assert!(get.contains("Allow: CONNECT"), "{get}");
    let garbage = send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    let no_port = send(b"CONNECT alpha HTTP/1.1\r\n\r\n").await;
    assert!(no_port.starts_with("HTTP/1.1 400 "), "{no_port}");
    let bad_name = send(b"CONNECT Under_Score!:443 HTTP/1.1\r\n\r\n").await;
    assert!(bad_name.starts_with("HTTP/1.1 400 "), "{bad_name}");
}

#[tokio::test]
async fn unreachable_upstream_is_502_with_the_agents_reason() {
    // A port with nothing listening.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", closed)
        .start()
        .await;
    let (status, body) = refused(connect(bed.frontend(), "alpha:443").await.unwrap());
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains(&closed.to_string()) && body.to_lowercase().contains("refused"),
        "reason missing: {body}"
    );
}

#[tokio::test]
async fn silent_agent_is_504_after_the_dial_timeout() {
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--dial-timeout", "1s"])
        .member("alpha")
        .start()
        .await;
    let agent = &bed.agents[0];
    agent.proc.signal("STOP");
    let started = Instant::now();
    let reply = connect(bed.frontend(), "alpha:443").await;
    agent.proc.signal("CONT");
    let (status, body) = refused(reply.unwrap());
    assert_eq!(status, 504, "{body}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "504 after {elapsed:?}"
    );
    // The agent is fine again afterwards.
    let (status, _) = get_via_proxy(bed.frontend(), bed.pki(), "alpha", "/version")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dials_are_spread_across_the_agents_of_a_cluster() {
    let bed = Testbed::builder(&["alpha"])
        .banner_agent("alpha", "one")
        .banner_agent("alpha", "two")
        .start()
        .await;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..10 {
        *seen
            .entry(banner_via(bed.frontend(), "alpha").await)
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "all dials went to one agent: {seen:?}");
    assert!(seen.values().all(|n| *n >= 3), "dials not spread: {seen:?}");
}

#[tokio::test]
async fn a_connect_port_the_proxy_does_not_serve_is_refused_naming_it() {
    // The agent always dials its API server; `CONNECT alpha:22` must not silently reach it.
    let bed = Testbed::builder(&["alpha"])
        .banner_agent("alpha", "alpha")
        .start()
        .await;
    let (status, body) = refused(connect(bed.frontend(), "alpha:22").await.unwrap());
    assert_eq!(status, 400);
    assert!(
        body.contains("port 22 is not served") && body.contains("CONNECT alpha:443"),
        "{body}"
    );
    // The API server's usual ports are both served.
    for port in [443, 6443] {
        let reply = connect(bed.frontend(), &format!("alpha:{port}"))
            .await
            .unwrap();
        assert!(
            matches!(reply, ConnectReply::Tunnel(_)),
            "{port}: {reply:?}"
        );
    }
}
