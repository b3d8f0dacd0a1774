//! A hybrid logical clock (Kulkarni et al., 2014): wall-clock milliseconds and a counter.
//! It never goes back, and it moves past every time another replica sends, so a change
//! made after seeing another's is always later than it, whatever the two wall clocks say.
//! Geo-replication (`replication`) orders a tag's changes by it; every registry event
//! carries its time. Its text form (`MILLISECONDS.COUNTER`, 13 and 10 digits) has a
//! fixed width, so text order is time order (what the stores compare).

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

/// How far ahead of this machine's clock another replica's time may be. A time further
/// ahead is refused: taking it would make every later change here look older than it.
pub const MAX_AHEAD_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc {
    /// Unix milliseconds (wall clock, or the largest seen).
    pub ms: u64,
    /// Changes within that millisecond.
    pub n: u32,
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:013}.{:010}", self.ms, self.n)
    }
}

impl FromStr for Hlc {
    type Err = String;
    fn from_str(s: &str) -> Result<Hlc, String> {
        let bad = || format!("{s:?} is not a replication clock time (MILLISECONDS.COUNTER)");
        let (ms, n) = s.split_once('.').ok_or_else(bad)?;
        if ms.len() != 13 || n.len() != 10 {
            return Err(bad());
        }
        Ok(Hlc {
            ms: ms.parse().map_err(|_| bad())?,
            n: n.parse().map_err(|_| bad())?,
        })
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One process's clock.
pub struct Clock {
    last: Mutex<Hlc>,
    wall: fn() -> u64,
}

impl Clock {
    pub const fn new() -> Clock {
        Clock {
            last: Mutex::new(Hlc { ms: 0, n: 0 }),
            wall: wall_ms,
        }
    }

    /// The time of a change made here: after every time this clock gave or saw.
    pub fn tick(&self) -> Hlc {
        let now = (self.wall)();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *last = if now > last.ms {
            Hlc { ms: now, n: 0 }
        } else if last.n == u32::MAX {
            Hlc {
                ms: last.ms + 1,
                n: 0,
            }
        } else {
            Hlc {
                ms: last.ms,
                n: last.n + 1,
            }
        };
        *last
    }

    /// Starts after `kept` (the greatest time this server kept before a restart), so no
    /// change made now is older than one made or seen before, whatever the wall clock
    /// did meanwhile.
    pub fn seed(&self, kept: Hlc) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if kept > *last {
            *last = kept;
        }
    }

    /// Takes in a time another replica sent, so the next tick is after it; refused when
    /// it is more than [`MAX_AHEAD_MS`] ahead of this machine's clock.
    pub fn observe(&self, seen: Hlc) -> Result<(), String> {
        let now = (self.wall)();
        if seen.ms > now + MAX_AHEAD_MS {
            return Err(format!(
                "the sender's clock is {} s ahead of this server's: check both machines' time \
                 (NTP)",
                (seen.ms - now) / 1000
            ));
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if seen > *last {
            *last = seen;
        }
        Ok(())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// This process's clock: every registry event made here is stamped from it.
pub static CLOCK: Clock = Clock::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_order_is_time_order_and_parses_back() {
        let a = Hlc { ms: 999, n: 7 };
        let b = Hlc { ms: 1000, n: 0 };
        assert!(a < b && a.to_string() < b.to_string());
        assert_eq!(a.to_string().parse::<Hlc>().unwrap(), a);
        assert!("12.3".parse::<Hlc>().is_err());
        assert!("abcdefghijklm.0000000000".parse::<Hlc>().is_err());
        let most = Hlc { ms: 1, n: u32::MAX };
        assert_eq!(most.to_string().parse::<Hlc>().unwrap(), most);
    }

    #[test]
    fn ticks_never_go_back_and_pass_what_was_seen() {
        let c = Clock {
            last: Mutex::new(Hlc::default()),
            wall: || 5_000,
        };
        let t1 = c.tick();
        let t2 = c.tick();
        assert!(t2 > t1, "same millisecond: the counter moves");
        // Another replica's clock runs 30 s ahead: what is made here after seeing its
        // change is later than that change.
        let theirs = Hlc { ms: 35_000, n: 4 };
        c.observe(theirs).unwrap();
        assert!(c.tick() > theirs);
        // Too far ahead is refused and not taken in.
        let wild = Hlc {
            ms: 5_000 + MAX_AHEAD_MS + 1,
            n: 0,
        };
        assert!(c.observe(wild).unwrap_err().contains("ahead"));
        assert!(c.tick() < wild);
    }

    #[test]
    fn a_restarted_clock_goes_on_after_what_was_kept() {
        // The wall clock was stepped back 10 s while the server was down.
        let c = Clock {
            last: Mutex::new(Hlc::default()),
            wall: || 5_000,
        };
        let kept = Hlc { ms: 15_000, n: 3 };
        c.seed(kept);
        assert!(c.tick() > kept);
        c.seed(Hlc { ms: 1, n: 0 });
        assert!(c.tick() > kept, "an older time kept changes nothing");
    }
}
