//! The server's state in PostgreSQL (`serve --database postgres://...`): the same
//! [`ServerStore`] as [`super::sqlite`], for a database several machines can reach.
//! Claims take `FOR UPDATE SKIP LOCKED`, so callers never wait on each other's rows;
//! the schema is versioned in `acr_task_migrations` and brought up to date at open,
//! under an advisory lock (two servers starting at once migrate once).
//!
//! The driver is async (`tokio-postgres`); the trait is not, so every call runs on a
//! runtime of this store's own and the caller's thread waits for it, as it would for
//! SQLite's file.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use crate::pg::{args, Args, Database, PgError};

use crate::exec::{RunReport, Status};

use super::db::{
    ms_to_rfc3339, now, now_ms, AgentPool, AgentRecord, Claimed, DbError, Expired, LeaseState,
    NewRun, RunChange, RunFilter, ServerStore,
};
use super::model::{RunRecord, TaskSpec};

/// Schema versions, in order; `acr_task_migrations` records those applied.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks(
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE SEQUENCE run_seq;
CREATE TABLE runs(
    seq BIGINT PRIMARY KEY, id TEXT NOT NULL UNIQUE, task TEXT NOT NULL,
    status TEXT NOT NULL, trigger TEXT NOT NULL, commit_sha TEXT, branch TEXT,
    queued_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, error TEXT, report TEXT,
    pool TEXT, agent TEXT, attempt INTEGER NOT NULL DEFAULT 1, lease TEXT,
    lease_expires BIGINT, cancel_requested BOOLEAN NOT NULL DEFAULT FALSE);
CREATE INDEX runs_status ON runs(status, seq);
CREATE INDEX runs_task ON runs(task, seq);
CREATE INDEX runs_pool ON runs(pool, status, seq);
CREATE INDEX runs_lease ON runs(lease_expires) WHERE lease IS NOT NULL;
CREATE TABLE deliveries(
    source TEXT NOT NULL, id TEXT NOT NULL, task TEXT NOT NULL, received_at TEXT NOT NULL,
    PRIMARY KEY(source, id));
CREATE TABLE base_images(
    task TEXT NOT NULL, base TEXT NOT NULL, digest TEXT, PRIMARY KEY(task, base));
CREATE TABLE outputs(task TEXT NOT NULL, image TEXT NOT NULL, PRIMARY KEY(task, image));
CREATE TABLE timers(
    task TEXT NOT NULL, timer TEXT NOT NULL, last_fired TEXT NOT NULL, PRIMARY KEY(task, timer));
