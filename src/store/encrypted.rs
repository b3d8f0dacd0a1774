//! Encryption at rest as layers over the backends (distribution's storage middleware):
//! [`EncryptedBlobs`] wraps any [`BlobStorage`], [`EncryptedMeta`] any [`RegistryMeta`];
//! neither backend knows. Content stays named by its plaintext digest; pulls decrypt on
//! the fly, a ranged read only the chunks it covers (see [`super::crypt`]).
//!
//! While a store is being encrypted in place, content not yet sealed is read as it is;
//! once every blob and manifest is sealed (`required`), plaintext is refused as damage.
//! A blob counts as sealed only when its header names a data key the metadata holds, so
//! no content can pass for sealed by starting with the right bytes.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use super::crypt::{
    chunk_offset, file_dek_id, file_header, CryptError, Dek, DekId, KeyIndex, KeyRing, CHUNK,
    FILE_HEADER, OVERHEAD,
};
use super::meta::{Admit, Audit, ChangeProperties, ManifestInfo, ManifestRow, NewManifest};
use super::{BlobStorage, BlobUpload, GcReport, Reference, RegistryMeta, Staged, StoreError};

const NONCE_LEN: usize = 12;
const SEALED_CHUNK: usize = CHUNK + OVERHEAD;

impl From<CryptError> for StoreError {
    fn from(e: CryptError) -> StoreError {
        StoreError::Corrupt(format!("encrypted content: {e}"))
    }
}

/// The registry's keys, shared by the layers and replaced whole when keys change.
#[derive(Debug)]
pub struct Keys(RwLock<Arc<KeyRing>>);

impl Keys {
    pub fn new(ring: KeyRing) -> Arc<Keys> {
        Arc::new(Keys(RwLock::new(Arc::new(ring))))
    }

    pub fn ring(&self) -> Arc<KeyRing> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn replace(&self, ring: KeyRing) {
        match self.0.write() {
            Ok(mut g) => *g = Arc::new(ring),
            Err(p) => *p.into_inner() = Arc::new(ring),
        }
    }
}

/// Whether plaintext is refused (every piece of content is sealed).
pub type Required = Arc<AtomicBool>;

/// Blob storage whose content is sealed, over any other.
pub struct EncryptedBlobs {
    inner: Arc<dyn BlobStorage>,
    keys: Arc<Keys>,
    index: Arc<dyn KeyIndex>,
    required: Required,
    /// Data keys opened lately, by id (a pull asks for a blob's chunks many times; a
    /// rotation changes a key's wrapping, never the key).
    opened: Mutex<std::collections::HashMap<DekId, Arc<Dek>>>,
}

/// Data keys kept open at most.
const OPENED: usize = 1024;

/// What a blob file holds, by its header and the metadata.
enum Stored {
    /// Sealed with a data key the metadata holds.
    Sealed(DekId),
    Plaintext,
    /// A sealed header naming a key the metadata does not hold (lost in a crash before
    /// the blob was linked): unreadable, to be replaced.
    Orphan,
}

impl std::fmt::Debug for EncryptedBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedBlobs")
            .field("inner", &self.inner)
            .finish()
    }
}

