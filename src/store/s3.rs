//! Blob bytes in S3-compatible object storage (`serve --storage s3://BUCKET/PREFIX`), through
//! `object_store`: `PREFIX/blobs/<algorithm>/<2 hex>/<hex>`, staged removals under
//! `PREFIX/trash/`. The endpoint, region and credentials come the way AWS tools take them
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
//!
//! An upload is spooled to a local file (chunks come at offsets, out of order, and may be
//! re-hashed) and written to the bucket on commit: one PUT, or a multipart upload for large
//! blobs; either is visible whole or not at all. Pulls read ranges (`map` hands the pull
//! path one ranged GET per chunk).
//!
//! Where servers share the registry, each acknowledged chunk is checkpointed to the bucket
//! first ([`BlobUpload::checkpoint`]): whole parts of a multipart upload to
//! `PREFIX/uploads/<id>/data`, the rest in a tail object, and the state saved with the
//! session, so another server carries the session on when its holder dies
//! ([`BlobStorage::resume`]). Such an upload's commit completes the multipart upload and
//! copies it to the blob's key in the bucket (as distribution's S3 driver moves uploads).
//!
//! [`BlobStorage`] is synchronous (the store's callers run it on blocking threads); this
//! backend runs its requests on a small runtime of its own and waits for them, so it works
//! from any thread, inside another runtime or not.

use std::fs;
use std::future::Future;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use super::blobs::{BlobStorage, BlobUpload, Spool, Staged};
use super::{io_err, StoreError};

/// Blobs up to this size go in one PUT; larger ones in parts of this size.
const PART: usize = 8 << 20;

/// The largest object copied in the bucket by one request. S3 copies up to 5 GB so, but
/// a request must end within the client's 30 s timeout, at tens of MB/s on a slow
/// service; larger objects are copied through this process in parts.
const COPY_MAX: u64 = 512 << 20;

/// Copies the `size` bytes at `from` to `to`, in the bucket when small enough, else
/// through this process by ranges of [`PART`] (each request bounded), with `extra` (at
/// most a part) after them.
async fn copy_object(
    s: &AmazonS3,
    from: &Key,
    size: u64,
    to: &Key,
    extra: Vec<u8>,
) -> Result<(), object_store::Error> {
    if extra.is_empty() && size <= COPY_MAX {
        return s.copy(from, to).await;
    }
    let mut w = WriteMultipart::new_with_chunk_size(s.put_multipart(to).await?, PART);
    let mut at = 0;
    while at < size {
        let end = (at + PART as u64).min(size);
        let chunk = async {
            w.wait_for_capacity(4).await?;
            s.get_range(from, at..end).await
        };
        match chunk.await {
            Ok(c) if c.len() as u64 == end - at => w.write(&c),
            Ok(_) => {
                let _ = w.abort().await;
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: "an object shorter than its size".into(),
                });
            }
            Err(e) => {
                let _ = w.abort().await;
                return Err(e);
            }
        }
        at = end;
    }
    w.write(&extra);
    w.finish().await.map(|_| ())
}

/// Where the blobs of an S3-stored registry are: `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    pub prefix: String,
}

