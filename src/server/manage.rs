//! The registry's management API (`/api/registry/...`): tokens, scope maps, passwords and
//! webhooks, so that `acr-task token|scope-map|credential|webhook --server URL` manage a
//! running server from anywhere. Behind the API's guard, and for the admin only (tokens
//! and scope maps grant everything else). Answers are the CLI's own JSON shapes.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::guard::Caller;
use crate::auth::{Auth, AuthError, NewSecret, ScopeRule, Slot, ADMIN_USER};
use crate::tier::{Limits, Overrides, Sku, Usage};
use crate::webhooks::{DeliveryOptions, NewWebhook, WebhookError, WebhookStore};

pub struct ManageState {
    pub auth: Arc<Auth>,
    pub store: Arc<crate::store::Store>,
    pub hooks: Arc<WebhookStore>,
    /// How pings are delivered (the server's webhook settings).
    pub delivery: Option<DeliveryOptions>,
    /// `--insecure-open-api`: no caller to check (loopback development servers only).
    pub open: bool,
    /// The run queue, for its concurrency in `registry show-usage`.
    pub queue: Option<Arc<super::queue::Queue>>,
    /// The address clients push to (`HOST:PORT`).
    pub login_server: Option<String>,
    /// The registry, for imports (they push as clients do).
    pub registry: crate::registry::Registry,
    /// Certificates trusted beside the system's roots (`serve --ca-cert`), for import
    /// sources.
    pub ca_certs: Vec<std::path::PathBuf>,
    /// Geo-replication (none for a registry its servers share).
    pub replication: Option<Arc<crate::replication::service::Replication>>,
    /// This server's URL as others reach it by default (`http://HOST:PORT`).
    pub home_url: String,
}

/// What `acr-task registry show` and `show-usage` print, on the files or from a server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryInfo {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_server: Option<String>,
    pub sku: Sku,
    /// Pulls need no credentials (the stored setting, as `az acr show` names it).
    #[serde(default)]
    pub anonymous_pull_enabled: bool,
    /// The retention policy for untagged manifests (none: never set, disabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::tier::RetentionPolicy>,
    /// Content trust and its policies (none: never set, disabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_trust: Option<crate::tier::ContentTrust>,
    pub storage_used_bytes: u64,
    /// `None`: no limit.
    pub storage_limit_bytes: Option<u64>,
    /// The tier's limits with the overrides applied.
    pub limits: Limits,
    /// What the operator set over the tier's figures.
    pub overrides: Overrides,
    /// Each limit against its use, as `az acr show-usage` lists them.
    pub usage: Vec<Usage>,
    /// The Classic storage it serves (or served), with its upgrade's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classic: Option<crate::tier::Classic>,
}

#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
}

/// The registry's tier, limits and use. `runs`: the queue's (limit, running), when a
/// task server has one. Blocking.
pub fn registry_info(
    store: &crate::store::Store,
    auth: &crate::auth::AuthStore,
    hooks: &WebhookStore,
    runs: Option<(usize, usize)>,
    login_server: Option<String>,
) -> Result<RegistryInfo, InfoError> {
    let p = store.properties()?;
    let limits = p.limits();
    let counts = crate::tier::Counts {
        storage_bytes: store.storage_used()?,
        webhooks: hooks.all()?.len() as u64,
        tokens: auth.tokens()?.len() as u64,
        scope_maps: auth.scope_maps()?.len() as u64,
        // The other members of its geo-replication group (none for a shared registry,
        // whose own directory holds no group).
        replications: crate::replication::store::ReplicationStore::members_in(store.root())
            .unwrap_or(0),
    };
    let mut usage = crate::tier::usage(&limits, &counts);
    if let Some((limit, now)) = runs {
        usage.push(Usage::new(
            "ConcurrentRuns",
            Some(limit as u64),
            now as u64,
            "Count",
        ));
    }
    let name = p
        .name
        .clone()
        .or_else(|| {
            crate::listen::hostname()
                .map(|h| {
                    h.chars()
                        .filter(char::is_ascii_alphanumeric)
                        .collect::<String>()
                        .to_ascii_lowercase()
                })
                .filter(|n| !n.is_empty())
                // Always a valid registry name (5 to 50 letters and digits), as a template needs.
                .map(|n| {
                    if n.len() < 5 {
                        format!("{n}registry")
                    } else {
                        n
                    }
                })
                .map(|n| n.chars().take(50).collect())
        })
        .unwrap_or_else(|| "acrtask".into());
    Ok(RegistryInfo {
        name,
        login_server,
        sku: p.sku,
        anonymous_pull_enabled: p.anonymous_pull,
        retention: p.retention,
        content_trust: p.content_trust,
        storage_used_bytes: counts.storage_bytes,
        storage_limit_bytes: limits.storage_bytes,
        limits,
        overrides: p.overrides,
        usage,
        classic: p.classic,
    })
}