fn io(e: StoreError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Reads until `buf` is full or the end: how many bytes were read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl EncryptedBlobs {
    pub fn new(
        inner: Arc<dyn BlobStorage>,
        keys: Arc<Keys>,
        index: Arc<dyn KeyIndex>,
        required: Required,
    ) -> EncryptedBlobs {
        EncryptedBlobs {
            inner,
            keys,
            index,
            required,
            opened: Mutex::new(Default::default()),
        }
    }

    /// The data key sealing `digest`'s content; `None` when it is stored as plaintext.
    fn dek_of(&self, digest: &str) -> Result<Option<Arc<Dek>>, StoreError> {
        let header = header_of(self.inner.as_ref(), digest)?;
        // A key opened lately needs no look-up (a pull asks for many ranges of a blob).
        if let Some(id) = file_dek_id(&header) {
            if let Some(d) = self.opened.lock().ok().and_then(|m| m.get(&id).cloned()) {
                return Ok(Some(d));
            }
        }
        let sealed = match classify(&header, self.index.as_ref())? {
            Stored::Sealed(id) => Some(self.open_dek(&id)?),
            Stored::Plaintext | Stored::Orphan => None,
        };
        if sealed.is_none() && self.required.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt(format!(
                "blob {digest} is stored unencrypted in a registry that encrypts everything: \
                 the blob storage was changed outside acr-task"
            )));
        }
        Ok(sealed)
    }

    fn open_dek(&self, id: &DekId) -> Result<Arc<Dek>, StoreError> {
        if let Some(d) = self.opened.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(d);
        }
        let Some((key_id, wrapped)) = self.index.get_dek(id)? else {
            return Err(StoreError::Corrupt(format!(
                "the data key {} is gone from the metadata",
                hex::encode(id)
            )));
        };
        let dek = Arc::new(self.keys.ring().unwrap(&key_id, id, &wrapped)?);
        if let Ok(mut m) = self.opened.lock() {
            if m.len() >= OPENED {
                m.clear();
            }
            m.insert(*id, dek.clone());
        }
        Ok(dek)
    }

    /// Seals a blob stored as plaintext, in place (the file is replaced whole, atomically,
    /// after its content was checked against `digest`). False when it was sealed already.
    pub fn seal_existing(&self, digest: &str) -> Result<bool, StoreError> {
        if self.dek_of(digest)?.is_some() {
            return Ok(false);
        }
        let alg = crate::digest::parse(digest)
            .map_err(|_| StoreError::Corrupt(format!("{digest} is not a digest")))?;
        let mut hasher = crate::digest::Hasher::new(alg);
        let mut src = self.inner.read(digest, 0)?;
        let up = self.begin_sealed()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            let n = read_full(&mut src, &mut buf).map_err(|e| StoreError::Io {
                path: digest.into(),
                source: e,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            up.write_at(&buf[..n], at).map_err(|e| StoreError::Io {
                path: digest.into(),
                source: e,
            })?;
            at += n as u64;
        }
        let actual = hasher.finish();
        if actual != digest {
            return Err(StoreError::Corrupt(format!(
                "blob {digest} hashes to {actual}: not sealed (run `acr-task registry fsck`)"
            )));
        }
        up.seal_into(digest, true)?;
        Ok(true)
    }

    fn begin_sealed(&self) -> Result<EncryptedUpload, StoreError> {
        let inner = self.inner.begin()?;
        let (dek, key_id, wrapped) = self.keys.ring().new_dek()?;
        inner
            .write_at(&file_header(&dek), 0)
            .map_err(|e| StoreError::Io {
                path: "upload".into(),
                source: e,
            })?;
        Ok(self.upload(inner, dek, key_id, wrapped, UpState::default()))
    }

    /// An upload of this layer over `inner`, sealed by `dek` (as wrapped by `key_id`).
    fn upload(
        &self,
        inner: Box<dyn BlobUpload>,
        dek: Dek,
        key_id: String,
        wrapped: Vec<u8>,
        state: UpState,
    ) -> EncryptedUpload {
        EncryptedUpload {
            inner,
            dek: Arc::new(dek),
            key_id,
            wrapped,
            index: self.index.clone(),
            storage: self.inner.clone(),
            required: self.required.clone(),
            state: Mutex::new(state),
        }
    }
}

impl BlobStorage for EncryptedBlobs {
    fn begin(&self) -> Result<Box<dyn BlobUpload>, StoreError> {
        Ok(Box::new(self.begin_sealed()?))
    }

    /// The layer under it carries on the header and whole chunks; the data key is
    /// unwrapped (and wrapped again by the current key, which a rotation since may have
    /// changed), and the plaintext after the whole chunks opened from its sealed copy.
    fn resume(&self, state: &str) -> Result<Option<Box<dyn BlobUpload>>, StoreError> {
        let bad = || StoreError::Corrupt("a sealed upload's saved state is not readable".into());
        let Ok(cp) = serde_json::from_str::<SealedCheckpoint>(state) else {
            // Begun before the store was sealed: carried on as it began (its commit is
            // sealed or not as every commit while a store is being sealed).
            return self.inner.resume(state);
        };
        let Some(inner) = self.inner.resume(&cp.inner)? else {
            return Ok(None);
        };
        let dek_id: DekId = hex::decode(&cp.dek)
            .ok()
            .and_then(|d| d.try_into().ok())
            .ok_or_else(bad)?;
        let wrapped = hex::decode(&cp.wrapped).map_err(|_| bad())?;
        let ring = self.keys.ring();
        let dek = ring.unwrap(&cp.key, &dek_id, &wrapped)?;
        let (key_id, wrapped) = ring.rewrap(&cp.key, &dek_id, &wrapped)?;
        let mut tail = hex::decode(&cp.tail).map_err(|_| bad())?;
        let n = dek.open_chunk(cp.full, false, &mut tail)?.len();
        if n >= CHUNK {
            return Err(bad());
        }
        let state = UpState {
            full: cp.full,
            tail: tail[NONCE_LEN..NONCE_LEN + n].to_vec(),
            committed: false,
        };
        Ok(Some(Box::new(
            self.upload(inner, dek, key_id, wrapped, state),
        )))
    }

    fn abandon(&self, state: &str) {
        match serde_json::from_str::<SealedCheckpoint>(state) {
            Ok(cp) => self.inner.abandon(&cp.inner),
            // Saved before the store was sealed: the layer under it made it.
            Err(_) => self.inner.abandon(state),
        }
    }

