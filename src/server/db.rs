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
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("run log {path}: {source}")]
    Log {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::pg::PgError> for DbError {
    fn from(e: crate::pg::PgError) -> DbError {
        DbError::Postgres(e.0)
    }
}

/// Now as the server's records write times (RFC 3339, milliseconds, UTC).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Now in Unix milliseconds (leases and agents' signs of life).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Unix milliseconds as the records write times.
pub fn ms_to_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Why a lease ran out, in a run's error and log: its holder was an agent, or (no agent)
/// a server replica's own executor.
pub fn lapsed(agent: Option<&str>) -> &'static str {
    match agent {
        Some(_) => "its agent stopped heartbeating",
        None => "the server running it stopped renewing its lease",
    }
}

/// Which runs a listing shows: newest first, after `before` (a `seq`) when continuing.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub task: Option<String>,
    pub status: Option<Status>,
    pub before: Option<i64>,
    pub limit: usize,
}

/// An agent pool (`az acr agentpool`): the runs of tasks that name it wait there for its
/// agents. `max_runs` caps how many of them run at once across every agent.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentPool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runs: Option<u32>,
    #[serde(default)]
    pub created_at: String,
}

/// An agent as it registered (`acr-task agent`) and when it was last heard from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRecord {
    pub id: String,
    pub pool: String,
    /// The machine's name, as the agent gave it.
    pub name: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// How many runs it takes at once.
    pub concurrency: u32,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub registered_at: String,
    /// Set by the store on every sign of life (RFC 3339).
    #[serde(default)]
    pub last_seen: String,
    /// It takes no new runs (it is stopping).
    #[serde(default)]
    pub draining: bool,
}

/// A run an agent took: the run and the lease id that every later call about it names.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub run: RunRecord,
    pub lease: String,
}

/// What a lease renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Still this agent's; `cancel` when someone asked to cancel the run.
    Held { cancel: bool },
    /// The run is no longer this lease's (expired and handed on, or finished).
    Lost,
}

/// A lease that ran out: the run went back to the queue as its next attempt, or (after
/// the last attempt) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub run: String,
    pub agent: Option<String>,
    pub attempt: u32,
    pub requeued: bool,
}

