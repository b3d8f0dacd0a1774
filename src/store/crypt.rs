//! Encryption at rest, the primitives: envelope encryption with AES-256-GCM (aws-lc-rs).
//!
//! Each blob has its own data key (a DEK, 256 bits, random), kept wrapped by the registry
//! key (a KEK) in the metadata, under a random 16-byte id that the blob's file names in
//! its header. Content is sealed in fixed-size chunks of [`CHUNK`] bytes, each with its
//! own random nonce and its tag, so a ranged read decrypts only the chunks it reads. A
//! chunk's additional data binds it to its DEK id, its index and whether it is the last,
//! so chunks cannot be moved, dropped or reordered, and a file cut at a chunk boundary is
//! refused. Re-wrapping DEKs with a new registry key (rotation) rewrites no content.
//!
//! Blob file: `MAGIC` (8) · DEK id (16) · chunks: nonce (12) · ciphertext · tag (16);
//! every chunk holds `CHUNK` bytes of plaintext but the last, which holds fewer (maybe 0).
//! Small content (manifests) is sealed whole, its wrapped DEK inline:
//! `MAGIC` · key id (16) · DEK id (16) · wrapped DEK (60) · one last chunk.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use sha2::{Digest as _, Sha256};

/// Starts every sealed file and sealed manifest (a NUL first: no JSON starts so).
pub const MAGIC: &[u8; 8] = b"\0ACRENC1";
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
const TAG_LEN: usize = 16;
/// Bytes a chunk adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// A blob file's header: magic and DEK id.
pub const FILE_HEADER: usize = MAGIC.len() + ID_LEN;
const ID_LEN: usize = 16;
const KEY_LEN: usize = 32;
/// A wrapped DEK: nonce, encrypted key, tag.
pub const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
const SEALED_HEADER: usize = MAGIC.len() + ID_LEN + ID_LEN + WRAPPED_LEN;

#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("{0}")]
    Key(String),
    #[error("content does not decrypt: it was changed, cut short or is not ours")]
    Tampered,
    #[error("the random number generator failed")]
    Random,
}

pub type DekId = [u8; ID_LEN];

fn random<const N: usize>() -> Result<[u8; N], CryptError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| CryptError::Random)?;
    Ok(b)
}

fn aead_key(raw: &[u8]) -> Result<LessSafeKey, CryptError> {
    UnboundKey::new(&AES_256_GCM, raw)
        .map(LessSafeKey::new)
        .map_err(|_| CryptError::Key("a key must be 32 bytes".into()))
}

/// A registry key (the KEK): 32 bytes, named by a fingerprint that reveals nothing of it.
pub struct RegistryKey {
    id: String,
    key: LessSafeKey,
}

impl std::fmt::Debug for RegistryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryKey").field("id", &self.id).finish()
    }
}

impl RegistryKey {
    fn from_raw(raw: &[u8]) -> Result<RegistryKey, CryptError> {
        if raw.len() != KEY_LEN {
            return Err(CryptError::Key(format!(
                "a registry key is {KEY_LEN} bytes (base64: 44 characters), not {}",
                raw.len()
            )));
        }
        let mut h = Sha256::new();
        h.update(b"acr-task registry key v1");
        h.update(raw);
        let id = hex::encode(&h.finalize()[..ID_LEN]);
        Ok(RegistryKey {
            id,
            key: aead_key(raw)?,
        })
    }