/// What `registry encryption show` prints, on the files or from a server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionInfo {
    /// `encrypted`, `encrypting` (sealing in place), `rotating`, `unencrypted`, or
    /// `classic` (the customer's storage, not encrypted; its upgrade copies into sealed
    /// managed storage).
    pub state: String,
    pub algorithm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_source: Option<crate::tier::KeySource>,
    /// The current registry key's fingerprint (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Where the key is read from (on the server's machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotating_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::tier::Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The registry's encryption at rest as `registry encryption show` prints it. Blocking.
pub fn encryption_info(
    store: &crate::store::Store,
) -> Result<EncryptionInfo, crate::store::StoreError> {
    let p = store.properties()?;
    let location = store.key_location()?;
    let e = p.encryption;
    let state = match &e {
        // The customer's storage, as it is; its upgrade copies into sealed storage.
        _ if store.serves_classic() => "classic",
        None => "unencrypted",
        Some(e) if !e.complete => "encrypting",
        Some(e) if e.rotating_from.is_some() => "rotating",
        Some(_) => "encrypted",
    };
    Ok(EncryptionInfo {
        state: state.into(),
        algorithm: "AES-256-GCM, 64 KiB chunks, a data key per blob wrapped by the registry key"
            .into(),
        key_source: e.as_ref().map(|e| e.key_source),
        key_id: e.as_ref().map(|e| e.key_id.clone()),
        key_file: location.map(|(_, f)| f),
        rotating_from: e.as_ref().and_then(|e| e.rotating_from.clone()),
        progress: e.as_ref().and_then(|e| e.progress),
        error: e.and_then(|e| e.error),
    })
}

type St = State<Arc<ManageState>>;

struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Refusal {
        let status = match &e {
            AuthError::NotFound(_) => StatusCode::NOT_FOUND,
            AuthError::Exists(_) => StatusCode::CONFLICT,
            AuthError::Invalid(_) => StatusCode::BAD_REQUEST,
            AuthError::Limit(_) => StatusCode::FORBIDDEN,
            _ => {
                tracing::error!(error = %e, "registry management");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Refusal(status, e.to_string())
    }
}

impl From<WebhookError> for Refusal {
    fn from(e: WebhookError) -> Refusal {
        let status = match &e {
            WebhookError::NotFound(_) => StatusCode::NOT_FOUND,
            WebhookError::Exists(_) => StatusCode::CONFLICT,
            WebhookError::Invalid(_) => StatusCode::BAD_REQUEST,
            WebhookError::Limit(_) => StatusCode::FORBIDDEN,
            _ => {
                tracing::error!(error = %e, "registry management");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Refusal(status, e.to_string())
    }
}

impl From<crate::store::StoreError> for Refusal {
    fn from(e: crate::store::StoreError) -> Refusal {
        match e {
            crate::store::StoreError::Limit(l) => Refusal(StatusCode::FORBIDDEN, l.to_string()),
            crate::store::StoreError::Refused(m) => Refusal(StatusCode::CONFLICT, m),
            e => {
                tracing::error!(error = %e, "registry management");
                Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

type Answer = Result<Response, Refusal>;

/// Only the admin manages identities and webhooks.
fn admin_only(s: &ManageState, caller: &Caller) -> Result<(), Refusal> {
    if s.open || caller.0 == ADMIN_USER {
        Ok(())
    } else {
        Err(Refusal(
            StatusCode::FORBIDDEN,
            format!(
                "{} may not manage the registry's tokens, scope maps, passwords or webhooks: \
                 that needs the admin user",
                caller.0
            ),
        ))
    }
}

/// Store work (SQLite, argon2) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "registry management task");
        Refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    })?
}

/// New passwords as `az` shows them: `[{"name": "password1", "value": ...}]`.
pub fn passwords_json(secrets: &[NewSecret]) -> serde_json::Value {
    secrets
        .iter()
        .map(|s| json!({ "name": s.slot, "value": s.value }))
        .collect()
}

pub fn router(state: Arc<ManageState>) -> Router {
    Router::new()
        .route("/api/registry/tokens", get(tokens).post(create_token))
        .route(
            "/api/registry/tokens/{name}",
            get(token).patch(update_token).delete(delete_token),
        )
        .route("/api/registry/tokens/{name}/passwords", post(renew_token))
        .route(
            "/api/registry/admin",
            post(renew_admin).delete(disable_admin),
        )
        .route("/api/registry/scope-maps", get(maps).post(create_map))
        .route(
            "/api/registry/scope-maps/{name}",
            get(map).patch(update_map).delete(delete_map),
        )
        .route("/api/registry/webhooks", get(hooks).post(create_hook))
        .route(
            "/api/registry/webhooks/{name}",
            axum::routing::delete(delete_hook),
        )
        .route("/api/registry/webhooks/{name}/events", get(hook_events))
        .route("/api/registry/webhooks/{name}/ping", post(ping_hook))
        .route("/api/registry", get(show).patch(update))
        .route("/api/registry/encryption", get(encryption_show))
        .route("/api/registry/encryption/enable", post(encryption_enable))
        .route(
            "/api/registry/encryption/rotate-key",
            post(encryption_rotate),
        )
        .route("/api/registry/gc", post(gc))
        .route("/api/registry/import", post(import))
        .route("/api/registry/purge", post(purge))
        .route("/api/registry/locks", get(locks).put(set_lock))
        .route("/api/registry/resolve", post(resolve))
        .route("/api/registry/fsck", post(fsck))
        .route(
            "/api/registry/replications",
            get(replications).post(create_replication),
        )
        .route("/api/registry/replications/join", post(join_replication))
        .route(
            "/api/registry/replications/{name}",
            get(replication)
                .patch(update_replication)
                .delete(delete_replication),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            settings_touched,
        ))
        .with_state(state)
}

/// A change made here (tokens, scope maps, webhooks, the registry's settings) reaches
/// the other replicas at once rather than at the replication's next look.
async fn settings_touched(
    State(s): St,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let changes = super::guard::unsafe_method(req.method());
    let resp = next.run(req).await;
    if changes && resp.status().is_success() {
        if let Some(r) = &s.replication {
            r.settings_changed();
        }
    }
    resp
}

async fn tokens(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    let t = blocking(move || Ok(auth.store().tokens()?)).await?;
    Ok(Json(t).into_response())
}

async fn token(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    let t = blocking(move || {
        auth.store()
            .token(&name)?
            .ok_or_else(|| Refusal(StatusCode::NOT_FOUND, format!("token {name:?} not found")))
    })
    .await?;
    Ok(Json(t).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewToken {
    pub name: String,
    pub scope_map: String,
    /// Unix seconds.
    pub expiry: Option<i64>,
    pub enabled: bool,
    pub no_passwords: bool,
}

async fn create_token(
    State(s): St,
    Extension(c): Extension<Caller>,
    Json(t): Json<NewToken>,
) -> Answer {
    admin_only(&s, &c)?;
    let (auth, reg) = (s.auth.clone(), s.store.clone());
    let (info, secrets) = blocking(move || {
        let tier = reg.properties()?;
        Ok(auth.store().create_token(
            &t.name,
            &t.scope_map,
            t.expiry,
            t.enabled,
            t.no_passwords,
            &tier,
        )?)
    })
    .await?;
    let mut v = serde_json::to_value(&info).unwrap_or_default();
    v["credentials"] = json!({ "passwords": passwords_json(&secrets) });
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenChange {
    enabled: bool,
}

async fn update_token(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Json(ch): Json<TokenChange>,
) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    let t = blocking(move || {
        auth.store().set_token_status(&name, ch.enabled)?;
        auth.store()
            .token(&name)?
            .ok_or_else(|| Refusal(StatusCode::NOT_FOUND, format!("token {name:?} not found")))
    })
    .await?;
    Ok(Json(t).into_response())
}

async fn delete_token(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    blocking(move || Ok(auth.store().delete_token(&name)?)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Renew {
    /// `password1` or `password2`.
    slot: String,
}

async fn renew_token(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Json(r): Json<Renew>,
) -> Answer {
    admin_only(&s, &c)?;
    let slot = match r.slot.as_str() {
        "password1" => Slot::Password1,
        "password2" => Slot::Password2,
        other => {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                format!("slot {other:?}: password1 or password2"),
            ))
        }
    };
    let auth = s.auth.clone();
    let n = name.clone();
    let secret = blocking(move || Ok(auth.store().renew_token(&n, slot)?)).await?;
    Ok(Json(json!({ "username": name, "passwords": passwords_json(&[secret]) })).into_response())
}

async fn renew_admin(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    let secret = blocking(move || Ok(auth.store().renew_admin()?)).await?;
    Ok(
        Json(json!({ "username": ADMIN_USER, "passwords": passwords_json(&[secret]) }))
            .into_response(),
    )
}

async fn disable_admin(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    blocking(move || Ok(auth.store().disable_admin()?)).await?;
    Ok(Json(json!({ "adminEnabled": false })).into_response())
}

async fn maps(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    let m = blocking(move || Ok(auth.store().scope_maps()?)).await?;
    Ok(Json(m).into_response())
}

async fn map(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    let m = blocking(move || {
        auth.store().scope_map(&name)?.ok_or_else(|| {
            Refusal(
                StatusCode::NOT_FOUND,
                format!("scope map {name:?} not found"),
            )
        })
    })
    .await?;
    Ok(Json(m).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMap {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub rules: Vec<ScopeRule>,
}

async fn create_map(
    State(s): St,
    Extension(c): Extension<Caller>,
    Json(m): Json<NewMap>,
) -> Answer {
    admin_only(&s, &c)?;
    let (auth, reg) = (s.auth.clone(), s.store.clone());
    let made = blocking(move || {
        let tier = reg.properties()?;
        Ok(auth
            .store()
            .create_scope_map(&m.name, &m.description, &m.rules, &tier)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapChange {
    #[serde(default)]
    pub add: Vec<ScopeRule>,
    #[serde(default)]
    pub remove: Vec<ScopeRule>,
    pub description: Option<String>,
}

async fn update_map(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Json(ch): Json<MapChange>,
) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    let m = blocking(move || {
        Ok(auth
            .store()
            .update_scope_map(&name, &ch.add, &ch.remove, ch.description.as_deref())?)
    })
    .await?;
    Ok(Json(m).into_response())
}

async fn delete_map(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Answer {
    admin_only(&s, &c)?;
    let auth = s.auth.clone();
    blocking(move || Ok(auth.store().delete_scope_map(&name)?)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn hooks(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let store = s.hooks.clone();
    let all = blocking(move || Ok(store.all()?)).await?;
    let infos: Vec<_> = all.into_iter().map(|w| w.info).collect();
    Ok(Json(infos).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewHook {
    pub name: String,
    pub uri: String,
    pub actions: Vec<String>,
    pub scope: Option<String>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    pub secret: Option<String>,
    #[serde(default)]
    pub allow_private_destination: bool,
}

async fn create_hook(
    State(s): St,
    Extension(c): Extension<Caller>,
    Json(h): Json<NewHook>,
) -> Answer {
    admin_only(&s, &c)?;
    let (store, reg) = (s.hooks.clone(), s.store.clone());
    let info = blocking(move || {
        let tier = reg.properties()?;
        Ok(store.create(
            &NewWebhook {
                name: &h.name,
                uri: &h.uri,
                actions: &h.actions,
                scope: h.scope.as_deref(),
                headers: &h.headers,
                secret: h.secret.as_deref(),
                allow_private: h.allow_private_destination,
            },
            &tier,
        )?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn delete_hook(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Answer {
    admin_only(&s, &c)?;
    let store = s.hooks.clone();
    blocking(move || Ok(store.delete(&name)?)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<u32>,
}

async fn hook_events(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<Limit>,
) -> Answer {
    admin_only(&s, &c)?;
    let store = s.hooks.clone();
    let limit = q.limit.unwrap_or(50).min(1000);
    let ds = blocking(move || {
        if store.get(&name)?.is_none() {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                format!("webhook {name:?} not found"),
            ));
        }
        Ok(store.history(&name, limit)?)
    })
    .await?;
    Ok(Json(ds).into_response())
}

async fn ping_hook(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Answer {
    admin_only(&s, &c)?;
    let Some(delivery) = s.delivery.clone() else {
        return Err(Refusal(
            StatusCode::CONFLICT,
            "this server delivers no webhooks".into(),
        ));
    };
    let d = crate::webhooks::ping(&s.hooks, &name, &delivery).await?;
    Ok(Json(d).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GcAsk {
    grace: i64,
    #[serde(default)]
    dry_run: bool,
}

async fn gc(State(s): St, Extension(c): Extension<Caller>, Json(a): Json<GcAsk>) -> Answer {
    admin_only(&s, &c)?;
    let store = s.store.clone();
    let r = blocking(move || {
        crate::registry::service::gc(&store, a.grace, a.dry_run).map_err(|e| {
            tracing::error!(error = %e, "gc");
            Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        })
    })
    .await?;
    Ok(Json(r).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocksAsk {
    repository: String,
}

/// A repository's locks (`repository show`).
async fn locks(
    State(s): St,
    Extension(c): Extension<Caller>,
    axum::extract::Query(q): axum::extract::Query<LocksAsk>,
) -> Answer {
    admin_only(&s, &c)?;
    let store = s.store.clone();
    let l = blocking(move || Ok(store.locks(&q.repository)?)).await?;
    Ok(Json(l).into_response())
}

/// A lock set (`repository update --write-enabled/--delete-enabled`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LockChange {
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(flatten)]
    pub attributes: crate::store::Attributes,
}

async fn set_lock(
    State(s): St,
    Extension(c): Extension<Caller>,
    Json(a): Json<LockChange>,
) -> Answer {
    admin_only(&s, &c)?;
    let store = s.store.clone();
    let found = blocking(move || {
        Ok(crate::registry::service::set_lock(
            &store,
            &a.repository,
            a.tag.as_deref(),
            a.attributes,
        )?)
    })
    .await?;
    if !found {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            "no such repository or tag".into(),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `acr-task purge` done by this server (its deletes raise events, as any delete).
async fn purge(
    State(s): St,
    Extension(c): Extension<Caller>,
    Json(a): Json<crate::registry::purge::PurgeRequest>,
) -> Answer {
    admin_only(&s, &c)?;
    let ctx = crate::registry::RequestContext::of_tool(
        "PURGE",
        "acr-task-purge",
        c.0.clone(),
        s.login_server.clone().unwrap_or_default(),
    );
    let registry = s.registry.clone();
    let r = blocking(move || {
        let announce = |events| registry.announce(events);
        crate::registry::purge::run(registry.store(), &a, &ctx, &announce).map_err(|e| {
            use crate::registry::purge::PurgeError;
            let status = match e {
                PurgeError::Limit(_) | PurgeError::Store(crate::store::StoreError::Limit(_)) => {
                    StatusCode::FORBIDDEN
                }
                PurgeError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            Refusal(status, e.to_string())
        })
    })
    .await?;
    Ok(Json(r).into_response())
}

/// `acr-task import` done by this server: it fetches from the source itself.
async fn import(
    State(s): St,
    Extension(c): Extension<Caller>,
    Json(a): Json<crate::registry::import::ImportRequest>,
) -> Answer {
    admin_only(&s, &c)?;
    let ctx = crate::registry::import::context(
        "acr-task-import",
        c.0.clone(),
        s.login_server.clone().unwrap_or_default(),
    );
    match crate::registry::import::run(&s.registry, &s.ca_certs, &a, ctx).await {
        Ok(done) => Ok(Json(done).into_response()),
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            tracing::warn!(source = %a.source, error = %e, "import failed");
            Err(Refusal(status, e.to_string()))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveAsk {
    /// `REPO:TAG` or `REPO@DIGEST`.
    images: Vec<String>,
}

/// The digest each of many `REPO:TAG` names now (null: none), in one call (a relocation's
/// plan and check).
async fn resolve(
    State(s): St,
    Extension(c): Extension<Caller>,
    Json(a): Json<ResolveAsk>,
) -> Answer {
    admin_only(&s, &c)?;
    const MAX: usize = 100_000;
    if a.images.len() > MAX {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!("at most {MAX} images in one call"),
        ));
    }
    let store = s.store.clone();
    let out = blocking(move || {
        let mut out = serde_json::Map::new();
        for image in a.images {
            let (repo, reference) = match image.split_once('@') {
                Some((r, d)) => (r, crate::store::Reference::Digest(d.to_string())),
                None => match image.rsplit_once(':') {
                    Some((r, t)) if !t.contains('/') => {
                        (r, crate::store::Reference::Tag(t.to_string()))
                    }
                    _ => (
                        image.as_str(),
                        crate::store::Reference::Tag("latest".into()),
                    ),
                },
            };
            let digest = store.get_manifest(repo, &reference)?.map(|m| m.digest);
            out.insert(image.clone(), json!(digest));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(out).into_response())
}

fn info_refusal(e: InfoError) -> Refusal {
    match e {
        InfoError::Store(e) => e.into(),
        InfoError::Auth(e) => e.into(),
        InfoError::Webhook(e) => e.into(),
    }
}

fn info_of(s: &ManageState) -> Result<RegistryInfo, Refusal> {
    registry_info(
        &s.store,
        s.auth.store(),
        &s.hooks,
        s.queue.as_ref().map(|q| q.concurrency()),
        s.login_server.clone(),
    )
    .map_err(info_refusal)
}

async fn show(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let info = blocking(move || info_of(&s)).await?;
    Ok(Json(info).into_response())
}

async fn update(
    State(s): St,
    Extension(c): Extension<Caller>,
    Json(ch): Json<crate::tier::Change>,
) -> Answer {
    admin_only(&s, &c)?;
    let retention = ch.retention.is_some_and(|r| r.enabled());
    let registry = s.registry.clone();
    let info = blocking(move || {
        let replications = crate::replication::store::ReplicationStore::members_in(s.store.root())
            .map_err(|e| {
                tracing::error!(error = %e, "reading the registry's replications");
                Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            })?;
        let p = crate::registry::service::change_settings(&s.store, &ch, replications)?;
        s.auth.set_stored_anonymous_pull(p.anonymous_pull);
        info_of(&s)
    })
    .await?;
    if retention {
        // A new policy applies now, not at the next hourly pass.
        tokio::spawn(crate::registry::apply_retention(registry));
    }
    Ok(Json(info).into_response())
}

async fn encryption_show(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let store = s.store.clone();
    let info = blocking(move || Ok(encryption_info(&store)?)).await?;
    Ok(Json(info).into_response())
}

async fn encryption_enable(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let store = s.store.clone();
    let info = blocking(move || {
        store.enable_encryption()?;
        Ok(encryption_info(&store)?)
    })
    .await?;
    Ok(Json(info).into_response())
}

async fn encryption_rotate(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let store = s.store.clone();
    let info = blocking(move || {
        store.rotate_key()?;
        Ok(encryption_info(&store)?)
    })
    .await?;
    Ok(Json(info).into_response())
}

async fn fsck(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    let store = s.store.clone();
    let r = blocking(move || {
        store.fsck().map_err(|e| {
            tracing::error!(error = %e, "fsck");
            Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        })
    })
    .await?;
    Ok(Json(r).into_response())
}

impl From<crate::replication::ReplicationError> for Refusal {
    fn from(e: crate::replication::ReplicationError) -> Refusal {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "replication");
        }
        Refusal(status, e.to_string())
    }
}

fn replicas(s: &ManageState) -> Result<&Arc<crate::replication::service::Replication>, Refusal> {
    s.replication.as_ref().ok_or_else(|| {
        Refusal(
            StatusCode::CONFLICT,
            "this registry's servers share PostgreSQL and S3: geo-replication between such \
             registries is not supported yet"
                .into(),
        )
    })
}

async fn replications(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    admin_only(&s, &c)?;
    Ok(Json(replicas(&s)?.list().await?).into_response())
}

async fn replication(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Answer {
    admin_only(&s, &c)?;
    Ok(Json(replicas(&s)?.show(&name).await?).into_response())
}

async fn create_replication(
    State(s): St,
    Extension(c): Extension<Caller>,
    Json(req): Json<crate::replication::NewReplication>,
) -> Answer {
    admin_only(&s, &c)?;
    let made = replicas(&s)?.create(req, s.home_url.clone()).await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

async fn join_replication(
    State(s): St,
    Extension(c): Extension<Caller>,
    body: axum::body::Body,
) -> Answer {
    // The invitation carries every registry-wide setting (up to the peer routes' limit):
    // only the admin's is read at all.
    admin_only(&s, &c)?;
    let bytes = axum::body::to_bytes(body, crate::replication::service::MAX_PEER_BODY)
        .await
        .map_err(|e| {
            Refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the invitation could not be read: {e}"),
            )
        })?;
    let j: crate::replication::Join = serde_json::from_slice(&bytes).map_err(|e| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!("not an invitation from a replica of this version: {e}"),
        )
    })?;
    replicas(&s)?.join(j).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReplicationChange {
    region_endpoint_enabled: bool,
}

async fn update_replication(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Json(ch): Json<ReplicationChange>,
) -> Answer {
    admin_only(&s, &c)?;
    let r = replicas(&s)?;
    Ok(Json(r.update(&name, ch.region_endpoint_enabled).await?).into_response())
}

async fn delete_replication(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Answer {
    admin_only(&s, &c)?;
    replicas(&s)?.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
