//! A Classic registry: a directory the customer owns, in the CNCF distribution filesystem
//! layout (what Debian's `docker-registry` writes), served as it is. Its content and tags
//! live in that tree, so `docker-registry` can read everything pushed here; the registry's
//! own settings and its event outbox stay in our `meta.db` (the side store), which the
//! managed tier keeps after the upgrade.
//!
//! Classic has Classic's limits: no deletes and no gc (the tree is the customer's), and
//! an event is recorded just after the change it describes (the tree and the outbox share
//! no transaction). Content read from the tree is verified: a manifest whose bytes do not
//! hash to its name is an error, never served.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::meta::{Admit, Audit, ChangeProperties, ManifestInfo, ManifestRow, NewManifest};
use super::{io_err, BlobStorage, FsckIssue, GcReport, ManagedMeta, Reference, RegistryMeta};
use super::{sync_dir, StoreError};
use crate::tier::LimitError;

/// The whole tree, in one place (distribution's `registry/storage/paths.go`):
///
/// ```text
/// <root>/docker/registry/v2/
///   blobs/<alg>/<first 2 hex>/<hex>/data                 content, manifests included
///   repositories/<name>/
///     _layers/<alg>/<hex>/link                           a blob linked into the repository
///     _manifests/revisions/<alg>/<hex>/link              a manifest of the repository
///     _manifests/tags/<tag>/current/link                 what the tag points at
///     _manifests/tags/<tag>/index/<alg>/<hex>/link       every digest the tag pointed at
///     _uploads/<id>/...                                  distribution's uploads (not ours)
/// ```
///
/// A `link` file holds a digest (`sha256:<hex>`), nothing else.
#[derive(Debug, Clone)]
pub struct Layout {
    v2: PathBuf,
}

fn split(digest: &str) -> (&str, &str) {
    digest.split_once(':').unwrap_or(("sha256", digest))
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            v2: root.join("docker").join("registry").join("v2"),
        }
    }

    pub fn blobs(&self) -> PathBuf {
        self.v2.join("blobs")
    }

    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let (alg, hex) = split(digest);
        let prefix = hex.get(..2).unwrap_or("00");
        self.blobs().join(alg).join(prefix).join(hex).join("data")
    }

    pub fn repositories(&self) -> PathBuf {
        self.v2.join("repositories")
    }

    pub fn repo(&self, name: &str) -> PathBuf {
        self.repositories().join(name)
    }

    pub fn layer_link(&self, repo: &str, digest: &str) -> PathBuf {
        let (alg, hex) = split(digest);
        self.repo(repo)
            .join("_layers")
            .join(alg)
            .join(hex)
            .join("link")
    }

    pub fn revisions(&self, repo: &str) -> PathBuf {
        self.repo(repo).join("_manifests").join("revisions")
    }

    pub fn revision_link(&self, repo: &str, digest: &str) -> PathBuf {
        let (alg, hex) = split(digest);
        self.revisions(repo).join(alg).join(hex).join("link")
    }

    pub fn tags(&self, repo: &str) -> PathBuf {
        self.repo(repo).join("_manifests").join("tags")
    }

    pub fn tag_current(&self, repo: &str, tag: &str) -> PathBuf {
        self.tags(repo).join(tag).join("current").join("link")
    }

    pub fn tag_index(&self, repo: &str, tag: &str, digest: &str) -> PathBuf {
        let (alg, hex) = split(digest);
        self.tags(repo)
            .join(tag)
            .join("index")
            .join(alg)
            .join(hex)
            .join("link")
    }
}

