//! Auth's records in PostgreSQL (`serve --database`): the same [`AuthRecords`] as
//! [`super::sqlite`], in tables of their own (`auth_*`) in the database the server's
//! replicas share, so a token, a scope map or the admin's password made through one
//! replica holds on every other. Inserts that count (a tier's token and scope-map limits)
//! take an advisory lock, so two replicas never both add the last one allowed.

use tokio_postgres::Row;

use super::records::{
    rules_from_rows, AuthRecords, Insert, Removal, RunLoginRecord, TokenColumns, TokenRecord,
};
use super::store::{ScopeMap, ScopeRule, Slot, TokenInfo, TokenStatus};
use super::AuthError;
use crate::pg::{args, Database, PgError};

/// The schema, one entry per version (recorded in `acr_task_auth_migrations`).
const MIGRATIONS: &[&str] = &["
CREATE TABLE auth_settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE auth_scope_maps(name TEXT PRIMARY KEY, description TEXT NOT NULL, created BIGINT NOT NULL);
CREATE TABLE auth_scope_rules(
    scope_map TEXT NOT NULL, repository TEXT NOT NULL, action TEXT NOT NULL,
    PRIMARY KEY(scope_map, repository, action));
CREATE TABLE auth_tokens(
    name TEXT PRIMARY KEY, scope_map TEXT NOT NULL, enabled BOOLEAN NOT NULL,
    expiry BIGINT, created BIGINT NOT NULL,
    password1 TEXT, password1_created BIGINT, password2 TEXT, password2_created BIGINT);
", "
CREATE TABLE auth_run_logins(username TEXT PRIMARY KEY, secret TEXT NOT NULL, grants TEXT NOT NULL,
    expires BIGINT NOT NULL);
"];

/// The advisory lock counted inserts take ("acrauth").
const INSERT_LOCK: i64 = 0x0061_6372_6175_7468;

impl From<PgError> for AuthError {
    fn from(e: PgError) -> AuthError {
        AuthError::Internal(format!("auth database: {e}"))
    }
}

fn pg(e: tokio_postgres::Error) -> AuthError {
    PgError::from(e).into()
}

/// [`AuthRecords`] in a PostgreSQL database.
pub struct PgAuth {
    db: Database,
    location: String,
}

impl PgAuth {
    /// Connects to `target` and brings auth's tables up to date.
    pub fn open(target: &crate::pg::Target) -> Result<PgAuth, AuthError> {
        let db = Database::new(target, "acr-task-pg-auth")?;
        db.call(|mut c| async move {
            crate::pg::migrate(c.client()?, "acr_task_auth_migrations", MIGRATIONS).await?;
            Ok::<_, AuthError>(())
        })?;
        // Where, for messages: never the password.
        let location = format!(
            "PostgreSQL database {} (auth_* tables)",
            target.config.get_dbname().unwrap_or("?")
        );
        Ok(PgAuth { db, location })
    }
}

const TOKEN_COLS: &str = "name, scope_map, enabled, expiry, created, password1_created, \
                          password2_created, password1, password2";

fn token_row(r: &Row) -> Result<TokenRecord, AuthError> {
    Ok(TokenColumns {
        name: r.try_get(0).map_err(pg)?,
        scope_map: r.try_get(1).map_err(pg)?,
        enabled: r.try_get(2).map_err(pg)?,
        expiry: r.try_get(3).map_err(pg)?,
        created: r.try_get(4).map_err(pg)?,
        set: [r.try_get(5).map_err(pg)?, r.try_get(6).map_err(pg)?],
        hashes: [r.try_get(7).map_err(pg)?, r.try_get(8).map_err(pg)?],
    }
    .into())
}

async fn scope_map_of(
    c: &impl tokio_postgres::GenericClient,
    name: &str,
) -> Result<Option<ScopeMap>, AuthError> {
    let Some(row) = c
        .query_opt(
            "SELECT description, created FROM auth_scope_maps WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(None);
    };
    let rules = c
        .query(
            "SELECT repository, action FROM auth_scope_rules WHERE scope_map = $1
             ORDER BY repository, action",
            &[&name],
        )
        .await
        .map_err(pg)?;
    Ok(Some(ScopeMap {
        name: name.to_string(),
        description: row.try_get(0).map_err(pg)?,
        rules: rules_from_rows(rules.iter().map(|r| (r.get(0), r.get(1))))?,
        created: row.try_get(1).map_err(pg)?,
    }))
}

async fn add_rules(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
    rules: &[ScopeRule],
) -> Result<(), AuthError> {
    for r in rules {
        for a in &r.actions {
            tx.execute(
                "INSERT INTO auth_scope_rules(scope_map, repository, action) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&name, &r.repository, &a.as_str()],
            )
            .await
            .map_err(pg)?;
        }
    }
    Ok(())
}

/// How many rows `table` has when that is `max` or more (the table's name is ours).
async fn full(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    max: Option<u64>,
) -> Result<Option<u64>, AuthError> {
    let Some(max) = max else { return Ok(None) };
    let n: i64 = tx
        .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
        .await
        .map_err(pg)?
        .get(0);
    let n = n.max(0) as u64;
    Ok((n >= max).then_some(n))
}

impl AuthRecords for PgAuth {
    fn put_run_login(&self, l: &RunLoginRecord, now: i64) -> Result<(), AuthError> {
        let l = l.clone();
        self.db.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            tx.execute("DELETE FROM auth_run_logins WHERE expires <= $1", &[&now])
                .await
                .map_err(pg)?;
            tx.execute(
                "INSERT INTO auth_run_logins(username, secret, grants, expires)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (username) DO UPDATE
                 SET secret = EXCLUDED.secret, grants = EXCLUDED.grants, expires = EXCLUDED.expires",
                &[&l.user, &l.secret_sha256, &l.grants, &l.expires],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)
        })
    }

    fn run_login(&self, user: &str, now: i64) -> Result<Option<RunLoginRecord>, AuthError> {
        let rows = self.db.query(
            "SELECT username, secret, grants, expires FROM auth_run_logins
             WHERE username = $1 AND expires > $2",
            args![user.to_string(), now],
        )?;
        Ok(rows.first().map(|r| RunLoginRecord {
            user: r.get(0),
            secret_sha256: r.get(1),
            grants: r.get(2),
            expires: r.get(3),
        }))
    }

    fn delete_run_login(&self, user: &str) -> Result<(), AuthError> {
        self.db.execute(
            "DELETE FROM auth_run_logins WHERE username = $1",
            args![user.to_string()],
        )?;
        Ok(())
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn setting(&self, key: &str) -> Result<Option<String>, AuthError> {
        let rows = self.db.query(
            "SELECT value FROM auth_settings WHERE key = $1",
            args![key.to_string()],
        )?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    fn set_settings(&self, pairs: &[(&str, &str)]) -> Result<(), AuthError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.db.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            for (k, v) in &pairs {
                tx.execute(
                    "INSERT INTO auth_settings(key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[k, v],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })
    }

    fn setting_or_insert(&self, key: &str, value: &str) -> Result<String, AuthError> {
        let rows = self.db.query(
            "WITH ins AS (INSERT INTO auth_settings(key, value) VALUES ($1, $2)
                          ON CONFLICT (key) DO NOTHING RETURNING value)
             SELECT value FROM ins UNION ALL SELECT value FROM auth_settings WHERE key = $1",
            args![key.to_string(), value.to_string()],
        )?;
        rows.first()
            .map(|r| r.get(0))
            .ok_or_else(|| AuthError::Internal(format!("setting {key} was not kept")))
    }

    fn delete_settings(&self, keys: &[&str]) -> Result<(), AuthError> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        self.db
            .execute("DELETE FROM auth_settings WHERE key = ANY($1)", args![keys])?;
        Ok(())
    }

    fn insert_scope_map(&self, map: &ScopeMap, max: Option<u64>) -> Result<Insert, AuthError> {
        let map = map.clone();
        self.db.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INSERT_LOCK])
                .await
                .map_err(pg)?;
            if scope_map_of(&tx, &map.name).await?.is_some() {
                return Ok(Insert::Exists);
            }
            if let Some(n) = full(&tx, "auth_scope_maps", max).await? {
                return Ok(Insert::Full(n));
            }
            tx.execute(
                "INSERT INTO auth_scope_maps(name, description, created) VALUES ($1, $2, $3)",
                &[&map.name, &map.description, &map.created],
            )
            .await
            .map_err(pg)?;
            add_rules(&tx, &map.name, &map.rules).await?;
            tx.commit().await.map_err(pg)?;
            Ok(Insert::Done)
        })
    }

    fn change_scope_map(
        &self,
        name: &str,
        add: &[ScopeRule],
        remove: &[ScopeRule],
        description: Option<&str>,
    ) -> Result<bool, AuthError> {
        let (name, add, remove) = (name.to_string(), add.to_vec(), remove.to_vec());
        let description = description.map(str::to_string);
        self.db.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            let exists = tx
                .query_opt(
                    "SELECT 1 FROM auth_scope_maps WHERE name = $1 FOR UPDATE",
                    &[&name],
                )
                .await
                .map_err(pg)?
                .is_some();
            if !exists {
                return Ok(false);
            }
            for r in &remove {
                for a in &r.actions {
                    tx.execute(
                        "DELETE FROM auth_scope_rules
                         WHERE scope_map = $1 AND repository = $2 AND action = $3",
                        &[&name, &r.repository, &a.as_str()],
                    )
                    .await
                    .map_err(pg)?;
                }
            }
            add_rules(&tx, &name, &add).await?;
            if let Some(d) = &description {
                tx.execute(
                    "UPDATE auth_scope_maps SET description = $2 WHERE name = $1",
                    &[&name, d],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)?;
            Ok(true)
        })
    }

    fn delete_scope_map(&self, name: &str) -> Result<Removal, AuthError> {
        let name = name.to_string();
        self.db.call(move |mut c| async move {
            let tx = c.client()?.transaction().await.map_err(pg)?;
            // Token inserts take this lock too: none binds to the map while it goes.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INSERT_LOCK])
                .await
                .map_err(pg)?;
            let users: Vec<String> = tx
                .query(
                    "SELECT name FROM auth_tokens WHERE scope_map = $1 ORDER BY name",
                    &[&name],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !users.is_empty() {
                return Ok(Removal::InUse(users));
            }
            let n = tx
                .execute("DELETE FROM auth_scope_maps WHERE name = $1", &[&name])
                .await
                .map_err(pg)?;
            if n == 0 {
                return Ok(Removal::NotFound);
            }
            tx.execute(
                "DELETE FROM auth_scope_rules WHERE scope_map = $1",
                &[&name],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(Removal::Done)
        })
    }

    fn scope_map(&self, name: &str) -> Result<Option<ScopeMap>, AuthError> {
        let name = name.to_string();
        self.db
            .call(move |mut c| async move { scope_map_of(&*c.client()?, &name).await })
    }

    fn scope_maps(&self) -> Result<Vec<ScopeMap>, AuthError> {
        self.db.call(move |mut c| async move {
            let c = c.client()?;
            let names: Vec<String> = c
                .query("SELECT name FROM auth_scope_maps ORDER BY name", &[])
                .await
                .map_err(pg)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut out = Vec::new();
            for n in names {
                out.extend(scope_map_of(&*c, &n).await?);
            }
            Ok(out)
        })
    }

    fn insert_token(&self, token: &TokenRecord, max: Option<u64>) -> Result<Insert, AuthError> {
        let token = token.clone();
        self.db.call(move |mut c| async move {
            let t = &token.info;
            let tx = c.client()?.transaction().await.map_err(pg)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INSERT_LOCK])
                .await
                .map_err(pg)?;
            if scope_map_of(&tx, &t.scope_map).await?.is_none() {
                return Ok(Insert::NoScopeMap);
            }
            let exists = tx
                .query_opt("SELECT 1 FROM auth_tokens WHERE name = $1", &[&t.name])
                .await
                .map_err(pg)?
                .is_some();
            if exists {
                return Ok(Insert::Exists);
            }
            if let Some(n) = full(&tx, "auth_tokens", max).await? {
                return Ok(Insert::Full(n));
            }
            let created = |slot: &str| {
                t.passwords
                    .iter()
                    .find(|p| p.name == slot)
                    .map(|p| p.created)
            };
            tx.execute(
                "INSERT INTO auth_tokens(name, scope_map, enabled, expiry, created,
                    password1, password1_created, password2, password2_created)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &t.name,
                    &t.scope_map,
                    &(t.status == TokenStatus::Enabled),
                    &t.expiry,
                    &t.created,
                    &token.hashes[0],
                    &created("password1"),
                    &token.hashes[1],
                    &created("password2"),
                ],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(Insert::Done)
        })
    }

    fn set_password(
        &self,
        name: &str,
        slot: Slot,
        hash: &str,
        created: i64,
    ) -> Result<bool, AuthError> {
        let sql = match slot {
            Slot::Password1 => {
                "UPDATE auth_tokens SET password1 = $2, password1_created = $3 WHERE name = $1"
            }
            Slot::Password2 => {
                "UPDATE auth_tokens SET password2 = $2, password2_created = $3 WHERE name = $1"
            }
        };
        Ok(self
            .db
            .execute(sql, args![name.to_string(), hash.to_string(), created])?
            == 1)
    }

    fn set_token_enabled(&self, name: &str, enabled: bool) -> Result<bool, AuthError> {
        Ok(self.db.execute(
            "UPDATE auth_tokens SET enabled = $2 WHERE name = $1",
            args![name.to_string(), enabled],
        )? == 1)
    }

    fn delete_token(&self, name: &str) -> Result<bool, AuthError> {
        Ok(self.db.execute(
            "DELETE FROM auth_tokens WHERE name = $1",
            args![name.to_string()],
        )? == 1)
    }

    fn token(&self, name: &str) -> Result<Option<TokenRecord>, AuthError> {
        let name = name.to_string();
        self.db.call(move |mut c| async move {
            let row = c
                .client()?
                .query_opt(
                    &format!("SELECT {TOKEN_COLS} FROM auth_tokens WHERE name = $1"),
                    &[&name],
                )
                .await
                .map_err(pg)?;
            row.as_ref().map(token_row).transpose()
        })
    }

    fn tokens(&self) -> Result<Vec<TokenInfo>, AuthError> {
        self.db.call(move |mut c| async move {
            let rows = c
                .client()?
                .query(
                    &format!("SELECT {TOKEN_COLS} FROM auth_tokens ORDER BY name"),
                    &[],
                )
                .await
                .map_err(pg)?;
            rows.iter().map(|r| token_row(r).map(|t| t.info)).collect()
        })
    }
}
