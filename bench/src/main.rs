//! `proxy-bench`: runs every scenario against every contender on loopback, interleaved
//! (A B C D, A B C D, ...), and writes `results.json` and `results.md`.
//! The full run is `bench/run.sh`; CI runs `--smoke` so the harness cannot rot.
#![forbid(unsafe_code)]

mod agents;
mod balancer;
mod catalog;
mod contenders;
mod entry;
mod fairness;
mod kube;
mod replicas;
mod report;
mod scenarios;
mod stall;
mod swarm;
mod sys;
mod upstream;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use catalog::Scenario;
use contenders::{RatholeTransport, Running};
use report::{Outcome, ScenarioResult};

/// Benchmarks this proxy against direct TCP, rathole and ssh -R.
#[derive(Parser)]
struct Args {
    /// Tiny sizes and one round: checks that every scenario runs, measures nothing.
    #[arg(long)]
    smoke: bool,
    /// Where proxy-server and proxy-agent are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Where results.json and results.md go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Rounds per scenario (each round runs every contender once).
    #[arg(long)]
    rounds: Option<usize>,
    /// Run only these contenders (comma-separated: direct, proxy, baseline, rathole,
    /// rathole-noise, ssh-R), e.g. to profile one of them. The default is all.
    #[arg(long, value_delimiter = ',')]
    contenders: Vec<String>,
    /// Also run the proxy built in this folder (e.g. from an older commit) as contender
    /// `baseline`, interleaved with the others: before/after figures from one run.
    #[arg(long)]
    baseline_bin_dir: Option<PathBuf>,
    /// Run only scenarios whose name contains this (several alternatives separated by `|`,
    /// e.g. `bulk, 1 connection|latency`); an alternative ending in `$` must end the name
    /// (`agents, 1000 agents$` is not the 3-replica variant).
    #[arg(long)]
    only: Option<String>,
    /// Internal: serve the upstream and print its address (the harness runs it as a child
    /// process, so its sockets do not count against the client's descriptor limit).
    #[arg(long, hide = true)]
    upstream_only: bool,
    /// Internal: run the agent swarm with the identities in this folder.
    #[arg(long, hide = true)]
    agent_swarm: Option<PathBuf>,
    /// Internal: agents in the swarm.
    #[arg(long, hide = true, default_value_t = 0)]
    swarm_count: usize,
    /// Internal: the server the swarm connects to.
    #[arg(long, hide = true, default_value = "")]
    swarm_server: String,
    /// Internal: the upstream the swarm's agents dial.
    #[arg(long, hide = true, default_value = "")]
    swarm_upstream: String,
}

impl Args {
    /// Whether `--contenders` lets contender `name` run.
    fn runs(&self, name: &str) -> bool {
        self.contenders.is_empty() || self.contenders.iter().any(|c| c == name)
    }

    /// Whether `--only` lets scenario `name` run.
    fn wants(&self, name: &str) -> bool {
        self.only
            .as_deref()
            .is_none_or(|only| only.split('|').any(|o| matches(name, o)))
    }
}

/// Whether scenario `name` matches one `--only` alternative: contains it, or ends with it if it
/// ends in `$`.
fn matches(name: &str, alternative: &str) -> bool {
    match alternative.strip_suffix('$') {
        Some(tail) => name.ends_with(tail),
        None => name.contains(alternative),
    }
}

/// Starts the upstream in a child process; returns its address and the child.
async fn spawn_upstream() -> anyhow::Result<(std::net::SocketAddr, tokio::process::Child)> {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--upstream-only")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    tokio::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .await?;
    Ok((line.trim().parse()?, child))
}

/// Longest one contender may take for one run of one scenario.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

/// Starts every contender (with the WAN relay if `wan`); the ones that cannot start are added
/// to `missing` with the reason.
async fn start_all(
    args: &Args,
    upstream: std::net::SocketAddr,
    wan: Option<integration_tests::relay::Link>,
    missing: &mut Vec<(String, String)>,
) -> anyhow::Result<Vec<Running>> {
    let suffix = if wan.is_some() { "+wan" } else { "" };
    let wanted = |name: &str| args.runs(name);
    let mut running = Vec::new();
    if wanted("direct") {
        running.push(contenders::direct(upstream, wan).await?);
    }
    let baseline = args.baseline_bin_dir.as_deref();
    for name in ["proxy", "baseline", "rathole", "rathole-noise", "ssh-R"]
        .into_iter()
        .filter(|n| wanted(n) && (*n != "baseline" || baseline.is_some()))
    {
        let result = match name {
            "proxy" => contenders::proxy(&args.bin_dir, upstream, wan, false).await,
            "baseline" => {
                let dir = baseline.expect("filtered above");
                contenders::proxy(dir, upstream, wan, true).await
            }
            "rathole" => contenders::rathole(upstream, wan, RatholeTransport::Tcp).await,
            "rathole-noise" => contenders::rathole(upstream, wan, RatholeTransport::Noise).await,
            _ => contenders::ssh(upstream, wan).await,
        };
        match result {
            Ok(r) => running.push(r),
            Err(e) => {
                eprintln!("contender {name}{suffix} missing: {e:#}");
                missing.push((format!("{name}{suffix}"), format!("{e:#}")));
            }
        }
    }
    Ok(running)
}

