//! The registry's storage: content-addressed blob files plus an SQLite metadata database.
//!
//! Layout under the data dir:
//! - `blobs/<algorithm>/ab/abcdef...` — committed blobs, named by digest (`sha256`, or
//!   `sha512` for content a client named so);
//! - `uploads/` — blobs being received (invisible until committed);
//! - `trash/` — blobs that gc is removing (moved back on restart if the removal never committed);
//! - `meta.db` — repositories, tags, manifests, their references, blob links.
//!
//! Blob bytes go through [`BlobStorage`] (the files above, [`FsBlobs`]); the metadata
//! through [`RegistryMeta`] (`meta.db`, [`SqliteMeta`]). [`Store`] joins the two: it is
//! where the order between content and rows is kept, whatever the backends.
//!
//! All calls block (file I/O, SQLite); async callers run them in `spawn_blocking`.

mod blobs;
pub mod classic;
pub mod crypt;
pub mod encrypted;
pub mod encryption;
mod maint;
mod meta;
pub mod migrate;
pub mod postgres;
pub mod s3;
mod sqlite;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::tier::Sku;

pub use blobs::{BlobStorage, BlobUpload, FsBlobs, Staged};
pub use maint::{FsckIssue, FsckReport, GcReport, KeptByGrace};
pub use meta::{
    admit_all, Admit, Attributes, Audit, Descriptor, Lock, ManagedMeta, ManifestBrief,
    ManifestInfo, ManifestRow, NewManifest, Reference, RegistryMeta, RepoView, TagRow, UploadRow,
};
pub use sqlite::{configure as configure_sqlite, SqliteMeta};

