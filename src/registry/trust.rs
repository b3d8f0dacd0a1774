//! Content trust on the registry's side: while enabled, an image in a repository a policy
//! names is served by tag only if one of the policy's keys signed it (a cosign signature
//! as its referrer or under cosign's tag), and runs check the images they use the same way.
//! Signatures, SBOMs and other artifacts are not images and are never held back.

use serde_json::Value;

use crate::signature;
use crate::store::{ManifestRow, Reference, Store, StoreError};

/// Why an image may not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub repository: String,
    pub digest: String,
    /// The policy's repository pattern.
    pub policy: String,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "content trust: policy {:?} needs {}@{} signed by one of its keys, and no such \
             signature was found (sign it: acr-task sign REGISTRY/{}@{} --key KEY)",
            self.policy, self.repository, self.digest, self.repository, self.digest
        )
    }
}

/// `None` when the manifest `row` of `repo` may be served and used; the denial otherwise.
pub fn check(store: &Store, repo: &str, row: &ManifestRow) -> Result<Option<Denial>, StoreError> {
    let props = store.properties()?;
    let Some(policy) = props
        .content_trust
        .as_ref()
        .and_then(|c| c.policy_for(repo))
    else {
        return Ok(None);
    };
    let manifest: Value = serde_json::from_slice(&row.content).unwrap_or_default();
    if !is_image(&manifest) {
        return Ok(None);
    }
    let keys = crate::tier::ContentTrust::keys(policy);
    if signed(store, repo, &row.digest, &keys)? {
        return Ok(None);
    }
    Ok(Some(Denial {
        repository: repo.to_string(),
        digest: row.digest.clone(),
        policy: policy.repository.clone(),
    }))
}

/// An image or an index of images, not a signature or another artifact.
fn is_image(m: &Value) -> bool {
    if signature::is_signature(m) {
        return false;
    }
    if m.get("manifests").is_some() {
        return true;
    }
    match super::artifact_type_of(m) {
        None => true,
        Some(t) => super::IMAGE_CONFIG_TYPES.contains(&t.as_str()),
    }
}

/// Whether one of `keys` signed `digest` in `repo`.
fn signed(
    store: &Store,
    repo: &str,
    digest: &str,
    keys: &[signature::PublicKey],
) -> Result<bool, StoreError> {
    let mut manifests: Vec<Vec<u8>> = store
        .referrers(repo, digest)?
        .into_iter()
        .filter(|r| r.artifact_type.as_deref() == Some(signature::ARTIFACT_TYPE))
        .map(|r| r.content)
        .collect();
    if let Some(t) = store.get_manifest(repo, &Reference::Tag(signature::sig_tag(digest)))? {
        manifests.push(t.content);
    }
    for content in manifests {
        let m: Value = serde_json::from_slice(&content).unwrap_or_default();
        for found in signature::signatures_in(&m) {
            if found.payload_size > signature::MAX_PAYLOAD
                || crate::digest::parse(&found.payload_digest).is_err()
            {
                continue;
            }
            let Some(payload) = read_small(store, repo, &found.payload_digest)? else {
                continue;
            };
            if signature::check(digest, &payload, &found.signature, keys).is_ok() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A small blob of `repo` (a signature payload), digest-checked; `None` if absent.
fn read_small(store: &Store, repo: &str, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
    match store.blob_in_repo(repo, digest)? {
        Some(size) if size <= signature::MAX_PAYLOAD => {}
        _ => return Ok(None),
    }
    let mut bytes = Vec::new();
    let mut r = store.blob_reader(digest, 0)?;
    std::io::Read::by_ref(&mut r)
        .take(signature::MAX_PAYLOAD + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| StoreError::Io {
            path: digest.into(),
            source: e,
        })?;
    let alg = crate::digest::parse(digest).map_err(|_| StoreError::Corrupt(digest.into()))?;
    Ok((crate::digest::of_bytes(alg, &bytes) == digest).then_some(bytes))
}

/// The image `reference` (a tag or digest) names in `repo` checked as a pull by tag is:
/// for runs, which use images by tag and by digest alike.
pub fn check_reference(
    store: &Store,
    repo: &str,
    reference: &str,
) -> Result<Option<Denial>, StoreError> {
    let r = if reference.contains(':') {
        Reference::Digest(reference.to_string())
    } else {
        Reference::Tag(reference.to_string())
    };
    match store.get_manifest(repo, &r)? {
        Some(row) => check(store, repo, &row),
        None => Ok(None),
    }
}

use std::io::Read as _;
