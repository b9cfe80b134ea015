//! A hand-driven gRPC agent for attacking the server with out-of-protocol behaviour: it holds a
//! valid agent certificate but sends whatever the test asks.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use proxy_certs::DevPki;
use proxy_proto::tunnel_client::TunnelClient;
use proxy_proto::{AgentMessage, Register, ServerMessage, agent_message};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

/// A raw mTLS connection to `server` with the agent certificate of `cert_cluster`, for tests that
/// speak HTTP/2 frames by hand.
pub async fn tls_connect(
    pki: &DevPki,
    cert_cluster: &str,
    server: SocketAddr,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let identity = proxy_common::tls::CertKeyPaths {
        cert: pki.agent_cert(cert_cluster),
        key: pki.agent_key(cert_cluster),
    };
    let tls = Arc::new(proxy_common::tls::mtls_client_config(
        &identity,
        &pki.server_ca(),
    )?);
    let tcp = TcpStream::connect(server).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(TlsConnector::from(tls).connect(name, tcp).await?)
}

/// An mTLS gRPC client to `server` with the agent certificate of `cert_cluster`.
pub async fn client(
    pki: &DevPki,
    cert_cluster: &str,
    server: SocketAddr,
) -> anyhow::Result<TunnelClient<Channel>> {
    let (pki, cluster) = (pki.clone(), cert_cluster.to_owned());
    let connector = tower::service_fn(move |_| {
        let (pki, cluster) = (pki.clone(), cluster.clone());
        async move {
            let tls = tls_connect(&pki, &cluster, server)
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{server}"))?
        .connect_with_connector(connector)
        .await?;
    Ok(TunnelClient::new(channel))
}

/// The register message for `cluster`.
pub fn register(cluster: &str, agent_id: &str) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Register(Register {
            cluster: cluster.into(),
            agent_id: agent_id.into(),
            version: "rogue".into(),
            ..Default::default()
        })),
    }
}

/// Opens a control stream whose first messages are `first`; returns the sender for more and the
/// server's stream (or its refusal).
pub async fn control(
    client: &mut TunnelClient<Channel>,
    first: Vec<AgentMessage>,
) -> Result<(mpsc::Sender<AgentMessage>, Streaming<ServerMessage>), tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    for m in first {
        tx.send(m).await.expect("queue");
    }
    let resp = client.control(ReceiverStream::new(rx)).await?;
    Ok((tx, resp.into_inner()))
}
