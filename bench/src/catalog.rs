//! Every scenario: name, unit, direction of better, and how to measure one contender once, in
//! smoke (tiny) or full size.

use std::time::Duration;

use integration_tests::relay::Link;

use crate::contenders::Running;
use crate::scenarios::Sample;
use crate::stall::Buffers::{Kernel, Small};
use crate::{fairness, kube, replicas, scenarios, stall};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A measurement of one contender, boxed so scenarios can sit in one list.
pub type Measure = Box<
    dyn Fn(
        &Running,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Sample>> + '_>>,
>;

/// A scenario: its name, unit, whether higher is better, and the measurement.
pub struct Scenario {
    pub name: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Measured in contenders started afresh for every round (memory figures mean little in
    /// processes that already grew, and kept, their heaps in earlier scenarios).
    pub fresh: bool,
    pub run: Measure,
}

fn scenario(name: &'static str, unit: &'static str, higher: bool, run: Measure) -> Scenario {
    Scenario {
        name,
        unit,
        higher_is_better: higher,
        fresh: false,
        run,
    }
}

fn fresh(s: Scenario) -> Scenario {
    Scenario { fresh: true, ..s }
}

/// The loopback scenarios.
pub fn loopback(smoke: bool) -> Vec<Scenario> {
    let size = |full: u64, tiny: u64| if smoke { tiny } else { full };
    let count = |full: usize, tiny: usize| if smoke { tiny } else { full };
    let secs = |full: u64| Duration::from_secs(if smoke { 1 } else { full });
    let bulk_up = size(4 * GIB, 8 * MIB);
    let bulk_down = bulk_up;
    let parallel = size(512 * MIB, 2 * MIB);
    let idle_small = count(1_000, 20);
    let idle_large = count(10_000, 40);
    let iso = size(256 * MIB, 8 * MIB);
    let (few, many, stall_connects) = (count(64, 8), count(1_000, 20), count(50, 5));
    let half = count(500, 10);
    let d_lat = secs(10);
    let d_setup = secs(5);
    vec![
        scenario(
            "bulk, 1 connection, up",
            "Gbit/s",
            true,
            Box::new(move |r| Box::pin(scenarios::bulk(r, 1, bulk_up, 0))),
        ),
        scenario(
            "bulk, 1 connection, down",
            "Gbit/s",
            true,
            Box::new(move |r| Box::pin(scenarios::bulk(r, 1, 0, bulk_down))),
        ),
        scenario(
            "bulk, 8 connections, down",
            "Gbit/s",
            true,
            Box::new(move |r| Box::pin(scenarios::bulk(r, 8, 0, parallel))),
        ),
        scenario(
            "latency, 1 connection, 2000 req/s",
            "µs p50",
            false,
            Box::new(move |r| Box::pin(scenarios::latency(r, 1, 2_000, d_lat))),
        ),
        scenario(
            "latency, 64 connections, 10000 req/s",
            "µs p50",
            false,
            Box::new(move |r| Box::pin(scenarios::latency(r, 64, 10_000, d_lat))),
        ),
        scenario(
            "connection setup, concurrency 1",
            "conn/s",
            true,
            Box::new(move |r| Box::pin(scenarios::setup(r, 1, d_setup))),
        ),
        scenario(
            "connection setup, concurrency 16",
            "conn/s",
            true,
            Box::new(move |r| Box::pin(scenarios::setup(r, 16, d_setup))),
        ),
        scenario(
            "isolation beside a stalled connection",
            "% of alone",
            true,
            Box::new(move |r| Box::pin(scenarios::isolation(r, iso))),
        ),
        // Few enough stalled connections for every contender's kernel buffers, then the
        // issue's thousand (as many as the machine's TCP memory allows, see `stall`).
        fresh(scenario(
            "stalled readers: 256 MiB beside 64 stalled connections",
            "Gbit/s",
            true,
            Box::new(move |r| Box::pin(stall::stalled_readers(r, few, iso, stall_connects, Small))),
        )),
        fresh(scenario(
            "stalled readers: 256 MiB beside 1000 stalled connections",
            "Gbit/s",
            true,
            Box::new(move |r| {
                Box::pin(stall::stalled_readers(r, many, iso, stall_connects, Small))
            }),
        )),
        // The issue-36 setting: stalled clients and upstream writers with the kernel's own
        // buffers, as real ones have; the direct contender's row is the baseline.
        fresh(scenario(
            "stalled readers, kernel buffers: 256 MiB beside 500 stalled connections",
            "Gbit/s",
            true,
            Box::new(move |r| {
                Box::pin(stall::stalled_readers(r, half, iso, stall_connects, Kernel))
            }),
        )),
        fresh(scenario(
            "stalled readers, kernel buffers: 256 MiB beside 1000 stalled connections",
            "Gbit/s",
            true,
            Box::new(move |r| {
                Box::pin(stall::stalled_readers(r, many, iso, stall_connects, Kernel))
            }),
        )),
        fresh(scenario(
            "idle, 1000 connections",
            "KiB/conn",
            false,
            Box::new(move |r| Box::pin(scenarios::idle(r, idle_small))),
        )),
        fresh(scenario(
            "idle, 10000 connections",
            "KiB/conn",
            false,
            Box::new(move |r| Box::pin(scenarios::idle(r, idle_large))),
        )),
    ]
}

/// Scenarios through a TLS frontend (`https` proxy URL): the project's builds only, as the
/// peers have none. The figures to set beside them are the plain-CONNECT rows.
pub fn tls(smoke: bool) -> Vec<Scenario> {
    let secs = |full: u64| Duration::from_secs(if smoke { 1 } else { full });
    let (d_lat, d_setup) = (secs(10), secs(5));
    vec![
        scenario(
            "TLS frontend: latency, 1 connection, 2000 req/s",
            "µs p50",
            false,
            Box::new(move |r| Box::pin(scenarios::latency(r, 1, 2_000, d_lat))),
        ),
        scenario(
            "TLS frontend: latency, 64 connections, 10000 req/s",
            "µs p50",
            false,
            Box::new(move |r| Box::pin(scenarios::latency(r, 64, 10_000, d_lat))),
        ),
        scenario(
            "TLS frontend: connection setup, concurrency 1",
            "conn/s",
            true,
            Box::new(move |r| Box::pin(scenarios::setup(r, 1, d_setup))),
        ),
    ]
}

/// Scenarios across the WAN relay, by the path it emulates: latency each way (half the round
/// trip), and a bottleneck rate where a scenario should measure windows rather than CPU.
pub fn wan(smoke: bool) -> Vec<(Link, Vec<Scenario>)> {
    let bytes = if smoke { 4 * MIB } else { 2 * GIB };
    let limited = if smoke { 4 * MIB } else { GIB };
    let secs = Duration::from_secs(if smoke { 1 } else { 5 });
    let (warmup, measure) = if smoke {
        (Duration::from_millis(200), Duration::from_secs(1))
    } else {
        (Duration::from_secs(3), Duration::from_secs(10))
    };
    let bulk = move |name, up, down| {
        scenario(
            name,
            "Gbit/s",
            true,
            Box::new(move |r| Box::pin(scenarios::bulk(r, 1, up, down))),
        )
    };
    vec![
        (
            Link::delay(Duration::from_millis(10)),
            vec![
                bulk("WAN 20 ms RTT: bulk, 1 connection, down", 0, bytes),
                bulk("WAN 20 ms RTT: bulk, 1 connection, up", bytes, 0),
                scenario(
                    "WAN 20 ms RTT: connection setup, concurrency 1",
                    "conn/s",
                    true,
                    Box::new(move |r| Box::pin(scenarios::setup(r, 1, secs))),
                ),
                scenario(
                    "WAN 20 ms RTT: fairness, 8 connections, down",
                    "% worst deviation from mean",
                    false,
                    Box::new(move |r| Box::pin(fairness::fairness(r, 8, warmup, measure))),
                ),
            ],
        ),
        (
            Link::delay(Duration::from_millis(25)),
            vec![
                bulk("WAN 50 ms RTT: bulk, 1 connection, down", 0, bytes),
                bulk("WAN 50 ms RTT: bulk, 1 connection, up", bytes, 0),
            ],
        ),
        // On these 2 cores the unlimited paths above are CPU-bound (the relay's copies included):
        // a 2 Gbit/s bottleneck leaves CPU to spare, so what a connection reaches is set by its
        // window: 12.5 MB are in flight at 50 ms.
        (
            Link::limited(Duration::from_millis(25), 2.0),
            vec![
                bulk(
                    "WAN 50 ms RTT, 2 Gbit/s: bulk, 1 connection, down",
                    0,
                    limited,
                ),
                bulk(
                    "WAN 50 ms RTT, 2 Gbit/s: bulk, 1 connection, up",
                    limited,
                    0,
                ),
                // For the proxy the eight share one agent connection, so one 2 Gbit/s link:
                // how they split it is flow control's doing. (Direct and rathole give every
                // connection a relay, and so a link, of its own.)
                scenario(
                    "WAN 50 ms RTT, 2 Gbit/s: fairness, 8 connections, down",
                    "% worst deviation from mean",
                    false,
                    Box::new(move |r| Box::pin(fairness::fairness(r, 8, warmup, measure))),
                ),
            ],
        ),
        // The same 2 Gbit/s bottleneck across 20 ms (5 MB in flight).
        (
            Link::limited(Duration::from_millis(10), 2.0),
            vec![
                bulk(
                    "WAN 20 ms RTT, 2 Gbit/s: bulk, 1 connection, down",
                    0,
                    limited,
                ),
                bulk(
                    "WAN 20 ms RTT, 2 Gbit/s: bulk, 1 connection, up",
                    limited,
                    0,
                ),
            ],
        ),
    ]
}

/// Agent-scale scenarios: (name, agents, server replicas).
pub fn agents(smoke: bool) -> [(&'static str, usize, usize); 3] {
    let n = |full: usize, tiny: usize| if smoke { tiny } else { full };
    [
        ("agents, 1000 agents", n(1_000, 10), 1),
        ("agents, 5000 agents", n(5_000, 20), 1),
        (
            "agents, 1000 agents, 3 replicas",
            n(1_000, 10),
            replicas::REPLICAS,
        ),
    ]
}

/// Real-Kubernetes sizes (the scenarios are [`kube::NAMES`]), run once per contender `direct`
/// and `proxy` against one real member.
pub fn kube(smoke: bool) -> kube::Sizes {
    let n = |full: usize, tiny: usize| if smoke { tiny } else { full };
    kube::Sizes {
        versions: n(200, 5),
        configmaps: n(10_000, 100),
        watches: n(50, 5),
    }
}
