//! The registry metadata in PostgreSQL (`serve --database URL --storage s3://...`):
//! [`PgMeta`], the same [`RegistryMeta`] as [`super::SqliteMeta`] in tables of their own
//! (`registry_*`) in the database the server's replicas share, so a push through one
//! replica is pulled through any other.
//!
//! SQLite's write lock becomes a transaction-scoped advisory lock every change takes
//! first: changes are serialized across replicas as they are within one SQLite file, the
//! callbacks (content checks, gc's staging) run under it, and the outbox's sequence
//! numbers commit in order, so a reader's cursor never passes an event still to commit.
//! Storage use is kept by triggers, as in `meta.db`. Text keys compare bytewise
//! (`COLLATE "C"`), the order SQLite lists tags and repositories in.

use tokio_postgres::types::FromSql;
use tokio_postgres::Row;

use super::crypt::{DekId, KeyIndex};
use super::meta::{
    check_descriptor, lock_refusal, Admit, Attributes, Audit, ChangeProperties, Lock,
    ManifestBrief, ManifestInfo, ManifestRow, NewManifest, Reference, RepoView, TagEvents, TagRow,
    Tags, Touch, UploadRow,
};
use super::{now, BlobStorage, FsckIssue, GcReport, KeptByGrace, RegistryMeta, StoreError};
use crate::pg::{args, Args, Database, PgError, SyncTx, Target};

/// The schema, one entry per version (recorded in `acr_task_registry_migrations`).
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE registry_repositories(name TEXT COLLATE "C" PRIMARY KEY, created BIGINT NOT NULL);
CREATE TABLE registry_blobs(
    digest TEXT COLLATE "C" PRIMARY KEY, size BIGINT NOT NULL, created BIGINT NOT NULL);
CREATE TABLE registry_repo_blobs(
    repo TEXT COLLATE "C" NOT NULL, digest TEXT COLLATE "C" NOT NULL, created BIGINT NOT NULL,
    PRIMARY KEY(repo, digest));
CREATE INDEX registry_repo_blobs_digest ON registry_repo_blobs(digest);
CREATE TABLE registry_manifests(
    repo TEXT COLLATE "C" NOT NULL, digest TEXT COLLATE "C" NOT NULL, media_type TEXT NOT NULL,
    artifact_type TEXT, subject TEXT COLLATE "C", size BIGINT NOT NULL, content BYTEA NOT NULL,
    created BIGINT NOT NULL, PRIMARY KEY(repo, digest));
CREATE INDEX registry_manifests_subject ON registry_manifests(repo, subject);
CREATE TABLE registry_manifest_refs(
    repo TEXT COLLATE "C" NOT NULL, manifest TEXT COLLATE "C" NOT NULL,
    target TEXT COLLATE "C" NOT NULL, kind TEXT NOT NULL,
    PRIMARY KEY(repo, manifest, kind, target));
CREATE INDEX registry_manifest_refs_target ON registry_manifest_refs(repo, target);
CREATE TABLE registry_tags(
    repo TEXT COLLATE "C" NOT NULL, tag TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL, updated BIGINT NOT NULL, PRIMARY KEY(repo, tag));
CREATE INDEX registry_tags_digest ON registry_tags(repo, digest);
CREATE TABLE registry_outbox(
    seq BIGSERIAL PRIMARY KEY, created BIGINT NOT NULL, payload TEXT NOT NULL);
CREATE TABLE registry_properties(id INTEGER PRIMARY KEY CHECK (id = 1), json TEXT NOT NULL);
CREATE TABLE registry_settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE registry_blob_keys(dek_id BYTEA PRIMARY KEY, digest TEXT NOT NULL,
    key_id TEXT NOT NULL, wrapped BYTEA NOT NULL, created BIGINT NOT NULL);
CREATE INDEX registry_blob_keys_by_key ON registry_blob_keys(key_id);
CREATE TABLE registry_locks(repo TEXT COLLATE "C" NOT NULL, tag TEXT COLLATE "C" NOT NULL,
    write_enabled BOOLEAN NOT NULL, delete_enabled BOOLEAN NOT NULL, PRIMARY KEY(repo, tag));
CREATE TABLE registry_usage(id INTEGER PRIMARY KEY CHECK (id = 1), bytes BIGINT NOT NULL);
INSERT INTO registry_usage(id, bytes) VALUES (1, 0);
CREATE FUNCTION registry_usage_link() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT COUNT(*) FROM registry_repo_blobs WHERE digest = NEW.digest) = 1 THEN
        UPDATE registry_usage SET bytes = bytes
            + COALESCE((SELECT size FROM registry_blobs WHERE digest = NEW.digest), 0);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER registry_usage_link AFTER INSERT ON registry_repo_blobs
    FOR EACH ROW EXECUTE FUNCTION registry_usage_link();
CREATE FUNCTION registry_usage_unlink() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM registry_repo_blobs WHERE digest = OLD.digest) THEN
        UPDATE registry_usage SET bytes = bytes
            - COALESCE((SELECT size FROM registry_blobs WHERE digest = OLD.digest), 0);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER registry_usage_unlink AFTER DELETE ON registry_repo_blobs
    FOR EACH ROW EXECUTE FUNCTION registry_usage_unlink();
CREATE FUNCTION registry_usage_manifest() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE registry_usage SET bytes = bytes + NEW.size;
    ELSE
        UPDATE registry_usage SET bytes = bytes - OLD.size;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER registry_usage_manifest AFTER INSERT OR DELETE ON registry_manifests
    FOR EACH ROW EXECUTE FUNCTION registry_usage_manifest();
"#,
    r#"
CREATE TABLE registry_uploads(id TEXT PRIMARY KEY, repo TEXT NOT NULL, owner TEXT NOT NULL,
    created BIGINT NOT NULL);
"#,
    r#"