    fn exists(&self, digest: &str) -> bool {
        self.inner.exists(digest)
    }

    fn read(&self, digest: &str, start: u64) -> Result<Box<dyn Read + Send>, StoreError> {
        let Some(dek) = self.dek_of(digest)? else {
            return self.inner.read(digest, start);
        };
        let first = start / CHUNK as u64;
        Ok(Box::new(ChunkReader {
            inner: self.inner.read(digest, chunk_offset(first))?,
            dek,
            index: first,
            skip: (start % CHUNK as u64) as usize,
            plain: Vec::new(),
            at: 0,
            seen_last: false,
        }))
    }

    /// The plaintext of a range as one buffer: the chunks it covers are read at once and
    /// opened in place (one copy from the page cache, none after).
    fn map(
        &self,
        digest: &str,
        start: u64,
        len: usize,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        let Some(dek) = self.dek_of(digest)? else {
            return self.inner.map(digest, start, len);
        };
        if len == 0 {
            return Ok(Some(bytes::Bytes::new()));
        }
        let k0 = start / CHUNK as u64;
        let k1 = (start + len as u64 - 1) / CHUNK as u64;
        let want = ((k1 - k0 + 1) as usize) * SEALED_CHUNK;
        // Read straight into the buffer's spare room (no zeroing first).
        let mut buf = Vec::with_capacity(want);
        self.inner
            .read_range(digest, chunk_offset(k0), want as u64)?
            .read_to_end(&mut buf)
            .map_err(|e| StoreError::Io {
                path: digest.into(),
                source: e,
            })?;
        // Open each chunk in place and move its plaintext down to where it belongs.
        let (mut read_at, mut write_at, mut index) = (0usize, 0usize, k0);
        while read_at < buf.len() {
            let end = (read_at + SEALED_CHUNK).min(buf.len());
            let last = end - read_at < SEALED_CHUNK;
            let n = dek.open_chunk(index, last, &mut buf[read_at..end])?.len();
            buf.copy_within(read_at + NONCE_LEN..read_at + NONCE_LEN + n, write_at);
            write_at += n;
            read_at = end;
            index += 1;
            if last {
                break;
            }
        }
        let skip = (start - k0 * CHUNK as u64) as usize;
        if write_at < skip + len {
            return Err(StoreError::Io {
                path: digest.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "blob shorter than recorded",
                ),
            });
        }
        buf.truncate(skip + len);
        let bytes = bytes::Bytes::from(buf);
        Ok(Some(bytes.slice(skip..)))
    }

    /// A buffer each: 1 MiB keeps a pull's memory flat (the stream holds a few).
    fn map_chunk(&self) -> usize {
        // A buffer filled per chunk: small, unless the storage below pays per request and
        // asks for large ones (object storage).
        if self.inner.map_chunk() > 4 << 20 {
            8 << 20
        } else {
            1 << 20
        }
    }

    fn stage_removal(&self, digest: &str) -> Result<Option<Staged>, StoreError> {
        self.inner.stage_removal(digest)
    }

    fn finish_removal(&self, staged: Staged) {
        self.inner.finish_removal(staged)
    }

    fn list(&self) -> Result<Vec<(String, SystemTime)>, StoreError> {
        self.inner.list()
    }

    fn recover(
        &self,
        keep: &mut dyn FnMut(&str) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        self.inner.recover(keep)
    }
}

/// What `digest`'s file in `storage` holds, by its header and `index`.
fn stored(
    storage: &dyn BlobStorage,
    index: &dyn KeyIndex,
    digest: &str,
) -> Result<Stored, StoreError> {
    classify(&header_of(storage, digest)?, index)
}

/// The first bytes of `digest`'s file (fewer when it is shorter than a header).
fn header_of(storage: &dyn BlobStorage, digest: &str) -> Result<Vec<u8>, StoreError> {
    let mut r = storage.read_range(digest, 0, FILE_HEADER as u64)?;
    let mut header = vec![0u8; FILE_HEADER];
    let n = read_full(&mut r, &mut header).map_err(|e| StoreError::Io {
        path: digest.into(),
        source: e,
    })?;
    header.truncate(n);
    Ok(header)
}

fn classify(header: &[u8], index: &dyn KeyIndex) -> Result<Stored, StoreError> {
    Ok(match file_dek_id(header) {
        Some(id) if index.get_dek(&id)?.is_some() => Stored::Sealed(id),
        Some(_) => Stored::Orphan,
        None => Stored::Plaintext,
    })
}

/// Plaintext of a sealed blob from a chunk on, chunk by chunk.
struct ChunkReader {
    inner: Box<dyn Read + Send>,
    dek: Arc<Dek>,
    index: u64,
    /// Plaintext bytes of the first chunk before the start.
    skip: usize,
    plain: Vec<u8>,
    at: usize,
    seen_last: bool,
}

