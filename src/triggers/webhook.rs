//! Git push webhooks: GitHub (`X-Hub-Signature-256`), GitLab (`X-Gitlab-Token`),
//! Gitea/Forgejo (`X-Gitea-Signature` / `X-Forgejo-Signature`) and a generic signed form
//! (`X-Signature-256: sha256=<hex>`). Secrets and signatures are compared in constant time.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    GitLab,
    Gitea,
    Generic,
}

impl Provider {
    pub fn parse(s: &str) -> Option<Provider> {
        match s {
            "github" => Some(Provider::GitHub),
            "gitlab" => Some(Provider::GitLab),
            "gitea" | "forgejo" => Some(Provider::Gitea),
            "generic" => Some(Provider::Generic),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Provider::GitHub => "github",
            Provider::GitLab => "gitlab",
            Provider::Gitea => "gitea",
            Provider::Generic => "generic",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// Missing or wrong signature/token: 401.
    #[error("{0}")]
    Unauthorized(String),
    /// Not a payload we understand: 400.
    #[error("{0}")]
    Malformed(String),
}

/// A push to a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub branch: String,
    pub commit: String,
}

/// What a verified delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Push(Push),
    /// A ping, a tag push, a branch deletion, another event: acknowledged, nothing queued.
    Ignored(String),
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// HMAC-SHA256 of `body` under `secret`, lower-case hex (what GitHub and Gitea send).
pub fn sign(secret: &str, body: &[u8]) -> String {
    hex::encode(mac(secret, body))
}

fn mac(secret: &str, body: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail; fall back to an empty MAC
    // (which then matches nothing) rather than panic.
    match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mut m) => {
            m.update(body);
            m.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

fn check_hmac(sig_hex: &str, secret: &str, body: &[u8]) -> Result<(), WebhookError> {
    let given = hex::decode(sig_hex.trim())
        .map_err(|_| WebhookError::Unauthorized("signature is not hex".into()))?;
    let want = mac(secret, body);
    if want.is_empty() || !bool::from(given.ct_eq(&want)) {
        return Err(WebhookError::Unauthorized(
            "signature does not match".into(),
        ));
    }
    Ok(())
}

/// Checks the delivery's signature (or token) against the task's secret.
pub fn verify(
    p: Provider,
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
) -> Result<(), WebhookError> {
    let missing = |h: &str| WebhookError::Unauthorized(format!("missing {h} header"));
    match p {
        Provider::GitHub | Provider::Generic => {
            let name = if p == Provider::GitHub {
                "x-hub-signature-256"
            } else {
                "x-signature-256"
            };
            let v = header(headers, name).ok_or_else(|| missing(name))?;
            let hex_sig = v.strip_prefix("sha256=").ok_or_else(|| {
                WebhookError::Unauthorized(format!("{name} must start with sha256="))
            })?;
            check_hmac(hex_sig, secret, body)
        }
        Provider::Gitea => {
            let v = header(headers, "x-gitea-signature")
                .or_else(|| header(headers, "x-forgejo-signature"))
                .ok_or_else(|| missing("x-gitea-signature"))?;
            check_hmac(v, secret, body)
        }
        Provider::GitLab => {
            let v = header(headers, "x-gitlab-token").ok_or_else(|| missing("x-gitlab-token"))?;
            if !bool::from(v.as_bytes().ct_eq(secret.as_bytes())) {
                return Err(WebhookError::Unauthorized("token does not match".into()));
            }
            Ok(())
        }
    }
}

/// The delivery id, used to refuse replays.
pub fn delivery_id(p: Provider, headers: &HeaderMap) -> Option<String> {
    let names: &[&str] = match p {
        Provider::GitHub => &["x-github-delivery"],
        Provider::GitLab => &[
            "x-gitlab-event-uuid",
            "x-gitlab-webhook-uuid",
            "idempotency-key",
        ],
        Provider::Gitea => &["x-gitea-delivery", "x-forgejo-delivery"],
        Provider::Generic => &["x-delivery-id"],
    };
    names
        .iter()
        .find_map(|n| header(headers, n))
        .map(str::to_string)
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    reference: Option<String>,
    after: Option<String>,
    checkout_sha: Option<String>,
    commit: Option<String>,
}

/// Parses a verified delivery.
pub fn parse(p: Provider, headers: &HeaderMap, body: &[u8]) -> Result<Delivery, WebhookError> {
    let event = match p {
        Provider::GitHub => header(headers, "x-github-event"),
        Provider::GitLab => header(headers, "x-gitlab-event"),
        Provider::Gitea => header(headers, "x-gitea-event").or(header(headers, "x-forgejo-event")),
        Provider::Generic => Some("push"),
    };
    match event {
        Some("push") | Some("Push Hook") => {}
        Some(other) => return Ok(Delivery::Ignored(format!("event {other} ignored"))),
        None => return Err(WebhookError::Malformed("missing event header".into())),
    }
    let payload: PushPayload = serde_json::from_slice(body)
        .map_err(|e| WebhookError::Malformed(format!("payload is not a push event: {e}")))?;
    let reference = payload
        .reference
        .ok_or_else(|| WebhookError::Malformed("payload has no `ref`".into()))?;
    let commit = payload
        .checkout_sha
        .or(payload.after)
        .or(payload.commit)
        .ok_or_else(|| WebhookError::Malformed("payload has no `after` commit".into()))?;
    let Some(branch) = reference.strip_prefix("refs/heads/") else {
        return Ok(Delivery::Ignored(format!("{reference} is not a branch")));
    };
    if commit.len() != 40 || !commit.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(WebhookError::Malformed(format!(
            "`after` is not a commit id: {commit:?}"
        )));
    }
    if commit.chars().all(|c| c == '0') {
        return Ok(Delivery::Ignored(format!("branch {branch} was deleted")));
    }
    Ok(Delivery::Push(Push {
        branch: branch.to_string(),
        commit: commit.to_ascii_lowercase(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const BODY: &[u8] =
        br#"{"ref":"refs/heads/main","after":"0123456789abcdef0123456789abcdef01234567"}"#;

    #[test]
    fn github_signature_is_the_documented_hmac() {
        // GitHub's documented example: secret "It's a Secret to Everybody",
        // payload "Hello, World!".
        assert_eq!(
            sign("It's a Secret to Everybody", b"Hello, World!"),
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        let sig = format!("sha256={}", sign("s3cret", BODY));
        let h = headers(&[("x-hub-signature-256", &sig), ("x-github-event", "push")]);
        assert_eq!(verify(Provider::GitHub, &h, BODY, "s3cret"), Ok(()));
        assert!(matches!(
            verify(Provider::GitHub, &h, BODY, "other"),
            Err(WebhookError::Unauthorized(_))
        ));
        let mut tampered = BODY.to_vec();
        tampered[10] ^= 1;
        assert!(verify(Provider::GitHub, &h, &tampered, "s3cret").is_err());
        assert!(verify(Provider::GitHub, &HeaderMap::new(), BODY, "s3cret").is_err());
        assert_eq!(
            parse(Provider::GitHub, &h, BODY),
            Ok(Delivery::Push(Push {
                branch: "main".into(),
                commit: "0123456789abcdef0123456789abcdef01234567".into()
            }))
        );
    }

    #[test]
    fn gitlab_token_and_gitea_signature() {
        let h = headers(&[("x-gitlab-token", "tok"), ("x-gitlab-event", "Push Hook")]);
        assert_eq!(verify(Provider::GitLab, &h, BODY, "tok"), Ok(()));
        assert!(verify(Provider::GitLab, &h, BODY, "tok2").is_err());
        let h = headers(&[
            ("x-gitea-signature", &sign("k", BODY)),
            ("x-gitea-event", "push"),
        ]);
        assert_eq!(verify(Provider::Gitea, &h, BODY, "k"), Ok(()));
        assert!(verify(Provider::Gitea, &h, BODY, "j").is_err());
    }

    #[test]
    fn non_push_tags_and_garbage() {
        let ping = headers(&[("x-github-event", "ping")]);
        assert!(matches!(
            parse(Provider::GitHub, &ping, b"{}"),
            Ok(Delivery::Ignored(_))
        ));
        let push = headers(&[("x-github-event", "push")]);
        assert!(matches!(
            parse(Provider::GitHub, &push, b"not json"),
            Err(WebhookError::Malformed(_))
        ));
        let tag = br#"{"ref":"refs/tags/v1","after":"0123456789abcdef0123456789abcdef01234567"}"#;
        assert!(matches!(
            parse(Provider::GitHub, &push, tag),
            Ok(Delivery::Ignored(_))
        ));
        let bad = br#"{"ref":"refs/heads/main","after":"xyz"}"#;
        assert!(matches!(
            parse(Provider::GitHub, &push, bad),
            Err(WebhookError::Malformed(_))
        ));
    }
}
