//! The persistent run queue: runs wait in the database as `Queued` and at most
//! `concurrency` of them run at once, oldest first.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::db::{DbError, NewRun, ServerStore};
use super::model::RunRecord;
use super::runner::{Executor, Job, LogFile, Outcome, RunSink as _};
use crate::exec::Status;

pub struct Queue {
    db: Arc<dyn ServerStore>,
    notify: Notify,
    concurrency: usize,
    logs_dir: PathBuf,
    registry: String,
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Called with every finished run (the base-image index listens here).
    finished: tokio::sync::broadcast::Sender<RunRecord>,
    /// Running runs' steps and change counters (the page and log followers watch them).
    live: super::live::LiveRuns,
    /// Wakes watchers of the runs list on every enqueue and finish.
    changes: tokio::sync::watch::Sender<u64>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// What `cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// It was queued and is now Canceled.
    Dequeued,
    /// It is running; it stops and records Canceled.
    Signalled,
    /// It had already finished.
    AlreadyFinished,
    NotFound,
}

impl Queue {
    pub fn new(
        db: Arc<dyn ServerStore>,
        concurrency: usize,
        logs_dir: PathBuf,
        registry: String,
    ) -> Queue {
        let (finished, _) = tokio::sync::broadcast::channel(256);
        Queue {
            db,
            notify: Notify::new(),
            concurrency: concurrency.max(1),
            logs_dir,
            registry,
            running: Mutex::new(HashMap::new()),
            finished,
            live: Default::default(),
            changes: tokio::sync::watch::channel(0).0,
            metrics: None,
        }
    }

