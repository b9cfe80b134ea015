//! The admin listener's own pages: a status page for people (`/`, see [`page`]), the same data as JSON
//! (`/api/v1/clusters`), and kubeconfigs for the connected clusters
//! (`/api/v1/clusters/<name>/kubeconfig`, `/api/v1/kubeconfig` for all).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

mod kubeconfig;
mod page;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use proxy_common::admin::{AdminResponse, Routes, text};
use serde_json::json;

use crate::metrics::{BytesLabels, Metrics};
use crate::registry::Clusters;

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

/// The `p` quantile of ascending `sorted` values (nearest rank).
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
            "/api/v1/clusters" => Some(respond("application/json", self.json().to_string())),
            // JSON, which is YAML too: every value quoted (see `kubeconfig`).
            "/api/v1/kubeconfig" => Some(match self.kubeconfig(None) {
                Ok(yaml) => respond("application/yaml", yaml),
                Err(why) => text(StatusCode::NOT_FOUND, format!("{why}\n")),
            }),
            _ => {
                if let Some(page) = page::route(self, path) {
                    return Some(page);
                }
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
                    "kubeconfig": kubeconfig::kubeconfig_facts(&c).is_some(),
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
}

fn respond(content_type: &'static str, body: String) -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}
