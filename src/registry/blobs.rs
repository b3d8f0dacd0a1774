//! Blob reads (`HEAD`/`GET` with `Range`), deletes, and uploads (monolithic, chunked,
//! cross-repository mount).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::errors::ApiError;
use super::names::parse_digest;
use super::routes::{respond, Q};
use super::stream::{append_body, digest_of, file_body, BodyLimits};
use super::{Registry, Session, Upload};
use crate::store::{BlobUpload, UploadRow};

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// `bytes=a-b` / `bytes=a-` / `bytes=-n` against a blob of `size` bytes.
fn parse_range(h: &str, size: u64) -> Option<(u64, u64)> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // multi-range is not supported
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (size.saturating_sub(n), size.checked_sub(1)?)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size.checked_sub(1)?
        } else {
            b.parse::<u64>().ok()?.min(size.checked_sub(1)?)
        };
        (start, end)
    };
    (start <= end && end < size).then_some((start, end))
}

pub(super) async fn get(
    reg: &Registry,
    name: &str,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    let store = reg.inner.store.clone();
    let (n, d) = (name.to_string(), digest.clone());
    let Some(size) = blocking(move || store.blob_in_repo(&n, &d)).await? else {
        return Err(ApiError::blob_unknown(&digest));
    };
    let mut hdrs = vec![
        ("Docker-Content-Digest", digest.clone()),
        ("Content-Type", "application/octet-stream".to_string()),
        ("Accept-Ranges", "bytes".to_string()),
        ("ETag", format!("\"{digest}\"")),
    ];
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (status, start, len) = match range {
        Some(r) if !head => match parse_range(&r, size) {
            Some((s, e)) => {
                hdrs.push(("Content-Range", format!("bytes {s}-{e}/{size}")));
                (StatusCode::PARTIAL_CONTENT, s, e - s + 1)
            }
            None => {
                return Ok(respond(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    &[("Content-Range", format!("bytes */{size}"))],
                    Body::empty(),
                ))
            }
        },
        _ => (StatusCode::OK, 0, size),
    };
    if let (false, Some(ttl)) = (head, reg.inner.limits.redirect_pulls) {
        // The client reads the bytes from the bucket (its Range header goes along).
        let (store, d) = (reg.inner.store.clone(), digest.clone());
        if let Some(url) = blocking(move || store.presign_blob(&d, ttl)).await? {
            return Ok(respond(
                StatusCode::TEMPORARY_REDIRECT,
                &[
                    ("Location", url),
                    ("Docker-Content-Digest", digest),
                    ("Content-Length", "0".into()),
                ],
                Body::empty(),
            ));
        }
    }
    hdrs.push(("Content-Length", len.to_string()));
    let body = if head || len == 0 {
        Body::empty()
    } else {
        file_body(reg.inner.store.clone(), digest.clone(), start, len)
    };
    Ok(respond(status, &hdrs, body))
}

pub(super) async fn delete(reg: &Registry, name: &str, digest: &str) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    let store = reg.inner.store.clone();
    let (n, d) = (name.to_string(), digest.clone());
    if blocking(move || super::service::unlink_blob(&store, &n, &d)).await? {
        Ok(respond(
            StatusCode::ACCEPTED,
            &[("Content-Length", "0".into())],
            Body::empty(),
        ))
    } else {
        Err(ApiError::blob_unknown(&digest))
    }
}

