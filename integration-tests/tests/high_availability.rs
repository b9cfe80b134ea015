//! Several server replicas behind a real load balancer (HAProxy, TCP, round robin), agents and
//! clients given only its addresses: every replica gets every agent, any replica serves any
//! cluster, and CONNECTs keep working while replicas are killed, rolled and added.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::client::{apiserver_tls, read_response_head, write_kubeconfig};
use integration_tests::fleet::{
    Haproxy, Replica, ReplicaAddrs, clusters_of, start_replica, stop_gracefully,
};
use integration_tests::procs::{admin_get, metric, wait_ready};
use integration_tests::{AgentProc, Bed, FakeApiServer, Testbed};
use tokio::io::AsyncWriteExt;

/// Replicas, their load balancer, and the members (one API server and `n` agents per cluster).
struct Mesh {
    bed: Bed,
    replicas: Vec<Replica>,
    lb: Haproxy,
    // Kept alive: the agents dial them.
    _apis: Vec<FakeApiServer>,
    agents: Vec<(String, AgentProc)>,
}

impl Mesh {
    async fn start(
        clusters: &[&str],
        agents_per_cluster: usize,
        replicas: usize,
        server_flags: &[&str],
        agent_flags: &[&str],
    ) -> Self {
        Self::start_with(
            clusters,
            agents_per_cluster,
            replicas,
            replicas,
            server_flags,
            agent_flags,
            None,
        )
        .await
    }

