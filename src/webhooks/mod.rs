//! Outgoing webhooks: on every registry push/delete, a JSON event (ACR/distribution shape)
//! is POSTed to each matching webhook, signed with HMAC-SHA256 when it has a secret.
//!
//! Events are written to a delivery queue in `webhooks.db` first and delivered by a
//! background worker with exponential backoff, so a slow or dead receiver never slows a
//! push, and undelivered events survive a restart. [`Dispatcher::start`] runs it next to
//! a [`Registry`].

pub mod client;
pub mod postgres;
pub mod records;
pub mod sqlite;
pub mod store;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::registry::{EventAction, Registry, RegistryEvent, StoredEvent};
pub use records::WebhookRecords;
pub use store::{Delivery, NewWebhook, Webhook, WebhookInfo, WebhookStore};

/// Header carrying `sha256=<hex HMAC of the body>` when the webhook has a secret.
pub const SIGNATURE_HEADER: &str = "X-Acr-Task-Signature";
pub const DELIVERY_HEADER: &str = "X-Acr-Task-Delivery";
pub const EVENT_HEADER: &str = "X-Acr-Task-Event";

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Migrate(#[from] crate::store::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    #[error("webhook {0:?} already exists")]
    Exists(String),
    #[error("webhook {0:?} not found")]
    NotFound(String),
    #[error("webhook worker failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("reading registry events: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    /// The registry's tier allows no more.
    #[error(transparent)]
    Limit(#[from] crate::tier::LimitError),
}

/// `sha256=<hex>` of HMAC-SHA256(secret, body).
pub fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Receiver side: does `header` carry the right signature? (constant-time)
pub fn verify_signature(secret: &str, body: &[u8], header: &str) -> bool {
    let want = sign(secret, body);
    !want.is_empty() && want.as_bytes().ct_eq(header.as_bytes()).into()
}

/// `REPO[:TAG]` with `*` wildcards, as a matcher over (repository, tag).
pub fn scope_matcher(
    scope: &str,
) -> Result<(globset::GlobMatcher, globset::GlobMatcher), WebhookError> {
    let (repo, tag) = scope.split_once(':').unwrap_or((scope, "*"));
    let glob = |p: &str| {
        globset::GlobBuilder::new(p)
            .literal_separator(false)
            .build()
            .map(|g| g.compile_matcher())
            .map_err(|e| WebhookError::Invalid(format!("invalid scope {scope:?}: {e}")))
    };
    if repo.is_empty() || tag.is_empty() {
        return Err(WebhookError::Invalid(format!(
            "invalid scope {scope:?} (REPO or REPO:TAG, '*' allowed)"
        )));
    }
    Ok((glob(repo)?, glob(tag)?))
}

fn action_name(a: EventAction) -> &'static str {
    match a {
        EventAction::Push => "push",
        EventAction::Delete => "delete",
    }
}

/// Does `hook` want `ev`? A scope with a tag pattern other than `*` skips untagged events.
pub fn wants(hook: &WebhookInfo, ev: &RegistryEvent) -> bool {
    if !hook.actions.iter().any(|a| a == action_name(ev.action)) {
        return false;
    }
    let Some(scope) = &hook.scope else {
        return true;
    };
    let Ok((repo, tag)) = scope_matcher(scope) else {
        return false;
    };
    repo.is_match(&ev.repository)
        && match &ev.tag {
            Some(t) => tag.is_match(t),
            None => tag.glob().glob() == "*",
        }
}

/// Where the intake starts: its saved cursor, or (first start) the outbox's end.
async fn intake_start(store: &Arc<WebhookStore>, registry: &Registry) -> Result<i64, WebhookError> {
    let s = store.clone();
    if let Some(c) = tokio::task::spawn_blocking(move || s.cursor()).await?? {
        return Ok(c);
    }
    let last = registry.last_event_seq().await?;
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.intake(&[], last)).await??;
    Ok(last)
}