/// What another server did to a run, as [`ServerStore::listen`] hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunChange {
    /// A run waits to be claimed (queued, or queued again).
    Queued,
    /// A run ended.
    Ended,
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
    /// Takes the oldest queued run of no agent pool, marks it Running and leases it to
    /// the server `holder` (its data directory's id) for `lease_ms` (renewed while it
    /// runs; a replica that stops renewing loses it to the lease expiry, as an agent does).
    fn claim_next(&self, holder: &str, lease_ms: u64) -> Result<Option<Claimed>, DbError>;
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
    /// Marks the Running runs the server `holder` held before a stop (or crash) Failed;
    /// returns their ids. One process serves a data directory, so at its start nothing
    /// of `holder` runs any more; where one server owns the database (SQLite) that is
    /// every running run of no agent pool. Other replicas' runs, and runs leased to
    /// agents, keep their leases.
    fn fail_interrupted(&self, holder: &str) -> Result<Vec<String>, DbError>;
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
    /// Records a firing of a task's timer at `at` if its last firing is still `seen`
    /// (what the caller read); false when someone else recorded one in between, so a
    /// firing is queued once however many servers look.
    fn set_timer_fired(
        &self,
        task: &str,
        timer: &str,
        seen: Option<&str>,
        at: &str,
    ) -> Result<bool, DbError>;
    /// The last commit seen of a watched branch.
    fn head(&self, task: &str) -> Result<Option<String>, DbError>;
    /// Records the last commit seen of a watched branch.
    fn set_head(&self, task: &str, commit: &str) -> Result<(), DbError>;

    // ---- agent pools, agents and leases
    /// Inserts (`create`: false if it exists) or replaces (false if it does not).
    fn put_pool(&self, pool: &AgentPool, create: bool) -> Result<bool, DbError>;
    fn pool(&self, name: &str) -> Result<Option<AgentPool>, DbError>;
    fn pools(&self) -> Result<Vec<AgentPool>, DbError>;
    /// Deletes a pool and its agents' registrations; false if there was none.
    fn delete_pool(&self, name: &str) -> Result<bool, DbError>;
    /// A pool's queued and running runs.
    fn pool_counts(&self, pool: &str) -> Result<(u64, u64), DbError>;
    /// Registers an agent (or refreshes its registration), seen now.
    fn put_agent(&self, agent: &AgentRecord) -> Result<(), DbError>;
    /// The agents of `pool` (every pool's with none), by pool and name.
    fn agents(&self, pool: Option<&str>) -> Result<Vec<AgentRecord>, DbError>;
    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, DbError>;
    /// Records a sign of life; false if the agent is not registered (any more).
    fn agent_seen(&self, id: &str, draining: bool) -> Result<bool, DbError>;
    fn remove_agent(&self, id: &str) -> Result<(), DbError>;
    /// Leases the oldest queued run of `pool` to `agent` for `lease_ms`, unless the pool
    /// already runs its `max_runs`. One transaction: no run is ever leased twice.
    fn claim_leased(
        &self,
        pool: &str,
        agent: &str,
        lease_ms: u64,
    ) -> Result<Option<Claimed>, DbError>;
    /// Extends a lease by `lease_ms` if it is still the run's.
    fn renew_lease(&self, run: &str, lease: &str, lease_ms: u64) -> Result<LeaseState, DbError>;
    /// A leased run's end, recorded only if `lease` still holds it (a late report of a
    /// lease that expired changes nothing); false otherwise.
    fn finish_leased(
        &self,
        run: &str,
        lease: &str,
        status: Status,
        error: Option<&str>,
        report: Option<&RunReport>,
    ) -> Result<bool, DbError>;
    /// An agent gives a run back (it is stopping): queued again as its next attempt, or
    /// failed after `max_attempts`. None if the lease no longer holds it.
    fn release_lease(
        &self,
        run: &str,
        lease: &str,
        max_attempts: u32,
    ) -> Result<Option<Expired>, DbError>;
    /// Hands back every run whose lease ran out: queued again as its next attempt, or
    /// failed after `max_attempts`.
    fn expire_leases(&self, max_attempts: u32) -> Result<Vec<Expired>, DbError>;
    /// Every lease lasts at least `lease_ms` from now (a server starting again gives its
    /// agents the time to reach it).
    fn extend_leases(&self, lease_ms: u64) -> Result<(), DbError>;
    // ---- run logs
    /// Appends `text` (whole lines) to a run's log.
    fn append_log(&self, run: &str, text: &[u8]) -> Result<(), DbError>;
    /// Up to `max` bytes of a run's log from `offset` (nothing past its end, or for a run
    /// with no log).
    fn read_log(&self, run: &str, offset: u64, max: u64) -> Result<Vec<u8>, DbError>;

    // ---- servers sharing the database
    /// Whether this server leads (runs timers, pollers and lease expiry for everyone):
    /// takes the leadership if no one holds it, keeps it while held. Always true where
    /// one server owns the database; on PostgreSQL an advisory lock held by one
    /// connection, lost with it. Called about once a second.
    fn try_lead(&self) -> Result<bool, DbError>;
    /// Calls `wake` whenever another server queues, hands back or ends a run (so its
    /// queue and waiting agents look at once instead of at their next poll). Nothing to
    /// do where one server owns the database.
    fn listen(&self, wake: std::sync::Arc<dyn Fn(RunChange) + Send + Sync>) -> Result<(), DbError>;
    /// Asks whoever holds `run`'s lease (an agent, or another server) to cancel it at its
    /// next renewal; false if the run is not running under a lease.
    fn request_cancel(&self, run: &str) -> Result<bool, DbError>;
}
