//! The registry's metadata behind one trait: repositories, blob rows and their links,
//! manifests with their references and tags, and the event outbox. SQLite
//! ([`super::SqliteMeta`]) or PostgreSQL ([`super::postgres::PgMeta`]), behind it without
//! the registry, the CLI or gc knowing which. The types here are plain data; every call
//! blocks (async callers run them in `spawn_blocking`).
//!
//! What a backend promises: each call is one transaction (a change and the outbox rows
//! that describe it commit together or not at all); the callbacks given to a call run
//! inside its transaction, under the backend's write lock, so what they check about the
//! blob storage holds when the rows commit (gc stages removals under that same lock).

use serde::Serialize;

use super::{BlobStorage, FsckIssue, GcReport, StoreError};

/// Registry metadata: what [`super::Store`] reads and changes besides blob bytes.
pub trait RegistryMeta: Send + Sync {
    /// The size of a blob row (any repository).
    fn blob_size(&self, digest: &str) -> Result<Option<u64>, StoreError>;
    /// The size of a blob if it is linked to `repo`.
    fn blob_in_repo(&self, repo: &str, digest: &str) -> Result<Option<u64>, StoreError>;
    /// Link `digest` into `repo` in one transaction. Without a row for it, one is made
    /// with `new_size` (`None`: nothing is linked, false). `content` is asked first,
    /// under the write lock, to make sure the bytes are there (false: nothing changes).
    ///
    /// When the link makes the blob count towards the storage used (no repository linked
    /// it), `admit` is asked first with the bytes used and the blob's size.
    fn link_blob(
        &self,
        repo: &str,
        digest: &str,
        new_size: Option<u64>,
        admit: Admit<'_>,
        content: &mut dyn FnMut() -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError>;
    /// Link `digest` into `repo` if `from` has it (a cross-repository mount).
    fn mount_blob(&self, repo: &str, from: &str, digest: &str) -> Result<bool, StoreError>;
    /// Forget `digest` in `repo`. False if it was not linked.
    fn unlink_blob(&self, repo: &str, digest: &str) -> Result<bool, StoreError>;

    /// Store a manifest (and its tag) after checking, in the same transaction, that every
    /// blob and child manifest it references is in the repository with the declared size.
    /// `events` go to the outbox in that transaction.
    /// A new manifest row is first offered to `admit` (bytes used, its size).
    fn put_manifest(
        &self,
        m: &NewManifest,
        events: &[String],
        admit: Admit<'_>,
    ) -> Result<(), StoreError>;
    fn get_manifest(
        &self,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<ManifestRow>, StoreError>;
    /// Delete a manifest by digest with the tags that point to it; `events` makes the
    /// outbox rows from what was deleted, in the same transaction.
    fn delete_manifest(
        &self,
        repo: &str,
        digest: &str,
        events: &mut dyn FnMut(&ManifestRow, &[String]) -> Vec<String>,
    ) -> Result<Option<(ManifestRow, Vec<String>)>, StoreError>;
    /// Delete one tag (the manifest stays); `events` makes the outbox rows from the
    /// digest it pointed to. Returns that digest.
    fn delete_tag(
        &self,
        repo: &str,
        tag: &str,
        events: &mut dyn FnMut(&str) -> Vec<String>,
    ) -> Result<Option<String>, StoreError>;
    /// Deletes, in one transaction, each tag that still names the digest given with it;
    /// `events` makes each one's outbox rows from the tag and the manifest it named (when
    /// stored). Returns the tags deleted.
    fn delete_tags(
        &self,
        repo: &str,
        tags: &[(String, String)],
        events: TagEvents<'_>,
    ) -> Result<Vec<String>, StoreError>;
    /// Deletes, in order and in one transaction, each manifest nothing names any more (no
    /// tag, no index of the repository, no referrer, and not itself a referrer), checked
    /// as each goes. Returns those deleted.
    fn delete_unreferenced(
        &self,
        repo: &str,
        digests: &[String],
        events: &mut dyn FnMut(&ManifestRow) -> Vec<String>,
    ) -> Result<Vec<String>, StoreError>;
    /// The locks of `repo`: its own (tag `None`) and its tags', those not fully enabled.
    fn locks(&self, repo: &str) -> Result<Vec<Lock>, StoreError>;
    /// Sets the attributes of `repo` (tag `None`) or of one of its tags (false: no such
    /// repository or tag); all enabled removes the lock.
    fn set_lock(&self, repo: &str, tag: Option<&str>, a: Attributes) -> Result<bool, StoreError>;
    /// Delete what is left of a repository: tags, manifests, blob links, its name.
    fn delete_repository(&self, repo: &str) -> Result<bool, StoreError>;
    fn repository_exists(&self, repo: &str) -> Result<bool, StoreError>;
    /// Tags of `repo` in lexical order after `last`, at most `n`; `None` if it is unknown.
    fn list_tags(
        &self,
        repo: &str,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Option<Vec<String>>, StoreError>;
    /// Repository names in lexical order after `last`, at most `n`.
    fn list_repositories(
        &self,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Vec<String>, StoreError>;
    /// Every manifest of `repo` with its tags, newest first; `None` if it is unknown.
    fn list_manifests(&self, repo: &str) -> Result<Option<Vec<ManifestInfo>>, StoreError>;
    /// Manifests in `repo` whose `subject` is `digest`, by digest.
    fn referrers(&self, repo: &str, digest: &str) -> Result<Vec<ManifestRow>, StoreError>;
    /// A repository's tags and manifests with what names what (no content): what a purge
    /// plans from. `None` if it is unknown.
    fn repo_view(&self, repo: &str) -> Result<Option<RepoView>, StoreError>;

    /// Outbox entries after `seq`, oldest first: `(seq, payload)`.
    fn outbox_after(&self, seq: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError>;
    /// The newest outbox sequence number (0 when empty).
    fn outbox_last(&self) -> Result<i64, StoreError>;
    /// Forget outbox entries created before Unix second `before`, but the newest: its
    /// number says how far the outbox went, so a consumer whose cursor is behind the
    /// first entry left can tell that events it had not read were pruned.
    fn outbox_prune(&self, before: i64) -> Result<usize, StoreError>;

    /// Garbage collection under the write lock: rows unreferenced since before Unix
    /// second `cutoff` go, and their content (and content no row names, stored before
    /// `cutoff`) is staged for removal in `blobs`, finished only after the commit. A dry
    /// run changes nothing and reports what would go.
    fn gc(
        &self,
        cutoff: i64,
        dry_run: bool,
        blobs: &dyn BlobStorage,
    ) -> Result<GcReport, StoreError>;
    /// Everything fsck checks against the content, and the rows that point nowhere.
    fn audit(&self) -> Result<Audit, StoreError>;

    /// Up to `limit` manifests as stored (content as kept, sealed or not) after
    /// `(repo, digest)`, in that order: what sealing and key rotation walk.
    fn manifest_contents(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError>;
    /// Replaces a manifest's stored bytes if they are still `was` (false otherwise): the
    /// same content sealed, or sealed under another key.
    fn replace_manifest_content(
        &self,
        repo: &str,
        digest: &str,
        was: &[u8],
        now: &[u8],
    ) -> Result<bool, StoreError>;

    /// Bytes stored: every blob some repository links, once, and every manifest row.
    fn storage_used(&self) -> Result<u64, StoreError>;
    /// The registry's settings (JSON; `None` before any were set).
    fn properties(&self) -> Result<Option<String>, StoreError>;
    /// Changes the settings in one transaction under the write lock: `change` gets the
    /// current ones and the bytes stored and returns the new ones (or refuses).
    fn set_properties(&self, change: ChangeProperties<'_>) -> Result<String, StoreError>;
}

/// The managed store's own metadata: [`RegistryMeta`] with the data keys of sealed blobs,
/// and what the store asks of it besides. SQLite in the registry directory
/// ([`super::SqliteMeta`]) or PostgreSQL shared by a server's replicas
/// ([`super::postgres::PgMeta`]).
pub trait ManagedMeta: RegistryMeta + super::crypt::KeyIndex {
    /// Appends events to the outbox on their own (for a backend whose change cannot share
    /// this database's transaction: a Classic registry's tree).
    fn append_outbox(&self, events: &[String]) -> Result<(), StoreError>;
    /// Leaves no earlier version of what was replaced where it could be read back (sealing
    /// in place); a no-op where nothing is kept.
    fn checkpoint(&self) -> Result<(), StoreError>;
    /// The registry's id when several servers share this metadata (it claims the object
    /// storage prefix); `None` for one server's own, whose id is a file of its directory.
    fn shared_id(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    /// Where a key ring acr-task keeps for the registry lives when it is not the registry
    /// directory's key file (`None`): its text, if made, and a name for messages.
    fn key_ring(&self) -> Result<Option<KeyRingText>, StoreError> {
        Ok(None)
    }
    /// Keeps a key ring where [`Self::key_ring`] finds it (false: rings are not kept
    /// here but in the registry directory); unless `replace`, one made first (by another
    /// server) stays.
    fn put_key_ring(&self, _text: &str, _replace: bool) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Records that upload session `id` of `repo` is held by the server reachable at
    /// `owner` (servers sharing the registry send its requests there); nothing elsewhere.
    fn put_upload(&self, _id: &str, _repo: &str, _owner: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Which server holds upload session `id` of `repo`, if one was recorded.
    fn upload_owner(&self, _id: &str, _repo: &str) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    /// Forgets upload session `id` held by `owner` (finished, cancelled, expired, or its
    /// server gone): whether it was `owner`'s, another server's now (it took the session
    /// over), or not there.
    fn forget_upload(&self, _id: &str, _owner: &str) -> Result<UploadRow, StoreError> {
        Ok(UploadRow::Mine)
    }
    /// Saves where upload session `id` stands (`size` bytes, the blob storage's checkpoint
    /// `state`) if `owner` holds it: whether it did, another server took it over, or its
    /// row is gone (expired, its checkpoint with it).
    fn save_upload(
        &self,
        _id: &str,
        _owner: &str,
        _size: u64,
        _state: &str,
    ) -> Result<UploadRow, StoreError> {
        Ok(UploadRow::Mine)
    }
    /// The size and checkpoint saved for upload session `id` of `repo` held by `owner`
    /// (`None` for the checkpoint of a session that has none yet: empty).
    fn upload_state(
        &self,
        _id: &str,
        _repo: &str,
        _owner: &str,
    ) -> Result<Option<(u64, Option<String>)>, StoreError> {
        Ok(None)
    }
    /// Moves upload session `id` from `from` to `to` if it still stands at `state` (a
    /// server carrying it on has resumed it from there); false when another server moved
    /// it first or it changed.
    fn move_upload(
        &self,
        _id: &str,
        _from: &str,
        _to: &str,
        _state: Option<&str>,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Marks the sessions `ids` that `owner` holds as in use now (a long request keeps
    /// its session from being taken for abandoned).
    fn touch_uploads(&self, _owner: &str, _ids: &[String]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Forgets the sessions no request touched since `before` (Unix seconds): the
    /// checkpoints of those saved, for their blob storage to remove.
    fn expire_uploads(&self, _before: i64) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    /// Adds this server's read and write operations since its last call to the
    /// registry's running totals and returns them (servers sharing the registry hold its
    /// tier's rates together); `None` for one server's own.
    fn count_ops(&self, _reads: u64, _writes: u64) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(None)
    }
}

/// Who holds an upload session's row, as a change conditioned on its holder found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadRow {
    /// The server asking: the change was made.
    Mine,
    /// Another server: it took the session over.
    Moved,
    /// No one: the row is gone.
    Missing,
}

/// A key ring kept in a registry's metadata.
#[derive(Debug, Clone)]
pub struct KeyRingText {
    pub text: Option<String>,
    /// Where it is, in words.
    pub place: String,
}

/// A manifest's descriptor against what is stored: present, with the size declared (a
/// size that disagrees would make every pull of the manifest fail, or read past the blob).
pub(crate) fn check_descriptor(d: &Descriptor, stored: Option<u64>) -> Result<(), StoreError> {
    match stored {
        None => Err(StoreError::MissingRef(d.digest.clone())),
        Some(actual) if actual != d.size => Err(StoreError::SizeMismatch {
            digest: d.digest.clone(),
            declared: d.size,
            actual,
        }),
        Some(_) => Ok(()),
    }
}

/// What a change does to the repository and tags it touches, for their locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Touch {
    /// A push: to the repository, or over the tags.
    Write,
    Delete,
}

/// Which tags a change touches, for their locks.
pub(crate) enum Tags<'a> {
    These(&'a [&'a str]),
    /// The tags naming `digest`, or an index that (at any depth) names it.
    Naming(&'a str),
    All,
}

/// What the locks of `repo` (`(tag, write-enabled, delete-enabled)`, tag `""` for the
/// repository's own) say of a change touching `touched` tags: the first that forbids it.
pub(crate) fn lock_refusal(
    repo: &str,
    locks: &[(String, bool, bool)],
    touched: &[String],
    touch: Touch,
) -> Result<(), StoreError> {
    for (tag, write, delete) in locks {
        if !tag.is_empty() && !touched.contains(tag) {
            continue;
        }
        let attribute = if !write {
            "write-enabled"
        } else if touch == Touch::Delete && !delete {
            "delete-enabled"
        } else {
            continue;
        };
        let tag = (!tag.is_empty()).then_some(tag.as_str());
        return Err(crate::tier::LimitError::locked(repo, tag, attribute).into());
    }
    Ok(())
}

/// Makes the new settings (JSON) from the current ones and the bytes stored, or refuses.
pub type ChangeProperties<'a> = &'a mut dyn FnMut(Option<&str>, u64) -> Result<String, StoreError>;

/// Asked before a change adds to the storage used: `(bytes used now, bytes it adds)`;
/// an error refuses the change and nothing of it is written.
pub type Admit<'a> = &'a dyn Fn(u64, u64) -> Result<(), StoreError>;

/// Lets everything in (maintenance, tests).
pub fn admit_all(_used: u64, _adds: u64) -> Result<(), StoreError> {
    Ok(())
}

/// The metadata side of fsck.
#[derive(Debug, Default)]
pub struct Audit {
    /// Every blob row: digest and recorded size.
    pub blobs: Vec<(String, u64)>,
    /// Every manifest: repository, digest, content.
    pub manifests: Vec<(String, String, Vec<u8>)>,
    pub tags: usize,
    /// References, tags and links to rows that do not exist.
    pub dangling: Vec<FsckIssue>,
}

/// A manifest reference from a URL: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(String),
}

/// Makes the outbox rows of a tag's delete from the tag, the digest it named and that
/// manifest's row (when stored).
pub type TagEvents<'a> = &'a mut dyn FnMut(&str, &str, Option<&ManifestRow>) -> Vec<String>;

/// ACR's changeable attributes of a repository or a tag: a lock is one set to false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attributes {
    /// Pushes (to the repository, or over the tag) and deletes allowed.
    pub write_enabled: bool,
    /// Deletes allowed.
    pub delete_enabled: bool,
}

impl Default for Attributes {
    fn default() -> Self {
        Attributes {
            write_enabled: true,
            delete_enabled: true,
        }
    }
}

/// A lock on a repository (`tag` None) or on one of its tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lock {
    pub tag: Option<String>,
    pub attributes: Attributes,
}

/// A repository's tags and manifests as a purge sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoView {
    pub tags: Vec<TagRow>,
    pub manifests: Vec<ManifestBrief>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRow {
    pub tag: String,
    pub digest: String,
    /// Unix seconds of the tag's last push.
    pub updated: i64,
}

/// A manifest without its content: when it came, what it refers to, what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestBrief {
    pub digest: String,
    pub created: i64,
    pub subject: Option<String>,
    /// The manifests an index names.
    pub children: Vec<String>,
}

/// A stored manifest with its raw bytes.
#[derive(Debug, Clone)]
pub struct ManifestRow {
    pub digest: String,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub subject: Option<String>,
    pub size: u64,
    pub content: Vec<u8>,
    pub created: i64,
}

/// A manifest as listed by `repository show-manifests`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestInfo {
    pub digest: String,
    pub media_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub size: u64,
    /// Unix seconds.
    #[serde(with = "crate::timefmt::secs")]
    pub created: i64,
    pub tags: Vec<String>,
}

/// Content a manifest points at: its digest and the size the manifest declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: String,
    pub size: u64,
}

/// A manifest to store, already parsed and validated by the registry.
#[derive(Debug, Clone)]
pub struct NewManifest {
    pub repo: String,
    pub digest: String,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub subject: Option<String>,
    pub content: Vec<u8>,
    /// Blobs (config, layers) that must be linked to the repository, with the sizes the
    /// manifest declares for them.
    pub blobs: Vec<Descriptor>,
    /// Child manifests (of an index) that must be in the repository, with declared sizes.
    pub children: Vec<Descriptor>,
    pub tag: Option<String>,
    /// The bytes to keep instead of `content` (sealed at rest); `content` stays what is
    /// served and what the size counts.
    pub sealed: Option<Vec<u8>>,
}
