//! Results as JSON (with the environment they were measured in) and as a markdown table.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use crate::scenarios::Sample;

/// One contender's result in one round.
#[derive(Debug)]
pub enum Outcome {
    /// Measured.
    Sample(Sample),
    /// The run failed; why.
    Failed(String),
}

/// Every contender's rounds in one scenario.
pub struct ScenarioResult {
    /// Scenario name.
    pub name: &'static str,
    /// Unit of the headline value.
    pub unit: &'static str,
    /// Direction of better.
    pub higher_is_better: bool,
    /// (contender, one outcome per round).
    pub by_contender: Vec<(String, Vec<Outcome>)>,
}

fn median(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

fn command(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "not found".into())
}

fn environment() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    json!({
        "commit": command("git", &["rev-parse", "HEAD"]),
        "kernel": command("uname", &["-r"]),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rustc": command("rustc", &["--version"]),
        "rathole": command("rathole", &["--version"]),
        "ssh": command("ssh", &["-V"]),
    })
}

/// Writes `results.json` and `results.md` into `out`.
pub fn write(
    out: &Path,
    smoke: bool,
    rounds: usize,
    results: &[ScenarioResult],
    missing: &[(String, String)],
    not_implemented: &[String],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let env = environment();
    let scenarios: Vec<_> = results
        .iter()
        .map(|r| {
            let contenders: serde_json::Map<String, serde_json::Value> = r
                .by_contender
                .iter()
                .map(|(name, outcomes)| {
                    let values: Vec<f64> = outcomes.iter().filter_map(|o| match o { Outcome::Sample(s) => Some(s.value), Outcome::Failed(_) => None }).collect();
                    let cpu: Vec<f64> = outcomes.iter().filter_map(|o| match o { Outcome::Sample(s) => s.cpu_s_per_gb, Outcome::Failed(_) => None }).collect();
                    let failures: Vec<&str> = outcomes.iter().filter_map(|o| match o { Outcome::Failed(e) => Some(e.as_str()), Outcome::Sample(_) => None }).collect();
                    let extras: Vec<_> = outcomes.iter().filter_map(|o| match o { Outcome::Sample(s) => Some(s.extra.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()), Outcome::Failed(_) => None }).collect();
                    (name.clone(), json!({
                        "median": median(values.clone()).map(|m| m.0),
                        "min": median(values.clone()).map(|m| m.1),
                        "max": median(values.clone()).map(|m| m.2),
                        "samples": values,
                        "cpu_s_per_gb_median": median(cpu).map(|m| m.0),
                        "extras_per_round": extras,
                        "failures": failures,
                    }))
                })
                .collect();
            json!({"name": r.name, "unit": r.unit, "higher_is_better": r.higher_is_better, "contenders": contenders})
        })
        .collect();
    let doc = json!({
        "smoke": smoke,
        "rounds": rounds,
        "environment": env,
        "missing_contenders": missing.iter().map(|(n, w)| json!({"name": n, "why": w})).collect::<Vec<_>>(),
        "not_implemented": not_implemented,
        "scenarios": scenarios,
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmark results{}\n",
        if smoke {
            " (smoke run: sizes too small to mean anything)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "Commit `{}`, kernel {}, {} ({} cores), {}; rathole: {}; ssh: {}. Median of {rounds} interleaved round(s), min–max in brackets; CPU is machine-wide CPU seconds per GB moved (client and upstream included, the same for every contender).\n",
        env["commit"].as_str().unwrap_or(""),
        env["kernel"].as_str().unwrap_or(""),
        env["cpu"].as_str().unwrap_or(""),
        env["cores"],
        env["rustc"].as_str().unwrap_or(""),
        env["rathole"].as_str().unwrap_or(""),
        env["ssh"].as_str().unwrap_or("")
    );
    // One column per contender, in order of first appearance; WAN rows ("proxy+wan") go in the
    // same column as their contender, agent scale (only the proxy) leaves the others empty.
    let column = |n: &str| n.trim_end_matches("+wan").to_owned();
    let mut names: Vec<String> = Vec::new();
    for (n, _) in results.iter().flat_map(|r| &r.by_contender) {
        if !names.contains(&column(n)) {
            names.push(column(n));
        }
    }
    let _ = writeln!(md, "| scenario | {} |", names.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(names.len()));
    for r in results {
        let cells: Vec<String> = names
            .iter()
            .map(|name| r.by_contender.iter().find(|(n, _)| column(n) == *name))
            .map(|found| {
                let Some((_, outcomes)) = found else {
                    return "–".to_owned();
                };
                let values: Vec<f64> = outcomes
                    .iter()
                    .filter_map(|o| match o {
                        Outcome::Sample(s) => Some(s.value),
                        Outcome::Failed(_) => None,
                    })
                    .collect();
                let cpu: Vec<f64> = outcomes
                    .iter()
                    .filter_map(|o| match o {
                        Outcome::Sample(s) => s.cpu_s_per_gb,
                        Outcome::Failed(_) => None,
                    })
                    .collect();
                match median(values) {
                    None => "failed".to_owned(),
                    Some((m, lo, hi)) => {
                        let mut cell = format!("{m:.2} ({lo:.2}–{hi:.2})");
                        if let Some((c, _, _)) = median(cpu) {
                            let _ = write!(cell, ", {c:.2} CPU s/GB");
                        }
                        if let Some(Outcome::Sample(s)) = outcomes
                            .iter()
                            .rev()
                            .find(|o| matches!(o, Outcome::Sample(_)))
                        {
                            for (k, v) in &s.extra {
                                if k.contains("p99")
                                    || k.contains("kib_per_conn")
                                    || k.contains("kib_per_agent")
                                    || k.contains("gbit")
                                    || k.starts_with("tunnel_cpu")
                                    || k.starts_with("ttfb")
                                    || k.ends_with("_s")
                                    || k.ends_with("cpu_pct")
                                    || k.contains("pct_of")
                                    || k.contains("pending_mean")
                                    || k.ends_with("_rss_kib")
                                    || k.starts_with("connect_")
                                    || k.starts_with("kernel_tcp")
                                    || k.ends_with("per_stalled")
                                    || k == "stalled"
                                {
                                    let _ = write!(cell, "; {k} {v:.1}");
                                }
                            }
                        }
                        cell
                    }
                }
            })
            .collect();
        let _ = writeln!(md, "| {} ({}) | {} |", r.name, r.unit, cells.join(" | "));
    }
    if !missing.is_empty() {
        let _ = writeln!(md, "\nMissing contenders:");
        for (n, w) in missing {
            let _ = writeln!(md, "- {n}: {w}");
        }
    }
    if !not_implemented.is_empty() {
        let _ = writeln!(md, "\nNot measured yet: {}.", not_implemented.join("; "));
    }
    std::fs::write(out.join("results.md"), md)?;
    Ok(())
}
