//! The integrated OCI registry (distribution spec v1.1 plus the Docker Registry v2 behaviour
//! that the docker CLI relies on), served with axum over [`crate::store::Store`].
//!
//! - [`start`] runs it in-process on a listener (for `acr-task run` and tests);
//! - [`router`] gives the bare `Router` so `serve` can compose it;
//! - [`Registry`] is the read API (repositories, tags, manifests) and the push-event hook.

mod acr_api;
mod blobs;
pub mod client;
mod errors;
pub mod import;
mod manifests;
mod names;
pub mod purge;
pub mod purge_remote;
pub mod reference;
mod routes;
pub mod service;
pub mod signing;
mod stream;
mod throttle;
pub mod trust;
pub mod upgrade;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::store::{ManifestInfo, Store, StoreError};

pub use errors::ApiError;
pub use names::{valid_name, valid_tag};

/// Largest manifest accepted (the spec's recommended limit).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub data_dir: PathBuf,
    /// `127.0.0.1:0` picks a free port; see [`RunningRegistry::addr`].
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate (`None`: plain HTTP).
    pub tls: Option<crate::listen::TlsConfig>,
    pub limits: RegistryLimits,
    pub connections: crate::listen::ConnectionLimits,
    /// Host names it answers to beyond IP literals, `localhost` and the machine's own.
    pub server_names: Vec<String>,
    /// Where the registry's metadata is (its directory unless shared).
    pub meta: crate::store::MetaPlace,
}

impl RegistryConfig {
    /// Plain HTTP on `listen` with the default limits.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> RegistryConfig {
        RegistryConfig {
            data_dir,
            listen,
            tls: None,
            limits: RegistryLimits::default(),
            connections: crate::listen::ConnectionLimits::default(),
            server_names: Vec::new(),
            meta: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("registry task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventAction {
    Push,
    Delete,
}

/// Sent on every accepted manifest push and every manifest or tag delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEvent {
    pub action: EventAction,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// Who made the request that raised an event (for webhook payloads). Set per request by
/// the routes; empty for events raised outside a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestContext {
    pub id: String,
    pub host: String,
    pub method: String,
    pub useragent: String,
    /// Token or user name; empty when anonymous or auth is off.
    pub actor: String,
    /// A change made on behalf of another replica's (geo-replication): that change's
    /// clock time and region, which its events carry instead of this server's.
    #[serde(skip)]
    pub replicated: Option<(String, String)>,
}

/// A manifest's artifact type as the OCI image spec defines it: its `artifactType`, else
/// (for an image manifest) its config's media type.
pub fn artifact_type_of(manifest: &serde_json::Value) -> Option<String> {
    manifest
        .get("artifactType")
        .or_else(|| manifest.get("config").and_then(|c| c.get("mediaType")))
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
}

/// Helm's config media type: a chart's manifest names its `Chart.yaml` fields in it.
pub const HELM_CONFIG_TYPE: &str = "application/vnd.cncf.helm.config.v1+json";

/// A Helm chart's name and version, from its config blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelmChart {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
}

/// The chart a config describes, when the manifest's config is Helm's and reads as one.
pub fn helm_chart_of(config_media_type: &str, config: &[u8]) -> Option<HelmChart> {
    (config_media_type == HELM_CONFIG_TYPE)
        .then(|| serde_json::from_slice(config).ok())
        .flatten()
}

/// Config media types of container images (not artifacts): listings leave them out of
/// the artifact type column.
pub const IMAGE_CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

impl RequestContext {
    /// A change made by one of acr-task's own tools (`method`: `IMPORT`, `PURGE`), as its
    /// events name it.
    pub fn of_tool(method: &str, useragent: &str, actor: String, host: String) -> RequestContext {
        RequestContext {
            id: uuid::Uuid::new_v4().to_string(),
            host,
            method: method.into(),
            useragent: format!("{useragent}/{}", env!("CARGO_PKG_VERSION")),
            actor,
            replicated: None,
        }
    }
}

