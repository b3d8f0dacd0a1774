//! Encryption at rest, the store's side: where the registry key comes from (a key file
//! acr-task keeps in the registry directory, or the operator's), the encrypting layers
//! put over the managed store at open, and the two long jobs — sealing a store that was
//! not encrypted, in place and online, and re-wrapping every data key with a new
//! registry key (rotation) without rewriting any content. Both record their progress in
//! the registry's settings and resume where they stopped.
//!
//! A key that does not match the data stops the open with the reason: content is never
//! served from a wrong key, and never as garbage.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::crypt::{KeyIndex, KeyRing};
use super::encrypted::{EncryptedBlobs, EncryptedMeta, Keys, Required};
use super::{io_err, sync_dir, Backends, BlobStorage, FsBlobs, ManagedMeta, Store, StoreError};
use crate::tier::{Encryption, KeySource, Progress, Properties};

/// The key file acr-task keeps (a managed key), in the registry directory.
pub const MANAGED_KEY_FILE: &str = "encryption.keys";
/// The environment variable naming a customer-managed key file.
pub const KEY_FILE_ENV: &str = "ACR_TASK_ENCRYPTION_KEY_FILE";

static CUSTOMER_KEY_FILE: OnceLock<PathBuf> = OnceLock::new();

/// This process's customer-managed key file (`serve --encryption-key-file`); set once,
/// before any store opens. Without it, [`KEY_FILE_ENV`] names one.
pub fn set_customer_key_file(path: PathBuf) {
    let _ = CUSTOMER_KEY_FILE.set(path);
}

/// Whether this process was given a customer-managed key file.
pub fn customer_key_given() -> bool {
    customer_key_file().is_some()
}

fn customer_key_file() -> Option<PathBuf> {
    CUSTOMER_KEY_FILE
        .get()
        .cloned()
        .or_else(|| std::env::var_os(KEY_FILE_ENV).map(PathBuf::from))
}

fn refused(m: String) -> StoreError {
    StoreError::Refused(m)
}

fn read_ring(path: &Path, what: &str) -> Result<KeyRing, StoreError> {
    let text = fs::read_to_string(path)
        .map_err(|e| refused(format!("the {what} {} cannot be read: {e}", path.display())))?;
    parse_ring(&text, &format!("the {what} {}", path.display()))
}

fn parse_ring(text: &str, place: &str) -> Result<KeyRing, StoreError> {
    KeyRing::parse(text).map_err(|e| {
        refused(format!(
            "{place} is not a key file ({e}): one base64 key of 32 bytes per line, \
             the current first (`openssl rand -base64 32` makes one)"
        ))
    })
}

/// A managed key ring's text (None before one is made) and where it is: the registry
/// directory's key file, or the database of a registry shared by several servers (which
/// have no directory in common).
fn managed_ring_text(
    root: &Path,
    side: &dyn ManagedMeta,
) -> Result<(Option<String>, String), StoreError> {
    if let Some(k) = side.key_ring()? {
        return Ok((k.text, k.place));
    }
    let path = root.join(MANAGED_KEY_FILE);
    let place = format!("the registry's key file {}", path.display());
    match fs::read_to_string(&path) {
        Ok(t) => Ok((Some(t), place)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((None, place)),
        Err(e) => Err(refused(format!("{place} cannot be read: {e}"))),
    }
}

/// Keeps a managed key ring where [`managed_ring_text`] reads it; unless `replace`, a
/// ring made first by another process stays.
fn put_managed_ring(
    root: &Path,
    side: &dyn ManagedMeta,
    text: &str,
    replace: bool,
) -> Result<(), StoreError> {
    if side.put_key_ring(text, replace)? {
        return Ok(());
    }
    write_key_file(&root.join(MANAGED_KEY_FILE), text, replace)
}

/// The managed key ring, which must exist.
fn managed_ring(root: &Path, side: &dyn ManagedMeta) -> Result<(KeyRing, String), StoreError> {
    let (text, place) = managed_ring_text(root, side)?;
    let Some(text) = text else {
        return Err(refused(format!(
            "{place} cannot be read: it is missing, and the registry's data is not served \
             without its key"
        )));
    };
    Ok((parse_ring(&text, &place)?, place))
}

/// Writes a key file whole (owner-only), in place of any: a temporary, fsync'd, renamed.
fn write_key_file(path: &Path, text: &str, replace: bool) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".keys-{}", uuid::Uuid::new_v4().simple()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let done = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| {
            if replace {
                fs::rename(&tmp, path)
            } else {
                // Never over another process's key: the first one made wins.
                fs::hard_link(&tmp, path).and_then(|()| fs::remove_file(&tmp))
            }
        });
    if let Err(e) = done {
        let _ = fs::remove_file(&tmp);
        if !replace && e.kind() == std::io::ErrorKind::AlreadyExists {
            return Ok(());
        }
        return Err(io_err(path)(e));
    }
    sync_dir(dir)
}

