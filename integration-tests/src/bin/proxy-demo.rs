//! `proxy-demo`: the whole system on this machine in one command. Makes a PKI, starts two fake
//! member API servers (`alpha`, `beta`), a proxy-server and one proxy-agent per member (alpha's
//! with a certificate made by hand, beta's joining with a token), writes a
//! kubeconfig per member with `proxy-url` pointing at the proxy, and prints commands that work
//! through it. Runs until Ctrl-C, or with `--check` runs those commands itself and exits.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use integration_tests::{FakeApiServer, client};
use tokio_util::sync::CancellationToken;

/// Local demo: server, agents, certificates and member API servers, all on 127.0.0.1.
#[derive(Parser)]
struct Args {
    /// Folder for certificates and kubeconfigs.
    #[arg(long, default_value = "demo-certs")]
    dir: PathBuf,
    /// CONNECT listener of the demo proxy.
    #[arg(long, default_value = "127.0.0.1:8090")]
    frontend_addr: String,
    /// Run the printed kubectl and curl commands, report, and exit.
    #[arg(long)]
    check: bool,
}

const CLUSTERS: [&str; 2] = ["alpha", "beta"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _log = proxy_common::telemetry::init(proxy_common::telemetry::LogFormat::Text);
    // A demo already running holds the port: say so before touching its certificates.
    drop(
        std::net::TcpListener::bind(&args.frontend_addr).with_context(|| {
            format!(
                "cannot listen on {} (is a demo already running? --frontend-addr picks another port)",
                args.frontend_addr
            )
        })?,
    );
    let pki = proxy_certs::write_dev_pki(&args.dir, &CLUSTERS)?;
    // beta joins by token, as a member does in the field (docs/security.md, "Joining by
    // token"): a fresh PKI each run, so its identity and the tokens of an earlier run go.
    let tokens = args.dir.join("join-tokens.yaml");
    let beta_state = args.dir.join("beta-agent-state");
    let _ = std::fs::remove_file(&tokens);
    let _ = std::fs::remove_dir_all(&beta_state);
    let shutdown = CancellationToken::new();
    proxy_common::shutdown::spawn_signal_handler(shutdown.clone())?;

    let server_args = proxy_server::Args::try_parse_from([
        "proxy-server",
        "--agent-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--operator-addr",
        "127.0.0.1:0",
        "--frontend-addr",
        &args.frontend_addr,
        "--agent-tls-cert",
        &pki.server_cert().display().to_string(),
        "--agent-tls-key",
        &pki.server_key().display().to_string(),
        "--agent-ca",
        &pki.agent_ca().display().to_string(),
        "--join-tokens",
        &tokens.display().to_string(),
        "--agent-signer-cert",
        &pki.agent_signer_cert().display().to_string(),
        "--agent-signer-key",
        &pki.agent_signer_key().display().to_string(),
        "--agent-tls-ca",
        &pki.server_ca().display().to_string(),
    ])?;
    let config = proxy_server::Config::from_args(&server_args)?;
    let listeners = proxy_server::Listeners::bind(&config).await?;
    let agent_addr = listeners.agent.local_addr()?;
    let frontend = listeners.frontend.local_addr()?;
    // The status page, cluster list and kubeconfigs are on the operator listener.
    let admin = listeners.operator.local_addr()?;
    let server = tokio::spawn(proxy_server::run(config, listeners, shutdown.clone()));

    // What `proxy-server token create --cluster beta` does.
    let (token, _) = proxy_server::join::tokens::TokenFile::new(&tokens).create(
        "beta",
        Duration::from_secs(3600),
        1,
        std::time::SystemTime::now(),
    )?;
    let pin = proxy_common::tls::spki_pin_of_file(&pki.server_ca())?;
    let mut agents = Vec::new();
    for cluster in CLUSTERS {
        let api = FakeApiServer::start(&pki, cluster).await?;
        // alpha with a certificate made by hand, beta with the token and the pin.
        let identity: Vec<String> = if cluster == "beta" {
            vec![
                "--state-dir".into(),
                beta_state.display().to_string(),
                "--join-token".into(),
                token.clone(),
                "--server-ca-hash".into(),
                pin.clone(),
            ]
        } else {
            vec![
                "--tls-cert".into(),
                pki.agent_cert(cluster).display().to_string(),
                "--tls-key".into(),
                pki.agent_key(cluster).display().to_string(),
                "--server-ca".into(),
                pki.server_ca().display().to_string(),
            ]
        };
        let mut argv: Vec<String> = vec![
            "proxy-agent".into(),
            "--server".into(),
            agent_addr.to_string(),
            "--server-name".into(),
            "localhost".into(),
        ];
        argv.extend(identity);
        let agent_args =
            proxy_agent::Args::try_parse_from(argv.iter().map(String::as_str).chain([
                "--upstream",
                &api.addr.to_string(),
                // Reported to the server, so its generated kubeconfigs verify the member.
                "--upstream-ca",
                &pki.apiserver_ca(cluster).display().to_string(),
                "--admin-addr",
                "127.0.0.1:0",
            ]))?;
        proxy_agent::join::from_args(&agent_args).await?;
        let config = proxy_agent::Config::from_args(&agent_args)?;
        let admin = tokio::net::TcpListener::bind(config.admin_addr).await?;
        agents.push(tokio::spawn(proxy_agent::run(
            config,
            admin,
            shutdown.clone(),
        )));
        client::write_kubeconfig(&args.dir, &pki, cluster, &format!("http://{frontend}"))?;
    }
    wait_registered(admin).await?;
    wait_served(frontend, &pki).await?;

    let dir = args.dir.display();
    let commands = [
        format!("kubectl --kubeconfig {dir}/kubeconfig-alpha get namespaces"),
        format!("kubectl --kubeconfig {dir}/kubeconfig-beta get --raw /version"),
        format!(
            "curl --proxy http://{frontend} --cacert {dir}/apiserver-alpha-ca.pem https://alpha:443/version"
        ),
        // The server's own kubeconfigs, made from what the agents reported.
        format!(
            "curl -sf http://{admin}/api/v1/kubeconfig -o {dir}/fleet.kubeconfig && kubectl --kubeconfig {dir}/fleet.kubeconfig --context beta --token=the-demo-checks-none get --raw /version"
        ),
    ];
    println!(
        "\nproxy demo is up: CONNECT proxy on {frontend}, member clusters alpha and beta.\n\
         Status page: http://{admin}/ (metrics at /metrics).\n\
         beta's agent joined with a token ({dir}/join-tokens.yaml; its identity is in {dir}/beta-agent-state).\nTry:\n"
    );
    for c in &commands {
        println!("  {c}");
    }
    println!("\nCtrl-C stops it.");

    let result = if args.check {
        check(&commands)
    } else {
        shutdown.cancelled().await;
        Ok(())
    };
    shutdown.cancel();
    for agent in agents {
        agent.await??;
    }
    server.await??;
    result
}

/// Waits until both members' agents registered, so the first CONNECTs find them (and the
/// demo's own probes neither fail nor count as `no_agent`).
async fn wait_registered(admin: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, body)) =
            integration_tests::procs::admin_get(admin, "/api/v1/clusters").await
            && CLUSTERS
                .iter()
                .all(|c| body.contains(&format!("\"name\":\"{c}\"")))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agents did not register within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until both members answer through the proxy.
async fn wait_served(
    frontend: std::net::SocketAddr,
    pki: &proxy_certs::DevPki,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for cluster in CLUSTERS {
        loop {
            if let Ok((200, _)) = client::get_via_proxy(frontend, pki, cluster, "/version").await {
                break;
            }
            if Instant::now() > deadline {
                bail!("cluster {cluster} not reachable through the proxy");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Runs each printed command the way a person would paste it.
fn check(commands: &[String]) -> anyhow::Result<()> {
    for c in commands {
        let out = std::process::Command::new("sh")
            .args(["-c", c])
            .output()
            .with_context(|| format!("running {c}"))?;
        if !out.status.success() {
            bail!("`{c}` failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        println!(
            "ok: {c}\n{}",
            String::from_utf8_lossy(&out.stdout).trim_end()
        );
    }
    Ok(())
}