/// Reads up to 256 outbox events after `cursor`, queues the deliveries they call for and
/// saves the new cursor; returns it with the number of deliveries queued.
async fn intake_batch(
    store: &Arc<WebhookStore>,
    registry: &Registry,
    cursor: i64,
) -> Result<(i64, usize), WebhookError> {
    let events = registry.events_after(cursor, 256).await?;
    let Some(next) = events.last().map(|(seq, _)| *seq) else {
        return Ok((cursor, 0));
    };
    let s = store.clone();
    let queued = tokio::task::spawn_blocking(move || -> Result<usize, WebhookError> {
        let hooks = s.all()?;
        let mut items = Vec::new();
        // A change another replica accepted is delivered by that replica's webhooks.
        for (_, e) in events.iter().filter(|(_, e)| e.replicated_from.is_none()) {
            for h in hooks.iter().filter(|h| wants(&h.info, &e.event)) {
                items.push(store::IntakeItem {
                    webhook: h.info.name.clone(),
                    event_id: e.id.clone(),
                    action: action_name(e.event.action).to_string(),
                    payload: payload(e).to_string(),
                });
            }
        }
        s.intake(&items, next)
    })
    .await??;
    Ok((next, queued))
}

/// The event body (ACR's webhook payload, distribution's event envelope fields).
pub fn payload(e: &StoredEvent) -> serde_json::Value {
    let (ev, ctx) = (&e.event, &e.context);
    let mut target = serde_json::json!({
        "mediaType": ev.media_type,
        "size": ev.size,
        "length": ev.size,
        "digest": ev.digest,
        "repository": ev.repository,
    });
    if let Some(t) = &ev.tag {
        target["tag"] = serde_json::json!(t);
    }
    serde_json::json!({
        "id": e.id,
        "timestamp": e.timestamp,
        "action": action_name(ev.action),
        "target": target,
        "request": {
            "id": ctx.id,
            "host": ctx.host,
            "method": ctx.method,
            "useragent": ctx.useragent,
        },
        "actor": { "name": ctx.actor },
    })
}

#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// First retry delay; doubles per failed attempt up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts before a delivery is marked failed.
    pub max_attempts: u32,
    /// Per-attempt timeout (connect + send + status line).
    pub timeout: Duration,
    /// The HTTP client for public destinations (the roots HTTPS receivers are checked
    /// against; private addresses never connected to; no redirects).
    pub http: reqwest::Client,
    /// The same for webhooks created with `--allow-private-destination`.
    pub http_private: reqwest::Client,
    /// Told of every attempt's outcome (the server's metrics).
    pub observer: Option<Observer>,
}

/// A callback told whether each delivery attempt succeeded.
#[derive(Clone)]
pub struct Observer(pub Arc<dyn Fn(bool) + Send + Sync>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl DeliveryOptions {
    /// Defaults with the delivery clients trusting the system's roots plus `ca_certs`.
    pub fn with_roots(ca_certs: &[std::path::PathBuf]) -> Result<DeliveryOptions, WebhookError> {
        let builder = || {
            crate::registry::client::client_builder(ca_certs)
                .map_err(|e| WebhookError::Invalid(e.to_string()))
        };
        let (http, http_private) = client::delivery_clients(builder()?, builder()?)?;
        Ok(DeliveryOptions {
            http,
            http_private,
            ..DeliveryOptions::default()
        })
    }
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        // The system's roots only; the same rules (no redirects, private destinations only
        // with the opt-in).
        let (http, http_private) =
            client::delivery_clients(reqwest::Client::builder(), reqwest::Client::builder())
                .unwrap_or_default();
        DeliveryOptions {
            backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(600),
            max_attempts: 10,
            timeout: Duration::from_secs(10),
            http,
            http_private,
            observer: None,
        }
    }
}

