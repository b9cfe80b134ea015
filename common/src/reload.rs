//! Values built from files (certificates, keys, CAs, the auth policy) that are rebuilt when a
//! file changes or on SIGHUP, without a restart. New connections use the new value; existing ones
//! keep what they started with. A file that fails to load keeps the previous value, and the
//! reason is logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{BoxError, chain};

/// How often watched files are checked. Polling metadata is cheap and, unlike inotify, sees the
/// atomic symlink swap Kubernetes uses to update mounted Secrets.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(500);

type Builder<T> = Arc<dyn Fn() -> Result<T, BoxError> + Send + Sync>;

/// A value built from files, swapped atomically when they change.
pub struct Reloadable<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    build: Builder<T>,
    value: Arc<ArcSwap<T>>,
}

impl<T> Clone for Reloadable<T> {
    fn clone(&self) -> Self {
        Self {
            what: self.what,
            files: self.files.clone(),
            build: self.build.clone(),
            value: self.value.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

#[derive(PartialEq, Eq, Clone, Debug)]
struct Fingerprint(Vec<Option<(SystemTime, u64, u64)>>);

fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    Fingerprint(
        files
            .iter()
            .map(|f| {
                std::fs::metadata(f).ok().map(|m| {
                    (
                        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        m.len(),
                        m.ino(),
                    )
                })
            })
            .collect(),
    )
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Builds the first value; an error here is a configuration error.
    pub fn load<E, F>(what: &'static str, files: Vec<PathBuf>, build: F) -> Result<Self, E>
    where
        E: std::error::Error + Send + Sync + 'static,
        F: Fn() -> Result<T, E> + Send + Sync + 'static,
    {
        let first = build()?;
        Ok(Self {
            what,
            files,
            build: Arc::new(move || build().map_err(BoxError::from)),
            value: Arc::new(ArcSwap::from_pointee(first)),
        })
    }

    /// The current value.
    pub fn current(&self) -> Arc<T> {
        self.value.load_full()
    }

    /// Rebuilds now; keeps the old value on failure. Returns whether it changed.
    pub fn reload(&self) -> bool {
        match (self.build)() {
            Ok(value) => {
                self.value.store(Arc::new(value));
                tracing::info!(what = self.what, files = ?self.files, "reloaded");
                true
            }
            Err(err) => {
                tracing::warn!(what = self.what, err = %chain(&*err), "reload failed; keeping the previous version");
                false
            }
        }
    }

    /// Watches the files until `shutdown`, rebuilding when one changes or `trigger` changes.
    ///
    /// The checks and the rebuild read files, so they run on the blocking pool: the agent runs
    /// on one thread, and a slow mount would otherwise hold up every tunnel on it.
    pub fn spawn_watcher(&self, mut trigger: Trigger, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut last = this.fingerprint().await;
            let mut signals = true;
            loop {
                // A watch channel remembers a signal that came while this loop was busy.
                let forced = tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = trigger.changed(), if signals => {
                        // Its sender gone, the trigger never fires again: poll only.
                        signals = changed.is_ok();
                        signals
                    }
                    () = tokio::time::sleep(RELOAD_INTERVAL) => false,
                };
                let Some(now) = this.fingerprint().await else {
                    continue;
                };
                if forced || Some(&now) != last.as_ref() {
                    // A failed attempt is not retried until the files change again, so a bad
                    // file is logged once, not every interval.
                    let rebuild = this.clone();
                    let _ = tokio::task::spawn_blocking(move || rebuild.reload()).await;
                    last = Some(now);
                }
            }
        });
    }

    /// The files' fingerprint, read on the blocking pool; `None` if that pool is gone (the
    /// runtime is shutting down).
    async fn fingerprint(&self) -> Option<Fingerprint> {
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || fingerprint(&files))
            .await
            .ok()
    }
}

/// Changes on every SIGHUP; clone one per watcher.
pub type Trigger = watch::Receiver<u64>;

/// A trigger that changes on every SIGHUP, for [`Reloadable::spawn_watcher`]. Its task ends
/// once every clone is gone (the watchers stopped), so it does not outlive the server or agent
/// that asked for it.
pub fn sighup_trigger() -> std::io::Result<Trigger> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        break;
                    }
                    tracing::info!("SIGHUP: reloading certificates and policy");
                    tx.send_modify(|n| *n += 1);
                }
                () = tx.closed() => break,
            }
        }
    });
    Ok(rx)
}
