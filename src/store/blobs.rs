//! Where blob bytes live, behind one trait: the filesystem now; object storage and an
//! encrypting layer later slot in without touching the registry or gc.
//!
//! An upload is an object: bytes are written into it at offsets, and it becomes content
//! only by `commit` under a digest the caller has verified. Until then nothing is visible;
//! an upload dropped or cancelled leaves nothing behind. Removal is two-phase (`stage`,
//! then `finish` once the metadata that forgot the blob has committed) so a crash between
//! the two never loses a blob the metadata still names. All calls block.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{io_err, StoreError};

/// Blob content by digest.
pub trait BlobStorage: Send + Sync + std::fmt::Debug {
    /// A new, empty upload.
    fn begin(&self) -> Result<Box<dyn BlobUpload>, StoreError>;
    /// Whether content is stored under `digest`.
    fn exists(&self, digest: &str) -> bool;
    /// The content of `digest` from byte `start`.
    fn read(&self, digest: &str, start: u64) -> Result<Box<dyn Read + Send>, StoreError>;
    /// At most `len` bytes of `digest` from `start` (fewer at its end): a backend that pays
    /// per request (object storage) fetches just that.
    fn read_range(
        &self,
        digest: &str,
        start: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, StoreError> {
        Ok(Box::new(self.read(digest, start)?.take(len)))
    }
    /// `len` bytes of `digest` from `start` as a buffer straight from the page cache,
    /// where the backend can (`None`, from a backend that maps nothing: use
    /// [`BlobStorage::read`]). Large pulls send these
    /// without copying; each is unmapped when sent, so memory use stays flat.
    fn map(
        &self,
        _digest: &str,
        _start: u64,
        _len: usize,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        Ok(None)
    }
    /// How many bytes a pull asks [`BlobStorage::map`] for at a time: mapped pages cost
    /// nothing until touched; a backend that fills a buffer (decrypting) wants less.
    fn map_chunk(&self) -> usize {
        4 << 20
    }
    /// A URL that reads the content of `digest` without credentials for `ttl` (object
    /// storage's presigned URL: pulls are redirected there). `None` from a backend that
    /// cannot hand one out, or must not (sealed content would go out as ciphertext).
    fn presign(
        &self,
        _digest: &str,
        _ttl: std::time::Duration,
    ) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    /// First phase of a removal: `digest` stops being readable; `None` if it was absent.
    fn stage_removal(&self, digest: &str) -> Result<Option<Staged>, StoreError>;
    /// Second phase: the staged content is gone for good.
    fn finish_removal(&self, staged: Staged);
    /// Every stored digest with the time it was stored (gc's leftovers, fsck).
    fn list(&self) -> Result<Vec<(String, SystemTime)>, StoreError>;
    /// At start-up: abandoned uploads are dropped, and staged removals come back where
    /// `keep(digest)` says the metadata still names them (or are finished otherwise).
    fn recover(
        &self,
        keep: &mut dyn FnMut(&str) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError>;
    /// An upload carried on from `state`, a [`BlobUpload::checkpoint`] another server made
    /// (it died holding the session); `None` where the backend keeps uploads local.
    fn resume(&self, state: &str) -> Result<Option<Box<dyn BlobUpload>>, StoreError> {
        let _ = state;
        Ok(None)
    }
    /// Removes what the checkpoint `state` left behind (its session was abandoned).
    fn abandon(&self, state: &str) {
        let _ = state;
    }
}

/// A blob being received. Shared between the tasks that write its batches (`&self`).
pub trait BlobUpload: Send + Sync {
    /// Write `buf` at byte `pos`.
    fn write_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()>;
    /// Cut the upload back (or extend it) to `len` bytes.
    fn set_len(&self, len: u64) -> std::io::Result<()>;
    /// Start making what was written durable (so the final commit has little left).
    fn sync_some(&self) -> std::io::Result<()>;
    /// The bytes written so far (to hash them by another algorithm).
    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>>;
    /// Fills `buf` with the bytes written at `pos` (a layer above cutting a chunk back).
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        let mut r = self.reader()?;
        std::io::copy(&mut (&mut r).take(pos), &mut std::io::sink())?;
        r.read_exact(buf)
    }
    /// Make the upload durable content under `digest` (verified by the caller). Content
    /// already stored under it is kept (it is the same bytes). May be called again; after
    /// it, writes are refused (the committed content never changes).
    fn commit(&self, digest: &str) -> Result<(), StoreError>;
    /// Make the upload the content under `digest` in place of what is stored there (the
    /// same content in another form: sealing it at rest), atomically: a reader sees the
    /// old file or the new one, whole. Readers that opened the old one keep it.
    fn replace(&self, digest: &str) -> Result<(), StoreError> {
        let _ = digest;
        Err(StoreError::Refused(
            "this blob storage cannot replace content in place".into(),
        ))
    }
    /// Makes the first `len` bytes written durable where every server sharing the storage
    /// reaches them, and says how another one carries the upload on from there
    /// ([`BlobStorage::resume`]). `None` where the upload stays with this server.
    fn checkpoint(&self, len: u64) -> Result<Option<String>, StoreError> {
        let _ = len;
        Ok(None)
    }
    /// Whether the upload seals what it stores (encryption at rest).
    fn sealed(&self) -> bool {
        false
    }
    /// Drop the upload's own data now (committed content stays); writes are then refused.
    /// Dropping the last handle does the same.
    fn cancel(&self);
}

/// A removal in its first phase.
#[derive(Debug)]
pub struct Staged(PathBuf);

impl Staged {
    /// A staged removal named by an object key (object storage).
    pub(super) fn key(key: String) -> Staged {
        Staged(PathBuf::from(key))
    }

