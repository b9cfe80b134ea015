//! [`Testbed`]: the PKI, one proxy-server and its registered agents, declared in one expression
//! instead of the `Bed::new` / `ServerProc::start` / `AgentProc::start_ready` preamble.
//!
//! ```no_run
//! # async fn demo(up: std::net::SocketAddr) {
//! use integration_tests::Testbed;
//! let bed = Testbed::builder(&["alpha", "beta"])
//!     .server_args(&["--dial-timeout", "1s"])
//!     .member("alpha")
//!     .agent("beta", up)
//!     .agent_args(&integration_tests::procs::NO_WARM)
//!     .start()
//!     .await;
//! let _ = (bed.frontend(), bed.server.admin_addr, bed.pki(), &bed.agents[1]);
//! # }
//! ```
//!
//! Anything unusual (a server restarted on its port, an agent that is not expected to register,
//! an agent dialing through a relay) stays explicit in the test, using [`Testbed::pki`] and
//! `bed.server` where it has a test bed at all.

use std::net::SocketAddr;
use std::path::Path;

use proxy_certs::DevPki;

use crate::upstream::BannerServer;
use crate::{AgentProc, Bed, FakeApiServer, ServerProc};

/// What a declared agent dials.
#[derive(Debug)]
enum Upstream {
    /// A [`FakeApiServer`] of the agent's cluster, started just before the agent.
    Api,
    /// A [`BannerServer`] with this banner, started just before the agent.
    Banner(String),
    /// An upstream the test runs itself.
    Addr(SocketAddr),
}

#[derive(Debug)]
struct AgentSpec {
    cluster: String,
    upstream: Upstream,
    args: Vec<String>,
}

/// A test bed being declared: made by [`Testbed::builder`], started by
/// [`TestbedBuilder::start`]. The PKI exists from the start (so flags and files can name its
/// certificates and folder); nothing runs before `start`.
#[derive(Debug)]
#[must_use = "nothing runs until `start`"]
pub struct TestbedBuilder {
    bed: Bed,
    server_args: Vec<String>,
    agents: Vec<AgentSpec>,
}

impl TestbedBuilder {
    /// The certificates, already written.
    pub fn pki(&self) -> &DevPki {
        &self.bed.pki
    }

    /// The test's temporary folder (it holds the PKI and the processes' logs).
    pub fn dir(&self) -> &Path {
        self.bed.dir.path()
    }

    /// Flags for the server, after [`ServerProc::start`]'s defaults (which they may override).
    /// Called again, it adds to them.
    pub fn server_args(mut self, args: &[&str]) -> Self {
        self.server_args
            .extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// A member cluster: a [`FakeApiServer`] for `cluster`, and an agent in front of it.
    pub fn member(self, cluster: &str) -> Self {
        self.declare(cluster, Upstream::Api)
    }

    /// An agent for `cluster` in front of a [`BannerServer`] answering `banner`, started for it.
    pub fn banner_agent(self, cluster: &str, banner: &str) -> Self {
        self.declare(cluster, Upstream::Banner(banner.to_owned()))
    }

    /// An agent for `cluster` dialing `upstream`, which the test runs.
    pub fn agent(self, cluster: &str, upstream: SocketAddr) -> Self {
        self.declare(cluster, Upstream::Addr(upstream))
    }

    /// Flags for the agent declared last (by [`member`](Self::member),
    /// [`banner_agent`](Self::banner_agent) or [`agent`](Self::agent)), after the ones
    /// [`AgentProc::start`] gives every agent. Panics if no agent was declared yet.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        let agent = self
            .agents
            .last_mut()
            .expect("agent_args: declare an agent first");
        agent.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    fn declare(mut self, cluster: &str, upstream: Upstream) -> Self {
        self.agents.push(AgentSpec {
            cluster: cluster.to_owned(),
            upstream,
            args: Vec::new(),
        });
        self
    }

    /// Starts the server and waits until it is alive (`/healthz`), then, one at a time in the
    /// order declared, each agent's upstream (if the test bed runs it) and the agent, waiting
    /// until it is registered ([`AgentProc::start_ready_with`]) before the next. Panics on any
    /// failure; an agent that does not register within 10 s panics with its log.
    pub async fn start(self) -> Testbed {
        let Self {
            bed,
            server_args,
            agents: specs,
        } = self;
        let args: Vec<&str> = server_args.iter().map(String::as_str).collect();
        let server = ServerProc::start(&bed.pki, None, &args)
            .await
            .expect("proxy-server");
        let mut agents = Vec::new();
        for spec in &specs {
            let upstream = match &spec.upstream {
                Upstream::Api => {
                    FakeApiServer::start(&bed.pki, &spec.cluster)
                        .await
                        .expect("fake API server")
                        .addr
                }
                Upstream::Banner(banner) => {
                    BannerServer::start(banner)
                        .await
                        .expect("banner upstream")
                        .addr
                }
                Upstream::Addr(addr) => *addr,
            };
            let args: Vec<&str> = spec.args.iter().map(String::as_str).collect();
            let agent = AgentProc::start_ready_with(
                &bed.pki,
                &[server.agent_addr],
                &spec.cluster,
                upstream,
                &args,
            )
            .await
            .unwrap_or_else(|err| panic!("agent for {}: {err:?}", spec.cluster));
            agents.push(agent);
        }
        Testbed {
            agents,
            server,
            bed,
        }
    }
}

/// A running test bed: a PKI in a temporary folder, one proxy-server, and the agents declared,
/// each registered. When dropped, the agents are killed first, then the server, then the folder
/// goes (the fields' order).
#[derive(Debug)]
pub struct Testbed {
    /// The declared agents, in the order declared; a test that must own one (to kill it, say)
    /// starts it with [`Testbed::start_agent`] instead.
    pub agents: Vec<AgentProc>,
    /// The server.
    pub server: ServerProc,
    /// The PKI and the folder.
    pub bed: Bed,
}

impl Testbed {
    /// Declares a test bed with a PKI for `clusters`, written at once ([`Bed::new`]); a cluster
    /// may have its certificates and no agent (a rogue's, or one never seen). No agents until
    /// declared.
    pub fn builder(clusters: &[&str]) -> TestbedBuilder {
        TestbedBuilder {
            bed: Bed::new(clusters),
            server_args: Vec::new(),
            agents: Vec::new(),
        }
    }

    /// The certificates.
    pub fn pki(&self) -> &DevPki {
        &self.bed.pki
    }

    /// The test's temporary folder.
    pub fn dir(&self) -> &Path {
        self.bed.dir.path()
    }

    /// The server's CONNECT listener, where clients go.
    pub fn frontend(&self) -> SocketAddr {
        self.server.frontend_addr
    }

    /// Starts one more agent for `cluster` dialing `upstream`, with default flags, and waits
    /// until it is registered ([`AgentProc::start_ready`]). The test owns it (to kill it, drop it
    /// or start it after something else happened): it is not added to [`Testbed::agents`].
    pub async fn start_agent(&self, cluster: &str, upstream: SocketAddr) -> AgentProc {
        AgentProc::start_ready(self.pki(), &[self.server.agent_addr], cluster, upstream)
            .await
            .unwrap_or_else(|err| panic!("agent for {cluster}: {err:?}"))
    }
}
