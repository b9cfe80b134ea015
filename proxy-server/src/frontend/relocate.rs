//! The relocate step: an admitted client moves to the shard its agent lives on, so its tunnel's
//! every wake-up lands on the thread that runs the agent's connection (see [`crate::shards`]).
//! Plain and TLS clients take the same way: a plain client's socket moves as it is, a TLS
//! client's under its TLS state, which stays as it is (see [`Relocate`]).

use std::future::Future;
use std::pin::Pin;

use proxy_common::pump::LocalSocket;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::{Admitted, Client};
use crate::shards::Relocate;

impl Client {
    /// Hands `client` and its tunnel to its agent's shard, when that is not the one this task
    /// runs on (`None`); else returns the tunnel, to be run here.
    ///
    /// Not `async`, and the tunnel it returns is boxed: the task that awaits it keeps room for a
    /// pointer. An `async` step would keep room for its `client`, and the TLS arm's (rustls'
    /// state, over 4 KB) would size the task of every plain client as well (measured: 9.9
    /// instead of 5.4 KiB per idle connection).
    pub(super) fn relocate<S>(
        mut self,
        client: S,
        admitted: Admitted,
    ) -> Option<Pin<Box<impl Future<Output = ()>>>>
    where
        S: Relocate + AsyncRead + AsyncWrite + LocalSocket + Unpin + Send + 'static,
    {
        match admitted.agent.home().cloned() {
            Some(home) if self.shard.as_ref() != Some(&home) => {
                let (tracker, span) = (self.tracker.clone(), tracing::Span::current());
                home.clone().spawn_moved(&tracker, client, move |client| {
                    self.shard = Some(home);
                    self.tunnel(client, admitted).instrument(span)
                });
                None
            }
            _ => Some(Box::pin(self.tunnel(client, admitted))),
        }
    }
}
