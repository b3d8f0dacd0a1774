//! Signing and verifying images over the distribution API (`acr-task sign`/`verify`, and a
//! task's push step): the format is [`crate::signature`]'s; this is the I/O around it.

use serde::Serialize;
use serde_json::Value;

use super::client::{ClientError, FetchedManifest, RegistryClient};
use super::reference::ImageRef;
use crate::signature::{self, PublicKey, SigningKey};

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}: no such image")]
    NoImage(String),
    #[error(transparent)]
    Key(#[from] signature::KeyError),
}

/// What a signing stored.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Signed {
    pub image: String,
    pub digest: String,
    /// The referrer holding the signature.
    pub signature: String,
    /// cosign's tag holding it too.
    pub tag: String,
    pub key_id: String,
}

/// Signs the manifest `image` names (a tag is resolved to its digest first; the digest is
/// what is signed) and stores the signature as its referrer and under cosign's tag.
pub async fn sign(
    client: &RegistryClient,
    image: &ImageRef,
    key: &SigningKey,
) -> Result<Signed, SignError> {
    let repo = &image.repository;
    let m = fetch(client, image).await?;
    let identity = format!("{}/{}", image.registry, repo);
    let payload = signature::payload(&identity, &m.digest);
    let sig = key.sign(&payload)?;
    let payload_digest = client.push_small_blob(repo, &payload).await?;
    client
        .push_small_blob(repo, signature::EMPTY_CONTENT)
        .await?;
    let subject = signature::Subject {
        media_type: manifest_type(&m.media_type, &m.body),
        digest: m.digest.clone(),
        size: m.body.len() as u64,
    };
    let referrer =
        signature::referrer_manifest(&subject, &payload_digest, payload.len() as u64, &sig);
    let referrer_digest = crate::digest::of_bytes(crate::digest::Algorithm::Sha256, &referrer);
    client
        .put_manifest(repo, &referrer_digest, OCI_MANIFEST, referrer)
        .await?;
    let tag = signature::sig_tag(&m.digest);
    let existing = client
        .get_manifest(repo, &tag)
        .await?
        .and_then(|t| serde_json::from_slice::<Value>(&t.body).ok());
    let tagged = signature::tag_manifest(
        existing.as_ref(),
        &payload_digest,
        payload.len() as u64,
        &sig,
    );
    client
        .put_manifest(repo, &tag, OCI_MANIFEST, tagged)
        .await?;
    Ok(Signed {
        image: show(image),
        digest: m.digest,
        signature: referrer_digest,
        tag,
        key_id: key.public_key().id(),
    })
}

/// The manifest `image` names. A tag content trust holds back is followed to the digest
/// its refusal names: signing it is how it gets through.
async fn fetch(client: &RegistryClient, image: &ImageRef) -> Result<FetchedManifest, SignError> {
    let repo = &image.repository;
    match client.get_manifest(repo, &image.reference).await {
        Ok(Some(m)) => return Ok(m),
        Ok(None) => return Err(SignError::NoImage(show(image))),
        Err(ClientError::Status { status: 403, .. }) if !image.reference.contains(':') => {}
        Err(e) => return Err(e.into()),
    }
    let path = format!("/v2/{repo}/manifests/{}", image.reference);
    let head = client
        .request(reqwest::Method::HEAD, &path, &super::client::pull(repo))
        .await?;
    let digest = head
        .header("docker-content-digest")
        .filter(|d| crate::digest::parse(d).is_ok())
        .ok_or_else(|| SignError::NoImage(show(image)))?
        .to_string();
    client
        .get_manifest(repo, &digest)
        .await?
        .ok_or_else(|| SignError::NoImage(show(image)))
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The media type a manifest says it has (its body's `mediaType`, else the response's).
fn manifest_type(header: &str, body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_string))
        .unwrap_or_else(|| header.to_string())
}

fn show(image: &ImageRef) -> String {
    let sep = if image.reference.contains(':') {
        '@'
    } else {
        ':'
    };
    format!(
        "{}/{}{sep}{}",
        image.registry, image.repository, image.reference
    )
}

/// One signature found for an image, and what checking it said.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Checked {
    /// Where it was found: the referrer's digest, or cosign's tag.
    pub source: String,
    pub valid: bool,
    /// The identity it names (valid ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Why it does not count (invalid ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The outcome of verifying an image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    pub image: String,
    pub digest: String,
    pub signatures: Vec<Checked>,
}

impl Verification {
    pub fn verified(&self) -> bool {
        self.signatures.iter().any(|s| s.valid)
    }
}

/// Every signature of the manifest `image` names (its cosign referrers and cosign's tag),
/// each checked against `keys`.
pub async fn verify(
    client: &RegistryClient,
    image: &ImageRef,
    keys: &[PublicKey],
) -> Result<Verification, SignError> {
    let repo = &image.repository;
    let m = fetch(client, image).await?;
    let mut sources: Vec<(String, Value)> = Vec::new();
    for d in client
        .referrers(repo, &m.digest, Some(signature::ARTIFACT_TYPE))
        .await?
    {
        let Some(digest) = d["digest"].as_str() else {
            continue;
        };
        if let Some(r) = client.get_manifest(repo, digest).await? {
            if let Ok(v) = serde_json::from_slice(&r.body) {
                sources.push((digest.to_string(), v));
            }
        }
    }
    let tag = signature::sig_tag(&m.digest);
    if let Some(t) = client.get_manifest(repo, &tag).await? {
        if let Ok(v) = serde_json::from_slice(&t.body) {
            sources.push((tag, v));
        }
    }
    let mut signatures = Vec::new();
    for (source, manifest) in sources {
        for found in signature::signatures_in(&manifest) {
            let payload = if found.payload_size <= signature::MAX_PAYLOAD {
                client
                    .get_small_blob(repo, &found.payload_digest, signature::MAX_PAYLOAD)
                    .await?
            } else {
                None
            };
            signatures.push(match payload {
                None => Checked {
                    source: source.clone(),
                    valid: false,
                    identity: None,
                    key_id: None,
                    reason: Some(format!("its payload {} is missing", found.payload_digest)),
                },
                Some(p) => checked(
                    source.clone(),
                    signature::check(&m.digest, &p, &found.signature, keys),
                ),
            });
        }
    }
    Ok(Verification {
        image: show(image),
        digest: m.digest,
        signatures,
    })
}

/// A check's outcome as listed.
pub fn checked(source: String, r: Result<signature::Verified, signature::Rejected>) -> Checked {
    match r {
        Ok(v) => Checked {
            source,
            valid: true,
            identity: Some(v.identity),
            key_id: Some(v.key_id),
            reason: None,
        },
        Err(e) => Checked {
            source,
            valid: false,
            identity: None,
            key_id: None,
            reason: Some(e.to_string()),
        },
    }
}
