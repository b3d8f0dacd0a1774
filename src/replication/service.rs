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

mod apply;
mod routes;
mod send;

pub use routes::{endpoint_gate, peer_router};

/// Events sent in one request.
const BATCH: usize = 32;
/// Manifests of one batch pulled at once.
const PULLS_AT_ONCE: usize = 4;
/// Deletes sent in one request at the end of a backfill (each is a row, no pull).
const DELETES_AT_ONCE: usize = 256;
/// The longest wait between tries to reach a member that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the settings' state is compared with what a member was last sent, while
/// events stream to it (and the first wait after a refusal, doubled up to
/// [`MAX_BACKOFF`] while they are refused).
const SETTINGS_EVERY: Duration = Duration::from_secs(1);
/// A batch may carry big layers to pull: the whole exchange gets this long.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3600);
/// A peer request's body, and an invitation's: events are small (a manifest is pulled,
/// not sent); the settings (tokens with their hashes) can be many.
pub const MAX_PEER_BODY: usize = 64 << 20;
/// How long an invitation may take to be answered: the joiner takes every setting.
const JOIN_TIMEOUT: Duration = Duration::from_secs(600);
/// How often each member sends the others its member list (`ACR_TASK_REPLICATION_RESEND`,
/// in seconds, changes it: shorter where members come and go often, or in tests).
fn members_every() -> Duration {
    crate::timefmt::env_secs("ACR_TASK_REPLICATION_RESEND", Duration::from_secs(30))
}
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

/// The group's members as one of them now knows it (`POST .../v1/members`), sent when
/// it changes and every half minute (a member that was away learns it then); an older
/// version than the receiver's is not taken.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Members {
    from: String,
    version: String,
    /// The group's secret as of this version (it changes when a member is removed).
    secret: String,
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
    /// Inviting, joining and removing members one at a time (a group is read, then
    /// saved).
    membership: tokio::sync::Mutex<()>,
    /// A sender per member, stopped when dropped.
    senders: Mutex<HashMap<String, AbortOnDropHandle<()>>>,
    halt: tokio_util::sync::CancellationToken,
    /// This server's region endpoint is disabled: it serves only the other replicas.
    endpoint_off: std::sync::atomic::AtomicBool,
    /// This server's region name while it is in a group.
    region: Mutex<Option<String>>,
    /// The group's secret while it is in one (the peer routes check it before reading
    /// a body).
    secret: Mutex<Option<String>>,
    /// How the registry-wide settings stand with each member.
    settings_sent: Mutex<HashMap<String, SettingsSent>>,
    /// A setting was changed through this server's API: the indexer stamps it now, not at
    /// its next turn.
    settings_touched: tokio::sync::Notify,
    /// Counts the times the settings' clocks moved here (stamped, or taken from a member):
    /// each sender looks at them at once instead of at its next turn.
    settings_moves: tokio::sync::watch::Sender<u64>,
    /// A registry client per member (URL and secret), for pulls.
    clients: Mutex<HashMap<String, Arc<crate::registry::client::RegistryClient>>>,
}

