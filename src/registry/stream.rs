//! Streaming between HTTP bodies and blob files without holding a whole blob in memory.
//!
//! Uploads: body chunks are gathered on the async side into batches of [`BATCH`] bytes;
//! each full batch is written (`pwrite`) and hashed by two short blocking tasks that run
//! while the next batch arrives. No thread waits for a slow client's bytes: blocking
//! threads are only used while there is data to write. Every [`SYNC_EVERY`] bytes an
//! `fdatasync` starts in the background so that the final fsync at commit has little left.
//! Downloads: blobs the storage can map are sent as slices of the mapping, straight from
//! the page cache, or (sealed at rest) as buffers it decrypts, in the chunk size it asks
//! for; others are read by one blocking thread in [`READ_CHUNK`]-sized chunks.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::errors::ApiError;
use crate::store::{BlobUpload, Store};

const SYNC_EVERY: u64 = 64 * 1024 * 1024;
const READ_CHUNK: usize = 256 * 1024;
const BATCH: usize = 2 * 1024 * 1024;

pub(crate) struct Written {
    pub hasher: Sha256,
    pub written: u64,
}

/// What may arrive in one body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    /// Bytes the request declared (`Content-Length` or `Content-Range`): more is refused.
    pub declared: Option<u64>,
    /// Largest the whole blob may become (offset included).
    pub max_blob: u64,
    /// A body that sends nothing for this long is abandoned.
    pub idle: Duration,
}

/// One batch written at `at` and hashed, both off the async threads, side by side.
async fn write_batch(
    file: &Arc<dyn BlobUpload>,
    at: u64,
    batch: Vec<Bytes>,
    hasher: Sha256,
) -> Result<Sha256, ApiError> {
    let batch = Arc::new(batch);
    let (f, b) = (file.clone(), batch.clone());
    let write = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut pos = at;
        for chunk in b.iter() {
            f.write_at(chunk, pos)?;
            pos += chunk.len() as u64;
        }
        Ok(())
    });
    let hash = tokio::task::spawn_blocking(move || {
        let mut h = hasher;
        for chunk in batch.iter() {
            h.update(chunk);
        }
        h
    });
    let (w, h) = tokio::join!(write, hash);
    w?.map_err(ApiError::internal)?;
    Ok(h?)
}

/// Write `body` into the upload at `offset` (truncating anything after it), continuing
/// `hasher`. On a broken body (client gone, truncated `Content-Length`, idle too long) or
/// a limit exceeded, the upload is cut back to `offset` and an error returned, so a failed
/// chunk leaves no trace.
pub(crate) async fn append_body(
    file: Arc<dyn BlobUpload>,
    offset: u64,
    hasher: &Sha256,
    body: Body,
    limits: BodyLimits,
) -> Result<Written, ApiError> {
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.set_len(offset))
        .await?
        .map_err(|e| ApiError::internal(format!("upload: {e}")))?;
    let result = receive(&file, offset, hasher.clone(), body, limits).await;
    if result.is_err() {
        let f = file.clone();
        let _ = tokio::task::spawn_blocking(move || f.set_len(offset)).await;
    }
    result
}