/// Errors from the store. `MissingRef` is a client error (a manifest names something absent).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    #[error("registry database: {0}")]
    Pg(crate::pg::PgError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("referenced content is missing: {0}")]
    MissingRef(String),
    #[error("{digest} is declared as {declared} bytes but is {actual} bytes")]
    SizeMismatch {
        digest: String,
        declared: u64,
        actual: u64,
    },
    #[error("blob {0} is not in the store")]
    BlobMissing(String),
    #[error("store lock poisoned")]
    Poisoned,
    #[error("{0} is in use by another acr-task process serving it: use that registry (--registry HOST:PORT) or another --data")]
    InUse(PathBuf),
    /// A tier's limit refused the change.
    #[error(transparent)]
    Limit(#[from] crate::tier::LimitError),
    #[error("the registry's settings in its metadata are not readable ({0}): restore meta.db from a backup")]
    Properties(String),
    /// Stored content that is not what its name says (Classic storage damaged outside).
    #[error("{0}")]
    Corrupt(String),
    /// A setting that cannot be taken, in the user's words.
    #[error("{0}")]
    Refused(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Unix seconds now: the clock of every row's `created`, gc's cutoff and the outbox's age.
pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub struct Store {
    root: PathBuf,
    /// The managed store in `root`: what serves, or the target of a Classic registry's
    /// upgrade while the Classic directory serves. Replaced whole when encryption is
    /// enabled.
    managed: RwLock<Arc<Backends>>,
    /// The managed metadata itself (under the layers): settings, keys, and what the
    /// encryption jobs walk.
    side: Arc<dyn ManagedMeta>,
    /// The encrypting layers of the managed store, when it is encrypted.
    crypto: RwLock<Option<encryption::Crypto>>,
    /// The Classic directory's backends while they serve (until the upgrade completes).
    classic: RwLock<Option<ClassicServing>>,
    /// The settings as last read, and when: re-read at most once a second, so a change
    /// another process made (`registry update` on the files) applies within a second.
    properties: std::sync::RwLock<Option<(std::time::Instant, crate::tier::Properties)>>,
    /// The serving process's lock on the data dir (`None` for maintenance opens).
    _owner: Option<fs::File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

impl Store {
    /// Open (creating if needed) the store at `root`. `recover` is for the serving process only:
    /// it clears abandoned uploads and finishes or rolls back an interrupted gc. Tools that run
    /// beside a live server (fsck, repository list) pass `false`.
    pub fn open(root: &Path, recover: bool) -> Result<Store, StoreError> {
        Store::open_at(root, recover, &MetaPlace::Directory)
    }

    /// [`Store::open`] with the metadata where `place` says.
    pub fn open_at(root: &Path, recover: bool, place: &MetaPlace) -> Result<Store, StoreError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        // One serving process per data dir: recovery clears `uploads/`, which would destroy
        // another server's sessions in flight.
        let owner = if recover {
            Some(lock_exclusive(root)?)
        } else {
            None
        };
        let side = open_side(root, place)?;
        if side.properties()?.is_none() && holds_nothing(side.as_ref())? {
            // A new registry: its settings, with encryption at rest from the start.
            let first = initial_properties(root, side.as_ref(), Sku::Premium, true)?;
            write_properties(side.as_ref(), &first, false)?;
        }
        let props = parse_properties(side.properties()?.as_deref())?;
        let (managed, crypto) = encryption::managed_backends(
            root,
            &side,
            props.encryption.as_ref(),
            props.object_storage.as_deref(),
        )?;
        let classic = match (&props.sku, &props.classic) {
            (Sku::Classic, Some(c)) => {
                let meta = Arc::new(classic::ClassicMeta::open(&c.storage, side.clone())?);
                Some(ClassicServing {
                    backends: Arc::new(Backends {
                        blobs: Arc::new(FsBlobs::distribution(&c.storage)?),
                        meta: meta.clone(),
                    }),
                    meta,
                })
            }
            _ => None,
        };
        let store = Store {
            root: root.to_path_buf(),
            managed: RwLock::new(managed),
            side,
            crypto: RwLock::new(crypto),
            classic: RwLock::new(classic),
            properties: std::sync::RwLock::new(None),
            _owner: owner,
        };
        if recover {
            store.recover()?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// See [`ManagedMeta::put_upload`].
    pub fn record_upload(&self, id: &str, repo: &str, owner: &str) -> Result<(), StoreError> {
        self.side.put_upload(id, repo, owner)
    }

    /// See [`ManagedMeta::upload_owner`].
    pub fn upload_owner(&self, id: &str, repo: &str) -> Result<Option<String>, StoreError> {
        self.side.upload_owner(id, repo)
    }

    /// See [`ManagedMeta::forget_upload`].
    pub fn forget_upload(&self, id: &str, owner: &str) -> Result<UploadRow, StoreError> {
        self.side.forget_upload(id, owner)
    }

    /// See [`ManagedMeta::save_upload`].
    pub fn save_upload(
        &self,
        id: &str,
        owner: &str,
        size: u64,
        state: &str,
    ) -> Result<UploadRow, StoreError> {
        self.side.save_upload(id, owner, size, state)
    }

    /// See [`ManagedMeta::touch_uploads`].
    pub fn touch_uploads(&self, owner: &str, ids: &[String]) -> Result<(), StoreError> {
        self.side.touch_uploads(owner, ids)
    }

    /// Takes upload session `id` of `repo` over from `from`, a server gone, for `to`: the
    /// upload carried on from its checkpoint (a new one where the session had none yet),
    /// and its size. `None` where another server took it first, or the blob storage keeps
    /// uploads local. The upload is resumed before the session is moved, so a failure
    /// leaves it to be taken again.
    pub fn take_upload(
        &self,
        id: &str,
        repo: &str,
        from: &str,
        to: &str,
    ) -> Result<Option<Carried>, StoreError> {
        let Some((size, state)) = self.side.upload_state(id, repo, from)? else {
            return Ok(None);
        };
        let up = match &state {
            Some(state) => self.now().blobs.resume(state)?,
            None if size == 0 => Some(self.begin_upload()?),
            None => None,
        };
        let Some(up) = up else {
            return Ok(None);
        };
        // Lost to another server: the upload is dropped, its checkpoint left to that one.
        Ok(self
            .side
            .move_upload(id, from, to, state.as_deref())?
            .then_some((up, size)))
    }

    /// Forgets the shared upload sessions idle since `before` and removes their
    /// checkpoints from the blob storage (their servers died holding them); how many.
    pub fn expire_uploads(&self, before: std::time::SystemTime) -> Result<usize, StoreError> {
        let secs = before
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let states = self.side.expire_uploads(secs)?;
        let blobs = self.now().blobs.clone();
        for state in &states {
            blobs.abandon(state);
        }
        Ok(states.len())
    }

    /// See [`ManagedMeta::count_ops`].
    pub fn count_ops(&self, reads: u64, writes: u64) -> Result<Option<(u64, u64)>, StoreError> {
        self.side.count_ops(reads, writes)
    }

    /// The backends that serve now.
    fn now(&self) -> Arc<Backends> {
        match self.classic.read() {
            Ok(g) => g
                .as_ref()
                .map_or_else(|| self.managed(), |c| c.backends.clone()),
            Err(_) => self.managed(),
        }
    }

    /// The managed store's backends: what serves, or the target of a Classic registry's
    /// upgrade.
    pub fn managed(&self) -> Arc<Backends> {
        match self.managed.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_managed(&self, backends: Arc<Backends>, crypto: Option<encryption::Crypto>) {
        if let Ok(mut g) = self.managed.write() {
            *g = backends;
        }
        if let Ok(mut g) = self.crypto.write() {
            *g = crypto;
        }
    }

    /// Whether a Classic directory serves (the registry is Classic, possibly upgrading).
    pub fn serves_classic(&self) -> bool {
        self.classic.read().is_ok_and(|g| g.is_some())
    }

    /// The Classic directory while it serves (what its upgrade reads): its blob storage
    /// and its tree.
    pub fn classic(&self) -> Option<(Arc<dyn BlobStorage>, Arc<classic::ClassicMeta>)> {
        let g = self.classic.read().ok()?;
        let c = g.as_ref()?;
        Some((c.backends.blobs.clone(), c.meta.clone()))
    }

    /// Ends a Classic registry's upgrade once everything is copied and verified: the tier
    /// becomes the target in one change (under the Classic tree's write lock, so no change
    /// to the tree slips in), and from then on the managed store serves. Pulls in flight
    /// finish from the Classic tree, which is left as it is.
    pub fn complete_upgrade(&self) -> Result<crate::tier::Properties, StoreError> {
        let p = self.update_properties(|p, _| Ok(p.upgraded(now())))?;
        if let Ok(mut g) = self.classic.write() {
            *g = None;
        }
        tracing::info!(sku = %p.sku, "Classic registry upgraded: managed storage serves");
        Ok(p)
    }
}

/// A Classic directory serving: its backends, and its tree for the upgrade.
struct ClassicServing {
    backends: Arc<Backends>,
    meta: Arc<classic::ClassicMeta>,
}

/// Blob storage and metadata that serve together.
pub struct Backends {
    pub blobs: Arc<dyn BlobStorage>,
    pub meta: Arc<dyn RegistryMeta>,
}

/// Where a registry's metadata lives: its directory's `meta.db`, or a PostgreSQL database
/// that the replicas of a server share (`serve --database URL --storage s3://...`: blobs
/// in object storage every replica reaches). A registry directory whose metadata is
/// shared holds [`SHARED_MARKER`], and opens of it as a directory are refused.
#[derive(Clone, Default)]
pub enum MetaPlace {
    #[default]
    Directory,
    Shared(Box<crate::pg::Target>),
}

impl std::fmt::Debug for MetaPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaPlace::Directory => f.write_str("Directory"),
            // Never the password.
            MetaPlace::Shared(t) => write!(f, "Shared({})", t.config.get_dbname().unwrap_or("?")),
        }
    }
}

/// The file that says a registry directory's metadata is in a shared database.
pub const SHARED_MARKER: &str = "meta.shared";

/// The managed metadata where `place` says.
fn open_side(root: &Path, place: &MetaPlace) -> Result<Arc<dyn ManagedMeta>, StoreError> {
    match place {
        MetaPlace::Directory => {
            if root.join(SHARED_MARKER).exists() {
                return Err(StoreError::Refused(format!(
                    "the registry of {} keeps its metadata in the PostgreSQL database its \
                     servers share: go through one of them (--registry HOST:PORT, --server \
                     URL), or give `serve` the same --database and --storage",
                    root.display()
                )));
            }
            Ok(Arc::new(SqliteMeta::open(&root.join("meta.db"))?))
        }
        MetaPlace::Shared(target) => {
            let meta = postgres::PgMeta::open(target)?;
            let marker = root.join(SHARED_MARKER);
            let own = root.join("meta.db");
            if !marker.exists() && own.exists() && !holds_nothing(&SqliteMeta::open(&own)?)? {
                // Its images would silently stop being served.
                return Err(StoreError::Refused(format!(
                    "{} holds a registry of its own: a registry the replicas share (--database \
                     with --storage) needs a data directory without one; give another --data, \
                     and move these images with `acr-task registry relocate` if they are wanted",
                    root.display()
                )));
            }
            if !marker.exists() {
                fs::write(
                    &marker,
                    "the registry's metadata is in a shared PostgreSQL database\n",
                )
                .map_err(io_err(&marker))?;
            }
            Ok(Arc::new(meta))
        }
    }
}

/// The object storage of the registry kept in the database `target` names, if replicas
/// share one there: a replica given the database must be given that storage too, or it
/// would serve a registry of its own beside the shared one.
pub fn shared_registry_storage(target: &crate::pg::Target) -> Result<Option<String>, StoreError> {
    let meta = postgres::PgMeta::open(target)?;
    match meta.properties()? {
        None => Ok(None),
        Some(json) => Ok(parse_properties(Some(&json))?.object_storage),
    }
}

/// What a registry's first start sets, before it is opened: the tier a new registry
/// starts in, and for a Classic one the distribution tree it serves. A registry that has
/// settings keeps them (they change through `registry update`); the note says when what
/// was asked differs from what stays.
pub fn first_start(
    root: &Path,
    place: &MetaPlace,
    sku: Option<Sku>,
    classic_storage: Option<&Path>,
    encrypted: bool,
) -> Result<Option<String>, StoreError> {
    fs::create_dir_all(root).map_err(io_err(root))?;
    if classic_storage.is_some() && matches!(place, MetaPlace::Shared(_)) {
        return Err(StoreError::Refused(
            "a Classic registry serves its own directory: a registry shared through \
             --database is a managed tier"
                .into(),
        ));
    }
    let meta = open_side(root, place)?;
    let meta = meta.as_ref();
    let storage = match classic_storage {
        Some(d) => Some(fs::canonicalize(d).map_err(|e| {
            StoreError::Refused(format!(
                "the Classic storage {} cannot be used ({e}): give the directory that holds \
                 distribution's `docker/registry/v2`",
                d.display()
            ))
        })?),
        None => None,
    };
    let existing = meta.properties()?;
    let Some(json) = existing else {
        let Some(sku) = sku.or((!encrypted).then_some(Sku::Premium)) else {
            return Ok(None);
        };
        if sku == Sku::Classic {
            let Some(storage) = storage else {
                return Err(StoreError::Refused(
                    "a Classic registry needs its storage: --classic-storage DIR".into(),
                ));
            };
            let holds =
                !meta.list_repositories(Some(1), None)?.is_empty() || meta.storage_used()? > 0;
            if holds {
                return Err(crate::tier::LimitError::BackToClassic { from: Sku::Premium }.into());
            }
            let p = crate::tier::Properties {
                classic: Some(crate::tier::Classic {
                    storage,
                    upgrade: None,
                }),
                ..initial_properties(root, meta, Sku::Classic, encrypted)?
            };
            write_properties(meta, &p, true)?;
        } else {
            write_properties(meta, &initial_properties(root, meta, sku, encrypted)?, true)?;
        }
        return Ok(None);
    };
    let p = parse_properties(Some(&json))?;
    let managed_key = p
        .encryption
        .as_ref()
        .is_some_and(|e| e.key_source == crate::tier::KeySource::Managed);
    if managed_key && encryption::customer_key_given() {
        return Err(StoreError::Refused(format!(
            "this registry's key is kept by acr-task ({}): a customer-managed key file is for a \
             new registry; leave --encryption-key-file and {} out",
            root.join(encryption::MANAGED_KEY_FILE).display(),
            encryption::KEY_FILE_ENV
        )));
    }
    let served = p.classic.as_ref().map(|c| c.storage.clone());
    if let (Some(asked), Some(served)) = (&storage, &served) {
        if asked != served {
            return Err(StoreError::Refused(format!(
                "this registry's Classic storage is {}, not {}",
                served.display(),
                asked.display()
            )));
        }
    }
    match (sku, p.sku) {
        (Some(Sku::Classic), Sku::Classic) | (None, _) => Ok(None),
        (Some(Sku::Classic), now) if served.is_some() => Ok(Some(format!(
            "this registry was upgraded from Classic to {now}: it serves managed storage, and \
             the Classic directory is no longer used"
        ))),
        (Some(Sku::Classic), now) => {
            Err(crate::tier::LimitError::BackToClassic { from: now }.into())
        }
        (Some(asked), now) if asked != now => Ok(Some(format!(
            "this registry's tier is {now}: --sku {asked} applies to a new registry only \
             (`acr-task registry update --sku {asked}` changes it)"
        ))),
        _ => Ok(None),
    }
}

/// An upload carried on from another server's checkpoint, and how many bytes it holds.
pub type Carried = (Box<dyn BlobUpload>, u64);

/// `serve --storage URL`: a new registry keeps its blobs there from its first start on (the
/// choice is kept in its settings, so every later open, the CLI's included, finds them); a
/// registry whose blobs are elsewhere refuses (moving blobs between storages is not done
/// here). Call before [`first_start`] and [`Store::open`].
pub fn choose_object_storage(
    root: &Path,
    place: &MetaPlace,
    url: &str,
    sku: Option<Sku>,
    encrypted: bool,
) -> Result<(), StoreError> {
    let at = s3::Location::parse(url)?;
    fs::create_dir_all(root).map_err(io_err(root))?;
    let meta = open_side(root, place)?;
    let meta = meta.as_ref();
    let Some(json) = meta.properties()? else {
        if !holds_nothing(meta)? {
            return Err(StoreError::Refused(format!(
                "{} already holds images in its own directory: --storage is for a new registry",
                root.display()
            )));
        }
        if sku == Some(Sku::Classic) {
            return Err(StoreError::Refused(
                "a Classic registry serves its own directory: --storage is for managed tiers"
                    .into(),
            ));
        }
        let p = crate::tier::Properties {
            object_storage: Some(at.url()),
            ..initial_properties(root, meta, sku.unwrap_or(Sku::Premium), encrypted)?
        };
        return write_properties(meta, &p, true);
    };
    let p = parse_properties(Some(&json))?;
    match p.object_storage {
        Some(there) if there == at.url() => Ok(()),
        Some(there) => Err(StoreError::Refused(format!(
            "this registry keeps its blobs in {there}, not {}",
            at.url()
        ))),
        None => Err(StoreError::Refused(format!(
            "this registry keeps its blobs in {}: --storage is for a new registry",
            root.join("blobs").display()
        ))),
    }
}

/// Writes a registry's settings; unless `over`, settings another process wrote first stay.
fn write_properties(
    meta: &dyn ManagedMeta,
    p: &crate::tier::Properties,
    over: bool,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(p).map_err(|e| StoreError::Properties(e.to_string()))?;
    meta.set_properties(&mut |now, _| match now {
        Some(there) if !over => Ok(there.to_string()),
        _ => Ok(json.clone()),
    })?;
    Ok(())
}

/// A registry's first settings: its tier, and encryption at rest of its managed store
/// with the operator's key or one made now, complete from the start when the store is
/// new (empty). A store that holds content from before (an acr-task without settings)
/// stays as it is until `registry encryption enable` seals it in place.
fn initial_properties(
    root: &Path,
    meta: &dyn ManagedMeta,
    sku: Sku,
    encrypted: bool,
) -> Result<crate::tier::Properties, StoreError> {
    let encryption = if encrypted && holds_nothing(meta)? {
        Some(encryption::new_encryption(root, meta, true)?)
    } else {
        None
    };
    let p = crate::tier::Properties {
        encryption,
        ..crate::tier::Properties::new(sku)
    };
    p.check_key_source()?;
    Ok(p)
}

/// Whether a registry's metadata holds no content (a new registry).
fn holds_nothing(meta: &dyn ManagedMeta) -> Result<bool, StoreError> {
    Ok(meta.list_repositories(Some(1), None)?.is_empty() && meta.storage_used()? == 0)
}

/// Whether a server holds the registry in `root` now (its `serve.lock` is locked).
pub fn held_by_a_server(root: &Path) -> bool {
    if !root.join("serve.lock").exists() {
        return false;
    }
    matches!(lock_exclusive(root), Err(StoreError::InUse(_)))
}

/// An exclusive, non-blocking `flock` on `<root>/serve.lock`, held while the file is open
/// (the kernel drops it when the process dies, so a crash never leaves it stale).
fn lock_exclusive(root: &Path) -> Result<fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    let path = root.join("serve.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock on a file descriptor we own and keep open.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(if err.kind() == std::io::ErrorKind::WouldBlock {
            StoreError::InUse(root.to_path_buf())
        } else {
            io_err(&path)(err)
        });
    }
    Ok(file)
}