/// The digest a link file names, checked by the digest grammar; `None` if absent.
fn read_link(path: &Path) -> Result<Option<String>, StoreError> {
    match fs::read_to_string(path) {
        Ok(s) => {
            let d = s.trim();
            if crate::digest::parse(d).is_err() {
                return Err(StoreError::Corrupt(format!(
                    "{} does not hold a digest",
                    path.display()
                )));
            }
            Ok(Some(d.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Writes a whole file so that it is either absent or complete, also after a crash: a
/// temporary beside it, fsync'd, renamed into place, the directory fsync'd.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        uuid::Uuid::new_v4().simple()
    ));
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    sync_dir(dir)
}

fn write_link(path: &Path, digest: &str) -> Result<(), StoreError> {
    if read_link(path)?.as_deref() == Some(digest) {
        return Ok(());
    }
    write_atomic(path, digest.as_bytes())
}

fn file_size(path: &Path) -> Result<Option<u64>, StoreError> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(Some(m.len())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn modified(path: &Path) -> i64 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

/// Directory entries' names (none when the directory is absent).
fn names(dir: &Path) -> Result<Vec<String>, StoreError> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// What a stored manifest's bytes say about it (the registry validated it when it was
/// pushed; Classic content may be older than our rules, so this reads leniently).
pub struct ManifestFacts {
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub subject: Option<String>,
}

pub fn manifest_facts(content: &[u8]) -> ManifestFacts {
    let v: Value = serde_json::from_slice(content).unwrap_or(Value::Null);
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let media_type = text(v.get("mediaType")).unwrap_or_else(|| {
        if v.get("manifests").is_some() {
            "application/vnd.oci.image.index.v1+json".into()
        } else if v.get("schemaVersion").and_then(Value::as_i64) == Some(1) {
            "application/vnd.docker.distribution.manifest.v1+prettyjws".into()
        } else {
            "application/vnd.oci.image.manifest.v1+json".into()
        }
    });
    let artifact_type = text(v.get("artifactType"))
        .or_else(|| text(v.get("config").and_then(|c| c.get("mediaType"))));
    let subject = text(v.get("subject").and_then(|s| s.get("digest")));
    ManifestFacts {
        media_type,
        artifact_type,
        subject,
    }
}

/// Registry metadata read from and written to a distribution tree.
pub struct ClassicMeta {
    layout: Layout,
    root: PathBuf,
    /// Settings and the outbox (our `meta.db`, the managed store's metadata later).
    side: Arc<dyn ManagedMeta>,
    /// Changes are made one at a time (as the SQLite backends' write lock does).
    write: Mutex<()>,
    /// Bytes of all blob data, counted once at open and kept as blobs are added.
    used: AtomicU64,
    /// The blobs `used` counts (an upload's data is in the tree before its link is).
    counted: Mutex<std::collections::HashSet<String>>,
}

impl ClassicMeta {
    pub fn open(root: &Path, side: Arc<dyn ManagedMeta>) -> Result<ClassicMeta, StoreError> {
        let layout = Layout::new(root);
        for d in [layout.blobs(), layout.repositories()] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let m = ClassicMeta {
            layout,
            root: root.to_path_buf(),
            side,
            write: Mutex::new(()),
            used: AtomicU64::new(0),
            counted: Mutex::new(Default::default()),
        };
        let all = m.all_blobs()?;
        m.used
            .store(all.iter().map(|(_, n)| n).sum(), Ordering::SeqCst);
        if let Ok(mut c) = m.counted.lock() {
            c.extend(all.into_iter().map(|(d, _)| d));
        }
        Ok(m)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ()>, StoreError> {
        self.write.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Under the write lock: whether the tree may still change. Once an upgrade has started
    /// (or completed) it must not: the copy reads it as it is. Checked here, under the same
    /// lock the upgrade's start takes, so no change slips in behind the copy.
    fn check_open(&self) -> Result<(), StoreError> {
        let p: crate::tier::Properties = match self.side.properties()? {
            Some(j) => {
                serde_json::from_str(&j).map_err(|e| StoreError::Properties(e.to_string()))?
            }
            None => return Ok(()),
        };
        match (&p.sku, p.classic.as_ref().and_then(|c| c.upgrade.as_ref())) {
            (crate::tier::Sku::Classic, None) => Ok(()),
            (_, Some(u)) => Err(LimitError::Upgrading { to: u.to }.into()),
            (sku, None) => Err(LimitError::Upgrading { to: *sku }.into()),
        }
    }

    /// Whether `digest` is counted in `used` yet.
    fn is_counted(&self, digest: &str) -> bool {
        self.counted.lock().is_ok_and(|c| c.contains(digest))
    }

    /// Counts `digest` in `used` (once).
    fn count(&self, digest: &str, size: u64) {
        if let Ok(mut c) = self.counted.lock() {
            if c.insert(digest.to_string()) {
                self.used.fetch_add(size, Ordering::SeqCst);
            }
        }
    }

    /// Waits for a change to the tree in progress to finish. Called once an upgrade is
    /// asked for (possibly by another process): every change after it reads that and is
    /// refused, so the tree the upgrade then reads is final.
    pub fn settle(&self) -> Result<(), StoreError> {
        drop(self.lock()?);
        Ok(())
    }

    fn no_deletes<T>() -> Result<T, StoreError> {
        Err(LimitError::NeedsManaged { what: "deletes" }.into())
    }

    /// Every blob's digest and size.
    pub fn all_blobs(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            for prefix in names(&self.layout.blobs().join(alg))? {
                for hex in names(&self.layout.blobs().join(alg).join(&prefix))? {
                    let digest = format!("{alg}:{hex}");
                    if crate::digest::parse(&digest).is_err() {
                        continue;
                    }
                    if let Some(n) = file_size(&self.layout.blob_data(&digest))? {
                        out.push((digest, n));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Digests of the links under `dir/<alg>/<hex>/link`.
    fn links_under(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
        let mut out = Vec::new();
        for alg in names(dir)? {
            for hex in names(&dir.join(&alg))? {
                let link = dir.join(&alg).join(&hex).join("link");
                if let Some(d) = read_link(&link)? {
                    out.push((d, link));
                }
            }
        }
        Ok(out)
    }

    /// Digests of the blobs linked into `repo` (`_layers`).
    pub fn layers(&self, repo: &str) -> Result<Vec<String>, StoreError> {
        Ok(Self::links_under(&self.layout.repo(repo).join("_layers"))?
            .into_iter()
            .map(|(d, _)| d)
            .collect())
    }

    /// Digests of the manifests of `repo`.
    pub fn revisions(&self, repo: &str) -> Result<Vec<String>, StoreError> {
        Ok(Self::links_under(&self.layout.revisions(repo))?
            .into_iter()
            .map(|(d, _)| d)
            .collect())
    }

    /// Every tag of `repo` with the digest it points at, by name.
    pub fn tag_map(&self, repo: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let mut out = BTreeMap::new();
        for tag in names(&self.layout.tags(repo))? {
            if let Some(d) = read_link(&self.layout.tag_current(repo, &tag))? {
                out.insert(tag, d);
            }
        }
        Ok(out)
    }

    /// A manifest's bytes, verified against its digest; `None` if it is not in `repo`.
    pub fn manifest_bytes(&self, repo: &str, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if read_link(&self.layout.revision_link(repo, digest))?.is_none() {
            return Ok(None);
        }
        let path = self.layout.blob_data(digest);
        let content = match fs::read(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let alg = crate::digest::parse(digest)
            .map_err(|_| StoreError::Corrupt(format!("{digest} is not a digest")))?;
        let actual = crate::digest::of_bytes(alg, &content);
        if actual != digest {
            return Err(StoreError::Corrupt(format!(
                "manifest {digest} in {repo} hashes to {actual}: the Classic storage at {} \
                 is damaged",
                self.root.display()
            )));
        }
        Ok(Some(content))
    }

    fn row(&self, repo: &str, digest: &str) -> Result<Option<ManifestRow>, StoreError> {
        let Some(content) = self.manifest_bytes(repo, digest)? else {
            return Ok(None);
        };
        let f = manifest_facts(&content);
        Ok(Some(ManifestRow {
            digest: digest.to_string(),
            media_type: f.media_type,
            artifact_type: f.artifact_type,
            subject: f.subject,
            size: content.len() as u64,
            content,
            created: modified(&self.layout.revision_link(repo, digest)),
        }))
    }

    /// Names of the repositories (directories holding `_manifests` or `_layers`), sorted.
    pub fn repository_names(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut stack = vec![(self.layout.repositories(), String::new())];
        while let Some((dir, name)) = stack.pop() {
            let entries = names(&dir)?;
            if !name.is_empty() && entries.iter().any(|e| e == "_manifests" || e == "_layers") {
                out.push(name.clone());
            }
            for e in entries {
                if e.starts_with('_') || !dir.join(&e).is_dir() {
                    continue;
                }
                let child = if name.is_empty() {
                    e.clone()
                } else {
                    format!("{name}/{e}")
                };
                stack.push((dir.join(&e), child));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Stores a manifest's bytes as a blob (as distribution does), if not there yet.
    fn put_content(&self, digest: &str, content: &[u8]) -> Result<bool, StoreError> {
        let path = self.layout.blob_data(digest);
        if file_size(&path)?.is_some() {
            return Ok(false);
        }
        write_atomic(&path, content)?;
        Ok(true)
    }
}

impl RegistryMeta for ClassicMeta {
    fn blob_size(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        file_size(&self.layout.blob_data(digest))
    }

    fn blob_in_repo(&self, repo: &str, digest: &str) -> Result<Option<u64>, StoreError> {
        if read_link(&self.layout.layer_link(repo, digest))?.is_none() {
            return Ok(None);
        }
        self.blob_size(digest)
    }

    fn link_blob(
        &self,
        repo: &str,
        digest: &str,
        new_size: Option<u64>,
        admit: Admit<'_>,
        content: &mut dyn FnMut() -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        let _g = self.lock()?;
        self.check_open()?;
        let known = self.blob_size(digest)?;
        let Some(size) = known.or(new_size) else {
            return Ok(false);
        };
        let new = !self.is_counted(digest);
        if new {
            admit(self.used.load(Ordering::SeqCst), size)?;
        }
        if !content()? {
            return Ok(false);
        }
        write_link(&self.layout.layer_link(repo, digest), digest)?;
        self.count(digest, size);
        Ok(true)
    }

    fn mount_blob(&self, repo: &str, from: &str, digest: &str) -> Result<bool, StoreError> {
        let _g = self.lock()?;
        self.check_open()?;
        if self.blob_in_repo(from, digest)?.is_none() {
            return Ok(false);
        }
        write_link(&self.layout.layer_link(repo, digest), digest)?;
        Ok(true)
    }

    fn unlink_blob(&self, _repo: &str, _digest: &str) -> Result<bool, StoreError> {
        Self::no_deletes()
    }

    fn put_manifest(
        &self,
        m: &NewManifest,
        events: &[String],
        admit: Admit<'_>,
    ) -> Result<(), StoreError> {
        let _g = self.lock()?;
        self.check_open()?;
        for d in &m.blobs {
            match self.blob_in_repo(&m.repo, &d.digest)? {
                None => return Err(StoreError::MissingRef(d.digest.clone())),
                Some(actual) if actual != d.size => {
                    return Err(StoreError::SizeMismatch {
                        digest: d.digest.clone(),
                        declared: d.size,
                        actual,
                    })
                }
                Some(_) => {}
            }
        }
        for c in &m.children {
            let Some(bytes) = self.manifest_bytes(&m.repo, &c.digest)? else {
                return Err(StoreError::MissingRef(c.digest.clone()));
            };
            if bytes.len() as u64 != c.size {
                return Err(StoreError::SizeMismatch {
                    digest: c.digest.clone(),
                    declared: c.size,
                    actual: bytes.len() as u64,
                });
            }
        }
        let len = m.content.len() as u64;
        if !self.is_counted(&m.digest) {
            admit(self.used.load(Ordering::SeqCst), len)?;
        }
        self.put_content(&m.digest, &m.content)?;
        self.count(&m.digest, len);
        write_link(&self.layout.revision_link(&m.repo, &m.digest), &m.digest)?;
        if let Some(tag) = &m.tag {
            write_link(&self.layout.tag_index(&m.repo, tag, &m.digest), &m.digest)?;
            write_link(&self.layout.tag_current(&m.repo, tag), &m.digest)?;
        }
        // The tree and the outbox share no transaction: the event follows the change.
        self.side.append_outbox(events)
    }

    fn get_manifest(
        &self,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<ManifestRow>, StoreError> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => match read_link(&self.layout.tag_current(repo, t))? {
                Some(d) => d,
                None => return Ok(None),
            },
        };
        self.row(repo, &digest)
    }

    fn delete_manifest(
        &self,
        _repo: &str,
        _digest: &str,
        _events: &mut dyn FnMut(&ManifestRow, &[String]) -> Vec<String>,
    ) -> Result<Option<(ManifestRow, Vec<String>)>, StoreError> {
        Self::no_deletes()
    }

    fn delete_tag(
        &self,
        _repo: &str,
        _tag: &str,
        _events: &mut dyn FnMut(&str) -> Vec<String>,
    ) -> Result<Option<String>, StoreError> {
        Self::no_deletes()
    }

    fn delete_tags(
        &self,
        _repo: &str,
        _tags: &[(String, String)],
        _events: super::meta::TagEvents<'_>,
    ) -> Result<Vec<String>, StoreError> {
        Self::no_deletes()
    }

    fn delete_unreferenced(
        &self,
        _repo: &str,
        _digests: &[String],
        _events: &mut dyn FnMut(&ManifestRow) -> Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        Self::no_deletes()
    }

    fn locks(&self, _repo: &str) -> Result<Vec<super::meta::Lock>, StoreError> {
        // A Classic tree is never deleted from: nothing to lock against.
        Ok(Vec::new())
    }

    fn set_lock(
        &self,
        _repo: &str,
        _tag: Option<&str>,
        _a: super::meta::Attributes,
    ) -> Result<bool, StoreError> {
        Err(LimitError::NeedsManaged { what: "locks" }.into())
    }

    fn delete_repository(&self, _repo: &str) -> Result<bool, StoreError> {
        Self::no_deletes()
    }

    fn repository_exists(&self, repo: &str) -> Result<bool, StoreError> {
        let dir = self.layout.repo(repo);
        Ok(dir.join("_manifests").is_dir() || dir.join("_layers").is_dir())
    }

    fn list_tags(
        &self,
        repo: &str,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Option<Vec<String>>, StoreError> {
        if !self.repository_exists(repo)? {
            return Ok(None);
        }
        let tags = self.tag_map(repo)?.into_keys();
        Ok(Some(page(tags, n, last)))
    }

    fn list_repositories(
        &self,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        Ok(page(self.repository_names()?, n, last))
    }

    fn repo_view(&self, _repo: &str) -> Result<Option<super::meta::RepoView>, StoreError> {
        // Only purges read it, and a Classic tree is never deleted from.
        Self::no_deletes()
    }

    fn list_manifests(&self, repo: &str) -> Result<Option<Vec<ManifestInfo>>, StoreError> {
        if !self.repository_exists(repo)? {
            return Ok(None);
        }
        let mut tags: HashMap<String, Vec<String>> = HashMap::new();
        for (tag, d) in self.tag_map(repo)? {
            tags.entry(d).or_default().push(tag);
        }
        let mut out = Vec::new();
        for d in self.revisions(repo)? {
            let Some(row) = self.row(repo, &d)? else {
                continue;
            };
            out.push(ManifestInfo {
                tags: tags.remove(&d).unwrap_or_default(),
                digest: row.digest,
                media_type: row.media_type,
                artifact_type: row.artifact_type,
                size: row.size,
                created: row.created,
            });
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then(a.digest.cmp(&b.digest)));
        Ok(Some(out))
    }

    fn referrers(&self, repo: &str, digest: &str) -> Result<Vec<ManifestRow>, StoreError> {
        let mut out = Vec::new();
        for d in self.revisions(repo)? {
            if let Some(row) = self.row(repo, &d)? {
                if row.subject.as_deref() == Some(digest) {
                    out.push(row);
                }
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    fn outbox_after(&self, seq: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        self.side.outbox_after(seq, limit)
    }

    fn outbox_last(&self) -> Result<i64, StoreError> {
        self.side.outbox_last()
    }

    fn outbox_prune(&self, before: i64) -> Result<usize, StoreError> {
        self.side.outbox_prune(before)
    }

    fn gc(
        &self,
        _cutoff: i64,
        _dry_run: bool,
        _blobs: &dyn BlobStorage,
    ) -> Result<GcReport, StoreError> {
        Err(LimitError::NeedsManaged {
            what: "garbage collection and deletes",
        }
        .into())
    }

    fn audit(&self) -> Result<Audit, StoreError> {
        let mut audit = Audit {
            blobs: self.all_blobs()?,
            ..Audit::default()
        };
        let dangling = |kind: &str, repo: &str, digest: &str, detail: &str| FsckIssue {
            kind: kind.to_string(),
            repo: Some(repo.to_string()),
            digest: digest.to_string(),
            detail: detail.to_string(),
        };
        for repo in self.repository_names()? {
            for d in self.layers(&repo)? {
                if self.blob_size(&d)?.is_none() {
                    audit.dangling.push(dangling(
                        "link-dangling",
                        &repo,
                        &d,
                        "a layer link names a blob that is not stored",
                    ));
                }
            }
            for d in self.revisions(&repo)? {
                let path = self.layout.blob_data(&d);
                match fs::read(&path) {
                    Ok(content) => audit.manifests.push((repo.clone(), d, content)),
                    Err(_) => audit.dangling.push(dangling(
                        "manifest-ref",
                        &repo,
                        &d,
                        "a manifest revision names content that is not stored",
                    )),
                }
            }
            for (tag, d) in self.tag_map(&repo)? {
                audit.tags += 1;
                if read_link(&self.layout.revision_link(&repo, &d))?.is_none() {
                    audit.dangling.push(dangling(
                        "tag-dangling",
                        &repo,
                        &d,
                        &format!("tag {tag} names a manifest the repository does not have"),
                    ));
                }
            }
        }
        Ok(audit)
    }

    fn manifest_contents(
        &self,
        _after: Option<(&str, &str)>,
        _limit: usize,
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        Err(LimitError::NeedsManaged {
            what: "encryption settings",
        }
        .into())
    }

    fn replace_manifest_content(
        &self,
        _repo: &str,
        _digest: &str,
        _was: &[u8],
        _now: &[u8],
    ) -> Result<bool, StoreError> {
        Err(LimitError::NeedsManaged {
            what: "encryption settings",
        }
        .into())
    }

    fn storage_used(&self) -> Result<u64, StoreError> {
        Ok(self.used.load(Ordering::SeqCst))
    }

    fn properties(&self) -> Result<Option<String>, StoreError> {
        self.side.properties()
    }

    fn set_properties(&self, change: ChangeProperties<'_>) -> Result<String, StoreError> {
        // A tier's capacity is checked against what the Classic tree holds.
        let _g = self.lock()?;
        let used = self.used.load(Ordering::SeqCst);
        self.side.set_properties(&mut |now, _| change(now, used))
    }
}

/// `items` (sorted) after `last`, at most `n`.
fn page(
    items: impl IntoIterator<Item = String>,
    n: Option<usize>,
    last: Option<&str>,
) -> Vec<String> {
    items
        .into_iter()
        .filter(|t| last.is_none_or(|l| t.as_str() > l))
        .take(n.unwrap_or(usize::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::meta::admit_all;

    fn classic(dir: &Path) -> ClassicMeta {
        let side = Arc::new(super::super::SqliteMeta::open(&dir.join("meta.db")).unwrap());
        ClassicMeta::open(&dir.join("classic"), side).unwrap()
    }

    #[test]
    fn the_layout_is_distributions() {
        let l = Layout::new(Path::new("/c"));
        let d = format!("sha256:ab{}", "0".repeat(62));
        let hex = &d[7..];
        assert_eq!(
            l.blob_data(&d),
            PathBuf::from(format!("/c/docker/registry/v2/blobs/sha256/ab/{hex}/data"))
        );
        assert_eq!(
            l.layer_link("a/b", &d),
            PathBuf::from(format!(
                "/c/docker/registry/v2/repositories/a/b/_layers/sha256/{hex}/link"
            ))
        );
        assert_eq!(
            l.tag_current("a/b", "v1"),
            PathBuf::from("/c/docker/registry/v2/repositories/a/b/_manifests/tags/v1/current/link")
        );
        assert_eq!(
            l.tag_index("r", "v1", &d),
            PathBuf::from(format!(
                "/c/docker/registry/v2/repositories/r/_manifests/tags/v1/index/sha256/{hex}/link"
            ))
        );
    }

    #[test]
    fn manifests_and_tags_live_in_the_tree_and_deletes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = classic(dir.path());
        let blob = b"layer";
        let bd = crate::digest::of_bytes(crate::digest::Algorithm::Sha256, blob);
        write_atomic(&m.layout.blob_data(&bd), blob).unwrap();
        assert!(m
            .link_blob("app/web", &bd, Some(5), &admit_all, &mut || Ok(true))
            .unwrap());
        let content =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        let md = crate::digest::of_bytes(crate::digest::Algorithm::Sha256, content);
        let nm = NewManifest {
            repo: "app/web".into(),
            digest: md.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            artifact_type: None,
            subject: None,
            content: content.to_vec(),
            blobs: vec![super::super::Descriptor {
                digest: bd.clone(),
                size: 5,
            }],
            children: vec![],
            tag: Some("v1".into()),
            sealed: None,
        };
        m.put_manifest(&nm, &["pushed".into()], &admit_all).unwrap();
        assert_eq!(
            fs::read_to_string(m.layout.tag_current("app/web", "v1")).unwrap(),
            md
        );
        let row = m
            .get_manifest("app/web", &Reference::Tag("v1".into()))
            .unwrap()
            .unwrap();
        assert_eq!(row.content, content);
        assert_eq!(m.list_repositories(None, None).unwrap(), vec!["app/web"]);
        assert_eq!(
            m.list_tags("app/web", None, None).unwrap(),
            Some(vec!["v1".into()])
        );
        assert_eq!(m.outbox_after(0, 10).unwrap()[0].1, "pushed");
        assert_eq!(m.storage_used().unwrap(), 5 + content.len() as u64);
        // A manifest naming a blob the repository lacks is refused.
        let mut bad = nm.clone();
        bad.repo = "other".into();
        assert!(matches!(
            m.put_manifest(&bad, &[], &admit_all),
            Err(StoreError::MissingRef(_))
        ));
        let e = m.delete_tag("app/web", "v1", &mut |_| vec![]).unwrap_err();
        assert!(e.to_string().contains("deletes need a managed tier"), "{e}");
        // Damaged content is never served.
        fs::write(m.layout.blob_data(&md), b"{}").unwrap();
        assert!(matches!(
            m.get_manifest("app/web", &Reference::Digest(md)),
            Err(StoreError::Corrupt(_))
        ));
    }
}
