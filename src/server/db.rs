//! The server's state behind one trait ([`ServerStore`]): tasks, runs and the run queue,
//! and what the triggers remember. The SQLite backend is [`super::sqlite`].

use crate::exec::{RunReport, Status};

use super::model::{RunRecord, TaskSpec, Trigger};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Migrate(#[from] crate::store::migrate::MigrateError),
    #[error("stored data is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("database lock poisoned")]
    Poisoned,
}

/// Now as the server's records write times (RFC 3339, milliseconds, UTC).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Which runs a listing shows: newest first, after `before` (a `seq`) when continuing.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub task: Option<String>,
    pub status: Option<Status>,
    pub before: Option<i64>,
    pub limit: usize,
}

/// A run to add to the queue.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub task: String,
    pub trigger: Trigger,
    pub commit: Option<String>,
    pub branch: Option<String>,
}

/// The server's state: stored tasks, runs and their queue, and what the triggers remember
/// (webhook deliveries, the base-image index, timers, watched heads, how far the registry's
/// outbox was read). SQLite ([`super::sqlite::SqliteServer`], `server.db`) now; PostgreSQL
/// later, without touching the queue, the API or the watchers. Every call blocks and is
/// one transaction.
pub trait ServerStore: Send + Sync {
    /// What every run id of this database starts with (two servers on one engine never
    /// share a run id: ids name and label Docker resources).
    fn run_prefix(&self) -> &str;

    // ---- tasks
    /// Inserts or replaces; returns false when `create` and the task exists.
    fn put_task(&self, spec: &TaskSpec, create: bool) -> Result<bool, DbError>;
    /// The stored task called `name`.
    fn task(&self, name: &str) -> Result<Option<TaskSpec>, DbError>;
    /// Every stored task, by name.
    fn tasks(&self) -> Result<Vec<TaskSpec>, DbError>;
    /// Deletes a task with what its triggers remember; false if there was none.
    fn delete_task(&self, name: &str) -> Result<bool, DbError>;

    // ---- runs
    /// Queues a run; with `quick`, a run of that definition, stored with the run only
    /// (`acr-task run --no-wait`: no stored task).
    fn enqueue_with(&self, run: &NewRun, quick: Option<&TaskSpec>) -> Result<RunRecord, DbError>;
    /// The definition of a quick run (none for runs of stored tasks).
    fn quick_spec(&self, run_id: &str) -> Result<Option<TaskSpec>, DbError>;
    /// One run by id.
    fn run(&self, id: &str) -> Result<Option<RunRecord>, DbError>;
    /// Newest first; `task` filters; at most `limit`.
    fn runs(&self, task: Option<&str>, limit: usize) -> Result<Vec<RunRecord>, DbError>;
    /// A page of runs, newest first (the web page's list: cursor-paged, so as fast on the
    /// thousandth page as on the first).
    fn runs_page(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, DbError>;
    /// How many runs are in `status` (the queue's depth, with `Queued`).
    fn count_with_status(&self, status: Status) -> Result<u64, DbError>;
    /// How many runs each (task, status) has.
    fn run_counts(&self) -> Result<Vec<(String, Status, u64)>, DbError>;
    /// How far the registry's event outbox has been read by the base-image trigger.
    fn registry_cursor(&self) -> Result<Option<i64>, DbError>;
    /// Saves how far the base-image trigger has read the outbox.
    fn set_registry_cursor(&self, seq: i64) -> Result<(), DbError>;
    /// `task`'s queued and running runs, oldest first.
    fn active_runs(&self, task: &str) -> Result<Vec<RunRecord>, DbError>;
    /// Takes the oldest queued run and marks it Running.
    fn claim_next(&self) -> Result<Option<RunRecord>, DbError>;
    /// The commit a run turned out to build (known once its context is fetched).
    fn set_commit(&self, id: &str, commit: &str) -> Result<(), DbError>;
    /// A run's end: its final status, error and report.
    fn finish(
        &self,
        id: &str,
        status: Status,
        error: Option<&str>,
        report: Option<&RunReport>,
    ) -> Result<(), DbError>;
    /// Cancels a run that is still queued; false if it is not queued (any more).
    fn cancel_queued(&self, id: &str) -> Result<bool, DbError>;
    /// Marks every Running run Failed (they were cut off by a stop); returns their ids.
    fn fail_interrupted(&self) -> Result<Vec<String>, DbError>;
    /// Whether `task` has a run in this status.
    fn has_run_with_status(&self, task: &str, status: Status) -> Result<bool, DbError>;

    // ---- webhook deliveries
    /// Records a delivery id; false if it was seen before (a replay).
    fn record_delivery(&self, source: &str, id: &str, task: &str) -> Result<bool, DbError>;

    // ---- base-image index
    /// Replaces what `task` builds on and pushes, after a successful run.
    fn set_dependencies(
        &self,
        task: &str,
        bases: &[(String, Option<String>)],
        outputs: &[String],
    ) -> Result<(), DbError>;
    /// Every (task, base image, recorded digest).
    fn base_images(&self) -> Result<Vec<(String, String, Option<String>)>, DbError>;
    /// The images `task` pushed in its last successful run.
    fn outputs(&self, task: &str) -> Result<Vec<String>, DbError>;

    // ---- timers and watched heads
    /// When a task's timer last fired (RFC 3339), to catch up after a stop.
    fn timer_last_fired(&self, task: &str, timer: &str) -> Result<Option<String>, DbError>;
    /// Records a firing of a task's timer.
    fn set_timer_fired(&self, task: &str, timer: &str, at: &str) -> Result<(), DbError>;
    /// The last commit seen of a watched branch.
    fn head(&self, task: &str) -> Result<Option<String>, DbError>;
    /// Records the last commit seen of a watched branch.
    fn set_head(&self, task: &str, commit: &str) -> Result<(), DbError>;
}
