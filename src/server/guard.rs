//! The task API's edge against other programs and web pages on the operator's machine
//! (host names are checked for every route by `listen::check_host`):
//!
//! - **The task API**: credentials (the admin, or a token with tasks/read or tasks/write)
//!   unless `--insecure-open-api`; and a state-changing request that comes from a browser
//!   (it has `Origin`, `Sec-Fetch-Site` or a cookie, or a form's content type) must be
//!   same-origin and carry `X-CSRF-Token` (from `GET /api/csrf-token`). Programs (the CLI,
//!   curl, CI jobs) send none of those and are not asked for the token.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::Auth;
use crate::listen::refuse;

/// How the task API is guarded.
pub struct ApiGuard {
    pub auth: Arc<Auth>,
    /// `--insecure-open-api`: no credentials asked (loopback development servers only).
    pub open: bool,
}

/// Who made a task-API request (empty when the API is open or a token is anonymous).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

pub(super) fn unsafe_method(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether a request carries what only browsers send (so it may be a forged one).
fn from_browser(h: &HeaderMap) -> bool {
    let form = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_ascii_lowercase())
        .is_some_and(|ct| {
            matches!(
                ct.as_str(),
                "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
            )
        });
    form || h.contains_key(header::ORIGIN)
        || h.contains_key("sec-fetch-site")
        || h.contains_key(header::COOKIE)
}

/// `Origin` (when sent) names the server the request was sent to.
pub(crate) fn same_origin(h: &HeaderMap) -> bool {
    let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return h
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_none_or(|s| s == "same-origin" || s == "none");
    };
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let authority = origin.split_once("://").map_or("", |(_, a)| a);
    !host.is_empty() && authority.eq_ignore_ascii_case(host)
}

/// Middleware for the task API: credentials, then the browser checks.
pub async fn api_guard(State(g): State<Arc<ApiGuard>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let subject = if g.open {
        String::new()
    } else {
        let (method, headers) = (req.method().clone(), req.headers().clone());
        let ip = crate::auth::http::client_ip(&req);
        match g.auth.authorize_tasks(&method, &headers, ip).await {
            Ok(s) => s,
            Err(f) => {
                let mut r = f.into_response();
                // The API's errors are `{"error": ...}`; keep the challenge header.
                let challenge = r.headers_mut().remove(header::WWW_AUTHENTICATE);
                let status = r.status();
                let msg = match status {
                    StatusCode::UNAUTHORIZED => "credentials required: the admin, or a token with tasks/read or tasks/write (ACR_TASK_USERNAME, ACR_TASK_PASSWORD)".to_string(),
                    StatusCode::TOO_MANY_REQUESTS => "too many login attempts; try again later".to_string(),
                    StatusCode::FORBIDDEN if path.starts_with("/api/registry/") => "these credentials may not do this: managing the registry's tokens, scope maps, passwords and webhooks needs the admin user".to_string(),
                    StatusCode::FORBIDDEN => "these credentials may not do this: managing tasks needs tasks/write, seeing them tasks/read".to_string(),
                    _ => "internal error".to_string(),
                };
                let retry = r.headers_mut().remove(header::RETRY_AFTER);
                let mut out = refuse(&path, status, "", msg);
                if let Some(c) = challenge {
                    out.headers_mut().insert(header::WWW_AUTHENTICATE, c);
                }
                if let Some(v) = retry {
                    out.headers_mut().insert(header::RETRY_AFTER, v);
                }
                return out;
            }
        }
    };
    if unsafe_method(req.method()) && from_browser(req.headers()) {
        if !same_origin(req.headers()) {
            tracing::warn!(%path, "cross-origin request to the task API refused");
            return refuse(
                &path,
                StatusCode::FORBIDDEN,
                "",
                "cross-origin requests to the task API are refused".into(),
            );
        }
        let token = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !g.auth.csrf_ok(&subject, token) {
            return refuse(
                &path,
                StatusCode::FORBIDDEN,
                "",
                "a request from a browser must carry the X-CSRF-Token header (GET /api/csrf-token gives it)".into(),
            );
        }
    }
    req.extensions_mut().insert(Caller(subject));
    next.run(req).await
}

/// `GET /api/csrf-token`: the caller's token for the `X-CSRF-Token` header.
pub async fn csrf_token(
    State(g): State<Arc<ApiGuard>>,
    axum::Extension(Caller(subject)): axum::Extension<Caller>,
) -> Response {
    axum::Json(serde_json::json!({"token": g.auth.csrf_token(&subject)})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_are_told_apart_from_programs() {
        let mut h = HeaderMap::new();
        assert!(!from_browser(&h));
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(!from_browser(&h));
        h.insert(
            header::CONTENT_TYPE,
            "text/plain;charset=UTF-8".parse().unwrap(),
        );
        assert!(from_browser(&h));
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:5000".parse().unwrap());
        h.insert(header::ORIGIN, "http://127.0.0.1:5000".parse().unwrap());
        assert!(from_browser(&h) && same_origin(&h));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(from_browser(&h) && !same_origin(&h));
    }
}
