//! Options every TCP socket either binary accepts or dials gets, set in one place where the
//! socket is made: no Nagle delay, a bound on unsent bytes in the kernel, and a bound on how long
//! a vanished peer can hold it.

use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// TCP keepalive: after `idle` without traffic, `probes` probes `interval` apart; a peer that
/// answers none is gone and the socket fails. The same bound, as TCP_USER_TIMEOUT, ends a
/// connection whose sent data stays unacknowledged that long (keepalive probes only go out on
/// an idle connection; a client that vanished mid-download would otherwise hold its tunnel for
/// the kernel's retransmission timeout, about 15 minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the peer counts as gone.
    pub probes: u32,
}

impl Keepalive {
    /// The default: 30 s idle, then 3 probes 10 s apart, so a vanished peer is noticed within
    /// a minute (tunnels it held are freed within 90 s; docs/operating.md).
    pub const DEFAULT: Self = Self {
        idle: Duration::from_secs(30),
        interval: Duration::from_secs(10),
        probes: 3,
    };

    /// How long a vanished peer can hold a socket: idle + probes × interval.
    pub fn bound(&self) -> Duration {
        self.idle + self.interval * self.probes
    }

    /// Parses `IDLE,INTERVAL,PROBES` (e.g. `30s,10s,3`), or `off`. For clap's `value_parser`.
    pub fn parse(text: &str) -> Result<Option<Self>, String> {
        if text.trim() == "off" {
            return Ok(None);
        }
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let [idle, interval, probes] = parts[..] else {
            return Err(format!(
                "{text:?}: expected IDLE,INTERVAL,PROBES (e.g. 30s,10s,3) or off"
            ));
        };
        let duration = |what: &str, v: &str| {
            humantime::parse_duration(v)
                .map_err(|e| format!("{what} {v:?}: {e}"))
                .and_then(|d| {
                    if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
                        Err(format!("{what} {v:?} must be between 1s and 1h"))
                    } else {
                        Ok(d)
                    }
                })
        };
        let probes: u32 = probes
            .parse()
            .ok()
            .filter(|p| (1..=20).contains(p))
            .ok_or_else(|| format!("probes {probes:?} must be 1 to 20"))?;
        Ok(Some(Self {
            idle: duration("idle", idle)?,
            interval: duration("interval", interval)?,
            probes,
        }))
    }
}

/// The `--tcp-keepalive` flag: a setting, or `off` (a newtype, so clap does not read the
/// `Option` as "flag may be absent").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveFlag(pub Option<Keepalive>);

impl KeepaliveFlag {
    /// For clap's `value_parser`: see [`Keepalive::parse`].
    pub fn parse(text: &str) -> Result<Self, String> {
        Keepalive::parse(text).map(Self)
    }
}

/// Sets the socket options of a connection either binary accepted or dialed.
pub fn configure(stream: &TcpStream, keepalive: Option<Keepalive>) -> io::Result<()> {
    set_options(socket2::SockRef::from(stream), keepalive)
}

/// Most bytes any socket of ours keeps written but not yet sent (`TCP_NOTSENT_LOWAT`).
///
/// On a tunnel socket (agent ↔ server): without it the kernel takes megabytes of bulk data (send
/// buffers autotune up to `tcp_wmem` max), and on a slow uplink a dial answer, a new stream's head
/// or a pong written after them waits seconds behind it; with it our own HTTP/2 layer holds the
/// rest, where each stream takes its turn. 128 KiB is 0.13 s at 8 Mbit/s, and still keeps a LAN
/// tunnel's pipe full (bench: bulk rows).
///
/// On a local socket (a CONNECT client on the server, an upstream on the agent): a reader that
/// stalls would otherwise hold up to `tcp_wmem` max (4 MiB: on loopback the send buffer starts
/// there) of unsent bytes in our socket on top of what its own receive buffer holds, where a
/// direct connection holds only the latter; with it the rest waits in the connection's window,
/// which shrinks for a stalled reader (see `flow`). Bytes in flight are not bounded by it, so a
/// client across a WAN downloads as fast as before.
pub const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Receive buffer of the agent's upstream sockets (`SO_RCVBUF`; the kernel doubles it and stops
/// autotuning). The agent reads an upstream only as far as the tunnel's credit allows, so bytes
/// beyond that wait in this buffer: autotuned, it grows to `tcp_rmem` max (32 MiB on some
/// machines) while the agent reads fast, and a client that then stalls pins all of it, several
/// times what the same stalled reader costs connected directly (issue 36). The upstream is the
/// member's API server on the agent's own network, whose round trip is a fraction of a
/// millisecond: this covers it at tens of Gbit/s (bench: bulk rows).
pub const UPSTREAM_RECEIVE_BUFFER: u32 = 256 * 1024;

