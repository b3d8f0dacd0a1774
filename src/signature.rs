//! Image signatures in cosign's key-pair format, as plain data: sigstore's "simple signing"
//! payload naming the manifest digest, signed with ECDSA P-256 over SHA-256 (an ASN.1 DER
//! signature, base64 in the layer annotation `dev.cosignproject.cosign/signature`).
//!
//! A signature is stored two ways, so that existing tools find it: as an OCI 1.1 referrer
//! of the image (artifact type `application/vnd.dev.cosign.artifact.sig.v1+json`, as
//! `cosign sign --registry-referrers-mode=oci-1-1`), and in cosign's tag scheme
//! (`sha256-HEX.sig`, whose layers are every signature; skopeo and podman read this one).
//! Keys: PEM, PKCS#8 or SEC1 ("EC PRIVATE KEY", as `openssl ecparam -genkey` writes) for
//! signing, X.509 SubjectPublicKeyInfo ("PUBLIC KEY", as `cosign.pub`) for verifying.
//! No I/O here; the crypto is aws-lc-rs's.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING,
};
use base64::Engine as _;
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The media type of a signed payload (a layer of a signature manifest).
pub const SIMPLE_SIGNING_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature of the layer's payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The artifact type of a signature referrer.
pub const ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// `critical.type` of a container image signature payload.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";
/// The OCI empty descriptor's media type and content (a signature manifest's config).
pub const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONTENT: &[u8] = b"{}";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// A payload larger than this is no signature payload (they are a few hundred bytes).
pub const MAX_PAYLOAD: u64 = 64 * 1024;

/// DER prefix of an X.509 SubjectPublicKeyInfo of a P-256 key (id-ecPublicKey, prime256v1),
/// followed by the 65-byte uncompressed point: the one key type this format signs with.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{0}: this is cosign's password-encrypted key, which acr-task does not read; give an \
         unencrypted PKCS#8 or EC key in PEM (`acr-task generate-key-pair` makes one, \
         `openssl ecparam -name prime256v1 -genkey -noout` too)"
    )]
    Encrypted(String),
    #[error("{what}: {why}")]
    Bad { what: String, why: String },
    #[error("signing failed")]
    Sign,
}

fn bad(what: &str, why: impl Into<String>) -> KeyError {
    KeyError::Bad {
        what: what.to_string(),
        why: why.into(),
    }
}

/// A private signing key. Never printed: its `Debug` shows only the public key's id.
pub struct SigningKey {
    pair: EcdsaKeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public_key().id())
    }
}

impl SigningKey {
    /// A new random P-256 key.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .map_err(|_| bad("a new key", "the random source failed"))?;
        Ok(SigningKey { pair })
    }

    /// A key from PEM text; `what` names its source in errors (a path, `env://VAR`).
    pub fn from_pem(what: &str, text: &[u8]) -> Result<SigningKey, KeyError> {
        if String::from_utf8_lossy(text).contains("-----BEGIN ENCRYPTED") {
            return Err(KeyError::Encrypted(what.to_string()));
        }
        let mut found = None;
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(text) {
            let (kind, der) = item.map_err(|_| bad(what, "not a PEM file"))?;
            if matches!(kind, SectionKind::PrivateKey | SectionKind::EcPrivateKey) {
                found = Some(der);
                break;
            }
        }
        let der = found.ok_or_else(|| {
            bad(
                what,
                "no \"PRIVATE KEY\" or \"EC PRIVATE KEY\" in it (a public key verifies; signing \
                 needs the private one)",
            )
        })?;
        let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, &der)
            .map_err(|_| bad(what, "not an ECDSA P-256 private key"))?;
        Ok(SigningKey { pair })
    }

    /// The key as PKCS#8 PEM ("PRIVATE KEY"), which cosign's `import-key-pair` reads too.
    pub fn to_pem(&self) -> Result<String, KeyError> {
        let doc = self
            .pair
            .to_pkcs8v1()
            .map_err(|_| bad("the key", "cannot be written as PKCS#8"))?;
        Ok(pem("PRIVATE KEY", doc.as_ref()))
    }

    pub fn public_key(&self) -> PublicKey {
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(self.pair.public_key().as_ref());
        PublicKey { spki }
    }

    /// The base64 ASN.1 signature of `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<String, KeyError> {
        let sig = self
            .pair
            .sign(&SystemRandom::new(), payload)
            .map_err(|_| KeyError::Sign)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(sig.as_ref()))
    }
}

/// A P-256 public key (its SubjectPublicKeyInfo DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    spki: Vec<u8>,
}