/// One attempt at one delivery; records the outcome (and the next retry) in the store.
async fn attempt(
    store: &Arc<WebhookStore>,
    d: &Delivery,
    opts: &DeliveryOptions,
    retry: bool,
) -> Result<Delivery, WebhookError> {
    let hook = {
        let s = store.clone();
        let name = d.webhook.clone();
        tokio::task::spawn_blocking(move || s.get(&name)).await??
    };
    let (status, error) = match hook {
        None => (None, Some("webhook deleted".to_string())),
        Some(h) => {
            let mut headers = vec![
                ("Content-Type".to_string(), "application/json".to_string()),
                (DELIVERY_HEADER.to_string(), d.id.clone()),
                (EVENT_HEADER.to_string(), d.action.clone()),
            ];
            if let Some(sec) = &h.secret {
                headers.push((
                    SIGNATURE_HEADER.to_string(),
                    sign(sec, d.payload.as_bytes()),
                ));
            }
            headers.extend(h.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
            let body = d.payload.as_bytes();
            let http = if h.info.allow_private {
                &opts.http_private
            } else {
                &opts.http
            };
            match client::destination_allowed(&h.info.uri, h.info.allow_private) {
                Err(e) => (None, Some(e)),
                Ok(()) => match client::post(http, &h.info.uri, &headers, body, opts.timeout).await
                {
                    Ok(s) if (200..300).contains(&s) => (Some(s), None),
                    // A redirect is not followed: the receiver must answer where it is.
                    Ok(s) if (300..400).contains(&s) => (
                        Some(s),
                        Some(format!("HTTP {s}: redirects are not followed")),
                    ),
                    Ok(s) => (Some(s), Some(format!("HTTP {s}"))),
                    Err(e) => (None, Some(e)),
                },
            }
        }
    };
    let ok = error.is_none();
    if let Some(o) = &opts.observer {
        (o.0)(ok);
    }
    let attempts = d.attempts + 1;
    let retry_at = (!ok && retry && attempts < opts.max_attempts).then(|| {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(20));
        let delay = opts.backoff.saturating_mul(factor).min(opts.max_backoff);
        store::now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2)
    });
    if ok {
        tracing::debug!(webhook = %d.webhook, delivery = %d.id, "webhook delivered");
    } else {
        tracing::warn!(webhook = %d.webhook, delivery = %d.id, attempts, error = ?error, retry = retry_at.is_some(), "webhook delivery failed");
    }
    let s = store.clone();
    let id = d.id.clone();
    let err = error.clone();
    tokio::task::spawn_blocking(move || s.record(&id, ok, status, err.as_deref(), retry_at))
        .await??;
    let mut out = d.clone();
    out.attempts = attempts;
    out.last_status = status;
    out.last_error = error;
    out.state = if ok {
        "delivered"
    } else if retry_at.is_some() {
        "pending"
    } else {
        "failed"
    }
    .into();
    Ok(out)
}

