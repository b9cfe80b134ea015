//! The open step: the admitted client's agent dials its upstream (or hands over a warm stream;
//! see `dial`) while the client is watched for leaving, and the client is told `200` only once
//! the upstream connection exists.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Frontend;
use super::admit::Admitted;
use super::dial::Dialed;
use super::refusal::ESTABLISHED;
use crate::metrics::{ClusterLabel, Outcome};

/// A client whose tunnel is open (`200` sent): what carrying it needs.
pub(super) struct Opened<S> {
    pub(super) client: S,
    /// What the client sent after its head, before its `200`: forwarded first.
    pub(super) early: BytesMut,
    pub(super) dialed: Dialed,
    pub(super) cluster: String,
    /// When its request began (after TLS).
    pub(super) started: Instant,
    /// How long the tunnel took to open.
    pub(super) connect_time: Duration,
}

impl Frontend {
    /// Has the admitted client's agent dial (or hand over a warm stream), and answers `200`.
    /// `None`: the connection ended (counted and logged).
    pub(super) async fn open<S>(&self, mut client: S, admitted: Admitted) -> Option<Opened<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Admitted {
            mut early,
            cluster,
            destination,
            agent,
            started,
        } = admitted;
        let label = self.metric_label(&cluster);
        let dial = self.dial(agent, &cluster, destination.as_deref());
        let dialed = match self.watching(&mut client, &mut early, label, dial).await? {
            Ok(dialed) => dialed,
            Err(refusal) => {
                if matches!(refusal.outcome, Outcome::DialFailed | Outcome::DialTimeout) {
                    self.clusters.record_dial(&cluster, Err(&refusal.reason));
                }
                // Read again, not reused: the dial may have seen the cluster's last agent
                // leave.
                self.refuse(client, self.metric_label(&cluster), refusal)
                    .await;
                return None;
            }
        };
        let connect_time = started.elapsed();
        self.reply_established(&mut client, &cluster, dialed.warm, connect_time)
            .await
            .then_some(Opened {
                client,
                early,
                dialed,
                cluster,
                started,
                connect_time,
            })
    }

    /// Tells the client its tunnel is open, and counts the connection: only once the `200` is
    /// out, as a tunnel the client never got is not an `ok`. False if the client left first
    /// (counted and logged). The dial itself succeeded either way, so its time is recorded
    /// first: a client that reads the status page right after its `200` sees its dial.
    async fn reply_established<S: AsyncWrite + Unpin>(
        &self,
        client: &mut S,
        cluster: &str,
        warm: bool,
        connect_time: Duration,
    ) -> bool {
        self.clusters.record_dial(cluster, Ok(connect_time));
        self.metrics
            .dial_duration
            .get_or_create(&ClusterLabel {
                cluster: cluster.to_owned(),
            })
            .observe(connect_time.as_secs_f64());
        // Flushed: over TLS the record may otherwise wait in rustls for a socket that was not
        // writable yet (one just moved to its shard's reactor is not, until its first event).
        let sent = async {
            client.write_all(ESTABLISHED).await?;
            client.flush().await
        };
        if let Err(err) = sent.await {
            self.metrics.count(cluster, Outcome::ClientLeft);
            tracing::info!(
                outcome = Outcome::ClientLeft.label(),
                %err,
                "client left before the tunnel was established"
            );
            return false;
        }
        self.metrics.count(cluster, Outcome::Ok);
        if warm {
            self.metrics.warm_connects.inc();
        }
        true
    }
}