impl PublicKey {
    /// A key from PEM text ("PUBLIC KEY", as `cosign.pub`).
    pub fn from_pem(what: &str, text: &[u8]) -> Result<PublicKey, KeyError> {
        let mut found = None;
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(text) {
            let (kind, der) = item.map_err(|_| bad(what, "not a PEM file"))?;
            if kind == SectionKind::PublicKey {
                found = Some(der);
                break;
            }
            if matches!(kind, SectionKind::PrivateKey | SectionKind::EcPrivateKey) {
                return Err(bad(
                    what,
                    "this is a private key: verify with the public one (the .pub file)",
                ));
            }
        }
        let spki = found.ok_or_else(|| bad(what, "no \"PUBLIC KEY\" in it"))?;
        PublicKey::from_der(what, spki)
    }

    fn from_der(what: &str, spki: Vec<u8>) -> Result<PublicKey, KeyError> {
        if spki.len() != P256_SPKI_PREFIX.len() + 65 || !spki.starts_with(&P256_SPKI_PREFIX) {
            return Err(bad(what, "not an ECDSA P-256 public key"));
        }
        Ok(PublicKey { spki })
    }

    pub fn to_pem(&self) -> String {
        pem("PUBLIC KEY", &self.spki)
    }

    /// A short id of the key: the first 16 hex digits of the SHA-256 of its DER.
    pub fn id(&self) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(&self.spki)[..8])
    }

    /// Whether `signature` (base64 ASN.1) signs `payload` with this key.
    pub fn verifies(&self, payload: &[u8], signature: &str) -> bool {
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
            return false;
        };
        let point = &self.spki[P256_SPKI_PREFIX.len()..];
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(payload, &sig)
            .is_ok()
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The simple signing payload (containers/image's format, as cosign writes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub critical: Critical,
    #[serde(default)]
    pub optional: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Critical {
    pub identity: Identity,
    pub image: Image,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

/// The payload signing `digest` as an image of `reference` (`HOST/REPO`, no tag).
pub fn payload(reference: &str, digest: &str) -> Vec<u8> {
    let p = Payload {
        critical: Critical {
            identity: Identity {
                docker_reference: reference.to_string(),
            },
            image: Image {
                docker_manifest_digest: digest.to_string(),
            },
            kind: PAYLOAD_TYPE.to_string(),
        },
        optional: None,
    };
    serde_json::to_vec(&p).unwrap_or_default()
}

/// One signature a manifest carries: the digest of its payload blob and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub payload_digest: String,
    pub payload_size: u64,
    pub signature: String,
}

/// The signatures in a signature manifest (its simple-signing layers that carry one).
pub fn signatures_in(manifest: &Value) -> Vec<Found> {
    let Some(layers) = manifest["layers"].as_array() else {
        return Vec::new();
    };
    layers
        .iter()
        .filter(|l| l["mediaType"] == SIMPLE_SIGNING_TYPE)
        .filter_map(|l| {
            Some(Found {
                payload_digest: l["digest"].as_str()?.to_string(),
                payload_size: l["size"].as_u64()?,
                signature: l["annotations"][SIGNATURE_ANNOTATION].as_str()?.to_string(),
            })
        })
        .collect()
}

/// Whether a manifest is a signature (or other cosign attachment) rather than an image:
/// its artifact type says so, or every layer is a signed payload.
pub fn is_signature(manifest: &Value) -> bool {
    if manifest["artifactType"] == ARTIFACT_TYPE || manifest["config"]["mediaType"] == ARTIFACT_TYPE
    {
        return true;
    }
    matches!(manifest["layers"].as_array(), Some(l) if !l.is_empty()
        && l.iter().all(|l| l["mediaType"] == SIMPLE_SIGNING_TYPE))
}

/// Why a signature does not sign a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("its payload is not a simple signing payload")]
    Malformed,
    #[error("no given key made it")]
    UnknownKey,
    #[error("it signs {0}, not this manifest")]
    OtherDigest(String),
    #[error("it signs a {0:?}, not a {PAYLOAD_TYPE:?}")]
    OtherType(String),
}

/// A signature that checks: who it names and which key made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub identity: String,
    pub key_id: String,
}