CREATE TABLE heads(task TEXT PRIMARY KEY, commit_sha TEXT NOT NULL);
CREATE TABLE quick_runs(run_id TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE agent_pools(name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE agents(id TEXT PRIMARY KEY, pool TEXT NOT NULL, record TEXT NOT NULL,
    last_seen BIGINT NOT NULL);
",
    "
CREATE FUNCTION acr_task_runs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('acr_task_runs', NEW.status);
    RETURN NULL;
END $$;
CREATE TRIGGER runs_notify AFTER INSERT OR UPDATE OF status ON runs
    FOR EACH ROW WHEN (NEW.status <> 'Running') EXECUTE FUNCTION acr_task_runs_notify();
",
    "
CREATE TABLE run_logs(run TEXT NOT NULL, start BIGINT NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY(run, start));
ALTER TABLE runs ADD COLUMN holder TEXT;
",
];

/// The channel a run's change (queued, queued again, ended) is announced on; one
/// notification per status a transaction wrote (PostgreSQL folds repeats).
const RUNS_CHANNEL: &str = "acr_task_runs";

/// The advisory lock whose holder leads the servers sharing a database ("acrlead").
const LEADER_LOCK: i64 = 0x0061_6372_6c65_6164;

/// How long the leader's check of its own connection may take before it steps down.
const LEADER_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

const RUN_COLS: &str = "seq, id, task, status, trigger, commit_sha, branch, queued_at, \
                        started_at, finished_at, error, report, pool, agent, attempt";

fn pg(e: tokio_postgres::Error) -> DbError {
    PgError::from(e).into()
}

fn run_from_row(r: &Row) -> Result<RunRecord, DbError> {
    let status: String = r.try_get(3).map_err(pg)?;
    let trigger: String = r.try_get(4).map_err(pg)?;
    let report: Option<String> = r.try_get(11).map_err(pg)?;
    let attempt: i32 = r.try_get(14).map_err(pg)?;
    Ok(RunRecord {
        seq: r.try_get(0).map_err(pg)?,
        id: r.try_get(1).map_err(pg)?,
        task: r.try_get(2).map_err(pg)?,
        status: status.parse().map_err(DbError::Postgres)?,
        trigger: serde_json::from_str(&trigger)?,
        commit: r.try_get(5).map_err(pg)?,
        branch: r.try_get(6).map_err(pg)?,
        queued_at: r.try_get(7).map_err(pg)?,
        started_at: r.try_get(8).map_err(pg)?,
        finished_at: r.try_get(9).map_err(pg)?,
        error: r.try_get(10).map_err(pg)?,
        report: report.map(|r| serde_json::from_str(&r)).transpose()?,
        pool: r.try_get(12).map_err(pg)?,
        agent: r.try_get(13).map_err(pg)?,
        attempt: attempt.max(1) as u32,
    })
}

fn runs_from(rows: &[Row]) -> Result<Vec<RunRecord>, DbError> {
    rows.iter().map(run_from_row).collect()
}

/// [`ServerStore`] in a PostgreSQL database.
pub struct PgServer {
    db: Database,
    prefix: String,
    /// The connection that holds (or tries for) the leader's advisory lock: a session
    /// lock lives and dies with its connection.
    leader: Arc<Mutex<Leader>>,
}

#[derive(Default)]
struct Leader {
    client: Option<Client>,
    holding: bool,
}

impl PgServer {
    /// Connects to `target`, brings the schema up to date and reads (or makes) the run-id
    /// prefix. Says what to check when the database does not answer.
    pub fn open(target: &crate::pg::Target) -> Result<PgServer, DbError> {
        let db = Database::new(target, "acr-task-pg")?;
        let mut store = PgServer {
            db,
            prefix: String::new(),
            leader: Default::default(),
        };
        store.prefix = store
            .call(|mut c| async move {
                let c = c.client()?;
                crate::pg::migrate(c, "acr_task_migrations", MIGRATIONS).await?;
                run_prefix(c).await
            })
            .map_err(|e| match e {
                DbError::Postgres(m) => DbError::Postgres(format!(
                    "the database at --database does not answer as it should: {m}"
                )),
                e => e,
            })?;
        Ok(store)
    }

    /// Runs `f` with a connection and waits for it.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(crate::pg::Conn) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, DbError>> + Send,
    {
        self.db.call(f)
    }

    /// Runs one statement; the rows it returns.
    fn query(&self, sql: &'static str, args: Args) -> Result<Vec<Row>, DbError> {
        Ok(self.db.query(sql, args)?)
    }

    /// Runs one statement; how many rows it changed.
    fn execute(&self, sql: &'static str, args: Args) -> Result<u64, DbError> {
        Ok(self.db.execute(sql, args)?)
    }
}

/// The database's run-id prefix (made once, like SQLite's).
async fn run_prefix(c: &mut Client) -> Result<String, DbError> {
    let r = uuid::Uuid::new_v4().as_u128();
    let letters: String = (0..2)
        .map(|i| (b'a' + ((r >> (i * 8)) % 26) as u8) as char)
        .collect();
    c.execute(
        "INSERT INTO meta(key, value) VALUES('run_prefix', $1) ON CONFLICT (key) DO NOTHING",
        &[&format!("p{letters}")],
    )
    .await
    .map_err(pg)?;
    let row = c
        .query_one("SELECT value FROM meta WHERE key='run_prefix'", &[])
        .await
        .map_err(pg)?;
    Ok(row.get(0))
}

/// Listens on [`RUNS_CHANNEL`] on a connection of its own, calling `wake` for every
/// notification (and once on connecting: what happened while away is looked at too);
/// returns when the connection ends.
async fn listen_once(
    target: &crate::pg::Target,
    wake: &Arc<dyn Fn(RunChange) + Send + Sync>,
) -> Result<(), DbError> {
    use futures_util::StreamExt as _;
    let (client, mut connection) = target.connect().await.map_err(pg)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<RunChange>();
    let drive = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    // The payload is the run's new status.
                    let change = match n.payload() {
                        "Queued" => RunChange::Queued,
                        _ => RunChange::Ended,
                    };
                    if tx.send(change).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "run-change listener's connection");
                    return;
                }
            }
        }
    });
    let listened = client
        .batch_execute(&format!("LISTEN {RUNS_CHANNEL}"))
        .await
        .map_err(pg);
    if let Err(e) = listened {
        drive.abort();
        return Err(e);
    }
    // What happened while away is looked at too.
    wake(RunChange::Queued);
    while let Some(change) = rx.recv().await {
        wake(change);
    }
    Ok(())
}

