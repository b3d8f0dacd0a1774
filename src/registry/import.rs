//! Copying images from another registry's API into this one (`acr-task import`; a
//! relocation imports every tag the same way). The registry's own side does the work, so
//! nothing passes through the client or a Docker Engine: each manifest is fetched and
//! checked against its digest, each blob streamed from the source straight into an upload
//! and verified (length and digest) before it is committed, exactly as a push is. Content
//! the registry already holds (in any repository) is linked, not copied. An index brings
//! all its platform manifests; every manifest brings its referrers (signatures, SBOMs),
//! read by the OCI referrers API or, on registries without it, by the referrers tag schema.
//!
//! Order keeps everything whole: blobs and child manifests are stored before the manifest
//! that names them, referrers before their subject's tag, and the tag last, so a tag never
//! names something partial. Every manifest is stored by the push path (`store_manifest`),
//! so webhooks and base-image triggers see an import as the push it is.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::Value;

use super::client::{error_chain, pull, ClientError, RegistryClient};
use super::errors::ApiError;
use super::reference::ImageRef;
use super::{Registry, RequestContext, MAX_MANIFEST_BYTES};
use crate::store::Reference;

/// Blobs of one manifest copied at once.
const BLOB_COPIES: usize = 4;
/// How deep referrers of referrers are followed.
const REFERRER_DEPTH: usize = 4;
/// Manifests one import may bring (platforms and referrers included): a hostile source
/// cannot make an import endless.
const MAX_MANIFESTS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "source {0:?} is not an image reference: write REGISTRY/REPOSITORY:TAG or \
         REGISTRY/REPOSITORY@DIGEST"
    )]
    BadSource(String),
    #[error("{0}")]
    Usage(String),
    #[error("target {0:?}: {1}")]
    BadTarget(String, String),
    #[error("{item}: {message}")]
    Source { item: String, message: String },
    #[error("{item} is not in the source registry (deleted or moved while it was copied?)")]
    Missing { item: String },
    #[error(
        "{item}: the source sent content that does not match its digest ({detail}); \
         nothing of it was stored"
    )]
    Digest { item: String, detail: String },
    #[error("{item}: {message}")]
    Invalid { item: String, message: String },
    #[error(
        "{target} already names {has}; the import would make it {digest}: add --force to \
         replace it"
    )]
    TagExists {
        target: String,
        has: String,
        digest: String,
    },
    #[error("{item}: {message}")]
    Target {
        item: String,
        status: u16,
        message: String,
    },
}

impl ImportError {
    /// The HTTP status the management API answers with.
    pub fn status(&self) -> u16 {
        match self {
            ImportError::BadSource(_) | ImportError::Usage(_) | ImportError::BadTarget(..) => 400,
            ImportError::Missing { .. } => 404,
            ImportError::TagExists { .. } => 409,
            ImportError::Target { status, .. } => *status,
            ImportError::Source { .. }
            | ImportError::Digest { .. }
            | ImportError::Invalid { .. } => 502,
        }
    }
}

/// Where an import puts the source image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub repository: String,
    pub tag: Option<String>,
    /// `REPO@DIGEST`: the source must be this manifest.
    pub digest: Option<String>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.tag, &self.digest) {
            (Some(t), _) => write!(f, "{}:{t}", self.repository),
            (None, Some(d)) => write!(f, "{}@{d}", self.repository),
            (None, None) => write!(f, "{}", self.repository),
        }
    }
}