/// How long the event outbox keeps an event: consumers read it within seconds; a week
/// covers any downtime worth catching up on. `ACR_TASK_OUTBOX_KEEP` (seconds) changes it
/// (shorter where disk is scarce, or in tests of a replica away longer than that).
fn outbox_keep() -> std::time::Duration {
    crate::timefmt::env_secs(
        "ACR_TASK_OUTBOX_KEEP",
        std::time::Duration::from_secs(7 * 24 * 3600),
    )
}
const OUTBOX_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// How often the retention policy is applied (ACR applies it within a day; hourly here).
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// One pass of the retention policy, off the async threads.
pub async fn apply_retention(reg: Registry) {
    let r = tokio::task::spawn_blocking(move || {
        purge::retention_pass(reg.store(), &|events| reg.announce(events))
    })
    .await;
    if let Ok(Err(e)) = r {
        tracing::warn!(error = %e, "applying the retention policy");
    }
}

fn prune_outbox(store: &Store) {
    match store.outbox_prune(outbox_keep()) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "old registry events pruned"),
        Err(e) => tracing::warn!(error = %e, "pruning registry events"),
    }
}

/// An event as the store's outbox keeps it: written in the transaction that made the
/// change, so consumers that read the outbox from their own cursor (webhooks, the
/// base-image trigger) never miss one, across crashes and restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Unique; webhook deliveries are keyed by it, so reading an event twice is harmless.
    pub id: String,
    /// When it happened, RFC 3339 UTC.
    pub timestamp: String,
    pub event: RegistryEvent,
    pub context: RequestContext,
    /// Its hybrid-logical-clock time (`crate::hlc`): what orders a tag's changes
    /// across replicas. Absent on events made before geo-replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<String>,
    /// The region that accepted the change, when another replica did (this server
    /// applied it): not sent on, nor delivered to this server's webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicated_from: Option<String>,
}

/// The context of the request being served (empty outside one).
pub(crate) fn current_context() -> RequestContext {
    REQUEST_CONTEXT.try_with(|c| c.clone()).unwrap_or_default()
}

impl StoredEvent {
    pub(crate) fn new(event: RegistryEvent, context: RequestContext) -> StoredEvent {
        let (hlc, replicated_from) = match &context.replicated {
            Some((hlc, origin)) => (hlc.clone(), Some(origin.clone())),
            None => (crate::hlc::CLOCK.tick().to_string(), None),
        };
        StoredEvent {
            id: uuid::Uuid::new_v4().to_string(),
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            event,
            context,
            hlc: Some(hlc),
            replicated_from,
        }
    }

    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

tokio::task_local! {
    pub(crate) static REQUEST_CONTEXT: RequestContext;
}

/// One upload session (sessions live in memory; a restart forgets them and clears
/// `uploads/`, which is what makes partial data invisible after a crash). Where servers
/// share the registry, each acknowledged chunk is also checkpointed to its blob storage,
/// and another server carries the session on if this one dies (`blobs::take_over`).
pub(crate) struct Upload {
    /// Where the bytes go (the store's [`crate::store::BlobUpload`]; dropped, it is gone).
    pub blob: Arc<dyn crate::store::BlobUpload>,
    pub offset: u64,
    pub hasher: sha2::Sha256,
    /// The session was carried on from another server's checkpoint: `hasher` has not
    /// seen its first bytes, so the commit hashes the whole upload again.
    pub rehash: bool,
    /// Its row names a checkpoint in the blob storage (saved here, or carried on): when
    /// the row is found gone, that is not this server's to finish or remove.
    pub checkpointed: bool,
    /// Last time a request touched the session; idle sessions expire
    /// ([`RegistryLimits::upload_idle`]).
    pub touched: std::time::Instant,
}

/// An open session: the repository and client that opened it (for the caps), and its state.
pub(crate) struct Session {
    pub repo: String,
    pub client: std::net::IpAddr,
    pub upload: Arc<tokio::sync::Mutex<Upload>>,
}

/// Upload sessions by id.
pub(crate) type Sessions = HashMap<String, Session>;

/// What clients may hold and send: bounds that keep one slow or greedy client from
/// starving the others (`serve --max-blob-size`, `--max-uploads-per-*`).
#[derive(Debug, Clone)]
pub struct RegistryLimits {
    /// Largest blob accepted, in bytes.
    pub max_blob_bytes: u64,
    /// Open upload sessions per repository.
    pub max_uploads_per_repository: usize,
    /// Open upload sessions per client address.
    pub max_uploads_per_client: usize,
    /// A session no request has touched for this long is dropped with its data.
    pub upload_idle: std::time::Duration,
    /// A request body that sends nothing for this long is abandoned.
    pub body_idle: std::time::Duration,
    /// A pause after each object a long job (a Classic upgrade, sealing a store in place,
    /// a key rotation) handles: 0; tests watch one in progress.
    pub job_pace: std::time::Duration,
    /// Blob pulls answered with a redirect to a presigned object-storage URL valid this
    /// long (`serve --redirect-pulls`), instead of streamed through the registry.
    pub redirect_pulls: Option<std::time::Duration>,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_blob_bytes: 20 * 1024 * 1024 * 1024,
            max_uploads_per_repository: 64,
            max_uploads_per_client: 128,
            upload_idle: std::time::Duration::from_secs(15 * 60),
            body_idle: std::time::Duration::from_secs(60),
            job_pace: std::time::Duration::ZERO,
            redirect_pulls: None,
        }
    }
}