    /// `slots` replica addresses in the load balancer, the first `replicas` of them running.
    async fn start_with(
        clusters: &[&str],
        agents_per_cluster: usize,
        replicas: usize,
        slots: usize,
        server_flags: &[&str],
        agent_flags: &[&str],
        hosts: Option<&Path>,
    ) -> Self {
        let bed = Bed::new(clusters);
        let addrs: Vec<ReplicaAddrs> = (0..slots).map(|_| ReplicaAddrs::free()).collect();
        let lb = Haproxy::start(bed.dir.path(), &addrs).await.unwrap();
        let mut reps = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            let server = if i < replicas {
                Some(
                    start_replica(&bed.pki, *a, server_flags, hosts)
                        .await
                        .unwrap(),
                )
            } else {
                None
            };
            reps.push(Replica { addrs: *a, server });
        }
        let mut apis = Vec::new();
        let mut agents = Vec::new();
        for cluster in clusters {
            let api = FakeApiServer::start(&bed.pki, cluster).await.unwrap();
            for _ in 0..agents_per_cluster {
                let agent =
                    AgentProc::start(&bed.pki, &[lb.agents], cluster, api.addr, agent_flags)
                        .await
                        .unwrap();
                agents.push(((*cluster).to_owned(), agent));
            }
            apis.push(api);
        }
        Self {
            bed,
            replicas: reps,
            lb,
            _apis: apis,
            agents,
        }
    }

    /// Whether every running replica lists every cluster with exactly its agents, once each.
    async fn full_mesh(&self, clusters: &[&str], agents_per_cluster: usize) -> bool {
        for r in &self.replicas {
            if r.server.is_none() {
                continue;
            }
            let Ok(listed) = clusters_of(r.addrs.operator).await else {
                return false;
            };
            let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
            if names != clusters {
                return false;
            }
            for (_, ids) in &listed {
                let mut distinct = ids.clone();
                distinct.dedup();
                if ids.len() != agents_per_cluster || distinct.len() != ids.len() {
                    return false;
                }
            }
        }
        true
    }

    async fn wait_full_mesh(&self, clusters: &[&str], n: usize, limit: Duration) -> Duration {
        let started = Instant::now();
        while !self.full_mesh(clusters, n).await {
            if started.elapsed() > limit {
                let mut state = String::new();
                for r in self.replicas.iter().filter(|r| r.server.is_some()) {
                    state.push_str(&format!(
                        "\n{}: {:?}",
                        r.addrs.admin,
                        clusters_of(r.addrs.operator).await
                    ));
                }
                let logs: String = self
                    .agents
                    .iter()
                    .map(|(c, a)| format!("\n--- agent {c}\n{}", a.proc.logs()))
                    .collect();
                panic!("no full mesh within {limit:?}:{state}{logs}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        started.elapsed()
    }
}

const CLUSTERS: [&str; 2] = ["alpha", "beta"];

fn kubectl_version(kubeconfig: &Path) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--request-timeout", "20s", "get", "--raw", "/version"])
        .env_remove("KUBECONFIG")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_gets_every_agent_through_one_load_balanced_address() {
    // Agents probe every second here, so that many landings on servers they already hold
    // happen during the test: each must be declined, never registered twice.
    let mesh = Mesh::start(
        &CLUSTERS,
        2,
        3,
        &["--server-count", "3", "--warmup", "2s"],
        &["--server-probe-interval", "1s"],
    )
    .await;
    let took = mesh
        .wait_full_mesh(&CLUSTERS, 2, Duration::from_secs(10))
        .await;
    eprintln!("full mesh (3 replicas x 4 agents) after {took:?}");

    // Several probe rounds later: still exactly one tunnel per (agent, replica).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(mesh.full_mesh(&CLUSTERS, 2).await, "duplicates or losses");
    for r in &mesh.replicas {
        for cluster in CLUSTERS {
            let sample = format!("proxy_server_agents{{cluster=\"{cluster}\"}}");
            assert_eq!(metric(r.addrs.admin, &sample).await, 2.0, "{sample}");
        }
        assert_eq!(
            metric(r.addrs.admin, "proxy_server_server_count").await,
            3.0
        );
        let (_, body) = admin_get(r.addrs.operator, "/api/v1/clusters")
            .await
            .unwrap();
        assert!(body.contains("\"server_count\":3"), "{body}");
        let (_, page) = admin_get(r.addrs.operator, "/").await.unwrap();
        assert!(page.contains("One of 3 server replica(s)"), "{page}");
    }
    for (_, agent) in &mesh.agents {
        let (status, body) = admin_get(agent.admin_addr, "/readyz?verbose")
            .await
            .unwrap();
        assert!(
            status == 200 && body.contains("connected to 3 of 3 servers"),
            "{body}"
        );
        assert_eq!(
            metric(agent.admin_addr, "proxy_agent_known_server_count").await,
            3.0
        );
        assert_eq!(
            metric(agent.admin_addr, "proxy_agent_servers_connected").await,
            3.0
        );
        // Landing on a held server is routine: nobody logs a warning or an error for it.
        let logs = agent.proc.logs_with("registered with server", 3).await;
        assert!(
            !logs.contains(" WARN ") && !logs.contains("ERROR"),
            "agent logged trouble:\n{logs}"
        );
        let landed = logs.matches("registered with server").count();
        assert_eq!(landed, 3, "one registration per replica:\n{logs}");
    }
    for r in &mesh.replicas {
        let logs = r
            .server
            .as_ref()
            .unwrap()
            .proc
            .logs_with("agent registered", 4)
            .await;
        assert!(
            !logs.contains(" WARN ") && !logs.contains("ERROR"),
            "server logged trouble:\n{logs}"
        );
        assert_eq!(
            logs.matches("agent registered").count(),
            4,
            "each agent registered once:\n{logs}"
        );
    }

    // kubectl through each replica's own frontend, and through the client load balancer,
    // reaches the right member (its certificate verified with that member's CA).
    let mut proxies: Vec<String> = mesh
        .replicas
        .iter()
        .map(|r| format!("http://{}", r.addrs.frontend))
        .collect();
    proxies.push(format!("http://{}", mesh.lb.clients));
    for (i, proxy) in proxies.iter().enumerate() {
        for cluster in CLUSTERS {
            let dir = mesh.bed.dir.path().join(format!("kube-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let kubeconfig = write_kubeconfig(&dir, &mesh.bed.pki, cluster, proxy).unwrap();
            let version = kubectl_version(&kubeconfig);
            assert!(
                version.contains(&format!("+{cluster}")),
                "{proxy} {cluster}: {version}"
            );
        }
    }
}

/// What one CONNECT through the client load balancer came to.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// 200, and the member's API server answered through the tunnel.
    Ok,
    /// The proxy answered with an error status.
    Refused(u16, String),
    /// The connection ended with no answer (a replica died under it).
    Cut(String),
}

async fn one_request(proxy: std::net::SocketAddr, bed: &Bed, cluster: &str) -> Outcome {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(proxy).await?;
        s.write_all(
            format!("CONNECT {cluster}:443 HTTP/1.1\r\nHost: {cluster}:443\r\n\r\n").as_bytes(),
        )
        .await?;
        let (status, head) = read_response_head(&mut s).await?;
        if status != 200 {
            return Ok::<_, anyhow::Error>(Outcome::Refused(status, head));
        }
        let tls = apiserver_tls(&bed.pki, cluster, s).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/version")
            .header("host", "kubernetes.default.svc")
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await?
            .to_bytes();
        anyhow::ensure!(
            String::from_utf8_lossy(&body).contains(&format!("+{cluster}")),
            "wrong member answered"
        );
        Ok(Outcome::Ok)
    };
    match tokio::time::timeout(Duration::from_secs(15), attempt).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(err)) => Outcome::Cut(format!("{err:#}")),
        Err(_) => Outcome::Cut("no answer within 15 s".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_keep_working_while_replicas_are_killed_and_rolled() {
    let server_flags = [
        "--server-count",
        "3",
        "--warmup",
        "3s",
        "--shutdown-grace",
        "5s",
        // Longer than HAProxy's health-check interval (300 ms): it stops sending clients to a
        // draining replica before that replica's listener closes.
        "--shutdown-delay",
        "1s",
    ];
    let mut mesh = Mesh::start(&CLUSTERS, 2, 3, &server_flags, &[]).await;
    mesh.wait_full_mesh(&CLUSTERS, 2, Duration::from_secs(10))
        .await;
    for r in &mesh.replicas {
        wait_ready(r.addrs.admin, Duration::from_secs(10))
            .await
            .unwrap();
    }
    // Let HAProxy see every replica up.
    tokio::time::sleep(Duration::from_millis(800)).await;

    // A client sending CONNECTs all along, one at a time, alternating clusters.
    let phase = Arc::new(Mutex::new("steady"));
    let results: Arc<Mutex<Vec<(&'static str, Outcome)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let client = {
        let (phase, results, stop) = (phase.clone(), results.clone(), stop.clone());
        let proxy = mesh.lb.clients;
        let bed_dir = mesh.bed.dir.path().to_owned();
        let pki = mesh.bed.pki.clone();
        tokio::spawn(async move {
            let bed = Bed {
                dir: tempfile::tempdir_in(bed_dir).unwrap(),
                pki,
            };
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let cluster = CLUSTERS[i % 2];
                i += 1;
                let outcome = one_request(proxy, &bed, cluster).await;
                let now = *phase.lock().unwrap();
                results.lock().unwrap().push((now, outcome));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Kill one replica outright and start it again.
    *phase.lock().unwrap() = "kill";
    let victim = mesh.replicas[1].server.take().unwrap();
    victim.proc.kill().await;
    let restarted = start_replica(&mesh.bed.pki, mesh.replicas[1].addrs, &server_flags, None)
        .await
        .unwrap();
    mesh.replicas[1].server = Some(restarted);
    wait_ready(mesh.replicas[1].addrs.admin, Duration::from_secs(15))
        .await
        .unwrap();
    let healed = mesh
        .wait_full_mesh(&CLUSTERS, 2, Duration::from_secs(15))
        .await;
    eprintln!("after kill -9 and restart: full mesh again after {healed:?} (from ready)");

    // Roll all three, one by one, as a Deployment would: stop (drain), start, wait until ready.
    *phase.lock().unwrap() = "roll";
    for i in 0..3 {
        let old = mesh.replicas[i].server.take().unwrap();
        stop_gracefully(old, Duration::from_secs(15)).await.unwrap();
        let new = start_replica(&mesh.bed.pki, mesh.replicas[i].addrs, &server_flags, None)
            .await
            .unwrap();
        mesh.replicas[i].server = Some(new);
        wait_ready(mesh.replicas[i].addrs.admin, Duration::from_secs(15))
            .await
            .unwrap();
        // HAProxy's next health check takes it back in.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    *phase.lock().unwrap() = "after";
    let healed = mesh
        .wait_full_mesh(&CLUSTERS, 2, Duration::from_secs(10))
        .await;
    eprintln!("after the roll: full mesh after {healed:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    client.await.unwrap();

    let results = results.lock().unwrap().clone();
    let count = |p: &str| results.iter().filter(|(ph, _)| *ph == p).count();
    let bad: Vec<_> = results.iter().filter(|(_, o)| *o != Outcome::Ok).collect();
    eprintln!(
        "CONNECTs: {} in all (steady {}, kill {}, roll {}, after {}); not ok: {bad:?}",
        results.len(),
        count("steady"),
        count("kill"),
        count("roll"),
        count("after")
    );
    if !bad.is_empty() {
        // HAProxy's termination flags (`option tcplog`) say which side ended a cut connection.
        let lb_logs = mesh.lb.logs();
        let unusual: Vec<&str> = lb_logs
            .lines()
            .filter(|l| l.contains(" clients clients/") && !l.contains(" -- "))
            .collect();
        eprintln!(
            "HAProxy lines of client connections that did not end cleanly:\n{}",
            unusual.join("\n")
        );
    }
    assert!(results.len() >= 100, "too few CONNECTs to mean anything");
    assert!(count("roll") >= 50, "too few CONNECTs during the roll");
    // No replica ever answered an error: no 503 for a cluster whose agents had not arrived.
    let refused: Vec<_> = bad
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Refused(..)))
        .collect();
    assert!(refused.is_empty(), "CONNECTs refused: {refused:?}");
    // SIGTERM drains: nothing is cut during the roll. A SIGKILL can cut only the one request
    // this client had in flight on the killed process at that instant.
    let cut_roll = bad.iter().filter(|(p, _)| *p != "kill").count();
    let cut_kill = bad.iter().filter(|(p, _)| *p == "kill").count();
    assert_eq!(cut_roll, 0, "connections cut outside the kill: {bad:?}");
    assert!(
        cut_kill <= 1,
        "more than the in-flight request cut: {bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_gets_every_agent_when_the_dns_count_grows() {
    // The replicas count themselves as the addresses of a name in their own /etc/hosts (a
    // stand-in for a headless Service); the test grows that name from 3 to 4 addresses.
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let write_hosts = |n: usize| {
        let mut text = String::from("127.0.0.1 localhost\n");
        for i in 1..=n {
            text.push_str(&format!("127.0.1.{i} proxy-replicas.test\n"));
        }
        // Written in place: the bind mount follows the file, not its name.
        std::fs::write(&hosts, text).unwrap();
    };
    write_hosts(3);
    let flags = [
        "--server-count-dns",
        "proxy-replicas.test",
        "--warmup",
        "2s",
    ];
    let mut mesh = Mesh::start_with(&CLUSTERS, 1, 3, 4, &flags, &[], Some(&hosts)).await;
    mesh.wait_full_mesh(&CLUSTERS, 1, Duration::from_secs(10))
        .await;
    for (_, agent) in &mesh.agents {
        assert_eq!(
            metric(agent.admin_addr, "proxy_agent_known_server_count").await,
            3.0
        );
    }

    // Scale up: the Service gets a 4th address and a 4th replica starts. No agent restarts,
    // and the agents' slow probe (30 s by default) is not what finds it: the count is.
    write_hosts(4);
    let started = Instant::now();
    let fourth = start_replica(&mesh.bed.pki, mesh.replicas[3].addrs, &flags, Some(&hosts))
        .await
        .unwrap();
    mesh.replicas[3].server = Some(fourth);
    mesh.wait_full_mesh(&CLUSTERS, 1, Duration::from_secs(15))
        .await;
    let took = started.elapsed();
    eprintln!("4th replica has every agent {took:?} after it started");
    assert!(took <= Duration::from_secs(10), "took {took:?}");
    for (_, agent) in &mesh.agents {
        let (_, body) = admin_get(agent.admin_addr, "/readyz?verbose")
            .await
            .unwrap();
        assert!(body.contains("connected to 4 of 4 servers"), "{body}");
    }
    // Each replica re-reads the name on its own schedule; agents already follow the first.
    for r in &mesh.replicas {
        integration_tests::eventually(
            "every replica counts 4",
            integration_tests::fleet::DNS_REFRESH_BOUND,
            || async { metric(r.addrs.admin, "proxy_server_server_count").await == 4.0 },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warming_up_replica_holds_connects_for_agents_still_arriving() {
    let bed = Testbed::builder(&["alpha"])
        .server_args(&[
            "--server-count",
            "2",
            "--warmup",
            "4s",
            "--agent-wait",
            "2s",
        ])
        .start()
        .await;
    // With another replica to serve clients, this one stays out of rotation while warming up.
    let (status, body) = admin_get(bed.server.admin_addr, "/readyz?verbose")
        .await
        .unwrap();
    assert!(status == 503 && body.contains("warming up"), "{body}");

    // A CONNECT for a cluster whose agent arrives a second later waits for it.
    let frontend = bed.frontend();
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let reply = integration_tests::connect(frontend, "alpha:443")
            .await
            .unwrap();
        (started.elapsed(), reply)
    });
    let gamma = tokio::spawn(async move {
        let started = Instant::now();
        let reply = integration_tests::connect(frontend, "gamma:443")
            .await
            .unwrap();
        (started.elapsed(), reply)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let api = FakeApiServer::start(bed.pki(), "alpha").await.unwrap();
    let _agent = bed.start_agent("alpha", api.addr).await;
    let (took, reply) = waiting.await.unwrap();
    assert!(
        matches!(reply, integration_tests::ConnectReply::Tunnel(_)),
        "{reply:?}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "answered before the agent came: {took:?}"
    );
    // One that never comes is answered 503 once --agent-wait is over, not at once, not never.
    let (took, reply) = gamma.await.unwrap();
    match reply {
        integration_tests::ConnectReply::Refused { status, body } => {
            assert_eq!(status, 503, "{body}");
            assert!(body.contains("gamma"), "{body}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    wait_ready(bed.server.admin_addr, Duration::from_secs(6))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_started_together_is_ready_about_a_second_after_its_full_mesh() {
    // A long warm-up that a fleet started together does not have to sit out: its agents all
    // arrive within moments, with no tunnels older than the replicas, and once their
    // registrations pause every replica is ready.
    let mesh = Mesh::start(
        &CLUSTERS,
        2,
        3,
        &["--server-count", "3", "--warmup", "60s"],
        &[],
    )
    .await;
    mesh.wait_full_mesh(&CLUSTERS, 2, Duration::from_secs(10))
        .await;
    let meshed = Instant::now();
    for r in &mesh.replicas {
        wait_ready(r.addrs.admin, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e}: a replica sat out its warm-up"));
    }
    let took = meshed.elapsed();
    eprintln!("all 3 replicas ready {took:?} after the full mesh");
    assert!(took <= Duration::from_secs(2), "{took:?}");
}
