//! Shards: threads that each run a single-threaded runtime, where agent connections live together
//! with the CONNECTs they carry.
//!
//! Why: a tunneled connection's work passes between three tasks on the server (the client's, the
//! agent connection's, and for a dial the control stream's). On a work-stealing runtime each
//! wake-up may land on another thread, and a thread hand-off (futex, context switch) costs more
//! than the work it hands over: a single-worker server set up new connections 50 % faster than the
//! default one (BENCHMARKS.md, session 18). An agent's HTTP/2 connection is one task, so its
//! traffic is bound to one thread at a time anyway; keeping the CONNECTs it carries on the same
//! thread costs no parallelism it had, and many agents spread over all shards. The one hand-off
//! left is the CONNECT's, once, when its request head names the cluster (see
//! [`Shard::spawn_moved`]).
//!
//! Agents are assigned to the shard with the fewest agents at their TCP accept; the TLS handshake
//! already runs there.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The shard threads. Dropping it tells them to stop (it does not wait); tasks still on them
/// are dropped there.
#[derive(Debug)]
pub struct Shards {
    shards: Vec<Shard>,
    stop: CancellationToken,
}

/// One shard: its runtime, and how many agents live on it. A pointer: every registered agent
/// keeps its shard.
#[derive(Debug, Clone)]
pub struct Shard(Arc<ShardInner>);

#[derive(Debug)]
struct ShardInner {
    index: usize,
    handle: Handle,
    agents: AtomicUsize,
}

/// An agent connection's place on a shard: counted there until dropped.
#[derive(Debug)]
pub struct Lease {
    shard: Shard,
}

thread_local! {
    /// The shard this thread runs, on shard threads.
    static CURRENT: RefCell<Option<Shard>> = const { RefCell::new(None) };
}

impl Shards {
    /// Starts `count` shard threads; none (`count` 0) keeps everything on the caller's runtime.
    /// If one cannot start, those already started stop again (see [`Drop`]).
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut started = Self {
            shards: Vec::with_capacity(count),
            stop: CancellationToken::new(),
        };
        for index in 0..count {
            let shard = start_one(index, started.stop.clone())?;
            started.shards.push(shard);
        }
        Ok(started)
    }

    /// A place for a new agent connection: the shard with the fewest agents. `None` without
    /// shards.
    pub fn assign(&self) -> Option<Lease> {
        let shard = self
            .shards
            .iter()
            .min_by_key(|s| s.0.agents.load(Ordering::Relaxed))?;
        shard.0.agents.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            shard: shard.clone(),
        })
    }

    /// A Prometheus gauge of the agents on each shard, read at every scrape. It holds the shards'
    /// handles, not the threads: dropping [`Shards`] still stops them.
    pub fn agents_gauge(&self) -> AgentsPerShard {
        AgentsPerShard(self.shards.clone())
    }

    /// The shard the CONNECT listener accepts on (see [`Shard::spawn_listening`]).
    pub fn first(&self) -> Option<&Shard> {
        self.shards.first()
    }

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there are none (everything runs on the main runtime).
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

/// `proxy_server_shard_agents{shard}`: agents are placed by count, so this shows how even the
/// shards are (and, beside CPU per thread, whether one carries a busy cluster alone).
#[derive(Debug)]
pub struct AgentsPerShard(Vec<Shard>);

impl prometheus_client::collector::Collector for AgentsPerShard {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        if self.0.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "proxy_server_shard_agents",
            "Agent connections on each shard thread (--shards)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for shard in &self.0 {
            let agents = shard.0.agents.load(Ordering::Relaxed);
            let gauge = prometheus_client::metrics::gauge::ConstGauge::new(
                i64::try_from(agents).unwrap_or(i64::MAX),
            );
            let labels = [("shard", shard.0.index.to_string())];
            gauge.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts shard `index`'s thread and waits for its runtime. The runtime is built and dropped on
/// that thread: built on the caller's, it would be dropped there if the thread could not start,
/// and dropping a runtime on a thread that runs async code (the server's `run`) panics.
fn start_one(index: usize, stop: CancellationToken) -> std::io::Result<Shard> {
    let (started, runtime_ready) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("proxy-shard-{index}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = started.send(Err(err));
                    return;
                }
            };
            let me = Shard(Arc::new(ShardInner {
                index,
                handle: runtime.handle().clone(),
                agents: AtomicUsize::new(0),
            }));
            CURRENT.with(|current| *current.borrow_mut() = Some(me.clone()));
            if started.send(Ok(me)).is_ok() {
                runtime.block_on(stop.cancelled());
            }
            // What is still there (only after the server's own drain) is dropped here.
            drop(runtime);
            CURRENT.with(|current| current.borrow_mut().take());
        })?;
    // A short wait, once, at startup (building a runtime takes microseconds).
    runtime_ready
        .recv()
        .map_err(|_| std::io::Error::other("shard thread ended before its runtime started"))?
}

impl Shard {
    /// The shard the calling thread runs, if it is a shard thread. Only tests ask: the code is
    /// handed its shard.
    #[cfg(test)]
    pub fn current() -> Option<Shard> {
        CURRENT.with(|current| current.borrow().clone())
    }