/// How often the maintenance loop sweeps idle upload sessions: a quarter of the idle
/// limit, between 1 and 30 seconds.
fn sweep_every(limits: &RegistryLimits) -> std::time::Duration {
    (limits.upload_idle / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(30),
    )
}

pub(crate) struct State {
    pub store: Arc<Store>,
    pub uploads: Mutex<Sessions>,
    pub limits: RegistryLimits,
    pub events: broadcast::Sender<RegistryEvent>,
    /// The same events with their request context (webhooks).
    pub detailed: broadcast::Sender<(RegistryEvent, RequestContext)>,
    /// Set once the maintenance loop (session sweep, outbox prune) runs.
    pub maintained: std::sync::atomic::AtomicBool,
    /// Where the maintenance loop runs; it stops when the registry is dropped.
    pub background: crate::background::Background,
    /// The tier's read and write rates.
    pub throttle: throttle::Throttle,
    /// Blobs imports are copying now: concurrent imports wanting one wait for its copy.
    pub importing: import::BlobLocks,
    /// Set when servers share this registry: how the others reach this one.
    pub peer: std::sync::OnceLock<Peer>,
}

/// This server as the other servers sharing the registry reach it, and the client it
/// sends them the requests of upload sessions they hold.
pub(crate) struct Peer {
    pub url: String,
    /// This process as the holder of upload sessions: `url#boot`, a restart at the same
    /// address another holder (it carries on what its former self held).
    pub me: String,
    pub http: reqwest::Client,
    /// Whether this server leads the servers sharing the registry now: only the leader
    /// runs the registry's jobs, retention and outbox pruning (once for everyone).
    pub leading: tokio::sync::watch::Receiver<bool>,
}

impl State {
    /// Whether this server runs the registry's once-for-everyone work: always, unless
    /// servers share the registry and another one leads.
    fn leads(&self) -> bool {
        self.peer.get().is_none_or(|p| *p.leading.borrow())
    }
}

/// The registry's long jobs, run here in the serving process when the settings ask for
/// them (through the API, or on the files by another process): a Classic registry's
/// upgrade, sealing a store in place, re-wrapping data keys after a key rotation. A job
/// that fails is retried a minute later; each resumes where it stopped.
async fn watch_jobs(weak: std::sync::Weak<State>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Stops a job (at its next object) when the loop is dropped (the registry stops).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let Some(state) = weak.upgrade() else { return };
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let (store, pace, flag) = (state.store.clone(), state.limits.job_pace, stop.0.clone());
        let leads = state.leads();
        // A server that stops leading stops its job too: the new leader takes it on.
        let _deposed = match (state.peer.get(), leads) {
            (Some(peer), true) => {
                let (mut leading, flag) = (peer.leading.clone(), stop.0.clone());
                Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                    async move {
                        while *leading.borrow_and_update() {
                            if leading.changed().await.is_err() {
                                return;
                            }
                        }
                        flag.store(true, Ordering::SeqCst);
                    },
                )))
            }
            _ => None,
        };
        drop(state);
        let r = tokio::task::spawn_blocking(move || -> Result<bool, String> {
            let quiet = |_: &crate::tier::Progress| {};
            let p = store.properties().map_err(|e| e.to_string())?;
            if p.upgrading().is_some() && leads {
                return match upgrade::run(&store, pace, &flag, &quiet) {
                    Ok(r) => {
                        if let Some(r) = r {
                            tracing::info!(
                                copied = r.objects_copied,
                                already_there = r.objects_already_there,
                                tags = r.tags_verified,
                                "Classic upgrade complete"
                            );
                        }
                        Ok(true)
                    }
                    Err(upgrade::UpgradeError::Stopped) => Ok(false),
                    Err(e) => {
                        upgrade::record_failure(&store, &e);
                        Err(format!("Classic upgrade: {e}"))
                    }
                };
            }
            if store.serves_classic() {
                return Ok(false);
            }
            // Every server learns of a new key or mode; only one seals and re-wraps.
            store.sync_encryption().map_err(|e| e.to_string())?;
            if !leads {
                return Ok(false);
            }
            let Some(e) = p.encryption.filter(|e| e.pending()) else {
                return Ok(false);
            };
            let job = if !e.complete {
                store.seal_in_place(pace, &flag, &quiet)
            } else {
                store.rewrap_keys(pace, &flag, &quiet)
            };
            match job {
                Ok(_) => Ok(true),
                Err(_) if flag.load(Ordering::SeqCst) => Ok(false),
                Err(err) => {
                    store.record_encryption_failure(&err);
                    Err(format!("encryption at rest: {err}"))
                }
            }
        })
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "a registry job stopped; retrying in a minute");
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            }
            Err(e) => tracing::error!(error = %e, "registry job task"),
        }
    }
}

