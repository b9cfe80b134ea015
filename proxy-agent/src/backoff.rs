//! Capped, jittered exponential backoff between reconnect attempts.

use std::time::Duration;

use rand::Rng;

/// First delay after a failure.
pub const INITIAL: Duration = Duration::from_millis(100);
/// Largest delay.
pub const MAX: Duration = Duration::from_secs(10);

/// Doubling delays from [`INITIAL`] to [`MAX`], each drawn uniformly from its upper half so that
/// agents restarted together do not reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(INITIAL, MAX)
    }
}

impl Backoff {
    /// Doubling delays from `initial` to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial,
            initial,
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let low = ceiling / 2;
        rand::rng().random_range(low..=ceiling)
    }

    /// Back to the shortest delay (after a connection that worked).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_jittered_and_capped() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= INITIAL / 2 && first <= INITIAL);
        let delays: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= MAX));
        assert!(delays.last().unwrap() >= &(MAX / 2));
        b.reset();
        assert!(b.next_delay() <= INITIAL);
    }
}
