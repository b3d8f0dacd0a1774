//! The one-way upgrade of a Classic registry into managed storage, while it serves.
//!
//! While the copy runs the registry stays Classic: pulls are served from the Classic tree
//! (which no longer changes: pushes are refused from the moment the upgrade was asked
//! for, under the tree's write lock), and everything is copied into the managed store:
//! each blob once, verified against its digest as it is read; each manifest parsed by the
//! rules of a push and stored with its references; each tag. The copy can stop at any
//! point (kill -9 included) and start again: what the managed store holds already is
//! skipped, so nothing is copied twice. When every tag of the tree resolves to the same
//! digest in the managed store, the tier becomes the target in one change and the managed
//! store serves. The Classic directory is left as it is.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::classic::{manifest_facts, ClassicMeta};
use crate::store::{admit_all, BlobStorage, Reference, RegistryMeta, Store, StoreError};
use crate::tier::Progress;

/// Blob copies at once: their fsyncs overlap.
const COPIERS: usize = 4;
const BUFFER: usize = 1 << 20;
/// How often progress is saved where `registry show` reads it.
const SAVE_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("manifest {digest} of {repo} cannot be stored: {reason}")]
    Manifest {
        repo: String,
        digest: String,
        reason: String,
    },
    #[error("blob {digest} in the Classic storage hashes to {actual}: the storage is damaged (restore that blob, then the upgrade resumes)")]
    BlobDigest { digest: String, actual: String },
    #[error("after the copy, {0}")]
    Verify(String),
    #[error("stopped (it resumes where it was at the next start)")]
    Stopped,
}

/// What one run of the upgrade did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub progress: Progress,
    pub objects_copied: u64,
    pub objects_already_there: u64,
    /// Layer links of the tree that name no stored blob (nothing to copy; never pullable).
    pub dangling_links: Vec<String>,
    pub tags_verified: u64,
    pub elapsed: Duration,
}

/// Everything the tree holds, read once before the copy.
struct Plan {
    /// Unique blobs with their size and the repositories that link them.
    blobs: BTreeMap<String, (u64, Vec<String>)>,
    repos: Vec<Repo>,
    dangling: Vec<String>,
}

/// A repository of the tree: its name, its manifests (digest → bytes), its tags (tag →
/// digest).
type Repo = (String, BTreeMap<String, Vec<u8>>, BTreeMap<String, String>);

fn plan(tree: &ClassicMeta) -> Result<Plan, UpgradeError> {
    let mut p = Plan {
        blobs: BTreeMap::new(),
        repos: Vec::new(),
        dangling: Vec::new(),
    };
    for repo in tree.repository_names()? {
        for d in tree.layers(&repo)? {
            match tree.blob_size(&d)? {
                Some(n) => p
                    .blobs
                    .entry(d)
                    .or_insert((n, Vec::new()))
                    .1
                    .push(repo.clone()),
                None => p.dangling.push(format!("{repo}@{d}")),
            }
        }
        let mut manifests = BTreeMap::new();
        for d in tree.revisions(&repo)? {
            if let Some(bytes) = tree.manifest_bytes(&repo, &d)? {
                manifests.insert(d, bytes);
            }
        }
        let tags = tree.tag_map(&repo)?;
        p.repos.push((repo, manifests, tags));
    }
    Ok(p)
}

/// Shared counters of a run, saved to the registry's settings now and then.
struct Tally {
    progress: Mutex<Progress>,
    copied_objects: AtomicU64,
    there_objects: AtomicU64,
    copied_this_run: AtomicU64,
    started: Instant,
    saved: Mutex<Instant>,
}