CREATE TABLE registry_ops(id SMALLINT PRIMARY KEY CHECK (id = 1),
    reads BIGINT NOT NULL, writes BIGINT NOT NULL);
INSERT INTO registry_ops(id, reads, writes) VALUES (1, 0, 0);
"#,
    r#"
ALTER TABLE registry_uploads ADD COLUMN size BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN state TEXT,
    ADD COLUMN touched BIGINT NOT NULL DEFAULT (extract(epoch FROM now()))::BIGINT;
UPDATE registry_uploads SET touched = created;
"#,
];

/// The registry's write lock, held by every change to the end of its transaction
/// ("acrregw").
const WRITE_LOCK: i64 = 0x0061_6372_7265_6777;

/// The settings key of the registry's id (what claims its object storage prefix).
const OWNER: &str = "owner";
/// The settings key of the key ring acr-task keeps for the registry (a managed key).
const KEY_RING: &str = "managed_key_ring";

impl From<PgError> for StoreError {
    fn from(e: PgError) -> StoreError {
        StoreError::Pg(e)
    }
}

/// One statement at a time, in a transaction or on its own.
trait Sql {
    fn rows(&mut self, sql: &str, args: Args) -> Result<Vec<Row>, PgError>;
    fn exec(&mut self, sql: &str, args: Args) -> Result<u64, PgError>;
    fn row(&mut self, sql: &str, args: Args) -> Result<Option<Row>, PgError> {
        Ok(self.rows(sql, args)?.into_iter().next())
    }
}

impl Sql for SyncTx<'_> {
    fn rows(&mut self, sql: &str, args: Args) -> Result<Vec<Row>, PgError> {
        self.query(sql, args)
    }
    fn exec(&mut self, sql: &str, args: Args) -> Result<u64, PgError> {
        self.execute(sql, args)
    }
}

/// Statements on their own (reads).
struct Auto<'a>(&'a Database);

impl Sql for Auto<'_> {
    fn rows(&mut self, sql: &str, args: Args) -> Result<Vec<Row>, PgError> {
        self.0.query(sql, args)
    }
    fn exec(&mut self, sql: &str, args: Args) -> Result<u64, PgError> {
        self.0.execute(sql, args)
    }
}

/// A column, or what went wrong reading it.
fn col<'a, T: FromSql<'a>>(r: &'a Row, i: usize) -> Result<T, StoreError> {
    r.try_get(i)
        .map_err(|e| StoreError::Pg(PgError(format!("reading a registry row: {e}"))))
}

fn size(r: &Row, i: usize) -> Result<u64, StoreError> {
    Ok(col::<i64>(r, i)?.max(0) as u64)
}

/// After a change to upload session `id` conditioned on its owner (`n` rows changed):
/// made, or whether another server holds the row or no one does.
fn held(c: &mut impl Sql, id: &str, n: u64) -> Result<UploadRow, StoreError> {
    if n > 0 {
        return Ok(UploadRow::Mine);
    }
    let there = c.row("SELECT 1 FROM registry_uploads WHERE id = $1", args![s(id)])?;
    Ok(if there.is_some() {
        UploadRow::Moved
    } else {
        UploadRow::Missing
    })
}

fn strings(rows: Vec<Row>) -> Result<Vec<String>, StoreError> {
    rows.iter().map(|r| col(r, 0)).collect()
}

fn pairs(rows: Vec<Row>) -> Result<Vec<(String, String)>, StoreError> {
    rows.iter().map(|r| Ok((col(r, 0)?, col(r, 1)?))).collect()
}

fn insert_outbox(tx: &mut SyncTx<'_>, payloads: &[String]) -> Result<(), StoreError> {
    let t = now();
    for p in payloads {
        tx.execute(
            "INSERT INTO registry_outbox(created, payload) VALUES ($1, $2)",
            args![t, p.clone()],
        )?;
    }
    Ok(())
}

fn s(v: &str) -> String {
    v.to_string()
}

fn ensure_repo(tx: &mut SyncTx<'_>, repo: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO registry_repositories(name, created) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        args![s(repo), now()],
    )?;
    Ok(())
}

fn repo_exists(c: &mut dyn Sql, repo: &str) -> Result<bool, StoreError> {
    Ok(c.row(
        "SELECT 1 FROM registry_repositories WHERE name = $1",
        args![s(repo)],
    )?
    .is_some())
}

fn blob_size(c: &mut dyn Sql, digest: &str) -> Result<Option<u64>, StoreError> {
    c.row(
        "SELECT size FROM registry_blobs WHERE digest = $1",
        args![s(digest)],
    )?
    .map(|r| size(&r, 0))
    .transpose()
}

fn blob_in_repo(c: &mut dyn Sql, repo: &str, digest: &str) -> Result<Option<u64>, StoreError> {
    c.row(
        "SELECT b.size FROM registry_repo_blobs rb JOIN registry_blobs b ON b.digest = rb.digest
         WHERE rb.repo = $1 AND rb.digest = $2",
        args![s(repo), s(digest)],
    )?
    .map(|r| size(&r, 0))
    .transpose()
}

fn manifest_size(c: &mut dyn Sql, repo: &str, digest: &str) -> Result<Option<u64>, StoreError> {
    c.row(
        "SELECT size FROM registry_manifests WHERE repo = $1 AND digest = $2",
        args![s(repo), s(digest)],
    )?
    .map(|r| size(&r, 0))
    .transpose()
}

fn storage_used(c: &mut dyn Sql) -> Result<u64, StoreError> {
    match c.row("SELECT bytes FROM registry_usage WHERE id = 1", args![])? {
        Some(r) => size(&r, 0),
        None => Ok(0),
    }
}

