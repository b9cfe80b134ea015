//! The admin listener's own pages: a status page for people (`/`), the same data as JSON
//! (`/api/v1/clusters`), and kubeconfigs for the connected clusters
//! (`/api/v1/clusters/<name>/kubeconfig`, `/api/v1/kubeconfig` for all).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use proxy_common::admin::{AdminResponse, Routes, text};
use serde_json::json;

use crate::metrics::{BytesLabels, Metrics};
use crate::registry::{ClusterSnapshot, Clusters};

/// Seconds between refreshes of the HTML page.
pub const REFRESH_SECONDS: u32 = 5;

/// What the pages are made from.
#[derive(Debug)]
pub struct Status {
    /// Clusters and agents.
    pub clusters: Arc<Clusters>,
    /// Byte counters.
    pub metrics: Arc<Metrics>,
    /// This server's id, the fleet's size and warm-up.
    pub fleet: Arc<crate::fleet::Fleet>,
    /// The proxy URL written into kubeconfigs.
    pub public_url: String,
    /// When the server started.
    pub started: SystemTime,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Escapes text for HTML (agent ids and reasons come from agents).
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| d.as_secs());
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h {}m ago", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(sorted[i])
}

impl Status {
    /// The admin routes these pages answer.
    pub fn routes(self: Arc<Self>) -> Routes {
        Arc::new(move |path, _query| self.route(path))
    }

    fn route(&self, path: &str) -> Option<AdminResponse> {
        match path {
            "/" => Some(respond("text/html; charset=utf-8", self.html())),
            "/api/v1/clusters" => Some(respond("application/json", self.json().to_string())),
            "/api/v1/kubeconfig" => Some(match self.kubeconfig(None) {
                Ok(yaml) => respond("application/yaml", yaml),
                Err(why) => text(StatusCode::NOT_FOUND, format!("{why}\n")),
            }),
            _ => {
                let name = path
                    .strip_prefix("/api/v1/clusters/")?
                    .strip_suffix("/kubeconfig")?;
                Some(match self.kubeconfig(Some(name)) {
                    Ok(yaml) => respond("application/yaml", yaml),
                    Err(why) => text(StatusCode::NOT_FOUND, format!("{why}\n")),
                })
            }
        }
    }

    fn bytes(&self, cluster: &str, direction: &str) -> u64 {
        self.metrics
            .bytes
            .get_or_create(&BytesLabels {
                cluster: cluster.to_owned(),
                direction: direction.to_owned(),
            })
            .get()
    }

    /// The JSON document of `/api/v1/clusters`.
    pub fn json(&self) -> serde_json::Value {
        let clusters: Vec<_> = self
            .clusters
            .snapshot()
            .into_iter()
            .map(|c| {
                let mut sorted: Vec<f64> = c.dials.recent_ms.iter().copied().collect();
                sorted.sort_by(f64::total_cmp);
                json!({
                    "name": c.name,
                    "state": if c.down_since.is_some() { "down" } else { "up" },
                    "down_since": c.down_since.map(unix),
                    "agents": c.agents.iter().map(|(a, draining)| json!({
                        "id": a.agent_id,
                        "address": a.addr.to_string(),
                        "connected_since": unix(a.connected_at),
                        "version": a.version,
                        "draining": draining,
                    })).collect::<Vec<_>>(),
                    "connections_active": c.open_connections,
                    "bytes_to_cluster": self.bytes(&c.name, "to_cluster"),
                    "bytes_from_cluster": self.bytes(&c.name, "from_cluster"),
                    "recent_dials": sorted.len(),
                    "dial_ms_p50": percentile(&sorted, 0.5),
                    "dial_ms_max": sorted.last(),
                    "dial_failures": c.dials.failures,
                    "last_failure": c.dials.last_failure.as_ref().map(|(t, why)| json!({"at": unix(*t), "reason": why})),
                    "kubeconfig": kubeconfig_facts(&c).is_some(),
                })
            })
            .collect();
        json!({
            "server_id": self.fleet.server_id,
            "server_count": self.fleet.count(),
            "warming_up": self.fleet.warmup_left().is_some(),
            "started": unix(self.started),
            "clusters": clusters,
        })
    }