/// Whether `signature` over `payload` signs manifest `digest` with one of `keys`.
pub fn check(
    digest: &str,
    payload: &[u8],
    signature: &str,
    keys: &[PublicKey],
) -> Result<Verified, Rejected> {
    let key = keys
        .iter()
        .find(|k| k.verifies(payload, signature))
        .ok_or(Rejected::UnknownKey)?;
    // Only what the key signed is read.
    let p: Payload = serde_json::from_slice(payload).map_err(|_| Rejected::Malformed)?;
    if p.critical.kind != PAYLOAD_TYPE {
        return Err(Rejected::OtherType(p.critical.kind));
    }
    if p.critical.image.docker_manifest_digest != digest {
        return Err(Rejected::OtherDigest(
            p.critical.image.docker_manifest_digest,
        ));
    }
    Ok(Verified {
        identity: p.critical.identity.docker_reference,
        key_id: key.id(),
    })
}

/// cosign's tag for the signatures of `digest` (`sha256:HEX` → `sha256-HEX.sig`).
pub fn sig_tag(digest: &str) -> String {
    format!("{}.sig", digest.replace(':', "-"))
}

/// A manifest's descriptor: what a referrer's `subject` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// The layer of one signature: its payload blob and the signature of it.
fn layer(payload_digest: &str, payload_size: u64, signature: &str) -> Value {
    json!({
        "mediaType": SIMPLE_SIGNING_TYPE,
        "digest": payload_digest,
        "size": payload_size,
        "annotations": { SIGNATURE_ANNOTATION: signature },
    })
}

fn empty_config() -> Value {
    json!({
        "mediaType": EMPTY_TYPE,
        "digest": crate::digest::of_bytes(crate::digest::Algorithm::Sha256, EMPTY_CONTENT),
        "size": EMPTY_CONTENT.len(),
    })
}

/// The OCI 1.1 referrer holding one signature of `subject`.
pub fn referrer_manifest(subject: &Subject, payload_digest: &str, size: u64, sig: &str) -> Vec<u8> {
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": empty_config(),
        "layers": [layer(payload_digest, size, sig)],
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        },
    });
    serde_json::to_vec(&m).unwrap_or_default()
}

