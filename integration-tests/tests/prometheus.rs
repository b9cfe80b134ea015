//! A real Prometheus (Debian's `prometheus`, installed by CI) scrapes a running server and agent
//! with the shipped rules loaded: every metric the rules and the Grafana dashboard use returns a
//! series, the rules load and evaluate without errors, a recording rule produces its series, and
//! every dashboard query is valid PromQL that Prometheus answers.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::fleet::free_port;
use integration_tests::procs::{admin_get, wait_ok};
use integration_tests::{Testbed, eventually};
use tokio::io::AsyncReadExt;

fn rules_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring/rules.yaml")
}

fn dashboard() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring/dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every query of every dashboard panel.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// Every metric name the rules mention: `proxy_server_x`, `proxy_agent_x`, and both names of a
/// `proxy_(server|agent)_x` selector.
fn metric_names(rules: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = rules;
    while let Some(at) = rest.find("proxy_") {
        let tail = &rest[at + "proxy_".len()..];
        // `level:metric:operation` is a recorded series' name, not a scraped metric.
        if rest[..at].ends_with(':') {
            rest = tail;
            continue;
        }
        let word = |s: &str| {
            s.chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect::<String>()
        };
        if let Some(after) = tail.strip_prefix("(server|agent)_") {
            let name = word(after);
            names.insert(format!("proxy_server_{name}"));
            names.insert(format!("proxy_agent_{name}"));
        } else {
            let name = word(tail);
            if name.starts_with("server_") || name.starts_with("agent_") {
                names.insert(format!("proxy_{name}"));
            }
        }
        rest = tail;
    }
    names
}

async fn query(prometheus: std::net::SocketAddr, expr: &str) -> serde_json::Value {
    let encoded: String = expr
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = admin_get(prometheus, &format!("/api/v1/query?query={encoded}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{expr}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|err| panic!("{expr}: {err}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_metric_the_shipped_rules_use() {
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    let queries = dashboard_queries(&dashboard());
    assert!(queries.len() >= 10, "{queries:?}");
    let mut names = metric_names(&rules);
    names.extend(metric_names(&queries.join("\n")));
    assert!(names.len() >= 14, "{names:?}");

    let bed = Testbed::builder(&["alpha"])
        .banner_agent("alpha", "hello")
        .start()
        .await;
    let agent = &bed.agents[0];
    // One tunneled connection, so CONNECT, dial and byte series exist.
    let mut tunnel = integration_tests::connect(bed.frontend(), "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let mut banner = [0u8; 5];
    tunnel.read_exact(&mut banner).await.unwrap();
    drop(tunnel);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
rule_files:\n  - {rules}\n\
scrape_configs:\n  - job_name: proxy\n    static_configs:\n      - targets: ['{server}', '{agent}']\n",
            rules = rules_file().display(),
            server = bed.server.admin_addr,
            agent = agent.admin_addr,
        ),
    )
    .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian package `prometheus`; .ci/run installs it)");
    wait_ok(addr, "/-/ready", Duration::from_secs(30))
        .await
        .unwrap_or_else(|err| {
            panic!(
                "prometheus not ready: {err}\n{}",
                std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
            )
        });

    // Both targets up, then every name has a series.
    eventually("both targets scraped", Duration::from_secs(20), || async {
        query(addr, "up").await["data"]["result"]
            .as_array()
            .is_some_and(|r| r.len() == 2 && r.iter().all(|s| s["value"][1] == "1"))
    })
    .await;
    for name in &names {
        eventually(
            &format!("a series of {name}"),
            Duration::from_secs(10),
            || async {
                query(addr, name).await["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty())
            },
        )
        .await;
    }

    // The rules loaded, and none fails to evaluate.
    let (_, body) = admin_get(addr, "/api/v1/rules").await.unwrap();
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let groups = doc["data"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{body}");
    eventually("every rule evaluated", Duration::from_secs(10), || async {
        let (_, body) = admin_get(addr, "/api/v1/rules").await.unwrap();
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<serde_json::Value> = doc["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        assert!(
            rules.iter().all(|r| r["health"] != "err"),
            "a rule fails: {body}"
        );
        rules.iter().all(|r| r["health"] == "ok")
    })
    .await;
    // Every dashboard query is answered (a query Prometheus cannot parse or evaluate fails).
    for expr in &queries {
        let answer = query(addr, expr).await;
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
    }
    // A recording rule over the scraped series.
    eventually("a recorded series", Duration::from_secs(15), || async {
        query(addr, "cluster_result:proxy_server_connections:rate5m").await["data"]["result"]
            .as_array()
            .is_some_and(|r| r.iter().any(|s| s["metric"]["cluster"] == "alpha"))
    })
    .await;
    // The certificate expiry the alert watches is the dev PKI's, in the future.
    let expiry = query(
        addr,
        "proxy_server_certificate_expiry_timestamp_seconds{certificate=\"agent-listener\"}",
    )
    .await;
    let value: f64 = expiry["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let file = proxy_common::tls::earliest_expiry(&bed.pki().server_cert()).unwrap() as f64;
    assert_eq!(value, file);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(value > now + 86_400.0, "{value}");
}

#[test]
fn the_rules_name_the_metrics_their_selectors_expand_to() {
    let names = metric_names(
        "a: proxy_server_agents{x=\"\"} b: {__name__=~\"proxy_(server|agent)_start_time_seconds\"} \
         record: cluster:proxy_server_bytes:rate5m",
    );
    let expected: BTreeSet<String> = [
        "proxy_server_agents",
        "proxy_server_start_time_seconds",
        "proxy_agent_start_time_seconds",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(names, expected);
}