    fn html(&self) -> String {
        let snapshot = self.clusters.snapshot();
        let agents: usize = snapshot.iter().map(|c| c.agents.len()).sum();
        let down = snapshot.iter().filter(|c| c.down_since.is_some()).count();
        let open: usize = snapshot.iter().map(|c| c.open_connections).sum();
        let mut rows = String::new();
        for c in &snapshot {
            let mut sorted: Vec<f64> = c.dials.recent_ms.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let latency = match (percentile(&sorted, 0.5), sorted.last()) {
                (Some(p50), Some(max)) => format!(
                    "{p50:.1} ms median, {max:.1} ms max (last {})",
                    sorted.len()
                ),
                _ => "no dials yet".to_owned(),
            };
            let failures = match &c.dials.last_failure {
                Some((t, why)) => format!("{} (last {}: {})", c.dials.failures, ago(*t), esc(why)),
                None => "0".to_owned(),
            };
            let agent_list: String = c
                .agents
                .iter()
                .map(|(a, draining)| {
                    format!(
                        "<li><code>{}</code> from {} since {} (v{}){}</li>",
                        esc(&a.agent_id),
                        a.addr,
                        ago(a.connected_at),
                        esc(&a.version),
                        if *draining { " <b>draining</b>" } else { "" }
                    )
                })
                .collect();
            let kubeconfig = if kubeconfig_facts(c).is_some() {
                format!(
                    "<a href=\"/api/v1/clusters/{0}/kubeconfig\">kubeconfig</a>",
                    esc(&c.name)
                )
            } else {
                "no CA reported".to_owned()
            };
            let (row_class, agent_list) = match c.down_since {
                Some(since) => (
                    " class=\"down\"",
                    format!("<b>down</b> since {} (no agent)", ago(since)),
                ),
                None => ("", format!("<ul>{agent_list}</ul>")),
            };
            let _ = write!(
                rows,
                "<tr{row_class}><td><b>{}</b></td><td>{agent_list}</td><td>{}</td><td>{} / {}</td><td>{latency}</td><td>{failures}</td><td>{kubeconfig}</td></tr>",
                esc(&c.name),
                c.open_connections,
                human_bytes(self.bytes(&c.name, "to_cluster")),
                human_bytes(self.bytes(&c.name, "from_cluster")),
            );
        }
        if snapshot.is_empty() {
            rows.push_str("<tr><td colspan=\"7\">No agent is connected.</td></tr>");
        }
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
<title>proxy-server {id}</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
td,th{{border:1px solid #ccc;padding:.4em .6em;vertical-align:top;text-align:left}}ul{{margin:0;padding-left:1.2em}}tr.down td{{background:#fde8e8}}</style></head>\
<body><h1>proxy-server <code>{id}</code></h1><p><b>{up_n} cluster(s) up, {down} down, {agents} agent(s), {open} open connection(s).</b></p>\
<p>Up since {up}. One of {count} server replica(s){warm}. Refreshes every {REFRESH_SECONDS} s. \
Same data: <a href=\"/api/v1/clusters\">JSON</a>; all kubeconfigs: <a href=\"/api/v1/kubeconfig\">kubeconfig</a>; <a href=\"/metrics\">metrics</a>.</p>\
<table><tr><th>cluster</th><th>agents</th><th>open connections</th><th>bytes to / from cluster</th><th>dial latency (CONNECT to 200)</th><th>dial failures</th><th>kubeconfig</th></tr>{rows}</table></body></html>\n",
            id = esc(&self.fleet.server_id),
            up = ago(self.started),
            count = self.fleet.count(),
            warm = match self.fleet.warmup_left() {
                Some(left) => format!(
                    ", warming up ({} s left: agents are still arriving)",
                    left.as_secs_f64().ceil()
                ),
                None => String::new(),
            },
            up_n = snapshot.len() - down,
        )
    }

    /// A kubeconfig with a cluster, user and context for `only` (or every cluster whose agent
    /// reported its API-server CA). Users are left for the operator to fill in.
    pub fn kubeconfig(&self, only: Option<&str>) -> Result<String, String> {
        let snapshot = self.clusters.snapshot();
        let chosen: Vec<_> = match only {
            Some(name) => {
                let c = snapshot
                    .iter()
                    .find(|c| c.name == name)
                    .ok_or_else(|| format!("no agent connected for cluster {name:?}"))?;
                let facts = kubeconfig_facts(c)
                    .ok_or_else(|| format!("the agents of cluster {name:?} reported no API-server CA (agent flag --upstream-ca)"))?;
                vec![(c.name.clone(), facts)]
            }
            None => snapshot
                .iter()
                .filter_map(|c| kubeconfig_facts(c).map(|f| (c.name.clone(), f)))
                .collect(),
        };
        if chosen.is_empty() {
            return Err("no connected cluster reported its API-server CA".into());
        }
        Ok(kubeconfig_yaml(&chosen, &self.public_url))
    }
}

/// The CA and TLS name of a cluster, from its first agent that reported both.
fn kubeconfig_facts(c: &ClusterSnapshot) -> Option<(String, String)> {
    c.agents
        .iter()
        .find_map(|(a, _)| Some((a.upstream_ca.clone()?, a.upstream_server_name.clone()?)))
}

/// Writes the kubeconfig. Every value is either validated (cluster names, TLS names), base64, or
/// the operator's own `--public-url`, quoted.
pub fn kubeconfig_yaml(clusters: &[(String, (String, String))], proxy_url: &str) -> String {
    let mut out = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    for (name, (ca, server_name)) in clusters {
        let ca = base64::engine::general_purpose::STANDARD.encode(ca.as_bytes());
        let _ = write!(
            out,
            "- name: {name}\n  cluster:\n    server: https://{name}:443\n    tls-server-name: {server_name}\n    certificate-authority-data: {ca}\n    proxy-url: {}\n",
            serde_json::Value::from(proxy_url)
        );
    }
    out.push_str("users:\n");
    for (name, _) in clusters {
        let _ = write!(
            out,
            "# Fill in credentials for {name}, e.g. kubectl config set-credentials {name} --token=...\n- name: {name}\n  user: {{}}\n"
        );
    }
    out.push_str("contexts:\n");
    for (name, _) in clusters {
        let _ = write!(
            out,
            "- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n"
        );
    }
    let _ = writeln!(out, "current-context: {}", clusters[0].0);
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn respond(content_type: &'static str, body: String) -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}
