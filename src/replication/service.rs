//! Replication's work on a running server: the group's management (create a replica by
//! joining it, change, delete), a sender per other member that reads this server's outbox
//! from that member's cursor (after a backfill of everything held when it joined), and
//! the peer routes that apply what the others send, by the last-writer rule on tags.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::task::AbortOnDropHandle;

use super::store::{Group, MemberState, ReplicationStore};
use super::{Member, NewReplication, ReplicationError, ReplicationInfo, Stamp, REPLICATION_USER};
use crate::hlc::{Hlc, CLOCK};
use crate::registry::{EventAction, Registry, RegistryEvent, RequestContext, StoredEvent};
use crate::store::Reference;

/// Events sent in one request.
const BATCH: usize = 32;
/// Manifests of one batch pulled at once.
const PULLS_AT_ONCE: usize = 4;
/// The longest wait between tries to reach a member that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A batch may carry big layers to pull: the whole exchange gets this long.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3600);
/// A peer request's body: events are small (a manifest is pulled, not sent); the
/// settings (tokens with their hashes) can be many.
const MAX_PEER_BODY: usize = 64 << 20;
/// Tombstones outlive the outbox's week by this much, for a replica that was away.
const TOMBSTONE_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// The batch a member sends another (`POST /acr-task/replication/v1/events`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    /// The sending region.
    from: String,
    events: Vec<StoredEvent>,
}

/// The registry-wide settings as one member holds them (`POST .../v1/config`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBatch {
    from: String,
    items: Vec<super::config::Item>,
}

/// The group's members as one of them now knows it (`POST .../v1/members`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Members {
    from: String,
    /// Everyone, the receiver included (a receiver not in it was removed).
    members: Vec<Member>,
}

pub struct Replication {
    store: Arc<ReplicationStore>,
    registry: Registry,
    auth: Arc<crate::auth::Auth>,
    /// The registry's webhooks (registry-wide settings, kept alike on every replica).
    hooks: Arc<crate::webhooks::WebhookStore>,
    http: reqwest::Client,
    ca_certs: Vec<std::path::PathBuf>,
    /// Applying and indexing one at a time: a tag's check and change are not interleaved.
    apply: tokio::sync::Mutex<()>,
    /// A sender per member, stopped when dropped.
    senders: Mutex<HashMap<String, AbortOnDropHandle<()>>>,
    halt: tokio_util::sync::CancellationToken,
    /// This server's region endpoint is disabled: it serves only the other replicas.
    endpoint_off: std::sync::atomic::AtomicBool,
    /// This server's region name while it is in a group.
    region: Mutex<Option<String>>,
    /// The settings' state last sent to each member (see [`super::config::state_digest`]).
    config_sent: Mutex<HashMap<String, String>>,
    /// A registry client per member (URL and secret), for pulls.
    clients: Mutex<HashMap<String, Arc<crate::registry::client::RegistryClient>>>,
}

