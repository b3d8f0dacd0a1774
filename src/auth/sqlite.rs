//! Auth's records in SQLite (`<data dir>/auth.db`, owner-only, WAL, beside the registry's
//! `meta.db`). The CLI and a running server open it side by side.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::records::{
    rules_from_rows, AuthRecords, Insert, Removal, RunLoginRecord, TokenColumns, TokenRecord,
};
use super::store::{ScopeMap, ScopeRule, Slot, TokenInfo, TokenStatus};
use super::AuthError;

/// `auth.db`'s schema, one entry per version (see [`crate::store::migrate`]).
const MIGRATIONS: &[crate::store::migrate::Migration] = &[
    crate::store::migrate::Migration::Sql(
        "CREATE TABLE IF NOT EXISTS settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS scope_maps(
                name TEXT PRIMARY KEY, description TEXT NOT NULL, created INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS scope_rules(
                scope_map TEXT NOT NULL, repository TEXT NOT NULL, action TEXT NOT NULL,
                PRIMARY KEY(scope_map, repository, action));
             CREATE TABLE IF NOT EXISTS tokens(
                name TEXT PRIMARY KEY, scope_map TEXT NOT NULL, enabled INTEGER NOT NULL,
                expiry INTEGER, created INTEGER NOT NULL,
                password1 TEXT, password1_created INTEGER,
                password2 TEXT, password2_created INTEGER);",
    ),
    crate::store::migrate::Migration::Sql(
        "CREATE TABLE run_logins(user TEXT PRIMARY KEY, secret TEXT NOT NULL, grants TEXT NOT NULL,
            expires INTEGER NOT NULL);",
    ),
];