impl ChunkReader {
    /// The next chunk's plaintext into `self.plain`; false at the end.
    fn next_chunk(&mut self) -> std::io::Result<bool> {
        if self.seen_last {
            return Ok(false);
        }
        let mut buf = vec![0u8; SEALED_CHUNK];
        let n = read_full(&mut self.inner, &mut buf)?;
        if n == 0 {
            return Err(io(StoreError::Corrupt(
                "encrypted blob cut short (its last chunk is missing)".into(),
            )));
        }
        let last = n < SEALED_CHUNK;
        let len = self
            .dek
            .open_chunk(self.index, last, &mut buf[..n])
            .map_err(|e| io(e.into()))?
            .len();
        buf.truncate(NONCE_LEN + len);
        buf.drain(..NONCE_LEN);
        self.plain = buf;
        self.at = std::mem::take(&mut self.skip).min(self.plain.len());
        self.index += 1;
        self.seen_last = last;
        Ok(true)
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.plain.len() {
            if !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.plain.len() - self.at);
        out[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Where a sealed upload stands, for another server to carry it on: the checkpoint of
/// the layer under it (the header and the whole chunks), the data key as wrapped, and
/// the plaintext after the whole chunks (kept in memory, not in the file) sealed as
/// chunk `full`, all hex.
#[derive(serde::Serialize, serde::Deserialize)]
struct SealedCheckpoint {
    inner: String,
    dek: String,
    key: String,
    wrapped: String,
    full: u64,
    tail: String,
}

#[derive(Default)]
struct UpState {
    /// Full chunks written.
    full: u64,
    /// Plaintext after them, not written yet (less than a chunk).
    tail: Vec<u8>,
    committed: bool,
}

/// An upload sealed as it is written: whole chunks go to the inner upload, the rest waits
/// in memory (less than a chunk) until more comes or the commit seals it as the last.
struct EncryptedUpload {
    inner: Box<dyn BlobUpload>,
    dek: Arc<Dek>,
    key_id: String,
    wrapped: Vec<u8>,
    index: Arc<dyn KeyIndex>,
    /// The storage under the layer (to look at content already stored under a digest).
    storage: Arc<dyn BlobStorage>,
    required: Required,
    state: Mutex<UpState>,
}

impl EncryptedUpload {
    fn lock(&self) -> std::io::Result<std::sync::MutexGuard<'_, UpState>> {
        self.state
            .lock()
            .map_err(|_| std::io::Error::other("upload state poisoned"))
    }

    fn seal_err(e: CryptError) -> std::io::Error {
        std::io::Error::other(e.to_string())
    }

    /// Seals the last chunk and records the data key (once), then commits the inner
    /// upload under `digest`, in place of what is there when `replace`.
    fn seal_into(&self, digest: &str, replace: bool) -> Result<(), StoreError> {
        {
            let mut st = self.lock().map_err(|e| StoreError::Io {
                path: digest.into(),
                source: e,
            })?;
            if !st.committed {
                let mut out = Vec::with_capacity(st.tail.len() + OVERHEAD);
                self.dek.seal_chunk(st.full, true, &st.tail, &mut out)?;
                self.inner
                    .write_at(&out, chunk_offset(st.full))
                    .map_err(|e| StoreError::Io {
                        path: digest.into(),
                        source: e,
                    })?;
                // The key first: content is never there without the key that opens it
                // (durable now when the file replaces another in place; else with the
                // blob's link, which alone makes it visible).
                self.index
                    .put_dek(self.dek.id(), digest, &self.key_id, &self.wrapped, replace)?;
                st.committed = true;
            }
        }
        if replace {
            return self.inner.replace(digest);
        }
        // Content stored under the digest already is kept, if it can be read: not a file
        // whose key a crash lost before its link, nor plaintext where all is sealed.
        let unreadable = self.storage.exists(digest)
            && match stored(self.storage.as_ref(), self.index.as_ref(), digest) {
                Ok(Stored::Sealed(_)) => false,
                Ok(Stored::Plaintext) => self.required.load(Ordering::SeqCst),
                Ok(Stored::Orphan) => true,
                Err(StoreError::BlobMissing(_)) => false,
                Err(e) => return Err(e),
            };
        if unreadable {
            return self.inner.replace(digest);
        }
        self.inner.commit(digest)
    }
}

impl BlobUpload for EncryptedUpload {
    fn write_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
        let mut st = self.lock()?;
        if st.committed {
            return Err(std::io::Error::other("the upload is already committed"));
        }
        let len = st.full * CHUNK as u64 + st.tail.len() as u64;
        if pos != len {
            return Err(std::io::Error::other(format!(
                "an encrypted upload is written in order: at {len}, not {pos}"
            )));
        }
        let mut rest = buf;
        // Top up the tail to a whole chunk first.
        if !st.tail.is_empty() {
            let take = rest.len().min(CHUNK - st.tail.len());
            st.tail.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if st.tail.len() < CHUNK {
                return Ok(());
            }
        }
        let whole = rest.len() / CHUNK;
        let mut out = Vec::with_capacity((whole + 1) * SEALED_CHUNK);
        let mut index = st.full;
        if st.tail.len() == CHUNK {
            self.dek
                .seal_chunk(index, false, &st.tail, &mut out)
                .map_err(Self::seal_err)?;
            index += 1;
        }
        for c in rest[..whole * CHUNK].chunks(CHUNK) {
            self.dek
                .seal_chunk(index, false, c, &mut out)
                .map_err(Self::seal_err)?;
            index += 1;
        }
        if !out.is_empty() {
            self.inner.write_at(&out, chunk_offset(st.full))?;
            st.full = index;
            st.tail.clear();
        }
        st.tail.extend_from_slice(&rest[whole * CHUNK..]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut st = self.lock()?;
        let now = st.full * CHUNK as u64 + st.tail.len() as u64;
        if len == now {
            return Ok(());
        }
        if len > now {
            return Err(std::io::Error::other(
                "an encrypted upload is not extended by set_len",
            ));
        }
        let written = st.full * CHUNK as u64;
        if len >= written {
            st.tail.truncate((len - written) as usize);
            return Ok(());
        }
        // Cut back into the written chunks: keep the start of chunk k as the new tail.
        let k = len / CHUNK as u64;
        let mut chunk = vec![0u8; SEALED_CHUNK];
        self.inner
            .read_exact_at(&mut chunk, chunk_offset(k))
            .map_err(|_| std::io::Error::other("an upload's chunk is missing"))?;
        let n = self
            .dek
            .open_chunk(k, false, &mut chunk)
            .map_err(Self::seal_err)?
            .len();
        let keep = (len - k * CHUNK as u64) as usize;
        st.tail = chunk[NONCE_LEN..NONCE_LEN + n.min(keep)].to_vec();
        st.full = k;
        self.inner.set_len(chunk_offset(k))
    }

    fn sync_some(&self) -> std::io::Result<()> {
        self.inner.sync_some()
    }

    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        let st = self.lock()?;
        let mut inner = self.inner.reader()?;
        std::io::copy(
            &mut (&mut inner).take(FILE_HEADER as u64),
            &mut std::io::sink(),
        )?;
        let chunks = ChunkReader {
            inner: Box::new(inner.take(st.full * SEALED_CHUNK as u64)),
            dek: self.dek.clone(),
            index: 0,
            skip: 0,
            plain: Vec::new(),
            at: 0,
            seen_last: st.full == 0,
        };
        // The written chunks are all whole (none is the last): read exactly that many.
        Ok(Box::new(
            WholeChunks {
                r: chunks,
                left: st.full,
            }
            .chain(std::io::Cursor::new(st.tail.clone())),
        ))
    }

    fn commit(&self, digest: &str) -> Result<(), StoreError> {
        self.seal_into(digest, false)
    }

    fn checkpoint(&self, len: u64) -> Result<Option<String>, StoreError> {
        let st = self.lock().map_err(|e| StoreError::Io {
            path: "upload".into(),
            source: e,
        })?;
        let now = st.full * CHUNK as u64 + st.tail.len() as u64;
        if st.committed || len != now {
            return Err(StoreError::Refused(format!(
                "a sealed upload at {now} cannot be checkpointed at {len}"
            )));
        }
        let Some(inner) = self.inner.checkpoint(chunk_offset(st.full))? else {
            return Ok(None);
        };
        let mut tail = Vec::with_capacity(st.tail.len() + OVERHEAD);
        self.dek.seal_chunk(st.full, false, &st.tail, &mut tail)?;
        let cp = SealedCheckpoint {
            inner,
            dek: hex::encode(self.dek.id()),
            key: self.key_id.clone(),
            wrapped: hex::encode(&self.wrapped),
            full: st.full,
            tail: hex::encode(tail),
        };
        serde_json::to_string(&cp)
            .map(Some)
            .map_err(|e| StoreError::Refused(format!("a sealed upload's state: {e}")))
    }

    fn sealed(&self) -> bool {
        true
    }

    fn cancel(&self) {
        self.inner.cancel()
    }
}

/// Whole chunks of an upload (none of them the last), read through a [`ChunkReader`].
struct WholeChunks {
    r: ChunkReader,
    left: u64,
}

impl Read for WholeChunks {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.r.at >= self.r.plain.len() {
            if self.left == 0 {
                return Ok(0);
            }
            // Read exactly one whole chunk, known not to be the last.
            let mut buf = vec![0u8; SEALED_CHUNK];
            if read_full(&mut self.r.inner, &mut buf)? != SEALED_CHUNK {
                return Err(std::io::Error::other("an upload's chunk is missing"));
            }
            let n = self
                .r
                .dek
                .open_chunk(self.r.index, false, &mut buf)
                .map_err(|e| io(e.into()))?
                .len();
            buf.truncate(NONCE_LEN + n);
            buf.drain(..NONCE_LEN);
            self.r.plain = buf;
            self.r.at = 0;
            self.r.index += 1;
            self.left -= 1;
        }
        let n = out.len().min(self.r.plain.len() - self.r.at);
        out[..n].copy_from_slice(&self.r.plain[self.r.at..self.r.at + n]);
        self.r.at += n;
        Ok(n)
    }
}

