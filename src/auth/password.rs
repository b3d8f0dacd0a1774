//! Generated secrets and their argon2 hashes. Secrets never leave this module except as the
//! one-time return value of [`generate`].

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;

use super::AuthError;

/// A fresh random password: 32 bytes from the OS, base64url without padding (43 chars),
/// never starting with `-` (drawn again: one in 64), so `-p PASSWORD` on a command line
/// is never read as an option.
pub fn generate() -> String {
    loop {
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        if !p.starts_with('-') {
            return p;
        }
    }
}

/// Random bytes for keys (the token signing key).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    OsRng.fill_bytes(&mut b);
    b
}

/// argon2id PHC string (salted; parameters are the crate defaults).
pub fn hash(secret: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Internal(format!("hashing a password: {e}")))
}

/// True if `secret` matches `phc`. The comparison inside argon2 is constant-time.
pub fn verify(secret: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(secret.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// Burn the same time as a real verification, so that an unknown user name cannot be told
/// apart from a wrong password by timing.
pub fn verify_dummy(secret: &str) {
    static DUMMY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if let Some(h) = DUMMY.get_or_init(|| hash("dummy-password-for-timing").ok()) {
        let _ = verify(secret, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One password in 64 would start with `-` (and `acr-task ... -p` would take it for
    /// an option); none does.
    #[test]
    fn passwords_never_start_with_a_dash() {
        for _ in 0..2000 {
            let p = generate();
            assert!(!p.starts_with('-') && p.len() == 43, "{p}");
        }
    }

    #[test]
    fn hash_verifies_only_the_same_secret() {
        let p = generate();
        assert_eq!(p.len(), 43);
        assert_ne!(p, generate());
        let h = hash(&p).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(!h.contains(&p));
        assert!(verify(&p, &h));
        assert!(!verify(&format!("{p}x"), &h));
        assert!(!verify(&p, "not a phc string"));
    }
}
