//! Garbage collection and consistency checking.

use serde::Serialize;

use super::{now, Store, StoreError};

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

impl Store {
    /// The digest of a stored blob's content by the algorithm it is named by, and its length.
    fn hash_blob(&self, named: &str) -> Result<(String, u64), StoreError> {
        let alg = crate::digest::parse(named).unwrap_or(crate::digest::Algorithm::Sha256);
        crate::digest::of_reader(alg, self.now().blobs.read(named, 0)?).map_err(|source| {
            StoreError::Io {
                path: std::path::PathBuf::from(named),
                source,
            }
        })
    }

    /// Remove manifests that no tag, index or live subject keeps, blob links that no
    /// manifest uses, and blobs that no repository links, all older than `grace_secs`
    /// (the grace period keeps a push in progress — blobs first, manifest last — intact).
    /// Runs under the metadata's write lock, so concurrent pushes wait and then see a
    /// consistent store.
    pub fn gc(&self, grace_secs: i64, dry_run: bool) -> Result<GcReport, StoreError> {
        let b = self.now();
        let mut report = b.meta.gc(now() - grace_secs, dry_run, b.blobs.as_ref())?;
        report.grace_seconds = grace_secs;
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
        let audit = self.now().meta.audit()?;
        let mut report = FsckReport {
            tags_checked: audit.tags,
            ..Default::default()
        };
        let issue = |kind: &str, repo: Option<&str>, digest: &str, detail: String| FsckIssue {
            kind: kind.to_string(),
            repo: repo.map(str::to_string),
            digest: digest.to_string(),
            detail,
        };
        for (digest, size) in &audit.blobs {
            report.blobs_checked += 1;
            if !self.now().blobs.exists(digest) {
                report.issues.push(issue(
                    "blob-missing",
                    None,
                    digest,
                    "its content is not in the blob storage".to_string(),
                ));
                continue;
            }
            let (actual, n) = match self.hash_blob(digest) {
                Ok(r) => r,
                // Content that cannot be read as what it is named (does not decrypt, or
                // is plaintext where everything is sealed) is damaged content.
                Err(e @ (StoreError::Corrupt(_) | StoreError::Io { .. })) => {
                    report.issues.push(issue(
                        "blob-digest",
                        None,
                        digest,
                        format!("its content cannot be read: {e}"),
                    ));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if n != *size {
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
            audit.blobs.iter().map(|(d, _)| d.as_str()).collect();
        report.orphan_files = self
            .now()
            .blobs
            .list()?
            .iter()
            .filter(|(d, _)| !known.contains(d.as_str()))
            .count();
        for (repo, digest, content) in &audit.manifests {
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
        report.issues.extend(audit.dangling);
        Ok(report)
    }
}
