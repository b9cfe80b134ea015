//! A real multi-cluster controller through the proxy: `push-controller` (client-go informers,
//! `integration-tests/k8s/controller`, built by `scripts/build-k8s`) watches the ConfigMaps of a
//! namespace in a hub cluster and propagates them, by server-side apply and delete, to the real
//! members `alpha` and `beta` through the proxy (kubeconfig `proxy-url`, end-to-end TLS), the way
//! a KubeFed-style push controller does. The hub is one more [`RealMember`], reached directly.
//!
//! While a stream of creates, updates and deletes goes into the hub, faults happen: an agent is
//! restarted and 10,000 ConfigMaps are listed through the proxy (one proxy-server), or three
//! proxy-server replicas behind HAProxy have one killed (`kill -9`) and one rolled (SIGTERM,
//! drained, started again). At the end every member must hold exactly the hub's ConfigMaps with
//! the hub's final data and resourceVersion (nothing lost, nothing resurrected, no stale state),
//! and no member may ever have gone back to an older hub version of an object. The tests print
//! propagation latency (p50/p99 per phase), the member watches' reconnects, and how long after
//! each fault a write made at that moment reached both members.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration_tests::fleet::{
    Haproxy, Replica, ReplicaAddrs, clusters_of, free_port, start_replica, stop_gracefully,
};
use integration_tests::procs::{AgentProc, admin_get, metric_opt, wait_ready};
use integration_tests::real_member::{MemberUser, RealMember, k8s_bin_dir};
use integration_tests::{Bed, Testbed};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The hub namespace the controller propagates (and the members' namespace it writes to).
const NS: &str = "propagated";
/// ConfigMaps the stream of writes cycles through.
const OBJECTS: usize = 40;
/// Pause between two writes to the hub (each write is also a fresh TLS connection: about
/// 25 writes a second in all on this machine).
const WRITE_PAUSE: Duration = Duration::from_millis(15);
/// How long after a fault a write made at that moment may take to reach both members, and the
/// cut watch of the member behind it to be back. Measured: well under a second. Far less than
/// HTTP/2's own dead-connection detection in client-go (30 s without a frame, then a 15 s
/// ping), which is what a tunnel left hanging by the proxy would cost.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
/// The agents' drain on SIGTERM (30 s by default): a restarted agent is gone within it.
const AGENT_FLAGS: [&str; 2] = ["--shutdown-grace", "5s"];

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The `push-controller` binary, beside kube-apiserver in the `scripts/build-k8s` cache.
fn controller_bin() -> PathBuf {
    let bin = k8s_bin_dir().join("push-controller");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/build-k8s (it builds integration-tests/k8s/controller) and \
         point MCP_K8S_BIN_DIR at the folder it prints",
        bin.display()
    );
    bin
}

/// `push-controller run`, killed by PID when dropped.
struct Controller {
    child: std::process::Child,
    status_addr: SocketAddr,
    log: PathBuf,
}