    /// Whether the calling thread is this shard's (for tests).
    #[cfg(test)]
    pub fn is_current(&self) -> bool {
        CURRENT.with(|current| {
            current
                .borrow()
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(&c.0, &self.0))
        })
    }

    /// Runs `task` on this shard, tracked by `tracker`.
    pub fn spawn<F>(&self, tracker: &TaskTracker, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        drop(tracker.spawn_on(task, &self.0.handle));
    }

    /// Moves `conn` to this shard and runs `task` with it there, tracked by `tracker`. Its
    /// socket is taken out of the calling runtime's reactor and registered with the shard's, so
    /// its readiness wakes the shard's thread and no other. If it cannot be moved, `task` never
    /// runs and the connection closes (logged in the caller's span, which names the connection).
    pub fn spawn_moved<C, F, Fut>(&self, tracker: &TaskTracker, conn: C, task: F)
    where
        C: Relocate + 'static,
        F: FnOnce(C) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (span, shard) = (tracing::Span::current(), self.index());
        let detached = match conn.detach() {
            Ok(detached) => detached,
            Err(err) => {
                tracing::warn!(%err, shard, "cannot move a connection to its shard");
                return;
            }
        };
        self.spawn(tracker, async move {
            let conn = match C::attach(detached) {
                Ok(conn) => conn,
                Err(err) => {
                    return span.in_scope(|| {
                        tracing::warn!(%err, shard, "cannot move a connection to its shard");
                    });
                }
            };
            task(conn).await;
        });
    }

    /// Moves `listener` to this shard and runs `serve` with it there. Its accepted sockets are
    /// then in the shard's reactor from the start, and the tasks `serve` spawns run here: a
    /// client whose agent lives on this shard is served by one thread from accept to close.
    pub fn spawn_listening<F, Fut>(
        &self,
        listener: tokio::net::TcpListener,
        serve: F,
    ) -> std::io::Result<tokio::task::JoinHandle<()>>
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = listener.into_std()?;
        Ok(self.0.handle.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => serve(listener).await,
                // The listener task ends: the server stops, saying which listener stopped.
                Err(err) => tracing::error!(%err, "cannot move a listener to its shard"),
            }
        }))
    }

    /// Index among the shards (for logs).
    pub fn index(&self) -> usize {
        self.0.index
    }
}

/// The same shard: one runtime, one thread.
impl PartialEq for Shard {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Shard {}

impl Lease {
    /// The shard.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shard.0.agents.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection that can move to another shard ([`Shard::spawn_moved`]): its socket leaves the
/// calling runtime's reactor, crosses to the shard's thread, and is registered with that
/// runtime's reactor there. Whatever sits on top of the socket travels with it as it is.
pub trait Relocate: Sized {
    /// The connection on its way, its socket in no reactor.
    type Detached: Send + 'static;

    /// Takes the socket out of the calling runtime's reactor.
    fn detach(self) -> std::io::Result<Self::Detached>;

    /// Registers the socket with the reactor of the runtime whose thread this is.
    fn attach(detached: Self::Detached) -> std::io::Result<Self>;
}

/// A plain socket (an agent's before its TLS handshake, a plain CONNECT client's) moves whole.
impl Relocate for tokio::net::TcpStream {
    type Detached = std::net::TcpStream;

    fn detach(self) -> std::io::Result<std::net::TcpStream> {
        self.into_std()
    }

    fn attach(socket: std::net::TcpStream) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(socket)
    }
}

/// A TLS client moves under its TLS state and read-ahead bytes, which cannot be taken apart and
/// rebuilt: its socket is swapped out underneath them (see [`Movable`]).
impl Relocate for tokio_rustls::server::TlsStream<proxy_common::readahead::ReadAhead<Movable>> {
    type Detached = (Self, std::net::TcpStream);

    fn detach(mut self) -> std::io::Result<Self::Detached> {
        let socket = self.get_mut().0.get_mut().detach()?;
        Ok((self, socket))
    }

    fn attach((mut stream, socket): Self::Detached) -> std::io::Result<Self> {
        stream.get_mut().0.get_mut().attach(socket)?;
        Ok(stream)
    }
}

/// What I/O on a [`Movable`] whose move failed reports.
const MOVED_AWAY: &str = "the connection's socket could not be moved to its shard";

/// A client's socket that can move to another shard's reactor under the layers on top of it
/// ([`Movable::detach`], then [`Movable::attach`] on the shard). A TLS client's stream cannot be taken apart and rebuilt (rustls' state),
/// so its socket is swapped underneath instead: without the move, the socket stayed in the
/// accepting runtime's reactor and every read by the client woke that runtime's thread
/// before the shard's.
#[derive(Debug)]
pub struct Movable(Option<tokio::net::TcpStream>);

impl Movable {
    /// `socket`, where it is now.
    pub fn new(socket: tokio::net::TcpStream) -> Self {
        Self(Some(socket))
    }

