//! Test harness for the end-to-end tests: a PKI made for the test, fake member API servers,
//! plain TCP upstreams, and the real binaries as child processes.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod client;
pub mod data;
pub mod procs;
pub mod rogue;
pub mod upstream;

use proxy_certs::DevPki;

pub use apiserver::FakeApiServer;
pub use client::{ConnectReply, connect, get_via_proxy};
pub use procs::{AgentProc, ServerProc};

/// A temporary folder with a PKI for `clusters`; removed when dropped.
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
