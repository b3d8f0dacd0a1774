//! Logins to the page: a session per browser after the admin or a token signs in, kept in
//! memory, named by a random cookie (`HttpOnly`, `SameSite=Strict`, `Secure` over TLS),
//! with its own CSRF token for every form. The server keeps only the SHA-256 of a session
//! id, so looking one up leaks nothing by its timing. What a session may do is read anew
//! from the auth store on every request (a disabled token loses its sessions at once).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use sha2::Digest as _;

pub const COOKIE: &str = "acr_task_session";
/// A session ends this long after its login.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// At most this many sessions at once (the oldest go first).
const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub csrf: String,
    expires: Instant,
}

#[derive(Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    // The OS's generator (as uuid v4 and argon2 salts use); never a home-made one.
    for chunk in b.chunks_mut(16) {
        chunk.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    hex::encode(b)
}

fn hash(id: &str) -> [u8; 32] {
    sha2::Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// A new session for `user`; returns its id (the cookie's value).
    pub fn create(&self, user: &str) -> String {
        let id = random_hex();
        let s = Session {
            user: user.to_string(),
            csrf: random_hex(),
            expires: Instant::now() + LIFETIME,
        };
        if let Ok(mut m) = self.by_hash.lock() {
            let now = Instant::now();
            m.retain(|_, s| s.expires > now);
            if m.len() >= MAX_SESSIONS {
                if let Some(k) = m.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) {
                    m.remove(&k);
                }
            }
            m.insert(hash(&id), s);
        }
        id
    }

    /// The live session the request's cookie names.
    pub fn get(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let m = self.by_hash.lock().ok()?;
        m.get(&hash(&id))
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    pub fn remove(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            if let Ok(mut m) = self.by_hash.lock() {
                m.remove(&hash(&id));
            }
        }
    }
}

/// A cookie's value from the `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The `Set-Cookie` value of a new session (or, with `None`, of its end).
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            LIFETIME.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// Constant-time comparison of a form's CSRF token with the session's.
pub fn csrf_matches(expected: &str, given: &str) -> bool {
    use subtle::ConstantTimeEq;
    !expected.is_empty() && expected.as_bytes().ct_eq(given.as_bytes()).into()
}

/// Where to go after a login: a path on this server only (never `//host` or a URL).
pub fn safe_next(next: Option<&str>) -> String {
    // A path of this server only: browsers drop tabs and newlines from URLs (`/\t/evil`
    // would become `//evil`), and read `\` as `/`.
    let plain =
        |n: &str| n.len() <= 2048 && n.chars().all(|c| c.is_ascii_graphic()) && !n.contains('\\');
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && plain(n) => n.into(),
        _ => "/".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_a_path_of_this_server() {
        assert_eq!(safe_next(Some("/ui/runs/x?y=1")), "/ui/runs/x?y=1");
        for bad in [
            "//evil.example",
            "/\t/evil.example",
            "/\\evil",
            "https://e",
            "/a b",
            "/\n/e",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn a_session_is_found_by_its_cookie_only() {
        let s = Sessions::default();
        let id = s.create("admin");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={id}").parse().unwrap(),
        );
        let got = s.get(&h).unwrap();
        assert_eq!(got.user, "admin");
        assert_eq!(got.csrf.len(), 64);
        let mut wrong = HeaderMap::new();
        wrong.insert(
            header::COOKIE,
            format!("{COOKIE}={}", "0".repeat(64)).parse().unwrap(),
        );
        assert!(s.get(&wrong).is_none());
        s.remove(&h);
        assert!(s.get(&h).is_none());
    }

    #[test]
    fn csrf_and_redirects_are_checked() {
        assert!(csrf_matches("abc", "abc"));
        assert!(!csrf_matches("abc", "abd"));
        assert!(!csrf_matches("", ""));
        assert_eq!(safe_next(Some("/ui/runs/x")), "/ui/runs/x");
        assert_eq!(safe_next(Some("//evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(None), "/");
        assert!(set_cookie(Some("x"), true).contains("HttpOnly; SameSite=Strict"));
        assert!(set_cookie(Some("x"), true).ends_with("; Secure"));
    }
}