fn body_limits(reg: &Registry, declared: Option<u64>) -> BodyLimits {
    BodyLimits {
        declared,
        max_blob: reg.inner.limits.max_blob_bytes,
        idle: reg.inner.limits.body_idle,
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn created(name: &str, digest: &str) -> Response {
    respond(
        StatusCode::CREATED,
        &[
            ("Location", format!("/v2/{name}/blobs/{digest}")),
            ("Docker-Content-Digest", digest.to_string()),
            ("Content-Length", "0".into()),
        ],
        Body::empty(),
    )
}

fn upload_headers(name: &str, id: &str, offset: u64) -> Vec<(&'static str, String)> {
    vec![
        ("Location", format!("/v2/{name}/blobs/uploads/{id}")),
        ("Range", format!("0-{}", offset.saturating_sub(1))),
        ("Docker-Upload-UUID", id.to_string()),
        ("Content-Length", "0".into()),
    ]
}

/// Receive a whole blob into a fresh temp file, verify and commit it.
async fn receive_whole(
    reg: &Registry,
    name: &str,
    digest: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    store_body(reg, name, digest, content_length(headers), body).await?;
    Ok(created(name, digest))
}

/// Stores `body` as blob `digest` of `name`: streamed into a new upload, verified (its
/// length when `declared`, its digest always), committed. Nothing of it stays otherwise.
/// Every whole-blob write (a monolithic push, an import) is made here.
pub(super) async fn store_body(
    reg: &Registry,
    name: &str,
    digest: &str,
    declared: Option<u64>,
    body: Body,
) -> Result<(), ApiError> {
    let up = begin(reg).await?;
    let res = append_body(
        up.clone(),
        0,
        &Sha256::new(),
        body,
        body_limits(reg, declared),
    )
    .await;
    let w = match res {
        Ok(w) if declared.is_some_and(|n| n != w.written) => {
            discard(vec![up]).await;
            return Err(ApiError::size_invalid(format!(
                "{} bytes received, {} declared",
                w.written,
                declared.unwrap_or_default()
            )));
        }
        Ok(w) => w,
        Err(e) => {
            discard(vec![up]).await;
            return Err(e);
        }
    };
    commit(reg, name, digest, up, Some(w.hasher), w.written).await
}

/// A new upload in the store.
async fn begin(reg: &Registry) -> Result<Arc<dyn BlobUpload>, ApiError> {
    let store = reg.inner.store.clone();
    Ok(Arc::from(blocking(move || store.begin_upload()).await?))
}

/// Cancels uploads (their data goes now, off the async threads, whoever still holds them).
pub(super) async fn discard(uploads: Vec<Arc<dyn BlobUpload>>) {
    let _ = tokio::task::spawn_blocking(move || {
        for u in uploads {
            u.cancel();
        }
    })
    .await;
}

/// Verify the digest of received data and commit it; the upload is discarded either way.
/// `hasher`: sha256 of every byte received, if it saw them all.
async fn commit(
    reg: &Registry,
    name: &str,
    digest: &str,
    up: Arc<dyn BlobUpload>,
    hasher: Option<Sha256>,
    size: u64,
) -> Result<(), ApiError> {
    // Uploads are hashed with sha256 as they arrive; content named by another registered
    // algorithm, or carried on from another server, is hashed again before it is accepted.
    let alg = crate::digest::parse(digest).unwrap_or(crate::digest::Algorithm::Sha256);
    let actual = match (alg, hasher) {
        (crate::digest::Algorithm::Sha256, Some(hasher)) => digest_of(hasher),
        (alg, _) => {
            let u = up.clone();
            let hashed = blocking(move || {
                u.reader()
                    .and_then(|r| crate::digest::of_reader(alg, r))
                    .map(|(d, _)| d)
                    .map_err(|source| crate::store::StoreError::Io {
                        path: "upload".into(),
                        source,
                    })
            })
            .await;
            match hashed {
                Ok(d) => d,
                Err(e) => {
                    discard(vec![up]).await;
                    return Err(e);
                }
            }
        }
    };
    if actual != digest {
        discard(vec![up]).await;
        return Err(ApiError::digest_invalid(format!(
            "provided digest {digest} does not match content digest {actual}"
        )));
    }
    let store = reg.inner.store.clone();
    let (n, d) = (name.to_string(), digest.to_string());
    blocking(move || {
        let r = super::service::commit_blob(&store, &n, up.as_ref(), &d, size);
        // Committed or not, the upload's own data goes afterwards, off the answer's path
        // (and whether or not the answer is still awaited).
        drop(tokio::runtime::Handle::current().spawn_blocking(move || up.cancel()));
        r
    })
    .await
}

pub(super) async fn start_upload(
    reg: &Registry,
    name: &str,
    client: std::net::IpAddr,
    q: &Q,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let (Some(mount), Some(from)) = (q.get("mount"), q.get("from")) {
        let digest = parse_digest(mount)?;
        if super::valid_name(from) {
            let store = reg.inner.store.clone();
            let (n, f, d) = (name.to_string(), from.clone(), digest.clone());
            if blocking(move || super::service::mount_blob(&store, &n, &f, &d)).await? {
                return Ok(created(name, &digest));
            }
        }
        // Not mountable: the spec says to fall back to a new upload session.
    }
    // A full registry refuses before any bytes are sent (the commit checks exactly,
    // and lets content it holds already through).
    let store = reg.inner.store.clone();
    blocking(move || super::service::check_room(&store, 1)).await?;
    let mounting = q.contains_key("mount") && q.contains_key("from");
    if let Some(d) = q.get("digest").filter(|_| !mounting) {
        let digest = parse_digest(d)?;
        return receive_whole(reg, name, &digest, headers, body).await;
    }
    let id = uuid::Uuid::new_v4().to_string();
    // Refused before the storage does any work; checked again when the session is added,
    // for sessions opened meanwhile.
    {
        let map = upload_table(reg)?;
        within_caps(&map, reg, name, client)?;
    }
    let up = Upload {
        blob: begin(reg).await?,
        offset: 0,
        hasher: Sha256::new(),
        rehash: false,
        checkpointed: false,
        touched: std::time::Instant::now(),
    };
    let refused = {
        let mut map = upload_table(reg)?;
        match within_caps(&map, reg, name, client) {
            Ok(()) => {
                map.insert(
                    id.clone(),
                    Session {
                        repo: name.to_string(),
                        client,
                        upload: Arc::new(tokio::sync::Mutex::new(up)),
                    },
                );
                None
            }
            Err(e) => Some((e, up.blob)),
        }
    };
    if let Some((e, blob)) = refused {
        discard(vec![blob]).await;
        return Err(e);
    }
    if let Some(peer) = reg.inner.peer.get() {
        // The servers sharing the registry send this session's requests here, and carry
        // it on from its row if this one dies: a session without one is not begun.
        let (store, i, n, me) = (
            reg.inner.store.clone(),
            id.clone(),
            name.to_string(),
            peer.me.clone(),
        );
        if let Err(e) = blocking(move || store.record_upload(&i, &n, &me)).await {
            tracing::warn!(upload = %id, error = %e.message, "recording an upload session");
            remove_session(reg, &id);
            return Err(e);
        }
    }
    Ok(respond(
        StatusCode::ACCEPTED,
        &upload_headers(name, &id, 0),
        Body::empty(),
    ))
}

/// Marks a request one server sent another (it is never sent on again).
const FORWARDED: &str = "x-acr-task-forwarded";

/// The server holding upload session `id` when it is not this one (servers sharing the
/// registry; a request another server sent here is answered here). A session this
/// server held before it restarted is carried on here from its checkpoint.
pub(super) async fn held_elsewhere(
    reg: &Registry,
    name: &str,
    id: &str,
    client: std::net::IpAddr,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    let Some(peer) = reg.inner.peer.get() else {
        return Ok(None);
    };
    if session(reg, name, id).is_ok() {
        return Ok(None);
    }
    let (store, i, n) = (reg.inner.store.clone(), id.to_string(), name.to_string());
    let Some(owner) = blocking(move || store.upload_owner(&i, &n)).await? else {
        return Ok(None);
    };
    if owner != peer.me && address(&owner) == peer.url {
        // This server's before a restart (the same address): carried on here.
        take_over(reg, name, id, &owner, client).await?;
        return Ok(None);
    }
    // A request another server sent here is answered here, never sent on.
    Ok((owner != peer.me && !headers.contains_key(FORWARDED)).then_some(owner))
}

/// Where the holder of an upload session is reached (its row names `url#boot`; rows of
/// servers from before boots were recorded name the address alone).
fn address(owner: &str) -> &str {
    owner.split_once('#').map_or(owner, |(url, _)| url)
}

/// What became of a request sent to the server holding its upload session.
pub(super) enum Forwarded {
    /// That server's answer.
    Answer(Response),
    /// That server is gone and this one carries the session on from its checkpoint: the
    /// request (its body untouched) is to be answered here.
    TakenOver(Body),
}

/// Sends a request of upload session `id` to `owner`, the server holding it, streaming the
/// body, and answers with its answer. When the owner cannot be reached, this server takes
/// the session over from the checkpoint saved with it (`client`: the caps count it
/// here); where none was saved the session is lost (`BLOB_UPLOAD_UNKNOWN`: the client
/// starts the blob again).
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    reg: &Registry,
    owner: &str,
    client: std::net::IpAddr,
    method: &axum::http::Method,
    name: &str,
    id: &str,
    q: &Q,
    headers: &HeaderMap,
    body: Body,
) -> Result<Forwarded, ApiError> {
    let Some(peer) = reg.inner.peer.get() else {
        return Err(ApiError::upload_unknown());
    };
    let at = address(owner);
    let mut url = reqwest::Url::parse(&format!("{at}/v2/{name}/blobs/uploads/{id}"))
        .map_err(|e| ApiError::internal(format!("the address of {at}: {e}")))?;
    if !q.is_empty() {
        url.query_pairs_mut().extend_pairs(q.iter());
    }
    // The body is taken when the request is sent, so one that never left is here still.
    let slot = Arc::new(std::sync::Mutex::new(Some(body)));
    let taken = slot.clone();
    let stream = {
        use futures_util::StreamExt;
        futures_util::stream::once(async move { taken.lock().ok().and_then(|mut b| b.take()) })
            .filter_map(|b| async move { b })
            .flat_map(|b| b.into_data_stream())
    };
    let mut req = peer
        .http
        .request(method.clone(), url)
        .header(FORWARDED, "1")
        .body(reqwest::Body::wrap_stream(stream));
    for h in [
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
    ] {
        if let Some(v) = headers.get(&h) {
            req = req.header(h, v);
        }
    }
    let answer = match req.send().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(upload = id, owner = at, error = %e, "the server holding an upload session does not answer");
            let body = slot.lock().ok().and_then(|mut b| b.take());
            return match body {
                Some(body) if refused(&e) => match take_over(reg, name, id, owner, client).await? {
                    true => Ok(Forwarded::TakenOver(body)),
                    false => Err(ApiError::upload_unknown()),
                },
                // Cut off mid-request: the session may live on (a retry finds out).
                _ => Err(ApiError::internal(format!(
                    "the server holding upload {id} stopped answering; retry the request"
                ))),
            };
        }
    };
    let status =
        StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out: Vec<(&str, String)> = Vec::new();
    for h in [
        "location",
        "range",
        "docker-upload-uuid",
        "docker-content-digest",
        "content-type",
    ] {
        if let Some(v) = answer.headers().get(h).and_then(|v| v.to_str().ok()) {
            out.push((h, v.to_string()));
        }
    }
    // Answers to upload requests are headers and, at most, a short error.
    let mut bytes = Vec::new();
    let mut stream = answer.bytes_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| ApiError::internal(format!("reading {at}'s answer: {e}")))?;
        if bytes.len() + chunk.len() > 64 * 1024 {
            return Err(ApiError::internal(format!("{at}'s answer is too long")));
        }
        bytes.extend_from_slice(&chunk);
    }
    out.push(("content-length", bytes.len().to_string()));
    Ok(Forwarded::Answer(respond(status, &out, Body::from(bytes))))
}