/// Sets the options of [`configure`] on a socket not yet connected except the user timeout
/// (which would also bound the SYN phase, and fail a dial before `--dial-timeout` as a bare
/// "timed out"): [`finish_dialed`] sets it once connected. A dial's completion then carries one
/// option syscall instead of six: on the agent, a warm connection's dial completes just as the
/// server hands its twin to a client.
pub fn configure_unconnected(socket: &TcpSocket, keepalive: Option<Keepalive>) -> io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_notsent_lowat(NOTSENT_LOWAT)?;
    if let Some(k) = keepalive {
        socket.set_tcp_keepalive(&tcp_keepalive(k))?;
    }
    Ok(())
}

/// Sets what the agent's upstream socket needs beyond [`configure_unconnected`], before its
/// dial: see [`UPSTREAM_RECEIVE_BUFFER`]. (Before the dial, so the window offered in the
/// handshake already fits it.)
pub fn upstream_unconnected(socket: &TcpSocket) -> io::Result<()> {
    socket.set_recv_buffer_size(UPSTREAM_RECEIVE_BUFFER)
}

/// The rest of [`configure`] for a socket [`configure_unconnected`] prepared, once connected.
pub fn finish_dialed(stream: &TcpStream, keepalive: Option<Keepalive>) -> io::Result<()> {
    if let Some(k) = keepalive {
        socket2::SockRef::from(stream).set_tcp_user_timeout(Some(k.bound()))?;
    }
    Ok(())
}

/// The FIN's wait [`before_fin`] sets, known once the binary read `--tcp-keepalive`
/// ([`set_fin_wait`]): one syscall per connection instead of three (two reads of the socket's
/// keepalive, measured at 15 % of the connection-setup rate at concurrency 16).
static FIN_WAIT: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();

/// Tells [`before_fin`] the process's keepalive (`--tcp-keepalive`), once, at start. Without
/// it (a library user, a test) each socket's own keepalive is read.
pub fn set_fin_wait(keepalive: Option<Keepalive>) {
    let _ = FIN_WAIT.set(keepalive.map(|k| k.interval.max(Duration::from_secs(1))));
}

/// Bounds how long this side's FIN, about to go out, may go unacknowledged: one keepalive
/// interval (`TCP_USER_TIMEOUT`), when the socket has keepalive on.
///
/// Why: keepalive probes go out only while nothing sent is unacknowledged. A FIN sent to a peer
/// that vanished is never acknowledged, so keepalive stops and the FIN is retransmitted under
/// the user timeout, which counts from the FIN: the member closing its side 32 s after the
/// client vanished freed the tunnel after 93 s, not within the documented 60 s (issue 40). The
/// peer's silence before the FIN is not at hand here (TCP_INFO needs unsafe code), so the FIN
/// gets one probe interval, in which any live peer acknowledges it (its kernel does, whatever
/// its application does): a vanished peer is noticed within the keepalive bound, or one
/// interval after the FIN if that comes later. A peer that goes on sending after our FIN (an
/// upload after the member's response ended) acknowledges the FIN with its first segment.
pub fn before_fin(stream: &TcpStream) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    match FIN_WAIT.get() {
        Some(None) => return Ok(()),
        Some(Some(wait)) => return socket.set_tcp_user_timeout(Some(*wait)),
        None => {}
    }
    if !socket.keepalive()? {
        return Ok(());
    }
    let interval = socket.tcp_keepalive_interval()?;
    socket.set_tcp_user_timeout(Some(interval.max(Duration::from_secs(1))))
}

/// Binds a listening socket for `addr` whose accepted connections have the options of
/// [`configure`] from the start: Linux copies a listener's TCP options (no delay, keepalive and
/// its timers, user timeout) to each connection as its handshake completes, so they are set
/// before `listen`, where no connection can be queued without them. The accept path then skips
/// six setsockopt calls per connection (see [`passes_options`]).
pub fn bind_listener(
    addr: std::net::SocketAddr,
    keepalive: Option<Keepalive>,
) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restarted server can bind while old connections linger.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    set_options(socket2::SockRef::from(&socket), keepalive)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Whether connections `listener` accepts come with the options of [`configure`] for
/// `keepalive` already: on Linux, when the listener has exactly those (see [`bind_listener`]; a
/// listener made elsewhere does not, and its connections are configured one by one).
pub fn passes_options(listener: &TcpListener, keepalive: Option<Keepalive>) -> bool {
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        return false;
    }
    let socket = socket2::SockRef::from(listener);
    let has = || -> io::Result<bool> {
        let nodelay = socket.tcp_nodelay()?;
        let lowat = socket.tcp_notsent_lowat()?;
        let on = socket.keepalive()?;
        let timeout = socket.tcp_user_timeout()?;
        Ok(nodelay
            && lowat == NOTSENT_LOWAT
            && match keepalive {
                None => !on && timeout.is_none(),
                Some(k) => {
                    on && socket.tcp_keepalive_time()? == k.idle
                        && socket.tcp_keepalive_interval()? == k.interval
                        && socket.tcp_keepalive_retries()? == k.probes
                        && timeout == Some(k.bound())
                }
            })
    };
    has().unwrap_or(false)
}

