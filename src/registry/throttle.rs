//! The tier's request rates (read and write operations a minute, as ACR counts them:
//! every `/v2/` request is one operation; GET and HEAD read, the rest write). Each is a
//! token bucket holding a minute's worth, refilled evenly, so a burst such as one large
//! push passes and a sustained excess waits: `429 TOOMANYREQUESTS` with `Retry-After`.

use std::sync::Mutex;
use std::time::Instant;

use axum::http::Method;

use crate::tier::Limits;

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

impl Op {
    pub fn of(method: &Method) -> Op {
        if method == Method::GET || method == Method::HEAD {
            Op::Read
        } else {
            Op::Write
        }
    }
}

/// One rate: tokens now and when they were counted.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    const fn new() -> Bucket {
        Bucket {
            tokens: 0.0,
            at: None,
        }
    }

    /// Takes one token at `now` under a limit of `per_minute`; when there is none, the
    /// whole seconds until there is.
    fn take(&mut self, per_minute: u64, now: Instant) -> Result<(), u64> {
        let cap = per_minute as f64;
        let rate = cap / 60.0;
        self.tokens = match self.at {
            // The first request finds a full bucket.
            None => cap,
            Some(at) => {
                (self.tokens + now.saturating_duration_since(at).as_secs_f64() * rate).min(cap)
            }
        };
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if rate <= 0.0 {
            return Err(60);
        }
        Err((((1.0 - self.tokens) / rate).ceil() as u64).max(1))
    }
}

/// The registry's two buckets.
#[derive(Debug)]
pub struct Throttle {
    buckets: Mutex<[Bucket; 2]>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            buckets: Mutex::new([Bucket::new(), Bucket::new()]),
        }
    }
}

impl Throttle {
    /// Admits one operation under `limits`; `Err(seconds)` says when to retry.
    pub fn admit(&self, op: Op, limits: &Limits) -> Result<(), u64> {
        self.admit_at(op, limits, Instant::now())
    }

    fn admit_at(&self, op: Op, limits: &Limits, now: Instant) -> Result<(), u64> {
        let (i, limit) = match op {
            Op::Read => (0, limits.read_ops_per_minute),
            Op::Write => (1, limits.write_ops_per_minute),
        };
        let Some(per_minute) = limit else {
            return Ok(());
        };
        let Ok(mut b) = self.buckets.lock() else {
            return Ok(());
        };
        b[i].take(per_minute, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::Sku;
    use std::time::Duration;

    #[test]
    fn a_minutes_worth_passes_then_the_rate_holds() {
        let t = Throttle::default();
        let limits = Sku::Basic.limits(); // 100 writes a minute
        let start = Instant::now();
        for i in 0..100 {
            assert_eq!(t.admit_at(Op::Write, &limits, start), Ok(()), "write {i}");
        }
        // Out of tokens: one comes back every 0.6 s.
        assert_eq!(t.admit_at(Op::Write, &limits, start), Err(1));
        // Reads have their own bucket.
        assert_eq!(t.admit_at(Op::Read, &limits, start), Ok(()));
        let later = start + Duration::from_millis(700);
        assert_eq!(t.admit_at(Op::Write, &limits, later), Ok(()));
        assert!(t.admit_at(Op::Write, &limits, later).is_err());
        // A quiet minute refills it, never beyond a minute's worth.
        let much_later = start + Duration::from_secs(600);
        for _ in 0..100 {
            assert_eq!(t.admit_at(Op::Write, &limits, much_later), Ok(()));
        }
        assert!(t.admit_at(Op::Write, &limits, much_later).is_err());
    }

    #[test]
    fn no_limit_no_waiting_and_zero_waits_a_minute() {
        let t = Throttle::default();
        let mut limits = Sku::Basic.limits();
        limits.write_ops_per_minute = None;
        for _ in 0..10_000 {
            assert_eq!(t.admit(Op::Write, &limits), Ok(()));
        }
        limits.read_ops_per_minute = Some(0);
        assert_eq!(t.admit(Op::Read, &limits), Err(60));
    }

    #[test]
    fn methods_count_as_acr_counts_them() {
        assert_eq!(Op::of(&Method::GET), Op::Read);
        assert_eq!(Op::of(&Method::HEAD), Op::Read);
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert_eq!(Op::of(&m), Op::Write);
        }
    }
}