/// Whether the server is gone: nothing listens at its address; not one that is slow,
/// unreachable for a while or misconfigured, which may hold its sessions still.
fn refused(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = s.source();
    }
    false
}

/// Takes upload session `id` of `name` over from `owner`, a server gone, by the
/// checkpoint saved with it (once: another server trying at the same time gets none).
/// Whether this server holds it now.
async fn take_over(
    reg: &Registry,
    name: &str,
    id: &str,
    owner: &str,
    client: std::net::IpAddr,
) -> Result<bool, ApiError> {
    let Some(peer) = reg.inner.peer.get() else {
        return Ok(false);
    };
    let (store, i, n, from, to) = (
        reg.inner.store.clone(),
        id.to_string(),
        name.to_string(),
        owner.to_string(),
        peer.me.clone(),
    );
    let taken = blocking(move || store.take_upload(&i, &n, &from, &to)).await?;
    let Some((blob, offset)) = taken else {
        // A request beside this one may have just taken it over for this server.
        return Ok(session(reg, name, id).is_ok());
    };
    tracing::info!(
        upload = id,
        owner = address(owner),
        offset,
        "carrying on an upload session whose server is gone"
    );
    let up = Upload {
        blob: Arc::from(blob),
        offset,
        hasher: Sha256::new(),
        // Carried on from nothing, the hash sees every byte and there is no checkpoint.
        rehash: offset > 0,
        checkpointed: offset > 0,
        touched: std::time::Instant::now(),
    };
    upload_table(reg)?
        .entry(id.to_string())
        .or_insert_with(|| Session {
            repo: name.to_string(),
            client,
            upload: Arc::new(tokio::sync::Mutex::new(up)),
        });
    Ok(true)
}

