//! The tier's request rates (read and write operations a minute, as ACR counts them:
//! every `/v2/` request is one operation; GET and HEAD read, the rest write). Each is a
//! token bucket holding a minute's worth, refilled evenly, so a burst such as one large
//! push passes and a sustained excess waits: `429 TOOMANYREQUESTS` with `Retry-After`.
//!
//! Servers sharing a registry hold its rates together: each second each adds what it
//! admitted to the registry's totals and draws what the others admitted meanwhile from its
//! own buckets ([`Throttle::unsynced`], [`Throttle::charge`]), so the registry as a whole
//! keeps its tier's rate, a second behind at most.

use std::sync::Mutex;
use std::time::Instant;

use axum::http::Method;

use crate::tier::Limits;

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Write = 1,
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

    /// Refills to `now` under a limit of `per_minute`.
    fn refill(&mut self, per_minute: u64, now: Instant) {
        let cap = per_minute as f64;
        self.tokens = match self.at {
            // The first request finds a full bucket.
            None => cap,
            Some(at) => (self.tokens
                + now.saturating_duration_since(at).as_secs_f64() * cap / 60.0)
                .min(cap),
        };
        self.at = Some(now);
    }

    /// Takes one token at `now` under a limit of `per_minute`; when there is none, the
    /// whole seconds until there is.
    fn take(&mut self, per_minute: u64, now: Instant) -> Result<(), u64> {
        self.refill(per_minute, now);
        let rate = per_minute as f64 / 60.0;
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

/// The registry's two buckets, and what they admitted since the servers sharing the
/// registry last heard of it.
#[derive(Debug)]
pub struct Throttle {
    buckets: Mutex<([Bucket; 2], [u64; 2])>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            buckets: Mutex::new(([Bucket::new(), Bucket::new()], [0, 0])),
        }
    }
}

/// The limit of each bucket under `limits`.
fn per_minute(limits: &Limits) -> [Option<u64>; 2] {
    [limits.read_ops_per_minute, limits.write_ops_per_minute]
}

impl Throttle {
    /// Admits one operation under `limits`; `Err(seconds)` says when to retry.
    pub fn admit(&self, op: Op, limits: &Limits) -> Result<(), u64> {
        self.admit_at(op, limits, Instant::now())
    }

    fn admit_at(&self, op: Op, limits: &Limits, now: Instant) -> Result<(), u64> {
        let i = op as usize;
        let Ok(mut g) = self.buckets.lock() else {
            return Ok(());
        };
        let (buckets, admitted) = &mut *g;
        if let Some(n) = per_minute(limits)[i] {
            buckets[i].take(n, now)?;
        }
        admitted[i] += 1;
        Ok(())
    }

    /// Undoes one admission of `op` (a request another server answers, and counts).
    pub fn give_back(&self, op: Op) {
        let i = op as usize;
        if let Ok(mut g) = self.buckets.lock() {
            let (buckets, admitted) = &mut *g;
            if buckets[i].at.is_some() {
                // The next refill caps it at a minute's worth again.
                buckets[i].tokens += 1.0;
            }
            admitted[i] = admitted[i].saturating_sub(1);
        }
    }

    /// The reads and writes admitted here since the last call (for the registry's totals).
    pub fn unsynced(&self) -> [u64; 2] {
        self.buckets
            .lock()
            .map(|mut g| std::mem::take(&mut g.1))
            .unwrap_or_default()
    }

    /// Counts `ops` (from [`Throttle::unsynced`]) as not yet told to the others again: the
    /// registry's totals could not be reached.
    pub fn unsynced_again(&self, ops: [u64; 2]) {
        if let Ok(mut g) = self.buckets.lock() {
            g.1[0] += ops[0];
            g.1[1] += ops[1];
        }
    }

    /// Draws `ops` (reads, writes) that other servers sharing the registry admitted from
    /// these buckets: requests here wait for them as for their own.
    pub fn charge(&self, ops: [u64; 2], limits: &Limits) {
        self.charge_at(ops, limits, Instant::now())
    }

    fn charge_at(&self, ops: [u64; 2], limits: &Limits, now: Instant) {
        let Ok(mut g) = self.buckets.lock() else {
            return;
        };
        for (i, n) in per_minute(limits).into_iter().enumerate() {
            if let (Some(n), true) = (n, ops[i] > 0) {
                let b = &mut g.0[i];
                b.refill(n, now);
                // No lower than a minute's worth in debt: the others' burst is paid for,
                // and this server is not shut out for longer than the tier's minute.
                b.tokens = (b.tokens - ops[i] as f64).max(-(n as f64));
            }
        }
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
    fn what_other_servers_admitted_is_drawn_from_these_buckets() {
        let t = Throttle::default();
        let limits = Sku::Basic.limits(); // 100 writes a minute
        let start = Instant::now();
        for _ in 0..30 {
            t.admit_at(Op::Write, &limits, start).unwrap();
        }
        t.admit_at(Op::Read, &limits, start).unwrap();
        // One write was sent on to the server holding its upload, which counts it.
        t.give_back(Op::Write);
        assert_eq!(t.unsynced(), [1, 29], "what this server admitted");
        assert_eq!(t.unsynced(), [0, 0], "counted once");
        t.unsynced_again([1, 29]);
        assert_eq!(
            t.unsynced(),
            [1, 29],
            "kept when the totals could not be reached"
        );
        t.admit_at(Op::Write, &limits, start).unwrap();
        let _ = t.unsynced();
        // Another server admitted 60 writes meanwhile: 10 are left here, not 70.
        t.charge_at([0, 60], &limits, start);
        for i in 0..10 {
            assert_eq!(t.admit_at(Op::Write, &limits, start), Ok(()), "write {i}");
        }
        assert_eq!(t.admit_at(Op::Write, &limits, start), Err(1));
        // A burst elsewhere beyond the rate makes this server wait, at most a minute.
        t.charge_at([0, 1_000], &limits, start);
        assert_eq!(t.admit_at(Op::Write, &limits, start), Err(61));
        assert!(t
            .admit_at(Op::Write, &limits, start + Duration::from_secs(121))
            .is_ok());
        // Unlimited reads: nothing to draw, nothing refused.
        let mut open = limits.clone();
        open.read_ops_per_minute = None;
        t.charge_at([5_000, 0], &open, start);
        assert_eq!(t.admit_at(Op::Read, &open, start), Ok(()));
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