    /// The key's fingerprint (32 hex characters).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The registry's keys: the first is current (new data keys are wrapped by it); the
/// others are still read (an interrupted rotation).
#[derive(Debug)]
pub struct KeyRing {
    keys: Vec<RegistryKey>,
}

impl KeyRing {
    /// A key file: one base64 key per line (blank lines and `#` comments ignored), the
    /// current first.
    pub fn parse(text: &str) -> Result<KeyRing, CryptError> {
        use base64::Engine as _;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|_| CryptError::Key(format!("line {} is not base64", i + 1)))?;
            keys.push(
                RegistryKey::from_raw(&raw)
                    .map_err(|e| CryptError::Key(format!("line {}: {e}", i + 1)))?,
            );
        }
        if keys.is_empty() {
            return Err(CryptError::Key("it holds no key".into()));
        }
        Ok(KeyRing { keys })
    }

    /// A new random key, as a key file's line.
    pub fn generate_line() -> Result<String, CryptError> {
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.encode(random::<KEY_LEN>()?))
    }

    pub fn current(&self) -> &RegistryKey {
        &self.keys[0]
    }

    pub fn get(&self, id: &str) -> Option<&RegistryKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id.clone()).collect()
    }

    /// `dek` wrapped by the current key: (key id, wrapped bytes).
    fn wrap(&self, dek: &[u8; KEY_LEN], dek_id: &DekId) -> Result<(String, Vec<u8>), CryptError> {
        let k = self.current();
        let nonce = random::<NONCE_LEN>()?;
        let mut out = dek.to_vec();
        let tag = k
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(dek_id, &k.id)),
                &mut out,
            )
            .map_err(|_| CryptError::Tampered)?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&out);
        wrapped.extend_from_slice(tag.as_ref());
        Ok((k.id.clone(), wrapped))
    }

    /// The DEK `wrapped` by key `key_id`.
    pub fn unwrap(&self, key_id: &str, dek_id: &DekId, wrapped: &[u8]) -> Result<Dek, CryptError> {
        Ok(Dek {
            key: aead_key(&self.unwrap_raw(key_id, dek_id, wrapped)?)?,
            id: *dek_id,
        })
    }

    /// `wrapped` (by `key_id`) wrapped again by the current key.
    pub fn rewrap(
        &self,
        key_id: &str,
        dek_id: &DekId,
        wrapped: &[u8],
    ) -> Result<(String, Vec<u8>), CryptError> {
        self.wrap(&self.unwrap_raw(key_id, dek_id, wrapped)?, dek_id)
    }

    /// The raw DEK `wrapped` by key `key_id`.
    fn unwrap_raw(
        &self,
        key_id: &str,
        dek_id: &DekId,
        wrapped: &[u8],
    ) -> Result<[u8; KEY_LEN], CryptError> {
        let k = self.get(key_id).ok_or_else(|| {
            CryptError::Key(format!(
                "the data key {} is wrapped by registry key {key_id}, which is not given",
                hex::encode(dek_id)
            ))
        })?;
        if wrapped.len() != WRAPPED_LEN {
            return Err(CryptError::Tampered);
        }
        let nonce = Nonce::try_assume_unique_for_key(&wrapped[..NONCE_LEN])
            .map_err(|_| CryptError::Tampered)?;
        let mut raw = [0u8; KEY_LEN];
        raw.copy_from_slice(&wrapped[NONCE_LEN..NONCE_LEN + KEY_LEN]);
        k.key
            .open_in_place_separate_tag(
                nonce,
                Aad::from(wrap_aad(dek_id, &k.id)),
                &wrapped[NONCE_LEN + KEY_LEN..],
                &mut raw,
            )
            .map_err(|_| CryptError::Tampered)?;
        Ok(raw)
    }

    /// A new data key with its id, and its wrapping: (dek, key id, wrapped).
    pub fn new_dek(&self) -> Result<(Dek, String, Vec<u8>), CryptError> {
        let raw = random::<KEY_LEN>()?;
        let id = random::<ID_LEN>()?;
        let (key_id, wrapped) = self.wrap(&raw, &id)?;
        Ok((
            Dek {
                key: aead_key(&raw)?,
                id,
            },
            key_id,
            wrapped,
        ))
    }

    /// Small content sealed whole, its wrapped data key inline.
    pub fn seal_bytes(&self, plain: &[u8]) -> Result<Vec<u8>, CryptError> {
        let (dek, key_id, wrapped) = self.new_dek()?;
        let mut out = Vec::with_capacity(SEALED_HEADER + plain.len() + OVERHEAD);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&hex_id(&key_id)?);
        out.extend_from_slice(&dek.id);
        out.extend_from_slice(&wrapped);
        dek.seal_chunk(0, true, plain, &mut out)?;
        Ok(out)
    }

    /// The plaintext of sealed bytes; `None` when they are not sealed (no magic).
    pub fn open_bytes(&self, sealed: &[u8]) -> Result<Option<Vec<u8>>, CryptError> {
        let Some((key_id, dek_id, wrapped, body)) = split_sealed(sealed) else {
            return Ok(None);
        };
        let dek = self.unwrap(&key_id, &dek_id, wrapped)?;
        let mut body = body.to_vec();
        let n = dek.open_chunk(0, true, &mut body)?.len();
        body.drain(..NONCE_LEN);
        body.truncate(n);
        Ok(Some(body))
    }

    /// The registry key that sealed these bytes (`None`: not sealed).
    pub fn sealed_by(sealed: &[u8]) -> Option<String> {
        split_sealed(sealed).map(|(k, ..)| k)
    }

    /// Sealed bytes with their data key wrapped again by the current key (content as is).
    pub fn rewrap_bytes(&self, sealed: &[u8]) -> Result<Option<Vec<u8>>, CryptError> {
        let Some((key_id, dek_id, wrapped, body)) = split_sealed(sealed) else {
            return Ok(None);
        };
        let (new_key, new_wrapped) = self.rewrap(&key_id, &dek_id, wrapped)?;
        let mut out = Vec::with_capacity(sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&hex_id(&new_key)?);
        out.extend_from_slice(&dek_id);
        out.extend_from_slice(&new_wrapped);
        out.extend_from_slice(body);
        Ok(Some(out))
    }
}