impl Tally {
    fn done(&self, bytes: u64, copied: bool) {
        let (counter, by) = if copied {
            (&self.copied_objects, bytes)
        } else {
            (&self.there_objects, 0)
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.copied_this_run.fetch_add(by, Ordering::Relaxed);
        if let Ok(mut p) = self.progress.lock() {
            p.objects_done += 1;
            p.bytes_done += bytes;
            p.bytes_copied += by;
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = self.copied_this_run.load(Ordering::Relaxed) as f64 / secs;
            p.bytes_per_second = rate as u64;
            p.eta_seconds = (rate > 0.0)
                .then(|| (p.bytes_total.saturating_sub(p.bytes_done) as f64 / rate).ceil() as u64);
        }
    }

    fn snapshot(&self) -> Progress {
        self.progress.lock().map(|p| *p).unwrap_or_default()
    }
}

/// Runs the upgrade the registry's settings ask for, to its end: `Ok(None)` when there is
/// none to run. `pace` slows each object (tests watch an upgrade in progress); `report`
/// sees the progress as it moves. Blocking.
pub fn run(
    store: &Store,
    pace: Duration,
    stop: &AtomicBool,
    report: &(dyn Fn(&Progress) + Sync),
) -> Result<Option<Report>, UpgradeError> {
    let props = store.properties()?;
    if props.upgrading().is_none() {
        return Ok(None);
    }
    let Some((classic_blobs, tree)) = store.classic() else {
        return Ok(None);
    };
    let started = Instant::now();
    tree.settle()?;
    let plan = plan(&tree)?;
    let bytes_total = plan.blobs.values().map(|(n, _)| n).sum::<u64>()
        + plan
            .repos
            .iter()
            .flat_map(|(_, m, _)| m.values())
            .map(|b| b.len() as u64)
            .sum::<u64>();
    let objects_total = plan.blobs.len() as u64
        + plan
            .repos
            .iter()
            .map(|(_, m, _)| m.len() as u64)
            .sum::<u64>();
    let carried = props
        .upgrading()
        .map(|u| u.progress.bytes_copied)
        .unwrap_or(0);
    let tally = Tally {
        progress: Mutex::new(Progress {
            objects_total,
            bytes_total,
            // What earlier runs copied stays counted; this run adds its own.
            bytes_copied: carried,
            ..Progress::default()
        }),
        copied_objects: AtomicU64::new(0),
        there_objects: AtomicU64::new(0),
        copied_this_run: AtomicU64::new(0),
        started,
        saved: Mutex::new(Instant::now() - SAVE_EVERY),
    };
    let save = |force: bool| -> Result<(), StoreError> {
        let snap = tally.snapshot();
        report(&snap);
        let due = tally
            .saved
            .lock()
            .map(|mut at| {
                let due = force || at.elapsed() >= SAVE_EVERY;
                if due {
                    *at = Instant::now();
                }
                due
            })
            .unwrap_or(true);
        if due {
            save_progress(store, snap)?;
        }
        Ok(())
    };
    save(true)?;
    let managed = store.managed();
    let (blobs, meta) = (managed.blobs.as_ref(), managed.meta.as_ref());

    // Blobs, by a few copiers at once.
    let items: Vec<(&String, &(u64, Vec<String>))> = plan.blobs.iter().collect();
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<UpgradeError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..COPIERS {
            s.spawn(|| loop {
                if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                if stop.load(Ordering::Relaxed) {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(UpgradeError::Stopped);
                    }
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((digest, (size, repos))) = items.get(i) else {
                    return;
                };
                let r = copy_blob(classic_blobs.as_ref(), blobs, meta, digest, *size, repos)
                    .and_then(|copied| {
                        tally.done(*size, copied);
                        std::thread::sleep(pace);
                        Ok(save(false)?)
                    });
                if let Err(e) = r {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                    return;
                }
            });
        }
    });
    if let Some(e) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(e);
    }

    // Manifests: those that hold blobs first, then the indexes over them; then tags.
    let mut tags_verified = 0;
    for (repo, manifests, tags) in &plan.repos {
        let mut order: Vec<(&String, &Vec<u8>)> = manifests.iter().collect();
        order.sort_by_key(|(_, bytes)| is_index(bytes));
        for (digest, bytes) in order {
            if stop.load(Ordering::Relaxed) {
                return Err(UpgradeError::Stopped);
            }
            let there = meta
                .get_manifest(repo, &Reference::Digest(digest.to_string()))?
                .is_some();
            if !there {
                put(meta, repo, digest, bytes, None)?;
            }
            tally.done(bytes.len() as u64, !there);
            std::thread::sleep(pace);
            save(false)?;
        }
        for (tag, digest) in tags {
            let now = meta.get_manifest(repo, &Reference::Tag(tag.clone()))?;
            if now.as_ref().map(|r| &r.digest) != Some(digest) {
                let Some(bytes) = manifests.get(digest) else {
                    return Err(UpgradeError::Verify(format!(
                        "tag {repo}:{tag} names {digest}, which the repository does not hold"
                    )));
                };
                put(meta, repo, digest, bytes, Some(tag.clone()))?;
            }
        }
    }

    // Every tag resolves to the same digest, every manifest is there.
    for (repo, manifests, tags) in &plan.repos {
        for (tag, digest) in tags {
            let got = meta.get_manifest(repo, &Reference::Tag(tag.clone()))?;
            if got.as_ref().map(|r| &r.digest) != Some(digest) {
                return Err(UpgradeError::Verify(format!(
                    "{repo}:{tag} resolves to {:?} in managed storage, not {digest}",
                    got.map(|r| r.digest)
                )));
            }
            tags_verified += 1;
        }
        for digest in manifests.keys() {
            if meta
                .get_manifest(repo, &Reference::Digest(digest.clone()))?
                .is_none()
            {
                return Err(UpgradeError::Verify(format!("{repo}@{digest} is missing")));
            }
        }
    }
    save(true)?;
    store.complete_upgrade()?;
    let progress = store
        .properties()?
        .classic
        .and_then(|c| c.upgrade)
        .map(|u| u.progress)
        .unwrap_or_else(|| tally.snapshot());
    report(&progress);
    Ok(Some(Report {
        progress,
        objects_copied: tally.copied_objects.load(Ordering::Relaxed),
        objects_already_there: tally.there_objects.load(Ordering::Relaxed),
        dangling_links: plan.dangling,
        tags_verified,
        elapsed: started.elapsed(),
    }))
}

