//! What stalled connections cost: kernel memory no more than the same stalled readers connected
//! directly, and process memory under `--max-buffered` however many of them there are
//! (issue 36, goals 2 and 3).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use integration_tests::client::read_n;
use integration_tests::procs::{metric, rss_kib};
use integration_tests::upstream::SourceServer;
use integration_tests::{ConnectReply, Testbed, connect, eventually};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// Stalled readers in the kernel-memory comparison: each pins megabytes in the kernel (the
/// source's send buffer starts at 4 MiB on loopback), so few enough to stay far from the
/// machine's TCP memory pressure threshold beside the other tests.
const STALLED: usize = 64;

/// Bytes each stalled client reads before it stops.
const READ_FIRST: u64 = 16 * 1024;

/// Kernel socket memory (receive plus send queues, `ss -m`'s `r` and `w`) of every established
/// TCP socket with `port` at either end, in bytes.
fn socket_memory(ports: &[u16]) -> u64 {
    let filter = ports
        .iter()
        .map(|p| format!("sport = :{p} or dport = :{p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let out = Command::new("ss")
        .args(["-tmnH", "state", "established", &format!("( {filter} )")])
        .output()
        .expect("ss (iproute2) runs");
    assert!(out.status.success(), "ss failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("skmem:(")
        .skip(1)
        .map(|fields| {
            let fields = fields.split(')').next().unwrap_or_default();
            let field = |name: &str| -> u64 {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(name)?.parse().ok())
                    .unwrap_or(0)
            };
            // `r` is the receive queue, `w` the send queue (both with their overhead); `rb`
            // and `tb` (the buffer sizes) start with the same letters but are not numbers
            // right after them.
            field("r") + field("w")
        })
        .sum()
}

/// Waits until the source's connections after the first `skip` stop being written to (their
/// readers stalled and every buffer on the way is full); returns the bytes they took.
async fn settled(source: &SourceServer, skip: usize, n: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let conns = source.conns();
        let now: u64 = conns[skip..]
            .iter()
            .map(|c| c.written.load(Ordering::Relaxed))
            .sum();
        if conns.len() == skip + n && now == last {
            return now;
        }
        last = now;
        assert!(
            Instant::now() < deadline,
            "the stalled connections never settled"
        );
    }
}

/// Opens `n` connections with `open`, each reading [`READ_FIRST`] bytes and then nothing.
async fn stall<F, Fut>(n: usize, mut open: F) -> Vec<TcpStream>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = TcpStream>,
{
    let mut stalled = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = open().await;
        read_n(&mut s, READ_FIRST).await;
        stalled.push(s);
    }
    stalled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tunneled_connection_holds_little_more_kernel_memory_than_a_direct_one() {
    // Direct: the same stalled readers connected to the source itself.
    let direct_source = SourceServer::start().await.unwrap();
    let direct = stall(STALLED, || async {
        TcpStream::connect(direct_source.addr).await.unwrap()
    })
    .await;
    let direct_pending = settled(&direct_source, 0, STALLED).await;
    let direct_memory = socket_memory(&[direct_source.addr.port()]);
    drop(direct);

    // Tunneled: client -> server -> tunnel -> agent -> source. The tunnel's own socket is
    // shared by every connection and not counted; the others are each stalled reader's.
    let source = SourceServer::start().await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", source.addr)
        // No warm connections: the source's connections are exactly the stalled clients'.
        .agent_args(&["--warm-connections", "0"])
        .start()
        .await;
    let frontend = bed.frontend();
    let tunneled = stall(STALLED, || async {
        connect(frontend, "alpha:443")
            .await
            .unwrap()
            .tunnel()
            .unwrap()
    })
    .await;
    let tunneled_pending = settled(&source, 0, STALLED).await;
    let tunneled_memory = socket_memory(&[frontend.port(), source.addr.port()]);
    let per = |m: u64| m / STALLED as u64 / 1024;
    eprintln!(
        "{STALLED} stalled readers: direct {} KiB each in the kernel ({} KiB written by the \
         source each), tunneled {} KiB ({} KiB written)",
        per(direct_memory),
        direct_pending / STALLED as u64 / 1024,
        per(tunneled_memory),
        tunneled_pending / STALLED as u64 / 1024,
    );
    assert!(
        direct_memory > STALLED as u64 * (1 << 20),
        "the direct readers hold only {} KiB each: not stalled",
        per(direct_memory)
    );
    // Before the bounds, the server's socket to each client held up to 4 MiB unsent and the
    // agent's socket from the source an autotuned receive buffer of several MiB: over twice
    // what the direct connection holds.
    assert!(
        tunneled_memory * 10 <= direct_memory * 13,
        "a stalled tunneled connection holds {} KiB of kernel memory, a direct one {} KiB \
         (the goal: at most 1.3 times)",
        per(tunneled_memory),
        per(direct_memory)
    );
    drop(tunneled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_buffered_bounds_what_thousands_of_stalled_clients_pin_on_the_server() {
    const CLIENTS: usize = 2_000;
    const BOUND: u64 = 32 << 20;
    const FLOOR: u64 = 256 << 10;
    let source = SourceServer::start().await.unwrap();
    let bed = Testbed::builder(&["alpha"])
        .server_args(&["--max-buffered", "32MiB"])
        .agent("alpha", source.addr)
        .agent_args(&["--warm-connections", "0"])
        .start()
        .await;
    let server = &bed.server;
    let frontend = bed.frontend();
    assert_eq!(
        metric(server.admin_addr, "proxy_server_buffered_limit_bytes").await,
        BOUND as f64
    );
    let rss_before = rss_kib(server.proc.pid());

    // One at a time, so each admitted connection's window exists before the next is judged.
    let mut stalled = Vec::new();
    let mut refused = 0;
    for _ in 0..CLIENTS {
        match connect(frontend, "alpha:443").await.unwrap() {
            ConnectReply::Tunnel(mut s) => {
                read_n(&mut s, READ_FIRST).await;
                stalled.push(s);
            }
            ConnectReply::Refused { status, body } => {
                assert_eq!(status, 503, "{body}");
                assert!(
                    body.contains("--max-buffered"),
                    "the refusal names the flag: {body}"
                );
                refused += 1;
            }
        }
    }
    let admitted = stalled.len();
    let buffered = metric(server.admin_addr, "proxy_server_buffered_bytes").await as u64;
    let rss = rss_kib(server.proc.pid());
    eprintln!(
        "{CLIENTS} CONNECTs under a 32 MiB bound: {admitted} admitted and stalled, {refused} \
         refused; windows hold {} KiB; server RSS {rss_before} -> {rss} KiB",
        buffered / 1024
    );
    assert_eq!(admitted + refused, CLIENTS);
    // Every admitted connection holds its 256 KiB floor, so the bound admits at most this
    // many (windows that grew before their reader stalled admit fewer).
    assert!(
        admitted as u64 <= BOUND / FLOOR,
        "{admitted} admitted: more than 32 MiB of 256 KiB floors"
    );
    assert!(
        admitted >= 16,
        "only {admitted} admitted under a 32 MiB bound"
    );
    assert!(
        buffered <= BOUND,
        "windows hold {buffered} bytes, over the bound"
    );
    // The bound, plus each admitted connection's own state (sockets, TLS-free stream, HTTP/2)
    // at a generous 256 KiB; without the bound 2,000 floors alone would be 500 MiB.
    let allowed_kib = BOUND / 1024 + admitted as u64 * 256;
    assert!(
        rss.saturating_sub(rss_before) <= allowed_kib,
        "server RSS grew {} KiB with {admitted} stalled connections: more than {allowed_kib} KiB",
        rss.saturating_sub(rss_before)
    );

    // When the stalled clients go, everything is given back and CONNECTs are admitted again.
    drop(stalled);
    let admin = server.admin_addr;
    eventually(
        "the windows given back",
        Duration::from_secs(30),
        || async { metric(admin, "proxy_server_buffered_bytes").await == 0.0 },
    )
    .await;
    let mut s = connect(frontend, "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    read_n(&mut s, READ_FIRST).await;
}

/// An upstream that accepts connections and never reads them: uploads through the tunnel
/// stall at the agent.
async fn sink() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_buffered_bounds_what_the_agent_holds_for_upstreams_that_stop_reading() {
    let (upstream, _sink) = sink().await;
    // Four 256 KiB floors.
    let bed = Testbed::builder(&["alpha"])
        .agent("alpha", upstream)
        .agent_args(&["--max-buffered", "1MiB", "--warm-connections", "0"])
        .start()
        .await;
    let frontend = bed.frontend();
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(
            connect(frontend, "alpha:443")
                .await
                .unwrap()
                .tunnel()
                .unwrap(),
        );
    }
    let agent_admin = bed.agents[0].admin_addr;
    eventually("four floors held", Duration::from_secs(10), || async {
        metric(agent_admin, "proxy_agent_buffered_bytes").await == (1 << 20) as f64
    })
    .await;
    match connect(frontend, "alpha:443").await.unwrap() {
        ConnectReply::Refused { status, body } => {
            assert!(status == 502 || status == 503, "{status} {body}");
            assert!(
                body.contains("--max-buffered"),
                "the refusal names the flag: {body}"
            );
        }
        ConnectReply::Tunnel(mut s) => {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut byte)).await;
            panic!("a fifth connection was admitted past the agent's bound ({read:?})");
        }
    }
    // One client resets its connection (closed, it would stay half-open: the upstream never
    // ends its side): the floor comes back and the next dial goes through.
    let gone = open.pop().unwrap();
    gone.set_zero_linger().unwrap();
    drop(gone);
    eventually("a floor given back", Duration::from_secs(10), || async {
        metric(agent_admin, "proxy_agent_buffered_bytes").await < (1 << 20) as f64
    })
    .await;
    connect(frontend, "alpha:443")
        .await
        .unwrap()
        .tunnel()
        .unwrap();
}
