//! The registry metadata in SQLite (`meta.db`): [`SqliteMeta`], one writer connection and
//! a few readers over WAL. The query functions take a `&Connection` (a `Transaction`
//! derefs to one) so that the trait's methods decide the transaction boundaries.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::meta::{
    check_descriptor, lock_refusal, Admit, Audit, ManifestInfo, ManifestRow, NewManifest,
    Reference, Tags, Touch,
};
use super::{now, BlobStorage, FsckIssue, GcReport, KeptByGrace, RegistryMeta, StoreError};

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    Ok(conn)
}

/// How every acr-task database is used: WAL lets readers run beside the writer; FULL
/// makes each commit durable on return; writers wait for each other instead of failing.
pub fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // What is deleted or replaced is overwritten, not left in free pages (a manifest
    // sealed in place leaves no plaintext behind).
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
}

/// The registry metadata's schema, one entry per version (see [`super::migrate`]).
pub(crate) const MIGRATIONS: &[super::migrate::Migration] = &[
    super::migrate::Migration::Sql(
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
    ),
    // The registry's settings (its tier) and its storage use, kept exact by triggers in
    // the transaction of every change: a blob counts while any repository links it (so a
    // delete frees room at once, before gc), a manifest while its row exists.
    super::migrate::Migration::Sql(
        "CREATE TABLE properties(id INTEGER PRIMARY KEY CHECK (id = 1), json TEXT NOT NULL);
         CREATE TABLE usage(id INTEGER PRIMARY KEY CHECK (id = 1), bytes INTEGER NOT NULL);
         INSERT INTO usage(id, bytes) SELECT 1,
            (SELECT IFNULL(SUM(size), 0) FROM blobs
              WHERE digest IN (SELECT digest FROM repo_blobs))
          + (SELECT IFNULL(SUM(size), 0) FROM manifests);
         CREATE TRIGGER usage_link AFTER INSERT ON repo_blobs
          WHEN (SELECT COUNT(*) FROM repo_blobs WHERE digest = NEW.digest) = 1
          BEGIN UPDATE usage SET bytes = bytes
                + IFNULL((SELECT size FROM blobs WHERE digest = NEW.digest), 0); END;
         CREATE TRIGGER usage_unlink AFTER DELETE ON repo_blobs
          WHEN NOT EXISTS (SELECT 1 FROM repo_blobs WHERE digest = OLD.digest)
          BEGIN UPDATE usage SET bytes = bytes
                - IFNULL((SELECT size FROM blobs WHERE digest = OLD.digest), 0); END;
         CREATE TRIGGER usage_manifest_add AFTER INSERT ON manifests
          BEGIN UPDATE usage SET bytes = bytes + NEW.size; END;
         CREATE TRIGGER usage_manifest_remove AFTER DELETE ON manifests
          BEGIN UPDATE usage SET bytes = bytes - OLD.size; END;",
    ),
    // Wrapped data keys of sealed blobs (encryption at rest), by the id a blob's file
    // names; re-wrapped in place when the registry key rotates.
    super::migrate::Migration::Sql(
        "CREATE TABLE blob_keys(dek_id BLOB PRIMARY KEY, digest TEXT NOT NULL,
            key_id TEXT NOT NULL, wrapped BLOB NOT NULL, created INTEGER NOT NULL);
         CREATE INDEX blob_keys_by_key ON blob_keys(key_id);",
    ),
    // Locks (ACR's changeable attributes): a row per locked repository (tag '') or tag.
    super::migrate::Migration::Sql(
        "CREATE TABLE locks(repo TEXT NOT NULL, tag TEXT NOT NULL,
            write_enabled INTEGER NOT NULL, delete_enabled INTEGER NOT NULL,
            PRIMARY KEY(repo, tag));",
    ),
];

