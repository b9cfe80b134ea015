//! Rate limits of joins and renewals: one token bucket for the whole server and one per source
//! address, so a flood of bootstrap attempts (guessing tokens, or a broken agent in a restart
//! loop) costs the server a refusal each, not a file lock and a signature.
//!
//! Hand-written rather than `governor`: two buckets and a bounded map are all it needs, and the
//! map must stay bounded under a flood from many addresses, which a keyed limiter would need
//! pruning for anyway.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sources remembered at most; when full, those whose buckets have refilled are forgotten, and
/// if none has, a new source is judged by the overall bucket alone.
const MAX_SOURCES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Rate {
    burst: f64,
    per_second: f64,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
    }
}

/// Which limit refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Its source made too many attempts.
    Source,
    /// The server as a whole takes no more now.
    Overall,
}

/// The two buckets.
#[derive(Debug)]
pub struct Limiter {
    overall_rate: Rate,
    source_rate: Rate,
    state: Mutex<(Bucket, HashMap<IpAddr, Bucket>)>,
}

impl Limiter {
    /// `overall` attempts a second for the server (bursts of twice that), `burst_per_source`
    /// at once from one address, refilling at one per `per_source`.
    pub fn new(overall: u32, burst_per_source: u32, per_source: Duration) -> Self {
        let overall_rate = Rate {
            burst: f64::from(overall) * 2.0,
            per_second: f64::from(overall),
        };
        let source_rate = Rate {
            burst: f64::from(burst_per_source),
            per_second: 1.0 / per_source.as_secs_f64(),
        };
        Self {
            overall_rate,
            source_rate,
            state: Mutex::new((Bucket::full(overall_rate, Instant::now()), HashMap::new())),
        }
    }

    /// Takes one attempt from `source`'s bucket and the overall one, or says which is empty.
    pub fn check(&self, source: IpAddr) -> Result<(), Limited> {
        self.check_at(source, Instant::now())
    }

    fn check_at(&self, source: IpAddr, now: Instant) -> Result<(), Limited> {
        let mut guard = self.state.lock().expect("not poisoned");
        let (overall, sources) = &mut *guard;
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&source) {
            let rate = self.source_rate;
            sources.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < rate.burst
            });
        }
        let room = sources.len() < MAX_SOURCES;
        let mut fresh = Bucket::full(self.source_rate, now);
        let bucket = if room {
            sources.entry(source).or_insert(fresh)
        } else {
            &mut fresh
        };
        bucket.refill(self.source_rate, now);
        if bucket.tokens < 1.0 {
            return Err(Limited::Source);
        }
        overall.refill(self.overall_rate, now);
        if overall.tokens < 1.0 {
            return Err(Limited::Overall);
        }
        bucket.tokens -= 1.0;
        overall.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn a_source_gets_its_burst_then_one_per_period() {
        let limiter = Limiter::new(1000, 3, Duration::from_secs(2));
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check_at(ip(1), t), Ok(()));
        }
        assert_eq!(limiter.check_at(ip(1), t), Err(Limited::Source));
        // Another source is not held back by the first.
        assert_eq!(limiter.check_at(ip(2), t), Ok(()));
        assert_eq!(
            limiter.check_at(ip(1), t + Duration::from_millis(1900)),
            Err(Limited::Source)
        );
        assert_eq!(limiter.check_at(ip(1), t + Duration::from_secs(2)), Ok(()));
    }

    #[test]
    fn many_sources_meet_the_overall_limit_and_the_map_stays_bounded() {
        let limiter = Limiter::new(10, 5, Duration::from_secs(1));
        let t = Instant::now();
        let admitted = (0..10_000)
            .filter(|n| limiter.check_at(ip(*n), t).is_ok())
            .count();
        assert_eq!(admitted, 20, "the overall burst is twice the rate");
        assert!(limiter.state.lock().unwrap().1.len() <= MAX_SOURCES);
        // A second later the overall bucket has refilled by its rate.
        let later = t + Duration::from_secs(1);
        let admitted = (10_000..20_000)
            .filter(|n| limiter.check_at(ip(*n), later).is_ok())
            .count();
        assert_eq!(admitted, 10);
        assert!(limiter.state.lock().unwrap().1.len() <= MAX_SOURCES);
    }
}