/// The targets of `--image` values (`REPO:TAG`, `REPO` — the source's tag —, or
/// `REPO@DIGEST`); none given: the source's repository and tag.
pub fn targets(source: &ImageRef, images: &[String]) -> Result<Vec<Target>, ImportError> {
    let source_tag = (!source.is_digest()).then(|| source.reference.clone());
    if images.is_empty() {
        return Ok(vec![Target {
            repository: source.repository.clone(),
            tag: source_tag,
            digest: None,
        }]);
    }
    let mut out = Vec::new();
    for image in images {
        let bad = |why: &str| ImportError::BadTarget(image.clone(), why.to_string());
        let (name, digest) = match image.split_once('@') {
            Some((n, d)) => {
                crate::digest::parse(d).map_err(|e| bad(&format!("{d}: {e}")))?;
                (n, Some(d.to_string()))
            }
            None => (image.as_str(), None),
        };
        let (repo, tag) = match name.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (name, None),
        };
        if !crate::names::valid_name(repo) {
            return Err(bad(
                "not a repository name (lowercase letters, digits and separators, \
                 components split by '/')",
            ));
        }
        if let Some(t) = &tag {
            if !crate::names::valid_tag(t) {
                return Err(bad(&format!(
                    "{t:?} is not a tag (up to 128 letters, digits, '_', '.', '-'; \
                     not starting with '.' or '-')"
                )));
            }
        }
        let tag = match (tag, &digest) {
            (Some(t), Some(_)) => {
                return Err(bad(&format!(
                    "give a tag or a digest, not both (:{t} and @...)"
                )))
            }
            (None, None) => source_tag.clone(),
            (t, _) => t,
        };
        out.push(Target {
            repository: repo.to_string(),
            tag,
            digest,
        });
    }
    Ok(out)
}

/// One import as the CLI asks for it and the management API carries it.
#[derive(Clone, Default, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImportRequest {
    /// `REGISTRY/REPO:TAG` or `REGISTRY/REPO@DIGEST`.
    pub source: String,
    /// Targets (`REPO:TAG`, `REPO`, `REPO@DIGEST`); none: the source's name.
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub force: bool,
    /// The source registry's login, if it needs one.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

impl std::fmt::Debug for ImportRequest {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportRequest")
            .field("source", &self.source)
            .field("images", &self.images)
            .field("force", &self.force)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The request context of imports (their events say who imported, from where, how).
pub fn context(useragent: &str, actor: String, host: String) -> RequestContext {
    RequestContext::of_tool("IMPORT", useragent, actor, host)
}

/// Runs one import into `reg`; the source is trusted by the system's roots and
/// `ca_certs`, and logged in to with the request's credentials only.
pub async fn run(
    reg: &Registry,
    ca_certs: &[std::path::PathBuf],
    req: &ImportRequest,
    ctx: RequestContext,
) -> Result<Imported, ImportError> {
    prepare(reg, ca_certs, req, ctx)?.run().await
}

/// Checks `req` (the source, the targets) and makes its importer; nothing is fetched yet.
pub fn prepare(
    reg: &Registry,
    ca_certs: &[std::path::PathBuf],
    req: &ImportRequest,
    ctx: RequestContext,
) -> Result<Prepared, ImportError> {
    let source = ImageRef::parse(&req.source)
        .filter(|s| crate::names::valid_name(&s.repository))
        .ok_or_else(|| ImportError::BadSource(req.source.clone()))?;
    if source.is_digest() {
        crate::digest::parse(&source.reference)
            .map_err(|_| ImportError::BadSource(req.source.clone()))?;
    } else if !crate::names::valid_tag(&source.reference) {
        return Err(ImportError::BadSource(req.source.clone()));
    }
    let targets = targets(&source, &req.images)?;
    let importer = Importer::new(reg.clone(), source_client(&source, ca_certs, req)?, ctx);
    Ok(Prepared {
        importer,
        source,
        targets,
        force: req.force,
    })
}

/// An import checked and ready: its importer counts what it copies (`importer.total`)
/// while [`Prepared::run`] goes.
pub struct Prepared {
    pub importer: Importer,
    source: ImageRef,
    targets: Vec<Target>,
    force: bool,
}

impl Prepared {
    pub async fn run(&self) -> Result<Imported, ImportError> {
        self.importer
            .import(&self.source, &self.targets, self.force)
            .await
    }
}

/// A client of `source`'s registry with the request's login (or none).
pub fn source_client(
    source: &ImageRef,
    ca_certs: &[std::path::PathBuf],
    req: &ImportRequest,
) -> Result<RegistryClient, ImportError> {
    let host = source.api_host().to_string();
    let creds = match (&req.username, &req.password) {
        (Some(u), Some(p)) => crate::credentials::Credentials::single(
            &host,
            crate::credentials::Credential {
                username: u.clone(),
                password: p.clone(),
            },
        ),
        (None, None) => crate::credentials::Credentials::default(),
        _ => {
            return Err(ImportError::Usage(
                "--username and --password go together".into(),
            ))
        }
    };
    let t = super::client::Transport::new(ca_certs, creds).map_err(|e| ImportError::Source {
        item: host.clone(),
        message: e.to_string(),
    })?;
    Ok(RegistryClient::new(host, t))
}

/// What one import did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Imported {
    pub source: String,
    pub digest: String,
    pub media_type: String,
    pub targets: Vec<String>,
    /// Manifests stored (platform manifests and referrers included).
    pub manifests: u64,
    /// Manifests the registry held already.
    pub manifests_present: u64,
    pub blobs_copied: u64,
    /// Blobs the registry held already (linked, not copied).
    pub blobs_present: u64,
    pub bytes_copied: u64,
    pub referrers: u64,
    pub seconds: f64,
}