fn link_blob(tx: &mut SyncTx<'_>, repo: &str, digest: &str) -> Result<(), StoreError> {
    ensure_repo(tx, repo)?;
    // Refresh `created` so a re-pushed blob gets a new gc grace period.
    tx.execute(
        "INSERT INTO registry_repo_blobs(repo, digest, created) VALUES ($1, $2, $3)
         ON CONFLICT(repo, digest) DO UPDATE SET created = EXCLUDED.created",
        args![s(repo), s(digest), now()],
    )?;
    Ok(())
}

const MANIFEST_COLS: &str = "digest, media_type, artifact_type, subject, size, content, created";

fn manifest_row(r: &Row) -> Result<ManifestRow, StoreError> {
    Ok(ManifestRow {
        digest: col(r, 0)?,
        media_type: col(r, 1)?,
        artifact_type: col(r, 2)?,
        subject: col(r, 3)?,
        size: size(r, 4)?,
        content: col(r, 5)?,
        created: col(r, 6)?,
    })
}

fn get_manifest(
    c: &mut dyn Sql,
    repo: &str,
    reference: &Reference,
) -> Result<Option<ManifestRow>, StoreError> {
    let digest = match reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => match c.row(
            "SELECT digest FROM registry_tags WHERE repo = $1 AND tag = $2",
            args![s(repo), t.clone()],
        )? {
            Some(r) => col(&r, 0)?,
            None => return Ok(None),
        },
    };
    c.row(
        &format!("SELECT {MANIFEST_COLS} FROM registry_manifests WHERE repo = $1 AND digest = $2"),
        args![s(repo), digest],
    )?
    .map(|r| manifest_row(&r))
    .transpose()
}

fn tags_of(c: &mut dyn Sql, repo: &str, digest: &str) -> Result<Vec<String>, StoreError> {
    strings(c.rows(
        "SELECT tag FROM registry_tags WHERE repo = $1 AND digest = $2 ORDER BY tag",
        args![s(repo), s(digest)],
    )?)
}

fn put_manifest(tx: &mut SyncTx<'_>, m: &NewManifest) -> Result<(), StoreError> {
    for b in &m.blobs {
        check_descriptor(b, blob_in_repo(tx, &m.repo, &b.digest)?)?;
    }
    for c in &m.children {
        check_descriptor(c, manifest_size(tx, &m.repo, &c.digest)?)?;
    }
    ensure_repo(tx, &m.repo)?;
    let t = now();
    tx.execute(
        "INSERT INTO registry_manifests(repo, digest, media_type, artifact_type, subject, size,
             content, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT(repo, digest) DO UPDATE SET created = EXCLUDED.created",
        args![
            m.repo.clone(),
            m.digest.clone(),
            m.media_type.clone(),
            m.artifact_type.clone(),
            m.subject.clone(),
            m.content.len() as i64,
            m.sealed.clone().unwrap_or_else(|| m.content.clone()),
            t
        ],
    )?;
    let refs = m
        .blobs
        .iter()
        .map(|b| (b, "blob"))
        .chain(m.children.iter().map(|c| (c, "manifest")));
    for (d, kind) in refs {
        tx.execute(
            "INSERT INTO registry_manifest_refs(repo, manifest, target, kind)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            args![m.repo.clone(), m.digest.clone(), d.digest.clone(), s(kind)],
        )?;
    }
    if let Some(tag) = &m.tag {
        tx.execute(
            "INSERT INTO registry_tags(repo, tag, digest, updated) VALUES ($1, $2, $3, $4)
             ON CONFLICT(repo, tag) DO UPDATE SET digest = EXCLUDED.digest,
                 updated = EXCLUDED.updated",
            args![m.repo.clone(), tag.clone(), m.digest.clone(), t],
        )?;
    }
    Ok(())
}

fn delete_manifest(
    tx: &mut SyncTx<'_>,
    repo: &str,
    digest: &str,
    unreferenced: bool,
) -> Result<Option<(ManifestRow, Vec<String>)>, StoreError> {
    let Some(row) = get_manifest(tx, repo, &Reference::Digest(s(digest)))? else {
        return Ok(None);
    };
    let tags = tags_of(tx, repo, digest)?;
    if unreferenced {
        let named = tx
            .query_opt(
                "SELECT EXISTS(SELECT 1 FROM registry_manifest_refs WHERE repo = $1
                                   AND target = $2 AND kind = 'manifest')
                     OR EXISTS(SELECT 1 FROM registry_manifests WHERE repo = $1 AND subject = $2)",
                args![s(repo), s(digest)],
            )?
            .map(|r| col::<bool>(&r, 0))
            .transpose()?
            .unwrap_or(true);
        if named || !tags.is_empty() || row.subject.is_some() {
            return Ok(None);
        }
    }
    for sql in [
        "DELETE FROM registry_tags WHERE repo = $1 AND digest = $2",
        "DELETE FROM registry_manifest_refs WHERE repo = $1 AND manifest = $2",
        "DELETE FROM registry_manifests WHERE repo = $1 AND digest = $2",
    ] {
        tx.execute(sql, args![s(repo), s(digest)])?;
    }
    Ok(Some((row, tags)))
}

fn delete_tag(
    tx: &mut SyncTx<'_>,
    repo: &str,
    tag: &str,
    expect: Option<&str>,
) -> Result<Option<String>, StoreError> {
    let d = tx
        .query_opt(
            "SELECT digest FROM registry_tags WHERE repo = $1 AND tag = $2",
            args![s(repo), s(tag)],
        )?
        .map(|r| col::<String>(&r, 0))
        .transpose()?
        .filter(|d| expect.is_none_or(|e| e == d));
    if d.is_some() {
        tx.execute(
            "DELETE FROM registry_tags WHERE repo = $1 AND tag = $2",
            args![s(repo), s(tag)],
        )?;
    }
    Ok(d)
}