impl Location {
    /// Parses `s3://BUCKET[/PREFIX]`, or says what is wrong with it.
    pub fn parse(url: &str) -> Result<Location, StoreError> {
        let bad = |why: &str| {
            StoreError::Refused(format!(
                "--storage {url}: {why} (expected s3://BUCKET or s3://BUCKET/PREFIX)"
            ))
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("only s3:// storage is supported"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid_bucket {
            return Err(bad("not a valid bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|p| p == "." || p == ".." || (p.is_empty() && !prefix.is_empty()))
        {
            return Err(bad("the prefix has an empty, `.` or `..` part"));
        }
        // Characters keys carry as they are (no percent-encoding to get wrong).
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
        {
            return Err(bad(
                "the prefix may hold letters, digits, `-`, `_`, `.` and `/` only",
            ));
        }
        Ok(Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

#[derive(Debug, Clone)]
pub struct S3Blobs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<AmazonS3>,
    at: Location,
    /// The local spool of uploads (`uploads/` of the data dir).
    spool: PathBuf,
    rt: crate::background::OwnRuntime,
    /// Sizes looked up lately (a pull asks for many ranges of one blob; content under a
    /// digest changes only by `replace` and removal, which forget it).
    sizes: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// Sizes remembered at most (then forgotten all at once).
const SIZES_KEPT: usize = 4096;

fn s3_err(what: &str, e: object_store::Error) -> StoreError {
    StoreError::Refused(format!("object storage: {what}: {e}"))
}

impl S3Blobs {
    /// The blobs at `at`, spooling uploads under `root/uploads`. Checks that the bucket
    /// answers, so a wrong endpoint or login is said at start, not at the first push.
    /// `shared_id`: the registry's id when its servers share it (else its directory's).
    pub fn open(
        root: &Path,
        at: &Location,
        shared_id: Option<String>,
    ) -> Result<S3Blobs, StoreError> {
        let spool = root.join("uploads");
        fs::create_dir_all(&spool).map_err(io_err(&spool))?;
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&at.bucket);
        // AWS tools' names for the endpoint and region (object_store reads other spellings).
        if let Some(e) = env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")) {
            b = b.with_allow_http(e.starts_with("http://")).with_endpoint(e);
        }
        if let Some(r) = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")) {
            b = b.with_region(r);
        }
        // A few quick retries, not object_store's minutes of them: a push or pull waiting
        // on a bucket that is down fails in seconds and says why.
        b = b.with_retry(object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: std::time::Duration::from_secs(20),
            ..Default::default()
        });
        let store = Arc::new(
            b.build()
                .map_err(|e| StoreError::Refused(format!("--storage {}: {e}", at.url())))?,
        );
        let rt = crate::background::OwnRuntime::new("acr-task-s3", 2).map_err(io_err(root))?;
        let blobs = S3Blobs {
            inner: Arc::new(Inner {
                store,
                at: at.clone(),
                spool,
                rt,
                sizes: Default::default(),
            }),
        };
        // One listing call: the bucket exists and the login may read it.
        let s = blobs.inner.store.clone();
        let probe = blobs.key("blobs");
        blobs
            .wait(async move { s.list_with_delimiter(Some(&probe)).await })?
            .map_err(|e| {
                StoreError::Refused(format!(
                    "--storage {}: the bucket does not answer ({e}); check AWS_ENDPOINT_URL, \
                     AWS_REGION and the credentials, and that the bucket exists",
                    at.url()
                ))
            })?;
        blobs.claim(root, shared_id)?;
        Ok(blobs)
    }

    /// One registry per bucket prefix: its id (kept in `root/object-storage.owner`) is
    /// written under the prefix on the first open, and an open by another registry is
    /// refused, so no registry's gc or recovery removes another's blobs.
    fn claim(&self, root: &Path, shared_id: Option<String>) -> Result<(), StoreError> {
        let file = root.join("object-storage.owner");
        let id = match shared_id.map_or_else(|| fs::read_to_string(&file), Ok) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                fs::write(&file, &id).map_err(io_err(&file))?;
                id
            }
            Err(e) => return Err(io_err(&file)(e)),
        };
        let (s, key, mine) = (
            self.inner.store.clone(),
            self.key("acr-task-owner"),
            id.clone(),
        );
        let there = self.wait(async move {
            match s.get(&key).await {
                Ok(r) => r
                    .bytes()
                    .await
                    .map(|b| Some(String::from_utf8_lossy(&b).trim().to_string())),
                Err(object_store::Error::NotFound { .. }) => s
                    .put(&key, PutPayload::from(mine.into_bytes()))
                    .await
                    .map(|_| None),
                Err(e) => Err(e),
            }
        })?;
        match there.map_err(|e| s3_err("reading the prefix's owner", e))? {
            Some(owner) if owner != id => Err(StoreError::Refused(format!(
                "{} holds another registry's blobs (owner {owner}; this one is {id}): give \
                 each registry a prefix of its own",
                self.inner.at.url()
            ))),
            _ => Ok(()),
        }
    }

    fn key(&self, rest: &str) -> Key {
        if self.inner.at.prefix.is_empty() {
            Key::from(rest)
        } else {
            Key::from(format!("{}/{rest}", self.inner.at.prefix))
        }
    }

    /// Where the content of `digest` (already validated) lives.
    fn blob_key(&self, digest: &str) -> Key {
        let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
        let two = hex.get(..2).unwrap_or("00");
        self.key(&format!("blobs/{alg}/{two}/{hex}"))
    }

    fn trash_key(&self, digest: &str) -> Key {
        self.key(&format!("trash/{}", digest.replace(':', "-")))
    }

    fn wait<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.inner
            .rt
            .wait(f)
            .ok_or_else(|| StoreError::Refused("object storage request abandoned".into()))
    }

    /// `len` bytes of `digest` from `start`.
    fn range(&self, digest: &str, start: u64, len: u64) -> Result<Bytes, StoreError> {
        self.range_of(&self.blob_key(digest), digest, start, len)
    }

    /// `len` bytes of the object at `key` from `start` (`what`: its name in errors).
    fn range_of(&self, key: &Key, what: &str, start: u64, len: u64) -> Result<Bytes, StoreError> {
        let (s, key, d) = (self.inner.store.clone(), key.clone(), what.to_string());
        self.wait(async move { s.get_range(&key, start..start + len).await })?
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => StoreError::BlobMissing(d),
                e => s3_err("reading a blob", e),
            })
    }

    fn size(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        if let Some(n) = self
            .inner
            .sizes
            .lock()
            .ok()
            .and_then(|m| m.get(digest).copied())
        {
            return Ok(Some(n));
        }
        let (s, key) = (self.inner.store.clone(), self.blob_key(digest));
        match self.wait(async move { s.head(&key).await })? {
            Ok(m) => {
                if let Ok(mut sizes) = self.inner.sizes.lock() {
                    if sizes.len() >= SIZES_KEPT {
                        sizes.clear();
                    }
                    sizes.insert(digest.to_string(), m.size);
                }
                Ok(Some(m.size))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err("looking up a blob", e)),
        }
    }

    /// Every object under `PREFIX/under` (`what`: the request, for its error).
    fn list_under(
        &self,
        under: &str,
        what: &str,
    ) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let (s, prefix) = (self.inner.store.clone(), self.key(under));
        self.wait(async move {
            let mut out = Vec::new();
            let mut l = s.list(Some(&prefix));
            while let Some(m) = l.next().await {
                out.push(m?);
            }
            Ok::<_, object_store::Error>(out)
        })?
        .map_err(|e| s3_err(what, e))
    }

    /// The content under `digest` changed or went: its size is looked up again.
    fn forget(&self, digest: &str) {
        if let Ok(mut sizes) = self.inner.sizes.lock() {
            sizes.remove(digest);
        }
    }

    /// Writes the spooled file to `key` (a PUT, or parts for a large one).
    fn upload_file(&self, path: &Path, key: Key) -> Result<(), StoreError> {
        let s = self.inner.store.clone();
        let path = path.to_path_buf();
        self.wait(async move {
            use tokio::io::AsyncReadExt;
            let mut f = tokio::fs::File::open(&path).await.map_err(io_err(&path))?;
            let size = f.metadata().await.map_err(io_err(&path))?.len();
            if size <= PART as u64 {
                let mut buf = Vec::with_capacity(size as usize);
                f.read_to_end(&mut buf).await.map_err(io_err(&path))?;
                s.put(&key, PutPayload::from(buf))
                    .await
                    .map_err(|e| s3_err("storing a blob", e))?;
                return Ok(());
            }
            let up = s
                .put_multipart(&key)
                .await
                .map_err(|e| s3_err("starting a multipart upload", e))?;
            let mut w = WriteMultipart::new_with_chunk_size(up, PART);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match f.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = w.abort().await;
                        return Err(io_err(&path)(e));
                    }
                };
                if n == 0 {
                    break;
                }
                // At most a few parts in flight.
                if let Err(e) = w.wait_for_capacity(4).await {
                    let _ = w.abort().await;
                    return Err(s3_err("uploading a part", e));
                }
                w.write(&buf[..n]);
            }
            // A failed completion aborts the upload (its parts are not left behind).
            w.finish()
                .await
                .map_err(|e| s3_err("completing a multipart upload", e))?;
            Ok(())
        })
        .and_then(|r: Result<(), StoreError>| r)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl BlobStorage for S3Blobs {
    fn begin(&self) -> Result<Box<dyn BlobUpload>, StoreError> {
        Ok(Box::new(S3Upload {
            spool: Spool::create(&self.inner.spool)?,
            blobs: self.clone(),
            durable: Mutex::new(None),
        }))
    }

    /// The tail comes back into a new spool at its offset; the parts stay in the bucket.
    fn resume(&self, state: &str) -> Result<Option<Box<dyn BlobUpload>>, StoreError> {
        let cp = Checkpoint::parse(state)?;
        let spool = Spool::create(&self.inner.spool)?;
        if let Some(t) = &cp.tail {
            let want = cp.len - cp.base;
            let tail = self.range_of(&self.upload_key(&cp.id, t), "an upload's tail", 0, want)?;
            if tail.len() as u64 != want {
                return Err(StoreError::Corrupt(format!(
                    "upload {}: its last bytes are {} long, not {want}",
                    cp.id,
                    tail.len()
                )));
            }
            spool
                .write_at(&tail, cp.base)
                .map_err(io_err(&spool.path))?;
        }
        spool.set_len(cp.len).map_err(io_err(&spool.path))?;
        Ok(Some(Box::new(S3Upload {
            spool,
            blobs: self.clone(),
            durable: Mutex::new(Some(Durable {
                cp,
                done: false,
                data_len: 0,
                resumed: true,
                stale: None,
                unsure: true,
            })),
        })))
    }

    fn abandon(&self, state: &str) {
        match Checkpoint::parse(state) {
            Ok(cp) => self.clean_up(&cp, None),
            Err(e) => tracing::warn!(error = %e, "an abandoned upload's state"),
        }
    }

    /// Signed locally (no request): S3 checks the signature and its expiry when the
    /// client follows the URL.
    fn presign(
        &self,
        digest: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<String>, StoreError> {
        use object_store::signer::{Method, Signer};
        let (s, key) = (self.inner.store.clone(), self.blob_key(digest));
        let url = self
            .wait(async move { s.signed_url(Method::GET, &key, ttl).await })?
            .map_err(|e| s3_err("signing a URL", e))?;
        Ok(Some(url.to_string()))
    }

    /// Asked of the bucket every time, never of the remembered sizes: a push decides by it
    /// whether to upload, and gc may have just removed the blob.
    fn exists(&self, digest: &str) -> bool {
        let (s, key) = (self.inner.store.clone(), self.blob_key(digest));
        matches!(self.wait(async move { s.head(&key).await }), Ok(Ok(_)))
    }

    fn read(&self, digest: &str, start: u64) -> Result<Box<dyn Read + Send>, StoreError> {
        let size = self
            .size(digest)?
            .ok_or_else(|| StoreError::BlobMissing(digest.to_string()))?;
        Ok(Box::new(RangeReader {
            blobs: self.clone(),
            key: self.blob_key(digest),
            name: digest.to_string(),
            pos: start.min(size),
            end: size,
            buf: Bytes::new(),
        }))
    }

    fn read_range(
        &self,
        digest: &str,
        start: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, StoreError> {
        let size = self
            .size(digest)?
            .ok_or_else(|| StoreError::BlobMissing(digest.to_string()))?;
        let start = start.min(size);
        let end = start.saturating_add(len).min(size);
        let bytes = if end > start {
            self.range(digest, start, end - start)?
        } else {
            Bytes::new()
        };
        Ok(Box::new(std::io::Cursor::new(bytes)))
    }

    fn map(&self, digest: &str, start: u64, len: usize) -> Result<Option<Bytes>, StoreError> {
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let b = self.range(digest, start, len as u64)?;
        if b.len() != len {
            return Err(StoreError::SizeMismatch {
                digest: digest.to_string(),
                declared: start + len as u64,
                actual: start + b.len() as u64,
            });
        }
        Ok(Some(b))
    }

    /// Each chunk is a request: large ones, so a pull is not a string of round trips.
    fn map_chunk(&self) -> usize {
        8 << 20
    }

    fn stage_removal(&self, digest: &str) -> Result<Option<Staged>, StoreError> {
        self.forget(digest);
        let (s, from, to) = (
            self.inner.store.clone(),
            self.blob_key(digest),
            self.trash_key(digest),
        );
        let t2 = to.clone();
        let moved = self.wait(async move {
            let size = match s.head(&from).await {
                Ok(m) => m.size,
                Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(e),
            };
            copy_object(&s, &from, size, &to, Vec::new()).await?;
            s.delete(&from).await.map(|()| true)
        })?;
        match moved {
            Ok(true) => Ok(Some(Staged::key(t2.to_string()))),
            Ok(false) => Ok(None),
            Err(e) => Err(s3_err("staging a removal", e)),
        }
    }

    fn finish_removal(&self, staged: Staged) {
        let (s, key) = (self.inner.store.clone(), Key::from(staged.name()));
        if let Ok(Err(e)) = self.wait(async move { s.delete(&key).await }) {
            tracing::warn!(error = %e, "removing a staged blob from object storage");
        }
    }

    fn list(&self) -> Result<Vec<(String, SystemTime)>, StoreError> {
        Ok(self
            .list_under("blobs", "listing blobs")?
            .into_iter()
            .filter_map(|m| {
                // .../blobs/<alg>/<2 hex>/<hex>
                let parts: Vec<&str> = m.location.as_ref().rsplitn(3, '/').collect();
                let (hex, alg) = (parts.first()?, parts.get(2)?.rsplit('/').next()?);
                Some((format!("{alg}:{hex}"), SystemTime::from(m.last_modified)))
            })
            .collect())
    }

    fn recover(
        &self,
        keep: &mut dyn FnMut(&str) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let spool = &self.inner.spool;
        for e in fs::read_dir(spool).map_err(io_err(spool))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let staged = self.list_under("trash", "listing staged removals")?;
        for key in staged.into_iter().map(|m| m.location) {
            let Some(name) = key.filename().map(str::to_string) else {
                continue;
            };
            let digest = match name.split_once('-') {
                Some((alg, hex)) => format!("{alg}:{hex}"),
                None => continue,
            };
            let s = self.inner.store.clone();
            let dest = self.blob_key(&digest);
            self.forget(&digest);
            let restore = keep(&digest)? && !self.exists(&digest);
            let r = self.wait(async move {
                if restore {
                    s.copy(&key, &dest).await?;
                }
                s.delete(&key).await
            })?;
            r.map_err(|e| s3_err("recovering a staged removal", e))?;
            if restore {
                tracing::warn!(%digest, "restored blob from an interrupted gc");
            }
        }
        Ok(())
    }
}

/// Reads an object (a blob, a completed upload) by ranged GETs of a few MiB.
struct RangeReader {
    blobs: S3Blobs,
    key: Key,
    name: String,
    pos: u64,
    end: u64,
    buf: Bytes,
}

impl Read for RangeReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.end {
                return Ok(0);
            }
            let len = (self.end - self.pos).min(4 << 20);
            self.buf = self
                .blobs
                .range_of(&self.key, &self.name, self.pos, len)
                .map_err(std::io::Error::other)?;
            if self.buf.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "blob shorter than its size",
                ));
            }
            self.pos += self.buf.len() as u64;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// Where an upload that another server may carry on stands, saved with its session: the