/// Where servers share the registry, makes the chunk just appended durable in the blob
/// storage and saves where the session stands with it, before it is acknowledged. On
/// failure the session ends; when another server has taken it over, it is dropped here.
async fn checkpoint(reg: &Registry, id: &str, up: &mut Upload) -> Result<(), ApiError> {
    let Some(peer) = reg.inner.peer.get() else {
        return Ok(());
    };
    let (blob, len, store, i, me) = (
        up.blob.clone(),
        up.offset,
        reg.inner.store.clone(),
        id.to_string(),
        peer.me.clone(),
    );
    let saved = blocking(move || match blob.checkpoint(len)? {
        Some(state) => store.save_upload(&i, &me, len, &state).map(Some),
        // A backend that keeps uploads on this server (a directory's files).
        None => Ok(None),
    })
    .await;
    match saved {
        Ok(None) => Ok(()),
        Ok(Some(UploadRow::Mine)) => {
            up.checkpointed = true;
            Ok(())
        }
        Ok(Some(_)) => {
            // Another server carries the session on, or it was expired as abandoned
            // (its checkpoint removed): what the bucket holds is not this server's,
            // unless no state of it was ever saved (then nothing else names it).
            remove_session(reg, id);
            if !up.checkpointed {
                discard(vec![up.blob.clone()]).await;
            }
            Err(ApiError::upload_unknown())
        }
        Err(e) => {
            // What reached the bucket may be ahead of what was saved: the session ends
            // (the client starts the blob again) rather than go on from a guess.
            end_session(reg, id, up.blob.clone()).await;
            Err(e)
        }
    }
}

