//! `proxy-certs --out DIR --cluster alpha --cluster beta`: writes a development PKI.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;

/// Writes a development PKI: three CAs (server, agent, frontend client), the server
/// certificate, one agent certificate per cluster (CN = cluster name, role URI
/// spiffe://multicluster-proxy/agent/<cluster>), frontend client certificates, and one
/// API-server CA + certificate per cluster.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Output folder.
    #[arg(long, default_value = "dev-certs")]
    out: PathBuf,
    /// Member cluster names (repeatable).
    #[arg(long = "cluster", required = true)]
    clusters: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let clusters: Vec<&str> = args.clusters.iter().map(String::as_str).collect();
    let pki = proxy_certs::write_dev_pki(&args.out, &clusters)?;
    println!("wrote development PKI to {}", pki.dir.display());
    Ok(())
}
