//! A small TCP load balancer for the replica scenario, standing in for the one a platform team
//! puts in front of the server replicas: it accepts, picks the next backend round robin and
//! relays bytes both ways. A backend that refuses is skipped for the next one (a real load
//! balancer's redispatch), so a killed replica does not fail dials while the others are up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};

/// A running balancer; dropping it closes its listener and every relayed connection.
pub struct Balancer {
    /// Where clients connect.
    pub addr: SocketAddr,
    _stop: DropGuard,
}

/// Starts a balancer over `backends` on a free loopback port.
pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<Balancer> {
    anyhow::ensure!(!backends.is_empty(), "a balancer needs a backend");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let backends: Arc<[SocketAddr]> = backends.into();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let mut next = 0;
        loop {
            let accepted = tokio::select! {
                () = token.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((client, _)) = accepted else {
                // Out of descriptors, most likely: do not spin, let connections close.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let first = next;
            next = (next + 1) % backends.len();
            let (backends, token) = (backends.clone(), token.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = relay(client, &backends, first) => {}
                }
            });
        }
    });
    Ok(Balancer {
        addr,
        _stop: stop.drop_guard(),
    })
}

/// Connects to the backends from `first` on until one accepts, then relays until either side
/// closes. If every backend refuses, the client is closed.
async fn relay(mut client: TcpStream, backends: &[SocketAddr], first: usize) {
    for i in 0..backends.len() {
        let Ok(mut server) = TcpStream::connect(backends[(first + i) % backends.len()]).await
        else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        return;
    }
}