fn upload_table(reg: &Registry) -> Result<std::sync::MutexGuard<'_, super::Sessions>, ApiError> {
    reg.inner
        .uploads
        .lock()
        .map_err(|_| ApiError::internal("upload table poisoned"))
}

/// Whether `client` may open one more upload session in `name`.
fn within_caps(
    map: &super::Sessions,
    reg: &Registry,
    name: &str,
    client: std::net::IpAddr,
) -> Result<(), ApiError> {
    let limits = &reg.inner.limits;
    let in_repo = map.values().filter(|s| s.repo == name).count();
    let of_client = map.values().filter(|s| s.client == client).count();
    if in_repo >= limits.max_uploads_per_repository {
        return Err(too_many_uploads(format!(
            "repository {name} has {in_repo} open uploads (the limit); finish or cancel some, or retry later"
        )));
    }
    if of_client >= limits.max_uploads_per_client {
        return Err(too_many_uploads(format!(
            "this client has {of_client} open uploads (the limit); finish or cancel some, or retry later"
        )));
    }
    Ok(())
}

fn too_many_uploads(message: String) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", message)
}

fn session(
    reg: &Registry,
    name: &str,
    id: &str,
) -> Result<Arc<tokio::sync::Mutex<Upload>>, ApiError> {
    let map = upload_table(reg)?;
    match map.get(id) {
        // A session is only visible through the repository that opened it.
        Some(s) if s.repo == name => Ok(s.upload.clone()),
        _ => Err(ApiError::upload_unknown()),
    }
}

/// Remove sessions idle longer than `idle` (busy ones are locked and skipped); returns
/// their uploads to [`discard`]. The registry's maintenance loop runs it on a timer, so
/// abandoned uploads cannot pile up on a long-running server.
pub(super) fn take_expired(
    map: &mut super::Sessions,
    idle: std::time::Duration,
) -> Vec<(String, Arc<dyn BlobUpload>)> {
    let mut gone = Vec::new();
    map.retain(|id, s| match s.upload.try_lock() {
        Ok(up) if up.touched.elapsed() > idle => {
            gone.push((id.clone(), up.blob.clone()));
            false
        }
        _ => true,
    });
    gone
}

