//! Kubeconfigs for the connected clusters (`/api/v1/clusters/<name>/kubeconfig`, and
//! `/api/v1/kubeconfig` for all): each cluster's `server`, its API server's CA and TLS name as
//! its agents reported them, and this server as `proxy-url`. (The `proxy-server kubeconfig`
//! subcommand that fetches them is `crate::kubeconfig_command`.)

use std::fmt::Write as _;

use base64::Engine as _;

use super::Status;
use crate::registry::ClusterSnapshot;

impl Status {
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
pub(super) fn kubeconfig_facts(c: &ClusterSnapshot) -> Option<(String, String)> {
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