/// Registry metadata whose manifest content is sealed, over any other.
pub struct EncryptedMeta {
    inner: Arc<dyn RegistryMeta>,
    keys: Arc<Keys>,
    required: Required,
}

impl EncryptedMeta {
    pub fn new(inner: Arc<dyn RegistryMeta>, keys: Arc<Keys>, required: Required) -> EncryptedMeta {
        EncryptedMeta {
            inner,
            keys,
            required,
        }
    }

    fn open(&self, what: &str, content: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        match self.keys.ring().open_bytes(&content)? {
            Some(plain) => Ok(plain),
            None if self.required.load(Ordering::SeqCst) => Err(StoreError::Corrupt(format!(
                "manifest {what} is stored unencrypted in a registry that encrypts everything"
            ))),
            None => Ok(content),
        }
    }

    fn open_row(&self, mut row: ManifestRow) -> Result<ManifestRow, StoreError> {
        row.content = self.open(&row.digest, std::mem::take(&mut row.content))?;
        Ok(row)
    }
}

impl RegistryMeta for EncryptedMeta {
    fn blob_size(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        self.inner.blob_size(digest)
    }

    fn blob_in_repo(&self, repo: &str, digest: &str) -> Result<Option<u64>, StoreError> {
        self.inner.blob_in_repo(repo, digest)
    }

