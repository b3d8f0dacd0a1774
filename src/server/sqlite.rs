//! The server's state in SQLite (`server.db`, WAL, `synchronous=FULL`: a run that was
//! accepted survives a crash).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::exec::{RunReport, Status};

use super::db::{
    ms_to_rfc3339, now, now_ms, AgentPool, AgentRecord, Claimed, DbError, Expired, LeaseState,
    NewRun, RunFilter, ServerStore,
};
use super::model::{RunRecord, TaskSpec, Trigger};

/// [`ServerStore`] in one SQLite file.
pub struct SqliteServer {
    conn: Mutex<Connection>,
    prefix: String,
    /// Runs' logs, one file each (`logs/<run>.log` beside `server.db`).
    logs: PathBuf,
}

/// `server.db`'s schema, one entry per version (see [`crate::store::migrate`]).
const MIGRATIONS: &[crate::store::migrate::Migration] = &[
    crate::store::migrate::Migration::Sql(SCHEMA),
    crate::store::migrate::Migration::Sql(AGENTS),
    crate::store::migrate::Migration::Sql("ALTER TABLE runs ADD COLUMN holder TEXT;"),
];

/// Migration 2: agent pools, agents, and the leases of runs they hold.
const AGENTS: &str = "
ALTER TABLE runs ADD COLUMN pool TEXT;
ALTER TABLE runs ADD COLUMN agent TEXT;
ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN lease TEXT;
ALTER TABLE runs ADD COLUMN lease_expires INTEGER;
ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_pool ON runs(pool, status, seq);
CREATE INDEX runs_lease ON runs(lease_expires) WHERE lease IS NOT NULL;
CREATE TABLE agent_pools(name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE agents(id TEXT PRIMARY KEY, pool TEXT NOT NULL, record TEXT NOT NULL,
    last_seen INTEGER NOT NULL);
";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks(
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs(
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, task TEXT NOT NULL,
    status TEXT NOT NULL, trigger TEXT NOT NULL, commit_sha TEXT, branch TEXT,
    queued_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, error TEXT, report TEXT);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, seq);
CREATE INDEX IF NOT EXISTS runs_task ON runs(task, seq);
CREATE TABLE IF NOT EXISTS deliveries(
    source TEXT NOT NULL, id TEXT NOT NULL, task TEXT NOT NULL, received_at TEXT NOT NULL,
    PRIMARY KEY(source, id));
CREATE TABLE IF NOT EXISTS base_images(
    task TEXT NOT NULL, base TEXT NOT NULL, digest TEXT, PRIMARY KEY(task, base));
CREATE TABLE IF NOT EXISTS outputs(task TEXT NOT NULL, image TEXT NOT NULL, PRIMARY KEY(task, image));
CREATE TABLE IF NOT EXISTS timers(
    task TEXT NOT NULL, timer TEXT NOT NULL, last_fired TEXT NOT NULL, PRIMARY KEY(task, timer));
CREATE TABLE IF NOT EXISTS heads(task TEXT PRIMARY KEY, commit_sha TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quick_runs(run_id TEXT PRIMARY KEY, spec TEXT NOT NULL);
";

const RUN_COLS: &str = "seq, id, task, status, trigger, commit_sha, branch, queued_at, \
                        started_at, finished_at, error, report, pool, agent, attempt";

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(RunRecord, String, Option<String>)> {
    let trigger: String = r.get(4)?;
    let status: String = r.get(3)?;
    let status = status.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, e.into())
    })?;
    let report: Option<String> = r.get(11)?;
    Ok((
        RunRecord {
            seq: r.get(0)?,
            id: r.get(1)?,
            task: r.get(2)?,
            status,
            trigger: Trigger::Manual,
            commit: r.get(5)?,
            branch: r.get(6)?,
            queued_at: r.get(7)?,
            started_at: r.get(8)?,
            finished_at: r.get(9)?,
            error: r.get(10)?,
            report: None,
            pool: r.get(12)?,
            agent: r.get(13)?,
            attempt: r.get::<_, i64>(14)?.clamp(1, u32::MAX as i64) as u32,
        },
        trigger,
        report,
    ))
}

