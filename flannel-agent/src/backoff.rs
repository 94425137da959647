//! Capped exponential backoff with jitter, for every retry loop of the agent.
//! Waiting is a sleep, so a store outage costs no CPU (flannel-io/flannel#2171).

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff: `initial`, doubling up to `max`, with ±20 % jitter
/// so that many agents do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        base.mul_f64(jitter).min(self.max)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let d: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(80) && d[0] <= Duration::from_millis(120));
        assert!(d[3] >= Duration::from_millis(640));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(5)));
        assert!(d[9] >= Duration::from_secs(4));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