/// Appends event payloads to the outbox inside the caller's transaction, so an event
/// exists exactly when the change it describes does.
fn insert_outbox(tx: &Connection, payloads: &[String]) -> Result<(), StoreError> {
    let t = now();
    for p in payloads {
        tx.execute(
            "INSERT INTO outbox(created, payload) VALUES (?1, ?2)",
            rusqlite::params![t, p],
        )?;
    }
    Ok(())
}

fn ensure_repo(conn: &Connection, repo: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO repositories(name, created) VALUES (?1, ?2)",
        params![repo, now()],
    )?;
    Ok(())
}

fn repo_exists(conn: &Connection, repo: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM repositories WHERE name = ?1",
            params![repo],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn blob_size(conn: &Connection, digest: &str) -> Result<Option<u64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT size FROM blobs WHERE digest = ?1",
            params![digest],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|s| s as u64))
}

fn insert_blob(conn: &Connection, digest: &str, size: u64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO blobs(digest, size, created) VALUES (?1, ?2, ?3)",
        params![digest, size as i64, now()],
    )?;
    Ok(())
}

fn link_blob(conn: &Connection, repo: &str, digest: &str) -> Result<(), StoreError> {
    ensure_repo(conn, repo)?;
    // Refresh `created` so a re-pushed blob gets a new gc grace period.
    conn.execute(
        "INSERT INTO repo_blobs(repo, digest, created) VALUES (?1, ?2, ?3)
         ON CONFLICT(repo, digest) DO UPDATE SET created = excluded.created",
        params![repo, digest, now()],
    )?;
    Ok(())
}

