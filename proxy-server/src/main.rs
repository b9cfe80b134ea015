//! `proxy-server`: parse flags, start tracing, bind, run until SIGTERM/SIGINT (then drain);
//! or `proxy-server kubeconfig` to write the connected clusters' kubeconfig, or `proxy-server
//! token …` to manage join tokens.
#![forbid(unsafe_code)]

// mimalloc instead of glibc malloc, as in the agent: chunk buffers are allocated on one thread
// and freed on another, and glibc returned their pages to the kernel and faulted them back in
// (bulk down was about 3 Gbit/s faster with mimalloc). Built with `no_thp` (workspace
// Cargo.toml): with huge pages mimalloc held ~60 KiB per idle agent where glibc holds ~39; without
// them ~40 (bench, 1,000 and 5,000 agents).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::Parser;
use proxy_server::config::Command;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let args = proxy_server::Args::parse();
    // Held to the end: dropping it writes the log lines still buffered.
    let _log = proxy_common::telemetry::init(args.log_format);
    proxy_common::net::raise_open_files_limit();
    let runtime = proxy_common::runtime(args.worker_threads.map(usize::from))?;
    match &args.command {
        Some(Command::Kubeconfig { operator_url, out }) => {
            runtime.block_on(proxy_server::kubeconfig_command::write(
                operator_url,
                out.as_deref(),
            ))?;
            return Ok(());
        }
        Some(Command::Token { command }) => return proxy_server::join::command::run(command),
        None => {}
    }
    let config = proxy_server::Config::from_args(&args).context("invalid configuration")?;
    proxy_common::net::set_fin_wait(config.tcp_keepalive);
    runtime.block_on(async {
        let listeners = proxy_server::Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        proxy_common::shutdown::spawn_signal_handler(shutdown.clone())?;
        // One machine-readable line on stdout: which addresses were bound (port 0 picks one).
        // Printed once signals are handled, so a supervisor may stop us as soon as it sees it.
        println!("{}", listeners.describe());
        proxy_server::run(config, listeners, shutdown).await?;
        Ok(())
    })
}