async fn receive(
    file: &Arc<dyn BlobUpload>,
    offset: u64,
    mut hasher: Sha256,
    body: Body,
    limits: BodyLimits,
) -> Result<Written, ApiError> {
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    let mut written_at = offset;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    // The previous batch's write and hash, still running while this one fills.
    let mut pending: Option<tokio::task::JoinHandle<Result<Sha256, ApiError>>> = None;
    let mut syncing: Option<tokio::task::JoinHandle<()>> = None;
    let mut since_sync = 0u64;
    let mut done = false;
    let mut failure: Option<ApiError> = None;
    while !done && failure.is_none() {
        match tokio::time::timeout(limits.idle, stream.next()).await {
            Err(_) => {
                failure = Some(ApiError::upload_invalid(format!(
                    "no data received for {} s; upload abandoned",
                    limits.idle.as_secs()
                )));
                continue;
            }
            Ok(Some(Err(e))) => {
                failure = Some(ApiError::upload_invalid(format!(
                    "request body ended early: {e}"
                )));
                continue;
            }
            Ok(Some(Ok(chunk))) => {
                total += chunk.len() as u64;
                if limits.declared.is_some_and(|l| total > l) {
                    failure = Some(ApiError::size_invalid("body longer than declared"));
                    continue;
                }
                if offset + total > limits.max_blob {
                    failure = Some(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "SIZE_INVALID",
                        format!(
                            "blob exceeds this registry's maximum blob size of {} bytes",
                            limits.max_blob
                        ),
                    ));
                    continue;
                }
                batch_len += chunk.len();
                batch.push(chunk);
            }
            Ok(None) => done = true,
        }
        if batch_len >= BATCH || (done && batch_len > 0) {
            if let Some(p) = pending.take() {
                match p.await {
                    Ok(Ok(h)) => hasher = h,
                    Ok(Err(e)) => {
                        failure = Some(e);
                        continue;
                    }
                    Err(e) => {
                        failure = Some(e.into());
                        continue;
                    }
                }
            }
            let at = written_at;
            written_at += batch_len as u64;
            since_sync += batch_len as u64;
            let (f, b, h) = (file.clone(), std::mem::take(&mut batch), hasher.clone());
            batch_len = 0;
            pending = Some(tokio::spawn(async move { write_batch(&f, at, b, h).await }));
            if since_sync >= SYNC_EVERY && syncing.as_ref().is_none_or(|s| s.is_finished()) {
                since_sync = 0;
                let f = file.clone();
                syncing = Some(tokio::task::spawn_blocking(move || {
                    let _ = f.sync_some();
                }));
            }
        }
    }
    // Nothing may still be writing when the caller cuts the file back.
    if let Some(p) = pending.take() {
        match p.await {
            Ok(Ok(h)) => hasher = h,
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(e) => {
                failure.get_or_insert(e.into());
            }
        }
    }
    if let Some(s) = syncing {
        let _ = s.await;
    }
    if let Some(f) = failure {
        return Err(f);
    }
    Ok(Written {
        hasher,
        written: total,
    })
}

/// A response body that streams `len` bytes of blob `digest` from `start`.
pub(crate) fn file_body(store: Arc<Store>, digest: String, start: u64, len: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let run = || -> std::io::Result<()> {
            if send_mapped(&tx, &store, &digest, start, len)? {
                return Ok(());
            }
            let mut f = store
                .blob_reader(&digest, start)
                .map_err(std::io::Error::other)?;
            let mut left = len;
            while left > 0 {
                let want = left.min(READ_CHUNK as u64) as usize;
                let mut buf = Vec::with_capacity(want);
                (&mut f).take(want as u64).read_to_end(&mut buf)?;
                if buf.len() != want {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "blob file shorter than recorded",
                    ));
                }
                left -= want as u64;
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return Ok(()); // client went away
                }
            }
            Ok(())
        };
        if let Err(e) = run() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Body::from_stream(stream)
}

/// Sends `len` bytes of blob `digest` from `start` as mapped chunks (no copy), or
/// returns `false` at once if the storage cannot map it. Each chunk's pages are touched
/// here first, on the blocking thread, so the page faults of a blob not in the page cache
/// never stall the async thread that writes it to the socket.
fn send_mapped(
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    store: &Store,
    digest: &str,
    start: u64,
    len: u64,
) -> std::io::Result<bool> {
    let (mut at, end) = (start, start + len);
    let chunk = store.blob_map_chunk() as u64;
    while at < end {
        let n = (end - at).min(chunk) as usize;
        let Some(chunk) = store
            .blob_map(digest, at, n)
            .map_err(std::io::Error::other)?
        else {
            return Ok(false);
        };
        let mut sum = 0u8;
        for b in chunk.iter().step_by(4096) {
            sum = sum.wrapping_add(*b);
        }
        std::hint::black_box(sum);
        if tx.blocking_send(Ok(chunk)).is_err() {
            return Ok(true); // client went away
        }
        at += n as u64;
    }
    Ok(true)
}

pub(crate) fn digest_of(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}
