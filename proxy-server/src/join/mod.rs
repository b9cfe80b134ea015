//! Agents that join with a bootstrap token instead of a certificate made by hand, and renew the
//! certificate they are given (docs/security.md, "Joining by token").
//!
//! * **Join**: an agent connects to the agent listener without a client certificate, having
//!   verified the server against the pin of its CA (the listener sends that CA, `--agent-tls-ca`,
//!   at the end of its chain). The connection is served `Join.Join` and nothing else: a token
//!   and a CSR; the token is redeemed ([`tokens`]) and a certificate issued ([`signer`]) for the
//!   token's cluster, which the CSR must name.
//! * **Renew**: an agent with a certificate asks, over its mutual-TLS connection, for a new one
//!   for the cluster of the certificate it connected with. No token.
//!
//! Both are rate-limited ([`limit`]), counted (`proxy_server_joins_total{result}`) and logged in
//! one line each, never with a secret.

pub mod command;
pub mod limit;
pub mod signer;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use proxy_common::error::chain;
use proxy_common::grpc::Frame;
use proxy_common::reload::Reloadable;
use proxy_proto::{Issued, JoinRequest, RenewRequest};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::Status;

use self::signer::Signer;
use self::tokens::{Refusal, TokenFile};

/// Flags of joining and renewing.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    /// Let agents join with a bootstrap token from this file, made by `proxy-server token create`
    /// (the server counts uses down in it, so it must be writable). Needs --agent-signer-cert,
    /// --agent-signer-key and --agent-tls-ca.
    #[arg(
        long,
        env = "PROXY_SERVER_JOIN_TOKENS",
        requires_all = ["agent_signer_cert", "agent_tls_ca"]
    )]
    pub join_tokens: Option<PathBuf>,
    /// CA certificate (PEM) that signs the certificates of joining and renewing agents: the
    /// --agent-ca itself, or better an intermediate CA under it (docs/security.md). Reloaded
    /// when it changes. Without it agents cannot renew.
    #[arg(
        long,
        env = "PROXY_SERVER_AGENT_SIGNER_CERT",
        requires = "agent_signer_key"
    )]
    pub agent_signer_cert: Option<PathBuf>,
    /// Private key (PEM) of --agent-signer-cert.
    #[arg(
        long,
        env = "PROXY_SERVER_AGENT_SIGNER_KEY",
        requires = "agent_signer_cert"
    )]
    pub agent_signer_key: Option<PathBuf>,
    /// The CA (PEM) that signed --agent-tls-cert: sent at the end of the agent listener's chain
    /// so that a joining agent finds the CA its pin (`--server-ca-hash`) names, and handed to
    /// joined agents to trust.
    #[arg(long, env = "PROXY_SERVER_AGENT_TLS_CA")]
    pub agent_tls_ca: Option<PathBuf>,
    /// Lifetime of the certificates issued to joining and renewing agents; agents renew at 70
    /// to 90 % of it.
    #[arg(long, env = "PROXY_SERVER_AGENT_CERT_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    pub agent_cert_ttl: Duration,
}

/// Joins and renewals together, each source address: at most this many attempts at once, then
/// one per [`PER_SOURCE`].
const BURST_PER_SOURCE: u32 = 5;

/// See [`BURST_PER_SOURCE`].
const PER_SOURCE: Duration = Duration::from_secs(2);

/// Joins and renewals a second for the whole server (bursts of twice as many). A fleet of
/// 10,000 agents renewing weekly needs one every minute; a fleet joining at once is spread by
/// the agents' retries.
const OVERALL_PER_SECOND: u32 = 20;

/// Shortest --agent-cert-ttl: agents renew at 70 % of it, and a renewal takes a round trip.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(10);

/// Longest --agent-cert-ttl.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(398 * 24 * 3600);

/// `{result}` of `proxy_server_joins_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `joined`, `renewed`, a refusal's label, `bad_csr`, `rate_limited`, `error`.
    pub result: &'static str,
}

/// What the server needs to let agents join and renew.
pub struct Joins {
    tokens: Option<TokenFile>,
    signer: Reloadable<Signer>,
    server_ca: Option<PathBuf>,
    limiter: limit::Limiter,
    results: Family<ResultLabel, Counter>,
    /// For the HTTP/2 handshake and the one request of a joining connection.
    timeout: Duration,
}