/// [`AuthRecords`] in one SQLite file.
pub struct SqliteAuth {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteAuth {
    /// Opens (creating and migrating if needed) `<dir>/auth.db`.
    pub fn open(dir: &Path) -> Result<SqliteAuth, AuthError> {
        // Hashes only, but still nobody else's business.
        let (path, conn) = crate::store::migrate::open_private(dir, "auth.db", MIGRATIONS)?;
        Ok(SqliteAuth {
            path,
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, AuthError> {
        self.conn
            .lock()
            .map_err(|_| AuthError::Internal("auth store lock poisoned".into()))
    }
}

fn scope_map_exists(c: &Connection, name: &str) -> Result<bool, AuthError> {
    Ok(c.query_row(
        "SELECT 1 FROM scope_maps WHERE name = ?1",
        params![name],
        |_| Ok(()),
    )
    .optional()?
    .is_some())
}

fn add_rules(c: &Connection, name: &str, rules: &[ScopeRule]) -> Result<(), AuthError> {
    for r in rules {
        for a in &r.actions {
            c.execute(
                "INSERT OR IGNORE INTO scope_rules(scope_map, repository, action) VALUES (?1, ?2, ?3)",
                params![name, r.repository, a.as_str()],
            )?;
        }
    }
    Ok(())
}

fn rules_of(c: &Connection, name: &str) -> Result<Vec<ScopeRule>, AuthError> {
    let mut st = c.prepare(
        "SELECT repository, action FROM scope_rules WHERE scope_map = ?1 ORDER BY repository, action",
    )?;
    let rows = st.query_map(params![name], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let rows: Vec<(String, String)> = rows.collect::<Result<_, _>>()?;
    rules_from_rows(rows)
}

fn scope_map(c: &Connection, name: &str) -> Result<Option<ScopeMap>, AuthError> {
    let row: Option<(String, i64)> = c
        .query_row(
            "SELECT description, created FROM scope_maps WHERE name = ?1",
            params![name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((description, created)) = row else {
        return Ok(None);
    };
    Ok(Some(ScopeMap {
        name: name.to_string(),
        description,
        rules: rules_of(c, name)?,
        created,
    }))
}

const TOKEN_COLS: &str = "name, scope_map, enabled, expiry, created, password1_created, \
                          password2_created, password1, password2";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenColumns {
        name: r.get(0)?,
        scope_map: r.get(1)?,
        enabled: r.get(2)?,
        expiry: r.get(3)?,
        created: r.get(4)?,
        set: [r.get(5)?, r.get(6)?],
        hashes: [r.get(7)?, r.get(8)?],
    }
    .into())
}

impl AuthRecords for SqliteAuth {
    fn put_run_login(&self, l: &RunLoginRecord, now: i64) -> Result<(), AuthError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        tx.execute("DELETE FROM run_logins WHERE expires <= ?1", params![now])?;
        tx.execute(
            "INSERT OR REPLACE INTO run_logins(user, secret, grants, expires) VALUES (?1,?2,?3,?4)",
            params![l.user, l.secret_sha256, l.grants, l.expires],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn run_login(&self, user: &str, now: i64) -> Result<Option<RunLoginRecord>, AuthError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT user, secret, grants, expires FROM run_logins WHERE user=?1 AND expires > ?2",
                params![user, now],
                |r| {
                    Ok(RunLoginRecord {
                        user: r.get(0)?,
                        secret_sha256: r.get(1)?,
                        grants: r.get(2)?,
                        expires: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    fn delete_run_login(&self, user: &str) -> Result<(), AuthError> {
        self.conn()?
            .execute("DELETE FROM run_logins WHERE user=?1", params![user])?;
        Ok(())
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn setting(&self, key: &str) -> Result<Option<String>, AuthError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn set_settings(&self, pairs: &[(&str, &str)]) -> Result<(), AuthError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        for (k, v) in pairs {
            tx.execute(
                "INSERT OR REPLACE INTO settings(key, value) VALUES (?1, ?2)",
                params![k, v],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn setting_or_insert(&self, key: &str, value: &str) -> Result<String, AuthError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO settings(key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        let kept: String = tx.query_row(
            "SELECT value FROM settings WHERE key = ?1",
            params![key],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(kept)
    }

    fn delete_settings(&self, keys: &[&str]) -> Result<(), AuthError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        for k in keys {
            tx.execute("DELETE FROM settings WHERE key = ?1", params![k])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn insert_scope_map(&self, map: &ScopeMap, max: Option<u64>) -> Result<Insert, AuthError> {
        let mut c = self.conn()?;
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if scope_map_exists(&tx, &map.name)? {
            return Ok(Insert::Exists);
        }
        if let Some(full) = full(&tx, "scope_maps", max)? {
            return Ok(Insert::Full(full));
        }
        let n = tx.execute(
            "INSERT OR IGNORE INTO scope_maps(name, description, created) VALUES (?1, ?2, ?3)",
            params![map.name, map.description, map.created],
        )?;
        if n == 0 {
            return Ok(Insert::Exists);
        }
        add_rules(&tx, &map.name, &map.rules)?;
        tx.commit()?;
        Ok(Insert::Done)
    }

    fn change_scope_map(
        &self,
        name: &str,
        add: &[ScopeRule],
        remove: &[ScopeRule],
        description: Option<&str>,
    ) -> Result<bool, AuthError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        if !scope_map_exists(&tx, name)? {
            return Ok(false);
        }
        for r in remove {
            for a in &r.actions {
                tx.execute(
                    "DELETE FROM scope_rules WHERE scope_map = ?1 AND repository = ?2 AND action = ?3",
                    params![name, r.repository, a.as_str()],
                )?;
            }
        }
        add_rules(&tx, name, add)?;
        if let Some(d) = description {
            tx.execute(
                "UPDATE scope_maps SET description = ?2 WHERE name = ?1",
                params![name, d],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn delete_scope_map(&self, name: &str) -> Result<Removal, AuthError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let users: Vec<String> = {
            let mut st =
                tx.prepare("SELECT name FROM tokens WHERE scope_map = ?1 ORDER BY name")?;
            let rows = st.query_map(params![name], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if !users.is_empty() {
            return Ok(Removal::InUse(users));
        }
        if tx.execute("DELETE FROM scope_maps WHERE name = ?1", params![name])? == 0 {
            return Ok(Removal::NotFound);
        }
        tx.execute(
            "DELETE FROM scope_rules WHERE scope_map = ?1",
            params![name],
        )?;
        tx.commit()?;
        Ok(Removal::Done)
    }

    fn scope_map(&self, name: &str) -> Result<Option<ScopeMap>, AuthError> {
        scope_map(&*self.conn()?, name)
    }

    fn scope_maps(&self) -> Result<Vec<ScopeMap>, AuthError> {
        let c = self.conn()?;
        let names: Vec<String> = {
            let mut st = c.prepare("SELECT name FROM scope_maps ORDER BY name")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for n in names {
            out.extend(scope_map(&c, &n)?);
        }
        Ok(out)
    }

    fn insert_token(&self, token: &TokenRecord, max: Option<u64>) -> Result<Insert, AuthError> {
        let t = &token.info;
        let mut c = self.conn()?;
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if !scope_map_exists(&tx, &t.scope_map)? {
            return Ok(Insert::NoScopeMap);
        }
        let exists = tx
            .query_row(
                "SELECT 1 FROM tokens WHERE name = ?1",
                params![t.name],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists {
            return Ok(Insert::Exists);
        }
        if let Some(full) = full(&tx, "tokens", max)? {
            return Ok(Insert::Full(full));
        }
        let created = |slot: &str| {
            t.passwords
                .iter()
                .find(|p| p.name == slot)
                .map(|p| p.created)
        };
        let n = tx.execute(
            "INSERT OR IGNORE INTO tokens(name, scope_map, enabled, expiry, created,
                password1, password1_created, password2, password2_created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                t.name,
                t.scope_map,
                t.status == TokenStatus::Enabled,
                t.expiry,
                t.created,
                token.hashes[0],
                created("password1"),
                token.hashes[1],
                created("password2")
            ],
        )?;
        if n == 0 {
            return Ok(Insert::Exists);
        }
        tx.commit()?;
        Ok(Insert::Done)
    }

    fn set_password(
        &self,
        name: &str,
        slot: Slot,
        hash: &str,
        created: i64,
    ) -> Result<bool, AuthError> {
        // The columns are named by the slots.
        let sql = format!(
            "UPDATE tokens SET {0} = ?2, {0}_created = ?3 WHERE name = ?1",
            slot.name()
        );
        Ok(self.conn()?.execute(&sql, params![name, hash, created])? == 1)
    }

    fn set_token_enabled(&self, name: &str, enabled: bool) -> Result<bool, AuthError> {
        Ok(self.conn()?.execute(
            "UPDATE tokens SET enabled = ?2 WHERE name = ?1",
            params![name, enabled],
        )? == 1)
    }

    fn delete_token(&self, name: &str) -> Result<bool, AuthError> {
        Ok(self
            .conn()?
            .execute("DELETE FROM tokens WHERE name = ?1", params![name])?
            == 1)
    }

    fn token(&self, name: &str) -> Result<Option<TokenRecord>, AuthError> {
        Ok(self
            .conn()?
            .query_row(
                &format!("SELECT {TOKEN_COLS} FROM tokens WHERE name = ?1"),
                params![name],
                token_row,
            )
            .optional()?)
    }

    fn tokens(&self) -> Result<Vec<TokenInfo>, AuthError> {
        let c = self.conn()?;
        let mut st = c.prepare(&format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY name"))?;
        let rows = st.query_map([], |r| token_row(r).map(|t| t.info))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// How many rows `table` has when that is `max` or more (the table's name is ours).
fn full(conn: &Connection, table: &str, max: Option<u64>) -> Result<Option<u64>, AuthError> {
    let Some(max) = max else { return Ok(None) };
    let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
    let n = n.max(0) as u64;
    Ok((n >= max).then_some(n))
}