/// `webhook ping`: queue a ping event and try it once, now (no retries).
pub async fn ping(
    store: &Arc<WebhookStore>,
    name: &str,
    opts: &DeliveryOptions,
) -> Result<Delivery, WebhookError> {
    let s = store.clone();
    let n = name.to_string();
    let d = tokio::task::spawn_blocking(move || -> Result<Delivery, WebhookError> {
        if s.get(&n)?.is_none() {
            return Err(WebhookError::NotFound(n));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::json!({
            "id": id,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "action": "ping",
        })
        .to_string();
        // Held (not due): delivered right here, not by a server's worker.
        s.enqueue(&n, &id, "ping", &body, false)
    })
    .await??;
    attempt(store, &d, opts, false).await
}

/// Waits until this server leads (at once when leadership does not apply); forever when
/// the leadership loop has ended (the server is stopping).
async fn lead(leading: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(rx) = leading {
        if rx.wait_for(|l| *l).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn leads(leading: &Option<tokio::sync::watch::Receiver<bool>>) -> bool {
    leading.as_ref().is_none_or(|rx| *rx.borrow())
}

/// How long a stop waits for the loops to end.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The background worker pair: intake (registry events → queue) and delivery. Dropped,
/// both stop (a delivery cut short is retried from the queue after a restart).
pub struct Dispatcher {
    store: Arc<WebhookStore>,
    background: crate::background::Background,
}

impl Dispatcher {
    /// Open `<dir>/webhooks.db` and start delivering `registry`'s events, plus anything
    /// left pending by a previous run. Must be called inside a tokio runtime.
    pub fn start(
        registry: &Registry,
        dir: &Path,
        opts: DeliveryOptions,
    ) -> Result<Dispatcher, WebhookError> {
        Ok(Self::start_with(
            Arc::new(WebhookStore::open(dir)?),
            registry,
            opts,
            None,
        ))
    }

    /// [`Dispatcher::start`] over `store`; with `leading`, the loops run only while it
    /// says this server leads (servers sharing a registry deliver each event once).
    pub fn start_with(
        store: Arc<WebhookStore>,
        registry: &Registry,
        opts: DeliveryOptions,
        leading: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Dispatcher {
        let notify = Arc::new(Notify::new());
        // Live events only wake the intake; it reads the registry's outbox from its own
        // cursor, so nothing committed is lost to a crash, a restart or a slow receiver.
        let mut rx = registry.subscribe();
        let background = crate::background::Background::new();
        {
            let store = store.clone();
            let notify = notify.clone();
            let registry = registry.clone();
            let mut leading = leading.clone();
            background.spawn("webhook intake", async move {
                loop {
                    lead(&mut leading).await;
                    // From the saved cursor, which another leader may have moved.
                    let mut cursor = match intake_start(&store, &registry).await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::error!(error = %e, "webhook intake cannot start");
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            continue;
                        }
                    };
                    while leads(&leading) {
                        match intake_batch(&store, &registry, cursor).await {
                            Ok((next, queued)) => {
                                if queued > 0 {
                                    notify.notify_one();
                                }
                                if next != cursor {
                                    cursor = next;
                                    continue;
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "queueing webhook deliveries"),
                        }
                        tokio::select! {
                            r = rx.recv() => {
                                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r {
                                    return;
                                }
                            }
                            // A safety net: the outbox is the truth, wake-ups are hints.
                            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                        }
                    }
                }
            });
        }
        {
            let store = store.clone();
            let mut leading = leading;
            background.spawn("webhook delivery", async move {
                loop {
                    lead(&mut leading).await;
                    let s = store.clone();
                    let due = tokio::task::spawn_blocking(move || s.due(store::now_ms(), 32)).await;
                    let due = match due {
                        Ok(Ok(d)) => d,
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "reading the webhook queue");
                            Vec::new()
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "webhook worker");
                            Vec::new()
                        }
                    };
                    if !due.is_empty() {
                        let runs = due.iter().map(|d| attempt(&store, d, &opts, true));
                        for r in futures_util::future::join_all(runs).await {
                            if let Err(e) = r {
                                tracing::error!(error = %e, "recording a webhook delivery");
                            }
                        }
                        continue;
                    }
                    let s = store.clone();
                    let next = tokio::task::spawn_blocking(move || s.next_due())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .flatten();
                    let wait = next
                        .map(|t| {
                            Duration::from_millis(u64::try_from(t - store::now_ms()).unwrap_or(0))
                        })
                        .unwrap_or(Duration::from_secs(60))
                        .min(Duration::from_secs(60));
                    tokio::select! {
                        _ = notify.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            });
        }
        Dispatcher { store, background }
    }

    /// Stops intake and delivery, waiting briefly for them to end.
    pub async fn shutdown(self) {
        self.background.shutdown(STOP_GRACE).await;
    }

    pub fn store(&self) -> &Arc<WebhookStore> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(actions: &[&str], scope: Option<&str>) -> WebhookInfo {
        WebhookInfo {
            name: "h".into(),
            uri: "http://x/".into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
            scope: scope.map(str::to_string),
            header_names: vec![],
            signed: false,
            allow_private: false,
            created: 0,
        }
    }

    fn ev(action: EventAction, repo: &str, tag: Option<&str>) -> RegistryEvent {
        RegistryEvent {
            action,
            repository: repo.into(),
            tag: tag.map(str::to_string),
            digest: "sha256:00".into(),
            media_type: "m".into(),
            size: 1,
        }
    }

    #[test]
    fn scope_and_action_filtering() {
        let push = ev(EventAction::Push, "samples/a", Some("v1"));
        assert!(wants(&hook(&["push"], None), &push));
        assert!(!wants(&hook(&["delete"], None), &push));
        assert!(wants(&hook(&["push"], Some("samples/*")), &push));
        assert!(wants(&hook(&["push"], Some("samples/*:v*")), &push));
        assert!(!wants(&hook(&["push"], Some("samples/*:prod")), &push));
        assert!(!wants(&hook(&["push"], Some("other")), &push));
        // Untagged events match only when the tag pattern is `*`.
        let untagged = ev(EventAction::Delete, "samples/a", None);
        assert!(wants(&hook(&["delete"], Some("samples/a")), &untagged));
        assert!(!wants(&hook(&["delete"], Some("samples/a:v1")), &untagged));
        assert!(scope_matcher(":x").is_err());
    }

    #[test]
    fn signatures() {
        let s = sign("k", b"body");
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64);
        assert!(verify_signature("k", b"body", &s));
        assert!(!verify_signature("k", b"body2", &s));
        assert!(!verify_signature("k2", b"body", &s));
        assert!(!verify_signature("k", b"body", "sha256=00"));
    }

    /// Every records backend, fresh in `dir`: the bodies below run against each
    /// (PostgreSQL joins this list).
    fn backends(dir: &std::path::Path) -> Vec<(&'static str, WebhookStore)> {
        let mut out = vec![("sqlite", WebhookStore::open(dir).unwrap())];
        if let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") {
            let db = crate::pg::fresh_database(&url).unwrap();
            let records = super::postgres::PgWebhooks::open(&db).unwrap();
            out.push(("postgres", WebhookStore::new(Box::new(records))));
        }
        out
    }

    #[test]
    fn the_sqlite_records_are_for_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = WebhookStore::open(d.path()).unwrap();
        let mode = std::fs::metadata(s.location())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn intake_queues_each_event_once_and_moves_the_cursor() {
        let d = tempfile::tempdir().unwrap();
        for (name, s) in backends(d.path()) {
            s.create(
                &NewWebhook {
                    allow_private: true,
                    ..NewWebhook::new("h", "http://127.0.0.1:9/", &["push".into()])
                },
                &Default::default(),
            )
            .unwrap();
            assert_eq!(s.cursor().unwrap(), None, "{name}");
            let item = |e: &str| store::IntakeItem {
                webhook: "h".into(),
                event_id: e.into(),
                action: "push".into(),
                payload: format!("{{\"id\":\"{e}\"}}"),
            };
            assert_eq!(s.intake(&[item("e1"), item("e2")], 7).unwrap(), 2, "{name}");
            // Read again after a crash: nothing is queued twice, the cursor still moves.
            assert_eq!(s.intake(&[item("e2"), item("e3")], 9).unwrap(), 1, "{name}");
            assert_eq!(s.cursor().unwrap(), Some(9), "{name}");
            let mut events: Vec<String> = s
                .due(store::now_ms() + 1, 10)
                .unwrap()
                .into_iter()
                .map(|d| d.event_id)
                .collect();
            events.sort();
            assert_eq!(events, ["e1", "e2", "e3"], "{name}");
        }
    }

    #[test]
    fn queue_state_machine() {
        let d = tempfile::tempdir().unwrap();
        for (_, s) in backends(d.path()) {
            queue_states(&s);
        }
    }

    fn queue_states(s: &WebhookStore) {
        s.create(
            &NewWebhook {
                allow_private: true,
                ..NewWebhook::new("h", "http://127.0.0.1:9/", &["push".into()])
            },
            &Default::default(),
        )
        .unwrap();
        assert!(matches!(
            s.create(
                &NewWebhook {
                    allow_private: true,
                    ..NewWebhook::new("h", "http://127.0.0.1:9/", &["push".into()])
                },
                &Default::default()
            ),
            Err(WebhookError::Exists(_))
        ));
        assert!(s
            .create(
                &NewWebhook {
                    allow_private: true,
                    ..NewWebhook::new("bad", "ftp://x/", &["push".into()])
                },
                &Default::default()
            )
            .is_err());
        assert!(s
            .create(
                &NewWebhook {
                    allow_private: true,
                    ..NewWebhook::new("bad", "http://x/", &["pull".into()])
                },
                &Default::default()
            )
            .is_err());
        let a = s.enqueue("h", "e1", "push", "{}", true).unwrap();
        let held = s.enqueue("h", "e2", "ping", "{}", false).unwrap();
        let now = store::now_ms();
        let due = s.due(now, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].id, a.id);
        s.record(
            &a.id,
            false,
            Some(500),
            Some("HTTP 500"),
            Some(now + 60_000),
        )
        .unwrap();
        assert!(s.due(now, 10).unwrap().is_empty());
        assert_eq!(
            s.next_due().unwrap(),
            Some(now + 60_000).min(Some(held.next_attempt))
        );
        s.record(&a.id, true, Some(200), None, None).unwrap();
        let h = s.history("h", 10).unwrap();
        let a2 = h.iter().find(|d| d.id == a.id).unwrap();
        assert_eq!((a2.state.as_str(), a2.attempts), ("delivered", 2));
        s.delete("h").unwrap();
        assert!(s.history("h", 10).unwrap().is_empty());
    }
}
