//! Access control: identities (admin user, tokens with argon2-hashed passwords, scope
//! maps with registry and task permissions), the Docker token flow (JWTs with
//! distribution's `access` claim) and the brakes on logins (bounded hashing, lockouts).
//!
//! [`Auth`] is the reusable gate: [`http::token_router`] serves `/oauth2/token`,
//! [`Auth::authorize`] checks a request's `Authorization: Bearer` against the access it
//! needs, returning an [`http::AuthFailure`] that renders as 401 (with the challenge),
//! 403 DENIED or 429, and [`Auth::authorize_tasks`] checks a task-API request (basic or
//! bearer). The registry wires it in `registry::routes`, the task API in `server::guard`.

pub mod http;
pub mod jwt;
pub mod password;
pub mod postgres;
pub mod ratelimit;
pub mod records;
pub mod scope;
pub mod sqlite;
pub mod store;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use records::AuthRecords;
pub use scope::{Access, Grants, Permission};
pub use store::{
    AuthStore, NewSecret, ScopeMap, ScopeRule, Slot, TokenInfo, TokenStatus, ADMIN_USER,
};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Migrate(#[from] crate::store::migrate::MigrateError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The registry's tier allows no more.
    #[error(transparent)]
    Limit(#[from] crate::tier::LimitError),
}

impl AuthError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> AuthError {
        AuthError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// How the gate behaves. Identities themselves live in [`AuthStore`].
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Pulls need no credentials (pushes and deletes still do).
    pub anonymous_pull: bool,
    /// The `service` of the challenge and the `aud` of every token.
    pub service: String,
    /// Lifetime of an issued registry token.
    pub token_ttl: Duration,
    /// Failed logins allowed per (client IP, user name) within `failure_window`.
    pub max_failures: u32,
    pub failure_window: Duration,
    /// The token realm in challenges is `https://` (the listener serves TLS).
    pub tls: bool,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            anonymous_pull: false,
            service: "acr-task".into(),
            token_ttl: Duration::from_secs(300),
            max_failures: 10,
            failure_window: Duration::from_secs(60),
            tls: false,
        }
    }
}

/// The gate: store, signing key, settings and rate limiter. Share it as `Arc<Auth>`.
pub struct Auth {
    store: AuthStore,
    key: Vec<u8>,
    settings: AuthSettings,
    limiter: ratelimit::RateLimiter,
    /// Subject → (what it may do now, when that was read): a token disabled, deleted or
    /// given a narrower scope map (by another process too) limits its bearer tokens
    /// within `GRANTS_RECHECK`.
    current:
        std::sync::Mutex<std::collections::HashMap<String, (Option<Grants>, std::time::Instant)>>,
    /// Password checks (argon2) running at once, server-wide: a flood of logins costs the
    /// server at most this many cores; the rest wait their turn (FIFO) or are refused.
    hashing: tokio::sync::Semaphore,
    /// The logins of runs in progress (user name → login), in memory only: they end with
    /// the run, or with the process.
    runs: std::sync::Mutex<std::collections::HashMap<String, RunLogin>>,
    /// The registry's stored anonymous-pull setting (`registry update
    /// --anonymous-pull-enabled`), beside the server's `--anonymous-pull`.
    stored_anonymous_pull: std::sync::atomic::AtomicBool,
    /// The geo-replication group's secret: the password of [`REPLICATION_USER`],
    /// which pulls everything (the replicas' copies of each other's content).
    replication_secret: std::sync::RwLock<Option<String>>,
}

/// A run's own identity: what it may do in the registry, until when.
struct RunLogin {
    password: String,
    grants: Grants,
    expires: std::time::Instant,
}

/// The SHA-256 (hex) a run login's password is kept as: the password is random and long,
/// so a fast digest hides it as well as a slow one would.
fn secret_digest(password: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(password.as_bytes()))
}

/// A run's grants as kept: `"all"`, or its rules as `[[pattern, [action, ...]], ...]`.
fn grants_text(g: &Grants) -> String {
    match g {
        Grants::Rules(rules) => {
            let rules: Vec<(&str, Vec<&str>)> = rules
                .iter()
                .map(|(p, actions)| (p.as_str(), actions.iter().map(|a| a.as_str()).collect()))
                .collect();
            serde_json::to_string(&rules).unwrap_or_else(|_| "[]".into())
        }
        Grants::All => "all".into(),
        // A run never logs in as nobody; kept as no rules.
        Grants::Anonymous { .. } => "[]".into(),
    }
}