impl Controller {
    /// Starts the controller with the hub's kubeconfig and one per member, and waits until its
    /// informers have synced.
    async fn start(dir: &Path, hub: &Path, members: &[(&str, PathBuf)]) -> Self {
        let status_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.join("push-controller.log");
        let out = std::fs::File::create(&log).expect("controller log");
        let err = std::fs::File::create(log.with_extension("err")).expect("controller log");
        let mut cmd = std::process::Command::new(controller_bin());
        cmd.arg("run").arg("--hub-kubeconfig").arg(hub).args([
            "--namespace",
            NS,
            "--status-addr",
            &status_addr.to_string(),
        ]);
        for (name, kubeconfig) in members {
            cmd.arg("--member")
                .arg(format!("{name}={}", kubeconfig.display()));
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("KUBECONFIG")
            .spawn()
            .expect("starting push-controller");
        let controller = Self {
            child,
            status_addr,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = controller.try_status().await
                && status["ready"] == true
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "push-controller not ready within 60 s:\n{}",
                controller.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        controller
    }

    async fn try_status(&self) -> Option<Value> {
        let (code, body) = admin_get(self.status_addr, "/status").await.ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    async fn status(&self) -> Value {
        self.try_status()
            .await
            .unwrap_or_else(|| panic!("no status from push-controller:\n{}", self.logs()))
    }

    /// The end of the controller's stderr and stdout (its event lines).
    fn logs(&self) -> String {
        let tail = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "--- push-controller stderr:\n{}\n--- push-controller events:\n{}",
            tail(&self.log.with_extension("err")),
            tail(&self.log)
        )
    }

    /// Event lines of the controller's stdout with `"event":"<kind>"`.
    fn events(&self, kind: &str) -> Vec<Value> {
        let needle = format!("\"event\":\"{kind}\"");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a one-shot `push-controller` command (`seed`, `list`) and returns its JSON line.
async fn controller_tool(args: &[&str]) -> Value {
    let out = tokio::process::Command::new(controller_bin())
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .kill_on_drop(true)
        .output()
        .await
        .expect("push-controller");
    assert!(
        out.status.success(),
        "push-controller {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON line")
}

fn configmap(name: &str, seq: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NS, "labels": {"stream": "yes"}},
        "data": {"seq": seq.to_string(), "payload": "p".repeat(256)},
    })
}

fn collection() -> String {
    format!("/api/v1/namespaces/{NS}/configmaps")
}

async fn must(member: &RealMember, method: &str, path: &str, body: Option<Value>, ok: &[u16]) {
    let (status, reply) = member
        .request(method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} to {}: {e:#}", member.cluster()));
    assert!(
        ok.contains(&status),
        "{method} {path} to {}: {status} {}",
        member.cluster(),
        String::from_utf8_lossy(&reply)
    );
}

/// What the stream of writes left in the hub, by its own account: name → final `seq` (None:
/// deleted last).
type Expected = BTreeMap<String, Option<usize>>;

/// Creates, updates and deletes ConfigMaps in the hub until `stop`, one write at a time; returns
/// the final state it wrote and the number of writes.
async fn write_stream(hub: Arc<RealMember>, stop: CancellationToken) -> (Expected, usize) {
    let mut expected = Expected::new();
    let mut i = 0usize;
    while !stop.is_cancelled() {
        let name = format!("cm-{:03}", i % OBJECTS);
        let item = format!("{}/{name}", collection());
        match expected.get(&name).copied().flatten() {
            None => {
                must(
                    &hub,
                    "POST",
                    &collection(),
                    Some(configmap(&name, i)),
                    &[201],
                )
                .await;
                expected.insert(name, Some(i));
            }
            // Every 7th write is a delete (later writes create the object again).
            Some(_) if i % 7 == 3 => {
                must(&hub, "DELETE", &item, None, &[200]).await;
                expected.insert(name, None);
            }
            Some(_) => {
                must(&hub, "PUT", &item, Some(configmap(&name, i)), &[200]).await;
                expected.insert(name, Some(i));
            }
        }
        i += 1;
        tokio::time::sleep(WRITE_PAUSE).await;
    }
    (expected, i)
}

/// A ConfigMap as the checks compare it: its `data`, and the hub resourceVersion it carries
/// (the hub's own resourceVersion, or a member copy's annotation).
#[derive(Debug, Clone, PartialEq)]
struct Held {
    data: Value,
    hub_rv: String,
}

async fn list_namespace(member: &RealMember, hub: bool) -> BTreeMap<String, Held> {
    let (status, body) = member
        .request("GET", &collection(), None)
        .await
        .expect("list");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let list: Value = serde_json::from_slice(&body).expect("list JSON");
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            let meta = &item["metadata"];
            let hub_rv = if hub {
                &meta["resourceVersion"]
            } else {
                &meta["annotations"]["push-controller.test/hub-resource-version"]
            };
            (
                meta["name"].as_str().unwrap_or_default().to_owned(),
                Held {
                    data: item["data"].clone(),
                    hub_rv: hub_rv.as_str().unwrap_or_default().to_owned(),
                },
            )
        })
        .collect()
}