fn hex_id(id: &str) -> Result<[u8; ID_LEN], CryptError> {
    let v = hex::decode(id).map_err(|_| CryptError::Key(format!("{id} is not a key id")))?;
    v.try_into()
        .map_err(|_| CryptError::Key(format!("{id} is not a key id")))
}

/// A sealed value's (key id, DEK id, wrapped DEK, chunk).
fn split_sealed(b: &[u8]) -> Option<(String, DekId, &[u8], &[u8])> {
    if b.len() < SEALED_HEADER + OVERHEAD || !b.starts_with(MAGIC) {
        return None;
    }
    let key_id = hex::encode(&b[8..24]);
    let dek_id: DekId = b[24..40].try_into().ok()?;
    Some((
        key_id,
        dek_id,
        &b[40..40 + WRAPPED_LEN],
        &b[SEALED_HEADER..],
    ))
}

fn wrap_aad(dek_id: &DekId, key_id: &str) -> Vec<u8> {
    let mut a = b"acr-task dek".to_vec();
    a.extend_from_slice(dek_id);
    a.extend_from_slice(key_id.as_bytes());
    a
}

fn chunk_aad(dek_id: &DekId, index: u64, last: bool) -> [u8; ID_LEN + 9] {
    let mut a = [0u8; ID_LEN + 9];
    a[..ID_LEN].copy_from_slice(dek_id);
    a[ID_LEN..ID_LEN + 8].copy_from_slice(&index.to_be_bytes());
    a[ID_LEN + 8] = u8::from(last);
    a
}

/// A blob's data key.
pub struct Dek {
    key: LessSafeKey,
    id: DekId,
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dek")
            .field("id", &hex::encode(self.id))
            .finish()
    }
}

impl Dek {
    pub fn id(&self) -> &DekId {
        &self.id
    }

    /// Appends chunk `index` (nonce, ciphertext, tag) sealing `plain` to `out`.
    pub fn seal_chunk(
        &self,
        index: u64,
        last: bool,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptError> {
        let nonce = random::<NONCE_LEN>()?;
        out.extend_from_slice(&nonce);
        let at = out.len();
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(chunk_aad(&self.id, index, last)),
                &mut out[at..],
            )
            .map_err(|_| CryptError::Tampered)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens chunk `index` in place (`chunk`: nonce, ciphertext, tag); the plaintext is
    /// then `chunk[NONCE_LEN..NONCE_LEN + n]` for the returned slice's length `n`.
    pub fn open_chunk<'a>(
        &self,
        index: u64,
        last: bool,
        chunk: &'a mut [u8],
    ) -> Result<&'a mut [u8], CryptError> {
        if chunk.len() < OVERHEAD {
            return Err(CryptError::Tampered);
        }
        let nonce = Nonce::try_assume_unique_for_key(&chunk[..NONCE_LEN])
            .map_err(|_| CryptError::Tampered)?;
        let body_len = chunk.len() - OVERHEAD;
        let (body, tag) = chunk[NONCE_LEN..].split_at_mut(body_len);
        self.key
            .open_in_place_separate_tag(
                nonce,
                Aad::from(chunk_aad(&self.id, index, last)),
                tag,
                body,
            )
            .map_err(|_| CryptError::Tampered)
    }
}

/// Where chunk `i` starts in a blob file.
pub fn chunk_offset(i: u64) -> u64 {
    FILE_HEADER as u64 + i * (CHUNK + OVERHEAD) as u64
}

/// The DEK id a blob file's header names, if the file is sealed.
pub fn file_dek_id(header: &[u8]) -> Option<DekId> {
    if header.len() < FILE_HEADER || !header.starts_with(MAGIC) {
        return None;
    }
    header[MAGIC.len()..FILE_HEADER].try_into().ok()
}

/// A blob file's header for `dek`.
pub fn file_header(dek: &Dek) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&dek.id);
    h
}

