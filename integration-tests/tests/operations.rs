//! What operators rely on: metrics that move as bytes flow, readiness that follows agents, the
//! status page, generated kubeconfigs, JSON logs, and graceful drain of server and agents.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::client::read_until_closed;
use integration_tests::data::Pattern;
use integration_tests::procs::{admin_get, metric, metric_opt};
use integration_tests::upstream::{BannerServer, BulkServer, SourceServer};
use integration_tests::{AgentProc, Bed, ConnectReply, ServerProc, Testbed, connect, eventually};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_while_bytes_flow_and_settle_after() {
    let source = SourceServer::start().await.unwrap();
    // Counts the agent's upstream dials: none ahead of demand.
    let mut bed = Testbed::builder(&["alpha"])
        .agent("alpha", source.addr)
        .agent_args(&integration_tests::procs::NO_WARM)
        .start()
        .await;
    let (s, a) = (bed.server.admin_addr, bed.agents[0].admin_addr);
    assert_eq!(
        metric(s, r#"proxy_server_agents{cluster="alpha"}"#).await,
        1.0
    );
    assert_eq!(metric(a, "proxy_agent_servers_connected").await, 1.0);

    // A long-lived stream: bytes are visible before it ends.
    let mut tunnel = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let mut buf = vec![0u8; 8 * MIB as usize];
    tunnel.read_exact(&mut buf).await.unwrap();
    tunnel.write_all(b"0123456789").await.unwrap();
    let from = r#"proxy_server_bytes_total{cluster="alpha",direction="from_cluster"}"#;
    assert!(
        metric(s, from).await >= (8 * MIB) as f64,
        "server bytes not counted while flowing"
    );
    assert!(
        metric(a, r#"proxy_agent_bytes_total{direction="from_upstream"}"#).await
            >= (8 * MIB) as f64
    );
    eventually(
        "bytes to cluster counted",
        Duration::from_secs(5),
        || async {
            metric(
                s,
                r#"proxy_server_bytes_total{cluster="alpha",direction="to_cluster"}"#,
            )
            .await
                == 10.0
        },
    )
    .await;
    assert_eq!(
        metric(s, r#"proxy_server_connections_active{cluster="alpha"}"#).await,
        1.0
    );
    assert_eq!(metric(a, "proxy_agent_connections_active").await, 1.0);
    assert_eq!(
        metric(
            s,
            r#"proxy_server_connections_total{cluster="alpha",result="ok"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            s,
            r#"proxy_server_dial_duration_seconds_count{cluster="alpha"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(a, "proxy_agent_upstream_dial_duration_seconds_count").await,
        1.0
    );

    drop(tunnel);
    eventually(
        "connections_active back to 0",
        Duration::from_secs(5),
        || async {
            metric(s, r#"proxy_server_connections_active{cluster="alpha"}"#).await == 0.0
                && metric(a, "proxy_agent_connections_active").await == 0.0
        },
    )
    .await;
    // An unknown cluster is counted without creating a label for it.
    let _ = connect(bed.frontend(), "nosuch:443").await.unwrap();
    assert_eq!(
        metric(
            s,
            r#"proxy_server_connections_total{cluster="",result="no_agent"}"#
        )
        .await,
        1.0
    );
    let (_, body) = admin_get(s, "/metrics").await.unwrap();
    assert!(
        !body.contains("nosuch"),
        "client-chosen name became a label"
    );
    // A failed upstream dial is counted by reason on the agent: the first agent goes, one
    // dialing a closed port comes.
    bed.agents.clear();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let agent = bed.start_agent("alpha", closed).await;
    let _ = connect(bed.frontend(), "alpha:443").await.unwrap();
    assert_eq!(
        metric(
            agent.admin_addr,
            r#"proxy_agent_upstream_dial_failures_total{reason="refused"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            s,
            r#"proxy_server_connections_total{cluster="alpha",result="dial_failed"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_agents_and_servers() {
    let bed = Bed::new(&["alpha"]);
    let up = BannerServer::start("alpha-upstream").await.unwrap();
    let server = ServerProc::start(&bed.pki, None, &[]).await.unwrap();
    let (status, body) = admin_get(server.admin_addr, "/readyz?verbose")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("[+]listeners ok") && body.contains("readyz check passed"),
        "{body}"
    );
    let (status, body) = admin_get(server.admin_addr, "/healthz?verbose")
        .await
        .unwrap();
    assert!(status == 200 && body.contains("[+]ping ok"), "{body}");

    let agent = AgentProc::start_ready(&bed.pki, &[server.agent_addr], "alpha", up.addr)
        .await
        .unwrap();
    let agent_addr = server.agent_addr;
    server.proc.kill().await;
    eventually(
        "agent not ready once its only server is gone",
        Duration::from_secs(5),
        || async { admin_get(agent.admin_addr, "/readyz").await.unwrap().0 == 503 },
    )
    .await;
    let (_, body) = admin_get(agent.admin_addr, "/readyz?verbose")
        .await
        .unwrap();
    assert!(
        body.contains("[-]registered failed") && body.contains("readyz check failed"),
        "{body}"
    );
    let _server = ServerProc::start(&bed.pki, Some(agent_addr), &[])
        .await
        .unwrap();
    agent.wait_registered(Duration::from_secs(5)).await.unwrap();
    let (_, body) = admin_get(agent.admin_addr, "/readyz?verbose")
        .await
        .unwrap();
    assert!(
        body.contains("[+]registered ok: connected to 1 of 1 servers"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_and_json_list_what_is_connected() {
    let up = BannerServer::start("x").await.unwrap();
    let bed = Testbed::builder(&["alpha", "beta"])
        .server_args(&["--server-id", "status-test"])
        .start()
        .await;
    // Not waited for one by one: the series below are.
    let _a1 = AgentProc::start(
        bed.pki(),
        &[bed.server.agent_addr],
        "alpha",
        up.addr,
        &["--agent-id", "alpha-<one>"],
    )
    .await
    .unwrap();
    let _a2 = AgentProc::start(
        bed.pki(),
        &[bed.server.agent_addr],
        "alpha",
        up.addr,
        &["--agent-id", "alpha-two"],
    )
    .await
    .unwrap();
    let _b = AgentProc::start(
        bed.pki(),
        &[bed.server.agent_addr],
        "beta",
        up.addr,
        &["--agent-id", "beta-one"],
    )
    .await
    .unwrap();
    eventually(
        "three agents registered",
        Duration::from_secs(10),
        || async {
            // The series appear as the agents register: absent until then.
            metric_opt(
                bed.server.admin_addr,
                r#"proxy_server_agents{cluster="alpha"}"#,
            )
            .await
                == Some(2.0)
                && metric_opt(
                    bed.server.admin_addr,
                    r#"proxy_server_agents{cluster="beta"}"#,
                )
                .await
                    == Some(1.0)
        },
    )
    .await;
    let open = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();

    let (status, json) = admin_get(bed.server.operator_addr, "/api/v1/clusters")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["server_id"], "status-test");
    let clusters = doc["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 2);
    assert_eq!(clusters[0]["name"], "alpha");
    assert_eq!(clusters[0]["agents"].as_array().unwrap().len(), 2);
    assert_eq!(
        clusters[0]["connections_active"],
        1,
        "{json}\n{}",
        bed.server.proc.logs()
    );
    assert_eq!(clusters[0]["recent_dials"], 1);
    assert!(clusters[0]["dial_ms_p50"].as_f64().unwrap() > 0.0);
    assert_eq!(clusters[1]["agents"][0]["id"], "beta-one");
    assert_eq!(clusters[1]["agents"][0]["draining"], false);

    let (status, html) = admin_get(bed.server.operator_addr, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        html.contains("http-equiv=\"refresh\""),
        "page does not refresh itself"
    );
    for needle in [
        "status-test",
        "<td>alpha</td>",
        "<td>beta</td>",
        "alpha-two",
        "beta-one",
        "median",
    ] {
        assert!(
            html.contains(needle),
            "{needle} missing from the status page"
        );
    }
    assert!(
        html.contains("alpha-&lt;one&gt;") && !html.contains("alpha-<one>"),
        "agent id not escaped"
    );
    drop(open);
}

/// A cluster whose agents all left stays listed as `down`, with since when, for the retention
/// window, and then goes; one that comes back is `up` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_agents_left_is_listed_down_until_the_retention_ends() {
    let up = BannerServer::start("hello").await.unwrap();
    let bed = Testbed::builder(&["alpha", "beta"])
        .server_args(&["--down-retention", "3s"])
        .start()
        .await;
    let alpha = bed.start_agent("alpha", up.addr).await;
    let _beta = bed.start_agent("beta", up.addr).await;
    let clusters = || async {
        let (status, json) = admin_get(bed.server.operator_addr, "/api/v1/clusters")
            .await
            .unwrap();
        assert_eq!(status, 200);
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        doc["clusters"].as_array().unwrap().clone()
    };
    let before = clusters().await;
    assert_eq!(before[0]["state"], "up");
    assert!(before[0]["down_since"].is_null());

    let gone_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    alpha.proc.kill().await;
    eventually("alpha listed down", Duration::from_secs(5), || async {
        clusters().await[0]["state"] == "down"
    })
    .await;
    let listed = clusters().await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["name"], "alpha");
    assert!(listed[0]["agents"].as_array().unwrap().is_empty());
    let since = listed[0]["down_since"].as_f64().unwrap();
    assert!((since - gone_at).abs() < 5.0, "{since} vs {gone_at}");
    assert_eq!(listed[1]["state"], "up");
    let (_, html) = admin_get(bed.server.operator_addr, "/").await.unwrap();
    assert!(html.contains("1 cluster(s) up, 1 down"), "{html}");
    assert!(html.contains("<b>down</b> since"), "{html}");
    // The metric an alert watches stays, at zero.
    assert_eq!(
        metric(
            bed.server.admin_addr,
            r#"proxy_server_agents{cluster="alpha"}"#
        )
        .await,
        0.0
    );

    // Past the retention window it is no longer listed.
    eventually("alpha forgotten", Duration::from_secs(8), || async {
        clusters().await.len() == 1
    })
    .await;
    assert_eq!(clusters().await[0]["name"], "beta");

    // Back: up again, listed once.
    let _alpha = bed.start_agent("alpha", up.addr).await;
    let back = clusters().await;
    assert_eq!(back.len(), 2);
    assert_eq!(back[0]["state"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_kubeconfigs_work_with_kubectl_and_verify_the_member() {
    // The agents report their API servers' CAs, which the kubeconfigs carry.
    let bed = Testbed::builder(&["alpha", "beta"]);
    let ca = |cluster| bed.pki().apiserver_ca(cluster).display().to_string();
    let (alpha_ca, beta_ca) = (ca("alpha"), ca("beta"));
    let bed = bed
        .member("alpha")
        .agent_args(&["--upstream-ca", &alpha_ca])
        .member("beta")
        .agent_args(&["--upstream-ca", &beta_ca])
        .start()
        .await;
    // One cluster, from the admin API.
    let (status, yaml) = admin_get(
        bed.server.operator_addr,
        "/api/v1/clusters/alpha/kubeconfig",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{yaml}");
    // Written as JSON (valid YAML, every string quoted: see status/kubeconfig.rs).
    let doc: serde_json::Value = serde_json::from_str(&yaml).unwrap();
    let cluster = &doc["clusters"][0]["cluster"];
    assert_eq!(
        cluster["tls-server-name"], "kubernetes.default.svc",
        "{yaml}"
    );
    assert_eq!(
        cluster["proxy-url"],
        format!("http://{}", bed.frontend()),
        "{yaml}"
    );
    assert!(!yaml.contains("insecure-skip-tls-verify"));
    let path = bed.dir().join("generated-alpha");
    std::fs::write(&path, &yaml).unwrap();
    let kubectl = |args: &[&str]| {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&path)
            .args(args)
            .output()
            .unwrap()
    };
    // The operator fills in the user.
    let set = kubectl(&[
        "config",
        "set-credentials",
        "alpha",
        "--token=operator-token",
    ]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let out = kubectl(&["--request-timeout", "10s", "get", "--raw", "/version"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("+alpha"));

    // Every cluster, with `proxy-server kubeconfig`.
    let all = bed.dir().join("generated-all");
    let out = Command::new(integration_tests::procs::bin("proxy-server"))
        .args([
            "kubeconfig",
            "--operator-url",
            &format!("http://{}", bed.server.operator_addr),
            "--out",
        ])
        .arg(&all)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&all)
        .args(["config", "view", "-o", "jsonpath={.contexts[*].name}"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&view.stdout), "alpha beta");
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&all)
        .args([
            "--context",
            "beta",
            "--token",
            "t",
            "--request-timeout",
            "10s",
            "get",
            "namespaces",
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("namespace/beta-only"));

    // A cluster without a reported CA, or none at all, is a clear 404.
    let (status, body) = admin_get(
        bed.server.operator_addr,
        "/api/v1/clusters/gamma/kubeconfig",
    )
    .await
    .unwrap();
    assert!(
        status == 404 && body.contains("no agent connected for cluster \"gamma\""),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_one_access_line_per_connection() {
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--log-format", "json"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let mut tunnel = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    tunnel.write_all(b"ping\n").await.unwrap();
    let mut r = BufReader::new(tunnel);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    r.read_line(&mut line).await.unwrap();
    drop(r);
    // A second connection, closed at once: its line comes after the first's, so once it is
    // there the first connection has logged everything it ever will.
    drop(
        connect(bed.frontend(), "alpha:443")
            .await
            .unwrap()
            .tunnel()
            .unwrap(),
    );
    let access_lines = || {
        bed.server
            .proc
            .logs()
            .lines()
            .filter(|l| l.contains("tunneled connection closed"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    eventually("both access lines logged", Duration::from_secs(5), || {
        let n = access_lines().len();
        async move { n >= 2 }
    })
    .await;
    let lines = access_lines();
    assert_eq!(lines.len(), 2, "one line per connection: {lines:#?}");
    let line = lines
        .iter()
        .find(|l| l.contains("\"bytes_to_cluster\":5"))
        .unwrap_or_else(|| panic!("no line for the first connection: {lines:#?}"))
        .clone();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let span = &v["span"];
    assert_eq!(span["cluster"], "alpha", "{v}");
    assert_eq!(span["identity"], "anonymous", "{v}");
    assert!(
        span["client.addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{v}"
    );
    assert_eq!(v["bytes_to_cluster"], 5, "{v}");
    assert_eq!(v["bytes_from_cluster"], 20, "{v}");
    assert!(
        v["agent.id"].is_string() && v["duration_ms"].is_u64() && v["outcome"].is_string(),
        "{v}"
    );
}

/// Waits (up to 5 s) until the server's frontend refuses connections: its listener closed.
async fn frontend_closes(bed: &Testbed) {
    eventually(
        "frontend stops accepting",
        Duration::from_secs(5),
        || async {
            tokio::net::TcpStream::connect(bed.frontend())
                .await
                .is_err()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_transfers_finish_and_refuses_new_connects() {
    const LEN: u64 = 64 * MIB;
    let bulk = BulkServer::start(LEN).await.unwrap();
    let mut bed = Testbed::builder(&["alpha"])
        .agent("alpha", bulk.addr)
        .start()
        .await;
    let tunnel = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let (mut rd, mut wr) = tunnel.into_split();
    let mut got = vec![0u8; MIB as usize];
    rd.read_exact(&mut got).await.unwrap();

    bed.server.proc.signal("TERM");
    let signalled = Instant::now();
    // New CONNECTs are refused while the transfer goes on, and readiness fails.
    frontend_closes(&bed).await;
    let (status, body) = admin_get(bed.server.admin_addr, "/readyz?verbose")
        .await
        .unwrap();
    assert!(status == 503 && body.contains("draining"), "{body}");

    let writer = tokio::spawn(async move {
        let mut p = Pattern::new(LEN);
        while let Some(b) = p.next_block() {
            wr.write_all(&b).await.unwrap();
        }
        wr.shutdown().await.unwrap();
        wr
    });
    let mut hash = Sha256::new();
    hash.update(&got);
    let mut rest = Vec::new();
    rd.read_to_end(&mut rest).await.unwrap();
    let _wr = writer.await.unwrap();
    assert_eq!(
        rest.len() as u64 + MIB,
        LEN + 32,
        "transfer cut short by the drain"
    );
    hash.update(&rest[..rest.len() - 32]);
    assert_eq!(<[u8; 32]>::from(hash.finalize()), Pattern::digest(LEN));
    assert_eq!(&rest[rest.len() - 32..], &Pattern::digest(LEN));

    // Once the last connection ended the server exits, well before the 30 s grace.
    let status = bed.server.proc.wait(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_shutdown_delay_readiness_fails_but_connects_still_get_their_tunnel() {
    let banner = BannerServer::start("alpha-upstream").await.unwrap();
    let mut bed = Testbed::builder(&["alpha"])
        .server_args(&["--shutdown-delay", "3s"])
        .agent("alpha", banner.addr)
        .start()
        .await;
    // Taken before the signal goes out: `kill` returns after the server already has it, so an
    // instant taken after could be late by the time `kill` takes, and the 3 s look short.
    let signalled = Instant::now();
    bed.server.proc.signal("TERM");
    eventually("readiness fails", Duration::from_secs(2), || async {
        admin_get(bed.server.admin_addr, "/readyz?verbose")
            .await
            .is_ok_and(|(status, body)| status == 503 && body.contains("draining"))
    })
    .await;
    // Inside the delay a CONNECT is still served end to end: a load balancer that has not yet
    // seen the failed probe sends clients here, and they must not be cut.
    let mut served = 0;
    while signalled.elapsed() < Duration::from_millis(2_000) {
        let tunnel = connect(bed.frontend(), "alpha:443")
            .await
            .unwrap()
            .tunnel()
            .unwrap();
        let mut rd = BufReader::new(tunnel);
        let mut line = String::new();
        rd.read_line(&mut line).await.unwrap();
        assert_eq!(line, "alpha-upstream\n");
        rd.get_mut().write_all(b"ping\n").await.unwrap();
        line.clear();
        rd.read_line(&mut line).await.unwrap();
        assert_eq!(line, "ping\n", "the tunnel carries data during the delay");
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 5, "only {served} CONNECTs during the delay");
    // Then the listener closes, and with nothing open the server exits.
    frontend_closes(&bed).await;
    assert!(
        signalled.elapsed() >= Duration::from_secs(3),
        "listener closed before --shutdown-delay: {:?}",
        signalled.elapsed()
    );
    let status = bed.server.proc.wait(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_open_when_the_grace_ends_are_closed_and_the_server_exits() {
    let source = SourceServer::start().await.unwrap();
    let mut bed = Testbed::builder(&["alpha"])
        .server_args(&["--shutdown-grace", "1s"])
        .agent("alpha", source.addr)
        .start()
        .await;
    let mut tunnel = connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    tunnel.read_exact(&mut buf).await.unwrap();
    let started = Instant::now();
    bed.server.proc.signal("TERM");
    let status = bed.server.proc.wait(Duration::from_secs(10)).await.unwrap();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "exited after {took:?}"
    );
    // The client's connection was closed.
    read_until_closed(tunnel, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_hands_new_connections_to_its_sibling_without_failures() {
    let mut bed = Testbed::builder(&["alpha"])
        .banner_agent("alpha", "one")
        .banner_agent("alpha", "two")
        .start()
        .await;
    let (frontend, first) = (bed.frontend(), &mut bed.agents[0]);

    // Find a connection carried by the first agent, and keep it open.
    let mut held = None;
    for _ in 0..20 {
        let t = connect(frontend, "alpha:443")
            .await
            .unwrap()
            .tunnel()
            .unwrap();
        let mut r = BufReader::new(t);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        if line.trim() == "one" {
            held = Some(r);
            break;
        }
    }
    let mut held = held.expect("no connection went to the first agent");

    first.proc.signal("TERM");
    eventually(
        "server sees the agent draining",
        Duration::from_secs(5),
        || async {
            let (_, json) = admin_get(bed.server.operator_addr, "/api/v1/clusters")
                .await
                .unwrap();
            json.contains("\"draining\":true")
        },
    )
    .await;
    // Every new CONNECT succeeds and goes to the second agent.
    for i in 0..20 {
        match connect(frontend, "alpha:443").await.unwrap() {
            ConnectReply::Tunnel(t) => {
                let mut line = String::new();
                BufReader::new(t).read_line(&mut line).await.unwrap();
                assert_eq!(
                    line.trim(),
                    "two",
                    "connection {i} went to the draining agent"
                );
            }
            ConnectReply::Refused { status, body } => {
                panic!("connection {i} failed during drain: {status} {body}")
            }
        }
    }
    // The held connection keeps working through the drain...
    held.get_mut().write_all(b"still here\n").await.unwrap();
    let mut line = String::new();
    held.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim(), "still here");
    let (status, _) = admin_get(first.admin_addr, "/readyz").await.unwrap();
    assert_eq!(status, 503, "draining agent reports ready");
    // ...and once it ends, the agent exits cleanly.
    drop(held);
    let status = first.proc.wait(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "agent exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let source = SourceServer::start().await.unwrap();
    let mut bed = Testbed::builder(&["alpha"])
        .server_args(&["--shutdown-grace", "60s"])
        .agent("alpha", source.addr)
        .start()
        .await;
    // The agent first (its open connection keeps it draining), then, with a new agent and a
    // new open connection, the server.
    let _tunnel = open_stream(&bed.server).await;
    twice(&mut bed.agents[0].proc).await;
    let _agent2 = bed.start_agent("alpha", source.addr).await;
    let _tunnel2 = open_stream(&bed.server).await;
    twice(&mut bed.server.proc).await;
}

async fn open_stream(server: &ServerProc) -> tokio::net::TcpStream {
    let mut tunnel = connect(server.frontend_addr, "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    tunnel.read_exact(&mut buf).await.unwrap();
    tunnel
}

/// SIGTERM starts a drain that the open connection keeps going; a second SIGTERM exits at once.
async fn twice(proc: &mut integration_tests::procs::Proc) {
    proc.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        proc.wait(Duration::from_millis(10)).await.is_err(),
        "{} exited on the first signal",
        proc.name
    );
    let started = Instant::now();
    proc.signal("TERM");
    let status = proc.wait(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "{} exit status {status}",
        proc.name
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_accepted_before_sigterm_still_gets_its_tunnel() {
    let mut bed = Testbed::builder(&["alpha"])
        .banner_agent("alpha", "alpha-upstream")
        .start()
        .await;
    let agent = &bed.agents[0];
    // The dial is in flight (the agent is frozen) when the server is told to stop.
    agent.proc.signal("STOP");
    let frontend = bed.frontend();
    let pending = tokio::spawn(connect(frontend, "alpha:443"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    bed.server.proc.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.proc.signal("CONT");
    match pending.await.unwrap().unwrap() {
        ConnectReply::Tunnel(t) => {
            let mut line = String::new();
            BufReader::new(t).read_line(&mut line).await.unwrap();
            assert_eq!(line.trim(), "alpha-upstream");
        }
        ConnectReply::Refused { status, body } => {
            panic!("in-flight CONNECT failed during drain: {status} {body}")
        }
    }
    let status = bed.server.proc.wait(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "exit status {status}");
}

/// Logging never stops traffic. With the server's stderr a pipe nobody reads (a stalled log
/// collector), every tunneled connection still logs its close at `info`: a synchronous write
/// would block the thread carrying the tunnels once the pipe is full (64 KiB here: a few
/// hundred lines). Here connections keep working long past that, and once the buffered lines
/// are at their limit (10,000) the server counts what it drops. Connections continue until it
/// does, so a larger pipe (1 MiB with 64 KiB pages) only takes longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_does_not_stop_tunnels() {
    let bed = Bed::new(&["alpha"]);
    let up = BannerServer::start("alpha-upstream").await.unwrap();
    let (unread, stderr) = std::io::pipe().unwrap();
    let server = ServerProc::start_with_stderr(&bed.pki, &[], stderr.into())
        .await
        .unwrap();
    let _agent = AgentProc::start_ready(&bed.pki, &[server.agent_addr], "alpha", up.addr)
        .await
        .unwrap();
    let started = Instant::now();
    let mut made = 0;
    loop {
        for _ in 0..1_000 {
            let banner = tokio::time::timeout(
                Duration::from_secs(10),
                integration_tests::client::banner_via(server.frontend_addr, "alpha"),
            )
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "connection {made} hung after {:?}: logging blocked it",
                    started.elapsed()
                )
            });
            assert_eq!(banner, "alpha-upstream", "connection {made}");
            made += 1;
        }
        let dropped = metric(server.admin_addr, "proxy_server_log_lines_dropped_total").await;
        if dropped > 0.0 {
            break;
        }
        assert!(
            made < 40_000,
            "{made} connections and no log line dropped: was stderr read after all?"
        );
    }
    eprintln!("{made} connections, lines dropped once 10,000 waited");
    drop(unread);
}

/// A second SIGTERM exits at once (130), without the drain, and what the log thread still held
/// is written first. The server's stderr is a pipe the test reads only after the second
/// signal, so at the exit the log thread is stuck behind a full pipe with the last lines still
/// queued: without the flush before `exit`, "second signal: exiting now" never arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_and_keeps_its_last_log_lines() {
    let bed = Bed::new(&["alpha"]);
    let up = BannerServer::start("alpha-upstream").await.unwrap();
    let (mut unread, stderr) = std::io::pipe().unwrap();
    let mut server =
        ServerProc::start_with_stderr(&bed.pki, &["--shutdown-grace", "60s"], stderr.into())
            .await
            .unwrap();
    let _agent = AgentProc::start_ready(&bed.pki, &[server.agent_addr], "alpha", up.addr)
        .await
        .unwrap();
    // Enough closed connections (one log line each) to fill the pipe several times over.
    for _ in 0..1_000 {
        integration_tests::client::banner_via(server.frontend_addr, "alpha").await;
    }
    // An open tunnel keeps the drain waiting for it.
    let _open = connect(server.frontend_addr, "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    server.proc.signal("TERM");
    eventually(
        "draining (readiness fails)",
        Duration::from_secs(5),
        || async { admin_get(server.admin_addr, "/readyz").await.unwrap().0 == 503 },
    )
    .await;
    server.proc.signal("TERM");
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        let _ = std::io::Read::read_to_string(&mut unread, &mut logs);
        logs
    });
    let status = server.proc.wait(Duration::from_secs(10)).await.unwrap();
    let logs = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{logs}");
    assert!(
        logs.contains("second signal: exiting now"),
        "the last line was lost; the log ends with:\n{}",
        &logs[logs.len().saturating_sub(2_000)..]
    );
}
