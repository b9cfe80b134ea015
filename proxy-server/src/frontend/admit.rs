//! The admit step: TLS (when configured) and the request head under the admission's one
//! deadline, the cluster the head names (at a port this server serves), who the client is and
//! whether it may reach that cluster (see `authorize`), and an agent of the cluster picked for it
//! (waiting for one, see `--agent-wait`).

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use http::StatusCode;
use proxy_common::reload::Reloadable;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::Frontend;
use super::refusal::{Refusal, refusal_for};
use crate::connect::{self, ConnectRequest, RequestError};
use crate::metrics::Outcome;

/// A client's admission: its place in the gate until its head is read, and the one deadline
/// for its TLS handshake and head.
pub(super) struct Admission {
    pub(super) ticket: proxy_common::gate::Ticket,
    pub(super) deadline: tokio::time::Instant,
}

/// A client's connection over TLS.
type FrontendTls =
    tokio_rustls::server::TlsStream<proxy_common::readahead::ReadAhead<crate::shards::Movable>>;

/// A client whose request was read and authorized, and the agent picked for it.
pub(super) struct Admitted {
    /// What the client sent after its head: forwarded first.
    pub(super) early: BytesMut,
    pub(super) cluster: String,
    /// What the client asked the agent to dial (`Proxy-Destination`); `None`: its upstream.
    pub(super) destination: Option<String>,
    pub(super) agent: Arc<crate::registry::AgentHandle>,
    /// When its request began (after TLS).
    pub(super) started: Instant,
}

impl Frontend {
    /// The TLS handshake, under the admission deadline: the stream and the client
    /// certificate's common name. `None`: it failed, timed out, or the client was evicted
    /// (logged).
    pub(super) async fn handshake(
        &self,
        tls: &Reloadable<rustls::ServerConfig>,
        tcp: TcpStream,
        admission: &Admission,
    ) -> Option<(FrontendTls, Option<String>)> {
        let acceptor = TlsAcceptor::from(tls.current());
        let accept = acceptor.accept(proxy_common::readahead::ReadAhead::new(
            crate::shards::Movable::new(tcp),
        ));
        let accepted = tokio::select! {
            res = tokio::time::timeout_at(admission.deadline, accept) => res,
            () = admission.ticket.evicted().cancelled() => {
                self.evicted();
                return None;
            }
        };
        match accepted {
            Ok(Ok(stream)) => {
                let cn = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(proxy_common::tls::common_name);
                Some((stream, cn))
            }
            Ok(Err(err)) => {
                tracing::info!(%err, "frontend TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::info!("frontend TLS handshake timed out");
                None
            }
        }
    }

    /// Reads the client's head, the cluster it names and who it is, and picks an agent of the
    /// cluster (waiting for one, see `--agent-wait`). Each step that ends the connection counts
    /// and logs its outcome once. `None`: the connection ended.
    pub(super) async fn admit<S>(
        &self,
        client: &mut S,
        cert_cn: Option<String>,
        admission: Admission,
    ) -> Option<Admitted>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // After the TLS handshake, as the tunnel's open time counts from the request.
        let started = Instant::now();
        let req = match self.read_head(client, admission).await {
            Ok(Some(req)) => req,
            Ok(None) => return None,
            Err(refusal) => {
                self.refuse(client, "", refusal).await;
                return None;
            }
        };
        let cluster = self.cluster_of(&req.host);
        tracing::Span::current().record("cluster", cluster.as_str());
        if let Some(destination) = &req.destination {
            tracing::Span::current().record("destination", destination.as_str());
        }
        if let Err(refusal) = self.check_target(&req, &cluster) {
            self.refuse(client, "", refusal).await;
            return None;
        }
        let label = self.metric_label(&cluster);
        let identity = match self.authorize(&req, cert_cn.as_deref(), &cluster) {
            Ok(identity) => identity,
            Err(refusal) => {
                self.refuse(client, label, refusal).await;
                return None;
            }
        };
        tracing::Span::current().record("identity", identity.as_str());
        let mut early = BytesMut::from(&req.leftover[..]);
        let destination = req.destination;
        let picked = self
            .watching(client, &mut early, label, self.pick_agent(&cluster))
            .await?;
        match picked {
            Ok(agent) => Some(Admitted {
                early,
                cluster,
                destination,
                agent,
                started,
            }),
            Err(refusal) => {
                // Read again, not reused: the pick may have waited for the cluster's first
                // agent.
                self.refuse(client, self.metric_label(&cluster), refusal)
                    .await;
                None
            }
        }
    }