impl Replication {
    /// Opens the registry's group (`replication.db` beside it) and starts a sender per
    /// member and the indexer. `auth` learns the group's pull login.
    pub async fn start(
        registry: Registry,
        auth: Arc<crate::auth::Auth>,
        hooks: Arc<crate::webhooks::WebhookStore>,
        ca_certs: Vec<std::path::PathBuf>,
        halt: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<Replication>, ReplicationError> {
        let dir = registry.store().root().to_path_buf();
        let store = tokio::task::spawn_blocking(move || ReplicationStore::open(&dir))
            .await
            .map_err(|e| ReplicationError::Refused(e.to_string()))??;
        let http = crate::registry::client::http_client(&ca_certs)
            .map_err(|e| ReplicationError::Refused(e.to_string()))?;
        let me = Arc::new(Replication {
            store: Arc::new(store),
            registry,
            auth,
            hooks,
            http,
            ca_certs,
            apply: tokio::sync::Mutex::new(()),
            senders: Mutex::new(HashMap::new()),
            halt,
            endpoint_off: Default::default(),
            region: Mutex::new(None),
            config_sent: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
        });
        let g = me.db(|s| s.group()).await?;
        me.follow(g.as_ref());
        me.clone().spawn_senders().await?;
        tokio::spawn(me.clone().index_loop());
        Ok(me)
    }

    /// Takes in this server's place in the group (none: in no group): the pull login,
    /// whether it serves clients.
    fn follow(&self, g: Option<&Group>) {
        self.auth
            .set_replication_secret(g.map(|g| g.secret.clone()));
        self.endpoint_off.store(
            g.is_some_and(|g| !g.me.region_endpoint_enabled),
            std::sync::atomic::Ordering::Relaxed,
        );
        *self.region.lock().unwrap_or_else(|p| p.into_inner()) = g.map(|g| g.me.name.clone());
    }

    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReplicationStore) -> Result<T, ReplicationError> + Send + 'static,
    ) -> Result<T, ReplicationError> {
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| ReplicationError::Refused(format!("internal error: {e}")))?
    }

    /// Starts a sender for each member without one; stops those of members gone.
    async fn spawn_senders(self: Arc<Self>) -> Result<(), ReplicationError> {
        let members = self.db(|s| s.members()).await?;
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.retain(|name, _| members.iter().any(|m| m.member.name == *name));
        for m in members {
            if !senders.contains_key(&m.member.name) {
                let name = m.member.name.clone();
                let task = tokio::spawn(self.clone().send_loop(name.clone()));
                senders.insert(name, AbortOnDropHandle::new(task));
            }
        }
        Ok(())
    }

    // ---- management (the API's) ----

    /// Every replica, this server first.
    pub async fn list(&self) -> Result<Vec<ReplicationInfo>, ReplicationError> {
        let (g, members) = self.db(|s| Ok((s.group()?, s.members()?))).await?;
        let Some(g) = g else {
            return Ok(Vec::new());
        };
        let last = self.registry.last_event_seq().await.unwrap_or(0);
        let mut out = vec![ReplicationInfo {
            name: g.me.name.clone(),
            url: g.me.url.clone(),
            this_server: true,
            region_endpoint_enabled: g.me.region_endpoint_enabled,
            status: "Ready".into(),
            backfill: None,
            lag_events: 0,
            lag_seconds: 0,
            last_error: None,
            last_sync: None,
            created: g.created,
        }];
        for m in members {
            out.push(self.info(m, last).await);
        }
        Ok(out)
    }

    async fn info(&self, m: MemberState, last: i64) -> ReplicationInfo {
        // Lag: this server's own events after the member's cursor, and the oldest's age.
        let (mut events, mut oldest) = (0u64, None);
        if m.backfilled && m.cursor < last {
            if let Ok(pending) = self.registry.events_after(m.cursor, 10_000).await {
                for (_, e) in pending.iter().filter(|(_, e)| e.replicated_from.is_none()) {
                    events += 1;
                    oldest = oldest.or_else(|| {
                        chrono::DateTime::parse_from_rfc3339(&e.timestamp)
                            .ok()
                            .map(|t| t.timestamp())
                    });
                }
            }
        }
        let lag_seconds = oldest
            .map(|t| (chrono::Utc::now().timestamp() - t).max(0) as u64)
            .unwrap_or(0);
        ReplicationInfo {
            name: m.member.name,
            url: m.member.url,
            this_server: false,
            region_endpoint_enabled: m.member.region_endpoint_enabled,
            status: if m.backfilled { "Ready" } else { "Backfilling" }.into(),
            backfill: (!m.backfilled).then_some((m.backfill_done, m.backfill_total.unwrap_or(0))),
            lag_events: events,
            lag_seconds,
            last_error: m.last_error,
            last_sync: m.last_ok.and_then(|t| {
                chrono::DateTime::from_timestamp(t, 0)
                    .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            }),
            created: m.created,
        }
    }

    pub async fn show(&self, name: &str) -> Result<ReplicationInfo, ReplicationError> {
        self.list()
            .await?
            .into_iter()
            .find(|r| r.name == name)
            .ok_or_else(|| ReplicationError::NotFound(format!("no replication named {name:?}")))
    }

    /// Adds a replica: checks the tier, joins the new server to the group (with its admin
    /// login, once), tells the other members, and starts backfilling it.
    pub async fn create(
        self: &Arc<Self>,
        req: NewReplication,
        home_url: String,
    ) -> Result<ReplicationInfo, ReplicationError> {
        let props = self.registry.store().properties()?;
        if !props.limits().geo_replication {
            return Err(ReplicationError::Refused(format!(
                "geo-replication needs the Premium tier; this registry is {:?}: \
                 `acr-task registry update --sku Premium` first",
                props.sku
            )));
        }
        if self
            .registry
            .store()
            .root()
            .join(crate::store::SHARED_MARKER)
            .exists()
        {
            return Err(ReplicationError::Refused(
                "this registry's servers share PostgreSQL and S3: geo-replication between \
                 such registries is not supported yet; replicate registries of one server's \
                 own (a data directory each)"
                    .into(),
            ));
        }
        let url = req.url.trim_end_matches('/').to_string();
        check_name_and_url(&req.name, &url)?;
        let group = match self.db(|s| s.group()).await? {
            Some(g) => g,
            None => {
                let name = req.home_name.clone().unwrap_or_else(|| "home".into());
                let url = req
                    .home_url
                    .clone()
                    .unwrap_or(home_url)
                    .trim_end_matches('/')
                    .to_string();
                check_name_and_url(&name, &url)?;
                Group {
                    me: Member {
                        name,
                        url,
                        region_endpoint_enabled: true,
                    },
                    secret: crate::auth::password::generate(),
                    created: 0,
                }
            }
        };
        let members = self.db(|s| s.members()).await?;
        if req.name == group.me.name || members.iter().any(|m| m.member.name == req.name) {
            return Err(ReplicationError::Refused(format!(
                "a replication named {:?} exists already",
                req.name
            )));
        }
        let new = Member {
            name: req.name.clone(),
            url: url.clone(),
            region_endpoint_enabled: true,
        };
        let mut others: Vec<Member> = members.iter().map(|m| m.member.clone()).collect();
        others.push(group.me.clone());
        let join = super::Join {
            secret: group.secret.clone(),
            me: new.clone(),
            members: others,
        };
        let r = self
            .http
            .post(format!("{url}/api/registry/replications/join"))
            .basic_auth(&req.username, Some(&req.password))
            .json(&join)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| {
                ReplicationError::Peer(format!(
                    "{url} could not be reached: {}",
                    crate::registry::client::error_chain(&e)
                ))
            })?;
        if !r.status().is_success() {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            return Err(ReplicationError::Peer(format!(
                "{url} refused to join (HTTP {status}): {}",
                error_text(&body)
            )));
        }
        let last = self.registry.last_event_seq().await.unwrap_or(0);
        let (g, n) = (group.clone(), new.clone());
        self.db(move |s| {
            if s.group()?.is_none() {
                s.set_group(&g, last)?;
            }
            s.add_member(&n, last)
        })
        .await?;
        self.follow(Some(&group));
        self.clone().spawn_senders().await?;
        self.tell_members().await;
        self.show(&req.name).await
    }

    /// Joins the group a member invites this server to (`replication create` there).
    pub async fn join(self: &Arc<Self>, j: super::Join) -> Result<(), ReplicationError> {
        let props = self.registry.store().properties()?;
        if !props.limits().geo_replication {
            return Err(ReplicationError::Refused(format!(
                "geo-replication needs the Premium tier; the registry of {} is {:?}: \
                 `acr-task registry update --sku Premium` on it first",
                j.me.url, props.sku
            )));
        }
        if let Some(g) = self.db(|s| s.group()).await? {
            if g.secret != j.secret {
                return Err(ReplicationError::Refused(format!(
                    "this server is a replica of another registry already (as {:?}): \
                     `acr-task replication delete` it there first",
                    g.me.name
                )));
            }
        }
        let last = self.registry.last_event_seq().await.unwrap_or(0);
        let group = Group {
            me: j.me.clone(),
            secret: j.secret.clone(),
            created: 0,
        };
        let g = group.clone();
        self.db(move |s| {
            s.set_group(&g, last)?;
            for m in &j.members {
                s.add_member(m, last)?;
            }
            Ok(())
        })
        .await?;
        self.follow(Some(&group));
        self.clone().spawn_senders().await
    }

    /// Turns a replica's endpoint on or off (it stays in step either way).
    pub async fn update(
        self: &Arc<Self>,
        name: &str,
        endpoint_enabled: bool,
    ) -> Result<ReplicationInfo, ReplicationError> {
        let n = name.to_string();
        self.db(move |s| {
            if let Some(mut g) = s.group()?.filter(|g| g.me.name == n) {
                g.me.region_endpoint_enabled = endpoint_enabled;
                let indexed = s.indexed()?;
                return s.set_group(&g, indexed);
            }
            let Some(mut m) = s.member(&n)? else {
                return Err(ReplicationError::NotFound(format!(
                    "no replication named {n:?}"
                )));
            };
            m.member.region_endpoint_enabled = endpoint_enabled;
            s.add_member(&m.member, m.cursor)
        })
        .await?;
        let g = self.db(|s| s.group()).await?;
        self.follow(g.as_ref());
        self.tell_members().await;
        self.show(name).await
    }

    /// Removes a replica from the group; it is told to leave (if it can be reached).
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), ReplicationError> {
        let n = name.to_string();
        let (g, gone) = self
            .db(move |s| {
                let g = s.group()?;
                if g.as_ref().is_some_and(|g| g.me.name == n) {
                    return Err(ReplicationError::Refused(format!(
                        "{n:?} is this server: delete it from another replica"
                    )));
                }
                let m = s.member(&n)?.ok_or_else(|| {
                    ReplicationError::NotFound(format!("no replication named {n:?}"))
                })?;
                s.remove_member(&n)?;
                Ok((g, m.member))
            })
            .await?;
        self.clone().spawn_senders().await?;
        self.tell_members().await;
        if let Some(g) = g {
            // The removed one learns it is out from a list without it.
            let body = Members {
                from: g.me.name.clone(),
                members: self.everyone().await.unwrap_or_default(),
            };
            if let Err(e) = self.peer_post(&gone, "members", &body, &g.secret).await {
                tracing::warn!(replica = %gone.name, error = %e, "telling a removed replica to leave");
            }
        }
        Ok(())
    }

    async fn everyone(&self) -> Result<Vec<Member>, ReplicationError> {
        let (g, members) = self.db(|s| Ok((s.group()?, s.members()?))).await?;
        let mut all: Vec<Member> = members.into_iter().map(|m| m.member).collect();
        if let Some(g) = g {
            all.push(g.me);
        }
        Ok(all)
    }

    /// Sends every member the list as this server knows it (best effort: a member away
    /// now learns it from the next change).
    async fn tell_members(&self) {
        let Ok(Some(g)) = self.db(|s| s.group()).await else {
            return;
        };
        let Ok(all) = self.everyone().await else {
            return;
        };
        for m in all.iter().filter(|m| m.name != g.me.name) {
            let body = Members {
                from: g.me.name.clone(),
                members: all.clone(),
            };
            if let Err(e) = self.peer_post(m, "members", &body, &g.secret).await {
                tracing::warn!(replica = %m.name, error = %e, "telling a replica the group's members");
            }
        }
    }

    async fn peer_post<T: Serialize>(
        &self,
        to: &Member,
        what: &str,
        body: &T,
        secret: &str,
    ) -> Result<(), String> {
        let r = self
            .http
            .post(format!("{}/acr-task/replication/v1/{what}", to.url))
            .bearer_auth(secret)
            .json(body)
            .timeout(APPLY_TIMEOUT)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "{} could not be reached: {}",
                    to.url,
                    crate::registry::client::error_chain(&e)
                )
            })?;
        if r.status().is_success() {
            return Ok(());
        }
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        Err(format!(
            "{} answered HTTP {status}: {}",
            to.url,
            error_text(&body)
        ))
    }

    // ---- sending ----

    async fn send_loop(self: Arc<Self>, name: String) {
        let mut wake = self.registry.subscribe_with_context();
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.halt.is_cancelled() {
                return;
            }
            let step = self.send_some(&name).await;
            let pause = match step {
                Ok(true) => {
                    backoff = Duration::from_millis(500);
                    continue;
                }
                Ok(false) => {
                    backoff = Duration::from_millis(500);
                    Duration::from_secs(1)
                }
                Err(e) => {
                    tracing::warn!(replica = %name, error = %e, "replicating");
                    let (n, msg) = (name.clone(), e.to_string());
                    let _ = self.db(move |s| s.set_error(&n, &msg)).await;
                    let b = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    b
                }
            };
            tokio::select! {
                _ = self.halt.cancelled() => return,
                _ = wake.recv() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Sends the member one batch (of its backfill, or of events); true when there may be
    /// more right away. Gone from the group: nothing.
    async fn send_some(&self, name: &str) -> Result<bool, ReplicationError> {
        let n = name.to_string();
        let (g, m) = self.db(move |s| Ok((s.group()?, s.member(&n)?))).await?;
        let (Some(g), Some(m)) = (g, m) else {
            return Ok(false);
        };
        if !m.backfilled {
            return self.backfill_some(&g, &m).await;
        }
        let events = self
            .registry
            .events_after(m.cursor, BATCH)
            .await
            .map_err(|e| ReplicationError::Refused(e.to_string()))?;
        let Some(last) = events.last().map(|(seq, _)| *seq) else {
            self.send_config(&g, &m.member).await?;
            return Ok(false);
        };
        if events[0].0 > m.cursor + 1 {
            // Events it has not had were pruned (away longer than the outbox keeps
            // them): it gets everything held here again instead.
            tracing::warn!(replica = %m.member.name, after = m.cursor, "events it missed were pruned: backfilling it again");
            let (n, now) = (
                name.to_string(),
                self.registry.last_event_seq().await.unwrap_or(last),
            );
            self.db(move |s| s.restart_backfill(&n, now)).await?;
            return Ok(true);
        }
        // Only what this server accepted: each replica sends its own.
        let own: Vec<StoredEvent> = events
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e.replicated_from.is_none() && e.hlc.is_some())
            .collect();
        if !own.is_empty() {
            let batch = Batch {
                from: g.me.name.clone(),
                events: own,
            };
            self.peer_post(&m.member, "events", &batch, &g.secret)
                .await
                .map_err(ReplicationError::Peer)?;
        }
        let n = name.to_string();
        self.db(move |s| s.set_cursor(&n, last)).await?;
        Ok(true)
    }

    /// Sends the member the registry-wide settings with their clocks, when they changed
    /// since they were last sent to it.
    async fn send_config(&self, g: &Group, to: &Member) -> Result<(), ReplicationError> {
        let (rs, auth, hooks) = (self.store.clone(), self.auth.clone(), self.hooks.clone());
        let (digest, items) = tokio::task::spawn_blocking(move || {
            let digest = super::config::state_digest(&rs)?;
            let held = super::config::holdings(auth.store(), &hooks)?;
            Ok::<_, ReplicationError>((digest, super::config::items(&rs, &held)?))
        })
        .await
        .map_err(|e| ReplicationError::Refused(e.to_string()))??;
        let sent = self
            .config_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to.name)
            .cloned();
        if items.is_empty() || sent.as_deref() == Some(digest.as_str()) {
            return Ok(());
        }
        let body = ConfigBatch {
            from: g.me.name.clone(),
            items,
        };
        self.peer_post(to, "config", &body, &g.secret)
            .await
            .map_err(ReplicationError::Peer)?;
        self.config_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(to.name.clone(), digest);
        Ok(())
    }

    /// Takes this server's own changes of the registry-wide settings into their clocks.
    async fn scan_config(&self) -> Result<(), ReplicationError> {
        let Some(g) = self.db(|s| s.group()).await? else {
            return Ok(());
        };
        let (rs, auth, hooks) = (self.store.clone(), self.auth.clone(), self.hooks.clone());
        tokio::task::spawn_blocking(move || {
            let held = super::config::holdings(auth.store(), &hooks)?;
            super::config::scan(&rs, &held, &g.me.name)
        })
        .await
        .map_err(|e| ReplicationError::Refused(e.to_string()))??;
        Ok(())
    }

    /// Sends the next part of everything this server holds (each manifest with its tags
    /// and their winning times) to a member that joined.
    async fn backfill_some(&self, g: &Group, m: &MemberState) -> Result<bool, ReplicationError> {
        let store = self.registry.store().clone();
        let rs = self.store.clone();
        let me = g.me.name.clone();
        let start = m.backfill_done as usize;
        let (events, total) = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            for repo in store.list_repositories(None, None)? {
                for man in store.list_manifests(&repo)?.unwrap_or_default() {
                    all.push((repo.clone(), man));
                }
            }
            let total = all.len();
            let mut events = Vec::new();
            for (repo, man) in all.into_iter().skip(start).take(BATCH) {
                let made = Stamp {
                    hlc: Hlc {
                        ms: (man.created.max(0) as u64) * 1000,
                        n: 0,
                    },
                    origin: me.clone(),
                };
                let mut stamps = vec![(None, made.clone())];
                for t in &man.tags {
                    let s = match rs.tag_clock(&repo, t)? {
                        Some((s, Some(d))) if d == man.digest => s,
                        _ => made.clone(),
                    };
                    stamps.push((Some(t.clone()), s));
                }
                for (tag, s) in stamps {
                    events.push(StoredEvent {
                        id: uuid::Uuid::new_v4().to_string(),
                        timestamp: chrono::Utc::now()
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        event: RegistryEvent {
                            action: EventAction::Push,
                            repository: repo.clone(),
                            tag,
                            digest: man.digest.clone(),
                            media_type: man.media_type.clone(),
                            size: man.size,
                        },
                        context: RequestContext::default(),
                        hlc: Some(s.hlc.to_string()),
                        replicated_from: (s.origin != me).then_some(s.origin),
                    });
                }
            }
            Ok::<_, ReplicationError>((events, total))
        })
        .await
        .map_err(|e| ReplicationError::Refused(e.to_string()))??;
        let sent = (start + BATCH).min(total);
        if !events.is_empty() {
            let batch = Batch {
                from: g.me.name.clone(),
                events,
            };
            self.peer_post(&m.member, "events", &batch, &g.secret)
                .await
                .map_err(ReplicationError::Peer)?;
        }
        let done = sent >= total;
        let n = m.member.name.clone();
        self.db(move |s| s.set_backfill(&n, sent as u64, total as u64, done))
            .await?;
        if done {
            tracing::info!(replica = %m.member.name, manifests = total, "backfill done");
        }
        Ok(!done)
    }

    // ---- applying ----

    /// Applies a member's batch, in order; the first failure stops it (the sender tries
    /// the batch again: applying is idempotent).
    async fn apply_batch(
        &self,
        from: &Member,
        events: Vec<StoredEvent>,
    ) -> Result<usize, ReplicationError> {
        let _one = self.apply.lock().await;
        self.index_local().await?;
        self.prefetch(from, &events).await;
        let mut n = 0;
        for e in events {
            self.apply_one(from, e).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Pulls, several at once, the manifests of a batch's pushes that will be applied
    /// (not deleted since, not older than their tag's winner): applying them in order
    /// then finds them here. A failure here is met again, and reported, in order.
    async fn prefetch(&self, from: &Member, events: &[StoredEvent]) {
        use futures_util::StreamExt as _;
        let mut wanted = Vec::new();
        for e in events
            .iter()
            .filter(|e| e.event.action == EventAction::Push)
        {
            let Some(hlc) = e.hlc.as_deref().and_then(|h| h.parse::<Hlc>().ok()) else {
                continue;
            };
            let s = Stamp {
                hlc,
                origin: e
                    .replicated_from
                    .clone()
                    .unwrap_or_else(|| from.name.clone()),
            };
            let (repo, digest, tag) = (
                e.event.repository.clone(),
                e.event.digest.clone(),
                e.event.tag.clone(),
            );
            let (r, d, st) = (repo.clone(), digest.clone(), s.clone());
            let pass = self
                .db(move |rs| {
                    if rs.tombstone(&r, &d)?.is_some_and(|t| t > st) {
                        return Ok(false);
                    }
                    Ok(match tag {
                        Some(t) => super::wins(&st, rs.tag_clock(&r, &t)?.as_ref().map(|(k, _)| k)),
                        None => true,
                    })
                })
                .await
                .unwrap_or(false);
            if pass
                && crate::names::valid_name(&repo)
                && crate::digest::parse(&digest).is_ok()
                && !wanted.iter().any(|(r, d, _)| *r == repo && *d == digest)
            {
                wanted.push((repo, digest, s));
            }
        }
        if wanted.len() < 2 {
            return;
        }
        futures_util::stream::iter(wanted)
            .map(|(r, d, s)| async move {
                let _ = self.pull(from, &r, &d, &s).await;
            })
            .buffer_unordered(PULLS_AT_ONCE)
            .collect::<Vec<()>>()
            .await;
    }

    async fn apply_one(&self, from: &Member, e: StoredEvent) -> Result<(), ReplicationError> {
        let hlc: Hlc = e
            .hlc
            .as_deref()
            .ok_or_else(|| ReplicationError::Refused("an event without a time".into()))?
            .parse()
            .map_err(ReplicationError::Refused)?;
        CLOCK.observe(hlc).map_err(ReplicationError::Refused)?;
        let origin = e
            .replicated_from
            .clone()
            .unwrap_or_else(|| from.name.clone());
        let s = Stamp { hlc, origin };
        let ev = &e.event;
        let (repo, digest) = (ev.repository.clone(), ev.digest.clone());
        if !crate::names::valid_name(&repo) || crate::digest::parse(&digest).is_err() {
            return Err(ReplicationError::Refused(format!(
                "not a repository and digest: {repo:?} {digest:?}"
            )));
        }
        match (ev.action, ev.tag.clone()) {
            (EventAction::Push, tag) => {
                let (r, d) = (repo.clone(), digest.clone());
                if let Some(t) = self.db(move |s| s.tombstone(&r, &d)).await? {
                    if t > s {
                        return Ok(()); // deleted after this push
                    }
                }
                if let Some(tag) = &tag {
                    let (r, t) = (repo.clone(), tag.clone());
                    let kept = self.db(move |s| s.tag_clock(&r, &t)).await?;
                    if !super::wins(&s, kept.as_ref().map(|(k, _)| k)) {
                        return Ok(()); // a later change of the tag is here already
                    }
                }
                if !self.pull(from, &repo, &digest, &s).await? {
                    return Ok(()); // gone at the sender: its delete follows
                }
                if let Some(tag) = tag {
                    let (r, t, st, d) = (repo.clone(), tag.clone(), s.clone(), digest.clone());
                    self.db(move |s| s.offer_tag(&r, &t, &st, Some(&d))).await?;
                    self.settle(&repo, &tag).await?;
                }
            }
            (EventAction::Delete, Some(tag)) => {
                let (r, t, st) = (repo.clone(), tag.clone(), s.clone());
                if self.db(move |s| s.offer_tag(&r, &t, &st, None)).await? {
                    self.settle(&repo, &tag).await?;
                }
            }
            (EventAction::Delete, None) => {
                let (r, d, st) = (repo.clone(), digest.clone(), s.clone());
                self.db(move |s| s.bury(&r, &d, &st)).await?;
                let store = self.registry.store().clone();
                let ctx = replicated(&s);
                let made = tokio::task::spawn_blocking(move || {
                    crate::registry::service::delete_manifest(&store, &repo, &digest, &ctx)
                })
                .await
                .map_err(|e| ReplicationError::Refused(e.to_string()))??;
                if let Some(evs) = made {
                    self.registry.announce(evs);
                }
            }
        }
        Ok(())
    }

    /// Pulls `repo@digest` from the member that sent it (as an import, untagged); false
    /// when the member no longer has it.
    async fn pull(
        &self,
        from: &Member,
        repo: &str,
        digest: &str,
        s: &Stamp,
    ) -> Result<bool, ReplicationError> {
        let store = self.registry.store().clone();
        let (r, d) = (repo.to_string(), digest.to_string());
        let here = tokio::task::spawn_blocking(move || {
            store
                .get_manifest(&r, &Reference::Digest(d))
                .map(|m| m.is_some())
        })
        .await
        .map_err(|e| ReplicationError::Refused(e.to_string()))??;
        if here {
            return Ok(true);
        }
        let client = self.client_of(from).await?;
        let source = crate::registry::reference::ImageRef {
            registry: client.addr().to_string(),
            repository: repo.to_string(),
            reference: digest.to_string(),
        };
        let target = crate::registry::import::Target {
            repository: repo.to_string(),
            tag: None,
            digest: None,
        };
        let importer =
            crate::registry::import::Importer::new(self.registry.clone(), client, replicated(s));
        match importer.import(&source, &[target], true).await {
            Ok(_) => Ok(true),
            Err(crate::registry::import::ImportError::Missing { .. }) => Ok(false),
            Err(e) => Err(ReplicationError::Peer(format!(
                "pulling {repo}@{digest} from {}: {e}",
                from.name
            ))),
        }
    }

    /// The registry client of a member, logged in as the group's pull login: one per
    /// member, so its tokens serve many pulls.
    async fn client_of(
        &self,
        m: &Member,
    ) -> Result<Arc<crate::registry::client::RegistryClient>, ReplicationError> {
        let secret = self
            .db(|s| s.group())
            .await?
            .map(|g| g.secret)
            .unwrap_or_default();
        let key = format!("{}\n{secret}", m.url);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let host = m
            .url
            .split_once("://")
            .map_or(m.url.as_str(), |(_, h)| h)
            .trim_end_matches('/')
            .to_string();
        let creds = crate::credentials::Credentials::single(
            &host,
            crate::credentials::Credential {
                username: REPLICATION_USER.into(),
                password: secret,
            },
        );
        let t = crate::registry::client::Transport::new(&self.ca_certs, creds)
            .map_err(|e| ReplicationError::Refused(e.to_string()))?;
        let c = Arc::new(crate::registry::client::RegistryClient::new(host, t));
        clients.retain(|k, _| !k.starts_with(&format!("{}\n", m.url)));
        clients.insert(key, c.clone());
        Ok(c)
    }

    /// Makes the registry's tag what its winning change says (pointing at the winner's
    /// manifest, if held; or gone).
    async fn settle(&self, repo: &str, tag: &str) -> Result<(), ReplicationError> {
        let (r, t) = (repo.to_string(), tag.to_string());
        let Some((s, want)) = self.db(move |s| s.tag_clock(&r, &t)).await? else {
            return Ok(());
        };
        let store = self.registry.store().clone();
        let (r, t) = (repo.to_string(), tag.to_string());
        let now = tokio::task::spawn_blocking(move || store.get_manifest(&r, &Reference::Tag(t)))
            .await
            .map_err(|e| ReplicationError::Refused(e.to_string()))??
            .map(|m| m.digest);
        if now == want {
            return Ok(());
        }
        let ctx = replicated(&s);
        match want {
            Some(d) => {
                let store = self.registry.store().clone();
                let (r, dd) = (repo.to_string(), d.clone());
                let row = tokio::task::spawn_blocking(move || {
                    store.get_manifest(&r, &Reference::Digest(dd))
                })
                .await
                .map_err(|e| ReplicationError::Refused(e.to_string()))??;
                // Not held (yet): the tag is set when it comes.
                if let Some(row) = row {
                    self.registry
                        .tag_manifest(repo, tag, &row.content, &row.media_type, ctx)
                        .await
                        .map_err(|e| ReplicationError::Refused(e.message))?;
                }
            }
            None => {
                let store = self.registry.store().clone();
                let (r, t) = (repo.to_string(), tag.to_string());
                let made = tokio::task::spawn_blocking(move || {
                    crate::registry::service::delete_tag(&store, &r, &t, &ctx)
                })
                .await
                .map_err(|e| ReplicationError::Refused(e.to_string()))??;
                if let Some(ev) = made {
                    self.registry.announce(vec![ev]);
                }
            }
        }
        Ok(())
    }

    /// Takes this server's own tag changes into the clocks, in outbox order, and makes
    /// each tag what its winner says (one that lost to a later change from elsewhere is
    /// undone; one that won stays, even if a replicated change was written after it).
    async fn index_local(&self) -> Result<(), ReplicationError> {
        let Some(g) = self.db(|s| s.group()).await? else {
            return Ok(());
        };
        loop {
            let from = self.db(|s| s.indexed()).await?;
            let events = self
                .registry
                .events_after(from, 256)
                .await
                .map_err(|e| ReplicationError::Refused(e.to_string()))?;
            let Some(last) = events.last().map(|(seq, _)| *seq) else {
                return Ok(());
            };
            for (_, e) in events {
                if e.replicated_from.is_some() {
                    continue;
                }
                let Some(hlc) = e.hlc.as_deref().and_then(|h| h.parse::<Hlc>().ok()) else {
                    continue;
                };
                let s = Stamp {
                    hlc,
                    origin: g.me.name.clone(),
                };
                let ev = e.event;
                match (ev.action, ev.tag) {
                    (action, Some(tag)) => {
                        let digest = (action == EventAction::Push).then(|| ev.digest.clone());
                        let (r, t) = (ev.repository.clone(), tag.clone());
                        self.db(move |st| st.offer_tag(&r, &t, &s, digest.as_deref()))
                            .await?;
                        // Whether it won or lost, the registry's tag may say otherwise:
                        // a replicated change may have been written after it, or it
                        // after a later replicated one.
                        self.settle(&ev.repository, &tag).await?;
                    }
                    (EventAction::Delete, None) => {
                        let (r, d) = (ev.repository.clone(), ev.digest.clone());
                        self.db(move |st| st.bury(&r, &d, &s)).await?;
                    }
                    (EventAction::Push, None) => {}
                }
            }
            self.db(move |s| s.set_indexed(last)).await?;
        }
    }

    async fn index_loop(self: Arc<Self>) {
        let mut wake = self.registry.subscribe_with_context();
        let mut pruned = std::time::Instant::now() - Duration::from_secs(3600);
        loop {
            {
                let _one = self.apply.lock().await;
                if let Err(e) = self.index_local().await {
                    tracing::warn!(error = %e, "indexing this server's tag changes");
                }
                if let Err(e) = self.scan_config().await {
                    tracing::warn!(error = %e, "reading the registry's tokens, scope maps and webhooks");
                }
            }
            if pruned.elapsed() > Duration::from_secs(3600) {
                pruned = std::time::Instant::now();
                let before = chrono::Utc::now().timestamp() - TOMBSTONE_KEEP.as_secs() as i64;
                let _ = self.db(move |s| s.prune_tombstones(before)).await;
            }
            tokio::select! {
                _ = self.halt.cancelled() => return,
                _ = wake.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    // ---- peer routes ----

    /// The group's secret, if `headers` carry it (compared in constant time).
    async fn peer(&self, headers: &HeaderMap, from: &str) -> Result<Member, Response> {
        use subtle::ConstantTimeEq;
        let denied = |m: &str| {
            (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"error": m})),
            )
                .into_response()
        };
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let (g, m) = {
            let f = from.to_string();
            self.db(move |s| Ok((s.group()?, s.member(&f)?)))
                .await
                .map_err(|e| refusal(&e))?
        };
        let Some(g) = g else {
            return Err(denied("this server is in no replication group"));
        };
        if !bool::from(given.as_bytes().ct_eq(g.secret.as_bytes())) {
            return Err(denied("wrong replication credential"));
        }
        match m {
            Some(m) => Ok(m.member),
            None => Err((
                StatusCode::FORBIDDEN,
                Json(serde_json::json!({"error": format!("{from:?} is not a member of this server's group")})),
            )
                .into_response()),
        }
    }
}

/// A change made on behalf of a replicated one: its events carry that one's time and
/// origin (so they are not sent on, nor delivered to this server's webhooks).
fn replicated(s: &Stamp) -> RequestContext {
    RequestContext {
        method: "REPLICATE".into(),
        useragent: format!("acr-task/{}", env!("CARGO_PKG_VERSION")),
        replicated: Some((s.hlc.to_string(), s.origin.clone())),
        ..RequestContext::default()
    }
}

fn check_name_and_url(name: &str, url: &str) -> Result<(), ReplicationError> {
    if !super::valid_name(name) {
        return Err(ReplicationError::Refused(format!(
            "{name:?} is not a replication name: 1 to 50 letters, digits and inner hyphens"
        )));
    }
    match reqwest::Url::parse(url) {
        Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.host().is_some() => Ok(()),
        _ => Err(ReplicationError::Refused(format!(
            "{url:?} is not a server URL: give https://HOST:PORT (http:// on a private network)"
        ))),
    }
}

/// An error body's message (`{"error": ...}`), else the text.
fn error_text(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| crate::registry::client::summary(body.as_bytes()))
}