/// How the registry-wide settings stand with one member: they go before events, at most
/// every [`SETTINGS_EVERY`], and a refusal waits longer each time.
#[derive(Debug, Clone, Default)]
struct SettingsSent {
    /// The state it last took (see [`crate::replication::config::state_digest`]): the
    /// same is not sent again.
    taken: Option<String>,
    /// When they are next looked at, and the wait after the next refusal.
    next: Option<std::time::Instant>,
    backoff: Duration,
    /// Why it refused them last, until it takes them (shown with its last error: events
    /// going through do not clear it).
    refused: Option<String>,
    /// The count of [`Replication::settings_moves`] when they were last looked at.
    moved: u64,
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
            membership: tokio::sync::Mutex::new(()),
            senders: Mutex::new(HashMap::new()),
            halt,
            endpoint_off: Default::default(),
            region: Mutex::new(None),
            secret: Mutex::new(None),
            settings_sent: Mutex::new(HashMap::new()),
            settings_touched: tokio::sync::Notify::new(),
            settings_moves: tokio::sync::watch::Sender::new(0),
            clients: Mutex::new(HashMap::new()),
        });
        // The clock goes on after the greatest time kept here (events, tags, settings).
        let last = me.registry.last_event_seq().await.unwrap_or(0);
        let recent = me
            .registry
            .events_after((last - 256).max(0), 256)
            .await
            .unwrap_or_default();
        let mut kept = me.db(|s| s.max_hlc()).await?;
        for (_, e) in &recent {
            kept = kept.max(e.hlc.as_deref().and_then(|h| h.parse::<Hlc>().ok()));
        }
        if let Some(k) = kept {
            CLOCK.seed(k);
        }
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
        *self.secret.lock().unwrap_or_else(|p| p.into_inner()) = g.map(|g| g.secret.clone());
        self.endpoint_off.store(
            g.is_some_and(|g| !g.me.region_endpoint_enabled),
            std::sync::atomic::Ordering::Relaxed,
        );
        *self.region.lock().unwrap_or_else(|p| p.into_inner()) = g.map(|g| g.me.name.clone());
    }

    /// A token, scope map, webhook or registry setting may have changed here: it goes to
    /// the other replicas now.
    pub fn settings_changed(&self) {
        self.settings_touched.notify_one();
    }

    /// The settings' clocks moved: the senders look at them.
    fn settings_moved(&self) {
        self.settings_moves.send_modify(|n| *n = n.wrapping_add(1));
    }

    async fn properties(&self) -> Result<crate::tier::Properties, ReplicationError> {
        let store = self.registry.store().clone();
        Ok(tokio::task::spawn_blocking(move || store.properties())
            .await
            .map_err(|e| ReplicationError::Refused(format!("internal error: {e}")))??)
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

    /// Runs `f` on a blocking thread with the places this server keeps the registry-wide
    /// settings in.
    async fn on_settings<T: Send + 'static>(
        &self,
        f: impl FnOnce(super::config::Places<'_>, &ReplicationStore) -> Result<T, ReplicationError>
            + Send
            + 'static,
    ) -> Result<T, ReplicationError> {
        let (rs, auth, hooks, registry) = (
            self.store.clone(),
            self.auth.clone(),
            self.hooks.clone(),
            self.registry.store().clone(),
        );
        tokio::task::spawn_blocking(move || {
            let at = super::config::Places {
                auth: &auth,
                hooks: &hooks,
                registry: &registry,
            };
            f(at, &rs)
        })
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
        let settings_error = self
            .settings_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&m.member.name)
            .and_then(|s| s.refused.clone());
        ReplicationInfo {
            name: m.member.name,
            url: m.member.url,
            this_server: false,
            region_endpoint_enabled: m.member.region_endpoint_enabled,
            status: if m.backfilled { "Ready" } else { "Backfilling" }.into(),
            backfill: (!m.backfilled).then_some((m.backfill_done, m.backfill_total.unwrap_or(0))),
            lag_events: events,
            lag_seconds,
            last_error: match (m.last_error, settings_error) {
                (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                (a, b) => a.or(b),
            },
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
        let props = self.properties().await?;
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
        let _members = self.membership.lock().await;
        let (group, fresh) = match self.db(|s| s.group()).await? {
            Some(g) => (g, false),
            None => {
                let name = req.home_name.clone().unwrap_or_else(|| "home".into());
                let url = req
                    .home_url
                    .clone()
                    .unwrap_or(home_url)
                    .trim_end_matches('/')
                    .to_string();
                check_name_and_url(&name, &url)?;
                let g = Group {
                    me: Member {
                        name,
                        url,
                        region_endpoint_enabled: true,
                    },
                    secret: crate::auth::password::generate(),
                    created: 0,
                    version: String::new(),
                    previous_secret: None,
                };
                (g, true)
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
        let home = group.me.name.clone();
        let settings = {
            // Not beside the indexer's scan or a member's settings being applied.
            let _one = self.apply.lock().await;
            self.on_settings(move |at, rs| {
                // A new group starts from what is held here now: clocks kept from a group
                // this server was in before (deletes included) are not the new one's.
                if fresh {
                    rs.reset_config_clocks(&[])?;
                }
                let held = crate::replication::config::holdings(at)?;
                crate::replication::config::scan(rs, &held, &home)?;
                crate::replication::config::items(rs, &held)
            })
            .await?
        };
        let version = CLOCK.tick().to_string();
        let join = super::Join {
            secret: group.secret.clone(),
            me: new.clone(),
            members: others,
            version: version.clone(),
            settings,
        };
        let r = self
            .http
            .post(format!("{url}/api/registry/replications/join"))
            .basic_auth(&req.username, Some(&req.password))
            .json(&join)
            .timeout(JOIN_TIMEOUT)
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
        let mut group = group;
        group.version = version;
        let (g, n) = (group.clone(), new.clone());
        self.db(move |s| {
            s.set_group(&g, last)?;
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
        let props = self.properties().await?;
        if !props.limits().geo_replication {
            return Err(ReplicationError::Refused(format!(
                "geo-replication needs the Premium tier; the registry of {} is {:?}: \
                 `acr-task registry update --sku Premium` on it first",
                j.me.url, props.sku
            )));
        }
        // Not beside another invitation, or this server's own `create` (an invitation
        // to itself would wait for it).
        let Ok(_members) = self.membership.try_lock() else {
            return Err(ReplicationError::Refused(
                "this server is changing its replications already: try again".into(),
            ));
        };
        let current = self.db(|s| s.group()).await?;
        if let Some(g) = &current {
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
            version: j.version.clone(),
            previous_secret: None,
        };
        let g = group.clone();
        let (settings, fresh) = (j.settings.clone(), current.is_none());
        let one = self.apply.lock().await;
        self.on_settings(move |at, s| {
            // The registry's settings are the group's from now on, before anything of the
            // group's is served here (what only this server had goes to the others). An
            // invitation again from its own group changes none.
            if fresh {
                crate::replication::config::join_group(at, s, &g.me.name, settings)?;
            }
            s.set_group(&g, last)?;
            for m in &j.members {
                s.add_member(m, last)?;
            }
            Ok(())
        })
        .await?;
        drop(one);
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
            let Some(mut g) = s.group()? else {
                return Err(ReplicationError::NotFound(format!(
                    "no replication named {n:?}"
                )));
            };
            if g.me.name == n {
                g.me.region_endpoint_enabled = endpoint_enabled;
            } else {
                let Some(mut m) = s.member(&n)? else {
                    return Err(ReplicationError::NotFound(format!(
                        "no replication named {n:?}"
                    )));
                };
                m.member.region_endpoint_enabled = endpoint_enabled;
                s.add_member(&m.member, m.cursor)?;
            }
            g.version = CLOCK.tick().to_string();
            let indexed = s.indexed()?;
            s.set_group(&g, indexed)
        })
        .await?;
        let g = self.db(|s| s.group()).await?;
        self.follow(g.as_ref());
        self.tell_members().await;
        self.show(name).await
    }

    /// Removes a replica from the group and changes the group's secret (the removed one
    /// keeps none that works); it is told to leave (if it can be reached).
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), ReplicationError> {
        let _members = self.membership.lock().await;
        let n = name.to_string();
        let (g, gone) = self
            .db(move |s| {
                let mut g = s.group()?.ok_or_else(|| {
                    ReplicationError::NotFound(format!("no replication named {n:?}"))
                })?;
                if g.me.name == n {
                    return Err(ReplicationError::Refused(format!(
                        "{n:?} is this server: delete it from another replica"
                    )));
                }
                let m = s.member(&n)?.ok_or_else(|| {
                    ReplicationError::NotFound(format!("no replication named {n:?}"))
                })?;
                s.remove_member(&n)?;
                g.previous_secret = Some(std::mem::replace(
                    &mut g.secret,
                    crate::auth::password::generate(),
                ));
                g.version = CLOCK.tick().to_string();
                let indexed = s.indexed()?;
                s.set_group(&g, indexed)?;
                Ok((g, m.member))
            })
            .await?;
        self.follow(Some(&g));
        self.clone().spawn_senders().await?;
        self.tell_members().await;
        // The removed one learns it is out from a list without it, under the secret it
        // still has.
        let body = Members {
            from: g.me.name.clone(),
            version: g.version.clone(),
            secret: String::new(),
            members: self.everyone().await.unwrap_or_default(),
        };
        let old = g.previous_secret.clone().unwrap_or_default();
        if let Err(e) = self.peer_post(&gone, "members", &body, &old).await {
            tracing::warn!(replica = %gone.name, error = %e, "telling a removed replica to leave");
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
                version: g.version.clone(),
                secret: g.secret.clone(),
                members: all.clone(),
            };
            let mut sent = self.peer_post(m, "members", &body, &g.secret).await;
            if let (Err(e), Some(old)) = (&sent, &g.previous_secret) {
                if e.contains("HTTP 401") {
                    // It missed the last change of the secret: it learns it now.
                    sent = self.peer_post(m, "members", &body, old).await;
                }
            }
            if let Err(e) = sent {
                tracing::debug!(replica = %m.name, error = %e, "telling a replica the group's members");
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
    // The group's secret travels with every request: in clear text only on this machine.
    let loopback = |u: &reqwest::Url| {
        u.host_str()
            .is_some_and(crate::registry::reference::is_loopback)
    };
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "https" && u.host().is_some() => Ok(()),
        Ok(u) if u.scheme() == "http" && loopback(&u) => Ok(()),
        Ok(u) if u.scheme() == "http" => Err(ReplicationError::Refused(format!(
            "{url:?}: replicas on other machines talk over HTTPS (the group's secret travels \
             with every request): serve it with --tls-cert and --tls-key and give https://"
        ))),
        _ => Err(ReplicationError::Refused(format!(
            "{url:?} is not a server URL: give https://HOST:PORT"
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
