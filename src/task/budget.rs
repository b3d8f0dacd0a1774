//! Budgets for rendering templates someone else wrote (a stored task on a server): how
//! much text, how many function calls and loop iterations, and how long. Exceeding one
//! stops the render with a clear error; nothing is allocated past the budget first, and
//! no render can hang its thread.
//!
//! The state lives in a thread-local for the duration of [`within`]: gotmpl calls our
//! functions and writes our output synchronously on the rendering thread, so each charge
//! sees the budget of the render it belongs to.

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, Instant};

use gotmpl::TemplateError;

/// What one task file's templates may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderBudget {
    /// Rendered text, and any one value computed on the way, in bytes.
    pub max_output: usize,
    /// Calls of template functions (`default`, `repeat`, ...).
    pub max_calls: u64,
    /// `range` iterations, all loops together.
    pub max_range_iters: u64,
    pub max_time: Duration,
}

impl Default for RenderBudget {
    fn default() -> Self {
        RenderBudget {
            max_output: 4 * 1024 * 1024,
            max_calls: 100_000,
            max_range_iters: 100_000,
            max_time: Duration::from_secs(5),
        }
    }
}

struct Active {
    budget: RenderBudget,
    calls: u64,
    deadline: Instant,
    /// Why the render was stopped (set by whichever check tripped first).
    exceeded: Option<String>,
}

thread_local! {
    static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
}

/// Runs `f` under `budget`; returns its result and, if a budget stopped it, why.
pub(crate) fn within<T>(budget: RenderBudget, f: impl FnOnce() -> T) -> (T, Option<String>) {
    let outer = ACTIVE.with(|a| {
        a.borrow_mut().replace(Active {
            budget,
            calls: 0,
            deadline: Instant::now() + budget.max_time,
            exceeded: None,
        })
    });
    let out = f();
    let why = ACTIVE.with(|a| {
        let mine = std::mem::replace(&mut *a.borrow_mut(), outer);
        mine.and_then(|m| m.exceeded)
    });
    (out, why)
}

/// The limit on range iterations of the active budget (for the template's own counter).
pub(crate) fn range_iters() -> u64 {
    ACTIVE.with(|a| {
        a.borrow()
            .as_ref()
            .map_or(RenderBudget::default().max_range_iters, |s| {
                s.budget.max_range_iters
            })
    })
}

fn trip(why: String) -> TemplateError {
    ACTIVE.with(|a| {
        if let Some(s) = a.borrow_mut().as_mut() {
            s.exceeded.get_or_insert(why.clone());
        }
    });
    TemplateError::Exec(why)
}

/// One function call: counted, and the clock looked at.
pub(crate) fn charge() -> gotmpl::Result<()> {
    let over = ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        let s = a.as_mut()?;
        s.calls += 1;
        if s.calls > s.budget.max_calls {
            return Some(format!(
                "the templates call functions more than {} times (the render budget)",
                s.budget.max_calls
            ));
        }
        if Instant::now() > s.deadline {
            return Some(format!(
                "rendering the templates took longer than {} s (the render budget)",
                s.budget.max_time.as_secs()
            ));
        }
        None
    });
    match over {
        Some(why) => Err(trip(why)),
        None => Ok(()),
    }
}

/// A value of `bytes` about to be made: refused past the output budget.
pub(crate) fn room_for(bytes: usize) -> gotmpl::Result<()> {
    let max = ACTIVE.with(|a| a.borrow().as_ref().map(|s| s.budget.max_output));
    match max {
        Some(max) if bytes > max => Err(trip(format!(
            "the templates make a text of more than {max} bytes (the render budget)"
        ))),
        _ => Ok(()),
    }
}

/// Where rendered text goes: refuses to grow past the output budget or the deadline.
#[derive(Default)]
pub(crate) struct Bounded {
    pub out: String,
}

impl fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if room_for(self.out.len() + s.len()).is_err() {
            return Err(fmt::Error);
        }
        let late = ACTIVE.with(|a| {
            a.borrow()
                .as_ref()
                .map(|st| (Instant::now() > st.deadline, st.budget.max_time))
        });
        if let Some((true, t)) = late {
            trip(format!(
                "rendering the templates took longer than {} s (the render budget)",
                t.as_secs()
            ));
            return Err(fmt::Error);
        }
        self.out.push_str(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_budget_trips_once_and_is_reported() {
        let small = RenderBudget {
            max_output: 10,
            max_calls: 3,
            ..RenderBudget::default()
        };
        let ((), why) = within(small, || {
            for _ in 0..3 {
                charge().unwrap();
            }
            assert!(charge().is_err());
        });
        assert!(why.unwrap().contains("more than 3 times"));
        let (r, why) = within(small, || {
            use std::fmt::Write;
            let mut b = Bounded::default();
            write!(b, "12345").and_then(|_| write!(b, "678901"))
        });
        assert!(r.is_err());
        assert!(why.unwrap().contains("more than 10 bytes"));
        // Outside a render nothing is limited.
        assert!(charge().is_ok() && room_for(usize::MAX).is_ok());
    }
}