/// The ring of a registry's keys from where its settings say they are.
fn load_ring(
    root: &Path,
    side: &dyn ManagedMeta,
    source: KeySource,
) -> Result<(KeyRing, String), StoreError> {
    match source {
        KeySource::Managed => managed_ring(root, side),
        KeySource::CustomerManaged => {
            let Some(path) = customer_key_file() else {
                return Err(refused(format!(
                    "the registry's data is encrypted with a customer-managed key: give its key \
                     file with --encryption-key-file or {KEY_FILE_ENV}"
                )));
            };
            let ring = read_ring(&path, "customer-managed key file")?;
            Ok((ring, path.display().to_string()))
        }
    }
}

/// Encryption for a store that has none yet: the operator's key if one is given, else a
/// key made now and kept in the registry directory. `complete`: nothing stored yet.
pub(crate) fn new_encryption(
    root: &Path,
    side: &dyn ManagedMeta,
    complete: bool,
) -> Result<Encryption, StoreError> {
    let (source, ring) = match customer_key_file() {
        Some(path) => (
            KeySource::CustomerManaged,
            read_ring(&path, "customer-managed key file")?,
        ),
        None => {
            if managed_ring_text(root, side)?.0.is_none() {
                let line = KeyRing::generate_line()?;
                put_managed_ring(root, side, &format!("{line}\n"), false)?;
            }
            (KeySource::Managed, managed_ring(root, side)?.0)
        }
    };
    Ok(Encryption {
        key_source: source,
        key_id: ring.current().id().to_string(),
        complete,
        rotating_from: None,
        progress: None,
        error: None,
    })
}

/// The layers of an encrypted store, shared with the jobs that change its keys.
pub(crate) struct Crypto {
    keys: Arc<Keys>,
    required: Required,
    blobs: Arc<EncryptedBlobs>,
}

/// The managed backends for these settings: plain, or under the encrypting layers once
/// the key given matches every key the data is sealed with.
pub(crate) fn managed_backends(
    root: &Path,
    side: &Arc<dyn ManagedMeta>,
    enc: Option<&Encryption>,
    objects: Option<&str>,
) -> Result<(Arc<Backends>, Option<Crypto>), StoreError> {
    let fs_blobs: Arc<dyn BlobStorage> = match objects {
        Some(url) => Arc::new(super::s3::S3Blobs::open(
            root,
            &super::s3::Location::parse(url)?,
            side.shared_id()?,
        )?),
        None => Arc::new(FsBlobs::open(root)?),
    };
    let Some(e) = enc else {
        return Ok((
            Arc::new(Backends {
                blobs: fs_blobs,
                meta: side.clone(),
            }),
            None,
        ));
    };
    let (ring, place) = load_ring(root, side.as_ref(), e.key_source)?;
    check_ring(&ring, &place, e, side.as_ref())?;
    let keys = Keys::new(ring);
    let required: Required = Arc::new(AtomicBool::new(e.complete));
    let blobs = Arc::new(EncryptedBlobs::new(
        fs_blobs,
        keys.clone(),
        side.clone(),
        required.clone(),
    ));
    let meta = Arc::new(EncryptedMeta::new(
        side.clone(),
        keys.clone(),
        required.clone(),
    ));
    Ok((
        Arc::new(Backends {
            blobs: blobs.clone(),
            meta,
        }),
        Some(Crypto {
            keys,
            required,
            blobs,
        }),
    ))
}

/// Every key the data needs is in the ring, or the reason why not.
fn check_ring(
    ring: &KeyRing,
    place: &str,
    e: &Encryption,
    index: &dyn KeyIndex,
) -> Result<(), StoreError> {
    let mut needed = vec![e.key_id.clone()];
    needed.extend(e.rotating_from.clone());
    needed.extend(index.dek_key_ids()?);
    needed.dedup();
    for id in needed {
        if ring.get(&id).is_none() {
            return Err(refused(format!(
                "the registry's data is encrypted with key {id}, which {place} does not hold \
                 (it holds {}): give the right key file; nothing is served without it",
                ring.ids().join(", ")
            )));
        }
    }
    Ok(())
}

