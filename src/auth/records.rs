//! Auth's records behind one trait: settings (the admin's password hash and switch, flags),
//! scope maps with their rules, tokens with their two password hashes. SQLite
//! ([`super::sqlite::SqliteAuth`], `auth.db`) or PostgreSQL ([`super::postgres::PgAuth`],
//! shared by a server's replicas), under [`super::AuthStore`], which owns the rules (names,
//! patterns, hashing, timing). Every call blocks and is one transaction.

use super::store::{ScopeMap, ScopeRule, Slot, TokenInfo};
use super::AuthError;

/// Where auth's records are kept.
pub trait AuthRecords: Send + Sync {
    /// Where the records live, for messages (a file, a database).
    fn location(&self) -> String;

    /// A setting's value.
    fn setting(&self, key: &str) -> Result<Option<String>, AuthError>;
    /// Sets each `(key, value)`, all or none.
    fn set_settings(&self, pairs: &[(&str, &str)]) -> Result<(), AuthError>;
    /// The setting's value, first set to `value` if it has none (one value wins however
    /// many servers ask at once).
    fn setting_or_insert(&self, key: &str, value: &str) -> Result<String, AuthError>;
    /// Removes these settings, all or none.
    fn delete_settings(&self, keys: &[&str]) -> Result<(), AuthError>;

    /// Adds a scope map with its rules; false when one of that name exists.
    /// Adds a scope map unless `max` of them exist.
    fn insert_scope_map(&self, map: &ScopeMap, max: Option<u64>) -> Result<Insert, AuthError>;
    /// Removes then adds rules and sets the description; false when there is no such map.
    fn change_scope_map(
        &self,
        name: &str,
        add: &[ScopeRule],
        remove: &[ScopeRule],
        description: Option<&str>,
    ) -> Result<bool, AuthError>;
    /// Deletes a scope map no token uses.
    fn delete_scope_map(&self, name: &str) -> Result<Removal, AuthError>;
    /// A scope map with its rules (each rule's actions sorted, rules by repository).
    fn scope_map(&self, name: &str) -> Result<Option<ScopeMap>, AuthError>;
    /// Every scope map, by name.
    fn scope_maps(&self) -> Result<Vec<ScopeMap>, AuthError>;

    /// Adds a token bound to an existing scope map.
    /// Adds a token unless `max` of them exist.
    fn insert_token(&self, token: &TokenRecord, max: Option<u64>) -> Result<Insert, AuthError>;
    /// Replaces the hash in one password slot; false when there is no such token.
    fn set_password(
        &self,
        name: &str,
        slot: Slot,
        hash: &str,
        created: i64,
    ) -> Result<bool, AuthError>;
    /// False when there is no such token.
    fn set_token_enabled(&self, name: &str, enabled: bool) -> Result<bool, AuthError>;
    /// False when there is no such token.
    fn delete_token(&self, name: &str) -> Result<bool, AuthError>;
    /// A token with its password hashes.
    fn token(&self, name: &str) -> Result<Option<TokenRecord>, AuthError>;
    /// Every token (no hashes), by name.
    fn tokens(&self) -> Result<Vec<TokenInfo>, AuthError>;

    /// Keeps a run's login (replacing one of the same user); expired ones go.
    fn put_run_login(&self, login: &RunLoginRecord, now: i64) -> Result<(), AuthError>;
    /// A run's login, if it is kept and not expired at `now`.
    fn run_login(&self, user: &str, now: i64) -> Result<Option<RunLoginRecord>, AuthError>;
    /// Forgets a run's login.
    fn delete_run_login(&self, user: &str) -> Result<(), AuthError>;
}

/// A run's own registry login as kept, so that a server restarting, or another replica,
/// still knows it: the SHA-256 of its (random, single-use) password, what it may do, and
/// until when (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLoginRecord {
    pub user: String,
    pub secret_sha256: String,
    /// `Grants::Rules` as JSON: `[[pattern, [action, ...]], ...]`.
    pub grants: String,
    pub expires: i64,
}

/// A scope map's rules from its (repository, action) rows in that order: one rule per
/// repository, its actions sorted.
pub fn rules_from_rows(
    rows: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<ScopeRule>, AuthError> {
    let mut out: Vec<ScopeRule> = Vec::new();
    for (repo, action) in rows {
        let p: super::scope::Permission = action.parse()?;
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

/// A token's columns as both backends store them.
pub struct TokenColumns {
    pub name: String,
    pub scope_map: String,
    pub enabled: bool,
    pub expiry: Option<i64>,
    pub created: i64,
    /// When each password slot was set (none: empty).
    pub set: [Option<i64>; 2],
    pub hashes: [Option<String>; 2],
}

impl From<TokenColumns> for TokenRecord {
    fn from(c: TokenColumns) -> TokenRecord {
        let passwords = ["password1", "password2"]
            .into_iter()
            .zip(c.set)
            .filter_map(|(name, t)| {
                t.map(|created| super::store::PasswordInfo {
                    name: name.into(),
                    created,
                })
            })
            .collect();
        TokenRecord {
            info: TokenInfo {
                name: c.name,
                scope_map: c.scope_map,
                status: if c.enabled {
                    super::store::TokenStatus::Enabled
                } else {
                    super::store::TokenStatus::Disabled
                },
                expiry: c.expiry,
                created: c.created,
                passwords,
            },
            hashes: c.hashes,
        }
    }
}

/// A token as stored: what is listed, and the hashes of its two password slots.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub info: TokenInfo,
    pub hashes: [Option<String>; 2],
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("info", &self.info)
            .field("hashes", &"<redacted>")
            .finish()
    }
}

/// What an insert found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    Done,
    Exists,
    /// A token's scope map does not exist.
    NoScopeMap,
    /// `max` exist already (how many there are).
    Full(u64),
}

/// What a delete found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    Done,
    NotFound,
    /// Still used by these tokens.
    InUse(Vec<String>),
}