fn finish_run(
    (mut rec, trigger, report): (RunRecord, String, Option<String>),
) -> Result<RunRecord, DbError> {
    rec.trigger = serde_json::from_str(&trigger)?;
    rec.report = report.map(|r| serde_json::from_str(&r)).transpose()?;
    Ok(rec)
}

impl SqliteServer {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteServer, DbError> {
        let mut conn = Connection::open(path)?;
        crate::store::configure_sqlite(&conn)?;
        crate::store::migrate::apply(&mut conn, "server.db", MIGRATIONS)?;
        // A per-database run-id prefix, so that two servers on one engine never share a run
        // id (ids name and label Docker resources).
        let prefix: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key='run_prefix'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let prefix = match prefix {
            Some(p) => p,
            None => {
                let r = uuid::Uuid::new_v4().as_u128();
                let letters: String = (0..2)
                    .map(|i| (b'a' + ((r >> (i * 8)) % 26) as u8) as char)
                    .collect();
                let p = format!("c{letters}");
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES('run_prefix', ?1)",
                    params![p],
                )?;
                p
            }
        };
        Ok(SqliteServer {
            conn: Mutex::new(conn),
            prefix,
            logs: path.parent().unwrap_or_else(|| Path::new(".")).join("logs"),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, DbError> {
        self.conn.lock().map_err(|_| DbError::Poisoned)
    }
}

impl SqliteServer {
    /// A run's log file; ids are this store's own, but checked: never a path outside.
    fn log_path(&self, run: &str) -> Result<PathBuf, DbError> {
        if run.is_empty() || !run.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(DbError::Log {
                path: self.logs.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{run:?} is not a run id"),
                ),
            });
        }
        Ok(self.logs.join(format!("{run}.log")))
    }
}

impl ServerStore for SqliteServer {
    fn run_prefix(&self) -> &str {
        &self.prefix
    }

    // ---- tasks

    /// Inserts or replaces; returns false when `create` and the task exists.
    fn put_task(&self, spec: &TaskSpec, create: bool) -> Result<bool, DbError> {
        let c = self.conn()?;
        let json = serde_json::to_string(spec)?;
        let now = now();
        if create {
            let n = c.execute(
                "INSERT OR IGNORE INTO tasks(name, spec, created_at, updated_at) VALUES(?1,?2,?3,?3)",
                params![spec.name, json, now],
            )?;
            Ok(n == 1)
        } else {
            let n = c.execute(
                "UPDATE tasks SET spec=?2, updated_at=?3 WHERE name=?1",
                params![spec.name, json, now],
            )?;
            Ok(n == 1)
        }
    }

    fn task(&self, name: &str) -> Result<Option<TaskSpec>, DbError> {
        let c = self.conn()?;
        let s: Option<String> = c
            .query_row("SELECT spec FROM tasks WHERE name=?1", params![name], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(s.map(|s| serde_json::from_str(&s)).transpose()?)
    }

    fn tasks(&self) -> Result<Vec<TaskSpec>, DbError> {
        let c = self.conn()?;
        let mut st = c.prepare("SELECT spec FROM tasks ORDER BY name")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(serde_json::from_str(&r?)?);
        }
        Ok(out)
    }