/// How often servers sharing a registry tell each other the operations they admitted.
const SHARE_RATES_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Holds the tier's request rates across the servers sharing the registry (see
/// [`throttle`]): each second, what this one admitted goes into the registry's totals and
/// what the others admitted meanwhile is drawn from its buckets. Nothing for a registry of
/// one server's own.
async fn share_rates(weak: std::sync::Weak<State>) {
    let mut seen: Option<(u64, u64)> = None;
    loop {
        tokio::time::sleep(SHARE_RATES_EVERY).await;
        let Some(state) = weak.upgrade() else { return };
        if state.peer.get().is_none() {
            continue;
        }
        let mine = state.throttle.unsynced();
        let store = state.store.clone();
        let r = tokio::task::spawn_blocking(move || {
            let totals = store.count_ops(mine[0], mine[1])?;
            Ok::<_, StoreError>((totals, store.properties()?.limits()))
        })
        .await;
        match r {
            Ok(Ok((Some(now), limits))) => {
                if let Some(before) = seen {
                    let others = [
                        now.0.saturating_sub(before.0).saturating_sub(mine[0]),
                        now.1.saturating_sub(before.1).saturating_sub(mine[1]),
                    ];
                    state.throttle.charge(others, &limits);
                }
                seen = Some(now);
            }
            Ok(Ok((None, _))) => return,
            Ok(Err(e)) => {
                // Told next time; the others' share meanwhile is not drawn here (the
                // next pass starts from the totals it reads).
                tracing::warn!(error = %e, "sharing the registry's request rates");
                state.throttle.unsynced_again(mine);
                seen = None;
            }
            Err(_) => return,
        }
    }
}

/// Handle on a registry: cheap to clone; the read API and the event hook.
#[derive(Clone)]
pub struct Registry {
    pub(crate) inner: Arc<State>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("root", &self.inner.store.root())
            .finish()
    }
}

impl Registry {
    /// Open the store under `data_dir` (recovering from any crash) without serving it.
    pub fn open(data_dir: &std::path::Path) -> Result<Registry, RegistryError> {
        Self::open_with(data_dir, RegistryLimits::default())
    }

    /// [`Registry::open`] with explicit client limits.
    pub fn open_with(
        data_dir: &std::path::Path,
        limits: RegistryLimits,
    ) -> Result<Registry, RegistryError> {
        Self::open_at(data_dir, limits, &crate::store::MetaPlace::Directory)
    }

    /// [`Registry::open_with`] with the metadata where `place` says (a database the
    /// server's replicas share).
    pub fn open_at(
        data_dir: &std::path::Path,
        limits: RegistryLimits,
        place: &crate::store::MetaPlace,
    ) -> Result<Registry, RegistryError> {
        let store = Store::open_at(data_dir, true, place)?;
        if limits.redirect_pulls.is_some() {
            if let Some(why) = store.redirect_refusal()? {
                return Err(StoreError::Refused(format!("--redirect-pulls: {why}")).into());
            }
        }
        prune_outbox(&store);
        let (events, _) = broadcast::channel(1024);
        let (detailed, _) = broadcast::channel(1024);
        Ok(Registry {
            inner: Arc::new(State {
                store: Arc::new(store),
                uploads: Mutex::new(HashMap::new()),
                limits,
                events,
                detailed,
                maintained: std::sync::atomic::AtomicBool::new(false),
                background: crate::background::Background::new(),
                throttle: throttle::Throttle::default(),
                importing: Default::default(),
                peer: Default::default(),
            }),
        })
    }