/// Refuses, inside the change's own transaction, what a lock forbids.
fn check_locks(
    tx: &mut SyncTx<'_>,
    repo: &str,
    tags: Tags<'_>,
    touch: Touch,
) -> Result<(), StoreError> {
    let locks = tx.query(
        "SELECT tag, write_enabled, delete_enabled FROM registry_locks WHERE repo = $1
         ORDER BY tag",
        args![s(repo)],
    )?;
    if locks.is_empty() {
        return Ok(());
    }
    let touched: Vec<String> = match tags {
        Tags::These(t) => t.iter().map(|t| t.to_string()).collect(),
        Tags::All => strings(tx.query(
            "SELECT tag FROM registry_tags WHERE repo = $1",
            args![s(repo)],
        )?)?,
        Tags::Naming(d) => strings(tx.query(
            "WITH RECURSIVE up(d) AS (
                 SELECT $2::text COLLATE \"C\"
                 UNION SELECT r.manifest FROM registry_manifest_refs r JOIN up ON r.target = up.d
                       WHERE r.repo = $1 AND r.kind = 'manifest')
             SELECT tag FROM registry_tags WHERE repo = $1 AND digest IN (SELECT d FROM up)",
            args![s(repo), s(d)],
        )?)?,
    };
    let locks = locks
        .iter()
        .map(|l| Ok((col(l, 0)?, col(l, 1)?, col(l, 2)?)))
        .collect::<Result<Vec<(String, bool, bool)>, StoreError>>()?;
    lock_refusal(repo, &locks, &touched, touch)
}

/// [`RegistryMeta`] in a PostgreSQL database shared by the server's replicas.
pub struct PgMeta {
    db: Database,
    /// One change at a time from this process (as SQLite's one writer): the others wait
    /// here, not on the advisory lock holding a connection each, so the pool always has
    /// connections for reads and for what a change's callbacks ask.
    writer: std::sync::Mutex<()>,
}

impl PgMeta {
    /// Connects to `target` and brings the registry's tables up to date.
    pub fn open(target: &Target) -> Result<PgMeta, StoreError> {
        let db = Database::new(target, "acr-task-pg-registry")?;
        db.call(|mut c| async move {
            crate::pg::migrate(c.client()?, "acr_task_registry_migrations", MIGRATIONS).await
        })?;
        Ok(PgMeta {
            db,
            writer: std::sync::Mutex::new(()),
        })
    }

    /// Runs `f` in a transaction holding the registry's write lock; commits what it returns.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut SyncTx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _one = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let mut tx = self.db.begin()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", args![WRITE_LOCK])?;
        let r = f(&mut tx)?;
        tx.commit()?;
        Ok(r)
    }

    fn read(&self) -> Auto<'_> {
        Auto(&self.db)
    }

    /// The value of one of the registry's own settings, made from `make` and kept when
    /// none is there yet (the first replica's wins).
    /// (Statements of their own, not a change under the write lock: a settings change's
    /// callback may ask for the key ring.)
    pub fn setting_or_insert(&self, key: &str, make: &str) -> Result<String, StoreError> {
        let mut c = self.read();
        c.exec(
            "INSERT INTO registry_settings(key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            args![s(key), s(make)],
        )?;
        match c.row(
            "SELECT value FROM registry_settings WHERE key = $1",
            args![s(key)],
        )? {
            Some(r) => col(&r, 0),
            None => Ok(s(make)),
        }
    }
}

impl super::meta::ManagedMeta for PgMeta {
    fn append_outbox(&self, events: &[String]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.write(|tx| insert_outbox(tx, events))
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        // The table rewritten without the row versions sealing replaced (a plain vacuum
        // would only mark them free). The server's own write-ahead log keeps them until
        // it is recycled: that is the database operator's to manage.
        self.read()
            .exec("VACUUM FULL registry_manifests", args![])?;
        Ok(())
    }

