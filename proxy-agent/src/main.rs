//! `proxy-agent`: parse flags, start tracing, bind the admin listener, run until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

// mimalloc instead of glibc malloc: tunneled bytes travel in 2–64 KiB buffers allocated and
// freed on different threads, and glibc returned those pages to the kernel and faulted them
// back in at a high rate (about a tenth of the CPU in a bulk profile). The server uses it too,
// built without huge pages (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let args = proxy_agent::Args::parse();
    // Held to the end: dropping it writes the log lines still buffered.
    let _log = proxy_common::telemetry::init(args.log_format);
    proxy_common::net::raise_open_files_limit();
    let runtime = proxy_common::runtime(Some(args.worker_threads.into()))?;
    // A joining agent gets its certificate before the configuration loads it.
    runtime.block_on(proxy_agent::join::from_args(&args))?;
    let config = proxy_agent::Config::from_args(&args).context("invalid configuration")?;
    proxy_common::net::set_fin_wait(config.tcp_keepalive);
    runtime.block_on(async {
        let admin = tokio::net::TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", config.admin_addr))?;
        let shutdown = CancellationToken::new();
        proxy_common::shutdown::spawn_signal_handler(shutdown.clone())?;
        // One machine-readable line on stdout: the bound admin address (port 0 picks one).
        // Printed once signals are handled, so a supervisor may stop us as soon as it sees it.
        println!("proxy-agent listening admin={}", admin.local_addr()?);
        proxy_agent::run(config, admin, shutdown).await?;
        Ok(())
    })
}