/// The HTTP answer for an error.
fn refusal(e: &ReplicationError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %e, "replication");
    }
    (status, Json(serde_json::json!({"error": e.to_string()}))).into_response()
}

/// The routes other members call, each with the group's secret.
pub fn peer_router(r: Arc<Replication>) -> Router {
    Router::new()
        .route("/acr-task/replication/v1/events", post(events))
        .route("/acr-task/replication/v1/members", post(members))
        .route("/acr-task/replication/v1/config", post(config))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_PEER_BODY))
        .with_state(r)
}

async fn events(
    State(r): State<Arc<Replication>>,
    headers: HeaderMap,
    Json(b): Json<Batch>,
) -> Response {
    let from = match r.peer(&headers, &b.from).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    match r.apply_batch(&from, b.events).await {
        Ok(n) => Json(serde_json::json!({ "applied": n })).into_response(),
        Err(e) => {
            tracing::warn!(from = %from.name, error = %e, "applying replicated changes");
            refusal(&e)
        }
    }
}

async fn members(
    State(r): State<Arc<Replication>>,
    headers: HeaderMap,
    Json(b): Json<Members>,
) -> Response {
    if let Err(resp) = r.peer(&headers, &b.from).await {
        return resp;
    }
    let done = async {
        let g = r.db(|s| s.group()).await?;
        let Some(mut g) = g else { return Ok(()) };
        let Some(me) = b.members.iter().find(|m| m.name == g.me.name) else {
            // Removed from the group.
            r.db(|s| s.leave()).await?;
            r.follow(None);
            return r.clone().spawn_senders().await;
        };
        g.me.region_endpoint_enabled = me.region_endpoint_enabled;
        let last = r.registry.last_event_seq().await.unwrap_or(0);
        let list = b.members.clone();
        r.follow(Some(&g));
        r.db(move |s| {
            let indexed = s.indexed()?;
            s.set_group(&g, indexed)?;
            for m in s.members()? {
                if !list.iter().any(|l| l.name == m.member.name) {
                    s.remove_member(&m.member.name)?;
                }
            }
            for m in list.iter().filter(|m| m.name != g.me.name) {
                s.add_member(m, last)?;
            }
            Ok(())
        })
        .await?;
        r.clone().spawn_senders().await
    }
    .await;
    match done {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refusal(&e),
    }
}