    fn shared_id(&self) -> Result<Option<String>, StoreError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Ok(Some(self.setting_or_insert(OWNER, &id)?))
    }

    fn key_ring(&self) -> Result<Option<super::meta::KeyRingText>, StoreError> {
        let text = self
            .read()
            .row(
                "SELECT value FROM registry_settings WHERE key = $1",
                args![s(KEY_RING)],
            )?
            .map(|r| col::<String>(&r, 0))
            .transpose()?;
        Ok(Some(super::meta::KeyRingText {
            text,
            place: "the registry's key kept in its PostgreSQL database".into(),
        }))
    }

    fn put_upload(&self, id: &str, repo: &str, owner: &str) -> Result<(), StoreError> {
        let mut c = self.read();
        // Sessions expire long before a day; rows of servers that died go then (those
        // with a checkpoint go by `expire_uploads`, which removes it too).
        c.exec(
            "DELETE FROM registry_uploads WHERE touched < $1 AND state IS NULL",
            args![now() - 86_400],
        )?;
        c.exec(
            "INSERT INTO registry_uploads(id, repo, owner, created, touched) VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT(id) DO NOTHING",
            args![s(id), s(repo), s(owner), now()],
        )?;
        Ok(())
    }

    fn upload_owner(&self, id: &str, repo: &str) -> Result<Option<String>, StoreError> {
        self.read()
            .row(
                "SELECT owner FROM registry_uploads WHERE id = $1 AND repo = $2",
                args![s(id), s(repo)],
            )?
            .map(|r| col(&r, 0))
            .transpose()
    }

    fn count_ops(&self, reads: u64, writes: u64) -> Result<Option<(u64, u64)>, StoreError> {
        // A row lock of its own, not the registry's write lock: counting waits for no push.
        let row = self.read().row(
            "UPDATE registry_ops SET reads = reads + $1, writes = writes + $2 WHERE id = 1
             RETURNING reads, writes",
            args![reads as i64, writes as i64],
        )?;
        row.map(|r| Ok((col::<i64>(&r, 0)? as u64, col::<i64>(&r, 1)? as u64)))
            .transpose()
    }

    fn forget_upload(&self, id: &str, owner: &str) -> Result<UploadRow, StoreError> {
        let mut c = self.read();
        let n = c.exec(
            "DELETE FROM registry_uploads WHERE id = $1 AND owner = $2",
            args![s(id), s(owner)],
        )?;
        held(&mut c, id, n)
    }

    fn save_upload(
        &self,
        id: &str,
        owner: &str,
        size: u64,
        state: &str,
    ) -> Result<UploadRow, StoreError> {
        let mut c = self.read();
        let n = c.exec(
            "UPDATE registry_uploads SET size = $3, state = $4, touched = $5
             WHERE id = $1 AND owner = $2",
            args![s(id), s(owner), size as i64, s(state), now()],
        )?;
        held(&mut c, id, n)
    }

    fn upload_state(
        &self,
        id: &str,
        repo: &str,
        owner: &str,
    ) -> Result<Option<(u64, Option<String>)>, StoreError> {
        let row = self.read().row(
            "SELECT size, state FROM registry_uploads
             WHERE id = $1 AND repo = $2 AND owner = $3",
            args![s(id), s(repo), s(owner)],
        )?;
        row.map(|r| Ok((size(&r, 0)?, col::<Option<String>>(&r, 1)?)))
            .transpose()
    }

    fn move_upload(
        &self,
        id: &str,
        from: &str,
        to: &str,
        state: Option<&str>,
    ) -> Result<bool, StoreError> {
        Ok(self.read().exec(
            "UPDATE registry_uploads SET owner = $3, touched = $5
             WHERE id = $1 AND owner = $2 AND state IS NOT DISTINCT FROM $4",
            args![s(id), s(from), s(to), state.map(str::to_string), now()],
        )? > 0)
    }

    fn touch_uploads(&self, owner: &str, ids: &[String]) -> Result<(), StoreError> {
        self.read().exec(
            "UPDATE registry_uploads SET touched = $3 WHERE owner = $1 AND id = ANY($2)",
            args![s(owner), ids.to_vec(), now()],
        )?;
        Ok(())
    }

    fn expire_uploads(&self, before: i64) -> Result<Vec<String>, StoreError> {
        let rows = self.read().rows(
            "DELETE FROM registry_uploads WHERE touched < $1 AND state IS NOT NULL
             RETURNING state",
            args![before],
        )?;
        rows.iter().map(|r| col::<String>(r, 0)).collect()
    }

    fn put_key_ring(&self, text: &str, replace: bool) -> Result<bool, StoreError> {
        if !replace {
            self.setting_or_insert(KEY_RING, text)?;
            return Ok(true);
        }
        self.read().exec(
            "INSERT INTO registry_settings(key, value) VALUES ($1, $2)
             ON CONFLICT(key) DO UPDATE SET value = EXCLUDED.value",
            args![s(KEY_RING), s(text)],
        )?;
        Ok(true)
    }
}

impl RegistryMeta for PgMeta {
    fn blob_size(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        blob_size(&mut self.read(), digest)
    }

