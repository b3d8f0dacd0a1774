//! SQLite schema and queries. Functions take a `&Connection` (a `Transaction` derefs to one)
//! so that callers decide the transaction boundaries.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::StoreError;

pub(crate) fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    Ok(conn)
}

/// How every acr-task database is used: WAL lets readers run beside the writer; FULL
/// makes each commit durable on return; writers wait for each other instead of failing.
pub fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
}

/// The registry metadata's schema, one entry per version (see [`super::migrate`]).
pub(crate) const MIGRATIONS: &[super::migrate::Migration] = &[super::migrate::Migration::Sql(
    "CREATE TABLE IF NOT EXISTS repositories(
            name TEXT PRIMARY KEY, created INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS blobs(
            digest TEXT PRIMARY KEY, size INTEGER NOT NULL, created INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS repo_blobs(
            repo TEXT NOT NULL, digest TEXT NOT NULL, created INTEGER NOT NULL,
            PRIMARY KEY(repo, digest));
         CREATE INDEX IF NOT EXISTS repo_blobs_digest ON repo_blobs(digest);
         CREATE TABLE IF NOT EXISTS manifests(
            repo TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL,
            artifact_type TEXT, subject TEXT, size INTEGER NOT NULL, content BLOB NOT NULL,
            created INTEGER NOT NULL, PRIMARY KEY(repo, digest));
         CREATE INDEX IF NOT EXISTS manifests_subject ON manifests(repo, subject);
         CREATE TABLE IF NOT EXISTS manifest_refs(
            repo TEXT NOT NULL, manifest TEXT NOT NULL, target TEXT NOT NULL,
            kind TEXT NOT NULL, PRIMARY KEY(repo, manifest, kind, target));
         CREATE INDEX IF NOT EXISTS manifest_refs_target ON manifest_refs(repo, target);
         CREATE TABLE IF NOT EXISTS tags(
            repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL,
            updated INTEGER NOT NULL, PRIMARY KEY(repo, tag));
         CREATE INDEX IF NOT EXISTS tags_digest ON tags(repo, digest);
         CREATE TABLE IF NOT EXISTS outbox(
            seq INTEGER PRIMARY KEY AUTOINCREMENT, created INTEGER NOT NULL,
            payload TEXT NOT NULL);",
)];

/// Appends event payloads to the outbox inside the caller's transaction, so an event
/// exists exactly when the change it describes does.
pub(crate) fn insert_outbox(tx: &Connection, payloads: &[String]) -> Result<(), StoreError> {
    let t = now();
    for p in payloads {
        tx.execute(
            "INSERT INTO outbox(created, payload) VALUES (?1, ?2)",
            rusqlite::params![t, p],
        )?;
    }
    Ok(())
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A manifest reference from a URL: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(String),
}

/// A stored manifest with its raw bytes.
#[derive(Debug, Clone)]
pub struct ManifestRow {
    pub digest: String,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub subject: Option<String>,
    pub size: u64,
    pub content: Vec<u8>,
    pub created: i64,
}

/// A manifest as listed by `repository show-manifests`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestInfo {
    pub digest: String,
    pub media_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub size: u64,
    /// Unix seconds.
    #[serde(with = "crate::timefmt::secs")]
    pub created: i64,
    pub tags: Vec<String>,
}

/// Content a manifest points at: its digest and the size the manifest declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: String,
    pub size: u64,
}

/// A manifest to store, already parsed and validated by the registry.
#[derive(Debug, Clone)]
pub struct NewManifest {
    pub repo: String,
    pub digest: String,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub subject: Option<String>,
    pub content: Vec<u8>,
    /// Blobs (config, layers) that must be linked to the repository, with the sizes the
    /// manifest declares for them.
    pub blobs: Vec<Descriptor>,
    /// Child manifests (of an index) that must be in the repository, with declared sizes.
    pub children: Vec<Descriptor>,
    pub tag: Option<String>,
}

pub(crate) fn ensure_repo(conn: &Connection, repo: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO repositories(name, created) VALUES (?1, ?2)",
        params![repo, now()],
    )?;
    Ok(())
}