/// In front of the registry's `/v2/` routes: while this server's region endpoint is
/// disabled it serves the other replicas only (their pull login, by basic credentials or
/// a bearer token issued to it); a client gets 503 saying so. A request with no
/// credentials is challenged, so a replica's client answers with its login.
pub async fn endpoint_gate(
    State(r): State<Arc<Replication>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !r.endpoint_off.load(std::sync::atomic::Ordering::Relaxed)
        || !req.uri().path().starts_with("/v2")
    {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let peer = if let Some(token) = header.strip_prefix("Bearer ") {
        r.auth
            .verify(token)
            .is_ok_and(|c| c.sub == REPLICATION_USER)
    } else if let Some(b) = header.strip_prefix("Basic ") {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|up| {
                let (u, p) = up.split_once(':')?;
                Some(u == REPLICATION_USER && r.auth.is_replication_secret(p))
            })
            .unwrap_or(false)
    } else {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"acr-task replica\"")],
            Json(serde_json::json!({"errors": [{"code": "UNAUTHORIZED",
                "message": "authentication required", "detail": null}]})),
        )
            .into_response();
    };
    if peer {
        return next.run(req).await;
    }
    let name = r
        .region
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(
            serde_json::json!({"errors": [{"code": "UNAVAILABLE", "message": format!(
            "this replica ({name}) does not serve clients: its region endpoint is disabled; \
             use another replica of the registry, or `acr-task replication update {name} \
             --region-endpoint-enabled true`"), "detail": null}]}),
        ),
    )
        .into_response()
}

async fn config(
    State(r): State<Arc<Replication>>,
    headers: HeaderMap,
    Json(b): Json<ConfigBatch>,
) -> Response {
    let from = match r.peer(&headers, &b.from).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let _one = r.apply.lock().await;
    let me = r
        .region
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    let (rs, auth, hooks) = (r.store.clone(), r.auth.clone(), r.hooks.clone());
    let done = tokio::task::spawn_blocking(move || {
        super::config::apply(auth.store(), &hooks, &rs, &me, b.items)
    })
    .await
    .map_err(|e| ReplicationError::Refused(e.to_string()))
    .and_then(|r| r);
    match done {
        Ok(n) => Json(serde_json::json!({ "applied": n })).into_response(),
        Err(e) => {
            tracing::warn!(from = %from.name, error = %e, "applying replicated settings");
            refusal(&e)
        }
    }
}