    fn blob_in_repo(&self, repo: &str, digest: &str) -> Result<Option<u64>, StoreError> {
        blob_in_repo(&mut self.read(), repo, digest)
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
            let Some(bytes) = known.or(new_size) else {
                return Ok(false);
            };
            let linked = tx
                .query_opt(
                    "SELECT 1 FROM registry_repo_blobs WHERE digest = $1 LIMIT 1",
                    args![s(digest)],
                )?
                .is_some();
            if !linked {
                admit(storage_used(tx)?, bytes)?;
            }
            if !content()? {
                return Ok(false);
            }
            if let (None, Some(bytes)) = (known, new_size) {
                tx.execute(
                    "INSERT INTO registry_blobs(digest, size, created) VALUES ($1, $2, $3)
                     ON CONFLICT(digest) DO UPDATE SET size = EXCLUDED.size,
                         created = EXCLUDED.created",
                    args![s(digest), bytes as i64, now()],
                )?;
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
            check_locks(tx, repo, Tags::All, Touch::Delete)?;
            Ok(tx.execute(
                "DELETE FROM registry_repo_blobs WHERE repo = $1 AND digest = $2",
                args![s(repo), s(digest)],
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
        get_manifest(&mut self.read(), repo, reference)
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
        events: TagEvents<'_>,
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

    fn locks(&self, repo: &str) -> Result<Vec<Lock>, StoreError> {
        self.read()
            .rows(
                "SELECT tag, write_enabled, delete_enabled FROM registry_locks WHERE repo = $1
                 ORDER BY tag",
                args![s(repo)],
            )?
            .iter()
            .map(|r| {
                let tag: String = col(r, 0)?;
                Ok(Lock {
                    tag: (!tag.is_empty()).then_some(tag),
                    attributes: Attributes {
                        write_enabled: col(r, 1)?,
                        delete_enabled: col(r, 2)?,
                    },
                })
            })
            .collect()
    }

    fn set_lock(&self, repo: &str, tag: Option<&str>, a: Attributes) -> Result<bool, StoreError> {
        self.write(|tx| {
            let there = match tag {
                None => repo_exists(tx, repo)?,
                Some(t) => tx
                    .query_opt(
                        "SELECT 1 FROM registry_tags WHERE repo = $1 AND tag = $2",
                        args![s(repo), s(t)],
                    )?
                    .is_some(),
            };
            if !there {
                return Ok(false);
            }
            let tag = s(tag.unwrap_or(""));
            if a == Attributes::default() {
                tx.execute(
                    "DELETE FROM registry_locks WHERE repo = $1 AND tag = $2",
                    args![s(repo), tag],
                )?;
            } else {
                tx.execute(
                    "INSERT INTO registry_locks(repo, tag, write_enabled, delete_enabled)
                     VALUES ($1, $2, $3, $4) ON CONFLICT(repo, tag) DO UPDATE
                     SET write_enabled = EXCLUDED.write_enabled,
                         delete_enabled = EXCLUDED.delete_enabled",
                    args![s(repo), tag, a.write_enabled, a.delete_enabled],
                )?;
            }
            Ok(true)
        })
    }

    fn delete_repository(&self, repo: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            check_locks(tx, repo, Tags::All, Touch::Delete)?;
            if !repo_exists(tx, repo)? {
                return Ok(false);
            }
            for sql in [
                "DELETE FROM registry_tags WHERE repo = $1",
                "DELETE FROM registry_manifest_refs WHERE repo = $1",
                "DELETE FROM registry_manifests WHERE repo = $1",
                "DELETE FROM registry_repo_blobs WHERE repo = $1",
                "DELETE FROM registry_locks WHERE repo = $1",
                "DELETE FROM registry_repositories WHERE name = $1",
            ] {
                tx.execute(sql, args![s(repo)])?;
            }
            Ok(true)
        })
    }

    fn repository_exists(&self, repo: &str) -> Result<bool, StoreError> {
        repo_exists(&mut self.read(), repo)
    }

    fn list_tags(
        &self,
        repo: &str,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Option<Vec<String>>, StoreError> {
        if !self.repository_exists(repo)? {
            return Ok(None);
        }
        Ok(Some(strings(self.read().rows(
            "SELECT tag FROM registry_tags WHERE repo = $1 AND tag > $2 ORDER BY tag LIMIT $3",
            args![s(repo), s(last.unwrap_or("")), limit(n)],
        )?)?))
    }

    fn list_repositories(
        &self,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        strings(self.read().rows(
            "SELECT name FROM registry_repositories WHERE name > $1 ORDER BY name LIMIT $2",
            args![s(last.unwrap_or("")), limit(n)],
        )?)
    }

    fn list_manifests(&self, repo: &str) -> Result<Option<Vec<ManifestInfo>>, StoreError> {
        let mut tx = self.db.begin()?;
        if !repo_exists(&mut tx, repo)? {
            return Ok(None);
        }
        let rows = tx.query(
            "SELECT digest, media_type, artifact_type, size, created FROM registry_manifests
             WHERE repo = $1 ORDER BY created DESC, digest",
            args![s(repo)],
        )?;
        let mut tags: std::collections::HashMap<String, Vec<String>> = Default::default();
        for (tag, digest) in pairs(tx.query(
            "SELECT tag, digest FROM registry_tags WHERE repo = $1 ORDER BY tag",
            args![s(repo)],
        )?)? {
            tags.entry(digest).or_default().push(tag);
        }
        tx.commit()?;
        rows.iter()
            .map(|r| {
                let digest: String = col(r, 0)?;
                Ok(ManifestInfo {
                    tags: tags.remove(&digest).unwrap_or_default(),
                    digest,
                    media_type: col(r, 1)?,
                    artifact_type: col(r, 2)?,
                    size: size(r, 3)?,
                    created: col(r, 4)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn referrers(&self, repo: &str, digest: &str) -> Result<Vec<ManifestRow>, StoreError> {
        self.read()
            .rows(
                &format!(
                    "SELECT {MANIFEST_COLS} FROM registry_manifests WHERE repo = $1
                     AND subject = $2 ORDER BY digest"
                ),
                args![s(repo), s(digest)],
            )?
            .iter()
            .map(manifest_row)
            .collect()
    }

    fn repo_view(&self, repo: &str) -> Result<Option<RepoView>, StoreError> {
        // One snapshot for all three reads.
        let mut tx = self.db.begin()?;
        tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", args![])?;
        if !repo_exists(&mut tx, repo)? {
            return Ok(None);
        }
        let tags = tx
            .query(
                "SELECT tag, digest, updated FROM registry_tags WHERE repo = $1
                 ORDER BY updated DESC, tag",
                args![s(repo)],
            )?
            .iter()
            .map(|r| {
                Ok(TagRow {
                    tag: col(r, 0)?,
                    digest: col(r, 1)?,
                    updated: col(r, 2)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut children: std::collections::HashMap<String, Vec<String>> = Default::default();
        for (m, t) in pairs(tx.query(
            "SELECT manifest, target FROM registry_manifest_refs WHERE repo = $1
             AND kind = 'manifest'",
            args![s(repo)],
        )?)? {
            children.entry(m).or_default().push(t);
        }
        let manifests = tx
            .query(
                "SELECT digest, created, subject FROM registry_manifests WHERE repo = $1
                 ORDER BY created DESC, digest",
                args![s(repo)],
            )?
            .iter()
            .map(|r| {
                let digest: String = col(r, 0)?;
                Ok(ManifestBrief {
                    children: children.remove(&digest).unwrap_or_default(),
                    digest,
                    created: col(r, 1)?,
                    subject: col(r, 2)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        tx.commit()?;
        Ok(Some(RepoView { tags, manifests }))
    }

    fn outbox_after(&self, seq: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        self.read()
            .rows(
                "SELECT seq, payload FROM registry_outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
                args![seq, limit as i64],
            )?
            .iter()
            .map(|r| Ok((col(r, 0)?, col(r, 1)?)))
            .collect()
    }

    fn outbox_last(&self) -> Result<i64, StoreError> {
        match self
            .read()
            .row("SELECT COALESCE(MAX(seq), 0) FROM registry_outbox", args![])?
        {
            Some(r) => col(&r, 0),
            None => Ok(0),
        }
    }

    fn outbox_prune(&self, before: i64) -> Result<usize, StoreError> {
        Ok(self.read().exec(
            "DELETE FROM registry_outbox
             WHERE created < $1 AND seq < (SELECT MAX(seq) FROM registry_outbox)",
            args![before],
        )? as usize)
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
        let _one = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let mut tx = self.db.begin()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", args![WRITE_LOCK])?;
        loop {
            let victims = pairs(tx.query(
                "SELECT m.repo, m.digest FROM registry_manifests m WHERE m.created <= $1
                 AND NOT EXISTS (SELECT 1 FROM registry_tags t WHERE t.repo = m.repo
                                 AND t.digest = m.digest)
                 AND NOT EXISTS (SELECT 1 FROM registry_manifest_refs r WHERE r.repo = m.repo
                                 AND r.target = m.digest AND r.kind = 'manifest')
                 AND NOT (m.subject IS NOT NULL AND EXISTS (SELECT 1 FROM registry_manifests s
                                 WHERE s.repo = m.repo AND s.digest = m.subject))
                 AND NOT EXISTS (SELECT 1 FROM registry_locks l WHERE l.repo = m.repo
                                 AND l.tag = '' AND (NOT l.write_enabled OR NOT l.delete_enabled))",
                args![cutoff],
            )?)?;
            if victims.is_empty() {
                break;
            }
            for (repo, digest) in victims {
                delete_manifest(&mut tx, &repo, &digest, false)?;
                report.manifests.push(format!("{repo}@{digest}"));
            }
        }
        let links = pairs(tx.query(
            "SELECT rb.repo, rb.digest FROM registry_repo_blobs rb WHERE rb.created <= $1
             AND NOT EXISTS (SELECT 1 FROM registry_manifest_refs r WHERE r.repo = rb.repo
                             AND r.target = rb.digest AND r.kind = 'blob')",
            args![cutoff],
        )?)?;
        for (repo, digest) in links {
            tx.execute(
                "DELETE FROM registry_repo_blobs WHERE repo = $1 AND digest = $2",
                args![s(&repo), s(&digest)],
            )?;
            report.blob_links.push(format!("{repo}@{digest}"));
        }
        let blobs = tx.query(
            "SELECT b.digest, b.size FROM registry_blobs b WHERE b.created <= $1
             AND NOT EXISTS (SELECT 1 FROM registry_repo_blobs rb WHERE rb.digest = b.digest)",
            args![cutoff],
        )?;
        let mut staged = Vec::new();
        for r in &blobs {
            let digest: String = col(r, 0)?;
            tx.execute(
                "DELETE FROM registry_blobs WHERE digest = $1",
                args![digest.clone()],
            )?;
            report.bytes_freed += size(r, 1)?;
            if !dry_run {
                staged.extend(content.stage_removal(&digest)?);
            }
            report.blobs.push(digest);
        }
        report.kept_by_grace = {
            let mut count = |sql: &str| -> Result<(u64, u64), StoreError> {
                match tx.query_opt(sql, args![cutoff])? {
                    Some(r) => Ok((size(&r, 0)?, size(&r, 1)?)),
                    None => Ok((0, 0)),
                }
            };
            let (m, _) = count(
                "SELECT COUNT(*), 0::bigint FROM registry_manifests m WHERE m.created > $1
                 AND NOT EXISTS (SELECT 1 FROM registry_tags t WHERE t.repo = m.repo
                                 AND t.digest = m.digest)
                 AND NOT EXISTS (SELECT 1 FROM registry_manifest_refs r WHERE r.repo = m.repo
                                 AND r.target = m.digest AND r.kind = 'manifest')
                 AND m.subject IS NULL",
            )?;
            let (l, _) = count(
                "SELECT COUNT(*), 0::bigint FROM registry_repo_blobs rb WHERE rb.created > $1
                 AND NOT EXISTS (SELECT 1 FROM registry_manifest_refs r WHERE r.repo = rb.repo
                                 AND r.target = rb.digest AND r.kind = 'blob')",
            )?;
            let (b, bytes) = count(
                "SELECT COUNT(*), COALESCE(SUM(b.size), 0)::bigint FROM registry_blobs b
                 WHERE b.created > $1
                 AND NOT EXISTS (SELECT 1 FROM registry_repo_blobs rb WHERE rb.digest = b.digest
                     AND EXISTS (SELECT 1 FROM registry_manifest_refs r WHERE r.repo = rb.repo
                                 AND r.target = rb.digest AND r.kind = 'blob'))",
            )?;
            KeptByGrace {
                manifests: m as usize,
                blob_links: l as usize,
                blobs: b as usize,
                bytes,
            }
        };
        // Content without a row: a crash between its commit and its link. Another replica
        // may have committed content it is about to link (commits happen outside the
        // lock), so only content older than the cutoff goes, as with unreferenced rows.
        let cutoff_time = std::time::SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(cutoff.max(0) as u64);
        for (digest, stored) in content.list()? {
            if blob_size(&mut tx, &digest)?.is_some() || stored > cutoff_time {
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
        let mut tx = self.db.begin()?;
        tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", args![])?;
        let blobs = tx
            .query(
                "SELECT digest, size FROM registry_blobs ORDER BY digest",
                args![],
            )?
            .iter()
            .map(|r| Ok((col(r, 0)?, size(r, 1)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let manifests = tx
            .query(
                "SELECT repo, digest, content FROM registry_manifests",
                args![],
            )?
            .iter()
            .map(|r| Ok((col(r, 0)?, col(r, 1)?, col(r, 2)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let issue = |kind: &str, repo: String, digest: String, detail: String| FsckIssue {
            kind: kind.to_string(),
            repo: Some(repo),
            digest,
            detail,
        };
        let mut dangling = Vec::new();
        for r in tx.query(
            "SELECT r.repo, r.manifest, r.target, r.kind FROM registry_manifest_refs r WHERE
             (r.kind = 'blob' AND NOT EXISTS (SELECT 1 FROM registry_repo_blobs rb
                  JOIN registry_blobs b ON b.digest = rb.digest
                  WHERE rb.repo = r.repo AND rb.digest = r.target))
             OR (r.kind = 'manifest' AND NOT EXISTS (SELECT 1 FROM registry_manifests m
                  WHERE m.repo = r.repo AND m.digest = r.target))",
            args![],
        )? {
            let (target, kind): (String, String) = (col(&r, 2)?, col(&r, 3)?);
            dangling.push(issue(
                "manifest-ref",
                col(&r, 0)?,
                col(&r, 1)?,
                format!("references missing {kind} {target}"),
            ));
        }
        for r in tx.query(
            "SELECT t.repo, t.tag, t.digest FROM registry_tags t WHERE NOT EXISTS
             (SELECT 1 FROM registry_manifests m WHERE m.repo = t.repo AND m.digest = t.digest)",
            args![],
        )? {
            let tag: String = col(&r, 1)?;
            dangling.push(issue(
                "tag-dangling",
                col(&r, 0)?,
                col(&r, 2)?,
                format!("tag {tag} points to a missing manifest"),
            ));
        }
        for (repo, digest) in pairs(tx.query(
            "SELECT rb.repo, rb.digest FROM registry_repo_blobs rb WHERE NOT EXISTS
             (SELECT 1 FROM registry_blobs b WHERE b.digest = rb.digest)",
            args![],
        )?)? {
            dangling.push(issue(
                "link-dangling",
                repo,
                digest,
                "repository links a blob with no row".to_string(),
            ));
        }
        let tags = match tx.query_opt("SELECT COUNT(*) FROM registry_tags", args![])? {
            Some(r) => size(&r, 0)? as usize,
            None => 0,
        };
        tx.commit()?;
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
        self.read()
            .rows(
                "SELECT repo, digest, content FROM registry_manifests
                 WHERE (repo, digest) > ($1, $2) ORDER BY repo, digest LIMIT $3",
                args![s(repo), s(digest), limit.min(i64::MAX as usize) as i64],
            )?
            .iter()
            .map(|r| Ok((col(r, 0)?, col(r, 1)?, col(r, 2)?)))
            .collect()
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
                "UPDATE registry_manifests SET content = $4 WHERE repo = $1 AND digest = $2
                 AND content = $3",
                args![s(repo), s(digest), was.to_vec(), now.to_vec()],
            )? == 1)
        })
    }

    fn storage_used(&self) -> Result<u64, StoreError> {
        storage_used(&mut self.read())
    }

    fn properties(&self) -> Result<Option<String>, StoreError> {
        self.read()
            .row("SELECT json FROM registry_properties WHERE id = 1", args![])?
            .map(|r| col(&r, 0))
            .transpose()
    }

    fn set_properties(&self, change: ChangeProperties<'_>) -> Result<String, StoreError> {
        self.write(|tx| {
            let was: Option<String> = tx
                .query_opt("SELECT json FROM registry_properties WHERE id = 1", args![])?
                .map(|r| col(&r, 0))
                .transpose()?;
            let used = storage_used(tx)?;
            let next = change(was.as_deref(), used)?;
            tx.execute(
                "INSERT INTO registry_properties(id, json) VALUES (1, $1)
                 ON CONFLICT(id) DO UPDATE SET json = EXCLUDED.json",
                args![next.clone()],
            )?;
            Ok(next)
        })
    }
}

fn limit(n: Option<usize>) -> Option<i64> {
    n.map(|n| n.min(i64::MAX as usize) as i64)
}

impl KeyIndex for PgMeta {
    fn put_dek(
        &self,
        dek_id: &DekId,
        digest: &str,
        key_id: &str,
        wrapped: &[u8],
        _durable: bool,
    ) -> Result<(), StoreError> {
        self.read().exec(
            "INSERT INTO registry_blob_keys(dek_id, digest, key_id, wrapped, created)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT(dek_id) DO UPDATE
             SET digest = EXCLUDED.digest, key_id = EXCLUDED.key_id, wrapped = EXCLUDED.wrapped",
            args![
                dek_id.to_vec(),
                s(digest),
                s(key_id),
                wrapped.to_vec(),
                now()
            ],
        )?;
        Ok(())
    }

    fn get_dek(&self, dek_id: &DekId) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        self.read()
            .row(
                "SELECT key_id, wrapped FROM registry_blob_keys WHERE dek_id = $1",
                args![dek_id.to_vec()],
            )?
            .map(|r| Ok((col(&r, 0)?, col(&r, 1)?)))
            .transpose()
    }

    fn deks_not_wrapped_by(
        &self,
        key_id: &str,
        limit: usize,
    ) -> Result<Vec<(DekId, String, Vec<u8>)>, StoreError> {
        let rows = self.read().rows(
            "SELECT dek_id, key_id, wrapped FROM registry_blob_keys WHERE key_id != $1 LIMIT $2",
            args![s(key_id), limit.min(i64::MAX as usize) as i64],
        )?;
        let mut out = Vec::new();
        for r in &rows {
            let id: Vec<u8> = col(r, 0)?;
            if let Ok(id) = DekId::try_from(id) {
                out.push((id, col(r, 1)?, col(r, 2)?));
            }
        }
        Ok(out)
    }

    fn rewrap_dek(
        &self,
        dek_id: &DekId,
        old_key: &str,
        key_id: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        Ok(self.read().exec(
            "UPDATE registry_blob_keys SET key_id = $3, wrapped = $4
             WHERE dek_id = $1 AND key_id = $2",
            args![dek_id.to_vec(), s(old_key), s(key_id), wrapped.to_vec()],
        )? == 1)
    }

    fn dek_key_ids(&self) -> Result<Vec<String>, StoreError> {
        strings(
            self.read()
                .rows("SELECT DISTINCT key_id FROM registry_blob_keys", args![])?,
        )
    }
}