fn linked_anywhere(conn: &Connection, digest: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM repo_blobs WHERE digest = ?1 LIMIT 1",
            params![digest],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn storage_used(conn: &Connection) -> Result<u64, StoreError> {
    let b: i64 = conn.query_row("SELECT bytes FROM usage WHERE id = 1", [], |r| r.get(0))?;
    Ok(b.max(0) as u64)
}

fn blob_in_repo(conn: &Connection, repo: &str, digest: &str) -> Result<Option<u64>, StoreError> {
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

fn put_manifest(conn: &Connection, m: &NewManifest) -> Result<(), StoreError> {
    for b in &m.blobs {
        check_descriptor(b, blob_in_repo(conn, &m.repo, &b.digest)?)?;
    }
    for c in &m.children {
        check_descriptor(c, manifest_size(conn, &m.repo, &c.digest)?)?;
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
            m.sealed.as_ref().unwrap_or(&m.content),
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

fn get_manifest(
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

fn delete_manifest(
    conn: &Connection,
    repo: &str,
    digest: &str,
    unreferenced: bool,
) -> Result<Option<(ManifestRow, Vec<String>)>, StoreError> {
    let Some(row) = get_manifest(conn, repo, &Reference::Digest(digest.to_string()))? else {
        return Ok(None);
    };
    let tags = tags_of(conn, repo, digest)?;
    if unreferenced {
        let named: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM manifest_refs WHERE repo = ?1 AND target = ?2
                               AND kind = 'manifest')
                 OR EXISTS(SELECT 1 FROM manifests WHERE repo = ?1 AND subject = ?2)",
            params![repo, digest],
            |r| r.get(0),
        )?;
        if named || !tags.is_empty() || row.subject.is_some() {
            return Ok(None);
        }
    }
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

fn delete_tag(
    conn: &Connection,
    repo: &str,
    tag: &str,
    expect: Option<&str>,
) -> Result<Option<String>, StoreError> {
    let d = conn
        .query_row(
            "SELECT digest FROM tags WHERE repo = ?1 AND tag = ?2",
            params![repo, tag],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .filter(|d| expect.is_none_or(|e| e == d));
    if d.is_some() {
        conn.execute(
            "DELETE FROM tags WHERE repo = ?1 AND tag = ?2",
            params![repo, tag],
        )?;
    }
    Ok(d)
}

/// Refuses, inside the change's own transaction, what a lock forbids: the repository's
/// own lock, or one on a tag the change touches.
fn check_locks(
    conn: &Connection,
    repo: &str,
    tags: Tags<'_>,
    touch: Touch,
) -> Result<(), StoreError> {
    let locks: Vec<(String, bool, bool)> = collect(
        conn,
        "SELECT tag, write_enabled, delete_enabled FROM locks WHERE repo = ?1 ORDER BY tag",
        params![repo],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    if locks.is_empty() {
        return Ok(());
    }
    let touched: Vec<String> = match tags {
        Tags::These(t) => t.iter().map(|t| t.to_string()).collect(),
        Tags::All => collect(
            conn,
            "SELECT tag FROM tags WHERE repo = ?1",
            params![repo],
            |r| r.get(0),
        )?,
        Tags::Naming(d) => collect(
            conn,
            "WITH RECURSIVE up(d) AS (
                 SELECT ?2
                 UNION SELECT r.manifest FROM manifest_refs r JOIN up ON r.target = up.d
                       WHERE r.repo = ?1 AND r.kind = 'manifest')
             SELECT tag FROM tags WHERE repo = ?1 AND digest IN (SELECT d FROM up)",
            params![repo, d],
            |r| r.get(0),
        )?,
    };
    lock_refusal(repo, &locks, &touched, touch)
}

fn delete_repository(conn: &Connection, repo: &str) -> Result<bool, StoreError> {
    if !repo_exists(conn, repo)? {
        return Ok(false);
    }
    for table in ["tags", "manifest_refs", "manifests", "repo_blobs", "locks"] {
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

fn list_tags(
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

fn list_repos(
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

fn list_manifests(conn: &Connection, repo: &str) -> Result<Vec<ManifestInfo>, StoreError> {
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

fn referrers(conn: &Connection, repo: &str, digest: &str) -> Result<Vec<ManifestRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {MANIFEST_COLS} FROM manifests WHERE repo = ?1 AND subject = ?2 ORDER BY digest"
    ))?;
    let rows = stmt.query_map(params![repo, digest], row_to_manifest)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Number of read-only connections; reads (HEAD, GET) never wait behind a writer's fsync.
const READERS: usize = 4;

/// [`RegistryMeta`] in one SQLite file.
pub struct SqliteMeta {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl SqliteMeta {
    /// Open (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteMeta, StoreError> {
        let mut writer = open_conn(path)?;
        super::migrate::apply(&mut writer, "meta.db", MIGRATIONS)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(Mutex::new(open_conn(path)?));
        }
        Ok(SqliteMeta {
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
        })
    }

    fn writer(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.writer.lock().map_err(|_| StoreError::Poisoned)
    }

    fn reader(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        // Try each reader without blocking first, then wait on one.
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.readers.len() {
            let idx = (start + i) % self.readers.len();
            if let Ok(g) = self.readers[idx].try_lock() {
                return Ok(g);
            }
        }
        self.readers[start % self.readers.len()]
            .lock()
            .map_err(|_| StoreError::Poisoned)
    }

    /// Runs `f` in an immediate (write-locked) transaction and commits what it returns.
    fn write<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let r = f(&tx)?;
        tx.commit()?;
        Ok(r)
    }
}

fn collect<T>(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map(args, row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

impl super::meta::ManagedMeta for SqliteMeta {
    fn append_outbox(&self, events: &[String]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.write(|tx| insert_outbox(tx, events))
    }

    /// Moves everything into the database file and empties the write-ahead log, so that
    /// no earlier version of a page (plaintext before sealing) stays in it.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let conn = self.writer()?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

impl RegistryMeta for SqliteMeta {
    fn blob_size(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        blob_size(&*self.reader()?, digest)
    }

    fn blob_in_repo(&self, repo: &str, digest: &str) -> Result<Option<u64>, StoreError> {
        blob_in_repo(&*self.reader()?, repo, digest)
    }

    fn link_blob(
        &self,
        repo: &str,
        digest: &str,
        new_size: Option<u64>,
        admit: Admit<'_>,
        content: &mut dyn FnMut() -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let known = blob_size(tx, digest)?;
            let Some(size) = known.or(new_size) else {
                return Ok(false);
            };
            if !linked_anywhere(tx, digest)? {
                admit(storage_used(tx)?, size)?;
            }
            let known = known.is_some();
            if !content()? {
                return Ok(false);
            }
            if let (false, Some(size)) = (known, new_size) {
                insert_blob(tx, digest, size)?;
            }
            link_blob(tx, repo, digest)?;
            Ok(true)
        })
    }

    fn mount_blob(&self, repo: &str, from: &str, digest: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            if blob_in_repo(tx, from, digest)?.is_none() {
                return Ok(false);
            }
            link_blob(tx, repo, digest)?;
            Ok(true)
        })
    }

    fn unlink_blob(&self, repo: &str, digest: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            // Any locked image of the repository may use it.
            check_locks(tx, repo, Tags::All, Touch::Delete)?;
            Ok(tx.execute(
                "DELETE FROM repo_blobs WHERE repo = ?1 AND digest = ?2",
                params![repo, digest],
            )? > 0)
        })
    }

    fn put_manifest(
        &self,
        m: &NewManifest,
        events: &[String],
        admit: Admit<'_>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let tag: Vec<&str> = m.tag.iter().map(String::as_str).collect();
            check_locks(tx, &m.repo, Tags::These(&tag), Touch::Write)?;
            if manifest_size(tx, &m.repo, &m.digest)?.is_none() {
                admit(storage_used(tx)?, m.content.len() as u64)?;
            }
            put_manifest(tx, m)?;
            insert_outbox(tx, events)
        })
    }

    fn get_manifest(
        &self,
        repo: &str,
        reference: &Reference,
    ) -> Result<Option<ManifestRow>, StoreError> {
        get_manifest(&*self.reader()?, repo, reference)
    }

    fn delete_manifest(
        &self,
        repo: &str,
        digest: &str,
        events: &mut dyn FnMut(&ManifestRow, &[String]) -> Vec<String>,
    ) -> Result<Option<(ManifestRow, Vec<String>)>, StoreError> {
        self.write(|tx| {
            check_locks(tx, repo, Tags::Naming(digest), Touch::Delete)?;
            let r = delete_manifest(tx, repo, digest, false)?;
            if let Some((row, tags)) = &r {
                insert_outbox(tx, &events(row, tags))?;
            }
            Ok(r)
        })
    }

    fn delete_tag(
        &self,
        repo: &str,
        tag: &str,
        events: &mut dyn FnMut(&str) -> Vec<String>,
    ) -> Result<Option<String>, StoreError> {
        self.write(|tx| {
            check_locks(tx, repo, Tags::These(&[tag]), Touch::Delete)?;
            let r = delete_tag(tx, repo, tag, None)?;
            if let Some(d) = &r {
                insert_outbox(tx, &events(d))?;
            }
            Ok(r)
        })
    }

    fn delete_tags(
        &self,
        repo: &str,
        tags: &[(String, String)],
        events: super::meta::TagEvents<'_>,
    ) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            check_locks(tx, repo, Tags::These(&[]), Touch::Delete)?;
            let mut done = Vec::new();
            for (tag, digest) in tags {
                // A tag locked since the plan stays (not deleted).
                if check_locks(tx, repo, Tags::These(&[tag]), Touch::Delete).is_err() {
                    continue;
                }
                if let Some(d) = delete_tag(tx, repo, tag, Some(digest))? {
                    let row = get_manifest(tx, repo, &Reference::Digest(d.clone()))?;
                    insert_outbox(tx, &events(tag, &d, row.as_ref()))?;
                    done.push(tag.clone());
                }
            }
            Ok(done)
        })
    }

    fn delete_unreferenced(
        &self,
        repo: &str,
        digests: &[String],
        events: &mut dyn FnMut(&ManifestRow) -> Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            check_locks(tx, repo, Tags::These(&[]), Touch::Delete)?;
            let mut done = Vec::new();
            for d in digests {
                if let Some((row, _)) = delete_manifest(tx, repo, d, true)? {
                    insert_outbox(tx, &events(&row))?;
                    done.push(d.clone());
                }
            }
            Ok(done)
        })
    }

    fn locks(&self, repo: &str) -> Result<Vec<super::meta::Lock>, StoreError> {
        collect(
            &*self.reader()?,
            "SELECT tag, write_enabled, delete_enabled FROM locks WHERE repo = ?1 ORDER BY tag",
            params![repo],
            |r| {
                let tag: String = r.get(0)?;
                Ok(super::meta::Lock {
                    tag: (!tag.is_empty()).then_some(tag),
                    attributes: super::meta::Attributes {
                        write_enabled: r.get(1)?,
                        delete_enabled: r.get(2)?,
                    },
                })
            },
        )
    }

    fn set_lock(
        &self,
        repo: &str,
        tag: Option<&str>,
        a: super::meta::Attributes,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let there = match tag {
                None => repo_exists(tx, repo)?,
                Some(t) => tx
                    .query_row(
                        "SELECT 1 FROM tags WHERE repo = ?1 AND tag = ?2",
                        params![repo, t],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some(),
            };
            if !there {
                return Ok(false);
            }
            let tag = tag.unwrap_or("");
            if a == super::meta::Attributes::default() {
                tx.execute(
                    "DELETE FROM locks WHERE repo = ?1 AND tag = ?2",
                    params![repo, tag],
                )?;
            } else {
                tx.execute(
                    "INSERT OR REPLACE INTO locks(repo, tag, write_enabled, delete_enabled)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![repo, tag, a.write_enabled, a.delete_enabled],
                )?;
            }
            Ok(true)
        })
    }

    fn delete_repository(&self, repo: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            check_locks(tx, repo, Tags::All, Touch::Delete)?;
            delete_repository(tx, repo)
        })
    }

    fn repository_exists(&self, repo: &str) -> Result<bool, StoreError> {
        repo_exists(&*self.reader()?, repo)
    }

    fn list_tags(
        &self,
        repo: &str,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let conn = self.reader()?;
        if !repo_exists(&conn, repo)? {
            return Ok(None);
        }
        Ok(Some(list_tags(&conn, repo, n, last)?))
    }

    fn list_repositories(
        &self,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        list_repos(&*self.reader()?, n, last)
    }

    fn list_manifests(&self, repo: &str) -> Result<Option<Vec<ManifestInfo>>, StoreError> {
        let conn = self.reader()?;
        if !repo_exists(&conn, repo)? {
            return Ok(None);
        }
        Ok(Some(list_manifests(&conn, repo)?))
    }

    fn repo_view(&self, repo: &str) -> Result<Option<super::meta::RepoView>, StoreError> {
        let mut conn = self.reader()?;
        // One snapshot for all three reads.
        let tx = conn.transaction()?;
        if !repo_exists(&tx, repo)? {
            return Ok(None);
        }
        let tags = {
            let mut st = tx.prepare_cached(
                "SELECT tag, digest, updated FROM tags WHERE repo = ?1 ORDER BY updated DESC, tag",
            )?;
            let rows = st.query_map(params![repo], |r| {
                Ok(super::meta::TagRow {
                    tag: r.get(0)?,
                    digest: r.get(1)?,
                    updated: r.get(2)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        let mut children: std::collections::HashMap<String, Vec<String>> = Default::default();
        {
            let mut st = tx.prepare_cached(
                "SELECT manifest, target FROM manifest_refs WHERE repo = ?1 AND kind = 'manifest'",
            )?;
            let rows = st.query_map(params![repo], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            for row in rows {
                let (m, t) = row?;
                children.entry(m).or_default().push(t);
            }
        }
        let manifests = {
            let mut st = tx.prepare_cached(
                "SELECT digest, created, subject FROM manifests WHERE repo = ?1
                 ORDER BY created DESC, digest",
            )?;
            let rows = st.query_map(params![repo], |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.map(|r| {
                r.map(|(digest, created, subject)| super::meta::ManifestBrief {
                    children: children.remove(&digest).unwrap_or_default(),
                    digest,
                    created,
                    subject,
                })
            })
            .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Some(super::meta::RepoView { tags, manifests }))
    }

    fn referrers(&self, repo: &str, digest: &str) -> Result<Vec<ManifestRow>, StoreError> {
        referrers(&*self.reader()?, repo, digest)
    }

    fn outbox_after(&self, seq: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        collect(
            &*self.reader()?,
            "SELECT seq, payload FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![seq, limit as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    fn outbox_last(&self) -> Result<i64, StoreError> {
        Ok(self
            .reader()?
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM outbox", [], |r| r.get(0))?)
    }

    fn outbox_prune(&self, before: i64) -> Result<usize, StoreError> {
        Ok(self.writer()?.execute(
            "DELETE FROM outbox WHERE created < ?1 AND seq < (SELECT MAX(seq) FROM outbox)",
            params![before],
        )?)
    }

    fn gc(
        &self,
        cutoff: i64,
        dry_run: bool,
        content: &dyn BlobStorage,
    ) -> Result<GcReport, StoreError> {
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        let mut conn = self.writer()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        loop {
            let victims: Vec<(String, String)> = {
                let mut stmt = tx.prepare(
                    "SELECT m.repo, m.digest FROM manifests m WHERE m.created <= ?1
                     AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo AND t.digest = m.digest)
                     AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.repo = m.repo
                                     AND r.target = m.digest AND r.kind = 'manifest')
                     AND NOT (m.subject IS NOT NULL AND EXISTS (SELECT 1 FROM manifests s
                                     WHERE s.repo = m.repo AND s.digest = m.subject))
                     AND NOT EXISTS (SELECT 1 FROM locks l WHERE l.repo = m.repo AND l.tag = ''
                                     AND (l.write_enabled = 0 OR l.delete_enabled = 0))",
                )?;
                let rows = stmt.query_map(params![cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            if victims.is_empty() {
                break;
            }
            for (repo, digest) in victims {
                delete_manifest(&tx, &repo, &digest, false)?;
                report.manifests.push(format!("{repo}@{digest}"));
            }
        }
        let links: Vec<(String, String)> = {
            let mut stmt = tx.prepare(
                "SELECT rb.repo, rb.digest FROM repo_blobs rb WHERE rb.created <= ?1
                 AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.repo = rb.repo
                                 AND r.target = rb.digest AND r.kind = 'blob')",
            )?;
            let rows = stmt.query_map(params![cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        for (repo, digest) in links {
            tx.execute(
                "DELETE FROM repo_blobs WHERE repo = ?1 AND digest = ?2",
                params![repo, digest],
            )?;
            report.blob_links.push(format!("{repo}@{digest}"));
        }
        let blobs: Vec<(String, i64)> = {
            let mut stmt = tx.prepare(
                "SELECT b.digest, b.size FROM blobs b WHERE b.created <= ?1
                 AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)",
            )?;
            let rows = stmt.query_map(params![cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        let mut staged = Vec::new();
        for (digest, size) in blobs {
            tx.execute("DELETE FROM blobs WHERE digest = ?1", params![digest])?;
            report.bytes_freed += size as u64;
            if !dry_run {
                staged.extend(content.stage_removal(&digest)?);
            }
            report.blobs.push(digest);
        }
        // What the grace period keeps: unreferenced, but young enough to be a push in
        // progress (blobs first, manifest last).
        report.kept_by_grace = {
            let count = |sql: &str| -> Result<(i64, i64), StoreError> {
                Ok(tx.query_row(sql, params![cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?)
            };
            let (m, _) = count(
                "SELECT COUNT(*), 0 FROM manifests m WHERE m.created > ?1
                 AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo AND t.digest = m.digest)
                 AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.repo = m.repo
                                 AND r.target = m.digest AND r.kind = 'manifest')
                 AND m.subject IS NULL",
            )?;
            let (l, _) = count(
                "SELECT COUNT(*), 0 FROM repo_blobs rb WHERE rb.created > ?1
                 AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.repo = rb.repo
                                 AND r.target = rb.digest AND r.kind = 'blob')",
            )?;
            let (b, bytes) = count(
                "SELECT COUNT(*), COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.created > ?1
                 AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest
                                 AND EXISTS (SELECT 1 FROM manifest_refs r WHERE r.repo = rb.repo
                                             AND r.target = rb.digest AND r.kind = 'blob'))",
            )?;
            KeptByGrace {
                manifests: m as usize,
                blob_links: l as usize,
                blobs: b as usize,
                bytes: bytes as u64,
            }
        };
        // Files without a row: a crash between rename and commit. Under the write lock no
        // commit is in flight, so these are true leftovers.
        let cutoff_time = std::time::SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(cutoff.max(0) as u64);
        for (digest, stored) in content.list()? {
            if blob_size(&tx, &digest)?.is_some() || stored > cutoff_time {
                continue;
            }
            if !dry_run {
                staged.extend(content.stage_removal(&digest)?);
            }
            report.orphan_files.push(digest);
        }
        if dry_run {
            tx.rollback()?;
        } else {
            tx.commit()?;
            for s in staged {
                content.finish_removal(s);
            }
        }
        Ok(report)
    }

    fn audit(&self) -> Result<Audit, StoreError> {
        let conn = self.reader()?;
        let blobs = collect(
            &conn,
            "SELECT digest, size FROM blobs ORDER BY digest",
            [],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)),
        )?;
        let manifests = collect(
            &conn,
            "SELECT repo, digest, content FROM manifests",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let issue = |kind: &str, repo: String, digest: String, detail: String| FsckIssue {
            kind: kind.to_string(),
            repo: Some(repo),
            digest,
            detail,
        };
        let mut dangling = collect(
            &conn,
            "SELECT r.repo, r.manifest, r.target, r.kind FROM manifest_refs r WHERE
             (r.kind = 'blob' AND NOT EXISTS (SELECT 1 FROM repo_blobs rb JOIN blobs b
                  ON b.digest = rb.digest WHERE rb.repo = r.repo AND rb.digest = r.target))
             OR (r.kind = 'manifest' AND NOT EXISTS (SELECT 1 FROM manifests m
                  WHERE m.repo = r.repo AND m.digest = r.target))",
            [],
            |r| {
                let (target, kind): (String, String) = (r.get(2)?, r.get(3)?);
                Ok(issue(
                    "manifest-ref",
                    r.get(0)?,
                    r.get(1)?,
                    format!("references missing {kind} {target}"),
                ))
            },
        )?;
        dangling.extend(collect(
            &conn,
            "SELECT t.repo, t.tag, t.digest FROM tags t WHERE NOT EXISTS
             (SELECT 1 FROM manifests m WHERE m.repo = t.repo AND m.digest = t.digest)",
            [],
            |r| {
                let tag: String = r.get(1)?;
                Ok(issue(
                    "tag-dangling",
                    r.get(0)?,
                    r.get(2)?,
                    format!("tag {tag} points to a missing manifest"),
                ))
            },
        )?);
        dangling.extend(collect(
            &conn,
            "SELECT rb.repo, rb.digest FROM repo_blobs rb WHERE NOT EXISTS
             (SELECT 1 FROM blobs b WHERE b.digest = rb.digest)",
            [],
            |r| {
                Ok(issue(
                    "link-dangling",
                    r.get(0)?,
                    r.get(1)?,
                    "repository links a blob with no row".to_string(),
                ))
            },
        )?);
        let tags =
            conn.query_row("SELECT COUNT(*) FROM tags", [], |r| r.get::<_, i64>(0))? as usize;
        Ok(Audit {
            blobs,
            manifests,
            tags,
            dangling,
        })
    }

    fn manifest_contents(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let (repo, digest) = after.unwrap_or(("", ""));
        collect(
            &*self.reader()?,
            "SELECT repo, digest, content FROM manifests WHERE (repo, digest) > (?1, ?2)
             ORDER BY repo, digest LIMIT ?3",
            params![repo, digest, limit as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }

    fn replace_manifest_content(
        &self,
        repo: &str,
        digest: &str,
        was: &[u8],
        now: &[u8],
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE manifests SET content = ?4 WHERE repo = ?1 AND digest = ?2 AND content = ?3",
                params![repo, digest, was, now],
            )? == 1)
        })
    }

    fn storage_used(&self) -> Result<u64, StoreError> {
        storage_used(&*self.reader()?)
    }

    fn properties(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .reader()?
            .query_row("SELECT json FROM properties WHERE id = 1", [], |r| r.get(0))
            .optional()?)
    }

    fn set_properties(
        &self,
        change: super::meta::ChangeProperties<'_>,
    ) -> Result<String, StoreError> {
        self.write(|tx| {
            let now: Option<String> = tx
                .query_row("SELECT json FROM properties WHERE id = 1", [], |r| r.get(0))
                .optional()?;
            let next = change(now.as_deref(), storage_used(tx)?)?;
            tx.execute(
                "INSERT INTO properties(id, json) VALUES (1, ?1)
                 ON CONFLICT(id) DO UPDATE SET json = excluded.json",
                params![next],
            )?;
            Ok(next)
        })
    }
}

impl super::crypt::KeyIndex for SqliteMeta {
    fn put_dek(
        &self,
        dek_id: &super::crypt::DekId,
        digest: &str,
        key_id: &str,
        wrapped: &[u8],
        durable: bool,
    ) -> Result<(), StoreError> {
        let mut conn = self.writer()?;
        // Without fsync unless asked: the WAL is written in order, so the blob link's
        // durable commit that follows makes this row durable with it.
        if !durable {
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        let r = (|| -> Result<(), StoreError> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT OR REPLACE INTO blob_keys(dek_id, digest, key_id, wrapped, created)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![&dek_id[..], digest, key_id, wrapped, now()],
            )?;
            tx.commit()?;
            Ok(())
        })();
        if !durable {
            conn.pragma_update(None, "synchronous", "FULL")?;
        }
        r
    }

    fn get_dek(
        &self,
        dek_id: &super::crypt::DekId,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .reader()?
            .query_row(
                "SELECT key_id, wrapped FROM blob_keys WHERE dek_id = ?1",
                params![&dek_id[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    fn deks_not_wrapped_by(
        &self,
        key_id: &str,
        limit: usize,
    ) -> Result<Vec<(super::crypt::DekId, String, Vec<u8>)>, StoreError> {
        let rows: Vec<(Vec<u8>, String, Vec<u8>)> = collect(
            &*self.reader()?,
            "SELECT dek_id, key_id, wrapped FROM blob_keys WHERE key_id != ?1 LIMIT ?2",
            params![key_id, limit as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, k, w)| Some((id.try_into().ok()?, k, w)))
            .collect())
    }

    fn rewrap_dek(
        &self,
        dek_id: &super::crypt::DekId,
        old_key: &str,
        key_id: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE blob_keys SET key_id = ?3, wrapped = ?4 WHERE dek_id = ?1 AND key_id = ?2",
                params![&dek_id[..], old_key, key_id, wrapped],
            )? == 1)
        })
    }

    fn dek_key_ids(&self) -> Result<Vec<String>, StoreError> {
        collect(
            &*self.reader()?,
            "SELECT DISTINCT key_id FROM blob_keys",
            [],
            |r| r.get(0),
        )
    }
}
