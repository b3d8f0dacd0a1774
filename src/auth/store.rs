//! Identities at rest in `<data dir>/auth.db` (SQLite, WAL, beside the registry's
//! `meta.db`): the admin user, tokens (two password slots each, argon2 hashes only) and
//! scope maps. The CLI and a running server open it side by side; the server reads it on
//! every token request, so changes apply to the next `docker login`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::password;
use super::scope::{valid_pattern, Grants, Permission};
use super::AuthError;

/// The admin user's name (ACR uses the registry name; we have just one registry).
pub const ADMIN_USER: &str = "admin";

/// A scope map: repository patterns and what a token bound to it may do there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScopeMap {
    pub name: String,
    pub description: String,
    pub rules: Vec<ScopeRule>,
    /// Unix seconds.
    #[serde(with = "crate::timefmt::secs")]
    pub created: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScopeRule {
    pub repository: String,
    pub actions: Vec<Permission>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    Enabled,
    Disabled,
}

/// A token as listed: no secret and no hash, ever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub name: String,
    pub scope_map: String,
    pub status: TokenStatus,
    /// Unix seconds; None = never expires.
    #[serde(with = "crate::timefmt::opt_secs")]
    pub expiry: Option<i64>,
    #[serde(with = "crate::timefmt::secs")]
    pub created: i64,
    /// Which password slots are set, with when each was generated.
    pub passwords: Vec<PasswordInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PasswordInfo {
    pub name: String,
    #[serde(with = "crate::timefmt::secs")]
    pub created: i64,
}

/// Which of a token's two passwords (rotate one while the other stays valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Password1,
    Password2,
}

impl Slot {
    fn col(self) -> &'static str {
        match self {
            Slot::Password1 => "password1",
            Slot::Password2 => "password2",
        }
    }
}

/// A one-time secret returned by create/renew; print it once and drop it.
#[derive(Clone, PartialEq, Eq)]
pub struct NewSecret {
    pub slot: String,
    pub value: String,
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret")
            .field("slot", &self.slot)
            .field("value", &"<redacted>")
            .finish()
    }
}

pub struct AuthStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn check_ident(kind: &str, name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= 50
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "invalid {kind} name {name:?}: use 1-50 letters, digits, '-' or '_', starting with a letter or digit"
        )))
    }
}

/// `auth.db`'s schema, one entry per version (see [`crate::store::migrate`]).
const MIGRATIONS: &[crate::store::migrate::Migration] = &[crate::store::migrate::Migration::Sql(
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
)];

