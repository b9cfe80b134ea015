//! Kubeconfigs for the connected clusters (`/api/v1/clusters/<name>/kubeconfig`, and
//! `/api/v1/kubeconfig` for all): each cluster's `server`, its API server's CA and TLS name as
//! its agents reported them, and this server as `proxy-url`. (The `proxy-server kubeconfig`
//! subcommand that fetches them is `crate::kubeconfig_command`.)
//!
//! Written as JSON, which is YAML too: every string in double quotes, so a value has one reading
//! in every YAML version. kubectl reads kubeconfigs as YAML 1.1, where a plain `1e3`, `0x1f`,
//! `null`, `true`, `yes` or `on` is no string, and each of those is a valid cluster name. A YAML
//! 1.2 writer (serde_yaml_ng) quotes the first four but leaves `yes` and `on` bare, which kubectl
//! then rejects with the whole file ("cannot unmarshal bool into ... of type string").

use base64::Engine as _;
use serde::Serialize;

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
        Ok(kubeconfig_document(&chosen, &self.public_url))
    }
}

/// The CA and TLS name of a cluster, from its first agent that reported both.
pub(super) fn kubeconfig_facts(c: &ClusterSnapshot) -> Option<(String, String)> {
    c.agents
        .iter()
        .find_map(|(a, _)| Some((a.upstream_ca.clone()?, a.upstream_server_name.clone()?)))
}

/// A kubeconfig as kubectl reads it (`clientcmd/api/v1`), only the fields written here.
#[derive(Serialize)]
struct Kubeconfig<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    clusters: Vec<Named<'a, Cluster<'a>>>,
    /// One per cluster, empty: the operator fills in credentials (`kubectl config
    /// set-credentials NAME --token=...`).
    users: Vec<Named<'a, User>>,
    contexts: Vec<Named<'a, Context<'a>>>,
    #[serde(rename = "current-context")]
    current_context: &'a str,
}

/// A `clusters`, `users` or `contexts` entry.
#[derive(Serialize)]
struct Named<'a, T> {
    name: &'a str,
    #[serde(flatten)]
    item: T,
}

#[derive(Serialize)]
struct Cluster<'a> {
    cluster: ClusterFields<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterFields<'a> {
    server: String,
    tls_server_name: &'a str,
    certificate_authority_data: String,
    proxy_url: &'a str,
}

#[derive(Serialize)]
struct User {
    user: Empty,
}

/// `{}`.
#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct Context<'a> {
    context: ContextFields<'a>,
}

#[derive(Serialize)]
struct ContextFields<'a> {
    cluster: &'a str,
    user: &'a str,
}

/// The kubeconfig of `clusters` (name, and the API server's CA and TLS name), each reached
/// through `proxy_url`; the first is the current context. JSON (see the module's doc), ending
/// with a newline.
pub fn kubeconfig_document(clusters: &[(String, (String, String))], proxy_url: &str) -> String {
    let base64 = base64::engine::general_purpose::STANDARD;
    let doc = Kubeconfig {
        api_version: "v1",
        kind: "Config",
        clusters: clusters
            .iter()
            .map(|(name, (ca, server_name))| Named {
                name,
                item: Cluster {
                    cluster: ClusterFields {
                        server: format!("https://{name}:443"),
                        tls_server_name: server_name,
                        certificate_authority_data: base64.encode(ca.as_bytes()),
                        proxy_url,
                    },
                },
            })
            .collect(),
        users: clusters
            .iter()
            .map(|(name, _)| Named {
                name,
                item: User { user: Empty {} },
            })
            .collect(),
        contexts: clusters
            .iter()
            .map(|(name, _)| Named {
                name,
                item: Context {
                    context: ContextFields {
                        cluster: name,
                        user: name,
                    },
                },
            })
            .collect(),
        current_context: clusters.first().map_or("", |(name, _)| name),
    };
    // Strings and structs only: nothing here can fail to serialize.
    let mut out = serde_json::to_string_pretty(&doc).expect("a kubeconfig serializes");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names that YAML 1.1 (kubectl) or 1.2 reads as something other than a string when
    /// written bare; all valid cluster names.
    const ODD: [&str; 10] = [
        "1e3", "null", "true", "0x1f", "yes", "on", "off", "n", "017", "0b11",
    ];

    fn odd_kubeconfig() -> String {
        let clusters: Vec<_> = ODD
            .iter()
            .map(|n| {
                let facts = (
                    "-----BEGIN CERTIFICATE-----\n".to_owned(),
                    "kubernetes.default.svc".to_owned(),
                );
                ((*n).to_owned(), facts)
            })
            .collect();
        kubeconfig_document(&clusters, "http://proxy:8090")
    }

    #[test]
    fn odd_cluster_names_stay_strings() {
        let text = odd_kubeconfig();
        for doc in [
            serde_yaml_ng::from_str::<serde_json::Value>(&text).unwrap(),
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        ] {
            for list in ["clusters", "users", "contexts"] {
                let names: Vec<_> = doc[list]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|entry| entry["name"].as_str().expect("a string name"))
                    .collect();
                assert_eq!(names, ODD, "{list}");
            }
            assert_eq!(doc["current-context"], "1e3");
            assert_eq!(doc["contexts"][4]["context"]["cluster"], "yes");
            assert_eq!(doc["contexts"][5]["context"]["user"], "on");
            assert_eq!(doc["clusters"][3]["cluster"]["server"], "https://0x1f:443");
            assert_eq!(
                doc["clusters"][0]["cluster"]["proxy-url"],
                "http://proxy:8090"
            );
            assert_eq!(doc["users"][0]["user"], serde_json::json!({}));
        }
    }

    #[test]
    fn every_value_is_quoted() {
        // A YAML 1.1 reader has no chance to take a value for a bool or a number: every
        // scalar after a key is in double quotes.
        let text = odd_kubeconfig();
        for line in text.lines() {
            if let Some((key, value)) = line.split_once(": ") {
                assert!(key.trim_start().starts_with('"'), "{line}");
                assert!(value.starts_with(['"', '{', '[']), "{line}");
            }
        }
        assert!(text.contains("\"name\": \"yes\""), "{text}");
    }

    #[test]
    fn a_proxy_url_with_yaml_syntax_is_one_value() {
        let clusters = [(
            "alpha".to_owned(),
            ("ca".to_owned(), "kubernetes.default.svc".to_owned()),
        )];
        let url = "http://user:p#ss\"word@proxy:8090/\n- name: evil";
        let text = kubeconfig_document(&clusters, url);
        let doc: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(doc["clusters"][0]["cluster"]["proxy-url"], url);
        assert_eq!(doc["clusters"].as_array().unwrap().len(), 1);
    }
}