    pub(super) fn name(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

/// Blobs as files, in one of two trees:
/// - ours: `blobs/<algorithm>/<2 hex>/<hex>`, uploads in `uploads/`, staged removals in
///   `trash/`;
/// - a Classic registry's, CNCF distribution's (see [`super::classic::Layout`]):
///   `docker/registry/v2/blobs/<algorithm>/<2 hex>/<hex>/data`, our uploads in
///   `_acr-task/uploads/` beside distribution's tree (same file system, never read by it).
#[derive(Debug, Clone)]
pub struct FsBlobs {
    root: PathBuf,
    distribution: bool,
}

impl FsBlobs {
    pub fn open(root: &Path) -> Result<FsBlobs, StoreError> {
        Self::open_tree(root, false)
    }

    /// Blobs of a Classic registry: `root` holds distribution's `docker/registry/v2`.
    pub fn distribution(root: &Path) -> Result<FsBlobs, StoreError> {
        Self::open_tree(root, true)
    }

    fn open_tree(root: &Path, distribution: bool) -> Result<FsBlobs, StoreError> {
        let b = FsBlobs {
            root: root.to_path_buf(),
            distribution,
        };
        for p in [b.blobs_dir().join("sha256"), b.uploads(), b.trash()] {
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(b)
    }

    fn blobs_dir(&self) -> PathBuf {
        if self.distribution {
            super::classic::Layout::new(&self.root).blobs()
        } else {
            self.root.join("blobs")
        }
    }

    fn uploads(&self) -> PathBuf {
        if self.distribution {
            self.root.join("_acr-task").join("uploads")
        } else {
            self.root.join("uploads")
        }
    }

    fn trash(&self) -> PathBuf {
        if self.distribution {
            self.root.join("_acr-task").join("trash")
        } else {
            self.root.join("trash")
        }
    }

    /// Where the content of `digest` (already validated) lives.
    fn path(&self, digest: &str) -> PathBuf {
        if self.distribution {
            return super::classic::Layout::new(&self.root).blob_data(digest);
        }
        let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
        let prefix = hex.get(..2).unwrap_or("00");
        self.root.join("blobs").join(alg).join(prefix).join(hex)
    }
}

impl BlobStorage for FsBlobs {
    fn begin(&self) -> Result<Box<dyn BlobUpload>, StoreError> {
        Ok(Box::new(FsUpload {
            spool: Spool::create(&self.uploads())?,
            blobs: self.clone(),
        }))
    }

    fn exists(&self, digest: &str) -> bool {
        self.path(digest).exists()
    }

    fn read(&self, digest: &str, start: u64) -> Result<Box<dyn Read + Send>, StoreError> {
        let path = self.path(digest);
        let mut f = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::BlobMissing(digest.to_string())
            } else {
                io_err(&path)(e)
            }
        })?;
        f.seek(SeekFrom::Start(start)).map_err(io_err(&path))?;
        Ok(Box::new(f))
    }