    fn delete_task(&self, name: &str) -> Result<bool, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let n = tx.execute("DELETE FROM tasks WHERE name=?1", params![name])?;
        for t in ["base_images", "outputs", "timers", "heads"] {
            tx.execute(&format!("DELETE FROM {t} WHERE task=?1"), params![name])?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    // ---- runs

    /// Queues a run; with `quick`, a run of that definition, stored with the run only
    /// (`acr-task run --no-wait`: no stored task).
    fn enqueue_with(&self, run: &NewRun, quick: Option<&TaskSpec>) -> Result<RunRecord, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let seq: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM runs", [], |r| {
            r.get(0)
        })?;
        let id = format!("{}{seq}", self.prefix);
        let queued_at = now();
        // The pool is the definition's as it is now, read in the same transaction.
        let pool = match quick {
            Some(q) => q.agent_pool.clone(),
            None => {
                let spec: Option<String> = tx
                    .query_row(
                        "SELECT spec FROM tasks WHERE name=?1",
                        params![run.task],
                        |r| r.get(0),
                    )
                    .optional()?;
                match spec {
                    Some(s) => serde_json::from_str::<TaskSpec>(&s)?.agent_pool,
                    None => None,
                }
            }
        };
        tx.execute(
            "INSERT INTO runs(seq, id, task, status, trigger, commit_sha, branch, queued_at, pool)
             VALUES(?1, ?2, ?3, 'Queued', ?4, ?5, ?6, ?7, ?8)",
            params![
                seq,
                id,
                run.task,
                serde_json::to_string(&run.trigger)?,
                run.commit,
                run.branch,
                queued_at,
                pool
            ],
        )?;
        if let Some(spec) = quick {
            tx.execute(
                "INSERT INTO quick_runs(run_id, spec) VALUES(?1, ?2)",
                params![id, serde_json::to_string(spec)?],
            )?;
        }
        tx.commit()?;
        Ok(RunRecord {
            id,
            seq,
            task: run.task.clone(),
            status: crate::exec::Status::Queued,
            trigger: run.trigger.clone(),
            commit: run.commit.clone(),
            branch: run.branch.clone(),
            queued_at,
            started_at: None,
            finished_at: None,
            error: None,
            report: None,
            pool,
            agent: None,
            attempt: 1,
        })
    }

    /// The definition of a quick run (none for runs of stored tasks).
    fn quick_spec(&self, run_id: &str) -> Result<Option<TaskSpec>, DbError> {
        let c = self.conn()?;
        let s: Option<String> = c
            .query_row(
                "SELECT spec FROM quick_runs WHERE run_id=?1",
                params![run_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(s.map(|s| serde_json::from_str(&s)).transpose()?)
    }

    fn run(&self, id: &str) -> Result<Option<RunRecord>, DbError> {
        let c = self.conn()?;
        let row = c
            .query_row(
                &format!("SELECT {RUN_COLS} FROM runs WHERE id=?1"),
                params![id],
                run_from_row,
            )
            .optional()?;
        row.map(finish_run).transpose()
    }

    /// Newest first; `task` filters; at most `limit`.
    fn runs(&self, task: Option<&str>, limit: usize) -> Result<Vec<RunRecord>, DbError> {
        let c = self.conn()?;
        let mut st = c.prepare(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE (?1 IS NULL OR task=?1) ORDER BY seq DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![task, limit as i64], run_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(finish_run(r?)?);
        }
        Ok(out)
    }

    fn runs_page(&self, f: &RunFilter) -> Result<Vec<RunRecord>, DbError> {
        // Only the conditions given, so SQLite can walk (task, seq) or (status, seq).
        let mut sql = format!("SELECT {RUN_COLS} FROM runs WHERE 1=1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(t) = &f.task {
            args.push(t.clone().into());
            sql.push_str(&format!(" AND task=?{}", args.len()));
        }
        if let Some(s) = f.status {
            args.push(s.as_str().to_string().into());
            sql.push_str(&format!(" AND status=?{}", args.len()));
        }
        if let Some(b) = f.before {
            args.push(b.into());
            sql.push_str(&format!(" AND seq<?{}", args.len()));
        }
        args.push((f.limit.clamp(1, 1000) as i64).into());
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ?{}", args.len()));
        let c = self.conn()?;
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args), run_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(finish_run(r?)?);
        }
        Ok(out)
    }

    fn count_with_status(&self, status: Status) -> Result<u64, DbError> {
        let n: i64 = self.conn()?.query_row(
            "SELECT COUNT(*) FROM runs WHERE status=?1",
            params![status.as_str()],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    fn run_counts(&self) -> Result<Vec<(String, Status, u64)>, DbError> {
        let c = self.conn()?;
        let mut st = c.prepare("SELECT task, status, COUNT(*) FROM runs GROUP BY task, status")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (task, status, n) = r?;
            if let Ok(s) = status.parse::<Status>() {
                out.push((task, s, n.max(0) as u64));
            }
        }
        Ok(out)
    }

    /// How far the registry's event outbox has been read by the base-image trigger.
    fn registry_cursor(&self) -> Result<Option<i64>, DbError> {
        let v: Option<String> = self
            .conn()?
            .query_row(
                "SELECT value FROM meta WHERE key='registry_cursor'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.and_then(|v| v.parse().ok()))
    }

    fn set_registry_cursor(&self, seq: i64) -> Result<(), DbError> {
        self.conn()?.execute(
            "INSERT INTO meta(key, value) VALUES('registry_cursor', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![seq.to_string()],
        )?;
        Ok(())
    }

    /// `task`'s queued and running runs, oldest first.
    fn active_runs(&self, task: &str) -> Result<Vec<RunRecord>, DbError> {
        let c = self.conn()?;
        let mut st = c.prepare(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE task=?1 AND status IN ('Queued','Running') \
             ORDER BY seq"
        ))?;
        let rows = st.query_map(params![task], run_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(finish_run(r?)?);
        }
        Ok(out)
    }

    /// Takes the oldest queued run and marks it Running.
    fn claim_next(&self, holder: &str, lease_ms: u64) -> Result<Option<Claimed>, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                &format!(
                    "SELECT {RUN_COLS} FROM runs WHERE status='Queued' AND pool IS NULL \
                     ORDER BY seq LIMIT 1"
                ),
                [],
                run_from_row,
            )
            .optional()?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut rec = finish_run(row)?;
        let lease = uuid::Uuid::new_v4().simple().to_string();
        let started = now();
        tx.execute(
            "UPDATE runs SET status='Running', started_at=?2, lease=?3, lease_expires=?4,
             cancel_requested=0, holder=?5 WHERE id=?1",
            params![
                rec.id,
                started,
                lease,
                now_ms().saturating_add(lease_ms.min(i64::MAX as u64) as i64),
                holder
            ],
        )?;
        tx.commit()?;
        rec.status = crate::exec::Status::Running;
        rec.started_at = Some(started);
        Ok(Some(Claimed { run: rec, lease }))
    }

    fn set_commit(&self, id: &str, commit: &str) -> Result<(), DbError> {
        self.conn()?.execute(
            "UPDATE runs SET commit_sha=?2 WHERE id=?1",
            params![id, commit],
        )?;
        Ok(())
    }

    fn finish(
        &self,
        id: &str,
        status: Status,
        error: Option<&str>,
        report: Option<&RunReport>,
    ) -> Result<(), DbError> {
        let report = report.map(serde_json::to_string).transpose()?;
        self.conn()?.execute(
            "UPDATE runs SET status=?2, error=?3, report=?4, finished_at=?5, lease=NULL,
             lease_expires=NULL WHERE id=?1",
            params![id, status.as_str(), error, report, now()],
        )?;
        Ok(())
    }

    /// Cancels a run that is still queued; false if it is not queued (any more).
    fn cancel_queued(&self, id: &str) -> Result<bool, DbError> {
        let n = self.conn()?.execute(
            "UPDATE runs SET status='Canceled', error='canceled while queued', finished_at=?2
             WHERE id=?1 AND status='Queued'",
            params![id, now()],
        )?;
        Ok(n == 1)
    }

    /// Marks every Running run Failed (they were cut off by a stop); returns their ids.
    fn fail_interrupted(&self, _holder: &str) -> Result<Vec<String>, DbError> {
        // One server owns this database: every running run of no pool was its own.
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let ids: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT id FROM runs WHERE status='Running' AND pool IS NULL ORDER BY seq",
            )?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        tx.execute(
            "UPDATE runs SET status='Failed', error='interrupted by a restart of serve',
             finished_at=?1 WHERE status='Running' AND pool IS NULL",
            params![now()],
        )?;
        tx.commit()?;
        Ok(ids)
    }

    /// Whether `task` has a run in this status.
    fn has_run_with_status(&self, task: &str, status: Status) -> Result<bool, DbError> {
        let n: i64 = self.conn()?.query_row(
            "SELECT COUNT(*) FROM runs WHERE task=?1 AND status=?2",
            params![task, status.as_str()],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    // ---- webhook deliveries

    /// Records a delivery id; false if it was seen before (a replay).
    fn record_delivery(&self, source: &str, id: &str, task: &str) -> Result<bool, DbError> {
        let n = self.conn()?.execute(
            "INSERT OR IGNORE INTO deliveries(source, id, task, received_at) VALUES(?1,?2,?3,?4)",
            params![source, id, task, now()],
        )?;
        Ok(n == 1)
    }

    // ---- base-image index

    /// Replaces what `task` builds on and pushes, after a successful run.
    fn set_dependencies(
        &self,
        task: &str,
        bases: &[(String, Option<String>)],
        outputs: &[String],
    ) -> Result<(), DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        tx.execute("DELETE FROM base_images WHERE task=?1", params![task])?;
        tx.execute("DELETE FROM outputs WHERE task=?1", params![task])?;
        for (base, digest) in bases {
            tx.execute(
                "INSERT OR REPLACE INTO base_images(task, base, digest) VALUES(?1,?2,?3)",
                params![task, base, digest],
            )?;
        }
        for o in outputs {
            tx.execute(
                "INSERT OR IGNORE INTO outputs(task, image) VALUES(?1,?2)",
                params![task, o],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every (task, base image, recorded digest).
    fn base_images(&self) -> Result<Vec<(String, String, Option<String>)>, DbError> {
        let c = self.conn()?;
        let mut st = c.prepare("SELECT task, base, digest FROM base_images ORDER BY task, base")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn outputs(&self, task: &str) -> Result<Vec<String>, DbError> {
        let c = self.conn()?;
        let mut st = c.prepare("SELECT image FROM outputs WHERE task=?1 ORDER BY image")?;
        let rows = st.query_map(params![task], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- timers and watched heads

    fn timer_last_fired(&self, task: &str, timer: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT last_fired FROM timers WHERE task=?1 AND timer=?2",
                params![task, timer],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn set_timer_fired(
        &self,
        task: &str,
        timer: &str,
        seen: Option<&str>,
        at: &str,
    ) -> Result<bool, DbError> {
        let n = match seen {
            None => self.conn()?.execute(
                "INSERT INTO timers(task, timer, last_fired) VALUES(?1,?2,?3)
                 ON CONFLICT(task, timer) DO NOTHING",
                params![task, timer, at],
            )?,
            Some(seen) => self.conn()?.execute(
                "UPDATE timers SET last_fired=?3 WHERE task=?1 AND timer=?2 AND last_fired=?4",
                params![task, timer, at, seen],
            )?,
        };
        Ok(n == 1)
    }

    fn head(&self, task: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT commit_sha FROM heads WHERE task=?1",
                params![task],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn set_head(&self, task: &str, commit: &str) -> Result<(), DbError> {
        self.conn()?.execute(
            "INSERT OR REPLACE INTO heads(task, commit_sha) VALUES(?1,?2)",
            params![task, commit],
        )?;
        Ok(())
    }

    // ---- agent pools, agents and leases

    fn put_pool(&self, pool: &AgentPool, create: bool) -> Result<bool, DbError> {
        let c = self.conn()?;
        let json = serde_json::to_string(pool)?;
        let n = if create {
            c.execute(
                "INSERT OR IGNORE INTO agent_pools(name, record) VALUES(?1, ?2)",
                params![pool.name, json],
            )?
        } else {
            c.execute(
                "UPDATE agent_pools SET record=?2 WHERE name=?1",
                params![pool.name, json],
            )?
        };
        Ok(n == 1)
    }

    fn pool(&self, name: &str) -> Result<Option<AgentPool>, DbError> {
        let s: Option<String> = self
            .conn()?
            .query_row(
                "SELECT record FROM agent_pools WHERE name=?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(s.map(|s| serde_json::from_str(&s)).transpose()?)
    }

    fn pools(&self) -> Result<Vec<AgentPool>, DbError> {
        let c = self.conn()?;
        let mut st = c.prepare("SELECT record FROM agent_pools ORDER BY name")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(serde_json::from_str(&r?)?);
        }
        Ok(out)
    }

    fn delete_pool(&self, name: &str) -> Result<bool, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let n = tx.execute("DELETE FROM agent_pools WHERE name=?1", params![name])?;
        tx.execute("DELETE FROM agents WHERE pool=?1", params![name])?;
        tx.commit()?;
        Ok(n == 1)
    }

    fn pool_counts(&self, pool: &str) -> Result<(u64, u64), DbError> {
        let c = self.conn()?;
        let count = |status: &str| -> Result<u64, DbError> {
            let n: i64 = c.query_row(
                "SELECT COUNT(*) FROM runs WHERE pool=?1 AND status=?2",
                params![pool, status],
                |r| r.get(0),
            )?;
            Ok(n.max(0) as u64)
        };
        Ok((count("Queued")?, count("Running")?))
    }

    fn put_agent(&self, agent: &AgentRecord) -> Result<(), DbError> {
        let now = now_ms();
        let mut a = agent.clone();
        a.last_seen = ms_to_rfc3339(now);
        self.conn()?.execute(
            "INSERT INTO agents(id, pool, record, last_seen) VALUES(?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET pool=excluded.pool, record=excluded.record,
             last_seen=excluded.last_seen",
            params![a.id, a.pool, serde_json::to_string(&a)?, now],
        )?;
        Ok(())
    }

    fn agents(&self, pool: Option<&str>) -> Result<Vec<AgentRecord>, DbError> {
        let c = self.conn()?;
        let mut st = c.prepare(
            "SELECT record, last_seen FROM agents WHERE (?1 IS NULL OR pool=?1) ORDER BY pool, id",
        )?;
        let rows = st.query_map(params![pool], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (json, seen) = r?;
            let mut a: AgentRecord = serde_json::from_str(&json)?;
            a.last_seen = ms_to_rfc3339(seen);
            out.push(a);
        }
        Ok(out)
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, DbError> {
        let row: Option<(String, i64)> = self
            .conn()?
            .query_row(
                "SELECT record, last_seen FROM agents WHERE id=?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            None => Ok(None),
            Some((json, seen)) => {
                let mut a: AgentRecord = serde_json::from_str(&json)?;
                a.last_seen = ms_to_rfc3339(seen);
                Ok(Some(a))
            }
        }
    }

    fn agent_seen(&self, id: &str, draining: bool) -> Result<bool, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let json: Option<String> = tx
            .query_row("SELECT record FROM agents WHERE id=?1", params![id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(json) = json else {
            return Ok(false);
        };
        let mut a: AgentRecord = serde_json::from_str(&json)?;
        a.draining = draining;
        tx.execute(
            "UPDATE agents SET record=?2, last_seen=?3 WHERE id=?1",
            params![id, serde_json::to_string(&a)?, now_ms()],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn remove_agent(&self, id: &str) -> Result<(), DbError> {
        self.conn()?
            .execute("DELETE FROM agents WHERE id=?1", params![id])?;
        Ok(())
    }

    fn claim_leased(
        &self,
        pool: &str,
        agent: &str,
        lease_ms: u64,
    ) -> Result<Option<Claimed>, DbError> {
        let mut c = self.conn()?;
        // IMMEDIATE: the count and the claim see the same queue (one writer at a time).
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let max: Option<String> = tx
            .query_row(
                "SELECT record FROM agent_pools WHERE name=?1",
                params![pool],
                |r| r.get(0),
            )
            .optional()?;
        let Some(max) = max else {
            return Ok(None);
        };
        if let Some(max) = serde_json::from_str::<AgentPool>(&max)?.max_runs {
            let running: i64 = tx.query_row(
                "SELECT COUNT(*) FROM runs WHERE pool=?1 AND status='Running'",
                params![pool],
                |r| r.get(0),
            )?;
            if running >= i64::from(max) {
                return Ok(None);
            }
        }
        let row = tx
            .query_row(
                &format!(
                    "SELECT {RUN_COLS} FROM runs WHERE status='Queued' AND pool=?1 \
                     ORDER BY seq LIMIT 1"
                ),
                params![pool],
                run_from_row,
            )
            .optional()?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut rec = finish_run(row)?;
        let lease = uuid::Uuid::new_v4().simple().to_string();
        let started = now();
        tx.execute(
            "UPDATE runs SET status='Running', started_at=?2, agent=?3, lease=?4,
             lease_expires=?5, cancel_requested=0 WHERE id=?1",
            params![
                rec.id,
                started,
                agent,
                lease,
                now_ms().saturating_add(lease_ms as i64)
            ],
        )?;
        tx.commit()?;
        rec.status = Status::Running;
        rec.started_at = Some(started);
        rec.agent = Some(agent.to_string());
        Ok(Some(Claimed { run: rec, lease }))
    }

    fn renew_lease(&self, run: &str, lease: &str, lease_ms: u64) -> Result<LeaseState, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let cancel: Option<i64> = tx
            .query_row(
                "SELECT cancel_requested FROM runs WHERE id=?1 AND lease=?2 AND status='Running'",
                params![run, lease],
                |r| r.get(0),
            )
            .optional()?;
        let Some(cancel) = cancel else {
            return Ok(LeaseState::Lost);
        };
        tx.execute(
            "UPDATE runs SET lease_expires=?2 WHERE id=?1",
            params![run, now_ms().saturating_add(lease_ms as i64)],
        )?;
        tx.commit()?;
        Ok(LeaseState::Held {
            cancel: cancel != 0,
        })
    }

    fn finish_leased(
        &self,
        run: &str,
        lease: &str,
        status: Status,
        error: Option<&str>,
        report: Option<&RunReport>,
    ) -> Result<bool, DbError> {
        let report = report.map(serde_json::to_string).transpose()?;
        let n = self.conn()?.execute(
            "UPDATE runs SET status=?3, error=?4, report=?5, finished_at=?6, lease=NULL,
             lease_expires=NULL WHERE id=?1 AND lease=?2 AND status='Running'",
            params![run, lease, status.as_str(), error, report, now()],
        )?;
        Ok(n == 1)
    }

    fn release_lease(
        &self,
        run: &str,
        lease: &str,
        max_attempts: u32,
    ) -> Result<Option<Expired>, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row: Option<(Option<String>, i64)> = tx
            .query_row(
                "SELECT agent, attempt FROM runs WHERE id=?1 AND lease=?2 AND status='Running'",
                params![run, lease],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((agent, attempt)) = row else {
            return Ok(None);
        };
        let e = hand_back(
            &tx,
            run,
            agent,
            attempt,
            max_attempts,
            "handed back by its agent",
        )?;
        tx.commit()?;
        Ok(Some(e))
    }

    fn expire_leases(&self, max_attempts: u32) -> Result<Vec<Expired>, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let rows: Vec<(String, Option<String>, i64)> = {
            let mut st = tx.prepare(
                "SELECT id, agent, attempt FROM runs WHERE status='Running' AND lease IS NOT NULL
                 AND lease_expires < ?1 ORDER BY seq",
            )?;
            let rows =
                st.query_map(params![now_ms()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (run, agent, attempt) in rows {
            let why = super::db::lapsed(agent.as_deref());
            out.push(hand_back(&tx, &run, agent, attempt, max_attempts, why)?);
        }
        tx.commit()?;
        Ok(out)
    }

    fn extend_leases(&self, lease_ms: u64) -> Result<(), DbError> {
        self.conn()?.execute(
            "UPDATE runs SET lease_expires = MAX(lease_expires, ?1) WHERE lease IS NOT NULL",
            params![now_ms().saturating_add(lease_ms.min(i64::MAX as u64) as i64)],
        )?;
        Ok(())
    }

    fn append_log(&self, run: &str, text: &[u8]) -> Result<(), DbError> {
        use std::io::Write as _;
        let path = self.log_path(run)?;
        let fail = |source| DbError::Log {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text))
            .map_err(fail)
    }

    fn read_log(&self, run: &str, offset: u64, max: u64) -> Result<Vec<u8>, DbError> {
        use std::io::{Read as _, Seek as _};
        let path = self.log_path(run)?;
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(DbError::Log { path, source }),
        };
        let mut buf = Vec::new();
        f.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| f.take(max).read_to_end(&mut buf))
            .map_err(|source| DbError::Log { path, source })?;
        Ok(buf)
    }

    fn try_lead(&self) -> Result<bool, DbError> {
        // One server per data directory (its `serve.lock`): it always leads.
        Ok(true)
    }

    fn listen(
        &self,
        _wake: std::sync::Arc<dyn Fn(super::db::RunChange) + Send + Sync>,
    ) -> Result<(), DbError> {
        Ok(())
    }

    fn request_cancel(&self, run: &str) -> Result<bool, DbError> {
        let n = self.conn()?.execute(
            "UPDATE runs SET cancel_requested=1 WHERE id=?1 AND status='Running' AND lease IS NOT NULL",
            params![run],
        )?;
        Ok(n == 1)
    }
}

/// A leased run back to the queue as its next attempt, or failed after the last one.
fn hand_back(
    tx: &rusqlite::Transaction<'_>,
    run: &str,
    agent: Option<String>,
    attempt: i64,
    max_attempts: u32,
    why: &str,
) -> Result<Expired, DbError> {
    let attempt = attempt.clamp(1, u32::MAX as i64) as u32;
    // A run someone asked to cancel is not run again.
    let cancel: i64 = tx.query_row(
        "SELECT cancel_requested FROM runs WHERE id=?1",
        params![run],
        |r| r.get(0),
    )?;
    let requeued = attempt < max_attempts && cancel == 0;
    if requeued {
        tx.execute(
            "UPDATE runs SET status='Queued', attempt=attempt+1, lease=NULL, lease_expires=NULL,
             started_at=NULL WHERE id=?1",
            params![run],
        )?;
    } else {
        let (status, error) = if cancel != 0 {
            ("Canceled", format!("canceled; {why} before it stopped"))
        } else {
            (
                "Failed",
                format!("{why} (attempt {attempt}, the last: {max_attempts} may end this way)"),
            )
        };
        tx.execute(
            "UPDATE runs SET status=?2, error=?3, finished_at=?4, lease=NULL,
             lease_expires=NULL WHERE id=?1",
            params![run, status, error, now()],
        )?;
    }
    Ok(Expired {
        run: run.to_string(),
        agent,
        attempt,
        requeued,
    })
}