    /// Starts (once) the registry's background upkeep: idle upload sessions are dropped
    /// with their data every [`sweep_every`], old outbox events pruned hourly. The loop
    /// runs in the registry's [`crate::background::Background`], holds only a weak
    /// reference, and ends when the registry is dropped. Called by the routers, so anything
    /// that serves the registry has it.
    fn maintain(&self) {
        use std::sync::atomic::Ordering;
        if self.inner.maintained.swap(true, Ordering::SeqCst) {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            self.inner.maintained.store(false, Ordering::SeqCst);
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        self.inner
            .background
            .spawn("registry jobs", watch_jobs(weak));
        let weak = Arc::downgrade(&self.inner);
        self.inner
            .background
            .spawn("registry rates", share_rates(weak));
        let weak = Arc::downgrade(&self.inner);
        let every = sweep_every(&self.inner.limits);
        self.inner.background.spawn("registry upkeep", async move {
            let mut last_prune = std::time::Instant::now();
            let mut last_retention: Option<std::time::Instant> = None;
            loop {
                tokio::time::sleep(every).await;
                let Some(state) = weak.upgrade() else { return };
                blobs::sweep(&Registry {
                    inner: state.clone(),
                })
                .await;
                // Sessions are each server's own; the rest is done once, by the leader.
                if !state.leads() {
                    continue;
                }
                if state.peer.get().is_some() {
                    // Sessions whose server died holding them, and their checkpoints.
                    let (store, idle) = (state.store.clone(), state.limits.upload_idle);
                    let before = std::time::SystemTime::now() - idle * 2;
                    match tokio::task::spawn_blocking(move || store.expire_uploads(before)).await {
                        Ok(Ok(0)) | Err(_) => {}
                        Ok(Ok(n)) => {
                            tracing::info!(sessions = n, "abandoned upload sessions removed")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "removing abandoned upload sessions")
                        }
                    }
                }
                if last_prune.elapsed() >= OUTBOX_PRUNE_EVERY {
                    last_prune = std::time::Instant::now();
                    let store = state.store.clone();
                    let _ = tokio::task::spawn_blocking(move || prune_outbox(&store)).await;
                }
                if last_retention.is_none_or(|t| t.elapsed() >= RETENTION_EVERY) {
                    last_retention = Some(std::time::Instant::now());
                    apply_retention(Registry { inner: state }).await;
                }
            }
        });
    }

    /// The registry's store.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// Serves as one of several servers sharing this registry, reachable by the others at
    /// `url`: an upload session begun here is recorded with it, and a request for one
    /// held by another server is sent there through `http` (so a client need not stay on
    /// one server for a blob). While `leading` says another server leads, this one leaves
    /// the registry's jobs, retention and outbox pruning to it. Set once.
    pub fn share_as(
        &self,
        url: String,
        http: reqwest::Client,
        leading: tokio::sync::watch::Receiver<bool>,
    ) {
        let me = format!("{url}#{}", uuid::Uuid::new_v4().simple());
        let _ = self.inner.peer.set(Peer {
            url,
            me,
            http,
            leading,
        });
    }