/// Starts the project's builds (`proxy`, and `baseline` if given) with a TLS frontend; the ones
/// that cannot start are added to `missing` with the reason.
async fn start_tls(
    args: &Args,
    upstream: std::net::SocketAddr,
    missing: &mut Vec<(String, String)>,
) -> Vec<Running> {
    let builds = [
        ("proxy", Some(args.bin_dir.as_path())),
        ("baseline", args.baseline_bin_dir.as_deref()),
    ];
    let mut running = Vec::new();
    for (name, dir) in builds {
        let Some(dir) = dir.filter(|_| args.runs(name)) else {
            continue;
        };
        match contenders::proxy_tls(dir, upstream, name == "baseline").await {
            Ok(r) => running.push(r),
            Err(e) => {
                eprintln!("contender {name}+tls missing: {e:#}");
                missing.push((format!("{name}+tls"), format!("{e:#}")));
            }
        }
    }
    running
}

/// Runs `scenario` `rounds` times over every contender, interleaved.
async fn run_scenario(scenario: &Scenario, running: &[Running], rounds: usize) -> ScenarioResult {
    eprintln!("== {}", scenario.name);
    let mut samples: Vec<Vec<Outcome>> = running.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, contender) in running.iter().enumerate() {
            // A contender that hangs is reported as failed, not waited for.
            let outcome =
                match tokio::time::timeout(SCENARIO_TIMEOUT, (scenario.run)(contender)).await {
                    Ok(Ok(sample)) => Outcome::Sample(sample),
                    Ok(Err(e)) => Outcome::Failed(format!("{e:#}")),
                    Err(_) => Outcome::Failed(format!("no result within {SCENARIO_TIMEOUT:?}")),
                };
            eprintln!("   round {round} {}: {outcome:?}", contender.name);
            samples[i].push(outcome);
        }
    }
    ScenarioResult {
        name: scenario.name,
        unit: scenario.unit,
        higher_is_better: scenario.higher_is_better,
        by_contender: running
            .iter()
            .map(|r| r.name.to_owned())
            .zip(samples)
            .collect(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rounds = args.rounds.unwrap_or(if args.smoke { 1 } else { 3 });
    if args.upstream_only {
        println!("{}", upstream::start().await?);
        std::future::pending::<()>().await;
    }
    if let Some(dir) = &args.agent_swarm {
        return swarm::run(
            dir,
            args.swarm_count,
            &args.swarm_server,
            &args.swarm_upstream,
        )
        .await;
    }
    let (upstream, _upstream_process) = spawn_upstream().await?;

    let mut missing: Vec<(String, String)> = Vec::new();
    let running = start_all(&args, upstream, None, &mut missing).await?;
    let contender_count = running.len();
    let mut results = Vec::new();
    for scenario in catalog::loopback(args.smoke) {
        if !args.wants(scenario.name) {
            continue;
        }
        if scenario.fresh {
            let mut merged: Option<ScenarioResult> = None;
            for _ in 0..rounds {
                let fresh = start_all(&args, upstream, None, &mut missing).await?;
                let one = run_scenario(&scenario, &fresh, 1).await;
                match &mut merged {
                    None => merged = Some(one),
                    Some(m) => {
                        for (name, new) in one.by_contender {
                            match m.by_contender.iter_mut().find(|(n, _)| *n == name) {
                                Some((_, all)) => all.extend(new),
                                None => m.by_contender.push((name, new)),
                            }
                        }
                    }
                }
            }
            results.extend(merged);
        } else {
            results.push(run_scenario(&scenario, &running, rounds).await);
        }
    }
    drop(running);
    // TLS frontend: the project's builds, each with a TLS frontend clients speak to first.
    let group: Vec<Scenario> = catalog::tls(args.smoke)
        .into_iter()
        .filter(|s| args.wants(s.name))
        .collect();
    if !group.is_empty() {
        let tls = start_tls(&args, upstream, &mut missing).await;
        for scenario in &group {
            results.push(run_scenario(scenario, &tls, rounds).await);
        }
    }
    // WAN: the same contenders with latency added each way between their two halves (for
    // direct, between client and upstream), by the userspace relay (no netem here).
    for (path, group) in catalog::wan(args.smoke) {
        let group: Vec<Scenario> = group.into_iter().filter(|s| args.wants(s.name)).collect();
        if group.is_empty() {
            continue;
        }
        let wan = start_all(&args, upstream, Some(path), &mut missing).await?;
        for scenario in &group {
            results.push(run_scenario(scenario, &wan, rounds).await);
        }
    }
    // Agent scale compares builds of the project only (the peers have no per-cluster routing):
    // the proxy and, with --baseline-bin-dir, the baseline build, interleaved round by round.
    let mut builds = vec![("proxy", args.bin_dir.as_path())];
    if let Some(dir) = args.baseline_bin_dir.as_deref() {
        builds.push(("baseline", dir));
    }
    builds.retain(|(name, _)| args.runs(name));
    for (name, agents, servers) in catalog::agents(args.smoke) {
        if !args.wants(name) {
            continue;
        }
        eprintln!("== {name}");
        let (idle, connects) = if args.smoke {
            (Duration::from_secs(1), 5)
        } else {
            (Duration::from_secs(10), 200)
        };
        let mut by_build: Vec<(String, Vec<Outcome>)> = builds
            .iter()
            .map(|(b, _)| ((*b).to_owned(), Vec::new()))
            .collect();
        for round in 0..rounds {
            for ((build, bin_dir), (_, outcomes)) in builds.iter().zip(&mut by_build) {
                let run = async {
                    match servers {
                        1 => agents::agent_scale(bin_dir, upstream, agents, idle, connects).await,
                        _ => replicas::agent_scale(bin_dir, upstream, agents).await,
                    }
                };
                let outcome = match tokio::time::timeout(SCENARIO_TIMEOUT, run).await {
                    Ok(Ok(sample)) => Outcome::Sample(sample),
                    Ok(Err(e)) => Outcome::Failed(format!("{e:#}")),
                    Err(_) => Outcome::Failed(format!("no result within {SCENARIO_TIMEOUT:?}")),
                };
                eprintln!("   round {round} {build}: {outcome:?}");
                outcomes.push(outcome);
            }
        }
        results.push(ScenarioResult {
            name,
            unit: if servers == 1 {
                "server KiB/agent"
            } else {
                "server KiB/agent/replica"
            },
            higher_is_better: false,
            by_contender: by_build,
        });
    }
    // Real Kubernetes: one real member, direct and through the proxy (not the peers: they have
    // no per-cluster routing either).
    results.extend(kube::run(&args, catalog::kube(args.smoke), rounds).await);
    let not_implemented = Vec::new();
    // Idle rounds restart the contenders; report each missing one once.
    missing.sort();
    missing.dedup();
    report::write(
        &args.out,
        args.smoke,
        rounds,
        &results,
        &missing,
        &not_implemented,
    )?;
    eprintln!("wrote {}/results.json and results.md", args.out.display());
    if args.smoke {
        // Smoke mode's job is to prove every scenario runs against the project itself.
        let proxy_failures: Vec<_> = results
            .iter()
            .flat_map(|r| {
                r.by_contender
                    .iter()
                    .filter(|(n, _)| n == "proxy")
                    .map(move |(_, s)| (r.name, s))
            })
            .flat_map(|(name, s)| {
                s.iter().filter_map(move |o| match o {
                    Outcome::Failed(e) => Some(format!("{name}: {e}")),
                    Outcome::Sample(_) => None,
                })
            })
            .collect();
        anyhow::ensure!(
            missing.iter().all(|(n, _)| n != "proxy"),
            "the proxy contender did not start"
        );
        anyhow::ensure!(
            proxy_failures.is_empty(),
            "scenarios failed: {proxy_failures:?}"
        );
        println!(
            "bench smoke: {} scenarios ran against {} contenders",
            results.len(),
            contender_count
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_only_alternative_ending_in_a_dollar_must_end_the_name() {
        let name = "agents, 1000 agents, 3 replicas";
        assert!(super::matches(name, "agents, 1000 agents"));
        assert!(!super::matches(name, "agents, 1000 agents$"));
        assert!(super::matches(
            "agents, 1000 agents",
            "agents, 1000 agents$"
        ));
        assert!(super::matches(name, "3 replicas$"));
    }
}