    /// Takes the socket out of its runtime's reactor, to [`Movable::attach`] it on another
    /// runtime's thread; I/O fails until then. Whatever sits on top of it (rustls' state,
    /// read-ahead bytes) stays as it is.
    pub fn detach(&mut self) -> std::io::Result<std::net::TcpStream> {
        self.0
            .take()
            .ok_or_else(|| std::io::Error::other(MOVED_AWAY))?
            .into_std()
    }

    /// Registers `socket` with the reactor of the runtime whose thread this is (a shard's, see
    /// [`Shard::spawn`]): from now on its readiness wakes that thread. Until the reactor's first
    /// event for it, the socket counts as not writable: a layer above it that buffers (rustls)
    /// holds what is written then until it is flushed, so writers on a moved socket flush (the
    /// `200`, the pump). Without that, a TLS client's `200` could wait forever.
    pub fn attach(&mut self, socket: std::net::TcpStream) -> std::io::Result<()> {
        self.0 = Some(tokio::net::TcpStream::from_std(socket)?);
        Ok(())
    }

    fn socket(&mut self) -> std::io::Result<Pin<&mut tokio::net::TcpStream>> {
        self.0
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| std::io::Error::other(MOVED_AWAY))
    }
}

impl AsyncRead for Movable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut().socket()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Movable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().socket()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().socket()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().socket()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().socket()?.poll_shutdown(cx)
    }
}

impl proxy_common::pump::LocalSocket for Movable {
    fn abort(&self) {
        if let Some(socket) = &self.0 {
            socket.abort();
        }
    }

    fn before_fin(&self) {
        if let Some(socket) = &self.0 {
            socket.before_fin();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn agents_go_to_the_least_loaded_shard_and_tasks_run_there() {
        let shards = Shards::start(2).unwrap();
        let a = shards.assign().unwrap();
        let b = shards.assign().unwrap();
        assert_ne!(a.shard().index(), b.shard().index());
        let a_index = a.shard().index();
        drop(a);
        let c = shards.assign().unwrap();
        assert_eq!(c.shard().index(), a_index, "the emptied shard is picked");
        let tracker = TaskTracker::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shard = c.shard().clone();
        c.shard().spawn(&tracker, async move {
            let _ = tx.send((shard.is_current(), Shard::current().map(|s| s.index())));
        });
        assert_eq!(rx.await.unwrap(), (true, Some(a_index)));
        assert!(Shard::current().is_none(), "the test's thread is no shard");
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn a_moved_socket_is_served_on_its_shard_with_nothing_lost() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let shards = Shards::start(1).unwrap();
        let lease = shards.assign().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (served, _) = listener.accept().await.unwrap();
        // Sent before the move: still there after it.
        client.write_all(b"ping").await.unwrap();
        let tracker = TaskTracker::new();
        let shard = lease.shard().clone();
        lease
            .shard()
            .spawn_moved(&tracker, served, move |mut socket| async move {
                assert!(shard.is_current());
                let mut buf = [0; 4];
                socket.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"ping");
                socket.write_all(b"pong").await.unwrap();
            });
        let mut buf = [0; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        tracker.close();
        tracker.wait().await;
        assert_eq!(
            client.read(&mut buf).await.unwrap(),
            0,
            "closed once its task ended"
        );
    }

    /// A socket under a read-ahead buffer (as under TLS) moves to its shard with the buffered
    /// bytes kept, and works there after the runtime it was accepted on is gone.
    #[test]
    fn a_moved_socket_keeps_its_layers_and_outlives_the_runtime_it_came_from() {
        use std::io::{Read, Write};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let shards = Shards::start(1).unwrap();
        let lease = shards.assign().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(b"hello world").unwrap();
        let accepting = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut layered = accepting.block_on(async {
            let (served, _) = listener.accept().unwrap();
            served.set_nonblocking(true).unwrap();
            let served = tokio::net::TcpStream::from_std(served).unwrap();
            let mut layered = proxy_common::readahead::ReadAhead::new(Movable::new(served));
            let mut first = [0; 5];
            layered.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"hello");
            layered
        });
        assert_eq!(layered.buffered(), 6, "the rest was read ahead");
        // And more waits in the kernel as the socket moves.
        client.write_all(b"??").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let socket = layered.get_mut().detach().unwrap();
        // Registered with this runtime still, the socket would now fail (its reactor is gone).
        drop(accepting);
        let tracker = TaskTracker::new();
        let (done, finished) = std::sync::mpsc::channel();
        lease.shard().spawn(&tracker, async move {
            layered.get_mut().attach(socket).unwrap();
            let mut rest = [0; 10];
            layered.read_exact(&mut rest).await.unwrap();
            layered.write_all(b"pong").await.unwrap();
            done.send(rest).unwrap();
        });
        client.write_all(b"!!").unwrap();
        let mut pong = [0; 4];
        client.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"pong");
        assert_eq!(&finished.recv().unwrap(), b" world??!!");
    }

    #[test]
    fn no_shards_assign_nothing() {
        let shards = Shards::start(0).unwrap();
        assert!(shards.is_empty());
        assert!(shards.assign().is_none());
    }
}
