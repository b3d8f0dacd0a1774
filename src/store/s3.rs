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
//! [`BlobStorage`] is synchronous (the store's callers run it on blocking threads); this
//! backend runs its requests on a small runtime of its own and waits for them, so it works
//! from any thread, inside another runtime or not.

use std::fs;
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use super::blobs::{BlobStorage, BlobUpload, Spool, Staged};
use super::{io_err, StoreError};

/// Blobs up to this size go in one PUT; larger ones in parts of this size.
const PART: usize = 8 << 20;

/// The largest object S3 copies in one request (5 GB); larger ones are streamed.
const COPY_MAX: u64 = 5_000_000_000;

/// Copies `from` to `to` through this process, in parts (objects over [`COPY_MAX`]).
async fn copy_streamed(s: &AmazonS3, from: &Key, to: &Key) -> Result<(), object_store::Error> {
    let mut body = s.get(from).await?.into_stream();
    let mut w = WriteMultipart::new_with_chunk_size(s.put_multipart(to).await?, PART);
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = w.abort().await;
                return Err(e);
            }
        };
        if let Err(e) = w.wait_for_capacity(4).await {
            let _ = w.abort().await;
            return Err(e);
        }
        w.write(&chunk);
    }
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
        let (s, key, d) = (
            self.inner.store.clone(),
            self.blob_key(digest),
            digest.to_string(),
        );
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
        }))
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
            digest: digest.to_string(),
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
            if size <= COPY_MAX {
                s.copy(&from, &to).await?;
            } else {
                copy_streamed(&s, &from, &to).await?;
            }
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

/// Reads a blob by ranged GETs of a few MiB.
struct RangeReader {
    blobs: S3Blobs,
    digest: String,
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
                .range(&self.digest, self.pos, len)
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

/// An upload spooled to a local file until its commit writes it to the bucket.
struct S3Upload {
    spool: Spool,
    blobs: S3Blobs,
}

impl BlobUpload for S3Upload {
    fn write_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
        self.spool.write_at(buf, pos)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.spool.set_len(len)
    }

    fn sync_some(&self) -> std::io::Result<()> {
        // Durability comes from the bucket at commit; the spool needs none.
        Ok(())
    }

    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        self.spool.reader()
    }

    fn commit(&self, digest: &str) -> Result<(), StoreError> {
        self.spool.seal();
        if self.blobs.exists(digest) {
            // The same bytes are stored already.
            return Ok(());
        }
        self.blobs
            .upload_file(&self.spool.path, self.blobs.blob_key(digest))
    }

    /// A PUT replaces an object whole: readers see the old bytes or the new.
    fn replace(&self, digest: &str) -> Result<(), StoreError> {
        self.spool.seal();
        self.blobs.forget(digest);
        let done = self
            .blobs
            .upload_file(&self.spool.path, self.blobs.blob_key(digest));
        self.blobs.forget(digest);
        done
    }

    fn cancel(&self) {
        self.spool.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