    /// Push/delete events; a slow receiver loses the oldest (see `broadcast`).
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.events.subscribe()
    }

    pub async fn repositories(&self) -> Result<Vec<String>, RegistryError> {
        let s = self.inner.store.clone();
        Ok(tokio::task::spawn_blocking(move || s.list_repositories(None, None)).await??)
    }

    /// None if the repository does not exist.
    pub async fn tags(&self, repo: &str) -> Result<Option<Vec<String>>, RegistryError> {
        let s = self.inner.store.clone();
        let repo = repo.to_string();
        Ok(tokio::task::spawn_blocking(move || s.list_tags(&repo, None, None)).await??)
    }

    /// None if the repository does not exist.
    pub async fn manifests(&self, repo: &str) -> Result<Option<Vec<ManifestInfo>>, RegistryError> {
        let s = self.inner.store.clone();
        let repo = repo.to_string();
        Ok(tokio::task::spawn_blocking(move || s.list_manifests(&repo)).await??)
    }

    /// Resolve a tag or digest in `repo` to `(digest, media_type)`; None if unknown.
    /// (For the base-image trigger: "what does `repo:tag` point to now?")
    pub async fn resolve(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<(String, String)>, RegistryError> {
        let r = if reference.contains(':') {
            crate::store::Reference::Digest(reference.to_string())
        } else {
            crate::store::Reference::Tag(reference.to_string())
        };
        let s = self.inner.store.clone();
        let repo = repo.to_string();
        let row = tokio::task::spawn_blocking(move || s.get_manifest(&repo, &r)).await??;
        Ok(row.map(|m| (m.digest, m.media_type)))
    }

    /// Points `repo:tag` at a manifest the registry holds (`content` as stored), with
    /// its push event made in `ctx` (geo-replication's settling of a tag).
    pub(crate) async fn tag_manifest(
        &self,
        repo: &str,
        tag: &str,
        content: &[u8],
        media_type: &str,
        ctx: RequestContext,
    ) -> Result<(), errors::ApiError> {
        let reference = crate::store::Reference::Tag(tag.to_string());
        manifests::store_manifest(self, repo, &reference, content, Some(media_type), ctx)
            .await
            .map(|_| ())
    }

    /// Events with the request that raised them (see [`RequestContext`]).
    pub fn subscribe_with_context(&self) -> broadcast::Receiver<(RegistryEvent, RequestContext)> {
        self.inner.detailed.subscribe()
    }

    /// Tells live subscribers about events already committed to the outbox.
    pub(crate) fn announce(&self, events: Vec<StoredEvent>) {
        for e in events {
            // No receivers is normal (nothing subscribed yet).
            let _ = self.inner.detailed.send((e.event.clone(), e.context));
            let _ = self.inner.events.send(e.event);
        }
    }

    /// Outbox events after `seq`, oldest first (unreadable entries are skipped).
    pub async fn events_after(
        &self,
        seq: i64,
        limit: usize,
    ) -> Result<Vec<(i64, StoredEvent)>, RegistryError> {
        let s = self.inner.store.clone();
        let rows = tokio::task::spawn_blocking(move || s.outbox_after(seq, limit)).await??;
        Ok(rows
            .into_iter()
            .filter_map(|(n, p)| match serde_json::from_str(&p) {
                Ok(e) => Some((n, e)),
                Err(err) => {
                    tracing::error!(seq = n, error = %err, "unreadable outbox entry skipped");
                    None
                }
            })
            .collect())
    }

    /// The newest outbox sequence number: where a consumer with no cursor starts.
    pub async fn last_event_seq(&self) -> Result<i64, RegistryError> {
        let s = self.inner.store.clone();
        Ok(tokio::task::spawn_blocking(move || s.outbox_last()).await??)
    }
}

/// The registry's routes (`/v2/...`), ready to serve or nest.
pub fn router(registry: Registry) -> axum::Router {
    registry.maintain();
    routes::router(registry)
}

/// The registry's routes with access control: every `/v2/` request needs a bearer token
/// granting its action (see `auth`), and `/oauth2/token` issues them. `None` = open, as
/// [`router`]. Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so the
/// token endpoint's rate limit sees client addresses.
pub fn router_with_auth(registry: Registry, auth: Option<Arc<crate::auth::Auth>>) -> axum::Router {
    registry.maintain();
    match auth {
        Some(a) => {
            match registry.store().properties() {
                Ok(p) => a.set_stored_anonymous_pull(p.anonymous_pull),
                Err(e) => tracing::error!(error = %e, "reading the registry's settings"),
            }
            routes::router_with_auth(registry, a)
        }
        None => routes::router(registry),
    }
}

/// The route a registry path addresses, as a metrics label (bounded: never a repository
/// name).
pub fn route_label(path: &str) -> &'static str {
    use names::{parse_acr_route, parse_route, Route};
    if path == "/v2/" || path == "/v2" {
        return "base";
    }
    let route = if let Some(rest) = path.strip_prefix("/v2/") {
        parse_route(rest)
    } else if let Some(rest) = path.strip_prefix("/acr/v1/") {
        parse_acr_route(rest)
    } else if path.starts_with("/oauth2/") || path.starts_with("/token") {
        return "token";
    } else {
        return "other";
    };
    match route {
        Some(Route::Catalog) => "catalog",
        Some(Route::Tags(_)) => "tags",
        Some(Route::Manifest(..)) => "manifest",
        Some(Route::Blob(..)) => "blob",
        Some(Route::UploadStart(_)) => "upload_start",
        Some(Route::Upload(..)) => "upload",
        Some(Route::Referrers(..)) => "referrers",
        Some(Route::AcrTags(_) | Route::AcrTag(..)) => "acr_tags",
        Some(Route::AcrManifests(_) | Route::AcrManifest(..)) => "acr_manifests",
        None => "unknown",
    }
}

