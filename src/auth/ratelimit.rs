//! Brute-force brakes for logins (the token endpoint and the management API's basic
//! auth):
//! - after `max` failed logins for one (client IP, user name) within `window`, that pair is
//!   refused until the window passes; the rightful owner, coming from another address, is
//!   not locked out;
//! - after `max * 3` failures from one client IP (any user names: password spraying), that
//!   address is refused until the window passes;
//! - one client IP may have at most [`IN_FLIGHT_PER_IP`] logins being checked at once, so
//!   it cannot fill the queue for the (globally bounded) password hashing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Entries kept at most per table; beyond this, stale ones are swept (bounds memory under
/// attack).
const MAX_ENTRIES: usize = 10_000;

/// Logins of one client address checked (or waiting to be) at the same time.
pub const IN_FLIGHT_PER_IP: usize = 4;

type Counts<K> = Mutex<HashMap<K, (u32, Instant)>>;

pub struct RateLimiter {
    max: u32,
    window: Duration,
    failures: Counts<(IpAddr, String)>,
    ip_failures: Counts<IpAddr>,
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Holds one of a client's in-flight login slots; released on drop.
pub struct InFlight {
    table: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut m) = self.table.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

fn under<K: std::hash::Hash + Eq>(m: &Counts<K>, key: &K, max: u32, window: Duration) -> bool {
    let Ok(mut m) = m.lock() else {
        return false;
    };
    match m.get(key) {
        Some((_, start)) if start.elapsed() >= window => {
            m.remove(key);
            true
        }
        Some((n, _)) => *n < max,
        None => true,
    }
}

fn bump<K: std::hash::Hash + Eq>(m: &Counts<K>, key: K, window: Duration) {
    let Ok(mut m) = m.lock() else {
        return;
    };
    if m.len() >= MAX_ENTRIES {
        m.retain(|_, (_, s)| s.elapsed() < window);
    }
    let e = m.entry(key).or_insert((0, Instant::now()));
    if e.1.elapsed() >= window {
        *e = (0, Instant::now());
    }
    e.0 = e.0.saturating_add(1);
}

impl RateLimiter {
    pub fn new(max: u32, window: Duration) -> RateLimiter {
        RateLimiter {
            max,
            window,
            failures: Mutex::new(HashMap::new()),
            ip_failures: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// How long a refused client should wait before trying again.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// True if this client may try again now.
    pub fn allowed(&self, ip: IpAddr, user: &str) -> bool {
        under(
            &self.ip_failures,
            &ip,
            self.max.saturating_mul(3),
            self.window,
        ) && under(
            &self.failures,
            &(ip, user.to_string()),
            self.max,
            self.window,
        )
    }

    pub fn failed(&self, ip: IpAddr, user: &str) {
        bump(&self.failures, (ip, user.to_string()), self.window);
        bump(&self.ip_failures, ip, self.window);
    }

    pub fn succeeded(&self, ip: IpAddr, user: &str) {
        if let Ok(mut m) = self.failures.lock() {
            m.remove(&(ip, user.to_string()));
        }
    }

    /// A slot for one more login of `ip` being checked; `None` when it has too many.
    pub fn enter(&self, ip: IpAddr) -> Option<InFlight> {
        let mut m = self.in_flight.lock().ok()?;
        if m.len() >= MAX_ENTRIES && !m.contains_key(&ip) {
            return None;
        }
        let n = m.entry(ip).or_insert(0);
        if *n >= IN_FLIGHT_PER_IP {
            return None;
        }
        *n += 1;
        Some(InFlight {
            table: self.in_flight.clone(),
            ip,
        })
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

    #[test]
    fn spraying_many_user_names_locks_the_address_not_the_users() {
        let r = RateLimiter::new(3, Duration::from_secs(60));
        let attacker: IpAddr = "10.0.0.9".parse().unwrap();
        let owner: IpAddr = "10.0.0.1".parse().unwrap();
        for i in 0..9 {
            assert!(r.allowed(attacker, &format!("user{i}")));
            r.failed(attacker, &format!("user{i}"));
        }
        assert!(!r.allowed(attacker, "admin"));
        assert!(r.allowed(owner, "admin"));
    }

    #[test]
    fn in_flight_logins_are_bounded_per_address() {
        let r = RateLimiter::new(3, Duration::from_secs(60));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..IN_FLIGHT_PER_IP)
            .map(|_| r.enter(ip).unwrap())
            .collect();
        assert!(r.enter(ip).is_none());
        assert!(r.enter("10.0.0.2".parse().unwrap()).is_some());
        drop(held);
        assert!(r.enter(ip).is_some());
    }
}