pub(crate) fn repo_exists(conn: &Connection, repo: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM repositories WHERE name = ?1",
            params![repo],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

pub(crate) fn blob_size(conn: &Connection, digest: &str) -> Result<Option<u64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT size FROM blobs WHERE digest = ?1",
            params![digest],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|s| s as u64))
}

pub(crate) fn insert_blob(conn: &Connection, digest: &str, size: u64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO blobs(digest, size, created) VALUES (?1, ?2, ?3)",
        params![digest, size as i64, now()],
    )?;
    Ok(())
}

pub(crate) fn link_blob(conn: &Connection, repo: &str, digest: &str) -> Result<(), StoreError> {
    ensure_repo(conn, repo)?;
    // Refresh `created` so a re-pushed blob gets a new gc grace period.
    conn.execute(
        "INSERT INTO repo_blobs(repo, digest, created) VALUES (?1, ?2, ?3)
         ON CONFLICT(repo, digest) DO UPDATE SET created = excluded.created",
        params![repo, digest, now()],
    )?;
    Ok(())
}

pub(crate) fn blob_in_repo(
    conn: &Connection,
    repo: &str,
    digest: &str,
) -> Result<Option<u64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT b.size FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
             WHERE rb.repo = ?1 AND rb.digest = ?2",
            params![repo, digest],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|s| s as u64))
}

fn manifest_size(conn: &Connection, repo: &str, digest: &str) -> Result<Option<u64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT size FROM manifests WHERE repo = ?1 AND digest = ?2",
            params![repo, digest],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|s| s as u64))
}

pub(crate) fn put_manifest(conn: &Connection, m: &NewManifest) -> Result<(), StoreError> {
    // A descriptor's size is part of what a client verifies; one that disagrees with the
    // stored content would make every pull of this manifest fail (or read past the blob).
    let check = |d: &Descriptor, stored: Option<u64>| match stored {
        None => Err(StoreError::MissingRef(d.digest.clone())),
        Some(actual) if actual != d.size => Err(StoreError::SizeMismatch {
            digest: d.digest.clone(),
            declared: d.size,
            actual,
        }),
        Some(_) => Ok(()),
    };
    for b in &m.blobs {
        check(b, blob_in_repo(conn, &m.repo, &b.digest)?)?;
    }
    for c in &m.children {
        check(c, manifest_size(conn, &m.repo, &c.digest)?)?;
    }
    ensure_repo(conn, &m.repo)?;
    let t = now();
    conn.execute(
        "INSERT INTO manifests(repo, digest, media_type, artifact_type, subject, size, content, created)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(repo, digest) DO UPDATE SET created = excluded.created",
        params![
            m.repo,
            m.digest,
            m.media_type,
            m.artifact_type,
            m.subject,
            m.content.len() as i64,
            m.content,
            t
        ],
    )?;
    {
        let mut stmt = conn.prepare_cached(
            "INSERT OR IGNORE INTO manifest_refs(repo, manifest, target, kind) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for b in &m.blobs {
            stmt.execute(params![m.repo, m.digest, b.digest, "blob"])?;
        }
        for c in &m.children {
            stmt.execute(params![m.repo, m.digest, c.digest, "manifest"])?;
        }
    }
    if let Some(tag) = &m.tag {
        conn.execute(
            "INSERT OR REPLACE INTO tags(repo, tag, digest, updated) VALUES (?1, ?2, ?3, ?4)",
            params![m.repo, tag, m.digest, t],
        )?;
    }
    Ok(())
}

fn row_to_manifest(r: &rusqlite::Row<'_>) -> rusqlite::Result<ManifestRow> {
    Ok(ManifestRow {
        digest: r.get(0)?,
        media_type: r.get(1)?,
        artifact_type: r.get(2)?,
        subject: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
        content: r.get(5)?,
        created: r.get(6)?,
    })
}

const MANIFEST_COLS: &str = "digest, media_type, artifact_type, subject, size, content, created";

pub(crate) fn get_manifest(
    conn: &Connection,
    repo: &str,
    reference: &Reference,
) -> Result<Option<ManifestRow>, StoreError> {
    let digest = match reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => {
            match conn
                .query_row(
                    "SELECT digest FROM tags WHERE repo = ?1 AND tag = ?2",
                    params![repo, t],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
            {
                Some(d) => d,
                None => return Ok(None),
            }
        }
    };
    Ok(conn
        .query_row(
            &format!("SELECT {MANIFEST_COLS} FROM manifests WHERE repo = ?1 AND digest = ?2"),
            params![repo, digest],
            row_to_manifest,
        )
        .optional()?)
}