    fn link_blob(
        &self,
        repo: &str,
        digest: &str,
        new_size: Option<u64>,
        admit: Admit<'_>,
        content: &mut dyn FnMut() -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        self.inner.link_blob(repo, digest, new_size, admit, content)
    }

    fn mount_blob(&self, repo: &str, from: &str, digest: &str) -> Result<bool, StoreError> {
        self.inner.mount_blob(repo, from, digest)
    }

    fn unlink_blob(&self, repo: &str, digest: &str) -> Result<bool, StoreError> {
        self.inner.unlink_blob(repo, digest)
    }

    fn put_manifest(
        &self,
        m: &NewManifest,
        events: &[String],
        admit: Admit<'_>,
    ) -> Result<(), StoreError> {
        let sealed = NewManifest {
            sealed: Some(self.keys.ring().seal_bytes(&m.content)?),
            ..m.clone()
        };
        self.inner.put_manifest(&sealed, events, admit)
    }

    fn get_manifest(
        &self,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<ManifestRow>, StoreError> {
        self.inner
            .get_manifest(repo, reference)?
            .map(|r| self.open_row(r))
            .transpose()
    }

    fn delete_manifest(
        &self,
        repo: &str,
        digest: &str,
        events: &mut dyn FnMut(&ManifestRow, &[String]) -> Vec<String>,
    ) -> Result<Option<(ManifestRow, Vec<String>)>, StoreError> {
        // The events read only the row's digest, type and size, never its content.
        self.inner.delete_manifest(repo, digest, events)
    }

    fn delete_tag(
        &self,
        repo: &str,
        tag: &str,
        events: &mut dyn FnMut(&str) -> Vec<String>,
    ) -> Result<Option<String>, StoreError> {
        self.inner.delete_tag(repo, tag, events)
    }

    fn delete_tags(
        &self,
        repo: &str,
        tags: &[(String, String)],
        events: super::meta::TagEvents<'_>,
    ) -> Result<Vec<String>, StoreError> {
        // The events read only the row's digest, type and size, never its content.
        self.inner.delete_tags(repo, tags, events)
    }

    fn delete_unreferenced(
        &self,
        repo: &str,
        digests: &[String],
        events: &mut dyn FnMut(&ManifestRow) -> Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.delete_unreferenced(repo, digests, events)
    }

    fn locks(&self, repo: &str) -> Result<Vec<super::meta::Lock>, StoreError> {
        self.inner.locks(repo)
    }

    fn set_lock(
        &self,
        repo: &str,
        tag: Option<&str>,
        a: super::meta::Attributes,
    ) -> Result<bool, StoreError> {
        self.inner.set_lock(repo, tag, a)
    }

    fn delete_repository(&self, repo: &str) -> Result<bool, StoreError> {
        self.inner.delete_repository(repo)
    }

    fn repository_exists(&self, repo: &str) -> Result<bool, StoreError> {
        self.inner.repository_exists(repo)
    }

    fn list_tags(
        &self,
        repo: &str,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Option<Vec<String>>, StoreError> {
        self.inner.list_tags(repo, n, last)
    }

    fn list_repositories(
        &self,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.list_repositories(n, last)
    }

    fn list_manifests(&self, repo: &str) -> Result<Option<Vec<ManifestInfo>>, StoreError> {
        self.inner.list_manifests(repo)
    }

    fn repo_view(&self, repo: &str) -> Result<Option<super::meta::RepoView>, StoreError> {
        self.inner.repo_view(repo)
    }

    fn referrers(&self, repo: &str, digest: &str) -> Result<Vec<ManifestRow>, StoreError> {
        self.inner
            .referrers(repo, digest)?
            .into_iter()
            .map(|r| self.open_row(r))
            .collect()
    }

    fn outbox_after(&self, seq: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        self.inner.outbox_after(seq, limit)
    }

    fn outbox_last(&self) -> Result<i64, StoreError> {
        self.inner.outbox_last()
    }

    fn outbox_prune(&self, before: i64) -> Result<usize, StoreError> {
        self.inner.outbox_prune(before)
    }

    fn gc(
        &self,
        cutoff: i64,
        dry_run: bool,
        blobs: &dyn BlobStorage,
    ) -> Result<GcReport, StoreError> {
        self.inner.gc(cutoff, dry_run, blobs)
    }

    fn audit(&self) -> Result<Audit, StoreError> {
        let mut a = self.inner.audit()?;
        for (_, digest, content) in &mut a.manifests {
            // What does not open stays as stored: fsck reports it as not its digest.
            if let Ok(plain) = self.open(digest, content.clone()) {
                *content = plain;
            }
        }
        Ok(a)
    }

    fn storage_used(&self) -> Result<u64, StoreError> {
        self.inner.storage_used()
    }

    fn properties(&self) -> Result<Option<String>, StoreError> {
        self.inner.properties()
    }

    fn set_properties(&self, change: ChangeProperties<'_>) -> Result<String, StoreError> {
        self.inner.set_properties(change)
    }

    fn manifest_contents(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        // As stored: what sealing and rotation work on.
        self.inner.manifest_contents(after, limit)
    }

    fn replace_manifest_content(
        &self,
        repo: &str,
        digest: &str,
        was: &[u8],
        now: &[u8],
    ) -> Result<bool, StoreError> {
        self.inner.replace_manifest_content(repo, digest, was, now)
    }
}

#[cfg(test)]
mod tests {
    use super::super::crypt::KeyRing;
    use super::super::{FsBlobs, SqliteMeta};
    use super::*;

    struct Rig {
        _dir: tempfile::TempDir,
        root: std::path::PathBuf,
        plain: Arc<dyn BlobStorage>,
        blobs: EncryptedBlobs,
        required: Required,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let plain: Arc<dyn BlobStorage> = Arc::new(FsBlobs::open(&root).unwrap());
        let index = Arc::new(SqliteMeta::open(&root.join("meta.db")).unwrap());
        let keys = Keys::new(KeyRing::parse(&KeyRing::generate_line().unwrap()).unwrap());
        let required: Required = Arc::new(AtomicBool::new(false));
        let blobs = EncryptedBlobs::new(plain.clone(), keys, index, required.clone());
        Rig {
            _dir: dir,
            root,
            plain,
            blobs,
            required,
        }
    }

    fn digest(data: &[u8]) -> String {
        crate::digest::of_bytes(crate::digest::Algorithm::Sha256, data)
    }

    fn content(n: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        if n >= 16 {
            v[..16].copy_from_slice(b"SECRET-PLAINTEXT");
        }
        v
    }

    fn put(blobs: &dyn BlobStorage, data: &[u8], piece: usize) -> String {
        let d = digest(data);
        let up = blobs.begin().unwrap();
        let mut at = 0;
        for c in data.chunks(piece.max(1)) {
            up.write_at(c, at).unwrap();
            at += c.len() as u64;
        }
        let mut back = Vec::new();
        up.reader().unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, data, "the upload reads back as written");
        up.commit(&d).unwrap();
        d
    }

    fn file_of(r: &Rig, d: &str) -> std::path::PathBuf {
        r.root.join("blobs/sha256").join(&d[7..9]).join(&d[7..])
    }

    #[test]
    fn sealed_blobs_read_back_whole_and_by_range_at_every_size() {
        let r = rig();
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5] {
            let data = content(n);
            let d = put(&r.blobs, &data, 7000);
            let raw = std::fs::read(file_of(&r, &d)).unwrap();
            assert!(raw.starts_with(super::super::crypt::MAGIC), "{n}");
            assert!(
                !raw.windows(16).any(|w| w == b"SECRET-PLAINTEXT"),
                "plaintext on disk at size {n}"
            );
            let mut all = Vec::new();
            r.blobs.read(&d, 0).unwrap().read_to_end(&mut all).unwrap();
            assert_eq!(all, data, "size {n}");
            for start in [0, 1, CHUNK as u64 - 1, CHUNK as u64, n as u64] {
                if start > n as u64 {
                    continue;
                }
                let mut part = Vec::new();
                r.blobs
                    .read(&d, start)
                    .unwrap()
                    .read_to_end(&mut part)
                    .unwrap();
                assert_eq!(part, data[start as usize..], "size {n} from {start}");
                let len = (n - start as usize).min(CHUNK + 3);
                let mapped = r.blobs.map(&d, start, len).unwrap().unwrap();
                assert_eq!(&mapped[..], &data[start as usize..start as usize + len]);
            }
            assert!(r.blobs.map(&d, 0, n + 1).is_err(), "past the end");
        }
    }