/// A write to the hub at `fault` (a moment ago), and how long from `fault` until the controller
/// had it written to both members (its own record of when each member acknowledged the write,
/// free of this test's polling), checked on each member directly: the time to recover from the
/// fault, as a user of the controller sees it.
async fn recovery(
    hub: &RealMember,
    members: &[&RealMember],
    name: &str,
    fault: Instant,
    controller: &Controller,
) -> Duration {
    let fault_ms = unix_ms() - fault.elapsed().as_millis() as i64;
    let object = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NS},
        "data": {"probe": name},
    });
    must(hub, "POST", &collection(), Some(object), &[201]).await;
    let key = format!("{NS}/{name}");
    let synced_at = loop {
        let status = controller.status().await;
        let at: Option<Vec<i64>> = members
            .iter()
            .map(|m| {
                let synced = &status["members"][m.cluster()]["synced"][&key];
                (synced["hub_rv"] != "")
                    .then(|| synced["at_ms"].as_i64())
                    .flatten()
            })
            .collect();
        if let Some(at) = at {
            break at.into_iter().max().unwrap_or(fault_ms);
        }
        assert!(
            fault.elapsed() < RECOVERY_LIMIT,
            "{name} did not reach the members within {RECOVERY_LIMIT:?} of the fault:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let item = format!("{}/{name}", collection());
    for member in members {
        let (status, body) = member.request("GET", &item, None).await.expect("GET");
        assert_eq!(
            status,
            200,
            "{name} in {}: {}",
            member.cluster(),
            String::from_utf8_lossy(&body)
        );
    }
    Duration::from_millis(u64::try_from(synced_at - fault_ms).unwrap_or(0))
}

/// Named spans of the test's time line, in unix ms, to split latencies by.
#[derive(Default)]
struct Phases(Mutex<Vec<(String, i64)>>);

impl Phases {
    fn enter(&self, name: &str) {
        self.0.lock().unwrap().push((name.to_owned(), unix_ms()));
    }

    fn of(&self, at_ms: i64) -> String {
        let phases = self.0.lock().unwrap();
        phases
            .iter()
            .rev()
            .find(|(_, start)| *start <= at_ms)
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| "before".into())
    }

    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Propagation latencies (ms) of every member, by phase, as `p50/p99/max (n)` lines; also
/// returns the overall p50 and p99.
fn latency_report(status: &Value, phases: &Phases) -> (String, f64, f64) {
    let mut by_phase: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut all = Vec::new();
    for member in status["members"].as_object().expect("members").values() {
        for sample in member["latencies_us"].as_array().expect("latencies") {
            let at = sample[0].as_i64().unwrap_or(0);
            let ms = sample[1].as_f64().unwrap_or(0.0) / 1000.0;
            by_phase.entry(phases.of(at)).or_default().push(ms);
            all.push(ms);
        }
    }
    let line = |name: &str, v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!(
            "  {name:<14} p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms  ({} syncs)\n",
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(f64::NAN),
            v.len()
        )
    };
    let mut text = String::new();
    for name in std::iter::once("before".to_owned()).chain(phases.names()) {
        if let Some(v) = by_phase.get_mut(&name) {
            text.push_str(&line(&name, v));
        }
    }
    text.push_str(&line("all", &mut all));
    (text, percentile(&all, 50.0), percentile(&all, 99.0))
}

/// The member watches' counters (`lists`, `watches`, `watch_ends`, `watch_errors`).
fn watch_counts(status: &Value, member: &str) -> [i64; 4] {
    let m = &status["members"][member];
    ["lists", "watches", "watch_ends", "watch_errors"].map(|k| m[k].as_i64().unwrap_or(-1))
}

async fn watches_of_both(controller: &Controller) -> [[i64; 4]; 2] {
    let status = controller.status().await;
    [
        watch_counts(&status, "alpha"),
        watch_counts(&status, "beta"),
    ]
}

/// From the controller's event lines: for every member watch that ended by itself (the server
/// or the network closed it), how long until the next one was established (the API server had
/// answered it), in ms.
fn watch_gaps(controller: &Controller, cluster: &str) -> Vec<i64> {
    let starts: Vec<i64> = controller
        .events("watch")
        .iter()
        .filter(|e| e["cluster"] == cluster && e["error"].is_null())
        .filter_map(|e| e["t"].as_i64())
        .collect();
    controller
        .events("watch_end")
        .iter()
        .filter(|e| e["cluster"] == cluster)
        .filter_map(|e| e["t"].as_i64())
        .map(|end| starts.iter().find(|s| **s >= end).map_or(-1, |s| s - end))
        .collect()
}

