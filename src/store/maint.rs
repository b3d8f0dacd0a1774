//! Garbage collection and consistency checking.

use rusqlite::params;
use serde::Serialize;

use super::{db, Store, StoreError};

#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    pub dry_run: bool,
    /// `repo@digest` of removed manifests.
    pub manifests: Vec<String>,
    /// `repo@digest` of removed blob links.
    pub blob_links: Vec<String>,
    /// Digests of removed blob files.
    pub blobs: Vec<String>,
    /// Files under `blobs/` that no row referenced (left by a crash), removed.
    pub orphan_files: Vec<String>,
    pub bytes_freed: u64,
    /// Seconds of the grace period: what is younger is kept.
    pub grace_seconds: i64,
    /// Unreferenced now but younger than the grace period (a push may still be going):
    /// kept, for the next gc.
    pub kept_by_grace: KeptByGrace,
}

/// What gc left because it is younger than its grace period.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptByGrace {
    pub manifests: usize,
    /// Blob links of repositories (a blob pushed to a repository, no manifest yet).
    pub blob_links: usize,
    pub blobs: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FsckIssue {
    /// `blob-missing`, `blob-size`, `blob-digest`, `manifest-digest`, `manifest-ref`,
    /// `tag-dangling`, `link-dangling`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    pub digest: String,
    pub detail: String,
}

#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FsckReport {
    pub blobs_checked: usize,
    pub manifests_checked: usize,
    pub tags_checked: usize,
    /// Blob files with no database row: invisible leftovers of a crash, removed by gc.
    pub orphan_files: usize,
    pub issues: Vec<FsckIssue>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.issues.is_empty()
    }
}

/// The digest of a blob file by the algorithm it is named by.
impl Store {
    /// The digest of a stored blob's content by the algorithm it is named by, and its length.
    fn hash_blob(&self, named: &str) -> Result<(String, u64), StoreError> {
        let alg = crate::digest::parse(named).unwrap_or(crate::digest::Algorithm::Sha256);
        crate::digest::of_reader(alg, self.blobs.read(named, 0)?).map_err(|source| StoreError::Io {
            path: std::path::PathBuf::from(named),
            source,
        })
    }

