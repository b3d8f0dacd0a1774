//! Every change to the registry's content, made the same way by every caller (the HTTP
//! API, `acr-task repository` and `registry gc` on the files, the management API; later
//! import, purge, replication): the change and the events that describe it are written in
//! one transaction, so webhooks and the base-image trigger see every push and delete,
//! whoever made it. The tier's storage limit is enforced here (checked again under the
//! store's write lock, so concurrent pushes cannot pass it together), and so are what a
//! Classic registry refuses (deletes, gc; every push while its upgrade runs). Locks and
//! read-only modes belong here too. Blocking: call from blocking threads.

use crate::store::{BlobUpload, GcReport, NewManifest, Reference, Store, StoreError};
use crate::tier::Properties;

/// The check the store makes, under its write lock, before a change adds bytes.
fn admit(p: &Properties) -> impl Fn(u64, u64) -> Result<(), StoreError> + '_ {
    move |used, adds| Ok(p.check_storage(used, adds)?)
}

/// Whether `adds` more bytes would fit now: asked before work that would be wasted (an
/// upload's start, a blob's commit); the change itself is checked again in the store.
pub fn check_room(store: &Store, adds: u64) -> Result<(), StoreError> {
    let p = store.properties()?;
    p.check_writable()?;
    if p.limits().storage_bytes.is_some() {
        p.check_storage(store.storage_used()?, adds)?;
    }
    Ok(())
}

/// Stores a manifest (and its tag) with its push event. The store checks, in the same
/// transaction, that everything it references is in the repository.
pub fn push_manifest(
    store: &Store,
    m: &NewManifest,
    ctx: &RequestContext,
) -> Result<StoredEvent, StoreError> {
    let event = StoredEvent::new(
        RegistryEvent {
            action: EventAction::Push,
            repository: m.repo.clone(),
            tag: m.tag.clone(),
            digest: m.digest.clone(),
            media_type: m.media_type.clone(),
            size: m.content.len() as u64,
        },
        ctx.clone(),
    );
    let p = store.properties()?;
    p.check_writable()?;
    store.put_manifest(m, &[event.to_json()], &admit(&p))?;
    Ok(event)
}

/// Makes a received upload, whose digest the caller verified, a blob of `repo`. Refused
/// by the storage limit before anything is written (the upload is dropped with its bytes)
/// unless the registry holds that content already.
pub fn commit_blob(
    store: &Store,
    repo: &str,
    upload: &dyn BlobUpload,
    digest: &str,
    size: u64,
) -> Result<(), StoreError> {
    let p = store.properties()?;
    p.check_writable()?;
    if p.limits().storage_bytes.is_some() && store.blob_size(digest)?.is_none() {
        p.check_storage(store.storage_used()?, size)?;
    }
    let admit = admit(&p);
    store.commit_blob(repo, upload, digest, size, &admit)
}

/// Links `digest` into `repo` from `from` (a cross-repository mount); false if `from`
/// does not have it.
pub fn mount_blob(store: &Store, repo: &str, from: &str, digest: &str) -> Result<bool, StoreError> {
    store.properties()?.check_writable()?;
    store.mount_blob(repo, from, digest)
}

/// Links content the registry holds in any repository into `repo` (an import's mount);
/// false if it holds none.
pub fn link_blob(store: &Store, repo: &str, digest: &str) -> Result<bool, StoreError> {
    let p = store.properties()?;
    p.check_writable()?;
    let admit = admit(&p);
    store.link_existing_blob(repo, digest, &admit)
}

/// Unlinks a blob from `repo` (its content goes at the next gc); false if not linked.
pub fn unlink_blob(store: &Store, repo: &str, digest: &str) -> Result<bool, StoreError> {
    store.properties()?.check_managed("deletes")?;
    store.unlink_blob(repo, digest)
}

/// Changes the registry's tier and the operator's overrides of its limits, checked against
/// what is stored under the write lock: refused (nothing changed) when the new storage
/// limit is below the use, and never back to Classic; `replications`, the registry's
/// other regions, keep it on a tier that has geo-replication.
pub fn change_settings(
    store: &Store,
    ch: &crate::tier::Change,
    replications: u64,
) -> Result<Properties, StoreError> {
    store.update_properties(|now, used| {
        ch.sku.unwrap_or(now.sku).check_replicated(replications)?;
        Ok(now.change(ch, used)?)
    })
}

/// Garbage collection (see [`Store::gc`]).
pub fn gc(store: &Store, grace_secs: i64, dry_run: bool) -> Result<GcReport, StoreError> {
    store
        .properties()?
        .check_managed("garbage collection and deletes")?;
    store.gc(grace_secs, dry_run)
}

use super::{EventAction, RegistryEvent, RequestContext, StoredEvent};

/// Deletes a manifest by digest with every tag that pointed to it: one event for the
/// manifest and one per tag. `None` when it was not there.
pub fn delete_manifest(
    store: &Store,
    repo: &str,
    digest: &str,
    ctx: &RequestContext,
) -> Result<Option<Vec<StoredEvent>>, StoreError> {
    store.properties()?.check_managed("deletes")?;
    let mut made = Vec::new();
    let r = store.delete_manifest(repo, digest, |row, tags| {
        made = std::iter::once(None)
            .chain(tags.iter().cloned().map(Some))
            .map(|tag| {
                let ev = RegistryEvent {
                    action: EventAction::Delete,
                    repository: repo.to_string(),
                    tag,
                    digest: row.digest.clone(),
                    media_type: row.media_type.clone(),
                    size: row.size,
                };
                StoredEvent::new(ev, ctx.clone())
            })
            .collect::<Vec<_>>();
        made.iter().map(StoredEvent::to_json).collect()
    })?;
    Ok(r.map(|_| made))
}