/// Where wrapped data keys are kept (the metadata store): rows by DEK id.
pub trait KeyIndex: Send + Sync {
    /// Records a data key before the content it seals is committed. `durable`: on disk
    /// when this returns (a sealed file replaces plaintext in place); otherwise by the
    /// metadata's next durable commit (the blob's link, which makes the content visible).
    fn put_dek(
        &self,
        dek_id: &DekId,
        digest: &str,
        key_id: &str,
        wrapped: &[u8],
        durable: bool,
    ) -> Result<(), super::StoreError>;
    /// A data key's (registry key id, wrapped DEK).
    fn get_dek(&self, dek_id: &DekId) -> Result<Option<(String, Vec<u8>)>, super::StoreError>;
    /// Up to `limit` data keys not wrapped by `key_id`: (DEK id, key id, wrapped).
    fn deks_not_wrapped_by(
        &self,
        key_id: &str,
        limit: usize,
    ) -> Result<Vec<(DekId, String, Vec<u8>)>, super::StoreError>;
    /// Replaces a data key's wrapping if it is still `old_key` (false otherwise).
    fn rewrap_dek(
        &self,
        dek_id: &DekId,
        old_key: &str,
        key_id: &str,
        wrapped: &[u8],
    ) -> Result<bool, super::StoreError>;
    /// The registry keys that wrap some data key.
    fn dek_key_ids(&self) -> Result<Vec<String>, super::StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(lines: &[String]) -> KeyRing {
        KeyRing::parse(&lines.join("\n")).unwrap()
    }

    #[test]
    fn chunks_round_trip_and_refuse_any_change() {
        let r = ring(&[KeyRing::generate_line().unwrap()]);
        let (dek, key_id, wrapped) = r.new_dek().unwrap();
        assert_eq!(key_id, r.current().id());
        let mut out = Vec::new();
        dek.seal_chunk(3, false, b"hello chunk", &mut out).unwrap();
        assert_eq!(out.len(), 11 + OVERHEAD);
        assert!(!out.windows(5).any(|w| w == b"hello"), "plaintext visible");
        let again = r.unwrap(&key_id, dek.id(), &wrapped).unwrap();
        let mut c = out.clone();
        assert_eq!(again.open_chunk(3, false, &mut c).unwrap(), b"hello chunk");
        // Another index, the last flag, a flipped bit: refused.
        for (i, last) in [(4, false), (3, true)] {
            let mut c = out.clone();
            assert!(again.open_chunk(i, last, &mut c).is_err());
        }
        let mut c = out.clone();
        c[NONCE_LEN + 2] ^= 1;
        assert!(again.open_chunk(3, false, &mut c).is_err());
    }

    #[test]
    fn a_wrong_key_or_wrapping_is_refused() {
        let a = ring(&[KeyRing::generate_line().unwrap()]);
        let b = ring(&[KeyRing::generate_line().unwrap()]);
        assert_ne!(a.current().id(), b.current().id());
        let (dek, key_id, mut wrapped) = a.new_dek().unwrap();
        let e = b.unwrap(&key_id, dek.id(), &wrapped).unwrap_err();
        assert!(e.to_string().contains("is not given"), "{e}");
        wrapped[20] ^= 1;
        assert!(matches!(
            a.unwrap(&key_id, dek.id(), &wrapped),
            Err(CryptError::Tampered)
        ));
        assert!(KeyRing::parse("not base64!").is_err());
        assert!(KeyRing::parse("# only a comment\n").is_err());
        let short = KeyRing::parse("AAAA").unwrap_err().to_string();
        assert!(short.contains("32 bytes"), "{short}");
    }

    #[test]
    fn sealed_bytes_round_trip_and_rewrap_keeps_the_content() {
        let old = KeyRing::generate_line().unwrap();
        let new = KeyRing::generate_line().unwrap();
        let r1 = ring(std::slice::from_ref(&old));
        let manifest = br#"{"schemaVersion":2}"#;
        let sealed = r1.seal_bytes(manifest).unwrap();
        assert_eq!(r1.open_bytes(&sealed).unwrap().unwrap(), manifest);
        assert_eq!(
            r1.open_bytes(manifest).unwrap(),
            None,
            "plaintext is not sealed"
        );
        assert_eq!(
            KeyRing::sealed_by(&sealed).as_deref(),
            Some(r1.current().id())
        );
        let r2 = ring(&[new, old]);
        let moved = r2.rewrap_bytes(&sealed).unwrap().unwrap();
        assert_eq!(
            KeyRing::sealed_by(&moved).as_deref(),
            Some(r2.current().id())
        );
        assert_eq!(
            &moved[SEALED_HEADER..],
            &sealed[SEALED_HEADER..],
            "content untouched"
        );
        assert_eq!(r2.open_bytes(&moved).unwrap().unwrap(), manifest);
        assert!(
            r1.open_bytes(&moved).is_err(),
            "the old ring lacks the new key"
        );
        let mut bad = sealed.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(r1.open_bytes(&bad).is_err());
    }
}