impl std::fmt::Debug for Joins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joins")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// Why the join flags are unusable.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum JoinConfigError {
    #[error(transparent)]
    Signer(#[from] signer::SignerError),
    #[error("--join-tokens")]
    Tokens(#[from] tokens::TokenFileError),
    #[error("--agent-cert-ttl {0:?}: must be between 10s and 398 days")]
    Ttl(Duration),
}

impl Joins {
    /// From the flags: `None` when no signer is configured (agents neither join nor renew).
    /// `agent_ca` is `--agent-ca`, which every issued certificate must verify under.
    pub fn from_args(
        args: &JoinArgs,
        agent_ca: &std::path::Path,
        timeout: Duration,
    ) -> Result<Option<Arc<Self>>, JoinConfigError> {
        let (Some(cert), Some(key)) = (&args.agent_signer_cert, &args.agent_signer_key) else {
            return Ok(None);
        };
        if !(MIN_CERT_TTL..=MAX_CERT_TTL).contains(&args.agent_cert_ttl) {
            return Err(JoinConfigError::Ttl(args.agent_cert_ttl));
        }
        let (cert, key, agent_ca, ttl) = (
            cert.clone(),
            key.clone(),
            agent_ca.to_owned(),
            args.agent_cert_ttl,
        );
        let files = vec![cert.clone(), key.clone(), agent_ca.clone()];
        let signer = Reloadable::load("agent signer", files, move || {
            Signer::load(&cert, &key, &agent_ca, ttl)
        })?;
        let tokens = args.join_tokens.as_deref().map(TokenFile::new);
        if let Some(tokens) = &tokens {
            // Refused at start rather than at the first join.
            tokens.read()?;
        }
        Ok(Some(Arc::new(Self {
            tokens,
            signer,
            server_ca: args.agent_tls_ca.clone(),
            limiter: limit::Limiter::new(OVERALL_PER_SECOND, BURST_PER_SOURCE, PER_SOURCE),
            results: Family::default(),
            timeout,
        })))
    }

    /// Whether agents may join by token (certless connections are then served).
    pub fn accepts_joins(&self) -> bool {
        self.tokens.is_some()
    }

    /// The signer, to watch for changes.
    pub fn signer(&self) -> &Reloadable<Signer> {
        &self.signer
    }

    /// `proxy_server_joins_total`, to register.
    pub fn results(&self) -> Family<ResultLabel, Counter> {
        self.results.clone()
    }

    fn count(&self, result: &'static str) {
        self.results.get_or_create(&ResultLabel { result }).inc();
    }

    fn server_ca_pem(&self) -> Vec<u8> {
        self.server_ca
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .unwrap_or_default()
    }

    fn limited(&self, addr: SocketAddr) -> Result<(), Status> {
        self.limiter.check(addr.ip()).map_err(|which| {
            self.count("rate_limited");
            tracing::warn!(agent.addr = %addr, limit = ?which, "join or renewal refused: rate limited");
            Status::resource_exhausted(match which {
                limit::Limited::Source => "too many join or renewal attempts from this address; retry later",
                limit::Limited::Overall => "too many join or renewal attempts; retry later",
            })
        })
    }

    /// Serves a connection that came without a client certificate: `Join.Join`, once.
    pub async fn serve_joiner<IO>(self: Arc<Self>, io: IO, addr: SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let handshake = h2::server::Builder::new()
            .max_concurrent_streams(1)
            .max_header_list_size(8 * 1024)
            .handshake::<_, Frame>(io);
        let mut h2 = match tokio::time::timeout(self.timeout, handshake).await {
            Ok(Ok(h2)) => h2,
            _ => {
                tracing::debug!(agent.addr = %addr, "joining agent's HTTP/2 handshake failed");
                return;
            }
        };
        let Ok(Some(Ok((request, respond)))) =
            tokio::time::timeout(self.timeout, h2.accept()).await
        else {
            return;
        };
        let this = self.clone();
        let answer = async move {
            if request.uri().path() != proxy_proto::JOIN_PATH {
                tracing::warn!(agent.addr = %addr, path = request.uri().path(), "refused a call without a client certificate");
                return proxy_common::grpc::refuse(
                    respond,
                    &Status::unauthenticated(
                        "a client certificate is required (without one, an agent may only join)",
                    ),
                );
            }
            let result = match this.limited(addr) {
                Ok(()) => {
                    match proxy_common::unary::request::<JoinRequest>(
                        request.into_body(),
                        this.timeout,
                    )
                    .await
                    {
                        Ok(req) => this.join(req, addr).await,
                        Err(status) => Err(status),
                    }
                }
                Err(status) => Err(status),
            };
            proxy_common::unary::answer(respond, result);
        };
        // The connection is driven (by `accept`) while the request is read and answered: its
        // body and the answer travel only while it is polled. Once answered, it is closed.
        let mut answer = std::pin::pin!(answer);
        let mut answered = false;
        let serve = async {
            loop {
                tokio::select! {
                    () = &mut answer, if !answered => {
                        answered = true;
                        h2.graceful_shutdown();
                    }
                    next = h2.accept() => match next {
                        // The one stream allowed is taken: nothing else is served here.
                        Some(Ok((_, respond))) => proxy_common::grpc::refuse(
                            respond,
                            &Status::resource_exhausted("one call per joining connection"),
                        ),
                        _ => break,
                    },
                }
            }
        };
        let _ = tokio::time::timeout(self.timeout * 2, serve).await;
    }

    async fn join(&self, req: JoinRequest, addr: SocketAddr) -> Result<Issued, Status> {
        let Some(tokens) = self.tokens.clone() else {
            return Err(Status::unimplemented(
                "this server does not take join tokens",
            ));
        };
        let token_id = tokens::split(&req.token)
            .map_or("(malformed)", |(id, _)| id)
            .to_owned();
        let csr = signer::parse_csr(&req.csr).map_err(|err| {
            self.count("bad_csr");
            tracing::warn!(agent.addr = %addr, token.id = %token_id, %err, "join refused");
            Status::invalid_argument(err.to_string())
        })?;
        let asked = signer::subject_cn(&csr).filter(|cn| !cn.is_empty());
        // File IO under a lock `token create` may hold: off the runtime's threads.
        let redeemed = tokio::task::spawn_blocking(move || {
            tokens.redeem(&req.token, asked.as_deref(), SystemTime::now())
        })
        .await
        .map_err(|err| Status::internal(format!("redeeming the token: {err}")))?;
        let cluster = match redeemed {
            Ok(Ok(cluster)) => cluster,
            Ok(Err(refusal)) => {
                self.count(refusal.label());
                tracing::warn!(agent.addr = %addr, token.id = %token_id, reason = %refusal, "join refused");
                return Err(match refusal {
                    Refusal::OtherCluster => Status::permission_denied(refusal.to_string()),
                    _ => Status::unauthenticated(refusal.to_string()),
                });
            }
            Err(err) => {
                self.count("error");
                tracing::error!(agent.addr = %addr, token.id = %token_id, err = %chain(&err), "join failed: the token file cannot be used");
                return Err(Status::internal(
                    "the server cannot read its join tokens; see its log",
                ));
            }
        };
        let issued = self.issue(&csr, &cluster, addr)?;
        self.count("joined");
        tracing::info!(agent.addr = %addr, token.id = %token_id, cluster, "agent joined");
        Ok(issued)
    }

    fn issue(
        &self,
        csr: &rcgen::CertificateSigningRequestParams,
        cluster: &str,
        addr: SocketAddr,
    ) -> Result<Issued, Status> {
        let chain = self.signer.current().issue(csr, cluster).map_err(|err| {
            self.count("bad_csr");
            tracing::warn!(agent.addr = %addr, cluster, %err, "certificate request refused");
            Status::invalid_argument(err.to_string())
        })?;
        Ok(Issued {
            certificate_chain: chain.into_bytes(),
            server_ca: self.server_ca_pem(),
        })
    }

    /// Answers `Join.Renew` on an agent's connection, whose certificate says it is `cluster`,
    /// in a task of `tasks`.
    pub fn renew(
        self: &Arc<Self>,
        cluster: &str,
        addr: SocketAddr,
        offered: proxy_common::grpc::Offered,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        let this = self.clone();
        let cluster = cluster.to_owned();
        let (body, respond) = offered.into_parts();
        tasks.spawn(async move {
            let result = async {
                this.limited(addr)?;
                let req = proxy_common::unary::request::<RenewRequest>(body, this.timeout).await?;
                let csr = signer::parse_csr(&req.csr).map_err(|err| {
                    this.count("bad_csr");
                    tracing::warn!(agent.addr = %addr, cluster, %err, "renewal refused");
                    Status::invalid_argument(err.to_string())
                })?;
                let issued = this.issue(&csr, &cluster, addr)?;
                this.count("renewed");
                tracing::info!(agent.addr = %addr, cluster, "agent certificate renewed");
                Ok(issued)
            }
            .await;
            proxy_common::unary::answer(respond, result);
        });
    }
}