impl Store {
    /// A new upload, invisible until [`Store::commit_blob`].
    pub fn begin_upload(&self) -> Result<Box<dyn BlobUpload>, StoreError> {
        self.now().blobs.begin()
    }

    /// Part of a stored blob as a mapped buffer, where the blob storage can map it (see
    /// [`BlobStorage::map`]).
    pub fn blob_map(
        &self,
        digest: &str,
        start: u64,
        len: usize,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        self.now().blobs.map(digest, start, len)
    }

    /// How many bytes a pull asks [`Store::blob_map`] for at a time.
    pub fn blob_map_chunk(&self) -> usize {
        self.now().blobs.map_chunk()
    }

    /// The content of a stored blob from byte `start`. `digest` must already be validated.
    pub fn blob_reader(
        &self,
        digest: &str,
        start: u64,
    ) -> Result<Box<dyn std::io::Read + Send>, StoreError> {
        self.now().blobs.read(digest, start)
    }

    /// Make a received, digest-verified upload a committed blob linked to `repo`.
    ///
    /// Order: the upload becomes durable content (outside the write lock, so concurrent
    /// commits flush in parallel); then, under the write transaction, make sure the content
    /// is still there (a concurrent gc may have staged an older copy's removal) and commit
    /// the row. A crash at any point leaves either nothing visible or a complete blob;
    /// content without a row is invisible until gc.
    pub fn commit_blob(
        &self,
        repo: &str,
        upload: &dyn BlobUpload,
        digest: &str,
        size: u64,
        admit: Admit<'_>,
    ) -> Result<(), StoreError> {
        upload.commit(digest)?;
        let b = self.now();
        b.meta
            .link_blob(repo, digest, Some(size), admit, &mut || {
                if !b.blobs.exists(digest) {
                    upload.commit(digest)?;
                }
                Ok(true)
            })
            .map(drop)?;
        if !upload.sealed() && !self.serves_classic() {
            // Begun before encryption was enabled: sealed now, like everything stored.
            self.seal_late_upload(digest)?;
        }
        Ok(())
    }