fn tcp_keepalive(k: Keepalive) -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(k.idle)
        .with_interval(k.interval)
        .with_retries(k.probes)
}

fn set_options(socket: socket2::SockRef<'_>, keepalive: Option<Keepalive>) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_notsent_lowat(NOTSENT_LOWAT)?;
    if let Some(k) = keepalive {
        socket.set_tcp_keepalive(&tcp_keepalive(k))?;
        socket.set_tcp_user_timeout(Some(k.bound()))?;
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit, and logs both: every tunneled
/// connection holds two or three sockets, and distributions often start services with a soft
/// limit of 1,024. Failing to raise it is logged, not fatal.
pub fn raise_open_files_limit() {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, hard)) => match rlimit::increase_nofile_limit(hard) {
            Ok(now) => tracing::info!(before = soft, now, hard, "open-file limit"),
            Err(err) => tracing::warn!(%err, soft, hard, "cannot raise the open-file limit"),
        },
        Err(err) => tracing::warn!(%err, "cannot read the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_bounds() {
        assert_eq!(Keepalive::parse("30s,10s,3"), Ok(Some(Keepalive::DEFAULT)));
        assert_eq!(Keepalive::parse("off"), Ok(None));
        assert!(
            Keepalive::parse("30s")
                .unwrap_err()
                .contains("IDLE,INTERVAL,PROBES")
        );
        assert!(
            Keepalive::parse("0s,1s,3")
                .unwrap_err()
                .contains("between 1s and 1h")
        );
        assert!(Keepalive::parse("1s,1s,0").unwrap_err().contains("1 to 20"));
        assert_eq!(Keepalive::DEFAULT.bound(), Duration::from_secs(60));
    }

    /// Asserts that `socket` has the options [`configure`] sets for `k`.
    fn assert_options(socket: socket2::SockRef<'_>, k: Keepalive) {
        assert!(socket.tcp_nodelay().unwrap());
        assert_eq!(socket.tcp_notsent_lowat().unwrap(), NOTSENT_LOWAT);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), k.idle);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), k.interval);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), k.probes);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(k.bound()));
    }

    /// Not the default, so a socket that merely has the kernel's or [`Keepalive::DEFAULT`]
    /// fails the check.
    const ODD: Keepalive = Keepalive {
        idle: Duration::from_secs(31),
        interval: Duration::from_secs(11),
        probes: 4,
    };

    #[tokio::test]
    async fn sets_the_options_on_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        configure(&stream, Some(Keepalive::DEFAULT)).unwrap();
        assert_options(socket2::SockRef::from(&stream), Keepalive::DEFAULT);
        assert_eq!(
            socket2::SockRef::from(&stream).tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(60))
        );
    }

    #[tokio::test]
    async fn a_dial_has_every_option_once_finished() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        configure_unconnected(&socket, Some(ODD)).unwrap();
        assert_eq!(
            socket2::SockRef::from(&socket).tcp_user_timeout().unwrap(),
            None,
            "no user timeout while the SYN is out"
        );
        let stream = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        finish_dialed(&stream, Some(ODD)).unwrap();
        assert_options(socket2::SockRef::from(&stream), ODD);
    }

    #[tokio::test]
    async fn a_bound_listener_passes_its_options_even_to_connections_queued_before_accept() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), Some(ODD)).unwrap();
        let linux = cfg!(any(target_os = "linux", target_os = "android"));
        assert_eq!(passes_options(&listener, Some(ODD)), linux);
        assert!(!passes_options(&listener, Some(Keepalive::DEFAULT)));
        assert!(!passes_options(&listener, None));
        // Connected (and queued) before anyone accepts.
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        if linux {
            assert_options(socket2::SockRef::from(&accepted), ODD);
        }

        let off = bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        assert_eq!(passes_options(&off, None), linux);
        assert!(!passes_options(&off, Some(ODD)));
        // A listener made elsewhere passes nothing.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(!passes_options(&plain, None));
        assert!(!passes_options(&plain, Some(ODD)));
    }
}
