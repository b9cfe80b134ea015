//! The root of the shutdown tree: SIGTERM or SIGINT cancels the root token; a second signal
//! exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// How long tasks may take to finish once everything was told to close (both binaries), after
/// their drain (`--shutdown-grace`) is over.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Spawns the signal watcher that cancels `root` on the first SIGTERM/SIGINT.
pub fn spawn_signal_handler(root: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown signal received; a second signal exits at once");
        root.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        // `exit` runs no destructors: the log lines still waiting are written first.
        crate::telemetry::flush();
        std::process::exit(130);
    });
    Ok(())
}

/// Tasks that must run until shutdown (a listener, the tunnel to each server): one that ends on
/// its own, by returning or by panicking, is a failure the process must not outlive, or it
/// would look alive while serving nothing.
#[derive(Debug, Default)]
pub struct Vital {
    tasks: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

/// A vital task ended before shutdown.
#[derive(Debug, thiserror::Error)]
#[error("{name} stopped unexpectedly ({how})")]
pub struct Stopped {
    /// Which task.
    pub name: &'static str,
    /// "returned", or the panic.
    pub how: String,
}

impl Vital {
    /// Runs `task`, known as `name` in errors.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits for `shutdown`; `Err` if a task ended first.
    pub async fn watch(&mut self, shutdown: &CancellationToken) -> Result<(), Stopped> {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => Ok(()),
            Some(ended) = self.tasks.join_next_with_id() => {
                let (id, how) = match ended {
                    Ok((id, ())) => (id, "returned".to_owned()),
                    Err(err) => (err.id(), err.to_string()),
                };
                let name = self.names.remove(&id).unwrap_or("a task");
                Err(Stopped { name, how })
            }
        }
    }

    /// Waits for every task to end (after they were told to).
    pub async fn join_all(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_returns_or_panics_before_shutdown_is_reported_by_name() {
        let shutdown = CancellationToken::new();
        let mut vital = Vital::default();
        vital.spawn("forever", std::future::pending());
        vital.spawn("admin listener", async {});
        let err = vital.watch(&shutdown).await.unwrap_err();
        assert_eq!((err.name, err.how.as_str()), ("admin listener", "returned"));

        vital.spawn("tunnel", async { panic!("boom") });
        let err = vital.watch(&shutdown).await.unwrap_err();
        assert_eq!(err.name, "tunnel");
        assert!(err.how.contains("panic"), "{}", err.how);
    }

    #[tokio::test]
    async fn shutdown_first_is_no_failure() {
        let shutdown = CancellationToken::new();
        let mut vital = Vital::default();
        let stop = shutdown.clone();
        vital.spawn("listener", async move { stop.cancelled().await });
        shutdown.cancel();
        vital.watch(&shutdown).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), vital.join_all())
            .await
            .unwrap();
    }
}