    /// Size of a stored blob (in any repository).
    pub fn blob_size(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        self.now().meta.blob_size(digest)
    }

    /// Size of a blob if it is linked to `repo`.
    pub fn blob_in_repo(&self, repo: &str, digest: &str) -> Result<Option<u64>, StoreError> {
        self.now().meta.blob_in_repo(repo, digest)
    }

    /// A URL reading `digest` straight from the object storage for `ttl` (a pull is
    /// redirected there), where the content is there as it is: `None` for blobs on files
    /// or sealed at rest.
    pub fn presign_blob(
        &self,
        digest: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<String>, StoreError> {
        self.now().blobs.presign(digest, ttl)
    }

    /// Why pulls of this registry cannot be redirected to its object storage (`None`:
    /// they can).
    pub fn redirect_refusal(&self) -> Result<Option<String>, StoreError> {
        let p = self.properties()?;
        Ok(if self.serves_classic() || p.object_storage.is_none() {
            Some("the registry's blobs are not in object storage (serve --storage s3://...)".into())
        } else if p.encryption.is_some() {
            Some(
                "the registry is encrypted at rest, and a redirect would hand its sealed bytes \
                 to the client: pulls are streamed through the registry"
                    .into(),
            )
        } else {
            None
        })
    }

    /// Cross-repository mount: link `digest` into `repo` if `from` has it.
    pub fn mount_blob(&self, repo: &str, from: &str, digest: &str) -> Result<bool, StoreError> {
        self.now().meta.mount_blob(repo, from, digest)
    }

    /// Links content the registry already holds into `repo`, from wherever it is (an
    /// import's mount); false if the registry does not hold it (or gc is removing it).
    pub fn link_existing_blob(
        &self,
        repo: &str,
        digest: &str,
        admit: Admit<'_>,
    ) -> Result<bool, StoreError> {
        let b = self.now();
        b.meta.link_blob(repo, digest, None, admit, &mut || {
            Ok(b.blobs.exists(digest))
        })
    }

    /// Remove `digest` from `repo` (the file goes at the next gc). False if it was not linked.
    pub fn unlink_blob(&self, repo: &str, digest: &str) -> Result<bool, StoreError> {
        self.now().meta.unlink_blob(repo, digest)
    }

    /// Store a manifest (and its tag) after checking, in the same transaction, that every
    /// blob and child manifest it references is present in the repository. `events` go to
    /// the outbox in that transaction.
    pub fn put_manifest(
        &self,
        m: &NewManifest,
        events: &[String],
        admit: Admit<'_>,
    ) -> Result<(), StoreError> {
        self.now().meta.put_manifest(m, events, admit)
    }

    /// Bytes stored (every linked blob once, every manifest).
    pub fn storage_used(&self) -> Result<u64, StoreError> {
        self.now().meta.storage_used()
    }

    /// The registry's settings (a registry never set up is [`Properties::default`]).
    ///
    /// [`Properties::default`]: crate::tier::Properties
    pub fn properties(&self) -> Result<crate::tier::Properties, StoreError> {
        if let Some(p) = self.fresh_properties() {
            return Ok(p);
        }
        let p = parse_properties(self.now().meta.properties()?.as_deref())?;
        self.remember(&p);
        Ok(p)
    }

    /// Changes the settings: `change` gets the current ones and the bytes stored, under
    /// the write lock (so no push slips in between the check and the change).
    pub fn update_properties(
        &self,
        mut change: impl FnMut(
            &crate::tier::Properties,
            u64,
        ) -> Result<crate::tier::Properties, StoreError>,
    ) -> Result<crate::tier::Properties, StoreError> {
        let json = self.now().meta.set_properties(&mut |now, used| {
            let next = change(&parse_properties(now)?, used)?;
            serde_json::to_string(&next).map_err(|e| StoreError::Properties(e.to_string()))
        })?;
        let p = parse_properties(Some(&json))?;
        self.remember(&p);
        Ok(p)
    }

    /// The settings without touching the metadata, when they were read within the last
    /// second (for async callers, which read them on a blocking thread otherwise).
    pub fn fresh_properties(&self) -> Option<crate::tier::Properties> {
        const FRESH: std::time::Duration = std::time::Duration::from_secs(1);
        let g = self.properties.read().ok()?;
        let (at, p) = g.as_ref()?;
        (at.elapsed() < FRESH).then(|| p.clone())
    }

    fn remember(&self, p: &crate::tier::Properties) {
        if let Ok(mut g) = self.properties.write() {
            *g = Some((std::time::Instant::now(), p.clone()));
        }
    }

    /// Outbox entries after `seq`, oldest first: `(seq, payload)`.
    pub fn outbox_after(&self, seq: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        self.now().meta.outbox_after(seq, limit)
    }

    /// The newest outbox sequence number (0 when empty).
    pub fn outbox_last(&self) -> Result<i64, StoreError> {
        self.now().meta.outbox_last()
    }

    /// Forgets outbox entries older than `age` (consumers are expected to keep up).
    pub fn outbox_prune(&self, age: std::time::Duration) -> Result<usize, StoreError> {
        self.now()
            .meta
            .outbox_prune(now() - i64::try_from(age.as_secs()).unwrap_or(i64::MAX / 2))
    }

    pub fn get_manifest(
        &self,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<ManifestRow>, StoreError> {
        self.now().meta.get_manifest(repo, reference)
    }

    /// Delete a manifest by digest with the tags that point to it. Returns the removed tags,
    /// or None if the manifest was not there.
    /// `events` makes the outbox payloads from what was deleted, in the same transaction.
    pub fn delete_manifest(
        &self,
        repo: &str,
        digest: &str,
        events: impl FnOnce(&ManifestRow, &[String]) -> Vec<String>,
    ) -> Result<Option<(ManifestRow, Vec<String>)>, StoreError> {
        let mut events = Some(events);
        self.now()
            .meta
            .delete_manifest(repo, digest, &mut |row, tags| {
                events.take().map(|f| f(row, tags)).unwrap_or_default()
            })
    }

    /// Delete one tag; the manifest stays (reachable by digest until gc). Returns the digest.
    /// `events` makes the outbox payloads from the digest the tag pointed to.
    pub fn delete_tag(
        &self,
        repo: &str,
        tag: &str,
        events: impl FnOnce(&str) -> Vec<String>,
    ) -> Result<Option<String>, StoreError> {
        let mut events = Some(events);
        self.now().meta.delete_tag(repo, tag, &mut |digest| {
            events.take().map(|f| f(digest)).unwrap_or_default()
        })
    }

    /// Deletes the tags that still name the digests given with them, in one transaction
    /// (see [`RegistryMeta::delete_tags`]).
    pub fn delete_tags(
        &self,
        repo: &str,
        tags: &[(String, String)],
        events: meta::TagEvents<'_>,
    ) -> Result<Vec<String>, StoreError> {
        self.now().meta.delete_tags(repo, tags, events)
    }

    /// Deletes, in order and in one transaction, the manifests nothing names any more.
    pub fn delete_unreferenced(
        &self,
        repo: &str,
        digests: &[String],
        events: &mut dyn FnMut(&ManifestRow) -> Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        self.now().meta.delete_unreferenced(repo, digests, events)
    }

    /// The locks of `repo` (see [`RegistryMeta::locks`]).
    pub fn locks(&self, repo: &str) -> Result<Vec<Lock>, StoreError> {
        self.now().meta.locks(repo)
    }

    /// Sets a repository's or a tag's attributes; false if there is no such one.
    pub fn set_lock(
        &self,
        repo: &str,
        tag: Option<&str>,
        a: Attributes,
    ) -> Result<bool, StoreError> {
        self.now().meta.set_lock(repo, tag, a)
    }

    /// Delete a whole repository: tags, manifests and blob links. False if unknown.
    pub fn delete_repository(&self, repo: &str) -> Result<bool, StoreError> {
        self.now().meta.delete_repository(repo)
    }

    pub fn repository_exists(&self, repo: &str) -> Result<bool, StoreError> {
        self.now().meta.repository_exists(repo)
    }

    /// Tags of `repo` in lexical order after `last`, at most `n`. None if the repo is unknown.
    pub fn list_tags(
        &self,
        repo: &str,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Option<Vec<String>>, StoreError> {
        self.now().meta.list_tags(repo, n, last)
    }

    /// Repository names in lexical order after `last`, at most `n`.
    pub fn list_repositories(
        &self,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        self.now().meta.list_repositories(n, last)
    }

    /// Every manifest of `repo` with its tags. None if the repo is unknown.
    pub fn list_manifests(&self, repo: &str) -> Result<Option<Vec<ManifestInfo>>, StoreError> {
        self.now().meta.list_manifests(repo)
    }

    /// A repository's tags and manifests, for a purge's plan.
    pub fn repo_view(&self, repo: &str) -> Result<Option<RepoView>, StoreError> {
        self.now().meta.repo_view(repo)
    }

    /// Manifests in `repo` whose `subject` is `digest`.
    pub fn referrers(&self, repo: &str, digest: &str) -> Result<Vec<ManifestRow>, StoreError> {
        self.now().meta.referrers(repo, digest)
    }

    /// Startup recovery: abandoned uploads are dropped (upload sessions live in memory), and
    /// blobs that an interrupted gc staged for removal come back if their row survived.
    fn recover(&self) -> Result<(), StoreError> {
        let b = self.now();
        b.blobs
            .recover(&mut |digest| Ok(b.meta.blob_size(digest)?.is_some()))
    }
}

fn parse_properties(json: Option<&str>) -> Result<crate::tier::Properties, StoreError> {
    match json {
        None => Ok(crate::tier::Properties::default()),
        Some(j) => serde_json::from_str(j).map_err(|e| StoreError::Properties(e.to_string())),
    }
}

/// fsync a directory so that a new entry in it survives power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests;
