//! `proxy-server`: parse flags, start tracing, bind, run until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let args = proxy_server::Args::parse();
    proxy_common::telemetry::init(args.log_format);
    let config = proxy_server::Config::from_args(&args).context("invalid configuration")?;
    tokio::runtime::Runtime::new()?.block_on(async {
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
