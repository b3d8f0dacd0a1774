//! The persistent run queue: runs wait in the database as `Queued` and at most
//! `concurrency` of them run at once, oldest first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::db::{DbError, LeaseState, NewRun, ServerStore};
use super::model::RunRecord;
use super::runner::{log_line, Executor, Job, Outcome, RunLog};
use crate::exec::Status;

/// How often the queue is looked at without being woken (runs another server queued
/// while its notice did not arrive).
const QUEUE_POLL: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Queue {
    db: Arc<dyn ServerStore>,
    notify: Notify,
    concurrency: usize,
    registry: String,
    /// This server's own running runs: how to stop each, and its lease.
    running: Mutex<HashMap<String, Held>>,
    /// How long a lease on one of its own runs lasts without renewal.
    lease: std::time::Duration,
    /// Who holds this server's runs: its data directory's id (the same after a restart).
    holder: String,
    /// Called with every finished run (the base-image index listens here).
    finished: tokio::sync::broadcast::Sender<RunRecord>,
    /// Running runs' steps and change counters (the page and log followers watch them).
    live: super::live::LiveRuns,
    /// Wakes watchers of the runs list on every enqueue and finish.
    changes: tokio::sync::watch::Sender<u64>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// A run this server's executor holds.
struct Held {
    cancel: CancellationToken,
    lease: String,
    /// When the lease was last renewed (or taken).
    renewed: std::time::Instant,
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
    pub fn new(db: Arc<dyn ServerStore>, concurrency: usize, registry: String) -> Queue {
        let (finished, _) = tokio::sync::broadcast::channel(256);
        Queue {
            db,
            notify: Notify::new(),
            concurrency: concurrency.max(1),
            registry,
            running: Mutex::new(HashMap::new()),
            lease: std::time::Duration::from_secs(30),
            holder: "local".into(),
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

    /// Leases this server's own runs for `lease` at a time (renewed while they run).
    pub fn with_lease(mut self, lease: std::time::Duration) -> Queue {
        self.lease = lease.max(std::time::Duration::from_secs(1));
        self
    }

    /// Holds its runs as `holder` (the data directory's id), which a restart on the same
    /// directory fails at once (nothing of its earlier process runs any more).
    pub fn with_holder(mut self, holder: String) -> Queue {
        self.holder = holder;
        self
    }

    fn lease_ms(&self) -> u64 {
        self.lease.as_millis().min(u128::from(u64::MAX)) as u64
    }

    /// Another server changed a run: a run to claim wakes the scheduler; every change
    /// wakes those watching the runs (pages, followers, waiting agents).
    pub fn wake(&self, change: super::db::RunChange) {
        if change == super::db::RunChange::Queued {
            self.notify.notify_one();
        }
        self.changed();
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

    /// Up to `max` bytes of a run's log from `offset`, ending at a line's end (a line being
    /// written is sent whole, later) unless the run has `ended` or one line is longer
    /// than `max`.
    pub async fn read_log(&self, run: &str, offset: u64, max: u64, ended: bool) -> Vec<u8> {
        let (db, id) = (self.db.clone(), run.to_string());
        let read = tokio::task::spawn_blocking(move || db.read_log(&id, offset, max)).await;
        let mut buf = match read {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(run, error = %e, "reading a run log");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        if !ended && (buf.len() as u64) < max {
            match buf.iter().rposition(|b| *b == b'\n') {
                Some(i) => buf.truncate(i + 1),
                None => buf.clear(),
            }
        }
        buf
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
                t.cancel.cancel();
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
        let ids = self.db.fail_interrupted(&self.holder)?;
        for id in &ids {
            tracing::warn!(run = %id, "run was interrupted by a restart; marked Failed");
            let line = log_line("acr-task", "interrupted by a restart of serve");
            if let Err(e) = self.db.append_log(id, line.as_bytes()) {
                tracing::warn!(run = %id, error = %e, "writing a run log");
            }
            exec.cleanup(id).await;
        }
        Ok(ids)
    }

    /// Runs queued runs until `stop`; then cancels running ones and waits for them.
    /// Looks at the queue when woken (a run queued here, or another server's notice) and
    /// every few seconds besides, for runs another server queued while its notice was lost.
    pub async fn run_loop(self: Arc<Self>, exec: Arc<dyn Executor>, stop: CancellationToken) {
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut active = 0usize;
        let renewals = tokio::spawn(self.clone().renew_loop(stop.clone()));
        loop {
            while active < self.concurrency {
                match self.db.claim_next(&self.holder, self.lease_ms()) {
                    Ok(Some(claimed)) => {
                        active += 1;
                        // Registered before the task starts so that a cancel never misses it.
                        let cancel = CancellationToken::new();
                        if let Ok(mut running) = self.running.lock() {
                            running.insert(
                                claimed.run.id.clone(),
                                Held {
                                    cancel: cancel.clone(),
                                    lease: claimed.lease.clone(),
                                    renewed: std::time::Instant::now(),
                                },
                            );
                        }
                        let (q, ex, done) = (self.clone(), exec.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            q.run_one(claimed.run, &claimed.lease, cancel, ex.as_ref())
                                .await;
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
                _ = tokio::time::sleep(QUEUE_POLL) => {}
                _ = stop.cancelled() => break,
            }
        }
        if let Ok(running) = self.running.lock() {
            for t in running.values() {
                t.cancel.cancel();
            }
        }
        while active > 0 {
            if done_rx.recv().await.is_none() {
                break;
            }
            active -= 1;
        }
        renewals.abort();
    }

    /// Renews the leases of this server's running runs a few times a lease. A run whose
    /// lease is gone (it expired and another server took the run) or that someone asked
    /// to cancel is cancelled; so is one whose lease could not be renewed for a whole
    /// period (the database is away: someone else may have it by now).
    async fn renew_loop(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.lease / 3).clamp(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(10),
        );
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let held: Vec<(String, String)> = match self.running.lock() {
                Ok(r) => r
                    .iter()
                    .map(|(id, h)| (id.clone(), h.lease.clone()))
                    .collect(),
                Err(_) => return,
            };
            for (id, lease) in held {
                let (db, run, l, ms) = (self.db.clone(), id.clone(), lease, self.lease_ms());
                let state = tokio::task::spawn_blocking(move || db.renew_lease(&run, &l, ms))
                    .await
                    .unwrap_or_else(|e| Err(DbError::Postgres(e.to_string())));
                let Ok(mut running) = self.running.lock() else {
                    return;
                };
                let Some(h) = running.get_mut(&id) else {
                    continue;
                };
                match state {
                    Ok(LeaseState::Held { cancel }) => {
                        h.renewed = std::time::Instant::now();
                        if cancel {
                            h.cancel.cancel();
                        }
                    }
                    Ok(LeaseState::Lost) => {
                        tracing::warn!(run = %id, "lease lost (it ran out and the run was handed on); stopping here");
                        h.cancel.cancel();
                    }
                    Err(e) if h.renewed.elapsed() >= self.lease => {
                        tracing::warn!(run = %id, error = %e, "lease not renewed for a whole period; stopping the run");
                        h.cancel.cancel();
                    }
                    Err(e) => tracing::warn!(run = %id, error = %e, "renewing a lease"),
                }
            }
        }
    }

    async fn run_one(
        &self,
        rec: RunRecord,
        lease: &str,
        cancel: CancellationToken,
        exec: &dyn Executor,
    ) {
        tracing::info!(run = %rec.id, task = %rec.task, "started");
        let live = self.live.start(&rec.id);
        self.changed();
        let spec = match self.db.quick_spec(&rec.id) {
            Ok(Some(quick)) => Ok(Some(quick)),
            Ok(None) => self.db.task(&rec.task),
            Err(e) => Err(e),
        };
        let outcome = match spec {
            Ok(Some(spec)) => {
                let log = Arc::new(RunLog::new(self.db.clone(), &rec.id, live));
                let job = Job {
                    run: rec.clone(),
                    spec,
                    registry: self.registry.clone(),
                    log: log.clone(),
                    cancel,
                };
                let outcome = exec.run(job).await;
                // Every line is stored before the run shows as ended.
                log.close().await;
                outcome
            }
            Ok(None) => failed(format!("task {} no longer exists", rec.task)),
            Err(e) => failed(e.to_string()),
        };
        if let Ok(mut running) = self.running.lock() {
            running.remove(&rec.id);
        }
        if let Err(e) = self.complete(&rec, &outcome, Some(lease)) {
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