/// cosign's tag-scheme manifest: the layers of `existing` (the tag's manifest now, if any)
/// with this signature added, once.
pub fn tag_manifest(
    existing: Option<&Value>,
    payload_digest: &str,
    size: u64,
    sig: &str,
) -> Vec<u8> {
    let mut layers: Vec<Value> = existing
        .and_then(|m| m["layers"].as_array())
        .map(|l| {
            l.iter()
                .filter(|l| l["mediaType"] == SIMPLE_SIGNING_TYPE)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let new = layer(payload_digest, size, sig);
    if !layers.contains(&new) {
        layers.push(new);
    }
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": empty_config(),
        "layers": layers,
    });
    serde_json::to_vec(&m).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 6979 appendix A.2.5: the P-256 key and its SHA-256 signature of "sample".
    const RFC6979_X: &str = "60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6";
    const RFC6979_Y: &str = "7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299";
    const RFC6979_R: &str = "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716";
    const RFC6979_S: &str = "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8";

    /// An ASN.1 INTEGER of a big-endian unsigned number.
    fn der_int(n: &[u8]) -> Vec<u8> {
        let mut v: Vec<u8> = n.iter().copied().skip_while(|b| *b == 0).collect();
        if v.first().is_some_and(|b| b & 0x80 != 0) {
            v.insert(0, 0);
        }
        let mut out = vec![0x02, v.len() as u8];
        out.extend(v);
        out
    }

    fn rfc6979_key() -> PublicKey {
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.push(0x04);
        spki.extend(hex::decode(RFC6979_X).unwrap());
        spki.extend(hex::decode(RFC6979_Y).unwrap());
        PublicKey::from_der("rfc6979", spki).unwrap()
    }

    fn rfc6979_sig() -> String {
        let (r, s) = (
            der_int(&hex::decode(RFC6979_R).unwrap()),
            der_int(&hex::decode(RFC6979_S).unwrap()),
        );
        let mut seq = vec![0x30, (r.len() + s.len()) as u8];
        seq.extend(r);
        seq.extend(s);
        base64::engine::general_purpose::STANDARD.encode(seq)
    }

    #[test]
    fn the_published_rfc6979_vector_verifies_and_a_changed_message_does_not() {
        let key = rfc6979_key();
        let sig = rfc6979_sig();
        assert!(key.verifies(b"sample", &sig));
        assert!(!key.verifies(b"samplf", &sig));
        assert!(!key.verifies(b"sample", "bm90IGEgc2lnbmF0dXJl"));
        assert!(!key.verifies(b"sample", "%%% not base64"));
        // Through PEM, as a cosign.pub file holds it.
        let again = PublicKey::from_pem("k.pub", key.to_pem().as_bytes()).unwrap();
        assert!(again.verifies(b"sample", &sig));
    }

    #[test]
    fn cosigns_published_public_key_is_read() {
        // containers/image signature/fixtures/cosign.pub, made by `cosign generate-key-pair`.
        let pem = "-----BEGIN PUBLIC KEY-----\n\
            MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEFNLqFhf4fiN6o/glAuYnq2jYUeL0\n\
            vRuLu/z39pmbVwS9ff5AYnlwaP9sxREajdLY9ynM6G1sy6AAmb7Z63TsLg==\n\
            -----END PUBLIC KEY-----\n";
        let k = PublicKey::from_pem("cosign.pub", pem.as_bytes()).unwrap();
        assert_eq!(k.to_pem(), pem);
    }

    #[test]
    fn a_signed_payload_checks_only_for_its_digest_and_key() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let d = format!("sha256:{}", "a".repeat(64));
        let p = payload("127.0.0.1:5000/app", &d);
        let sig = key.sign(&p).unwrap();
        let v = check(&d, &p, &sig, &[other.public_key(), key.public_key()]).unwrap();
        assert_eq!(v.identity, "127.0.0.1:5000/app");
        assert_eq!(v.key_id, key.public_key().id());
        assert_eq!(
            check(&d, &p, &sig, &[other.public_key()]),
            Err(Rejected::UnknownKey)
        );
        let d2 = format!("sha256:{}", "b".repeat(64));
        assert_eq!(
            check(&d2, &p, &sig, &[key.public_key()]),
            Err(Rejected::OtherDigest(d.clone()))
        );
        // The payload's exact bytes are signed: re-serialised JSON does not verify.
        let mut spaced = p.clone();
        spaced.push(b' ');
        assert_eq!(
            check(&d, &spaced, &sig, &[key.public_key()]),
            Err(Rejected::UnknownKey)
        );
        let att = serde_json::to_vec(&json!({"critical": {"identity": {"docker-reference": "x"},
            "image": {"docker-manifest-digest": d}, "type": "attestation"}}))
        .unwrap();
        let sig = key.sign(&att).unwrap();
        assert!(matches!(
            check(&d, &att, &sig, &[key.public_key()]),
            Err(Rejected::OtherType(_))
        ));
    }

    #[test]
    fn keys_round_trip_through_pem_and_wrong_kinds_are_refused_clearly() {
        let key = SigningKey::generate().unwrap();
        let pem = key.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let back = SigningKey::from_pem("k", pem.as_bytes()).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        assert!(!format!("{key:?}").contains(&pem[28..60]));
        let pubpem = key.public_key().to_pem();
        let e = SigningKey::from_pem("k.pub", pubpem.as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("signing needs the private one"),
            "{e}"
        );
        let e = PublicKey::from_pem("k.key", pem.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("verify with the public one"), "{e}");
        let enc = "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n";
        let e = SigningKey::from_pem("cosign.key", enc.as_bytes()).unwrap_err();
        assert!(matches!(e, KeyError::Encrypted(_)));
        assert!(PublicKey::from_pem("x", b"garbage").is_err());
    }

    #[test]
    fn signature_manifests_carry_their_signatures_and_the_tag_one_collects_them() {
        let subject = Subject {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "c".repeat(64)),
            size: 100,
        };
        let pd = format!("sha256:{}", "d".repeat(64));
        let r: Value =
            serde_json::from_slice(&referrer_manifest(&subject, &pd, 200, "SIG")).unwrap();
        assert_eq!(r["subject"]["digest"], subject.digest.as_str());
        assert!(is_signature(&r));
        assert_eq!(
            signatures_in(&r),
            vec![Found {
                payload_digest: pd.clone(),
                payload_size: 200,
                signature: "SIG".into()
            }]
        );
        let t1: Value = serde_json::from_slice(&tag_manifest(None, &pd, 200, "SIG")).unwrap();
        let t2: Value = serde_json::from_slice(&tag_manifest(Some(&t1), &pd, 200, "SIG2")).unwrap();
        let t3: Value = serde_json::from_slice(&tag_manifest(Some(&t2), &pd, 200, "SIG2")).unwrap();
        assert_eq!(signatures_in(&t3).len(), 2);
        assert!(t3.get("subject").is_none());
        assert_eq!(
            sig_tag(&subject.digest),
            format!("sha256-{}.sig", "c".repeat(64))
        );
        let image = json!({"config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}]});
        assert!(!is_signature(&image));
    }
}