/// A job asked to stop (the registry stops): it resumes at the next start.
fn stopped(stop: &AtomicBool) -> Result<(), StoreError> {
    if stop.load(Ordering::SeqCst) {
        return Err(refused("stopped; it resumes at the next start".into()));
    }
    Ok(())
}

/// How far a job is, saved to the settings now and then.
struct Meter<'a> {
    store: &'a Store,
    progress: Progress,
    started: Instant,
    saved: Instant,
    report: &'a dyn Fn(&Progress),
    rotation: bool,
}

impl<'a> Meter<'a> {
    fn new(store: &'a Store, total: u64, report: &'a dyn Fn(&Progress), rotation: bool) -> Self {
        Meter {
            store,
            progress: Progress {
                objects_total: total,
                ..Progress::default()
            },
            started: Instant::now(),
            saved: Instant::now() - Duration::from_secs(1),
            report,
            rotation,
        }
    }

    fn step(&mut self, bytes: u64, changed: bool) -> Result<(), StoreError> {
        let p = &mut self.progress;
        p.objects_done += 1;
        p.bytes_done += bytes;
        if changed {
            p.bytes_copied += bytes;
        }
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = p.objects_done as f64 / secs;
        p.bytes_per_second = (p.bytes_done as f64 / secs) as u64;
        p.eta_seconds = (rate > 0.0)
            .then(|| (p.objects_total.saturating_sub(p.objects_done) as f64 / rate).ceil() as u64);
        (self.report)(p);
        if self.saved.elapsed() >= Duration::from_millis(500) {
            self.saved = Instant::now();
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), StoreError> {
        let progress = self.progress;
        let rotation = self.rotation;
        self.store.update_properties(|p, _| {
            let mut p = p.clone();
            if let Some(e) = p.encryption.as_mut() {
                if (rotation && e.rotating_from.is_some()) || (!rotation && !e.complete) {
                    e.progress = Some(progress);
                    e.error = None;
                }
            }
            Ok(p)
        })?;
        Ok(())
    }
}

/// What one encryption job did.
#[derive(Debug, Clone, Default)]
pub struct JobReport {
    pub progress: Progress,
    /// Blobs and manifests sealed, or data keys and manifests re-wrapped.
    pub changed: u64,
    pub elapsed: Duration,
}

impl Store {
    /// The store's encrypting layers now, if it is encrypted.
    fn crypto(&self) -> Option<(Arc<Keys>, Required, Arc<EncryptedBlobs>)> {
        let g = self.crypto.read().ok()?;
        g.as_ref()
            .map(|c| (c.keys.clone(), c.required.clone(), c.blobs.clone()))
    }