/// A leased run back to the queue as its next attempt, or ended after the last one (or
/// when someone asked to cancel it).
async fn hand_back(
    tx: &tokio_postgres::Transaction<'_>,
    run: &str,
    agent: Option<String>,
    attempt: i32,
    cancel: bool,
    max_attempts: u32,
    why: &str,
) -> Result<Expired, DbError> {
    let attempt = attempt.max(1) as u32;
    let requeued = attempt < max_attempts && !cancel;
    if requeued {
        tx.execute(
            "UPDATE runs SET status='Queued', attempt=attempt+1, lease=NULL, lease_expires=NULL,
             started_at=NULL WHERE id=$1",
            &[&run],
        )
        .await
        .map_err(pg)?;
    } else {
        let (status, error) = if cancel {
            ("Canceled", format!("canceled; {why} before it stopped"))
        } else {
            (
                "Failed",
                format!("{why} (attempt {attempt}, the last: {max_attempts} may end this way)"),
            )
        };
        tx.execute(
            "UPDATE runs SET status=$2, error=$3, finished_at=$4, lease=NULL,
             lease_expires=NULL WHERE id=$1",
            &[&run, &status, &error, &now()],
        )
        .await
        .map_err(pg)?;
    }
    Ok(Expired {
        run: run.to_string(),
        agent,
        attempt,
        requeued,
    })
}

impl ServerStore for PgServer {
    fn run_prefix(&self) -> &str {
        &self.prefix
    }

    fn put_task(&self, spec: &TaskSpec, create: bool) -> Result<bool, DbError> {
        let json = serde_json::to_string(spec)?;
        let n = if create {
            self.execute(
                "INSERT INTO tasks(name, spec, created_at, updated_at) VALUES($1,$2,$3,$3)
                 ON CONFLICT (name) DO NOTHING",
                args![spec.name.clone(), json, now()],
            )?
        } else {
            self.execute(
                "UPDATE tasks SET spec=$2, updated_at=$3 WHERE name=$1",
                args![spec.name.clone(), json, now()],
            )?
        };
        Ok(n == 1)
    }

    fn task(&self, name: &str) -> Result<Option<TaskSpec>, DbError> {
        let rows = self.query(
            "SELECT spec FROM tasks WHERE name=$1",
            args![name.to_string()],
        )?;
        rows.first()
            .map(|r| Ok(serde_json::from_str(r.get::<_, &str>(0))?))
            .transpose()
    }

    fn tasks(&self) -> Result<Vec<TaskSpec>, DbError> {
        self.query("SELECT spec FROM tasks ORDER BY name", args![])?
            .iter()
            .map(|r| Ok(serde_json::from_str(r.get::<_, &str>(0))?))
            .collect()
    }