/// The maintenance loop's sweep of upload sessions: those idle too long are dropped with
/// their data (where servers share the registry, only if still this server's: one taken
/// over lives on elsewhere), and the rows of those open are marked in use, so the
/// leader never takes a long request's session for abandoned.
pub(super) async fn sweep(reg: &Registry) {
    let (expired, open) = match reg.inner.uploads.lock() {
        Ok(mut map) => {
            let expired = take_expired(&mut map, reg.inner.limits.upload_idle);
            (expired, map.keys().cloned().collect::<Vec<_>>())
        }
        Err(_) => return,
    };
    if !expired.is_empty() {
        tracing::info!(sessions = expired.len(), "idle upload sessions dropped");
    }
    for (id, blob) in expired {
        end_session(reg, &id, blob).await;
    }
    if let (Some(peer), false) = (reg.inner.peer.get(), open.is_empty()) {
        let (store, me) = (reg.inner.store.clone(), peer.me.clone());
        if let Err(e) = blocking(move || store.touch_uploads(&me, &open)).await {
            tracing::warn!(error = %e.message, "marking upload sessions in use");
        }
    }
}

/// Forgets a session the servers sharing the registry were told of: whether its row was
/// this server's (or there is none to share), another's now, or gone.
async fn forget_shared(reg: &Registry, id: &str) -> Result<UploadRow, ApiError> {
    let Some(peer) = reg.inner.peer.get() else {
        return Ok(UploadRow::Mine);
    };
    let (store, i, me) = (reg.inner.store.clone(), id.to_string(), peer.me.clone());
    blocking(move || store.forget_upload(&i, &me)).await
}

/// Ends a session here: its row first (so no request finds the row without the session),
/// then the session; its data goes only if the row was this server's (a session another
/// server carries on, or one expired as abandoned, is not this one's to remove).
async fn end_session(reg: &Registry, id: &str, blob: Arc<dyn BlobUpload>) {
    let row = forget_shared(reg, id).await.unwrap_or_else(|e| {
        // Left for the leader to expire with its checkpoint.
        tracing::warn!(upload = id, error = %e.message, "forgetting an upload session");
        UploadRow::Missing
    });
    remove_session(reg, id);
    if row == UploadRow::Mine {
        discard(vec![blob]).await;
    }
}

fn remove_session(reg: &Registry, id: &str) {
    if let Ok(mut map) = reg.inner.uploads.lock() {
        map.remove(id);
    }
}

pub(super) async fn upload_status(
    reg: &Registry,
    name: &str,
    id: &str,
) -> Result<Response, ApiError> {
    let s = session(reg, name, id)?;
    let up = s.lock().await;
    Ok(respond(
        StatusCode::NO_CONTENT,
        &upload_headers(name, id, up.offset),
        Body::empty(),
    ))
}

/// `Content-Range: <start>-<end>` (some clients prefix `bytes `).
fn parse_content_range(h: &HeaderMap) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(v) = h.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::range_invalid("bad Content-Range"))?;
    let s = s
        .trim()
        .trim_start_matches("bytes")
        .trim_start_matches([' ', '=']);
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| ApiError::range_invalid("bad Content-Range"))?;
    let b = b.split('/').next().unwrap_or(b);
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) if a <= b => Ok(Some((a, b))),
        _ => Err(ApiError::range_invalid("bad Content-Range")),
    }
}

/// Append one chunk to a session, enforcing `Content-Range` order and length.
async fn append_chunk(
    reg: &Registry,
    up: &mut Upload,
    headers: &HeaderMap,
    body: Body,
) -> Result<(), ApiError> {
    let range = parse_content_range(headers)?;
    let mut limit = content_length(headers);
    if let Some((start, end)) = range {
        if start != up.offset {
            return Err(ApiError::range_invalid(format!(
                "chunk starts at {start}, upload is at {}",
                up.offset
            )));
        }
        limit = Some(end - start + 1);
    }
    up.touched = std::time::Instant::now();
    let w = append_body(
        up.blob.clone(),
        up.offset,
        &up.hasher,
        body,
        body_limits(reg, limit),
    )
    .await?;
    if let Some(l) = limit {
        if w.written != l {
            // Cut back: the chunk is not applied.
            let (b, off) = (up.blob.clone(), up.offset);
            let _ = tokio::task::spawn_blocking(move || b.set_len(off)).await;
            return Err(ApiError::range_invalid(format!(
                "chunk declared {l} bytes, body had {}",
                w.written
            )));
        }
    }
    up.offset += w.written;
    up.hasher = w.hasher;
    up.touched = std::time::Instant::now();
    Ok(())
}