pub(crate) fn delete_manifest(
    conn: &Connection,
    repo: &str,
    digest: &str,
) -> Result<Option<(ManifestRow, Vec<String>)>, StoreError> {
    let Some(row) = get_manifest(conn, repo, &Reference::Digest(digest.to_string()))? else {
        return Ok(None);
    };
    let tags = tags_of(conn, repo, digest)?;
    conn.execute(
        "DELETE FROM tags WHERE repo = ?1 AND digest = ?2",
        params![repo, digest],
    )?;
    conn.execute(
        "DELETE FROM manifest_refs WHERE repo = ?1 AND manifest = ?2",
        params![repo, digest],
    )?;
    conn.execute(
        "DELETE FROM manifests WHERE repo = ?1 AND digest = ?2",
        params![repo, digest],
    )?;
    Ok(Some((row, tags)))
}

pub(crate) fn delete_tag(
    conn: &Connection,
    repo: &str,
    tag: &str,
) -> Result<Option<String>, StoreError> {
    let d = conn
        .query_row(
            "SELECT digest FROM tags WHERE repo = ?1 AND tag = ?2",
            params![repo, tag],
            |r| r.get::<_, String>(0),
        )
        .optional()?;
    if d.is_some() {
        conn.execute(
            "DELETE FROM tags WHERE repo = ?1 AND tag = ?2",
            params![repo, tag],
        )?;
    }
    Ok(d)
}

pub(crate) fn delete_repository(conn: &Connection, repo: &str) -> Result<bool, StoreError> {
    if !repo_exists(conn, repo)? {
        return Ok(false);
    }
    for table in ["tags", "manifest_refs", "manifests", "repo_blobs"] {
        conn.execute(
            &format!("DELETE FROM {table} WHERE repo = ?1"),
            params![repo],
        )?;
    }
    conn.execute("DELETE FROM repositories WHERE name = ?1", params![repo])?;
    Ok(true)
}

fn tags_of(conn: &Connection, repo: &str, digest: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT tag FROM tags WHERE repo = ?1 AND digest = ?2 ORDER BY tag")?;
    let rows = stmt.query_map(params![repo, digest], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn limit(n: Option<usize>) -> i64 {
    n.map(|n| n as i64).unwrap_or(-1)
}

pub(crate) fn list_tags(
    conn: &Connection,
    repo: &str,
    n: Option<usize>,
    last: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT tag FROM tags WHERE repo = ?1 AND tag > ?2 ORDER BY tag LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![repo, last.unwrap_or(""), limit(n)], |r| {
        r.get::<_, String>(0)
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

pub(crate) fn list_repos(
    conn: &Connection,
    n: Option<usize>,
    last: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT name FROM repositories WHERE name > ?1 ORDER BY name LIMIT ?2")?;
    let rows = stmt.query_map(params![last.unwrap_or(""), limit(n)], |r| {
        r.get::<_, String>(0)
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

pub(crate) fn list_manifests(
    conn: &Connection,
    repo: &str,
) -> Result<Vec<ManifestInfo>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT digest, media_type, artifact_type, size, created FROM manifests
         WHERE repo = ?1 ORDER BY created DESC, digest",
    )?;
    let rows = stmt.query_map(params![repo], |r| {
        Ok(ManifestInfo {
            digest: r.get(0)?,
            media_type: r.get(1)?,
            artifact_type: r.get(2)?,
            size: r.get::<_, i64>(3)? as u64,
            created: r.get(4)?,
            tags: Vec::new(),
        })
    })?;
    let mut out = rows.collect::<Result<Vec<_>, _>>()?;
    for m in &mut out {
        m.tags = tags_of(conn, repo, &m.digest)?;
    }
    Ok(out)
}

pub(crate) fn referrers(
    conn: &Connection,
    repo: &str,
    digest: &str,
) -> Result<Vec<ManifestRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {MANIFEST_COLS} FROM manifests WHERE repo = ?1 AND subject = ?2 ORDER BY digest"
    ))?;
    let rows = stmt.query_map(params![repo, digest], row_to_manifest)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}