impl AuthStore {
    /// Open (creating if needed) `<dir>/auth.db`.
    pub fn open(dir: &Path) -> Result<AuthStore, AuthError> {
        // Hashes only, but still nobody else's business.
        let (path, conn) = crate::store::migrate::open_private(dir, "auth.db", MIGRATIONS)?;
        Ok(AuthStore {
            path,
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, AuthError> {
        self.conn
            .lock()
            .map_err(|_| AuthError::Internal("auth store lock poisoned".into()))
    }

    fn setting(conn: &Connection, key: &str) -> Result<Option<String>, AuthError> {
        Ok(conn
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// A named flag in the settings (e.g. that the admin was created on first start).
    pub fn flag(&self, key: &str) -> Result<bool, AuthError> {
        let c = self.conn()?;
        Ok(Self::setting(&c, &format!("flag:{key}"))?.is_some())
    }

    pub fn set_flag(&self, key: &str) -> Result<(), AuthError> {
        let c = self.conn()?;
        c.execute(
            "INSERT OR REPLACE INTO settings(key, value) VALUES (?1, '1')",
            params![format!("flag:{key}")],
        )?;
        Ok(())
    }

    // ---- admin ----

    pub fn admin_enabled(&self) -> Result<bool, AuthError> {
        let c = self.conn()?;
        Ok(Self::setting(&c, "admin_enabled")?.as_deref() == Some("1")
            && Self::setting(&c, "admin_password")?.is_some())
    }

    /// Enable the admin user with a fresh password (the old one stops working).
    pub fn renew_admin(&self) -> Result<NewSecret, AuthError> {
        let secret = password::generate();
        let h = password::hash(&secret)?;
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO settings(key, value) VALUES ('admin_password', ?1)",
            params![h],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO settings(key, value) VALUES ('admin_enabled', '1')",
            [],
        )?;
        tx.commit()?;
        tracing::info!("admin user enabled with a new password");
        Ok(NewSecret {
            slot: "password".into(),
            value: secret,
        })
    }

    pub fn disable_admin(&self) -> Result<(), AuthError> {
        let c = self.conn()?;
        c.execute(
            "DELETE FROM settings WHERE key IN ('admin_enabled', 'admin_password')",
            [],
        )?;
        Ok(())
    }

    // ---- scope maps ----

    fn check_rules(rules: &[ScopeRule]) -> Result<(), AuthError> {
        for r in rules {
            if !valid_pattern(&r.repository) {
                return Err(AuthError::Invalid(format!(
                    "invalid repository pattern {:?} (a repository name, NAME/* or *)",
                    r.repository
                )));
            }
            if let Some(p) = r.actions.iter().find(|p| p.registry_wide()) {
                if r.repository != "*" {
                    return Err(AuthError::Invalid(format!(
                        "{} is about the whole registry, not repository {:?}: give it for --repository '*'",
                        p.as_str(),
                        r.repository
                    )));
                }
            }
            if r.actions.is_empty() {
                return Err(AuthError::Invalid(format!(
                    "no actions given for repository {:?}",
                    r.repository
                )));
            }
        }
        Ok(())
    }

    pub fn create_scope_map(
        &self,
        name: &str,
        description: &str,
        rules: &[ScopeRule],
    ) -> Result<ScopeMap, AuthError> {
        check_ident("scope map", name)?;
        Self::check_rules(rules)?;
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO scope_maps(name, description, created) VALUES (?1, ?2, ?3)",
            params![name, description, now()],
        )?;
        if n == 0 {
            return Err(AuthError::Exists(format!("scope map {name:?}")));
        }
        Self::add_rules(&tx, name, rules)?;
        tx.commit()?;
        drop(c);
        self.scope_map(name)?
            .ok_or_else(|| AuthError::Internal("scope map vanished".into()))
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

    /// Add and remove rules (removal first), and optionally change the description.
    pub fn update_scope_map(
        &self,
        name: &str,
        add: &[ScopeRule],
        remove: &[ScopeRule],
        description: Option<&str>,
    ) -> Result<ScopeMap, AuthError> {
        Self::check_rules(add)?;
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let exists: bool = tx
            .query_row(
                "SELECT 1 FROM scope_maps WHERE name = ?1",
                params![name],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !exists {
            return Err(AuthError::NotFound(format!("scope map {name:?}")));
        }
        for r in remove {
            for a in &r.actions {
                tx.execute(
                    "DELETE FROM scope_rules WHERE scope_map = ?1 AND repository = ?2 AND action = ?3",
                    params![name, r.repository, a.as_str()],
                )?;
            }
        }
        Self::add_rules(&tx, name, add)?;
        if let Some(d) = description {
            tx.execute(
                "UPDATE scope_maps SET description = ?2 WHERE name = ?1",
                params![name, d],
            )?;
        }
        tx.commit()?;
        drop(c);
        self.scope_map(name)?
            .ok_or_else(|| AuthError::Internal("scope map vanished".into()))
    }

    /// Refused while a token uses it.
    pub fn delete_scope_map(&self, name: &str) -> Result<(), AuthError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let users: Vec<String> = {
            let mut st =
                tx.prepare("SELECT name FROM tokens WHERE scope_map = ?1 ORDER BY name")?;
            let rows = st.query_map(params![name], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if !users.is_empty() {
            return Err(AuthError::Invalid(format!(
                "scope map {name:?} is used by token(s) {}; delete or rebind them first",
                users.join(", ")
            )));
        }
        let n = tx.execute("DELETE FROM scope_maps WHERE name = ?1", params![name])?;
        if n == 0 {
            return Err(AuthError::NotFound(format!("scope map {name:?}")));
        }
        tx.execute(
            "DELETE FROM scope_rules WHERE scope_map = ?1",
            params![name],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn rules_of(c: &Connection, name: &str) -> Result<Vec<ScopeRule>, AuthError> {
        let mut st = c.prepare(
            "SELECT repository, action FROM scope_rules WHERE scope_map = ?1 ORDER BY repository, action",
        )?;
        let rows = st.query_map(params![name], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out: Vec<ScopeRule> = Vec::new();
        for row in rows {
            let (repo, action) = row?;
            let p: Permission = action.parse()?;
            match out.last_mut() {
                Some(last) if last.repository == repo => last.actions.push(p),
                _ => out.push(ScopeRule {
                    repository: repo,
                    actions: vec![p],
                }),
            }
        }
        for r in &mut out {
            r.actions.sort();
        }
        Ok(out)
    }

    pub fn scope_map(&self, name: &str) -> Result<Option<ScopeMap>, AuthError> {
        let c = self.conn()?;
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
            rules: Self::rules_of(&c, name)?,
            created,
        }))
    }

    pub fn scope_maps(&self) -> Result<Vec<ScopeMap>, AuthError> {
        let names: Vec<String> = {
            let c = self.conn()?;
            let mut st = c.prepare("SELECT name FROM scope_maps ORDER BY name")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for n in names {
            if let Some(m) = self.scope_map(&n)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    // ---- tokens ----

    /// Create a token bound to `scope_map` and generate both its passwords (unless
    /// `no_passwords`), returned once here and stored only as hashes.
    pub fn create_token(
        &self,
        name: &str,
        scope_map: &str,
        expiry: Option<i64>,
        enabled: bool,
        no_passwords: bool,
    ) -> Result<(TokenInfo, Vec<NewSecret>), AuthError> {
        check_ident("token", name)?;
        if name == ADMIN_USER {
            return Err(AuthError::Invalid(format!(
                "{ADMIN_USER:?} is the admin user's name; pick another token name"
            )));
        }
        let mut secrets = Vec::new();
        let mut hashes: Vec<Option<String>> = vec![None, None];
        if !no_passwords {
            for (i, slot) in ["password1", "password2"].iter().enumerate() {
                let s = password::generate();
                hashes[i] = Some(password::hash(&s)?);
                secrets.push(NewSecret {
                    slot: slot.to_string(),
                    value: s,
                });
            }
        }
        {
            let mut c = self.conn()?;
            let tx = c.transaction()?;
            let map_exists = tx
                .query_row(
                    "SELECT 1 FROM scope_maps WHERE name = ?1",
                    params![scope_map],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !map_exists {
                return Err(AuthError::NotFound(format!("scope map {scope_map:?}")));
            }
            let t = now();
            let made = hashes[0].as_ref().map(|_| t);
            let n = tx.execute(
                "INSERT OR IGNORE INTO tokens(name, scope_map, enabled, expiry, created,
                    password1, password1_created, password2, password2_created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?7)",
                params![name, scope_map, enabled, expiry, t, hashes[0], made, hashes[1]],
            )?;
            if n == 0 {
                return Err(AuthError::Exists(format!("token {name:?}")));
            }
            tx.commit()?;
        }
        let info = self
            .token(name)?
            .ok_or_else(|| AuthError::Internal("token vanished".into()))?;
        Ok((info, secrets))
    }

    /// Generate a new password in `slot` (the other slot keeps working).
    pub fn renew_token(&self, name: &str, slot: Slot) -> Result<NewSecret, AuthError> {
        let s = password::generate();
        let h = password::hash(&s)?;
        let c = self.conn()?;
        let sql = format!(
            "UPDATE tokens SET {0} = ?2, {0}_created = ?3 WHERE name = ?1",
            slot.col()
        );
        let n = c.execute(&sql, params![name, h, now()])?;
        if n == 0 {
            return Err(AuthError::NotFound(format!("token {name:?}")));
        }
        Ok(NewSecret {
            slot: slot.col().to_string(),
            value: s,
        })
    }

    pub fn set_token_status(&self, name: &str, enabled: bool) -> Result<(), AuthError> {
        let c = self.conn()?;
        let n = c.execute(
            "UPDATE tokens SET enabled = ?2 WHERE name = ?1",
            params![name, enabled],
        )?;
        if n == 0 {
            return Err(AuthError::NotFound(format!("token {name:?}")));
        }
        Ok(())
    }

    pub fn delete_token(&self, name: &str) -> Result<(), AuthError> {
        let c = self.conn()?;
        let n = c.execute("DELETE FROM tokens WHERE name = ?1", params![name])?;
        if n == 0 {
            return Err(AuthError::NotFound(format!("token {name:?}")));
        }
        Ok(())
    }

    fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenInfo> {
        let mut passwords = Vec::new();
        if let Some(t) = r.get::<_, Option<i64>>(5)? {
            passwords.push(PasswordInfo {
                name: "password1".into(),
                created: t,
            });
        }
        if let Some(t) = r.get::<_, Option<i64>>(6)? {
            passwords.push(PasswordInfo {
                name: "password2".into(),
                created: t,
            });
        }
        Ok(TokenInfo {
            name: r.get(0)?,
            scope_map: r.get(1)?,
            status: if r.get::<_, bool>(2)? {
                TokenStatus::Enabled
            } else {
                TokenStatus::Disabled
            },
            expiry: r.get(3)?,
            created: r.get(4)?,
            passwords,
        })
    }

    const TOKEN_COLS: &'static str =
        "name, scope_map, enabled, expiry, created, password1_created, password2_created";

    pub fn token(&self, name: &str) -> Result<Option<TokenInfo>, AuthError> {
        let c = self.conn()?;
        Ok(c.query_row(
            &format!("SELECT {} FROM tokens WHERE name = ?1", Self::TOKEN_COLS),
            params![name],
            Self::token_row,
        )
        .optional()?)
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>, AuthError> {
        let c = self.conn()?;
        let mut st = c.prepare(&format!(
            "SELECT {} FROM tokens ORDER BY name",
            Self::TOKEN_COLS
        ))?;
        let rows = st.query_map([], Self::token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- authentication ----

    /// What `user` (a token name or the admin) may do now: `None` when it is disabled,
    /// expired or gone; else the admin's everything or the token's current scope map.
    pub fn subject_grants(&self, user: &str) -> Result<Option<Grants>, AuthError> {
        let c = self.conn()?;
        if user == ADMIN_USER {
            let on = Self::setting(&c, "admin_enabled")?.as_deref() == Some("1");
            return Ok(on.then_some(Grants::All));
        }
        let row: Option<(String, bool, Option<i64>)> = c
            .query_row(
                "SELECT scope_map, enabled, expiry FROM tokens WHERE name = ?1",
                params![user],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((map, enabled, expiry)) = row else {
            return Ok(None);
        };
        if !enabled || expiry.is_some_and(|e| e <= now()) {
            return Ok(None);
        }
        Ok(Some(Self::grants_of(&c, &map)?))
    }

    fn grants_of(c: &Connection, map: &str) -> Result<Grants, AuthError> {
        Ok(Grants::Rules(
            Self::rules_of(c, map)?
                .into_iter()
                .map(|r| (r.repository, r.actions))
                .collect(),
        ))
    }

    /// Check a user name and password. `Ok(None)` for any failure (unknown user, wrong
    /// password, disabled or expired token) so callers cannot tell them apart, not even by
    /// timing: every call makes exactly [`HASHES_PER_LOGIN`] password verifications
    /// (a token's two password slots; the admin's one and a dummy; two dummies for a name
    /// that does not exist).
    pub fn authenticate(&self, user: &str, secret: &str) -> Result<Option<Grants>, AuthError> {
        let check = |h: Option<&str>| match h {
            Some(h) => password::verify(secret, h),
            None => {
                password::verify_dummy(secret);
                false
            }
        };
        if user == ADMIN_USER {
            let h = {
                let c = self.conn()?;
                let on = Self::setting(&c, "admin_enabled")?.as_deref() == Some("1");
                Self::setting(&c, "admin_password")?.filter(|_| on)
            };
            let ok = check(h.as_deref());
            check(None);
            return Ok(ok.then_some(Grants::All));
        }
        type Row = (String, bool, Option<i64>, Option<String>, Option<String>);
        let row: Option<Row> = {
            let c = self.conn()?;
            c.query_row(
                "SELECT scope_map, enabled, expiry, password1, password2 FROM tokens WHERE name = ?1",
                params![user],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?
        };
        let Some((map, enabled, expiry, p1, p2)) = row else {
            check(None);
            check(None);
            return Ok(None);
        };
        let ok1 = check(p1.as_deref());
        let ok2 = check(p2.as_deref());
        if !(ok1 || ok2) || !enabled || expiry.is_some_and(|e| e <= now()) {
            return Ok(None);
        }
        let c = self.conn()?;
        Ok(Some(Self::grants_of(&c, &map)?))
    }
}

/// Password verifications in every [`AuthStore::authenticate`] call, whoever asks.
pub const HASHES_PER_LOGIN: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(repo: &str, actions: &[Permission]) -> ScopeRule {
        ScopeRule {
            repository: repo.into(),
            actions: actions.to_vec(),
        }
    }

    #[test]
    fn tokens_authenticate_with_either_password_until_disabled_or_expired() {
        let d = tempfile::tempdir().unwrap();
        let s = AuthStore::open(d.path()).unwrap();
        s.create_scope_map("pull", "", &[rule("samples/*", &[Permission::ContentRead])])
            .unwrap();
        let (info, secrets) = s.create_token("ci", "pull", None, true, false).unwrap();
        assert_eq!(info.passwords.len(), 2);
        assert_eq!(secrets.len(), 2);
        let g = s.authenticate("ci", &secrets[0].value).unwrap().unwrap();
        assert_eq!(g.repo_actions("samples/x"), vec!["pull"]);
        assert!(s.authenticate("ci", &secrets[1].value).unwrap().is_some());
        assert!(s.authenticate("ci", "wrong").unwrap().is_none());
        assert!(s
            .authenticate("nobody", &secrets[0].value)
            .unwrap()
            .is_none());
        // Nothing secret at rest.
        let raw = std::fs::read(d.path().join("auth.db")).unwrap();
        let raw = String::from_utf8_lossy(&raw);
        assert!(!raw.contains(&secrets[0].value));
        // Renewing password1 invalidates it and leaves password2.
        let new1 = s.renew_token("ci", Slot::Password1).unwrap();
        assert!(s.authenticate("ci", &secrets[0].value).unwrap().is_none());
        assert!(s.authenticate("ci", &new1.value).unwrap().is_some());
        assert!(s.authenticate("ci", &secrets[1].value).unwrap().is_some());
        s.set_token_status("ci", false).unwrap();
        assert!(s.authenticate("ci", &new1.value).unwrap().is_none());
        // Expired tokens are refused.
        let (_, sec) = s
            .create_token("old", "pull", Some(now() - 1), true, false)
            .unwrap();
        assert!(s.authenticate("old", &sec[0].value).unwrap().is_none());
        assert!(matches!(
            s.create_token("ci", "pull", None, true, false),
            Err(AuthError::Exists(_))
        ));
        assert!(matches!(
            s.create_token("x", "missing", None, true, false),
            Err(AuthError::NotFound(_))
        ));
        assert!(format!("{:?}", sec[0]).contains("redacted"));
    }

    #[test]
    fn admin_is_off_until_renewed() {
        let d = tempfile::tempdir().unwrap();
        let s = AuthStore::open(d.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!s.admin_enabled().unwrap());
        assert!(s.authenticate(ADMIN_USER, "").unwrap().is_none());
        let p = s.renew_admin().unwrap();
        assert!(s.admin_enabled().unwrap());
        assert_eq!(
            s.authenticate(ADMIN_USER, &p.value).unwrap(),
            Some(Grants::All)
        );
        s.disable_admin().unwrap();
        assert!(s.authenticate(ADMIN_USER, &p.value).unwrap().is_none());
        assert!(s.create_token(ADMIN_USER, "x", None, true, false).is_err());
    }

    #[test]
    fn scope_map_update_and_delete() {
        let d = tempfile::tempdir().unwrap();
        let s = AuthStore::open(d.path()).unwrap();
        let m = s
            .create_scope_map(
                "m",
                "d",
                &[rule(
                    "a",
                    &[Permission::ContentWrite, Permission::ContentRead],
                )],
            )
            .unwrap();
        assert_eq!(
            m.rules,
            vec![rule(
                "a",
                &[Permission::ContentRead, Permission::ContentWrite]
            )]
        );
        let m = s
            .update_scope_map(
                "m",
                &[rule("b/*", &[Permission::MetadataRead])],
                &[rule("a", &[Permission::ContentWrite])],
                None,
            )
            .unwrap();
        assert_eq!(
            m.rules,
            vec![
                rule("a", &[Permission::ContentRead]),
                rule("b/*", &[Permission::MetadataRead])
            ]
        );
        assert!(s
            .create_scope_map("bad", "", &[rule("Bad", &[Permission::ContentRead])])
            .is_err());
        s.create_token("t", "m", None, true, true).unwrap();
        assert!(s.delete_scope_map("m").is_err());
        s.delete_token("t").unwrap();
        s.delete_scope_map("m").unwrap();
        assert!(s.scope_maps().unwrap().is_empty());
    }

    #[test]
    fn unknown_names_take_as_long_as_known_ones() {
        let d = tempfile::tempdir().unwrap();
        let s = AuthStore::open(d.path()).unwrap();
        s.create_scope_map("m", "", &[rule("*", &[Permission::ContentRead])])
            .unwrap();
        s.create_token("two", "m", None, true, false).unwrap();
        s.renew_admin().unwrap();
        // Median of several timings per kind of name, interleaved so load hits all alike.
        let names = ["two", ADMIN_USER, "nobody"];
        let mut times: Vec<Vec<std::time::Duration>> = vec![Vec::new(); names.len()];
        for _ in 0..9 {
            for (i, n) in names.iter().enumerate() {
                let t0 = std::time::Instant::now();
                assert!(s.authenticate(n, "wrong password").unwrap().is_none());
                times[i].push(t0.elapsed());
            }
        }
        let medians: Vec<f64> = times
            .iter_mut()
            .map(|t| {
                t.sort();
                t[t.len() / 2].as_secs_f64()
            })
            .collect();
        let (lo, hi) = medians
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &m| (lo.min(m), hi.max(m)));
        // Unknown names used to cost one verification and tokens two: a factor of 2.
        // Noise between medians stays under 1.5.
        assert!(hi / lo < 1.5, "login times differ by name: {medians:?}");
    }
}