/// Records why an upgrade stopped (it is retried; `registry show` shows the message).
pub fn record_failure(store: &Store, e: &UpgradeError) {
    let msg = e.to_string();
    let r = store.update_properties(|p, _| {
        let mut p = p.clone();
        if let Some(u) = p.classic.as_mut().and_then(|c| c.upgrade.as_mut()) {
            u.error = Some(msg.clone());
        }
        Ok(p)
    });
    if let Err(e) = r {
        tracing::warn!(error = %e, "recording the upgrade's failure");
    }
}

fn save_progress(store: &Store, progress: Progress) -> Result<(), StoreError> {
    store.update_properties(|p, _| {
        let mut p = p.clone();
        if let Some(u) = p.classic.as_mut().and_then(|c| c.upgrade.as_mut()) {
            if u.finished.is_none() {
                u.progress = progress;
                u.error = None;
            }
        }
        Ok(p)
    })?;
    Ok(())
}

fn is_index(bytes: &[u8]) -> bool {
    let mt = manifest_facts(bytes).media_type;
    mt == super::manifests::OCI_INDEX || mt == super::manifests::DOCKER_LIST
}

fn put(
    meta: &dyn RegistryMeta,
    repo: &str,
    digest: &str,
    bytes: &[u8],
    tag: Option<String>,
) -> Result<(), UpgradeError> {
    let facts = manifest_facts(bytes);
    let m =
        super::manifests::to_store(repo, digest, bytes, &facts.media_type, tag).map_err(|e| {
            UpgradeError::Manifest {
                repo: repo.to_string(),
                digest: digest.to_string(),
                reason: e.message,
            }
        })?;
    // The push's event was raised when it was pushed to the Classic registry: none now.
    meta.put_manifest(&m, &[], &admit_all).map_err(|e| match e {
        StoreError::MissingRef(r) => UpgradeError::Manifest {
            repo: repo.to_string(),
            digest: digest.to_string(),
            reason: format!("it references {r}, which the repository does not hold"),
        },
        e => e.into(),
    })
}

/// Copies one blob into the managed store (unless it is there) and links it into every
/// repository that links it in the tree. `Ok(true)` when bytes were copied.
fn copy_blob(
    from: &dyn BlobStorage,
    blobs: &dyn BlobStorage,
    meta: &dyn RegistryMeta,
    digest: &str,
    size: u64,
    repos: &[String],
) -> Result<bool, UpgradeError> {
    let linked: BTreeSet<&String> = repos
        .iter()
        .filter(|r| matches!(meta.blob_in_repo(r, digest), Ok(Some(_))))
        .collect();
    // Content in the managed store was verified before it was committed: never again.
    let have = blobs.exists(digest);
    let mut copied = false;
    if !have {
        let alg = crate::digest::parse(digest)
            .map_err(|_| StoreError::Corrupt(format!("{digest} is not a digest")))?;
        let mut hasher = crate::digest::Hasher::new(alg);
        let mut src = from.read(digest, 0)?;
        let up = blobs.begin()?;
        let mut buf = vec![0u8; BUFFER];
        let mut at = 0u64;
        loop {
            let n = src.read(&mut buf).map_err(|e| io(digest, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            up.write_at(&buf[..n], at).map_err(|e| io(digest, e))?;
            at += n as u64;
        }
        let actual = hasher.finish();
        if actual != digest || at != size {
            return Err(UpgradeError::BlobDigest {
                digest: digest.to_string(),
                actual,
            });
        }
        up.commit(digest)?;
        copied = true;
    }
    for repo in repos {
        if linked.contains(repo) {
            continue;
        }
        meta.link_blob(repo, digest, Some(size), &admit_all, &mut || {
            Ok(blobs.exists(digest))
        })?;
    }
    Ok(copied)
}

fn io(digest: &str, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: std::path::PathBuf::from(digest),
        source,
    }
}
