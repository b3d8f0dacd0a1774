//! Identities: the admin user, tokens (two password slots each, argon2 hashes only) and
//! scope maps, kept as [`AuthRecords`] (`auth.db` by default). The server reads them on
//! every token request, so changes apply to the next `docker login`.

use crate::tier::Counted;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::password;
use super::records::{AuthRecords, Insert, Removal, TokenRecord};
use super::scope::{valid_pattern, Grants, Permission};
use super::sqlite::SqliteAuth;
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScopeRule {
    pub repository: String,
    pub actions: Vec<Permission>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// The slot's name as `az acr token` prints it.
    pub fn name(self) -> &'static str {
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

/// Identities and what they may do: the rules (names, patterns, the admin's name, hashing
/// and its timing) over [`AuthRecords`], wherever those are kept.
pub struct AuthStore {
    records: Box<dyn AuthRecords>,
}

/// The tier's refusal of one more `what`, `n` existing.
fn full(tier: &crate::tier::Properties, what: Counted, n: u64) -> AuthError {
    match tier.check_count(what, n) {
        Err(e) => AuthError::Limit(e),
        Ok(()) => AuthError::Internal("a tier limit was reached and then not".into()),
    }
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

const ADMIN_ENABLED: &str = "admin_enabled";
const ADMIN_PASSWORD: &str = "admin_password";

impl AuthStore {
    /// Open (creating if needed) the records in `<dir>/auth.db`.
    pub fn open(dir: &Path) -> Result<AuthStore, AuthError> {
        Ok(AuthStore::new(Box::new(SqliteAuth::open(dir)?)))
    }

    /// Over any backend's records.
    pub fn new(records: Box<dyn AuthRecords>) -> AuthStore {
        AuthStore { records }
    }

    /// The token signing key kept in the records (so servers sharing them sign alike),
    /// made once from 32 random bytes.
    pub fn shared_signing_key(&self) -> Result<Vec<u8>, AuthError> {
        let fresh = hex::encode(super::password::random_bytes(32));
        let kept = self
            .records
            .setting_or_insert("token_signing_key", &fresh)?;
        let key = hex::decode(kept.trim()).ok();
        match key {
            Some(k) if k.len() >= 32 => Ok(k),
            _ => Err(AuthError::Internal(format!(
                "the token signing key in {} is damaged; delete its token_signing_key setting to make a new one",
                self.location()
            ))),
        }
    }

    /// The records themselves (run logins, which have no rules of their own here).
    pub fn records(&self) -> &dyn AuthRecords {
        self.records.as_ref()
    }

    /// Where the records live, for messages.
    pub fn location(&self) -> String {
        self.records.location()
    }

    /// A named flag in the settings (e.g. that the admin was created on first start).
    pub fn flag(&self, key: &str) -> Result<bool, AuthError> {
        Ok(self.records.setting(&format!("flag:{key}"))?.is_some())
    }

    pub fn set_flag(&self, key: &str) -> Result<(), AuthError> {
        self.records.set_settings(&[(&format!("flag:{key}"), "1")])
    }

    // ---- admin ----

    pub fn admin_enabled(&self) -> Result<bool, AuthError> {
        Ok(self.admin_hash()?.is_some())
    }

    /// The admin's password hash while the admin is enabled.
    fn admin_hash(&self) -> Result<Option<String>, AuthError> {
        let on = self.records.setting(ADMIN_ENABLED)?.as_deref() == Some("1");
        Ok(self.records.setting(ADMIN_PASSWORD)?.filter(|_| on))
    }

    /// Enable the admin user with a fresh password (the old one stops working).
    pub fn renew_admin(&self) -> Result<NewSecret, AuthError> {
        let secret = password::generate();
        let h = password::hash(&secret)?;
        self.records
            .set_settings(&[(ADMIN_PASSWORD, &h), (ADMIN_ENABLED, "1")])?;
        tracing::info!("admin user enabled with a new password");
        Ok(NewSecret {
            slot: "password".into(),
            value: secret,
        })
    }

    pub fn disable_admin(&self) -> Result<(), AuthError> {
        self.records
            .delete_settings(&[ADMIN_ENABLED, ADMIN_PASSWORD])
    }

    // ---- scope maps ----

    pub fn create_scope_map(
        &self,
        name: &str,
        description: &str,
        rules: &[ScopeRule],
        tier: &crate::tier::Properties,
    ) -> Result<ScopeMap, AuthError> {
        check_ident("scope map", name)?;
        check_rules(rules)?;
        let map = ScopeMap {
            name: name.to_string(),
            description: description.to_string(),
            rules: rules.to_vec(),
            created: now(),
        };
        match self
            .records
            .insert_scope_map(&map, tier.limits().scope_maps)?
        {
            Insert::Done => {}
            Insert::Full(n) => return Err(full(tier, Counted::ScopeMaps, n)),
            Insert::Exists | Insert::NoScopeMap => {
                return Err(AuthError::Exists(format!("scope map {name:?}")))
            }
        }
        self.scope_map(name)?
            .ok_or_else(|| AuthError::Internal("scope map vanished".into()))
    }

    /// Add and remove rules (removal first), and optionally change the description.
    pub fn update_scope_map(
        &self,
        name: &str,
        add: &[ScopeRule],
        remove: &[ScopeRule],
        description: Option<&str>,
    ) -> Result<ScopeMap, AuthError> {
        check_rules(add)?;
        if !self
            .records
            .change_scope_map(name, add, remove, description)?
        {
            return Err(AuthError::NotFound(format!("scope map {name:?}")));
        }
        self.scope_map(name)?
            .ok_or_else(|| AuthError::Internal("scope map vanished".into()))
    }

    /// Refused while a token uses it.
    pub fn delete_scope_map(&self, name: &str) -> Result<(), AuthError> {
        match self.records.delete_scope_map(name)? {
            Removal::Done => Ok(()),
            Removal::NotFound => Err(AuthError::NotFound(format!("scope map {name:?}"))),
            Removal::InUse(users) => Err(AuthError::Invalid(format!(
                "scope map {name:?} is used by token(s) {}; delete or rebind them first",
                users.join(", ")
            ))),
        }
    }

    pub fn scope_map(&self, name: &str) -> Result<Option<ScopeMap>, AuthError> {
        self.records.scope_map(name)
    }

    pub fn scope_maps(&self) -> Result<Vec<ScopeMap>, AuthError> {
        self.records.scope_maps()
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
        tier: &crate::tier::Properties,
    ) -> Result<(TokenInfo, Vec<NewSecret>), AuthError> {
        check_ident("token", name)?;
        if name == ADMIN_USER {
            return Err(AuthError::Invalid(format!(
                "{ADMIN_USER:?} is the admin user's name; pick another token name"
            )));
        }
        let t = now();
        let mut secrets = Vec::new();
        let mut hashes: [Option<String>; 2] = [None, None];
        let mut passwords = Vec::new();
        if !no_passwords {
            for (i, slot) in ["password1", "password2"].iter().enumerate() {
                let s = password::generate();
                hashes[i] = Some(password::hash(&s)?);
                passwords.push(PasswordInfo {
                    name: slot.to_string(),
                    created: t,
                });
                secrets.push(NewSecret {
                    slot: slot.to_string(),
                    value: s,
                });
            }
        }
        let record = TokenRecord {
            info: TokenInfo {
                name: name.to_string(),
                scope_map: scope_map.to_string(),
                status: if enabled {
                    TokenStatus::Enabled
                } else {
                    TokenStatus::Disabled
                },
                expiry,
                created: t,
                passwords,
            },
            hashes,
        };
        match self.records.insert_token(&record, tier.limits().tokens)? {
            Insert::Done => {}
            Insert::Full(n) => return Err(full(tier, Counted::Tokens, n)),
            Insert::Exists => return Err(AuthError::Exists(format!("token {name:?}"))),
            Insert::NoScopeMap => {
                return Err(AuthError::NotFound(format!("scope map {scope_map:?}")))
            }
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
        if !self.records.set_password(name, slot, &h, now())? {
            return Err(AuthError::NotFound(format!("token {name:?}")));
        }
        Ok(NewSecret {
            slot: slot.name().to_string(),
            value: s,
        })
    }

    pub fn set_token_status(&self, name: &str, enabled: bool) -> Result<(), AuthError> {
        if !self.records.set_token_enabled(name, enabled)? {
            return Err(AuthError::NotFound(format!("token {name:?}")));
        }
        Ok(())
    }

    pub fn delete_token(&self, name: &str) -> Result<(), AuthError> {
        if !self.records.delete_token(name)? {
            return Err(AuthError::NotFound(format!("token {name:?}")));
        }
        Ok(())
    }

    pub fn token(&self, name: &str) -> Result<Option<TokenInfo>, AuthError> {
        Ok(self.records.token(name)?.map(|t| t.info))
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>, AuthError> {
        self.records.tokens()
    }

    // ---- authentication ----

    /// What `user` (a token name or the admin) may do now: `None` when it is disabled,
    /// expired or gone; else the admin's everything or the token's current scope map.
    pub fn subject_grants(&self, user: &str) -> Result<Option<Grants>, AuthError> {
        if user == ADMIN_USER {
            let on = self.records.setting(ADMIN_ENABLED)?.as_deref() == Some("1");
            return Ok(on.then_some(Grants::All));
        }
        match self.records.token(user)? {
            Some(t) if usable(&t.info) => Ok(Some(self.grants_of(&t.info.scope_map)?)),
            _ => Ok(None),
        }
    }

    fn grants_of(&self, map: &str) -> Result<Grants, AuthError> {
        let rules = self
            .records
            .scope_map(map)?
            .map(|m| m.rules)
            .unwrap_or_default();
        Ok(Grants::Rules(
            rules
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
            let ok = check(self.admin_hash()?.as_deref());
            check(None);
            return Ok(ok.then_some(Grants::All));
        }
        let Some(t) = self.records.token(user)? else {
            check(None);
            check(None);
            return Ok(None);
        };
        let ok1 = check(t.hashes[0].as_deref());
        let ok2 = check(t.hashes[1].as_deref());
        if !(ok1 || ok2) || !usable(&t.info) {
            return Ok(None);
        }
        Ok(Some(self.grants_of(&t.info.scope_map)?))
    }
}

/// Enabled and not expired.
fn usable(t: &TokenInfo) -> bool {
    t.status == TokenStatus::Enabled && t.expiry.is_none_or(|e| e > now())
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

    /// Every records backend, fresh in `dir`: the bodies below run against each
    /// (PostgreSQL when `ACR_TASK_TEST_POSTGRES` names a server).
    fn backends(dir: &Path) -> Vec<(&'static str, AuthStore)> {
        let mut out = vec![("sqlite", AuthStore::open(dir).unwrap())];
        if let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") {
            let db = crate::pg::fresh_database(&url).unwrap();
            let records = crate::auth::postgres::PgAuth::open(&db).unwrap();
            out.push(("postgres", AuthStore::new(Box::new(records))));
        }
        out
    }

    #[test]
    fn a_setting_is_inserted_once_whoever_asks() {
        let d = tempfile::tempdir().unwrap();
        for (name, s) in backends(d.path()) {
            assert_eq!(s.records.setting_or_insert("k", "first").unwrap(), "first");
            assert_eq!(
                s.records.setting_or_insert("k", "second").unwrap(),
                "first",
                "{name}"
            );
        }
    }

    #[test]
    fn tokens_authenticate_with_either_password_until_disabled_or_expired() {
        let d = tempfile::tempdir().unwrap();
        for (name, s) in backends(d.path()) {
            tokens_authenticate(name, &s);
        }
    }

    fn tokens_authenticate(name: &str, s: &AuthStore) {
        s.create_scope_map(
            "pull",
            "",
            &[rule("samples/*", &[Permission::ContentRead])],
            &Default::default(),
        )
        .unwrap();
        let (info, secrets) = s
            .create_token("ci", "pull", None, true, false, &Default::default())
            .unwrap();
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
        if name == "sqlite" {
            let raw = std::fs::read(s.location()).unwrap();
            let raw = String::from_utf8_lossy(&raw);
            assert!(!raw.contains(&secrets[0].value));
        }
        // Renewing password1 invalidates it and leaves password2.
        let new1 = s.renew_token("ci", Slot::Password1).unwrap();
        assert!(s.authenticate("ci", &secrets[0].value).unwrap().is_none());
        assert!(s.authenticate("ci", &new1.value).unwrap().is_some());
        assert!(s.authenticate("ci", &secrets[1].value).unwrap().is_some());
        s.set_token_status("ci", false).unwrap();
        assert!(s.authenticate("ci", &new1.value).unwrap().is_none());
        // Expired tokens are refused.
        let (_, sec) = s
            .create_token(
                "old",
                "pull",
                Some(now() - 1),
                true,
                false,
                &Default::default(),
            )
            .unwrap();
        assert!(s.authenticate("old", &sec[0].value).unwrap().is_none());
        assert!(matches!(
            s.create_token("ci", "pull", None, true, false, &Default::default()),
            Err(AuthError::Exists(_))
        ));
        assert!(matches!(
            s.create_token("x", "missing", None, true, false, &Default::default()),
            Err(AuthError::NotFound(_))
        ));
        assert!(format!("{:?}", sec[0]).contains("redacted"));
    }

    #[test]
    fn admin_is_off_until_renewed() {
        let d = tempfile::tempdir().unwrap();
        let s = AuthStore::open(d.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.location())
            .unwrap()
            .permissions()
            .mode();
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
        assert!(s
            .create_token(ADMIN_USER, "x", None, true, false, &Default::default())
            .is_err());
    }

    #[test]
    fn scope_map_update_and_delete() {
        let d = tempfile::tempdir().unwrap();
        for (_, s) in backends(d.path()) {
            scope_maps_change(&s);
        }
    }

    fn scope_maps_change(s: &AuthStore) {
        let m = s
            .create_scope_map(
                "m",
                "d",
                &[rule(
                    "a",
                    &[Permission::ContentWrite, Permission::ContentRead],
                )],
                &Default::default(),
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
            .create_scope_map(
                "bad",
                "",
                &[rule("Bad", &[Permission::ContentRead])],
                &Default::default()
            )
            .is_err());
        s.create_token("t", "m", None, true, true, &Default::default())
            .unwrap();
        assert!(s.delete_scope_map("m").is_err());
        s.delete_token("t").unwrap();
        s.delete_scope_map("m").unwrap();
        assert!(s.scope_maps().unwrap().is_empty());
    }

    #[test]
    fn unknown_names_take_as_long_as_known_ones() {
        let d = tempfile::tempdir().unwrap();
        let s = AuthStore::open(d.path()).unwrap();
        s.create_scope_map(
            "m",
            "",
            &[rule("*", &[Permission::ContentRead])],
            &Default::default(),
        )
        .unwrap();
        s.create_token("two", "m", None, true, false, &Default::default())
            .unwrap();
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