    /// Reads the request head within the admission's deadline, then lets the admission go:
    /// what follows is bounded by the connection limits. `Ok(None)`: there is no one to answer
    /// (the client closed first, or a newer client took its place in the gate).
    async fn read_head<S: AsyncRead + Unpin>(
        &self,
        client: &mut S,
        admission: Admission,
    ) -> Result<Option<ConnectRequest>, Refusal> {
        let read = connect::read_request(client, self.limits.max_head_bytes);
        let head = tokio::select! {
            head = tokio::time::timeout_at(admission.deadline, read) => head,
            () = admission.ticket.evicted().cancelled() => {
                self.evicted();
                return Ok(None);
            }
        };
        match head {
            Ok(Ok(req)) => Ok(Some(req)),
            Ok(Err(RequestError::Closed)) => Ok(None),
            Ok(Err(err)) => Err(refusal_for(&err)),
            Err(_) => Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                Outcome::BadRequest,
                format!(
                    "request head not received within {:?}",
                    self.limits.handshake_timeout
                ),
            )),
        }
    }

    /// Whether the CONNECT names a valid cluster, at a port this server serves.
    fn check_target(&self, req: &ConnectRequest, cluster: &str) -> Result<(), Refusal> {
        if !proxy_common::is_valid_cluster_name(cluster) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest,
                format!("{:?} is not a cluster name", req.host),
            ));
        }
        if !self.connect_ports.contains(&req.port) {
            let served: Vec<String> = self.connect_ports.iter().map(u16::to_string).collect();
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest,
                format!(
                    "port {} is not served: a cluster is reached at its API server, CONNECT {cluster}:{} (ports served: {})",
                    req.port,
                    self.connect_ports[0],
                    served.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// The cluster a CONNECT host names: the host, minus the configured suffix.
    fn cluster_of(&self, host: &str) -> String {
        match &self.cluster_suffix {
            Some(suffix) => host
                .strip_suffix(suffix.as_str())
                .unwrap_or(host)
                .to_owned(),
            None => host.to_owned(),
        }
    }

    /// A newer client took this one's place in the gate before it sent its head.
    fn evicted(&self) {
        self.metrics.handshake_limited("frontend");
        tracing::debug!(
            "closed before its request head: the handshake gate was full (see --max-handshakes)"
        );
    }
}

#[cfg(test)]
mod tests {
    //! The admit step over an in-memory pipe: the client writes into one end of a
    //! `tokio::io::duplex`, the step reads the other, and what it answers comes back on the
    //! first. The clock is paused: deadlines pass as soon as everything waits.

    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::{FrontendAuth, Limits};
    use crate::fleet::{CountSource, Fleet};
    use crate::metrics::Metrics;
    use crate::registry::{AgentHandle, AgentInfo, Clusters, Features, Registration};

    const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

    fn frontend(auth: FrontendAuth) -> Frontend {
        let limits = Limits {
            handshake_timeout: HEAD_TIMEOUT,
            max_head_bytes: 8192,
            max_handshakes: 16,
            max_connections: 16,
            max_connections_per_cluster: 16,
            max_pending_dials: 16,
            max_buffered: u64::MAX,
            max_agents_per_cluster: 16,
            down_retention: Duration::from_secs(600),
        };
        let metrics = Arc::new(Metrics::new(
            &mut prometheus_client::registry::Registry::default(),
        ));
        Frontend {
            clusters: Arc::new(Clusters::new(limits, metrics.clone())),
            metrics,
            tls: None,
            auth,
            limits,
            dial_timeout: Duration::from_secs(5),
            agent_wait: Duration::ZERO,
            keepalive: None,
            fleet: Arc::new(Fleet::new(
                "server-0".to_owned(),
                CountSource::Fixed(1),
                Duration::ZERO,
            )),
            cluster_suffix: Some(".clusters.local".to_owned()),
            connect_ports: vec![443],
            gate: proxy_common::gate::Gate::new(16),
        }
    }

    /// An agent `id` of `cluster`, registered while the registration is held.
    fn register(frontend: &Frontend, cluster: &str, id: &str) -> Registration {
        let (control, _) = crate::registry::control::channel(8);
        let info = AgentInfo {
            cluster: cluster.to_owned(),
            agent_id: id.to_owned(),
            version: "test".to_owned(),
            conn_id: 1,
            addr: ([127, 0, 0, 1], 1).into(),
            connected_at: SystemTime::now(),
            upstream_ca: None,
            upstream_server_name: None,
            features: Features::default(),
        };
        let budget = proxy_common::flow::Budget::new(1 << 20);
        let agent = AgentHandle::new(info, control, CancellationToken::new(), budget, None);
        frontend.clusters.register(agent).unwrap()
    }

    /// Admits a client that sent `sent` and then waits with its end open: what the step decided,
    /// and what the client was answered.
    async fn admit(frontend: &Frontend, sent: &[u8]) -> (Option<Admitted>, String) {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(sent).await.unwrap();
        let admission = Admission {
            ticket: frontend.gate.admit().await,
            deadline: tokio::time::Instant::now() + HEAD_TIMEOUT,
        };
        let admitted = frontend.admit(&mut server, None, admission).await;
        drop(server);
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        (admitted, answer)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_is_admitted_with_its_cluster_its_agent_and_what_it_sent_after_its_head() {
        let frontend = frontend(FrontendAuth::Open);
        let _alpha = register(&frontend, "alpha", "alpha-1");
        let (admitted, answer) = admit(
            &frontend,
            b"CONNECT alpha.clusters.local:443 HTTP/1.1\r\nHost: alpha.clusters.local:443\r\n\r\n\x16\x03\x01",
        )
        .await;
        let admitted = admitted.expect("admitted");
        assert_eq!(admitted.cluster, "alpha", "the suffix is stripped");
        assert_eq!(admitted.agent.info.agent_id, "alpha-1");
        assert_eq!(admitted.destination, None);
        assert_eq!(&admitted.early[..], b"\x16\x03\x01", "kept, to go first");
        assert_eq!(answer, "", "nothing is answered before the dial");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_without_an_agent_is_refused_with_503_naming_it() {
        let frontend = frontend(FrontendAuth::Open);
        let (admitted, answer) = admit(
            &frontend,
            b"CONNECT gamma:443 HTTP/1.1\r\nHost: gamma:443\r\n\r\n",
        )
        .await;
        assert!(admitted.is_none());
        assert!(
            answer.starts_with("HTTP/1.1 503 no agent connected for cluster \"gamma\"\r\n"),
            "{answer}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_port_that_is_not_served_is_refused_with_400() {
        let frontend = frontend(FrontendAuth::Open);
        let _alpha = register(&frontend, "alpha", "alpha-1");
        let (admitted, answer) = admit(
            &frontend,
            b"CONNECT alpha:8443 HTTP/1.1\r\nHost: alpha:8443\r\n\r\n",
        )
        .await;
        assert!(admitted.is_none());
        assert!(
            answer.starts_with("HTTP/1.1 400 port 8443 is not served"),
            "{answer}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_method_other_than_connect_is_refused_with_405() {
        let frontend = frontend(FrontendAuth::Open);
        let (admitted, answer) = admit(&frontend, b"GET / HTTP/1.1\r\nHost: alpha\r\n\r\n").await;
        assert!(admitted.is_none());
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
        assert!(answer.contains("\r\nAllow: CONNECT\r\n"), "{answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_not_received_within_the_deadline_is_refused_with_408() {
        let frontend = frontend(FrontendAuth::Open);
        let started = tokio::time::Instant::now();
        let (admitted, answer) = admit(&frontend, b"CONNECT alpha:443 HTTP/1.1\r\n").await;
        assert!(admitted.is_none());
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert_eq!(started.elapsed(), HEAD_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_without_the_certificate_required_is_refused_with_407() {
        let frontend = frontend(FrontendAuth::CertificateRequired);
        let _alpha = register(&frontend, "alpha", "alpha-1");
        let (admitted, answer) = admit(
            &frontend,
            b"CONNECT alpha:443 HTTP/1.1\r\nHost: alpha:443\r\n\r\n",
        )
        .await;
        assert!(admitted.is_none());
        assert!(
            answer.starts_with("HTTP/1.1 407 a client certificate is required\r\n"),
            "{answer}"
        );
        assert!(answer.contains("\r\nProxy-Authenticate: "), "{answer}");
    }
}
