//! Tracing setup: `RUST_LOG` filter (default `info`), text or JSON lines on stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Most log lines held for a slow stderr before new ones are dropped (and counted): about 3 MB
/// of typical lines.
const BUFFERED_LINES: usize = 10_000;

/// Counts the lines dropped because stderr was not read fast enough; set by [`init`].
static DROPPED: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// The log thread's guard, until [`flush`] takes it.
static GUARD: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Writes what the log thread still holds when dropped (see [`flush`]). Returned by [`init`]:
/// keep it until exit.
#[derive(Debug)]
#[must_use = "dropping it at once would stop the log thread"]
pub struct LogFlush(());

impl Drop for LogFlush {
    fn drop(&mut self) {
        flush();
    }
}

/// Lets the log thread write what it holds, then stops it; later lines are lost. For exits
/// that skip destructors (`std::process::exit`) as well as the normal one.
///
/// Waiting for the thread (up to about a second when stderr is stalled, after which
/// tracing-appender reports the failure on stdout) happens on a thread of its own, given two
/// seconds: a stalled stderr, or a closed stdout that makes that report panic, costs at most the
/// wait, never the exit status.
pub fn flush() {
    let guard = GUARD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let Some(guard) = guard else {
        return;
    };
    let (done, finished) = std::sync::mpsc::channel();
    let waiting = std::thread::Builder::new()
        .name("proxy-log-flush".into())
        .spawn(move || {
            drop(guard);
            let _ = done.send(());
        });
    // If the thread cannot start, the guard was dropped with the closure: already flushed.
    if waiting.is_ok() {
        let _ = finished.recv_timeout(std::time::Duration::from_secs(2));
    }
}

/// Installs the global subscriber. Logs go to stderr; stdout is kept for the machine-readable
/// startup line the binaries print.
///
/// Lines are written by a thread of their own (`proxy-log`), never by the threads that carry
/// tunnels: a connection's close is logged at `info`, and a synchronous write to a stderr whose
/// reader stalls (a log collector behind, a full pipe) would stop every tunnel on that thread.
/// When [`BUFFERED_LINES`] are waiting, further lines are dropped and counted
/// ([`DroppedLines`]). Keep the returned guard until exit: dropping it writes what is buffered.
pub fn init(format: LogFormat) -> LogFlush {
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("proxy-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    *GUARD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(guard);
    LogFlush(())
}

/// A Prometheus counter of the log lines dropped because stderr was not read fast enough (see
/// [`init`]), under the name given (without `_total`).
#[derive(Debug)]
pub struct DroppedLines(pub &'static str);

impl prometheus_client::collector::Collector for DroppedLines {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let dropped = DROPPED.get().map_or(0, |c| c.dropped_lines() as u64);
        let counter = prometheus_client::metrics::counter::ConstCounter::new(dropped);
        let metric = encoder.encode_descriptor(
            self.0,
            "Log lines dropped because stderr was not read fast enough (logging never blocks a \
             tunnel: lines are written by a thread of their own)",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}