    /// Records trigger events and run ends in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Queue {
        self.metrics = Some(metrics);
        self
    }

    /// What running runs are doing (runs on agents included).
    pub fn live_runs(&self) -> &super::live::LiveRuns {
        &self.live
    }

    /// A running run's live state (none once it has ended).
    pub fn live(&self, id: &str) -> Option<Arc<super::live::LiveRun>> {
        self.live.get(id)
    }

    /// Moves on every enqueue and every run's end (the runs page refreshes on it).
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Wakes watchers of the runs list (and agents waiting for work).
    pub fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// How many runs may run at once, and how many do now.
    pub fn concurrency(&self) -> (usize, usize) {
        let now = self.running.lock().map(|r| r.len()).unwrap_or(0);
        (self.concurrency, now)
    }

    pub fn db(&self) -> &Arc<dyn ServerStore> {
        &self.db
    }

    pub fn log_path(&self, run_id: &str) -> PathBuf {
        self.logs_dir.join(format!("{run_id}.log"))
    }

    pub fn subscribe_finished(&self) -> tokio::sync::broadcast::Receiver<RunRecord> {
        self.finished.subscribe()
    }

    /// Records the run (durably) and wakes the scheduler.
    pub fn enqueue(&self, run: NewRun) -> Result<RunRecord, DbError> {
        self.enqueue_with(run, None)
    }

    /// Queues a run; with `quick`, of that definition instead of a stored task's.
    pub fn enqueue_with(
        &self,
        run: NewRun,
        quick: Option<&crate::server::model::TaskSpec>,
    ) -> Result<RunRecord, DbError> {
        let rec = self.db.enqueue_with(&run, quick)?;
        tracing::info!(run = %rec.id, task = %rec.task, "queued");
        if let Some(m) = &self.metrics {
            m.trigger(rec.trigger.kind());
        }
        self.notify.notify_one();
        self.changed();
        Ok(rec)
    }

    pub fn cancel(&self, id: &str) -> Result<Cancel, DbError> {
        if self.db.cancel_queued(id)? {
            self.changed();
            return Ok(Cancel::Dequeued);
        }
        if let Ok(running) = self.running.lock() {
            if let Some(t) = running.get(id) {
                t.cancel();
                return Ok(Cancel::Signalled);
            }
        }
        // On an agent: it cancels at its next heartbeat.
        if self.db.request_cancel(id)? {
            return Ok(Cancel::Signalled);
        }
        Ok(match self.db.run(id)? {
            None => Cancel::NotFound,
            Some(r) if r.is_finished() => Cancel::AlreadyFinished,
            // Finished between the two looks.
            Some(_) => Cancel::AlreadyFinished,
        })
    }

    /// Marks runs cut off by a crash Failed and removes their Docker resources.
    pub async fn recover(&self, exec: &dyn Executor) -> Result<Vec<String>, DbError> {
        let ids = self.db.fail_interrupted()?;
        for id in &ids {
            tracing::warn!(run = %id, "run was interrupted by a restart; marked Failed");
            if let Ok(log) = LogFile::create(&self.log_path(id)) {
                log.line("acr-task", "interrupted by a restart of serve");
            }
            exec.cleanup(id).await;
        }
        Ok(ids)
    }

    /// Runs queued runs until `stop`; then cancels running ones and waits for them.
    pub async fn run_loop(self: Arc<Self>, exec: Arc<dyn Executor>, stop: CancellationToken) {
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut active = 0usize;
        loop {
            while active < self.concurrency {
                match self.db.claim_next() {
                    Ok(Some(rec)) => {
                        active += 1;
                        // Registered before the task starts so that a cancel never misses it.
                        let cancel = CancellationToken::new();
                        if let Ok(mut running) = self.running.lock() {
                            running.insert(rec.id.clone(), cancel.clone());
                        }
                        let (q, ex, done) = (self.clone(), exec.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            q.run_one(rec, cancel, ex.as_ref()).await;
                            let _ = done.send(());
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "reading the queue");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                Some(()) = done_rx.recv() => active -= 1,
                _ = stop.cancelled() => break,
            }
        }
        if let Ok(running) = self.running.lock() {
            for t in running.values() {
                t.cancel();
            }
        }
        while active > 0 {
            if done_rx.recv().await.is_none() {
                break;
            }
            active -= 1;
        }
    }

    async fn run_one(&self, rec: RunRecord, cancel: CancellationToken, exec: &dyn Executor) {
        tracing::info!(run = %rec.id, task = %rec.task, "started");
        let live = self.live.start(&rec.id);
        self.changed();
        let spec = match self.db.quick_spec(&rec.id) {
            Ok(Some(quick)) => Ok(Some(quick)),
            Ok(None) => self.db.task(&rec.task),
            Err(e) => Err(e),
        };
        let outcome = match spec {
            Ok(Some(spec)) => match LogFile::create(&self.log_path(&rec.id)) {
                Ok(log) => {
                    let log = Arc::new(log.with_live(live));
                    let job = Job {
                        run: rec.clone(),
                        spec,
                        registry: self.registry.clone(),
                        log,
                        cancel,
                    };
                    exec.run(job).await
                }
                Err(e) => failed(format!("creating the run log: {e}")),
            },
            Ok(None) => failed(format!("task {} no longer exists", rec.task)),
            Err(e) => failed(e.to_string()),
        };
        if let Ok(mut running) = self.running.lock() {
            running.remove(&rec.id);
        }
        if let Err(e) = self.complete(&rec, &outcome, None) {
            tracing::error!(run = %rec.id, error = %e, "recording the outcome");
        }
    }

    /// Records how a run ended (one on an agent only while its `lease` still holds it:
    /// false, and nothing recorded, otherwise) and tells everyone who waits for it.
    pub fn complete(
        &self,
        rec: &RunRecord,
        o: &Outcome,
        lease: Option<&str>,
    ) -> Result<bool, DbError> {
        let recorded = self.record(rec, o, lease);
        if matches!(recorded, Ok(false)) {
            return Ok(false);
        }
        tracing::info!(run = %rec.id, status = o.status.as_str(), "finished");
        self.ended(&rec.id);
        recorded
    }

    /// A run is over, however it was recorded: its live state goes, watchers wake, the
    /// metrics and the base-image index hear of it.
    pub fn ended(&self, id: &str) {
        self.live.end(id);
        self.changed();
        if let Ok(Some(done)) = self.db.run(id) {
            if done.is_finished() {
                if let Some(m) = &self.metrics {
                    m.run_finished(&done.task, done.status.as_str(), done.report.as_ref());
                }
                let _ = self.finished.send(done);
            }
        }
    }

    fn record(&self, rec: &RunRecord, o: &Outcome, lease: Option<&str>) -> Result<bool, DbError> {
        let (id, error, report) = (&rec.id, o.error.as_deref(), o.report.as_ref());
        match lease {
            Some(lease) => {
                if !self.db.finish_leased(id, lease, o.status, error, report)? {
                    return Ok(false);
                }
            }
            None => self.db.finish(id, o.status, error, report)?,
        }
        if let Some(c) = &o.commit {
            self.db.set_commit(&rec.id, c)?;
        }
        // A quick run has no task to rebuild when its base images change.
        let quick = matches!(rec.trigger, crate::server::model::Trigger::Quick);
        if o.status == Status::Succeeded && !quick {
            if let Some(r) = &o.report {
                let mut bases = Vec::new();
                let mut outputs = Vec::new();
                for s in &r.steps {
                    if let Some(b) = &s.built {
                        for bi in &b.base_images {
                            bases.push((bi.image.clone(), bi.digest.clone()));
                        }
                        outputs.extend(b.tags.iter().cloned());
                    }
                    outputs.extend(s.pushed.iter().map(|p| p.image.clone()));
                }
                self.db.set_dependencies(&rec.task, &bases, &outputs)?;
            }
        }
        Ok(true)
    }
}

fn failed(error: String) -> Outcome {
    Outcome {
        status: Status::Failed,
        error: Some(error),
        commit: None,
        report: None,
    }
}