/// Counters, per import and for everything an [`Importer`] did.
#[derive(Debug, Default)]
pub struct Tally {
    pub manifests: AtomicU64,
    pub manifests_present: AtomicU64,
    pub blobs_copied: AtomicU64,
    pub blobs_present: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub referrers: AtomicU64,
}

#[derive(Clone, Copy)]
enum Count {
    Manifests,
    ManifestsPresent,
    BlobsCopied,
    BlobsPresent,
    BytesCopied,
    Referrers,
}

impl Tally {
    fn field(&self, c: Count) -> &AtomicU64 {
        match c {
            Count::Manifests => &self.manifests,
            Count::ManifestsPresent => &self.manifests_present,
            Count::BlobsCopied => &self.blobs_copied,
            Count::BlobsPresent => &self.blobs_present,
            Count::BytesCopied => &self.bytes_copied,
            Count::Referrers => &self.referrers,
        }
    }

    /// Counts `n` here and in the importer's `total`.
    fn add(&self, c: Count, n: u64, total: &Tally) {
        self.field(c).fetch_add(n, Ordering::Relaxed);
        total.field(c).fetch_add(n, Ordering::Relaxed);
    }
}

/// The blobs being imported now, by digest (each entry lives while someone holds it).
#[derive(Default)]
pub(crate) struct BlobLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