    fn delete_task(&self, name: &str) -> Result<bool, DbError> {
        let name = name.to_string();
        self.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            let n = tx
                .execute("DELETE FROM tasks WHERE name=$1", &[&name])
                .await
                .map_err(pg)?;
            for sql in [
                "DELETE FROM base_images WHERE task=$1",
                "DELETE FROM outputs WHERE task=$1",
                "DELETE FROM timers WHERE task=$1",
                "DELETE FROM heads WHERE task=$1",
            ] {
                tx.execute(sql, &[&name]).await.map_err(pg)?;
            }
            tx.commit().await.map_err(pg)?;
            Ok(n == 1)
        })
    }

    fn enqueue_with(&self, run: &NewRun, quick: Option<&TaskSpec>) -> Result<RunRecord, DbError> {
        let (run, quick, prefix) = (run.clone(), quick.cloned(), self.prefix.clone());
        let trigger = serde_json::to_string(&run.trigger)?;
        let quick_json = quick.as_ref().map(serde_json::to_string).transpose()?;
        self.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            let seq: i64 = tx
                .query_one("SELECT nextval('run_seq')", &[])
                .await
                .map_err(pg)?
                .get(0);
            let id = format!("{prefix}{seq}");
            let pool = match &quick {
                Some(q) => q.agent_pool.clone(),
                None => {
                    let row = tx
                        .query_opt("SELECT spec FROM tasks WHERE name=$1", &[&run.task])
                        .await
                        .map_err(pg)?;
                    match row {
                        Some(r) => serde_json::from_str::<TaskSpec>(r.get::<_, &str>(0))?.agent_pool,
                        None => None,
                    }
                }
            };
            let queued_at = now();
            tx.execute(
                "INSERT INTO runs(seq, id, task, status, trigger, commit_sha, branch, queued_at, pool)
                 VALUES($1, $2, $3, 'Queued', $4, $5, $6, $7, $8)",
                &[&seq, &id, &run.task, &trigger, &run.commit, &run.branch, &queued_at, &pool],
            )
            .await
            .map_err(pg)?;
            if let Some(spec) = quick_json {
                tx.execute(
                    "INSERT INTO quick_runs(run_id, spec) VALUES($1, $2)",
                    &[&id, &spec],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)?;
            Ok(RunRecord {
                id,
                seq,
                task: run.task,
                status: Status::Queued,
                trigger: run.trigger,
                commit: run.commit,
                branch: run.branch,
                queued_at,
                started_at: None,
                finished_at: None,
                error: None,
                report: None,
                pool,
                agent: None,
                attempt: 1,
            })
        })
    }

    fn quick_spec(&self, run_id: &str) -> Result<Option<TaskSpec>, DbError> {
        let rows = self.query(
            "SELECT spec FROM quick_runs WHERE run_id=$1",
            args![run_id.to_string()],
        )?;
        rows.first()
            .map(|r| Ok(serde_json::from_str(r.get::<_, &str>(0))?))
            .transpose()
    }

    fn run(&self, id: &str) -> Result<Option<RunRecord>, DbError> {
        let rows = self.query(
            "SELECT seq, id, task, status, trigger, commit_sha, branch, queued_at, started_at, \
             finished_at, error, report, pool, agent, attempt FROM runs WHERE id=$1",
            args![id.to_string()],
        )?;
        rows.first().map(run_from_row).transpose()
    }

    fn runs(&self, task: Option<&str>, limit: usize) -> Result<Vec<RunRecord>, DbError> {
        runs_from(&self.query(
            "SELECT seq, id, task, status, trigger, commit_sha, branch, queued_at, started_at, \
             finished_at, error, report, pool, agent, attempt FROM runs \
             WHERE ($1::TEXT IS NULL OR task=$1) ORDER BY seq DESC LIMIT $2",
            args![
                task.map(str::to_string),
                limit.min(i64::MAX as usize) as i64
            ],
        )?)
    }

    fn runs_page(&self, f: &RunFilter) -> Result<Vec<RunRecord>, DbError> {
        let mut sql = format!("SELECT {RUN_COLS} FROM runs WHERE TRUE");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        if let Some(t) = &f.task {
            args.push(Box::new(t.clone()));
            sql.push_str(&format!(" AND task=${}", args.len()));
        }
        if let Some(s) = f.status {
            args.push(Box::new(s.as_str().to_string()));
            sql.push_str(&format!(" AND status=${}", args.len()));
        }
        if let Some(b) = f.before {
            args.push(Box::new(b));
            sql.push_str(&format!(" AND seq<${}", args.len()));
        }
        args.push(Box::new(f.limit.clamp(1, 1000) as i64));
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${}", args.len()));
        let rows = self.call(move |mut c| async move {
            let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as _).collect();
            c.client()?.query(&sql, &refs).await.map_err(pg)
        })?;
        runs_from(&rows)
    }

    fn count_with_status(&self, status: Status) -> Result<u64, DbError> {
        let rows = self.query(
            "SELECT COUNT(*) FROM runs WHERE status=$1",
            args![status.as_str().to_string()],
        )?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0).max(0) as u64)
    }

    fn run_counts(&self) -> Result<Vec<(String, Status, u64)>, DbError> {
        let rows = self.query(
            "SELECT task, status, COUNT(*) FROM runs GROUP BY task, status",
            args![],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let status = r.get::<_, &str>(1).parse::<Status>().ok()?;
                Some((
                    r.get::<_, String>(0),
                    status,
                    r.get::<_, i64>(2).max(0) as u64,
                ))
            })
            .collect())
    }

    fn registry_cursor(&self) -> Result<Option<i64>, DbError> {
        let rows = self.query(
            "SELECT value FROM meta WHERE key='registry_cursor'",
            args![],
        )?;
        Ok(rows.first().and_then(|r| r.get::<_, &str>(0).parse().ok()))
    }

    fn set_registry_cursor(&self, seq: i64) -> Result<(), DbError> {
        self.execute(
            "INSERT INTO meta(key, value) VALUES('registry_cursor', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            args![seq.to_string()],
        )?;
        Ok(())
    }

    fn active_runs(&self, task: &str) -> Result<Vec<RunRecord>, DbError> {
        runs_from(&self.query(
            "SELECT seq, id, task, status, trigger, commit_sha, branch, queued_at, started_at, \
             finished_at, error, report, pool, agent, attempt FROM runs \
             WHERE task=$1 AND status IN ('Queued','Running') ORDER BY seq",
            args![task.to_string()],
        )?)
    }

    fn claim_next(&self, holder: &str, lease_ms: u64) -> Result<Option<Claimed>, DbError> {
        let lease = uuid::Uuid::new_v4().simple().to_string();
        let expires = now_ms().saturating_add(lease_ms.min(i64::MAX as u64) as i64);
        let rows = self.query(
            "UPDATE runs SET status='Running', started_at=$1, lease=$2, lease_expires=$3,
                 cancel_requested=FALSE, holder=$4 WHERE seq = (
                 SELECT seq FROM runs WHERE status='Queued' AND pool IS NULL
                 ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING seq, id, task, status, trigger, commit_sha, branch, queued_at, started_at,
                 finished_at, error, report, pool, agent, attempt",
            args![now(), lease.clone(), expires, holder.to_string()],
        )?;
        Ok(match rows.first() {
            Some(r) => Some(Claimed {
                run: run_from_row(r)?,
                lease,
            }),
            None => None,
        })
    }

    fn set_commit(&self, id: &str, commit: &str) -> Result<(), DbError> {
        self.execute(
            "UPDATE runs SET commit_sha=$2 WHERE id=$1",
            args![id.to_string(), commit.to_string()],
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
        self.execute(
            "UPDATE runs SET status=$2, error=$3, report=$4, finished_at=$5, lease=NULL,
             lease_expires=NULL WHERE id=$1",
            args![
                id.to_string(),
                status.as_str().to_string(),
                error.map(str::to_string),
                report,
                now()
            ],
        )?;
        Ok(())
    }

    fn cancel_queued(&self, id: &str) -> Result<bool, DbError> {
        let n = self.execute(
            "UPDATE runs SET status='Canceled', error='canceled while queued', finished_at=$2
             WHERE id=$1 AND status='Queued'",
            args![id.to_string(), now()],
        )?;
        Ok(n == 1)
    }

    fn fail_interrupted(&self, holder: &str) -> Result<Vec<String>, DbError> {
        let rows = self.query(
            "UPDATE runs SET status='Failed', error='interrupted by a restart of serve',
             finished_at=$1, lease=NULL, lease_expires=NULL
             WHERE status='Running' AND pool IS NULL AND (holder=$2 OR lease IS NULL)
             RETURNING id, seq",
            args![now(), holder.to_string()],
        )?;
        let mut ids: Vec<(i64, String)> = rows.iter().map(|r| (r.get(1), r.get(0))).collect();
        ids.sort();
        Ok(ids.into_iter().map(|(_, id)| id).collect())
    }

    fn has_run_with_status(&self, task: &str, status: Status) -> Result<bool, DbError> {
        let rows = self.query(
            "SELECT EXISTS(SELECT 1 FROM runs WHERE task=$1 AND status=$2)",
            args![task.to_string(), status.as_str().to_string()],
        )?;
        Ok(rows.first().map(|r| r.get::<_, bool>(0)).unwrap_or(false))
    }

    fn record_delivery(&self, source: &str, id: &str, task: &str) -> Result<bool, DbError> {
        let n = self.execute(
            "INSERT INTO deliveries(source, id, task, received_at) VALUES($1,$2,$3,$4)
             ON CONFLICT DO NOTHING",
            args![source.to_string(), id.to_string(), task.to_string(), now()],
        )?;
        Ok(n == 1)
    }

    fn set_dependencies(
        &self,
        task: &str,
        bases: &[(String, Option<String>)],
        outputs: &[String],
    ) -> Result<(), DbError> {
        let (task, bases, outputs) = (task.to_string(), bases.to_vec(), outputs.to_vec());
        self.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            tx.execute("DELETE FROM base_images WHERE task=$1", &[&task])
                .await
                .map_err(pg)?;
            tx.execute("DELETE FROM outputs WHERE task=$1", &[&task])
                .await
                .map_err(pg)?;
            for (base, digest) in &bases {
                tx.execute(
                    "INSERT INTO base_images(task, base, digest) VALUES($1,$2,$3)
                     ON CONFLICT (task, base) DO UPDATE SET digest = excluded.digest",
                    &[&task, base, digest],
                )
                .await
                .map_err(pg)?;
            }
            for o in &outputs {
                tx.execute(
                    "INSERT INTO outputs(task, image) VALUES($1,$2) ON CONFLICT DO NOTHING",
                    &[&task, o],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })
    }

    fn base_images(&self) -> Result<Vec<(String, String, Option<String>)>, DbError> {
        Ok(self
            .query(
                "SELECT task, base, digest FROM base_images ORDER BY task, base",
                args![],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    fn outputs(&self, task: &str) -> Result<Vec<String>, DbError> {
        Ok(self
            .query(
                "SELECT image FROM outputs WHERE task=$1 ORDER BY image",
                args![task.to_string()],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn timer_last_fired(&self, task: &str, timer: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .query(
                "SELECT last_fired FROM timers WHERE task=$1 AND timer=$2",
                args![task.to_string(), timer.to_string()],
            )?
            .first()
            .map(|r| r.get(0)))
    }

    fn set_timer_fired(
        &self,
        task: &str,
        timer: &str,
        seen: Option<&str>,
        at: &str,
    ) -> Result<bool, DbError> {
        let (task, timer, at) = (task.to_string(), timer.to_string(), at.to_string());
        let n = match seen {
            None => self.execute(
                "INSERT INTO timers(task, timer, last_fired) VALUES($1,$2,$3)
                 ON CONFLICT (task, timer) DO NOTHING",
                args![task, timer, at],
            )?,
            Some(seen) => self.execute(
                "UPDATE timers SET last_fired=$3 WHERE task=$1 AND timer=$2 AND last_fired=$4",
                args![task, timer, at, seen.to_string()],
            )?,
        };
        Ok(n == 1)
    }

    fn head(&self, task: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .query(
                "SELECT commit_sha FROM heads WHERE task=$1",
                args![task.to_string()],
            )?
            .first()
            .map(|r| r.get(0)))
    }

    fn set_head(&self, task: &str, commit: &str) -> Result<(), DbError> {
        self.execute(
            "INSERT INTO heads(task, commit_sha) VALUES($1,$2)
             ON CONFLICT (task) DO UPDATE SET commit_sha = excluded.commit_sha",
            args![task.to_string(), commit.to_string()],
        )?;
        Ok(())
    }

    fn put_pool(&self, pool: &AgentPool, create: bool) -> Result<bool, DbError> {
        let json = serde_json::to_string(pool)?;
        let n = if create {
            self.execute(
                "INSERT INTO agent_pools(name, record) VALUES($1, $2) ON CONFLICT DO NOTHING",
                args![pool.name.clone(), json],
            )?
        } else {
            self.execute(
                "UPDATE agent_pools SET record=$2 WHERE name=$1",
                args![pool.name.clone(), json],
            )?
        };
        Ok(n == 1)
    }

    fn pool(&self, name: &str) -> Result<Option<AgentPool>, DbError> {
        self.query(
            "SELECT record FROM agent_pools WHERE name=$1",
            args![name.to_string()],
        )?
        .first()
        .map(|r| Ok(serde_json::from_str(r.get::<_, &str>(0))?))
        .transpose()
    }

    fn pools(&self) -> Result<Vec<AgentPool>, DbError> {
        self.query("SELECT record FROM agent_pools ORDER BY name", args![])?
            .iter()
            .map(|r| Ok(serde_json::from_str(r.get::<_, &str>(0))?))
            .collect()
    }

    fn delete_pool(&self, name: &str) -> Result<bool, DbError> {
        let name = name.to_string();
        self.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            let n = tx
                .execute("DELETE FROM agent_pools WHERE name=$1", &[&name])
                .await
                .map_err(pg)?;
            tx.execute("DELETE FROM agents WHERE pool=$1", &[&name])
                .await
                .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(n == 1)
        })
    }

    fn pool_counts(&self, pool: &str) -> Result<(u64, u64), DbError> {
        let rows = self.query(
            "SELECT COUNT(*) FILTER (WHERE status='Queued'), COUNT(*) FILTER (WHERE status='Running')
             FROM runs WHERE pool=$1",
            args![pool.to_string()],
        )?;
        Ok(rows
            .first()
            .map(|r| {
                (
                    r.get::<_, i64>(0).max(0) as u64,
                    r.get::<_, i64>(1).max(0) as u64,
                )
            })
            .unwrap_or((0, 0)))
    }

    fn put_agent(&self, agent: &AgentRecord) -> Result<(), DbError> {
        let now = now_ms();
        let mut a = agent.clone();
        a.last_seen = ms_to_rfc3339(now);
        self.execute(
            "INSERT INTO agents(id, pool, record, last_seen) VALUES($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET pool=excluded.pool, record=excluded.record,
             last_seen=excluded.last_seen",
            args![
                a.id.clone(),
                a.pool.clone(),
                serde_json::to_string(&a)?,
                now
            ],
        )?;
        Ok(())
    }

    fn agents(&self, pool: Option<&str>) -> Result<Vec<AgentRecord>, DbError> {
        self.query(
            "SELECT record, last_seen FROM agents WHERE ($1::TEXT IS NULL OR pool=$1)
             ORDER BY pool, id",
            args![pool.map(str::to_string)],
        )?
        .iter()
        .map(|r| {
            let mut a: AgentRecord = serde_json::from_str(r.get::<_, &str>(0))?;
            a.last_seen = ms_to_rfc3339(r.get(1));
            Ok(a)
        })
        .collect()
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, DbError> {
        self.query(
            "SELECT record, last_seen FROM agents WHERE id=$1",
            args![id.to_string()],
        )?
        .first()
        .map(|r| {
            let mut a: AgentRecord = serde_json::from_str(r.get::<_, &str>(0))?;
            a.last_seen = ms_to_rfc3339(r.get(1));
            Ok(a)
        })
        .transpose()
    }

    fn agent_seen(&self, id: &str, draining: bool) -> Result<bool, DbError> {
        // One statement: the draining flag set inside the record, the time beside it.
        let n = self.execute(
            "UPDATE agents SET last_seen=$3,
                 record = jsonb_set(record::jsonb, '{draining}', to_jsonb($2::boolean))::text
             WHERE id=$1",
            args![id.to_string(), draining, now_ms()],
        )?;
        Ok(n == 1)
    }

    fn remove_agent(&self, id: &str) -> Result<(), DbError> {
        self.execute("DELETE FROM agents WHERE id=$1", args![id.to_string()])?;
        Ok(())
    }

    fn claim_leased(
        &self,
        pool: &str,
        agent: &str,
        lease_ms: u64,
    ) -> Result<Option<Claimed>, DbError> {
        let (pool, agent) = (pool.to_string(), agent.to_string());
        self.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            let Some(row) = tx
                .query_opt("SELECT record FROM agent_pools WHERE name=$1", &[&pool])
                .await
                .map_err(pg)?
            else {
                return Ok(None);
            };
            if let Some(max) = serde_json::from_str::<AgentPool>(row.get::<_, &str>(0))?.max_runs {
                // A pool with a limit: its row lock makes its claims take turns, so the
                // limit holds across agents and servers. (Without one, claims run side by
                // side; the runs themselves are skipped when locked.)
                tx.execute(
                    "SELECT 1 FROM agent_pools WHERE name=$1 FOR UPDATE",
                    &[&pool],
                )
                .await
                .map_err(pg)?;
                let running: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM runs WHERE pool=$1 AND status='Running'",
                        &[&pool],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                if running >= i64::from(max) {
                    return Ok(None);
                }
            }
            let lease = uuid::Uuid::new_v4().simple().to_string();
            let expires = now_ms().saturating_add(lease_ms.min(i64::MAX as u64) as i64);
            let row = tx
                .query_opt(
                    "UPDATE runs SET status='Running', started_at=$2, agent=$3, lease=$4,
                         lease_expires=$5, cancel_requested=FALSE
                     WHERE seq = (SELECT seq FROM runs WHERE status='Queued' AND pool=$1
                                  ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING seq, id, task, status, trigger, commit_sha, branch, queued_at,
                         started_at, finished_at, error, report, pool, agent, attempt",
                    &[&pool, &now(), &agent, &lease, &expires],
                )
                .await
                .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            match row {
                Some(r) => Ok(Some(Claimed {
                    run: run_from_row(&r)?,
                    lease,
                })),
                None => Ok(None),
            }
        })
    }

    fn renew_lease(&self, run: &str, lease: &str, lease_ms: u64) -> Result<LeaseState, DbError> {
        let expires = now_ms().saturating_add(lease_ms.min(i64::MAX as u64) as i64);
        let rows = self.query(
            "UPDATE runs SET lease_expires=$3 WHERE id=$1 AND lease=$2 AND status='Running'
             RETURNING cancel_requested",
            args![run.to_string(), lease.to_string(), expires],
        )?;
        Ok(match rows.first() {
            None => LeaseState::Lost,
            Some(r) => LeaseState::Held { cancel: r.get(0) },
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
        let n = self.execute(
            "UPDATE runs SET status=$3, error=$4, report=$5, finished_at=$6, lease=NULL,
             lease_expires=NULL WHERE id=$1 AND lease=$2 AND status='Running'",
            args![
                run.to_string(),
                lease.to_string(),
                status.as_str().to_string(),
                error.map(str::to_string),
                report,
                now()
            ],
        )?;
        Ok(n == 1)
    }

    fn release_lease(
        &self,
        run: &str,
        lease: &str,
        max_attempts: u32,
    ) -> Result<Option<Expired>, DbError> {
        let (run, lease) = (run.to_string(), lease.to_string());
        self.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            let Some(row) = tx
                .query_opt(
                    "SELECT agent, attempt, cancel_requested FROM runs
                     WHERE id=$1 AND lease=$2 AND status='Running' FOR UPDATE",
                    &[&run, &lease],
                )
                .await
                .map_err(pg)?
            else {
                return Ok(None);
            };
            let e = hand_back(
                &tx,
                &run,
                row.get(0),
                row.get(1),
                row.get(2),
                max_attempts,
                "handed back by its agent",
            )
            .await?;
            tx.commit().await.map_err(pg)?;
            Ok(Some(e))
        })
    }

    fn expire_leases(&self, max_attempts: u32) -> Result<Vec<Expired>, DbError> {
        self.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            let rows = tx
                .query(
                    "SELECT id, agent, attempt, cancel_requested FROM runs
                     WHERE status='Running' AND lease IS NOT NULL AND lease_expires < $1
                     ORDER BY seq FOR UPDATE SKIP LOCKED",
                    &[&now_ms()],
                )
                .await
                .map_err(pg)?;
            let mut out = Vec::new();
            for r in &rows {
                let (id, agent): (String, Option<String>) = (r.get(0), r.get(1));
                let why = super::db::lapsed(agent.as_deref());
                out.push(hand_back(&tx, &id, agent, r.get(2), r.get(3), max_attempts, why).await?);
            }
            tx.commit().await.map_err(pg)?;
            Ok(out)
        })
    }

    fn extend_leases(&self, lease_ms: u64) -> Result<(), DbError> {
        self.execute(
            "UPDATE runs SET lease_expires = GREATEST(lease_expires, $1) WHERE lease IS NOT NULL",
            args![now_ms().saturating_add(lease_ms.min(i64::MAX as u64) as i64)],
        )?;
        Ok(())
    }

    fn append_log(&self, run: &str, text: &[u8]) -> Result<(), DbError> {
        if text.is_empty() {
            return Ok(());
        }
        let (run, text) = (run.to_string(), text.to_vec());
        self.call(move |mut c| async move {
            let c = c.client()?;
            // One statement: the chunk goes at the log's end. Two appends to one run's
            // log at once (an agent's batches reaching two replicas) would pick the same
            // start; the key refuses the second, which tries again at the new end.
            let mut tries = 0;
            loop {
                let r = c
                    .execute(
                        "INSERT INTO run_logs(run, start, data)
                         SELECT $1, COALESCE(MAX(start + length(data)), 0), $2 FROM run_logs
                         WHERE run = $1",
                        &[&run, &text],
                    )
                    .await;
                match r {
                    Ok(_) => return Ok(()),
                    Err(e)
                        if tries < 10
                            && e.code()
                                == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
                    {
                        tries += 1;
                    }
                    Err(e) => return Err(pg(e)),
                }
            }
        })
    }

    fn read_log(&self, run: &str, offset: u64, max: u64) -> Result<Vec<u8>, DbError> {
        let (from, max) = (
            offset.min(i64::MAX as u64) as i64,
            max.min(i64::MAX as u64) as i64,
        );
        let rows = self.query(
            "SELECT start, data FROM run_logs
             WHERE run = $1 AND start + length(data) > $2 AND start < $2 + $3 ORDER BY start",
            args![run.to_string(), from, max],
        )?;
        let mut out = Vec::new();
        for r in &rows {
            let (start, data): (i64, Vec<u8>) = (r.get(0), r.get(1));
            let skip = (from - start).clamp(0, data.len() as i64) as usize;
            out.extend_from_slice(&data[skip..]);
            if out.len() as i64 >= max {
                break;
            }
        }
        out.truncate(max as usize);
        Ok(out)
    }

    fn try_lead(&self) -> Result<bool, DbError> {
        let (slot, target) = (self.leader.clone(), self.db.target().clone());
        self.db.wait(async move {
            let mut l = slot.lock().await;
            if l.client.as_ref().is_some_and(|c| c.is_closed()) {
                *l = Leader::default();
            }
            let client = match l.client.take() {
                Some(c) => c,
                None => {
                    let mut target = target;
                    // The database notices a leader that vanished (and frees its
                    // lock for the next) within about ten seconds, not hours.
                    target.config.options(
                        "-c statement_timeout=5000 -c tcp_keepalives_idle=5 \
                             -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3",
                    );
                    crate::pg::connect(&target).await?
                }
            };
            // The holder only checks its connection; the others try for the lock.
            let (ask, args): (&str, &[&(dyn ToSql + Sync)]) = if l.holding {
                ("SELECT TRUE", &[])
            } else {
                ("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
            };
            match tokio::time::timeout(LEADER_CHECK, client.query_one(ask, args)).await {
                Ok(Ok(row)) => {
                    l.holding = row.get(0);
                    l.client = Some(client);
                    Ok(l.holding)
                }
                // A connection that fails or does not answer is dropped with the lock it
                // held: this server steps down rather than lead without knowing.
                failed => {
                    *l = Leader::default();
                    Err(match failed {
                        Ok(Err(e)) => pg(e),
                        _ => DbError::Postgres(
                            "the leader's connection did not answer in time".into(),
                        ),
                    })
                }
            }
        })?
    }

    fn listen(&self, wake: Arc<dyn Fn(RunChange) + Send + Sync>) -> Result<(), DbError> {
        let target = self.db.target().clone();
        self.db.spawn(async move {
            let mut warned = false;
            loop {
                match listen_once(&target, &wake).await {
                    Ok(()) => warned = false,
                    Err(e) if !warned => {
                        tracing::warn!(error = %e, "listening for run changes (polling meanwhile)");
                        warned = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
        Ok(())
    }

    fn request_cancel(&self, run: &str) -> Result<bool, DbError> {
        let n = self.execute(
            "UPDATE runs SET cancel_requested=TRUE
             WHERE id=$1 AND status='Running' AND lease IS NOT NULL",
            args![run.to_string()],
        )?;
        Ok(n == 1)
    }
}