    /// Brings the layers in line with the settings (another process may have changed
    /// them: an encryption enabled, a key rotated): layers put on, a key ring re-read.
    pub fn sync_encryption(&self) -> Result<(), StoreError> {
        let p = self.properties()?;
        let Some(e) = p.encryption.as_ref() else {
            return Ok(());
        };
        match self.crypto() {
            None => {
                let (backends, crypto) =
                    managed_backends(&self.root, &self.side, Some(e), p.object_storage.as_deref())?;
                self.set_managed(backends, crypto);
            }
            Some((keys, required, _)) => {
                let ring = keys.ring();
                let missing = ring.get(&e.key_id).is_none()
                    || e.rotating_from
                        .as_ref()
                        .is_some_and(|k| ring.get(k).is_none());
                if missing {
                    let (ring, place) = load_ring(&self.root, self.side.as_ref(), e.key_source)?;
                    check_ring(&ring, &place, e, self.side.as_ref())?;
                    keys.replace(ring);
                }
                required.store(e.complete, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// `registry encryption enable`: from now on everything new is sealed, and what is
    /// stored gets sealed in place by [`Store::seal_in_place`]. Nothing when already on.
    pub fn enable_encryption(&self) -> Result<Properties, StoreError> {
        let (root, side) = (self.root.clone(), self.side.clone());
        let p = self.update_properties(|p, _| {
            p.check_managed("encryption settings")?;
            if p.encryption.is_some() {
                return Ok(p.clone());
            }
            let next = Properties {
                encryption: Some(new_encryption(&root, side.as_ref(), false)?),
                ..p.clone()
            };
            next.check_key_source()?;
            Ok(next)
        })?;
        self.sync_encryption()?;
        Ok(p)
    }

    /// `registry encryption rotate-key`: a new current key (made now for a managed key;
    /// the first of the operator's key file, which must still hold the old one, for a
    /// customer-managed key), then every data key re-wrapped by [`Store::rewrap_keys`].
    pub fn rotate_key(&self) -> Result<Properties, StoreError> {
        let p = self.properties()?;
        p.check_managed("encryption settings")?;
        let Some(e) = p.encryption.clone() else {
            return Err(refused(
                "the registry is not encrypted: `acr-task registry encryption enable` first".into(),
            ));
        };
        if let Some(from) = &e.rotating_from {
            return Err(refused(format!(
                "a rotation away from key {from} is under way: wait for it to complete"
            )));
        }
        let side = self.side.as_ref();
        let (ring, path) = match e.key_source {
            KeySource::Managed => {
                let (old, _) = managed_ring_text(&self.root, side)?;
                let text = format!("{}\n{}", KeyRing::generate_line()?, old.unwrap_or_default());
                put_managed_ring(&self.root, side, &text, true)?;
                managed_ring(&self.root, side)?
            }
            KeySource::CustomerManaged => load_ring(&self.root, side, e.key_source)?,
        };
        let new_id = ring.current().id().to_string();
        if new_id == e.key_id {
            return Err(refused(format!(
                "the first key of {} is already the current key ({new_id}): put the new key on \
                 the first line and keep the old one below it until the rotation completes",
                path
            )));
        }
        if ring.get(&e.key_id).is_none() {
            return Err(refused(format!(
                "{} must still hold the current key {} until the rotation completes",
                path, e.key_id
            )));
        }
        if let Some((keys, ..)) = self.crypto() {
            keys.replace(ring);
        }
        let p = self.update_properties(|p, _| {
            let mut p = p.clone();
            if let Some(enc) = p.encryption.as_mut() {
                enc.rotating_from = Some(enc.key_id.clone());
                enc.key_id = new_id.clone();
                enc.progress = None;
                enc.error = None;
            }
            Ok(p)
        })?;
        self.sync_encryption()?;
        Ok(p)
    }

    /// Seals every blob and manifest stored as plaintext, then marks the store complete
    /// (plaintext is refused from then on). `Ok(None)` when there is nothing to do.
    pub fn seal_in_place(
        &self,
        pace: Duration,
        stop: &AtomicBool,
        report: &dyn Fn(&Progress),
    ) -> Result<Option<JobReport>, StoreError> {
        self.sync_encryption()?;
        let p = self.properties()?;
        if p.encryption.as_ref().is_none_or(|e| e.complete) {
            return Ok(None);
        }
        let Some((keys, required, blobs)) = self.crypto() else {
            return Ok(None);
        };
        let started = Instant::now();
        let mut listed = Vec::new();
        for (digest, _) in blobs.list()? {
            let size = self.side.blob_size(&digest)?.unwrap_or(0);
            listed.push((digest, size));
        }
        let manifests = self.side.manifest_contents(None, usize::MAX)?;
        let mut meter = Meter::new(self, (listed.len() + manifests.len()) as u64, report, false);
        meter.progress.bytes_total = listed.iter().map(|(_, n)| n).sum::<u64>()
            + manifests.iter().map(|(.., c)| c.len() as u64).sum::<u64>();
        let mut changed = 0;
        for (digest, size) in &listed {
            let size = *size;
            stopped(stop)?;
            let sealed = match blobs.seal_existing(digest) {
                Ok(s) => s,
                // Gone meanwhile (gc): nothing to seal.
                Err(StoreError::BlobMissing(_)) => false,
                Err(e) => return Err(e),
            };
            changed += u64::from(sealed);
            meter.step(size, sealed)?;
            std::thread::sleep(pace);
        }
        for (repo, digest, content) in manifests {
            stopped(stop)?;
            let ring = keys.ring();
            let mut did = false;
            if KeyRing::sealed_by(&content).is_none() {
                let sealed = ring.seal_bytes(&content)?;
                did = self
                    .side
                    .replace_manifest_content(&repo, &digest, &content, &sealed)?;
            }
            changed += u64::from(did);
            meter.step(content.len() as u64, did)?;
            std::thread::sleep(pace);
        }
        // Anything committed in plaintext meanwhile (an upload begun before the layers
        // were on) is sealed by its commit; a last look makes sure.
        for (digest, _) in blobs.list()? {
            match blobs.seal_existing(&digest) {
                Ok(s) => changed += u64::from(s),
                Err(StoreError::BlobMissing(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let progress = meter.progress;
        self.update_properties(|p, _| {
            let mut p = p.clone();
            if let Some(e) = p.encryption.as_mut() {
                e.complete = true;
                e.progress = Some(progress);
                e.error = None;
            }
            Ok(p)
        })?;
        required.store(true, Ordering::SeqCst);
        // Earlier versions of the manifests' pages may still be in the write-ahead log.
        self.side.checkpoint()?;
        tracing::info!(sealed = changed, "the registry is encrypted at rest");
        Ok(Some(JobReport {
            progress,
            changed,
            elapsed: started.elapsed(),
        }))
    }

    /// Re-wraps every data key (and every sealed manifest's) still wrapped by the key a
    /// rotation moves away from; no content is rewritten. Then the old key is dropped from
    /// a managed key file. `Ok(None)` when no rotation is under way.
    pub fn rewrap_keys(
        &self,
        pace: Duration,
        stop: &AtomicBool,
        report: &dyn Fn(&Progress),
    ) -> Result<Option<JobReport>, StoreError> {
        self.sync_encryption()?;
        let p = self.properties()?;
        let Some(e) = p.encryption.clone().filter(|e| e.rotating_from.is_some()) else {
            return Ok(None);
        };
        let Some((keys, ..)) = self.crypto() else {
            return Ok(None);
        };
        let started = Instant::now();
        let manifests = self.side.manifest_contents(None, usize::MAX)?;
        let mut meter = Meter::new(self, manifests.len() as u64, report, true);
        let mut changed = 0;
        loop {
            let batch = self.side.deks_not_wrapped_by(&e.key_id, 256)?;
            if batch.is_empty() {
                break;
            }
            meter.progress.objects_total += batch.len() as u64;
            for (dek_id, key_id, wrapped) in batch {
                stopped(stop)?;
                let (new_key, new_wrapped) = keys.ring().rewrap(&key_id, &dek_id, &wrapped)?;
                let did = self
                    .side
                    .rewrap_dek(&dek_id, &key_id, &new_key, &new_wrapped)?;
                changed += u64::from(did);
                meter.step(0, did)?;
                std::thread::sleep(pace);
            }
        }
        for (repo, digest, content) in manifests {
            stopped(stop)?;
            let ring = keys.ring();
            let mut did = false;
            if KeyRing::sealed_by(&content).is_some_and(|k| k != e.key_id) {
                if let Some(moved) = ring.rewrap_bytes(&content)? {
                    did = self
                        .side
                        .replace_manifest_content(&repo, &digest, &content, &moved)?;
                }
            }
            changed += u64::from(did);
            meter.step(0, did)?;
        }
        let progress = meter.progress;
        self.update_properties(|p, _| {
            let mut p = p.clone();
            if let Some(enc) = p.encryption.as_mut() {
                enc.rotating_from = None;
                enc.progress = Some(progress);
                enc.error = None;
            }
            Ok(p)
        })?;
        if e.key_source == KeySource::Managed {
            // Only the new key is needed now.
            let ring = keys.ring();
            let text = managed_ring_text(&self.root, self.side.as_ref())?
                .0
                .unwrap_or_default();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            if KeyRing::parse(first).is_ok_and(|r| r.current().id() == ring.current().id()) {
                put_managed_ring(
                    &self.root,
                    self.side.as_ref(),
                    &format!("{}\n", first.trim()),
                    true,
                )?;
            }
        }
        tracing::info!(rewrapped = changed, "registry key rotated");
        Ok(Some(JobReport {
            progress,
            changed,
            elapsed: started.elapsed(),
        }))
    }

    /// Records why an encryption job stopped (`registry encryption show` shows it).
    pub fn record_encryption_failure(&self, e: &StoreError) {
        let msg = e.to_string();
        let r = self.update_properties(|p, _| {
            let mut p = p.clone();
            if let Some(enc) = p.encryption.as_mut() {
                enc.error = Some(msg.clone());
            }
            Ok(p)
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "recording an encryption job's failure");
        }
    }

    /// Seals a blob an upload committed in plaintext (one begun before encryption was
    /// enabled), so that none is left behind.
    pub(crate) fn seal_late_upload(&self, digest: &str) -> Result<(), StoreError> {
        if let Some((.., blobs)) = self.crypto() {
            blobs.seal_existing(digest)?;
        }
        Ok(())
    }

    /// Where the registry key is: (source, key file).
    pub fn key_location(&self) -> Result<Option<(KeySource, String)>, StoreError> {
        let p = self.properties()?;
        let Some(e) = p.encryption else {
            return Ok(None);
        };
        let place = match e.key_source {
            KeySource::Managed => match self.side.key_ring()? {
                Some(k) => k.place,
                None => self.root.join(MANAGED_KEY_FILE).display().to_string(),
            },
            KeySource::CustomerManaged => customer_key_file()
                .unwrap_or_default()
                .display()
                .to_string(),
        };
        Ok(Some((e.key_source, place)))
    }
}