    #[test]
    fn a_cut_back_upload_goes_on_from_the_cut() {
        let r = rig();
        let data = content(3 * CHUNK + 100);
        let up = r.blobs.begin().unwrap();
        up.write_at(&data, 0).unwrap();
        // A failed chunk is cut back into the written chunks, then sent again.
        let cut = CHUNK as u64 + 17;
        up.set_len(cut).unwrap();
        assert!(up.write_at(b"x", cut + 1).is_err(), "out of order");
        up.write_at(&data[cut as usize..], cut).unwrap();
        let d = digest(&data);
        up.commit(&d).unwrap();
        let mut all = Vec::new();
        r.blobs.read(&d, 0).unwrap().read_to_end(&mut all).unwrap();
        assert_eq!(all, data);
    }

    #[test]
    fn changed_or_cut_content_is_refused() {
        let r = rig();
        let data = content(2 * CHUNK + 10);
        let d = put(&r.blobs, &data, CHUNK);
        let path = file_of(&r, &d);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[FILE_HEADER + CHUNK + OVERHEAD + 40] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let mut out = Vec::new();
        assert!(r.blobs.read(&d, 0).unwrap().read_to_end(&mut out).is_err());
        assert!(r.blobs.map(&d, CHUNK as u64, 10).is_err());
        // Without its last chunk (cut at a chunk boundary): refused at the end.
        std::fs::write(&path, &good[..FILE_HEADER + 2 * (CHUNK + OVERHEAD)]).unwrap();
        let mut out = Vec::new();
        let e = r
            .blobs
            .read(&d, 0)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
    }