/// Removes one tag (the manifest stays), with its event. `None` when it was not there.
pub fn delete_tag(
    store: &Store,
    repo: &str,
    tag: &str,
    ctx: &RequestContext,
) -> Result<Option<StoredEvent>, StoreError> {
    store.properties()?.check_managed("deletes")?;
    // Read the manifest first so the event can say what the tag pointed to.
    let row = store.get_manifest(repo, &Reference::Tag(tag.to_string()))?;
    let mut made = None;
    let r = store.delete_tag(repo, tag, |digest| {
        let ev = deleted(repo, Some(tag), digest, row.as_ref(), ctx);
        let json = vec![ev.to_json()];
        made = Some(ev);
        json
    })?;
    Ok(r.and(made))
}

/// The event of a delete: of `tag` (else of the manifest) naming `digest`, whose row
/// (when still stored) gives its type and size.
fn deleted(
    repo: &str,
    tag: Option<&str>,
    digest: &str,
    row: Option<&crate::store::ManifestRow>,
    ctx: &RequestContext,
) -> StoredEvent {
    let ev = RegistryEvent {
        action: EventAction::Delete,
        repository: repo.to_string(),
        tag: tag.map(str::to_string),
        digest: digest.to_string(),
        media_type: row.map(|r| r.media_type.clone()).unwrap_or_default(),
        size: row.map(|r| r.size).unwrap_or(0),
    };
    StoredEvent::new(ev, ctx.clone())
}

/// A purge's tag deletes, in one transaction: each tag only while it still names the
/// digest given with it (a tag pushed again meanwhile stays), each with its event.
/// Returns the tags deleted and the events.
pub fn delete_tags_if(
    store: &Store,
    repo: &str,
    tags: &[(String, String)],
    ctx: &RequestContext,
) -> Result<(Vec<String>, Vec<StoredEvent>), StoreError> {
    store.properties()?.check_managed("deletes")?;
    let mut made = Vec::new();
    let done = store.delete_tags(repo, tags, &mut |tag, digest, row| {
        let ev = deleted(repo, Some(tag), digest, row, ctx);
        let json = vec![ev.to_json()];
        made.push(ev);
        json
    })?;
    Ok((done, made))
}

/// A purge's manifest deletes, in order and in one transaction: each only while nothing
/// names it (no tag, index or referrer, and not a referrer itself), so a tag pushed
/// meanwhile keeps it. Returns the digests deleted and the events.
pub fn delete_unreferenced(
    store: &Store,
    repo: &str,
    digests: &[String],
    ctx: &RequestContext,
) -> Result<(Vec<String>, Vec<StoredEvent>), StoreError> {
    store.properties()?.check_managed("deletes")?;
    let mut made = Vec::new();
    let done = store.delete_unreferenced(repo, digests, &mut |row| {
        let ev = deleted(repo, None, &row.digest, Some(row), ctx);
        let json = vec![ev.to_json()];
        made.push(ev);
        json
    })?;
    Ok((done, made))
}

/// Deletes a repository: each manifest with its tags (and their events), then what is
/// left of it. `None` when there was no such repository.
pub fn delete_repository(
    store: &Store,
    repo: &str,
    ctx: &RequestContext,
) -> Result<Option<Vec<StoredEvent>>, StoreError> {
    store.properties()?.check_managed("deletes")?;
    // Refused whole while anything in it is locked (each delete checks again as it goes).
    if let Some(l) = store
        .locks(repo)?
        .into_iter()
        .find(|l| !(l.attributes.write_enabled && l.attributes.delete_enabled))
    {
        let attribute = if l.attributes.write_enabled {
            "delete-enabled"
        } else {
            "write-enabled"
        };
        return Err(crate::tier::LimitError::locked(repo, l.tag.as_deref(), attribute).into());
    }
    let Some(manifests) = store.list_manifests(repo)? else {
        return Ok(None);
    };
    let mut events = Vec::new();
    for m in manifests {
        if let Some(evs) = delete_manifest(store, repo, &m.digest, ctx)? {
            events.extend(evs);
        }
    }
    store.delete_repository(repo)?;
    Ok(Some(events))
}

/// Sets the attributes (locks) of `repo` (tag `None`) or of one of its tags; false if
/// there is no such one.
pub fn set_lock(
    store: &Store,
    repo: &str,
    tag: Option<&str>,
    a: crate::store::Attributes,
) -> Result<bool, StoreError> {
    store.properties()?.check_managed("locks")?;
    store.set_lock(repo, tag, a)
}

/// The context of a change made by this process's command line (not a request).
pub fn cli_context() -> RequestContext {
    RequestContext {
        id: uuid::Uuid::new_v4().to_string(),
        host: String::new(),
        method: "CLI".into(),
        useragent: format!("acr-task/{}", env!("CARGO_PKG_VERSION")),
        actor: std::env::var("USER").unwrap_or_default(),
        replicated: None,
    }
}