fn grants_from_text(text: &str) -> Option<Grants> {
    if text == "all" {
        return Some(Grants::All);
    }
    let rules: Vec<(String, Vec<String>)> = serde_json::from_str(text).ok()?;
    let rules = rules
        .into_iter()
        .map(|(p, actions)| {
            let actions = actions
                .iter()
                .map(|a| a.parse::<Permission>())
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            Some((p, actions))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Grants::Rules(rules))
}

/// User names of run logins start with this; token names cannot hold a `.`, so a token
/// never passes for a run (or the other way round).
pub const RUN_USER_PREFIX: &str = "run.";

/// The user name geo-replicas pull each other's content as (`replication`); its password
/// is their group's secret. Token names cannot hold a `.`, so no token passes for it.
pub const REPLICATION_USER: &str = "replication.peer";

/// How long an identity's current grants are trusted before the store is read again.
const GRANTS_RECHECK: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("store", &self.store.location())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Open `<dir>/auth.db` and the signing key in `dir` (creating both on first start).
    pub fn open(dir: &Path, settings: AuthSettings) -> Result<Arc<Auth>, AuthError> {
        let store = AuthStore::open(dir)?;
        let key = jwt::load_or_create_key(dir)?;
        Ok(Self::with(store, key, settings))
    }

    /// Over records several servers share (`serve --database`), the signing key kept
    /// with them: a token one server issues holds on every other.
    pub fn open_shared(
        records: Box<dyn records::AuthRecords>,
        settings: AuthSettings,
    ) -> Result<Arc<Auth>, AuthError> {
        let store = AuthStore::new(records);
        let key = store.shared_signing_key()?;
        Ok(Self::with(store, key, settings))
    }

    fn with(store: AuthStore, key: Vec<u8>, settings: AuthSettings) -> Arc<Auth> {
        let limiter = ratelimit::RateLimiter::new(settings.max_failures, settings.failure_window);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Auth {
            store,
            key,
            settings,
            limiter,
            current: Default::default(),
            hashing: tokio::sync::Semaphore::new(cores),
            runs: Default::default(),
            stored_anonymous_pull: Default::default(),
            replication_secret: Default::default(),
        })
    }

    pub fn store(&self) -> &AuthStore {
        &self.store
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// Whether pulls need no credentials: the server's flag or the registry's setting.
    pub fn anonymous_pull(&self) -> bool {
        self.settings.anonymous_pull
            || self
                .stored_anonymous_pull
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Follows the registry's stored setting (read at start and after each change).
    pub fn set_stored_anonymous_pull(&self, on: bool) {
        self.stored_anonymous_pull
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets (or, `None`, ends) the replication group's pull login.
    pub fn set_replication_secret(&self, secret: Option<String>) {
        *self
            .replication_secret
            .write()
            .unwrap_or_else(|p| p.into_inner()) = secret;
    }

    /// Whether `password` is the replication group's secret (constant time).
    pub fn is_replication_secret(&self, password: &str) -> bool {
        self.replication_grants(Some(password)).is_some()
    }

    /// What the replication login may do: pull everything, while this server is in a
    /// group; with `password`, only if it is the group's secret (constant time).
    fn replication_grants(&self, password: Option<&str>) -> Option<Grants> {
        use subtle::ConstantTimeEq;
        let secret = self
            .replication_secret
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let secret = secret.as_deref()?;
        if let Some(p) = password {
            if !bool::from(p.as_bytes().ct_eq(secret.as_bytes())) {
                return None;
            }
        }
        Some(Grants::Rules(vec![(
            "*".into(),
            vec![Permission::ContentRead, Permission::MetadataRead],
        )]))
    }

    /// Sign a token for `subject` carrying exactly `access`.
    pub fn issue(
        &self,
        subject: &str,
        access: Vec<Access>,
    ) -> Result<(String, jwt::Claims), AuthError> {
        let now = chrono::Utc::now().timestamp();
        let ttl = i64::try_from(self.settings.token_ttl.as_secs()).unwrap_or(300);
        let claims = jwt::Claims {
            iss: jwt::ISSUER.into(),
            sub: subject.into(),
            aud: self.settings.service.clone(),
            exp: now + ttl,
            nbf: now,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            access,
        };
        Ok((jwt::issue(&self.key, &claims)?, claims))
    }

    /// Checks a bearer token's signature, audience and lifetime, and narrows its access to
    /// what its subject may do now: disabling or deleting a token (or the admin user)
    /// revokes the bearer tokens already issued to it, and a narrower scope map applies
    /// to them too, not just to future logins.
    pub fn verify(&self, token: &str) -> Result<jwt::Claims, AuthError> {
        let mut claims = jwt::verify(&self.key, &self.settings.service, token)?;
        if claims.sub.is_empty() {
            return Ok(claims);
        }
        let Some(grants) = self.current_grants(&claims.sub)? else {
            return Err(AuthError::BadToken(format!(
                "{} is disabled, expired or deleted",
                claims.sub
            )));
        };
        claims.access = grants.grant(&claims.access);
        Ok(claims)
    }

    /// A login for run `run_id` that may do `grants` in this registry until the run ends
    /// ([`Auth::end_run`]) or `ttl` passes, whichever is first. Shown to nobody: the
    /// executor hands it to the engine (and `acr` steps), and masks it in logs.
    pub fn start_run(
        &self,
        run_id: &str,
        grants: Grants,
        ttl: Duration,
    ) -> crate::credentials::Credential {
        let username = format!("{RUN_USER_PREFIX}{run_id}");
        let password = password::generate();
        // Kept in the records too: a server that restarts while an agent runs the run, or
        // another replica the run's pushes reach, still knows the login.
        let now = chrono::Utc::now().timestamp();
        let kept = records::RunLoginRecord {
            user: username.clone(),
            secret_sha256: secret_digest(&password),
            grants: grants_text(&grants),
            expires: now + ttl.as_secs().min(i64::MAX as u64 / 2) as i64,
        };
        if let Err(e) = self.store.records().put_run_login(&kept, now) {
            tracing::warn!(run = run_id, error = %e, "keeping a run's login (it lasts while this server runs)");
        }
        if let Ok(mut runs) = self.runs.lock() {
            let now = std::time::Instant::now();
            runs.retain(|_, r| r.expires > now);
            runs.insert(
                username.clone(),
                RunLogin {
                    password: password.clone(),
                    grants,
                    expires: now + ttl,
                },
            );
        }
        crate::credentials::Credential { username, password }
    }

    /// Ends run `run_id`'s login: the bearer tokens issued to it stop working too.
    pub fn end_run(&self, run_id: &str) {
        let user = format!("{RUN_USER_PREFIX}{run_id}");
        if let Ok(mut runs) = self.runs.lock() {
            runs.remove(&user);
        }
        if let Err(e) = self.store.records().delete_run_login(&user) {
            tracing::warn!(run = run_id, error = %e, "forgetting a run's login");
        }
    }

    /// A run login's grants while it lasts; with `password`, only if it matches
    /// (compared in constant time).
    fn run_grants(&self, user: &str, password: Option<&str>) -> Option<Grants> {
        use subtle::ConstantTimeEq;
        {
            let runs = self.runs.lock().ok()?;
            if let Some(r) = runs.get(user) {
                if r.expires <= std::time::Instant::now() {
                    return None;
                }
                return match password {
                    Some(p) if !bool::from(p.as_bytes().ct_eq(r.password.as_bytes())) => None,
                    _ => Some(r.grants.clone()),
                };
            }
        }
        // Not made here (another replica, or before a restart): as the records keep it.
        let now = chrono::Utc::now().timestamp();
        let kept = match self.store.records().run_login(user, now) {
            Ok(k) => k?,
            Err(e) => {
                tracing::warn!(user, error = %e, "reading a run's login");
                return None;
            }
        };
        if let Some(p) = password {
            let given = secret_digest(p);
            if !bool::from(given.as_bytes().ct_eq(kept.secret_sha256.as_bytes())) {
                return None;
            }
        }
        grants_from_text(&kept.grants)
    }

    fn current_grants(&self, sub: &str) -> Result<Option<Grants>, AuthError> {
        if sub == REPLICATION_USER {
            return Ok(self.replication_grants(None));
        }
        if sub.starts_with(RUN_USER_PREFIX) {
            return Ok(self.run_grants(sub, None));
        }
        if let Ok(cache) = self.current.lock() {
            if let Some((g, at)) = cache.get(sub) {
                if at.elapsed() < GRANTS_RECHECK {
                    return Ok(g.clone());
                }
            }
        }
        let g = self.store.subject_grants(sub)?;
        if let Ok(mut cache) = self.current.lock() {
            cache.insert(sub.to_string(), (g.clone(), std::time::Instant::now()));
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two servers over the same records: SQLite (a restart) and, when
    /// `ACR_TASK_TEST_POSTGRES` names a server, PostgreSQL (two replicas).
    fn pairs(dir: &Path) -> Vec<(&'static str, Arc<Auth>, Arc<Auth>)> {
        let open = || Auth::open(dir, AuthSettings::default()).unwrap();
        let mut out = vec![("sqlite", open(), open())];
        if let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") {
            let db = crate::pg::fresh_database(&url).unwrap();
            let open = || {
                let records = Box::new(postgres::PgAuth::open(&db).unwrap());
                Auth::open_shared(records, AuthSettings::default()).unwrap()
            };
            out.push(("postgres", open(), open()));
        }
        out
    }

    #[test]
    fn a_run_login_holds_on_every_server_of_the_same_records_until_the_run_ends() {
        let d = tempfile::tempdir().unwrap();
        for (name, here, there) in pairs(d.path()) {
            let grants = Grants::Rules(vec![(
                "app/*".into(),
                vec![Permission::ContentRead, Permission::ContentWrite],
            )]);
            let login = here.start_run("r1", grants.clone(), Duration::from_secs(600));
            // The other server has no memory of it: the records tell.
            let user = login.username.as_str();
            assert_eq!(
                there.run_grants(user, Some(&login.password)),
                Some(grants.clone()),
                "{name}"
            );
            assert_eq!(there.run_grants(user, Some("not-the-password")), None);
            assert_eq!(there.run_grants(user, None), Some(grants), "{name}");
            here.end_run("r1");
            assert_eq!(there.run_grants(user, Some(&login.password)), None);
            // One that ran out is gone everywhere.
            let short = here.start_run("r2", Grants::All, Duration::from_secs(0));
            assert_eq!(
                there.run_grants(&short.username, Some(&short.password)),
                None,
                "{name}"
            );
            // Both sign alike: a token one issues, the other accepts.
            let (token, _) = here.issue("", Vec::new()).unwrap();
            assert!(there.verify(&token).is_ok(), "{name}");
        }
    }
}