    #[test]
    fn plaintext_is_read_until_sealed_in_place_then_refused() {
        let r = rig();
        let data = content(CHUNK + 9);
        let d = put(r.plain.as_ref(), &data, 4096);
        let mut all = Vec::new();
        r.blobs.read(&d, 0).unwrap().read_to_end(&mut all).unwrap();
        assert_eq!(all, data, "plaintext read as it is while encrypting");
        // Plaintext that starts like a sealed file is still plaintext (no such key).
        let mut fake = super::super::crypt::MAGIC.to_vec();
        fake.extend_from_slice(&[7u8; 16]);
        fake.extend_from_slice(b"more");
        let fd = put(r.plain.as_ref(), &fake, 100);
        assert!(
            r.blobs.seal_existing(&fd).unwrap(),
            "sealed like any plaintext"
        );
        assert!(r.blobs.seal_existing(&d).unwrap());
        assert!(!r.blobs.seal_existing(&d).unwrap(), "once");
        let raw = std::fs::read(file_of(&r, &d)).unwrap();
        assert!(!raw.windows(16).any(|w| w == b"SECRET-PLAINTEXT"));
        for (dg, want) in [(&d, &data), (&fd, &fake)] {
            let mut all = Vec::new();
            r.blobs.read(dg, 0).unwrap().read_to_end(&mut all).unwrap();
            assert_eq!(&all, want);
        }
        // A sealed file whose key is not in the metadata (lost before its link) is
        // replaced by the next upload of that content, never kept unreadable.
        let again = content(3000);
        let ad = digest(&again);
        let mut orphan = super::super::crypt::MAGIC.to_vec();
        orphan.extend_from_slice(&[9u8; 16 + 200]);
        let path = file_of(&r, &ad);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &orphan).unwrap();
        put(&r.blobs, &again, 1000);
        let mut back = Vec::new();
        r.blobs
            .read(&ad, 0)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, again);
        r.required.store(true, Ordering::SeqCst);
        let late = put(r.plain.as_ref(), b"written around the layer", 5);
        let e = r.blobs.read(&late, 0).err().unwrap().to_string();
        assert!(e.contains("stored unencrypted"), "{e}");
    }
}
