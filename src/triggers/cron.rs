//! Timer triggers: standard 5-field cron expressions in UTC, and a clock that tests can
//! replace.

use chrono::{DateTime, Utc};
use croner::Cron;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that reads `origin` when created and then runs `rate` times faster than real
/// time, so that a test sees timers fire without waiting for them
/// (`serve --clock-start`, hidden).
pub struct ShiftedClock {
    origin: DateTime<Utc>,
    /// The real time at which this clock reads `origin`.
    epoch: DateTime<Utc>,
    rate: u32,
}

impl ShiftedClock {
    /// Reads `origin` now.
    pub fn new(origin: DateTime<Utc>, rate: u32) -> ShiftedClock {
        Self::anchored(origin, rate, Utc::now())
    }

    /// Reads `origin` at the real time `epoch`: servers started apart share one clock.
    pub fn anchored(origin: DateTime<Utc>, rate: u32, epoch: DateTime<Utc>) -> ShiftedClock {
        ShiftedClock {
            origin,
            epoch,
            rate: rate.max(1),
        }
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> DateTime<Utc> {
        let real = Utc::now()
            .signed_duration_since(self.epoch)
            .to_std()
            .unwrap_or_default()
            * self.rate;
        self.origin + chrono::Duration::from_std(real).unwrap_or(chrono::Duration::MAX)
    }
}

/// Parses a 5-field expression (minute hour day-of-month month day-of-week).
pub fn parse(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(format!(
            "cron expression {expr:?} has {fields} fields; 5 are needed (minute hour day month weekday)"
        ));
    }
    expr.parse::<Cron>()
        .map_err(|e| format!("cron expression {expr:?}: {e}"))
}

/// The latest time in `(after, now]` at which `cron` fires, if any.
pub fn due(cron: &Cron, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut last = None;
    for t in cron.iter_after(after) {
        if t > now {
            break;
        }
        last = Some(t);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn five_fields_only_and_due_times() {
        assert!(parse("*/5 * * * *").is_ok());
        assert!(parse("* * * *").is_err());
        assert!(parse("0 * * * * *").is_err());
        assert!(parse("61 * * * *").is_err());
        let c = parse("*/5 * * * *").unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 1, 0).unwrap();
        assert_eq!(due(&c, t0, t0 + chrono::Duration::minutes(3)), None);
        assert_eq!(
            due(&c, t0, t0 + chrono::Duration::minutes(11)),
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 10, 0).unwrap())
        );
    }

    #[test]
    fn shifted_clock_starts_at_its_origin_and_runs_faster() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let c = ShiftedClock::new(t0, 60);
        let a = c.now();
        assert!(a >= t0 && a < t0 + chrono::Duration::seconds(30), "{a}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        // 100 ms of real time is at least 6 s on this clock.
        assert!(c.now() >= t0 + chrono::Duration::seconds(6));
    }
}