/// A blob held for copying; dropping it lets the next import of that blob look.
pub(crate) struct Held<'a> {
    locks: &'a BlobLocks,
    digest: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl BlobLocks {
    pub(crate) async fn hold(&self, digest: &str) -> Held<'_> {
        let lock = self
            .0
            .lock()
            .map(|mut m| m.entry(digest.to_string()).or_default().clone())
            .unwrap_or_default();
        Held {
            locks: self,
            digest: digest.to_string(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Ok(mut m) = self.locks.0.lock() {
            // Only the map holds it now: nobody waits.
            if m.get(&self.digest)
                .is_some_and(|l| Arc::strong_count(l) == 1)
            {
                m.remove(&self.digest);
            }
        }
    }
}

/// A manifest as the source sent it, its digest verified.
struct Fetched {
    digest: String,
    bytes: Vec<u8>,
    media_type: String,
}

/// Imports from one source registry; shared by the imports of a relocation (a blob two
/// imports want at once is copied once; what the source supports is learnt once).
pub struct Importer {
    reg: Registry,
    src: Arc<RegistryClient>,
    ctx: RequestContext,
    tag_lists: tokio::sync::Mutex<HashMap<String, Arc<Vec<String>>>>,
    /// Whether the source answers the referrers API (unknown until asked).
    referrers_api: Mutex<Option<bool>>,
    /// Everything imported so far.
    pub total: Tally,
}

impl Importer {
    /// `src` may be shared by many importers (its tokens are kept for all).
    pub fn new(
        reg: Registry,
        src: impl Into<Arc<RegistryClient>>,
        ctx: RequestContext,
    ) -> Importer {
        Importer {
            reg,
            src: src.into(),
            ctx,
            tag_lists: tokio::sync::Mutex::new(HashMap::new()),
            referrers_api: Mutex::new(None),
            total: Tally::default(),
        }
    }

    /// The source registry's client.
    pub fn source(&self) -> &RegistryClient {
        &self.src
    }

    /// Imports `source` (`REPO:TAG` or `REPO@DIGEST` of this importer's registry) to
    /// `targets`. A tag that names other content is replaced only with `force`; that is
    /// checked before anything is copied.
    pub async fn import(
        &self,
        source: &ImageRef,
        targets: &[Target],
        force: bool,
    ) -> Result<Imported, ImportError> {
        let started = Instant::now();
        let tally = Tally::default();
        let top = self.fetch(&source.repository, &source.reference).await?;
        for t in targets {
            if let Some(d) = t.digest.as_ref().filter(|d| **d != top.digest) {
                return Err(ImportError::BadTarget(
                    t.to_string(),
                    format!("the source is {}, not {d}", top.digest),
                ));
            }
            let Some(tag) = &t.tag else { continue };
            let has = self
                .reg
                .resolve(&t.repository, tag)
                .await
                .map_err(|e| target_err(&t.to_string(), ApiError::internal(e)))?;
            if let Some((has, _)) = has.filter(|(d, _)| *d != top.digest) {
                if !force {
                    return Err(ImportError::TagExists {
                        target: t.to_string(),
                        has,
                        digest: top.digest.clone(),
                    });
                }
            }
        }
        let mut done_repos: HashSet<&str> = HashSet::new();
        for t in targets {
            if done_repos.insert(&t.repository) {
                let mut seen = HashSet::new();
                self.copy(
                    &source.repository,
                    &t.repository,
                    &top,
                    t.tag.as_deref(),
                    0,
                    &mut seen,
                    &tally,
                )
                .await?;
            } else if let Some(tag) = &t.tag {
                // Another tag in a repository that has it all now.
                self.push(&t.repository, &top, Some(tag)).await?;
            }
        }
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(Imported {
            source: format!(
                "{}/{}{}{}",
                self.src.addr(),
                source.repository,
                if source.is_digest() { "@" } else { ":" },
                source.reference
            ),
            digest: top.digest,
            media_type: top.media_type,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            manifests: n(&tally.manifests),
            manifests_present: n(&tally.manifests_present),
            blobs_copied: n(&tally.blobs_copied),
            blobs_present: n(&tally.blobs_present),
            bytes_copied: n(&tally.bytes_copied),
            referrers: n(&tally.referrers),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn item(&self, repo: &str, reference: &str) -> String {
        let sep = if reference.contains(':') { "@" } else { ":" };
        format!("{}/{repo}{sep}{reference}", self.src.addr())
    }

    fn source_err(&self, item: String, e: ClientError) -> ImportError {
        let message = match e {
            ClientError::Auth { message, .. } => format!(
                "the source refused the credentials ({message}): check --username and \
                 --password, or `docker login {}`",
                self.src.addr()
            ),
            e => error_chain(&e),
        };
        ImportError::Source { item, message }
    }

    fn status_err(&self, item: String, status: u16, body: &[u8]) -> ImportError {
        let message = match status {
            401 | 403 => format!(
                "the source answered HTTP {status}: the credentials are wrong or may not \
                 pull it (check --username and --password, or `docker login {}`)",
                self.src.addr()
            ),
            s => format!(
                "the source answered HTTP {s}: {}",
                super::client::summary(body)
            ),
        };
        ImportError::Source { item, message }
    }

    /// A manifest of the source, checked: its size, and its digest against the reference
    /// (a digest) or the digest the source names it by (a tag).
    async fn fetch(&self, repo: &str, reference: &str) -> Result<Fetched, ImportError> {
        let item = self.item(repo, reference);
        let r = self
            .src
            .request(
                reqwest::Method::GET,
                &format!("/v2/{repo}/manifests/{reference}"),
                &pull(repo),
            )
            .await
            .map_err(|e| self.source_err(item.clone(), e))?;
        match r.status {
            200 => {}
            404 => return Err(ImportError::Missing { item }),
            s => return Err(self.status_err(item, s, &r.body)),
        }
        if r.body.len() > MAX_MANIFEST_BYTES {
            return Err(ImportError::Invalid {
                item,
                message: format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
            });
        }
        let named = if reference.contains(':') {
            Some(reference.to_string())
        } else {
            r.header("docker-content-digest").map(str::to_string)
        };
        let alg = named
            .as_deref()
            .and_then(|d| crate::digest::parse(d).ok())
            .unwrap_or(crate::digest::Algorithm::Sha256);
        let digest = crate::digest::of_bytes(alg, &r.body);
        if let Some(n) = named.filter(|n| *n != digest) {
            return Err(ImportError::Digest {
                item,
                detail: format!("named {n}, hashes to {digest}"),
            });
        }
        let media_type = r
            .header("content-type")
            .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
            .filter(|c| !c.is_empty() && c != "application/json")
            .or_else(|| {
                serde_json::from_slice::<Value>(&r.body)
                    .ok()
                    .and_then(|v| v["mediaType"].as_str().map(str::to_string))
            })
            .unwrap_or_default();
        Ok(Fetched {
            digest,
            bytes: r.body,
            media_type,
        })
    }

    /// Copies manifest `m` of `src_repo` into `dst_repo` with what it needs (its blobs, its
    /// platform manifests) and its referrers; tagged `tag` last.
    #[allow(clippy::too_many_arguments)]
    fn copy<'a>(
        &'a self,
        src_repo: &'a str,
        dst_repo: &'a str,
        m: &'a Fetched,
        tag: Option<&'a str>,
        depth: usize,
        seen: &'a mut HashSet<String>,
        tally: &'a Tally,
    ) -> BoxFuture<'a, Result<(), ImportError>> {
        async move {
            let item = self.item(src_repo, &m.digest);
            if !seen.insert(m.digest.clone()) {
                return Ok(());
            }
            if seen.len() > MAX_MANIFESTS {
                return Err(ImportError::Invalid {
                    item,
                    message: format!("more than {MAX_MANIFESTS} manifests in one import"),
                });
            }
            let present = self
                .reg
                .resolve(dst_repo, &m.digest)
                .await
                .map_err(|e| target_err(&item, ApiError::internal(e)))?
                .is_some();
            if !present {
                let parsed =
                    super::manifests::to_store(dst_repo, &m.digest, &m.bytes, &m.media_type, None)
                        .map_err(|e| ImportError::Invalid {
                            item: item.clone(),
                            message: e.message,
                        })?;
                for child in &parsed.children {
                    let c = self.fetch(src_repo, &child.digest).await?;
                    self.copy(src_repo, dst_repo, &c, None, depth, seen, tally)
                        .await?;
                }
                let blobs: Vec<(String, u64)> = parsed
                    .blobs
                    .iter()
                    .map(|b| (b.digest.clone(), b.size))
                    .collect();
                futures_util::stream::iter(blobs)
                    .map(|(d, n)| async move { self.blob(src_repo, dst_repo, &d, n, tally).await })
                    .buffer_unordered(BLOB_COPIES)
                    .try_collect::<Vec<()>>()
                    .await?;
            }
            if depth < REFERRER_DEPTH {
                for r in self.referrers(src_repo, &m.digest).await? {
                    let f = self.fetch(src_repo, &r).await?;
                    if !seen.contains(&f.digest) {
                        tally.add(Count::Referrers, 1, &self.total);
                    }
                    self.copy(src_repo, dst_repo, &f, None, depth + 1, seen, tally)
                        .await?;
                }
            }
            if present && tag.is_none() {
                tally.add(Count::ManifestsPresent, 1, &self.total);
                return Ok(());
            }
            self.push(dst_repo, m, tag).await?;
            let c = if present {
                Count::ManifestsPresent
            } else {
                Count::Manifests
            };
            tally.add(c, 1, &self.total);
            Ok(())
        }
        .boxed()
    }

    /// Stores `m` in `repo` (as its push would), tagged `tag` if given.
    async fn push(&self, repo: &str, m: &Fetched, tag: Option<&str>) -> Result<(), ImportError> {
        let reference = match tag {
            Some(t) => Reference::Tag(t.to_string()),
            None => Reference::Digest(m.digest.clone()),
        };
        let item = match tag {
            Some(t) => format!("{repo}:{t}"),
            None => format!("{repo}@{}", m.digest),
        };
        let content_type = Some(m.media_type.as_str()).filter(|t| !t.is_empty());
        let (digest, _) = super::manifests::store_manifest(
            &self.reg,
            repo,
            &reference,
            &m.bytes,
            content_type,
            self.ctx.clone(),
        )
        .await
        .map_err(|e| target_err(&item, e))?;
        if digest != m.digest {
            // A tag names content by sha256; a manifest the source names by another
            // algorithm is stored under that name too.
            super::manifests::store_manifest(
                &self.reg,
                repo,
                &Reference::Digest(m.digest.clone()),
                &m.bytes,
                content_type,
                self.ctx.clone(),
            )
            .await
            .map_err(|e| target_err(&item, e))?;
        }
        Ok(())
    }

    /// Makes blob `digest` of `src_repo` one of `dst_repo`: linked if the registry holds
    /// it, else streamed from the source and verified.
    async fn blob(
        &self,
        src_repo: &str,
        dst_repo: &str,
        digest: &str,
        size: u64,
        tally: &Tally,
    ) -> Result<(), ImportError> {
        let item = self.item(src_repo, digest);
        crate::digest::parse(digest).map_err(|e| ImportError::Invalid {
            item: item.clone(),
            message: e.to_string(),
        })?;
        // One copy of a blob at a time, whichever import wants it: who waited finds it.
        let _held = self.reg.inner.importing.hold(digest).await;
        let store = self.reg.store().clone();
        let (repo, d) = (dst_repo.to_string(), digest.to_string());
        let linked = tokio::task::spawn_blocking(move || {
            if store.blob_in_repo(&repo, &d)?.is_some() {
                return Ok(true);
            }
            super::service::link_blob(&store, &repo, &d)
        })
        .await
        .map_err(|e| target_err(&item, ApiError::internal(e)))?
        .map_err(|e| target_err(&item, e.into()))?;
        if linked {
            tally.add(Count::BlobsPresent, 1, &self.total);
            return Ok(());
        }
        let resp = self
            .src
            .stream(&format!("/v2/{src_repo}/blobs/{digest}"), &pull(src_repo))
            .await
            .map_err(|e| self.source_err(item.clone(), e))?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Err(ImportError::Missing { item }),
            s => {
                let body = resp.bytes().await.unwrap_or_default();
                return Err(self.status_err(item, s, &body));
            }
        }
        let body = Body::from_stream(resp.bytes_stream());
        super::blobs::store_body(&self.reg, dst_repo, digest, Some(size), body)
            .await
            .map_err(|e| match e.code {
                "DIGEST_INVALID" | "SIZE_INVALID" => ImportError::Digest {
                    item: item.clone(),
                    detail: e.message,
                },
                "BLOB_UPLOAD_INVALID" => ImportError::Source {
                    item: item.clone(),
                    message: e.message,
                },
                _ => target_err(&item, e),
            })?;
        tally.add(Count::BlobsCopied, 1, &self.total);
        tally.add(Count::BytesCopied, size, &self.total);
        Ok(())
    }

    /// Digests of the manifests that refer to `digest` in `repo` of the source: by the
    /// referrers API, else by the referrers tag schema (`sha256-<hex>`, an index).
    async fn referrers(&self, repo: &str, digest: &str) -> Result<Vec<String>, ImportError> {
        let item = self.item(repo, digest);
        let api = self.referrers_api.lock().map(|a| *a).unwrap_or(None);
        if api != Some(false) {
            let r = self
                .src
                .request(
                    reqwest::Method::GET,
                    &format!("/v2/{repo}/referrers/{digest}"),
                    &pull(repo),
                )
                .await
                .map_err(|e| self.source_err(item.clone(), e))?;
            let index = (r.status == 200)
                .then(|| serde_json::from_slice::<Value>(&r.body).ok())
                .flatten()
                .filter(|v| v["manifests"].is_array());
            if let Some(v) = index {
                if let Ok(mut a) = self.referrers_api.lock() {
                    *a = Some(true);
                }
                return Ok(digests_of(&v));
            }
            if api == Some(true) {
                return Ok(Vec::new());
            }
            if let Ok(mut a) = self.referrers_api.lock() {
                *a = Some(false);
            }
        }
        let schema_tag = digest.replacen(':', "-", 1);
        if !self.tags(repo).await?.contains(&schema_tag) {
            return Ok(Vec::new());
        }
        let index = self.fetch(repo, &schema_tag).await?;
        let v: Value = serde_json::from_slice(&index.bytes).map_err(|_| ImportError::Invalid {
            item: self.item(repo, &schema_tag),
            message: "the referrers tag is not a JSON index".into(),
        })?;
        Ok(digests_of(&v))
    }

    /// The source repository's tags (read once per repository).
    pub async fn tags(&self, repo: &str) -> Result<Arc<Vec<String>>, ImportError> {
        let mut lists = self.tag_lists.lock().await;
        if let Some(t) = lists.get(repo) {
            return Ok(t.clone());
        }
        let tags = Arc::new(
            self.src
                .tags(repo)
                .await
                .map_err(|e| self.source_err(format!("{}/{repo}", self.src.addr()), e))?,
        );
        lists.insert(repo.to_string(), tags.clone());
        Ok(tags)
    }
}

fn digests_of(index: &Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["digest"].as_str())
                .filter(|d| crate::digest::parse(d).is_ok())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn target_err(item: &str, e: ApiError) -> ImportError {
    ImportError::Target {
        item: item.to_string(),
        status: e.status.as_u16(),
        message: e.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn targets_default_to_the_source_name_and_tag() {
        let t = targets(&src("example.com:5000/team/app:1.2"), &[]).unwrap();
        assert_eq!(t[0].to_string(), "team/app:1.2");
        let by_digest = src(&format!("example.com/app@sha256:{}", "a".repeat(64)));
        let t = targets(&by_digest, &[]).unwrap();
        assert_eq!((t[0].repository.as_str(), t[0].tag.as_ref()), ("app", None));
    }

    #[test]
    fn target_forms() {
        let s = src("example.com/app:v1");
        let t = targets(
            &s,
            &[
                "mirror/app".into(),
                "other:v2".into(),
                format!("x@sha256:{}", "b".repeat(64)),
            ],
        )
        .unwrap();
        assert_eq!(t[0].to_string(), "mirror/app:v1");
        assert_eq!(t[1].to_string(), "other:v2");
        assert_eq!(t[2].tag, None);
        for bad in ["UPPER:v1", "app:.x", "app:v1@sha256:00", "a//b"] {
            let e = targets(&s, &[bad.to_string()]).unwrap_err();
            assert!(matches!(e, ImportError::BadTarget(..)), "{bad}: {e}");
        }
    }
}
