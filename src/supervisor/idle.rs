//! Idle tracking, as a pure decision: the VM is idle when no proxied connection is open and the agent
//! reports no build in flight, and has been so for the idle timeout.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Activity {
    /// Proxied connections, open or held while the VM boots.
    pub connections: u32,
    pub builds_in_flight: u32,
    /// Last moment anything used the VM: a connection opened or closed, or the agent saw a build.
    pub last_busy: Instant,
}

impl Activity {
    pub fn new(now: Instant) -> Self {
        Activity { connections: 0, builds_in_flight: 0, last_busy: now }
    }

    pub fn busy(&self) -> bool {
        self.connections > 0 || self.builds_in_flight > 0
    }

    /// How long the VM has been idle, or None while it is in use.
    pub fn idle_for(&self, now: Instant) -> Option<Duration> {
        (!self.busy()).then(|| now.saturating_duration_since(self.last_busy))
    }

    /// When the idle timeout runs out if nothing happens meanwhile; None while busy or with no timeout.
    pub fn deadline(&self, timeout: Duration) -> Option<Instant> {
        (!timeout.is_zero() && !self.busy()).then(|| self.last_busy + timeout)
    }

    pub fn expired(&self, timeout: Duration, now: Instant) -> bool {
        self.deadline(timeout).is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_needs_no_connection_no_build_and_the_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut a = Activity::new(t0);
        assert!(!a.expired(timeout, t0 + Duration::from_secs(9)));
        assert!(a.expired(timeout, t0 + Duration::from_secs(10)));
        assert!(!a.expired(Duration::ZERO, t0 + Duration::from_secs(999)), "0 means never");
        a.connections = 1;
        assert!(!a.expired(timeout, t0 + Duration::from_secs(999)));
        assert_eq!(a.idle_for(t0), None);
        a.connections = 0;
        a.builds_in_flight = 2;
        assert!(!a.expired(timeout, t0 + Duration::from_secs(999)), "a build keeps it up");
        a.builds_in_flight = 0;
        a.last_busy = t0 + Duration::from_secs(5);
        assert_eq!(a.deadline(timeout), Some(t0 + Duration::from_secs(15)));
        assert_eq!(a.idle_for(t0 + Duration::from_secs(7)), Some(Duration::from_secs(2)));
    }
}