pub(super) async fn patch_upload(
    reg: &Registry,
    name: &str,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let s = session(reg, name, id)?;
    let mut up = s.lock().await;
    let appended = match append_chunk(reg, &mut up, headers, body).await {
        Ok(()) => checkpoint(reg, id, &mut up).await,
        Err(e) => Err(e),
    };
    if let Err(e) = appended {
        tracing::debug!(
            upload = id,
            offset = up.offset,
            code = e.code,
            "chunk refused"
        );
        return Err(e);
    }
    Ok(respond(
        StatusCode::ACCEPTED,
        &upload_headers(name, id, up.offset),
        Body::empty(),
    ))
}

pub(super) async fn finish_upload(
    reg: &Registry,
    name: &str,
    id: &str,
    q: &Q,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(d) = q.get("digest") else {
        return Err(ApiError::digest_invalid("digest query parameter required"));
    };
    let digest = parse_digest(d)?;
    let s = session(reg, name, id)?;
    let mut up = s.lock().await;
    let before = (up.offset, up.hasher.clone());
    append_chunk(reg, &mut up, headers, body).await?;
    // The session ends here whatever the outcome: a wrong digest discards the data. Its
    // row goes first, so no request finds it here without its session; if that cannot be
    // done, the last chunk is taken back and the client may send the request again.
    let row = match forget_shared(reg, id).await {
        Ok(row) => row,
        Err(e) => {
            let (b, off) = (up.blob.clone(), before.0);
            let _ = tokio::task::spawn_blocking(move || b.set_len(off)).await;
            (up.offset, up.hasher) = before;
            return Err(e);
        }
    };
    remove_session(reg, id);
    if row == UploadRow::Moved || (row == UploadRow::Missing && up.checkpointed) {
        // Another server took it over (this one seemed gone) and finishes it, or it was
        // expired as abandoned: what the bucket holds is not this server's.
        return Err(ApiError::upload_unknown());
    }
    let hasher = (!up.rehash).then(|| up.hasher.clone());
    let (blob, size) = (up.blob.clone(), up.offset);
    // Still holding the session: a chunk that waited for it finds the upload sealed.
    commit(reg, name, &digest, blob, hasher, size).await?;
    Ok(created(name, &digest))
}

pub(super) async fn cancel_upload(
    reg: &Registry,
    name: &str,
    id: &str,
) -> Result<Response, ApiError> {
    let s = session(reg, name, id)?;
    let up = s.lock().await;
    end_session(reg, id, up.blob.clone()).await;
    Ok(respond(
        StatusCode::NO_CONTENT,
        &[("Content-Length", "0".into())],
        Body::empty(),
    ))
}

#[cfg(test)]
mod tests {
    use super::{parse_range, take_expired};
    use crate::registry::{Session, Sessions, Upload};
    use crate::store::BlobStorage;
    use sha2::Digest;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn idle_sessions_expire_and_active_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = crate::store::FsBlobs::open(dir.path()).unwrap();
        let mk = |age: Duration, mark: &str| {
            let blob: Arc<dyn crate::store::BlobUpload> = Arc::from(blobs.begin().unwrap());
            blob.write_at(mark.as_bytes(), 0).unwrap();
            let up = Upload {
                blob,
                offset: 0,
                hasher: sha2::Sha256::new(),
                rehash: false,
                checkpointed: false,
                touched: Instant::now().checked_sub(age).unwrap(),
            };
            Session {
                repo: "r".to_string(),
                client: std::net::Ipv4Addr::LOCALHOST.into(),
                upload: Arc::new(tokio::sync::Mutex::new(up)),
            }
        };
        const UPLOAD_IDLE: Duration = Duration::from_secs(900);
        let mut map = Sessions::new();
        map.insert(
            "old".into(),
            mk(UPLOAD_IDLE + Duration::from_secs(5), "/tmp/old"),
        );
        map.insert("new".into(), mk(Duration::from_secs(1), "/tmp/new"));
        let busy = mk(UPLOAD_IDLE * 2, "/tmp/busy");
        let guard = busy.upload.clone();
        let _held = guard.try_lock().unwrap();
        map.insert("busy".into(), busy);
        let gone = take_expired(&mut map, UPLOAD_IDLE);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, "old");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut gone[0].1.reader().unwrap(), &mut text).unwrap();
        assert_eq!(text, "/tmp/old");
        assert!(map.contains_key("new") && map.contains_key("busy"));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }
}
