//! Brute-force brake for the token endpoint: after `max` failed logins for one
//! (client IP, user name) within `window`, further attempts are refused until it passes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept at most; beyond this, stale ones are swept (bounds memory under attack).
const MAX_ENTRIES: usize = 10_000;

pub struct RateLimiter {
    max: u32,
    window: Duration,
    failures: Mutex<HashMap<(IpAddr, String), (u32, Instant)>>,
}

impl RateLimiter {
    pub fn new(max: u32, window: Duration) -> RateLimiter {
        RateLimiter {
            max,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// True if this client may try again now.
    pub fn allowed(&self, ip: IpAddr, user: &str) -> bool {
        let Ok(mut m) = self.failures.lock() else {
            return false;
        };
        let key = (ip, user.to_string());
        match m.get(&key) {
            Some((_, start)) if start.elapsed() >= self.window => {
                m.remove(&key);
                true
            }
            Some((n, _)) => *n < self.max,
            None => true,
        }
    }

    pub fn failed(&self, ip: IpAddr, user: &str) {
        let Ok(mut m) = self.failures.lock() else {
            return;
        };
        if m.len() >= MAX_ENTRIES {
            let w = self.window;
            m.retain(|_, (_, s)| s.elapsed() < w);
        }
        let e = m
            .entry((ip, user.to_string()))
            .or_insert((0, Instant::now()));
        if e.1.elapsed() >= self.window {
            *e = (0, Instant::now());
        }
        e.0 = e.0.saturating_add(1);
    }

    pub fn succeeded(&self, ip: IpAddr, user: &str) {
        if let Ok(mut m) = self.failures.lock() {
            m.remove(&(ip, user.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_per_ip_and_user() {
        let r = RateLimiter::new(3, Duration::from_millis(200));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(r.allowed(ip, "u"));
            r.failed(ip, "u");
        }
        assert!(!r.allowed(ip, "u"));
        assert!(r.allowed(other, "u"));
        assert!(r.allowed(ip, "v"));
        std::thread::sleep(Duration::from_millis(250));
        assert!(r.allowed(ip, "u"));
        r.failed(ip, "v");
        r.succeeded(ip, "v");
        assert!(r.allowed(ip, "v"));
    }
}
