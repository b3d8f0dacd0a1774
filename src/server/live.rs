//! What the queue knows of its running runs beyond the database: each step's state as the
//! executor reports it, and a version that moves on every log line and step change, so the
//! web page and the log followers wake when there is something new instead of polling.
//!
//! A run is here from the moment it is claimed until its outcome is recorded; after that
//! the stored `RunReport` says the same (with each step's `needs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;

use crate::exec::Status;

/// One step of a running run, as the page draws it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepState {
    pub id: String,
    /// `build`, `cmd` or `push`.
    pub kind: String,
    /// The ids of the steps it waits for (`when`, resolved by the plan).
    pub needs: Vec<String>,
    pub status: Status,
    pub attempts: u32,
    /// When it started, in ms after the run started (0 until it has).
    pub started_ms: u64,
    pub duration_ms: u64,
}

/// A running run's steps and its change counter.
pub struct LiveRun {
    steps: Mutex<Vec<StepState>>,
    version: watch::Sender<u64>,
    started: std::time::Instant,
}

impl LiveRun {
    fn new() -> LiveRun {
        LiveRun {
            steps: Mutex::new(Vec::new()),
            version: watch::channel(0).0,
            started: std::time::Instant::now(),
        }
    }

    /// Something changed (a log line, a step): wakes whoever watches.
    pub fn touch(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Wakes on the next change (and at once if one came since the last look).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The task's steps once it is loaded, all queued.
    pub fn set_steps(&self, steps: Vec<(String, String, Vec<String>)>) {
        if let Ok(mut s) = self.steps.lock() {
            *s = steps
                .into_iter()
                .map(|(id, kind, needs)| StepState {
                    id,
                    kind,
                    needs,
                    status: Status::Queued,
                    attempts: 0,
                    started_ms: 0,
                    duration_ms: 0,
                })
                .collect();
        }
        self.touch();
    }

    pub fn step_started(&self, step: usize, attempt: u32) {
        let now = self.started.elapsed().as_millis() as u64;
        if let Ok(mut s) = self.steps.lock() {
            if let Some(st) = s.get_mut(step) {
                if st.attempts == 0 {
                    st.started_ms = now;
                }
                st.status = Status::Running;
                st.attempts = attempt.max(st.attempts);
            }
        }
        self.touch();
    }

    pub fn step_finished(&self, step: usize, report: &crate::exec::StepReport) {
        if let Ok(mut s) = self.steps.lock() {
            if let Some(st) = s.get_mut(step) {
                st.status = report.status;
                st.attempts = report.attempts;
                st.started_ms = report.started_ms;
                st.duration_ms = report.duration_ms;
            }
        }
        self.touch();
    }

    /// The steps now; a running step's duration is how long it has run so far, in whole
    /// seconds (so watchers see a change once a second, not on every look).
    pub fn steps(&self) -> Vec<StepState> {
        let now = self.started.elapsed().as_millis() as u64;
        let mut out = self.steps.lock().map(|s| s.clone()).unwrap_or_default();
        for s in &mut out {
            if s.status == Status::Running {
                s.duration_ms = now.saturating_sub(s.started_ms) / 1000 * 1000;
            }
        }
        out
    }
}

/// The running runs by id.
#[derive(Default)]
pub struct LiveRuns {
    runs: Mutex<HashMap<String, Arc<LiveRun>>>,
}

impl LiveRuns {
    pub fn start(&self, id: &str) -> Arc<LiveRun> {
        let run = Arc::new(LiveRun::new());
        if let Ok(mut m) = self.runs.lock() {
            m.insert(id.to_string(), run.clone());
        }
        run
    }

    /// The run has ended and its outcome is stored: followers are woken a last time.
    pub fn end(&self, id: &str) {
        let gone = self.runs.lock().ok().and_then(|mut m| m.remove(id));
        if let Some(r) = gone {
            r.touch();
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<LiveRun>> {
        self.runs.lock().ok().and_then(|m| m.get(id).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_move_from_queued_to_running_to_their_end_and_wake_watchers() {
        let runs = LiveRuns::default();
        let run = runs.start("r1");
        let mut w = run.watch();
        run.set_steps(vec![
            ("a".into(), "cmd".into(), vec![]),
            ("b".into(), "build".into(), vec!["a".into()]),
        ]);
        assert!(w.has_changed().unwrap());
        w.borrow_and_update();
        run.step_started(0, 1);
        assert!(w.has_changed().unwrap());
        let s = run.steps();
        assert_eq!(s[0].status, Status::Running);
        assert_eq!(s[1].status, Status::Queued);
        assert_eq!(s[1].needs, vec!["a".to_string()]);
        let report = crate::exec::StepReport {
            id: "a".into(),
            kind: "cmd".into(),
            status: Status::Succeeded,
            started_ms: 5,
            duration_ms: 20,
            exit_code: Some(0),
            attempts: 2,
            ignored_error: false,
            error: None,
            pushed: vec![],
            built: None,
            needs: vec![],
        };
        run.step_finished(0, &report);
        let s = run.steps();
        assert_eq!(
            (s[0].status, s[0].attempts, s[0].duration_ms),
            (Status::Succeeded, 2, 20)
        );
        assert!(runs.get("r1").is_some());
        runs.end("r1");
        assert!(runs.get("r1").is_none());
    }
}
