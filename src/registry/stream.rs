//! Streaming between HTTP bodies and blob files without holding a whole blob in memory.
//!
//! Uploads: the async side forwards body chunks over a small bounded channel to one blocking
//! thread that hashes and writes them; a second thread fdatasyncs every [`SYNC_EVERY`] bytes
//! so that the final fsync at commit has little left to flush.
//! Downloads: one blocking thread reads [`READ_CHUNK`]-sized chunks into the response body.

use std::fs::OpenOptions;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::errors::ApiError;

const SYNC_EVERY: u64 = 64 * 1024 * 1024;
const READ_CHUNK: usize = 256 * 1024;
const CHANNEL_DEPTH: usize = 16;
const WRITE_BUF: usize = 1024 * 1024;

pub(crate) struct Written {
    pub hasher: Sha256,
    pub written: u64,
}

/// Write `body` into `path` at `offset` (truncating anything after it), continuing `hasher`.
/// On a broken body (client gone, truncated `Content-Length`) or `limit` exceeded, the file is
/// cut back to `offset` and an error returned, so a failed chunk leaves no trace.
pub(crate) async fn append_body(
    path: PathBuf,
    offset: u64,
    hasher: &Sha256,
    body: Body,
    limit: Option<u64>,
) -> Result<Written, ApiError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    // Hashing runs on its own thread beside the writer: on two cores the SHA-256 of a large
    // upload then overlaps the copy into the page cache instead of adding to it.
    let (htx, mut hrx) = tokio::sync::mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let mut h = hasher.clone();
    let hashing = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = hrx.blocking_recv() {
            h.update(&chunk);
        }
        h
    });
    let p = path.clone();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&p)?;
        file.set_len(offset)?;
        let sync_file = file.try_clone()?;
        // Hyper hands over small chunks; batch them into large writes.
        let mut f = BufWriter::with_capacity(WRITE_BUF, file);
        f.seek(SeekFrom::Start(offset))?;
        // Started on first need, so small uploads cost no extra thread.
        let mut syncer: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)> = None;
        let mut n = 0u64;
        let mut since_sync = 0u64;
        let mut sync_file = Some(sync_file);
        while let Some(chunk) = rx.blocking_recv() {
            f.write_all(&chunk)?;
            n += chunk.len() as u64;
            since_sync += chunk.len() as u64;
            if since_sync >= SYNC_EVERY {
                since_sync = 0;
                if let Some(file) = sync_file.take() {
                    let (tx, rx) = std::sync::mpsc::channel::<()>();
                    let handle = std::thread::spawn(move || {
                        while rx.recv().is_ok() {
                            while rx.try_recv().is_ok() {}
                            let _ = file.sync_data();
                        }
                    });
                    syncer = Some((tx, handle));
                }
                if let Some((tx, _)) = &syncer {
                    let _ = tx.send(());
                }
            }
        }
        f.flush()?;
        if let Some((tx, handle)) = syncer {
            drop(tx);
            let _ = handle.join();
        }
        Ok(n)
    });
    let mut stream = body.into_data_stream();
    let mut failure = None;
    let mut total = 0u64;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                total += chunk.len() as u64;
                if limit.is_some_and(|l| total > l) {
                    failure = Some(ApiError::size_invalid("body longer than declared"));
                    break;
                }
                if htx.send(chunk.clone()).await.is_err() || tx.send(chunk).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(e) => {
                failure = Some(ApiError::upload_invalid(format!(
                    "request body ended early: {e}"
                )));
                break;
            }
        }
    }
    drop(tx);
    drop(htx);
    let result = writer.await?;
    let hasher = hashing.await?;
    let failure = match (failure, result) {
        (None, Ok(written)) => return Ok(Written { hasher, written }),
        (Some(f), _) => f,
        (None, Err(e)) => ApiError::internal(format!("{}: {e}", path.display())),
    };
    let _ = tokio::task::spawn_blocking(move || {
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(offset))
    })
    .await;
    Err(failure)
}

/// A response body that streams `len` bytes of `path` from `start`.
pub(crate) fn file_body(path: PathBuf, start: u64, len: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let run = || -> std::io::Result<()> {
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(start))?;
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

pub(crate) fn digest_of(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}