/// parts of a multipart upload to `uploads/<id>/data` hold its first `base` bytes (whole
/// [`PART`]s), the object `tail` the rest, up to `len`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    id: String,
    multipart: Option<String>,
    /// The parts' ids (ETags), in order.
    parts: Vec<String>,
    base: u64,
    len: u64,
    tail: Option<String>,
}

impl Checkpoint {
    /// A state read back from the database, checked before any key is made of it.
    fn parse(state: &str) -> Result<Checkpoint, StoreError> {
        let bad = |why: &str| StoreError::Corrupt(format!("an upload's saved state: {why}"));
        let cp: Checkpoint = serde_json::from_str(state).map_err(|_| bad("not readable"))?;
        let hex =
            |v: &str| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(&cp.id)
            || cp.base != cp.parts.len() as u64 * PART as u64
            || cp.len < cp.base
            || cp.len - cp.base >= PART as u64
            || (!cp.parts.is_empty() && cp.multipart.is_none())
            || cp.tail.is_some() != (cp.len > cp.base)
            || cp
                .tail
                .as_deref()
                .is_some_and(|t| !t.starts_with("tail-") || !hex(&t[5..]))
        {
            return Err(bad("inconsistent"));
        }
        Ok(cp)
    }
}

/// An upload checkpointed to the bucket (or carried on from a checkpoint).
struct Durable {
    cp: Checkpoint,
    /// The multipart upload is complete: `uploads/<id>/data` holds the upload's first
    /// `data_len` bytes (a layer above may write after reading them back: its last chunk).
    done: bool,
    data_len: u64,
    /// Carried on from another server's checkpoint: the spool lacks the first `base` bytes.
    resumed: bool,
    /// The tail the saved state named before the last checkpoint (removed at the next:
    /// by then the state naming its successor is saved).
    stale: Option<String>,
    /// What the bucket holds of it is not all known here (carried on, or a request to
    /// the bucket failed midway): its cleanup lists `uploads/<id>/`.
    unsure: bool,
}

