//! The status page for people (`/`), with its script (`/status.js`) and style (`/status.css`).
//!
//! The server renders the whole table, so the page works without JavaScript (a `<noscript>`
//! refresh reloads it). Each row carries its sort keys as `data-*` attributes; the script filters
//! and sorts those rows in place and refreshes them every few seconds without reloading, so a filter
//! typed over a fleet of thousands of clusters survives the refresh. The script and style are
//! separate files so the page can forbid inline script (`Content-Security-Policy`): agent ids and
//! failure reasons come from agents, and are checked or sanitized where they arrive
//! (`proxy_common::text`) and escaped here, but a slip there must not become script.

use std::fmt::Write as _;
use std::time::SystemTime;

use hyper::header::{self, HeaderValue};
use proxy_common::admin::AdminResponse;

use super::{REFRESH_SECONDS, Status, percentile, respond};
use crate::registry::ClusterSnapshot;

/// The page's script: filter, sort, live refresh.
const SCRIPT: &str = include_str!("page.js");
/// The page's style.
const STYLE: &str = include_str!("page.css");

/// What the page may load: its own script, style and data, nothing inline, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page, its script or its style, by path.
pub(super) fn route(status: &Status, path: &str) -> Option<AdminResponse> {
    let mut resp = match path {
        "/" => {
            let mut resp = respond("text/html; charset=utf-8", render(status));
            resp.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            resp.headers_mut().insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            resp
        }
        "/status.js" => respond("text/javascript; charset=utf-8", SCRIPT.to_owned()),
        "/status.css" => respond("text/css; charset=utf-8", STYLE.to_owned()),
        _ => return None,
    };
    // Revalidated every time, so an upgraded server's script meets its own page.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Some(resp)
}

/// The whole page.
fn render(status: &Status) -> String {
    let snapshot = status.clusters.snapshot();
    let agents: usize = snapshot.iter().map(|c| c.agents.len()).sum();
    let down = snapshot.iter().filter(|c| c.down_since.is_some()).count();
    let open: usize = snapshot.iter().map(|c| c.open_connections).sum();
    let mut rows = String::new();
    for c in &snapshot {
        row(status, c, &mut rows);
    }
    if snapshot.is_empty() {
        rows.push_str("<tr><td colspan=\"7\">No agent is connected.</td></tr>");
    }
    let warm = match status.fleet.warmup_left() {
        Some(left) => format!(
            ", warming up ({} s left: agents are still arriving)",
            left.as_secs_f64().ceil()
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\"></noscript>\
<title>proxy-server {id}</title><link rel=\"icon\" href=\"data:,\">\
<link rel=\"stylesheet\" href=\"/status.css\"><script src=\"/status.js\"></script></head>\
<body data-refresh=\"{REFRESH_SECONDS}\"><h1>proxy-server <code>{id}</code></h1>\
<p id=\"summary\"><b>{up_n} cluster(s) up, {down} down, {agents} agent(s), {open} open connection(s).</b></p>\
<p id=\"about\">Up since {up}. One of {count} server replica(s){warm}. Refreshes every {REFRESH_SECONDS} s. \
Same data: <a href=\"/api/v1/clusters\">JSON</a>; all kubeconfigs: <a href=\"/api/v1/kubeconfig\">kubeconfig</a>; \
<a href=\"/metrics\">metrics</a>.</p><p id=\"stale\" hidden></p>\
<form id=\"controls\" role=\"search\" hidden><label>Filter <input id=\"filter\" type=\"search\" \
placeholder=\"cluster, agent, address, version\" autocomplete=\"off\" spellcheck=\"false\"></label> \
<label>State <select id=\"state\"><option value=\"\">all</option><option value=\"up\">up</option>\
<option value=\"down\">down</option></select></label> <output id=\"shown\"></output></form>\
<table id=\"clusters\"><colgroup><col class=\"name\"><col class=\"agents\"><col class=\"open\">\
<col class=\"bytes\"><col class=\"latency\"><col class=\"failures\"><col class=\"kubeconfig\"></colgroup><thead><tr><th data-sort=\"name\">cluster</th><th data-sort=\"agents\">agents</th>\
<th data-sort=\"open\">open connections</th><th data-sort=\"bytes\">bytes to / from cluster</th>\
<th data-sort=\"p50\">dial latency (CONNECT to 200)</th><th data-sort=\"failures\">dial failures</th>\
<th>kubeconfig</th></tr></thead><tbody>{rows}</tbody></table><p id=\"more\" hidden><button type=\"button\">show more</button></p></body></html>\n",
        id = esc(&status.fleet.server_id),
        up = ago(status.started),
        count = status.fleet.count(),
        up_n = snapshot.len() - down,
    )
}

/// One cluster's row: its name and state, and its sort keys as one attribute; the script
/// filters on the text of the first two cells. Few elements and attributes per row: with
/// thousands of rows, the browser's parse time is per node.
fn row(status: &Status, c: &ClusterSnapshot, out: &mut String) {
    let mut sorted: Vec<f64> = c.dials.recent_ms.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let p50 = percentile(&sorted, 0.5);
    let latency = match (p50, sorted.last()) {
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
    let mut agent_list = String::new();
    for (a, draining) in &c.agents {
        if !agent_list.is_empty() {
            agent_list.push_str("<br>");
        }
        let _ = write!(
            agent_list,
            "{} from {} since {} (v{}){}",
            esc(&a.agent_id),
            a.addr,
            ago(a.connected_at),
            esc(&a.version),
            if *draining { " <b>draining</b>" } else { "" }
        );
    }
    let kubeconfig = if super::kubeconfig::kubeconfig_facts(c).is_some() {
        format!(
            "<a href=\"/api/v1/clusters/{0}/kubeconfig\">kubeconfig</a>",
            esc(&c.name)
        )
    } else {
        "no CA reported".to_owned()
    };
    let (state, agent_cell) = match c.down_since {
        Some(since) => (
            "down",
            format!("<b>down</b> since {} (no agent)", ago(since)),
        ),
        None => ("up", agent_list),
    };
    let (to, from) = (
        status.bytes(&c.name, "to_cluster"),
        status.bytes(&c.name, "from_cluster"),
    );
    // The sort keys in column order; no dials yet sorts below every measured latency.
    let _ = write!(
        out,
        "<tr data-name=\"{name}\" data-state=\"{state}\" data-sort=\"{} {} {} {} {}\"><td>{name}</td>\
<td>{agent_cell}</td><td>{}</td><td>{} / {}</td><td>{latency}</td><td>{failures}</td><td>{kubeconfig}</td></tr>",
        c.agents.len(),
        c.open_connections,
        to.saturating_add(from),
        p50.unwrap_or(-1.0),
        c.dials.failures,
        c.open_connections,
        human_bytes(to),
        human_bytes(from),
        name = esc(&c.name),
    );
}

/// Escapes text for HTML text and attribute values (agent ids and reasons come from agents).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(
            esc("a<b>&\"c\"'d'"),
            "a&lt;b&gt;&amp;&quot;c&quot;&#39;d&#39;"
        );
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
