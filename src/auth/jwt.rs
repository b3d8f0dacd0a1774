//! Short-lived registry tokens: HS256 JWTs with distribution's `access` claim, signed with
//! a key kept in the data dir (`token-signing.key`, 0600, made on first start).

use std::io::Write;
use std::path::Path;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::password::random_bytes;
use super::scope::Access;
use super::AuthError;

pub const ISSUER: &str = "acr-task";
pub const KEY_FILE: &str = "token-signing.key";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The user (token name or `admin`); empty for anonymous.
    pub sub: String,
    /// The service the token is good for.
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
}

/// Read the signing key, creating it (32 random bytes, mode 0600) if absent.
pub fn load_or_create_key(dir: &Path) -> Result<Vec<u8>, AuthError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(KEY_FILE);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            let key = random_bytes(32);
            f.write_all(&key)
                .and_then(|_| f.sync_all())
                .map_err(|e| AuthError::io(&path, e))?;
            tracing::info!(path = %path.display(), "created the token signing key");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let key = std::fs::read(&path).map_err(|e| AuthError::io(&path, e))?;
            if key.len() < 32 {
                return Err(AuthError::Internal(format!(
                    "token signing key {} is too short; delete it to make a new one",
                    path.display()
                )));
            }
            Ok(key)
        }
        Err(e) => Err(AuthError::io(&path, e)),
    }
}

pub fn issue(key: &[u8], claims: &Claims) -> Result<String, AuthError> {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(key),
    )
    .map_err(|e| AuthError::Internal(format!("signing a token: {e}")))
}

/// Check signature, issuer, audience (`service`) and lifetime (no leeway: one clock).
pub fn verify(key: &[u8], service: &str, token: &str) -> Result<Claims, AuthError> {
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = 0;
    v.validate_nbf = true;
    v.set_audience(&[service]);
    v.set_issuer(&[ISSUER]);
    v.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
    decode::<Claims>(token, &DecodingKey::from_secret(key), &v)
        .map(|d| d.claims)
        .map_err(|e| AuthError::BadToken(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp_in: i64, aud: &str) -> Claims {
        let now = chrono::Utc::now().timestamp();
        Claims {
            iss: ISSUER.into(),
            sub: "ci".into(),
            aud: aud.into(),
            exp: now + exp_in,
            nbf: now - 1,
            iat: now,
            jti: "j".into(),
            access: vec![Access::repo("a", &["pull"])],
        }
    }

    #[test]
    fn key_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let k1 = load_or_create_key(d.path()).unwrap();
        let k2 = load_or_create_key(d.path()).unwrap();
        assert_eq!(k1, k2);
        let mode = std::fs::metadata(d.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let key = random_bytes(32);
        let c = claims(60, "svc");
        let t = issue(&key, &c).unwrap();
        assert_eq!(verify(&key, "svc", &t).unwrap(), c);
        assert!(verify(&key, "other", &t).is_err());
        assert!(verify(&random_bytes(32), "svc", &t).is_err());
        let expired = issue(&key, &claims(-5, "svc")).unwrap();
        assert!(verify(&key, "svc", &expired).is_err());
        // Flip a payload character: the signature no longer matches.
        let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
        let mut p = parts[1].clone().into_bytes();
        p[5] = if p[5] == b'A' { b'B' } else { b'A' };
        parts[1] = String::from_utf8(p).unwrap();
        assert!(verify(&key, "svc", &parts.join(".")).is_err());
    }
}
