//! Progress for long CLI work whose library call reports no steps of its own (import,
//! purge, gc): a spinner with the elapsed time and what has been counted so far, on a
//! terminal; elsewhere a plain line every few seconds, and nothing for work that ends
//! sooner. Dropping it clears the spinner before the summary is printed.

use std::io::IsTerminal;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often a line is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub(super) struct Activity {
    /// Dropped to stop the thread at once (its wait ends when the sender goes).
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Activity {
    /// Shows `what` (`importing`, `purging`) with `status()` (counts so far; may be empty),
    /// until dropped.
    pub(super) fn start(what: &str, status: impl Fn() -> String + Send + 'static) -> Activity {
        let (stop, done) = mpsc::channel::<()>();
        let what = what.to_string();
        let terminal = std::io::stderr().is_terminal();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let bar = terminal.then(|| {
                let b = indicatif::ProgressBar::new_spinner();
                b.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} {prefix} {elapsed} {msg}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                b.set_prefix(what.clone());
                b.enable_steady_tick(Duration::from_millis(120));
                b
            });
            let mut last_line = Instant::now();
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                done.recv_timeout(Duration::from_millis(200))
            {
                match &bar {
                    Some(b) => b.set_message(status()),
                    None if last_line.elapsed() >= PLAIN_EVERY => {
                        last_line = Instant::now();
                        let s = status();
                        let sep = if s.is_empty() { "" } else { ", " };
                        eprintln!("{what}: {} s{sep}{s}", started.elapsed().as_secs());
                    }
                    None => {}
                }
            }
            if let Some(b) = bar {
                b.finish_and_clear();
            }
        });
        Activity {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