/// Parts an upload sends at once.
const PARTS_IN_FLIGHT: usize = 4;

impl S3Blobs {
    fn upload_key(&self, id: &str, name: &str) -> Key {
        self.key(&format!("uploads/{id}/{name}"))
    }

    /// Removes what a checkpointed upload has in the bucket: its multipart upload, and
    /// the objects under `uploads/<id>/` — those named in `known`, or, without it, every
    /// one listed (its past unknown: carried on, abandoned, or a request failed midway).
    /// Best effort: what a failure leaves costs space, never correctness (a lifecycle
    /// rule on `uploads/` catches it, see the README).
    fn clean_up(&self, cp: &Checkpoint, known: Option<Vec<String>>) {
        let (s, data, under, multipart) = (
            self.inner.store.clone(),
            self.upload_key(&cp.id, "data"),
            self.key(&format!("uploads/{}", cp.id)),
            cp.multipart.clone(),
        );
        let known: Option<Vec<Key>> =
            known.map(|names| names.iter().map(|n| self.upload_key(&cp.id, n)).collect());
        let r = self.wait(async move {
            if let Some(id) = multipart {
                // Gone already once completed.
                let _ = s.abort_multipart(&data, &id).await;
            }
            let keys = match known {
                Some(keys) => keys,
                None => {
                    let mut keys = Vec::new();
                    let mut l = s.list(Some(&under));
                    while let Some(m) = l.next().await {
                        keys.push(m?.location);
                    }
                    keys
                }
            };
            for k in keys {
                match s.delete(&k).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        if let Ok(Err(e)) = r {
            tracing::warn!(upload = %cp.id, error = %e, "removing an upload's parts from object storage");
        }
    }
}

/// An upload spooled to a local file until its commit writes it to the bucket; where
/// servers share the registry, checkpointed to the bucket as it goes. Dropped, only its
/// spool goes: what it checkpointed stays for the server that may carry it on, until
/// [`BlobUpload::cancel`] or [`BlobStorage::abandon`].
struct S3Upload {
    spool: Spool,
    blobs: S3Blobs,
    durable: Mutex<Option<Durable>>,
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Refused("an upload's state is poisoned".into())
}

impl S3Upload {
    /// `len` bytes of the spool from `pos`.
    fn spooled(&self, pos: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; len as usize];
        self.spool
            .file
            .read_exact_at(&mut buf, pos)
            .map_err(io_err(&self.spool.path))?;
        Ok(buf)
    }

    /// The spool's length: every byte written (a carried-on upload's first `base` bytes
    /// are holes in it).
    fn written(&self) -> Result<u64, StoreError> {
        Ok(self
            .spool
            .file
            .metadata()
            .map_err(io_err(&self.spool.path))?
            .len())
    }

    /// Sends the spool's whole parts from `d`'s base up to `upto` (a multiple of [`PART`]
    /// past it), a few at a time, each read from the spool as it goes.
    fn put_parts(&self, d: &mut Durable, upto: u64) -> Result<(), StoreError> {
        let n = upto.saturating_sub(d.cp.base) / PART as u64;
        if n == 0 {
            return Ok(());
        }
        let (s, key) = (
            self.blobs.inner.store.clone(),
            self.blobs.upload_key(&d.cp.id, "data"),
        );
        if d.cp.multipart.is_none() {
            // Kept before any part goes, so a cancel aborts it whatever happens next.
            let (s, key) = (s.clone(), key.clone());
            let id = self
                .blobs
                .wait(async move { s.create_multipart(&key).await })?
                .map_err(|e| s3_err("starting an upload's parts", e))?;
            d.cp.multipart = Some(id);
        }
        let id = d.cp.multipart.clone().unwrap_or_default();
        let (file, path) = (
            self.spool
                .file
                .try_clone()
                .map_err(io_err(&self.spool.path))?,
            self.spool.path.clone(),
        );
        let (base, first) = (d.cp.base, d.cp.parts.len());
        let file = Arc::new(file);
        let ids = self.blobs.wait(async move {
            use futures_util::TryStreamExt;
            futures_util::stream::iter(0..n)
                .map(|i| {
                    let (s, key, id, file, path) = (
                        s.clone(),
                        key.clone(),
                        id.clone(),
                        file.clone(),
                        path.clone(),
                    );
                    async move {
                        let mut buf = vec![0u8; PART];
                        file.read_exact_at(&mut buf, base + i * PART as u64)
                            .map_err(io_err(&path))?;
                        s.put_part(&key, &id, first + i as usize, PutPayload::from(buf))
                            .await
                            .map(|p| p.content_id)
                            .map_err(|e| s3_err("uploading a part", e))
                    }
                })
                .buffered(PARTS_IN_FLIGHT)
                .try_collect::<Vec<String>>()
                .await
        })??;
        d.cp.parts.extend(ids);
        d.cp.base += n * PART as u64;
        Ok(())
    }

    /// Completes `d`'s multipart upload with every byte written so far (the last part
    /// the rest past the whole ones): `uploads/<id>/data` then holds them (once).
    fn complete(&self, d: &mut Durable) -> Result<(), StoreError> {
        if d.done {
            return Ok(());
        }
        let total = self.written()?;
        if total < d.cp.base {
            return Err(StoreError::Refused(
                "an upload was cut back past its checkpoint".into(),
            ));
        }
        // Whole parts while more than one part's worth is left; the last is 1..=PART.
        let whole = total.saturating_sub(d.cp.base).saturating_sub(1) / PART as u64;
        self.put_parts(d, d.cp.base + whole * PART as u64)?;
        let last = self.spooled(d.cp.base, total - d.cp.base)?;
        let (s, key) = (
            self.blobs.inner.store.clone(),
            self.blobs.upload_key(&d.cp.id, "data"),
        );
        let (id, mut parts) = (d.cp.multipart.clone(), d.cp.parts.clone());
        let made = self
            .blobs
            .wait(async move {
                let id = match id {
                    Some(id) => id,
                    None => s.create_multipart(&key).await?,
                };
                let index = parts.len();
                if !last.is_empty() || index == 0 {
                    match s.put_part(&key, &id, index, PutPayload::from(last)).await {
                        Ok(part) => parts.push(part.content_id),
                        Err(e) => return Ok((id, Err(e))),
                    }
                }
                let parts = parts
                    .into_iter()
                    .map(|content_id| PartId { content_id })
                    .collect();
                Ok::<_, object_store::Error>((
                    id.clone(),
                    s.complete_multipart(&key, &id, parts).await,
                ))
            })?
            .map_err(|e| s3_err("starting an upload's parts", e))?;
        d.cp.multipart = Some(made.0);
        if let Err(e) = made.1 {
            // It may have completed nonetheless: `data` may be there.
            d.unsure = true;
            return Err(s3_err("completing an upload's parts", e));
        }
        d.done = true;
        d.data_len = total;
        Ok(())
    }

    /// Writes the upload to `digest`'s key: from the spool when it holds every byte, else
    /// by completing its parts and copying them there (in the bucket; through this
    /// process with what was written after they were read back). May be called again
    /// (the checkpointed state stays until the upload is cancelled).
    fn store_as(&self, digest: &str) -> Result<(), StoreError> {
        let mut g = self.durable.lock().map_err(poisoned)?;
        let key = self.blobs.blob_key(digest);
        let Some(d) = g.as_mut().filter(|d| d.cp.base > 0 || d.done) else {
            return self.blobs.upload_file(&self.spool.path, key);
        };
        self.complete(d)?;
        let total = self.written()?;
        let after = total.saturating_sub(d.data_len);
        if after > PART as u64 {
            return Err(StoreError::Refused(
                "an upload grew by more than a part after it was read back".into(),
            ));
        }
        let extra = self.spooled(d.data_len, after)?;
        let (s, from, size) = (
            self.blobs.inner.store.clone(),
            self.blobs.upload_key(&d.cp.id, "data"),
            d.data_len,
        );
        self.blobs
            .wait(async move { copy_object(&s, &from, size, &key, extra).await })?
            .map_err(|e| s3_err("storing an upload", e))
    }
}

impl BlobUpload for S3Upload {
    fn write_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
        if let Ok(Some(d)) = self.durable.lock().as_deref() {
            if pos < d.cp.base || (d.done && pos < d.data_len) {
                return Err(std::io::Error::other(
                    "an upload's bytes in the bucket are not written again",
                ));
            }
        }
        self.spool.write_at(buf, pos)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if let Ok(Some(d)) = self.durable.lock().as_deref() {
            if len < d.cp.base || (d.done && len < d.data_len) {
                return Err(std::io::Error::other(
                    "an upload cannot be cut back past what is in the bucket",
                ));
            }
        }
        self.spool.set_len(len)
    }

    fn sync_some(&self) -> std::io::Result<()> {
        // Durability comes from the bucket at commit (or checkpoint); the spool needs none.
        Ok(())
    }

    /// The spool, or, for an upload whose first parts are in the bucket only (carried on
    /// from another server), its parts completed and read back; bytes written after that
    /// (a sealing layer's last chunk) go after them at the commit.
    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        let mut g = self
            .durable
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        match g.as_mut() {
            Some(d) if d.resumed && d.cp.base > 0 => {
                self.complete(d).map_err(std::io::Error::other)?;
                Ok(Box::new(RangeReader {
                    blobs: self.blobs.clone(),
                    key: self.blobs.upload_key(&d.cp.id, "data"),
                    name: format!("upload {}", d.cp.id),
                    pos: 0,
                    end: d.data_len,
                    buf: Bytes::new(),
                }))
            }
            _ => self.spool.reader(),
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        if let Ok(Some(d)) = self.durable.lock().as_deref() {
            if d.resumed && pos < d.cp.base {
                return Err(std::io::Error::other(
                    "an upload's first parts are in the bucket only",
                ));
            }
        }
        self.spool.file.read_exact_at(buf, pos)
    }

    fn checkpoint(&self, len: u64) -> Result<Option<String>, StoreError> {
        let mut g = self.durable.lock().map_err(poisoned)?;
        let d = g.get_or_insert_with(|| Durable {
            cp: Checkpoint {
                id: uuid::Uuid::new_v4().simple().to_string(),
                multipart: None,
                parts: Vec::new(),
                base: 0,
                len: 0,
                tail: None,
            },
            done: false,
            data_len: 0,
            resumed: false,
            stale: None,
            unsure: false,
        });
        if d.done || len < d.cp.base || len > self.written()? {
            return Err(StoreError::Refused(
                "the upload cannot be checkpointed there".into(),
            ));
        }
        let whole = (len - d.cp.base) / PART as u64;
        self.put_parts(d, d.cp.base + whole * PART as u64)?;
        // The tail the saved state names stays until the state naming its successor is
        // saved; the one before it goes now.
        let tail = (len > d.cp.base).then(|| format!("tail-{len:x}"));
        let stale = d
            .stale
            .take()
            .filter(|p| Some(p) != tail.as_ref())
            .map(|p| self.blobs.upload_key(&d.cp.id, &p));
        let bytes = self.spooled(d.cp.base, len - d.cp.base)?;
        let (s, key) = (
            self.blobs.inner.store.clone(),
            tail.as_ref().map(|t| self.blobs.upload_key(&d.cp.id, t)),
        );
        let put = self.blobs.wait(async move {
            let removed = match stale {
                Some(k) => matches!(
                    s.delete(&k).await,
                    Ok(()) | Err(object_store::Error::NotFound { .. })
                ),
                None => true,
            };
            let put = match key {
                Some(k) => s.put(&k, PutPayload::from(bytes)).await.map(|_| ()),
                None => Ok(()),
            };
            (removed, put)
        });
        let put = match put {
            Ok((removed, put)) => {
                // A tail not removed is under a name no state holds any more.
                d.unsure |= !removed;
                put.map_err(|e| s3_err("storing an upload's last bytes", e))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = put {
            // The tail may be there nonetheless, under a name no state holds.
            d.unsure = true;
            return Err(e);
        }
        d.stale = d.cp.tail.take().filter(|old| Some(old) != tail.as_ref());
        d.cp.tail = tail;
        d.cp.len = len;
        serde_json::to_string(&d.cp)
            .map(Some)
            .map_err(|e| StoreError::Refused(format!("an upload's state: {e}")))
    }

    fn commit(&self, digest: &str) -> Result<(), StoreError> {
        self.spool.seal();
        if self.blobs.exists(digest) {
            // The same bytes are stored already.
            return Ok(());
        }
        self.store_as(digest)
    }

    /// A PUT replaces an object whole: readers see the old bytes or the new.
    fn replace(&self, digest: &str) -> Result<(), StoreError> {
        self.spool.seal();
        self.blobs.forget(digest);
        let done = self.store_as(digest);
        self.blobs.forget(digest);
        done
    }

    fn cancel(&self) {
        self.spool.cancel();
        if let Ok(Some(d)) = self.durable.lock().map(|mut g| g.take()) {
            // What this server wrote, when it wrote all of it and nothing failed midway.
            let known = (!d.unsure).then(|| {
                [d.cp.tail.clone(), d.stale.clone()]
                    .into_iter()
                    .flatten()
                    .chain(d.done.then(|| "data".to_string()))
                    .collect()
            });
            self.blobs.clean_up(&d.cp, known);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two servers sharing a bucket (`scripts/with-s3` names one; without it, nothing to
    /// test against): an upload checkpointed by one, which then dies, is carried on and
    /// committed by the other, byte for byte; an abandoned one leaves nothing behind.
    #[test]
    fn a_checkpointed_upload_is_carried_on_by_another_server() {
        let Ok(bucket) = std::env::var("ACR_TASK_TEST_STORAGE") else {
            return;
        };
        let at = Location::parse(&format!("{bucket}/{}", uuid::Uuid::new_v4().simple())).unwrap();
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = S3Blobs::open(da.path(), &at, Some("shared".into())).unwrap();
        let b = S3Blobs::open(db.path(), &at, Some("shared".into())).unwrap();
        // One whole part and a tail, in three chunks (the last after the takeover).
        let data: Vec<u8> = (0..PART + 3000).map(|i| (i * 7 % 251) as u8).collect();
        let (one, two) = (1000, PART + 2000);
        let up = a.begin().unwrap();
        up.write_at(&data[..one], 0).unwrap();
        let first = up.checkpoint(one as u64).unwrap().unwrap();
        up.write_at(&data[one..two], one as u64).unwrap();
        let state = up.checkpoint(two as u64).unwrap().unwrap();
        // Only the saved state's tail is there (and the one before, until the next).
        let tails = |blobs: &S3Blobs| blobs.list_under("uploads", "listing").unwrap().len();
        assert_eq!(tails(&a), 2);
        drop(up); // its server dies: what the bucket holds stays
        assert!(b.resume("{}").is_err(), "a state is checked");
        let carried = b.resume(&state).unwrap().unwrap();
        carried.write_at(&data[two..], two as u64).unwrap();
        let mut back = Vec::new();
        carried.reader().unwrap().read_to_end(&mut back).unwrap();
        assert!(back == data, "the upload read back is what was written");
        let digest = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data))
        );
        carried.commit(&digest).unwrap();
        let stored = |blobs: &S3Blobs| {
            let mut stored = Vec::new();
            blobs
                .read(&digest, 0)
                .unwrap()
                .read_to_end(&mut stored)
                .unwrap();
            stored == data
        };
        assert!(stored(&b), "the committed blob is what was written");
        // A commit again (the store's answer to a gc racing it) stores the same bytes.
        let staged = b.stage_removal(&digest).unwrap().unwrap();
        b.finish_removal(staged);
        carried.commit(&digest).unwrap();
        assert!(stored(&a), "committed again, from the bucket");
        carried.cancel();
        assert_eq!(tails(&b), 0, "the upload's objects are removed");
        // Copied through this process by ranges, with bytes after it (as an object too
        // large to copy in one request is).
        let (s, from, to) = (b.inner.store.clone(), b.blob_key(&digest), b.key("copied"));
        let size = data.len() as u64;
        b.wait(async move { copy_object(&s, &from, size, &to, b"after".to_vec()).await })
            .unwrap()
            .unwrap();
        let copied = b.range_of(&b.key("copied"), "copied", 0, size + 5).unwrap();
        assert!(copied[..data.len()] == data[..] && &copied[data.len()..] == b"after");
        // An older state of the same upload cannot be carried on again.
        assert!(b.resume(&first).is_err());

        let up = a.begin().unwrap();
        up.write_at(&data, 0).unwrap();
        let state = up.checkpoint(data.len() as u64).unwrap().unwrap();
        drop(up);
        assert_eq!(tails(&a), 1);
        b.abandon(&state);
        assert_eq!(tails(&a), 0, "an abandoned upload leaves nothing");
        assert!(a.resume(&state).is_err());
    }

    #[test]
    fn locations_are_checked() {
        let l = Location::parse("s3://my-bucket/team/registry/").unwrap();
        assert_eq!(l.bucket, "my-bucket");
        assert_eq!(l.prefix, "team/registry");
        assert_eq!(l.url(), "s3://my-bucket/team/registry");
        assert_eq!(Location::parse("s3://b12").unwrap().prefix, "");
        for bad in [
            "gs://bucket",
            "s3://",
            "s3://UPPER",
            "s3://b",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
            "s3://bucket/a%20b",
            "s3://bucket/a~b",
        ] {
            let e = Location::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--storage"), "{bad}: {e}");
        }
    }
}
