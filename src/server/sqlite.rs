//! The server's state in SQLite (`server.db`, WAL, `synchronous=FULL`: a run that was
//! accepted survives a crash).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::exec::{RunReport, Status};

use super::db::{now, DbError, NewRun, RunFilter, ServerStore};
use super::model::{RunRecord, TaskSpec, Trigger};

/// [`ServerStore`] in one SQLite file.
pub struct SqliteServer {
    conn: Mutex<Connection>,
    prefix: String,
}

/// `server.db`'s schema, one entry per version (see [`crate::store::migrate`]).
const MIGRATIONS: &[crate::store::migrate::Migration] =
    &[crate::store::migrate::Migration::Sql(SCHEMA)];

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
                        started_at, finished_at, error, report";

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
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, DbError> {
        self.conn.lock().map_err(|_| DbError::Poisoned)
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
        tx.execute(
            "INSERT INTO runs(seq, id, task, status, trigger, commit_sha, branch, queued_at)
             VALUES(?1, ?2, ?3, 'Queued', ?4, ?5, ?6, ?7)",
            params![
                seq,
                id,
                run.task,
                serde_json::to_string(&run.trigger)?,
                run.commit,
                run.branch,
                queued_at
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
    fn claim_next(&self) -> Result<Option<RunRecord>, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let row = tx
            .query_row(
                &format!("SELECT {RUN_COLS} FROM runs WHERE status='Queued' ORDER BY seq LIMIT 1"),
                [],
                run_from_row,
            )
            .optional()?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut rec = finish_run(row)?;
        let started = now();
        tx.execute(
            "UPDATE runs SET status='Running', started_at=?2 WHERE id=?1",
            params![rec.id, started],
        )?;
        tx.commit()?;
        rec.status = crate::exec::Status::Running;
        rec.started_at = Some(started);
        Ok(Some(rec))
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
            "UPDATE runs SET status=?2, error=?3, report=?4, finished_at=?5 WHERE id=?1",
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
    fn fail_interrupted(&self) -> Result<Vec<String>, DbError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let ids: Vec<String> = {
            let mut st = tx.prepare("SELECT id FROM runs WHERE status='Running' ORDER BY seq")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        tx.execute(
            "UPDATE runs SET status='Failed', error='interrupted by a restart of serve',
             finished_at=?1 WHERE status='Running'",
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

    fn set_timer_fired(&self, task: &str, timer: &str, at: &str) -> Result<(), DbError> {
        self.conn()?.execute(
            "INSERT OR REPLACE INTO timers(task, timer, last_fired) VALUES(?1,?2,?3)",
            params![task, timer, at],
        )?;
        Ok(())
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
}