    fn map(
        &self,
        digest: &str,
        start: u64,
        len: usize,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        let path = self.path(digest);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::BlobMissing(digest.to_string())
            } else {
                io_err(&path)(e)
            }
        })?;
        let size = file.metadata().map_err(io_err(&path))?.len();
        if start.checked_add(len as u64).is_none_or(|end| end > size) {
            // Mapped pages past the end would fault: refuse, as a short read would.
            return Err(io_err(&path)(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "blob file shorter than recorded",
            )));
        }
        if len == 0 {
            return Ok(Some(bytes::Bytes::new()));
        }
        // SAFETY: a committed blob file is never written again: uploads are separate
        // files, sealed by their commit (linked into place only once complete); gc
        // renames and unlinks, and sealing at rest renames a new file over it (both leave
        // a mapping of the old file valid); nothing truncates. The
        // range was checked against the file's size above. The mapping is read-only.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(start)
                .len(len)
                .map(&file)
        }
        .map_err(io_err(&path))?;
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(Some(bytes::Bytes::from_owner(map)))
    }

    fn stage_removal(&self, digest: &str) -> Result<Option<Staged>, StoreError> {
        let to = self.trash().join(digest.replace(':', "-"));
        match fs::rename(self.path(digest), &to) {
            Ok(()) => Ok(Some(Staged(to))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&to)(e)),
        }
    }

    fn finish_removal(&self, staged: Staged) {
        let _ = fs::remove_file(staged.0);
    }

    fn list(&self) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            let base = self.blobs_dir().join(alg);
            let dirs = match fs::read_dir(&base) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&base)(e)),
            };
            for d in dirs.flatten() {
                let Ok(entries) = fs::read_dir(d.path()) else {
                    continue;
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    // Distribution's tree has a directory per blob with its `data`.
                    let file = if self.distribution {
                        e.path().join("data")
                    } else {
                        e.path()
                    };
                    if self.distribution && !file.is_file() {
                        continue;
                    }
                    let modified = fs::metadata(&file)
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push((format!("{alg}:{name}"), modified));
                }
            }
        }
        Ok(out)
    }

    fn recover(
        &self,
        keep: &mut dyn FnMut(&str) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let uploads = self.uploads();
        for e in fs::read_dir(&uploads).map_err(io_err(&uploads))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let trash = self.trash();
        for e in fs::read_dir(&trash).map_err(io_err(&trash))?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            // `alg-hex` (older versions wrote the sha256 hex alone).
            let digest = match name.split_once('-') {
                Some((alg, hex)) => format!("{alg}:{hex}"),
                None => format!("sha256:{name}"),
            };
            let dest = self.path(&digest);
            if keep(&digest)? && !dest.exists() {
                if let Some(dir) = dest.parent() {
                    fs::create_dir_all(dir).map_err(io_err(dir))?;
                }
                fs::rename(e.path(), &dest).map_err(io_err(&dest))?;
                tracing::warn!(%digest, "restored blob from an interrupted gc");
            } else {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(())
    }
}

/// An upload's bytes in a local file (`uploads/`), written at offsets; sealed by its commit
/// (or a cancel), removed when dropped. Shared by the backends that receive uploads
/// locally.
pub(super) struct Spool {
    pub(super) file: File,
    pub(super) path: PathBuf,
    sealed: std::sync::atomic::AtomicBool,
}

impl Spool {
    /// A new, empty spool file in `dir`.
    pub(super) fn create(dir: &Path) -> Result<Spool, StoreError> {
        let path = dir.join(uuid::Uuid::new_v4().simple().to_string());
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Spool {
            file,
            path,
            sealed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn open_for_writes(&self) -> std::io::Result<()> {
        if self.sealed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("the upload is already committed"));
        }
        Ok(())
    }

    pub(super) fn write_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
        self.open_for_writes()?;
        self.file.write_all_at(buf, pos)
    }

    pub(super) fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.open_for_writes()?;
        self.file.set_len(len)
    }

    pub(super) fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(File::open(&self.path)?))
    }

    /// No more writes: the bytes are (about to be) content that never changes.
    pub(super) fn seal(&self) {
        self.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sealed, and the file gone (committed content stays).
    pub(super) fn cancel(&self) {
        self.seal();
        let _ = fs::remove_file(&self.path);
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// An upload as a file in `uploads/`, hard-linked into `blobs/` by its commit.
struct FsUpload {
    spool: Spool,
    blobs: FsBlobs,
}

impl BlobUpload for FsUpload {
    fn write_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
        self.spool.write_at(buf, pos)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.spool.set_len(len)
    }

    fn sync_some(&self) -> std::io::Result<()> {
        self.spool.file.sync_data()
    }

    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        self.spool.reader()
    }

    fn cancel(&self) {
        self.spool.cancel();
    }

    /// fsync the file; hard-link it to its final name and fsync that directory. A crash at
    /// any point leaves either nothing visible or a complete blob.
    fn replace(&self, digest: &str) -> Result<(), StoreError> {
        self.replace_file(digest)
    }

    fn commit(&self, digest: &str) -> Result<(), StoreError> {
        let (file, path) = (&self.spool.file, &self.spool.path);
        self.spool.seal();
        file.sync_all().map_err(io_err(path))?;
        let dest = self.blobs.path(digest);
        let dir = dest.parent().unwrap_or(&self.blobs.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        match fs::hard_link(path, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&dest)(e)),
        }
        super::sync_dir(&dir)
    }
}

