//! Test harness for the end-to-end tests: a PKI made for the test, fake member API servers,
//! plain TCP upstreams, and the real binaries as child processes.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod blackhole;
pub mod browser;
pub mod client;
pub mod data;
pub mod fleet;
pub mod procs;
pub mod real_member;
pub mod relay;
pub mod rogue;
pub mod swarm;
pub mod testbed;
pub mod upstream;

use proxy_certs::DevPki;

pub use apiserver::FakeApiServer;
pub use client::{ConnectReply, connect, get_via_proxy};
pub use procs::{AgentProc, ServerProc};
pub use testbed::{Testbed, TestbedBuilder};

/// A temporary folder with a PKI for `clusters`; removed when dropped. Most tests get theirs
/// through [`Testbed`].
#[derive(Debug)]
pub struct Bed {
    /// Keeps the folder alive.
    pub dir: tempfile::TempDir,
    /// The certificates.
    pub pki: DevPki,
}

impl Bed {
    /// A fresh PKI for `clusters`.
    pub fn new(clusters: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = proxy_certs::write_dev_pki(dir.path(), clusters).expect("PKI");
        Self { dir, pki }
    }
}

/// Polls `check` every 20 ms until it holds; panics naming `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
