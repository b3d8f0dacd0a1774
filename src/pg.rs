//! PostgreSQL for the stores that can live there (`serve --database postgres://...`): a
//! few connections on a runtime of their own (the stores' traits block, so every call
//! runs there and the caller's thread waits for it, as it would for SQLite's file),
//! connections made again when one breaks, versioned migrations, and the database's
//! errors as sentences.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

/// What the database (or reaching it) said, as a sentence.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PgError(pub String);

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        PgError(match e.as_db_error() {
            Some(d) => format!("{} ({})", d.message(), d.code().code()),
            None => e.to_string(),
        })
    }
}

/// A statement's arguments (see [`args!`]).
pub type Args = Vec<Box<dyn ToSql + Sync + Send>>;

/// Boxes statement arguments.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        vec![$(Box::new($a) as Box<dyn tokio_postgres::types::ToSql + Sync + Send>),*]
    };
}
pub(crate) use args;

/// Connections kept (each call takes one for its transaction).
const CONNECTIONS: usize = 4;

/// One connection, held for a call.
pub struct Conn(OwnedMutexGuard<Option<Client>>);

impl Conn {
    pub fn client(&mut self) -> Result<&mut Client, PgError> {
        self.0
            .as_mut()
            .ok_or_else(|| PgError("not connected".into()))
    }
}

/// A few connections, each used by one call at a time.
struct Pool {
    config: tokio_postgres::Config,
    conns: Vec<Arc<Mutex<Option<Client>>>>,
    next: AtomicUsize,
}

impl Pool {
    async fn get(&self) -> Result<Conn, PgError> {
        // An idle connection if there is one; else wait for the next in turn.
        let idle = self
            .conns
            .iter()
            .find_map(|c| c.clone().try_lock_owned().ok());
        let mut guard = match idle {
            Some(g) => g,
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
                self.conns[i].clone().lock_owned().await
            }
        };
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(connect(&self.config).await?);
        }
        Ok(Conn(guard))
    }
}

/// A connection with its driver spawned on the current runtime.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, PgError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// A database: its connections and the runtime they live on.
pub struct Database {
    rt: crate::background::OwnRuntime,
    pool: Arc<Pool>,
}

impl Database {
    /// For `url` (`postgres://user:password@host:port/database`); connects lazily. Calls
    /// fail, rather than hang, when the database stops answering.
    pub fn new(url: &str, name: &str) -> Result<Database, PgError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            PgError(format!(
                "--database: {e} (write it as postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
            ))
        })?;
        config.connect_timeout(std::time::Duration::from_secs(10));
        config.options("-c statement_timeout=30000 -c lock_timeout=30000");
        let rt = crate::background::OwnRuntime::new(name, 2)
            .map_err(|e| PgError(format!("starting the database client: {e}")))?;
        Ok(Database {
            rt,
            pool: Arc::new(Pool {
                config,
                conns: (0..CONNECTIONS)
                    .map(|_| Arc::new(Mutex::new(None)))
                    .collect(),
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// How to connect (for connections of a caller's own: a lock holder, a listener).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.pool.config
    }

    /// Runs `f` with a connection on this database's runtime and waits for it.
    pub fn call<T, E, F, Fut>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<PgError> + Send + 'static,
        F: FnOnce(Conn) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send,
    {
        let pool = self.pool.clone();
        self.rt
            .wait(async move { f(pool.get().await?).await })
            .ok_or_else(|| PgError("the database client stopped".into()))?
    }

    /// Runs `f` on this database's runtime and waits for it (no connection taken).
    pub fn wait<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, PgError> {
        self.rt
            .wait(f)
            .ok_or_else(|| PgError("the database client stopped".into()))
    }

    /// Runs `f` on this database's runtime until it ends or the database is dropped.
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.rt.spawn(f);
    }

    /// Runs one statement; the rows it returns.
    pub fn query(&self, sql: &'static str, args: Args) -> Result<Vec<Row>, PgError> {
        self.call(move |mut c| async move {
            let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as _).collect();
            Ok(c.client()?.query(sql, &refs).await?)
        })
    }

    /// Runs one statement; how many rows it changed.
    pub fn execute(&self, sql: &'static str, args: Args) -> Result<u64, PgError> {
        self.call(move |mut c| async move {
            let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as _).collect();
            Ok(c.client()?.execute(sql, &refs).await?)
        })
    }
}

/// An advisory lock id only acr-task's migrations take ("acrtask" in ASCII).
const MIGRATION_LOCK: i64 = 0x0061_6372_7461_736b;

/// Brings one component's schema up to date: `migrations` in order, those applied
/// recorded in `table` (its own per component), all under an advisory lock so servers
/// starting together migrate once. A schema newer than this acr-task knows is refused.
pub async fn migrate(
    c: &mut Client,
    table: &'static str,
    migrations: &[&str],
) -> Result<(), PgError> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table}(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    ))
    .await?;
    let applied: i32 = tx
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0) FROM {table}"),
            &[],
        )
        .await?
        .get(0);
    let known = migrations.len() as i32;
    if applied > known {
        return Err(PgError(format!(
            "the database has schema version {applied} in {table}, newer than this acr-task \
             knows ({known}): use the acr-task that made it, or a newer one"
        )));
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for (i, sql) in migrations.iter().enumerate().skip(applied as usize) {
        tx.batch_execute(sql).await?;
        tx.execute(
            &format!("INSERT INTO {table}(version, applied_at) VALUES($1, $2)"),
            &[&(i as i32 + 1), &now],
        )
        .await?;
    }
    Ok(tx.commit().await?)
}

/// For tests: a new, empty database beside the one `url` names; its URL.
#[cfg(test)]
pub fn fresh_database(url: &str) -> Result<String, PgError> {
    let config: tokio_postgres::Config = url.parse().map_err(|e| PgError(format!("{e}")))?;
    let name = format!("t{}", uuid::Uuid::new_v4().simple());
    let rt = crate::background::OwnRuntime::new("acr-task-pg-test", 1)
        .map_err(|e| PgError(e.to_string()))?;
    let n = name.clone();
    rt.wait(async move {
        let c = connect(&config).await?;
        Ok::<_, PgError>(c.batch_execute(&format!("CREATE DATABASE {n}")).await?)
    })
    .ok_or_else(|| PgError("stopped".into()))??;
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    Ok(format!("{base}/{name}"))
}