    /// Remove manifests that no tag, index or live subject keeps, blob links that no
    /// manifest uses, and blobs that no repository links, all older than `grace_secs`
    /// (the grace period keeps a push in progress — blobs first, manifest last — intact).
    /// Runs under the write lock, so concurrent pushes wait and then see a consistent store.
    pub fn gc(&self, grace_secs: i64, dry_run: bool) -> Result<GcReport, StoreError> {
        let cutoff = db::now() - grace_secs;
        let mut report = GcReport {
            dry_run,
            grace_seconds: grace_secs,
            ..Default::default()
        };
        let mut conn = self.writer()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        loop {
            let victims: Vec<(String, String)> = {
                let mut stmt = tx.prepare(
                    "SELECT m.repo, m.digest FROM manifests m WHERE m.created <= ?1
                     AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo AND t.digest = m.digest)
                     AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.repo = m.repo
                                     AND r.target = m.digest AND r.kind = 'manifest')
                     AND NOT (m.subject IS NOT NULL AND EXISTS (SELECT 1 FROM manifests s
                                     WHERE s.repo = m.repo AND s.digest = m.subject))",
                )?;
                let rows = stmt.query_map(params![cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            if victims.is_empty() {
                break;
            }
            for (repo, digest) in victims {
                db::delete_manifest(&tx, &repo, &digest)?;
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
                staged.extend(self.blobs.stage_removal(&digest)?);
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
        for (digest, stored) in self.blobs.list()? {
            if db::blob_size(&tx, &digest)?.is_some() || stored > cutoff_time {
                continue;
            }
            if !dry_run {
                staged.extend(self.blobs.stage_removal(&digest)?);
            }
            report.orphan_files.push(digest);
        }
        if dry_run {
            tx.rollback()?;
        } else {
            tx.commit()?;
            for s in staged {
                self.blobs.finish_removal(s);
            }
        }
        tracing::info!(
            manifests = report.manifests.len(),
            blobs = report.blobs.len(),
            bytes = report.bytes_freed,
            dry_run,
            "gc finished"
        );
        Ok(report)
    }

    /// Re-hash every blob and check every manifest's digest and references.
    pub fn fsck(&self) -> Result<FsckReport, StoreError> {
        let mut report = FsckReport::default();
        let conn = self.reader()?;
        let blobs: Vec<(String, i64)> = {
            let mut stmt = conn.prepare("SELECT digest, size FROM blobs ORDER BY digest")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        let issue = |kind: &str, repo: Option<&str>, digest: &str, detail: String| FsckIssue {
            kind: kind.to_string(),
            repo: repo.map(str::to_string),
            digest: digest.to_string(),
            detail,
        };
        for (digest, size) in &blobs {
            report.blobs_checked += 1;
            if !self.blobs.exists(digest) {
                report.issues.push(issue(
                    "blob-missing",
                    None,
                    digest,
                    "its content is not in the blob storage".to_string(),
                ));
                continue;
            }
            let (actual, n) = self.hash_blob(digest)?;
            if n != *size as u64 {
                report.issues.push(issue(
                    "blob-size",
                    None,
                    digest,
                    format!("recorded {size} bytes, file has {n}"),
                ));
            }
            if &actual != digest {
                report.issues.push(issue(
                    "blob-digest",
                    None,
                    digest,
                    format!("content hashes to {actual}"),
                ));
            }
        }
        let known: std::collections::HashSet<&str> =
            blobs.iter().map(|(d, _)| d.as_str()).collect();
        report.orphan_files = self
            .blobs
            .list()?
            .iter()
            .filter(|(d, _)| !known.contains(d.as_str()))
            .count();
        let manifests: Vec<(String, String, Vec<u8>)> = {
            let mut stmt = conn.prepare("SELECT repo, digest, content FROM manifests")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        for (repo, digest, content) in &manifests {
            report.manifests_checked += 1;
            let alg = crate::digest::parse(digest).unwrap_or(crate::digest::Algorithm::Sha256);
            let actual = crate::digest::of_bytes(alg, content);
            if &actual != digest {
                report.issues.push(issue(
                    "manifest-digest",
                    Some(repo),
                    digest,
                    format!("content hashes to {actual}"),
                ));
            }
        }
        let dangling_refs: Vec<(String, String, String, String)> = {
            let mut stmt = conn.prepare(
                "SELECT r.repo, r.manifest, r.target, r.kind FROM manifest_refs r WHERE
                 (r.kind = 'blob' AND NOT EXISTS (SELECT 1 FROM repo_blobs rb JOIN blobs b
                      ON b.digest = rb.digest WHERE rb.repo = r.repo AND rb.digest = r.target))
                 OR (r.kind = 'manifest' AND NOT EXISTS (SELECT 1 FROM manifests m
                      WHERE m.repo = r.repo AND m.digest = r.target))",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        for (repo, manifest, target, kind) in dangling_refs {
            report.issues.push(issue(
                "manifest-ref",
                Some(&repo),
                &manifest,
                format!("references missing {kind} {target}"),
            ));
        }
        report.tags_checked =
            conn.query_row("SELECT COUNT(*) FROM tags", [], |r| r.get::<_, i64>(0))? as usize;
        let dangling_tags: Vec<(String, String, String)> = {
            let mut stmt = conn.prepare(
                "SELECT t.repo, t.tag, t.digest FROM tags t WHERE NOT EXISTS
                 (SELECT 1 FROM manifests m WHERE m.repo = t.repo AND m.digest = t.digest)",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        for (repo, tag, digest) in dangling_tags {
            report.issues.push(issue(
                "tag-dangling",
                Some(&repo),
                &digest,
                format!("tag {tag} points to a missing manifest"),
            ));
        }
        let dangling_links: Vec<(String, String)> = {
            let mut stmt = conn.prepare(
                "SELECT rb.repo, rb.digest FROM repo_blobs rb WHERE NOT EXISTS
                 (SELECT 1 FROM blobs b WHERE b.digest = rb.digest)",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        for (repo, digest) in dangling_links {
            report.issues.push(issue(
                "link-dangling",
                Some(&repo),
                &digest,
                "repository links a blob with no row".to_string(),
            ));
        }
        Ok(report)
    }
}