impl FsUpload {
    /// [`BlobUpload::replace`]: linked beside the destination, renamed over it.
    fn replace_file(&self, digest: &str) -> Result<(), StoreError> {
        let (file, path) = (&self.spool.file, &self.spool.path);
        self.spool.seal();
        file.sync_all().map_err(io_err(path))?;
        let dest = self.blobs.path(digest);
        let dir = dest.parent().unwrap_or(&self.blobs.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = dir.join(format!(".replace-{}", uuid::Uuid::new_v4().simple()));
        fs::hard_link(path, &tmp).map_err(io_err(&tmp))?;
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&dest)(e));
        }
        super::sync_dir(&dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(data: &[u8]) -> String {
        crate::digest::of_bytes(crate::digest::Algorithm::Sha256, data)
    }

    #[test]
    fn an_upload_is_invisible_until_committed_and_leaves_nothing_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FsBlobs::open(dir.path()).unwrap();
        let d = digest(b"hello");
        let up = blobs.begin().unwrap();
        up.write_at(b"hel", 0).unwrap();
        up.write_at(b"lo", 3).unwrap();
        assert!(!blobs.exists(&d));
        up.commit(&d).unwrap();
        assert!(up.write_at(b"X", 0).is_err() && up.set_len(0).is_err());
        drop(up);
        let mut s = String::new();
        blobs.read(&d, 1).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "ello");
        assert_eq!(fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);

        let abandoned = blobs.begin().unwrap();
        abandoned.write_at(b"partial", 0).unwrap();
        drop(abandoned);
        assert_eq!(fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);

        let cancelled = blobs.begin().unwrap();
        cancelled.write_at(b"partial", 0).unwrap();
        cancelled.cancel();
        assert_eq!(fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);
        assert!(cancelled.write_at(b"more", 7).is_err());
        assert_eq!(blobs.list().unwrap().len(), 1);
    }

    #[test]
    fn a_mapped_range_is_the_content_and_never_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FsBlobs::open(dir.path()).unwrap();
        // Longer than a page, so the range starts at an unaligned offset inside the file.
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let d = digest(&data);
        let up = blobs.begin().unwrap();
        up.write_at(&data, 0).unwrap();
        up.commit(&d).unwrap();
        let part = blobs.map(&d, 4097, 3000).unwrap().unwrap();
        assert_eq!(&part[..], &data[4097..7097]);
        assert!(blobs.map(&d, 9_000, 2_000).is_err());
        assert!(blobs.map(&d, 10_000, 0).unwrap().unwrap().is_empty());
    }

    #[test]
    fn a_staged_removal_comes_back_at_recovery_only_if_still_named() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FsBlobs::open(dir.path()).unwrap();
        let (a, b) = (digest(b"a"), digest(b"b"));
        for (d, data) in [(&a, b"a"), (&b, b"b")] {
            let up = blobs.begin().unwrap();
            up.write_at(data, 0).unwrap();
            up.commit(d).unwrap();
        }
        let _sa = blobs.stage_removal(&a).unwrap().unwrap();
        let _sb = blobs.stage_removal(&b).unwrap().unwrap();
        assert!(!blobs.exists(&a) && !blobs.exists(&b));
        assert!(blobs.stage_removal(&a).unwrap().is_none());
        // A crash here: the metadata kept `a` and forgot `b`.
        let keep_a = a.clone();
        blobs.recover(&mut |d| Ok(d == keep_a)).unwrap();
        assert!(blobs.exists(&a));
        assert!(!blobs.exists(&b));
        assert_eq!(fs::read_dir(dir.path().join("trash")).unwrap().count(), 0);
    }
}
