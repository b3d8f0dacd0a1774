//! Numbered schema migrations for the SQLite databases (`meta.db`, `server.db`,
//! `auth.db`, `webhooks.db`). A database's `PRAGMA user_version` is the number of
//! migrations applied; each further one runs in its own transaction with the bump, so a
//! crash leaves the schema at a numbered state. Migration 1 of each is the schema as it
//! was before numbering (`CREATE ... IF NOT EXISTS`), so databases made before carry on.

use rusqlite::Connection;

/// One step of a database's schema.
pub enum Migration {
    /// Statements run as they are.
    Sql(&'static str),
    /// A step that must look before it changes (a column an older version already added).
    Code(fn(&Connection) -> rusqlite::Result<()>),
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{db} has schema version {found}, newer than this acr-task knows ({known}): use the acr-task that made it, or a newer one")]
    Newer { db: String, found: i64, known: i64 },
}

/// Opens `dir/file` (creating both if needed) as a database only this user may read
/// (hashes and secrets; the WAL inherits the mode), configured as every acr-task database
/// and brought up to the last of `migrations`.
pub fn open_private(
    dir: &std::path::Path,
    file: &str,
    migrations: &[Migration],
) -> Result<(std::path::PathBuf, Connection), MigrateError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| MigrateError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(file);
    let mut conn = Connection::open(&path).map_err(|source| MigrateError::Open {
        path: path.display().to_string(),
        source,
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io(&path))?;
    super::configure_sqlite(&conn)?;
    apply(&mut conn, file, migrations)?;
    Ok((path, conn))
}

/// Brings `conn` up to the last of `migrations`; returns the version it is at.
pub fn apply(
    conn: &mut Connection,
    db: &str,
    migrations: &[Migration],
) -> Result<i64, MigrateError> {
    let known = migrations.len() as i64;
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > known {
            return Err(MigrateError::Newer {
                db: db.to_string(),
                found: version,
                known,
            });
        }
        if version == known {
            return Ok(version);
        }
        match &migrations[version as usize] {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::Code(f) => f(&tx)?,
        }
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
        tracing::debug!(db, version = version + 1, "schema migrated");
    }
}

/// Whether `table` has `column` (for [`Migration::Code`] steps).
pub fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .exists(rusqlite::params![table, column])
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: &[Migration] = &[
        Migration::Sql("CREATE TABLE IF NOT EXISTS t(a INTEGER);"),
        Migration::Code(|c| {
            if !has_column(c, "t", "b")? {
                c.execute_batch("ALTER TABLE t ADD COLUMN b TEXT")?;
            }
            Ok(())
        }),
    ];

    #[test]
    fn a_private_database_is_made_for_its_owner_only_and_migrated() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = open_private(&dir.path().join("sub"), "p.db", STEPS).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(has_column(&conn, "t", "b").unwrap());
    }

    #[test]
    fn migrations_run_once_in_order_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let mut conn = Connection::open(&path).unwrap();
        // A database from before numbering: the table and the later column already there.
        conn.execute_batch("CREATE TABLE t(a INTEGER, b TEXT)")
            .unwrap();
        assert_eq!(apply(&mut conn, "x.db", STEPS).unwrap(), 2);
        assert_eq!(apply(&mut conn, "x.db", STEPS).unwrap(), 2);
        assert!(has_column(&conn, "t", "b").unwrap());

        let mut fresh = Connection::open(dir.path().join("y.db")).unwrap();
        assert_eq!(apply(&mut fresh, "y.db", &STEPS[..1]).unwrap(), 1);
        assert!(!has_column(&fresh, "t", "b").unwrap());
        assert_eq!(apply(&mut fresh, "y.db", STEPS).unwrap(), 2);
        assert!(has_column(&fresh, "t", "b").unwrap());

        let err = apply(&mut fresh, "y.db", &STEPS[..1]).unwrap_err();
        assert!(
            err.to_string()
                .contains("schema version 2, newer than this acr-task knows (1)"),
            "{err}"
        );
    }
}