/// How long a stopping registry lets in-flight requests run.
const REQUESTS_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

pub struct RunningRegistry {
    addr: SocketAddr,
    registry: Registry,
    /// The listener; stopping it lets in-flight requests finish.
    background: crate::background::Background,
}

impl RunningRegistry {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Stop accepting, let in-flight requests finish, and return.
    pub async fn shutdown(self) {
        self.background.shutdown(REQUESTS_GRACE).await;
    }
}

/// Open the store and serve the registry on `cfg.listen` in a background task.
pub async fn start(cfg: RegistryConfig) -> Result<RunningRegistry, RegistryError> {
    start_with_auth(cfg, None).await
}

/// [`start`], with access control when `auth` is given (see [`router_with_auth`]).
pub async fn start_with_auth(
    cfg: RegistryConfig,
    auth: Option<Arc<crate::auth::Auth>>,
) -> Result<RunningRegistry, RegistryError> {
    let (dir, place) = (cfg.data_dir.clone(), cfg.meta.clone());
    let limits = cfg.limits.clone();
    let registry =
        tokio::task::spawn_blocking(move || Registry::open_at(&dir, limits, &place)).await??;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| RegistryError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| RegistryError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let background = crate::background::Background::new();
    let stop = background.token();
    let names = Arc::new(crate::listen::HostNames::new(&cfg.server_names));
    let app = router_with_auth(registry.clone(), auth).layer(axum::middleware::from_fn_with_state(
        names,
        crate::listen::check_host,
    ));
    let (tls, connections) = (cfg.tls, cfg.connections);
    background.spawn_graceful(async move {
        let serve = crate::listen::serve_with(listener, app, tls, connections, async move {
            stop.cancelled().await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "registry server stopped");
        }
    });
    tracing::info!(%addr, "registry listening");
    Ok(RunningRegistry {
        addr,
        registry,
        background,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// Servers sharing a registry leave its jobs to the leader: sealing what is stored
    /// waits while another server leads, starts as soon as this one does, stops when it
    /// no longer does, and goes on when it leads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_leading_server_runs_the_registry_jobs() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        // A registry made before encryption at rest, holding blobs to seal, slowly.
        let place = crate::store::MetaPlace::Directory;
        crate::store::first_start(dir.path(), &place, None, None, false).unwrap();
        let limits = RegistryLimits {
            job_pace: Duration::from_millis(300),
            ..Default::default()
        };
        let reg = Registry::open_with(dir.path(), limits).unwrap();
        let store = reg.store().clone();
        for i in 0..8 {
            let data = format!("blob {i}, stored before encryption");
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
            let up = store.begin_upload().unwrap();
            up.write_at(data.as_bytes(), 0).unwrap();
            store
                .commit_blob(
                    "app",
                    up.as_ref(),
                    &digest,
                    data.len() as u64,
                    &crate::store::admit_all,
                )
                .unwrap();
        }
        let (lead, leading) = tokio::sync::watch::channel(false);
        reg.share_as("http://127.0.0.1:1".into(), reqwest::Client::new(), leading);
        let _app = router(reg.clone());
        store.enable_encryption().unwrap();
        let state = || {
            let e = store.properties().unwrap().encryption.unwrap();
            (
                e.pending(),
                e.progress.map_or(0, |p| p.objects_done),
                e.error,
            )
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            state(),
            (true, 0, None),
            "a server that does not lead sealed"
        );
        lead.send_replace(true);
        let start = Instant::now();
        while state().1 < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no sealing began"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lead.send_replace(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stopped = state();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            state(),
            stopped,
            "the job went on after leadership was lost"
        );
        assert!(stopped.0 && stopped.2.is_none(), "{stopped:?}");
        lead.send_replace(true);
        let start = Instant::now();
        while state().0 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the leading server did not seal the store"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