/// One line per member: sync failures (retried), the last error, and the watch reconnects.
fn failure_report(status: &Value, controller: &Controller) -> String {
    ["alpha", "beta"]
        .iter()
        .map(|m| {
            let s = &status["members"][m];
            format!(
                "  {m}: {} applies, {} deletes, {} failed syncs (retried; last: {}), watch \
                 [lists, watches, ends, errors] {:?}, reconnect gaps {:?} ms\n    watches: {}\n",
                s["applies"],
                s["deletes"],
                s["failures"],
                s["last_error"],
                watch_counts(status, m),
                watch_gaps(controller, m),
                controller
                    .events("watch")
                    .iter()
                    .filter(|e| e["cluster"] == *m)
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        })
        .collect()
}

/// Waits until `member`'s watch has been cut (its `watch_ends` above `before`) and started again:
/// the fault really reached the controller's connection to it. Panics after [`RECOVERY_LIMIT`].
async fn wait_rewatched(controller: &Controller, member: &str, before: [i64; 4]) {
    let started = Instant::now();
    loop {
        let [_, watches, ends, _] = watch_counts(&controller.status().await, member);
        if ends > before[2] && watches > before[1] {
            return;
        }
        assert!(
            started.elapsed() < RECOVERY_LIMIT,
            "{member}'s watch was not cut and started again (before {before:?}):\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the controller reports every member synced to the hub's current state (nothing
/// queued, every hub object at its resourceVersion, every deleted one deleted), then checks
/// each member directly: exactly the hub's ConfigMaps, with the hub's data and resourceVersion.
/// Returns how long the controller took to settle.
async fn assert_members_match_hub(
    hub: &RealMember,
    members: &[&RealMember],
    controller: &Controller,
    expected: &Expected,
) -> Duration {
    let in_hub = list_namespace(hub, true).await;
    // The hub holds what the stream wrote (the probes besides).
    for (name, seq) in expected {
        match (seq, in_hub.get(name)) {
            (None, None) => {}
            (Some(seq), Some(copy)) => assert_eq!(copy.data["seq"], seq.to_string(), "{name}"),
            other => panic!("the hub does not hold what was written to it: {name}: {other:?}"),
        }
    }
    let started = Instant::now();
    let settled = |status: &Value| {
        members.iter().all(|m| {
            let s = &status["members"][m.cluster()];
            let synced = &s["synced"];
            s["queued"] == 0
                && s["pending"] == 0
                && in_hub
                    .iter()
                    .all(|(name, copy)| synced[format!("{NS}/{name}")]["hub_rv"] == copy.hub_rv)
                && expected
                    .iter()
                    .filter(|(name, seq)| seq.is_none() && !in_hub.contains_key(*name))
                    .all(|(name, _)| {
                        let at = &synced[format!("{NS}/{name}")];
                        at.is_null() || at["hub_rv"] == ""
                    })
        })
    };
    loop {
        let status = controller.status().await;
        if settled(&status) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the controller did not settle within 60 s of the last write:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();

    for member in members {
        let copies = list_namespace(member, false).await;
        let lost: Vec<&String> = in_hub.keys().filter(|n| !copies.contains_key(*n)).collect();
        let extra: Vec<&String> = copies.keys().filter(|n| !in_hub.contains_key(*n)).collect();
        let stale: Vec<(&String, &Held, &Held)> = in_hub
            .iter()
            .filter_map(|(n, want)| copies.get(n).filter(|c| *c != want).map(|c| (n, c, want)))
            .collect();
        assert!(
            lost.is_empty() && extra.is_empty() && stale.is_empty(),
            "{} differs from the hub: lost {lost:?}, not in the hub (resurrected) {extra:?}, \
             stale (have, want) {stale:?}\n{}",
            member.cluster(),
            controller.logs()
        );
        eprintln!(
            "{}: exactly the hub's {} ConfigMaps, final data and resourceVersion",
            member.cluster(),
            copies.len()
        );
    }
    let status = controller.status().await;
    for member in members {
        let regressions = &status["members"][member.cluster()]["regressions"];
        assert_eq!(
            regressions,
            0,
            "{} went back to an older hub version: {:?}",
            member.cluster(),
            controller.events("regression")
        );
    }
    took
}

/// Hub, alpha and beta, started together.
async fn three_members(pki: &proxy_certs::DevPki) -> (RealMember, RealMember, RealMember) {
    let started = Instant::now();
    let (hub, alpha, beta) = tokio::join!(
        RealMember::start(pki, "hub"),
        RealMember::start(pki, "alpha"),
        RealMember::start(pki, "beta"),
    );
    eprintln!("hub, alpha and beta ready in {:?}", started.elapsed());
    (
        hub.expect("real member hub"),
        alpha.expect("real member alpha"),
        beta.expect("real member beta"),
    )
}

/// Kubeconfigs: the hub's direct, alpha's and beta's through `proxy_url`.
fn kubeconfigs(
    dir: &Path,
    hub: &RealMember,
    members: &[&RealMember],
    proxy_url: &str,
) -> (PathBuf, Vec<(String, PathBuf)>) {
    let hub_path = dir.join("kubeconfig-hub");
    hub.write_direct_kubeconfig(&hub_path, MemberUser::Admin)
        .expect("kubeconfig");
    let members = members
        .iter()
        .map(|m| {
            let path = dir.join(format!("kubeconfig-{}", m.cluster()));
            m.write_kubeconfig(&path, MemberUser::Admin, proxy_url)
                .expect("kubeconfig");
            (m.cluster().to_owned(), path)
        })
        .collect();
    (hub_path, members)
}

fn named(members: &[(String, PathBuf)]) -> Vec<(&str, PathBuf)> {
    members
        .iter()
        .map(|(n, p)| (n.as_str(), p.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_keeps_members_in_sync_through_an_agent_restart_and_a_10k_list() {
    let builder = Testbed::builder(&["hub", "alpha", "beta"]);
    let (hub, alpha, beta) = three_members(builder.pki()).await;
    let mut bed = builder
        .agent("alpha", alpha.addr())
        .agent_args(&AGENT_FLAGS)
        .agent("beta", beta.addr())
        .agent_args(&AGENT_FLAGS)
        .start()
        .await;
    let proxy_url = format!("http://{}", bed.frontend());
    let (hub_config, member_configs) = kubeconfigs(bed.dir(), &hub, &[&alpha, &beta], &proxy_url);

    // 10,000 ConfigMaps (1 KiB of data each) in beta, written directly, for the big LIST.
    let beta_direct = bed.dir().join("kubeconfig-beta-direct");
    beta.write_direct_kubeconfig(&beta_direct, MemberUser::Admin)
        .expect("kubeconfig");
    let seeded = controller_tool(&[
        "seed",
        "--kubeconfig",
        beta_direct.to_str().unwrap(),
        "--namespace",
        "bulk",
        "--count",
        "10000",
    ])
    .await;
    eprintln!("seeded beta with 10,000 ConfigMaps directly: {seeded}");

    // The hub namespace; the controller makes the members' own.
    must(
        &hub,
        "POST",
        "/api/v1/namespaces",
        Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})),
        &[201],
    )
    .await;
    let controller = Controller::start(bed.dir(), &hub_config, &named(&member_configs)).await;
    let hub = Arc::new(hub);
    let members = [&alpha, &beta];

    let phases = Phases::default();
    phases.enter("steady");
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_stream(hub.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let baseline = recovery(&hub, &members, "probe-steady", Instant::now(), &controller).await;
    eprintln!("no fault: a write reached both members after {baseline:?}");

    let agent_servers = [bed.server.agent_addr];
    // (b) alpha's agent restarted gracefully: SIGTERM (it drains up to 5 s), exit, a new agent
    // registers. A write is made at SIGTERM and another the moment the old agent is gone.
    let before = watch_counts(&controller.status().await, "alpha");
    phases.enter("agent-restart");
    let fault = Instant::now();
    let mut old = bed.agents.remove(0);
    old.proc.signal("TERM");
    let during_drain = recovery(&hub, &members, "probe-agent-drain", fault, &controller).await;
    let exit = old.proc.wait(Duration::from_secs(15)).await;
    let exited = Instant::now();
    let (after_exit, new_agent) = tokio::join!(
        recovery(&hub, &members, "probe-agent-exit", exited, &controller),
        AgentProc::start_ready_with(
            bed.pki(),
            &agent_servers,
            "alpha",
            alpha.addr(),
            &AGENT_FLAGS,
        ),
    );
    bed.agents.insert(0, new_agent.expect("alpha's new agent"));
    wait_rewatched(&controller, "alpha", before).await;
    let after = watch_counts(&controller.status().await, "alpha");
    eprintln!(
        "agent restart (SIGTERM): old agent exited {exit:?} {:?} after SIGTERM; a write made at \
         SIGTERM reached both members after {during_drain:?}, one made at its exit after \
         {after_exit:?}; alpha's watch [lists, watches, ends, errors] {before:?} -> {after:?}",
        exited - fault
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // ... and beta's agent killed (kill -9) and started again.
    let before = watch_counts(&controller.status().await, "beta");
    phases.enter("agent-kill-9");
    let fault = Instant::now();
    bed.agents.remove(1).proc.kill().await;
    let (recovered, new_agent) = tokio::join!(
        recovery(&hub, &members, "probe-agent-kill", fault, &controller),
        AgentProc::start_ready_with(bed.pki(), &agent_servers, "beta", beta.addr(), &AGENT_FLAGS),
    );
    let registered = fault.elapsed();
    bed.agents.insert(1, new_agent.expect("beta's new agent"));
    wait_rewatched(&controller, "beta", before).await;
    let after = watch_counts(&controller.status().await, "beta");
    eprintln!(
        "agent kill -9: new agent registered within {registered:?}; a write made at the kill \
         reached both members after {recovered:?}; beta's watch [lists, watches, ends, errors] \
         {before:?} -> {after:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // (c) 10,000 ConfigMaps listed through the proxy while the stream goes on: one LIST, then
    // pages of 500 (kubectl's way).
    phases.enter("list-10k");
    let beta_via_proxy = member_configs[1].1.to_str().unwrap().to_owned();
    let one_list = [
        "list",
        "--kubeconfig",
        &beta_via_proxy,
        "--namespace",
        "bulk",
    ];
    let (one, recovered) = tokio::join!(controller_tool(&one_list), async {
        // While the LIST is streaming (it takes about half a second).
        tokio::time::sleep(Duration::from_millis(200)).await;
        recovery(
            &hub,
            &members,
            "probe-during-list",
            Instant::now(),
            &controller,
        )
        .await
    });
    let paged = controller_tool(&[
        "list",
        "--kubeconfig",
        &beta_via_proxy,
        "--namespace",
        "bulk",
        "--limit",
        "500",
    ])
    .await;
    let direct = controller_tool(&[
        "list",
        "--kubeconfig",
        beta_direct.to_str().unwrap(),
        "--namespace",
        "bulk",
    ])
    .await;
    let mb_per_s =
        |v: &Value| v["bytes"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(1.0) / 1e6;
    eprintln!(
        "LIST of 10,000 through the proxy: {one} ({:.1} MB/s); paged by 500: {paged} ({:.1} MB/s); \
         the same LIST directly: {direct} ({:.1} MB/s); a write made during the first reached \
         both members after {recovered:?}",
        mb_per_s(&one),
        mb_per_s(&paged),
        mb_per_s(&direct)
    );
    assert_eq!(one["items"], 10_000);
    assert_eq!(paged["items"], 10_000);
    assert_eq!(direct["items"], 10_000);

    phases.enter("after");
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let (expected, writes) = writer.await.expect("writer");
    let settled = assert_members_match_hub(&hub, &members, &controller, &expected).await;

    let status = controller.status().await;
    let (report, p50, p99) = latency_report(&status, &phases);
    eprintln!(
        "{writes} writes to the hub; controller settled {settled:?} after the last one.\n\
         propagation latency (hub event -> member write acknowledged):\n{report}\
         hub watch [lists, watches, ends, errors] {}\n{}",
        status["hub"],
        failure_report(&status, &controller),
    );
    assert!(writes >= 200, "too few writes to mean anything: {writes}");
    assert!(p50 < 1000.0, "median propagation {p50} ms");
    assert!(p99.is_finite());
    drop(controller);
}

/// Every running replica lists alpha and beta with one agent each.
async fn full_mesh(replicas: &[Replica]) -> bool {
    for r in replicas.iter().filter(|r| r.server.is_some()) {
        let Ok(listed) = clusters_of(r.addrs.operator).await else {
            return false;
        };
        let ok = listed.len() == 2 && listed.iter().all(|(_, ids)| ids.len() == 1);
        if !ok {
            return false;
        }
    }
    true
}

async fn wait_full_mesh(replicas: &[Replica], limit: Duration) -> Duration {
    let started = Instant::now();
    while !full_mesh(replicas).await {
        assert!(started.elapsed() < limit, "no full mesh within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// The running replica with the most tunnels open to `cluster` (the controller's connection to
/// that member goes through it), and how many; the busiest replica for any cluster when none has
/// one open.
async fn carrying(replicas: &[Replica], cluster: &str) -> (usize, f64) {
    let mut best: Option<(usize, f64)> = None;
    let mut fallback = (0, -1.0);
    for (i, r) in replicas.iter().enumerate() {
        if r.server.is_none() {
            continue;
        }
        let mut all = 0.0;
        for c in ["alpha", "beta"] {
            let sample = format!("proxy_server_connections_active{{cluster=\"{c}\"}}");
            let open = metric_opt(r.addrs.admin, &sample).await.unwrap_or(0.0);
            all += open;
            if c == cluster && open > 0.0 && best.is_none_or(|(_, n)| open > n) {
                best = Some((i, open));
            }
        }
        if all > fallback.1 {
            fallback = (i, all);
        }
    }
    best.unwrap_or(fallback)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_keeps_members_in_sync_while_proxy_replicas_are_killed_and_rolled() {
    let server_flags = [
        "--server-count",
        "3",
        "--warmup",
        "3s",
        "--shutdown-grace",
        "5s",
        "--shutdown-delay",
        "1s",
    ];
    let bed = Bed::new(&["hub", "alpha", "beta"]);
    let (hub, alpha, beta) = three_members(&bed.pki).await;
    let addrs: Vec<ReplicaAddrs> = (0..3).map(|_| ReplicaAddrs::free()).collect();
    let lb = Haproxy::start(bed.dir.path(), &addrs)
        .await
        .expect("haproxy");
    let mut replicas = Vec::new();
    for a in &addrs {
        let server = start_replica(&bed.pki, *a, &server_flags, None)
            .await
            .expect("replica");
        replicas.push(Replica {
            addrs: *a,
            server: Some(server),
        });
    }
    let mut agents = Vec::new();
    for member in [&alpha, &beta] {
        let agent = AgentProc::start(
            &bed.pki,
            &[lb.agents],
            member.cluster(),
            member.addr(),
            &AGENT_FLAGS,
        )
        .await
        .expect("agent");
        agents.push(agent);
    }
    let meshed = wait_full_mesh(&replicas, Duration::from_secs(20)).await;
    for r in &replicas {
        wait_ready(r.addrs.admin, Duration::from_secs(10))
            .await
            .expect("replica ready");
    }
    eprintln!("3 replicas x 2 agents meshed after {meshed:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;

    let proxy_url = format!("http://{}", lb.clients);
    let (hub_config, member_configs) =
        kubeconfigs(bed.dir.path(), &hub, &[&alpha, &beta], &proxy_url);
    must(
        &hub,
        "POST",
        "/api/v1/namespaces",
        Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})),
        &[201],
    )
    .await;
    let controller = Controller::start(bed.dir.path(), &hub_config, &named(&member_configs)).await;
    let hub = Arc::new(hub);
    let members = [&alpha, &beta];

    let phases = Phases::default();
    phases.enter("steady");
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_stream(hub.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let baseline = recovery(&hub, &members, "probe-steady", Instant::now(), &controller).await;
    eprintln!("no fault: a write reached both members after {baseline:?}");

    // (a) kill -9 the replica carrying the controller's connection to alpha, then start it again
    // at its address.
    let (victim, open) = carrying(&replicas, "alpha").await;
    let before = watches_of_both(&controller).await;
    phases.enter("kill-9");
    let fault = Instant::now();
    replicas[victim]
        .server
        .take()
        .expect("running")
        .proc
        .kill()
        .await;
    let recovered = recovery(&hub, &members, "probe-kill", fault, &controller).await;
    wait_rewatched(&controller, "alpha", before[0]).await;
    let after = watches_of_both(&controller).await;
    eprintln!(
        "kill -9 of replica {victim} (carrying alpha: {open} tunnels open on it): a write made \
         then reached both members after {recovered:?}; watches [lists, watches, ends, errors] \
         alpha {:?} -> {:?}, beta {:?} -> {:?}",
        before[0], after[0], before[1], after[1]
    );
    let restarted = start_replica(&bed.pki, replicas[victim].addrs, &server_flags, None)
        .await
        .expect("replica restarted");
    replicas[victim].server = Some(restarted);
    wait_ready(replicas[victim].addrs.admin, Duration::from_secs(20))
        .await
        .expect("restarted replica ready");
    let healed = wait_full_mesh(&replicas, Duration::from_secs(20)).await;
    eprintln!(
        "replica {victim} restarted: ready {:?} after the kill, full mesh {healed:?} later",
        fault.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Roll the replica carrying the connection to beta now: SIGTERM (it drains for up to 5 s,
    // then exits), start it again, ready. Writes are made at SIGTERM and at its exit.
    let (rolled, open) = carrying(&replicas, "beta").await;
    let before = watches_of_both(&controller).await;
    phases.enter("roll");
    let fault = Instant::now();
    let old = replicas[rolled].server.take().expect("running");
    let (during_drain, stopped) = tokio::join!(
        recovery(&hub, &members, "probe-roll-drain", fault, &controller),
        async {
            let stopped = stop_gracefully(old, Duration::from_secs(20)).await;
            (stopped, Instant::now())
        },
    );
    let (stopped, exited) = stopped;
    stopped.expect("graceful stop");
    let (after_exit, new) = tokio::join!(
        recovery(&hub, &members, "probe-roll-exit", exited, &controller),
        start_replica(&bed.pki, replicas[rolled].addrs, &server_flags, None),
    );
    replicas[rolled].server = Some(new.expect("rolled replica"));
    wait_ready(replicas[rolled].addrs.admin, Duration::from_secs(20))
        .await
        .expect("rolled replica ready");
    let healed = wait_full_mesh(&replicas, Duration::from_secs(20)).await;
    wait_rewatched(&controller, "beta", before[1]).await;
    let after = watches_of_both(&controller).await;
    eprintln!(
        "roll of replica {rolled} (carrying beta: {open} tunnels open on it): drained and exited \
         {:?} after SIGTERM; a write made at SIGTERM reached both members after \
         {during_drain:?}, one made at its exit after {after_exit:?}; back and meshed {:?} after \
         SIGTERM (mesh {healed:?}); watches alpha {:?} -> {:?}, beta {:?} -> {:?}",
        exited - fault,
        fault.elapsed(),
        before[0],
        after[0],
        before[1],
        after[1]
    );

    phases.enter("after");
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let (expected, writes) = writer.await.expect("writer");
    let settled = assert_members_match_hub(&hub, &members, &controller, &expected).await;

    let status = controller.status().await;
    let (report, p50, p99) = latency_report(&status, &phases);
    eprintln!(
        "{writes} writes to the hub; controller settled {settled:?} after the last one.\n\
         propagation latency (hub event -> member write acknowledged):\n{report}\
         hub watch {}\n{}",
        status["hub"],
        failure_report(&status, &controller),
    );
    assert!(writes >= 200, "too few writes to mean anything: {writes}");
    assert!(p50 < 1000.0, "median propagation {p50} ms");
    assert!(p99.is_finite());
    drop(controller);
    drop(agents);
    lb.stop().await;
}
